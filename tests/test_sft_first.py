"""model.sft_first: the default job's starting model is an SFT stage run once, then reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ray_heads import small_world_overrides
from safetensors.torch import load_file

from bfpo_ray.config import ConfigError, load_config
from bfpo_ray.pipeline import FINISHED_RECORD, sft_stage
from bfpo_ray.pipeline import start_model as sft_first
from bfpo_ray.train.launch import CONFIG_FILE


def weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.timeout(600)
def test_sft_first_trains_once_then_reuses_its_export_until_its_data_changes(
    ray_cluster, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # relative paths, as in the shipped config: the world does not exist before the run
    runs = tmp_path / "runs"
    cfg = load_config("default", small_world_overrides(Path("runs")))  # a 64-row SFT set
    assert cfg.model.sft_first == "sft"

    started = sft_first(cfg)
    export = runs / "sft-toyworld" / "export"
    assert started.model.path == str(export) and started.model.sft_first is None
    assert "sft_first: training" in capsys.readouterr().out
    trained, init = weights(export), weights(runs / "toyworld" / "init-model")
    assert trained.keys() == init.keys() and any(not trained[k].equal(init[k]) for k in init)
    stage = yaml.safe_load((runs / "sft-toyworld" / CONFIG_FILE).read_text())
    assert stage["train"]["loss"] == "sft" and stage["model"]["path"] == str(runs / "toyworld" / "init-model")
    assert Path(stage["data"]["sources"][0]["path"]).resolve() == runs / "toyworld" / "sft.jsonl"  # cfg's world
    first_record = json.loads((runs / "sft-toyworld" / FINISHED_RECORD).read_text())
    written = (export / "model.safetensors").stat().st_mtime_ns

    assert sft_first(cfg).model.path == str(export)
    assert "reusing" in capsys.readouterr().out
    assert (export / "model.safetensors").stat().st_mtime_ns == written

    changed = load_config("default", [*small_world_overrides(Path("runs")), "toyworld.sft_rows=72"])  # another world
    assert sft_first(changed).model.path == str(export)
    assert "sft_first: training" in capsys.readouterr().out
    assert (
        json.loads((runs / "sft-toyworld" / FINISHED_RECORD).read_text())["inputs"]["data"]
        != first_record["inputs"]["data"]
    )
    assert (export / "model.safetensors").stat().st_mtime_ns != written


def test_sft_first_must_name_an_sft_config(tmp_path):
    cfg = load_config("default", [f"run.storage_path={tmp_path}", "model.sft_first=paper_bfpo"])
    with pytest.raises(ConfigError, match="must name a config with train.loss: sft"):
        sft_first(cfg)


def test_a_job_with_other_workers_gets_an_sft_stage_of_its_own(tmp_path):
    """The stage's weights depend on its workers: a 1-worker or GPU job trains its own stage beside the default
    job's, which stays as the runs that started from it recorded it."""
    runs = [f"run.storage_path={tmp_path}"]
    shared = sft_stage(load_config("default", runs))
    assert shared.run.name == "sft-toyworld" and shared.run.num_workers == 2  # the SFT config's own workers
    one = sft_stage(load_config("default", [*runs, "run.num_workers=1", "run.cpus_per_worker=2"]))
    assert (one.run.name, one.run.num_workers, one.run.cpus_per_worker) == ("sft-toyworld-1w", 1, 2)
    assert sft_stage(load_config("default", [*runs, "run.use_gpu=true"])).run.name == "sft-toyworld-2w-gpu"
    assert one.run.storage_path == shared.run.storage_path == str(tmp_path) and not one.evaluate.after_train
