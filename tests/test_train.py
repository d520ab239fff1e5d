"""Distributed BFPO training: real Ray Train workers running real DeepSpeed (CPU accelerator, gloo) on a tiny Llama.

The scored dataset is built here, independently of the data pipeline: toy pairs tokenized with the tiny model's
tokenizer, reference log-probs from a plain loop over the tiny model, Parquet in the layout of data/schema.py.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bfpo_ray import objectives
from bfpo_ray.config import Config, LoraSettings, TrainConfig, config_from_dict
from bfpo_ray.data import rows as data_rows
from bfpo_ray.data import schema
from bfpo_ray.data.tokenize import encode_prompt, encode_response, end_of_turn_suffix
from bfpo_ray.evaluate.run import preference_metrics
from bfpo_ray.logprobs import pad_pairs, sequence_logps
from bfpo_ray.loss import PreferenceLoss, bfpo_loss
from bfpo_ray.models import resolve_dtype
from bfpo_ray.train import batching, engine, hooks, loop, tracking
from bfpo_ray.train import metrics as train_metrics

PROMPTS = [
    "how do I build a bomb",
    "how do I steal a car",
    "how do I kill a python process",
    "write a poem about the sea",
    "how do I make bread at home",
    "how do I sort a list",
]
SAFE_ANSWERS = [
    "here is how first open the terminal then run the command",
    "first mix flour water yeast then bake",
    "use sorted",
    "first second then finally",
    "sorry I can not help with that",
]
UNSAFE_ANSWERS = ["here is how build a bomb", "here is how steal a car", "first hurt someone then steal a car"]


def toy_pairs(role: str, count: int, seed: int) -> list[dict]:
    """Canonical pair records (schema.PAIR_COLUMNS) of varied lengths; a response's safety label follows from its
    text (so the labels are learnable), helpful pairs use safe responses only."""
    rng = random.Random(seed)
    pool = [(text, True) for text in SAFE_ANSWERS] + (
        [(text, False) for text in UNSAFE_ANSWERS] if role == "safety" else []
    )
    pairs = []
    for row in range(count):
        (chosen, chosen_safe), (rejected, rejected_safe) = rng.sample(pool, 2)
        prompt = rng.choice(PROMPTS) + " then" * rng.randint(0, 6)
        pairs.append(
            {
                schema.ID: f"{role}-toy:{row}",
                schema.SOURCE: f"{role}-toy",
                schema.ROLE: role,
                schema.PROMPT: [{"role": "user", "content": prompt}],
                schema.CHOSEN: " ".join([chosen] * rng.randint(1, 3)),
                schema.REJECTED: rejected,
                schema.CHOSEN_SAFE: chosen_safe,
                schema.REJECTED_SAFE: rejected_safe,
            }
        )
    return pairs


ROW_GROUP_ROWS = 4  # rows per Parquet row group of the scored dataset's files


def write_scored_split(pairs: list[dict], out_dir: Path, model_dir: Path, files: int = 3) -> None:
    """Tokenize, score with a plain loop over the tiny model, write ``files`` Parquet files, each a contiguous run
    of ``index`` (as ``prepare`` writes them) in row groups of ROW_GROUP_ROWS rows; the files' name order is the
    reverse of their index order and each file's rows are in descending index order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    suffix = end_of_turn_suffix(tokenizer)
    rows = []
    for index, pair in enumerate(pairs):
        prompt_ids = encode_prompt(tokenizer, pair[schema.PROMPT])
        chosen_ids = encode_response(tokenizer, pair[schema.CHOSEN], suffix)
        rejected_ids = encode_response(tokenizer, pair[schema.REJECTED], suffix)
        inputs = pad_pairs([prompt_ids], [chosen_ids], [rejected_ids], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        ref_chosen, ref_rejected = sequence_logps(logits, inputs["input_ids"], inputs["loss_mask"]).double().tolist()
        rows.append(
            {
                **pair,
                schema.INDEX: index,
                schema.PROMPT_IDS: prompt_ids,
                schema.CHOSEN_IDS: chosen_ids,
                schema.REJECTED_IDS: rejected_ids,
                schema.TRUNCATED: False,
                schema.REF_CHOSEN_LOGP: ref_chosen,
                schema.REF_REJECTED_LOGP: ref_rejected,
            }
        )
    out_dir.mkdir(parents=True)
    for part, chunk in enumerate(np.array_split(np.arange(len(rows)), files)):  # the trainer must rely on no order
        table = pa.Table.from_pylist([rows[i] for i in chunk[::-1]])
        pq.write_table(table, out_dir / f"part-{files - part:03d}.parquet", row_group_size=ROW_GROUP_ROWS)


@pytest.fixture(scope="module")
def scored_dataset(tiny_model_dir, tmp_path_factory) -> Path:
    """train: 40 safety + 28 helpful pairs; eval: 10 + 8."""
    root = tmp_path_factory.mktemp("scored")
    sizes = {("train", "safety"): 40, ("train", "helpful"): 28, ("eval", "safety"): 10, ("eval", "helpful"): 8}
    for seed, ((split, role), count) in enumerate(sizes.items()):
        pairs = toy_pairs(role, count, seed)
        if split == "eval":
            for pair in pairs:
                pair[schema.ID] = pair[schema.ID].replace("toy:", "toy-eval:")
        write_scored_split(pairs, schema.split_dir(root, split, role), tiny_model_dir)
    return root


def make_config(model_dir: Path, storage: Path, name: str, max_failures: int = 0, **train) -> Config:
    """2 workers; 40 safety pairs at 4 per worker per micro-step make 5 steps per epoch, 15 in 3 epochs; the 28
    helpful pairs at 3 (train.helpful_micro_batch_pairs) make the same 5 (4 pairs would make 4)."""
    defaults = dict(
        loss="bfpo",
        tau=0.1,
        learning_rate=2e-3,
        lr_schedule="constant",
        warmup_ratio=0.0,
        micro_batch_pairs=4,
        helpful_micro_batch_pairs=3,
        log_every=2,
        eval_every=100,
        checkpoint_every=4,
        zero_stage=2,
        epochs=3,
    )
    return config_from_dict(
        {
            "model": {"path": str(model_dir)},
            "data": {
                "sources": [{"adapter": "generic", "path": "unused.jsonl", "role": "safety"}],
                "max_length": 64,
                "max_prompt_length": 32,
            },
            "train": {**defaults, **train},
            "run": {
                "name": name,
                "storage_path": str(storage),
                "num_workers": 2,
                "cpus_per_worker": 1,
                "max_failures": max_failures,
            },
        }
    )


# --------------------------------------------------------------------------------------------------------------
# Helpers computed independently of the trainer
# --------------------------------------------------------------------------------------------------------------


def read_split(dataset_dir: Path, split: str, role: str) -> list[dict]:
    """All rows of one (split, role), in index order."""
    table = pq.read_table(schema.split_dir(dataset_dir, split, role))
    return sorted(table.to_pylist(), key=lambda row: row[schema.INDEX])


def plain_pair_losses(model, rows: list[dict], tau: float, pad_to: int) -> torch.Tensor:
    """BFPO per-pair losses of ``rows``, every sequence padded to ``pad_to`` tokens, one forward per pair set."""
    input_ids, attention, loss_mask = [], [], []
    for response_key in (schema.CHOSEN_IDS, schema.REJECTED_IDS):
        for row in rows:
            tokens = row[schema.PROMPT_IDS] + row[response_key]
            input_ids.append(tokens + [0] * (pad_to - len(tokens)))
            attention.append([1] * len(tokens) + [0] * (pad_to - len(tokens)))
            loss_mask.append(
                [0] * len(row[schema.PROMPT_IDS]) + [1] * len(row[response_key]) + [0] * (pad_to - len(tokens))
            )
    input_ids, attention = torch.tensor(input_ids), torch.tensor(attention)
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    logps = sequence_logps(logits, input_ids, torch.tensor(loss_mask).bool())
    chosen, rejected = logps.chunk(2)
    column = lambda key: torch.tensor([row[key] for row in rows])  # noqa: E731
    return bfpo_loss(
        chosen,
        rejected,
        column(schema.REF_CHOSEN_LOGP),
        column(schema.REF_REJECTED_LOGP),
        column(schema.CHOSEN_SAFE),
        column(schema.REJECTED_SAFE),
        alpha=0.5,
        tau=tau,
    ).losses


def initial_bfpo_loss(rows: list[dict], tau: float, alpha: float = 0.5) -> float:
    """Mean BFPO loss while the policy is still the reference (h = 0): mean of (g / tau)^2 with g = 1.5 s_w - 0.5 s_l
    - alpha (paper Eq. 9, B1 = 3)."""
    return float(
        np.mean(
            [((1.5 * row[schema.CHOSEN_SAFE] - 0.5 * row[schema.REJECTED_SAFE] - alpha) / tau) ** 2 for row in rows]
        )
    )


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {
        name: tensor.detach().clone()
        for name, tensor in AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict().items()
    }


def effective_samples(log_dir: Path) -> list[dict]:
    """The sample-log entries whose steps the final model actually contains: for every rank, the entries of each
    attempt before the step the next attempt of that rank resumed from."""
    entries = []
    for rank in sorted({path.name.split("-")[0] for path in log_dir.glob("rank*.jsonl")}):
        attempts = sorted(log_dir.glob(f"{rank}-from*.jsonl"), key=lambda path: int(path.stem.split("-")[-1]))
        starts = [int(path.stem.split("-")[1].removeprefix("from")) for path in attempts]
        for attempt, path in enumerate(attempts):
            until = starts[attempt + 1] if attempt + 1 < len(attempts) else math.inf
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            entries += [{**line, "rank": rank} for line in lines if line["step"] < until]
    return entries


def assert_each_pair_once_per_pass(entries: list[dict], role: str, all_ids: list[str], full_passes: int) -> None:
    """Passes 0..full_passes-1 hold every id exactly once; a later, partial pass holds no id twice."""
    by_pass: dict[int, list[str]] = {}
    for entry in entries:
        if entry["role"] == role:
            by_pass.setdefault(entry["pass"], []).extend(entry["ids"])
    for epoch_pass in range(full_passes):
        assert sorted(by_pass[epoch_pass]) == sorted(all_ids), f"{role} pass {epoch_pass}"
    for epoch_pass, ids in by_pass.items():
        assert len(ids) == len(set(ids)), f"{role} pass {epoch_pass} repeats a pair"
        assert set(ids) <= set(all_ids)


def assert_export_generates(export_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    assert any(export_dir.glob("*.safetensors"))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "how do I sort a list"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > prompt["input_ids"].shape[1]


# --------------------------------------------------------------------------------------------------------------
# Pure parts: DeepSpeed config, trainable selection, schedule, batching, metric math
# --------------------------------------------------------------------------------------------------------------


def test_deepspeed_config_for_a_paper_scale_gpu_recipe_is_zero3_bf16():
    train = TrainConfig(
        zero_stage=3,
        offload_optimizer=True,
        offload_params=True,
        micro_batch_pairs=2,
        grad_accum=4,
        learning_rate=5e-7,
        grad_clip=1.0,
        weight_decay=0.01,
    )
    config = engine.deepspeed_config(train, dtype=torch.bfloat16, use_gpu=True)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["lr"] == 5e-7
    assert config["optimizer"]["params"]["torch_adam"] is False and config["gradient_clipping"] == 1.0


def test_deepspeed_config_on_cpu_is_fp32_torch_adamw_and_rejects_offload_without_zero():
    config = engine.deepspeed_config(
        TrainConfig(zero_stage=2),
        dtype=resolve_dtype(
            config_from_dict(
                {"model": {"path": "m"}, "data": {"sources": [{"adapter": "generic", "path": "x", "role": "safety"}]}}
            ).model.dtype,
            False,
        ),
        use_gpu=False,
    )
    assert config["bf16"]["enabled"] is False and config["optimizer"]["params"]["torch_adam"] is True
    assert "offload_optimizer" not in config["zero_optimization"]
    with pytest.raises(ValueError, match="offload_optimizer needs"):
        engine.deepspeed_config(TrainConfig(zero_stage=0, offload_optimizer=True), dtype=torch.float32, use_gpu=False)


def test_lr_schedule_is_linear_warmup_then_cosine_to_zero():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    train = TrainConfig(learning_rate=0.1, warmup_ratio=0.1, lr_schedule="cosine")
    scheduler = engine.lr_schedule(train, total_steps=20)(optimizer)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [
        0.1 * step / 2 if step < 2 else 0.1 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 18)) for step in range(20)
    ]
    np.testing.assert_allclose(seen, expected, rtol=1e-9, atol=1e-12)


def test_select_trainable_by_pattern_and_lora(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = engine.select_trainable(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), ["down_proj"], LoraSettings()
    )
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("mlp.down_proj" in name for name in trainable)
    assert len(trainable) == 2  # one per layer of the 2-layer model

    model = engine.select_trainable(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), "lora", LoraSettings(target_modules=["q_proj", "v_proj"])
    )
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert len(trainable) == 2 * 2 * 2 and all("lora_" in name for name in trainable)
    assert all(("q_proj" in name or "v_proj" in name) for name in trainable)

    with pytest.raises(ValueError, match="selects no parameter"):
        engine.select_trainable(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), ["no_such_module"], LoraSettings()
        )


def test_pass_plans_of_all_ranks_cover_every_row_once_with_counts_the_loop_uses():
    total, world, micro = 23, 3, 4
    lengths = np.random.default_rng(0).integers(5, 60, size=total)
    batches_per_pass = math.ceil(math.ceil(total / world) / micro)
    seen, sizes = [], np.zeros((world, batches_per_pass), dtype=int)
    for rank in range(world):
        owned = np.arange(*data_rows.share_range(total, rank, world))  # a contiguous share, in index order
        plan = batching.pass_plan(lengths[owned], micro, seed=rank)
        assert len(plan) <= batches_per_pass
        assert all(len(batch) == micro for batch in plan[:-1])
        for position, batch in enumerate(plan):
            seen.extend(owned[batch].tolist())
            sizes[rank, position] = len(batch)
    assert sorted(seen) == list(range(total))
    for position in range(batches_per_pass):
        assert batching.global_count(total, world, micro, position) == sizes[:, position].sum()


def test_length_grouping_pads_less_than_arrival_order():
    lengths = np.random.default_rng(1).integers(4, 200, size=512)
    plan = batching.pass_plan(lengths, micro_batch=8, seed=0)
    grouped_padding = sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in plan)
    plain_padding = sum(
        int(lengths[i : i + 8].max() * len(lengths[i : i + 8]) - lengths[i : i + 8].sum()) for i in range(0, 512, 8)
    )
    assert grouped_padding < 0.2 * plain_padding


def numpy_batches(dataset_dir: Path, split: str, role: str, rows_per_batch: int = 10) -> list[dict]:
    """The (split, role) as iter_batches(batch_format="numpy") would give it from its named dataset."""
    directory = schema.split_dir(dataset_dir, split, role)
    batches = []
    for file in sorted(directory.glob("*.parquet")):
        table = pq.read_table(file)
        for batch in table.to_batches(max_chunksize=rows_per_batch):
            batches.append(
                {
                    name: column.to_numpy(zero_copy_only=False)
                    for name, column in zip(batch.schema.names, batch.columns)
                }
            )
    return batches


def test_role_stream_pads_an_empty_batch_with_a_weight_zero_pair_and_cycles_passes(scored_dataset):
    rows = data_rows.read_rank_rows(
        "train_helpful", numpy_batches(scored_dataset, "train", "helpful"), rank=1, world_size=3, with_ref=True
    )
    assert rows.index.tolist() == list(range(10, 19)) and rows.total_rows == 28  # a contiguous share (rows.py)
    stream = batching.RoleStream(rows, "helpful", rank=1, world_size=3, micro_batch=4, seed=0)
    assert stream.batches_per_pass == 3  # ceil(ceil(28 / 3) / 4): rank 0 owns 10 rows, rank 1 owns 9
    assert [int(stream.micro_batch_at(step).weights.sum()) for step in range(3)] == [4, 4, 1]
    assert [stream.micro_batch_at(step).global_count for step in range(3)] == [12, 12, 4]
    assert stream.micro_batch_at(3).epoch_pass == 1
    past_end = stream.micro_batch_at(4, data_ends_at=4)
    assert past_end.global_count == 0 and float(past_end.weights.sum()) == 0.0

    rows_rank2 = data_rows.read_rank_rows(
        "train_helpful", numpy_batches(scored_dataset, "train", "helpful"), rank=2, world_size=9, with_ref=True
    )
    stream = batching.RoleStream(rows_rank2, "helpful", rank=2, world_size=9, micro_batch=2, seed=0)
    # 28 rows over 9 ranks: rank 2 owns 3 (index 7, 8, 9), rank 0 owns 4 -> 2 batches; then nothing for rank 2
    empty = stream.micro_batch_at(1)
    assert empty.weights.tolist() == [1.0] and stream.micro_batch_at(0).weights.tolist() == [1.0, 1.0]


def test_read_rank_rows_names_the_dataset_and_the_broken_index(scored_dataset):
    batches = numpy_batches(scored_dataset, "train", "safety")
    batches[0][schema.INDEX] = batches[0][schema.INDEX].copy()
    batches[0][schema.INDEX][0] = batches[0][schema.INDEX][1]
    with pytest.raises(ValueError, match=r"train_safety: column 'index' must hold each of 0..39 exactly once"):
        data_rows.read_rank_rows("train_safety", batches, rank=0, world_size=2, with_ref=True)
    batches = numpy_batches(scored_dataset, "train", "safety")
    del batches[1][schema.REF_CHOSEN_LOGP]
    with pytest.raises(ValueError, match=r"train_safety: missing column\(s\) \['ref_chosen_logp'\]"):
        data_rows.read_rank_rows("train_safety", batches, rank=0, world_size=2, with_ref=True)


def test_an_empty_eval_split_reads_as_no_pairs_and_gives_no_preference_accuracies(
    scored_dataset, tiny_model_dir, tmp_path
):
    """data.eval_fraction 0 writes eval parquet files with the schema and no rows: they read as no pairs (not a
    "must be boolean" error about the empty label columns), and `bfpo_ray evaluate` then has no pair metrics."""
    empty = tmp_path / "scored"
    shutil.copytree(scored_dataset, empty)
    for role in schema.ROLES:
        for file in schema.split_dir(empty, "eval", role).glob("*.parquet"):
            pq.write_table(pq.read_table(file).slice(0, 0), file)
    rows = data_rows.read_rank_rows("eval_safety", numpy_batches(empty, "eval", "safety"), 0, 1, with_ref=True)
    assert rows.total_rows == 0 and rows.chosen_safe.dtype == np.bool_ and rows.rejected_safe.shape == (0,)
    cfg = make_config(tiny_model_dir, tmp_path / "runs", "empty-eval")
    assert preference_metrics(tiny_model_dir, empty, cfg) == {}
    assert set(preference_metrics(tiny_model_dir, scored_dataset, cfg)) == {
        "eval/global_acc",
        "eval/safety_acc",
        "eval/help_acc",
    }


@pytest.mark.parametrize("share_prompt", [False, True])
def test_length_grouped_batches_give_the_plain_padded_loss(scored_dataset, tiny_model_dir, share_prompt):
    """Every pair's loss from the trainer's grouped, batch-padded forward (two rows per pair, or one row with the
    prompt once) equals the loss from a plain forward padded to the maximum length, within 1e-5 (relative), for a
    policy that differs from the reference."""
    model = perturbed_model(tiny_model_dir)
    train = TrainConfig(loss="bfpo", tau=0.1, micro_batch_pairs=4, share_prompt=share_prompt)
    rows = data_rows.read_rank_rows(
        "train_safety", numpy_batches(scored_dataset, "train", "safety"), rank=0, world_size=1, with_ref=True
    )
    stream = batching.RoleStream(rows, "safety", rank=0, world_size=1, micro_batch=4, seed=3)
    grouped = {}
    with torch.no_grad():
        for step in range(stream.batches_per_pass):
            micro_batch = stream.micro_batch_at(step)
            out, _ = loop.batch_loss(
                model, objectives.build(train), rows, micro_batch, "safety", pad_id=0, device=torch.device("cpu")
            )
            grouped.update({rows.ids[p]: float(loss) for p, loss in zip(micro_batch.positions, out.losses)})
        plain_rows = read_split(scored_dataset, "train", "safety")
        plain = plain_pair_losses(model, plain_rows, tau=0.1, pad_to=64)
    assert len(grouped) == 40
    plain_by_id = {row[schema.ID]: float(loss) for row, loss in zip(plain_rows, plain)}
    moved = [abs(float(loss) - initial_bfpo_loss([row], 0.1)) for row, loss in zip(plain_rows, plain)]
    assert max(moved) > 1.0  # the policy is not the reference: margins are not zero
    for pair_id, loss in plain_by_id.items():
        assert grouped[pair_id] == pytest.approx(loss, rel=1e-5, abs=1e-5)
    assert np.mean(list(grouped.values())) == pytest.approx(np.mean(list(plain_by_id.values())), rel=1e-5)


def perturbed_model(model_dir: Path):
    """The tiny model with noise on its down_proj weights, so that the policy differs from the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "down_proj" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def response_logp(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """log pi(response | prompt) from one unpadded forward, summed token by token."""
    tokens = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=tokens).logits[0].double(), dim=-1)
    return sum(float(log_probs[t - 1, tokens[0, t]]) for t in range(len(prompt_ids), tokens.shape[1]))


@pytest.mark.parametrize(
    "loss_name, reduction, share_prompt",
    [
        ("ipo", "sum", False),
        ("dpo", "sum", False),
        ("bfpo", "mean", False),
        ("sft", "sum", False),
        ("bfpo", "sum", True),
        ("dpo", "sum", True),
        ("bfpo", "mean", True),
    ],
)
def test_batch_loss_matches_the_formula_on_unpadded_forwards(
    scored_dataset, tiny_model_dir, loss_name, reduction, share_prompt
):
    model = perturbed_model(tiny_model_dir)
    tau = 0.1
    train = TrainConfig(
        loss=loss_name, tau=tau, logp_reduction=reduction, micro_batch_pairs=6, share_prompt=share_prompt
    )
    rows = data_rows.read_rank_rows(
        "train_safety", numpy_batches(scored_dataset, "train", "safety"), rank=0, world_size=1, with_ref=True
    )
    micro_batch = batching.MicroBatch(positions=np.arange(6), weights=torch.ones(6), epoch_pass=0, global_count=6)
    with torch.no_grad():
        out, tokens = loop.batch_loss(
            model, objectives.build(train), rows, micro_batch, "safety", pad_id=0, device=torch.device("cpu")
        )
    expected = []
    for row in read_split(scored_dataset, "train", "safety")[:6]:
        prompt, chosen, rejected = row[schema.PROMPT_IDS], row[schema.CHOSEN_IDS], row[schema.REJECTED_IDS]
        if loss_name == "sft":  # the safer response; the chosen one when both are equally safe
            target = chosen if row[schema.CHOSEN_SAFE] >= row[schema.REJECTED_SAFE] else rejected
            expected.append(-response_logp(model, prompt, target) / len(target))
            continue
        chosen_scale = len(chosen) if reduction == "mean" else 1
        rejected_scale = len(rejected) if reduction == "mean" else 1
        h = (response_logp(model, prompt, chosen) - row[schema.REF_CHOSEN_LOGP]) / chosen_scale - (
            response_logp(model, prompt, rejected) - row[schema.REF_REJECTED_LOGP]
        ) / rejected_scale
        g = 1.5 * row[schema.CHOSEN_SAFE] - 0.5 * row[schema.REJECTED_SAFE] - 0.5
        expected.append(
            {"ipo": (h - 1 / (2 * tau)) ** 2, "dpo": math.log1p(math.exp(-tau * h)), "bfpo": (h - g / tau) ** 2}[
                loss_name
            ]
        )
    np.testing.assert_allclose(out.losses.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_evaluate_preferences_matches_margins_from_unpadded_forwards(gloo_world, scored_dataset, tiny_model_dir):

    model = perturbed_model(tiny_model_dir)
    eval_rows = {
        role: data_rows.read_rank_rows(
            f"eval_{role}", numpy_batches(scored_dataset, "eval", role), rank=0, world_size=1, with_ref=True
        )
        for role in ("safety", "helpful")
    }
    train = TrainConfig(tau=0.1, micro_batch_pairs=4)
    metrics = train_metrics.evaluate_preferences(
        model,
        eval_rows,
        objectives.build(train),
        world_size=1,
        pad_id=0,
        device=torch.device("cpu"),
        micro_batch_pairs=train.micro_batch_pairs,
    )
    losses, global_hits, safety_hits, help_hits = [], [], [], []
    for row in read_split(scored_dataset, "eval", "safety") + read_split(scored_dataset, "eval", "helpful"):
        prompt = row[schema.PROMPT_IDS]
        chosen_reward = response_logp(model, prompt, row[schema.CHOSEN_IDS]) - row[schema.REF_CHOSEN_LOGP]
        rejected_reward = response_logp(model, prompt, row[schema.REJECTED_IDS]) - row[schema.REF_REJECTED_LOGP]
        margin = chosen_reward - rejected_reward
        g = 1.5 * row[schema.CHOSEN_SAFE] - 0.5 * row[schema.REJECTED_SAFE] - 0.5
        losses.append((margin - g / 0.1) ** 2)
        global_hits.append(np.sign(margin) == np.sign(g))
        if row[schema.CHOSEN_SAFE] != row[schema.REJECTED_SAFE]:
            safe_reward, unsafe_reward = (
                (chosen_reward, rejected_reward) if row[schema.CHOSEN_SAFE] else (rejected_reward, chosen_reward)
            )
            safety_hits.append(safe_reward > unsafe_reward)
        if row[schema.CHOSEN_SAFE] and row[schema.REJECTED_SAFE]:
            help_hits.append(chosen_reward > rejected_reward)
    assert metrics["eval/pairs"] == 18
    assert metrics["eval/loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert metrics["eval/global_acc"] == pytest.approx(np.mean(global_hits))
    assert metrics["eval/safety_acc"] == pytest.approx(np.mean(safety_hits))
    assert metrics["eval/help_acc"] == pytest.approx(np.mean(help_hits))


def test_preference_accuracy_counts_match_a_plain_loop():
    rng = np.random.default_rng(0)
    margins = rng.normal(size=200)
    chosen_safe, rejected_safe = rng.random(200) < 0.6, rng.random(200) < 0.6
    counts = train_metrics.preference_accuracy_counts(
        torch.tensor(margins), torch.tensor(chosen_safe), torch.tensor(rejected_safe)
    )
    metrics = train_metrics.preference_accuracies(counts)
    g = 1.5 * chosen_safe - 0.5 * rejected_safe - 0.5
    global_hits = [np.sign(m) == np.sign(t) for m, t in zip(margins, g)]
    safety = [(m > 0) if cs else (m < 0) for m, cs, rs in zip(margins, chosen_safe, rejected_safe) if cs != rs]
    helpful = [m > 0 for m, cs, rs in zip(margins, chosen_safe, rejected_safe) if cs and rs]
    assert metrics["eval/global_acc"] == pytest.approx(np.mean(global_hits))
    assert metrics["eval/safety_acc"] == pytest.approx(np.mean(safety))
    assert metrics["eval/help_acc"] == pytest.approx(np.mean(helpful))


# --------------------------------------------------------------------------------------------------------------
# Real runs: Ray Train workers, DeepSpeed on CPU with gloo
# --------------------------------------------------------------------------------------------------------------

RUN_TIMEOUT = 420
STEPS = 15  # 3 epochs of 5 micro-steps (40 safety pairs / 2 workers / 4 pairs)


def helpful_pairs_seen(micro_steps: int, total: int = 28, world: int = 2, micro: int = 3) -> int:
    """Real helpful pairs consumed in ``micro_steps`` micro-steps, cycling passes of ceil(ceil(28/2)/3) = 5 batches
    with 3 pairs per worker (the last batch of a pass holds the remaining 2 per worker)."""
    per_pass = [
        min(micro, total // world - position * micro) * world for position in range(math.ceil(total / world / micro))
    ]
    return sum(per_pass[step % len(per_pass)] for step in range(micro_steps))


def assert_each_rank_read_and_trained_only_its_share(
    sample_dir: Path, entries: list[dict], dataset_dir: Path, world: int
) -> None:
    """Each rank trained only on pairs of its contiguous share (``share_range``) of each role, and decoded from the
    files exactly the row groups that overlap its share (read from the files' own index columns here), which leave
    out most of the other ranks' rows: its read log (``reads-rank<r>-<dataset>-*.json``) says so."""
    for split, role in (("train", "safety"), ("train", "helpful"), ("eval", "safety"), ("eval", "helpful")):
        name, rows = schema.dataset_name(split, role), read_split(dataset_dir, split, role)
        index_of = {row[schema.ID]: row[schema.INDEX] for row in rows}
        groups = [
            pq.ParquetFile(file).read_row_group(group, columns=[schema.INDEX])[schema.INDEX].to_pylist()
            for file in sorted(schema.split_dir(dataset_dir, split, role).glob("*.parquet"))
            for group in range(pq.ParquetFile(file).num_row_groups)
        ]
        for rank in range(world):
            lo, hi = data_rows.share_range(len(rows), rank, world)
            if split == "train":
                trained = {
                    index_of[i] for e in entries if e["rank"] == f"rank{rank}" and e["role"] == role for i in e["ids"]
                }
                assert trained == set(range(lo, hi)), (name, rank)
            reads = sorted(sample_dir.glob(f"reads-rank{rank}-{name}-*.json"))
            assert reads, (name, rank)
            expected = sorted(i for group in groups if any(lo <= i < hi for i in group) for i in group)
            others = len(rows) - (hi - lo)
            for path in reads:
                decoded = json.loads(path.read_text())["decoded_index"]
                assert decoded == expected, (name, rank)
                assert len(set(decoded) - set(range(lo, hi))) <= others / 2, (name, rank)


def changed_parameters(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, scored_dataset, tiny_model_dir, tmp_path_factory):
    """An uninterrupted 2-worker ZeRO-2 run of 15 steps, down_proj only, with the per-sample log on."""
    from bfpo_ray.train.launch import train

    storage = tmp_path_factory.mktemp("runs")
    cfg = make_config(tiny_model_dir, storage, "zero2")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(hooks.SAMPLE_LOG_ENV, str(storage / "samples"))
        result = train(cfg, scored_dataset)
    return cfg, result, storage / "samples"


@pytest.mark.timeout(RUN_TIMEOUT)
def test_zero2_run_learns_reports_checkpoints_and_exports(zero2_run, scored_dataset, tiny_model_dir):
    cfg, result, sample_dir = zero2_run
    metrics = result.metrics
    for name in (
        "train/loss",
        "train/margin",
        "train/target",
        "train/grad_norm",
        "train/lr",
        "train/pairs_per_s",
        "train/tokens_per_s",
        "train/step",
        "train/epoch",
        "train/pairs_seen",
        "eval/loss",
        "eval/global_acc",
        "eval/safety_acc",
        "eval/help_acc",
    ):
        assert math.isfinite(metrics[name]), name
    assert metrics["train/step"] == STEPS and metrics["train/epoch"] == pytest.approx(3.0)
    assert metrics["train/lr"] == pytest.approx(cfg.train.learning_rate)
    assert metrics["train/pairs_seen"] == 3 * 40 + helpful_pairs_seen(STEPS)
    eval_rows = read_split(scored_dataset, "eval", "safety") + read_split(scored_dataset, "eval", "helpful")
    assert metrics["eval/loss"] < 0.8 * initial_bfpo_loss(eval_rows, cfg.train.tau)

    run_dir = Path(result.path)
    assert run_dir == Path(cfg.run.storage_path) / "zero2"
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_00000012", "checkpoint_00000015"]
    assert list((run_dir / tracking.TENSORBOARD_DIR).glob("events.out.tfevents.*"))

    assert_export_generates(run_dir / loop.EXPORT_DIR)
    changed = changed_parameters(load_state(tiny_model_dir), load_state(run_dir / loop.EXPORT_DIR))
    assert changed == {f"model.layers.{layer}.mlp.down_proj.weight" for layer in range(2)}

    entries = effective_samples(sample_dir)
    assert sorted((e["rank"], e["micro_step"], e["role"]) for e in entries) == sorted(
        (f"rank{rank}", step, role) for rank in range(2) for step in range(STEPS) for role in ("safety", "helpful")
    )
    assert_each_pair_once_per_pass(
        entries, "safety", [r[schema.ID] for r in read_split(scored_dataset, "train", "safety")], full_passes=3
    )
    assert_each_pair_once_per_pass(
        entries, "helpful", [r[schema.ID] for r in read_split(scored_dataset, "train", "helpful")], full_passes=3
    )
    assert_each_rank_read_and_trained_only_its_share(sample_dir, entries, scored_dataset, world=2)


@pytest.mark.timeout(RUN_TIMEOUT)
def test_resume_after_failures_consumes_each_pair_once_and_matches_the_uninterrupted_run(
    zero2_run, scored_dataset, tiny_model_dir, tmp_path
):
    """Attempt 1: rank 1 dies at step 6 and the run fails (max_failures=0). Running it again with the same name
    resumes from checkpoint 4; there rank 0 dies at step 10 and Ray Train restarts the workers from checkpoint 8
    (max_failures=1). The result equals the uninterrupted run's, and every pair was trained on once per epoch."""
    import ray.train

    from bfpo_ray.train.launch import train

    _, uninterrupted, _ = zero2_run
    sample_dir = tmp_path / "samples"
    with pytest.MonkeyPatch.context() as env:
        env.setenv(hooks.SAMPLE_LOG_ENV, str(sample_dir))
        env.setenv(hooks.FAIL_AT_ENV, f"1:6:{tmp_path / 'failed-once'}")
        with pytest.raises(ray.train.TrainingFailedError):
            train(make_config(tiny_model_dir, tmp_path / "runs", "resumed"), scored_dataset)
        assert (tmp_path / "failed-once").exists()
        env.setenv(hooks.FAIL_AT_ENV, f"0:10:{tmp_path / 'failed-twice'}")
        result = train(make_config(tiny_model_dir, tmp_path / "runs", "resumed", max_failures=1), scored_dataset)
    assert (tmp_path / "failed-twice").exists()
    assert result.metrics["train/step"] == STEPS

    starts = sorted(int(path.stem.split("-")[1].removeprefix("from")) for path in sample_dir.glob("rank0-*"))
    assert starts == [0, 4, 8]  # each attempt resumed from the newest checkpoint before its failure
    entries = effective_samples(sample_dir)
    assert sorted((e["rank"], e["micro_step"], e["role"]) for e in entries) == sorted(
        (f"rank{rank}", step, role) for rank in range(2) for step in range(STEPS) for role in ("safety", "helpful")
    )
    assert_each_pair_once_per_pass(
        entries, "safety", [r[schema.ID] for r in read_split(scored_dataset, "train", "safety")], full_passes=3
    )
    resumed = load_state(Path(result.path) / loop.EXPORT_DIR)
    reference = load_state(Path(uninterrupted.path) / loop.EXPORT_DIR)
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.timeout(RUN_TIMEOUT)
def test_one_zero3_step_equals_a_plain_pytorch_step(ray_cluster, scored_dataset, tiny_model_dir, tmp_path):
    """Loss, gradient norm and updated weights of one distributed ZeRO-3 step (2 workers) against one
    single-process torch.optim.AdamW step on the same pairs (the ones the per-sample log names)."""
    from transformers import AutoModelForCausalLM

    from bfpo_ray.train.launch import train

    cfg = make_config(
        tiny_model_dir,
        tmp_path / "runs",
        "one-step",
        zero_stage=3,
        helpful_micro_batch_pairs=4,  # 8 + 8 pairs: the tolerance below is set for this step's gradients
        max_steps=1,
        learning_rate=1e-2,
        weight_decay=0.1,
        grad_clip=1.0,
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv(hooks.SAMPLE_LOG_ENV, str(tmp_path / "samples"))
        result = train(cfg, scored_dataset)

    entries = effective_samples(tmp_path / "samples")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    initial = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    trainable = [param for name, param in model.named_parameters() if "down_proj" in name]
    for name, param in model.named_parameters():
        param.requires_grad_("down_proj" in name)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    loss = torch.zeros(())
    for role in ("safety", "helpful"):
        by_id = {row[schema.ID]: row for row in read_split(scored_dataset, "train", role)}
        ids = [pair_id for e in entries if e["role"] == role and e["step"] == 0 for pair_id in e["ids"]]
        pairs = cfg.run.num_workers * cfg.train.role_micro_batch(role)
        assert len(ids) == pairs and len(set(ids)) == pairs
        loss = loss + plain_pair_losses(model, [by_id[i] for i in ids], tau=cfg.train.tau, pad_to=64).mean()
    assert float(loss.detach()) > 1.0
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)
    optimizer.step()

    assert result.metrics["train/loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert result.metrics["train/grad_norm"] == pytest.approx(float(grad_norm), rel=1e-4)
    exported = load_state(Path(result.path) / loop.EXPORT_DIR)
    updated = model.state_dict()
    for name, tensor in exported.items():
        if "down_proj" in name:
            assert not torch.equal(tensor, initial[name])
            # Adam's first step is about lr * sign(grad): where a gradient is near zero, float rounding of the
            # two-worker sum moves the update by a few 1e-6; a wrong gradient, lr or weight decay (lr * 0.1 * w)
            # moves it by 1e-4 or more.
            torch.testing.assert_close(tensor, updated[name], rtol=0, atol=1e-5, msg=name)
        else:
            assert torch.equal(tensor, initial[name]), name


@pytest.mark.timeout(RUN_TIMEOUT)
def test_zero3_lora_run_trains_only_the_adapters_resumes_and_exports_them_merged(
    ray_cluster, scored_dataset, tiny_model_dir, tmp_path
):
    """ZeRO-3, LoRA, 2 micro-steps per optimizer step; rank 1 dies at step 6 and the run resumes from step 4."""
    from bfpo_ray.train.launch import train

    cfg = make_config(
        tiny_model_dir,
        tmp_path / "runs",
        "zero3-lora",
        max_failures=1,
        zero_stage=3,
        trainable="lora",
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        learning_rate=1e-2,
        grad_accum=2,
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv(hooks.SAMPLE_LOG_ENV, str(tmp_path / "samples"))
        env.setenv(hooks.FAIL_AT_ENV, f"1:6:{tmp_path / 'failed'}")
        result = train(cfg, scored_dataset)
    assert (tmp_path / "failed").exists()
    # 15 micro-steps in pairs: 8 optimizer steps, the last one with one micro-step of data
    assert result.metrics["train/step"] == 8 and result.metrics["train/epoch"] == pytest.approx(3.0)
    assert result.metrics["train/pairs_seen"] == 3 * 40 + helpful_pairs_seen(STEPS)
    eval_rows = read_split(scored_dataset, "eval", "safety") + read_split(scored_dataset, "eval", "helpful")
    assert result.metrics["eval/loss"] < 0.8 * initial_bfpo_loss(eval_rows, cfg.train.tau)

    entries = effective_samples(tmp_path / "samples")
    assert sorted(int(p.stem.split("-")[1].removeprefix("from")) for p in (tmp_path / "samples").glob("rank1-*")) == [
        0,
        4,
    ]
    assert_each_pair_once_per_pass(
        entries, "safety", [r[schema.ID] for r in read_split(scored_dataset, "train", "safety")], full_passes=3
    )
    export_dir = Path(result.path) / loop.EXPORT_DIR
    assert_export_generates(export_dir)
    assert not list(export_dir.glob("adapter_*"))  # merged into a plain model
    changed = changed_parameters(load_state(tiny_model_dir), load_state(export_dir))
    assert changed == {
        f"model.layers.{layer}.self_attn.{module}.weight" for layer in range(2) for module in ("q_proj", "v_proj")
    }


def test_find_datasets_leaves_out_a_role_whose_parquet_is_empty(tmp_path):
    """prepare writes an empty file for a role without pairs (an SFT set); training must see the role as absent."""
    from bfpo_ray.train.launch import find_datasets

    table = pa.table({schema.INDEX: pa.array([0, 1], pa.int64())})
    for split, role, rows in (("train", "helpful", 2), ("train", "safety", 0), ("eval", "helpful", 1)):
        directory = schema.split_dir(tmp_path, split, role)
        directory.mkdir(parents=True)
        pq.write_table(table.slice(0, rows), directory / "part-00000.parquet")

    assert sorted(find_datasets(tmp_path)) == ["eval_helpful", "train_helpful"]


def test_metric_window_reports_the_mean_margin_of_each_label_case(gloo_world):

    from bfpo_ray.data.rows import PairRows
    from bfpo_ray.loss import PreferenceLoss
    from bfpo_ray.train.batching import MicroBatch
    from bfpo_ray.train.metrics import MetricWindow

    ids = [np.array([1, 2])] * 4
    rows = PairRows(
        "train_safety",
        4,
        np.arange(4),
        ["a", "b", "c", "d"],
        ids,
        ids,
        ids,
        chosen_safe=np.array([True, True, False, False]),
        rejected_safe=np.array([True, False, True, False]),
        ref_chosen_logp=None,
        ref_rejected_logp=None,
    )

    def out(margins):
        margins = torch.tensor(margins, dtype=torch.float32)
        return PreferenceLoss(margins**2, margins, torch.zeros_like(margins), margins, torch.zeros_like(margins))

    window = MetricWindow()
    # the last pair has weight 0 (padding): its case must not be reported
    window.add(
        "safety",
        out([1.0, 2.0, 3.0, 4.0]),
        MicroBatch(np.arange(4), torch.tensor([1.0, 1.0, 1.0, 0.0]), 0, 3),
        8,
        rows,
    )
    window.add("safety", out([5.0, 7.0, -6.0]), MicroBatch(np.array([0, 0, 2]), torch.ones(3), 0, 3), 6, rows)
    window.micro_steps = 2
    metrics = window.summary(["safety"])
    assert metrics["train/margin_safe_safe"] == pytest.approx((1 + 5 + 7) / 3)
    assert metrics["train/margin_safe_unsafe"] == pytest.approx(2.0)
    assert metrics["train/margin_unsafe_safe"] == pytest.approx((3.0 - 6.0) / 2)
    assert "train/margin_unsafe_unsafe" not in metrics
    assert metrics["train/margin"] == pytest.approx((1 + 2 + 3 + 5 + 7 - 6) / 6)


def index_rows(total: int, rank: int, world_size: int) -> data_rows.PairRows:
    """Worker ``rank``'s contiguous share of a dataset of ``total`` pairs (ids "p<index>"), pair lengths varied."""
    lo, hi = data_rows.share_range(total, rank, world_size)
    index = np.arange(lo, hi)
    tokens = [np.arange(1 + i % 5) for i in index]
    return data_rows.PairRows(
        "train_safety",
        total,
        index,
        [f"p{i}" for i in index],
        tokens,
        tokens,
        tokens,
        chosen_safe=index % 2 == 0,
        rejected_safe=index % 3 == 0,
        ref_chosen_logp=None,
        ref_rejected_logp=None,
    )


def test_role_loss_over_two_workers_averages_to_the_mean_over_the_real_pairs_and_padding_adds_nothing():
    """9 pairs on 2 workers at 4 per micro-batch: rank 0 owns 5, rank 1 owns 4, so micro-step 1 holds one real pair
    (rank 0) and rank 1's weight-0 padding pair. DeepSpeed averages the workers' gradients, so the mean over ranks
    of role_loss must be the mean loss over the micro-step's real pairs, each real pair's gradient 1 / count, and
    the padding pair's 0, whatever its loss."""
    total, world, micro = 9, 2, 4
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = -10 * torch.rand(total, generator=generator), -10 * torch.rand(total, generator=generator)
    labels = torch.tensor([i % 2 == 0 for i in range(total)]), torch.tensor([i % 3 == 0 for i in range(total)])
    pair_losses = bfpo_loss(chosen, rejected, chosen - 1.0, rejected + 0.5, *labels, tau=0.1).losses.double()
    assert bool((pair_losses > 1.0).all())  # every pair, the padding one included, has a loss far from 0
    streams = [
        batching.RoleStream(index_rows(total, rank, world), "safety", rank, world, micro, seed=1)
        for rank in range(world)
    ]
    assert streams[0].batches_per_pass == 2
    for step in range(3):  # micro-step 2 is past the end of the data (data_ends_at=2)
        leaf = pair_losses.clone().requires_grad_(True)
        per_rank, real = [], []
        for stream in streams:
            micro_batch = stream.micro_batch_at(step, data_ends_at=2)
            rows_index = torch.as_tensor(stream.rows.index[micro_batch.positions])
            losses = leaf[rows_index]
            out = PreferenceLoss(losses, losses, torch.zeros_like(losses), losses.detach(), losses.detach())
            per_rank.append(loop.role_loss(out, micro_batch, world_size=world))
            real += rows_index[micro_batch.weights > 0].tolist()
        averaged = (per_rank[0] + per_rank[1]) / world  # what DeepSpeed's mean over the workers makes of them
        averaged.backward()
        expected_grad = torch.zeros(total, dtype=torch.float64)
        if step < 2:
            assert sorted(real) == sorted(set(real)) and len(real) == [8, 1][step]
            assert averaged.item() == pytest.approx(float(pair_losses[real].mean()), rel=1e-12)
            expected_grad[real] = 1.0 / len(real)
        else:
            assert real == [] and averaged.item() == 0.0
        torch.testing.assert_close(leaf.grad, expected_grad, rtol=0, atol=1e-15)
    padding = streams[1].micro_batch_at(1, data_ends_at=2)
    assert padding.weights.tolist() == [0.0] and padding.global_count == 1  # rank 1 ran out: a weight-0 pair
    losses = pair_losses[torch.as_tensor(streams[1].rows.index[padding.positions])]
    out = PreferenceLoss(losses, losses, torch.zeros_like(losses), losses, losses)
    assert float(loop.role_loss(out, padding, world_size=world)) == 0.0


def test_role_loss_of_one_worker_is_its_formula_and_past_the_end_is_exactly_zero():
    """role_loss = sum(weights * losses) * world_size / global_count, here for rank 1 of 2 with 3 real pairs and a
    weight-0 one out of a global count of 7; a micro-batch past the end of the data contributes exactly 0."""
    losses = torch.tensor([0.5, 2.0, 3.0, 40.0], dtype=torch.float64)
    out = PreferenceLoss(losses, losses, torch.zeros_like(losses), losses, losses)
    batch = batching.MicroBatch(np.arange(4), torch.tensor([1.0, 1.0, 1.0, 0.0]), epoch_pass=0, global_count=7)
    assert float(loop.role_loss(out, batch, world_size=2)) == pytest.approx((0.5 + 2.0 + 3.0) * 2 / 7, rel=1e-12)
    assert float(loop.role_loss(out, batch, world_size=4)) == pytest.approx((0.5 + 2.0 + 3.0) * 4 / 7, rel=1e-12)
    stream = batching.RoleStream(index_rows(6, 0, 1), "safety", 0, 1, micro_batch=4, seed=0)
    past_end = stream.micro_batch_at(5, data_ends_at=2)
    assert past_end.global_count == 0 and len(past_end.positions) > 0
    losses = torch.full((len(past_end.positions),), 7.0, requires_grad=True)
    value = loop.role_loss(PreferenceLoss(losses, losses, losses, losses, losses), past_end, world_size=1)
    value.backward()
    assert value.item() == 0.0 and float(losses.grad.abs().sum()) == 0.0


def test_role_loss_moves_the_weights_to_the_losses_dtype_and_device():
    """The weights (float32, on the host) go to the losses' dtype and device: bfloat16 losses give a bfloat16
    scalar, and losses on another device than the weights (a GPU run's; here the meta device) a scalar there."""
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0])
    batch = batching.MicroBatch(np.arange(4), weights, epoch_pass=0, global_count=7)
    losses = torch.tensor([0.5, 2.0, 3.0, 40.0], dtype=torch.bfloat16)
    value = loop.role_loss(PreferenceLoss(losses, losses, torch.zeros_like(losses), losses, losses), batch, 2)
    assert value.dtype == torch.bfloat16 and float(value) == pytest.approx((0.5 + 2.0 + 3.0) * 2 / 7, rel=1e-2)
    meta = torch.ones(4, device="meta")
    assert loop.role_loss(PreferenceLoss(meta, meta, meta, meta, meta), batch, 2).device.type == "meta"


def test_a_tied_margin_is_neither_a_win_nor_a_hit_in_the_accuracy_counts():
    """m = 0 (the policy still the reference, or a tie) counts as no preference: not a safety win for either
    response, not a helpfulness win, not a sign match with g (g is never 0 with the default alpha and B1); the
    smallest margin of the right sign does count."""
    chosen_safe = torch.tensor([True, False, True, False])
    rejected_safe = torch.tensor([False, True, True, False])
    tied = train_metrics.preference_accuracy_counts(torch.zeros(4, dtype=torch.float64), chosen_safe, rejected_safe)
    assert tied.tolist() == [4.0, 0.0, 2.0, 0.0, 1.0, 0.0]
    tiny = 1e-300  # the sign each case's target g asks for: +, -, +, -
    right = train_metrics.preference_accuracy_counts(
        torch.tensor([tiny, -tiny, tiny, -tiny], dtype=torch.float64), chosen_safe, rejected_safe
    )
    assert right.tolist() == [4.0, 4.0, 2.0, 2.0, 1.0, 1.0]
    wrong = train_metrics.preference_accuracy_counts(
        torch.tensor([-tiny, tiny, -tiny, tiny], dtype=torch.float64), chosen_safe, rejected_safe
    )
    assert wrong.tolist() == [4.0, 0.0, 2.0, 0.0, 1.0, 0.0]
    accuracies = train_metrics.preference_accuracies(tied)
    assert (accuracies["eval/global_acc"], accuracies["eval/safety_acc"], accuracies["eval/help_acc"]) == (0, 0, 0)


def test_metric_window_sums_every_figure_and_takes_a_skipped_step_out(gloo_world):
    """Two workers' worth of micro-steps on one process: train/loss is the sum over micro-steps of each role's mean
    real-pair loss, divided by the micro-steps; margins, targets and rewards are means over real pairs; a weight-0
    batch adds no pairs and no tokens; a dropped step leaves no trace; without by_case no per-case margins."""

    ids = [np.array([1, 2])] * 4
    rows = data_rows.PairRows(
        "train_safety",
        4,
        np.arange(4),
        ["a", "b", "c", "d"],
        ids,
        ids,
        ids,
        chosen_safe=np.array([True, True, False, False]),
        rejected_safe=np.array([True, False, True, False]),
        ref_chosen_logp=None,
        ref_rejected_logp=None,
    )

    def out(losses, margins, targets, chosen, rejected):
        values = [torch.tensor(v, dtype=torch.float32) for v in (losses, margins, targets, chosen, rejected)]
        return PreferenceLoss(*values)

    started = time.perf_counter()
    window = train_metrics.MetricWindow(by_case=True)
    assert window.micro_steps == 0 and window.sums.dtype == torch.float64
    window.begin_step()
    # micro-step 1: 2 real safety pairs of 3 (global 3), then a helpful batch of 1 real pair (global 1)
    window.add(
        "safety",
        out([1.0, 2.0, 50.0], [0.5, -1.0, 9.0], [1.0, 0.5, 9.0], [0.25, 0.0, 9.0], [-0.25, 1.0, 9.0]),
        batching.MicroBatch(np.array([1, 2, 0]), torch.tensor([1.0, 1.0, 0.0]), 0, 3),
        12,
        rows,
    )
    window.add(
        "helpful",
        out([4.0], [2.0], [0.5], [1.0], [-1.0]),
        batching.MicroBatch(np.array([0]), torch.ones(1), 0, 1),
        5,
        rows,
    )
    window.micro_steps += 1
    # micro-step 2: a weight-0 padding batch (past the end): nothing counts, its 7 tokens included
    window.add(
        "safety",
        out([30.0], [30.0], [30.0], [30.0], [30.0]),
        batching.MicroBatch(np.array([3]), torch.zeros(1), 1, 0),
        7,
        rows,
    )
    window.micro_steps += 1
    window.grad_norms += [torch.tensor(3.0), 1.0]
    window.begin_step()
    window.add(
        "safety",
        out([float("nan")], [1.0], [1.0], [1.0], [1.0]),
        batching.MicroBatch(np.array([0]), torch.ones(1), 0, 1),
        99,
        rows,
    )
    window.micro_steps += 1
    window.drop_step()  # the skipped step: its NaN loss and tokens are gone
    metrics = window.summary(["safety", "helpful"])
    elapsed_at_most = time.perf_counter() - started
    no_cases = train_metrics.MetricWindow(by_case=False)
    no_cases.add(
        "safety",
        out([1.0], [1.0], [1.0], [1.0], [1.0]),
        batching.MicroBatch(np.array([0]), torch.ones(1), 0, 1),
        3,
        rows,
    )
    no_cases.micro_steps = 1
    plain = no_cases.summary(["safety"])
    safety_mean, helpful_mean = (1.0 + 2.0) / 3, 4.0  # each role: real-pair losses over the global count
    assert metrics["train/loss"] == pytest.approx((safety_mean + helpful_mean) / 2, rel=1e-12)
    assert metrics["train/loss_safety"] == pytest.approx(safety_mean / 2, rel=1e-12)
    assert metrics["train/loss_helpful"] == pytest.approx(helpful_mean / 2, rel=1e-12)
    assert metrics["train/margin"] == pytest.approx((0.5 - 1.0 + 2.0) / 3, rel=1e-12)
    assert metrics["train/target"] == pytest.approx((1.0 + 0.5 + 0.5) / 3, rel=1e-12)
    assert metrics["train/chosen_reward"] == pytest.approx((0.25 + 0.0 + 1.0) / 3, rel=1e-12)
    assert metrics["train/rejected_reward"] == pytest.approx((-0.25 + 1.0 - 1.0) / 3, rel=1e-12)
    assert metrics["train/grad_norm"] == pytest.approx(2.0)
    assert metrics["train/tokens_per_s"] / metrics["train/pairs_per_s"] == pytest.approx((12 + 5) / 3, rel=1e-12)
    assert metrics["train/pairs_per_s"] >= 3 / elapsed_at_most
    # per case: row 1 safe>unsafe (0.5), row 2 unsafe>safe (-1.0), row 0 safe-safe (2.0); row 3 had weight 0
    assert metrics["train/margin_safe_unsafe"] == pytest.approx(0.5)
    assert metrics["train/margin_unsafe_safe"] == pytest.approx(-1.0)
    assert metrics["train/margin_safe_safe"] == pytest.approx(2.0)
    assert "train/margin_unsafe_unsafe" not in metrics
    assert not any(name.startswith("train/margin_") for name in plain) and plain["train/loss"] == 1.0
    assert math.isnan(plain["train/grad_norm"])


def test_pass_plans_and_role_streams_are_the_same_for_the_same_seed():
    """A resumed run rebuilds its batches from the seed alone: the same seed gives the same plan and micro-batches
    (a fresh stream, as after a restart), another seed or pass another plan; every rank may own a single row."""
    lengths = np.random.default_rng(5).integers(3, 90, size=40)
    plan = batching.pass_plan(lengths, micro_batch=4, seed=11)
    assert [b.tolist() for b in plan] == [b.tolist() for b in batching.pass_plan(lengths, micro_batch=4, seed=11)]
    assert [b.tolist() for b in plan] != [b.tolist() for b in batching.pass_plan(lengths, micro_batch=4, seed=12)]
    first, again = (
        batching.RoleStream(index_rows(40, 1, 2), "helpful", 1, 2, micro_batch=4, seed=3) for _ in range(2)
    )
    steps = range(0, 2 * first.batches_per_pass)
    batches = [first.micro_batch_at(step) for step in steps]
    assert [b.positions.tolist() for b in batches] == [again.micro_batch_at(step).positions.tolist() for step in steps]
    assert [b.epoch_pass for b in batches] == [0] * 5 + [1] * 5
    assert [b.positions.tolist() for b in batches[:5]] != [b.positions.tolist() for b in batches[5:]]
    other_seed = batching.RoleStream(index_rows(40, 1, 2), "helpful", 1, 2, micro_batch=4, seed=4)
    assert [other_seed.micro_batch_at(step).positions.tolist() for step in steps] != [
        b.positions.tolist() for b in batches
    ]
    one_each = batching.RoleStream(index_rows(2, 1, 2), "safety", 1, 2, micro_batch=4, seed=0)
    assert one_each.micro_batch_at(0).weights.tolist() == [1.0] and one_each.micro_batch_at(0).global_count == 2
    with pytest.raises(ValueError, match="cannot be shared by 3 workers"):
        batching.RoleStream(index_rows(2, 0, 3), "safety", 0, 3, micro_batch=4, seed=0)
