"""Source reading, adapters, validation and mixing (bfpo_ray.data.sources), on hand-written rows and real samples."""

from __future__ import annotations

import itertools
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from oracles import SourceResult, adapt_rows, load_source, mix

from bfpo_ray.config import SourceConfig
from bfpo_ray.data.sources import BadRowError, SourceError, is_local, read_file, rows_to_keep

HH_A = "\n\nAssistant:"


# ------------------------------------------------------------------------------------------------ helpers


def write_rows(path: Path, rows: list, fmt: str | None = None) -> Path:
    """Write rows as JSONL, JSON (a list) or Parquet, by the path's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or path.suffix
    if fmt == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == ".json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def source(path: Path | str, adapter: str, role: str = "safety", **extra) -> SourceConfig:
    return SourceConfig(adapter=adapter, path=str(path), role=role, **extra)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def pku_row(i: int, safe0, safe1, better: int, safer: int | None = None, **over) -> dict:
    if safer is None:  # consistent with the labels: the safe one when exactly one is safe
        safer = better if safe0 == safe1 else (0 if safe0 else 1)
    row = {
        "prompt": f"question {i}?",
        "response_0": f"answer {i} zero",
        "response_1": f"answer {i} one",
        "prompt_source": "test",
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
        "response_0_severity_level": 0,
        "better_response_id": better,
        "safer_response_id": safer,
    }
    row.update(over)
    return row


def generic_row(i: int, **over) -> dict:
    row = {
        "prompt": f"prompt {i}",
        "chosen": f"good {i}",
        "rejected": f"bad {i}",
        "chosen_safe": True,
        "rejected_safe": i % 2 == 0,
    }
    row.update(over)
    return row


# ------------------------------------------------------------------------------------------------ adapters

PKU_COMBOS = list(itertools.product([False, True], [False, True], [0, 1]))  # (safe0, safe1, better)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_pku_every_label_combination(tmp_path, suffix):
    rows = [pku_row(i, s0, s1, b) for i, (s0, s1, b) in enumerate(PKU_COMBOS)]
    path = write_rows(tmp_path / f"pku{suffix}", rows)
    result = load_source(source(path, "pku_saferlhf"))
    assert result.counts() == {"read": 8, "accepted": 8, "rejected": 0, "rejected_by_reason": {}}
    for n, (pair, (s0, s1, better)) in enumerate(zip(result.pairs, PKU_COMBOS), 1):
        responses, safe = (f"answer {n - 1} zero", f"answer {n - 1} one"), (s0, s1)
        assert pair["id"] == f"pku:pku{suffix}:{n}"
        assert (pair["source"], pair["role"]) == ("pku", "safety")
        assert pair["prompt"] == user(f"question {n - 1}?")
        assert pair["chosen"] == responses[better] and pair["rejected"] == responses[1 - better]
        assert pair["chosen_safe"] is safe[better] and pair["rejected_safe"] is safe[1 - better]
        assert set(pair) == {"id", "source", "role", "prompt", "chosen", "rejected", "chosen_safe", "rejected_safe"}


def test_pku_labels_as_ints(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [pku_row(0, 1, 0, 1, safer=0)])
    pair = load_source(source(path, "pku_saferlhf")).pairs[0]
    assert (pair["chosen"], pair["chosen_safe"], pair["rejected_safe"]) == ("answer 0 one", False, True)


def uf_native_rows() -> list[dict]:
    """HuggingFaceH4 layout (prompt + message lists + top-level scores), trl-lib (no prompt), explicit prompt."""
    q = "Name a colour."
    return [
        {
            "prompt": q,
            "prompt_id": "x",
            "chosen": user(q) + [{"role": "assistant", "content": "Blue."}],
            "rejected": user(q) + [{"role": "assistant", "content": "No."}],
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        },
        {
            "chosen": [{"role": "system", "content": "Be brief."}]
            + user(q)
            + [{"role": "assistant", "content": "Red."}],
            "rejected": [{"role": "system", "content": "Be brief."}]
            + user(q)
            + [{"role": "assistant", "content": "?"}],
            "score_chosen": 5,
            "score_rejected": 5,
        },
        {
            "prompt": user(q),
            "chosen": [{"role": "assistant", "content": "Green."}],
            "rejected": [{"role": "assistant", "content": "Dunno."}],
            "score_chosen": 7.0,
            "score_rejected": 6.5,
        },
    ]


@pytest.mark.parametrize("drop_ties", [False, True])
def test_ultrafeedback_native(tmp_path, drop_ties):
    rows = uf_native_rows()
    path = write_rows(tmp_path / "uf.jsonl", rows)
    result = load_source(source(path, "ultrafeedback", "helpful", drop_ties=drop_ties))  # error mode: ties never raise
    expected = [
        (user("Name a colour."), "Blue.", "No."),
        ([{"role": "system", "content": "Be brief."}] + user("Name a colour."), "Red.", "?"),
        (user("Name a colour."), "Green.", "Dunno."),
    ]
    tied = [r["score_chosen"] == r["score_rejected"] for r in rows]
    kept = [e for e, t in zip(expected, tied) if not (drop_ties and t)]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in result.pairs] == kept
    assert all(p["chosen_safe"] is True and p["rejected_safe"] is True for p in result.pairs)
    counts = result.counts()
    assert counts["read"] == 3 == counts["accepted"] + counts["rejected"]
    if drop_ties:
        assert [(r["row"], r["reason"], r["raw"]) for r in result.rejects] == [(2, "tied_scores", rows[1])]
        assert counts["rejected_by_reason"] == {"tied_scores": 1}


@pytest.mark.parametrize("drop_ties", [False, True])
def test_ultrafeedback_flattened(tmp_path, drop_ties):
    rows = [
        {"prompt": "p1", "chosen": "c1", "rejected": "r1", "metadata": {"score_chosen": 9.0, "score_rejected": 2.0}},
        {"prompt": "p2", "chosen": "c2", "rejected": "r2", "metadata": {"score_chosen": 4.0, "score_rejected": 4.0}},
        {"prompt": "p3", "chosen": "c3", "rejected": "r3", "score_chosen": 1, "score_rejected": 1.0},
    ]
    path = write_rows(tmp_path / "flat.jsonl", rows)  # JSONL: Parquet would unify the two score layouts
    result = load_source(source(path, "ultrafeedback", "helpful", drop_ties=drop_ties), on_bad_row="skip")
    kept = [
        r
        for r in rows
        if not (
            drop_ties
            and (r.get("score_chosen") or r["metadata"]["score_chosen"])
            == (r.get("score_rejected") or r["metadata"]["score_rejected"])
        )
    ]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in result.pairs] == [
        (user(r["prompt"]), r["chosen"], r["rejected"]) for r in kept
    ]
    assert result.counts()["rejected_by_reason"] == ({"tied_scores": 2} if drop_ties else {})
    assert len(result.pairs) + len(result.rejects) == 3


def test_ultrafeedback_drop_ties_needs_scores(tmp_path):
    path = write_rows(tmp_path / "u.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    assert load_source(source(path, "ultrafeedback", "helpful")).counts()["accepted"] == 1
    with pytest.raises(BadRowError, match=r"row 1: field 'score_chosen': missing"):
        load_source(source(path, "ultrafeedback", "helpful", drop_ties=True))


def test_generic_string_and_message_prompts(tmp_path):
    messages = [
        {"role": "system", "content": "You are kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "help me", "name": "u"},
    ]
    rows = [generic_row(0), generic_row(1, prompt=messages, chosen_safe=0, rejected_safe=1)]
    path = write_rows(tmp_path / "g.json", {"data": rows}, fmt=".json")
    pairs = load_source(source(path, "generic", "helpful")).pairs
    assert pairs[0]["prompt"] == user("prompt 0")
    assert pairs[1]["prompt"] == [{"role": m["role"], "content": m["content"]} for m in messages]  # extra keys dropped
    assert [(p["chosen"], p["rejected"], p["chosen_safe"], p["rejected_safe"]) for p in pairs] == [
        ("good 0", "bad 0", True, True),
        ("good 1", "bad 1", False, True),
    ]
    assert [p["role"] for p in pairs] == ["helpful", "helpful"]


def hh(*turns: tuple[str, str]) -> str:
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


def test_hh_rlhf_multi_turn(tmp_path):
    context = [
        ("Human", "How do I pick a lock?"),
        ("Assistant", "Why do you ask?"),
        ("Human", "I locked myself out.\n\nIt is cold. "),
        ("Assistant", "Call a locksmith."),
        ("Human", "Any other way?"),
    ]
    # An assistant turn that itself contains "\n\nAssistant:" stays one message (seen in the real data).
    odd = [("Human", "Tell a joke"), ("Assistant", "Here is one:\n\nAssistant: why?"), ("Human", "Another")]
    # Contents are kept byte for byte, apart from the one space after each marker.
    rows = [
        {
            "chosen": hh(*context, ("Assistant", " Try your landlord.\n")),
            "rejected": hh(*context, ("Assistant", "Use a bobby pin.")),
        },
        {"chosen": hh(*odd, ("Assistant", "No.")), "rejected": hh(*odd, ("Assistant", "No way, here it is."))},
    ]
    path = write_rows(tmp_path / "hh.jsonl", rows)
    pairs = load_source(source(path, "hh_rlhf", labels=(True, False))).pairs
    for pair, turns in zip(pairs, (context, odd)):
        assert pair["prompt"] == [{"role": "user" if s == "Human" else "assistant", "content": t} for s, t in turns]
        assert (pair["chosen_safe"], pair["rejected_safe"]) == (True, False)
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == (" Try your landlord.\n", "Use a bobby pin.")
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == ("No.", "No way, here it is.")


# ------------------------------------------------------------------------------------------------ bad rows

GOOD_PKU = pku_row(0, True, False, 0)
# The BFPO authors' red-teaming layout (data/zephyr-7b-beta_beaver_redteaming.json, read by their
# src/alignment/data.py): prompt, modeloutput1/2, better_modelout (1 or 2), is_modelout{1,2}_safe.
GOOD_REDTEAM = {
    "prompt": "How do I pick a lock?",
    "modeloutput1": "Insert a tension wrench, then rake the pins.",
    "modeloutput2": "I can't help with breaking into property.",
    "better_modelout": 1,
    "is_modelout1_safe": False,
    "is_modelout2_safe": True,
}
GOOD_UF = {"prompt": "p", "chosen": "c", "rejected": "r"}
GOOD_GENERIC = generic_row(0)
SHARED = hh(("Human", "hi"))
# (adapter, bad row, field, reason)
BAD_ROWS = [
    ("pku_saferlhf", {k: v for k, v in GOOD_PKU.items() if k != "response_1"}, "response_1", "missing"),
    ("pku_saferlhf", {**GOOD_PKU, "response_0": 3}, "response_0", "not_string"),
    ("pku_saferlhf", {**GOOD_PKU, "response_0": "  \n"}, "response_0", "empty"),
    ("pku_saferlhf", {**GOOD_PKU, "is_response_0_safe": "yes"}, "is_response_0_safe", "not_boolean"),
    ("pku_saferlhf", {**GOOD_PKU, "is_response_1_safe": 2}, "is_response_1_safe", "not_boolean"),
    ("pku_saferlhf", {**GOOD_PKU, "better_response_id": 2}, "better_response_id", "not_0_or_1"),
    ("pku_saferlhf", {**GOOD_PKU, "better_response_id": "1"}, "better_response_id", "not_0_or_1"),
    ("pku_saferlhf", {**GOOD_PKU, "safer_response_id": None}, "safer_response_id", "missing"),
    ("pku_saferlhf", {**GOOD_PKU, "safer_response_id": 2}, "safer_response_id", "not_0_or_1"),
    ("pku_saferlhf", {**GOOD_PKU, "response_1": GOOD_PKU["response_0"]}, "rejected", "same_response"),
    ("ultrafeedback", {**GOOD_UF, "prompt": ""}, "prompt", "empty"),
    ("ultrafeedback", {**GOOD_UF, "chosen": ["c"], "rejected": ["r"]}, "chosen", "bad_messages"),
    ("ultrafeedback", {**GOOD_UF, "rejected": ["r"]}, "rejected", "not_string"),
    (
        "ultrafeedback",
        {
            "chosen": user("q") + [{"role": "assistant", "content": "a"}],
            "rejected": user("other q") + [{"role": "assistant", "content": "b"}],
        },
        "rejected",
        "prompt_mismatch",
    ),
    (
        "ultrafeedback",
        {
            "prompt": "not q",
            "chosen": user("q") + [{"role": "assistant", "content": "a"}],
            "rejected": user("q") + [{"role": "assistant", "content": "b"}],
        },
        "prompt",
        "prompt_mismatch",
    ),
    ("ultrafeedback", {"chosen": user("q") + user("a"), "rejected": user("q") + user("b")}, "chosen", "bad_messages"),
    (
        "generic",
        {**GOOD_GENERIC, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "prompt",
        "bad_messages",
    ),
    ("generic", {**GOOD_GENERIC, "prompt": [{"role": "robot", "content": "q"}]}, "prompt", "bad_messages"),
    ("generic", {**GOOD_GENERIC, "rejected_safe": 0.5}, "rejected_safe", "not_boolean"),
    ("generic", {**GOOD_GENERIC, "rejected": GOOD_GENERIC["chosen"]}, "rejected", "same_response"),
    ("generic", ["not", "an", "object"], "<row>", "not_object"),
    (
        "hh_rlhf",
        {"chosen": hh(("Human", "a"), ("Assistant", "x")), "rejected": hh(("Human", "b"), ("Assistant", "y"))},
        "rejected",
        "prompt_mismatch",
    ),
    (
        "hh_rlhf",
        {"chosen": "Human: a\n\nAssistant: x", "rejected": "Human: a\n\nAssistant: y"},
        "chosen",
        "bad_transcript",
    ),
    (
        "hh_rlhf",
        {
            "chosen": SHARED + hh(("Assistant", "x"), ("Human", "more"), ("Assistant", "z")),
            "rejected": SHARED + hh(("Assistant", "y")),
        },
        "chosen",
        "bad_transcript",
    ),
    ("hh_rlhf", {"chosen": SHARED + HH_A + " ", "rejected": SHARED + hh(("Assistant", "y"))}, "chosen", "empty"),
    ("bfpo_redteaming", {k: v for k, v in GOOD_REDTEAM.items() if k != "modeloutput2"}, "modeloutput2", "missing"),
    ("bfpo_redteaming", {**GOOD_REDTEAM, "modeloutput1": ""}, "modeloutput1", "empty"),
    ("bfpo_redteaming", {**GOOD_REDTEAM, "prompt": ["q"]}, "prompt", "bad_messages"),
    ("bfpo_redteaming", {**GOOD_REDTEAM, "better_modelout": 0}, "better_modelout", "not_1_or_2"),
    ("bfpo_redteaming", {**GOOD_REDTEAM, "better_modelout": "first"}, "better_modelout", "not_1_or_2"),
    ("bfpo_redteaming", {**GOOD_REDTEAM, "better_modelout": 3}, "better_modelout", "not_1_or_2"),
    ("bfpo_redteaming", {**GOOD_REDTEAM, "better_modelout": "3"}, "better_modelout", "not_1_or_2"),
    ("bfpo_redteaming", {**GOOD_REDTEAM, "better_modelout": True}, "better_modelout", "not_1_or_2"),
    ("bfpo_redteaming", {**GOOD_REDTEAM, "is_modelout2_safe": "unsafe"}, "is_modelout2_safe", "not_boolean"),
    (
        "bfpo_redteaming",
        {k: v for k, v in GOOD_REDTEAM.items() if k != "is_modelout1_safe"},
        "is_modelout1_safe",
        "missing",
    ),
    ("bfpo_redteaming", {**GOOD_REDTEAM, "modeloutput2": GOOD_REDTEAM["modeloutput1"]}, "rejected", "same_response"),
]
GOOD = {
    "pku_saferlhf": pku_row(9, True, True, 1),
    "ultrafeedback": GOOD_UF,
    "generic": generic_row(9),
    "hh_rlhf": {"chosen": SHARED + hh(("Assistant", "x")), "rejected": SHARED + hh(("Assistant", "y"))},
    "bfpo_redteaming": GOOD_REDTEAM,
}


def bad_row_file(tmp_path: Path, adapter: str, bad) -> tuple[SourceConfig, Path]:
    """good row on line 1, a blank line, the bad row on line 3, a good row on line 4."""
    lines = [json.dumps(GOOD[adapter]), "", json.dumps(bad), json.dumps(GOOD[adapter])]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    extra = {"labels": (True, False)} if adapter == "hh_rlhf" else {}
    return source(path, adapter, name="src", **extra), path


@pytest.mark.parametrize("adapter,bad,field,reason", BAD_ROWS, ids=[f"{a}-{r}-{f}" for a, _, f, r in BAD_ROWS])
def test_bad_rows(tmp_path, adapter, bad, field, reason):
    cfg, path = bad_row_file(tmp_path, adapter, bad)
    with pytest.raises(BadRowError) as caught:
        load_source(cfg, on_bad_row="error")
    message = str(caught.value)
    for part in ("'src'", str(path), "row 3", f"field '{field}'", reason):
        assert part in message
    assert (caught.value.row, caught.value.field, caught.value.reason) == (3, field, reason)

    result = load_source(cfg, on_bad_row="skip")
    assert [(r["source"], r["location"], r["row"], r["field"], r["reason"]) for r in result.rejects] == [
        ("src", str(path), 3, field, reason)
    ]
    assert result.rejects[0]["raw"] == bad
    assert [p["id"] for p in result.pairs] == ["src:bad.jsonl:1", "src:bad.jsonl:4"]
    assert result.counts() == {"read": 3, "accepted": 2, "rejected": 1, "rejected_by_reason": {reason: 1}}


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(generic_row(0)) + "\n{not json\n")
    with pytest.raises(BadRowError, match=r"row 2: field '<row>': invalid_json"):
        load_source(source(path, "generic"))
    result = load_source(source(path, "generic"), on_bad_row="skip")
    assert result.rejects[0]["raw"] == "{not json" and result.counts()["read"] == 2


def test_errors_pickle():
    err = BadRowError("src", "/x.jsonl", 3, "chosen", "empty", "detail")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.row == 3
    with pytest.raises(ValueError, match="on_bad_row"):
        adapt_rows(source("x.jsonl", "generic"), [], on_bad_row="ignore")


# ------------------------------------------------------------------------------------------------ reading


def test_directory_recursive_sorted_mixed_formats(tmp_path):
    root = tmp_path / "data"
    write_rows(root / "b.jsonl", [generic_row(0), generic_row(1)])
    write_rows(root / "a" / "z.parquet", [generic_row(2)])
    write_rows(root / "a" / "y.json", [generic_row(3), generic_row(4)])
    write_rows(root / ".hidden" / "skip.jsonl", [generic_row(5)])
    (root / "README.md").write_text("not data")
    result = load_source(source(root, "generic"))
    assert [p["id"] for p in result.pairs] == [
        "data:a/y.json:1",
        "data:a/y.json:2",
        "data:a/z.parquet:1",
        "data:b.jsonl:1",
        "data:b.jsonl:2",
    ]
    assert [p["chosen"] for p in result.pairs] == ["good 3", "good 4", "good 2", "good 0", "good 1"]
    rows = list(read_file(root / "a" / "z.parquet", "k"))
    assert [(r.location, r.key, r.row) for r in rows] == [(str(root / "a" / "z.parquet"), "k", 1)]


@pytest.mark.parametrize("path", ["missing.jsonl", "./missing", "/no/such/dir", "a/b/c", "data.parquet"])
def test_missing_local_path(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    assert is_local(path)
    with pytest.raises(SourceError, match="does not exist"):
        load_source(source(path, "generic"))


def test_hub_names_and_bad_files(tmp_path):
    for name in ("PKU-Alignment/PKU-SafeRLHF", "HuggingFaceH4/ultrafeedback_binarized", "allenai/tulu-2.5-prefs"):
        assert not is_local(name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no"):
        load_source(source(tmp_path / "empty", "generic"))
    (tmp_path / "rows.tsv").write_text("a\tb\n")  # CSV is a data format since issue 11; TSV is not
    with pytest.raises(SourceError, match="is not a"):
        load_source(source(tmp_path / "rows.tsv", "generic"))
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(SourceError, match="list of rows"):
        load_source(source(tmp_path / "obj.json", "generic"))


# ------------------------------------------------------------------------------------------------ real data


def test_real_pku_saferlhf(real_data_dir):
    path = real_data_dir / "pku_saferlhf.sample.jsonl"
    raw = read_jsonl(path)
    result = load_source(source(path, "pku_saferlhf"))
    assert result.counts()["read"] == len(raw) == len(result.pairs) == 20
    for pair, row in zip(result.pairs, raw):
        better, worse = row["better_response_id"], 1 - row["better_response_id"]
        assert pair["prompt"] == user(row["prompt"])
        assert pair["chosen"] == row[f"response_{better}"] and pair["rejected"] == row[f"response_{worse}"]
        assert pair["chosen_safe"] is row[f"is_response_{better}_safe"]
        assert pair["rejected_safe"] is row[f"is_response_{worse}_safe"]
    # The sample has pairs where the more helpful response is the unsafe one: the labels must follow the responses.
    assert any(p["chosen_safe"] != p["rejected_safe"] for p in result.pairs)


def test_real_ultrafeedback_flattened(real_data_dir):
    path = real_data_dir / "ultrafeedback_binarized.trl_flattened.sample.jsonl"
    raw = read_jsonl(path)
    # Rows that validation must reject, found here by a plain loop: identical or empty responses.
    invalid = {
        n
        for n, r in enumerate(raw, 1)
        if r["chosen"] == r["rejected"] or not r["chosen"].strip() or not r["rejected"].strip()
    }
    tied = {n for n, r in enumerate(raw, 1) if r["metadata"]["score_chosen"] == r["metadata"]["score_rejected"]}
    assert len(tied) == 111 and invalid  # facts about the sample (SOURCES.md; 6 invalid rows, one of them tied)

    plain = load_source(source(path, "ultrafeedback", "helpful"), on_bad_row="skip")
    assert {r["row"] for r in plain.rejects} == invalid
    accepted_rows = [n for n in range(1, len(raw) + 1) if n not in invalid]
    assert [p["id"] for p in plain.pairs] == [f"{path.stem}:{path.name}:{n}" for n in accepted_rows]
    for pair, n in zip(plain.pairs, accepted_rows):
        row = raw[n - 1]
        assert pair["prompt"] == user(row["prompt"])
        assert (pair["chosen"], pair["rejected"]) == (row["chosen"], row["rejected"])
        assert pair["chosen_safe"] is True and pair["rejected_safe"] is True
    with pytest.raises(BadRowError, match=f"row {min(invalid)}:"):
        load_source(source(path, "ultrafeedback", "helpful"))

    dropped = load_source(source(path, "ultrafeedback", "helpful", drop_ties=True), on_bad_row="skip")
    counts = dropped.counts()
    assert counts["read"] == len(raw) == counts["accepted"] + counts["rejected"]
    assert {r["row"] for r in dropped.rejects} == invalid | tied
    assert counts["rejected_by_reason"]["tied_scores"] == len(tied - invalid)


def test_real_hh_rlhf(real_data_dir):
    path = real_data_dir / "hh_rlhf_harmless_test.jsonl"
    raw = read_jsonl(path)
    # A few real transcripts end in an empty assistant turn: rejected as empty responses, nothing else is.
    empty = {
        n
        for n, r in enumerate(raw, 1)
        if any(not t[t.rfind(HH_A) + len(HH_A) :].strip() for t in (r["chosen"], r["rejected"]))
    }
    result = load_source(source(path, "hh_rlhf", labels=(True, True)), on_bad_row="skip")
    assert {r["row"] for r in result.rejects} == empty and len(empty) < 10
    assert set(result.counts()["rejected_by_reason"]) == {"empty"}
    assert len(result.pairs) == len(raw) - len(empty)
    for pair in result.pairs:
        row = raw[int(pair["id"].rsplit(":", 1)[1]) - 1]
        roles = [m["role"] for m in pair["prompt"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        prompt_text = "".join(
            f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in pair["prompt"]
        )
        assert prompt_text + HH_A + " " + pair["chosen"] == row["chosen"]
        assert prompt_text + HH_A + " " + pair["rejected"] == row["rejected"]
        assert pair["chosen_safe"] is True and pair["rejected_safe"] is True


# ------------------------------------------------------------------------------------------------ mixing


def fake_result(label: str, n: int, role: str = "safety") -> SourceResult:
    return SourceResult(label, [{"id": f"{label}:f:{i}", "source": label, "role": role} for i in range(1, n + 1)])


def mix_inputs():
    sources = [
        SourceConfig(adapter="generic", path="a.jsonl", role="safety", fraction=0.25),
        SourceConfig(adapter="generic", path="b.jsonl", role="helpful", rows=3),
        SourceConfig(adapter="generic", path="c.jsonl", role="helpful", fraction=0.01),
        SourceConfig(adapter="generic", path="d.jsonl", role="safety"),
    ]
    sizes = [10, 7, 20, 5]
    return [fake_result(s.label, n, s.role) for s, n in zip(sources, sizes)], sources, sizes


def test_mix_honours_fraction_and_rows():
    results, sources, sizes = mix_inputs()
    mixed = mix(results, sources, seed=0)
    # 0.25 * 10 = 2.5 rounds half up to 3; rows=3; 0.01 * 20 = 0.2 keeps at least 1; no share keeps all 5.
    assert mixed.kept == {"a": 3, "b": 3, "c": 1, "d": 5}
    assert len(mixed.pairs) == sum(mixed.kept.values())
    ids = [p["id"] for p in mixed.pairs]
    assert len(set(ids)) == len(ids)
    for result in results:
        mine = [p for p in mixed.pairs if p["source"] == result.source]
        assert len(mine) == mixed.kept[result.source]
        assert all(p in result.pairs for p in mine)
    assert {p["source"]: p["role"] for p in mixed.pairs} == {
        "a": "safety",
        "b": "helpful",
        "c": "helpful",
        "d": "safety",
    }
    assert [rows_to_keep(sources[0], n) for n in (0, 1, 2, 4, 6)] == [0, 1, 1, 1, 2]  # round(n/4), halves up, >= 1


def test_mix_is_seeded():
    results, sources, _ = mix_inputs()
    first = [p["id"] for p in mix(results, sources, seed=1).pairs]
    assert first == [p["id"] for p in mix(results, sources, seed=1).pairs]
    assert first != [p["id"] for p in mix(results, sources, seed=2).pairs]
    # The shuffle interleaves sources rather than concatenating them.
    sources_in_order = [i.split(":")[0] for i in first]
    assert sources_in_order != sorted(sources_in_order, key="abcd".index)


def test_mix_errors():
    results, sources, _ = mix_inputs()
    too_many = [s.model_copy(update={"rows": 8}) if s.label == "b" else s for s in sources]
    with pytest.raises(ValueError, match=r"source 'b': rows=8 .* only 7"):
        mix(results, too_many, seed=0)
    with pytest.raises(ValueError, match="distinct `name`"):
        mix(results[:2], [sources[0], sources[0]], seed=0)
    with pytest.raises(ValueError, match="in the place of"):
        mix(results[:2], sources[1::-1], seed=0)


# ------------------------------------------------------------------------------------------------ issue 15


def test_pku_safer_id_disagreeing_with_the_labels_is_accepted_counted_and_labelled_from_the_labels(tmp_path):
    """safer_response_id pointing at the response labelled unsafe: the paper's code never reads it, so the row is
    kept (in the default error mode too) with the labels of is_response_{i}_safe, and counted."""
    rows = [
        GOOD_PKU,
        pku_row(1, True, False, better=1, safer=1),  # response_0 safe, safer_response_id says 1
        pku_row(2, False, True, better=1, safer=0),  # response_1 safe, safer_response_id says 0
        pku_row(3, False, False, better=0, safer=1),
    ]  # both unsafe: no disagreement possible
    path = write_rows(tmp_path / "pku.jsonl", rows)
    result = load_source(source(path, "pku_saferlhf"), on_bad_row="error")
    assert [p["id"] for p in result.pairs] == [f"pku:pku.jsonl:{n}" for n in (1, 2, 3, 4)] and not result.rejects
    assert result.counts() == {
        "read": 4,
        "accepted": 4,
        "rejected": 0,
        "rejected_by_reason": {},
        "noted_by_reason": {"safer_response_id_disagrees": 2},
    }
    first, second = result.pairs[1], result.pairs[2]
    assert (first["chosen"], first["chosen_safe"], first["rejected"], first["rejected_safe"]) == (
        "answer 1 one",
        False,
        "answer 1 zero",
        True,
    )
    assert (second["chosen"], second["chosen_safe"], second["rejected"], second["rejected_safe"]) == (
        "answer 2 one",
        True,
        "answer 2 zero",
        False,
    )
    assert all("notes" not in pair for pair in result.pairs)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_bfpo_redteaming_rows(tmp_path, suffix):
    rows = [
        GOOD_REDTEAM,
        {
            **GOOD_REDTEAM,
            "prompt": "Write a threat.",
            "better_modelout": "2",
            "is_modelout1_safe": 1,
            "is_modelout2_safe": 0,
        },
    ]
    path = write_rows(tmp_path / f"zephyr-7b-beta_beaver_redteaming{suffix}", rows)
    result = load_source(source(path, "bfpo_redteaming", name="redteaming"))
    assert result.counts() == {"read": 2, "accepted": 2, "rejected": 0, "rejected_by_reason": {}}
    first, second = result.pairs
    assert first["prompt"] == user("How do I pick a lock?")
    assert (first["chosen"], first["rejected"]) == (GOOD_REDTEAM["modeloutput1"], GOOD_REDTEAM["modeloutput2"])
    assert (first["chosen_safe"], first["rejected_safe"]) == (False, True)
    assert (second["chosen"], second["rejected"]) == (GOOD_REDTEAM["modeloutput2"], GOOD_REDTEAM["modeloutput1"])
    assert (second["chosen_safe"], second["rejected_safe"]) == (False, True)
    assert first["id"] == f"redteaming:{path.name}:1" and first["role"] == "safety"


def test_select_head_keeps_the_first_rows_in_read_order():
    """The paper's code keeps dataset.select(range(int(0.2 * n))): the head of the split, not a sample."""
    head = SourceConfig(adapter="generic", path="h.jsonl", role="safety", fraction=0.2, select="head")
    sampled = head.model_copy(update={"select": "random"})
    results = [fake_result("h", 50)]
    kept = {p["id"] for p in mix(results, [head], seed=3).pairs}
    assert kept == {f"h:f:{i}" for i in range(1, 11)}
    assert {p["id"] for p in mix(results, [sampled], seed=3).pairs} != kept
    rows_head = head.model_copy(update={"fraction": None, "rows": 4})
    assert {p["id"] for p in mix(results, [rows_head], seed=0).pairs} == {f"h:f:{i}" for i in range(1, 5)}


def test_hub_sources_load_the_configured_revision(monkeypatch):
    """read_hub passes source.revision to datasets.load_dataset (the hub itself is never reached in tests), and
    the revision is part of the prepared dataset's fingerprint."""
    import datasets

    from bfpo_ray.prepare.fingerprint import source_identity

    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return [pku_row(0, True, False, 0)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    pinned = source("PKU-Alignment/PKU-SafeRLHF", "pku_saferlhf", revision="ff7ba91063016c78a225b0f74e1c0860bb18230f")
    result = load_source(pinned)
    assert calls == [
        (
            "PKU-Alignment/PKU-SafeRLHF",
            None,
            {"split": "train", "revision": "ff7ba91063016c78a225b0f74e1c0860bb18230f"},
        )
    ]
    assert len(result.pairs) == 1
    assert source_identity(pinned) != source_identity(pinned.model_copy(update={"revision": None}))
