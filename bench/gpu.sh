#!/usr/bin/env bash
# bench/gpu.sh - the one prepared script for a short GPU lease (one H100/H200, 15 min of device time
# in all, machine start included). Expected run time about 6-7 min; it caps itself at GPU_SH_BUDGET
# seconds (default 560, under the device tool's 600 s per command), so the summary always prints.
#
#   run(command="GIT_COMMIT=<short sha> bash bench/gpu.sh", carry=[".whl"], timeout_s=600)
#
# Writes at most 8 files, all directly under ${OUT:-bench/out}:
#   summary.txt       environment (GPU, driver, versions, commit, wheel install) + the step table
#   pytest.log        b. TRITON_INTERPRET=0 pytest tests/test_fused_dice.py (the CUDA tests)
#   loss.md           c. bench/loss.py --device cuda (stdout + stderr: it only prints, so this is its output)
#   train.md          d. bench/train.py's markdown report (its --out)
#   train.log         d. bench/train.py's stdout + stderr
#   e2e.log           e. train.py end-to-end smoke, stdout + stderr
#   e2e_metrics.json  e. its metrics.json
#   e2e_log.jsonl     e. its log.jsonl
#
# Expected time per step on an H100 (each step has its own timeout; a failed or timed-out step is
# recorded and the script goes on):
#   setup  wheel install if needed                      ~10 s   (timeout 120)
#   a.     nvidia-smi, versions, commit                  ~5 s   (timeout 30)
#   b.     pytest, CUDA tests incl. (64, 1, 240, 240)   ~30-60 s (timeout 120): Triton JIT of each
#          kernel specialisation + one small torch.compile. Expect "79 passed" (62 CPU-interpreter tests
#          now on cuda + 17 CUDA-only ones); any skip there means the CUDA path was not exercised
#   c.     bench/loss.py, B in {16, 64, 256} x bf16/fp32 x triton/eager/compiled
#                                                       ~60-90 s (timeout 150): 6 cold compiles of the reference
#   d.     bench/train.py ablation, 240 px, batch 64, base 32
#                                                       ~150-200 s (timeout 300): see the --data note below
#   e.     train.py --data synthetic:6x40 --size 128 --epochs 2 (compile on, bf16, Triton loss)
#                                                       ~60-100 s (timeout 150)
#
# Python packages. The device machine has torch, triton, numpy, opencv, matplotlib, h5py, pytest only.
# What each step imports at import time:
#   fused_dice.py: torch, triton;  tests/conftest.py: numpy, pytest (h5py/data only inside fixtures that
#     test_fused_dice.py does not use);  bench/loss.py: torch, triton, fused_dice   -> b, c need nothing more
#   data.py: cv2, numpy, torch, tqdm (h5py lazily for .h5/synthetic, nibabel lazily for NIfTI only)
#   metrics.py: cv2, numpy, torch, scipy.ndimage;  train.py: tqdm, data, metrics (matplotlib lazily)
#   bench/train.py: data, train                                                    -> d, e need tqdm + scipy
#   nibabel: not imported by any step here (NIfTI reading, predict.py's output); carried so the other
#     test files could run too.
# The script first checks `python -c 'import scipy, tqdm, nibabel'`; if that fails and a .whl folder exists
# in the repo root, it installs the wheels into /tmp/site and puts that on PYTHONPATH. .whl/ is git-ignored,
# so the session must pass carry=[".whl"] (about 37 MiB of the 64 MiB carry limit). Build it on the
# session machine with (versions pinned to the ones in .venv that the tests pass with):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl tqdm==4.70.1 scipy==1.17.1 nibabel==5.4.2
#
#   -> tqdm-4.70.1-py3-none-any.whl (80 KB), nibabel-5.4.2-py3-none-any.whl (3.3 MB),
#      scipy-1.17.1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl (35 MB)
#   Their Requires-Dist (unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist), for Python 3.12:
#     scipy 1.17.1: numpy>=1.26.4,<2.7 (present; scipy 1.18 would need numpy>=2.0)
#     nibabel 5.4.2: numpy>=1.25, packaging>=20 (present: a pytest dependency), typing-extensions>=4.6
#       (present: a torch dependency); importlib-resources only for Python < 3.12
#     tqdm 4.70.1: colorama on Windows only
#   so no further wheels are needed. If the device's Python is not 3.12, the scipy wheel will not install:
#   summary.txt shows the Python version and the failed import; rebuild .whl with that --python-version.
#   The install step (done by this script):
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# Knobs (environment): OUT, PYTHON (default python3, falls back to python), GIT_COMMIT (else git rev-parse,
# else a COMMIT file, else "unknown"), GPU_SH_BUDGET (total seconds, default 560), STEP_TIMEOUT_SCALE
# (multiplies every step timeout; e.g. 0.1 for a dry run), GPU_SH_WORK (scratch, default /tmp/gpu-sh: data
# caches, reused by a rerun on the same warm machine), WHL_DIR (default .whl), TRAIN_DATA (step d --data),
# GPU_SH_STEPS (which of b c d e to run, space-separated, default all: a targeted rerun, e.g.
# GPU_SH_STEPS="b d"; setup and a always run, so every output names its card).
#
# Dry run without a GPU, ~10 s (a: rc 127, no nvidia-smi; b: rc 0, "21 passed, 58 skipped"; c-e fail fast):
#   OUT=/tmp/gpu-dry PYTHON=.venv/bin/python STEP_TIMEOUT_SCALE=0.5 GPU_SH_WORK=/tmp/gpu-sh-dry bash bench/gpu.sh
# After the run on the device: give the machine back unless rerunning at once.

set -uo pipefail
export PYTHONUNBUFFERED=1

if [ -n "${OUT:-}" ] && [ "${OUT#/}" = "$OUT" ]; then OUT=$PWD/$OUT; fi  # a relative OUT: from the caller's folder
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1  # the repository root
OUT=${OUT:-bench/out}
mkdir -p "$OUT" || exit 1
SCALE=${STEP_TIMEOUT_SCALE:-1}
BUDGET=${GPU_SH_BUDGET:-560}
WORK=${GPU_SH_WORK:-/tmp/gpu-sh}
WHL_DIR=${WHL_DIR:-.whl}
# d: bench/train.py builds its synthetic cache single-threaded on the CPU (phantoms written as .h5, then
# normalised and cached): measured 2.7 s per 80-slice volume on the 2-core session machine, i.e. about
# 16 s for 6x80 against about 42 s for the default 8x155. 6x80 splits into 4 training volumes
# (~272 slices with brain: enough for batch 64, ~4 batches per DataLoader epoch); the default 10 warm-up
# + 30 timed steps per row are kept (cheap on a GPU: the two cold torch.compile rows dominate the step).
TRAIN_DATA=${TRAIN_DATA:-synthetic:6x80}
STEPS=" ${GPU_SH_STEPS:-b c d e} "
SUMMARY=$OUT/summary.txt
START=$SECONDS
mkdir -p "$WORK"
: >"$SUMMARY"

PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && ! "$PY" -c 'import torch' >/dev/null 2>&1 && command -v python >/dev/null 2>&1; then
    PY=python  # python3 without torch: try python
fi

NAMES=() RCS=() SECS=() NOTES=()
record() {  # record NAME RC SECONDS NOTE
    NAMES+=("$1") RCS+=("$2") SECS+=("$3") NOTES+=("$4")
}

last_line() {  # last non-empty line of a file, shortened, for the summary table
    [ -f "$1" ] || { echo "(no log)"; return; }
    grep -v '^[[:space:]]*$' "$1" | tail -n 1 | tr -d '\r' | cut -c1-90
}

step() {  # step NAME TIMEOUT_S LOGFILE COMMAND...: run with a timeout, log, record rc; never aborts the script
    local name=$1 limit=$2 log=$3
    shift 3
    local t left t0 rc
    if [[ $STEPS != *" ${name%%.*} "* ]]; then
        record "$name" skip 0 "not in GPU_SH_STEPS"
        return
    fi
    t=$(awk -v l="$limit" -v s="$SCALE" 'BEGIN { t = int(l * s + 0.5); print (t < 1 ? 1 : t) }')
    left=$((BUDGET - (SECONDS - START) - 15))
    if ((left < 5)); then
        echo "== [$name] skipped: total budget of ${BUDGET}s spent" | tee -a "$SUMMARY"
        record "$name" skip 0 "skipped: budget spent"
        return
    fi
    if ((t > left)); then t=$left; fi
    echo "== [$name] (timeout ${t}s) $*" | tee -a "$SUMMARY"
    t0=$SECONDS
    timeout -k 10 "$t" "$@" >"$log" 2>&1
    rc=$?
    local note
    if ((rc == 124 || rc == 137)); then note="TIMED OUT after ${t}s; $(last_line "$log")"; else note=$(last_line "$log"); fi
    record "$name" "$rc" $((SECONDS - t0)) "$note"
    echo "   rc=$rc in $((SECONDS - t0))s: $note"
    tail -n 3 "$log" | sed 's/^/   | /'
}

# ------------------------------------------------------------------------------------------------------
# setup: the packages data.py / metrics.py / train.py import at import time

{
    echo "# bench/gpu.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
} | tee -a "$SUMMARY"
t0=$SECONDS
if "$PY" -c 'import scipy, tqdm, nibabel' >/dev/null 2>&1; then
    echo "scipy, tqdm, nibabel: already importable" | tee -a "$SUMMARY"
    record setup 0 0 "scipy, tqdm, nibabel already importable"
elif compgen -G "$WHL_DIR/*.whl" >/dev/null; then
    echo "scipy/tqdm/nibabel missing: installing $(ls "$WHL_DIR"/*.whl | xargs -n1 basename | tr '\n' ' ')" | tee -a "$SUMMARY"
    timeout -k 5 "$(awk -v s="$SCALE" 'BEGIN { t = int(120 * s + 0.5); print (t < 5 ? 5 : t) }')" \
        "$PY" -m pip install -q --no-index --no-deps --upgrade --target /tmp/site "$WHL_DIR"/*.whl >>"$SUMMARY" 2>&1 &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    check=$("$PY" -c 'import scipy, tqdm, nibabel; print("scipy", scipy.__version__, "tqdm", tqdm.__version__, "nibabel", nibabel.__version__)' 2>&1 | tail -n 1)
    "$PY" -c 'import scipy, tqdm, nibabel' >/dev/null 2>&1
    rc=$?
    echo "after install: $check" | tee -a "$SUMMARY"
    record setup "$rc" $((SECONDS - t0)) "wheels from $WHL_DIR: $check"
else
    missing=$("$PY" -c 'import scipy, tqdm, nibabel' 2>&1 | tail -n 1)
    echo "scipy/tqdm/nibabel missing and no $WHL_DIR/*.whl: steps d and e will fail ($missing)" | tee -a "$SUMMARY"
    record setup 1 0 "no wheels: $missing"
fi

# ------------------------------------------------------------------------------------------------------
# a. environment

t0=$SECONDS
{
    echo
    echo "## a. environment"
    if command -v nvidia-smi >/dev/null 2>&1; then
        timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        echo "nvidia-smi rc=$?"
    else
        echo "nvidia-smi: not found"
    fi
    timeout 60 "$PY" - <<'EOF'
import platform, sys
print("python", sys.version.split()[0], platform.platform())
try:
    import torch
    print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuda available", torch.cuda.is_available())
except Exception as e:
    print("torch: not importable:", type(e).__name__, e)
    raise SystemExit(1)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", type(e).__name__, e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}, {torch.cuda.device_count()} device(s)")
for mod in ("numpy", "cv2", "matplotlib", "h5py", "pytest", "scipy", "tqdm", "nibabel"):
    try:
        m = __import__(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}", end="; ")
    except Exception as e:
        print(f"{mod} MISSING ({type(e).__name__})", end="; ")
print()
EOF
    echo "python check rc=$?"
    commit=${GIT_COMMIT:-}
    [ -n "$commit" ] || commit=$(git rev-parse --short HEAD 2>/dev/null) || commit=""
    [ -n "$commit" ] || commit=$(head -n 1 COMMIT 2>/dev/null) || commit=""
    echo "commit: ${commit:-unknown}"
    echo "cpus: $(nproc 2>/dev/null || echo '?'); load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"
} 2>&1 | tee -a "$SUMMARY"
rc_a=0
command -v nvidia-smi >/dev/null 2>&1 || rc_a=127
record a.env "$rc_a" $((SECONDS - t0)) "$(command -v nvidia-smi >/dev/null 2>&1 && timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || echo 'no nvidia-smi')"
echo | tee -a "$SUMMARY"

# ------------------------------------------------------------------------------------------------------
# b-e

step b.pytest 120 "$OUT/pytest.log" \
    env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_fused_dice.py

step c.loss 150 "$OUT/loss.md" \
    "$PY" bench/loss.py --device cuda

step d.train_bench 300 "$OUT/train.log" \
    "$PY" bench/train.py --device cuda --data "$TRAIN_DATA" --cache-dir "$WORK/cache" --out "$OUT/train.md"

rm -rf "$WORK/e2e"
step e.e2e 150 "$OUT/e2e.log" \
    "$PY" train.py --data synthetic:6x40 --size 128 --epochs 2 --device cuda --out "$WORK/e2e" --cache-dir "$WORK/cache"
for f in metrics.json:e2e_metrics.json log.jsonl:e2e_log.jsonl; do
    [ -f "$WORK/e2e/${f%%:*}" ] && cp "$WORK/e2e/${f%%:*}" "$OUT/${f##*:}"
done

# ------------------------------------------------------------------------------------------------------
# summary (last)

{
    echo
    echo "## summary: total $((SECONDS - START)) s (budget ${BUDGET}s, timeout scale ${SCALE}); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
    printf '| %-14s | %4s | %5s | %s\n' step rc s "last line of the log"
    printf '|%s|%s|%s|%s\n' "----------------" "------" "-------" "------"
    for i in "${!NAMES[@]}"; do
        printf '| %-14s | %4s | %5s | %s\n' "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
    done
} | tee -a "$SUMMARY"
