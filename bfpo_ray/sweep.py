"""Ray Tune sweeps over BFPO's alpha and tau, with ASHA stopping the weak trials early.

    python tune/sweep.py --config bfpo_ray/configs/sweep.yaml [key=value ...]     # or: python -m bfpo_ray tune ...
    outcome = run_sweep(cfg)                                                  # from Python or a notebook

The shape: prepare and reference-score the data ONCE (the reference log-probs depend on neither alpha
nor tau), then a ``Tuner`` whose trainable is a driver function, ``run_trial``: it copies the config, sets the
trial's alpha and tau and fits one TorchTrainer (``bfpo_ray.train.launch.train``), whose reports reach Tune through
Ray's ``TuneReportCallback``. Every report of a trial carries the eval/* metrics (the trial logs when it evaluates,
every ``train.eval_every`` steps), and ``ASHAScheduler`` compares trials on ``tune.metric`` at rungs measured in
optimizer steps (``train/step``). During training ``eval/score`` is the harmonic mean of ``eval/safety_acc`` and
``eval/help_acc`` on the held-out pairs (bfpo_ray.evaluate.metrics.preference_score).

Outputs, in the experiment directory ``<tune.storage_path>/<tune.name>/``:

    Tune's experiment state and one directory per trial (params.json, result.json, progress.csv)
    runs/<trial id>/     the trial's Ray Train run: checkpoints, TensorBoard events, the exported model
    results.csv          one row per trial: alpha, tau, how far it got, whether ASHA stopped it, its last metrics
    results.md           the same as a Markdown table
    best_config.yaml     the full config with the best trial's alpha and tau, for ``python jobs/bfpo.py --config``

The best trial is the one with the best last ``tune.metric`` among the trials that ran every step (among all when
none did). Running the same command again (same ``tune.name`` and storage path) resumes the sweep with
``Tuner.restore``: finished trials are kept as they are, unfinished ones resume from their last Ray Train
checkpoint, and trials not started yet start.
"""
from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from bfpo_ray.config import CONFIG_DIR, Config, ConfigError, SearchRange, dump_config, load_config

log = logging.getLogger(__name__)

DEFAULT_SWEEP_CONFIG = CONFIG_DIR / "sweep.yaml"
TRAIN_RUNS_DIR = "runs"
RESULTS_CSV, RESULTS_MD, BEST_CONFIG = "results.csv", "results.md", "best_config.yaml"
STEP = "train/step"
# Tune needs a non-empty resource request per trial; the driver only waits on its TorchTrainer (the workers ask
# for the real resources), so it asks for a token share of a CPU.
DRIVER_CPUS = 0.01
TABLE_METRICS = ("eval/score", "eval/safety_acc", "eval/help_acc", "eval/global_acc", "eval/loss")


# ---------------------------------------------------------------------------------------------------------------
# What to search, and how many trials fit at once
# ---------------------------------------------------------------------------------------------------------------

def search_domain(knob: SearchRange):
    """A Ray Tune domain for one knob: grid_search over ``grid``, else uniform or loguniform over [low, high]."""
    from ray import tune

    if knob.grid is not None:
        return tune.grid_search(list(knob.grid))
    return (tune.loguniform if knob.distribution == "loguniform" else tune.uniform)(knob.low, knob.high)


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


def trial_config(cfg: Config, alpha: float, tau: float, trial_id: str, runs_dir: str) -> Config:
    """The config of one trial: its alpha and tau, its own Ray Train run ``<runs_dir>/<trial_id>``, and a report
    at every evaluation only (every report must carry the metric ASHA compares)."""
    cfg = cfg.model_copy(deep=True)
    cfg.train.alpha, cfg.train.tau = float(alpha), float(tau)
    cfg.train.log_every = cfg.train.eval_every
    cfg.run.name, cfg.run.storage_path = trial_id, runs_dir
    # MLflow and W&B get one run per trial from the sweep's logger callbacks (tune_callbacks), not from the trial
    cfg.run.report_to = [name for name in cfg.run.report_to if name == "tensorboard"]
    return cfg


def check_sweepable(cfg: Config, datasets: dict[str, Path]) -> None:
    """Errors, naming the field, for a config whose trials could not be compared."""
    import dataclasses

    from bfpo_ray import objectives

    settings = {field.name for field in dataclasses.fields(objectives.build(cfg.train))}
    if not {"alpha", "tau"} <= settings:
        raise ConfigError(f"train.loss: a sweep over alpha and tau needs an objective that has both (bfpo), "
                          f"got {cfg.train.loss!r}")
    if cfg.train.checkpoint_every % cfg.train.eval_every:
        raise ConfigError(f"train.checkpoint_every ({cfg.train.checkpoint_every}) must be a multiple of "
                          f"train.eval_every ({cfg.train.eval_every}): every report of a trial carries the eval "
                          "metrics ASHA compares, and a checkpoint is reported when it is saved")
    if cfg.tune.metric.startswith("eval/") and not any(name.startswith("eval_") for name in datasets):
        raise ConfigError(f"tune.metric {cfg.tune.metric!r} needs held-out pairs: set data.eval_fraction > 0")


def planned_steps(cfg: Config, datasets: dict[str, Path]) -> int:
    """Optimizer steps of one trial, from the training rows of every role (as the workers count them)."""
    from bfpo_ray.train.batching import batches_per_pass, total_optimizer_steps

    micro_steps = max(
        batches_per_pass(sum(pq.read_metadata(file).num_rows for file in path.glob("*.parquet")),
                         cfg.run.num_workers, cfg.train.micro_batch_pairs)
        for name, path in datasets.items() if name.startswith("train_"))
    return total_optimizer_steps(micro_steps, cfg.train)


# ---------------------------------------------------------------------------------------------------------------
# One trial: a driver function that fits one TorchTrainer
# ---------------------------------------------------------------------------------------------------------------

def run_trial(params: dict, *, cfg: dict, dataset_dir: str, runs_dir: str) -> None:
    """Tune trainable: train with this trial's ``params["alpha"]`` and ``params["tau"]``. The Train run is named
    by the trial id, so a restored sweep resumes an interrupted trial from its own last checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from bfpo_ray.train.launch import train

    trial_cfg = trial_config(Config.model_validate(cfg), params["alpha"], params["tau"],
                             tune.get_context().get_trial_id(), runs_dir)
    train(trial_cfg, dataset_dir, callbacks=[TuneReportCallback()])


# ---------------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SweepOutcome:
    experiment_dir: Path
    rows: list[dict]             # one per trial, as in results.csv
    best: dict | None            # the best row, None when no trial reported the metric
    best_config: Path | None     # None when no trial reported the metric or the sweep was interrupted
    max_steps: int
    seconds: float


FINISHED, STOPPED, UNFINISHED, FAILED = "finished", "stopped early", "unfinished", "error"


def trial_rows(results, max_steps: int, metric: str) -> list[dict]:
    """One row per trial of a ResultGrid: id, status (finished; stopped early by ASHA; unfinished, in an
    interrupted sweep; error), alpha, tau, the last step reached, its last metrics, its newest Ray Train
    checkpoint."""
    from ray.tune import ExperimentAnalysis

    trials = {trial.path: trial for trial in ExperimentAnalysis(results.experiment_path).trials}
    rows = []
    for result in results:
        trial = trials[result.path]
        last = result.metrics or {}
        history = result.metrics_dataframe
        checkpoints = ([path for path in history["checkpoint_path"].tolist() if isinstance(path, str)]
                       if history is not None and "checkpoint_path" in history else [])
        steps = int(last.get(STEP, 0))
        config = result.config or {}
        if result.error:
            status = FAILED
        elif trial.status != "TERMINATED":
            status = UNFINISHED
        else:
            status = STOPPED if steps < max_steps else FINISHED
        rows.append({
            "trial": trial.trial_id, "status": status,
            "alpha": config.get("alpha"), "tau": config.get("tau"), "steps": steps,
            **{name: last.get(name, math.nan) for name in dict.fromkeys((metric, *TABLE_METRICS))},
            "checkpoint": checkpoints[-1] if checkpoints else "",
        })
    return rows


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The trial with the best last ``metric`` among those that finished (among all when none did)."""
    def usable(row):
        value = row.get(metric)
        return isinstance(value, (int, float)) and not math.isnan(value)

    candidates = [row for row in rows if row["status"] == FINISHED and usable(row)] or [
        row for row in rows if usable(row)]
    if not candidates:
        return None
    pick = max if mode == "max" else min
    return pick(candidates, key=lambda row: row[metric])


def markdown_table(rows: list[dict]) -> str:
    """The trial table as Markdown (numbers to 4 significant digits; NaN as "-")."""
    if not rows:
        return "(no trials)"
    columns = [column for column in rows[0] if column != "checkpoint"]

    def cell(value):
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(outcome_dir: Path, rows: list[dict]) -> None:
    with (outcome_dir / RESULTS_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    (outcome_dir / RESULTS_MD).write_text(markdown_table(rows) + "\n")


def run_sweep(cfg: Config, progress: bool = True) -> SweepOutcome:
    """Prepare and score the data once, then run (or resume) the sweep ``cfg.tune`` describes; write the results
    table and the best config into the experiment directory."""
    import time

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from bfpo_ray.cluster import init_ray
    from bfpo_ray import objectives
    from bfpo_ray.scoring.prepare import prepare
    from bfpo_ray.train.launch import find_datasets, sft_first
    from bfpo_ray.train.tracking import tune_callbacks

    started = time.perf_counter()
    sweep = cfg.tune
    # first: a toy world's model directory exists only after it
    cfg = sft_first(cfg)  # the starting model, trained first when model.sft_first names an SFT stage
    dataset_dir = prepare(cfg, score_reference=objectives.build(cfg.train).needs_reference)
    cfg = cfg.with_absolute_paths()
    datasets = find_datasets(dataset_dir)
    check_sweepable(cfg, datasets)
    max_steps = planned_steps(cfg, datasets)
    from bfpo_ray.storage import local_dir

    storage = local_dir(sweep.storage_path or cfg.run.storage_path)
    if storage is None:  # the results table, best config and trial runs are written with local file calls
        raise ConfigError(f"tune.storage_path / run.storage_path {sweep.storage_path or cfg.run.storage_path!r}: a "
                          f"sweep needs a local (or shared, NFS) directory or a file:// URI, not a remote URI")
    experiment_dir = storage / sweep.name
    init_ray()
    per_trial = trial_resources(cfg)
    max_concurrent = sweep.max_concurrent_trials or concurrent_trials(per_trial, ray.cluster_resources())
    log.info("[sweep] %s: %d steps per trial, %s per trial, up to %d trial(s) at once", experiment_dir, max_steps,
             per_trial, max_concurrent)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, cfg=cfg.model_dump(mode="json"), dataset_dir=str(dataset_dir),
                             runs_dir=str(experiment_dir / TRAIN_RUNS_DIR)),
        {"CPU": DRIVER_CPUS})
    if tune.Tuner.can_restore(str(experiment_dir)):
        log.info("[sweep] resuming %s (finished trials are kept)", experiment_dir)
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        # ASHA stops a trial that reaches max_t at once, which would cut the trial's export after its last
        # report; one step more than any trial runs lets finished trials end by themselves.
        scheduler = ASHAScheduler(time_attr=STEP, max_t=max_steps + 1,
                                  grace_period=sweep.grace_period or cfg.train.eval_every,
                                  reduction_factor=sweep.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space={"alpha": search_domain(sweep.alpha), "tau": search_domain(sweep.tau)},
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                        # Tune ignores max_concurrent_trials beside a search_alg given here
                                        search_alg=BasicVariantGenerator(random_state=sweep.seed,
                                                                         max_concurrent=max_concurrent),
                                        num_samples=sweep.num_samples),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(storage), verbose=1 if progress else 0,
                                      callbacks=tune_callbacks(cfg, experiment_dir)))
    results = tuner.fit()

    rows = trial_rows(results, max_steps, sweep.metric)
    write_results(experiment_dir, rows)
    best = best_row(rows, sweep.metric, sweep.mode)
    best_config = None
    if best is not None and not any(row["status"] == UNFINISHED for row in rows):
        best_cfg = cfg.model_copy(deep=True)
        best_cfg.train.alpha, best_cfg.train.tau = float(best["alpha"]), float(best["tau"])
        best_cfg.run.name = f"{sweep.name}-best"
        best_config = experiment_dir / BEST_CONFIG
        dump_config(best_cfg, best_config)
    return SweepOutcome(experiment_dir, rows, best, best_config, max_steps, time.perf_counter() - started)


def report(outcome: SweepOutcome, metric: str) -> str:
    """What the command prints at the end: the trial table, the best trial, where everything went."""
    lines = ["", f"sweep ended after {outcome.seconds / 60:.1f} min: {len(outcome.rows)} trials, "
                 f"{sum(row['status'] == STOPPED for row in outcome.rows)} stopped early by ASHA, "
                 f"{outcome.max_steps} steps per trial", markdown_table(outcome.rows), ""]
    unfinished = sum(row["status"] == UNFINISHED for row in outcome.rows)
    if unfinished:
        lines.append(f"interrupted: {unfinished} trial(s) unfinished, no best config written; run the same "
                     "command again to resume the sweep")
    elif outcome.best is None:
        lines.append(f"no trial reported {metric}: no best config written")
    else:
        best = outcome.best
        lines += [f"best trial    {best['trial']}: alpha={best['alpha']:.4g} tau={best['tau']:.4g} "
                  f"{metric}={best[metric]:.4g}",
                  f"  checkpoint  {best['checkpoint'] or '(none)'}",
                  f"  config      {outcome.best_config}   (python jobs/bfpo.py --config {outcome.best_config})"]
    lines += [f"  results     {outcome.experiment_dir / RESULTS_MD}, {outcome.experiment_dir / RESULTS_CSV}",
              f"  experiment  {outcome.experiment_dir}   (run the same command again to resume it)"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tune/sweep.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Ray Tune sweep over BFPO's alpha and tau with ASHA early stopping (also: python -m bfpo_ray tune).

The data is prepared and reference-scored once; each trial is one Ray Train run with its own alpha and tau.
The config's tune: section says what to search (tune.alpha, tune.tau: {distribution, low, high} or {grid: [...]}),
how many trials (num_samples), what ASHA compares (metric, mode, grace_period in steps, reduction_factor) and how
many trials run at once (max_concurrent_trials; default: what the cluster's resources hold).
Writes results.csv, results.md and best_config.yaml into <tune.storage_path>/<tune.name>/. With run.report_to
naming mlflow or wandb, each trial is one MLflow / W&B run (Ray Tune's MLflowLoggerCallback, WandbLoggerCallback).
`python -m bfpo_ray config --config sweep` prints every field of the config.
Running the same command again resumes an interrupted sweep (Tuner.restore).""")
    parser.add_argument("--config", default=DEFAULT_SWEEP_CONFIG, metavar="NAME|FILE",
                        help="YAML config file, or a shipped config's name (default: sweep)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted names, e.g. tune.num_samples=4 tune.tau.high=0.1")
    parser.add_argument("--verbose", action="store_true", help="show Ray's, Ray Data's and DeepSpeed's INFO logs")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from bfpo_ray.cluster import configure_output

    configure_output(args.verbose)
    try:
        cfg = load_config(args.config, args.overrides)
        outcome = run_sweep(cfg)
    except (ValueError, FileNotFoundError) as err:  # ConfigError, SourceError and other refused input
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report(outcome, cfg.tune.metric))
    return 0 if outcome.best_config is not None else 1
