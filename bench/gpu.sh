#!/usr/bin/env bash
# bench/gpu.sh - the one prepared script for a short GPU lease (one H100/H200, 15 min of device time in all,
# machine start included). It caps itself at GPU_SH_BUDGET seconds (default 420 = 7 min) and always writes
# the summary. Nothing needs to be carried: the device machine has torch, triton, numpy, scipy, tqdm, h5py, opencv,
# matplotlib and pytest, and no step imports nibabel (only NIfTI reading does).
#
#   run(command="GIT_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu.sh", timeout_s=480)
#
# Steps, in order of value (each bounded by its own timeout; a failed or timed-out step is recorded and the script
# goes on; the exit code is 1 if any step failed):
#   a. environment: nvidia-smi, python/torch/triton versions, commit                          ~5 s   (timeout 30)
#   b. pytest tests/test_fused_dice.py with TRITON_INTERPRET=0: the kernels compiled for the card, the CUDA-only
#      tests at (64, 1, 240, 240) included; any skip of a CUDA test means the CUDA path was not exercised ~60 s (90)
#   c. bench/train.py: the throughput ablation at 240 x 240, batch 64, base 32 (seed baseline → cache → resident →
#      channels_last → bf16 → compile → fused loss), MFU and GPU busy                          ~180 s (220)
#   d. bench/loss.py: the fused loss against eager and compiled PyTorch, B up to 1024           ~60 s (100)
#   e. train.py end to end on synthetic data: resident, bf16, torch.compile, the Triton loss    ~60 s (100)
#   f. bench/loss.py --weight float32 at B 64, 256: the weighted kernels (train.py --boundary-weight) ~30 s (60)
#
# Outputs, all directly under ${OUT:-bench/out}: summary.txt (environment + step table), pytest.log, train.md,
# train.log, loss.md, e2e.log, e2e_metrics.json, loss_weighted.md.
#
# Knobs (environment): OUT; PYTHON (default python3); GIT_COMMIT (else git rev-parse, else "unknown");
# GPU_SH_BUDGET (seconds, default 420); GPU_SH_STEPS (which of b c d e f, default all); GPU_SH_WORK (scratch for
# data caches, default /tmp/gpu-sh); GPU_SH_DEVICE (default cuda; cpu: the dry run below).
#
# Dry run on a CPU, which runs every step for real at tiny sizes (Triton in the interpreter) and proves the script's
# own logic - timeouts, the budget, the summary, the exit code (~3 min on 2 cores):
#   GPU_SH_DEVICE=cpu OUT=/tmp/gpu-dry PYTHON=.venv/bin/python bash bench/gpu.sh
# After the run on the device: give the machine back unless rerunning a failed step at once (GPU_SH_STEPS="c").

set -uo pipefail
export PYTHONUNBUFFERED=1

if [ -n "${OUT:-}" ] && [ "${OUT#/}" = "$OUT" ]; then OUT=$PWD/$OUT; fi  # a relative OUT: from the caller's folder
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1  # the repository root
OUT=${OUT:-bench/out}
BUDGET=${GPU_SH_BUDGET:-420}
WORK=${GPU_SH_WORK:-/tmp/gpu-sh}
DEVICE=${GPU_SH_DEVICE:-cuda}
STEPS=" ${GPU_SH_STEPS:-b c d e f} "
PY=${PYTHON:-python3}
SUMMARY=$OUT/summary.txt
START=$SECONDS
mkdir -p "$OUT" "$WORK" || exit 1
: >"$SUMMARY"

if [ "$DEVICE" = cpu ]; then  # the dry run: the same steps at tiny sizes
    PYTEST_ENV="TRITON_INTERPRET=1"
    TRAIN_BENCH=(bench/train.py --device cpu --quick --rows seed,cache,resident,channels_last --workers 1)
    LOSS_BENCH=(bench/loss.py --device cpu --batches 2 --repeats 3)
    WEIGHTED_LOSS_BENCH=(bench/loss.py --device cpu --batches 2 --repeats 3 --no-compile --weight float32)
    E2E=(train.py --data synthetic:4x10 --size 32 --base 4 --depth 2 --batch-size 8 --epochs 2 --device cpu)
else
    PYTEST_ENV="TRITON_INTERPRET=0"
    TRAIN_BENCH=(bench/train.py --device cuda --data synthetic:6x80 --workers 8)
    LOSS_BENCH=(bench/loss.py --device cuda)
    WEIGHTED_LOSS_BENCH=(bench/loss.py --device cuda --batches 64,256 --weight float32)
    E2E=(train.py --data synthetic:6x40 --size 128 --epochs 2 --device cuda)
fi

NAMES=() RCS=() SECS=() NOTES=()
FAILED=0

step() {  # step NAME TIMEOUT_S LOGFILE COMMAND...: run with a timeout, log, record; never aborts the script
    local name=$1 limit=$2 log=$3 t0 rc note left
    shift 3
    if [[ $STEPS != *" ${name%%.*} "* ]]; then
        NAMES+=("$name") RCS+=(skip) SECS+=(0) NOTES+=("not in GPU_SH_STEPS")
        return
    fi
    left=$((BUDGET - (SECONDS - START) - 10))
    if ((left < 10)); then
        NAMES+=("$name") RCS+=(skip) SECS+=(0) NOTES+=("skipped: the ${BUDGET} s budget is spent")
        FAILED=1
        return
    fi
    ((limit > left)) && limit=$left
    echo "== [$name] (timeout ${limit}s) $*" | tee -a "$SUMMARY"
    t0=$SECONDS
    timeout -k 5 "$limit" "$@" >"$log" 2>&1
    rc=$?
    note=$(grep -v '^[[:space:]]*$' "$log" 2>/dev/null | tail -n 1 | tr -d '\r' | cut -c1-100)
    ((rc == 124 || rc == 137)) && note="TIMED OUT after ${limit}s; $note"
    ((rc != 0)) && FAILED=1
    NAMES+=("$name") RCS+=("$rc") SECS+=($((SECONDS - t0))) NOTES+=("$note")
    echo "   rc=$rc in $((SECONDS - t0))s: $note" | tee -a "$SUMMARY"
}

# a. environment ---------------------------------------------------------------------------------------------
{
    echo "# bench/gpu.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC'), device $DEVICE, budget ${BUDGET}s"
    echo "commit: ${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    timeout 60 "$PY" - <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, sm_{p.major}{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}, {torch.cuda.device_count()} device(s)")
for mod in ("triton", "numpy", "scipy", "cv2", "h5py", "matplotlib", "tqdm", "pytest"):
    try:
        print(f"{mod} {__import__(mod).__version__}", end="; ")
    except Exception as e:
        print(f"{mod} MISSING ({type(e).__name__})", end="; ")
print()
EOF
    echo "cpus: $(nproc); load: $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>&1 | tee -a "$SUMMARY"
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device: nothing to measure (for a CPU dry run set GPU_SH_DEVICE=cpu)" | tee -a "$SUMMARY"
    FAILED=1
    STEPS=" "
fi
echo | tee -a "$SUMMARY"

# b-f ----------------------------------------------------------------------------------------------------------
step b.pytest 90 "$OUT/pytest.log" env "$PYTEST_ENV" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_fused_dice.py
step c.train_bench 220 "$OUT/train.log" "$PY" "${TRAIN_BENCH[@]}" --cache-dir "$WORK/cache" --out "$OUT/train.md"
step d.loss_bench 100 "$OUT/loss.md" "$PY" "${LOSS_BENCH[@]}"
step e.e2e 100 "$OUT/e2e.log" "$PY" "${E2E[@]}" --out "$WORK/e2e" --cache-dir "$WORK/cache" --overwrite on
[ -f "$WORK/e2e/metrics.json" ] && cp "$WORK/e2e/metrics.json" "$OUT/e2e_metrics.json"
step f.weighted 60 "$OUT/loss_weighted.md" "$PY" "${WEIGHTED_LOSS_BENCH[@]}"

# summary (always) ---------------------------------------------------------------------------------------------
{
    echo
    echo "## summary: $((SECONDS - START)) s of the ${BUDGET} s budget; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
    printf '| %-14s | %4s | %5s | %s\n' step rc s "last line of its log"
    for i in "${!NAMES[@]}"; do
        printf '| %-14s | %4s | %5s | %s\n' "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
    done
    echo "result: $([ $FAILED = 0 ] && echo 'every step passed' || echo 'SOME STEP FAILED (see the table)')"
} | tee -a "$SUMMARY"
exit $FAILED
