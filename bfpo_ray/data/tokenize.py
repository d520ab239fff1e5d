"""Token ids for preference pairs (the padded model inputs built from them are in bfpo_ray.logprobs).
Pure functions, no Ray.

The model input of a pair is the concatenation ``prompt_ids + response_ids``, where

    prompt_ids   = apply_chat_template(prompt messages, add_generation_prompt=True)
    response_ids = tokenize(response text + end-of-turn suffix, add_special_tokens=False)

and the end-of-turn suffix is what the chat template writes after an assistant message's content (derived once per
template by rendering a sentinel assistant turn). Because the pieces are tokenized separately and concatenated,
never re-tokenized as one string, the tokens scored as the response are exactly ``response_ids``: a BPE merge
across the prompt/response boundary cannot move tokens between the two.

BOS: a model whose tokenizer prepends its BOS token when asked for special tokens (``tokenizer(text)`` starts with
``bos_token_id``: Llama, Mistral, Zephyr) was trained with it, so every prompt starts with exactly one BOS, whether
the chat template writes ``{{ bos_token }}`` or not (``encode_prompt``, shared by scoring, training and generation).
A tokenizer that has a ``bos_token`` but does not prepend it (SmolLM2's ``<|im_start|>``, the toy world's ``<s>``)
gets the template's ids unchanged.

Truncation (``max_length`` total, ``max_prompt_length`` prompt): the prompt loses tokens from the LEFT (its end,
the assistant header, is kept; so is a leading BOS), then each response loses tokens from the right so that
prompt + response fits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pyarrow as pa

from bfpo_ray.data.schema import CHOSEN, CHOSEN_IDS, PROMPT, PROMPT_IDS, REJECTED, REJECTED_IDS, TRUNCATED

log = logging.getLogger(__name__)

_SENTINEL = "\u2063SENTINEL-7f3a9c\u2063"
_SUFFIX_PROBE = [{"role": "user", "content": "hi"}]
_BOS_PROBE = "hi"
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
        raise ValueError(
            "the chat template does not write an assistant message's content verbatim, so the "
            "end-of-turn suffix cannot be derived; set data.chat_template to a template that does"
        )
    generation_prompt = tokenizer.apply_chat_template(
        _SUFFIX_PROBE, chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )
    if head != generation_prompt:
        log.warning(
            "chat template: the generation prompt %r differs from the text before an assistant message "
            "%r; responses are scored after the generation prompt",
            generation_prompt,
            head,
        )
    return suffix


def expected_bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer prepends it to text tokenized with special tokens (the model was trained
    with it), else None. A ``bos_token`` the tokenizer does not prepend (ChatML's ``<|im_start|>``) is not one."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return None
    with_special = tokenizer(_BOS_PROBE, add_special_tokens=True)["input_ids"]
    without = tokenizer(_BOS_PROBE, add_special_tokens=False)["input_ids"]
    return bos_id if with_special[:1] == [bos_id] and without[:1] != [bos_id] else None


def encode_prompts(
    tokenizer, conversations: Sequence[Sequence[Mapping[str, str]]], chat_template: str | None = None
) -> list[list[int]]:
    """Token ids of each chat-templated prompt including the assistant header (``add_generation_prompt=True``),
    starting with exactly one BOS when the tokenizer expects one (``expected_bos_id``): the template's own leading
    BOS tokens are replaced by one, and one is added when the template writes none. One tokenizer call for all."""
    if not conversations:
        return []
    encoded = tokenizer.apply_chat_template(
        [[dict(m) for m in messages] for messages in conversations],
        chat_template=chat_template,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    bos_id = expected_bos_id(tokenizer)
    out = []
    for ids in encoded["input_ids"]:
        ids = list(ids)
        if bos_id is not None:
            start = 0
            while start < len(ids) and ids[start] == bos_id:
                start += 1
            ids = [bos_id] + ids[start:]
        out.append(ids)
    return out


def encode_prompt(tokenizer, messages: Sequence[Mapping[str, str]], chat_template: str | None = None) -> list[int]:
    """``encode_prompts`` of one conversation."""
    return encode_prompts(tokenizer, [messages], chat_template)[0]


def encode_responses(tokenizer, texts: Sequence[str], suffix: str) -> list[list[int]]:
    """Token ids of each ``text + suffix`` with no special tokens added (the template's own end-of-turn is in
    ``suffix``). One tokenizer call for all."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer([text + suffix for text in texts], add_special_tokens=False)["input_ids"]]


def encode_response(tokenizer, text: str, suffix: str) -> list[int]:
    """``encode_responses`` of one text."""
    return encode_responses(tokenizer, [text], suffix)[0]


def truncate_pair(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    max_length: int,
    max_prompt_length: int,
    bos_id: int | None = None,
) -> tuple[list[int], list[int], list[int], bool]:
    """Keep the last ``max_prompt_length`` prompt tokens, then the first ``max_length - len(prompt)`` of each response.
    With ``bos_id``, a prompt that starts with it keeps it when cut: BOS + its last ``max_prompt_length - 1`` tokens.

    Returns (prompt_ids, chosen_ids, rejected_ids, truncated) with truncated true when any of the three lost tokens.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    kept_prompt = prompt_ids[-max_prompt_length:]
    if bos_id is not None and prompt_ids[:1] == [bos_id] and len(prompt_ids) > max_prompt_length:
        kept_prompt = [bos_id] + prompt_ids[len(prompt_ids) - max_prompt_length + 1 :]
    room = max_length - len(kept_prompt)
    kept_chosen, kept_rejected = chosen_ids[:room], rejected_ids[:room]
    truncated = (
        len(kept_prompt) < len(prompt_ids)
        or len(kept_chosen) < len(chosen_ids)
        or len(kept_rejected) < len(rejected_ids)
    )
    return kept_prompt, kept_chosen, kept_rejected, truncated


def tokenize_pairs(
    batch: pa.Table,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    chat_template: str | None = None,
    suffix: str | None = None,
) -> pa.Table:
    """Ray Data ``map_batches`` function (``batch_format="pyarrow"``): canonical pair rows in, the same rows out
    with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (list<int32>) and ``truncated`` (bool) appended.

    ``batch`` needs the columns ``prompt`` (list of {role, content}), ``chosen`` and ``rejected`` (str).
    ``suffix``: the template's end-of-turn text, ``end_of_turn_suffix(tokenizer, chat_template)`` when not given.
    """
    if suffix is None:
        suffix = end_of_turn_suffix(tokenizer, chat_template)
    bos_id = expected_bos_id(tokenizer)
    prompts, chosen, rejected, truncated = [], [], [], []
    for prompt_ids, chosen_ids, rejected_ids in zip(
        encode_prompts(tokenizer, batch.column(PROMPT).to_pylist(), chat_template),
        encode_responses(tokenizer, batch.column(CHOSEN).to_pylist(), suffix),
        encode_responses(tokenizer, batch.column(REJECTED).to_pylist(), suffix),
    ):
        p, c, r, t = truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length, bos_id)
        prompts.append(p)
        chosen.append(c)
        rejected.append(r)
        truncated.append(t)
    for name, values, type_ in (
        (PROMPT_IDS, prompts, TOKEN_ID_TYPE),
        (CHOSEN_IDS, chosen, TOKEN_ID_TYPE),
        (REJECTED_IDS, rejected, TOKEN_ID_TYPE),
        (TRUNCATED, truncated, pa.bool_()),
    ):
        batch = batch.append_column(name, pa.array(values, type=type_))
    return batch


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padding is masked, any valid id will do)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
