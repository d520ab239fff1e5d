"""The sft_chat adapter (UltraChat-200k transcripts for the SFT recipe): prompt, target, placeholder, bad rows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bfpo_ray.config import SourceConfig
from bfpo_ray.data import schema
from bfpo_ray.data.sources import SFT_NO_REJECTED, BadRowError, load_source
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
        "bfpo_ray/config.py: SourceConfig.adapter must list 'sft_chat' (bfpo_ray.data.sources.ADAPTERS has it)")


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
    pairs = load_source(sft_source(write_jsonl(tmp_path / "chat.jsonl", [ultrachat_row(i) for i in range(3)]),
                                   role)).pairs
    chosen_safe = np.array([p[schema.CHOSEN_SAFE] for p in pairs])
    rejected_safe = np.array([p[schema.REJECTED_SAFE] for p in pairs])
    assert sft_targets(role, chosen_safe, rejected_safe).tolist() == [True] * 3  # never the placeholder


def test_system_turn_stays_in_the_prompt(tmp_path):
    row = {"messages": [turn("system", "be brief"), turn("user", "hi"), turn("assistant", "hello")]}
    pair = load_source(sft_source(write_jsonl(tmp_path / "chat.jsonl", [row]))).pairs[0]
    assert pair[schema.PROMPT] == [turn("system", "be brief"), turn("user", "hi")]
    assert pair[schema.CHOSEN] == "hello"


@pytest.mark.parametrize("messages, reason", [
    (None, "missing"),
    ([], "bad_messages"),
    ([turn("assistant", "only a reply")], "bad_messages"),
    ([turn("user", "q"), turn("assistant", "a"), turn("user", "unanswered")], "bad_messages"),
    ([turn("user", "q"), turn("assistant", "   ")], "empty"),
    ([turn("system", "s"), turn("assistant", "a")], "bad_messages"),
    ([turn("user", "q"), {"role": "tool", "content": "x"}, turn("assistant", "a")], "bad_messages"),
    ([turn("user", "q"), turn("assistant", SFT_NO_REJECTED)], "same_response"),
])
def test_bad_transcripts_are_rejected_with_a_reason(tmp_path, messages, reason):
    rows = [ultrachat_row(0), {"prompt_id": "x"} if messages is None else {"messages": messages}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = load_source(sft_source(path), on_bad_row="skip")
    assert len(result.pairs) == 1 and [(r["row"], r["reason"]) for r in result.rejects] == [(2, reason)]
    with pytest.raises(BadRowError, match=rf"{path} row 2: field '\w+': {reason}"):
        load_source(sft_source(path))
