"""A model from any checkpoint: ``python -m bfpo_ray export --checkpoint <run>/checkpoint_<step>`` of a mid-run
ZeRO-2 checkpoint gives the policy of that step. The policy at step 2 is made independently by a second run that
stops there (``train.max_steps=2``, constant learning rate, the same seed and data order), whose own end-of-run export
comes from the live DeepSpeed engine; the two models' log-probs of the held-out pairs must be equal, and differ from
the step-4 model's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import make_config, read_split, response_logp, scored_dataset  # noqa: F401  (a fixture)

from bfpo_ray import pipeline
from bfpo_ray.config import LoraSettings, ModelConfig, TrainConfig, load_config
from bfpo_ray.data import schema
from bfpo_ray.train import engine, loop

RUN_TIMEOUT = 600


def logps(model_dir: Path, rows: list[dict]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return torch.tensor(
        [
            [
                response_logp(model, list(row[schema.PROMPT_IDS]), list(row[schema.CHOSEN_IDS])),
                response_logp(model, list(row[schema.PROMPT_IDS]), list(row[schema.REJECTED_IDS])),
            ]
            for row in rows
        ],
        dtype=torch.float64,
    )


@pytest.mark.timeout(RUN_TIMEOUT)
def test_export_of_a_mid_run_checkpoint_gives_the_policy_of_that_step(
    ray_cluster,
    scored_dataset,  # noqa: F811
    tiny_model_dir,
    tmp_path,
):
    from bfpo_ray.train.launch import train

    runs = tmp_path / "runs"
    long = train(make_config(tiny_model_dir, runs, "four-steps", max_steps=4, checkpoint_every=2), scored_dataset)
    short = train(make_config(tiny_model_dir, runs, "two-steps", max_steps=2, checkpoint_every=2), scored_dataset)
    checkpoint = Path(long.path) / "checkpoint_00000002"
    assert (Path(long.path) / "config.yaml").is_file()

    out = subprocess.run(
        [sys.executable, "-m", "bfpo_ray", "export", "--checkpoint", str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    exported = Path(long.path) / "exports" / "checkpoint_00000002"
    assert str(exported) in out.stdout and (exported / "config.json").is_file()

    rows = read_split(scored_dataset, "eval", "safety") + read_split(scored_dataset, "eval", "helpful")
    at_step_2, at_step_4 = (
        logps(Path(short.path) / loop.EXPORT_DIR, rows),
        logps(Path(long.path) / loop.EXPORT_DIR, rows),
    )
    from_checkpoint = logps(exported, rows)
    torch.testing.assert_close(from_checkpoint, at_step_2, rtol=0, atol=1e-4)
    assert (from_checkpoint - at_step_4).abs().max() > 1e-2  # the checkpoint's step, not the run's last
    initial = logps(tiny_model_dir, rows)
    assert (from_checkpoint - initial).abs().max() > 1e-2  # trained parameters came from the checkpoint

    # the same export again reuses the files (an evaluation keyed by their mtimes is reused too); another
    # checkpoint into the same directory is exported anew
    weights = exported / "model.safetensors"
    written = weights.stat().st_mtime_ns
    again = subprocess.run(
        [sys.executable, "-m", "bfpo_ray", "export", "--checkpoint", str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0 and "export: reusing" in again.stdout, again.stdout + again.stderr[-3000:]
    assert weights.stat().st_mtime_ns == written
    cfg = load_config(Path(long.path) / "config.yaml")
    pipeline.export(cfg, Path(long.path) / "checkpoint_00000004", exported)
    torch.testing.assert_close(logps(exported, rows), at_step_4, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "train",
    [TrainConfig(trainable=["down_proj"]), TrainConfig(trainable="lora", lora=LoraSettings(merge_on_export=False))],
    ids=["model", "lora-adapter"],
)
def test_an_export_is_readable_by_everyone_like_any_file_written_under_the_umask(tiny_model_dir, tmp_path, train):
    """The weights (model.safetensors, adapter_model.safetensors) get the mode the config and tokenizer files get:
    0644 under umask 022, not the 0600 of the private temporary file they are written through."""
    from transformers import AutoTokenizer

    model = engine.load_policy(ModelConfig(path=str(tiny_model_dir)), train, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    previous = os.umask(0o022)
    try:
        engine.save_model(model, train, tokenizer, tmp_path / "export")
    finally:
        os.umask(previous)
    modes = {
        path.name: oct(path.stat().st_mode & 0o777) for path in (tmp_path / "export").rglob("*") if path.is_file()
    }
    weights = "adapter_model.safetensors" if train.trainable == "lora" else "model.safetensors"
    assert weights in modes and ("adapter_config.json" if train.trainable == "lora" else "config.json") in modes
    assert modes == dict.fromkeys(modes, "0o644"), modes
