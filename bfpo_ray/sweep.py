"""The parts of a Ray Tune sweep that are not the Tuner itself: the search space, trial configs, how many trials fit,
the trials' results, the choice of the best report, the results table (``bfpo_ray.pipeline.sweep`` runs the sweep).

The shape: prepare and reference-score the data once (the reference log-probs depend on no searched knob), then a
``Tuner`` whose trainable fits one TorchTrainer per trial (``bfpo_ray.pipeline.run_trial``) with the fields of
``tune.space`` set (``trial_config``), its reports reaching Tune through Ray's ``TuneReportCallback``. Every report
of a trial carries the eval/* metrics (a trial reports when it evaluates, every ``train.eval_every`` steps), and
``ASHAScheduler`` compares trials on ``tune.metric`` at rungs measured in optimizer steps (``train/step``).

The best report. Every report of every trial (each one a step with a checkpoint, since checkpoint_every equals
eval_every in a sweep) is a candidate: among the reports whose metrics meet ``tune.floor`` (e.g. an answered rate of
at least 0.9), the one with the best ``tune.metric``; when none meets the floor, the best of all, and the sweep
says so (``choose``). The best config is the trial's config with ``train.max_steps`` set to that report's step: with
``train.lr_schedule: constant`` and no warm-up, training it repeats the trial's first steps exactly.

Outputs, in the experiment directory ``<tune.storage_path>/<tune.name>/``:

    Tune's experiment state and one directory per trial (params.json, result.json, progress.csv)
    runs/<trial id>/     the trial's Ray Train run: checkpoints, TensorBoard events, the exported model
    results.csv          one row per trial: its parameters, how far it got, whether ASHA stopped it, its last metrics
    reports.csv          every report of every trial (the candidates of the choice)
    results.md           the trial table as Markdown, and the choice
    best_config.yaml     the full config of the chosen report, for ``python jobs/bfpo.py --config``
"""

from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from ray import tune
from ray.tune import ExperimentAnalysis

from bfpo_ray import objectives
from bfpo_ray.config import Config, ConfigError, SearchRange
from bfpo_ray.train.batching import batches_per_pass, total_optimizer_steps

TRAIN_RUNS_DIR = "runs"
RESULTS_CSV, REPORTS_CSV, RESULTS_MD, BEST_CONFIG = "results.csv", "reports.csv", "results.md", "best_config.yaml"
STEP = "train/step"
# Tune needs a non-empty resource request per trial; the driver only waits on its TorchTrainer (the workers ask
# for the real resources), so it asks for a token share of a CPU.
DRIVER_CPUS = 0.01
TABLE_METRICS = (
    "eval/score",
    "eval/safety_acc",
    "eval/help_acc",
    "eval/global_acc",
    "eval/harmless_rate",
    "eval/helpful_rate",
    "eval/over_refusal",
    "eval/degenerate_rate",
)
FINISHED, STOPPED, UNFINISHED, FAILED = "finished", "stopped early", "unfinished", "error"
OBJECTIVE_SETTINGS = ("alpha", "tau", "b1", "label_smoothing")  # train fields that only some objectives have


# ---------------------------------------------------------------------------------------------------- the space


def search_domain(knob: SearchRange):
    """A Ray Tune domain for one knob: grid_search over ``grid``, else uniform or loguniform over [low, high]."""
    if knob.grid is not None:
        return tune.grid_search(list(knob.grid))
    return (tune.loguniform if knob.distribution == "loguniform" else tune.uniform)(knob.low, knob.high)


def param_space(cfg: Config) -> dict[str, dict]:
    """Tune's nested param space from ``tune.space``: {"train": {"alpha": domain, ...}, ...}."""
    return {
        section: {name: search_domain(knob) for name, knob in fields.items()}
        for section, fields in cfg.tune.space.items()
    }


def flat_params(params: dict) -> dict[str, object]:
    """{"train.alpha": 0.5, ...} from a trial's nested params."""
    return {f"{section}.{name}": value for section, fields in (params or {}).items() for name, value in fields.items()}


def trial_config(cfg: Config, params: dict, trial_id: str, runs_dir: str) -> Config:
    """The config of one trial: the searched fields set from ``params`` (nested by section), its own Ray Train run
    ``<runs_dir>/<trial_id>``, and a report at every evaluation only (every report must carry the metric ASHA
    compares)."""
    tree = cfg.model_dump(mode="json")
    for key, value in flat_params(params).items():
        current = tree
        for part in key.split(".")[:-1]:
            current = current[part]
        integer = isinstance(current[key.rsplit(".", 1)[1]], int) and float(value).is_integer()
        current[key.rsplit(".", 1)[1]] = int(value) if integer else value
    tree["train"]["log_every"] = tree["train"]["eval_every"]
    tree["run"]["name"], tree["run"]["storage_path"] = trial_id, runs_dir
    # MLflow and W&B get one run per trial from the sweep's logger callbacks (tune_callbacks), not from the trial
    tree["run"]["report_to"] = [name for name in tree["run"]["report_to"] if name == "tensorboard"]
    return Config.model_validate(tree)


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial's Ray Train workers hold together (the driver's token CPU share aside)."""
    workers = cfg.run.num_workers
    resources = {"CPU": workers * cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = float(workers)
    if cfg.run.worker_resource:
        resources[cfg.run.worker_resource] = float(workers)
    return resources


def concurrent_trials(per_trial: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials the cluster holds at once: the scarcest resource decides; one CPU stays free for the Ray
    Data tasks that load each trial's pairs. At least 1 (an autoscaling cluster may not have the nodes yet)."""
    fits = []
    for name, need in per_trial.items():
        have = cluster.get(name, 0.0) - (1.0 if name == "CPU" else 0.0)
        fits.append(int(have // need))
    return max(1, min(fits))


def check_sweepable(cfg: Config, datasets: dict[str, Path]) -> None:
    """Errors, naming the field, for a config whose trials could not be compared."""
    if not cfg.tune.space:
        raise ConfigError("tune.space is empty: name at least one field to search, e.g. tune.space.train.tau")
    settings = {field.name for field in dataclasses.fields(objectives.build(cfg.train))}
    for name in cfg.tune.space.get("train", {}):
        if name in OBJECTIVE_SETTINGS and name not in settings:
            raise ConfigError(f"tune.space.train.{name}: the {cfg.train.loss} objective has no {name} (train.loss)")
    if cfg.train.checkpoint_every % cfg.train.eval_every:
        raise ConfigError(
            f"train.checkpoint_every ({cfg.train.checkpoint_every}) must be a multiple of "
            f"train.eval_every ({cfg.train.eval_every}): every report of a trial carries the eval "
            "metrics ASHA compares, and a checkpoint is reported when it is saved"
        )
    generative = cfg.evaluate.during_training
    preference = any(name.startswith("eval_") for name in datasets)
    if cfg.tune.metric.startswith("eval/") and not (generative or preference):
        raise ConfigError(
            f"tune.metric {cfg.tune.metric!r} needs held-out pairs (data.eval_fraction > 0) or "
            "judged generations during training (evaluate.during_training: true)"
        )


def planned_steps(cfg: Config, datasets: dict[str, Path]) -> int:
    """Optimizer steps of the longest trial, from the training rows of every role (as the workers count them)."""
    micro_steps = max(
        batches_per_pass(
            sum(pq.read_metadata(file).num_rows for file in Path(path).glob("*.parquet")),
            cfg.run.num_workers,
            cfg.train.role_micro_batch(name.removeprefix("train_")),
        )
        for name, path in datasets.items()
        if name.startswith("train_")
    )
    steps = [cfg.train.max_steps]
    knob = cfg.tune.space.get("train", {}).get("max_steps")
    if knob is not None:
        steps = knob.grid or [knob.high]
    settings = [cfg.train.model_copy(update={"max_steps": int(s) if s else None}) for s in steps]
    return max(total_optimizer_steps(micro_steps, train) for train in settings)


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class SweepOutcome:
    experiment_dir: Path
    rows: list[dict]  # one per trial, as in results.csv
    reports: list[dict]  # every report of every trial, as in reports.csv
    best: dict | None  # the chosen report, None when no trial reported the metric
    best_config: Path | None  # None when nothing was chosen or the sweep was interrupted
    max_steps: int
    seconds: float
    met_floor: bool = True  # whether the chosen report meets tune.floor
    notes: list[str] = field(default_factory=list)


def trial_rows(results, max_steps: int, metric: str) -> tuple[list[dict], list[dict]]:
    """One row per trial of a ResultGrid (id, status: finished, stopped early by ASHA, unfinished in an interrupted
    sweep, or error; the searched parameters, the last step reached, its last metrics, its newest checkpoint), and
    one row per report of every trial (trial, parameters, step, metrics, the checkpoint saved with it)."""
    trials = {trial.path: trial for trial in ExperimentAnalysis(results.experiment_path).trials}
    rows, reports = [], []
    for result in results:
        trial = trials[result.path]
        last = result.metrics or {}
        params = flat_params(result.config)
        history = result.metrics_dataframe
        steps = int(last.get(STEP, 0))
        if result.error:
            status = FAILED
        elif trial.status != "TERMINATED":
            status = UNFINISHED
        else:
            status = STOPPED if steps < max_steps else FINISHED
        checkpoint = ""
        for record in history.to_dict("records") if history is not None else []:
            path = record.get("checkpoint_path")
            checkpoint = path if isinstance(path, str) else checkpoint
            reports.append(
                {
                    "trial": trial.trial_id,
                    **params,
                    "step": int(record.get(STEP, 0)),
                    **{name: record.get(name, math.nan) for name in dict.fromkeys((metric, *TABLE_METRICS))},
                    "checkpoint": path if isinstance(path, str) else "",
                }
            )
        rows.append(
            {
                "trial": trial.trial_id,
                "status": status,
                **params,
                "steps": steps,
                **{name: last.get(name, math.nan) for name in dict.fromkeys((metric, *TABLE_METRICS))},
                "checkpoint": checkpoint,
            }
        )
    return rows, reports


def _usable(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def choose(reports: list[dict], metric: str, mode: str, floor: dict[str, float]) -> tuple[dict | None, bool]:
    """The best report (``mode`` of ``metric``) among those that meet every ``floor`` (metric >= value) and have a
    checkpoint; when none meets the floor, the best of all. Returns (the report, whether it meets the floor); None
    when no report has the metric. Ties go to the earlier step (less training), then to the earlier trial."""
    candidates = [report for report in reports if _usable(report.get(metric))]
    if not candidates:
        return None, False
    meets = [
        report
        for report in candidates
        if all(_usable(report.get(name)) and report[name] >= value for name, value in floor.items())
    ]
    pool = meets or candidates
    sign = 1 if mode == "max" else -1
    best = max(pool, key=lambda report: (sign * report[metric], -report.get("step", 0)))
    return best, bool(meets)


def markdown_table(rows: list[dict], skip: tuple[str, ...] = ("checkpoint",)) -> str:
    """Rows as a Markdown table (numbers to 4 significant digits; NaN as "-"; columns NaN in every row left out)."""
    if not rows:
        return "(no trials)"
    columns = [
        column
        for column in rows[0]
        if column not in skip
        and any(not (isinstance(row.get(column), float) and math.isnan(row[column])) for row in rows)
    ]

    def cell(value):
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)


def report(outcome: SweepOutcome, metric: str) -> str:
    """What a sweep prints at the end: the trial table, the chosen report, where everything went."""
    rows = outcome.rows
    lines = [
        "",
        f"sweep ended after {outcome.seconds / 60:.1f} min: {len(rows)} trials, "
        f"{sum(row['status'] == STOPPED for row in rows)} stopped early by ASHA, up to "
        f"{outcome.max_steps} steps per trial",
        markdown_table(rows),
        "",
    ]
    unfinished = sum(row["status"] == UNFINISHED for row in rows)
    if unfinished:
        lines.append(
            f"interrupted: {unfinished} trial(s) unfinished, no best config written; run the same "
            "command again to resume the sweep"
        )
    elif outcome.best is None:
        lines.append(f"no trial reported {metric}: no best config written")
    else:
        best = outcome.best
        params = " ".join(
            f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in best.items()
            if "." in key
        )
        lines += [
            f"best report   trial {best['trial']} step {best['step']}: {params} {metric}={best[metric]:.4g}",
            *([] if outcome.met_floor else ["  (no report met tune.floor: the best of all reports)"]),
            f"  checkpoint  {best['checkpoint'] or '(none)'}",
            f"  config      {outcome.best_config}   (python jobs/bfpo.py --config {outcome.best_config})",
        ]
    lines += [
        f"  results     {outcome.experiment_dir / RESULTS_MD}, {outcome.experiment_dir / RESULTS_CSV}, "
        f"{outcome.experiment_dir / REPORTS_CSV}",
        f"  experiment  {outcome.experiment_dir}   (run the same command again to resume it)",
    ]
    return "\n".join(lines)
