#!/usr/bin/env bash
# The one command of a lent GPU (bench/gpu/README.md): build, versions, the GPU-relevant tests, validate.py, as much
# of the rest of the suite as the time allows, and a summary table printed LAST (the caller sees stdout's tail).
#
#   on the device (run tool):  bash bench/gpu/run.sh                   (OUT is set there; timeout_s=600)
#   here, no GPU:              SMOKE=1 OUT=/tmp/gpuval/out bash bench/gpu/run.sh
#
# Every step has its own `timeout`; a failing step does not stop the next. Files in $OUT (at most 8 come back):
# build.log env.txt tests-gpu.log validate.log tests-rest.log results.json summary.md
set -u
cd "$(dirname "$0")/../.." || exit 2
SMOKE=${SMOKE:-0}
OUT=${OUT:-/tmp/gpuval/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)

# ---- budget (seconds) ------------------------------------------------------------------------------------------
# TOTAL_S 360 = BUILD_S <= 90 + GPU_TESTS_S 90 + VALIDATE_S 190 (validate.py's BUDGET_S: 180, + 10 start-up)
#             + the rest of the suite (what is left) + REPORT_S 15 kept for the summary.
# 6 minutes: a machine start (1-2 min) + this + a rerun fit the 15 minutes of device time.
TOTAL_S=${TOTAL_S:-360}
BUDGET_PCT=${BUDGET_PCT:-100}      # one longer run instead of two: e.g. TOTAL_S=540 BUDGET_PCT=170
BUILD_S=90
GPU_TESTS_S=90
VALIDATE_S=$(( 190 * BUDGET_PCT / 100 ))
REPORT_S=15
PER_TEST_S=120          # pytest-timeout per test, where the plugin is installed

# test files that exercise CUDA paths (Triton kernels on CUDA tensors via kernel_device / T.kernel_device(),
# device pack/unpack, table attention, CUDA codebook loading, NCCL backend parsing), most valuable first
GPU_TESTS="tests/test_vq_pack.py tests/test_vq.py tests/test_attention_triton.py tests/test_codec.py
  tests/test_vq_proof_chain.py tests/test_attention.py tests/test_codebooks.py tests/test_transport.py
  tests/test_dense.py"
# then the runtime (its models run on the CPU in the tests) and everything else
FIRST_REST="tests/test_runtime_simulate.py tests/test_runtime_dist.py tests/test_runtime_generation.py
  tests/test_aot.py tests/test_calibrate.py tests/test_families.py"

if [ "$SMOKE" = 1 ]; then
  PY=${PY:-.venv/bin/python}
  VFLAGS=--smoke
  TOTAL_S=${TOTAL_S_SMOKE:-900}
  VALIDATE_S=700         # validate.py's SMOKE_BUDGET_S: 650
  GPU_TESTS="tests/test_vq_pack.py"
  REST_TESTS="tests/test_split.py"
else
  PY=${PY:-python3}
  VFLAGS=
  REST_TESTS=$FIRST_REST
  for f in tests/test_*.py; do
    case " $(echo $GPU_TESTS $FIRST_REST) " in *" $f "*) ;; *) REST_TESTS="$REST_TESTS $f" ;; esac
  done
fi

JU=$(mktemp -d /tmp/gpuval_junit.XXXXXX)
STEPS=$JU/steps.tsv
: > "$STEPS"

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME SECONDS LOG CMD...: run CMD under `timeout` (SIGINT first: pytest and validate.py still write their
# reports), output to $OUT/LOG, one line per step in $STEPS
step() {
  local name=$1 secs=$2 log=$3
  shift 3
  if [ "$secs" -lt 5 ]; then
    echo "== $name: skipped (${secs}s left)"
    printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$log" >> "$STEPS"
    return
  fi
  local t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${secs}s, at +$(elapsed)s) -> $OUT/$log"
  timeout -s INT -k 15 "$secs" "$@" > "$OUT/$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$log" >> "$STEPS"
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s"
  tail -n 4 "$OUT/$log" | cut -c1-200 | sed 's/^/   | /'
}

left() {  # seconds left for a step that may use at most $1, keeping REPORT_S for the summary
  local l=$(( TOTAL_S - $(elapsed) - REPORT_S ))
  [ "$l" -gt "$1" ] && l=$1
  echo "$l"
}

pytest_args() {   # parallel workers and a per-test limit where the plugins are there (they are on the device)
  local a="-q -rfEs --tb=short -p no:cacheprovider"
  if $PY -c "import xdist" 2>/dev/null && [ "$SMOKE" != 1 ]; then a="$a -n 8"; fi
  if $PY -c "import pytest_timeout" 2>/dev/null; then a="$a --timeout=$PER_TEST_S"; fi
  echo "$a"
}

# ---- 1. build ------------------------------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
  echo "SMOKE=1: no build (the .venv's editable install is used)" > "$OUT/build.log"
  printf '%s\t%s\t%s\t%s\n' build skipped 0 build.log >> "$STEPS"
else
  step build "$BUILD_S" build.log $PY -m pip install --no-build-isolation --no-deps -e .
fi

# ---- 2. versions -------------------------------------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
  $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', \
torch.version.cuda, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  $PY -c "import transformers; print('transformers', transformers.__version__)" 2>&1
  $PY -c "import astra_kernels; print('astra_kernels', astra_kernels.__version__, astra_kernels.__file__)" 2>&1
  echo "cpus: $(nproc)"
} > "$OUT/env.txt" 2>&1
head -n 40 "$OUT/env.txt" | grep -E "NVIDIA|python|triton|transformers|astra_kernels|cpus|date|git" | cut -c1-160

# ---- 3. tests that exercise CUDA paths -----------------------------------------------------------------------
# shellcheck disable=SC2046,SC2086
step tests-gpu "$(left $GPU_TESTS_S)" tests-gpu.log \
  $PY -m pytest $(pytest_args) --junitxml="$JU/tests-gpu.xml" $GPU_TESTS

# ---- 4. validate.py: correctness at scale, speed, AOT vs the JIT cache, gloo on CUDA ----------------------
VLIM=$(left "$VALIDATE_S")
# shellcheck disable=SC2086
step validate "$VLIM" validate.log $PY bench/gpu/validate.py --out "$OUT" $VFLAGS --deadline-s $(( VLIM - 8 )) \
  --budget-pct "$BUDGET_PCT"

# ---- 5. the rest of the suite, in what is left ---------------------------------------------------------------
# shellcheck disable=SC2046,SC2086
step tests-rest "$(left 100000)" tests-rest.log \
  $PY -m pytest $(pytest_args) --junitxml="$JU/tests-rest.xml" $REST_TESTS

# ---- 6. summary, printed last --------------------------------------------------------------------------------
echo "== done in $(elapsed)s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if ! timeout 60 $PY bench/gpu/validate.py --report --out "$OUT" --junit "$JU/tests-gpu.xml" "$JU/tests-rest.xml" \
    --steps-file "$STEPS"; then
  echo "validate.py --report failed; the shell steps were:"
  cat "$STEPS"
fi
rm -rf "$JU"
