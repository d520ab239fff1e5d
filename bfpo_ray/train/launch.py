"""Start a distributed BFPO run: a Ray Train TorchTrainer whose workers run ``loop.train_loop_per_worker``.

    result = train(cfg, dataset_dir)      # dataset_dir: a prepared, scored dataset (bfpo_ray.data.schema layout)

Outputs go to ``<run.storage_path>/<run.name>/``: Ray Train's checkpoints (``checkpoint_<step>``, the newest
``train.num_to_keep`` kept), TensorBoard event files (``tensorboard/``) and the exported model (``export/``).
Running ``train`` again with the same name and storage path resumes from the newest checkpoint; a worker that dies
is restarted from it up to ``run.max_failures`` times. The storage path must be reachable from every node (a
local path on one machine, shared storage such as NFS on a cluster).
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from bfpo_ray import objectives
from bfpo_ray.cluster import init_ray
from bfpo_ray.config import Config
from bfpo_ray.data.rows import required_columns
from bfpo_ray.data.schema import REF_COLUMNS, ROLES, SPLITS, dataset_name, split_dir
from bfpo_ray.train.loop import train_loop_per_worker

FORWARDED_ENV_PREFIXES = ("BFPO_", "DS_")


def find_datasets(dataset_dir: str | Path) -> dict[str, Path]:
    """{"train_safety": dir, ...} for every (split, role) directory of ``dataset_dir`` whose Parquet files hold rows.

    ``prepare`` writes an empty file for a role without pairs (an SFT set has one role only); such a role is absent.
    """
    found = {dataset_name(split, role): split_dir(dataset_dir, split, role)
             for split in SPLITS for role in ROLES}
    return {key: path for key, path in found.items()
            if path.is_dir() and any(pq.read_metadata(file).num_rows for file in path.glob("*.parquet"))}


def has_reference_columns(directories: dict[str, Path], needs_reference: bool) -> bool:
    """Whether every dataset has the reference log-prob columns; an error if it lacks trainer columns, or lacks
    the reference columns and the objective ``needs_reference``."""
    with_ref = True
    for directory in directories.values():
        for file in sorted(directory.glob("*.parquet")):
            names = set(pq.read_schema(file).names)
            missing = [column for column in required_columns(with_ref=False) if column not in names]
            if missing:
                raise ValueError(f"{file}: missing column(s) {missing} that training needs")
            if not set(REF_COLUMNS) <= names:
                if needs_reference:
                    raise ValueError(f"{file}: the objective needs the reference log-prob columns "
                                     f"{list(REF_COLUMNS)}; prepare the dataset with scoring, or use train.loss=sft")
                with_ref = False
    return with_ref


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment for the workers: the driver's BFPO_* and DS_* variables; DeepSpeed's CPU accelerator on CPU."""
    env = {key: value for key, value in os.environ.items() if key.startswith(FORWARDED_ENV_PREFIXES)}
    if not use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def train(cfg: Config, dataset_dir: str | Path, callbacks: list | None = None):
    """Train on a prepared dataset with ``cfg.run.num_workers`` DeepSpeed workers; returns the ray.train.Result
    (``result.metrics`` holds the last reported train/* and eval/* metrics; ``result.path`` is the run directory).
    ``callbacks``: Ray Train callbacks for the run (a Tune trial passes TuneReportCallback)."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray()
    cfg = cfg.with_absolute_paths()
    datasets = find_datasets(dataset_dir)
    if not any(dataset_name("train", role) in datasets for role in ROLES):
        raise ValueError(f"{dataset_dir} holds no training data: expected Parquet files in "
                         f"{split_dir(dataset_dir, 'train', 'safety')} or {split_dir(dataset_dir, 'train', 'helpful')}")
    with_ref = has_reference_columns(datasets, objectives.build(cfg.train).needs_reference)
    # One Ray dataset per (split, role), read once into the object store: every worker iterates over all of it
    # and keeps its own rows, so reading the files in each worker would read them num_workers times.
    named = {name: ray.data.read_parquet(str(path), columns=required_columns(with_ref)).materialize()
             for name, path in datasets.items()}
    for dataset in named.values():
        dataset.context.enable_progress_bars = False  # the dataset's own context (a copy taken when it was made)
    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.worker_resource:
        resources[cfg.run.worker_resource] = 1
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"model": cfg.model.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
                           "use_gpu": cfg.run.use_gpu, "run_dir": str(run_dir), "datasets": sorted(named),
                           "with_ref": with_ref},
        torch_config=TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run.name, storage_path=cfg.run.storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures), callbacks=callbacks,
                             worker_runtime_env={"env_vars": worker_env(cfg.run.use_gpu)}),
        # Every worker sees every row and keeps index % world_size == rank: deterministic, so resumable exactly.
        datasets=named,
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    return trainer.fit()
