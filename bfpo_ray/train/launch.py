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

import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from bfpo_ray import objectives, storage
from bfpo_ray.cluster import init_ray, verbose
from bfpo_ray.config import Config, ConfigError, dump_config
from bfpo_ray.data.rows import dataset_path, parquet_files, required_columns
from bfpo_ray.data.schema import REF_COLUMNS, ROLES, SPLITS, dataset_name
from bfpo_ray.train.loop import train_loop_per_worker
from bfpo_ray.train.tracking import tracking_settings

CONFIG_FILE = "config.yaml"  # the run's resolved config, in the run directory
SFT_FIRST_RECORD = "sft_first.json"  # in a model.sft_first stage's run directory: its config and data, once finished

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
                    raise ValueError(f"{file}: the objective needs the reference log-prob columns "
                                     f"{list(REF_COLUMNS)}; prepare the dataset with scoring, or use train.loss=sft")
                with_ref = False
    return with_ref


def sft_first(cfg: Config) -> Config:
    """``cfg`` starting from the export of its ``model.sft_first`` stage, run here unless a finished run of the same
    resolved config and data exists (recorded in its ``sft_first.json``, written after its export). The stage
    trains from ``model.path``, in ``cfg``'s toy world, storage path, data cache and workers (number, GPUs, CPUs,
    custom resource); the returned config has ``model.path`` set to the export and ``model.sft_first`` cleared, so
    that the run's config.yaml names the model it really started from."""
    if cfg.model.sft_first is None:
        return cfg
    from bfpo_ray.config import load_config
    from bfpo_ray.scoring.prepare import prepare

    if cfg.toyworld is not None:  # first, so that its model path exists and is recorded as an absolute path
        from bfpo_ray.data import toyworld

        toyworld.materialize(cfg.toyworld)

    stage = load_config(cfg.model.sft_first)
    if stage.train.loss != "sft" or stage.model.sft_first is not None:
        raise ConfigError(f"model.sft_first={cfg.model.sft_first!r} must name a config with train.loss: sft and "
                          f"no model.sft_first of its own")
    stage.model = cfg.model.model_copy(update={"sft_first": None})
    if stage.toyworld is not None and cfg.toyworld is not None:  # the stage's sources follow cfg's toy world
        for source in stage.data.sources:
            if Path(source.path).is_relative_to(stage.toyworld.dir):
                source.path = str(Path(cfg.toyworld.dir) / Path(source.path).relative_to(stage.toyworld.dir))
    stage.toyworld = cfg.toyworld
    stage.data.cache_dir, stage.run.storage_path = cfg.data.cache_dir, cfg.run.storage_path
    for name in ("num_workers", "use_gpu", "cpus_per_worker", "worker_resource"):  # the job's workers
        setattr(stage.run, name, getattr(cfg.run, name))
    stage.evaluate.after_train = False
    stage = stage.with_absolute_paths()
    local = storage.local_dir(stage.run.storage_path)
    if local is None:
        raise ConfigError("model.sft_first needs a local run.storage_path (its export is the next stage's model)")
    run_dir = local / stage.run.name
    dataset_dir = prepare(stage, score_reference=False)  # reused when cached; a regenerated world is new data
    record = {"config": stage.model_dump(mode="json"), "dataset": str(dataset_dir)}
    marker = run_dir / SFT_FIRST_RECORD
    if (run_dir / "export" / "config.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == record:
        print(f"sft_first: reusing {run_dir / 'export'} (a finished run of the same config and data)")
    else:
        if run_dir.exists():  # an unfinished or differently configured run: start it over
            shutil.rmtree(run_dir)
        print(f"sft_first: training the starting model with {cfg.model.sft_first} into {run_dir}")
        train(stage, dataset_dir)
        marker.write_text(json.dumps(record, indent=1) + "\n")
    out = cfg.model_copy(deep=True)
    out.model.path, out.model.sft_first = str(run_dir / "export"), None
    return out


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment for the workers: the driver's variables named by FORWARDED_ENV_PREFIXES; DeepSpeed's CPU
    accelerator on CPU."""
    env = {key: value for key, value in os.environ.items() if key.startswith(FORWARDED_ENV_PREFIXES)}
    if not use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def train(cfg: Config, dataset_dir: str | Path, callbacks: list | None = None):
    """Train on a prepared dataset with ``cfg.run.num_workers`` DeepSpeed workers; returns the ray.train.Result
    (``result.metrics`` holds the last reported train/* and eval/* metrics; ``result.path`` is the run directory).
    ``callbacks``: Ray Train callbacks for the run (a Tune trial passes TuneReportCallback)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray()
    cfg = cfg.with_absolute_paths()
    dataset_dir = storage.absolute(dataset_dir)  # the workers run in other directories
    datasets = find_datasets(dataset_dir)
    if not any(dataset_name("train", role) in datasets for role in ROLES):
        raise ValueError(f"{dataset_dir} holds no training data: expected Parquet files in "
                         f"{dataset_path(dataset_dir, 'train_safety')} or {dataset_path(dataset_dir, 'train_helpful')}")
    with_ref = has_reference_columns(datasets, objectives.build(cfg.train).needs_reference)
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.worker_resource:
        resources[cfg.run.worker_resource] = 1
    # storage_path is absolute (with_absolute_paths) or a URI; a local one (file:// too) is given as a plain path
    local_storage = storage.local_dir(cfg.run.storage_path)
    if local_storage is not None:
        storage_path, storage_filesystem = str(local_storage), None
        run_dir = str(local_storage / cfg.run.name)
        tracking_dir = Path(run_dir)
    else:  # Ray Train gets the filesystem the URI names (its endpoint and credentials) and the path inside it
        storage_filesystem, storage_path = storage.filesystem(cfg.run.storage_path)
        run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
        tracking_dir = Path(tempfile.gettempdir()) / TRACKING_DIR / cfg.run.name
    with storage.staged_dir(run_dir) as staging:  # uploaded when the run directory is remote
        dump_config(cfg, staging / CONFIG_FILE)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"model": cfg.model.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
                           "use_gpu": cfg.run.use_gpu, "run_dir": run_dir, "datasets": sorted(datasets),
                           "dataset_dir": str(dataset_dir), "with_ref": with_ref,
                           "tracking": tracking_settings(cfg, tracking_dir)},
        torch_config=TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures), callbacks=callbacks,
                             worker_runtime_env={"env_vars": worker_env(cfg.run.use_gpu)},
                             # Ray Train's INFO lines (reports, checkpoints) stay in its log files unless verbose
                             logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING")),
    )
    return trainer.fit()
