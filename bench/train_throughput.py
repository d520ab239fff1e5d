#!/usr/bin/env python
"""Training throughput on CPU: bfpo-ray's trainer (Ray Train + DeepSpeed, one worker) against TRL's DPOTrainer
(IPO loss) on the same tiny Llama, the same pairs and the same batch size, with model FLOP utilisation (MFU)
against a large matmul timed in the same invocation.

    python bench/train_throughput.py --max-busy 0.15     # 3 rounds, about 10 minutes on 2 idle cores
    python bench/train_throughput.py --rounds 1 --steps 8 --warmup-steps 4     # a quick look

What runs:
  1. Once: seeded synthetic pairs (the chosen response stays on the prompt's topic, the rejected one is random
     words; one word = one token under a word-level tokenizer), written as a generic-pairs JSONL; a tokenizer
     (bfpo_ray.tiny_model.train_word_tokenizer, vocab 2048) and a randomly initialised 4.2M-parameter Llama (hidden
     256, intermediate 688, 4 layers, 4 heads, fp32; bfpo_ray.tiny_model.save_tiny_llama); then ``prepare`` (the
     real data pipeline: tokenize + reference log-probs on Ray Data), whose time is not counted, like TRL's
     precompute.
  2. ``--rounds`` times, alternating the order (ours, TRL; then TRL, ours; ...), each run in its own subprocess so
     that nothing (Ray, threads, allocator state) carries over:
       - matmul: a 2048^3 fp32 matmul on ``--threads`` threads -> GFLOP/s (median of ``--matmul-reps``);
       - ours: ``bfpo_ray.train.launch.train`` on a local Ray cluster with ONE worker of ``--threads`` CPUs (Ray
         sets OMP_NUM_THREADS from them; a probe worker with the same resources reports torch.get_num_threads()),
         train.trainable=all, train.loss=ipo (or --loss bfpo), micro_batch_pairs=--batch-pairs, grad_accum=1,
         zero_stage=--zero-stage, share_prompt=--share-prompt, log_every=--warmup-steps, no eval split,
         checkpoint only at the end;
       - TRL: ``DPOTrainer`` with loss_type ipo, precompute_ref_log_probs=True, bf16=False,
         gradient_checkpointing=False (TRL defaults both to True), use_cpu, torch.set_num_threads(--threads), the
         same pairs in conversational form (so TRL's chat-template tokenization gives exactly our token ids: checked,
         ``same_tokens``), per_device_train_batch_size=--batch-pairs.
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

Model FLOPs (per sequence of T tokens of which R are response tokens; both trainers train every parameter and take
reference log-probs from a precomputed column, so there is no reference forward):
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

Fair-comparison notes: TRL's IPO loss is length-normalised while ours sums log-probs (compare speed, not loss);
TRL computes extra per-step metrics (entropy, token accuracy, mean logits) as part of its cost; both trainers run
plain fp32 AdamW with gradient clipping at 1.0; our run keeps Ray's default worker niceness (+15), which only
matters when other processes compete for the CPUs. On a shared 2-core machine other processes distort the numbers
badly (a 2-thread job whose threads get descheduled can slow down 10x): use --max-busy, and compare runs of the same
invocation.
"""
from __future__ import annotations

import argparse
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
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

SCRIPT = Path(__file__).resolve()
MATMUL_SIZE = 2048
TAU = 0.01  # IPO's tau; TRL calls it beta
LEARNING_RATE = 1e-6


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (ours, TRL), order alternating (default 3)")
    p.add_argument("--steps", type=int, default=24,
                   help="timed optimizer steps per run; a multiple of --warmup-steps (default 24)")
    p.add_argument("--warmup-steps", type=int, default=4,
                   help="untimed steps at the start of every run; also ours' log_every (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seeds the pairs, the model init and both trainers")
    p.add_argument("--pairs", type=int, default=512, help="pairs in the dataset (default 512)")
    p.add_argument("--batch-pairs", type=int, default=8, help="pairs per optimizer step (default 8)")
    p.add_argument("--prompt-len", type=int, default=64, help="mean prompt words (+-25%%, default 64)")
    p.add_argument("--resp-len", type=int, default=96, help="mean response words (+-25%%, default 96)")
    p.add_argument("--threads", type=int, default=2, help="torch threads / CPUs of our worker (default 2)")
    p.add_argument("--zero-stage", type=int, choices=(0, 2), default=0, help="ours: DeepSpeed ZeRO stage (default 0)")
    p.add_argument("--loss", choices=("ipo", "bfpo"), default="ipo", help="ours: loss (default ipo, TRL's work)")
    p.add_argument("--share-prompt", action="store_true",
                   help="ours: train.share_prompt (one row per pair, the prompt computed once)")
    p.add_argument("--only", choices=("both", "ours", "trl"), default="both", help="which trainers to run")
    p.add_argument("--matmul-reps", type=int, default=10, help="timed matmuls per measurement (default 10)")
    p.add_argument("--max-busy", type=float, default=None,
                   help="before each run, wait until the machine's CPUs are at most this busy (0-1, sampled over "
                        "3 s from /proc/stat), up to --max-wait seconds; for shared machines (default: no waiting)")
    p.add_argument("--max-wait", type=float, default=900, help="longest wait for --max-busy, seconds (default 900)")
    p.add_argument("--workdir", default=None, help="where data, model and runs go (default: a temporary directory)")
    p.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)  # internal: one run, in a subprocess
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
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


def synthetic_pairs(count: int, prompt_len: int, resp_len: int, words: list[str], seed: int,
                    topics: int = 8) -> list[dict]:
    """Generic-adapter rows: prompt and chosen drawn from one topic's words, rejected from all words; lengths are
    the means +-25% (uniform), at least 4 words; both responses safe (BFPO reduces to IPO on these)."""
    rng = random.Random(seed)
    topic_words = [words[i::topics] for i in range(topics)]

    def length(mean: int) -> int:
        return max(4, round(mean * rng.uniform(0.75, 1.25)))

    rows = []
    for _ in range(count):
        topic = topic_words[rng.randrange(topics)]
        rows.append({"prompt": " ".join(rng.choices(topic, k=length(prompt_len))),
                     "chosen": " ".join(rng.choices(topic, k=length(resp_len))),
                     "rejected": " ".join(rng.choices(words, k=length(resp_len))),
                     "chosen_safe": True, "rejected_safe": True})
    return rows


def build_inputs(args, workdir: Path) -> dict:
    """Pairs JSONL, tokenizer + model directory, and the prepared (scored) dataset; returns their paths."""
    import ray

    from bfpo_ray.config import config_from_dict
    from bfpo_ray.scoring.prepare import prepare
    from bfpo_ray.tiny_model import SPECIAL_TOKENS, save_tiny_llama, train_word_tokenizer

    vocab = 2048
    words = pseudo_words(vocab - len(SPECIAL_TOKENS), args.seed)
    rows = synthetic_pairs(args.pairs, args.prompt_len, args.resp_len, words, args.seed)
    pairs_path = workdir / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = train_word_tokenizer((text for row in rows for text in (row["prompt"], row["chosen"],
                                                                        row["rejected"])), vocab_size=vocab)
    model_dir = save_tiny_llama(workdir / "model", tokenizer, hidden_size=256, num_layers=4, num_heads=4,
                                intermediate_size=688, max_positions=512, seed=args.seed)
    cfg = config_from_dict({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "data": {"sources": [{"adapter": "generic", "path": str(pairs_path), "role": "helpful", "name": "bench"}],
                 "eval_fraction": 0.0, "max_length": 512, "max_prompt_length": 256, "seed": args.seed,
                 "cache_dir": str(workdir / "data"), "score_actors": 1, "score_batch_size": 16}})
    dataset_dir = prepare(cfg)
    ray.shutdown()
    return {"pairs": str(pairs_path), "model": str(model_dir), "dataset": str(dataset_dir),
            "vocab": len(tokenizer)}


def read_token_rows(dataset_dir: str) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids) of every training pair of the prepared dataset."""
    import pyarrow.parquet as pq

    from bfpo_ray.data import schema

    table = pq.read_table(schema.split_dir(dataset_dir, "train", "helpful"))
    return list(zip(*(table.column(c).to_pylist() for c in (schema.PROMPT_IDS, schema.CHOSEN_IDS,
                                                             schema.REJECTED_IDS))))


def token_digest(rows) -> str:
    """Order-free fingerprint of the pairs' token ids, to check both trainers see the same sequences."""
    lines = sorted(json.dumps([list(map(int, p)), list(map(int, c)), list(map(int, r))]) for p, c, r in rows)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- FLOPs

def model_shape(model_dir: str) -> dict:
    """Parameter counts the FLOP formula needs, read from the saved model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    blocks = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    return {"params": sum(p.numel() for p in model.parameters()), "block_linear_params": blocks,
            "lm_head_params": model.lm_head.weight.numel(), "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size}


def flops_per_token(rows, shape: dict) -> dict:
    """Model FLOPs per non-padding token, averaged over the dataset (formula in the module docstring)."""
    blocks = head_needed = head_all = attention = tokens = 0
    for prompt, chosen, rejected in rows:
        for response in (chosen, rejected):
            length = len(prompt) + len(response)
            tokens += length
            blocks += 6 * shape["block_linear_params"] * length
            head_needed += 6 * shape["lm_head_params"] * len(response)
            head_all += 6 * shape["lm_head_params"] * length
            attention += 6 * shape["layers"] * shape["hidden"] * length ** 2
    return {"model": (blocks + head_needed + attention) / tokens, "all_logits": (blocks + head_all + attention) / tokens,
            "tokens_per_pair": tokens / len(rows),
            "share": {"blocks": blocks / (blocks + head_needed + attention),
                      "lm_head": head_needed / (blocks + head_needed + attention),
                      "attention": attention / (blocks + head_needed + attention)}}


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
        common = 6 * shape["block_linear_params"] * tokens + 12 * shape["layers"] * shape["hidden"] * attended
        model += common + 6 * shape["lm_head_params"] * (c + r)
        all_logits += common + 6 * shape["lm_head_params"] * tokens
    return {"model": model / len(rows), "all_logits": all_logits / len(rows)}


def matmul_gflops(threads: int, reps: int, size: int = MATMUL_SIZE) -> float:
    """Median GFLOP/s of ``reps`` fp32 (size x size) @ (size x size) matmuls on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e9


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
    return {"pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds, "step_s": seconds * batch_pairs / pairs,
            "median_pairs_per_s": statistics.median(w[1] / w[0] for w in windows),
            "best_pairs_per_s": best[1] / best[0], "best_tokens_per_s": best[2] / best[0]}


# --------------------------------------------------------------------------------------------------- children

def run_ours(spec: dict) -> dict:
    """One run of our trainer (in this subprocess): train(), then the TensorBoard events -> steady-state rates."""
    import ray

    from bfpo_ray.config import config_from_dict
    from bfpo_ray.train.launch import train

    warmup, steps, batch = spec["warmup_steps"], spec["steps"], spec["batch_pairs"]
    total = warmup + steps
    epochs = math.ceil(total * batch / spec["pairs"])
    cfg = config_from_dict({
        "model": {"path": spec["model"], "dtype": "float32"},
        "data": {"sources": [{"adapter": "generic", "path": spec["pairs_path"], "role": "helpful"}]},
        "train": {"loss": spec["loss"], "tau": TAU, "trainable": "all", "learning_rate": LEARNING_RATE,
                  "lr_schedule": "constant", "warmup_ratio": 0.0, "micro_batch_pairs": batch, "grad_accum": 1,
                  "epochs": epochs, "max_steps": total, "zero_stage": spec["zero_stage"],
                  "share_prompt": spec["share_prompt"],
                  "log_every": warmup, "eval_every": 10**9, "checkpoint_every": 10**9, "num_to_keep": 1,
                  "seed": spec["seed"]},
        "run": {"name": spec["name"], "storage_path": spec["storage"], "num_workers": 1,
                "cpus_per_worker": spec["threads"]},
    })
    started = time.perf_counter()
    result = train(cfg, spec["dataset"])
    run_s = time.perf_counter() - started
    threads = probe_worker_threads(spec["threads"], spec["storage"])
    ray.shutdown()
    events = read_scalars(Path(result.path) / "tensorboard", ("train/pairs_per_s", "train/tokens_per_s"))
    pairs_events, token_events = events["train/pairs_per_s"], events["train/tokens_per_s"]
    if [e.step for e in pairs_events] != list(range(warmup, total + 1, warmup)):
        raise RuntimeError(f"expected train/* at steps {list(range(warmup, total + 1, warmup))}, "
                           f"got {[e.step for e in pairs_events]}")
    # Window k (k >= 1; window 0 holds the warm-up steps) spans the wall clock between the events after steps
    # k*W and (k+1)*W: its steps plus the trainer's per-log work. Its tokens come from the trainer's own rates
    # (tokens/s x the window's own step time, pairs / pairs_per_s).
    windows = []
    for before, after, token_event in zip(pairs_events, pairs_events[1:], token_events[1:]):
        pairs = warmup * batch
        windows.append([after.wall_time - before.wall_time, pairs, token_event.value * pairs / after.value])
    trainer_metric = sum(w[1] for w in windows) / sum(w[1] / e.value for w, e in zip(windows, pairs_events[1:]))
    return {"trainer": "ours", "windows": windows, "trainer_pairs_per_s": trainer_metric, "worker_threads": threads,
            "zero_stage": spec["zero_stage"], "loss": spec["loss"], "run_s": round(run_s, 1)}


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

        Path(config["out"]).write_text(worker_json.dumps({
            "torch_threads": worker_torch.get_num_threads(), "niceness": worker_os.nice(0),
            "omp_num_threads": worker_os.environ.get("OMP_NUM_THREADS", "")}))

    TorchTrainer(report_threads, train_loop_config={"out": str(out)}, torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
                 run_config=RunConfig(name=f"thread-probe-{os.getpid()}", storage_path=storage)).fit()
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
            self.times.append(time.perf_counter())
            self.tokens.append(state.num_input_tokens_seen)

    rows = [json.loads(line) for line in Path(spec["pairs_path"]).read_text().splitlines()]
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    total = spec["warmup_steps"] + spec["steps"]
    config = DPOConfig(
        output_dir=str(Path(spec["storage"]) / spec["name"]), loss_type=["ipo"], beta=TAU,
        per_device_train_batch_size=spec["batch_pairs"], max_steps=total, learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", max_grad_norm=1.0, precompute_ref_log_probs=True, max_length=512,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=False, seed=spec["seed"], include_num_input_tokens_seen="non_padding")
    clock = StepClock()
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(conversational), callbacks=[clock])
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
    windows = [[sum(step_s[i:i + window]), window * spec["batch_pairs"], sum(step_tokens[i:i + window])]
               for i in range(window, total, window)]  # the first window, the warm-up steps, is left out
    return {"trainer": "trl", "windows": windows,
            "worker_threads": {"torch_threads": torch.get_num_threads(), "niceness": os.nice(0)},
            "init_s": round(init_s, 1), "token_digest": digest, "trl_version": trl.__version__, "optim": config.optim}


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
        done = subprocess.run([sys.executable, str(SCRIPT), "--child", kind, "--child-spec", str(spec_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=SCRIPT.parent.parent)
    if done.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{kind} run failed (exit {done.returncode}); last lines of {log_path}:\n{tail}")
    return json.loads(Path(spec["result"]).read_text())


# --------------------------------------------------------------------------------------------------- main

def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


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
    shape = model_shape(inputs["model"])
    flops = flops_per_token(rows, shape)
    our_digest = token_digest(rows)
    print(f"# model {shape['params'] / 1e6:.2f}M params, vocab {inputs['vocab']}; dataset {len(rows)} pairs, "
          f"{flops['tokens_per_pair']:.1f} tokens/pair; model FLOPs/token {flops['model'] / 1e6:.2f}M "
          f"(blocks {flops['share']['blocks']:.0%}, lm_head {flops['share']['lm_head']:.0%}, "
          f"attention {flops['share']['attention']:.0%})", flush=True)

    base = {"model": inputs["model"], "pairs_path": inputs["pairs"], "dataset": inputs["dataset"],
            "pairs": len(rows), "warmup_steps": args.warmup_steps, "steps": args.steps,
            "batch_pairs": args.batch_pairs, "threads": args.threads, "seed": args.seed,
            "zero_stage": args.zero_stage, "loss": args.loss, "share_prompt": args.share_prompt,
            "storage": str(workdir / f"runs-{time.strftime('%Y%m%d-%H%M%S')}")}  # fresh: a run name reused resumes
    kinds = ["ours", "trl"] if args.only == "both" else [args.only]
    runs = []
    print(f"{'round':>5} {'trainer':>7} {'busy':>5} {'matmul GF/s':>13} {'pairs/s':>8} {'median':>7} {'best':>6} "
          f"{'tokens/s':>9} {'step s':>6} {'MFU':>6} {'MFU best':>8}  notes", flush=True)
    for round_index in range(args.rounds):
        order = kinds if round_index % 2 == 0 else kinds[::-1]
        for kind in order:
            busy, waited = wait_until_quiet(args.max_busy, args.max_wait)
            gflops_before = matmul_gflops(args.threads, args.matmul_reps)
            result = run_child(kind, {**base, "name": f"{kind}-round{round_index}"}, workdir)
            gflops_after = matmul_gflops(args.threads, args.matmul_reps)
            result.update(window_stats(result["windows"], args.batch_pairs))
            result.update(round=round_index, cpu_busy_before=busy, waited_s=round(waited),
                          matmul_gflops_before=gflops_before, matmul_gflops_after=gflops_after)
            pair_flops = flops_per_pair(rows, shape, shared_prompt=kind == "ours" and args.share_prompt)
            result["model_gflops"] = result["pairs_per_s"] * pair_flops["model"] / 1e9
            result["mfu"] = result["model_gflops"] / ((gflops_before + gflops_after) / 2)
            result["mfu_all_logits"] = result["mfu"] * pair_flops["all_logits"] / pair_flops["model"]
            result["best_model_gflops"] = result["best_pairs_per_s"] * pair_flops["model"] / 1e9
            result["best_mfu"] = result["best_model_gflops"] / max(gflops_before, gflops_after)
            notes = (f"threads {result['worker_threads']['torch_threads']}, "
                     f"niceness {result['worker_threads']['niceness']}")
            if kind == "ours":
                notes += (f" (OMP_NUM_THREADS {result['worker_threads']['omp_num_threads']}), ZeRO "
                          f"{result['zero_stage']}{', shared prompt' if args.share_prompt else ''}, trainer's own "
                          f"train/pairs_per_s {result['trainer_pairs_per_s']:.2f}")
            else:
                result["same_tokens"] = result["token_digest"] == our_digest
                notes += f", same token ids as ours: {result['same_tokens']}, init {result['init_s']} s"
            runs.append(result)
            busy_text = f"{busy:.0%}" if busy is not None else "-"
            print(f"{round_index:>5} {kind:>7} {busy_text:>5} {gflops_before:>6.0f}/{gflops_after:<6.0f} "
                  f"{result['pairs_per_s']:>8.2f} {result['median_pairs_per_s']:>7.2f} {result['best_pairs_per_s']:>6.2f} "
                  f"{result['tokens_per_s']:>9.0f} {result['step_s']:>6.3f} {result['mfu']:>6.1%} "
                  f"{result['best_mfu']:>8.1%}  {notes}", flush=True)

    summary = {"command": " ".join([Path(sys.executable).name, "bench/train_throughput.py"] + sys.argv[1:]),
               "machine": machine(), "model": shape, "flops_per_token": flops["model"],
               "flops_per_token_all_logits": flops["all_logits"], "tokens_per_pair": flops["tokens_per_pair"],
               "settings": {k: base[k] for k in ("warmup_steps", "steps", "batch_pairs", "threads", "zero_stage",
                                                 "loss", "share_prompt", "pairs", "seed")}, "runs": runs}
    for kind in kinds:
        mine = [r for r in runs if r["trainer"] == kind]
        summary[kind] = {key: statistics.median(r[key] for r in mine)
                         for key in ("pairs_per_s", "median_pairs_per_s", "tokens_per_s", "mfu", "mfu_all_logits")}
        summary[kind].update({key: max(r[key] for r in mine) for key in ("best_pairs_per_s", "best_tokens_per_s",
                                                                        "best_mfu")})
    if len(kinds) == 2:
        by_round = {(r["trainer"], r["round"]): r for r in runs}
        ratios = [by_round["ours", i]["pairs_per_s"] / by_round["trl", i]["pairs_per_s"] for i in range(args.rounds)]
        summary["ratio_pairs_per_s"] = summary["ours"]["pairs_per_s"] / summary["trl"]["pairs_per_s"]
        summary["ratio_per_round"] = ratios
        summary["ratio_best_pairs_per_s"] = summary["ours"]["best_pairs_per_s"] / summary["trl"]["best_pairs_per_s"]
        summary["goal"] = {"ratio_at_least_1.5": summary["ratio_pairs_per_s"] >= 1.5,
                           "mfu_at_least_0.7": summary["ours"]["mfu"] >= 0.7}
        print(f"# medians over rounds: ours {summary['ours']['pairs_per_s']:.2f} pairs/s, "
              f"{summary['ours']['tokens_per_s']:.0f} tokens/s, MFU {summary['ours']['mfu']:.1%}; "
              f"TRL {summary['trl']['pairs_per_s']:.2f} pairs/s, {summary['trl']['tokens_per_s']:.0f} tokens/s, "
              f"MFU {summary['trl']['mfu']:.1%}; ratio {summary['ratio_pairs_per_s']:.2f}x "
              f"(per round {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
        print(f"# fastest windows: ours {summary['ours']['best_pairs_per_s']:.2f} pairs/s "
              f"(MFU {summary['ours']['best_mfu']:.1%}), TRL {summary['trl']['best_pairs_per_s']:.2f} pairs/s "
              f"(MFU {summary['trl']['best_mfu']:.1%}); ratio {summary['ratio_best_pairs_per_s']:.2f}x", flush=True)
    print(json.dumps(summary), flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
