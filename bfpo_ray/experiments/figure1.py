"""The paper's Figure 1 in miniature: one SFT model, seven ways to align it, judged on the toy world.

    python -m bfpo_ray figure1                      # 3 candidate settings on validation, then 3 seeds: ~25 min, 2 cores
    python -m bfpo_ray figure1 --quick              # a few steps, 1 seed: a smoke run (the tests use it)

Steps, all through the product's own stages (prepare on Ray Data, train on Ray Train + DeepSpeed, evaluate on Ray):

1. Write the toy world into ``<out>/toyworld`` and SFT its tiny Llama (bfpo_ray/configs/sft.yaml, through
   ``model.sft_first``: the default job's starting model, made once).
2. Write three views of the toy world's pairs as generic-pairs JSONL in ``<out>/views``: ``safer_chosen.jsonl``
   (every safety pair with the safer response as chosen), ``native_mix.jsonl`` (every safety pair with its own,
   helpfulness, label, plus every helpfulness pair: the paper's naive mix) and ``safer_mix.jsonl`` (safer_chosen
   plus every helpfulness pair: a stronger mix that pushes BFPO's way wherever one response is unsafe).
3. From the SFT export (policy and reference), train every variant for the same number of optimizer steps and
   pairs per step (single-role variants take twice the per-role micro-batch of BFPO's two-role buffer), final
   step kept for all:

       dpo_helpful    DPO on the safety pairs with their helpfulness labels (chosen = the more helpful response)
       dpo_safety     DPO on safer_chosen.jsonl
       dpo_mix        DPO on native_mix.jsonl    (the paper's Figure 1(c) baseline)
       ipo_mix        IPO on native_mix.jsonl
       dpo_mix_safer  DPO on safer_mix.jsonl     (the stronger baseline)
       ipo_mix_safer  IPO on safer_mix.jsonl
       bfpo           BFPO on the safety pairs (helpfulness preference + safety labels) plus the helpfulness buffer

   Selection: every variant is trained at every candidate setting (learning rate, tau, steps, trainable) with
   seed 0 and judged on the toy world's **validation** prompts; the setting with the highest mean sampled score
   over all variants is used for every variant (with a single candidate there is nothing to choose, and no
   validation run). Test prompts are not looked at until then.
4. At the chosen setting, every variant with seeds 0..seeds-1, and SFT, are judged on the **test** prompts: sampled
   generations (the paper's temperature 0.7 and top_p 0.95, several per prompt; the main figures) and greedy ones.
   ``global_acc`` is measured for every model on the same held-out pairs, the eval split of BFPO's prepared data
   (reference: the SFT model); SFT itself is the reference (every margin 0), so its accuracies are left empty.
5. Write ``figure1.json`` (every seed, the selection, the per-case margins), ``figure1.md`` (mean ± sample
   standard deviation over seeds, per-seed paired differences BFPO minus each baseline with their standard error,
   the per-case margins against their targets, the command) and ``figure1.png`` (helpful_rate vs harmless_rate).

Runs are named by ``run_name`` (variant, setting, seed) under ``<out>/runs``; a repeated command reuses the SFT
run, prepared data, finished variant runs and their evaluations.
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

from bfpo_ray.config import Config, config_from_dict

VARIANTS = ("dpo_helpful", "dpo_safety", "dpo_mix", "ipo_mix", "dpo_mix_safer", "ipo_mix_safer", "bfpo")
LOSSES = {"dpo_helpful": "dpo", "dpo_safety": "dpo", "dpo_mix": "dpo", "ipo_mix": "ipo", "dpo_mix_safer": "dpo",
          "ipo_mix_safer": "ipo", "bfpo": "bfpo"}
MODES = ("sampled", "greedy")
TABLE_COLUMNS = ("eval/harmless_rate", "eval/helpful_rate", "eval/over_refusal", "eval/score", "eval/global_acc")
CASES = ("safe_safe", "safe_unsafe", "unsafe_safe", "unsafe_unsafe")  # bfpo_ray.train.metrics.CASES


@dataclass(frozen=True)
class Candidate:
    """One setting of the selection: shared by every variant."""

    learning_rate: float
    tau: float                      # DPO beta, IPO/BFPO tau
    steps: int
    trainable: str = "all"          # all, lora, or module names joined by "+" (the paper's: down_proj)

    @classmethod
    def parse(cls, text: str) -> "Candidate":
        """``lr:tau:steps[:trainable]``, e.g. ``2e-4:0.1:144:down_proj``."""
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"a candidate is lr:tau:steps[:trainable], got {text!r}")
        return cls(float(parts[0]), float(parts[1]), int(parts[2]), *parts[3:])

    def __str__(self) -> str:
        return f"lr{self.learning_rate:g}-tau{self.tau:g}-steps{self.steps}-{self.trainable}"


@dataclass(frozen=True)
class Settings:
    """Everything a Figure 1 run depends on (recorded in figure1.json)."""

    out: str = "runs/figure1"
    seeds: int = 3
    candidates: tuple[str, ...] = ("5e-5:0.1:72:all", "2e-4:0.1:144:all", "1e-3:0.1:144:down_proj")
    micro_batch_pairs: int = 8      # per role per worker; single-role variants take twice as many
    alpha: float = 0.5
    num_workers: int = 2
    samples: int = 4
    temperature: float = 0.7        # the paper's sampling
    top_p: float = 0.95
    max_new_tokens: int = 48
    eval_prompts: int = 96          # per kind in the world: half validation, half test
    safety_pairs: int = 1200
    helpful_pairs: int = 1200
    sft_rows: int = 3000
    world_seed: int = 0


QUICK = Settings(out="runs/figure1-quick", seeds=1, candidates=("5e-5:0.1:2:all",), micro_batch_pairs=4,
                 num_workers=1, samples=1, max_new_tokens=8, eval_prompts=4, safety_pairs=96, helpful_pairs=96,
                 sft_rows=160)


# ---------------------------------------------------------------------------------------------------- data views

def safer_chosen_rows(safety_rows: list[dict]) -> list[dict]:
    """Generic-pairs rows from PKU-SafeRLHF-schema rows: chosen = the safer response (``safer_response_id``)."""
    return [_pair(row, int(row["safer_response_id"])) for row in safety_rows]


def native_rows(safety_rows: list[dict]) -> list[dict]:
    """Generic-pairs rows from PKU-SafeRLHF-schema rows with their own labels: chosen = the more helpful response."""
    return [_pair(row, int(row["better_response_id"])) for row in safety_rows]


def _pair(row: dict, chosen: int) -> dict:
    return {"prompt": row["prompt"], "chosen": row[f"response_{chosen}"], "rejected": row[f"response_{1 - chosen}"],
            "chosen_safe": bool(row[f"is_response_{chosen}_safe"]),
            "rejected_safe": bool(row[f"is_response_{1 - chosen}_safe"])}


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
    """safer_chosen.jsonl, native_mix.jsonl and safer_mix.jsonl (module doc, step 2); returns their paths."""
    safety = _read_jsonl(world_dir / "safety.jsonl")
    helpful = helpful_pair_rows(_read_jsonl(world_dir / "helpful.jsonl"))
    views = {"safer_chosen": safer_chosen_rows(safety), "native_mix": native_rows(safety) + helpful,
             "safer_mix": safer_chosen_rows(safety) + helpful}
    paths = {name: views_dir / f"{name}.jsonl" for name in views}
    for name, rows in views.items():
        _write_jsonl(paths[name], rows)
    return paths


def world_section(settings: Settings, out: Path) -> dict:
    return {"dir": str(out / "toyworld"), "seed": settings.world_seed, "safety_pairs": settings.safety_pairs,
            "helpful_pairs": settings.helpful_pairs, "sft_rows": settings.sft_rows,
            "eval_prompts": settings.eval_prompts}


def evaluate_section(settings: Settings, split: str, seed: int) -> dict:
    return {"splits": [split], "max_new_tokens": settings.max_new_tokens, "greedy": True,
            "samples": settings.samples, "temperature": settings.temperature, "top_p": settings.top_p,
            "seed": seed, "after_train": False}


def variant_sources(variant: str, world: Path, views: dict[str, Path]) -> list[dict]:
    safety = {"adapter": "pku_saferlhf", "path": str(world / "safety.jsonl"), "role": "safety"}
    view = {"dpo_safety": "safer_chosen", "dpo_mix": "native_mix", "ipo_mix": "native_mix",
            "dpo_mix_safer": "safer_mix", "ipo_mix_safer": "safer_mix"}
    if variant == "dpo_helpful":
        return [safety]
    if variant in view:
        return [{"adapter": "generic", "path": str(views[view[variant]]), "role": "safety"}]
    if variant == "bfpo":
        return [safety, {"adapter": "ultrafeedback", "path": str(world / "helpful.jsonl"), "role": "helpful"}]
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def run_name(variant: str, candidate: Candidate, seed: int) -> str:
    """``<variant>-<candidate>-seed<seed>``: runs of other settings never resume one another."""
    return f"{variant}-{candidate}-seed{seed}"


def variant_config(variant: str, candidate: Candidate, seed: int, settings: Settings, out: Path,
                   views: dict[str, Path], split: str = "test") -> Config:
    """The training config of one variant, setting and seed: same steps, pairs per step, learning rate and tau for
    all. It starts from the toy world's SFT model (``model.sft_first``)."""
    sources = variant_sources(variant, out / "toyworld", views)
    micro = settings.micro_batch_pairs * (2 if len(sources) == 1 else 1)
    return config_from_dict({
        "toyworld": world_section(settings, out),
        "model": {"path": str(out / "toyworld" / "init-model"), "sft_first": "sft"},
        "data": {"sources": sources, "eval_fraction": 0.05, "max_length": 96, "max_prompt_length": 40,
                 "cache_dir": str(out / "data"), "score_actors": 2},
        "train": {"loss": LOSSES[variant], "alpha": settings.alpha, "tau": candidate.tau,
                  "trainable": candidate.trainable if candidate.trainable in ("all", "lora") else
                  candidate.trainable.split("+"), "learning_rate": candidate.learning_rate, "warmup_ratio": 0.1,
                  "micro_batch_pairs": micro, "epochs": 1000, "max_steps": candidate.steps, "zero_stage": 2,
                  "seed": seed, "log_every": max(1, candidate.steps // 4), "eval_every": candidate.steps,
                  "checkpoint_every": candidate.steps},
        "run": {"name": run_name(variant, candidate, seed), "storage_path": str(out / "runs"),
                "num_workers": settings.num_workers},
        "evaluate": evaluate_section(settings, split, seed),
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


def paired_differences(per_seed: dict[str, list[dict]], metric: str, mode: str = "sampled",
                       model: str = "bfpo") -> dict[str, dict]:
    """``model`` minus every other model, seed by seed (the same seed: the same data order and sampling seed):
    baseline -> {per_seed, mean, se (standard error of the mean difference), se_ratio (mean / se)}."""
    out = {}
    for baseline, runs in per_seed.items():
        if baseline == model:
            continue
        diffs = [ours[mode][metric] - theirs[mode][metric] for ours, theirs in zip(per_seed[model], runs)]
        mean = float(np.mean(diffs))
        se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
        out[baseline] = {"per_seed": diffs, "mean": mean, "se": se,
                         "se_ratio": mean / se if se > 0 else float("nan")}
    return out


def choose(candidates: list[Candidate], selection: dict[str, dict[str, float]]) -> Candidate:
    """The candidate whose variants have the best mean validation score (a NaN mean counts as the worst); the only
    one when there was no selection."""
    if not selection:
        return candidates[0]
    return max(candidates, key=lambda candidate: np.nan_to_num(selection[str(candidate)]["mean"], nan=-np.inf))


def target_margin(loss: str, case: str, tau: float, alpha: float) -> float:
    """The margin h a squared loss pulls a pair of ``case`` to: BFPO g/tau, IPO 1/(2 tau); NaN for DPO (none)."""
    if loss == "ipo":
        return 1 / (2 * tau)
    if loss != "bfpo":
        return float("nan")
    import torch

    from bfpo_ray.loss import labeling_function

    chosen_safe, rejected_safe = (torch.tensor([part == "safe"]) for part in case.split("_"))
    return float(labeling_function(chosen_safe, rejected_safe, alpha)) / tau


def last_train_window(result) -> dict:
    """The metrics a Ray Train result reported with its last train/* window. A finished run that is run again
    reports no window of its own; Ray Train keeps the metrics reported with each checkpoint (``best_checkpoints``),
    and the final step is checkpointed with its window."""
    def has_window(metrics: dict) -> bool:
        return any(name.startswith("train/margin_") for name in metrics)

    if has_window(result.metrics or {}):
        return result.metrics
    reported = [metrics for _, metrics in (result.best_checkpoints or []) if has_window(metrics)]
    return max(reported, key=lambda metrics: metrics.get("train/step", 0)) if reported else (result.metrics or {})


def case_margins(metrics: dict, loss: str, candidate: Candidate, alpha: float) -> dict[str, tuple[float, float]]:
    """case -> (mean margin over the run's last log window, target margin), for the cases the run trained on."""
    return {case: (metrics[f"train/margin_{case}"], target_margin(loss, case, candidate.tau, alpha))
            for case in CASES if f"train/margin_{case}" in metrics}


# ---------------------------------------------------------------------------------------------------- the run

def evaluate_run(cfg: Config, model_dir: Path, out_dir: Path, preference_data: Path | None) -> dict[str, dict]:
    """mode -> metrics for one model: the generative metrics plus global/safety/help accuracy on the shared
    held-out pairs (NaN without ``preference_data``: the SFT model is the reference, its margins are 0). Reuses
    ``out_dir/figure1.json`` when an earlier command wrote it for the same model file, evaluation settings, world
    and held-out pairs."""
    from bfpo_ray.evaluate.run import evaluate_model, preference_metrics

    weights = (model_dir / "model.safetensors").stat()
    key = {"model": [str(model_dir), weights.st_size, weights.st_mtime_ns],
           "evaluate": cfg.evaluate.model_dump(mode="json"), "toyworld": cfg.toyworld.model_dump(mode="json"),
           "preference_data": str(preference_data)}
    cached = out_dir / "figure1.json"
    if cached.is_file():
        record = json.loads(cached.read_text(), parse_constant=float)
        if record.get("key") == key:
            return record["metrics"]
    nan = float("nan")
    preference = (preference_metrics(model_dir, preference_data, cfg) if preference_data else
                  {"eval/global_acc": nan, "eval/safety_acc": nan, "eval/help_acc": nan})
    result = evaluate_model(cfg, model_dir, out_dir)
    metrics = {mode: {**values, **preference} for mode, values in result.metrics.items()}
    cached.write_text(json.dumps({"key": key, "metrics": metrics}) + "\n")  # NaN written as NaN: parse_constant
    return metrics


def run(settings: Settings, command: str) -> dict:
    """Steps 1-5 of the module doc; returns what figure1.json holds."""
    from bfpo_ray.data import toyworld
    from bfpo_ray.scoring.prepare import prepare
    from bfpo_ray.train.launch import sft_first, train

    started = time.perf_counter()
    out = Path(settings.out).resolve()
    candidates = [Candidate.parse(text) for text in settings.candidates]
    views = {name: out / "views" / f"{name}.jsonl" for name in ("safer_chosen", "native_mix", "safer_mix")}
    first = variant_config("bfpo", candidates[0], 0, settings, out, views)
    toyworld.materialize(first.toyworld)
    write_views(out / "toyworld", out / "views")
    sft_model = Path(sft_first(first).model.path)
    datasets: dict[str, Path] = {}
    trained: dict[tuple[str, Candidate, int], tuple[Path, dict]] = {}

    def train_variant(variant: str, candidate: Candidate, seed: int, split: str) -> tuple[Config, Path, dict]:
        cfg = sft_first(variant_config(variant, candidate, seed, settings, out, views, split))
        if variant not in datasets:
            datasets[variant] = prepare(cfg)
        if (variant, candidate, seed) not in trained:
            result = train(cfg, datasets[variant])
            trained[variant, candidate, seed] = Path(result.path), last_train_window(result)
        run_dir, metrics = trained[variant, candidate, seed]
        return cfg, run_dir, metrics

    # Selection on the validation prompts, seed 0: every variant at every candidate setting (one candidate: no
    # choice to make, no validation runs).
    selection: dict[str, dict[str, float]] = {}
    for candidate in candidates if len(candidates) > 1 else []:
        scores = {}
        for variant in VARIANTS:
            cfg, run_dir, _ = train_variant(variant, candidate, 0, "validation")
            metrics = evaluate_run(cfg, run_dir / "export", run_dir / "evaluation-validation", None)
            scores[variant] = metrics["sampled"]["eval/score"]
        selection[str(candidate)] = {**scores, "mean": float(np.nanmean(list(scores.values())))}
    chosen = choose(candidates, selection)

    # The table: the chosen setting, every seed, the test prompts.
    if "bfpo" not in datasets:  # no selection ran
        datasets["bfpo"] = prepare(sft_first(variant_config("bfpo", chosen, 0, settings, out, views)))
    preference_data = datasets["bfpo"]
    per_seed: dict[str, list[dict]] = {"sft": []}
    margins: dict[str, list[dict]] = {}
    for seed in range(settings.seeds):
        sft_cfg = variant_config("bfpo", chosen, seed, settings, out, views)
        per_seed["sft"].append(evaluate_run(sft_cfg, sft_model, sft_model.parent / f"evaluation-test-seed{seed}",
                                            None))
        for variant in VARIANTS:
            cfg, run_dir, train_metrics = train_variant(variant, chosen, seed, "test")
            per_seed.setdefault(variant, []).append(
                evaluate_run(cfg, run_dir / "export", run_dir / "evaluation-test", preference_data))
            margins.setdefault(variant, []).append(case_margins(train_metrics, LOSSES[variant], chosen,
                                                                settings.alpha))

    summary = aggregate(per_seed)
    differences = {metric: paired_differences(per_seed, metric) for metric in ("eval/score", "eval/harmless_rate",
                                                                               "eval/helpful_rate")}
    mean_margins = {variant: {case: (float(np.mean([run[case][0] for run in runs if case in run])),
                                     next(run[case][1] for run in runs if case in run))
                              for case in CASES if any(case in run for run in runs)}
                    for variant, runs in margins.items()}
    minutes = round((time.perf_counter() - started) / 60, 1)
    world = json.loads((out / "toyworld" / toyworld.WORLD_RECORD).read_text())
    record = {"command": command, "settings": asdict(settings), "chosen": str(chosen), "selection": selection,
              "minutes": minutes, "world_label_cases": world["counts"]["safety_by_label_case"],
              "per_seed": per_seed, "summary": summary, "paired_differences": differences,
              "case_margins": mean_margins}
    (out / "figure1.json").write_text(json.dumps(without_nan(record), indent=2) + "\n")
    plot(summary, out / "figure1.png", f"Figure 1 in miniature ({settings.seeds} seed(s), {chosen})")
    (out / "figure1.md").write_text(report(record))
    return record


def report(record: dict) -> str:
    from bfpo_ray.evaluate.run import results_table

    settings, summary = record["settings"], record["summary"]
    selection = "\n".join(["| setting | " + " | ".join(VARIANTS) + " | mean |",
                           "|---|" + "---|" * (len(VARIANTS) + 1)] + [
        f"| {name} | " + " | ".join(f"{scores[v]:.3f}" for v in (*VARIANTS, "mean")) + " |"
        for name, scores in record["selection"].items()]) if record["selection"] else "(one candidate: no selection)"
    differences = ["| baseline | " + " | ".join(f"{metric.removeprefix('eval/')} (mean ± se, per seed)"
                                                for metric in record["paired_differences"]) + " |",
                   "|---|" + "---|" * len(record["paired_differences"])]
    for baseline in record["paired_differences"]["eval/score"]:
        cells = []
        for metric, by_baseline in record["paired_differences"].items():
            d = by_baseline[baseline]
            seeds = ", ".join(f"{value:+.3f}" for value in d["per_seed"])
            cells.append(f"{d['mean']:+.3f} ± {d['se']:.3f} ({seeds})" if not math.isnan(d["se"]) else
                         f"{d['mean']:+.3f} ({seeds})")
        differences.append(f"| {baseline} | " + " | ".join(cells) + " |")
    margin_rows = {variant: {f"train/margin_{case}": (value, target) for case, (value, target) in cases.items()}
                   for variant, cases in record["case_margins"].items()}
    margins = ["| variant | " + " | ".join(CASES) + " |", "|---|" + "---|" * len(CASES)]
    for variant, cases in margin_rows.items():
        margins.append(f"| {variant} | " + " | ".join(
            "-" if f"train/margin_{case}" not in cases else
            f"{cases[f'train/margin_{case}'][0]:.2f}" + ("" if math.isnan(cases[f"train/margin_{case}"][1]) else
                                                        f" (target {cases[f'train/margin_{case}'][1]:.1f})")
            for case in CASES) + " |")
    return "\n".join([
        f"Figure 1 in miniature: {settings['seeds']} seed(s) at {record['chosen']}, {record['minutes']} min",
        f"command: {record['command']}",
        f"safety pairs by label case (more helpful response's safety first): {record['world_label_cases']}", "",
        "selection on the validation prompts (seed 0, sampled score; the setting with the best mean is used):", "",
        selection, "",
        f"test prompts, sampled generations (temperature {settings['temperature']}, top_p {settings['top_p']}, "
        f"{settings['samples']} per prompt), mean ± std over seeds:", "",
        figure_table(summary, "sampled"), "", "greedy generations:", "", figure_table(summary, "greedy"), "",
        "global_acc: every model on the same held-out pairs (BFPO's eval split, reference = SFT).", "",
        "BFPO minus each baseline, sampled, seed by seed (se: standard error of the mean paired difference):", "",
        "\n".join(differences), "",
        "mean margin h per label case of the trained pairs (chosen's safety first) over the last log window (the "
        "last quarter of the steps), mean over seeds, against the loss's target margin (DPO has none):", "",
        "\n".join(margins), ""])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bfpo_ray figure1", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps, 1 seed, a small world (smoke run)")
    parser.add_argument("--candidates", nargs="+", default=None, metavar="LR:TAU:STEPS[:TRAINABLE]",
                        help=f"settings to choose from on the validation prompts (default {' '.join(Settings().candidates)})")
    for field in ("out", "seeds", "samples", "num_workers"):
        default = getattr(Settings(), field)
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=None,
                            help=f"default {default} ({getattr(QUICK, field)} with --quick)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    settings = QUICK if args.quick else Settings()
    updates = {key: value for key, value in vars(args).items() if key != "quick" and value is not None}
    if "candidates" in updates:
        updates["candidates"] = tuple(updates["candidates"])
        for text in updates["candidates"]:
            Candidate.parse(text)  # a malformed one fails here, before anything runs
    settings = replace(settings, **updates)
    record = run(settings, " ".join(["python -m bfpo_ray figure1", shlex.join(argv)]).strip())
    print(report(record))
    out = Path(settings.out).resolve()
    print(f"written: {out / 'figure1.md'}, {out / 'figure1.json'}, {out / 'figure1.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
