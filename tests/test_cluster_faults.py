"""The cluster's faults, injected into real runs (Ray Train + DeepSpeed on CPU, checkpoints on the S3-compatible test
server): a lost node, a storage outage, a preemption notice; and no secret in anything a run writes or prints.

- A lost node: a cluster of its own (a head, two worker nodes, each its own raylet; ``tests/cluster_lost_node.py`` in
  a subprocess), one training worker per worker node; the node of rank 1 is removed after checkpoint 2 is committed
  and a replacement node added. The run resumes from checkpoint 2 on the surviving and the new node, reading it back
  from S3; every pair is trained once, and the final weights equal an undisturbed run's.
- A storage outage: the S3 server process is stopped (SIGSTOP) for OUTAGE_S seconds while rank 0 uploads
  checkpoint 4, then continued (SIGCONT). Stopping the process keeps its buckets (moto's server holds them in
  memory: a killed server would come back empty) and looks to a client like an unreachable endpoint, whose requests
  time out. The S3 filesystem retries with backoff (``storage.RetryingS3FileSystem``): the upload completes once the
  server is back and the run goes on, without a restart and without losing or repeating a pair.
- A preemption notice: SIGTERM to the driver of ``python -m bfpo_ray train`` saves a checkpoint at the next step
  boundary; the command prints one line and exits with status 75 within the grace period; the same command resumes
  at the next pair.
- Secrets: keys in the storage URIs and credentials in the environment (W&B, MLflow, AWS) appear in no file of the
  run (the bucket, the local outputs, MLflow and W&B's files, Ray's session logs) and in none of its output.

``BFPO_FAULT_FIGURES=<file>`` appends each fault's figures (injected, pairs lost and repeated, seconds from the
fault to the first step after recovery) to that file as JSON lines (docs/SCALE.md, "Faults").
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.fs as pafs
import pytest
import torch
from test_storage import BUCKET, free_port, listing, server_process
from test_train import (
    assert_each_pair_once_per_pass,
    effective_samples,
    load_state,
    make_config,
    read_split,
    scored_dataset,  # noqa: F401  (scored_dataset: a fixture)
)

from bfpo_ray import storage
from bfpo_ray.data import schema
from bfpo_ray.train import hooks, loop, preemption

STEPS = 5  # one epoch: 40 safety pairs / 2 workers / 4 pairs per micro-step; checkpoints after steps 2, 4 and 5
OUTAGE_S = 20.0
RUN_TIMEOUT = 600  # a safety net for a loaded machine: these runs take a minute or two each on 2 idle cores
FIGURES_ENV = "BFPO_FAULT_FIGURES"


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server process of this module (its pid: the outage test stops and continues it) with one bucket;
    yields ``uri(path, key, secret)``, the filesystem, the pid."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e .[dev])")
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with server_process(argv, f"http://127.0.0.1:{port}/moto-api/", tmp_path_factory.mktemp("moto") / "moto.log"):
        pid = next(child.pid for child in psutil.Process().children() if str(port) in child.cmdline())
        fs = pafs.S3FileSystem(
            access_key="k",
            secret_key="s",
            endpoint_override=f"127.0.0.1:{port}",
            scheme="http",
            allow_bucket_creation=True,
        )
        fs.create_dir(BUCKET)

        def uri(path: str, key: str = "testing", secret: str = "testing-secret") -> str:
            return f"s3://{key}:{secret}@{BUCKET}/{path}?endpoint_override=127.0.0.1:{port}&scheme=http"

        yield uri, fs, pid


def fault_config(model: Path, storage_path: str, name: str, **run):
    """2 workers, ZeRO-2, one epoch of 5 steps, a checkpoint after steps 2, 4 and 5 (tests/cluster_lost_node.py
    trains the same)."""
    cfg = make_config(model, Path(storage_path), name, epochs=1, checkpoint_every=2, log_every=1, num_to_keep=10)
    cfg.run.storage_path = storage_path
    for field, value in run.items():
        setattr(cfg.run, field, value)
    return cfg


@pytest.fixture(scope="module")
def undisturbed(ray_cluster, scored_dataset, tiny_model_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The exported weights of the fault runs' config trained without a fault."""
    from bfpo_ray.train.launch import train

    runs = tmp_path_factory.mktemp("undisturbed")
    result = train(fault_config(tiny_model_dir, str(runs), "undisturbed"), scored_dataset)
    assert result.metrics["train/step"] == STEPS
    return load_state(Path(result.path) / loop.EXPORT_DIR)


def download(fs, path: str, to: Path) -> Path:
    to.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(to), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return to


def assert_same_weights(export: Path, reference: dict[str, torch.Tensor]) -> None:
    state = load_state(export)
    for name in reference:
        torch.testing.assert_close(state[name], reference[name], rtol=0, atol=1e-6, msg=name)


def lost_and_repeated(entries: list[dict], dataset: Path, full_passes: int = 1) -> tuple[int, int]:
    """Pairs the final model missed in its full passes, and pairs it trained more than once in a pass, over both
    roles; asserts both are 0."""
    lost = repeated = 0
    for role in schema.ROLES:
        ids = [row[schema.ID] for row in read_split(dataset, "train", role)]
        by_pass: dict[int, list[str]] = {}
        for entry in entries:
            if entry["role"] == role:
                by_pass.setdefault(entry["pass"], []).extend(entry["ids"])
        lost += sum(len(set(ids) - set(by_pass.get(epoch_pass, []))) for epoch_pass in range(full_passes))
        repeated += sum(len(seen) - len(set(seen)) for seen in by_pass.values())
        assert_each_pair_once_per_pass(entries, role, ids, full_passes=full_passes)
    return lost, repeated


def attempts(sample_dir: Path) -> list[dict]:
    """The attempt records of every worker (hooks.attempt_record), by start step."""
    records = [json.loads(path.read_text()) for path in sample_dir.glob("attempt-rank*.json")]
    return sorted(records, key=lambda record: record["start_step"])


def first_step_after(sample_dir: Path, moment: float, step: int, attempt: str = "") -> float:
    """Seconds from ``moment`` until every rank logged a line of optimizer step ``step`` or later after ``moment``
    (in the attempt files ``rank<r>-<attempt>*`` when given): when the first step after a recovery ran."""
    first: dict[str, float] = {}
    for path in sample_dir.glob(f"rank*-{attempt}*.jsonl"):
        rank = path.name.split("-")[0]
        lines = [json.loads(line) for line in path.open()]
        times = [line["time"] for line in lines if line["step"] >= step and line["time"] > moment]
        if times:
            first[rank] = min(times + [first.get(rank, float("inf"))])
    assert len(first) == 2, f"not every rank trained step {step} after the fault: {first}"
    return max(first.values()) - moment


def figures(fault: str, **values) -> None:
    line = json.dumps({"fault": fault, **values})
    print(f"\n[figures] {line}")
    if os.environ.get(FIGURES_ENV):
        with open(os.environ[FIGURES_ENV], "a") as out:
            out.write(line + "\n")


# --------------------------------------------------------------------------------------------------------------
# Without Ray
# --------------------------------------------------------------------------------------------------------------


def test_redact_removes_uri_keys_secret_query_values_and_secret_environment_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-0123456789")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws/secret+0123")
    uri = "s3://AKIA:se/cr+et@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http&secret_key=SK&token=T"
    assert storage.redact(uri) == (
        "s3://***@bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http&secret_key=***&token=***"
    )
    assert storage.redact("gs://anonymous@b/x") == "gs://anonymous@b/x"  # no secret in "anonymous"
    assert storage.redact("key wandb-0123456789, aws/secret+0123") == "key ***, ***"
    assert storage.redact("/runs/model@v2 s3://bucket/a") == "/runs/model@v2 s3://bucket/a"
    assert storage.redact_tree({"run": {"storage_path": uri, "n": 2}, "l": ["https://u:p@h/x"]}) == {
        "run": {"storage_path": storage.redact(uri), "n": 2},
        "l": ["https://***@h/x"],
    }


def test_the_s3_filesystem_keeps_its_retry_strategy_when_pickled(monkeypatch):
    monkeypatch.setenv(storage.S3_MAX_ATTEMPTS_ENV, "7")
    fs, inner = storage.filesystem("s3://k:s@bucket/runs?endpoint_override=127.0.0.1:9&scheme=http")
    copy = pickle.loads(pickle.dumps(fs))
    assert inner == "bucket/runs" and isinstance(copy, storage.RetryingS3FileSystem) and copy.max_attempts == 7
    assert copy.equals(
        pafs.S3FileSystem(access_key="k", secret_key="s", endpoint_override="127.0.0.1:9", scheme="http")
    )


def test_dump_config_and_tracked_params_hold_no_uri_key(tmp_path):
    from bfpo_ray.config import dump_config, load_config
    from bfpo_ray.train.tracking import tracking_settings

    cfg = make_config(Path("model"), tmp_path, "redacted")
    cfg.run.storage_path = "s3://KEY123:SECRET456@bucket/runs?endpoint_override=h:1"
    dump_config(cfg, tmp_path / "config.yaml")
    written = (tmp_path / "config.yaml").read_text()
    params = json.dumps(tracking_settings(cfg, tmp_path)["params"])
    for text in (written, params):
        assert "SECRET456" not in text and "KEY123" not in text and "s3://***@bucket/runs" in text
    assert load_config(tmp_path / "config.yaml").run.storage_path == "s3://***@bucket/runs?endpoint_override=h:1"


@pytest.mark.parametrize(
    "sigint", [signal.default_int_handler, signal.SIG_IGN], ids=["sigint-handled", "sigint-ignored"]
)
def test_a_sigterm_writes_the_marker_and_the_grace_period_interrupts(tmp_path, request, sigint):
    """PreemptionNotice in the main thread: a SIGTERM writes the marker and, after the grace period, interrupts the
    main thread (as Ctrl-C would, which Ray Train's fit() turns into an abort), also in a process that ignores
    SIGINT (one started in the background); it restores the handlers and removes the marker afterwards, and a stale
    marker before."""
    marker = tmp_path / "run" / preemption.MARKER
    marker.parent.mkdir()
    marker.write_text("stale")
    outer_sigint = signal.signal(signal.SIGINT, sigint)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, outer_sigint))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with preemption.PreemptionNotice(str(marker), grace_s=5.0) as notice:
            assert not marker.exists() and notice.marker == str(marker)
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 4  # within the grace period
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert marker.exists() and notice.received is not None
            while time.monotonic() < deadline + 20:  # the end of the grace period interrupts this
                time.sleep(0.02)
    assert 4.9 < notice.expired < 20  # not before the grace period ends; the upper bound only catches a hang
    assert signal.getsignal(signal.SIGTERM) == before and signal.getsignal(signal.SIGINT) == sigint
    assert not marker.exists()
    line = str(preemption.Preempted("s3://b/run/checkpoint_00000007", 7, "s3://b/run", 3.2, 60))
    assert line == (
        "preempted: saved s3://b/run/checkpoint_00000007 (step 7) 3 s after SIGTERM; run the same "
        "command again to resume at step 8"
    )
    outside = []
    thread = threading.Thread(target=lambda: outside.append(preemption.PreemptionNotice(str(marker), 1.0).marker))
    thread.start()
    thread.join()
    assert outside == [None]  # not the main thread (a Tune trial): no notice, the workers watch nothing


# --------------------------------------------------------------------------------------------------------------
# Real runs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(RUN_TIMEOUT + 300)
def test_a_lost_node_resumes_from_the_last_committed_checkpoint_on_a_replacement_node(
    ray_cluster, s3, scored_dataset, tiny_model_dir, undisturbed, tmp_path
):
    uri, fs, _ = s3
    download_to = tmp_path / "download"
    pafs.copy_files(
        str(scored_dataset),
        f"{BUCKET}/lost-node/data",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
    )
    samples, marker, out = tmp_path / "samples", tmp_path / "paused", tmp_path / "record.json"
    ray_tmp = tempfile.mkdtemp(prefix="bfpo-ln-", dir="/tmp")  # short: Ray's socket paths stay under 108 bytes
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        hooks.SAMPLE_LOG_ENV: str(samples),
        hooks.PAUSE_AT_ENV: f"1:3:{marker}",
    }
    env.pop("RAY_ADDRESS", None)
    script = Path(__file__).with_name("cluster_lost_node.py")
    argv = [
        sys.executable,
        str(script),
        "--model",
        str(tiny_model_dir),
        "--dataset",
        uri("lost-node/data"),
        "--storage",
        uri("lost-node/runs"),
        "--marker",
        str(marker),
        "--out",
        str(out),
    ]
    drill = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = drill.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(drill.pid, signal.SIGKILL)
        output, _ = drill.communicate()
        pytest.fail(f"the lost-node drill did not end in {RUN_TIMEOUT} s:\n{output[-3000:]}")
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    record = json.loads(out.read_text()) if out.exists() else {}
    assert drill.returncode == 0, record.get("error") or output[-3000:]
    assert record["metrics"]["train/step"] == STEPS
    lost_node = record["lost_node"]
    assert lost_node in record["worker_nodes"] and record["replacement_node"] not in record["worker_nodes"]

    runs = attempts(samples)
    assert [run["start_step"] for run in runs] == [0, 0, 2, 2]  # two workers, then both again from checkpoint 2
    survivors = {record["replacement_node"], *record["worker_nodes"]} - {lost_node}
    for run in runs[2:]:  # the second attempt: not on the lost node, checkpoint 2 read back from the bucket
        assert run["node"] in survivors
        assert run["checkpoint"]["filesystem"] == "s3"
        assert run["checkpoint"]["path"] == f"{BUCKET}/lost-node/runs/lost-node/checkpoint_00000002"
    assert {run["node"] for run in runs[2:]} == survivors
    lost, repeated = lost_and_repeated(effective_samples(samples), scored_dataset)
    assert_same_weights(download(fs, f"{BUCKET}/lost-node/runs/lost-node/export", download_to), undisturbed)
    figures(
        "lost node",
        injected=1,
        pairs_lost=lost,
        pairs_repeated=repeated,
        seconds_to_first_step_after=round(first_step_after(samples, record["fault_time"], 2, "from00000002"), 1),
        node_removed_s=round(record["removed_s"], 1),
        replacement_added_s=round(record["replaced_s"], 1),
    )


class Outage:
    """Stops the S3 server process (SIGSTOP) once ``marker`` exists (a worker paused before its upload, by
    BFPO_PAUSE_IN_SAVE) and ``ready()`` is true, lets the worker go on into the outage, and continues the server
    (SIGCONT) after ``seconds``, or earlier on ``end()``."""

    def __init__(self, pid: int, marker: Path, seconds: float, ready=lambda: True):
        self.pid, self.marker, self.seconds, self.ready = pid, marker, seconds, ready
        self.stopped = self.continued = None
        self._end = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline and not self._end.is_set():
            if self.marker.exists() and self.ready():
                break
            time.sleep(0.02)
        if self.marker.exists() and not self._end.is_set():
            os.kill(self.pid, signal.SIGSTOP)
            self.stopped = time.time()
            Path(str(self.marker) + hooks.GO_SUFFIX).write_text("")  # the worker goes on: its upload meets the outage
            self._end.wait(self.seconds)
        self.end()

    def end(self) -> None:
        if self.continued is None:
            os.kill(self.pid, signal.SIGCONT)
            self.continued = time.time() if self.stopped is not None else None
        self._end.set()


@pytest.mark.e2e
@pytest.mark.timeout(RUN_TIMEOUT + 300)
def test_a_storage_outage_while_a_checkpoint_uploads_fails_cleanly_or_is_ridden_out_with_retries(
    ray_cluster, s3, scored_dataset, tiny_model_dir, undisturbed, tmp_path
):
    """The S3 server stops while rank 0 uploads checkpoint 4 (rank 1's part may be written). With one attempt per
    request the upload fails: the run stops with the storage error, and checkpoint 4 is never registered. The same
    call again, with the default retries, resumes from checkpoint 2; the server stops again for OUTAGE_S seconds at
    checkpoint 4, the upload is retried until it is back, and the run goes on to the end: every pair once, the
    weights of an undisturbed run."""
    import ray.train

    from bfpo_ray.train.launch import train

    uri, fs, pid = s3
    samples = tmp_path / "samples"
    cfg = fault_config(tiny_model_dir, uri("outage/runs"), "outage")

    def checkpoint_2_registered() -> bool:
        """Ray Train's controller registers a reported checkpoint on its own schedule, and records it in this
        snapshot (the one a resume reads): with steps of milliseconds that can come after rank 0 reached checkpoint 4,
        and an outage then would hit the record of checkpoint 2, not the upload this test means."""
        try:
            with fs.open_input_stream(f"{BUCKET}/outage/runs/outage/checkpoint_manager_snapshot.json") as snapshot:
                return b"checkpoint_00000002" in snapshot.read()
        except (FileNotFoundError, OSError):
            return False

    with pytest.MonkeyPatch.context() as env:
        env.setenv(hooks.SAMPLE_LOG_ENV, str(samples))
        env.setenv(hooks.PAUSE_IN_SAVE_ENV, f"0:4:{tmp_path / 'first'}")
        env.setenv(storage.S3_MAX_ATTEMPTS_ENV, "1")
        first = Outage(pid, tmp_path / "first", RUN_TIMEOUT, checkpoint_2_registered)
        try:
            with pytest.raises(ray.train.TrainingFailedError) as failure:
                train(cfg, scored_dataset)
        finally:
            first.end()
        env.delenv(storage.S3_MAX_ATTEMPTS_ENV)
        env.setenv(hooks.PAUSE_IN_SAVE_ENV, f"0:4:{tmp_path / 'second'}")
        second = Outage(pid, tmp_path / "second", OUTAGE_S, checkpoint_2_registered)
        try:
            result = train(cfg, scored_dataset)
        finally:
            second.end()
    assert first.stopped is not None and "AWS Error NETWORK_CONNECTION" in str(failure.value), str(failure.value)
    assert second.continued - second.stopped >= OUTAGE_S
    assert result.metrics["train/step"] == STEPS
    # the second call resumed from checkpoint 2 (4 was never registered) and did not restart during its outage
    assert [run["start_step"] for run in attempts(samples)] == [0, 0, 2, 2]
    files = listing(fs, f"{BUCKET}/outage/runs/outage")
    for step in (2, 4, 5):  # each checkpoint whole: both ranks' loop states and DeepSpeed's files
        name = f"checkpoint_{step:08d}"
        assert {f"{name}/loop_state_rank0.pt", f"{name}/loop_state_rank1.pt"} <= set(files), files
        assert any(f.startswith(f"{name}/step_{step:08d}/") and "optim" in f for f in files)
    lost, repeated = lost_and_repeated(effective_samples(samples), scored_dataset)
    assert_same_weights(download(fs, f"{BUCKET}/outage/runs/outage/export", tmp_path / "export"), undisturbed)
    figures(
        "storage outage, retries run out",
        injected=1,
        pairs_lost=lost,
        pairs_repeated=repeated,
        failed_after_s=round(first.continued - first.stopped, 1),
        seconds_to_first_step_after=round(first_step_after(samples, first.stopped, 2, "from00000002"), 1),
    )
    figures(
        "storage outage, ridden out",
        injected=1,
        outage_s=round(second.continued - second.stopped, 1),
        pairs_lost=lost,
        pairs_repeated=repeated,
        seconds_to_first_step_after=round(first_step_after(samples, second.stopped, 4), 1),
    )


# --------------------------------------------------------------------------------------------------------------
# A preemption notice, and the secrets of that job
# --------------------------------------------------------------------------------------------------------------

ENV_SECRETS = ("WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY")
GRACE_S = 60.0  # run.preemption_grace_s's default


@pytest.fixture(scope="module")
def preempted_job(ray_cluster, s3, tmp_path_factory) -> dict:
    """``python -m bfpo_ray train`` (joined to the session's cluster) with keys in its S3 cache and storage URIs and
    credentials in its environment, reporting to TensorBoard, MLflow and W&B (offline); SIGTERM once its workers
    have trained a pair, then the same command again."""
    from secrets import token_hex

    from ray_heads import small_world_overrides

    uri, fs, _ = s3
    root = tmp_path_factory.mktemp("preempt")
    key, secret = f"bfpokey{token_hex(6)}", token_hex(20)
    secrets = {"uri key": key, "uri secret": secret, **{name: token_hex(20) for name in ENV_SECRETS}}
    samples = root / "samples"
    (root / "tmp").mkdir()
    env = {
        **os.environ,
        **{name: secrets[name] for name in ENV_SECRETS},
        "AWS_ACCESS_KEY_ID": "bfpo-test-key-id",
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
        "TMPDIR": str(root / "tmp"),
        "WANDB_MODE": "offline",
        hooks.SAMPLE_LOG_ENV: str(samples),
    }
    overrides = [
        *small_world_overrides(root / "local"),
        "model.sft_first=null",
        "run.name=preempted",
        f"data.cache_dir={uri('secret/cache', key, secret)}",
        f"run.storage_path={uri('secret/runs', key, secret)}",
        "run.report_to=[tensorboard,mlflow,wandb]",
        "train.micro_batch_pairs=2",
        "train.epochs=1",
        "train.checkpoint_every=1000",
        "train.eval_every=1000",
        "train.log_every=1",
        "evaluate.after_train=false",
    ]
    command = [sys.executable, "-m", "bfpo_ray", "train", *overrides]
    with (root / "first.out").open("w") as out:
        first = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not any(path.stat().st_size for path in samples.glob("rank0-*.jsonl")):
            assert first.poll() is None, (root / "first.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "the job trained no pair"
            time.sleep(0.05)
        sigterm = time.time()
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=GRACE_S + 60)
        exited = time.time()
    finally:
        if first.poll() is None:
            first.kill()
    second = subprocess.run(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=RUN_TIMEOUT
    )
    return {
        "root": root,
        "fs": fs,
        "secrets": secrets,
        "samples": samples,
        "sigterm": sigterm,
        "exited": exited,
        "first": (first.returncode, (root / "first.out").read_text()),
        "second": (second.returncode, second.stdout),
        "session_dir": Path(ray_cluster._private.worker._global_node.get_session_dir_path()),
    }


@pytest.mark.e2e
@pytest.mark.timeout(2 * RUN_TIMEOUT + 300)
def test_sigterm_saves_at_a_step_boundary_exits_75_within_the_grace_and_the_same_command_resumes(preempted_job):
    job, fs = preempted_job, preempted_job["fs"]
    code, output = job["first"]
    assert code == preemption.EXIT_PREEMPTED, output[-3000:]
    assert job["exited"] - job["sigterm"] < GRACE_S
    lines = [line for line in output.splitlines() if line.startswith("preempted:")]
    assert len(lines) == 1, output[-3000:]
    step = int(lines[0].split("(step ")[1].split(")")[0])
    checkpoint = f"s3://***@{BUCKET}/secret/runs/preempted/checkpoint_{step:08d}?endpoint_override="
    assert lines[0].startswith(f"preempted: saved {checkpoint}"), lines[0]
    assert lines[0].endswith(f"run the same command again to resume at step {step + 1}")
    code, output = job["second"]
    assert code == 0, output[-3000:]

    # the first run trained steps 0..step-1 on every rank and stopped at that boundary; the second began at step
    logged = {}
    for path in job["samples"].glob("rank*.jsonl"):
        rank, start = path.stem.split("-")[:2]
        logged.setdefault(start, {})[rank] = [json.loads(line)["step"] for line in path.open()]
    assert sorted(logged) == ["from00000000", f"from{step:08d}"]
    assert {rank: max(steps) for rank, steps in logged["from00000000"].items()} == {
        "rank0": step - 1,
        "rank1": step - 1,
    }
    assert {rank: min(steps) for rank, steps in logged[f"from{step:08d}"].items()} == {"rank0": step, "rank1": step}
    run_files = listing(fs, f"{BUCKET}/secret/runs/preempted")
    checkpoints = sorted({f.split("/")[0] for f in run_files if f.startswith("checkpoint_") and "/" in f})
    total = max(max(steps) for steps in logged[f"from{step:08d}"].values()) + 1
    assert checkpoints == [f"checkpoint_{step:08d}", f"checkpoint_{total:08d}"]  # the notice's and the last one
    assert preemption.MARKER not in run_files and "export/model.safetensors" in run_files

    cache = [f for f in listing(fs, f"{BUCKET}/secret/cache") if f.endswith(schema.MANIFEST)]
    dataset = download(fs, f"{BUCKET}/secret/cache/{cache[0].rsplit('/', 1)[0]}", job["root"] / "dataset")
    lost, repeated = lost_and_repeated(effective_samples(job["samples"]), dataset, full_passes=1)
    figures(
        "preemption (SIGTERM)",
        injected=1,
        pairs_lost=lost,
        pairs_repeated=repeated,
        saved_at_step=step,
        sigterm_to_exit_s=round(job["exited"] - job["sigterm"], 1),
        seconds_to_first_step_after=round(first_step_after(job["samples"], job["sigterm"], step), 1),
    )


def readable_files(root: Path):
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                yield str(path), path.read_bytes()
            except OSError:
                continue


@pytest.mark.e2e
@pytest.mark.timeout(2 * RUN_TIMEOUT + 300)
def test_no_secret_of_a_uri_or_the_environment_in_any_file_or_output_of_the_run(preempted_job):
    """Everything the two runs of ``preempted_job`` wrote or printed: both outputs, every object in the bucket (the
    scored data, config.yaml, checkpoints, finished.json), every local file (the toy world, the sample logs, the
    tracking directory with TensorBoard, MLflow's params and W&B's config) and every file of Ray's session (its
    logs, the runtime environments of the workers)."""
    job, fs = preempted_job, preempted_job["fs"]
    places = [("first run's output", job["first"][1].encode()), ("second run's output", job["second"][1].encode())]
    for path in listing(fs, f"{BUCKET}/secret"):
        with fs.open_input_stream(f"{BUCKET}/secret/{path}") as handle:
            places.append((f"s3://{BUCKET}/secret/{path}", handle.read()))
    places += list(readable_files(job["root"])) + list(readable_files(job["session_dir"]))
    tracking = job["root"] / "tmp" / "bfpo-tracking" / "preempted"
    params = {path.name: path.read_text() for path in tracking.glob("mlruns/*/*/params/run/*")}  # run/<field>
    assert "s3://***@" in params["storage_path"]  # the parameter is there, its key redacted
    assert any(b"s3://***@" in data for name, data in places if name.endswith(".wandb"))  # W&B's offline run record
    config = fs.open_input_stream(f"{BUCKET}/secret/runs/preempted/config.yaml").read().decode()
    assert f"storage_path: s3://***@{BUCKET}/secret/runs?" in config
    leaks = sorted(
        {
            f"{label} in {name}"
            for name, data in places
            for label, secret in job["secrets"].items()
            if secret.encode() in data
        }
    )
    assert not leaks, "\n".join(leaks)
