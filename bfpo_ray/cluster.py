"""Connecting to Ray (the cluster in RAY_ADDRESS when there is one, else a local one sized for Ray Data + Train),
and what the user sees of it.

By default a command prints the project's own lines (the prepare summary, the training progress line, the final
tables and paths) and the warnings and errors of every library; the INFO chatter of Ray, Ray Data, Ray Train and
the weight-loading progress bars stays in Ray's log files (``/tmp/ray/session_latest/logs``): Ray's loggers at
WARNING (``ray.LoggingConfig``), Ray Data's (RAY_DATA_LOG_LEVEL) and Ray Train's (its RunConfig's logging_config,
set in bfpo_ray.train.launch) too. ``--verbose`` (``BFPO_VERBOSE=1``) shows all of it.
"""
from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

VERBOSE_ENV = "BFPO_VERBOSE"  # forwarded to the train workers with every BFPO_* variable


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def configure_output(verbose_output: bool) -> None:
    """Set the driver's logging for a command: everything at INFO with ``verbose_output``, otherwise the
    project's INFO lines (``project_logging``) and the WARNING and ERROR lines of everything else. Called before
    transformers is imported (it reads HF_HUB_DISABLE_PROGRESS_BARS once)."""
    os.environ[VERBOSE_ENV] = "1" if verbose_output else "0"
    if verbose_output:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars, here and in local workers
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # Ray Data's execution INFO lines, read when it loads
    project_logging()  # other loggers: WARNING and above through logging's last resort, then Ray's handler


def project_logging() -> None:
    """This project's loggers (``bfpo_ray.*``) print their INFO lines as plain messages, whatever level the root
    logger has (Ray sets it to WARNING in every process of a quiet job)."""
    project = logging.getLogger("bfpo_ray")
    if verbose() or any(getattr(handler, "bfpo", False) for handler in project.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.bfpo = True
    project.addHandler(handler)
    project.setLevel(logging.INFO)
    project.propagate = False


def init_ray(num_cpus: int | None = None) -> None:
    """Start or join Ray once per process.

    A local cluster gets more logical CPUs than cores (at least 4): Ray Data needs CPUs of its own beside the
    train workers, and with exactly as many logical CPUs as two 1-CPU workers the pipeline starves. It runs the
    dashboard: besides the UI, it serves the State API that Ray Train's placement-group cleaner asks whether a
    run's controller is alive; without it, the workers' placement group of a run that is killed (a Tune trial
    stopped by ASHA) is never removed and its CPUs stay held. Unless verbose, Ray's loggers in every process of
    the job log WARNING and above (``ray.LoggingConfig``), and Ray Data shows no progress bars.
    """
    if ray.is_initialized():
        return
    quiet = {} if verbose() else {"logging_config": ray.LoggingConfig(log_level="WARNING")}
    if not verbose():
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, **quiet)
        project_logging()  # ray.init set the root logger to WARNING
        log.info("joined the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return
    num_cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
    ray.init(num_cpus=num_cpus, include_dashboard=True, **quiet)
    project_logging()  # ray.init set the root logger to WARNING
    log.info("started a local Ray cluster with %d logical CPUs", num_cpus)
