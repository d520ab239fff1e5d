"""The batch stage of ``prepare``: the reference model scores every pair once, on a Ray Data actor pool.

    ScoreInOrder        the actor: loads the reference model once, scores each block in
                        batches of similar length, puts the log-probs back in the block's row order
    reference_logps     one forward over a batch of pairs (``logprobs.response_logps``, the trainer's own)

GPUs per actor and the scoring dtype follow ``run.use_gpu`` (``score_gpus``, ``scoring_dtype``).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from bfpo_ray.config import DataConfig, ModelConfig
from bfpo_ray.data import schema
from bfpo_ray.logprobs import pad_pairs, response_logps
from bfpo_ray.models import load_causal_lm, resolve_dtype

ACTOR = "_actor"  # "<pid>" of the scoring actor, and its peak RSS in bytes
ACTOR_RSS = "_actor_rss"


def score_gpus(data: DataConfig) -> float:
    """GPUs per scoring actor: ``data.score_gpus_per_actor`` as the Config resolved it from ``run.use_gpu`` (1 with
    GPUs, else 0); a DataConfig built on its own, outside a Config, has no run to follow: 0."""
    return data.score_gpus_per_actor or 0.0


def scoring_dtype(model: ModelConfig, data: DataConfig) -> str:
    """The dtype the reference model is scored in: ``model.dtype``, where "auto" is bfloat16 on GPU actors (the
    default with ``run.use_gpu: true``) and float32 on CPU ones."""
    if model.dtype != "auto":
        return model.dtype
    return "bfloat16" if score_gpus(data) > 0 else "float32"


def reference_logps(
    model,
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log pi_ref of each pair's chosen and rejected response tokens: two (B,) float64 arrays.

    One forward pass over the 2B rows of ``pad_pairs``, scored by ``logprobs.response_logps`` (the trainer's own).
    """
    device = next(model.parameters()).device
    inputs = {
        name: tensor.to(device) for name, tensor in pad_pairs(prompt_ids, chosen_ids, rejected_ids, pad_id).items()
    }
    with torch.inference_mode():
        logps = response_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["loss_mask"])
    chosen, rejected = logps.double().cpu().numpy().reshape(2, -1)
    return chosen, rejected


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ScoreInOrder:
    """Ray Data actor (``map_batches``, ``batch_format="pyarrow"``): loads the reference model once with
    ``from_pretrained`` (eval mode; GPU when the actor has one; ``attn_implementation`` as
    ``model.attn_implementation``); each block is scored in batches of ``batch_size`` pairs taken longest first
    (little padding), and ``ref_chosen_logp``, ``ref_rejected_logp`` are appended in the block's row order. Adds
    the actor's pid and peak RSS to every row (dropped before writing; the manifest reports them)."""

    def __init__(
        self,
        batch_size: int,
        model_path: str,
        trust_remote_code: bool,
        dtype: str,
        pad_id: int,
        attn_implementation: str | None = None,
    ):
        on_gpu = torch.cuda.is_available()
        self.model = load_causal_lm(
            model_path,
            dtype=resolve_dtype(dtype, on_gpu),
            trust_remote_code=trust_remote_code,
            device="cuda" if on_gpu else "cpu",
            attn_implementation=attn_implementation,
        )
        self.pad_id = pad_id
        self.batch_size = batch_size

    def __call__(self, block: pa.Table) -> pa.Table:
        prompt = block.column(schema.PROMPT_IDS).to_pylist()
        chosen_ids = block.column(schema.CHOSEN_IDS).to_pylist()
        rejected_ids = block.column(schema.REJECTED_IDS).to_pylist()
        length = np.array([len(p) + max(len(c), len(r)) for p, c, r in zip(prompt, chosen_ids, rejected_ids)])
        order = np.argsort(-length, kind="stable")
        chosen = np.zeros(block.num_rows)
        rejected = np.zeros(block.num_rows)
        for start in range(0, block.num_rows, self.batch_size):
            rows = order[start : start + self.batch_size]
            chosen[rows], rejected[rows] = reference_logps(
                self.model,
                [prompt[i] for i in rows],
                [chosen_ids[i] for i in rows],
                [rejected_ids[i] for i in rows],
                self.pad_id,
            )
        block = block.append_column(schema.REF_CHOSEN_LOGP, pa.array(chosen, pa.float64()))
        block = block.append_column(schema.REF_REJECTED_LOGP, pa.array(rejected, pa.float64()))
        block = block.append_column(ACTOR, pa.array([str(os.getpid())] * block.num_rows, pa.string()))
        return block.append_column(ACTOR_RSS, pa.array([peak_rss_bytes()] * block.num_rows, pa.int64()))
