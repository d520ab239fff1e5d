#!/usr/bin/env bash
# One-GPU check of the trainer on a 1B-class model, all within about 8 minutes:
#
#     bench/gpu_check.sh              # on a machine with one NVIDIA GPU
#     bench/gpu_check.sh --dry-run    # on CPU: the same runs of the same benchmark on the 4.2M toy, fp32, sdpa
#
# What it does:
#   1. Installs what is missing, from the package index: the project and its pinned dependencies
#      (pip install -c constraints.txt -e .) when `import bfpo_ray, ray, deepspeed` fails, then flash-attn only as a
#      prebuilt wheel (--only-binary: no half-hour compile); without one the flash-attention runs are skipped.
#   2. Runs bench/train_throughput.py (ours only: Ray Train, one worker, one GPU, DeepSpeed) on a Llama-3.2-1B-shaped
#      model built from its config with random weights (1.24B parameters, vocab 128256; nothing downloads), bf16,
#      every parameter trained, batch 8 pairs of rows of about 360 tokens (prompt ~128, responses ~224 words of one
#      token each, max length 512), one run per variant:
#          sdpa ZeRO-2, sdpa ZeRO-2 + gradient checkpointing, sdpa ZeRO-3, sdpa ZeRO-3 + gradient checkpointing,
#          flash_attention_2 ZeRO-2 (+ gradient checkpointing, + padding-free), if flash-attn installed.
#      Every run stops by the deadline (GPU_CHECK_BUDGET_S, default 470 s after the start, installs included; a run
#      gets at most 240 s, the first, which builds the model and scores the pairs, all that is left); a variant with
#      less than 60 s left is skipped. The summary follows: about 8 minutes in all.
#   3. Prints per variant: tokens/s, pairs/s, step time, MFU against a bf16 8192^3 matmul timed on the same GPU just
#      before and after the run, MFU against the GPU's datasheet dense bf16 peak (where the name is known), and the
#      worker's peak CUDA memory (nvidia-smi used_memory, sampled every 0.25 s: PyTorch's cache and the CUDA
#      context included). Logs and JSON lines go to $GPU_CHECK_DIR (default /tmp/bfpo-gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; fi
START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # seconds from the start (installs included) after which no run goes on
OUT_DIR=${GPU_CHECK_DIR:-/tmp/bfpo-gpu-check}
mkdir -p "$OUT_DIR"

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

if [[ $DRY_RUN == 0 ]]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: $PY has no torch that sees a GPU (torch.cuda.is_available() is false); install the CUDA" \
             "build first: $PY -m pip install torch==\$(grep '^torch==' constraints.txt | cut -d= -f3)" >&2
        exit 2
    fi
    if ! "$PY" -c "import bfpo_ray, ray, deepspeed, transformers" 2>/dev/null; then
        echo "# installing the project and its pinned dependencies"
        "$PY" -m pip install -q -c constraints.txt -e .
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
    COMMON=(--model llama1b --trainable all --device cuda --only ours --rounds 1 --warmup-steps 4 --steps 12)
else
    COMMON=(--model tiny --trainable all --device cpu --only ours --rounds 1 --warmup-steps 1 --steps 2 --pairs 24)
fi

HAS_FLASH=0
if [[ $DRY_RUN == 0 ]] && "$PY" -c "import flash_attn" 2>/dev/null; then HAS_FLASH=1; fi

VARIANTS=("sdpa-z2:--attn sdpa --zero-stage 2"
          "sdpa-z2-ckpt:--attn sdpa --zero-stage 2 --gradient-checkpointing"
          "sdpa-z3:--attn sdpa --zero-stage 3"
          "sdpa-z3-ckpt:--attn sdpa --zero-stage 3 --gradient-checkpointing")
if [[ $HAS_FLASH == 1 ]]; then
    VARIANTS+=("fa2-z2:--attn flash_attention_2 --zero-stage 2"
               "fa2-z2-ckpt:--attn flash_attention_2 --zero-stage 2 --gradient-checkpointing"
               "fa2-z2-packed:--attn flash_attention_2 --zero-stage 2 --padding-free")
fi

RESULTS="$OUT_DIR/results.jsonl"
: > "$RESULTS"
for variant in "${VARIANTS[@]}"; do
    name=${variant%%:*}
    read -r -a flags <<< "${variant#*:}"
    left=$(( BUDGET_S - ($(date +%s) - START) ))
    if (( left < 60 )); then
        echo "# $name: skipped, $(( BUDGET_S - left )) s spent of the ${BUDGET_S} s budget"
        continue
    fi
    run_limit=$(( left < 240 ? left : 240 ))
    if [[ ! -f "$OUT_DIR/work/pairs.jsonl" ]]; then run_limit=$left; fi  # the first run builds model and data
    echo "# $name: bench/train_throughput.py ${COMMON[*]} ${flags[*]}"
    # The model and the scored dataset are built once in $OUT_DIR/work and reused; each run's checkpoint is not.
    if timeout "$run_limit" "$PY" bench/train_throughput.py "${COMMON[@]}" "${flags[@]}" --workdir "$OUT_DIR/work" \
            > "$OUT_DIR/$name.log" 2>&1; then
        grep '^{"command"' "$OUT_DIR/$name.log" | tail -n 1 | sed "s/^{/{\"variant\": \"$name\", /" >> "$RESULTS"
    else
        echo "# $name: FAILED (exit $?); last lines of $OUT_DIR/$name.log:"
        tail -n 15 "$OUT_DIR/$name.log"
    fi
    rm -rf "$OUT_DIR"/work/runs-*
done

"$PY" - "$RESULTS" "$DRY_RUN" <<'EOF'
import json, sys

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (no sparsity).
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.5,
                         "H100 NVL": 835.0, "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
                         "A10G": 70.0, "A10": 125.0, "B200": 2250.0}
lines = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
dry = sys.argv[2] == "1"
if not lines:
    sys.exit("# no variant finished")
name = ""
if not dry:
    import torch
    name = torch.cuda.get_device_name(0)
peak = next((v for k, v in sorted(DATASHEET_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)
if dry:
    print("# dry run on CPU: the tiny model, fp32, MFU against an fp32 matmul, peak memory = the worker's peak RSS")
else:
    print(f"# {name}; datasheet dense bf16 peak: {f'{peak:.0f} TFLOP/s' if peak else 'unknown for this GPU'}")
print(f"{'variant':>14} {'tokens/s':>9} {'pairs/s':>8} {'step s':>7} {'matmul TF/s':>11} {'MFU':>6} "
      f"{'MFU datasheet':>13} {'peak mem MB':>11}")
for line in lines:
    run = line["runs"][0]
    matmul = (run["matmul_gflops_before"] + run["matmul_gflops_after"]) / 2 / 1000
    datasheet = f"{run['model_gflops'] / 1000 / peak:.1%}" if peak else "-"
    memory = run.get("peak_cuda_mb", run.get("peak_rss_mb"))
    print(f"{line['variant']:>14} {run['tokens_per_s']:>9.0f} {run['pairs_per_s']:>8.2f} {run['step_s']:>7.3f} "
          f"{matmul:>11.1f} {run['mfu']:>6.1%} {datasheet:>13} {memory if memory is None else round(memory):>11}")
EOF
echo "# total $(( $(date +%s) - START )) s"
