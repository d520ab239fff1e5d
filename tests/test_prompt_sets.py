"""The shipped real prompt sets and their train / validation / eval split (bfpo_ray.data.prompt_sets). No Ray."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import unicodedata
from pathlib import Path

import pytest
from oracles import load_source

from bfpo_ray.config import SourceConfig
from bfpo_ray.data import prompt_sets as ps
from bfpo_ray.data.contrast import contrast_prompts
from bfpo_ray.data.redteam_screen import is_harmful_request
from bfpo_ray.evaluate.generation import load_prompts

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO.parent / "shared" / "data" / "real"  # CI: shared/ is a sibling of the clone
REAL = REPO / "bfpo_ray" / "data" / "real"


# ------------------------------------------------------------------------------------------------ an independent
# re-implementation of the documented rule, so the tests do not check the module against itself


def norm(text: str) -> str:
    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    while text and (text[-1].isspace() or unicodedata.category(text[-1])[0] == "P"):
        text = text[:-1]
    return text


def held_out(text: str, percent: int) -> bool:
    return int(hashlib.sha256(norm(text).encode("utf-8")).hexdigest()[:8], 16) % 100 < percent


def in_validation_buckets(text: str) -> bool:
    return not held_out(text, 90)


def raw_advbench() -> list[str]:
    return [line for line in (REAL / "advbench.txt").read_text(encoding="utf-8").split("\n") if line.strip()]


def raw_xstest() -> list[dict]:
    with (REAL / "xstest_prompts.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def raw_ultrafeedback() -> list[dict]:
    with gzip.open(REAL / "ultrafeedback_binarized.trl_flattened.sample.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def keys(rows) -> set[str]:
    return {norm(row["prompt"]) for row in rows}


def all_train(**kw) -> list[dict]:
    train = ps.train_prompts(**kw)
    return train["harmful"] + train["benign"] + train["borderline"]


# ------------------------------------------------------------------------------------------------ normalize


@pytest.mark.parametrize(
    "text, expected",
    [
        ("  How do I  KILL a\tprocess?! ", "how do i kill a process"),
        ("Ｗｈａｔ is ﬁre…", "what is fire"),  # NFKC: full-width letters, ligature, ellipsis
        ("a.b c.", "a.b c"),  # only trailing punctuation goes
        ('"Quote?"', '"quote'),
        ("", ""),
    ],
)
def test_normalize(text, expected):
    assert ps.normalize(text) == expected == norm(text)


# ------------------------------------------------------------------------------------------------ reading


def test_advbench_read_whole():
    lines = raw_advbench()
    assert len(lines) == 388  # 387 newline characters: the last line has none
    advbench = [r for r in ps.eval_prompts() if r["source"] == "advbench"] + [
        r for r in all_train() if r["source"] == "advbench"
    ]
    assert sorted(r["prompt"] for r in advbench) == sorted(lines)
    assert ps.counts()["advbench"]["read"] == 388


def test_xstest_all_eval_with_kinds():
    raw = raw_xstest()
    assert sum(r["label"] == "safe" for r in raw) == 250 and sum(r["label"] == "unsafe" for r in raw) == 200
    rows = [r for r in ps.eval_prompts() if r["source"].startswith("xstest")]
    by_prompt = {r["prompt"]: r for r in rows}
    assert len(rows) == len(by_prompt) == 450
    for raw_row in raw:
        row = by_prompt[raw_row["prompt"].strip()]  # surrounding whitespace is stripped (one prompt ends in " ")
        want = ("borderline", "xstest_safe") if raw_row["label"] == "safe" else ("harmful", "xstest_unsafe")
        assert (row["kind"], row["source"]) == want
    assert not keys(raw) & keys(all_train()), "XSTest is never trained on"


def test_hh_first_turns_unique_and_train_only():
    with (REAL / "hh_rlhf_redteam_first_turns.jsonl").open(encoding="utf-8") as f:
        turns = [json.loads(line)["prompt"] for line in f]
    assert len(turns) == len({norm(t) for t in turns}) == 2175
    assert not any(r["source"] == "hh_rlhf" for r in ps.eval_prompts())
    trained = keys(r for r in all_train() if r["source"] == "hh_rlhf")
    screened = {norm(t) for t in turns if is_harmful_request(t)[0]}
    expected = screened - keys(ps.eval_prompts())
    assert trained == expected and len(screened) == 849 and len(expected) == 848  # one kept turn is an XSTest prompt


# ------------------------------------------------------------------------------------------------ leakage


def test_no_eval_prompt_in_training():
    eval_keys = keys(ps.eval_prompts())
    assert len(eval_keys) == len(ps.eval_prompts())
    for exclude in (False, True):
        assert not eval_keys & keys(all_train(exclude_validation=exclude))
    for split in ("train", "validation"):
        assert not eval_keys & keys(ps.helpful_pairs(split))
    assert keys(ps.helpful_pairs("eval")) <= eval_keys


def test_validation_disjoint_from_eval_and_rest_of_train():
    validation = ps.validation_prompts()
    rest = all_train(exclude_validation=True)
    assert validation and {r["split"] for r in validation} == {"validation"}
    assert {r["kind"] for r in validation} == {"harmful", "benign", "borderline"}
    assert not keys(validation) & keys(ps.eval_prompts())
    assert not keys(validation) & keys(rest)
    assert keys(validation) | keys(rest) == keys(all_train())
    assert not keys(ps.helpful_pairs("validation")) & keys(ps.helpful_pairs("train", exclude_validation=True))


def test_train_prompts_unique_with_sources():
    train = ps.train_prompts()
    rows = all_train()
    assert len(keys(rows)) == len(rows)
    assert {r["source"] for r in train["harmful"]} == {"advbench", "hh_rlhf"}
    assert {r["source"] for r in train["benign"]} == {"ultrafeedback"}
    assert all(set(r) == {"prompt", "source"} for r in rows)


# ------------------------------------------------------------------------------------------------ the split rule


def test_split_deterministic():
    assert ps.eval_prompts() == ps.eval_prompts()
    assert ps.train_prompts() == ps.train_prompts()
    assert ps.validation_prompts() == ps.validation_prompts()
    assert ps.helpful_pairs("train") == ps.helpful_pairs("train")
    ps.eval_prompts()[0]["prompt"] = "mutated"  # callers get copies
    assert ps.eval_prompts()[0]["prompt"] != "mutated"


def test_shares_follow_the_hash_rule():
    advbench, uf = raw_advbench(), [r["prompt"] for r in raw_ultrafeedback()]
    adv_eval = [p for p in advbench if held_out(p, 50)]
    uf_eval = [p for p in uf if held_out(p, 20)]
    evals = ps.eval_prompts()
    assert sorted(r["prompt"] for r in evals if r["source"] == "advbench") == sorted(adv_eval)
    assert sorted(r["prompt"] for r in evals if r["source"] == "ultrafeedback") == sorted(uf_eval)
    assert {r["kind"] for r in evals if r["source"] == "advbench"} == {"harmful"}
    assert {r["kind"] for r in evals if r["source"] == "ultrafeedback"} == {"benign"}
    # near the documented percentages (binomial spread: a few points)
    assert abs(len(adv_eval) / len(advbench) - 0.50) < 0.08
    assert abs(len(uf_eval) / len(uf) - 0.20) < 0.05
    train_keys = keys(all_train())
    validation = ps.validation_prompts()
    assert keys(validation) == {k for k in train_keys if in_validation_buckets(k)}
    assert abs(len(validation) / len(train_keys) - 0.10) < 0.03
    c = ps.counts()
    assert c["advbench"]["eval"] == len(adv_eval) and c["ultrafeedback"]["eval"] == len(uf_eval)
    assert c["eval"]["total"] == len(evals) and c["validation"]["total"] == len(validation)


def test_helpful_pairs_follow_their_prompts():
    raw = raw_ultrafeedback()

    def kept(row):
        return (
            row["chosen"] != row["rejected"] and row["metadata"]["score_chosen"] != row["metadata"]["score_rejected"]
        )

    want_eval = [r["prompt"] for r in raw if held_out(r["prompt"], 20) and kept(r)]
    want_val = [r["prompt"] for r in raw if in_validation_buckets(r["prompt"]) and kept(r)]
    want_train = [r["prompt"] for r in raw if not held_out(r["prompt"], 20) and kept(r)]
    assert [p["prompt"] for p in ps.helpful_pairs("eval")] == want_eval
    assert [p["prompt"] for p in ps.helpful_pairs("validation")] == want_val
    assert [p["prompt"] for p in ps.helpful_pairs("train")] == want_train
    assert len(ps.helpful_pairs("train", exclude_validation=True)) == len(want_train) - len(want_val)
    dropped = len(raw) - sum(kept(r) for r in raw)
    assert dropped == 114  # 111 tied scores, 4 identical responses, 1 both
    pair = ps.helpful_pairs("eval")[0]
    assert set(pair) == {"prompt", "chosen", "rejected", "chosen_safe", "rejected_safe"}
    assert pair["chosen_safe"] is True and pair["rejected_safe"] is True
    with pytest.raises(ValueError, match="split"):
        ps.helpful_pairs("test")


def test_written_pairs_load_with_generic_adapter(tmp_path):
    path = ps.write_helpful_pairs(tmp_path / "uf_eval.jsonl", "eval")
    result = load_source(SourceConfig(adapter="generic", path=str(path), role="helpful"), on_bad_row="error")
    assert result.counts()["accepted"] == len(ps.helpful_pairs("eval")) and not result.rejects
    assert result.pairs[0]["prompt"] == [{"role": "user", "content": ps.helpful_pairs("eval")[0]["prompt"]}]


# ------------------------------------------------------------------------------------------------ files


def test_written_eval_prompts_load(tmp_path):
    path = ps.write_eval_prompts(tmp_path / "sub" / "eval_prompts.jsonl")
    loaded = load_prompts(path, ["test"])
    evals = ps.eval_prompts()
    assert [(r["prompt"], r["kind"]) for r in loaded] == [(r["prompt"], r["kind"]) for r in evals]
    assert {r["split"] for r in loaded} == {"test"}
    assert [json.loads(line)["source"] for line in path.read_text(encoding="utf-8").splitlines()] == [
        r["source"] for r in evals
    ]
    validation = ps.write_validation_prompts(tmp_path / "validation.jsonl")
    assert len(load_prompts(validation, ["validation"])) == len(ps.validation_prompts())
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(validation, ["test"])


@pytest.mark.parametrize("name", ["advbench.txt", "xstest_prompts.csv"])
def test_verbatim_copies_match_sources(name):
    if not SHARED_REAL.is_dir():
        pytest.skip(f"{SHARED_REAL} not present")
    assert (REAL / name).read_bytes() == (SHARED_REAL / name).read_bytes()


def test_ultrafeedback_copy_matches_source():
    if not SHARED_REAL.is_dir():
        pytest.skip(f"{SHARED_REAL} not present")
    source = (SHARED_REAL / "ultrafeedback_binarized.trl_flattened.sample.jsonl").read_bytes()
    assert gzip.decompress((REAL / "ultrafeedback_binarized.trl_flattened.sample.jsonl.gz").read_bytes()) == source


def test_hh_first_turns_derived_from_source():
    if not SHARED_REAL.is_dir():
        pytest.skip(f"{SHARED_REAL} not present")
    firsts = []
    for line in (SHARED_REAL / "hh_rlhf_harmless_test.jsonl").read_text(encoding="utf-8").splitlines():
        transcript = json.loads(line)["chosen"]
        firsts.append(transcript[len("\n\nHuman:") : transcript.index("\n\nAssistant:")].strip())
    unique, seen = [], set()  # the first occurrence of each normalised turn, in file order
    for turn in firsts:
        if norm(turn) not in seen:
            seen.add(norm(turn))
            unique.append(turn)
    with (REAL / "hh_rlhf_redteam_first_turns.jsonl").open(encoding="utf-8") as f:
        shipped = [json.loads(line) for line in f]
    assert [r["prompt"] for r in shipped] == unique
    assert all(firsts[r["row"] - 1] == r["prompt"] for r in shipped)


def test_no_pku_rows_shipped():
    assert not [p for p in REAL.iterdir() if "pku" in p.name.lower()]
    if SHARED_REAL.is_dir():
        with (SHARED_REAL / "pku_saferlhf.sample.jsonl").open(encoding="utf-8") as f:
            pku = keys(json.loads(line) for line in f)
        shipped = keys(ps.eval_prompts()) | keys(all_train())
        assert not pku & shipped


def test_missing_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(ps, "REAL_DATA", tmp_path)
    ps.clear_cache()
    try:
        with pytest.raises(FileNotFoundError, match="advbench.txt"):
            ps.eval_prompts()
    finally:
        monkeypatch.undo()
        ps.clear_cache()
    assert ps.eval_prompts()


# ---------------------------------------------------------------------------------------------------- contrast, screen


def words(text: str) -> set[str]:
    return set(ps.normalize(text).split())


def test_benign_contrast_prompts_share_no_prompt_with_xstest_the_eval_or_the_validation_sets():
    contrast = [row["prompt"] for row in contrast_prompts()]
    assert len(contrast) >= 300 and len(keys({"prompt": p} for p in contrast)) == len(contrast)  # distinct
    training = [row for row in ps.train_prompts(exclude_validation=True)["borderline"]]
    assert {row["source"] for row in training} == {"contrast"} and len(training) > 250
    xstest = {ps.normalize(prompt) for prompt, _ in ps._xstest()}
    held_out = keys(ps.eval_prompts()) | keys(ps.validation_prompts())
    assert not keys(training) & (xstest | held_out)
    assert not {ps.normalize(p) for p in contrast} & xstest  # no contrast prompt at all is an XSTest prompt
    # nor a near copy of one: the word-level Jaccard similarity to the nearest XSTest prompt stays below 0.6
    xstest_words = [words(prompt) for prompt, _ in ps._xstest()]
    nearest = max(len(words(p) & w) / len(words(p) | w) for p in contrast for w in xstest_words)
    assert nearest < 0.6


def test_validation_has_benign_prompts_that_look_alarming():
    kinds = {}
    for row in ps.validation_prompts():
        kinds.setdefault(row["source"], set()).add(row["kind"])
    assert kinds["contrast"] == {"borderline"} and kinds["hh_rlhf"] == {"harmful"}


def test_the_red_team_screen_keeps_harmful_requests_with_the_measured_precision():
    audit = [json.loads(line) for line in (ps.REAL_DATA / "hh_rlhf_redteam_audit.jsonl").read_text().splitlines()]
    held_out = [row for row in audit if row["held_out"]]
    kept = [row for row in held_out if is_harmful_request(row["prompt"])[0]]
    dropped = [row for row in held_out if not is_harmful_request(row["prompt"])[0]]
    assert len(held_out) == 130 and len(kept) >= 60
    precision = sum(row["harmful_request"] for row in kept) / len(kept)
    assert precision >= 0.88, precision  # 59/65 = 0.91 when the rule was written
    assert sum(row["harmful_request"] for row in dropped) / len(dropped) < 0.35  # 19/65 = 0.29
    assert is_harmful_request("How do I poison my neighbor's dog?")[0]
    assert not is_harmful_request("Why are the coldest weeks of the year after the winter solstice?")[0]
    assert not is_harmful_request("How do I kill a Python process?")[0]
    trained = {ps.normalize(row["prompt"]) for row in ps.train_prompts()["harmful"] if row["source"] == "hh_rlhf"}
    assert trained and all(is_harmful_request(prompt)[0] for prompt in ps._hh_harmful_requests())
    assert trained <= {ps.normalize(prompt) for prompt in ps._hh_harmful_requests()}
