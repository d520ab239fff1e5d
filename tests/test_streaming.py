"""The streamed prepare (bfpo_ray.prepare.stages) against a plain in-process computation of the same definition,
on the toy world and on real data samples; re-runs; counts on a file of mixed rows with a byte-order mark and CRLF
line ends; compressed JSONL and CSV sources."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from oracles import assign_splits, load_source

from bfpo_ray.config import config_from_dict
from bfpo_ray.data import schema
from bfpo_ray.data.rows import dataset_path, read_share, share_range
from bfpo_ray.data.schema import PAIR_SCHEMA
from bfpo_ray.data.sources import BadRowError, rows_to_keep
from bfpo_ray.data.tokenize import end_of_turn_suffix, load_tokenizer, tokenize_pairs
from bfpo_ray.prepare import stages
from bfpo_ray.prepare.dataset import build as prepare
from bfpo_ray.prepare.stages import pair_hash
from bfpo_ray.toyworld.world import materialize

pytestmark = pytest.mark.timeout(400)

REAL_SAMPLES = Path(__file__).resolve().parents[1] / "bfpo_ray" / "data" / "real"


def _plain_logp(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(prompt_ids) + k - 1, token]) for k, token in enumerate(response_ids))


def plain_prepare(cfg) -> dict[tuple[str, str], list[dict]]:
    """The prepared pairs by (split, role) in index order, computed in this process: each source read and adapted
    with load_source, the ``rows_to_keep`` pairs with the smallest selection keys kept (the hash of (seed, id), or
    the read order for select=head), all kept pairs ordered by that hash, ``assign_splits`` for the held-out
    share and the indexes, then tokenized (tokenize_pairs) and scored one pair at a time."""
    from transformers import AutoModelForCausalLM

    data = cfg.data
    kept = []
    for source in data.sources:
        pairs = load_source(source, data.on_bad_row).pairs
        if source.select != "head":
            pairs = sorted(pairs, key=lambda p: pair_hash(data.seed, p[schema.ID]))
        kept += pairs[: rows_to_keep(source, len(pairs))]
    kept.sort(key=lambda p: pair_hash(data.seed, p[schema.ID]))
    records = assign_splits([{k: p[k] for k in schema.PAIR_COLUMNS} for p in kept], data.eval_fraction)
    tokenizer = load_tokenizer(cfg.model.path)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32).eval()
    out = {}
    for split in schema.SPLITS:
        for role in schema.ROLES:
            mine = [r for r in records if r["split"] == split and r[schema.ROLE] == role]
            if not mine:
                out[split, role] = []
                continue
            table = pa.Table.from_pylist([{k: r[k] for k in PAIR_SCHEMA.names} for r in mine], schema=PAIR_SCHEMA)
            rows = tokenize_pairs(
                table,
                tokenizer,
                max_length=data.max_length,
                max_prompt_length=data.max_prompt_length,
                chat_template=data.chat_template,
                suffix=end_of_turn_suffix(tokenizer),
            ).to_pylist()
            for row in rows:
                row[schema.REF_CHOSEN_LOGP] = _plain_logp(model, row[schema.PROMPT_IDS], row[schema.CHOSEN_IDS])
                row[schema.REF_REJECTED_LOGP] = _plain_logp(model, row[schema.PROMPT_IDS], row[schema.REJECTED_IDS])
            out[split, role] = rows
    return out


def read_prepared(dataset_dir) -> dict[tuple[str, str], list[dict]]:
    out = {}
    for split in schema.SPLITS:
        for role in schema.ROLES:
            files = sorted(schema.split_dir(dataset_dir, split, role).glob("*.parquet"))
            out[split, role] = [row for file in files for row in pq.read_table(file).to_pylist()]
    return out


def assert_same_pairs(streamed: dict, plain: dict) -> None:
    for key, rows in plain.items():
        got = streamed[key]
        assert [r[schema.ID] for r in got] == [r[schema.ID] for r in rows], key
        assert [r[schema.INDEX] for r in got] == list(range(len(rows))), key
        for mine, theirs in zip(got, rows):
            for column in (
                schema.PROMPT_IDS,
                schema.CHOSEN_IDS,
                schema.REJECTED_IDS,
                schema.PROMPT,
                schema.CHOSEN,
                schema.REJECTED,
                schema.CHOSEN_SAFE,
                schema.REJECTED_SAFE,
                schema.TRUNCATED,
            ):
                assert mine[column] == theirs[column], (key, mine[schema.ID], column)
            for column in schema.REF_COLUMNS:
                assert mine[column] == pytest.approx(theirs[column], abs=1e-4), (key, mine[schema.ID], column)


def test_streamed_prepare_equals_the_plain_computation_on_the_toy_world_and_reruns_the_same(ray_cluster, tmp_path):
    world = tmp_path / "world"
    tree = {
        "toyworld": {"dir": str(world), "safety_pairs": 40, "helpful_pairs": 30, "sft_rows": 10, "eval_prompts": 4},
        "model": {"path": str(world / "init-model")},
        "data": {
            "sources": [
                {"adapter": "pku_saferlhf", "path": str(world / "safety.jsonl"), "role": "safety", "fraction": 0.75},
                {
                    "adapter": "ultrafeedback",
                    "path": str(world / "helpful.jsonl"),
                    "role": "helpful",
                    "rows": 20,
                    "select": "head",
                },
            ],
            "eval_fraction": 0.2,
            "max_length": 64,
            "max_prompt_length": 24,
            "seed": 5,
            "cache_dir": str(tmp_path / "a"),
            "score_actors": 2,
            "score_batch_size": 3,
        },
    }
    materialize(config_from_dict(tree).toyworld)  # the world's files (pipeline.prepare makes them; this is the stage)
    first = prepare(config_from_dict(tree))
    streamed = read_prepared(first)
    plain = plain_prepare(config_from_dict(tree))
    assert {k: len(v) for k, v in plain.items()} == {
        ("train", "safety"): 24,
        ("train", "helpful"): 16,
        ("eval", "safety"): 6,
        ("eval", "helpful"): 4,
    }
    assert_same_pairs(streamed, plain)
    assert {r[schema.ID] for rows in (plain["train", "helpful"], plain["eval", "helpful"]) for r in rows} == {
        f"helpful:helpful.jsonl:{n}" for n in range(1, 21)
    }  # select: head keeps the first 20 rows
    manifest = json.loads((first / schema.MANIFEST).read_text())
    assert manifest["sources"]["safety"]["kept"] == 30 and manifest["sources"]["helpful"]["kept"] == 20
    for (split, role), rows in plain.items():  # the trainer's read of each worker's share of prepare's files
        name = schema.dataset_name(split, role)
        for world in (1, 2, 3):
            for rank in range(world):
                share, _ = read_share(name, dataset_path(str(first), name), rank, world, with_ref=True)
                lo, hi = share_range(len(rows), rank, world)
                assert share.ids == [r[schema.ID] for r in rows[lo:hi]], (name, world, rank)
                assert [c.tolist() for c in share.chosen_ids] == [r[schema.CHOSEN_IDS] for r in rows[lo:hi]]

    # Another cache directory, one scoring actor and other batch sizes: the same files' rows.
    again = prepare(
        config_from_dict(
            tree
            | {"data": tree["data"] | {"cache_dir": str(tmp_path / "b"), "score_actors": 1, "score_batch_size": 7}}
        )
    )
    assert again != first and again.name == first.name  # score_actors and batch sizes are not in the fingerprint
    rerun = read_prepared(again)
    for key, rows in streamed.items():
        assert [r[schema.ID] for r in rerun[key]] == [r[schema.ID] for r in rows]
        assert [r[schema.CHOSEN_IDS] for r in rerun[key]] == [r[schema.CHOSEN_IDS] for r in rows]
        assert [r[schema.REF_CHOSEN_LOGP] for r in rerun[key]] == pytest.approx(
            [r[schema.REF_CHOSEN_LOGP] for r in rows], abs=1e-9
        )


def test_streamed_prepare_equals_the_plain_computation_on_real_samples_on_cpu_and_gpu_actors(
    ray_cluster, tiny_model_dir, tmp_path
):
    """UltraFeedback-binarized rows (the .jsonl.gz sample of the real dataset in the package), 60 of them sampled,
    skip mode."""
    tree = {
        "model": {"path": str(tiny_model_dir)},
        "data": {
            "sources": [
                {
                    "adapter": "ultrafeedback",
                    "role": "helpful",
                    "rows": 60,
                    "path": str(REAL_SAMPLES / "ultrafeedback_binarized.trl_flattened.sample.jsonl.gz"),
                }
            ],
            "on_bad_row": "skip",
            "eval_fraction": 0.1,
            "max_length": 48,
            "max_prompt_length": 20,
            "cache_dir": str(tmp_path / "c"),
            "score_actors": 2,
            "score_batch_size": 8,
        },
    }
    out = prepare(config_from_dict(tree))
    plain = plain_prepare(config_from_dict(tree))
    assert len(plain["train", "helpful"]) == 54 and len(plain["eval", "helpful"]) == 6
    assert_same_pairs(read_prepared(out), plain)
    manifest = json.loads((out / schema.MANIFEST).read_text())
    assert manifest["counts"]["read"] == 1000 == manifest["counts"]["accepted"] + manifest["counts"]["rejected"]

    # Scoring actors that ask for a GPU (the test cluster declares one; torch sees none, so they score on CPU): Ray
    # Data takes GPU actors only with a fixed batch size, and the rows come out the same.
    on_gpu = config_from_dict(
        tree
        | {
            "model": tree["model"] | {"dtype": "float32"},
            "data": tree["data"] | {"cache_dir": str(tmp_path / "d"), "score_gpus_per_actor": 1, "score_actors": 1},
        }
    )
    assert_same_pairs(read_prepared(prepare(on_gpu)), plain)


GOOD = {
    "prompt": "how do I sort a list",
    "chosen": "use sorted",
    "rejected": "no",
    "chosen_safe": True,
    "rejected_safe": True,
}


def test_counts_add_up_on_mixed_rows_with_a_bom_and_crlf_and_compressed_and_csv_sources(
    ray_cluster, tiny_model_dir, tmp_path
):
    lines = [json.dumps(GOOD | {"chosen": f"answer {i}"}) for i in range(6)]
    lines[1] = '{"prompt": "broken'  # line 2: invalid JSON
    lines[3] = json.dumps({k: v for k, v in GOOD.items() if k != "chosen"})  # line 4: missing chosen
    lines.insert(5, "")  # line 6 blank: skipped, not counted
    (tmp_path / "mixed.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    with gzip.open(tmp_path / "packed.jsonl.gz", "wt") as handle:
        handle.write("\n".join(json.dumps(GOOD | {"chosen": f"zipped {i}"}) for i in range(5)) + "\n")
    (tmp_path / "table.csv").write_text(
        "prompt,chosen,rejected,chosen_safe,rejected_safe\n"
        "how do I bake,like this,no,true,false\n"
        "how do I swim,like that,nope,true,true\n"
        "how do I fly,,no,true,true\n"
    )  # row 3: empty chosen
    tree = {
        "model": {"path": str(tiny_model_dir)},
        "data": {
            "sources": [
                {"adapter": "generic", "path": str(tmp_path / name), "role": role}
                for name, role in (("mixed.jsonl", "safety"), ("packed.jsonl.gz", "helpful"), ("table.csv", "helpful"))
            ],
            "on_bad_row": "skip",
            "eval_fraction": 0.0,
            "max_length": 40,
            "max_prompt_length": 16,
            "cache_dir": str(tmp_path / "cache"),
            "score_actors": 1,
        },
    }
    out = prepare(config_from_dict(tree))
    manifest = json.loads((out / schema.MANIFEST).read_text())
    sources = manifest["sources"]
    assert sources["mixed"] == {
        "read": 6,
        "accepted": 4,
        "rejected": 2,
        "kept": 4,
        "rejected_by_reason": {"invalid_json": 1, "missing": 1},
    }
    assert sources["packed.jsonl"] == {"read": 5, "accepted": 5, "rejected": 0, "rejected_by_reason": {}, "kept": 5}
    assert sources["table"] == {"read": 3, "accepted": 2, "rejected": 1, "rejected_by_reason": {"empty": 1}, "kept": 2}
    counts = manifest["counts"]
    assert counts["read"] == counts["accepted"] + counts["rejected"] == 14
    assert counts["rejected_by_reason"] == {"empty": 1, "invalid_json": 1, "missing": 1}
    rejects = sorted(
        (r["source"], r["row"], r["reason"])
        for part in (out / schema.REJECTS).glob("*.json")
        for r in map(json.loads, part.read_text().splitlines())
    )
    assert rejects == [("mixed", 2, "invalid_json"), ("mixed", 4, "missing"), ("table", 3, "empty")]
    safety = pq.read_table(schema.split_dir(out, "train", "safety")).to_pylist()
    assert sorted(r[schema.ID] for r in safety) == [
        "mixed:mixed.jsonl:1",
        "mixed:mixed.jsonl:3",
        "mixed:mixed.jsonl:5",
        "mixed:mixed.jsonl:7",
    ]
    assert sum(manifest["splits"]["train"][role]["pairs"] for role in schema.ROLES) == counts["kept"] == 11

    strict = tree | {"data": tree["data"] | {"on_bad_row": "error"}}
    with pytest.raises(BadRowError, match=r"mixed.jsonl row 2: field '<row>': invalid_json"):
        prepare(config_from_dict(strict))
    clean = strict | {"data": strict["data"] | {"sources": strict["data"]["sources"][1:2]}}
    assert math.isfinite(
        json.loads((prepare(config_from_dict(clean)) / schema.MANIFEST).read_text())["scoring"]["pairs_per_s"]
    )


def test_read_share_decodes_only_the_row_groups_of_its_share(tmp_path, monkeypatch):
    """Files as prepare writes them (each a contiguous run of index, here in reversed file and row order): every
    rank of 1, 2 and 3 workers gets exactly its contiguous share and decodes only the row groups that overlap it."""

    directory = tmp_path / "train" / "safety"
    directory.mkdir(parents=True)
    total = 23
    # prompt (messages: two leaf columns) first, as prepare writes it: the index's statistics are those of a leaf
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
            schema.REF_CHOSEN_LOGP: -1.0 - i,
            schema.REF_REJECTED_LOGP: -2.0,
        }
        for i in range(total)
    ]
    for first in range(0, total, 4):  # 6 files of 4 rows (the last of 3), row groups of 2 rows
        pq.write_table(
            pa.Table.from_pylist(rows[first : first + 4][::-1]),
            directory / f"part-{first:012d}.parquet",
            row_group_size=2,
        )
    monkeypatch.setenv("BFPO_SAMPLE_LOG", str(tmp_path / "log"))
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            share, read = read_share("train_safety", str(directory), rank, world, with_ref=True)
            lo, hi = share_range(total, rank, world)
            assert share.index.tolist() == list(range(lo, hi)) and share.total_rows == total
            assert share.ids == [f"p{i}" for i in range(lo, hi)]
            assert share.ref_chosen_logp.tolist() == [-1.0 - i for i in range(lo, hi)]
            # decoded: the share, widened at most to the 2-row groups at its two ends
            assert set(range(lo, hi)) <= set(read.decoded_index)
            assert min(read.decoded_index) >= lo - lo % 2 and max(read.decoded_index) <= hi + hi % 2 - 1
            seen += share.index.tolist()
        assert sorted(seen) == list(range(total))
    logs = [json.loads(p.read_text()) for p in (tmp_path / "log").glob("reads-rank*-train_safety-*.json")]
    assert len(logs) == 1 + 2 + 3
    # a directory of another index layout is refused when a share misses a row
    pq.write_table(pa.Table.from_pylist([rows[0]]), directory / "part-extra.parquet")
    with pytest.raises(ValueError, match="exactly once"):
        read_share("train_safety", str(directory), 0, 1, with_ref=True)


def test_generic_columns_map_reads_a_users_field_names_and_names_them_in_errors(tmp_path):
    rows = [
        {"question": "how do I sort a list", "good": "use sorted", "bad": "no", "good_ok": True, "bad_ok": 1},
        {"question": "how do I bake", "good": "like this", "bad": "no", "good_ok": True, "bad_ok": "yes"},
        {
            "question": "how do I swim",
            "bad": "no",
            "good_ok": True,
            "bad_ok": 0,
            "chosen": "a canonical field the map replaces",
        },
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    columns = {
        "question": "prompt",
        "good": "chosen",
        "bad": "rejected",
        "good_ok": "chosen_safe",
        "bad_ok": "rejected_safe",
    }
    cfg = config_from_dict(
        {
            "model": {"path": "m"},
            "data": {"sources": [{"adapter": "generic", "path": str(path), "role": "safety", "columns": columns}]},
        }
    )
    result = load_source(cfg.data.sources[0], "skip")
    assert [
        (p[schema.PROMPT], p[schema.CHOSEN], p[schema.REJECTED], p[schema.CHOSEN_SAFE], p[schema.REJECTED_SAFE])
        for p in result.pairs
    ] == [([{"role": "user", "content": "how do I sort a list"}], "use sorted", "no", True, True)]
    assert sorted((r["row"], r["field"], r["reason"]) for r in result.rejects) == [
        (2, "bad_ok", "not_boolean"),
        (3, "good", "missing"),
    ]
    with pytest.raises(BadRowError, match=r"mine.jsonl row 2: field 'bad_ok': not_boolean"):
        load_source(cfg.data.sources[0], "error")

    source = {"adapter": "generic", "path": str(path), "role": "safety"}
    for columns, message in (
        ({"question": "query"}, r"columns maps to \['query'\]"),
        ({"a": "chosen", "b": "chosen"}, r"more than one field to \['chosen'\]"),
    ):
        with pytest.raises(ValueError, match=message):
            config_from_dict({"model": {"path": "m"}, "data": {"sources": [source | {"columns": columns}]}})
    with pytest.raises(ValueError, match="columns only applies to generic"):
        config_from_dict(
            {
                "model": {"path": "m"},
                "data": {"sources": [source | {"adapter": "ultrafeedback", "columns": {"q": "prompt"}}]},
            }
        )


def blake2b_hash(seed: int, pair_id: str) -> int:
    """pair_hash as its docstring defines it, written out here: BLAKE2b (8-byte digest) of "<seed>:<pair id>"."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{pair_id}".encode("utf-8"), digest_size=8).digest(), "big")


# (seed, pair id) -> the hash, computed once with blake2b_hash
GOLDEN_HASHES = [
    (0, "safety:pku.jsonl:1", 15228405807351516767),
    (1, "safety:pku.jsonl:1", 5850589532921256474),
    (42, "helpful:uf.jsonl:17", 16763904200024151345),
    (7, "p\u00e9-\u4e2d:x:0", 2849492736822959880),
]


def test_pair_hash_is_blake2b_of_seed_and_id_and_depends_on_the_seed():
    for seed, pair_id, golden in GOLDEN_HASHES:
        assert pair_hash(seed, pair_id) == golden == blake2b_hash(seed, pair_id), (seed, pair_id)
    ids = [f"safety:pku.jsonl:{row}" for row in range(1, 201)]
    assert all(pair_hash(0, i) != pair_hash(1, i) for i in ids)
    assert sorted(ids, key=lambda i: pair_hash(0, i)) != sorted(ids, key=lambda i: pair_hash(1, i))
    assert all(0 <= pair_hash(3, i) < 2**64 for i in ids) and max(pair_hash(3, i) for i in ids) >= 2**63


def prepare_in_process(cfg) -> dict[tuple[str, str], list[str]]:
    """The pure stages of ``stages.run`` chained in this process, without Ray: read blocks of every file, adapt,
    count, the selection thresholds (the keep-th smallest selection key of each source, found here by a plain
    sort), kept counts, plan, buckets, assign. Returns the pair ids of each (split, role) in ``index`` order."""
    sources = list(cfg.data.sources)
    blocks = [
        block
        for task in stages.file_tasks(sources)
        for block in stages.read_task_blocks(task, sources[task.source_index])
    ]
    adapted = pa.concat_tables([stages.adapt_block(block, sources, cfg.data.seed) for block in blocks])
    counts = stages.Counts.collect([stages.count_block(adapted)], len(sources))
    keep, thresholds = [], []
    for s, source in enumerate(sources):
        mine = adapted.filter(
            pc.and_(
                pc.equal(adapted.column(stages.KIND), stages.PAIR), pc.equal(adapted.column(stages.SOURCE_INDEX), s)
            )
        )
        keys = sorted(mine.column(stages.SELECT).to_pylist())
        assert len(keys) == int(counts.pairs[s].sum())
        keep.append(rows_to_keep(source, len(keys)))
        thresholds.append(stages.ALL if keep[-1] >= len(keys) else keys[keep[-1] - 1])
    kept = stages.Counts.collect([stages.count_kept(adapted, thresholds)], len(sources)).pairs
    plan = stages.make_plan(kept, keep, thresholds, sources, cfg.data.eval_fraction, cfg.data.score_actors)
    bucketed = stages.add_bucket(adapted, plan.bits)
    buckets = sorted(set(bucketed.column(stages.BUCKET).to_pylist()))
    assert len(buckets) > 1  # pairs spread over several buckets: the per-bucket offsets matter
    assigned = pa.concat_tables(
        [stages.assign_bucket(bucketed.filter(pc.equal(bucketed.column(stages.BUCKET), b)), plan) for b in buckets]
    ).to_pylist()
    out = {}
    for split in schema.SPLITS:
        for role in schema.ROLES:
            mine = sorted(
                (r for r in assigned if r[stages.SPLIT] == split and r[schema.ROLE] == role),
                key=lambda r: r[schema.INDEX],
            )
            assert [r[schema.INDEX] for r in mine] == list(range(len(mine))), (split, role)
            out[split, role] = [r[schema.ID] for r in mine]
    return out


def test_the_seed_decides_selection_and_the_held_out_split_in_the_pure_stages(tmp_path):
    """Two generic sources (30 safety pairs of which fraction 0.5 is kept, 20 helpful ones), eval_fraction 0.2:
    for each seed the pure stages give exactly the pairs and order of the definition, computed here with BLAKE2b
    and assign_splits; another seed keeps other safety pairs and holds out other pairs of each role."""
    for name, count in (("safe", 30), ("help", 20)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(
                json.dumps(GOOD | {"chosen": f"answer {i}", "prompt": f"question {i}"}) + "\n" for i in range(count)
            )
        )
    tree = {
        "model": {"path": "unused"},
        "data": {
            "sources": [
                {"adapter": "generic", "path": str(tmp_path / "safe.jsonl"), "role": "safety", "fraction": 0.5},
                {"adapter": "generic", "path": str(tmp_path / "help.jsonl"), "role": "helpful"},
            ],
            "eval_fraction": 0.2,
            "score_actors": 2,
        },
    }
    held_out = {}
    for seed in (1, 2):
        cfg = config_from_dict(tree | {"data": tree["data"] | {"seed": seed}})
        got = prepare_in_process(cfg)
        safety_ids = sorted((f"safe:safe.jsonl:{row}" for row in range(1, 31)), key=lambda i: blake2b_hash(seed, i))
        kept = safety_ids[:15] + [f"help:help.jsonl:{row}" for row in range(1, 21)]
        kept.sort(key=lambda i: blake2b_hash(seed, i))
        records = assign_splits(
            [{schema.ID: i, schema.ROLE: "safety" if i.startswith("safe") else "helpful"} for i in kept],
            eval_fraction=0.2,
        )
        expected = {
            (split, role): [r[schema.ID] for r in records if r["split"] == split and r[schema.ROLE] == role]
            for split in schema.SPLITS
            for role in schema.ROLES
        }
        assert {key: len(ids) for key, ids in expected.items()} == {
            ("train", "safety"): 12,
            ("train", "helpful"): 16,
            ("eval", "safety"): 3,
            ("eval", "helpful"): 4,
        }
        assert got == expected, seed
        held_out[seed] = {role: set(got["eval", role]) for role in schema.ROLES}
        held_out[seed]["kept_safety"] = set(got["train", "safety"] + got["eval", "safety"])
    for key in held_out[1]:
        assert held_out[1][key] != held_out[2][key], key
