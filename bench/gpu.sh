#!/usr/bin/env bash
# bench/gpu.sh - the one prepared script for a short GPU lease (one H100/H200, 15 min of device time in all,
# machine start included). It caps itself at GPU_SH_BUDGET seconds (default 300 = 5 min: with the machine's start,
# 30 s on 2026-12-04 and up to 3 min by the tool's notes, a 15-minute lease leaves time to rerun the failed steps
# while the machine is still warm, which is only 30 s after a call) and always writes the summary. Nothing needs to be carried: the device machine has torch, triton, numpy, scipy, tqdm, h5py, opencv,
# matplotlib and pytest, and no step imports nibabel (only NIfTI reading does).
#
# Commit first, then run it with the commit spelled out here (`$(git rev-parse ...)` inside the command would
# expand on the device machine, whose copy of the tree had a stale .git on 2026-12-04):
#   run(command="GIT_COMMIT=<`git rev-parse --short HEAD` here> bash bench/gpu.sh", timeout_s=360)
# At the end it prints the command that reruns the failed steps; run it at once, or give the machine back.
#
# Steps, in order of value, each bounded by its cap; the caps (150 + 30 + 45 + 25 + 40) and step a's ~8 s add up
# to the budget. A failed or timed-out step is recorded and the script goes on; the exit code is 1 if any step
# failed or was skipped for the budget. Times: measured on one H200 on 2026-12-04 (torch 2.11, triton 3.6), cold
# = a fresh machine, warm = its compile caches filled by an earlier call; cold compiles dominate.
#   a. environment: nvidia-smi, python/torch/triton versions, commit; a CUDA probe (60 s timeout)     ~8 s
#   b. bench/throughput.py: the throughput ablation at 240 x 240, batch 64, base 32 (seed baseline → cache → resident →
#      channels_last → bf16 → compile → fused loss), MFU, GPU busy and the top kernels of two rows; its report is
#      rewritten before every row, so a timeout keeps the finished rows.   cold > 130 s (its two compiles), warm ~70 s
#   c. bench/loss.py at B 64 and 256, C = 1 (the whole tumour) and C = 3 (the three regions): the fused loss
#      against eager and compiled PyTorch; it exits 1 if the kernels disagree with the reference. Four (B, C)
#      shapes, as many as the B 16-1024 at C = 1 measured cold at ~35 s, warm ~30 s; C = 3 adds two compiles
#   d. train.py end to end at the shape of step b's last row (resident, bf16, torch.compile, the Triton loss),
#      so the training step's compiled graph comes from the cache step b filled; only the evaluation forward
#      compiles anew                                                                           44 s after step b
#   e. bench/cache.py: the cold start's other half, the cache build of 16 Kaggle-layout .h5 volumes (one phantom
#      hard-linked 16 times: writing phantoms takes ~6 s each) with 16 worker processes, slices/s    est. ~20 s
#   f. pytest tests/test_fused_dice.py with TRITON_INTERPRET=0: the kernels compiled for the card, the CUDA-only
#      tests at (64, 1, 240, 240) included, in 16 processes where pytest-xdist is installed (it is on the device
#      machine). Expected skips on one GPU: the two-device test and the CPU-interpreter benchmark test; any other
#      skip fails the step                                                               cold 39 s with 8 processes
#
# Outputs, all directly under ${OUT:-bench/out} (the files of earlier runs are deleted first, so every file there
# is this run's): summary.txt (environment + step table + rerun command), train.md, train.log, loss.md, e2e.log,
# e2e_metrics.json (only when step d passed), cache.md, pytest.log.
#
# Knobs (environment): OUT; PYTHON (default python3); GIT_COMMIT (else git rev-parse, else "unknown");
# GPU_SH_BUDGET (seconds, default 300); GPU_SH_STEPS (which of b c d e f, default all); GPU_SH_WORK (scratch for
# data caches, default /tmp/gpu-sh); GPU_SH_DEVICE (default cuda; cpu: the dry run below).
#
# Dry run on a CPU under the device machine's versions, which runs every step for real at tiny sizes (Triton in
# the interpreter) and proves the script's own logic - caps, the budget, the summary, the exit code. Triton 3.6's
# interpreter fails with numpy >= 2.4 (int() of a 1-element array), so pin numpy there (the device machine's numpy
# 2.5 is fine: it does not use the interpreter):
#   python3 -m venv /tmp/venv211 && /tmp/venv211/bin/pip install torch==2.11.0 triton==3.6.0 'numpy<2.4' \
#       opencv-python-headless matplotlib scipy h5py tqdm pytest      # PyPI's CUDA build, ~5 GB; runs on a CPU
#   GPU_SH_DEVICE=cpu OUT=/tmp/gpu-dry PYTHON=/tmp/venv211/bin/python bash bench/gpu.sh
# (63 s on a 2-core AMD EPYC, 2026-12-04, commit d18c966.) A test in tests/test_gpu_sh.py checks the script's own logic on
# every CI run: stale files, the budget, failed steps and their rerun command, the commit it names.

set -uo pipefail
export PYTHONUNBUFFERED=1

if [ -n "${OUT:-}" ] && [ "${OUT#/}" = "$OUT" ]; then OUT=$PWD/$OUT; fi  # a relative OUT: from the caller's folder
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1  # the repository root
OUT=${OUT:-bench/out}
BUDGET=${GPU_SH_BUDGET:-300}
WORK=${GPU_SH_WORK:-/tmp/gpu-sh}
DEVICE=${GPU_SH_DEVICE:-cuda}
ALL_STEPS="b c d e f"
STEPS=" ${GPU_SH_STEPS-$ALL_STEPS} "
PY=${PYTHON:-python3}
SUMMARY=$OUT/summary.txt
OUTPUTS=(summary.txt train.md train.log loss.md e2e.log e2e_metrics.json cache.md pytest.log)
START=$SECONDS
mkdir -p "$OUT" "$WORK" || exit 1
for f in "${OUTPUTS[@]}"; do rm -f "${OUT:?}/$f"; done
: >"$SUMMARY"

# The commit the numbers belong to: as given by the caller (on the GPU machine the copy's .git, if any, can be
# stale: seen 2026-12-04, it named the session's first commit), else this checkout's; exported, so every
# benchmark's header names the same one (bench/common.git_commit reads GIT_COMMIT first)
if [ -z "${GIT_COMMIT:-}" ]; then
    GIT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null)
    if [ -n "$GIT_COMMIT" ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        GIT_COMMIT="$GIT_COMMIT-dirty"
    fi
fi
export GIT_COMMIT=${GIT_COMMIT:-unknown}

if [ "$DEVICE" = cpu ]; then  # the dry run: the same steps at tiny sizes
    PYTEST_ENV="TRITON_INTERPRET=1"
    THROUGHPUT_BENCH=(bench/throughput.py --device cpu --quick --rows seed,cache,resident,channels_last --workers 1)
    LOSS_BENCH=(bench/loss.py --device cpu --batches 2 --channels 1,3 --repeats 1)
    E2E=(train.py --data synthetic:4x10 --size 32 --base 4 --depth 2 --batch-size 8 --epochs 2 --device cpu)
    CACHE_BENCH=(bench/cache.py --volumes 4 --distinct 1 --slices 20 --workers 2 --size 64 --no-floor)
    PYTEST_PARALLEL=()
else
    PYTEST_ENV="TRITON_INTERPRET=0"
    THROUGHPUT_BENCH=(bench/throughput.py --device cuda --data synthetic:6x80 --workers 8)
    LOSS_BENCH=(bench/loss.py --device cuda --batches 64,256 --channels 1,3)
    # step b's fused row: synthetic:6x80, 240 x 240 uncropped, batch 64, base 32, depth 4, every speed flag on auto
    E2E=(train.py --data synthetic:6x80 --size 240 --crop off --batch-size 64 --epochs 2 --device cuda)
    CACHE_BENCH=(bench/cache.py --volumes 16 --distinct 1 --workers 16 --size 240 --no-floor)
    PYTEST_PARALLEL=()
    "$PY" -c 'import xdist' 2>/dev/null && PYTEST_PARALLEL=(-n 16)
fi

NAMES=() RCS=() SECS=() NOTES=() RERUN=()
FAILED=0

step() {  # step NAME CAP_S LOGFILE COMMAND...: run with a timeout, log, record; never aborts the script
    local name=$1 limit=$2 log=$3 t0 rc note left
    shift 3
    if [[ $STEPS != *" ${name%%.*} "* ]]; then
        NAMES+=("$name") RCS+=(skip) SECS+=(0) NOTES+=("not in GPU_SH_STEPS")
        return 1
    fi
    left=$((BUDGET - (SECONDS - START) - 5))
    if ((left < 10)); then
        NAMES+=("$name") RCS+=(skip) SECS+=(0) NOTES+=("skipped: the ${BUDGET} s budget is spent")
        FAILED=1 RERUN+=("${name%%.*}")
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "== [$name] (timeout ${limit}s) $*" | tee -a "$SUMMARY"
    t0=$SECONDS
    timeout -k 5 "$limit" "$@" >"$log" 2>&1
    rc=$?
    note=$(grep -v '^[[:space:]]*$' "$log" 2>/dev/null | tail -n 1 | tr -d '\r' | cut -c1-100)
    ((rc == 124 || rc == 137)) && note="TIMED OUT after ${limit}s; $note"
    if ((rc != 0)); then FAILED=1 RERUN+=("${name%%.*}"); fi
    NAMES+=("$name") RCS+=("$rc") SECS+=($((SECONDS - t0))) NOTES+=("$note")
    echo "   rc=$rc in $((SECONDS - t0))s: $note" | tee -a "$SUMMARY"
    return "$rc"
}

# a. environment ---------------------------------------------------------------------------------------------
{
    echo "# bench/gpu.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC'), device $DEVICE, budget ${BUDGET}s"
    if [ "$GIT_COMMIT" = unknown ]; then
        echo "commit: unknown (no git checkout here and no GIT_COMMIT: the numbers below name no commit)"
    else
        echo "commit: $GIT_COMMIT"
    fi
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
for mod in ("triton", "numpy", "scipy", "cv2", "h5py", "matplotlib", "tqdm", "pytest", "xdist"):
    try:
        print(f"{mod} {__import__(mod).__version__}", end="; ")
    except Exception as e:
        print(f"{mod} MISSING ({type(e).__name__})", end="; ")
print()
EOF
    echo "cpus: $(nproc); load: $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>&1 | tee -a "$SUMMARY"
if [ "$DEVICE" = cuda ]; then  # a hung driver must not eat the lease: the probe has its own timeout
    timeout -k 5 60 "$PY" -c 'import torch, sys; torch.zeros(1, device="cuda").add_(1); torch.cuda.synchronize()' \
        >>"$SUMMARY" 2>&1
    probe=$?
    if ((probe != 0)); then
        echo "CUDA probe failed (rc $probe$( ((probe == 124)) && echo ', timed out after 60 s')): nothing to measure" \
            "(for a CPU dry run set GPU_SH_DEVICE=cpu)" | tee -a "$SUMMARY"
        FAILED=1
        STEPS=" "
    fi
fi
echo | tee -a "$SUMMARY"

# b-f ----------------------------------------------------------------------------------------------------------
step b.throughput 150 "$OUT/train.log" "$PY" "${THROUGHPUT_BENCH[@]}" --cache-dir "$WORK/cache" --out "$OUT/train.md"
step c.loss 30 "$OUT/loss.md" "$PY" "${LOSS_BENCH[@]}"
rm -rf "$WORK/e2e"  # so a metrics.json found after step d is this run's
step d.e2e 45 "$OUT/e2e.log" "$PY" "${E2E[@]}" --out "$WORK/e2e" --cache-dir "$WORK/cache" --overwrite on &&
    cp "$WORK/e2e/metrics.json" "$OUT/e2e_metrics.json"
step e.cache_build 25 "$OUT/cache.md" "$PY" "${CACHE_BENCH[@]}" --workdir "$WORK/cache_bench"
rm -rf "$WORK/cache_bench"
step f.kernel_tests 40 "$OUT/pytest.log" env "$PYTEST_ENV" "$PY" -m pytest -q -rs -p no:cacheprovider \
    "${PYTEST_PARALLEL[@]}" tests/test_fused_dice.py
if [ -f "$OUT/pytest.log" ]; then  # a CUDA test skipped for another reason means that path was not exercised
    unexpected=$(grep '^SKIPPED' "$OUT/pytest.log" | grep -v -e 'needs two CUDA devices' -e 'runs bench/loss.py itself')
    if [ "$DEVICE" = cuda ] && [ -n "$unexpected" ]; then
        FAILED=1 RERUN+=(f)
        NOTES[${#NOTES[@]} - 1]="UNEXPECTED SKIPS: $(echo "$unexpected" | head -n 1 | cut -c1-80)"
        RCS[${#RCS[@]} - 1]=skips
    fi
fi

# summary (always) ---------------------------------------------------------------------------------------------
{
    echo
    echo "## summary: $((SECONDS - START)) s of the ${BUDGET} s budget; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
    printf '| %-14s | %5s | %5s | %s\n' step rc s "last line of its log"
    for i in "${!NAMES[@]}"; do
        printf '| %-14s | %5s | %5s | %s\n' "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
    done
    if [ $FAILED = 0 ]; then
        echo "result: every step passed"
    else
        echo "result: SOME STEP FAILED (see the table)"
        [ ${#RERUN[@]} -gt 0 ] && echo "rerun the failed steps: GPU_SH_STEPS=\"$(printf '%s\n' "${RERUN[@]}" | sort -u |
            tr '\n' ' ' | sed 's/ $//')\" GIT_COMMIT=$GIT_COMMIT bash bench/gpu.sh"
    fi
} | tee -a "$SUMMARY"
exit $FAILED
