"""Connecting to Ray (the cluster in RAY_ADDRESS when there is one, else a local one sized for Ray Data + Train),
and what the user sees of it.

By default a command prints the project's own lines (the prepare summary, progress lines with an ETA, the final
tables and paths) and the warnings and errors of every library; the rest stays in log files: Ray's loggers at
WARNING (``ray.LoggingConfig``), Ray Data's (RAY_DATA_LOG_LEVEL) too; in every Ray worker (``quiet_worker``, run
by the job's ``worker_process_setup_hook`` and at the top of each Ray Train worker) the console shows WARNING and
above only, so Ray Train's INFO lines (its reports, the lines DeepSpeed prints) stay in Ray Train's log files
(``/tmp/ray/session_latest/logs/train``), and library deprecation warnings (FutureWarning, DeprecationWarning) are
logged at INFO, not printed; no weight-loading progress bars. ``--verbose`` (``BFPO_VERBOSE=1``) shows all of it.

A job submitted with ``ray job submit --working-dir`` runs in Ray's temporary copy of that directory; its relative
output paths (``job_output_overrides``) go under ``~/ray_results/bfpo-ray`` instead, so they outlive the job.
"""

from __future__ import annotations

import builtins
import importlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import ray

log = logging.getLogger(__name__)

VERBOSE_ENV = "BFPO_VERBOSE"  # forwarded to the train workers with every BFPO_* variable
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint of a job
JOB_OUTPUT_ROOT = Path("~/ray_results/bfpo-ray")  # a submitted job's relative outputs (Ray Train's default root)
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # "Loading weights" bars, in every worker of a quiet job
LIBRARY_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
PROGRESS_EVERY_S = 15.0


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def configure_output(verbose_output: bool) -> None:
    """Set the driver's logging for a command: everything at INFO with ``verbose_output``, otherwise the
    project's INFO lines (``project_logging``) and the WARNING and ERROR lines of everything else. The environment
    variables reach the workers; in this process, transformers and Ray Data read them when they load, so where
    they are loaded already their switches are set too."""
    os.environ[VERBOSE_ENV] = "1" if verbose_output else "0"
    if verbose_output:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # Ray Data's execution INFO lines, read when it loads
    if "ray.data" in sys.modules:
        logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])
    if "huggingface_hub" in sys.modules:  # "Loading checkpoint shards", "Writing model shards"
        importlib.import_module("huggingface_hub.utils").disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    project_logging()  # other loggers: WARNING and above through logging's last resort, then Ray's handler
    warnings.showwarning = _log_warning


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


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` of a quiet process: a library's deprecation warning is logged at INFO (to the
    process's log files, not the console), any other warning at WARNING."""
    level = logging.INFO if issubclass(category, LIBRARY_WARNINGS) else logging.WARNING
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    logging.getLogger("py.warnings").log(level, text)


class _WarningsAndErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


_PRINT = builtins.print


def _print_to_log(*objects, sep=" ", end="\n", file=None, flush=False) -> None:
    """``print`` in a quiet Ray Train worker: to stdout, a line of the root logger at INFO (Ray Train's own print
    patch also writes it to the console whenever Ray has wrapped sys.stdout, which it always has)."""
    if file not in (None, sys.stdout):
        _PRINT(*objects, sep=sep, end=end, file=file, flush=flush)
        return
    logging.getLogger().info(sep.join(map(str, objects)), stacklevel=2)


def quiet_worker() -> None:
    """In a Ray worker of a quiet job (not ``--verbose``): its console (what Ray forwards to the driver) shows
    this project's lines and WARNING and above; the root logger's file handlers (Ray Train's, in a train worker)
    keep everything; what library code prints in a Ray Train worker (DeepSpeed's "built successfully") is logged
    at INFO; library deprecation warnings are logged at INFO. The job's ``worker_process_setup_hook``; call it
    again at the top of a Ray Train worker's loop, after Ray Train has set its worker's logging and print up."""
    if verbose():
        return
    project_logging()
    warnings.showwarning = _log_warning
    if getattr(builtins.print, "__module__", "").startswith("ray.train."):  # Ray Train's print patch
        builtins.print = _print_to_log
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler) and not getattr(handler, "bfpo_quiet", False):
            if type(handler).__name__ == "SessionFileHandler":  # Ray Train's file handler (not a FileHandler)
                continue
            handler.addFilter(_WarningsAndErrors())
            handler.bfpo_quiet = True


def setup_worker() -> None:
    """Every Ray worker's setup hook (``worker_process_setup_hook``): points RAY_ADDRESS at the worker's own cluster,
    then ``quiet_worker``. Ray's State API clients in workers (Ray Train's placement-group cleaner asks it whether a
    run's controller is alive) otherwise look the cluster up on the machine and fail with "Found multiple active Ray
    instances" when another Ray runs beside this one; the cleaner's thread then dies and the placement group of a
    stopped Tune trial is never removed."""
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    quiet_worker()


def _job_runtime_env() -> dict:
    """The runtime environment Ray's job supervisor gave this entrypoint (empty outside a submitted job)."""
    return json.loads(os.environ.get(JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}


def in_submitted_job() -> bool:
    """Whether this process is the entrypoint of a job submitted with a working directory: it runs in Ray's
    temporary copy of that directory, deleted with the session."""
    return bool(_job_runtime_env().get("working_dir"))


def _worker_runtime_env() -> dict:
    """What every worker of the job gets: ``setup_worker`` as its setup hook (unless the submitted job has its own)
    and, in a quiet job, the quiet environment variables that the job's own runtime environment does not set."""
    job = _job_runtime_env()
    runtime_env = {}
    if not verbose():
        env = {
            name: value
            for name, value in {**QUIET_ENV, VERBOSE_ENV: "0"}.items()
            if name not in (job.get("env_vars") or {})
        }
        runtime_env = {"env_vars": env} if env else {}
    if "worker_process_setup_hook" not in job:
        runtime_env["worker_process_setup_hook"] = f"{__name__}.setup_worker"
    return runtime_env


def init_ray(num_cpus: int | None = None) -> None:
    """Start or join Ray once per process.

    A local cluster gets more logical CPUs than cores (at least 4): Ray Data needs CPUs of its own beside the
    train workers, and with exactly as many logical CPUs as two 1-CPU workers the pipeline starves. It runs the
    dashboard: besides the UI, it serves the State API that Ray Train's placement-group cleaner asks whether a
    run's controller is alive; without it, the workers' placement group of a run that is killed (a Tune trial
    stopped by ASHA) is never removed and its CPUs stay held. Unless verbose, Ray's loggers in every process of
    the job log WARNING and above (``ray.LoggingConfig``), every worker runs ``setup_worker`` first, and Ray Data
    shows no progress bars.
    """
    if ray.is_initialized():
        return
    options = {"runtime_env": _worker_runtime_env()}
    if not verbose():
        options["logging_config"] = ray.LoggingConfig(log_level="WARNING")
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # its warning that they are off
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, **options)
        project_logging()  # ray.init set the root logger to WARNING
        log.info("joined the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return
    num_cpus = num_cpus or max(4, 2 * (os.cpu_count() or 1))
    ray.init(num_cpus=num_cpus, include_dashboard=True, **options)
    project_logging()  # ray.init set the root logger to WARNING
    log.info("started a local Ray cluster with %d logical CPUs", num_cpus)


def job_output_overrides(cfg) -> list[str]:
    """Config overrides that move a submitted job's relative outputs out of Ray's temporary working directory:
    ``run.storage_path``, ``data.cache_dir`` and ``toyworld.dir`` (with the model, tokenizer, source and prompt
    paths inside the toy world's directory) resolve under ``~/ray_results/bfpo-ray``. Absolute paths and URIs stay;
    so do inputs uploaded with the working directory. Empty outside a submitted job."""
    if not in_submitted_job():
        return []
    root = JOB_OUTPUT_ROOT.expanduser()

    def moved(path: str | None) -> str | None:
        if not path or "://" in path or Path(path).expanduser().is_absolute():
            return None
        return str(root / path)

    overrides = {"run.storage_path": moved(cfg.run.storage_path), "data.cache_dir": moved(cfg.data.cache_dir)}
    world = cfg.toyworld.dir if cfg.toyworld is not None else None
    if moved(world):
        overrides["toyworld.dir"] = moved(world)
        inside = {
            "model.path": cfg.model.path,
            "model.tokenizer": cfg.model.tokenizer,
            "evaluate.prompts": cfg.evaluate.prompts,
            **{f"data.sources.{i}.path": source.path for i, source in enumerate(cfg.data.sources)},
        }
        for name, path in inside.items():
            if path and moved(path) and Path(path).is_relative_to(world):
                overrides[name] = moved(path)
    return [f"{name}={value}" for name, value in overrides.items() if value is not None]


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A progress line with an ETA for long work the driver waits on, printed as ``[label] done/total unit``:
    every ``every_s`` seconds while it runs, and once when it is done. The ETA extrapolates the rate since the first
    result (so start-up, such as actors loading a model, does not count). Host-side counting only: ``update(done)``
    is called as results arrive."""

    def __init__(self, label: str, total: int, unit: str, every_s: float = PROGRESS_EVERY_S):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.started = self.printed = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, done) of the first result

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if self.first is None and done:
            self.first = (now, done)
        if done >= self.total:
            log.info("[%s] %d/%d %s in %s", self.label, done, self.total, self.unit, _clock(now - self.started))
        elif now - self.printed >= self.every_s:
            self.printed = now
            first_at, first_done = self.first or (now, done)
            eta = (
                f", eta {_clock((now - first_at) * (self.total - done) / (done - first_done))}"
                if done > first_done
                else ""
            )
            log.info("[%s] %d/%d %s (%d%%)%s", self.label, done, self.total, self.unit, 100 * done // self.total, eta)
