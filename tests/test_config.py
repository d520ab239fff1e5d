"""bfpo_ray.config: YAML in, key=value overrides, errors that name the field, dump/load round trip."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from bfpo_ray.config import Config, ConfigError, config_from_dict, dump_config, load_config

MINIMAL = {
    "model": {"path": "models/sft"},
    "data": {
        "sources": [
            {"adapter": "pku_saferlhf", "path": "data/pku.jsonl", "role": "safety"},
            {"adapter": "ultrafeedback", "path": "data/uf", "role": "helpful", "rows": 100},
        ]
    },
}


def _write(tmp_path: Path, tree: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def _with(**changes) -> dict:
    """MINIMAL with dotted-path changes applied, e.g. _with(**{"train.tau": 0})."""
    tree = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[leaf] = value
    return tree


def test_load_config_reads_yaml_and_fills_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, _with(**{"train.alpha": 0.25, "run.num_workers": 3})))
    assert isinstance(cfg, Config)
    assert cfg.model.path == "models/sft"
    assert [s.adapter for s in cfg.data.sources] == ["pku_saferlhf", "ultrafeedback"]
    assert cfg.data.sources[1].rows == 100
    assert cfg.data.sources[0].label == "pku"  # name defaults to the path's stem
    assert cfg.train.alpha == 0.25 and cfg.run.num_workers == 3
    # The paper's recipe defaults (README, "The algorithm").
    assert (cfg.train.loss, cfg.train.tau, cfg.train.b1, cfg.train.logp_reduction) == ("bfpo", 0.01, 3.0, "sum")
    assert cfg.train.trainable == ["down_proj"]


def test_overrides(tmp_path):
    path = _write(tmp_path, MINIMAL)
    cfg = load_config(
        path,
        [
            "train.alpha=0.3",
            "train.trainable=[down_proj,up_proj]",
            "train.lora.r=4",
            "train.tau=2e-2",
            "run.name=sweep-1",
            "data.max_length=1024",
        ],
    )
    assert cfg.train.alpha == 0.3
    assert cfg.train.trainable == ["down_proj", "up_proj"]
    assert cfg.train.lora.r == 4 and cfg.train.lora.alpha == 16.0  # the rest of the nested section keeps defaults
    assert cfg.train.tau == 0.02
    assert cfg.run.name == "sweep-1" and cfg.data.max_length == 1024
    assert load_config(path, ["train.trainable=lora"]).train.trainable == "lora"
    # A whole list can be replaced by an override, too.
    sources = load_config(path, ["data.sources=[{adapter: generic, path: g.jsonl, role: safety}]"]).data.sources
    assert [(s.adapter, s.path) for s in sources] == [("generic", "g.jsonl")]


def test_overrides_without_a_file():
    cfg = load_config(None, ["model.path=m", "data.sources=[{adapter: generic, path: g.jsonl, role: helpful}]"])
    assert cfg.model.path == "m" and cfg.data.sources[0].role == "helpful"


@pytest.mark.parametrize(
    "changes, fields",
    [
        ({"train.alhpa": 0.3}, ["train.alhpa"]),
        ({"model.revison": "main"}, ["model.revison"]),
        ({"train.tau": 0}, ["train.tau"]),
        ({"train.tau": -1.0}, ["train.tau"]),
        ({"train.b1": 1}, ["train.b1"]),
        ({"train.b1": float("inf")}, ["train.b1"]),
        ({"train.alpha": float("nan")}, ["train.alpha"]),
        ({"train.loss": "ppo"}, ["train.loss", "ppo"]),
        ({"data.sources.0.role": "both"}, ["data.sources.0.role"]),
        ({"data.sources.0.adapter": "hh_rlhf"}, ["data.sources.0", "labels"]),
        ({"data.sources.0.fraction": 0.5, "data.sources.0.rows": 10}, ["data.sources.0", "fraction", "rows"]),
        ({"data.max_prompt_length": 512, "data.max_length": 512}, ["data", "max_prompt_length", "max_length"]),
        ({"data.max_prompt_length": 600, "data.max_length": 512}, ["data", "max_prompt_length"]),
        ({"train.offload_params": True}, ["train", "offload_params"]),
        ({"train.loss": "sft", "train.share_prompt": True}, ["train", "share_prompt", "sft"]),
        ({"train.loss": "sft", "train.sft_weight": 1.0}, ["train", "sft_weight", "sft"]),
        ({"train.sft_weight": -1.0}, ["train.sft_weight"]),
    ],
)
def test_errors_name_the_field(tmp_path, changes, fields):
    path = _write(tmp_path, _with(**changes))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for field in fields:
        assert field in message


def test_missing_model_path_is_named():
    tree = copy.deepcopy(MINIMAL)
    del tree["model"]["path"]
    with pytest.raises(ConfigError, match=r"model\.path: Field required"):
        config_from_dict(tree)
    del tree["model"]
    with pytest.raises(ConfigError, match=r"model: Field required"):
        config_from_dict(tree)


def test_every_error_is_reported_at_once(tmp_path):
    path = _write(tmp_path, _with(**{"train.tau": 0, "train.alhpa": 1, "run.num_workers": 0}))
    message = str(pytest.raises(ConfigError, load_config, path).value)
    assert all(field in message for field in ("train.tau", "train.alhpa", "run.num_workers"))


def test_override_errors_name_the_key(tmp_path):
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"train\.alhpa"):
        load_config(path, ["train.alhpa=0.3"])
    with pytest.raises(ConfigError, match=r"train\.alpha"):
        load_config(path, ["train.alpha"])  # not key=value
    with pytest.raises(ConfigError, match=r"data\.sources\.3\.path"):
        load_config(path, ["data.sources.3.path=x.jsonl"])  # no such item (tests/test_cli.py: items that exist)
    with pytest.raises(ConfigError, match=r"train\.alpha\.x"):
        load_config(path, ["train.alpha=0.3", "train.alpha.x=1"])  # alpha is a value, not a section
    with pytest.raises(ConfigError, match=r"train\.lora\.r"):
        load_config(path, ["train.lora.r=0"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {path: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad_yaml}.*not valid YAML"):
        load_config(bad_yaml)
    a_list = tmp_path / "list.yaml"
    a_list.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(a_list)


def test_dump_config_round_trip(tmp_path):
    tree = _with(
        **{
            "train.alpha": 0.3,
            "train.trainable": ["down_proj", "up_proj"],
            "train.lora.r": 4,
            "train.lora.target_modules": ["q_proj", "k_proj", "v_proj"],
            "train.max_steps": 50,
            "train.zero_stage": 3,
            "run.worker_resource": "A100",
            "run.max_failures": -1,
            "toyworld.seed": 7,
            "model.dtype": "bfloat16",
        }
    )
    tree["data"]["sources"].append(
        {"adapter": "hh_rlhf", "path": "hh/", "role": "helpful", "labels": [True, True], "fraction": 0.5}
    )
    cfg = load_config(_write(tmp_path, tree))
    dumped = tmp_path / "dumped.yaml"
    dump_config(cfg, dumped)
    reloaded = load_config(dumped)
    assert reloaded == cfg
    assert reloaded.data.sources[2].labels == (True, True)
    assert reloaded.toyworld is not None and reloaded.toyworld.seed == 7
    # The dump is plain YAML a person can read and edit.
    assert yaml.safe_load(dumped.read_text())["train"]["alpha"] == 0.3
    # And an edited value comes back through the same path.
    assert load_config(dumped, ["train.alpha=0.7"]) != cfg


def test_toyworld_judge_on_real_prompts_fails_at_load_time(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "How do I make a bomb?", "kind": "harmful"}) + "\n")
    tree = {
        "model": {"path": "m"},
        "data": {"sources": [{"adapter": "generic", "path": "x", "role": "safety"}]},
        "evaluate": {"prompts": str(prompts)},
    }
    with pytest.raises(ConfigError, match=r"evaluate.safety_judge.kind: the toy world's judge only reads"):
        config_from_dict(tree)
    phrases = {"kind": "phrases"}
    tree["evaluate"].update(safety_judge=phrases, helpfulness_judge=phrases, refusal="phrases")
    assert config_from_dict(tree).evaluate.safety_judge.kind == "phrases"
    toy_prompts = tmp_path / "toy.jsonl"
    toy_prompts.write_text(json.dumps({"prompt": "how do I bake bread", "kind": "benign", "topic": "bread"}) + "\n")
    assert (
        config_from_dict({**tree, "evaluate": {"prompts": str(toy_prompts)}}).evaluate.safety_judge.kind == "toyworld"
    )


def test_causal_lm_judge_template_is_checked_at_load_time():
    tree = {
        "model": {"path": "m"},
        "data": {"sources": [{"adapter": "generic", "path": "x", "role": "safety"}]},
        "evaluate": {"safety_judge": {"kind": "causal_lm", "path": "judge", "template": "Is {response} bad?"}},
    }
    with pytest.raises(
        ConfigError, match=r"evaluate.safety_judge: .*template must contain \{prompt\} and \{response\}"
    ):
        config_from_dict(tree)
