"""The sft_chat adapter (UltraChat-200k transcripts for the SFT recipe): prompt, target, placeholder, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from oracles import load_source

from bfpo_ray.config import SourceConfig
from bfpo_ray.data import schema
from bfpo_ray.data.sources import SFT_NO_REJECTED, BadRowError
from bfpo_ray.objectives import sft_targets


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def ultrachat_row(i: int, turns: int = 2) -> dict:
    """HuggingFaceH4/ultrachat_200k layout: prompt (the first user turn), prompt_id, messages."""
    messages = []
    for t in range(turns):
        messages += [turn("user", f"question {i}.{t}"), turn("assistant", f"answer {i}.{t}")]
    return {"prompt": messages[0]["content"], "prompt_id": f"id{i}", "messages": messages}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_source(path: Path, role: str = "safety") -> SourceConfig:
    return SourceConfig(adapter="sft_chat", path=str(path), role=role, name="ultrachat")


def test_config_accepts_the_sft_chat_adapter():
    from typing import get_args

    assert "sft_chat" in get_args(SourceConfig.model_fields["adapter"].annotation), (
        "bfpo_ray/config.py: SourceConfig.adapter must list 'sft_chat' (bfpo_ray.data.sources.ADAPTERS has it)"
    )


@pytest.mark.parametrize("turns", [1, 3])
def test_last_reply_is_the_target_and_the_rest_the_prompt(tmp_path, turns):
    rows = [ultrachat_row(i, turns) for i in range(4)]
    result = load_source(sft_source(write_jsonl(tmp_path / "chat.jsonl", rows)))
    assert len(result.pairs) == 4 and not result.rejects
    for row, pair in zip(rows, result.pairs):
        assert pair[schema.PROMPT] == row["messages"][:-1]
        assert pair[schema.PROMPT][-1]["role"] == "user" and len(pair[schema.PROMPT]) == 2 * turns - 1
        assert pair[schema.CHOSEN] == row["messages"][-1]["content"]
        assert pair[schema.REJECTED] == SFT_NO_REJECTED != pair[schema.CHOSEN]
        assert pair[schema.CHOSEN_SAFE] is True and pair[schema.REJECTED_SAFE] is True
        assert pair[schema.ROLE] == "safety" and pair[schema.SOURCE] == "ultrachat"


@pytest.mark.parametrize("role", ["safety", "helpful"])
def test_sft_trains_on_the_reply_whatever_the_role(tmp_path, role):
    pairs = load_source(
        sft_source(write_jsonl(tmp_path / "chat.jsonl", [ultrachat_row(i) for i in range(3)]), role)
    ).pairs
    chosen_safe = np.array([p[schema.CHOSEN_SAFE] for p in pairs])
    rejected_safe = np.array([p[schema.REJECTED_SAFE] for p in pairs])
    assert sft_targets(role, chosen_safe, rejected_safe).tolist() == [True] * 3  # never the placeholder


def test_system_turn_stays_in_the_prompt(tmp_path):
    row = {"messages": [turn("system", "be brief"), turn("user", "hi"), turn("assistant", "hello")]}
    pair = load_source(sft_source(write_jsonl(tmp_path / "chat.jsonl", [row]))).pairs[0]
    assert pair[schema.PROMPT] == [turn("system", "be brief"), turn("user", "hi")]
    assert pair[schema.CHOSEN] == "hello"


@pytest.mark.parametrize(
    "messages, reason",
    [
        (None, "missing"),
        ([], "bad_messages"),
        ([turn("assistant", "only a reply")], "bad_messages"),
        ([turn("user", "q"), turn("assistant", "a"), turn("user", "unanswered")], "bad_messages"),
        ([turn("user", "q"), turn("assistant", "   ")], "empty"),
        ([turn("system", "s"), turn("assistant", "a")], "bad_messages"),
        ([turn("user", "q"), {"role": "tool", "content": "x"}, turn("assistant", "a")], "bad_messages"),
        ([turn("user", "q"), turn("assistant", SFT_NO_REJECTED)], "same_response"),
    ],
)
def test_bad_transcripts_are_rejected_with_a_reason(tmp_path, messages, reason):
    rows = [ultrachat_row(0), {"prompt_id": "x"} if messages is None else {"messages": messages}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = load_source(sft_source(path), on_bad_row="skip")
    assert len(result.pairs) == 1 and [(r["row"], r["reason"]) for r in result.rejects] == [(2, reason)]
    with pytest.raises(BadRowError, match=rf"{path} row 2: field '\w+': {reason}"):
        load_source(sft_source(path))


# ------------------------------------------------------------------------------------------------ PKU SFT target


def pku_sft_row(i: int, safe0: bool, safe1: bool, better: int, safer: int) -> dict:
    return {
        "prompt": f"question {i}?",
        "response_0": f"answer {i} zero",
        "response_1": f"answer {i} one",
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
        "better_response_id": better,
        "safer_response_id": safer,
    }


def sft_texts(path: Path, loss: str, **source_extra) -> list[str]:
    """The response SFT trains on for each row: the config resolves the source, load_source adapts the rows and
    sft_targets picks chosen or rejected, as the SFT objective's collate does."""
    from bfpo_ray.config import config_from_dict

    cfg = config_from_dict(
        {
            "model": {"path": "m"},
            "train": {"loss": loss},
            "data": {"sources": [{"adapter": "pku_saferlhf", "path": str(path), "role": "safety", **source_extra}]},
        }
    )
    pairs = load_source(cfg.data.sources[0]).pairs
    take_chosen = sft_targets(
        "safety", np.array([p[schema.CHOSEN_SAFE] for p in pairs]), np.array([p[schema.REJECTED_SAFE] for p in pairs])
    )
    return [p[schema.CHOSEN] if chosen else p[schema.REJECTED] for p, chosen in zip(pairs, take_chosen)]


def test_pku_sft_target_is_the_safer_response_by_default(tmp_path):
    """The paper's SFT trains on response_{safer_response_id}; with both responses labelled alike that is not
    always the more helpful one."""
    rows = [
        pku_sft_row(0, False, False, better=1, safer=0),  # both unsafe, the less helpful one is safer
        pku_sft_row(1, True, True, better=0, safer=1),  # both safe, likewise
        pku_sft_row(2, False, True, better=0, safer=1),  # one safe: it is the safer one
        pku_sft_row(3, False, False, better=1, safer=1),
    ]
    path = write_jsonl(tmp_path / "pku.jsonl", rows)
    safer = ["answer 0 zero", "answer 1 one", "answer 2 one", "answer 3 one"]
    assert sft_texts(path, "sft") == safer
    # The preference losses still compare the more helpful response (chosen) with the other.
    from bfpo_ray.config import config_from_dict

    bfpo = config_from_dict(
        {
            "model": {"path": "m"},
            "data": {"sources": [{"adapter": "pku_saferlhf", "path": str(path), "role": "safety"}]},
        }
    )
    assert bfpo.data.sources[0].chosen == "better_response_id"
    assert [p[schema.CHOSEN] for p in load_source(bfpo.data.sources[0]).pairs] == [
        "answer 0 one",
        "answer 1 zero",
        "answer 2 zero",
        "answer 3 one",
    ]


def test_pku_sft_target_option_keeps_the_more_helpful_on_ties(tmp_path):
    rows = [
        pku_sft_row(0, False, False, better=1, safer=0),
        pku_sft_row(1, True, True, better=0, safer=1),
        pku_sft_row(2, False, True, better=0, safer=1),
    ]
    path = write_jsonl(tmp_path / "pku.jsonl", rows)
    assert sft_texts(path, "sft", chosen="better_response_id") == ["answer 0 one", "answer 1 zero", "answer 2 one"]


def test_pku_sft_target_on_the_real_sample(real_data_dir):
    """Row 6 of the real sample has both responses unsafe, better_response_id 1 and safer_response_id 0."""
    path = real_data_dir / "pku_saferlhf.sample.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert [
        (r["is_response_0_safe"], r["is_response_1_safe"], r["better_response_id"], r["safer_response_id"])
        for r in raw
    ][5] == (False, False, 1, 0)
    assert sft_texts(path, "sft") == [r[f"response_{r['safer_response_id']}"] for r in raw]
    assert sft_texts(path, "sft", chosen="better_response_id")[5] == raw[5]["response_1"]


def test_chosen_applies_to_pku_saferlhf_only(tmp_path):
    with pytest.raises(ValueError, match="chosen only applies to pku_saferlhf"):
        SourceConfig(adapter="generic", path="x.jsonl", role="safety", chosen="safer_response_id")
