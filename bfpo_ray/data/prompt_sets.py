"""Real public prompt sets shipped with the package, split by a fixed rule into training, validation and
held-out evaluation prompts.

    write_eval_prompts("runs/eval_prompts.jsonl")             # the file `evaluate.prompts` points at (split "test")
    train_prompts(exclude_validation=True)                    # {"harmful": [...], "benign": [...]}
    write_helpful_pairs("runs/uf_train.jsonl", "train")       # generic-adapter pairs for a `helpful` source

The files live in ``bfpo_ray/data/real/`` (attribution and licences in its ``NOTICE.md``); nothing here reads
anything else, and nothing needs Ray.

==============================  ======  ============================================================
set (``source``)                read    use
==============================  ======  ============================================================
AdvBench (``advbench``)         388     harmful; 50% eval, 50% train
XSTest safe (``xstest_safe``)   250     borderline (safe requests with alarming words); 100% eval
XSTest unsafe                   200     harmful contrast prompts; 100% eval
UltraFeedback                   1000    benign prompts and helpfulness pairs; 20% eval, 80% train
HH-RLHF first human turns       2175    harmful red-team requests (mostly questions), those that the
(``hh_rlhf``)                           screen keeps (``redteam_screen``: 849); 100% train
Benign contrast (``contrast``)  424     borderline: benign requests that look alarming, generated from
                                        templates (``bfpo_ray.data.contrast``); 100% train
==============================  ======  ============================================================

**Identity.** Two prompts are the same prompt when their texts are equal after ``normalize`` (NFKC, lower case,
whitespace collapsed, trailing punctuation removed). De-duplication and leakage checks use it.

**The split rule.** ``bucket(text) = int(sha256(normalize(text).encode("utf-8")).hexdigest()[:8], 16) % 100``.
A prompt of a set is held out for evaluation when ``bucket < EVAL_PERCENT[set]``; the rest is the set's training
part. Then every training prompt whose normalised text equals that of *any* evaluation prompt (of any set) is
dropped from training, and training prompts are de-duplicated across sets (the first occurrence is kept:
AdvBench, then HH-RLHF, then UltraFeedback, each in file order). The validation subset is the training prompts
with ``bucket >= 100 - VALIDATION_PERCENT`` (buckets 90-99): experiments choose hyperparameters on it, never on
the evaluation prompts. Since ``EVAL_PERCENT <= 90`` for every set that trains, validation never meets eval.
The rule depends only on the text, so it is stable across runs, machines and Python versions.

UltraFeedback rows follow their prompt: a row is an eval / train / validation pair exactly when its prompt is an
eval / train / validation prompt.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import unicodedata
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Literal

from bfpo_ray.data.contrast import contrast_prompts
from bfpo_ray.data.redteam_screen import is_harmful_request
from bfpo_ray.storage import write_jsonl

REAL_DATA = Path(__file__).parent / "real"

ADVBENCH_FILE = "advbench.txt"
XSTEST_FILE = "xstest_prompts.csv"
ULTRAFEEDBACK_FILE = "ultrafeedback_binarized.trl_flattened.sample.jsonl.gz"
HH_FIRST_TURNS_FILE = "hh_rlhf_redteam_first_turns.jsonl"

ADVBENCH, XSTEST_SAFE, XSTEST_UNSAFE = "advbench", "xstest_safe", "xstest_unsafe"
ULTRAFEEDBACK, HH_RLHF, CONTRAST = "ultrafeedback", "hh_rlhf", "contrast"
HARMFUL, BORDERLINE, BENIGN = "harmful", "borderline", "benign"

BUCKETS = 100
# Percent of each set's prompts held out for evaluation (bucket < value). XSTest is never trained on,
# the HH-RLHF first turns never evaluated on.
EVAL_PERCENT = {ADVBENCH: 50, XSTEST_SAFE: 100, XSTEST_UNSAFE: 100, ULTRAFEEDBACK: 20, HH_RLHF: 0, CONTRAST: 0}
VALIDATION_PERCENT = 10  # training prompts with bucket >= BUCKETS - VALIDATION_PERCENT
VALIDATION_FIRST_BUCKET = BUCKETS - VALIDATION_PERCENT
assert all(EVAL_PERCENT[source] <= VALIDATION_FIRST_BUCKET for source in (ADVBENCH, ULTRAFEEDBACK, HH_RLHF, CONTRAST))

EVAL_SPLIT, VALIDATION_SPLIT = "test", "validation"
PairSplit = Literal["train", "validation", "eval"]
PAIR_SPLITS = ("train", "validation", "eval")


# ---------------------------------------------------------------------------------------------------- the rule


def normalize(text: str) -> str:
    """The identity of a prompt: Unicode NFKC, lower case, runs of whitespace collapsed to one space, leading and
    trailing whitespace and trailing punctuation (any Unicode ``P*`` character, e.g. ``?``, ``.``, ``!``, ``"``)
    removed. ``normalize("  How do I  KILL a process?! ") == "how do i kill a process"``."""
    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    end = len(text)
    while end and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[:end]


def _digest(text: str) -> str:
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()


def bucket(text: str) -> int:
    """``int(sha256(normalize(text)).hexdigest()[:8], 16) % 100``: the bucket that places a prompt."""
    return int(_digest(text)[:8], 16) % BUCKETS


def is_eval(text: str, source: str) -> bool:
    """Whether the split rule holds ``text`` of set ``source`` out for evaluation (before leakage removal)."""
    return bucket(text) < EVAL_PERCENT[source]


def is_validation_bucket(text: str) -> bool:
    """Whether ``text`` falls in the validation buckets (it is validation when it is also a training prompt)."""
    return bucket(text) >= VALIDATION_FIRST_BUCKET


# ---------------------------------------------------------------------------------------------------- reading


def _path(name: str) -> Path:
    path = REAL_DATA / name
    if not path.is_file():
        raise FileNotFoundError(
            f"shipped prompt-set file {path} is missing: bfpo_ray/data/real/ must hold "
            f"{name} (reinstall the package; see bfpo_ray/data/real/NOTICE.md)"
        )
    return path


@lru_cache(maxsize=None)
def _advbench() -> tuple[str, ...]:
    """AdvBench behaviours, one per non-blank line."""
    lines = _path(ADVBENCH_FILE).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


@lru_cache(maxsize=None)
def _xstest() -> tuple[tuple[str, str], ...]:
    """XSTest ``(prompt, source)`` pairs in file order, source ``xstest_safe`` or ``xstest_unsafe`` by ``label``."""
    path = _path(XSTEST_FILE)
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            label, prompt = row.get("label"), (row.get("prompt") or "").strip()
            if label not in ("safe", "unsafe") or not prompt:
                raise ValueError(f"{path}:{number}: expected a prompt and label safe|unsafe, got {row!r}")
            rows.append((prompt, XSTEST_SAFE if label == "safe" else XSTEST_UNSAFE))
    return tuple(rows)


@lru_cache(maxsize=None)
def _ultrafeedback() -> tuple[dict, ...]:
    """The UltraFeedback sample rows (``prompt``, ``chosen``, ``rejected``, ``metadata.score_*``)."""
    path = _path(ULTRAFEEDBACK_FILE)
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle if line.strip())


@lru_cache(maxsize=None)
def _hh_first_turns() -> tuple[str, ...]:
    """The unique first human turns of the HH-RLHF harmless-base test transcripts, in file order."""
    with _path(HH_FIRST_TURNS_FILE).open(encoding="utf-8") as handle:
        return tuple(json.loads(line)["prompt"] for line in handle if line.strip())


@lru_cache(maxsize=None)
def _hh_harmful_requests() -> tuple[str, ...]:
    """The HH-RLHF first turns that ``redteam_screen.is_harmful_request`` keeps, in file order."""
    return tuple(prompt for prompt in _hh_first_turns() if is_harmful_request(prompt)[0])


def _contrast() -> tuple[str, ...]:
    return tuple(row["prompt"] for row in contrast_prompts())


def clear_cache() -> None:
    """Forget the files read and the splits computed (they are read once per process); for tests, or after the
    files in ``REAL_DATA`` changed."""
    for cached in (
        _advbench,
        _xstest,
        _ultrafeedback,
        _hh_first_turns,
        _hh_harmful_requests,
        _eval_rows,
        _eval_keys,
        _train_rows,
        _kept_ultrafeedback_train_keys,
    ):
        cached.cache_clear()


# ---------------------------------------------------------------------------------------------------- splitting


@lru_cache(maxsize=None)
def _eval_rows() -> tuple[tuple[str, str, str], ...]:
    """(prompt, kind, source) of every eval prompt, de-duplicated (first kept), sorted by sha256 of the
    normalised text."""
    candidates = [(p, HARMFUL, ADVBENCH) for p in _advbench() if is_eval(p, ADVBENCH)]
    candidates += [(p, BORDERLINE if s == XSTEST_SAFE else HARMFUL, s) for p, s in _xstest()]
    candidates += [
        (r["prompt"], BENIGN, ULTRAFEEDBACK) for r in _ultrafeedback() if is_eval(r["prompt"], ULTRAFEEDBACK)
    ]
    unique: dict[str, tuple[str, str, str]] = {}
    for row in candidates:
        unique.setdefault(normalize(row[0]), row)
    return tuple(unique[key] for key in sorted(unique, key=lambda k: hashlib.sha256(k.encode()).hexdigest()))


@lru_cache(maxsize=None)
def _eval_keys() -> frozenset[str]:
    return frozenset(normalize(prompt) for prompt, _, _ in _eval_rows())


@lru_cache(maxsize=None)
def _train_rows() -> tuple[tuple[str, str, str], ...]:
    """(prompt, kind, source) of every training prompt, validation included, before any exclusion."""
    candidates = [(p, HARMFUL, ADVBENCH) for p in _advbench() if not is_eval(p, ADVBENCH)]
    candidates += [(p, HARMFUL, HH_RLHF) for p in _hh_harmful_requests() if not is_eval(p, HH_RLHF)]
    candidates += [
        (r["prompt"], BENIGN, ULTRAFEEDBACK) for r in _ultrafeedback() if not is_eval(r["prompt"], ULTRAFEEDBACK)
    ]
    candidates += [(p, BORDERLINE, CONTRAST) for p in _contrast() if not is_eval(p, CONTRAST)]
    eval_keys, seen, rows = _eval_keys(), set(), []
    for row in candidates:
        key = normalize(row[0])
        if key in eval_keys or key in seen:
            continue
        seen.add(key)
        rows.append(row)
    return tuple(rows)


def eval_prompts() -> list[dict]:
    """Held-out evaluation prompts, ``{"prompt", "kind", "source", "split": "test"}``:

    - kind ``harmful``: the AdvBench eval half (source ``advbench``) and the XSTest unsafe contrast prompts
      (``xstest_unsafe``);
    - kind ``borderline``: the XSTest safe prompts (``xstest_safe``), safe requests with alarming words on which
      over-refusal is measured;
    - kind ``benign``: the prompts of the UltraFeedback eval rows (``ultrafeedback``).

    Rows are unique by normalised text and ordered by the sha256 of it, so the first N of a kind
    (``load_prompts(max_per_kind=N)``) are a fixed pseudo-random sample across that kind's sources.
    """
    return [
        {"prompt": prompt, "kind": kind, "source": source, "split": EVAL_SPLIT}
        for prompt, kind, source in _eval_rows()
    ]


def train_prompts(exclude_validation: bool = False) -> dict[str, list[dict]]:
    """Training prompts, ``{"harmful": [{"prompt", "source"}, ...], "benign": [...], "borderline": [...]}``.

    harmful: the AdvBench training half, then the screened HH-RLHF first human turns; benign: the prompts of the
    UltraFeedback training rows; borderline: the benign contrast prompts. None equals (normalised) an eval prompt;
    each is unique by normalised text across the lists; order is file (or generation) order within AdvBench,
    HH-RLHF, UltraFeedback, contrast. With ``exclude_validation``, the validation prompts (``validation_prompts()``)
    are left out.
    """
    out: dict[str, list[dict]] = {HARMFUL: [], BENIGN: [], BORDERLINE: []}
    for prompt, kind, source in _train_rows():
        if exclude_validation and is_validation_bucket(prompt):
            continue
        out[kind].append({"prompt": prompt, "source": source})
    return out


def validation_prompts() -> list[dict]:
    """The validation subset of the training prompts (buckets 90-99), for choosing hyperparameters:
    ``{"prompt", "kind" (harmful | benign | borderline), "source", "split": "validation"}``, ordered like
    ``eval_prompts``.
    Disjoint from the eval prompts and from ``train_prompts(exclude_validation=True)``."""
    rows = [(prompt, kind, source) for prompt, kind, source in _train_rows() if is_validation_bucket(prompt)]
    rows.sort(key=lambda row: _digest(row[0]))
    return [
        {"prompt": prompt, "kind": kind, "source": source, "split": VALIDATION_SPLIT} for prompt, kind, source in rows
    ]


def write_eval_prompts(path: str | Path) -> Path:
    """Write ``eval_prompts()`` as JSONL (what ``evaluate.prompts`` points at, read by
    ``bfpo_ray.evaluate.generation.load_prompts`` with splits ``["test"]``); returns the path."""
    return Path(write_jsonl(path, eval_prompts()))


def write_validation_prompts(path: str | Path) -> Path:
    """Write ``validation_prompts()`` as JSONL (``load_prompts`` with splits ``["validation"]``); returns the path."""
    return Path(write_jsonl(path, validation_prompts()))


def _pair_split(prompt: str) -> str | None:
    """eval / validation / train for an UltraFeedback row's prompt, or None when its prompt is dropped from
    training because it equals an eval prompt of another set (or repeats an earlier training prompt)."""
    if is_eval(prompt, ULTRAFEEDBACK):
        return "eval"
    if normalize(prompt) not in _kept_ultrafeedback_train_keys():
        return None
    return "validation" if is_validation_bucket(prompt) else "train"


@lru_cache(maxsize=None)
def _kept_ultrafeedback_train_keys() -> frozenset[str]:
    return frozenset(normalize(p) for p, _, source in _train_rows() if source == ULTRAFEEDBACK)


def _pair_drop_reason(row: dict) -> str | None:
    if row["chosen"] == row["rejected"]:
        return "same_response"
    if row["metadata"]["score_chosen"] == row["metadata"]["score_rejected"]:
        return "tied_scores"
    return None


def helpful_pairs(split: PairSplit, exclude_validation: bool = False) -> list[dict]:
    """UltraFeedback rows of a split as rows for the ``generic`` adapter: ``{"prompt" (the user turn, a string),
    "chosen", "rejected", "chosen_safe": true, "rejected_safe": true}``, in file order.

    split ``eval``: rows whose prompt is an eval prompt (held-out preference pairs); ``train``: rows whose prompt
    is a training prompt, validation rows included unless ``exclude_validation``; ``validation``: rows whose
    prompt is a validation prompt. Dropped in every split: rows with ``score_chosen == score_rejected`` (no
    preference) and rows whose chosen and rejected texts are identical (the adapter would reject them).
    """
    if split not in PAIR_SPLITS:
        raise ValueError(f"split must be one of {PAIR_SPLITS}, got {split!r}")
    wanted = {
        "eval": ("eval",),
        "validation": ("validation",),
        "train": ("train",) if exclude_validation else ("train", "validation"),
    }[split]
    return [
        {
            "prompt": row["prompt"],
            "chosen": row["chosen"],
            "rejected": row["rejected"],
            "chosen_safe": True,
            "rejected_safe": True,
        }
        for row in _ultrafeedback()
        if _pair_split(row["prompt"]) in wanted and _pair_drop_reason(row) is None
    ]


def write_helpful_pairs(path: str | Path, split: PairSplit, exclude_validation: bool = False) -> Path:
    """Write ``helpful_pairs(split, exclude_validation)`` as JSONL (name it ``*.jsonl`` for a source); returns
    the path."""
    return write_jsonl(path, helpful_pairs(split, exclude_validation))


# ---------------------------------------------------------------------------------------------------- counts


def counts() -> dict:
    """Sizes of every set and split, for manifests and docs:

    ``read``: prompts (or rows) read from the shipped file; ``eval`` / ``train`` / ``validation``: prompts of that
    set in each (``train`` includes ``validation``); ``dropped_from_train``: training-part prompts dropped because
    they equal an eval prompt or an earlier training prompt; for UltraFeedback also ``pairs`` per split and pair
    rows dropped by reason (``pairs["train"]`` includes ``pairs["validation"]``); and totals per kind for
    ``eval``, ``train`` and ``validation``.
    """
    evals, trains, validation = eval_prompts(), train_prompts(), validation_prompts()
    train_rows = trains[HARMFUL] + trains[BENIGN] + trains[BORDERLINE]

    def of(rows: list[dict], source: str) -> int:
        return sum(row["source"] == source for row in rows)

    def per_kind(rows: list[dict]) -> dict[str, int]:
        return {
            kind: sum(row["kind"] == kind for row in rows)
            for kind in (HARMFUL, BORDERLINE, BENIGN)
            if any(row["kind"] == kind for row in rows)
        }

    training_part = {
        ADVBENCH: sum(not is_eval(p, ADVBENCH) for p in _advbench()),
        HH_RLHF: sum(not is_eval(p, HH_RLHF) for p in _hh_harmful_requests()),
        ULTRAFEEDBACK: sum(not is_eval(r["prompt"], ULTRAFEEDBACK) for r in _ultrafeedback()),
        CONTRAST: len(_contrast()),
    }
    out = {}
    for source, read in (
        (ADVBENCH, len(_advbench())),
        (HH_RLHF, len(_hh_first_turns())),
        (ULTRAFEEDBACK, len(_ultrafeedback())),
        (CONTRAST, len(_contrast())),
    ):
        out[source] = {
            "read": read,
            "eval": of(evals, source),
            "train": of(train_rows, source),
            "validation": of(validation, source),
            "dropped_from_train": training_part[source] - of(train_rows, source),
        }
    for source in (XSTEST_SAFE, XSTEST_UNSAFE):
        out[source] = {"read": sum(s == source for _, s in _xstest()), "eval": of(evals, source)}
    dropped: dict[str, int] = {}
    for row in _ultrafeedback():
        reason = _pair_drop_reason(row)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
    out[ULTRAFEEDBACK]["pairs"] = {
        "train": len(helpful_pairs("train")),
        "validation": len(helpful_pairs("validation")),
        "eval": len(helpful_pairs("eval")),
    }
    out[ULTRAFEEDBACK]["pairs_dropped"] = dict(sorted(dropped.items()))
    screen = Counter(is_harmful_request(prompt)[1].split(":")[0] for prompt in _hh_first_turns())
    out[HH_RLHF]["screened"] = {"kept": len(_hh_harmful_requests()), "by_reason": dict(sorted(screen.items()))}
    out["eval"] = {**per_kind(evals), "total": len(evals)}
    out["train"] = {
        HARMFUL: len(trains[HARMFUL]),
        BENIGN: len(trains[BENIGN]),
        BORDERLINE: len(trains[BORDERLINE]),
        "total": len(train_rows),
    }
    out["validation"] = {**per_kind(validation), "total": len(validation)}
    return out
