"""prepare end to end on a local Ray cluster: reference log-probs, fingerprint reuse, manifest counts, toy world."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import WORDS
from oracles import assign_splits

from bfpo_ray.config import config_from_dict
from bfpo_ray.data import schema
from bfpo_ray.data.sources import BadRowError
from bfpo_ray.data.tokenize import load_tokenizer
from bfpo_ray.prepare import stages
from bfpo_ray.prepare.dataset import build as prepare
from bfpo_ray.prepare.fingerprint import fingerprint, fingerprint_inputs
from bfpo_ray.toyworld.world import materialize

pytestmark = pytest.mark.timeout(300)


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def _write_pairs(path, count: int, seed: int, bad_rows: tuple[str, ...] = ()) -> None:
    rng = random.Random(seed)
    rows = [
        {
            "prompt": _text(rng, 2, 14),
            "chosen": _text(rng, 1, 24),
            "rejected": _text(rng, 1, 24),
            "chosen_safe": rng.random() < 0.5,
            "rejected_safe": rng.random() < 0.5,
        }
        for _ in range(count)
    ]
    lines = [json.dumps(row) for row in rows] + list(bad_rows)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data_cfg_tree(tmp_path_factory, tiny_model_dir) -> dict:
    """A config tree: 18 safety pairs + 1 bad row (line 19, no ``chosen``), 14 helpful pairs, skip mode."""
    root = tmp_path_factory.mktemp("pipeline")
    _write_pairs(root / "safety.jsonl", 18, seed=1, bad_rows=('{"prompt": "how do I", "rejected": "no"}',))
    _write_pairs(root / "helpful.jsonl", 14, seed=2)
    return {
        "model": {"path": str(tiny_model_dir)},
        "data": {
            "sources": [
                {"adapter": "generic", "path": str(root / "safety.jsonl"), "role": "safety"},
                {"adapter": "generic", "path": str(root / "helpful.jsonl"), "role": "helpful"},
            ],
            "on_bad_row": "skip",
            "eval_fraction": 0.25,
            "max_length": 28,
            "max_prompt_length": 12,
            "cache_dir": str(root / "cache"),
            "score_actors": 2,
            "score_batch_size": 4,
            "seed": 3,
        },
    }


@pytest.fixture(scope="module")
def prepared(ray_cluster, data_cfg_tree):
    return prepare(config_from_dict(data_cfg_tree))


def _read(dataset_dir, split: str, role: str) -> pa.Table:
    return pq.read_table(schema.split_dir(dataset_dir, split, role))


def _plain_logp(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """log pi(response | prompt) summed token by token, one unpadded sequence at a time."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(prompt_ids) + k - 1, token]) for k, token in enumerate(response_ids))


def test_reference_logps_equal_a_plain_loop(prepared, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    checked = 0
    for split in schema.SPLITS:
        for role in schema.ROLES:
            table = _read(prepared, split, role)
            assert table.schema.field(schema.CHOSEN_IDS).type == pa.list_(pa.int32())
            assert table.schema.field(schema.REF_CHOSEN_LOGP).type == pa.float64()
            assert table.column(schema.INDEX).to_pylist() == list(range(table.num_rows))
            assert set(table.column(schema.ROLE).to_pylist()) <= {role}
            for row in table.to_pylist():
                room = 28 - len(row[schema.PROMPT_IDS])
                expected_chosen = tokenizer(row[schema.CHOSEN] + " </s>\n", add_special_tokens=False)["input_ids"]
                assert row[schema.CHOSEN_IDS] == expected_chosen[:room]
                for ids, logp in (
                    (row[schema.CHOSEN_IDS], row[schema.REF_CHOSEN_LOGP]),
                    (row[schema.REJECTED_IDS], row[schema.REF_REJECTED_LOGP]),
                ):
                    assert logp == pytest.approx(_plain_logp(model, row[schema.PROMPT_IDS], ids), abs=1e-4)
                checked += 1
    assert checked == 18 + 14


def test_manifest_counts_add_up_and_bad_rows_land_in_rejects(prepared):
    manifest = json.loads((prepared / schema.MANIFEST).read_text())
    counts = manifest["counts"]
    assert (counts["read"], counts["accepted"], counts["rejected"]) == (33, 32, 1)
    assert counts["read"] == counts["accepted"] + counts["rejected"]
    assert counts["rejected_by_reason"] == {"missing": 1}
    assert manifest["sources"]["safety"] == {
        "read": 19,
        "accepted": 18,
        "rejected": 1,
        "rejected_by_reason": {"missing": 1},
        "kept": 18,
    }
    assert manifest["sources"]["helpful"]["kept"] == 14
    rejects = [
        json.loads(line)
        for part in sorted((prepared / schema.REJECTS).glob("*.json"))
        for line in part.read_text().splitlines()
    ]
    assert [(r["source"], r["row"], r["field"], r["reason"]) for r in rejects] == [("safety", 19, "chosen", "missing")]
    eval_counts = {"safety": 5, "helpful": 4}  # 0.25 * 18 = 4.5 and 0.25 * 14 = 3.5, halves rounded up
    truncated = 0
    for split in schema.SPLITS:
        for role in schema.ROLES:
            table = _read(prepared, split, role)
            kept = {"safety": 18, "helpful": 14}[role]
            expected = eval_counts[role] if split == "eval" else kept - eval_counts[role]
            assert manifest["splits"][split][role]["pairs"] == table.num_rows == expected
            flags = table.column(schema.TRUNCATED).to_pylist()
            assert manifest["splits"][split][role]["truncated"] == sum(flags)
            truncated += sum(flags)
    assert counts["truncated"] == truncated > 0
    assert manifest["scoring"]["pairs"] == 32 and manifest["scoring"]["pairs_per_s"] > 0


def test_same_inputs_reuse_and_a_changed_max_length_does_not(prepared, data_cfg_tree, capsys):
    cfg = config_from_dict(data_cfg_tree)
    before = (prepared / schema.MANIFEST).read_text()
    started = time.perf_counter()
    assert prepare(cfg) == prepared
    assert time.perf_counter() - started < 5
    assert "reusing" in capsys.readouterr().out
    assert (prepared / schema.MANIFEST).read_text() == before

    longer = config_from_dict(data_cfg_tree | {"data": data_cfg_tree["data"] | {"max_length": 40, "score_actors": 1}})
    other = prepare(longer)
    assert other != prepared and other.parent == prepared.parent
    assert "reusing" not in capsys.readouterr().out
    manifest = json.loads((other / schema.MANIFEST).read_text())
    assert manifest["fingerprint_inputs"]["max_length"] == 40
    assert manifest["counts"]["truncated"] < json.loads(before)["counts"]["truncated"]
    assert not list(prepared.parent.glob(".tmp-*"))


def test_fingerprint_follows_data_files_and_settings(data_cfg_tree, tmp_path, monkeypatch):
    base = fingerprint(fingerprint_inputs(config_from_dict(data_cfg_tree)))
    assert fingerprint(fingerprint_inputs(config_from_dict(data_cfg_tree))) == base
    safety = Path(data_cfg_tree["data"]["sources"][0]["path"])
    monkeypatch.chdir(safety.parent)  # the same file by a relative path: the same data
    relative = [data_cfg_tree["data"]["sources"][0] | {"path": safety.name}, data_cfg_tree["data"]["sources"][1]]
    same = data_cfg_tree | {"data": data_cfg_tree["data"] | {"sources": relative}}
    assert fingerprint(fingerprint_inputs(config_from_dict(same))) == base
    for section, key, value in (
        ("data", "seed", 4),
        ("data", "max_prompt_length", 10),
        ("data", "on_bad_row", "error"),
        ("data", "chat_template", "{{ messages }}"),
        ("model", "dtype", "bfloat16"),
    ):
        changed = data_cfg_tree | {section: data_cfg_tree[section] | {key: value}}
        assert fingerprint(fingerprint_inputs(config_from_dict(changed))) != base, key
    copy = tmp_path / "helpful.jsonl"
    copy.write_text(open(data_cfg_tree["data"]["sources"][1]["path"]).read() + "\n")
    moved = data_cfg_tree | {
        "data": data_cfg_tree["data"]
        | {"sources": [data_cfg_tree["data"]["sources"][0], data_cfg_tree["data"]["sources"][1] | {"path": str(copy)}]}
    }
    assert fingerprint(fingerprint_inputs(config_from_dict(moved))) != base


def test_error_mode_stops_at_the_bad_row(data_cfg_tree):
    strict = data_cfg_tree | {"data": data_cfg_tree["data"] | {"on_bad_row": "error"}}
    with pytest.raises(BadRowError, match=r"safety.jsonl row 19: field 'chosen': missing"):
        prepare(config_from_dict(strict))


def test_assign_splits_holds_out_a_share_of_each_role_in_order():
    pairs = [{schema.ID: str(i), schema.ROLE: "safety" if i % 3 else "helpful"} for i in range(30)]
    records = assign_splits(pairs, 0.15)
    assert [r[schema.ID] for r in records] == [p[schema.ID] for p in pairs]
    for role, held_out in (("safety", 3), ("helpful", 2)):  # 0.15 * 20 = 3, 0.15 * 10 = 1.5 rounds up
        mine = [r for r in records if r[schema.ROLE] == role]
        held = [r for r in mine if r["split"] == "eval"]
        assert len(held) == held_out and held == mine[:held_out]
        for split in schema.SPLITS:
            assert [r[schema.INDEX] for r in mine if r["split"] == split] == list(
                range(sum(r["split"] == split for r in mine))
            )


def test_prepare_on_the_toy_world(ray_cluster, tmp_path):
    world = tmp_path / "world"
    cfg = config_from_dict(
        {
            "toyworld": {
                "dir": str(world),
                "safety_pairs": 40,
                "helpful_pairs": 40,
                "sft_rows": 20,
                "eval_prompts": 4,
            },
            "model": {"path": str(world / "init-model")},
            "data": {
                "sources": [
                    {"adapter": "pku_saferlhf", "path": str(world / "safety.jsonl"), "role": "safety"},
                    {"adapter": "ultrafeedback", "path": str(world / "helpful.jsonl"), "role": "helpful"},
                ],
                "eval_fraction": 0.1,
                "max_length": 96,
                "max_prompt_length": 40,
                "cache_dir": str(tmp_path / "c"),
                "score_actors": 1,
            },
        }
    )
    materialize(cfg.toyworld)  # the world's files (pipeline.prepare makes them; this is the stage)
    out = prepare(cfg)
    manifest = json.loads((out / schema.MANIFEST).read_text())
    assert manifest["counts"]["read"] == manifest["counts"]["accepted"] == 80
    for split in schema.SPLITS:
        for role in schema.ROLES:
            table = _read(out, split, role)
            assert table.num_rows == manifest["splits"][split][role]["pairs"] == (4 if split == "eval" else 36)
            assert set(table.column(schema.ROLE).to_pylist()) == {role}
            assert all(v < 0 for v in table.column(schema.REF_CHOSEN_LOGP).to_pylist())
    safety = _read(out, "train", "safety")
    assert not all(safety.column(schema.CHOSEN_SAFE).to_pylist())  # the world's conflict pairs are there


def test_when_every_row_is_rejected_the_rejects_file_stays_and_names_every_row(ray_cluster, data_cfg_tree, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [{"prompt": f"how do I {i}", "rejected": "no"} for i in range(5)] + [{"chosen": "yes", "rejected": "no"}]
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tree = data_cfg_tree | {
        "data": data_cfg_tree["data"]
        | {
            "sources": [{"adapter": "generic", "path": str(bad), "role": "safety"}],
            "cache_dir": str(tmp_path / "cache"),
        }
    }
    with pytest.raises(ValueError, match="no pairs left") as raised:
        prepare(config_from_dict(tree))
    named = [part for part in (tmp_path / "cache").glob("rejects-*/rejects") if part.is_dir()]
    assert len(named) == 1 and str(named[0]) in str(raised.value)
    rejects = [json.loads(line) for part in sorted(named[0].glob("*.json")) for line in part.read_text().splitlines()]
    assert sorted(r["row"] for r in rejects) == list(range(1, len(rows) + 1))
    assert {(r["source"], r["location"]) for r in rejects} == {("bad", str(bad))}  # a source is named by its file
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_skip_mode_names_the_rejects_and_an_empty_eval_split_is_a_warning_naming_its_source(
    ray_cluster, data_cfg_tree, tmp_path, capsys
):
    tree = data_cfg_tree | {"data": data_cfg_tree["data"] | {"eval_fraction": 0.02, "cache_dir": str(tmp_path)}}
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger(stages.__name__).addHandler(handler)
    try:
        out = prepare(config_from_dict(tree))  # 0.02 * 18 and 0.02 * 14 round to 0 pairs held out
    finally:
        logging.getLogger(stages.__name__).removeHandler(handler)
    assert f"{out / schema.REJECTS}/" in capsys.readouterr().out and list((out / schema.REJECTS).glob("*.json"))
    warned = [record.getMessage() for record in records]
    assert len(warned) == 2 and {"'safety'", "'helpful'"} == {w.split("[")[1].split("]")[0] for w in warned}
    assert all("eval_fraction" in w for w in warned)
