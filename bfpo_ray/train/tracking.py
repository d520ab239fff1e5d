"""Where a run's metrics go (``run.report_to``): TensorBoard event files, MLflow, Weights & Biases.

    settings = tracking_settings(cfg, run_dir)      # on the driver: plain dict, passed to the workers
    tracker = Tracker(settings)                     # rank 0 only
    tracker.log({"train/loss": 0.7, ...}, step=10)
    tracker.close()
    log_evaluation(cfg, run_dir, {"eval/harmless_rate": 0.9, ...}, files, step=120, table=report)  # on the driver

MLflow and W&B go through Ray's own integrations (``ray.air.integrations.mlflow.setup_mlflow``,
``ray.air.integrations.wandb.setup_wandb``), which open the run and log the resolved config as its parameters;
TensorBoard through torch's ``SummaryWriter`` into ``<run>/tensorboard``. Tune sweeps use Ray's logger callbacks
instead (``tune_callbacks``), one tracked run per trial. Rank 0 notes the tracked runs' ids in
``<run>/tracking.json``; ``log_evaluation`` adds the after-training evaluation (metrics and files) to those runs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bfpo_ray.cluster import project_logging
from bfpo_ray.config import Config
from bfpo_ray.storage import redact_tree

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
RUN_IDS = "tracking.json"  # in the tracking directory: the MLflow and W&B run ids rank 0 logged to
EVALUATION_ARTIFACTS = "evaluation"  # where files outside the run directory go among a tracked run's artifacts


def tracking_settings(cfg: Config, run_dir: Path) -> dict:
    """``run.report_to`` and its settings with every default resolved (on the driver, where the user's
    environment is): MLflow's URI (``run.mlflow_tracking_uri``, MLFLOW_TRACKING_URI, else a file store in
    ``<run>/mlruns``) and experiment (``run.name``), W&B's project (WANDB_PROJECT, else ``run.name``) and mode
    (WANDB_MODE, else online); ``params`` is the resolved config, credentials redacted (``storage.redact``)."""
    run = cfg.run
    return {
        "report_to": list(run.report_to),
        "run_dir": str(run_dir),
        "name": run.name,
        "params": redact_tree(cfg.model_dump(mode="json")),
        "mlflow_tracking_uri": (
            run.mlflow_tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or (Path(run_dir) / MLFLOW_DIR).resolve().as_uri()
        ),
        "mlflow_experiment": run.mlflow_experiment or run.name,
        "wandb_project": run.wandb_project or os.environ.get("WANDB_PROJECT") or run.name,
        "wandb_mode": run.wandb_mode or os.environ.get("WANDB_MODE") or "online",
    }


def allow_file_store(tracking_uri: str) -> None:
    """MLflow >= 3.7 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set (it keeps file stores in
    maintenance mode); this project's default is one, so it is allowed here for ``file:`` URIs."""
    if tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


class Tracker:
    """Rank 0's metric sinks, opened from ``tracking_settings``: ``log(metrics, step)`` writes to every one."""

    def __init__(self, settings: dict):

        project_logging()  # rank 0's progress line, under a quiet job's WARNING root logger
        run_dir, report_to = Path(settings["run_dir"]), settings["report_to"]
        self.tensorboard = self.mlflow = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / TENSORBOARD_DIR))
        if "mlflow" in report_to:
            from ray.air.integrations.mlflow import setup_mlflow

            allow_file_store(settings["mlflow_tracking_uri"])
            self.mlflow = setup_mlflow(
                settings["params"],
                tracking_uri=settings["mlflow_tracking_uri"],
                experiment_name=settings["mlflow_experiment"],
                run_name=settings["name"],
                create_experiment_if_not_exists=True,
            )
        if "wandb" in report_to:
            from ray.air.integrations.wandb import setup_wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            self.wandb = setup_wandb(
                settings["params"],
                project=settings["wandb_project"],
                mode=settings["wandb_mode"],
                name=settings["name"],
                dir=str(run_dir),
            )
        ids = {
            "mlflow": self.mlflow.active_run().info.run_id if self.mlflow is not None else None,
            "wandb": self.wandb.id if self.wandb is not None else None,
        }
        if any(ids.values()):
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / RUN_IDS).write_text(json.dumps(ids) + "\n")

    def log(self, metrics: dict[str, float], step: int) -> None:
        metrics = {name: float(value) for name, value in metrics.items()}
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb is not None:
            self.wandb.finish()


def tune_callbacks(cfg: Config, experiment_dir: Path) -> list:
    """Ray Tune logger callbacks for ``run.report_to``'s MLflow and W&B: one tracked run per trial, with the
    trial's alpha and tau as parameters (the trials' own Ray Train runs then write TensorBoard only)."""
    settings = tracking_settings(cfg, experiment_dir)
    callbacks = []
    if "mlflow" in cfg.run.report_to:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        allow_file_store(settings["mlflow_tracking_uri"])
        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=settings["mlflow_tracking_uri"],
                experiment_name=cfg.run.mlflow_experiment or cfg.tune.name,
            )
        )
    if "wandb" in cfg.run.report_to:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(
            WandbLoggerCallback(
                project=cfg.run.wandb_project or os.environ.get("WANDB_PROJECT") or cfg.tune.name,
                mode=settings["wandb_mode"],
                dir=str(experiment_dir),
            )
        )
    return callbacks


def evaluation_metrics(
    by_mode: dict[str, dict[str, float]], start: dict[str, dict[str, float]] | None = None
) -> dict[str, float]:
    """Flat tracker names for an evaluation's metrics per generation mode (``EvalResult.metrics``): the sampled
    generations' keep their names (``eval/harmless_rate``, ...), the greedy ones' go under ``eval/greedy/``; the
    starting model's (``start``, with ``evaluate.compare_start``) under ``eval/start/`` the same way."""
    flat = {}
    for prefix, modes in (("eval/", by_mode), ("eval/start/", start or {})):
        for mode, metrics in modes.items():
            mode_prefix = prefix if mode == "sampled" else f"{prefix}{mode}/"
            flat.update({mode_prefix + name.removeprefix("eval/"): float(value) for name, value in metrics.items()})
    return flat


def evaluation_files(out_dir: str | Path) -> list[Path]:
    """The files of an evaluation directory (generations, metrics, the starting model's in ``start/``); none for
    a remote (URI) directory."""
    out = Path(out_dir)
    return sorted(path for path in out.rglob("*") if path.is_file()) if "://" not in str(out_dir) else []


def _artifact_dir(path: Path, run_dir: Path) -> str:
    """Where a file goes among a tracked run's artifacts: its directory relative to the run directory
    (``evaluation``, ``evaluation/start``), else ``evaluation``."""
    try:
        return Path(path).resolve().parent.relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return EVALUATION_ARTIFACTS


def log_evaluation(
    cfg: Config,
    run_dir: str | Path,
    metrics: dict[str, float],
    files: list[Path],
    step: int | None = None,
    table: str | None = None,
) -> None:
    """After training, on the driver: the evaluation's ``metrics`` (``evaluation_metrics``) at ``step`` (the run's
    last), its ``files`` as artifacts and its ``table`` as text, to every tracker of ``run.report_to``, in the runs
    rank 0 logged to (``<run_dir>/tracking.json``; else MLflow's newest run of the run's name, or new runs of that
    name). ``run_dir``: the tracking directory (``bfpo_ray.train.launch.tracking_dir``)."""
    run_dir = Path(run_dir)
    settings = tracking_settings(cfg, run_dir)
    ids_file = run_dir / RUN_IDS
    ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
    step = int(step or 0)
    files = [Path(file) for file in files if Path(file).is_file()]
    if "tensorboard" in cfg.run.report_to:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR))
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)
        if table:
            writer.add_text(EVALUATION_ARTIFACTS, table, step)
        writer.close()
    if "mlflow" in cfg.run.report_to:
        _log_evaluation_mlflow(settings, ids.get("mlflow"), metrics, files, step, table, run_dir)
    if "wandb" in cfg.run.report_to:
        _log_evaluation_wandb(settings, ids.get("wandb"), metrics, files, step, table, run_dir)


def _log_evaluation_mlflow(
    settings: dict,
    run_id: str | None,
    metrics: dict[str, float],
    files: list[Path],
    step: int,
    table: str | None,
    run_dir: Path,
) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    allow_file_store(settings["mlflow_tracking_uri"])
    client = MlflowClient(settings["mlflow_tracking_uri"])
    if run_id is None:
        experiment = client.get_experiment_by_name(settings["mlflow_experiment"])
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(settings["mlflow_experiment"])
        )
        named = client.search_runs(
            [experiment_id],
            f"attributes.run_name = '{settings['name']}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        run_id = (
            named[0].info.run_id if named else client.create_run(experiment_id, run_name=settings["name"]).info.run_id
        )
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(name, value, now, step) for name, value in metrics.items()])
    for path in files:
        client.log_artifact(run_id, str(path), _artifact_dir(path, run_dir))
    if table:
        client.log_text(run_id, table + "\n", f"{EVALUATION_ARTIFACTS}/table.md")


def _log_evaluation_wandb(
    settings: dict,
    run_id: str | None,
    metrics: dict[str, float],
    files: list[Path],
    step: int,
    table: str | None,
    run_dir: Path,
) -> None:
    import wandb

    run = wandb.init(
        project=settings["wandb_project"],
        mode=settings["wandb_mode"],
        name=settings["name"],
        dir=str(run_dir),
        id=run_id,
        resume="allow" if run_id else None,
        reinit="create_new",
    )
    try:
        run.log(metrics, step=step)
        run.summary.update(metrics)
        artifact = wandb.Artifact(f"{settings['name']}-evaluation", type="evaluation")
        for path in files:
            artifact.add_file(str(path), name=f"{_artifact_dir(path, run_dir)}/{path.name}")
        if table:
            with artifact.new_file(f"{EVALUATION_ARTIFACTS}/table.md") as handle:
                handle.write(table + "\n")
        run.log_artifact(artifact)
    finally:
        run.finish()
