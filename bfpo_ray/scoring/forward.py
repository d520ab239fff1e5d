"""The forward that turns a batch into per-sequence log-probs, for training, reference scoring and evaluation.

The lm_head runs only at the positions that score a response token (``logits_to_keep`` as a boolean mask,
transformers >= 5); the log-prob math itself is in ``bfpo_ray.loss``. One forward per layout of
``bfpo_ray.scoring.layouts``: padded rows (``response_logps``), the shared prompt (``shared_prompt_logps``) and the
padding-free sequence (``packed_logps``); ``batch_logps`` picks it from the batch's keys.
"""
from __future__ import annotations

import torch

from bfpo_ray.loss import kept_sequence_logps, kept_token_logps, scored_positions

Tensor = torch.Tensor


def response_logps(model, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor,
                   reduction: str = "sum") -> Tensor:
    """(B,) log-probs of the response tokens of a batch from one forward of a Hugging Face causal LM, whose lm_head
    runs only at the scored positions (``logits_to_keep`` as a boolean mask, transformers >= 5): (N, V) logits in
    the model's dtype for the N scored tokens, whose float32 log-softmax runs in chunks of rows
    (``loss.token_logps``). A model that returns every position's (B, T, V) logits anyway is scored on the same
    rows of them: the same numbers."""
    scored = scored_positions(loss_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=scored).logits
    if logits.dim() == 3:  # a model that computed every position
        logits = logits[scored]
    return kept_sequence_logps(logits, input_ids, loss_mask, reduction)


def shared_prompt_logps(model, input_ids: Tensor, pair_mask: Tensor, position_ids: Tensor, chosen_mask: Tensor,
                        rejected_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each pair's chosen and rejected response from ONE row per pair that holds the prompt
    once (the layout of ``bfpo_ray.scoring.layouts.pack_shared_prompt``): the same numbers as ``response_logps``
    on the two rows prompt + chosen and prompt + rejected, with the prompt's tokens computed once.

    Args:
        input_ids, position_ids: (B, T). pair_mask: (B, 1, T, T) bool, which tokens each token attends to.
        chosen_mask, rejected_mask: (B, T) bool, the chosen and the rejected response tokens.

    Returns:
        (B,) float32 chosen and (B,) float32 rejected log-probs.
    """
    dtype = next(model.parameters()).dtype
    additive = torch.zeros(pair_mask.shape, dtype=dtype, device=pair_mask.device).masked_fill(
        ~pair_mask, torch.finfo(dtype).min)  # a float mask: every attention implementation adds it to the scores
    scored = chosen_mask | rejected_mask
    logits = model(input_ids=input_ids, attention_mask=additive, position_ids=position_ids, use_cache=False,
                   logits_to_keep=scored_positions(scored)).logits
    if logits.dim() == 3:  # a model that computed every position
        logits = logits[scored_positions(scored)]
    rows, columns, token_logps = kept_token_logps(logits, input_ids, scored)
    from_chosen = chosen_mask[rows, columns]
    sums = torch.zeros(2, input_ids.shape[0], dtype=torch.float32, device=logits.device)
    sums = sums.index_put((from_chosen.logical_not().long(), rows), token_logps, accumulate=True)
    return sums[0], sums[1]


def packed_logps(model, input_ids: Tensor, position_ids: Tensor, loss_mask: Tensor, sequence_ids: Tensor,
                 num_rows: int, reduction: str = "sum") -> Tensor:
    """(R,) log-probs of each row's response tokens from ONE forward over the padding-free sequence of
    ``bfpo_ray.scoring.layouts.pack_rows`` (all (1, N)): the same numbers as ``response_logps`` on the padded rows.

    No attention mask goes to the model: transformers reads the row boundaries from ``position_ids`` (restarting
    at 0), as varlen flash-attention 2 on GPU, or as a block-diagonal causal mask with sdpa or eager (correct, but
    an (N, N) mask: the tests' path, not a fast one). The token a row's last position predicts is the next row's
    first, a prompt token, which ``loss_mask`` never scores; the lm_head runs on the scored positions only."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    scored = scored_positions(loss_mask)
    logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False,
                   logits_to_keep=scored).logits
    if logits.dim() == 3:  # a model that computed every position
        logits = logits[scored]
    _, columns, token_logps = kept_token_logps(logits, input_ids, loss_mask)
    rows = sequence_ids[0, columns]
    sums = torch.zeros(int(num_rows), dtype=torch.float32, device=logits.device).index_add(0, rows, token_logps)
    if reduction == "mean":
        counts = torch.zeros(int(num_rows), dtype=torch.float32, device=logits.device).index_add(
            0, rows, torch.ones_like(token_logps))
        sums = sums / counts.clamp(min=1)
    return sums


def batch_logps(model, batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """(rows,) summed log-probs of each row's response tokens and (rows,) the number of those tokens, from one
    forward of a ``bfpo_ray.scoring.layouts`` batch (moved to ``device``). A shared-prompt batch of B pairs gives
    2B values, chosen then rejected, as a ``pad_pairs`` batch does, and so does a padding-free one."""
    if "sequence_ids" in batch:
        inputs = {key: batch[key].to(device) for key in ("input_ids", "position_ids", "loss_mask", "sequence_ids")}
        num_rows = int(batch["num_rows"])
        logps = packed_logps(model, **inputs, num_rows=num_rows)
        lengths = torch.zeros(num_rows, dtype=torch.long, device=device).index_add(
            0, inputs["sequence_ids"][0], inputs["loss_mask"][0].long())
        return logps, lengths
    if "pair_mask" in batch:
        inputs = {key: batch[key].to(device) for key in ("input_ids", "pair_mask", "position_ids", "chosen_mask",
                                                         "rejected_mask")}
        chosen, rejected = shared_prompt_logps(model, **inputs)
        return (torch.cat([chosen, rejected]),
                torch.cat([inputs["chosen_mask"].sum(-1), inputs["rejected_mask"].sum(-1)]))
    input_ids, attention_mask, loss_mask = (batch[key].to(device) for key in ("input_ids", "attention_mask",
                                                                             "loss_mask"))
    return response_logps(model, input_ids, attention_mask, loss_mask), loss_mask[:, 1:].sum(-1)
