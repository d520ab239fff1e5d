#!/usr/bin/env python
"""Training throughput and memory: bfpo-ray's trainer (Ray Train + DeepSpeed) against TRL's DPOTrainer (IPO loss)
on the same Llama, the same pairs and the same batch size, with model FLOP utilisation (MFU) against a large
matmul timed in the same invocation and the peak memory of each trainer process.

    python bench/train_throughput.py --max-busy 0.15     # the 4.2M toy: 3 rounds, about 10 minutes on 2 idle cores
    python bench/train_throughput.py --rounds 1 --steps 8 --warmup-steps 4     # a quick look
    python bench/train_throughput.py --model smollm2 --rounds 2 --warmup-steps 1 --steps 2 --max-busy 0.3
                                     # SmolLM2-135M at the paper's setting (down_proj trained, max length 512)
    ... --model smollm2 --mode checkpointing   # ours without / with train.gradient_checkpointing
    ... --model smollm2 --mode workers         # ours: 1 worker x 2 threads / 2 workers x 1 thread, same batch
    ... --model llama1b --device cuda --zero-stage 2 --rounds 1 --warmup-steps 4 --steps 12
                                     # one GPU: ours against TRL, bf16, the same model, pairs and batch
    bench/gpu_check.sh                         # a 1B-class Llama on one GPU (runs this script with --device cuda)

Models (``--model``): ``tiny`` (below); ``smollm2``: SmolLM2-135M-Instruct, the model ``python -m bfpo_ray
import-model`` writes to ~/.cache/bfpo_ray/models/SmolLM2-135M-Instruct when it is there (its own tokenizer and
chat template; the synthetic pairs use words that are one token each), else built from its config with random
weights (49152 vocab, hidden 576, 30 layers, 9 heads / 3 KV heads) and the word tokenizer; ``llama1b``: a
Llama-3.2-1B-shaped model from a config (1.24B parameters), for the GPU. Both real shapes default to the paper's
setting: only ``down_proj`` trained (``--trainable``; both trainers), max length 512, prompts up to 256, prompts of
~128 and responses of ~224 words (+-25%), and a dataset of batch x steps pairs (each trainer sees every pair once:
the reference scoring, ours in ``prepare`` and TRL's precompute, costs a full forward per pair).

Memory: the peak resident set (VmHWM of /proc/<pid>/status) of each trainer process up to its last timed step
(ours: the Ray Train worker, watched from outside since the loop has no hook; TRL: its process), and the peak of
the timed steps over the RSS after the warm-up steps ("step peak-base": activations and temporaries, after the
allocator has kept what the warm-up steps freed), read by resetting VmHWM (``clear_refs``) after the warm-up. On a
GPU (``--device cuda``): each trainer process's largest nvidia-smi used_memory (ours: the Ray Train worker; TRL: its
process; PyTorch's cache and the CUDA context included), sampled every 0.25 s by the same code for both.

What runs:
  1. Once: seeded synthetic pairs (the chosen response stays on the prompt's topic, the rejected one is random
     words; one word = one token under a word-level tokenizer), written as a generic-pairs JSONL; a tokenizer
     (bfpo_ray.tiny_model.train_word_tokenizer, vocab 2048) and, for ``--model tiny``, a randomly initialised
     4.2M-parameter Llama (hidden 256, intermediate 688, 4 layers, 4 heads, fp32;
     bfpo_ray.tiny_model.save_tiny_llama; the other models are above); then ``prepare`` (the
     real data pipeline: tokenize + reference log-probs on Ray Data), whose time is not counted, like TRL's
     precompute.
  2. ``--rounds`` times, alternating the order (ours, TRL; then TRL, ours; ...), each run in its own subprocess so
     that nothing (Ray, threads, allocator state) carries over:
       - matmul: a 2048^3 fp32 matmul on ``--threads`` threads -> GFLOP/s (median of ``--matmul-reps``);
       - ours: ``bfpo_ray.train.launch.train`` on a local Ray cluster with ONE worker of ``--threads`` CPUs (or
         ``--workers`` workers sharing them; Ray sets OMP_NUM_THREADS from them; a probe worker with the same
         resources reports torch.get_num_threads()), train.trainable=--trainable, train.loss=ipo (or --loss bfpo),
         micro_batch_pairs=--batch-pairs / workers, grad_accum=1, zero_stage=--zero-stage,
         share_prompt=--share-prompt, gradient_checkpointing, padding_free, log_every=--warmup-steps, no eval
         split, checkpoint only at the end;
       - TRL: ``DPOTrainer`` with loss_type ipo, precompute_ref_log_probs=True, bf16=False (--trl-bf16: True),
         gradient_checkpointing as ours' (TRL defaults both to True), use_cpu, torch.set_num_threads(--threads), the
         same trained parameters (requires_grad on the --trainable ones only), the same pairs in conversational form
         (so TRL's chat-template tokenization gives exactly our token ids: checked, ``same_tokens``),
         per_device_train_batch_size=--batch-pairs, max_length=--max-length. With ``--device cuda``: on the GPU
         (use_cpu=False), the fp32 model under bf16 autocast (bf16=True, TRL's default; ours is bf16 with fp32
         master weights under DeepSpeed: both keep 16 bytes of weights, gradients and AdamW state per trained
         parameter), model.attn_implementation as ours (--attn), a CUDA synchronize at every step end.
     ``--mode checkpointing`` and ``--mode workers`` run two settings of ours instead, alternating the same way.
  3. A table per run, the medians, and one final JSON line.

Timing (both trainers: ``--warmup-steps`` steps excluded, then ``--steps`` timed steps in windows of
``--warmup-steps`` steps):
  - TRL: a TrainerCallback records the wall clock at every optimizer step end; start-up and the reference
    precompute (at DPOTrainer construction) are outside.
  - ours: the trainer logs train/* every ``log_every = --warmup-steps`` steps to TensorBoard on rank 0. A window is
    the wall clock between two consecutive events, so it contains the steps AND the trainer's own per-log work
    (metric all-reduce, ray.train.report, TensorBoard flush); start-up, Ray Data, the data load into the worker and
    the final checkpoint/export are outside. The trainer's own ``train/pairs_per_s`` (which leaves the per-log work
    out) is printed beside it.
  Per run: pairs/s and tokens/s over all timed windows (the headline numbers), the median window and the fastest
  window (a hint of the speed without interference: on a shared machine other processes slow some windows down).
  Tokens are non-padding tokens of the forward, i.e. the attention-mask sum: ours from train/tokens_per_s, TRL from
  num_input_tokens_seen="non_padding" (the prompt counted once per row: twice per pair, or once plus one token
  with --share-prompt).
  ``--max-busy`` waits before every run until the machine's CPUs are nearly idle; the CPU use seen just before the
  run and the matmul rate just before/after it are printed with it, so a disturbed run can be recognised.

Model FLOPs (per sequence of T tokens of which R are response tokens; both trainers take reference log-probs from a
precomputed column, so there is no reference forward; with every parameter trained):
      6 * N_blocks * T            forward + backward of the transformer blocks' linear layers (q,k,v,o,gate,up,down)
    + 6 * N_head * R              the lm_head (vocab x hidden matmul) on the positions the loss needs: a logit is
                                  needed only where a response token is predicted (computing it on prompt positions,
                                  as both trainers do today, is extra work, not model FLOPs)
    + 6 * L * d * T^2             attention scores and values (QK^T, AV) forward + backward over the causal half
  summed over both rows of every pair and averaged over the dataset's pairs (both trainers sample it uniformly) ->
  FLOPs per pair. With --share-prompt our run computes one row of T = P + C + 1 + R tokens per pair, and its
  attention term counts only the (query, key) pairs its mask allows (12 * L * d per pair of tokens); the FLOPs it
  skips are not counted for it. Achieved model FLOP/s = pairs/s x FLOPs per pair of the run's layout;
  MFU = that / matmul FLOP/s (the mean of the matmul rates measured just before and just after the run; "MFU best"
  divides the fastest window's rate by the larger of the two). Embedding lookups, norms, softmax, optimizer and
  loss are not counted.
  ``mfu_all_logits`` counts the lm_head on every position instead (6 * N_head * T).
  With only ``down_proj`` trained (the paper's setting) the backward computes input gradients everywhere above the
  first layer and weight gradients of down_proj only: blocks (4L - 2) * N_layer * T + 2 * N_down * T (layer 0 needs
  no input gradient: nothing below it trains), attention (12L - 8) * d * (attended pairs), lm_head 4 * N_head * R
  (frozen, tied to the embedding). Recomputation under gradient checkpointing is not model FLOPs.

Fair-comparison notes: TRL's IPO loss is length-normalised while ours sums log-probs (compare speed, not loss);
TRL computes extra per-step metrics (entropy, token accuracy, mean logits) as part of its cost; both trainers run
plain fp32 AdamW with gradient clipping at 1.0; our run keeps Ray's default worker niceness (+15), which only
matters when other processes compete for the CPUs. On a shared 2-core machine other processes distort the numbers
badly (a 2-thread job whose threads get descheduled can slow down 10x): use --max-busy, and compare runs of the same
invocation.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

SCRIPT = Path(__file__).resolve()
MATMUL_SIZE = 2048
TAU = 0.01  # IPO's tau; TRL calls it beta
LEARNING_RATE = 1e-6
IMPORTED_SMOLLM2 = Path.home() / ".cache" / "bfpo_ray" / "models" / "SmolLM2-135M-Instruct"  # import-model's output
SHAPES = {  # Llama configs of real models, for --model (random weights; nothing downloads)
    "smollm2": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
    },  # HuggingFaceTB/SmolLM2-135M-Instruct's config.json
    "llama1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
    },  # meta-llama/Llama-3.2-1B's shape (1.24B parameters)
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (ours, TRL), order alternating (default 3)")
    p.add_argument(
        "--steps",
        type=int,
        default=24,
        help="timed optimizer steps per run; a multiple of --warmup-steps (default 24)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=4,
        help="untimed steps at the start of every run; also ours' log_every (default 4)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the pairs, the model init and both trainers")
    p.add_argument(
        "--model",
        choices=("tiny", *SHAPES),
        default="tiny",
        help="tiny: the 4.2M toy; smollm2: SmolLM2-135M (the imported model if present, else built from "
        "its config with random weights); llama1b: a Llama-3.2-1B-shaped model built from a config",
    )
    p.add_argument(
        "--model-dir",
        default=None,
        help=f"smollm2: the model directory to use (default {IMPORTED_SMOLLM2} when it exists)",
    )
    p.add_argument(
        "--trainable",
        choices=("all", "down_proj"),
        default=None,
        help="trained parameters, both trainers (default: all for tiny, down_proj, the paper's, otherwise)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="pairs in the dataset (default 512 for tiny; otherwise batch x (warm-up + timed steps), so "
        "each trainer sees every pair once)",
    )
    p.add_argument("--batch-pairs", type=int, default=8, help="pairs per optimizer step (default 8)")
    p.add_argument(
        "--prompt-len", type=int, default=None, help="mean prompt words (+-25%%; default 64 for tiny, 128 otherwise)"
    )
    p.add_argument(
        "--resp-len", type=int, default=None, help="mean response words (+-25%%; default 96 for tiny, 224 otherwise)"
    )
    p.add_argument("--max-length", type=int, default=512, help="data.max_length / TRL's max_length (default 512)")
    p.add_argument("--max-prompt-length", type=int, default=256, help="data.max_prompt_length (default 256)")
    p.add_argument("--threads", type=int, default=2, help="torch threads / CPUs of our worker (default 2)")
    p.add_argument(
        "--zero-stage", type=int, choices=(0, 2, 3), default=0, help="ours: DeepSpeed ZeRO stage (default 0)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="ours in --mode compare: this many Ray Train workers of --threads/--workers threads each, "
        "the same global batch (default 1)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="ours: train.gradient_checkpointing")
    p.add_argument(
        "--padding-free",
        action="store_true",
        help="ours: train.padding_free (needs --attn flash_attention_2, so --device cuda)",
    )
    p.add_argument(
        "--mode",
        choices=("compare", "checkpointing", "workers"),
        default="compare",
        help="compare: ours against TRL; checkpointing: ours without and with gradient checkpointing; "
        "workers: ours with one worker of --threads threads against --threads workers of one "
        "thread each (same global batch)",
    )
    p.add_argument(
        "--trl-bf16",
        action="store_true",
        help="TRL: bf16=True (its default; mixed precision, autocast on CPU) instead of fp32",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: both trainers on one GPU (ours: run.use_gpu, bf16; TRL: bf16 autocast), MFU against a bf16 matmul",
    )
    p.add_argument(
        "--attn",
        choices=("sdpa", "eager", "flash_attention_2"),
        default=None,
        help="model.attn_implementation (default: transformers' own, sdpa)",
    )
    p.add_argument("--loss", choices=("ipo", "bfpo"), default="ipo", help="ours: loss (default ipo, TRL's work)")
    p.add_argument(
        "--share-prompt",
        action="store_true",
        help="ours: train.share_prompt (one row per pair, the prompt computed once)",
    )
    p.add_argument("--only", choices=("both", "ours", "trl"), default="both", help="which trainers to run")
    p.add_argument("--matmul-reps", type=int, default=10, help="timed matmuls per measurement (default 10)")
    p.add_argument(
        "--max-busy",
        type=float,
        default=None,
        help="before each run, wait until the machine's CPUs are at most this busy (0-1, sampled over "
        "3 s from /proc/stat), up to --max-wait seconds; for shared machines (default: no waiting)",
    )
    p.add_argument("--max-wait", type=float, default=900, help="longest wait for --max-busy, seconds (default 900)")
    p.add_argument("--workdir", default=None, help="where data, model and runs go (default: a temporary directory)")
    p.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)  # internal: one run, in a subprocess
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tiny = args.model == "tiny"
    args.trainable = args.trainable or ("all" if tiny else "down_proj")
    args.prompt_len = args.prompt_len or (64 if tiny else 128)
    args.resp_len = args.resp_len or (96 if tiny else 224)
    args.pairs = args.pairs or (512 if tiny else args.batch_pairs * (args.warmup_steps + args.steps))
    args.trl_bf16 = args.trl_bf16 or args.device == "cuda"  # on the GPU TRL runs its default bf16 autocast
    if args.device == "cpu":  # DeepSpeed's CPU accelerator, here and in every child and Ray worker (never on a GPU:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # its CPU tensors cannot go through NCCL)
    if args.mode != "compare" and args.only == "trl":
        p.error(f"--mode {args.mode} runs ours only")
    if args.workers < 1 or args.threads % args.workers or args.batch_pairs % args.workers:
        p.error("--workers must divide --threads and --batch-pairs")
    if args.steps <= 0 or args.warmup_steps <= 0 or args.steps % args.warmup_steps:
        p.error("--steps must be a positive multiple of --warmup-steps")
    return args


# --------------------------------------------------------------------------------------------------- data, model


def pseudo_words(count: int, seed: int) -> list[str]:
    """``count`` distinct two-syllable pseudo-words, in a seeded order."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(pair) for pair in itertools.product(syllables, repeat=2)]
    if count > len(words):
        raise ValueError(f"at most {len(words)} words, asked for {count}")
    random.Random(seed).shuffle(words)
    return words[:count]


def synthetic_pairs(
    count: int, prompt_len: int, resp_len: int, words: list[str], seed: int, topics: int = 8
) -> list[dict]:
    """Generic-adapter rows: prompt and chosen drawn from one topic's words, rejected from all words; lengths are
    the means +-25% (uniform), at least 4 words; both responses safe (BFPO reduces to IPO on these)."""
    rng = random.Random(seed)
    topic_words = [words[i::topics] for i in range(topics)]

    def length(mean: int) -> int:
        return max(4, round(mean * rng.uniform(0.75, 1.25)))

    rows = []
    for _ in range(count):
        topic = topic_words[rng.randrange(topics)]
        rows.append(
            {
                "prompt": " ".join(rng.choices(topic, k=length(prompt_len))),
                "chosen": " ".join(rng.choices(topic, k=length(resp_len))),
                "rejected": " ".join(rng.choices(words, k=length(resp_len))),
                "chosen_safe": True,
                "rejected_safe": True,
            }
        )
    return rows


def single_token_words(tokenizer, count: int, seed: int) -> list[str]:
    """``count`` lower-case ASCII words (3-8 letters) that a byte-level BPE tokenizer encodes as one token each after
    a space ("Ġword" in its vocabulary), in a seeded order: text of N such words is about N tokens."""
    words = sorted(
        {
            token[1:]
            for token in tokenizer.get_vocab()
            if token.startswith("Ġ")
            and token[1:].isascii()
            and token[1:].isalpha()
            and token[1:].islower()
            and 3 <= len(token) - 1 <= 8
        }
    )
    if len(words) < count:
        raise ValueError(f"the tokenizer has {len(words)} single-token words, {count} needed")
    random.Random(seed).shuffle(words)
    return words[:count]


def save_llama_from_config(out_dir: Path, tokenizer, shape: dict, seed: int, dtype: str) -> Path:
    """A randomly initialised Llama of ``shape`` (a SHAPES entry; the vocabulary stays the shape's, larger than
    the word tokenizer's, so the embedding and lm_head cost what the real model's do) saved with the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out_dir / "config.json").exists():  # built by an earlier invocation with the same --workdir
        return out_dir
    torch.manual_seed(seed)
    config = LlamaConfig(
        **shape,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 1B init takes a minute on CPU
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def model_dtype(args) -> str:
    return "bfloat16" if args.device == "cuda" else "float32"


def build_inputs(args, workdir: Path) -> dict:
    """Pairs JSONL, tokenizer + model directory, and the prepared (scored) dataset; returns their paths."""
    import ray

    from bfpo_ray.config import config_from_dict
    from bfpo_ray.prepare.dataset import build as prepare
    from bfpo_ray.toyworld.tiny_model import SPECIAL_TOKENS, save_tiny_llama, train_word_tokenizer

    vocab = 2048
    model_source = "built from its config, random weights"
    imported = Path(args.model_dir) if args.model_dir else IMPORTED_SMOLLM2
    if args.model == "smollm2" and (imported / "config.json").exists() and (imported / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(imported))
        words = single_token_words(tokenizer, vocab, args.seed)
        rows = synthetic_pairs(args.pairs, args.prompt_len, args.resp_len, words, args.seed)
        model_dir, model_source = imported, f"imported model at {imported}"
    else:
        words = pseudo_words(vocab - len(SPECIAL_TOKENS), args.seed)
        rows = synthetic_pairs(args.pairs, args.prompt_len, args.resp_len, words, args.seed)
        tokenizer = train_word_tokenizer(
            (text for row in rows for text in (row["prompt"], row["chosen"], row["rejected"])), vocab_size=vocab
        )
        if args.model == "tiny":
            model_dir = save_tiny_llama(
                workdir / "model",
                tokenizer,
                hidden_size=256,
                num_layers=4,
                num_heads=4,
                intermediate_size=688,
                max_positions=512,
                seed=args.seed,
            )
        else:
            model_dir = save_llama_from_config(
                workdir / f"model-{args.model}", tokenizer, SHAPES[args.model], args.seed, model_dtype(args)
            )
    pairs_path = workdir / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = config_from_dict(
        {
            "model": {"path": str(model_dir), "dtype": model_dtype(args)},
            "data": {
                "sources": [{"adapter": "generic", "path": str(pairs_path), "role": "helpful", "name": "bench"}],
                "eval_fraction": 0.0,
                "max_length": args.max_length,
                "max_prompt_length": args.max_prompt_length,
                "seed": args.seed,
                "cache_dir": str(workdir / "data"),
                "score_actors": 1,
                "score_batch_size": 16 if args.model == "tiny" else 4,
            },
            "run": {"use_gpu": args.device == "cuda"},
        }
    )
    dataset_dir = prepare(cfg)
    ray.shutdown()
    return {
        "pairs": str(pairs_path),
        "model": str(model_dir),
        "dataset": str(dataset_dir),
        "vocab": len(tokenizer),
        "model_source": model_source,
    }


def read_token_rows(dataset_dir: str) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids) of every training pair of the prepared dataset."""
    import pyarrow.parquet as pq

    from bfpo_ray.data import schema

    table = pq.read_table(schema.split_dir(dataset_dir, "train", "helpful"))
    return list(
        zip(*(table.column(c).to_pylist() for c in (schema.PROMPT_IDS, schema.CHOSEN_IDS, schema.REJECTED_IDS)))
    )


def token_digest(rows) -> str:
    """Order-free fingerprint of the pairs' token ids, to check both trainers see the same sequences."""
    lines = sorted(json.dumps([list(map(int, p)), list(map(int, c)), list(map(int, r))]) for p, c, r in rows)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- FLOPs


def model_shape(model_dir: str, trainable: str) -> dict:
    """Parameter counts the FLOP formula needs, read from the saved model's config (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    layers = model.model.layers
    linears = [(name, m) for name, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
    per_layer = sum(m.weight.numel() for _, m in linears)
    config = model.config
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "block_linear_params": per_layer * len(layers),
        "layer_linear_params": per_layer,
        "layer_trainable_params": per_layer
        if trainable == "all"
        else sum(m.weight.numel() for name, m in linears if trainable in name),
        "lm_head_params": model.lm_head.weight.numel(),
        "lm_head_trainable": trainable == "all",
        "hidden": config.num_attention_heads
        * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
        "trainable": trainable,
    }


def sequence_flops(shape: dict, tokens: float, head_positions: float, attended: float) -> dict:
    """Model FLOPs of one forward + backward over ``tokens`` tokens, the lm_head on ``head_positions`` positions and
    ``attended`` (query, key) pairs per layer (formula in the module docstring), split by part."""
    layers, per_layer, trained = shape["layers"], shape["layer_linear_params"], shape["layer_trainable_params"]
    if shape["trainable"] == "all":
        blocks = 6 * per_layer * layers * tokens
        attention = 12 * shape["hidden"] * layers * attended
    else:  # forward 2N; input gradients 2N in every layer above the first; weight gradients 2N of trained ones
        blocks = ((4 * layers - 2) * per_layer + 2 * trained * layers) * tokens
        attention = (12 * layers - 8) * shape["hidden"] * attended
    head = (6 if shape["lm_head_trainable"] else 4) * shape["lm_head_params"] * head_positions
    return {"blocks": blocks, "lm_head": head, "attention": attention}


def flops_per_token(rows, shape: dict) -> dict:
    """Model FLOPs per non-padding token of the two-row layout, averaged over the dataset."""
    parts = {"blocks": 0.0, "lm_head": 0.0, "attention": 0.0}
    all_logits = tokens = 0.0
    for prompt, chosen, rejected in rows:
        for response in (chosen, rejected):
            length = len(prompt) + len(response)
            tokens += length
            for key, value in sequence_flops(shape, length, len(response), length**2 / 2).items():
                parts[key] += value
            all_logits += sum(sequence_flops(shape, length, length, length**2 / 2).values())
    model = sum(parts.values())
    return {
        "model": model / tokens,
        "all_logits": all_logits / tokens,
        "tokens_per_pair": tokens / len(rows),
        "share": {key: value / model for key, value in parts.items()},
    }


def flops_per_pair(rows, shape: dict, shared_prompt: bool) -> dict:
    """Model FLOPs per pair, averaged over the dataset, of the layout a run computes: two rows (prompt + chosen,
    prompt + rejected) or, with ``shared_prompt``, one row prompt + chosen + 1 + rejected whose attention covers
    only the pairs of tokens the mask allows (formula in the module docstring)."""
    model = all_logits = 0.0
    for prompt, chosen, rejected in rows:
        p, c, r = len(prompt), len(chosen), len(rejected)
        if shared_prompt:
            tokens = p + c + 1 + r
            attended = p * p / 2 + c * p + c * c / 2 + (r + 1) * (p - 1) + (r + 1) ** 2 / 2
        else:
            tokens = 2 * p + c + r
            attended = ((p + c) ** 2 + (p + r) ** 2) / 2
        model += sum(sequence_flops(shape, tokens, c + r, attended).values())
        all_logits += sum(sequence_flops(shape, tokens, tokens, attended).values())
    return {"model": model / len(rows), "all_logits": all_logits / len(rows)}


def matmul_gflops(threads: int, reps: int, size: int = MATMUL_SIZE, device: str = "cpu") -> float:
    """Median GFLOP/s of ``reps`` (size x size) @ (size x size) matmuls: fp32 on ``threads`` CPU threads, or bf16
    on the GPU (``device="cuda"``)."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        del a, b
        torch.cuda.empty_cache()  # the parent keeps only its CUDA context while a run uses the GPU
    return 2 * size**3 / statistics.median(times) / 1e9


def cpu_busy(seconds: float = 3.0) -> float | None:
    """Share of all CPUs' time spent busy over ``seconds`` (Linux /proc/stat); None where unavailable."""

    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # user..steal (guest time is inside user); idle + iowait

    if not Path("/proc/stat").exists():
        return None
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_quiet(max_busy: float | None, max_wait: float) -> tuple[float | None, float]:
    """Sample CPU use until it is at most ``max_busy`` (or ``max_wait`` passed); returns (last sample, seconds
    waited). Without ``max_busy`` it just samples once."""
    started = time.perf_counter()
    busy = cpu_busy()
    while max_busy is not None and busy is not None and busy > max_busy and time.perf_counter() - started < max_wait:
        time.sleep(7)
        busy = cpu_busy()
    return busy, time.perf_counter() - started


def window_stats(windows: list[list[float]], batch_pairs: int) -> dict:
    """Rates of a run from its timed windows [seconds, pairs, tokens]: over all windows (the run's throughput),
    their median, and the fastest window (an estimate of the speed without interference from other processes)."""
    seconds, pairs, tokens = (sum(w[i] for w in windows) for i in range(3))
    best = max(windows, key=lambda w: w[1] / w[0])
    return {
        "pairs_per_s": pairs / seconds,
        "tokens_per_s": tokens / seconds,
        "step_s": seconds * batch_pairs / pairs,
        "median_pairs_per_s": statistics.median(w[1] / w[0] for w in windows),
        "best_pairs_per_s": best[1] / best[0],
        "best_tokens_per_s": best[2] / best[0],
    }


# --------------------------------------------------------------------------------------------------- memory


def proc_status_kb(pid: int | str, *fields: str) -> dict[str, int]:
    """Fields of /proc/<pid>/status in kB (VmHWM: peak resident set since start or the last reset; VmRSS: now)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            values[key] = int(rest.split()[0])
    return values


def reset_peak_rss(pid: int | str) -> None:
    """Reset the process's VmHWM to its current RSS (Linux: ``echo 5 > /proc/<pid>/clear_refs``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class RssWindow:
    """Peak RSS of one process: over its life until ``start`` (VmHWM then), its RSS at ``start`` (the base: model,
    gradients, optimizer state, allocator caches) and the peak between ``start`` and ``stop`` (VmHWM after a reset
    at ``start``). peak_mb = the larger peak; step_peak_over_base_mb = what the timed steps added at their peak
    (activations and temporaries)."""

    def __init__(self, pid):
        self.pid, self.before = pid, None
        self.base = self.during = None

    def start(self) -> None:
        status = proc_status_kb(self.pid, "VmHWM", "VmRSS")
        self.before, self.base = status["VmHWM"], status["VmRSS"]
        reset_peak_rss(self.pid)

    def stop(self) -> None:
        self.during = proc_status_kb(self.pid, "VmHWM")["VmHWM"]

    def result(self) -> dict:
        if self.during is None:
            return {}
        return {
            "peak_rss_mb": max(self.before, self.during) / 1024,
            "base_rss_mb": self.base / 1024,
            "step_peak_over_base_mb": (self.during - self.base) / 1024,
        }


def descendants(root: int) -> list[int]:
    """Process ids under ``root`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class CudaMemory:
    """The largest nvidia-smi used_memory of some processes (all the CUDA memory a process holds: PyTorch's cache and
    the CUDA context included) over calls of ``sample(pids)``. In a container whose processes nvidia-smi lists under
    the host's ids, the growth of the GPU's used memory over its level at the first sample instead (one job on the GPU
    at a time: the benchmark's parent holds only the matmul's context)."""

    def __init__(self):
        self.per_pid: dict[int, float] = {}
        self.used_at_start, self.used_peak = None, 0.0

    def sample(self, pids: set[int]) -> None:
        def query(*args: str) -> str:
            return subprocess.run(
                ["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True, check=False
            ).stdout

        for line in query("--query-compute-apps=pid,used_memory").splitlines():
            pid, _, used = line.partition(",")
            if pid.strip().isdigit() and int(pid) in pids:
                self.per_pid[int(pid)] = max(self.per_pid.get(int(pid), 0.0), float(used))
        total = sum(float(v) for v in query("--query-gpu=memory.used").split() if v.replace(".", "").isdigit())
        self.used_at_start = total if self.used_at_start is None else self.used_at_start
        self.used_peak = max(self.used_peak, total)

    def result(self) -> dict:
        if self.per_pid:
            return {"peak_cuda_mb": max(self.per_pid.values()), "peak_cuda_source": "process (nvidia-smi)"}
        if self.used_at_start is not None:
            return {
                "peak_cuda_mb": self.used_peak - self.used_at_start,
                "peak_cuda_source": "GPU used memory over its level at the start (nvidia-smi)",
            }
        return {}


class OwnCudaMemory:
    """``CudaMemory`` of this process, sampled every 0.25 s by a thread while the block runs (TRL's process)."""

    def __init__(self):
        import threading

        self.memory, self.done = CudaMemory(), threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self) -> None:
        while not self.done.wait(0.25):
            self.memory.sample({os.getpid()})

    def __enter__(self):
        self.memory.sample({os.getpid()})
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


class WorkerMemory:
    """Memory of our Ray Train worker processes, watched from the driver (the worker loop has no hook for it): a
    thread finds this process's descendants whose title names RayTrainWorker, and starts an ``RssWindow`` on each
    when the TensorBoard event after the warm-up steps appears and stops it at the event after the last step (so
    the final checkpoint and export are outside). On GPU it also keeps the workers' largest ``nvidia-smi``
    used_memory (``CudaMemory``, sampled every 0.25 s)."""

    def __init__(self, run_dir: Path, warmup: int, total: int, use_gpu: bool):
        import threading

        self.run_dir, self.warmup, self.total, self.use_gpu = run_dir, warmup, total, use_gpu
        self.windows: dict[int, RssWindow] = {}
        self.cuda = CudaMemory()
        self.phase = "warm-up"
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    def workers(self) -> list[int]:
        pids = []
        for pid in descendants(os.getpid()):
            try:
                if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
            except OSError:
                pass
        return pids

    def logged_steps(self) -> set[int]:
        files = list(self.run_dir.glob("**/events.out.tfevents*"))
        if not files:
            return set()
        try:
            return {event.step for event in read_scalars(files[0].parent, ("train/pairs_per_s",))["train/pairs_per_s"]}
        except KeyError:
            return set()

    def watch(self) -> None:
        while not self.done.wait(0.25):
            try:
                if self.use_gpu:
                    self.cuda.sample(set(self.workers()))
                if self.phase == "finished":
                    continue
                steps = self.logged_steps()
                if self.phase == "warm-up" and self.warmup in steps:
                    for pid in self.workers():
                        self.windows[pid] = RssWindow(pid)
                        self.windows[pid].start()
                    self.phase = "timed"
                if self.phase == "timed" and self.total in steps:
                    for window in self.windows.values():
                        window.stop()
                    self.phase = "finished"
            except (OSError, ValueError):  # a process that ended between two reads
                continue

    def result(self) -> dict:
        per_worker = [w.result() for w in self.windows.values() if w.result()]
        out = {"memory_workers": len(per_worker)}
        if per_worker:
            for key in ("peak_rss_mb", "base_rss_mb", "step_peak_over_base_mb"):
                out[key] = max(w[key] for w in per_worker)  # the largest worker's (per trainer process)
            out["peak_rss_mb_all_workers"] = sum(w["peak_rss_mb"] for w in per_worker)
        out.update(self.cuda.result())
        return out


# --------------------------------------------------------------------------------------------------- children


def run_ours(spec: dict) -> dict:
    """One run of our trainer (in this subprocess): train(), then the TensorBoard events -> steady-state rates."""
    import ray

    from bfpo_ray.config import config_from_dict
    from bfpo_ray.train.launch import train

    warmup, steps, batch = spec["warmup_steps"], spec["steps"], spec["batch_pairs"]
    total = warmup + steps
    epochs = math.ceil(total * batch / spec["pairs"])
    workers = spec["workers"]
    if batch % workers:
        raise ValueError(f"--batch-pairs {batch} must be a multiple of the {workers} workers")
    use_gpu = spec["device"] == "cuda"
    cfg = config_from_dict(
        {
            "model": {"path": spec["model"], "dtype": spec["dtype"], "attn_implementation": spec["attn"]},
            "data": {"sources": [{"adapter": "generic", "path": spec["pairs_path"], "role": "helpful"}]},
            "train": {
                "loss": spec["loss"],
                "tau": TAU,
                "learning_rate": LEARNING_RATE,
                "trainable": "all" if spec["trainable"] == "all" else [spec["trainable"]],
                "lr_schedule": "constant",
                "warmup_ratio": 0.0,
                "micro_batch_pairs": batch // workers,
                "grad_accum": 1,
                "epochs": epochs,
                "max_steps": total,
                "zero_stage": spec["zero_stage"],
                "share_prompt": spec["share_prompt"],
                "gradient_checkpointing": spec["gradient_checkpointing"],
                "padding_free": spec["padding_free"],
                "log_every": warmup,
                "eval_every": 10**9,
                "checkpoint_every": 10**9,
                "num_to_keep": 1,
                "seed": spec["seed"],
            },
            "run": {
                "name": spec["name"],
                "storage_path": spec["storage"],
                "num_workers": workers,
                "cpus_per_worker": spec["threads"],
                "use_gpu": use_gpu,
            },
        }
    )
    started = time.perf_counter()
    with WorkerMemory(Path(spec["storage"]) / spec["name"], warmup, total, use_gpu) as memory:
        result = train(cfg, spec["dataset"])
    run_s = time.perf_counter() - started
    # On the GPU the worker's CPU threads do not set the pace: no probe (a second Ray Train run, ~15 s)
    threads = (
        probe_worker_threads(spec["threads"], spec["storage"])
        if not use_gpu
        else {"torch_threads": "-", "niceness": "-", "omp_num_threads": "-"}
    )
    ray.shutdown()
    events = read_scalars(Path(result.path) / "tensorboard", ("train/pairs_per_s", "train/tokens_per_s"))
    pairs_events, token_events = events["train/pairs_per_s"], events["train/tokens_per_s"]
    if [e.step for e in pairs_events] != list(range(warmup, total + 1, warmup)):
        raise RuntimeError(
            f"expected train/* at steps {list(range(warmup, total + 1, warmup))}, got {[e.step for e in pairs_events]}"
        )
    # Window k (k >= 1; window 0 holds the warm-up steps) spans the wall clock between the events after steps
    # k*W and (k+1)*W: its steps plus the trainer's per-log work. Its tokens come from the trainer's own rates
    # (tokens/s x the window's own step time, pairs / pairs_per_s).
    windows = []
    for before, after, token_event in zip(pairs_events, pairs_events[1:], token_events[1:]):
        pairs = warmup * batch
        windows.append([after.wall_time - before.wall_time, pairs, token_event.value * pairs / after.value])
    trainer_metric = sum(w[1] for w in windows) / sum(w[1] / e.value for w, e in zip(windows, pairs_events[1:]))
    return {
        "trainer": "ours",
        "windows": windows,
        "trainer_pairs_per_s": trainer_metric,
        "worker_threads": threads,
        "zero_stage": spec["zero_stage"],
        "loss": spec["loss"],
        "run_s": round(run_s, 1),
        **memory.result(),
    }


def probe_worker_threads(cpus: float, storage: str) -> dict:
    """torch.get_num_threads() and OMP_NUM_THREADS inside a Ray Train worker with the same resources as ours
    (written to a file: Ray Train 2.60 keeps in Result.metrics only reports that carry a checkpoint)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(storage) / f"thread-probe-{os.getpid()}.json"

    def report_threads(config):
        import json as worker_json
        import os as worker_os

        import torch as worker_torch

        Path(config["out"]).write_text(
            worker_json.dumps(
                {
                    "torch_threads": worker_torch.get_num_threads(),
                    "niceness": worker_os.nice(0),
                    "omp_num_threads": worker_os.environ.get("OMP_NUM_THREADS", ""),
                }
            )
        )

    TorchTrainer(
        report_threads,
        train_loop_config={"out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"thread-probe-{os.getpid()}", storage_path=storage),
    ).fit()
    return json.loads(out.read_text())


def read_scalars(directory: Path, tags) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: sorted(accumulator.Scalars(tag), key=lambda e: e.step) for tag in tags}


def run_trl(spec: dict) -> dict:
    """One run of TRL's DPOTrainer (IPO, precomputed reference log-probs) in this subprocess."""
    import warnings

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    warnings.filterwarnings("ignore")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    class StepClock(TrainerCallback):
        """Wall clock and non-padding tokens seen at the start of training and at every optimizer step end."""

        def __init__(self):
            self.times, self.tokens = [], []

        def on_train_begin(self, args, state, control, **kwargs):
            self.times, self.tokens = [time.perf_counter()], [state.num_input_tokens_seen]

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()  # the step's kernels done: its time is the GPU's, not the launch queue's
            self.times.append(time.perf_counter())
            self.tokens.append(state.num_input_tokens_seen)
            if state.global_step == spec["warmup_steps"]:
                rss.start()  # as ours: the peak RSS of the timed steps, over the RSS after the warm-up steps
            if state.global_step == spec["warmup_steps"] + spec["steps"]:
                rss.stop()

    rows = [json.loads(line) for line in Path(spec["pairs_path"]).read_text().splitlines()]
    conversational = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    # fp32 weights; on the GPU under bf16 autocast (bf16=True below), TRL's default mixed precision
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=torch.float32, **({"attn_implementation": spec["attn"]} if spec["attn"] else {})
    )
    if spec["trainable"] != "all":  # the same trained parameters as ours (train.trainable); Trainer skips frozen ones
        for name, param in model.named_parameters():
            param.requires_grad_(spec["trainable"] in name)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rss = RssWindow(os.getpid())
    total = spec["warmup_steps"] + spec["steps"]
    config = DPOConfig(
        output_dir=str(Path(spec["storage"]) / spec["name"]),
        loss_type=["ipo"],
        beta=TAU,
        per_device_train_batch_size=spec["batch_pairs"],
        max_steps=total,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        precompute_ref_log_probs=True,
        max_length=spec["max_length"],
        use_cpu=not cuda,
        bf16=spec.get("trl_bf16", False),
        fp16=False,
        gradient_checkpointing=spec["gradient_checkpointing"],
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=spec["seed"],
        include_num_input_tokens_seen="non_padding",
    )
    clock = StepClock()
    started = time.perf_counter()
    with OwnCudaMemory() if cuda else contextlib.nullcontext() as gpu_memory:
        trainer = DPOTrainer(
            model=model,
            args=config,
            processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list(conversational),
            callbacks=[clock],
        )
        init_s = time.perf_counter() - started
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
    data = trainer.train_dataset
    digest = token_digest(zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]))
    step_s = [b - a for a, b in zip(clock.times, clock.times[1:])]
    step_tokens = [b - a for a, b in zip(clock.tokens, clock.tokens[1:])]
    if len(step_s) != total:
        raise RuntimeError(f"TRL ran {len(step_s)} steps, expected {total}")
    window = spec["warmup_steps"]
    windows = [
        [sum(step_s[i : i + window]), window * spec["batch_pairs"], sum(step_tokens[i : i + window])]
        for i in range(window, total, window)
    ]  # the first window, the warm-up steps, is left out
    return {
        "trainer": "trl",
        "windows": windows,
        "worker_threads": {"torch_threads": torch.get_num_threads(), "niceness": os.nice(0)},
        "init_s": round(init_s, 1),
        "token_digest": digest,
        "trl_version": trl.__version__,
        "optim": config.optim,
        "trained_params": trained,
        **rss.result(),
        **(gpu_memory.memory.result() if cuda else {}),
    }


def child_main(args) -> None:
    spec = json.loads(Path(args.child_spec).read_text())
    result = run_ours(spec) if args.child == "ours" else run_trl(spec)
    Path(spec["result"]).write_text(json.dumps(result))


def run_child(kind: str, spec: dict, workdir: Path) -> dict:
    """Run one trainer in a fresh Python process; its output goes to <workdir>/<name>.log."""
    spec_path = workdir / f"{spec['name']}.spec.json"
    spec = {**spec, "result": str(workdir / f"{spec['name']}.result.json")}
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    if kind == "trl":
        env["OMP_NUM_THREADS"] = str(spec["threads"])

    log_path = workdir / f"{spec['name']}.log"
    with log_path.open("w") as log:
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--child", kind, "--child-spec", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=SCRIPT.parent.parent,
        )
    if done.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{kind} run failed (exit {done.returncode}); last lines of {log_path}:\n{tail}")
    return json.loads(Path(spec["result"]).read_text())


# --------------------------------------------------------------------------------------------------- main


def machine() -> dict:
    import torch

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def variants(args) -> list[tuple[str, str, dict]]:
    """(label, trainer, spec overrides) of the runs one round makes, in the order of round 0 (later rounds
    alternate it)."""
    if args.mode == "checkpointing":
        return [
            ("ours", "ours", {"gradient_checkpointing": False}),
            ("ours+ckpt", "ours", {"gradient_checkpointing": True}),
        ]
    if args.mode == "workers":
        return [
            (f"ours 1x{args.threads}", "ours", {"workers": 1, "threads": args.threads}),
            (f"ours {args.threads}x1", "ours", {"workers": args.threads, "threads": 1}),
        ]
    kinds = ["ours", "trl"] if args.only == "both" else [args.only]
    ours = {"workers": args.workers, "threads": args.threads // args.workers}
    return [(kind, kind, ours if kind == "ours" else {}) for kind in kinds]


def mb(value) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) else "-"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bfpo-train-bench-")
        workdir = Path(tmp.name)
    print(f"# workdir {workdir}; load average {os.getloadavg()[0]:.2f} at start", flush=True)
    inputs = build_inputs(args, workdir)
    rows = read_token_rows(inputs["dataset"])
    shape = model_shape(inputs["model"], args.trainable)
    flops = flops_per_token(rows, shape)
    our_digest = token_digest(rows)
    matmul_size = 8192 if args.device == "cuda" else MATMUL_SIZE
    print(
        f"# model {args.model} ({inputs['model_source'] if args.model != 'tiny' else 'random weights'}): "
        f"{shape['params'] / 1e6:.1f}M params, trained: {args.trainable}, vocab {inputs['vocab']} (tokenizer); "
        f"dataset {len(rows)} pairs, {flops['tokens_per_pair']:.1f} tokens/pair (longest row "
        f"{max(len(p) + max(len(c), len(r)) for p, c, r in rows)}); model FLOPs/token "
        f"{flops['model'] / 1e6:.1f}M (blocks {flops['share']['blocks']:.0%}, lm_head "
        f"{flops['share']['lm_head']:.0%}, attention {flops['share']['attention']:.0%}); matmul "
        f"{matmul_size}^3 {'bf16 on the GPU' if args.device == 'cuda' else 'fp32'}",
        flush=True,
    )

    base = {
        "model": inputs["model"],
        "pairs_path": inputs["pairs"],
        "dataset": inputs["dataset"],
        "pairs": len(rows),
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "batch_pairs": args.batch_pairs,
        "threads": args.threads,
        "seed": args.seed,
        "workers": 1,
        "zero_stage": args.zero_stage,
        "loss": args.loss,
        "share_prompt": args.share_prompt,
        "trainable": args.trainable,
        "gradient_checkpointing": args.gradient_checkpointing,
        "padding_free": args.padding_free,
        "trl_bf16": args.trl_bf16,
        "device": args.device,
        "dtype": model_dtype(args),
        "attn": args.attn,
        "max_length": args.max_length,
        "storage": str(workdir / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"),
    }  # fresh: a run name reused resumes
    plan = variants(args)
    runs = []
    memory_header = "peak CUDA MB" if args.device == "cuda" else "peak RSS MB"
    print(
        f"{'round':>5} {'run':>10} {'busy':>5} {'matmul GF/s':>13} {'pairs/s':>8} {'median':>7} {'best':>6} "
        f"{'tokens/s':>9} {'step s':>7} {'MFU':>6} {'MFU best':>8} {memory_header:>12} {'step peak-base':>14}  "
        f"notes",
        flush=True,
    )
    for round_index in range(args.rounds):
        order = plan if round_index % 2 == 0 else plan[::-1]
        for label, kind, overrides in order:
            spec = {**base, **overrides, "name": f"{label.replace(' ', '-').replace('+', '-')}-round{round_index}"}
            busy, waited = wait_until_quiet(args.max_busy, args.max_wait)
            gflops_before = matmul_gflops(args.threads, args.matmul_reps, matmul_size, args.device)
            result = run_child(kind, spec, workdir)
            gflops_after = matmul_gflops(args.threads, args.matmul_reps, matmul_size, args.device)
            result.update(window_stats(result["windows"], args.batch_pairs))
            result.update(
                label=label,
                round=round_index,
                cpu_busy_before=busy,
                waited_s=round(waited),
                matmul_gflops_before=gflops_before,
                matmul_gflops_after=gflops_after,
                gradient_checkpointing=spec["gradient_checkpointing"],
                workers=spec["workers"],
                threads=spec["threads"],
            )
            pair_flops = flops_per_pair(rows, shape, shared_prompt=kind == "ours" and args.share_prompt)
            result["model_gflops"] = result["pairs_per_s"] * pair_flops["model"] / 1e9
            result["mfu"] = result["model_gflops"] / ((gflops_before + gflops_after) / 2)
            result["mfu_all_logits"] = result["mfu"] * pair_flops["all_logits"] / pair_flops["model"]
            result["best_model_gflops"] = result["best_pairs_per_s"] * pair_flops["model"] / 1e9
            result["best_mfu"] = result["best_model_gflops"] / max(gflops_before, gflops_after)
            notes = (
                f"threads {result['worker_threads']['torch_threads']}, niceness {result['worker_threads']['niceness']}"
            )
            if kind == "ours":
                notes += (
                    f" (OMP_NUM_THREADS {result['worker_threads']['omp_num_threads']}), {spec['workers']} "
                    f"worker(s), ZeRO {result['zero_stage']}{', shared prompt' if args.share_prompt else ''}"
                    f"{', grad ckpt' if spec['gradient_checkpointing'] else ''}"
                    f"{', padding-free' if spec['padding_free'] else ''}"
                    f"{', ' + args.attn if args.attn else ''}, trainer's own train/pairs_per_s "
                    f"{result['trainer_pairs_per_s']:.2f}"
                )
            else:
                result["same_tokens"] = result["token_digest"] == our_digest
                notes += (
                    f", same token ids as ours: {result['same_tokens']}, init {result['init_s']} s, trained "
                    f"params {result['trained_params'] / 1e6:.1f}M{', bf16' if args.trl_bf16 else ', fp32'}"
                )
            runs.append(result)
            busy_text = f"{busy:.0%}" if busy is not None else "-"
            memory = result.get("peak_cuda_mb") if args.device == "cuda" else result.get("peak_rss_mb")
            print(
                f"{round_index:>5} {label:>10} {busy_text:>5} {gflops_before:>6.0f}/{gflops_after:<6.0f} "
                f"{result['pairs_per_s']:>8.2f} {result['median_pairs_per_s']:>7.2f} "
                f"{result['best_pairs_per_s']:>6.2f} "
                f"{result['tokens_per_s']:>9.0f} {result['step_s']:>7.3f} {result['mfu']:>6.1%} "
                f"{result['best_mfu']:>8.1%} {mb(memory):>12} {mb(result.get('step_peak_over_base_mb')):>14}  "
                f"{notes}",
                flush=True,
            )

    summary = {
        "command": " ".join([Path(sys.executable).name, "bench/train_throughput.py"] + sys.argv[1:]),
        "machine": machine(),
        "model": shape,
        "model_source": inputs["model_source"],
        "flops_per_token": flops["model"],
        "flops_per_token_all_logits": flops["all_logits"],
        "tokens_per_pair": flops["tokens_per_pair"],
        "settings": {
            k: base[k]
            for k in (
                "warmup_steps",
                "steps",
                "batch_pairs",
                "threads",
                "zero_stage",
                "loss",
                "share_prompt",
                "padding_free",
                "pairs",
                "seed",
                "trainable",
                "device",
                "dtype",
                "attn",
                "max_length",
            )
        },
        "runs": runs,
    }
    labels = [label for label, _, _ in plan]
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        summary[label] = {
            key: statistics.median(r[key] for r in mine)
            for key in ("pairs_per_s", "median_pairs_per_s", "tokens_per_s", "mfu", "mfu_all_logits")
        }
        summary[label].update(
            {key: max(r[key] for r in mine) for key in ("best_pairs_per_s", "best_tokens_per_s", "best_mfu")}
        )
        summary[label].update(
            {
                key: statistics.median(r[key] for r in mine)
                for key in ("peak_rss_mb", "step_peak_over_base_mb", "peak_cuda_mb")
                if all(key in r for r in mine)
            }
        )
    if len(labels) == 2:
        first, second = labels
        by_round = {(r["label"], r["round"]): r for r in runs}
        ratios = [by_round[first, i]["pairs_per_s"] / by_round[second, i]["pairs_per_s"] for i in range(args.rounds)]
        a, b = summary[first], summary[second]
        ratio = a["pairs_per_s"] / b["pairs_per_s"]
        summary["ratio_pairs_per_s"], summary["ratio_per_round"] = ratio, ratios
        summary["ratio_best_pairs_per_s"] = a["best_pairs_per_s"] / b["best_pairs_per_s"]
        memory_ratio = (a["peak_rss_mb"] / b["peak_rss_mb"]) if "peak_rss_mb" in a and "peak_rss_mb" in b else None
        step_ratio = (
            a["step_peak_over_base_mb"] / b["step_peak_over_base_mb"]
            if "step_peak_over_base_mb" in a and "step_peak_over_base_mb" in b
            else None
        )
        summary["ratio_peak_rss"], summary["ratio_step_peak_over_base"] = memory_ratio, step_ratio
        both_cuda = a.get("peak_cuda_mb") and b.get("peak_cuda_mb")
        cuda_ratio = a["peak_cuda_mb"] / b["peak_cuda_mb"] if both_cuda else None
        summary["ratio_peak_cuda"] = cuda_ratio
        print(
            "# medians over rounds: "
            + "; ".join(
                f"{label} {summary[label]['pairs_per_s']:.2f} pairs/s, {summary[label]['tokens_per_s']:.0f} tokens/s, "
                f"MFU {summary[label]['mfu']:.1%}, "
                + (f"peak CUDA {mb(summary[label].get('peak_cuda_mb'))} MB, " if args.device == "cuda" else "")
                + f"peak RSS {mb(summary[label].get('peak_rss_mb'))} MB "
                f"(step peak over base {mb(summary[label].get('step_peak_over_base_mb'))} MB)"
                for label in labels
            )
            + f"; {first}/{second}: pairs/s {ratio:.2f}x (per round {', '.join(f'{r:.2f}' for r in ratios)}), "
            f"fastest windows {summary['ratio_best_pairs_per_s']:.2f}x"
            + (f", peak CUDA {cuda_ratio:.2f}x" if cuda_ratio else "")
            + (f", peak RSS {memory_ratio:.2f}x" if memory_ratio else "")
            + (f", step peak over base {step_ratio:.2f}x" if step_ratio else ""),
            flush=True,
        )
        if args.mode == "compare":
            summary["goal"] = {
                "ratio_at_least_1.5": ratio >= 1.5,
                "mfu_at_least_0.6": a["mfu"] >= 0.6,
                "peak_rss_at_most_0.7x": memory_ratio is not None and memory_ratio <= 0.7,
            }
            if args.device == "cuda":
                summary["goal"]["peak_cuda_at_most_0.7x"] = cuda_ratio is not None and cuda_ratio <= 0.7
        elif args.mode == "checkpointing":
            saved = 1 - 1 / step_ratio if step_ratio else None  # ours+ckpt's step peak against ours'
            summary["goal"] = {
                "activation_peak_lower_by": saved,
                "throughput_cost": 1 - 1 / ratio,
                "lower_by_at_least_0.4": saved is not None and saved >= 0.4,
                "cost_at_most_0.35": 1 - 1 / ratio <= 0.35,
            }
        else:
            summary["goal"] = {"many_over_one": 1 / ratio, "at_least_0.9": 1 / ratio >= 0.9}
        print(f"# goals: {json.dumps(summary['goal'])}", flush=True)
    print(json.dumps(summary), flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
