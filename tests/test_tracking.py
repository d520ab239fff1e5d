"""Experiment tracking for real, offline: a tiny 2-worker run with ``run.report_to: [tensorboard, mlflow, wandb]``
(MLflow: a local file store; W&B: offline mode); what each tracker holds is read back with its own reader (MLflow's
client, the W&B run's .wandb file, TensorBoard's event reader) and compared with what the run reported."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from test_train import make_config, scored_dataset  # noqa: F401  (scored_dataset: a fixture)

from bfpo_ray.train import tracking

RUN_TIMEOUT = 600
STEPS = 4
EVALUATION = {
    "eval/harmless_rate": 0.75,
    "eval/helpful_rate": 0.5,
    "eval/over_refusal": 0.25,
    "eval/greedy/harmless_rate": 1.0,
    "eval/start/harmless_rate": 0.5,
}


@pytest.fixture(scope="module")
def tracked_run(ray_cluster, scored_dataset, tiny_model_dir, tmp_path_factory):  # noqa: F811
    """4 steps, train/* every 2 steps, eval/* at steps 2 and 4, to TensorBoard, MLflow and W&B (offline)."""
    from bfpo_ray.train.launch import train

    cfg = make_config(
        tiny_model_dir,
        tmp_path_factory.mktemp("runs"),
        "tracked",
        max_steps=STEPS,
        log_every=2,
        eval_every=2,
        checkpoint_every=STEPS,
    )
    cfg.run.report_to = ["tensorboard", "mlflow", "wandb"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = train(cfg, scored_dataset)
    return cfg, result


def expected_steps(name: str, steps: list[int]) -> bool:
    """Whether a metric's logged steps are right: every report (steps 2 and 4), except a per-label-case margin
    (train/margin_<case>), reported only where its log window had pairs of that case, but always at the last."""
    if name.startswith("train/margin_") and name != "train/margin":
        return steps[-1:] == [4] and set(steps) <= {2, 4} and steps == sorted(set(steps))
    return steps == [2, 4]


def reported(result) -> dict[str, float]:
    """The train/* and eval/* metrics of the run's last report (at step 4)."""
    names = {name: value for name, value in result.metrics.items() if name.startswith(("train/", "eval/"))}
    assert {"train/loss", "train/lr", "eval/loss", "eval/score", "eval/safety_acc"} <= set(names)
    return names


@pytest.mark.timeout(RUN_TIMEOUT)
def test_mlflow_holds_the_reported_metrics_and_the_config(tracked_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    cfg, result = tracked_run
    run_dir = Path(result.path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((run_dir / tracking.MLFLOW_DIR).as_uri())
    experiment = client.get_experiment_by_name(cfg.run.name)
    (run,) = client.search_runs([experiment.experiment_id])
    last = reported(result)
    assert set(last) <= set(run.data.metrics) and not set(run.data.metrics) - set(last) - set(EVALUATION)
    for name, value in last.items():
        assert run.data.metrics[name] == pytest.approx(value, rel=1e-12, abs=0), name
        history = client.get_metric_history(run.info.run_id, name)
        assert expected_steps(name, sorted(point.step for point in history)), name
    assert run.data.params["train/alpha"] == str(cfg.train.alpha)
    assert run.data.params["run/report_to"] == str(["tensorboard", "mlflow", "wandb"])
    assert run.data.params["model/path"] == str(cfg.model.path)


def wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: a LevelDB-style log (a 7-byte ':W&B' header, then 32 KiB blocks of records,
    each with a 7-byte header: checksum, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    data, block, position, records, pending = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # the rest of a block too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


@pytest.mark.timeout(RUN_TIMEOUT)
def test_wandb_offline_run_holds_the_reported_metrics_and_the_config(tracked_run):
    from wandb.proto import wandb_internal_pb2

    cfg, result = tracked_run
    run_file = min((Path(result.path) / "wandb").glob("offline-run-*/run-*.wandb"))  # rank 0's, the first
    history, config = {}, {}
    for raw in wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    assert sorted(history) == [2, 4]
    for name, value in reported(result).items():
        assert history[4][name] == pytest.approx(value, rel=1e-12, abs=0), name
    assert not set(history[4]) & set(EVALUATION)  # the evaluation is logged by the driver, into its own records
    assert math.isfinite(history[2]["eval/score"]) and "eval/score" in history[2]
    assert config["train"]["alpha"] == cfg.train.alpha and config["run"]["name"] == "tracked"


@pytest.mark.timeout(RUN_TIMEOUT)
def test_tensorboard_still_holds_the_reported_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, result = tracked_run
    events = EventAccumulator(str(Path(result.path) / tracking.TENSORBOARD_DIR)).Reload()
    for name, value in reported(result).items():
        scalars = events.Scalars(name)
        assert expected_steps(name, [s.step for s in scalars]), name
        assert scalars[-1].value == pytest.approx(value, rel=1e-6), name  # event files hold float32


@pytest.fixture(scope="module")
def logged_evaluation(tracked_run):
    """The after-training evaluation logged by the driver into the run's trackers: metrics, two files and a table."""
    cfg, result = tracked_run
    run_dir = Path(result.path)
    out = run_dir / "evaluation"
    (out / "start").mkdir(parents=True)
    (out / "generations.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (out / "start" / "metrics.json").write_text('{"metrics": {}}\n')
    files = tracking.evaluation_files(out)
    assert [path.relative_to(out).as_posix() for path in files] == ["generations.jsonl", "start/metrics.json"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.log_evaluation(cfg, run_dir, EVALUATION, files, step=STEPS, table="| model | harmless |")
    return cfg, run_dir


def test_evaluation_metrics_flattens_modes_and_the_start_model():
    flat = tracking.evaluation_metrics(
        {"sampled": {"eval/harmless_rate": 0.75}, "greedy": {"eval/score": 0.5}},
        start={"sampled": {"eval/harmless_rate": 0.5}},
    )
    assert flat == {"eval/harmless_rate": 0.75, "eval/greedy/score": 0.5, "eval/start/harmless_rate": 0.5}


@pytest.mark.timeout(RUN_TIMEOUT)
def test_mlflow_run_of_rank_0_holds_the_evaluation_and_its_files(logged_evaluation, monkeypatch):
    from mlflow.tracking import MlflowClient

    cfg, run_dir = logged_evaluation
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((run_dir / tracking.MLFLOW_DIR).as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.run.name).experiment_id])  # resumed, not new
    for name, value in EVALUATION.items():
        (point,) = client.get_metric_history(run.info.run_id, name)
        assert (point.value, point.step) == (value, STEPS), name
    assert "train/loss" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/generations.jsonl", "evaluation/table.md", "evaluation/start"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "evaluation/start")] == [
        "evaluation/start/metrics.json"
    ]
    local = Path(client.download_artifacts(run.info.run_id, "evaluation/generations.jsonl", str(run_dir / "dl")))
    assert local.read_text() == (run_dir / "evaluation" / "generations.jsonl").read_text()


@pytest.mark.timeout(RUN_TIMEOUT)
def test_wandb_offline_resumes_rank_0s_run_with_the_evaluation_and_its_files(logged_evaluation):
    from wandb.proto import wandb_internal_pb2

    _, run_dir = logged_evaluation
    first, *later = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(later) == 1
    ids = set()
    history, artifacts = {}, []
    for run_file in (first, later[0]):
        for raw in wandb_records(run_file):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history" and run_file == later[0]:
                history.update(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
            elif kind == "artifact":
                artifacts.append(record.artifact)
    assert len(ids) == 1  # the same W&B run, resumed
    assert history["_step"] == STEPS and all(history[name] == value for name, value in EVALUATION.items())
    (artifact,) = artifacts
    assert artifact.type == "evaluation"
    assert {entry.path for entry in artifact.manifest.contents} == {
        "evaluation/generations.jsonl",
        "evaluation/start/metrics.json",
        "evaluation/table.md",
    }


@pytest.mark.timeout(RUN_TIMEOUT)
def test_tensorboard_holds_the_evaluation_and_its_table(logged_evaluation):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = logged_evaluation
    events = EventAccumulator(str(run_dir / tracking.TENSORBOARD_DIR), size_guidance={"tensors": 0}).Reload()
    for name, value in EVALUATION.items():
        (scalar,) = events.Scalars(name)
        assert (scalar.step, scalar.value) == (STEPS, pytest.approx(value)), name
    assert "evaluation/text_summary" in events.Tags()["tensors"]
