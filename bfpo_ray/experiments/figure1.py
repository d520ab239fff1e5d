"""The paper's Figure 1 in miniature: one SFT model, five ways to align it, judged on the toy world.

    python -m bfpo_ray figure1                      # default: 3 seeds, about 25 min on 2 cores
    python -m bfpo_ray figure1 --quick              # a few steps, 1 seed: a smoke run (the tests use it)

Steps, all through the product's own stages (prepare on Ray Data, train on Ray Train + DeepSpeed, evaluate on Ray):

1. Write the toy world into ``<out>/toyworld`` and SFT its tiny Llama on ``sft.jsonl`` (bfpo_ray/configs/sft.yaml, but
   ``sft_epochs`` epochs: with sft.yaml's 3 the tiny model's sampled outputs mostly do not parse).
2. Write two views of the toy world's pairs as generic-pairs JSONL in ``<out>/views``:
   ``safer_chosen.jsonl`` (every safety pair with the safer response as chosen; the other one rejected) and
   ``naive_mix.jsonl`` (those pairs plus every helpfulness pair, one mixed set).
3. From the SFT export (policy and reference), train five variants per seed, for the same number of optimizer
   steps and the same pairs per step (single-role variants take twice the per-role micro-batch of BFPO's two-role
   buffer), final step kept for all:

       dpo_helpful  DPO on the safety pairs with their helpfulness labels (chosen = the more helpful response)
       dpo_safety   DPO on safer_chosen.jsonl
       dpo_mix      DPO on naive_mix.jsonl
       ipo_mix      IPO on naive_mix.jsonl
       bfpo         BFPO on the safety pairs (helpfulness preference + safety labels) plus the helpfulness buffer

4. Evaluate SFT and every variant on the toy world's held-out test prompts: sampled generations (temperature 1,
   several per prompt; the main figures) and greedy ones, judged exactly. ``global_acc`` is measured for every model
   on the same held-out pairs, the eval split of BFPO's prepared data (reference: the SFT model); SFT itself is
   the reference (every margin 0), so its accuracies are left empty. Each variant's data is split by its own
   seeded mix, so some of these pairs are training pairs of the DPO/IPO variants (with their own labels).
5. Write ``figure1.json`` (every seed), ``figure1.md`` (mean ± sample standard deviation over seeds, and the
   command) and ``figure1.png`` (helpful_rate vs harmless_rate) into ``<out>``.

Runs are named by ``run_name`` (variant, learning rate, tau, steps, seed) under ``<out>/runs``; a repeated command
reuses the finished SFT run, prepared data and variant runs.
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

import numpy as np

from bfpo_ray.config import CONFIG_DIR, Config, config_from_dict, load_config

SFT_CONFIG = CONFIG_DIR / "sft.yaml"
VARIANTS = ("dpo_helpful", "dpo_safety", "dpo_mix", "ipo_mix", "bfpo")
MODES = ("sampled", "greedy")
TABLE_COLUMNS = ("eval/harmless_rate", "eval/helpful_rate", "eval/over_refusal", "eval/score", "eval/global_acc")


@dataclass(frozen=True)
class Settings:
    """Everything a Figure 1 run depends on (recorded in figure1.json)."""

    out: str = "runs/figure1"
    seeds: int = 3
    steps: int = 72                 # optimizer steps of every variant (1 epoch of BFPO's safety pairs)
    micro_batch_pairs: int = 8      # per role per worker; single-role variants take twice as many
    learning_rate: float = 5e-5     # one rate for all variants, default.yaml's; DPO collapses at 1e-4 on the tiny model,
                                    # and at 1e-5 72 steps barely move any variant from SFT (docs/RESULTS.md)
    tau: float = 0.1                # DPO beta, IPO/BFPO tau
    alpha: float = 0.5
    num_workers: int = 2
    sft_epochs: int = 30            # bfpo_ray/configs/sft.yaml's 3 epochs leave sampled outputs mostly unparseable
    sft_max_steps: int | None = None
    samples: int = 4
    max_new_tokens: int = 48
    eval_prompts: int = 96          # per kind in the world; the test half is evaluated
    safety_pairs: int = 1200
    helpful_pairs: int = 1200
    sft_rows: int = 3000
    world_seed: int = 0


QUICK = Settings(out="runs/figure1-quick", seeds=1, steps=2, micro_batch_pairs=4, num_workers=1, sft_epochs=1,
                 sft_max_steps=2, samples=1, max_new_tokens=8, eval_prompts=4, safety_pairs=96, helpful_pairs=96,
                 sft_rows=160)


# ---------------------------------------------------------------------------------------------------- data views

def safer_chosen_rows(safety_rows: list[dict]) -> list[dict]:
    """Generic-pairs rows from PKU-SafeRLHF-schema rows: chosen = the safer response (``safer_response_id``)."""
    rows = []
    for row in safety_rows:
        safer = int(row["safer_response_id"])
        rows.append({"prompt": row["prompt"], "chosen": row[f"response_{safer}"],
                     "rejected": row[f"response_{1 - safer}"],
                     "chosen_safe": bool(row[f"is_response_{safer}_safe"]),
                     "rejected_safe": bool(row[f"is_response_{1 - safer}_safe"])})
    return rows


def helpful_pair_rows(helpful_rows: list[dict]) -> list[dict]:
    """Generic-pairs rows from UltraFeedback-binarized-schema rows (assistant turns of chosen/rejected; all safe)."""
    def assistant_text(messages):
        return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")

    return [{"prompt": row["prompt"], "chosen": assistant_text(row["chosen"]),
             "rejected": assistant_text(row["rejected"]), "chosen_safe": True, "rejected_safe": True}
            for row in helpful_rows]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:  # unchanged files keep the data cache valid
        path.write_text(text, encoding="utf-8")


def write_views(world_dir: Path, views_dir: Path) -> dict[str, Path]:
    """safer_chosen.jsonl and naive_mix.jsonl (module doc, step 2); returns their paths."""
    safer = safer_chosen_rows(_read_jsonl(world_dir / "safety.jsonl"))
    mix = safer + helpful_pair_rows(_read_jsonl(world_dir / "helpful.jsonl"))
    paths = {"safer_chosen": views_dir / "safer_chosen.jsonl", "naive_mix": views_dir / "naive_mix.jsonl"}
    _write_jsonl(paths["safer_chosen"], safer)
    _write_jsonl(paths["naive_mix"], mix)
    return paths


def world_section(settings: Settings, out: Path) -> dict:
    return {"dir": str(out / "toyworld"), "seed": settings.world_seed, "safety_pairs": settings.safety_pairs,
            "helpful_pairs": settings.helpful_pairs, "sft_rows": settings.sft_rows,
            "eval_prompts": settings.eval_prompts}


def evaluate_section(settings: Settings, seed: int) -> dict:
    return {"splits": ["test"], "max_new_tokens": settings.max_new_tokens, "greedy": True,
            "samples": settings.samples, "temperature": 1.0, "seed": seed, "after_train": False}


def sft_config(settings: Settings, out: Path) -> Config:
    """bfpo_ray/configs/sft.yaml with the world, data cache and run under ``out``."""
    cfg = load_config(SFT_CONFIG)
    tree = cfg.model_dump(mode="json")
    world = out / "toyworld"
    tree["toyworld"] = world_section(settings, out)
    tree["model"]["path"] = str(world / "init-model")
    tree["data"]["sources"] = [{"adapter": "generic", "path": str(world / "sft.jsonl"), "role": "helpful"}]
    tree["data"]["cache_dir"] = str(out / "data")
    tree["train"]["epochs"] = settings.sft_epochs
    tree["train"]["max_steps"] = settings.sft_max_steps
    tree["train"]["eval_every"] = tree["train"]["checkpoint_every"] = 10**6  # the last step only
    tree["run"].update({"name": f"sft-epochs{settings.sft_epochs}", "storage_path": str(out / "runs"),
                        "num_workers": settings.num_workers})
    tree["evaluate"] = evaluate_section(settings, 0)
    return config_from_dict(tree, source="figure1 sft config")


def variant_sources(variant: str, world: Path, views: dict[str, Path]) -> list[dict]:
    safety = {"adapter": "pku_saferlhf", "path": str(world / "safety.jsonl"), "role": "safety"}
    if variant == "dpo_helpful":
        return [safety]
    if variant == "dpo_safety":
        return [{"adapter": "generic", "path": str(views["safer_chosen"]), "role": "safety"}]
    if variant in ("dpo_mix", "ipo_mix"):
        return [{"adapter": "generic", "path": str(views["naive_mix"]), "role": "safety"}]
    if variant == "bfpo":
        return [safety, {"adapter": "ultrafeedback", "path": str(world / "helpful.jsonl"), "role": "helpful"}]
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def run_name(variant: str, seed: int, settings: Settings) -> str:
    """``<variant>-lr<lr>-tau<tau>-steps<steps>-seed<seed>``: runs of other settings never resume one another."""
    return f"{variant}-lr{settings.learning_rate:g}-tau{settings.tau:g}-steps{settings.steps}-seed{seed}"


def variant_config(variant: str, seed: int, settings: Settings, out: Path, sft_model: Path,
                   views: dict[str, Path]) -> Config:
    """The training config of one variant and seed: same steps, pairs per step, learning rate and tau for all."""
    sources = variant_sources(variant, out / "toyworld", views)
    loss = {"dpo_helpful": "dpo", "dpo_safety": "dpo", "dpo_mix": "dpo", "ipo_mix": "ipo", "bfpo": "bfpo"}[variant]
    micro = settings.micro_batch_pairs * (2 if len(sources) == 1 else 1)
    return config_from_dict({
        "toyworld": world_section(settings, out),
        "model": {"path": str(sft_model)},
        "data": {"sources": sources, "eval_fraction": 0.05, "max_length": 96, "max_prompt_length": 40,
                 "cache_dir": str(out / "data"), "score_actors": 2},
        "train": {"loss": loss, "alpha": settings.alpha, "tau": settings.tau, "trainable": "all",
                  "learning_rate": settings.learning_rate, "warmup_ratio": 0.1, "micro_batch_pairs": micro,
                  "epochs": 1000, "max_steps": settings.steps, "zero_stage": 2, "seed": seed,
                  "log_every": max(1, settings.steps // 4), "eval_every": settings.steps,
                  "checkpoint_every": settings.steps},
        "run": {"name": run_name(variant, seed, settings), "storage_path": str(out / "runs"),
                "num_workers": settings.num_workers},
        "evaluate": evaluate_section(settings, seed),
    }, source=f"figure1 {variant} config")


# ---------------------------------------------------------------------------------------------------- aggregation

def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); the spread is NaN for one value, NaN values are left out."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")


def aggregate(per_seed: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """model -> mode -> metric -> (mean, spread) over seeds, from model -> [{mode: {metric: value}}, ...]."""
    summary = {}
    for model, runs in per_seed.items():
        summary[model] = {mode: {metric: mean_and_spread([run[mode][metric] for run in runs])
                                 for metric in runs[0][mode]} for mode in MODES if mode in runs[0]}
    return summary


def without_nan(value):
    """``value`` with every NaN float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(item) for item in value]
    return value


def figure_table(summary: dict, mode: str) -> str:
    from bfpo_ray.evaluate.run import results_table

    return results_table({model: modes[mode] for model, modes in summary.items()}, TABLE_COLUMNS)


def plot(summary: dict, path: Path, title: str) -> None:
    """Scatter of helpful_rate (x) against harmless_rate (y): mean ± spread per model, sampled filled, greedy
    hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (model, modes) in enumerate(summary.items()):
        color = colors[index % len(colors)]
        for mode in MODES:
            if mode not in modes:
                continue
            (x, dx), (y, dy) = modes[mode]["eval/helpful_rate"], modes[mode]["eval/harmless_rate"]
            if math.isnan(x) or math.isnan(y):
                continue
            ax.errorbar(x, y, xerr=0 if math.isnan(dx) else dx, yerr=0 if math.isnan(dy) else dy, fmt="o",
                        color=color, mfc=color if mode == "sampled" else "none", ms=9 if mode == "sampled" else 6,
                        capsize=3, label=model if mode == "sampled" else None)
            if mode == "sampled":
                ax.annotate(model, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9, color=color)
    ax.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05), xlabel="helpful_rate (benign and borderline prompts)",
           ylabel="harmless_rate (harmful prompts)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, title="filled: sampled\nhollow: greedy",
              title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- the run

def evaluate_run(cfg: Config, model_dir: Path, out_dir: Path, preference_data: Path | None) -> dict[str, dict]:
    """mode -> metrics for one model: the generative metrics plus global/safety/help accuracy on the shared
    held-out pairs (NaN without ``preference_data``: the SFT model is the reference, its margins are 0)."""
    from bfpo_ray.evaluate.run import evaluate_model, preference_metrics

    nan = float("nan")
    preference = (preference_metrics(model_dir, preference_data, cfg) if preference_data else
                  {"eval/global_acc": nan, "eval/safety_acc": nan, "eval/help_acc": nan})
    result = evaluate_model(cfg, model_dir, out_dir)
    return {mode: {**metrics, **preference} for mode, metrics in result.metrics.items()}


def run(settings: Settings, command: str) -> dict:
    """Steps 1-5 of the module doc; returns what figure1.json holds."""
    from bfpo_ray import objectives
    from bfpo_ray.data import toyworld
    from bfpo_ray.scoring.prepare import prepare
    from bfpo_ray.train.launch import train

    started = time.perf_counter()
    out = Path(settings.out).resolve()
    sft_cfg = sft_config(settings, out)
    toyworld.materialize(sft_cfg.toyworld)
    sft_data = prepare(sft_cfg, score_reference=objectives.build(sft_cfg.train).needs_reference)
    sft_dir = Path(train(sft_cfg, sft_data).path)
    sft_model = sft_dir / "export"
    views = write_views(out / "toyworld", out / "views")

    configs = {(variant, seed): variant_config(variant, seed, settings, out, sft_model, views)
               for seed in range(settings.seeds) for variant in VARIANTS}  # seed-major: seed 0 complete first
    datasets = {}
    for (variant, seed), cfg in configs.items():
        if variant not in datasets:
            datasets[variant] = prepare(cfg)
    preference_data = datasets["bfpo"]

    per_seed: dict[str, list[dict]] = {"sft": []}
    for seed in range(settings.seeds):
        sft_eval_cfg = configs["bfpo", seed]
        per_seed["sft"].append(evaluate_run(sft_eval_cfg, sft_model, sft_dir / f"evaluation-seed{seed}", None))
    for (variant, seed), cfg in configs.items():
        run_dir = Path(train(cfg, datasets[variant]).path)
        per_seed.setdefault(variant, []).append(
            evaluate_run(cfg, run_dir / "export", run_dir / "evaluation", preference_data))

    summary = aggregate(per_seed)
    minutes = round((time.perf_counter() - started) / 60, 1)
    record = {"command": command, "settings": asdict(settings), "minutes": minutes, "per_seed": per_seed,
              "summary": summary}
    (out / "figure1.json").write_text(json.dumps(without_nan(record), indent=2) + "\n")
    plot(summary, out / "figure1.png", f"Figure 1 in miniature ({settings.seeds} seed(s), {settings.steps} steps)")
    (out / "figure1.md").write_text(report(record))
    return record


def report(record: dict) -> str:
    settings, summary = record["settings"], record["summary"]
    return "\n".join([
        f"Figure 1 in miniature: {settings['seeds']} seed(s), {settings['steps']} steps, "
        f"lr {settings['learning_rate']}, tau {settings['tau']}, {record['minutes']} min",
        f"command: {record['command']}", "",
        f"sampled generations (temperature 1, {settings['samples']} per prompt), mean ± std over seeds:", "",
        figure_table(summary, "sampled"), "", "greedy generations:", "", figure_table(summary, "greedy"), "",
        "global_acc: every model on the same held-out pairs (BFPO's eval split, reference = SFT).", ""])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bfpo_ray figure1", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps, 1 seed, a small world (smoke run)")
    for field in ("out", "seeds", "steps", "learning_rate", "tau", "samples", "num_workers"):
        default = getattr(Settings(), field)
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=None,
                            help=f"default {default} ({getattr(QUICK, field)} with --quick)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    settings = QUICK if args.quick else Settings()
    settings = replace(settings, **{key: value for key, value in vars(args).items()
                                    if key != "quick" and value is not None})
    record = run(settings, " ".join(["python -m bfpo_ray figure1", shlex.join(argv)]).strip())
    print(report(record))
    out = Path(settings.out).resolve()
    print(f"written: {out / 'figure1.md'}, {out / 'figure1.json'}, {out / 'figure1.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
