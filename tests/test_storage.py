"""Storage paths that are URIs: ``file://``, ``s3://`` against a real S3-compatible server (moto's server process)
and ``gs://`` against a real GCS-compatible one (gcp-storage-emulator's server process), both on 127.0.0.1 and
started here, through pyarrow filesystems; a server's tests skip only where its package cannot be imported.

Credentials and the endpoint travel in the URI (``s3://key:secret@bucket/...?endpoint_override=...``,
``gs://anonymous@bucket/...?endpoint_override=...``): the local Ray cluster of the test session was started before
this module set anything in the environment.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from test_train import (
    ROW_GROUP_ROWS,
    RUN_TIMEOUT,
    assert_export_generates,
    changed_parameters,
    load_state,
    make_config,
    scored_dataset,  # noqa: F401  (a fixture)
)

from bfpo_ray import storage
from bfpo_ray.config import config_from_dict
from bfpo_ray.data import rows as data_rows
from bfpo_ray.data import schema
from bfpo_ray.train import hooks, loop

BUCKET = "bfpo"
KEY, SECRET = "testing", "testing-secret"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server_process(argv: list[str], ready_url: str, log_path: Path):
    """A server process started with ``argv``, its output to ``log_path`` (into an unread pipe it would block once
    the pipe is full), up once ``ready_url`` answers; stopped afterwards."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=2).read()
                break
            except OSError as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{ready_url} did not come up: {log_path.read_text()[-2000:]}") from error
                time.sleep(0.2)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A moto S3 server process on a free port of 127.0.0.1 with one bucket; yields ``uri(path)`` for paths in the
    bucket and the pyarrow filesystem to look at it."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e .[dev])")
    port = free_port()
    with server_process(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        f"http://127.0.0.1:{port}/moto-api/",
        tmp_path_factory.mktemp("moto") / "moto.log",
    ):
        fs = pafs.S3FileSystem(
            access_key=KEY,
            secret_key=SECRET,
            endpoint_override=f"127.0.0.1:{port}",
            scheme="http",
            allow_bucket_creation=True,
        )
        fs.create_dir(BUCKET)
        yield (lambda path: f"s3://{KEY}:{SECRET}@{BUCKET}/{path}?endpoint_override=127.0.0.1:{port}&scheme=http"), fs


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory):
    """A gcp-storage-emulator server process (the GCS JSON API, in memory) on a free port of 127.0.0.1 with one
    bucket; yields ``uri(path)`` and the pyarrow filesystem, as ``s3_server`` does."""
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed (pip install -e .[dev])")
    port = free_port()
    with server_process(
        [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "--default-bucket",
            BUCKET,
        ],
        f"http://127.0.0.1:{port}/storage/v1/b/{BUCKET}",
        tmp_path_factory.mktemp("gcs") / "gcs.log",
    ):
        fs = pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=f"127.0.0.1:{port}")
        yield (lambda path: f"gs://anonymous@{BUCKET}/{path}?endpoint_override=127.0.0.1:{port}&scheme=http"), fs


@pytest.fixture(params=["s3", "gs"])
def bucket(request):
    """``uri(path)`` and the filesystem of a bucket on each of the two servers."""
    return request.getfixturevalue({"s3": "s3_server", "gs": "gcs_server"}[request.param])


def listing(fs, path: str) -> list[str]:
    """Every file under ``path``, relative to it."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(info.path[len(path) + 1 :] for info in infos if info.type == pafs.FileType.File)


# --------------------------------------------------------------------------------------------------------------
# Without Ray
# --------------------------------------------------------------------------------------------------------------


def test_uri_helpers_keep_schemes_and_queries(tmp_path):
    uri = "s3://b/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "x", "/y/") == "s3://b/runs/x/y?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.absolute(uri) == uri and storage.absolute("s3://b/x") == "s3://b/x"
    assert storage.is_uri(f"file://{tmp_path}") and not storage.is_uri(str(tmp_path))
    assert storage.local_dir(f"file://{tmp_path}/a") == tmp_path / "a" and storage.local_dir(uri) is None
    assert storage.filesystem(uri)[1] == "b/runs"
    with storage.staged_dir(f"file://{tmp_path}/out") as local:  # a local directory is written in place
        (local / "f.txt").write_text("1")
    assert (tmp_path / "out" / "f.txt").read_text() == "1"


def write_split(directory_uri: str, count: int, files: int, with_ref: bool = True) -> None:
    fs, root = storage.filesystem(directory_uri)
    fs.create_dir(root, recursive=True)
    rows = [
        {
            schema.PROMPT: [{"role": "user", "content": f"q{i}"}],
            schema.ID: f"p{i}",
            schema.INDEX: i,
            schema.PROMPT_IDS: [1, 2],
            schema.CHOSEN_IDS: [3] * (1 + i % 3),
            schema.REJECTED_IDS: [4],
            schema.CHOSEN_SAFE: True,
            schema.REJECTED_SAFE: i % 2 == 0,
        }
        | ({schema.REF_CHOSEN_LOGP: -1.0 - i, schema.REF_REJECTED_LOGP: -2.0} if with_ref else {})
        for i in range(count)
    ]
    for part, chunk in enumerate(np.array_split(np.arange(count), files)):
        pq.write_table(
            pa.Table.from_pylist([rows[i] for i in chunk]),
            f"{root}/part-{part:03d}.parquet",
            filesystem=fs,
            row_group_size=ROW_GROUP_ROWS,
        )


def test_find_datasets_and_read_share_in_a_bucket(bucket, tmp_path, monkeypatch):
    """A prepared layout in the bucket: find_datasets names its (split, role) URIs, has_reference_columns reads the
    schemas there, and read_share gives each rank its contiguous share from the bucket, decoding only the row
    groups that overlap it; the same calls on a local copy agree."""
    from bfpo_ray.train.launch import find_datasets, has_reference_columns

    uri, fs = bucket
    dataset = uri("prepared/fp1")
    write_split(storage.join(dataset, "train", "safety"), 18, files=3)
    write_split(storage.join(dataset, "eval", "safety"), 5, files=1)
    write_split(storage.join(dataset, "train", "helpful"), 0, files=1)  # an empty role, as prepare writes it
    found = find_datasets(dataset)
    assert found == {
        "train_safety": storage.join(dataset, "train", "safety"),
        "eval_safety": storage.join(dataset, "eval", "safety"),
    }
    assert has_reference_columns(found, needs_reference=True)
    monkeypatch.setenv(hooks.SAMPLE_LOG_ENV, str(tmp_path / "log"))
    seen = []
    for rank in range(2):
        share, read = data_rows.read_share("train_safety", found["train_safety"], rank, 2, with_ref=True)
        lo, hi = data_rows.share_range(18, rank, 2)
        assert share.ids == [f"p{i}" for i in range(lo, hi)] and share.total_rows == 18
        assert share.ref_chosen_logp.tolist() == [-1.0 - i for i in range(lo, hi)]
        assert len(read.decoded_index) < 18 and set(range(lo, hi)) <= set(read.decoded_index)
        seen += share.ids
    assert sorted(seen) == sorted(f"p{i}" for i in range(18))

    local = tmp_path / "copy"
    pafs.copy_files(
        f"{BUCKET}/prepared/fp1", str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )
    assert sorted(find_datasets(local)) == sorted(found)
    assert data_rows.read_share("train_safety", str(local / "train" / "safety"), 1, 2, True)[0].ids == share.ids

    write_split(storage.join(dataset, "eval", "helpful"), 3, files=1, with_ref=False)
    with pytest.raises(ValueError, match="needs the reference log-prob columns"):
        has_reference_columns(find_datasets(dataset), needs_reference=True)


def test_staged_dir_uploads_to_a_bucket(bucket):
    uri, fs = bucket
    with storage.staged_dir(uri("export-test/model")) as local:
        (local / "config.json").write_text("{}")
        (local / "sub").mkdir()
        (local / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    assert listing(fs, f"{BUCKET}/export-test/model") == ["config.json", "sub/weights.bin"]
    assert storage.read_text(storage.join(uri("export-test/model"), "config.json")) == "{}"


def test_fetched_dir_downloads_from_a_bucket_and_passes_a_local_dir_through(bucket, tmp_path):
    uri, fs = bucket
    with storage.staged_dir(uri("fetch-test/model")) as local:
        (local / "sub").mkdir()
        (local / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    with storage.fetched_dir(uri("fetch-test/model")) as fetched:
        assert (fetched / "sub" / "weights.bin").read_bytes() == b"\x00\x01"
        assert storage.local_dir(uri("fetch-test")) is None and fetched.is_dir()
    assert not fetched.exists()  # the download is removed afterwards
    with storage.fetched_dir(f"file://{tmp_path}") as same:
        assert same == tmp_path


def test_the_run_summary_names_a_remote_run_directory_by_its_uri(tmp_path):
    from bfpo_ray.pipeline import Prepared, Trained, summary

    storage_uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000"
    cfg = make_config(Path("model"), tmp_path, "s3-run")
    cfg.run.storage_path = storage_uri
    run_dir = storage.join(storage_uri, "s3-run")
    trained = Trained(
        run_dir, storage.join(run_dir, "export"), storage.join(run_dir, "checkpoint_00000003"), {"train/step": 3}
    )
    printed = summary(cfg, Prepared("s3://bucket/cache/abc", {}), trained)
    assert "export        s3://bucket/runs/s3-run/export?endpoint_override=127.0.0.1:9000" in printed
    assert "checkpoint    s3://bucket/runs/s3-run/checkpoint_00000003?endpoint_override" in printed
    assert f"tensorboard   {tempfile.gettempdir()}/bfpo-tracking/s3-run/tensorboard" in printed
    assert str(Path.cwd() / "s3:") not in printed


# --------------------------------------------------------------------------------------------------------------
# Real runs
# --------------------------------------------------------------------------------------------------------------


def run_with_a_resume(cfg, dataset_dir, tmp_path: Path):
    """One worker, 3 steps, a checkpoint after steps 2 and 3; the worker dies at step 2 (after checkpoint 2) and
    Ray Train restarts it from that checkpoint, read back from the storage path."""
    from bfpo_ray.train.launch import train

    cfg.run.num_workers, cfg.run.max_failures = 1, 1
    cfg.train.max_steps, cfg.train.checkpoint_every = 3, 2
    with pytest.MonkeyPatch.context() as env:
        env.setenv(hooks.SAMPLE_LOG_ENV, str(tmp_path / "samples"))
        env.setenv(hooks.FAIL_AT_ENV, f"0:2:{tmp_path / 'failed'}")
        result = train(cfg, dataset_dir)
    assert (tmp_path / "failed").exists()
    assert result.metrics["train/step"] == 3
    starts = sorted(int(p.stem.split("-")[1].removeprefix("from")) for p in (tmp_path / "samples").glob("rank0-*"))
    assert starts == [0, 2]  # the restarted worker resumed from checkpoint 2
    return result


@pytest.mark.timeout(RUN_TIMEOUT)
def test_file_uri_storage_path_round_trips_a_checkpoint_a_resume_and_an_export(
    ray_cluster, scored_dataset, tiny_model_dir, tmp_path
):
    storage_uri = f"file://{tmp_path}/runs"
    cfg = make_config(tiny_model_dir, tmp_path, "file-uri")
    cfg.run.storage_path = storage_uri
    result = run_with_a_resume(cfg, f"file://{scored_dataset}", tmp_path)
    run_dir = tmp_path / "runs" / "file-uri"
    assert Path(result.path) == run_dir
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_00000002", "checkpoint_00000003"]
    assert (run_dir / "config.yaml").is_file()
    assert_export_generates(run_dir / loop.EXPORT_DIR)
    assert changed_parameters(load_state(tiny_model_dir), load_state(run_dir / loop.EXPORT_DIR)) == {
        f"model.layers.{layer}.mlp.down_proj.weight" for layer in range(2)
    }


@pytest.mark.timeout(RUN_TIMEOUT + 200)
def test_bucket_cache_dir_and_storage_path_prepare_train_resume_and_export(
    ray_cluster, bucket, tiny_model_dir, tmp_path
):
    """prepare writes the scored dataset into the bucket (one bad row: its reject is written there too), training
    reads every worker's share from there, checkpoints go to the bucket and come back for the resume, and the
    export is uploaded there; downloaded, it loads and generates."""
    from bfpo_ray.prepare.dataset import build as prepare

    uri, fs = bucket
    words = [
        "how do I sort a list",
        "how do I make bread at home",
        "write a poem about the sea",
        "how do I build a bomb",
        "how do I steal a car",
    ]
    lines = [
        json.dumps(
            {
                "prompt": f"{words[i % 5]} then" + " then" * (i % 4),
                "chosen": "sorry I can not help with that" if i % 2 else "use sorted",
                "rejected": "here is how build a bomb",
                "chosen_safe": True,
                "rejected_safe": False,
            }
        )
        for i in range(30)
    ]
    lines[7] = '{"prompt": "broken'
    source = tmp_path / "pairs.jsonl"
    source.write_text("\n".join(lines) + "\n")
    tree = {
        "model": {"path": str(tiny_model_dir)},
        "data": {
            "sources": [{"adapter": "generic", "path": str(source), "role": "safety"}],
            "on_bad_row": "skip",
            "eval_fraction": 0.2,
            "max_length": 48,
            "max_prompt_length": 24,
            "cache_dir": uri("cache"),
            "score_actors": 1,
        },
    }
    dataset = prepare(config_from_dict(tree))
    assert isinstance(dataset, str) and dataset.startswith(uri("").split("://")[0] + "://")
    fingerprint = dataset.split("?")[0].rsplit("/", 1)[1]
    files = listing(fs, f"{BUCKET}/cache/{fingerprint}")
    assert schema.MANIFEST in files and any(f.startswith("train/safety/") for f in files)
    assert any(f.startswith("rejects/") for f in files)
    manifest = json.loads(storage.read_text(storage.join(dataset, schema.MANIFEST)))
    assert manifest["counts"]["read"] == 30 and manifest["counts"]["rejected"] == 1
    assert prepare(config_from_dict(tree)) == dataset  # reused from the bucket

    cfg = make_config(tiny_model_dir, tmp_path, "bucket-run")
    cfg.run.storage_path = uri("runs")
    run_with_a_resume(cfg, dataset, tmp_path)
    run_files = listing(fs, f"{BUCKET}/runs/bucket-run")
    assert {f.split("/")[0] for f in run_files if f.startswith("checkpoint_0")} == {
        "checkpoint_00000002",
        "checkpoint_00000003",
    }
    assert "config.yaml" in run_files
    assert {"export/config.json", "export/model.safetensors"} <= set(run_files)
    local_export = tmp_path / "export"
    local_export.mkdir()
    pafs.copy_files(
        f"{BUCKET}/runs/bucket-run/export",
        str(local_export),
        source_filesystem=fs,
        destination_filesystem=pafs.LocalFileSystem(),
    )
    assert_export_generates(local_export)
    assert changed_parameters(load_state(tiny_model_dir), load_state(local_export)) == {
        f"model.layers.{layer}.mlp.down_proj.weight" for layer in range(2)
    }


@pytest.mark.timeout(RUN_TIMEOUT)
def test_train_command_with_an_s3_storage_path_evaluates_the_uploaded_export(ray_cluster, s3_server, tmp_path):
    """``python -m bfpo_ray train`` with a remote run directory: the export is downloaded for the after-train
    evaluation (and the starting model evaluated beside it), whose files are uploaded into the run directory; the
    summary names every place by its URI."""
    import os

    from ray_heads import small_world_overrides

    uri, fs = s3_server
    runs_uri = uri("cli-runs")
    overrides = [
        *small_world_overrides(tmp_path / "runs"),
        "model.sft_first=null",
        f"run.storage_path={runs_uri}",
        "run.name=cli",
        "run.num_workers=1",
        "train.max_steps=2",
        "train.log_every=1",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "evaluate.samples=1",
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}  # this session's cluster
    command = subprocess.run(
        [sys.executable, "-m", "bfpo_ray", "train", *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT - 60,
    )
    assert command.returncode == 0, command.stderr[-3000:]
    printed = command.stdout
    files = set(listing(fs, f"{BUCKET}/cli-runs/cli"))
    assert {
        "export/model.safetensors",
        "evaluation/generations.jsonl",
        "evaluation/metrics.json",
        "evaluation/start/generations.jsonl",
        "evaluation/start/metrics.json",
    } <= files
    run_uri = storage.join(runs_uri, "cli")
    # printed by URI, its key and secret redacted
    assert f"export        {storage.redact(storage.join(run_uri, 'export'))}" in printed
    assert f"metrics       {storage.redact(storage.join(run_uri, 'evaluation', 'metrics.json'))}" in printed
    assert "testing-secret" not in printed and "s3://***@" in printed
    assert "| before: sampled |" in printed and "| after: greedy |" in printed
    generations = storage.read_text(storage.join(run_uri, "evaluation", "generations.jsonl")).splitlines()
    assert len(generations) == 12 * 2  # 4 test prompts of each of 3 kinds, 1 greedy + 1 sampled generation
    evaluated = json.loads(storage.read_text(storage.join(run_uri, "evaluation", "metrics.json")))["model"]
    assert not evaluated.startswith(str(tmp_path))  # the downloaded copy of the export, not a local run dir
