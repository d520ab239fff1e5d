"""Token ids for preference pairs, and the padded model inputs built from them. Pure functions, no Ray.

The model input of a pair is the concatenation ``prompt_ids + response_ids``, where

    prompt_ids   = apply_chat_template(prompt messages, add_generation_prompt=True)
    response_ids = tokenize(response text + end-of-turn suffix, add_special_tokens=False)

and the end-of-turn suffix is what the chat template writes after an assistant message's content (derived once per
template by rendering a sentinel assistant turn). Because the pieces are tokenized separately and concatenated,
never re-tokenized as one string, the tokens scored as the response are exactly ``response_ids``: a BPE merge
across the prompt/response boundary cannot move tokens between the two.

Truncation (``max_length`` total, ``max_prompt_length`` prompt): the prompt loses tokens from the LEFT (its end,
the assistant header, is kept), then each response loses tokens from the right so that prompt + response fits.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pyarrow as pa
import torch

from bfpo_ray.data.schema import (CHOSEN, CHOSEN_IDS, PROMPT, PROMPT_IDS, REJECTED, REJECTED_IDS, TRUNCATED)

log = logging.getLogger(__name__)

_SENTINEL = "\u2063SENTINEL-7f3a9c\u2063"
_SUFFIX_PROBE = [{"role": "user", "content": "hi"}]
TOKEN_ID_TYPE = pa.list_(pa.int32())


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """``AutoTokenizer.from_pretrained(path)``; a configured ``chat_template`` replaces the tokenizer's own."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise ValueError(f"the tokenizer at {path} has no chat template; set data.chat_template in the config")
    return tokenizer


def end_of_turn_suffix(tokenizer, chat_template: str | None = None) -> str:
    """The text the chat template writes after an assistant message's content (e.g. ``"</s>"``, ``"<|im_end|>\\n"``).

    Rendered from a one-turn conversation whose assistant content is a sentinel; the suffix is everything after it.
    Warns when the text before the sentinel differs from the generation prompt, because then the scored
    input (generation prompt + response) is not what the template writes for a finished conversation.
    """
    conversation = _SUFFIX_PROBE + [{"role": "assistant", "content": _SENTINEL}]
    rendered = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False)
    head, found, suffix = rendered.partition(_SENTINEL)
    if not found:
        raise ValueError("the chat template does not write an assistant message's content verbatim, so the "
                         "end-of-turn suffix cannot be derived; set data.chat_template to a template that does")
    generation_prompt = tokenizer.apply_chat_template(_SUFFIX_PROBE, chat_template=chat_template, tokenize=False,
                                                      add_generation_prompt=True)
    if head != generation_prompt:
        log.warning("chat template: the generation prompt %r differs from the text before an assistant message "
                    "%r; responses are scored after the generation prompt", generation_prompt, head)
    return suffix


def encode_prompt(tokenizer, messages: Sequence[Mapping[str, str]], chat_template: str | None = None) -> list[int]:
    """Token ids of the chat-templated prompt including the assistant header (``add_generation_prompt=True``)."""
    encoded = tokenizer.apply_chat_template([dict(m) for m in messages], chat_template=chat_template,
                                            add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def encode_response(tokenizer, text: str, suffix: str) -> list[int]:
    """Token ids of ``text + suffix`` with no special tokens added (the template's own end-of-turn is in ``suffix``)."""
    return list(tokenizer(text + suffix, add_special_tokens=False)["input_ids"])


def truncate_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int,
                  max_prompt_length: int) -> tuple[list[int], list[int], list[int], bool]:
    """Keep the last ``max_prompt_length`` prompt tokens, then the first ``max_length - len(prompt)`` of each response.

    Returns (prompt_ids, chosen_ids, rejected_ids, truncated) with truncated true when any of the three lost tokens.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    kept_prompt = prompt_ids[-max_prompt_length:]
    room = max_length - len(kept_prompt)
    kept_chosen, kept_rejected = chosen_ids[:room], rejected_ids[:room]
    truncated = (len(kept_prompt) < len(prompt_ids) or len(kept_chosen) < len(chosen_ids)
                 or len(kept_rejected) < len(rejected_ids))
    return kept_prompt, kept_chosen, kept_rejected, truncated


def tokenize_pairs(batch: pa.Table, tokenizer, *, max_length: int, max_prompt_length: int,
                   chat_template: str | None = None, suffix: str | None = None) -> pa.Table:
    """Ray Data ``map_batches`` function (``batch_format="pyarrow"``): canonical pair rows in, the same rows out
    with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (list<int32>) and ``truncated`` (bool) appended.

    ``batch`` needs the columns ``prompt`` (list of {role, content}), ``chosen`` and ``rejected`` (str).
    ``suffix``: the template's end-of-turn text, ``end_of_turn_suffix(tokenizer, chat_template)`` when not given.
    """
    if suffix is None:
        suffix = end_of_turn_suffix(tokenizer, chat_template)
    prompts, chosen, rejected, truncated = [], [], [], []
    for messages, chosen_text, rejected_text in zip(batch.column(PROMPT).to_pylist(),
                                                     batch.column(CHOSEN).to_pylist(),
                                                     batch.column(REJECTED).to_pylist()):
        p, c, r, t = truncate_pair(encode_prompt(tokenizer, messages, chat_template),
                                   encode_response(tokenizer, chosen_text, suffix),
                                   encode_response(tokenizer, rejected_text, suffix),
                                   max_length, max_prompt_length)
        prompts.append(p)
        chosen.append(c)
        rejected.append(r)
        truncated.append(t)
    for name, values, type_ in ((PROMPT_IDS, prompts, TOKEN_ID_TYPE), (CHOSEN_IDS, chosen, TOKEN_ID_TYPE),
                                (REJECTED_IDS, rejected, TOKEN_ID_TYPE), (TRUNCATED, truncated, pa.bool_())):
        batch = batch.append_column(name, pa.array(values, type=type_))
    return batch


def pad_pairs(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
              rejected_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded model inputs for B pairs, chosen and rejected in one batch of 2B rows.

    Row i < B is ``prompt_ids[i] + chosen_ids[i]``, row B + i is ``prompt_ids[i] + rejected_ids[i]``, padded on the
    right with ``pad_id`` to T = the longest row. Split a per-row result with ``values.chunk(2)`` into
    (chosen, rejected).

    Returns:
        input_ids: (2B, T) int64.
        attention_mask: (2B, T) int64, 1 on real tokens, 0 on padding.
        loss_mask: (2B, T) bool, true exactly on the response tokens (what ``loss.sequence_logps`` scores).
    ``pad_id`` must be a valid token id; padded positions are masked out, so which one does not change results.
    """
    if not len(prompt_ids) == len(chosen_ids) == len(rejected_ids):
        raise ValueError(f"pad_pairs needs as many prompts as chosen and rejected responses, got "
                         f"{len(prompt_ids)}, {len(chosen_ids)}, {len(rejected_ids)}")
    rows = [(list(p), list(r)) for responses in (chosen_ids, rejected_ids) for p, r in zip(prompt_ids, responses)]
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(rows):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :length] = 1
        loss_mask[row, len(prompt):length] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pack_shared_prompt(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                       rejected_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs for B pairs, one row per pair holding the prompt once: ``prompt + chosen + [prompt[-1]] +
    rejected``, right-padded to T = the longest row.

    The rejected part starts with a copy of the prompt's last token at the same position id: it sees the prompt
    without that last token, then itself, so its hidden state equals the original's and it predicts the first
    rejected token. The chosen part sees the whole prompt and itself, causally; the rejected part sees the prompt
    (bar its last token) and itself; neither response sees the other. Each response's tokens therefore score
    exactly as in ``pad_pairs``' two rows, with the prompt computed once.

    Returns:
        input_ids, position_ids: (B, T) int64. attention_mask: (B, T) int64, 1 on real tokens.
        pair_mask: (B, 1, T, T) bool, true where token q (dim 2) attends to token k (dim 3); a padding token
        attends to itself only. chosen_mask, rejected_mask: (B, T) bool, the response tokens to score.
    """
    if not len(prompt_ids) == len(chosen_ids) == len(rejected_ids):
        raise ValueError(f"pack_shared_prompt needs as many prompts as chosen and rejected responses, got "
                         f"{len(prompt_ids)}, {len(chosen_ids)}, {len(rejected_ids)}")
    if any(len(prompt) == 0 for prompt in prompt_ids):
        raise ValueError("pack_shared_prompt needs a non-empty prompt in every pair")
    width = max(len(p) + len(c) + 1 + len(r) for p, c, r in zip(prompt_ids, chosen_ids, rejected_ids))
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    pair_mask = torch.eye(width, dtype=torch.bool).repeat(batch, 1, 1, 1)
    chosen_mask = torch.zeros((batch, width), dtype=torch.bool)
    rejected_mask = torch.zeros((batch, width), dtype=torch.bool)
    for row, (prompt, chosen, rejected) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids)):
        p, c, r = len(prompt), len(chosen), len(rejected)
        split, end = p + c, p + c + 1 + r  # the copy of the prompt's last token sits at index split
        input_ids[row, :end] = torch.tensor([*prompt, *chosen, prompt[-1], *rejected], dtype=torch.long)
        position_ids[row, :end] = torch.cat([torch.arange(p + c), torch.arange(p - 1, p + r)])
        attention_mask[row, :end] = 1
        causal = torch.ones(end, end, dtype=torch.bool).tril()
        seen = pair_mask[row, 0]
        seen[:split, :split] = causal[:split, :split]           # prompt, then chosen, causally
        seen[split:end, :p - 1] = True                          # rejected part: the prompt bar its last token ...
        seen[split:end, split:end] = causal[:end - split, :end - split]  # ... then itself, causally
        chosen_mask[row, p:split] = True
        rejected_mask[row, split + 1:end] = True
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask,
            "pair_mask": pair_mask, "chosen_mask": chosen_mask, "rejected_mask": rejected_mask}


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padding is masked, any valid id will do)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
