"""Batched generation for held-out prompts, spread over Ray: Ray Data ``map_batches`` on an actor pool whose actors
load the model once each.

    prompts = load_prompts(path, splits=["test"])                     # [{prompt, kind, topic, split}, ...]
    records = generate_on_ray(model_dir, prompts, cfg.evaluate)       # one record per generation, in plan order

The plan (``generation_plan``) asks for one greedy generation per prompt (``greedy``) and ``samples`` sampled ones
(temperature, top-p); greedy rows come first so most batches hold one mode. A generation ends at the tokenizer's
end-of-turn token, at any configured stop token, or after ``max_new_tokens``. Prompts go through the tokenizer's
chat template with the generation prompt (the same ids the trainer scores responses after) and are left-padded.
Sampling is seeded per batch (``seed`` + the batch's first row number), so a run with the same batch size repeats.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bfpo_ray.cluster import Progress, init_ray
from bfpo_ray.config import EvalConfig, local_path

PROMPT_KINDS = ("benign", "borderline", "harmful")
GREEDY, SAMPLED = "greedy", "sampled"


def load_prompts(path: str | Path, splits: Sequence[str] | None = None, max_per_kind: int | None = None) -> list[dict]:
    """Rows of a JSONL prompt file ({prompt, kind, topic?, split?}) whose split is in ``splits`` (rows without one
    always count), first ``max_per_kind`` of each kind. Errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation prompts {path} do not exist")
    rows, per_kind = [], dict.fromkeys(PROMPT_KINDS, 0)
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({err})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_number}: expected an object, got {type(row).__name__}")
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path}:{line_number}: field 'prompt' must be a non-empty string")
        if row.get("kind") not in PROMPT_KINDS:
            raise ValueError(
                f"{path}:{line_number}: field 'kind' must be one of {PROMPT_KINDS}, got {row.get('kind')!r}"
            )
        if splits is not None and "split" in row and row["split"] not in splits:
            continue
        if max_per_kind is not None and per_kind[row["kind"]] >= max_per_kind:
            continue
        per_kind[row["kind"]] += 1
        rows.append(
            {
                "prompt": row["prompt"],
                "kind": row["kind"],
                "topic": row.get("topic"),
                "split": row.get("split"),
                "source": row.get("source"),
            }
        )
    if not rows:
        raise ValueError(f"{path}: no prompts of split(s) {list(splits) if splits else 'any'}")
    return rows


def generation_plan(prompts: Sequence[dict], evaluate: EvalConfig) -> list[dict]:
    """One row per generation to make: greedy rows (one per prompt) then sampled rows (``samples`` per prompt),
    numbered 0..N-1 in ``row``. A prompt's ``source`` and ``prefill`` (text the answer starts with) are kept."""
    modes = ([(GREEDY, 0)] if evaluate.greedy else []) + [(SAMPLED, s) for s in range(evaluate.samples)]
    plan = []
    for mode, sample in modes:
        for prompt_index, prompt in enumerate(prompts):
            plan.append(
                {
                    "row": len(plan),
                    "prompt_index": prompt_index,
                    "prompt": prompt["prompt"],
                    "kind": prompt["kind"],
                    "topic": prompt.get("topic") or "",
                    "split": prompt.get("split") or "",
                    "source": prompt.get("source") or "",
                    "prefill": prompt.get("prefill") or "",
                    "mode": mode,
                    "sample": sample,
                }
            )
    return plan


def stop_token_ids(tokenizer, stop: Sequence[str]) -> list[int]:
    """The tokenizer's end-of-turn (eos) id plus the id of every configured stop token (each must be one token)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for token in stop:
        if token not in vocab:
            raise ValueError(f"evaluate.stop: {token!r} is not a single token of the tokenizer")
        ids.append(vocab[token])
    if not ids:
        raise ValueError("the tokenizer has no eos token; give evaluate.stop")
    return list(dict.fromkeys(ids))


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    do_sample: bool,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    prefills: Sequence[str] | None = None,
) -> list[tuple[str, int, bool]]:
    """Generate for a batch of prompt texts with ``model.generate`` on left-padded chat-templated prompt ids.

    ``prefills``: per prompt, text that the answer starts with (after the assistant header); the model continues
    it and the returned response is prefill + continuation ("" for none).
    Returns, per prompt, (response text without special tokens, number of new tokens before the stop token,
    whether a stop token ended it).
    """
    import torch

    from bfpo_ray.data.tokenize import encode_prompt

    prefills = list(prefills) if prefills is not None else [""] * len(prompts)
    encoded = [
        encode_prompt(tokenizer, [{"role": "user", "content": prompt}])
        + (tokenizer(prefill, add_special_tokens=False)["input_ids"] if prefill else [])
        for prompt, prefill in zip(prompts, prefills)
    ]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    device = next(model.parameters()).device
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if do_sample
        else {"do_sample": False}
    )
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            **sampling,
        )
    results = []
    stops = set(stop_ids)
    for prefill, new_ids in zip(prefills, output[:, width:].tolist()):
        end = next((position for position, token in enumerate(new_ids) if token in stops), None)
        kept = new_ids if end is None else new_ids[:end]
        text = tokenizer.decode(kept, skip_special_tokens=True)
        results.append(((prefill + text).strip(), len(kept), end is not None))
    return results


class Generate:
    """Ray Data actor (``map_batches``, numpy batches of ``generation_plan`` rows): loads the tokenizer and the
    model once (``from_pretrained``, eval mode, GPU and bfloat16 when the actor has a GPU, else CPU and float32;
    ``attn_implementation`` as ``model.attn_implementation``), then adds ``response``, ``new_tokens`` and
    ``stopped`` to each batch."""

    def __init__(
        self,
        model_path: str,
        tokenizer_path: str | None,
        trust_remote_code: bool,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
        seed: int,
        attn_implementation: str | None = None,
    ):
        import torch

        from bfpo_ray.data.tokenize import load_tokenizer, pad_token_id
        from bfpo_ray.models import load_causal_lm, resolve_dtype

        self.tokenizer = load_tokenizer(tokenizer_path or model_path, trust_remote_code)
        on_gpu = torch.cuda.is_available()
        self.model = load_causal_lm(
            model_path,
            dtype=resolve_dtype("auto", on_gpu),
            trust_remote_code=trust_remote_code,
            device="cuda" if on_gpu else "cpu",
            attn_implementation=attn_implementation,
        )
        self.stop_ids = stop_token_ids(self.tokenizer, stop)
        self.pad_id = pad_token_id(self.tokenizer)
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        responses: list = [None] * len(batch["row"])
        for mode in (GREEDY, SAMPLED):
            rows = np.flatnonzero(batch["mode"] == mode)
            if len(rows) == 0:
                continue
            if mode == SAMPLED:
                torch.manual_seed(self.seed + int(batch["row"][rows[0]]))
            prefills = [str(p) for p in batch["prefill"][rows]] if "prefill" in batch else None
            outputs = generate_batch(
                self.model,
                self.tokenizer,
                [str(p) for p in batch["prompt"][rows]],
                do_sample=mode == SAMPLED,
                max_new_tokens=self.max_new_tokens,
                stop_ids=self.stop_ids,
                pad_id=self.pad_id,
                temperature=self.temperature,
                top_p=self.top_p,
                prefills=prefills,
            )
            for row, output in zip(rows, outputs):
                responses[row] = output
        return {
            **batch,
            "response": np.array([text for text, _, _ in responses], dtype=object),
            "new_tokens": np.array([n for _, n, _ in responses], dtype=np.int64),
            "stopped": np.array([stopped for _, _, stopped in responses], dtype=bool),
        }


def _model_name(model_path: str | Path) -> str:
    """A model directory as the progress line names it: ``<run>/export`` by its run, else by its name."""
    path = Path(str(model_path))
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def generate_on_ray(
    model_path: str | Path,
    prompts: Sequence[dict],
    evaluate: EvalConfig,
    tokenizer_path: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> list[dict]:
    """Every generation of ``generation_plan(prompts, evaluate)`` made on a pool of ``evaluate.actors`` actors with
    ``evaluate.gpus_per_actor`` GPUs each (as a Config resolved it from ``run.use_gpu``; None, in an EvalConfig
    built on its own: none), returned as plan rows with ``response``, ``new_tokens`` and ``stopped``, in plan
    order. A progress line with an ETA (``[evaluate] done/total generations of <run>/<model>``) as they arrive."""
    import ray.data

    init_ray()
    plan = generation_plan(prompts, evaluate)
    gpus = evaluate.gpus_per_actor or 0.0
    gpu_args = {"num_gpus": gpus} if gpus > 0 else {}
    dataset = ray.data.from_items(
        plan, override_num_blocks=max(1, min(len(plan) // evaluate.batch_size, 4 * evaluate.actors))
    )
    generated = dataset.map_batches(
        Generate,
        batch_format="numpy",
        batch_size=evaluate.batch_size,
        compute=ray.data.ActorPoolStrategy(size=evaluate.actors),
        fn_constructor_kwargs={
            "model_path": local_path(str(model_path)),
            "tokenizer_path": local_path(tokenizer_path),
            "trust_remote_code": trust_remote_code,
            "max_new_tokens": evaluate.max_new_tokens,
            "temperature": evaluate.temperature,
            "top_p": evaluate.top_p,
            "stop": list(evaluate.stop),
            "seed": evaluate.seed,
            "attn_implementation": attn_implementation,
        },
        **gpu_args,
    )
    records = []
    progress = Progress("evaluate", len(plan), f"generations of {_model_name(model_path)}")
    for row in generated.iter_rows():
        records.append({key: value.item() if hasattr(value, "item") else value for key, value in row.items()})
        progress.update(len(records))
    records.sort(key=lambda record: record["row"])
    if [record["row"] for record in records] != list(range(len(plan))):
        raise RuntimeError(f"generation returned {len(records)} rows for a plan of {len(plan)}")
    return records
