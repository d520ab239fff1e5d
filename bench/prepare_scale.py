#!/usr/bin/env python
"""``prepare`` at scale: end-to-end pairs/s and the driver's peak RSS as the number of pairs grows, the streaming
pipeline of this checkout against another checkout's (``--old``, e.g. the in-driver pipeline before it), in the
same invocation.

    git worktree add /tmp/bfpo-old 0ab9f2b                     # the pipeline to compare with
    python bench/prepare_scale.py --sizes 10000 100000 --old /tmp/bfpo-old

What runs: once, seeded generic pairs (prompt ~25 words, responses ~60 words each: about 750 bytes of text per
pair), a word-level tokenizer and a 2-layer Llama as the reference model (bfpo_ray.tiny_model, the tests' tiny
model); a local Ray cluster (started by this script, 4 logical CPUs) that every run joins through RAY_ADDRESS,
so that the driver process is ``python -m bfpo_ray prepare`` alone. For each size, each pipeline (new, then old)
prepares the same JSONL into a cache directory of its own (2 scoring actors, batch 16, max length 256).

Reported per run: wall time of the prepare command, pairs/s end to end (pairs kept / wall time), the driver's peak
RSS (VmHWM of its process, read every 0.1 s until it exits) and, for the new pipeline, each scoring actor's peak
RSS from its manifest.

With ``--train-workers 1 2``, the largest size's prepared data is then trained on for a few steps with each number
of workers (``python -m bfpo_ray train``, ZeRO-0, this checkout) and each training worker's peak RSS is reported
(VmHWM of every ``ray::RayTrainWorker`` process, read every 0.1 s): a worker holds only its share of the pairs, so
its peak should fall with more workers by about the share's size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(1500)]


def write_pairs(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(count):
            text = lambda n: " ".join(rng.choices(WORDS, k=n))  # noqa: E731
            handle.write(
                json.dumps(
                    {
                        "prompt": text(rng.randint(18, 32)),
                        "chosen": text(rng.randint(45, 75)),
                        "rejected": text(rng.randint(45, 75)),
                        "chosen_safe": rng.random() < 0.5,
                        "rejected_safe": rng.random() < 0.5,
                    }
                )
                + "\n"
            )


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_prepare(checkout: Path, config: Path, env: dict) -> tuple[float, float]:
    """(seconds, driver peak RSS MB) of ``python -m bfpo_ray prepare --config config`` run from ``checkout``."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "bfpo_ray", "prepare", "--config", str(config)],
        cwd=checkout,
        env={**env, "PYTHONPATH": str(checkout)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, peak_rss_mb(process.pid) or 0.0)
        time.sleep(0.1)
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"prepare failed in {checkout}:\n{output[-3000:]}")
    return time.perf_counter() - started, peak


def train_worker_peaks(config: Path, env: dict, workers: int, runs: Path) -> list[float]:
    """Peak RSS (MB) of each Ray Train worker process of a short ``train`` run with ``workers`` workers (a fresh
    run: an earlier one of the same name is removed first, or Ray Train would resume it and train nothing)."""
    shutil.rmtree(runs / f"rss-{workers}", ignore_errors=True)
    log_path = runs / f"rss-{workers}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bfpo_ray",
            "train",
            "--config",
            str(config),
            f"run.num_workers={workers}",
            f"run.name=rss-{workers}",
            f"run.storage_path={runs}",
            "train.max_steps=3",
            "train.zero_stage=0",
            "train.eval_every=1000",
            "train.checkpoint_every=1000",
            "evaluate.after_train=false",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peaks: dict[int, float] = {}
    while process.poll() is None:
        for status in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if status.read_bytes().startswith(b"ray::RayTrainWorker"):
                    pid = int(status.parent.name)
                    peaks[pid] = max(peaks.get(pid, 0.0), peak_rss_mb(pid) or 0.0)
            except OSError:
                continue
        time.sleep(0.1)
    log.close()
    if process.returncode != 0:
        raise SystemExit(f"train failed:\n{log_path.read_text()[-3000:]}")
    return sorted(peaks.values(), reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--old", type=Path, default=None, help="another checkout whose prepare runs beside")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--train-workers",
        type=int,
        nargs="*",
        default=[],
        help="train a few steps on the largest size's data with each number of workers and report "
        "each worker's peak RSS",
    )
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from bfpo_ray.toyworld.tiny_model import save_tiny_llama, train_word_tokenizer

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bfpo-prepare-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        save_tiny_llama(model_dir, train_word_tokenizer([" ".join(WORDS)]))
    import ray

    ray.init(num_cpus=4, include_dashboard=False)  # this process holds the cluster; every prepare joins it
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    pipelines = [("new", REPO)] + ([("old", args.old.resolve())] if args.old else [])
    rows = []
    try:
        for size in args.sizes:
            data = work / f"pairs-{size}.jsonl"
            if not data.exists():
                write_pairs(data, size)
            for name, checkout in pipelines:
                config = work / f"{name}-{size}.yaml"
                config.write_text(
                    yaml.safe_dump(
                        {
                            "model": {"path": str(model_dir)},
                            "data": {
                                "sources": [{"adapter": "generic", "path": str(data), "role": "safety"}],
                                "max_length": 256,
                                "max_prompt_length": 64,
                                "score_actors": 2,
                                "score_batch_size": 16,
                                "cache_dir": str(work / f"cache-{name}-{size}"),
                            },
                        }
                    )
                )
                seconds, driver_mb = run_prepare(checkout, config, env)
                manifest = json.loads(next((work / f"cache-{name}-{size}").glob("*/manifest.json")).read_text())
                actors = manifest.get("scoring", {}).get("actors_peak_rss_mb")  # the new pipeline's manifest only
                row = {
                    "pipeline": name,
                    "pairs": size,
                    "seconds": round(seconds, 1),
                    "pairs_per_s": round(manifest["counts"]["kept"] / seconds, 1),
                    "driver_peak_rss_mb": round(driver_mb),
                    "actors": actors,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        largest = work / f"new-{max(args.sizes)}.yaml"
        for workers in args.train_workers:
            peaks = train_worker_peaks(largest, env, workers, work / "runs")
            print(
                json.dumps(
                    {
                        "train_workers": workers,
                        "pairs": max(args.sizes),
                        "worker_peak_rss_mb": [round(p) for p in peaks],
                    }
                ),
                flush=True,
            )
    finally:
        ray.shutdown()
    print("\n| pipeline | pairs | seconds | pairs/s | driver peak RSS MB |\n|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['pipeline']} | {row['pairs']} | {row['seconds']} | {row['pairs_per_s']} | "
            f"{row['driver_peak_rss_mb']} |"
        )


if __name__ == "__main__":
    main()
