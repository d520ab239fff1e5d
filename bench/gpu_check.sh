#!/usr/bin/env bash
# One-GPU check of the trainer on a 1B-class model, ours against TRL, and the default job, all within about 9 minutes:
#
#     bench/gpu_check.sh                       # on a machine with one NVIDIA GPU: every variant below, in order
#     bench/gpu_check.sh trl sdpa-z2           # only the variants named, in the order named
#     bench/gpu_check.sh --dry-run [VARIANT...] # on CPU: the same runs, the same logs and summary, tiny settings
#
# What it does:
#   1. Installs what is missing, from the package index: the project and its pinned dependencies
#      (pip install -c constraints.txt -e '.[bench]', TRL included) when `import bfpo_ray, ray, deepspeed, trl`
#      fails, then flash-attn only as a prebuilt wheel (--only-binary: no half-hour compile); without one the
#      flash-attention runs are skipped.
#   2. Runs, one variant after the other (a variant with less than 60 s of the budget left is skipped):
#        sdpa-z2        bench/train_throughput.py --only ours --device cuda on a Llama-3.2-1B-shaped model built from
#                       its config with random weights (1.24B parameters, vocab 128256; nothing downloads), bf16,
#                       every parameter trained, batch 8 pairs of rows of about 360 tokens, ZeRO-2, sdpa; the first
#                       run builds the model and scores the pairs, which the later runs reuse
#        trl            the same, ours against TRL's DPOTrainer (IPO, precomputed reference log-probs) on the same
#                       GPU, model, pairs and batch: pairs/s, MFU and peak CUDA memory side by side, and their ratio
#        default-job    jobs/bfpo.py with run.use_gpu=true on one worker (the toy world: SFT stage, prepare, BFPO,
#                       export, evaluation before/after), in $GPU_CHECK_DIR/work/job
#        sdpa-z3, sdpa-z2-ckpt, sdpa-z3-ckpt     ours, ZeRO-3 and gradient checkpointing
#        sdpa-z0        ours without ZeRO (DeepSpeed's bf16 optimizer alone): what ZeRO-2 costs on one GPU
#        fa2-z2, fa2-z2-ckpt, fa2-z2-packed      ours with flash_attention_2 (+ checkpointing, + padding-free), if
#                       flash-attn installed
#      Each variant's Ray sessions live in a directory of their own (RAY_TMPDIR), so that its logs are its own.
#      Every run stops by the deadline (GPU_CHECK_BUDGET_S, default 540 s after the start, installs included).
#   3. Writes, per variant, $GPU_CHECK_DIR/<variant>/ (default /tmp/bfpo-gpu-check): output.log (what the variant
#      printed), driver.log (each trainer process: our Ray driver, TRL's process), and ray/<session>/ with the full
#      error output of every Ray worker (worker-*.err), the job drivers' logs (job-driver-*.log) and the raylet's and
#      GCS's error output of its Ray sessions; results.jsonl holds each benchmark's final JSON line, versions.txt
#      the packages' versions, summary.txt the summary. A run stopped by its time limit has the processes of
#      its Ray session ended (by process id) before the next variant starts.
#   4. Prints per benchmark run: tokens/s, pairs/s, step time, MFU against a bf16 8192^3 matmul timed on the same GPU
#      just before and after the run, MFU against the GPU's datasheet dense bf16 peak (where the name is known), peak
#      CUDA memory (nvidia-smi used_memory of the trainer process, cache and context included); the ours/TRL ratios;
#      then a summary: each variant ok, skipped, or FAILED with its first error line.
#   --dry-run: on CPU, the tiny 4.2M model, fp32, 1 warm-up + 2 timed steps on 24 pairs, and the default job
#   without its SFT stage, 2 steps, short generations (run.use_gpu=false); GPU_CHECK_JOB_ARGS adds overrides to the
#   default job (e.g. run.use_gpu=true: the run stops at the workers' "no CUDA device" check).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
START=$(date +%s)
OUT_DIR=$(mkdir -p "${GPU_CHECK_DIR:-/tmp/bfpo-gpu-check}" && cd "${GPU_CHECK_DIR:-/tmp/bfpo-gpu-check}" && pwd)

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=$REPO/.venv/bin/python
else PY=python3
fi
if [[ $PY == */* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi  # the job runs elsewhere

if [[ $DRY_RUN == 0 ]]; then
    BUDGET_S=${GPU_CHECK_BUDGET_S:-540}  # seconds from the start (installs included) after which no run goes on
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: $PY has no torch that sees a GPU (torch.cuda.is_available() is false); install the CUDA" \
             "build first: $PY -m pip install torch==\$(grep '^torch==' constraints.txt | cut -d= -f3)" >&2
        exit 2
    fi
    if ! "$PY" -c "import bfpo_ray, ray, deepspeed, transformers, trl" 2>/dev/null; then
        echo "# installing the project, TRL and their pinned dependencies"
        "$PY" -m pip install -q -c constraints.txt -e '.[bench]' || exit 2
    fi
    if ! "$PY" -c "import flash_attn" 2>/dev/null; then
        echo "# flash-attn: trying a prebuilt wheel (no source build)"
        timeout 120 "$PY" -m pip install -q --only-binary :all: flash-attn \
            || echo "# flash-attn: no wheel installed; the flash_attention_2 runs are skipped"
    fi
    "$PY" - <<'EOF'
import torch
print(f"# GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
    COMMON=(--model llama1b --trainable all --device cuda --rounds 1 --warmup-steps 4 --steps 12)
    JOB_ARGS=(run.use_gpu=true run.num_workers=1 data.score_actors=1 evaluate.actors=1)
    RUN_LIMIT=240   # seconds per benchmark run; a variant of two runs (trl) or the default job gets twice that
else
    BUDGET_S=${GPU_CHECK_BUDGET_S:-7200}
    COMMON=(--model tiny --trainable all --device cpu --rounds 1 --warmup-steps 1 --steps 2 --pairs 24)
    JOB_ARGS=(run.use_gpu=false model.sft_first=null train.max_steps=2 train.log_every=1 evaluate.samples=1
              evaluate.max_new_tokens=8 data.score_actors=1 evaluate.actors=1)
    RUN_LIMIT=1200
fi
read -r -a EXTRA_JOB_ARGS <<< "${GPU_CHECK_JOB_ARGS:-}"
"$PY" - <<'EOF' | tee "$OUT_DIR/versions.txt"
import importlib.metadata as metadata, platform
names = ("torch", "transformers", "deepspeed", "ray", "trl", "datasets", "accelerate", "peft", "tokenizers")
found = []
for name in names:
    try:
        found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        found.append(f"{name} -")
print(f"# versions: python {platform.python_version()}, " + ", ".join(found))
EOF

HAS_FLASH=0
if [[ $DRY_RUN == 0 ]] && "$PY" -c "import flash_attn" 2>/dev/null; then HAS_FLASH=1; fi

ALL=("sdpa-z2:--only ours --attn sdpa --zero-stage 2"
     "trl:--only both --attn sdpa --zero-stage 2"
     "default-job:"
     "sdpa-z3:--only ours --attn sdpa --zero-stage 3"
     "sdpa-z2-ckpt:--only ours --attn sdpa --zero-stage 2 --gradient-checkpointing"
     "sdpa-z3-ckpt:--only ours --attn sdpa --zero-stage 3 --gradient-checkpointing"
     "sdpa-z0:--only ours --attn sdpa --zero-stage 0"
     "fa2-z2:--only ours --attn flash_attention_2 --zero-stage 2"
     "fa2-z2-ckpt:--only ours --attn flash_attention_2 --zero-stage 2 --gradient-checkpointing"
     "fa2-z2-packed:--only ours --attn flash_attention_2 --zero-stage 2 --padding-free")
NAMES=("$@")  # the variants named, in the order named; all of them, in the order above, when none is
if (( ${#NAMES[@]} == 0 )); then NAMES=("${ALL[@]%%:*}"); fi
VARIANTS=()
for asked in "${NAMES[@]}"; do
    found=
    for variant in "${ALL[@]}"; do
        if [[ ${variant%%:*} == "$asked" ]]; then found=$variant; fi
    done
    if [[ -z $found ]]; then
        echo "gpu_check: no variant $asked; the variants: ${ALL[*]%%:*}" >&2
        exit 2
    fi
    VARIANTS+=("$found")
done

# first_error DIR: the first line that reads like an error, in the workers' error output, then the drivers' logs,
# then what the variant printed
first_error() {
    local file line
    for file in $(ls "$1"/ray/*/worker-*.err 2>/dev/null) "$1/driver.log" "$1/output.log"; do
        [[ -f "$file" ]] || continue
        line=$(grep -m1 -E '^[[:space:]]*(([A-Za-z_][A-Za-z0-9_.]*)?(Error|Exception)[A-Za-z]*|error): ' "$file")
        if [[ -n "$line" ]]; then echo "${line#"${line%%[![:space:]]*}"}"; return; fi
    done
    tail -n 1 "$1/output.log"
}

# keep_logs DIR RAY_TMP: copy the variant's trainer logs (the benchmark's children; the default job is its own
# driver) and its Ray sessions' worker error output and job driver logs
keep_logs() {
    local dir=$1 ray_tmp=$2 session
    if compgen -G "$OUT_DIR/work/*-round0.log" > /dev/null; then
        cat "$OUT_DIR"/work/*-round0.log > "$dir/driver.log"
        rm -f "$OUT_DIR"/work/*-round0.log
    fi
    for session in "$ray_tmp"/ray/session_2*; do
        [[ -d "$session/logs" ]] || continue
        mkdir -p "$dir/ray/${session##*/}"
        cp "$session"/logs/{worker-*.err,job-driver-*.log,raylet.err,gcs_server.err} "$dir/ray/${session##*/}/" \
            2>/dev/null || true
    done
    rm -rf "$ray_tmp"
}

# end_leftovers RAY_TMP: end the processes a variant left behind (a run stopped by its time limit leaves its Ray
# node, whose workers would hold the GPU's memory during the next variant): those whose command line names the
# variant's own Ray directory, by process id
end_leftovers() {
    local pid pids=()
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        if { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$1/"; then pids+=("$pid"); fi
    done
    if (( ${#pids[@]} > 0 )); then
        echo "# ending ${#pids[@]} processes left by the run in $1"
        kill -TERM "${pids[@]}" 2>/dev/null; sleep 3; kill -KILL "${pids[@]}" 2>/dev/null
    fi
    return 0
}

RESULTS="$OUT_DIR/results.jsonl"
: > "$RESULTS"
mkdir -p "$OUT_DIR/work"
RAY_ROOT=$(mktemp -d /tmp/bgc.XXXXXX)  # short: Ray's socket paths live under it
SUMMARY=()
index=0
for variant in "${VARIANTS[@]}"; do
    name=${variant%%:*}
    read -r -a flags <<< "${variant#*:}"
    index=$((index + 1))
    left=$(( BUDGET_S - ($(date +%s) - START) ))
    if [[ $name == fa2-* && $HAS_FLASH == 0 ]]; then
        SUMMARY+=("$name|skipped: no flash-attn"); continue
    fi
    if (( left < 60 )); then
        echo "# $name: skipped, $(( BUDGET_S - left )) s spent of the ${BUDGET_S} s budget"
        SUMMARY+=("$name|skipped: budget spent"); continue
    fi
    limit=$RUN_LIMIT
    if [[ $name == trl || $name == default-job ]]; then limit=$(( 2 * RUN_LIMIT )); fi
    if [[ ! -f "$OUT_DIR/work/pairs.jsonl" && $name != default-job ]]; then limit=$left; fi  # builds model and data
    limit=$(( left < limit ? left : limit ))
    dir="$OUT_DIR/$name"
    rm -rf "$dir" && mkdir -p "$dir"
    export RAY_TMPDIR="$RAY_ROOT/$index"
    mkdir -p "$RAY_TMPDIR"
    began=$(date +%s)
    if [[ $name == default-job ]]; then
        job_dir="$OUT_DIR/work/job"
        mkdir -p "$job_dir"
        echo "# $name: jobs/bfpo.py ${JOB_ARGS[*]} ${EXTRA_JOB_ARGS[*]} (in $job_dir)"
        (cd "$job_dir" && timeout "$limit" "$PY" "$REPO/jobs/bfpo.py" "${JOB_ARGS[@]}" "${EXTRA_JOB_ARGS[@]}") \
            > "$dir/output.log" 2>&1
        status=$?
        cp "$dir/output.log" "$dir/driver.log"
    else
        echo "# $name: bench/train_throughput.py ${COMMON[*]} ${flags[*]}"
        # The model and the scored dataset are built once in $OUT_DIR/work and reused; each run's checkpoint is not.
        timeout "$limit" "$PY" bench/train_throughput.py "${COMMON[@]}" "${flags[@]}" --workdir "$OUT_DIR/work" \
            > "$dir/output.log" 2>&1
        status=$?
        if [[ $status == 0 ]]; then
            grep '^{"command"' "$dir/output.log" | tail -n 1 | sed "s/^{/{\"variant\": \"$name\", /" >> "$RESULTS"
        fi
        rm -rf "$OUT_DIR"/work/runs-*
    fi
    unset RAY_TMPDIR
    if [[ $status != 0 ]]; then end_leftovers "$RAY_ROOT/$index"; fi
    keep_logs "$dir" "$RAY_ROOT/$index"
    seconds=$(( $(date +%s) - began ))
    if [[ $status == 0 ]]; then
        SUMMARY+=("$name|ok ($seconds s)")
    else
        reason=$([[ $status == 124 ]] && echo "timed out after $limit s" || echo "exit $status")
        SUMMARY+=("$name|FAILED ($reason, $seconds s): $(first_error "$dir")")
        echo "# $name: FAILED ($reason); last lines of $dir/output.log:"
        tail -n 15 "$dir/output.log"
    fi
done
rmdir "$RAY_ROOT" 2>/dev/null

if [[ -s "$RESULTS" ]]; then
"$PY" - "$RESULTS" "$DRY_RUN" <<'EOF'
import json, sys

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (no sparsity).
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.5,
                         "H100 NVL": 835.0, "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
                         "A10G": 70.0, "A10": 125.0, "B200": 2250.0}
lines = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
dry = sys.argv[2] == "1"
name = ""
if not dry:
    import torch
    name = torch.cuda.get_device_name(0)
peak = next((v for k, v in sorted(DATASHEET_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)
if dry:
    print("# dry run on CPU: the tiny model, fp32, MFU against an fp32 matmul, peak memory = the process's peak RSS")
else:
    print(f"# {name}; datasheet dense bf16 peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown for this GPU'}")
print(f"{'variant':>14} {'run':>5} {'tokens/s':>9} {'pairs/s':>8} {'step s':>7} "
      f"{'matmul GF/s' if dry else 'matmul TF/s':>11} {'MFU':>6} {'MFU datasheet':>13} {'peak mem MB':>11}")
for line in lines:
    for run in line["runs"]:
        matmul = (run["matmul_gflops_before"] + run["matmul_gflops_after"]) / 2 / (1 if dry else 1000)
        datasheet = f"{run['model_gflops'] / 1000 / peak:.1%}" if peak else "-"
        memory = run.get("peak_rss_mb") if dry else run.get("peak_cuda_mb")
        print(f"{line['variant']:>14} {run['label']:>5} {run['tokens_per_s']:>9.0f} {run['pairs_per_s']:>8.2f} "
              f"{run['step_s']:>7.3f} {matmul:>11.1f} {run['mfu']:>6.1%} {datasheet:>13} "
              f"{'-' if memory is None else round(memory):>11}")
    if line.get("ratio_pairs_per_s"):
        memory = line.get("ratio_peak_rss") if dry else line.get("ratio_peak_cuda")
        print(f"{line['variant']:>14} ours/TRL: pairs/s {line['ratio_pairs_per_s']:.2f}x, peak memory "
              f"{f'{memory:.2f}x' if memory else '-'}, same token ids: "
              f"{next((run['same_tokens'] for run in line['runs'] if 'same_tokens' in run), '-')}")
EOF
fi
failed=0
{
    echo "# summary ($OUT_DIR)"
    for entry in "${SUMMARY[@]}"; do
        printf '%14s  %s\n' "${entry%%|*}" "${entry#*|}"
    done
    echo "# total $(( $(date +%s) - START )) s"
} | tee "$OUT_DIR/summary.txt"
for entry in "${SUMMARY[@]}"; do
    if [[ ${entry#*|} == FAILED* ]]; then failed=1; fi
done
exit $failed
