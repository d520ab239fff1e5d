"""The command line as a user meets it: the config command, overrides of list items, one-line user errors with
exit status 2, --help naming the config sections, shipped configs found by name, and a non-editable install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from bfpo_ray import __main__ as cli
from bfpo_ray.config import CONFIG_DIR, Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def bfpo(*args: str, cwd: Path | None = None, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [python, "-m", "bfpo_ray", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_override_of_a_list_item_changes_exactly_that_item():
    base = load_config("default").model_dump(mode="json")
    changed = load_config("default", ["data.sources.1.path=other.jsonl", "data.sources.0.rows=7"]).model_dump(
        mode="json"
    )
    assert changed["data"]["sources"][1]["path"] == "other.jsonl" and changed["data"]["sources"][0]["rows"] == 7
    changed["data"]["sources"][1]["path"] = base["data"]["sources"][1]["path"]
    changed["data"]["sources"][0]["rows"] = None
    assert changed == base


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.sources.2.path=x.jsonl", "data.sources is a list of 2 item(s)"),
        ("data.sources.first.path=x.jsonl", "data.sources is a list of 2 item(s)"),
        ("train.alpha.x=1", "train.alpha is a value"),
        ("train.trainable=[q_proj", "train.trainable: '[q_proj' is not a valid YAML value"),
    ],
)
def test_bad_overrides_are_config_errors_naming_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config("default", [override])


def test_a_bad_override_exits_2_with_one_line_naming_the_key_and_debug_shows_the_traceback():
    out = bfpo("config", "train.trainable=[q_proj")
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: override train.trainable:"), out.stderr
    debug = bfpo("config", "--debug", "train.trainable=[q_proj")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_config_prints_the_resolved_config_that_loads_back_equal(tmp_path):
    out = bfpo("config", "--config", "paper_bfpo", "train.alpha=0.25", "data.sources.0.path=local.jsonl")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    expected = load_config(CONFIG_DIR / "paper_bfpo.yaml", ["train.alpha=0.25", "data.sources.0.path=local.jsonl"])
    assert printed == expected.model_dump(mode="json")
    assert printed["train"]["alpha"] == 0.25 and printed["run"]["report_to"] == ["tensorboard"]
    (tmp_path / "printed.yaml").write_text(out.stdout)
    assert load_config(tmp_path / "printed.yaml") == expected


def test_user_errors_exit_2_with_one_line(tmp_path, tiny_model_dir):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tiny_model_dir)},
                "data": {
                    "sources": [{"adapter": "generic", "path": str(tmp_path / "empty.jsonl"), "role": "safety"}],
                    "max_length": 64,
                    "max_prompt_length": 32,
                    "cache_dir": str(tmp_path / "cache"),
                },
            }
        )
    )
    cases = {
        "empty source": ("prepare", "--config", str(tmp_path / "c.yaml")),
        "missing source file": ("prepare", "--config", str(tmp_path / "c.yaml"), "data.sources.0.path=nope.jsonl"),
        "missing config": ("prepare", "--config", str(tmp_path / "nope.yaml")),
        "unknown field": ("config", "train.alhpa=0.3"),
        "not a model": ("evaluate", "--model", str(tmp_path)),
        "not a checkpoint": ("export", "--checkpoint", str(tmp_path), "--config", str(tmp_path / "c.yaml")),
    }
    with ThreadPoolExecutor(2) as pool:  # each command is a fresh interpreter importing torch: two at a time
        outs = dict(zip(cases, pool.map(lambda args: bfpo(*args, cwd=tmp_path), cases.values())))
    for case, out in outs.items():
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, (case, out.stderr[-2000:])
        assert lines[0].startswith("error: ") and "Traceback" not in out.stderr, (case, out.stderr[-2000:])
        if case != "unknown field":  # a config error lists each bad field on a line of its own
            assert len(lines) == 1, (case, out.stderr)


def test_help_of_every_command_lists_the_config_sections_and_points_at_config():
    assert set(cli.SECTIONS) == set(Config.model_fields)
    for command in ("prepare", "train", "evaluate", "export", "config"):
        out = bfpo(command, "--help")
        assert out.returncode == 0
        assert "python -m bfpo_ray config" in out.stdout
        for section in Config.model_fields:
            assert f"\n  {section} " in out.stdout, (command, section)


def test_shipped_configs_are_found_by_name_and_the_run_config_is_used_for_a_checkpoint(tmp_path):
    assert load_config("paper_bfpo") == load_config(CONFIG_DIR / "paper_bfpo.yaml")
    assert load_config("sweep.yaml") == load_config(CONFIG_DIR / "sweep.yaml")
    with pytest.raises(ConfigError, match="shipped configs: default, paper_bfpo"):
        load_config("paper_bfbo")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint_00000002").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("x: 1")
    args = cli.build_parser().parse_args(["export", "--checkpoint", str(run_dir / "checkpoint_00000002")])
    assert cli.config_path(args) == run_dir / "config.yaml"
    args = cli.build_parser().parse_args(["export", "--checkpoint", str(tmp_path), "--config", "sft"])
    assert cli.config_path(args) == "sft"


def test_report_to_a_library_that_is_not_installed_is_refused_at_load(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"run.report_to: .*wandb is not installed: pip install 'bfpo-ray\[wandb\]'"):
        load_config("default", ["run.report_to=[tensorboard,wandb]"])
    assert load_config("default", ["run.report_to=[mlflow]"]).run.report_to == ["mlflow"]


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_non_editable_install_runs_the_config_command_with_the_shipped_default(tmp_path):
    """pip install --no-deps . into a fresh venv (dependencies from this environment's site-packages), then
    `python -m bfpo_ray config` from another directory: the default config comes from the installed package."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # this environment's packages after the venv's own; a plain path line runs no .pth inside it (no editable hook)
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info/ beside the sources
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"),
    )
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-cache-dir", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    where = subprocess.run(
        [python, "-c", "import bfpo_ray; print(bfpo_ray.__file__)"], capture_output=True, text=True, cwd=tmp_path
    )
    assert where.stdout.strip().startswith(site), where
    out = bfpo("config", cwd=tmp_path, python=python)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == load_config(CONFIG_DIR / "default.yaml").model_dump(mode="json")
    named = bfpo("config", "--config", "paper_sft", cwd=tmp_path, python=python)
    assert yaml.safe_load(named.stdout)["model"]["path"] == json.loads(
        json.dumps(load_config(CONFIG_DIR / "paper_sft.yaml").model.path)
    )
