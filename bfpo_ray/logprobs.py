"""Log-probabilities of responses: the batch layouts, the chunked float32 log-softmax kernels and the forwards
that turn a batch into per-sequence log-probs, for training, reference scoring and evaluation alike.

Layouts (pure functions of token ids; no model, no Ray):

    pad_pairs           2B rows, prompt + chosen then prompt + rejected (the default layout)
    pack_shared_prompt  B rows, prompt + chosen + prompt[-1] + rejected with a mask that keeps the responses apart
    pad_responses       B rows, prompt + one response (single-response objectives such as SFT)
    pack_rows           padding-free: the rows of pad_pairs / pad_responses end to end in ONE sequence, each with
                        its own position ids from 0 (flash-attention 2 reads the row boundaries from them)
    collate_pairs / collate_responses   the same from a worker's PairRows, plus labels and reference log-probs

Kernels: ``sequence_logps`` (full logits), ``token_logps`` / ``kept_token_logps`` / ``kept_sequence_logps`` (the
logits of the scored positions only, float32 log-softmax in chunks of rows, so no (N, V) float32 tensor exists in
the forward or the backward).

Forwards, one per layout: padded rows (``response_logps``), the shared prompt (``shared_prompt_logps``), the
padding-free sequence (``packed_logps``); ``batch_logps`` picks it from the batch's keys. The lm_head runs only at
the positions that score a response token (``lm_head_at``).

Shapes: B pairs, T the sequence length, V the vocabulary size, N the number of scored (response) tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from bfpo_ray.data.rows import PairRows

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------- layouts


def pad_pairs(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Right-padded model inputs for B pairs, chosen and rejected in one batch of 2B rows.

    Row i < B is ``prompt_ids[i] + chosen_ids[i]``, row B + i is ``prompt_ids[i] + rejected_ids[i]``, padded on the
    right with ``pad_id`` to T = the longest row. Split a per-row result with ``values.chunk(2)`` into
    (chosen, rejected).

    Returns:
        input_ids: (2B, T) int64.
        attention_mask: (2B, T) int64, 1 on real tokens, 0 on padding.
        loss_mask: (2B, T) bool, true exactly on the response tokens (what ``sequence_logps`` scores).
    ``pad_id`` must be a valid token id; padded positions are masked out, so which one does not change results.
    """
    if not len(prompt_ids) == len(chosen_ids) == len(rejected_ids):
        raise ValueError(
            f"pad_pairs needs as many prompts as chosen and rejected responses, got "
            f"{len(prompt_ids)}, {len(chosen_ids)}, {len(rejected_ids)}"
        )
    rows = [(list(p), list(r)) for responses in (chosen_ids, rejected_ids) for p, r in zip(prompt_ids, responses)]
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(rows):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :length] = 1
        loss_mask[row, len(prompt) : length] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pack_shared_prompt(
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    pad_id: int,
) -> dict[str, torch.Tensor]:
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
        raise ValueError(
            f"pack_shared_prompt needs as many prompts as chosen and rejected responses, got "
            f"{len(prompt_ids)}, {len(chosen_ids)}, {len(rejected_ids)}"
        )
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
        seen[:split, :split] = causal[:split, :split]  # prompt, then chosen, causally
        seen[split:end, : p - 1] = True  # rejected part: the prompt bar its last token ...
        seen[split:end, split:end] = causal[: end - split, : end - split]  # ... then itself, causally
        chosen_mask[row, p:split] = True
        rejected_mask[row, split + 1 : end] = True
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "pair_mask": pair_mask,
        "chosen_mask": chosen_mask,
        "rejected_mask": rejected_mask,
    }


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
        loss_mask[row, len(prompt) : length] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pack_rows(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
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
        ``pad_pairs`` / ``pad_responses`` row i (``packed_logps``).
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
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
        "loss_mask": torch.tensor([loss], dtype=torch.bool),
        "sequence_ids": torch.tensor([rows], dtype=torch.long),
        "num_rows": torch.tensor(len(prompt_ids), dtype=torch.long),
    }


def pack_pairs(
    prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]], rejected_ids: Sequence[Sequence[int]]
) -> dict[str, torch.Tensor]:
    """``pack_rows`` of ``pad_pairs``' 2B rows in its order (prompt + chosen for every pair, then prompt +
    rejected): its per-row log-probs split with ``chunk(2)`` into (chosen, rejected) like ``pad_pairs``'."""
    if not len(prompt_ids) == len(chosen_ids) == len(rejected_ids):
        raise ValueError(
            f"pack_pairs needs as many prompts as chosen and rejected responses, got "
            f"{len(prompt_ids)}, {len(chosen_ids)}, {len(rejected_ids)}"
        )
    return pack_rows([*prompt_ids, *prompt_ids], [*chosen_ids, *rejected_ids])


def collate_pairs(
    rows: PairRows, positions: np.ndarray, pad_id: int, share_prompt: bool = False, padding_free: bool = False
) -> dict[str, torch.Tensor]:
    """Model inputs for the pairs at ``positions``, padded to the batch's own longest row: ``pad_pairs`` rows,
    chosen then rejected (2B rows), with ``share_prompt`` ``pack_shared_prompt``'s B rows, or with
    ``padding_free`` ``pack_pairs``' one sequence. Adds ``ref_chosen`` and ``ref_rejected`` (B,) float64 when the
    rows have reference log-probs, and ``chosen_safe``, ``rejected_safe`` (B,) bool."""
    if share_prompt and padding_free:
        raise ValueError("share_prompt and padding_free are two different layouts; choose one")
    prompts = [rows.prompt_ids[i].tolist() for i in positions]
    chosen, rejected = (
        [rows.chosen_ids[i].tolist() for i in positions],
        [rows.rejected_ids[i].tolist() for i in positions],
    )
    if padding_free:
        batch = pack_pairs(prompts, chosen, rejected)
    else:
        batch = (pack_shared_prompt if share_prompt else pad_pairs)(prompts, chosen, rejected, pad_id)
    if rows.ref_chosen_logp is not None:
        batch["ref_chosen"] = torch.from_numpy(rows.ref_chosen_logp[positions])
        batch["ref_rejected"] = torch.from_numpy(rows.ref_rejected_logp[positions])
    return _with_labels(batch, rows, positions)


def collate_responses(
    rows: PairRows, positions: np.ndarray, pad_id: int, take_chosen: np.ndarray, padding_free: bool = False
) -> dict[str, torch.Tensor]:
    """``pad_responses`` rows (or with ``padding_free`` ``pack_rows``' one sequence) for the pairs at
    ``positions``: prompt + the chosen response where ``take_chosen`` (B,) is true, else prompt + the rejected one;
    plus ``chosen_safe``, ``rejected_safe`` (B,) bool."""
    responses = [
        (rows.chosen_ids[i] if chosen else rows.rejected_ids[i]).tolist() for i, chosen in zip(positions, take_chosen)
    ]
    prompts = [rows.prompt_ids[i].tolist() for i in positions]
    batch = pack_rows(prompts, responses) if padding_free else pad_responses(prompts, responses, pad_id)
    return _with_labels(batch, rows, positions)


def _with_labels(batch: dict[str, torch.Tensor], rows: PairRows, positions: np.ndarray) -> dict[str, torch.Tensor]:
    batch["chosen_safe"] = torch.from_numpy(rows.chosen_safe[positions])
    batch["rejected_safe"] = torch.from_numpy(rows.rejected_safe[positions])
    return batch


# ---------------------------------------------------------------------------------------------------- kernels


def sequence_logps(logits: Tensor, labels: Tensor, loss_mask: Tensor, reduction: str = "sum") -> Tensor:
    """Log-probability of the masked (response) tokens of each sequence.

    Args:
        logits: (B, T, V) model outputs; position t predicts token t+1.
        labels: (B, T) token ids of the same sequences.
        loss_mask: (B, T), true where ``labels`` holds a response token to score; padding and prompt are false.
        reduction: "sum" (the paper's code) or "mean" over each sequence's scored tokens.

    Returns:
        (B,) float32 log-probs.

    The log-softmax is taken in float32 one sequence at a time, so at most one (T, V) float32 temporary
    exists beside the logits the model already produced. ``loss_mask[:, 0]`` is ignored (no position predicts
    the first token); a sequence with no scored token gets 0 under either reduction.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be {tuple(logits.shape[:2])} to match logits, got {tuple(labels.shape)}")
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask must be {tuple(labels.shape)} to match labels, got {tuple(loss_mask.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    shifted_logits = logits[:, :-1]
    mask = loss_mask[:, 1:].bool()
    targets = labels[:, 1:].masked_fill(~mask, 0).unsqueeze(-1)
    picked = shifted_logits.gather(-1, targets).squeeze(-1).float()
    normalizers = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in shifted_logits])
    token_logps = (picked - normalizers).masked_fill(~mask, 0.0)
    summed = token_logps.sum(-1)
    return summed if reduction == "sum" else summed / mask.sum(-1).clamp(min=1)


def scored_positions(loss_mask: Tensor) -> Tensor:
    """(B, T) bool: the positions whose logits score a response token (position t predicts token t+1, so t is
    true where ``loss_mask[:, t + 1]`` is); the last position is never true."""
    return torch.nn.functional.pad(loss_mask[:, 1:].bool(), (0, 1), value=False)


CHUNK_ELEMENTS = 1 << 26  # float32 elements per log-sum-exp chunk: 256 MiB (512 tokens of a 128K vocabulary)


def default_chunk_tokens(vocab_size: int) -> int:
    """Rows of (N, V) logits per float32 chunk in ``token_logps``: ``CHUNK_ELEMENTS // V`` (at least 1), so the
    float32 temporaries are bounded by the chunk, not by the number of scored tokens N."""
    return max(1, CHUNK_ELEMENTS // max(int(vocab_size), 1))


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] row by row, computed over chunks of rows in float32.

    Forward and backward each hold at most one (chunk, V) float32 temporary: the float32 copy of a chunk is not
    saved for the backward (the logits, in their own dtype, and the (N,) float32 log-sum-exps are), and the backward
    writes each chunk's gradient, ``g * (onehot(target) - softmax)``, straight into the (N, V) gradient of the
    logits, in the logits' dtype. The numbers are those of ``gather(x.float()) - logsumexp(x.float())`` and of its
    autograd gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor:
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        normalizers = torch.empty_like(out)
        for start in range(0, logits.shape[0], chunk_tokens):
            part = logits[start : start + chunk_tokens].float()
            normalizers[start : start + chunk_tokens] = torch.logsumexp(part, dim=-1)
            out[start : start + chunk_tokens] = part.gather(-1, targets[start : start + chunk_tokens, None]).squeeze(
                -1
            )
        out -= normalizers
        ctx.save_for_backward(logits, targets, normalizers)
        ctx.chunk_tokens = chunk_tokens
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, targets, normalizers = ctx.saved_tensors
        chunk = ctx.chunk_tokens
        grad = torch.empty_like(logits)
        grad_out = grad_out.float()
        for start in range(0, logits.shape[0], chunk):
            stop = start + chunk
            weight = grad_out[start:stop, None]
            part = (logits[start:stop].float() - normalizers[start:stop, None]).exp_().mul_(-weight)
            part.scatter_add_(-1, targets[start:stop, None], weight)
            grad[start:stop] = part
        return grad, None, None


def token_logps(logits: Tensor, targets: Tensor, chunk_tokens: int | None = None) -> Tensor:
    """(N,) float32 log-probability of ``targets`` (N,) under ``logits`` (N, V), in any dtype: the float32
    log-softmax runs over chunks of ``chunk_tokens`` rows (default ``default_chunk_tokens(V)``), so no (N, V)
    float32 tensor exists in the forward or the backward; the result and its gradient do not depend on the chunk."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be (N, V) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    chunk = default_chunk_tokens(logits.shape[-1]) if chunk_tokens is None else int(chunk_tokens)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _ChunkedTokenLogps.apply(logits, targets, chunk)


def kept_token_logps(
    kept_logits: Tensor, labels: Tensor, loss_mask: Tensor, chunk_tokens: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probs of the scored tokens from the logits of the scored positions only.

    Args:
        kept_logits: (N, V), the logits at the true entries of ``scored_positions(loss_mask)`` in row-major order
            (what a Hugging Face causal LM returns within ``lm_head_at(model, scored_positions(loss_mask))``), in
            the model's dtype.
        labels, loss_mask: (B, T), as for ``sequence_logps``.
        chunk_tokens: rows per float32 chunk (``token_logps``); None: ``default_chunk_tokens(V)``.

    Returns:
        rows, columns: (N,) where each scored token sits in ``labels``; logps: (N,) float32. No float32 temporary
        is larger than (chunk_tokens, V), in the forward or the backward.
    """
    if loss_mask.shape != labels.shape or labels.dim() != 2:
        raise ValueError(
            f"labels and loss_mask must be the same (B, T), got {tuple(labels.shape)} and {tuple(loss_mask.shape)}"
        )
    rows, positions = scored_positions(loss_mask).nonzero(as_tuple=True)
    if kept_logits.dim() != 2 or kept_logits.shape[0] != len(rows):
        raise ValueError(
            f"kept_logits must be (N, V) with N = {len(rows)} scored positions, got {tuple(kept_logits.shape)}"
        )
    return rows, positions + 1, token_logps(kept_logits, labels[rows, positions + 1], chunk_tokens)


def kept_sequence_logps(
    kept_logits: Tensor, labels: Tensor, loss_mask: Tensor, reduction: str = "sum", chunk_tokens: int | None = None
) -> Tensor:
    """``sequence_logps`` from the logits of the scored positions only (the lm_head run on response positions):
    (B,) float32, equal to ``sequence_logps`` of the full logits. Arguments as for ``kept_token_logps``."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    rows, _, logps = kept_token_logps(kept_logits, labels, loss_mask, chunk_tokens)
    summed = torch.zeros(labels.shape[0], dtype=torch.float32, device=kept_logits.device).index_add(0, rows, logps)
    return summed if reduction == "sum" else summed / loss_mask[:, 1:].sum(-1).clamp(min=1)


# ---------------------------------------------------------------------------------------------------- forwards


@contextlib.contextmanager
def lm_head_at(model, positions: Tensor):
    """Within the block, the model's output head (``get_output_embeddings()``: the lm_head) sees only the hidden
    states at ``positions`` ((B, T) bool), so it returns (N, V) logits for the N true positions in row-major order.

    A forward pre-hook on the head, so the model's own forward runs unchanged (DeepSpeed's hooks and ZeRO-3 gathers
    included) and the result does not depend on how a transformers version reads ``logits_to_keep`` (a boolean
    mask only from 5.21 on). A head that is called with other shapes is left alone."""
    head = getattr(model, "module", model).get_output_embeddings()

    def keep(_, args):
        hidden = args[0]
        if hidden.dim() == 3 and hidden.shape[:2] == positions.shape:
            return (hidden[positions], *args[1:])
        return None

    handle = head.register_forward_pre_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def response_logps(
    model, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, reduction: str = "sum"
) -> Tensor:
    """(B,) log-probs of the response tokens of a batch from one forward of a Hugging Face causal LM, whose lm_head
    runs only at the scored positions (``lm_head_at``): (N, V) logits in the model's dtype for the N scored tokens,
    whose float32 log-softmax runs in chunks of rows (``token_logps``). A model that returns every position's
    (B, T, V) logits anyway is scored on the same rows of them: the same numbers."""
    scored = scored_positions(loss_mask)
    with lm_head_at(model, scored):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if logits.dim() == 3:  # a model that computed every position
        logits = logits[scored]
    return kept_sequence_logps(logits, input_ids, loss_mask, reduction)


def shared_prompt_logps(
    model, input_ids: Tensor, pair_mask: Tensor, position_ids: Tensor, chosen_mask: Tensor, rejected_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each pair's chosen and rejected response from ONE row per pair that holds the prompt
    once (the layout of ``pack_shared_prompt``): the same numbers as ``response_logps``
    on the two rows prompt + chosen and prompt + rejected, with the prompt's tokens computed once.

    Args:
        input_ids, position_ids: (B, T). pair_mask: (B, 1, T, T) bool, which tokens each token attends to.
        chosen_mask, rejected_mask: (B, T) bool, the chosen and the rejected response tokens.

    Returns:
        (B,) float32 chosen and (B,) float32 rejected log-probs.
    """
    dtype = next(model.parameters()).dtype
    additive = torch.zeros(pair_mask.shape, dtype=dtype, device=pair_mask.device).masked_fill(
        ~pair_mask, torch.finfo(dtype).min
    )  # a float mask: every attention implementation adds it to the scores
    scored = chosen_mask | rejected_mask
    with lm_head_at(model, scored_positions(scored)):
        logits = model(input_ids=input_ids, attention_mask=additive, position_ids=position_ids, use_cache=False).logits
    if logits.dim() == 3:  # a model that computed every position
        logits = logits[scored_positions(scored)]
    rows, columns, token_logps = kept_token_logps(logits, input_ids, scored)
    from_chosen = chosen_mask[rows, columns]
    sums = torch.zeros(2, input_ids.shape[0], dtype=torch.float32, device=logits.device)
    sums = sums.index_put((from_chosen.logical_not().long(), rows), token_logps, accumulate=True)
    return sums[0], sums[1]


def packed_logps(
    model,
    input_ids: Tensor,
    position_ids: Tensor,
    loss_mask: Tensor,
    sequence_ids: Tensor,
    num_rows: int,
    reduction: str = "sum",
) -> Tensor:
    """(R,) log-probs of each row's response tokens from ONE forward over the padding-free sequence of
    ``pack_rows`` (all (1, N)): the same numbers as ``response_logps`` on the padded rows.

    No attention mask goes to the model: transformers reads the row boundaries from ``position_ids`` (restarting
    at 0), as varlen flash-attention 2 on GPU, or as a block-diagonal causal mask with sdpa or eager (correct, but
    an (N, N) mask: the tests' path, not a fast one). The token a row's last position predicts is the next row's
    first, a prompt token, which ``loss_mask`` never scores; the lm_head runs on the scored positions only."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    scored = scored_positions(loss_mask)
    with lm_head_at(model, scored):
        logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False).logits
    if logits.dim() == 3:  # a model that computed every position
        logits = logits[scored]
    _, columns, token_logps = kept_token_logps(logits, input_ids, loss_mask)
    rows = sequence_ids[0, columns]
    sums = torch.zeros(int(num_rows), dtype=torch.float32, device=logits.device).index_add(0, rows, token_logps)
    if reduction == "mean":
        counts = torch.zeros(int(num_rows), dtype=torch.float32, device=logits.device).index_add(
            0, rows, torch.ones_like(token_logps)
        )
        sums = sums / counts.clamp(min=1)
    return sums


def batch_logps(model, batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """(rows,) summed log-probs of each row's response tokens and (rows,) the number of those tokens, from one
    forward of a ``bfpo_ray.logprobs`` batch (moved to ``device``). A shared-prompt batch of B pairs gives
    2B values, chosen then rejected, as a ``pad_pairs`` batch does, and so does a padding-free one."""
    if "sequence_ids" in batch:
        inputs = {key: batch[key].to(device) for key in ("input_ids", "position_ids", "loss_mask", "sequence_ids")}
        num_rows = int(batch["num_rows"])
        logps = packed_logps(model, **inputs, num_rows=num_rows)
        lengths = torch.zeros(num_rows, dtype=torch.long, device=device).index_add(
            0, inputs["sequence_ids"][0], inputs["loss_mask"][0].long()
        )
        return logps, lengths
    if "pair_mask" in batch:
        inputs = {
            key: batch[key].to(device)
            for key in ("input_ids", "pair_mask", "position_ids", "chosen_mask", "rejected_mask")
        }
        chosen, rejected = shared_prompt_logps(model, **inputs)
        return (
            torch.cat([chosen, rejected]),
            torch.cat([inputs["chosen_mask"].sum(-1), inputs["rejected_mask"].sum(-1)]),
        )
    input_ids, attention_mask, loss_mask = (
        batch[key].to(device) for key in ("input_ids", "attention_mask", "loss_mask")
    )
    return response_logps(model, input_ids, attention_mask, loss_mask), loss_mask[:, 1:].sum(-1)
