"""Where a run's metrics go (``run.report_to``): TensorBoard event files, MLflow, Weights & Biases.

    settings = tracking_settings(cfg, run_dir)      # on the driver: plain dict, passed to the workers
    tracker = Tracker(settings)                     # rank 0 only
    tracker.log({"train/loss": 0.7, ...}, step=10)
    tracker.close()

MLflow and W&B go through Ray's own integrations (``ray.air.integrations.mlflow.setup_mlflow``,
``ray.air.integrations.wandb.setup_wandb``), which open the run and log the resolved config as its parameters;
TensorBoard through torch's ``SummaryWriter`` into ``<run>/tensorboard``. Tune sweeps use Ray's logger callbacks
instead (``tune_callbacks``), one tracked run per trial.
"""
from __future__ import annotations

import os
from pathlib import Path

from bfpo_ray.config import Config

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"


def tracking_settings(cfg: Config, run_dir: Path) -> dict:
    """``run.report_to`` and its settings with every default resolved (on the driver, where the user's
    environment is): MLflow's URI (``run.mlflow_tracking_uri``, MLFLOW_TRACKING_URI, else a file store in
    ``<run>/mlruns``) and experiment (``run.name``), W&B's project (WANDB_PROJECT, else ``run.name``) and mode
    (WANDB_MODE, else online); ``params`` is the resolved config."""
    run = cfg.run
    return {
        "report_to": list(run.report_to), "run_dir": str(run_dir), "name": run.name,
        "params": cfg.model_dump(mode="json"),
        "mlflow_tracking_uri": (run.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                or (Path(run_dir) / MLFLOW_DIR).resolve().as_uri()),
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
        from bfpo_ray.cluster import project_logging

        project_logging()  # rank 0's progress line, under a quiet job's WARNING root logger
        run_dir, report_to = Path(settings["run_dir"]), settings["report_to"]
        self.tensorboard = self.mlflow = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / TENSORBOARD_DIR))
        if "mlflow" in report_to:
            from ray.air.integrations.mlflow import setup_mlflow

            allow_file_store(settings["mlflow_tracking_uri"])
            self.mlflow = setup_mlflow(settings["params"], tracking_uri=settings["mlflow_tracking_uri"],
                                       experiment_name=settings["mlflow_experiment"], run_name=settings["name"],
                                       create_experiment_if_not_exists=True)
        if "wandb" in report_to:
            from ray.air.integrations.wandb import setup_wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            self.wandb = setup_wandb(settings["params"], project=settings["wandb_project"],
                                     mode=settings["wandb_mode"], name=settings["name"], dir=str(run_dir))

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
        callbacks.append(MLflowLoggerCallback(tracking_uri=settings["mlflow_tracking_uri"],
                                              experiment_name=cfg.run.mlflow_experiment or cfg.tune.name))
    if "wandb" in cfg.run.report_to:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=cfg.run.wandb_project or os.environ.get("WANDB_PROJECT")
                                             or cfg.tune.name, mode=settings["wandb_mode"],
                                             dir=str(experiment_dir)))
    return callbacks
