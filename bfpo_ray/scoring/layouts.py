"""Batch layouts: the padded model inputs built from token ids, one module for training, reference scoring and
evaluation alike. Pure functions of token ids (no model, no Ray).

    pad_pairs           2B rows, prompt + chosen then prompt + rejected (the default layout)
    pack_shared_prompt  B rows, prompt + chosen + prompt[-1] + rejected with a mask that keeps the responses apart
    pad_responses       B rows, prompt + one response (single-response objectives such as SFT)
    pack_rows           padding-free: the rows of pad_pairs / pad_responses end to end in ONE sequence, each with
                        its own position ids from 0 (flash-attention 2 reads the row boundaries from them)
    collate_pairs / collate_responses   the same from a worker's PairRows, plus labels and reference log-probs
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from bfpo_ray.data.rows import PairRows


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


def pad_responses(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows ``prompt + response`` (B, T) with attention_mask and a loss_mask true on the response."""
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    loss_mask = torch.zeros((len(prompt_ids), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :length] = 1
        loss_mask[row, len(prompt):length] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pack_rows(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]
              ) -> dict[str, torch.Tensor]:
    """Padding-free layout: the R rows ``prompt_ids[i] + response_ids[i]`` concatenated into one sequence of N =
    sum of their lengths tokens, no padding (TRL's ``padding_free``, OpenRLHF's ``packing_samples``).

    Each row's position ids restart at 0, which is how transformers tells the rows apart: with
    ``attn_implementation="flash_attention_2"`` it turns them into the cumulative sequence lengths of the varlen
    kernel, and with sdpa or eager (``attention_mask=None``) into a block-diagonal causal mask, so that no token
    attends across a row boundary and every row's logits equal its padded row's. A boundary needs the next row's
    first position id to be 0 where the previous row's last is not (rows of at least 2 tokens, or 1-token rows that
    are not next to each other: a prompt is never empty here).

    Returns:
        input_ids, position_ids: (1, N) int64. attention_mask: (1, N) int64 of ones (the token count; not given
        to the model). loss_mask: (1, N) bool, true on the response tokens. sequence_ids: (1, N) int64, the row
        each token belongs to. num_rows: a 0-d int64 tensor holding R. Row i's summed log-probs are those of
        ``pad_pairs`` / ``pad_responses`` row i (``scoring.forward.packed_logps``).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"pack_rows needs one response per prompt, got {len(prompt_ids)} and {len(response_ids)}")
    if not prompt_ids:
        raise ValueError("pack_rows needs at least one row")
    if any(len(prompt) == 0 for prompt in prompt_ids):
        raise ValueError("pack_rows needs a non-empty prompt in every row (a row's first token is never scored)")
    ids, positions, loss, rows = [], [], [], []
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        length = len(prompt) + len(response)
        ids.extend(prompt)
        ids.extend(response)
        positions.extend(range(length))
        loss.extend([False] * len(prompt) + [True] * len(response))
        rows.extend([row] * length)
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
            "loss_mask": torch.tensor([loss], dtype=torch.bool),
            "sequence_ids": torch.tensor([rows], dtype=torch.long),
            "num_rows": torch.tensor(len(prompt_ids), dtype=torch.long)}


def pack_pairs(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
               rejected_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """``pack_rows`` of ``pad_pairs``' 2B rows in its order (prompt + chosen for every pair, then prompt +
    rejected): its per-row log-probs split with ``chunk(2)`` into (chosen, rejected) like ``pad_pairs``'."""
    if not len(prompt_ids) == len(chosen_ids) == len(rejected_ids):
        raise ValueError(f"pack_pairs needs as many prompts as chosen and rejected responses, got "
                         f"{len(prompt_ids)}, {len(chosen_ids)}, {len(rejected_ids)}")
    return pack_rows([*prompt_ids, *prompt_ids], [*chosen_ids, *rejected_ids])


def collate_pairs(rows: PairRows, positions: np.ndarray, pad_id: int, share_prompt: bool = False,
                  padding_free: bool = False) -> dict[str, torch.Tensor]:
    """Model inputs for the pairs at ``positions``, padded to the batch's own longest row: ``pad_pairs`` rows,
    chosen then rejected (2B rows), with ``share_prompt`` ``pack_shared_prompt``'s B rows, or with
    ``padding_free`` ``pack_pairs``' one sequence. Adds ``ref_chosen`` and ``ref_rejected`` (B,) float64 when the
    rows have reference log-probs, and ``chosen_safe``, ``rejected_safe`` (B,) bool."""
    if share_prompt and padding_free:
        raise ValueError("share_prompt and padding_free are two different layouts; choose one")
    prompts = [rows.prompt_ids[i].tolist() for i in positions]
    chosen, rejected = [rows.chosen_ids[i].tolist() for i in positions], [rows.rejected_ids[i].tolist()
                                                                         for i in positions]
    if padding_free:
        batch = pack_pairs(prompts, chosen, rejected)
    else:
        batch = (pack_shared_prompt if share_prompt else pad_pairs)(prompts, chosen, rejected, pad_id)
    if rows.ref_chosen_logp is not None:
        batch["ref_chosen"] = torch.from_numpy(rows.ref_chosen_logp[positions])
        batch["ref_rejected"] = torch.from_numpy(rows.ref_rejected_logp[positions])
    return _with_labels(batch, rows, positions)


def collate_responses(rows: PairRows, positions: np.ndarray, pad_id: int, take_chosen: np.ndarray,
                      padding_free: bool = False) -> dict[str, torch.Tensor]:
    """``pad_responses`` rows (or with ``padding_free`` ``pack_rows``' one sequence) for the pairs at
    ``positions``: prompt + the chosen response where ``take_chosen`` (B,) is true, else prompt + the rejected one;
    plus ``chosen_safe``, ``rejected_safe`` (B,) bool."""
    responses = [(rows.chosen_ids[i] if chosen else rows.rejected_ids[i]).tolist()
                 for i, chosen in zip(positions, take_chosen)]
    prompts = [rows.prompt_ids[i].tolist() for i in positions]
    batch = pack_rows(prompts, responses) if padding_free else pad_responses(prompts, responses, pad_id)
    return _with_labels(batch, rows, positions)


def _with_labels(batch: dict[str, torch.Tensor], rows: PairRows, positions: np.ndarray) -> dict[str, torch.Tensor]:
    batch["chosen_safe"] = torch.from_numpy(rows.chosen_safe[positions])
    batch["rejected_safe"] = torch.from_numpy(rows.rejected_safe[positions])
    return batch
