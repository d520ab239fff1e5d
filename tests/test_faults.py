"""Faults injected into real runs (Ray Train + DeepSpeed on CPU): non-finite steps, a checkpoint torn while it is
written. Each test checks what was kept and that nothing was lost: weights, optimizer state, every pair once.

Steps: the hooks (bfpo_ray.train.hooks) take the loop's 0-based step; checkpoints and train/step count steps done.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import (
    RUN_TIMEOUT,
    assert_each_pair_once_per_pass,
    effective_samples,
    make_config,
    read_split,
    scored_dataset,  # noqa: F401  (scored_dataset: a fixture)
)

from bfpo_ray.data import schema
from bfpo_ray.train import hooks

SAFETY_STEPS = 5  # one epoch: 40 safety pairs / 2 workers / 4 pairs per micro-step


def checkpoint_state(run_dir: Path, step: int) -> dict[str, object]:
    """Every file DeepSpeed wrote for ``step`` (model states: trainable weights; optimizer states of each rank),
    loaded, by file name."""
    directory = run_dir / f"checkpoint_{step:08d}" / f"step_{step:08d}"
    files = sorted(directory.glob("*.pt"))
    assert files, f"no DeepSpeed files in {directory}"
    return {path.name: torch.load(path, map_location="cpu", weights_only=False) for path in files}


def tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """The floating-point tensors of a nested checkpoint object, by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree} if tree.is_floating_point() else {}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {}
    found = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


def assert_same_state(run_dir: Path, before: int, after: int) -> None:
    """Weights and every rank's optimizer state after step ``after`` equal those after step ``before``."""
    old, new = tensors(checkpoint_state(run_dir, before)), tensors(checkpoint_state(run_dir, after))
    assert old.keys() == new.keys() and old
    for name in old:
        assert torch.equal(old[name], new[name]), f"{name} changed between steps {before} and {after}"


def assert_finite(run_dir: Path, step: int) -> None:
    for name, tensor in tensors(checkpoint_state(run_dir, step)).items():
        assert torch.isfinite(tensor).all(), f"{name} of checkpoint {step} is not finite"


@pytest.mark.e2e
@pytest.mark.timeout(RUN_TIMEOUT)
def test_a_nan_step_is_skipped_on_every_rank_and_a_resume_still_sees_every_pair_once(
    ray_cluster, scored_dataset, tiny_model_dir, tmp_path
):
    """Rank 1's loss is NaN at step 3 (ZeRO-2, 2 workers): weights and both ranks' optimizer states after it equal
    those before it, the next step trains again, train/skipped_steps is 1. Rank 0 then dies at step 5 and the run
    resumes from checkpoint 4 with the count kept; the sample log holds every pair once, the skipped step's too."""
    from bfpo_ray.train.launch import train

    samples = tmp_path / "samples"
    cfg = make_config(
        tiny_model_dir,
        tmp_path / "runs",
        "nan",
        max_failures=1,
        epochs=1,
        checkpoint_every=1,
        num_to_keep=10,
        log_every=1,
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv(hooks.SAMPLE_LOG_ENV, str(samples))
        env.setenv(hooks.NAN_AT_ENV, "1:2")
        env.setenv(hooks.FAIL_AT_ENV, f"0:4:{tmp_path / 'failed'}")
        result = train(cfg, scored_dataset)
    assert (tmp_path / "failed").exists()
    assert result.metrics["train/step"] == SAFETY_STEPS
    assert result.metrics["train/skipped_steps"] == 1
    run_dir = Path(result.path)
    assert_same_state(run_dir, 2, 3)
    with pytest.raises(AssertionError, match="changed"):
        assert_same_state(run_dir, 3, 4)  # training goes on after the skipped step
    for step in range(1, SAFETY_STEPS + 1):
        assert_finite(run_dir, step)
    starts = sorted(int(path.stem.split("-")[1].removeprefix("from")) for path in samples.glob("rank0-*"))
    assert starts == [0, 4]
    entries = effective_samples(samples)
    safety_ids = [row[schema.ID] for row in read_split(scored_dataset, "train", "safety")]
    assert_each_pair_once_per_pass(entries, "safety", safety_ids, full_passes=1)


@pytest.mark.e2e
@pytest.mark.timeout(RUN_TIMEOUT)
def test_non_finite_steps_in_a_row_stop_the_run_with_finite_checkpoints(
    ray_cluster, scored_dataset, tiny_model_dir, tmp_path
):
    """ZeRO-0 (no DeepSpeed check: the trainer's own all-reduced flag): rank 0's loss is NaN at steps 2, 3 and 4.
    The run stops at the third with an error naming the steps and the pairs; every checkpoint is finite and the
    weights never moved after step 1."""
    import ray.train

    from bfpo_ray.train.launch import train

    cfg = make_config(
        tiny_model_dir,
        tmp_path / "runs",
        "nan3",
        epochs=1,
        checkpoint_every=1,
        num_to_keep=10,
        zero_stage=0,
        max_skipped_steps=3,
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv(hooks.NAN_AT_ENV, "0:1,2,3")
        with pytest.raises(ray.train.TrainingFailedError) as failure:
            train(cfg, scored_dataset)
    message = str(failure.value)
    assert "steps 2-4: 3 optimizer steps in a row had a non-finite loss or gradient" in message
    assert "the weights are those after step 1" in message and "toy:" in message  # the pairs, by id
    run_dir = tmp_path / "runs" / "nan3"
    assert sorted(path.name for path in run_dir.glob("checkpoint_0*")) == [f"checkpoint_{s:08d}" for s in (1, 2, 3)]
    for step in (1, 2, 3):
        assert_finite(run_dir, step)
    assert_same_state(run_dir, 1, 3)


@pytest.mark.e2e
@pytest.mark.timeout(RUN_TIMEOUT)
def test_a_checkpoint_torn_while_written_is_not_the_one_a_resume_picks(
    ray_cluster, scored_dataset, tiny_model_dir, tmp_path
):
    """Rank 1 dies in the middle of writing checkpoint 4 (its DeepSpeed files written, its loop state and report
    not): Ray Train restarts the workers from checkpoint 2, the last complete one, and every pair is trained on
    once."""
    from bfpo_ray.train.launch import train

    samples = tmp_path / "samples"
    cfg = make_config(tiny_model_dir, tmp_path / "runs", "torn", max_failures=1, epochs=1, checkpoint_every=2)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(hooks.SAMPLE_LOG_ENV, str(samples))
        env.setenv(hooks.FAIL_IN_SAVE_ENV, f"1:4:{tmp_path / 'torn'}")
        result = train(cfg, scored_dataset)
    assert (tmp_path / "torn").exists()
    assert result.metrics["train/step"] == SAFETY_STEPS
    starts = sorted(int(path.stem.split("-")[1].removeprefix("from")) for path in samples.glob("rank1-*"))
    assert starts == [0, 2]
    entries = effective_samples(samples)
    safety_ids = [row[schema.ID] for row in read_split(scored_dataset, "train", "safety")]
    assert_each_pair_once_per_pass(entries, "safety", safety_ids, full_passes=1)
    assert_finite(Path(result.path), 4)


# ---------------------------------------------------------------------------------------------------- prepare

PREPARE_TIMEOUT = 600


@pytest.fixture(scope="module")
def prepare_tree(tmp_path_factory, tiny_model_dir) -> dict:
    """Generic pairs, enough of them that scoring and writing last a while: 1500 safety + 1500 helpful."""
    from test_prepare import _write_pairs

    root = tmp_path_factory.mktemp("prepare-faults")
    _write_pairs(root / "safety.jsonl", 1500, seed=1)
    _write_pairs(root / "helpful.jsonl", 1500, seed=2)
    return {
        "model": {"path": str(tiny_model_dir)},
        "data": {
            "sources": [
                {"adapter": "generic", "path": str(root / "safety.jsonl"), "role": "safety"},
                {"adapter": "generic", "path": str(root / "helpful.jsonl"), "role": "helpful"},
            ],
            "eval_fraction": 0.1,
            "max_length": 40,
            "max_prompt_length": 16,
            "score_actors": 2,
            "score_batch_size": 4,
            "cache_dir": str(root / "undisturbed"),
        },
    }


@pytest.fixture(scope="module")
def undisturbed(ray_cluster, prepare_tree) -> Path:
    from bfpo_ray.config import config_from_dict
    from bfpo_ray.prepare.dataset import build as prepare

    return Path(prepare(config_from_dict(prepare_tree)))


def with_cache(tree: dict, cache_dir: Path) -> dict:
    return {**tree, "data": {**tree["data"], "cache_dir": str(cache_dir)}}


def dataset_contents(dataset_dir: Path) -> dict:
    """Every (split, role)'s rows in index order, and the manifest's counts: what two equal runs share."""
    import json

    import pyarrow.parquet as pq

    contents = {"counts": json.loads((dataset_dir / schema.MANIFEST).read_text())["counts"]}
    for split in schema.SPLITS:
        for role in schema.ROLES:
            rows = pq.read_table(schema.split_dir(dataset_dir, split, role)).to_pylist()
            contents[split, role] = sorted(rows, key=lambda row: row[schema.INDEX])
    return contents


def wait_for(condition, what: str, process=None, timeout: float = 300.0) -> None:
    """Poll ``condition`` every 50 ms; fail if ``process`` ends first or ``timeout`` passes."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, f"prepare ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def scoring_actor_pids() -> list[int]:
    """Processes of the reference-scoring actors (Ray names them after the actor class)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"ScoreInOrder" in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def written_parts(cache_dir: Path) -> list[Path]:
    return list(cache_dir.glob(".tmp-*/**/*.parquet"))


@pytest.mark.e2e
@pytest.mark.timeout(PREPARE_TIMEOUT)
def test_a_driver_killed_at_scoring_and_at_writing_leaves_no_finished_dataset_and_a_rerun_equals(
    ray_cluster, prepare_tree, undisturbed, tmp_path
):
    """SIGKILL of the prepare driver (a process of its own, joined to the cluster) once while the scoring actors
    run, once after the first Parquet files are written: neither leaves a directory that a rerun would reuse, and
    the rerun's output equals an undisturbed run's."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from bfpo_ray.config import config_from_dict
    from bfpo_ray.prepare.dataset import build as prepare

    cache = tmp_path / "cache"
    cache.mkdir()
    config = tmp_path / "prepare.yaml"
    config.write_text(yaml.safe_dump(with_cache(prepare_tree, cache)))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    for moment, reached in (
        ("scoring", lambda: bool(scoring_actor_pids())),
        ("writing", lambda: bool(written_parts(cache))),
    ):
        driver = subprocess.Popen(
            [sys.executable, "-m", "bfpo_ray", "prepare", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(reached, moment, driver)
        driver.send_signal(signal.SIGKILL)
        assert driver.wait(timeout=60) == -signal.SIGKILL
        finished = [path for path in cache.iterdir() if (path / schema.MANIFEST).exists()]
        assert not finished, f"killed at {moment}, yet {finished} looks finished"
        assert not [path for path in cache.iterdir() if not path.name.startswith(".tmp-")]
        wait_for(lambda: not scoring_actor_pids(), "the killed driver's actors to go")
    rerun = Path(prepare(config_from_dict(with_cache(prepare_tree, cache))))
    assert rerun.name == undisturbed.name  # the same fingerprint
    assert dataset_contents(rerun) == dataset_contents(undisturbed)
    assert json.loads((rerun / schema.MANIFEST).read_text())["counts"]["kept"] == 3000


@pytest.mark.e2e
@pytest.mark.timeout(PREPARE_TIMEOUT)
def test_a_scoring_actor_killed_mid_stage_is_replaced_and_nothing_is_lost_or_repeated(
    ray_cluster, prepare_tree, undisturbed, tmp_path
):
    """One scoring actor's process is SIGKILLed after the first scored pairs are written: Ray Data restarts it and
    redoes its blocks; the output equals an undisturbed run's (every pair once, counts adding up)."""
    import os
    import signal
    import threading

    from bfpo_ray.config import config_from_dict
    from bfpo_ray.prepare.dataset import build as prepare

    cache = tmp_path / "cache"
    killed: list[int] = []

    def kill_one_actor():
        wait_for(lambda: bool(written_parts(cache)) and bool(scoring_actor_pids()), "the first written pairs")
        victim = scoring_actor_pids()[0]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    result = Path(prepare(config_from_dict(with_cache(prepare_tree, cache))))
    killer.join(timeout=5)
    assert killed, "prepare finished before an actor could be killed: the stage was too short to test"
    assert dataset_contents(result) == dataset_contents(undisturbed)
