"""Start a distributed BFPO run: a Ray Train TorchTrainer whose workers run ``loop.train_loop_per_worker``.

    result = train(cfg, dataset_dir)      # dataset_dir: a prepared, scored dataset (bfpo_ray.data.schema layout)

Outputs go to ``<run.storage_path>/<run.name>/``: Ray Train's checkpoints (``checkpoint_<step>``, the newest
``train.num_to_keep`` kept), the resolved config (``config.yaml``), the trackers' files (``tensorboard/``; ``mlruns/``
and ``wandb/`` when ``run.report_to`` names them and points there) and the exported model (``export/``).
Running ``train`` again with the same name and storage path resumes from the newest checkpoint; a worker that dies
is restarted from it up to ``run.max_failures`` times. The storage path must be reachable from every node: a
local path on one machine, shared storage such as NFS, or a URI (``s3://``, ``gs://``, ``file://``) that Ray Train
writes through a pyarrow filesystem; the export is written to a local temporary directory and uploaded there. For an
S3-compatible server other than AWS, name it in the URI: ``s3://bucket/runs?endpoint_override=host:port&scheme=http``
(credentials from the nodes' AWS_* variables or the instance profile, or ``s3://key:secret@bucket/...``). With a
remote storage path, TensorBoard's files stay on rank 0's node, in ``<temp dir>/bfpo-tracking/<run.name>``.

Data: each worker reads its own share of every (split, role) straight from the prepared Parquet files
(``bfpo_ray.data.rows.read_share``: a contiguous run of ``index``, decoding only the row groups that overlap it), so
no rows pass through the driver or the object store, and a worker decodes no other worker's rows beyond the rest of
the two row groups at its share's ends.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from bfpo_ray import objectives, storage
from bfpo_ray.cluster import init_ray, verbose
from bfpo_ray.config import Config, dump_config
from bfpo_ray.data.rows import dataset_path, parquet_files, required_columns
from bfpo_ray.data.schema import REF_COLUMNS, ROLES, SPLITS, dataset_name
from bfpo_ray.train.engine import require_cuda_device
from bfpo_ray.train.loop import train_loop_per_worker
from bfpo_ray.train.preemption import MARKER, PREEMPTED, Preempted, PreemptionNotice
from bfpo_ray.train.tracking import tracking_settings

CONFIG_FILE = "config.yaml"  # the run's resolved config, in the run directory

# MLFLOW_/WANDB_: the trackers' credentials; AWS_: S3 storage (pyarrow reads AWS_* credentials and endpoint)
FORWARDED_ENV_PREFIXES = ("BFPO_", "DS_", "MLFLOW_", "WANDB_", "AWS_")
TRACKING_DIR = "bfpo-tracking"  # under the temp dir of rank 0's node: the trackers' files of a remote run directory


def count_rows(directory: str | Path) -> int:
    """Rows in the Parquet files of a directory (a local path or URI), from their footers; 0 if it is missing."""
    fs, files = parquet_files(str(directory), allow_missing=True)
    return sum(pq.read_metadata(file, filesystem=fs).num_rows for file in files)


def find_datasets(dataset_dir: str | Path) -> dict[str, Path | str]:
    """{"train_safety": dir, ...} for every (split, role) directory of ``dataset_dir`` whose Parquet files hold rows:
    Paths for a local directory (or ``file://`` URI), URIs otherwise.

    ``prepare`` writes an empty file for a role without pairs (an SFT set has one role only); such a role is absent.
    """
    local = storage.local_dir(dataset_dir)
    base = str(local) if local is not None else str(dataset_dir)
    found = {}
    for split in SPLITS:
        for role in ROLES:
            name = dataset_name(split, role)
            path = dataset_path(base, name)
            if count_rows(path):
                found[name] = Path(path) if local is not None else path
    return found


def has_reference_columns(directories: dict[str, Path | str], needs_reference: bool) -> bool:
    """Whether every dataset has the reference log-prob columns; an error if it lacks trainer columns, or lacks
    the reference columns and the objective ``needs_reference``."""
    with_ref = True
    for directory in directories.values():
        fs, files = parquet_files(str(directory))
        for file in files:
            names = set(pq.read_schema(file, filesystem=fs).names)
            missing = [column for column in required_columns(with_ref=False) if column not in names]
            if missing:
                raise ValueError(f"{file}: missing column(s) {missing} that training needs")
            if not set(REF_COLUMNS) <= names:
                if needs_reference:
                    raise ValueError(
                        f"{file}: the objective needs the reference log-prob columns "
                        f"{list(REF_COLUMNS)}; prepare the dataset with scoring, or use train.loss=sft"
                    )
                with_ref = False
    return with_ref


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment for the workers: the driver's variables named by FORWARDED_ENV_PREFIXES, and DeepSpeed's
    accelerator set to the run's device ("cuda" with run.use_gpu, else "cpu") over any value the driver, the Ray node
    or the job's runtime_env holds: DeepSpeed follows DS_ACCELERATOR, and its CPU accelerator on a GPU worker puts
    the model on the CPU and broadcasts it through NCCL ("No backend type associated with device type cpu").
    Credentials (``storage.SECRET_ENV``) are not forwarded: Ray's runtime-env agent logs the variables it is given.
    The workers of a local cluster inherit them from the driver's environment; on a cluster, set them on the nodes."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key.startswith(FORWARDED_ENV_PREFIXES) and key not in storage.SECRET_ENV
    }
    env["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    return env


class DeviceCheckedBackend(TorchConfig().backend_cls):
    """Ray Train's torch backend, whose workers of an NCCL run first check that they see a CUDA device
    (``engine.require_cuda_device``): a CPU-only torch would otherwise stop in Ray's process-group set-up with
    "Distributed package doesn't have NCCL built in", before the worker loop and its own check run. A failed check
    shuts the worker group down itself: Ray Train leaves the workers of a group whose start-up callback raised
    alive, holding their CPUs and GPUs, after the run has failed."""

    def on_start(self, worker_group, backend_config):
        if backend_config.backend == "nccl":
            try:
                worker_group.execute(require_cuda_device)
            except Exception:
                worker_group.shutdown()
                raise
        super().on_start(worker_group, backend_config)


class DeviceCheckedTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return DeviceCheckedBackend


def tracking_dir(cfg: Config) -> Path:
    """Where the trackers' files go: the run directory when it is local, else ``<temp dir>/bfpo-tracking/<name>`` on
    rank 0's node."""
    local = storage.local_dir(storage.absolute(cfg.run.storage_path))
    return local / cfg.run.name if local is not None else Path(tempfile.gettempdir()) / TRACKING_DIR / cfg.run.name


def train(cfg: Config, dataset_dir: str | Path, callbacks: list | None = None, validation=None):
    """Train on a prepared dataset with ``cfg.run.num_workers`` DeepSpeed workers; returns the ray.train.Result
    (``result.metrics`` holds the last reported train/* and eval/* metrics; ``result.path`` is the run directory).
    ``callbacks``: Ray Train callbacks for the run (a Tune trial passes TuneReportCallback). ``validation``: a
    callable the workers run at each evaluation (``bfpo_ray.evaluate.validation.GenerativeValidation``).
    A SIGTERM to this process while it trains (in its main thread) makes the workers save a checkpoint at the next
    optimizer step and stop; then ``Preempted`` is raised, naming the checkpoint the same call resumes from
    (``bfpo_ray.train.preemption``)."""
    init_ray()
    cfg = cfg.with_absolute_paths()
    dataset_dir = storage.absolute(dataset_dir)  # the workers run in other directories
    datasets = find_datasets(dataset_dir)
    if not any(dataset_name("train", role) in datasets for role in ROLES):
        raise ValueError(
            f"{dataset_dir} holds no training data: expected Parquet files in "
            f"{dataset_path(dataset_dir, 'train_safety')} or {dataset_path(dataset_dir, 'train_helpful')}"
        )
    with_ref = has_reference_columns(datasets, objectives.build(cfg.train).needs_reference)
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.worker_resource:
        resources[cfg.run.worker_resource] = 1
    # storage_path is absolute (with_absolute_paths) or a URI; a local one (file:// too) is given as a plain path
    local_storage = storage.local_dir(cfg.run.storage_path)
    if local_storage is not None:
        storage_path, storage_filesystem = str(local_storage), None
        run_dir = str(local_storage / cfg.run.name)
    else:  # Ray Train gets the filesystem the URI names (its endpoint and credentials) and the path inside it
        storage_filesystem, storage_path = storage.filesystem(cfg.run.storage_path)
        run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    with storage.staged_dir(run_dir) as staging:  # uploaded when the run directory is remote
        dump_config(cfg, staging / CONFIG_FILE)
    notice = PreemptionNotice(storage.join(run_dir, MARKER), cfg.run.preemption_grace_s)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": cfg.model.model_dump(mode="json"),
            "train": cfg.train.model_dump(mode="json"),
            "use_gpu": cfg.run.use_gpu,
            "run_dir": run_dir,
            "datasets": sorted(datasets),
            "dataset_dir": str(dataset_dir),
            "with_ref": with_ref,
            "tracking": tracking_settings(cfg, tracking_dir(cfg)),
            "validation": validation,
            "preempt_marker": notice.marker,
        },
        torch_config=DeviceCheckedTorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": worker_env(cfg.run.use_gpu)},
            # Ray Train's INFO lines (reports, checkpoints) stay in its log files unless verbose
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )
    with notice:  # a SIGTERM: the workers save at the next step and stop (bfpo_ray.train.preemption)
        try:
            result = trainer.fit()
        except BaseException as err:  # the grace period passed: Ray Train aborted the run (on Ctrl-C as well)
            if notice.expired is None:
                raise
            raise Preempted(None, None, run_dir, notice.seconds, cfg.run.preemption_grace_s) from err
    step = (result.metrics or {}).get(PREEMPTED)
    if notice.received is not None and step is not None and result.checkpoint is not None:
        checkpoint = storage.join(run_dir, Path(result.checkpoint.path).name)
        raise Preempted(checkpoint, int(step), run_dir, notice.seconds, cfg.run.preemption_grace_s)
    return result
