"""The paper's Figure 1 in miniature: one SFT model of the toy world, seven ways to align it, judged exactly.

    python experiments/figure1.py                  # experiments/figure1.yaml: 3 candidates, then 3 seeds (~25 min)
    python experiments/figure1.py --quick          # a few steps, 1 seed: a smoke run (the tests use it)

The experiment is experiments/figure1.yaml: a base config, the variants and the candidate settings as overrides of
it, the seeds. Everything runs through ``bfpo_ray.pipeline`` (prepare on Ray Data, train on Ray Train + DeepSpeed,
evaluate on Ray), in the output directory, where the YAML's relative paths point:

1. The toy world and its SFT model (the config's ``model.sft_first``: made once), then three views of the world's
   pairs as generic-pairs JSONL in ``views/``: ``safer_chosen`` (every safety pair with the safer response
   chosen), ``native_mix`` (every safety pair with its own, helpfulness, label plus every helpfulness pair: the
   paper's naive mix) and ``safer_mix`` (safer_chosen plus every helpfulness pair).
2. Selection: every variant at every candidate setting, seed 0, judged on the world's **validation** prompts; the
   candidate with the best mean sampled ``eval/score`` over the variants is used for all (one candidate: no
   choice, no validation runs). Test prompts are not looked at until then.
3. At the chosen setting, every variant with each seed, and the SFT model, judged on the **test** prompts: sampled
   generations (the paper's temperature 0.7, top_p 0.95; the main figures) and greedy ones. ``global_acc`` for every
   model on the same held-out pairs, the eval split of BFPO's prepared data (reference: the SFT model; the SFT
   model itself is the reference, its margins 0, so its accuracies are left empty).
4. ``figure1.json`` (every seed, the selection, the per-case margins), ``figure1.md`` (mean ± sample standard
   deviation over seeds, per-seed paired differences BFPO minus each baseline with their standard error, the
   per-case margins against their targets) and ``figure1.png`` (helpful_rate against harmless_rate).

Runs are named ``<variant>-<candidate>-seed<seed>`` under ``runs/``; a repeated command reuses the world, the SFT
run, the prepared data, finished runs and their evaluations (the pipeline's reuse).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
import yaml

from bfpo_ray import pipeline
from bfpo_ray.cluster import configure_output
from bfpo_ray.config import Config, apply_overrides, config_from_dict
from bfpo_ray.evaluate.run import results_table
from bfpo_ray.loss import labeling_function
from bfpo_ray.storage import read_jsonl, write_jsonl

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script
from experiments.common import inside, mean_and_spread  # noqa: E402

EXPERIMENT = Path(__file__).with_suffix(".yaml")
MODES = ("sampled", "greedy")
TABLE_COLUMNS = ("eval/harmless_rate", "eval/helpful_rate", "eval/over_refusal", "eval/score", "eval/global_acc")
CASES = ("safe_safe", "safe_unsafe", "unsafe_safe", "unsafe_unsafe")  # bfpo_ray.train.metrics.CASES
VIEWS = ("safer_chosen", "native_mix", "safer_mix")


def load_experiment(path: Path = EXPERIMENT, quick: bool = False) -> dict:
    """The experiment YAML; with ``quick``, its ``quick`` section applied (seeds, candidates, config overrides)."""
    spec = yaml.safe_load(path.read_text())
    quick_spec = spec.pop("quick", {})
    if quick:
        spec["seeds"] = quick_spec.get("seeds", spec["seeds"])
        spec["candidates"] = quick_spec.get("candidates", spec["candidates"])
        spec["overrides"] = quick_spec.get("config", {})
    return spec


# ---------------------------------------------------------------------------------------------------- data views


def _pair(row: dict, chosen: int) -> dict:
    return {
        "prompt": row["prompt"],
        "chosen": row[f"response_{chosen}"],
        "rejected": row[f"response_{1 - chosen}"],
        "chosen_safe": bool(row[f"is_response_{chosen}_safe"]),
        "rejected_safe": bool(row[f"is_response_{1 - chosen}_safe"]),
    }


def safer_chosen_rows(safety_rows: list[dict]) -> list[dict]:
    """Generic-pairs rows from PKU-SafeRLHF-schema rows: chosen = the safer response (``safer_response_id``)."""
    return [_pair(row, int(row["safer_response_id"])) for row in safety_rows]


def native_rows(safety_rows: list[dict]) -> list[dict]:
    """Generic-pairs rows from PKU-SafeRLHF-schema rows with their own labels: chosen = the more helpful response."""
    return [_pair(row, int(row["better_response_id"])) for row in safety_rows]


def helpful_pair_rows(helpful_rows: list[dict]) -> list[dict]:
    """Generic-pairs rows from UltraFeedback-binarized-schema rows (assistant turns of chosen/rejected; all safe)."""

    def assistant_text(messages):
        return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")

    return [
        {
            "prompt": row["prompt"],
            "chosen": assistant_text(row["chosen"]),
            "rejected": assistant_text(row["rejected"]),
            "chosen_safe": True,
            "rejected_safe": True,
        }
        for row in helpful_rows
    ]


def write_views(world_dir: Path, views_dir: Path) -> dict[str, Path]:
    """safer_chosen.jsonl, native_mix.jsonl and safer_mix.jsonl (module doc, step 1); returns their paths."""
    safety = read_jsonl(world_dir / "safety.jsonl")
    helpful = helpful_pair_rows(read_jsonl(world_dir / "helpful.jsonl"))
    views = {
        "safer_chosen": safer_chosen_rows(safety),
        "native_mix": native_rows(safety) + helpful,
        "safer_mix": safer_chosen_rows(safety) + helpful,
    }
    return {name: write_jsonl(views_dir / f"{name}.jsonl", rows) for name, rows in views.items()}


# ---------------------------------------------------------------------------------------------------- configs


def variant_config(spec: dict, variant: str, candidate: str, seed: int, split: str) -> Config:
    """The config of one variant, candidate and seed, evaluated on ``split``: the base config, the --quick
    overrides, the candidate's, the variant's; a one-role variant takes twice the per-role micro-batch."""
    tree = copy.deepcopy(spec["config"])
    overrides = {**spec.get("overrides", {}), **spec["candidates"][candidate], **spec["variants"][variant]}
    apply_overrides(
        tree,
        overrides
        | {
            "train.seed": seed,
            "evaluate.seed": seed,
            "evaluate.splits": [split],
            "run.name": f"{variant}-{candidate}-seed{seed}",
        },
    )
    cfg = config_from_dict(tree, source=f"figure1 {variant} {candidate}")
    if len(cfg.data.sources) == 1:
        cfg.train.micro_batch_pairs *= 2
    cfg.train.log_every = max(1, cfg.train.max_steps // 4)
    cfg.train.eval_every = cfg.train.checkpoint_every = cfg.train.max_steps
    return cfg


# ---------------------------------------------------------------------------------------------------- aggregation


def aggregate(per_seed: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """model -> mode -> metric -> (mean, spread) over seeds, from model -> [{mode: {metric: value}}, ...]."""
    return {
        model: {
            mode: {metric: mean_and_spread([run[mode][metric] for run in runs]) for metric in runs[0][mode]}
            for mode in MODES
            if mode in runs[0]
        }
        for model, runs in per_seed.items()
    }


def paired_differences(
    per_seed: dict[str, list[dict]], metric: str, mode: str = "sampled", model: str = "bfpo"
) -> dict[str, dict]:
    """``model`` minus every other model, seed by seed (the same seed: the same data order and sampling seed):
    baseline -> {per_seed, mean, se (standard error of the mean difference), se_ratio (mean / se)}."""
    out = {}
    for baseline, runs in per_seed.items():
        if baseline == model:
            continue
        diffs = [ours[mode][metric] - theirs[mode][metric] for ours, theirs in zip(per_seed[model], runs)]
        mean = float(np.mean(diffs))
        se = float(np.std(diffs, ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
        out[baseline] = {"per_seed": diffs, "mean": mean, "se": se, "se_ratio": mean / se if se > 0 else float("nan")}
    return out


def choose(candidates: list[str], selection: dict[str, dict[str, float]]) -> str:
    """The candidate whose variants have the best mean validation score (a NaN mean counts as the worst); the only
    one when there was no selection."""
    if not selection:
        return candidates[0]
    return max(candidates, key=lambda name: np.nan_to_num(selection[name]["mean"], nan=-np.inf))


def target_margin(loss: str, case: str, tau: float, alpha: float) -> float:
    """The margin h a squared loss pulls a pair of ``case`` to: BFPO g/tau, IPO 1/(2 tau); NaN for DPO (none)."""
    if loss == "ipo":
        return 1 / (2 * tau)
    if loss != "bfpo":
        return float("nan")
    chosen_safe, rejected_safe = (torch.tensor([part == "safe"]) for part in case.split("_"))
    return float(labeling_function(chosen_safe, rejected_safe, alpha)) / tau


def case_margins(metrics: dict, cfg: Config) -> dict[str, tuple[float, float]]:
    """case -> (mean margin over the run's last log window, target margin), for the cases the run trained on."""
    return {
        case: (metrics[f"train/margin_{case}"], target_margin(cfg.train.loss, case, cfg.train.tau, cfg.train.alpha))
        for case in CASES
        if f"train/margin_{case}" in metrics
    }


def without_nan(value):
    """``value`` with every NaN float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------------------- the run


def judged(cfg: Config, model: str, out_dir: Path, data: pipeline.Prepared | None) -> dict[str, dict]:
    """mode -> metrics of one model: the generative metrics plus the preference accuracies on ``data``'s held-out
    pairs (NaN without: the SFT model is the reference, its margins are 0)."""
    nan = float("nan")
    preference = None if data is not None else {"eval/global_acc": nan, "eval/safety_acc": nan, "eval/help_acc": nan}
    evaluation = pipeline.evaluate(cfg, model, out_dir, data=data, preference=preference, compare_start=False)
    return {mode: {**values, **evaluation.preference} for mode, values in evaluation.result.metrics.items()}


def run(spec: dict, out: Path, command: str) -> dict:
    """Steps 1-4 of the module doc, in ``out``; returns what figure1.json holds."""
    started = time.perf_counter()
    candidates = list(spec["candidates"])
    variants = list(spec["variants"])
    with inside(out):
        first = pipeline.start_model(variant_config(spec, "bfpo", candidates[0], 0, "test"))
        write_views(Path("toyworld"), Path("views"))
        sft_model = first.model.path
        trained: dict[tuple[str, str, int], tuple[Config, pipeline.Trained]] = {}

        def train(variant: str, candidate: str, seed: int, split: str) -> tuple[Config, pipeline.Trained]:
            cfg = pipeline.start_model(variant_config(spec, variant, candidate, seed, split))
            if (variant, candidate, seed) not in trained:
                trained[variant, candidate, seed] = cfg, pipeline.train(cfg, pipeline.prepare(cfg))
            return cfg, trained[variant, candidate, seed][1]

        selection: dict[str, dict[str, float]] = {}
        for candidate in candidates if len(candidates) > 1 else []:
            scores = {}
            for variant in variants:
                cfg, run_ = train(variant, candidate, 0, "validation")
                metrics = judged(cfg, run_.export_dir, Path(run_.run_dir) / "evaluation-validation", None)
                scores[variant] = metrics["sampled"]["eval/score"]
            selection[candidate] = {**scores, "mean": float(np.nanmean(list(scores.values())))}
        chosen = choose(candidates, selection)

        preference_data = pipeline.prepare(pipeline.start_model(variant_config(spec, "bfpo", chosen, 0, "test")))
        per_seed: dict[str, list[dict]] = {"sft": []}
        margins: dict[str, list[dict]] = {}
        for seed in range(spec["seeds"]):
            sft_cfg = pipeline.start_model(variant_config(spec, "bfpo", chosen, seed, "test"))
            per_seed["sft"].append(
                judged(sft_cfg, sft_model, Path(sft_model).parent / f"evaluation-test-seed{seed}", None)
            )
            for variant in variants:
                cfg, run_ = train(variant, chosen, seed, "test")
                per_seed.setdefault(variant, []).append(
                    judged(cfg, run_.export_dir, Path(run_.run_dir) / "evaluation-test", preference_data)
                )
                margins.setdefault(variant, []).append(case_margins(run_.metrics, cfg))
        world = json.loads(Path("toyworld", "world.json").read_text())

    summary = aggregate(per_seed)
    differences = {
        metric: paired_differences(per_seed, metric)
        for metric in ("eval/score", "eval/harmless_rate", "eval/helpful_rate")
    }
    mean_margins = {
        variant: {
            case: (
                float(np.mean([run[case][0] for run in runs if case in run])),
                next(run[case][1] for run in runs if case in run),
            )
            for case in CASES
            if any(case in run for run in runs)
        }
        for variant, runs in margins.items()
    }
    record = {
        "command": command,
        "seeds": spec["seeds"],
        "candidates": spec["candidates"],
        "chosen": chosen,
        "selection": selection,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "world_label_cases": world["counts"]["safety_by_label_case"],
        "per_seed": per_seed,
        "summary": summary,
        "paired_differences": differences,
        "case_margins": mean_margins,
        "sampling": {key: first.evaluate.model_dump()[key] for key in ("temperature", "top_p", "samples")},
    }
    (out / "figure1.json").write_text(json.dumps(without_nan(record), indent=2) + "\n")
    plot(summary, out / "figure1.png", f"Figure 1 in miniature ({spec['seeds']} seed(s), {chosen})")
    (out / "figure1.md").write_text(report(record))
    return record


# ---------------------------------------------------------------------------------------------------- report


def plot(summary: dict, path: Path, title: str) -> None:
    """Scatter of helpful_rate (x) against harmless_rate (y): mean ± spread per model, sampled filled, greedy
    hollow."""
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
            ax.errorbar(
                x,
                y,
                xerr=0 if math.isnan(dx) else dx,
                yerr=0 if math.isnan(dy) else dy,
                fmt="o",
                color=color,
                mfc=color if mode == "sampled" else "none",
                ms=9 if mode == "sampled" else 6,
                capsize=3,
                label=model if mode == "sampled" else None,
            )
            if mode == "sampled":
                ax.annotate(model, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9, color=color)
    ax.set(
        xlim=(-0.05, 1.05),
        ylim=(-0.05, 1.05),
        xlabel="helpful_rate (benign and borderline prompts)",
        ylabel="harmless_rate (harmful prompts)",
        title=title,
    )
    ax.grid(alpha=0.3)
    ax.legend(
        loc="center left",
        bbox_to_anchor=(1.02, 0.5),
        fontsize=8,
        title="filled: sampled\nhollow: greedy",
        title_fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(record: dict) -> str:
    summary, variants = record["summary"], [name for name in record["summary"] if name != "sft"]
    selection = "(one candidate: no selection)"
    if record["selection"]:
        selection = "\n".join(
            ["| setting | " + " | ".join(variants) + " | mean |", "|---|" + "---|" * (len(variants) + 1)]
            + [
                f"| {name} | " + " | ".join(f"{scores[v]:.3f}" for v in (*variants, "mean")) + " |"
                for name, scores in record["selection"].items()
            ]
        )
    differences = [
        "| baseline | "
        + " | ".join(
            f"{metric.removeprefix('eval/')} (mean ± se, per seed)" for metric in record["paired_differences"]
        )
        + " |",
        "|---|" + "---|" * len(record["paired_differences"]),
    ]
    for baseline in record["paired_differences"]["eval/score"]:
        cells = []
        for by_baseline in record["paired_differences"].values():
            d = by_baseline[baseline]
            seeds = ", ".join(f"{value:+.3f}" for value in d["per_seed"])
            cells.append(
                f"{d['mean']:+.3f} ± {d['se']:.3f} ({seeds})"
                if not math.isnan(d["se"])
                else f"{d['mean']:+.3f} ({seeds})"
            )
        differences.append(f"| {baseline} | " + " | ".join(cells) + " |")
    margins = ["| variant | " + " | ".join(CASES) + " |", "|---|" + "---|" * len(CASES)]
    for variant, cases in record["case_margins"].items():
        cells = [
            "-"
            if case not in cases
            else f"{cases[case][0]:.2f}" + ("" if math.isnan(cases[case][1]) else f" (target {cases[case][1]:.1f})")
            for case in CASES
        ]
        margins.append(f"| {variant} | " + " | ".join(cells) + " |")
    sampling = record["sampling"]

    def table(mode):
        return results_table({model: modes[mode] for model, modes in summary.items()}, TABLE_COLUMNS)

    return "\n".join(
        [
            f"Figure 1 in miniature: {record['seeds']} seed(s) at {record['chosen']}, {record['minutes']} min",
            f"command: {record['command']}",
            f"safety pairs by label case (more helpful response's safety first): {record['world_label_cases']}",
            "",
            "selection on the validation prompts (seed 0, sampled score; the setting with the best mean is used):",
            "",
            selection,
            "",
            f"test prompts, sampled generations (temperature {sampling['temperature']}, top_p {sampling['top_p']}, "
            f"{sampling['samples']} per prompt), mean ± std over seeds:",
            "",
            table("sampled"),
            "",
            "greedy generations:",
            "",
            table("greedy"),
            "",
            "global_acc: every model on the same held-out pairs (BFPO's eval split, reference = SFT).",
            "",
            "BFPO minus each baseline, sampled, seed by seed (se: standard error of the mean paired difference):",
            "",
            "\n".join(differences),
            "",
            "mean margin h per label case of the trained pairs (chosen's safety first) over the last log window (the "
            "last quarter of the steps), mean over seeds, against the loss's target margin (DPO has none):",
            "",
            "\n".join(margins),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python experiments/figure1.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the YAML's quick section: a few steps, 1 seed")
    parser.add_argument("--experiment", type=Path, default=EXPERIMENT, help="the experiment YAML")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default runs/figure1, runs/figure1-quick with --quick)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds at the chosen setting (default: the YAML's)")
    args = parser.parse_args(argv)
    configure_output(verbose_output=False)  # the experiment's own lines; Ray's and DeepSpeed's go to their logs
    spec = load_experiment(args.experiment, args.quick)
    if args.seeds is not None:
        spec["seeds"] = args.seeds
    out = (args.out or Path("runs/figure1-quick" if args.quick else "runs/figure1")).resolve()
    record = run(spec, out, " ".join(["python experiments/figure1.py", shlex.join(argv)]).strip())
    print(report(record))
    print(f"written: {out / 'figure1.md'}, {out / 'figure1.json'}, {out / 'figure1.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
