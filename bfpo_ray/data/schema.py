"""Column names and on-disk layout shared by the data pipeline (writer) and the trainer (reader).

A prepared dataset directory, ``<data.cache_dir>/<fingerprint>/``, holds:

    manifest.json                 counts (read = accepted + rejected, by reason), truncation, timings, fingerprint
                                  inputs
    rejects/*.json                every rejected row with source, location, row number, field and reason (JSON lines,
                                  written by the workers; absent when no row was rejected)
    <split>/<role>/*.parquet      split in SPLITS, role in ROLES; one row per pair with the columns below

Rows of one (split, role) carry ``index`` = 0..N-1, their position in the seeded shuffle, so the trainer can
order, shard and resume deterministically.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

ROLES = ("safety", "helpful")
SPLITS = ("train", "eval")
MANIFEST = "manifest.json"
REJECTS = "rejects"  # a directory of JSON-lines files

# Canonical pair record, the output of every source adapter.
ID = "id"  # str, unique and stable: "<source label>:<file or split>:<row number>"
SOURCE = "source"  # str, the source's label
ROLE = "role"  # str, "safety" or "helpful"
PROMPT = "prompt"  # list of {"role": str, "content": str} chat messages, ending with a user turn
CHOSEN = "chosen"  # str, the response preferred for helpfulness (y_w)
REJECTED = "rejected"  # str, the other response (y_l)
CHOSEN_SAFE = "chosen_safe"  # bool, s_w
REJECTED_SAFE = "rejected_safe"  # bool, s_l
PAIR_COLUMNS = (ID, SOURCE, ROLE, PROMPT, CHOSEN, REJECTED, CHOSEN_SAFE, REJECTED_SAFE)

# Added by tokenization. Response ids are exactly the tokens scored: the model sees prompt_ids + chosen_ids.
INDEX = "index"  # int64, position within its (split, role) after the seeded shuffle
PROMPT_IDS = "prompt_ids"  # list<int32>, chat-templated prompt incl. the assistant header, left-truncated
CHOSEN_IDS = "chosen_ids"  # list<int32>, response tokens incl. the end-of-turn token(s), right-truncated
REJECTED_IDS = "rejected_ids"  # list<int32>
TRUNCATED = "truncated"  # bool, prompt or a response lost tokens
TOKEN_COLUMNS = (INDEX, PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS, TRUNCATED)

# Added by the reference scoring stage: log pi_ref(y|x) summed over the response tokens, float64.
REF_CHOSEN_LOGP = "ref_chosen_logp"
REF_REJECTED_LOGP = "ref_rejected_logp"
REF_COLUMNS = (REF_CHOSEN_LOGP, REF_REJECTED_LOGP)

# The Arrow schemas of the pairs (canonical + index), of the written files, and of unscored files (SFT).
TOKEN_ID_TYPE = pa.list_(pa.int32())
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PAIR_SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        (SOURCE, pa.string()),
        (ROLE, pa.string()),
        (PROMPT, MESSAGE_TYPE),
        (CHOSEN, pa.string()),
        (REJECTED, pa.string()),
        (CHOSEN_SAFE, pa.bool_()),
        (REJECTED_SAFE, pa.bool_()),
        (INDEX, pa.int64()),
    ]
)
OUTPUT_SCHEMA = pa.schema(
    list(PAIR_SCHEMA)
    + [
        (PROMPT_IDS, TOKEN_ID_TYPE),
        (CHOSEN_IDS, TOKEN_ID_TYPE),
        (REJECTED_IDS, TOKEN_ID_TYPE),
        (TRUNCATED, pa.bool_()),
        (REF_CHOSEN_LOGP, pa.float64()),
        (REF_REJECTED_LOGP, pa.float64()),
    ]
)
UNSCORED_SCHEMA = pa.schema([field for field in OUTPUT_SCHEMA if field.name not in REF_COLUMNS])


def dataset_name(split: str, role: str) -> str:
    """The name of a (split, role) dataset, as the trainer receives it: "train_safety", "eval_helpful", ...
    (no "/": Ray Data names log files after datasets)."""
    split_dir(".", split, role)  # validates both
    return f"{split}_{role}"


def split_dir(dataset_dir: str | Path, split: str, role: str) -> Path:
    """Directory of the Parquet files of one split and role."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return Path(dataset_dir) / split / role
