#!/usr/bin/env bash
# The GPU check of mbdl_fast in one call of at most 9 minutes: build, correctness of every GPU kernel, then timings.
#
# On a lent GPU machine (the device tool, ../shared/GPU.md), from the repository root, the one remote command:
#   run(command="bash bench/gpu_check.sh", carry=["wheelhouse"], timeout_s=570)
# Here, once before it (the GPU machine reaches no package index and lacks these two pure-Python wheels):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d wheelhouse nvidia-mathdx==25.6.0 torch-pruning==1.6.1
# Then, here: tar -xzf FILES_AT/gpu_results.tar.gz -C bench/results   (bench/results/gpu/, to commit)
#
# Stages, in order of value, each under its own time cap (seconds) and all under one deadline (--budget, 540 s):
#   versions        20  device, driver, torch / triton / nvcc versions
#   build          150  the package with the CUDA extension (sm_90 only, all cores), into build/gpu_check/site
#   tests_cuda_l1   60  CUDA Level 1 (cuFFT LTO callbacks), the k-space kernels and the CUDA prox, on the GPU
#   tests_cuda_l2   45  CUDA Level 2 (cuFFTDx row/column passes)
#   tests_triton    90  the Triton DC step and prox, the Triton convolution, CUDA graphs
#   bench_dc_step  120  DC step, every backend, 8x15x320x320 and 1x1x256x256, GB/s against the measured copy
#   bench_prox      45  DC prox, every backend, same sizes
#   bench_conv      75  pruned-prior convolutions: FastConv2d / Triton against cuDNN
#   bench_ladder   120  DEQ and DU ladders: dense eager -> pruned -> fused DC -> fast layers -> graphs
#   bench_nm        45  2:4 sparse GEMM against dense
#   tests_rest     120  the rest of the test suite with the GPU visible
# A stage starts only with 15 s left before the deadline and runs at most to it; on its cap it gets SIGINT (pytest
# then writes the benchmark rows it has, and the stage's report is still made), then SIGKILL 10 s later. A failing
# or capped stage does not stop the later ones. Exit status: 0 when every selected stage passed, else 1 (2: usage).
#
# What comes back: $OUT holds three files, rewritten after every stage so that a cut-off run still returns data:
#   summary.md          the stage table and the issue's targets (printed last as well)
#   gpu_results.tar.gz  gpu/: versions, GPU settings, stages, JSON + Markdown reports (extract into bench/results/)
#   gpu_logs.tar.gz     logs/: the full log of every stage (each cut to its last 2 MiB if the archive nears 16 MiB)
# Everything the run installs or caches stays under $GPU_CHECK_WORK (default build/gpu_check): the machine's Python
# environment is not touched, and the card's settings are only ever read (nvidia-smi --query-gpu), before the first
# stage and after the last, and compared in the summary.
#
# Usage: bash bench/gpu_check.sh [--stages NAME,...] [--budget SECONDS] [--list]
#        bash bench/gpu_check.sh --dry-run [--dry-fail NAME,...] [--dry-hang NAME,...] [...]
# --dry-run runs the same stages, caps, deadline, packing and summary on a machine without a GPU, every GPU command
# (nvidia-smi, pip build, pytest, torch) replaced by a quick stand-in that writes what the real one would (made-up
# numbers, labelled so); times are scaled by 1/60 (a 60 s cap becomes 1 s). --dry-fail makes the named stages fail,
# --dry-hang makes them hang until their cap. tests/test_gpu_check.py runs it in CI.
# A full run leaves about 3 of the 15 device minutes: too few to start a fresh machine (4), so a rerun goes to the
# still-warm one (30 s) at once, e.g. --stages build,tests_cuda_l2 --budget 170 (results of those stages only);
# otherwise give the machine back.
# shellcheck disable=SC2329  # the stage_*, report_* and command functions are called by name
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

STAGES=(versions build tests_cuda_l1 tests_cuda_l2 tests_triton bench_dc_step bench_prox bench_conv bench_ladder
  bench_nm tests_rest)
# Caps add up to more than the budget on purpose: a stage may use what the ones before it left unused, and the
# deadline, not the caps, keeps the whole inside the call.
declare -A CAP=([versions]=20 [build]=150 [tests_cuda_l1]=60 [tests_cuda_l2]=45 [tests_triton]=90 [bench_dc_step]=120
  [bench_prox]=45 [bench_conv]=75 [bench_ladder]=120 [bench_nm]=45 [tests_rest]=120)
RESERVE_S=25   # kept after the deadline: a capped stage's SIGKILL grace, the last reports and the packing
MIN_START_S=15 # a stage with less time than this before the deadline is skipped
GRACE_S=10     # SIGINT, then SIGKILL this much later

usage() {
  sed -n '/^# Usage:/,/^# --dry-run runs/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
in_list() { [ -n "$1" ] && [[ ",$2," == *",$1,"* ]]; } # in_list NAME "a,b,c"

DRY=0 BUDGET_S=540 SELECTED="" DRY_FAIL="" DRY_HANG=""
while [ $# -gt 0 ]; do
  case $1 in
  --dry-run) DRY=1 ;;
  --budget) BUDGET_S=${2:?--budget: expected seconds}; shift ;;
  --stages) SELECTED=${2:?--stages: expected NAME,...}; shift ;;
  --dry-fail) DRY_FAIL=${2:?--dry-fail: expected NAME,...}; shift ;;
  --dry-hang) DRY_HANG=${2:?--dry-hang: expected NAME,...}; shift ;;
  --list) for s in "${STAGES[@]}"; do printf '%-14s %4ss\n' "$s" "${CAP[$s]}"; done; exit 0 ;;
  *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage ;;
  esac
  shift
done
[[ $BUDGET_S =~ ^[0-9]+$ ]] || { echo "--budget: expected whole seconds, got '$BUDGET_S'" >&2; exit 2; }
for list in "$SELECTED" "$DRY_FAIL" "$DRY_HANG"; do
  for name in ${list//,/ }; do
    [[ -v CAP[$name] ]] || { echo "stage '$name': expected one of ${STAGES[*]}" >&2; exit 2; }
  done
done
if [ $DRY -eq 0 ] && [ -n "$DRY_FAIL$DRY_HANG" ]; then echo "--dry-fail and --dry-hang need --dry-run" >&2; exit 2; fi

SCALE=$((DRY ? 60 : 1)) # dry run: 1 s stands for a minute
WORK=$(mkdir -p "${GPU_CHECK_WORK:-build/gpu_check}" && cd "${GPU_CHECK_WORK:-build/gpu_check}" && pwd)
OUT=$(mkdir -p "${OUT:-$WORK/out}" && cd "${OUT:-$WORK/out}" && pwd)
RES=$WORK/gpu   # what the repository commits as bench/results/gpu/
LOGS=$WORK/logs
SITE=$WORK/site # the package and torch-pruning (pip --target), first on PYTHONPATH
MATHDX=$WORK/mathdx
PYTHON=${PYTHON:-python3}
rm -rf "$RES" "$LOGS" && mkdir -p "$RES" "$LOGS" || exit 1
PATH="$SITE/bin:$PATH" # the package's console script (mbdl-fast)
if [ -d /usr/local/cuda/bin ]; then PATH="$PATH:/usr/local/cuda/bin"; fi
export DRY RES LOGS SITE MATHDX PYTHON DRY_FAIL DRY_HANG PATH STAGE=""
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_NO_CACHE_DIR=1
export TRITON_CACHE_DIR=$WORK/cache/triton TORCHINDUCTOR_CACHE_DIR=$WORK/cache/inductor MPLCONFIGDIR=$WORK/cache/mpl \
  CUDA_CACHE_PATH=$WORK/cache/nv

now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((10#$t / 1000)); }
secs() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); } # milliseconds -> seconds for timeout(1) and tables
START_MS=$(now_ms)
DEADLINE_MS=$((START_MS + (BUDGET_S - RESERVE_S) * 1000 / SCALE))
say() { printf '[%6ss] %s\n' "$(secs $(($(now_ms) - START_MS)))" "$*"; }

# --- The commands that need the GPU machine. Stage functions call them through `gpu`, which in a dry run calls
# --- `standin` instead: the stage logic around them (arguments, paths, rc) is the same in both.
gpu() { if [ "$DRY" -eq 1 ]; then standin "$@"; else "$@"; fi; }

smi_query() { # read-only, and the only nvidia-smi call here: the card's settings are never changed
  nvidia-smi --query-gpu="$1" --format=csv,noheader
}
torch_versions() {
  "$PYTHON" -c "import sys, torch, triton
print('python:', sys.version.split()[0])
print('torch:', torch.__version__, '(CUDA', str(torch.version.cuda) + ')')
print('triton:', triton.__version__)
print('gpu:', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0),
      torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
}
tool_versions() {
  echo "nvcc: $(nvcc --version | tail -n 1)"
  echo "cmake: $(cmake --version | head -n 1)"
  echo "cpus: $(nproc)"
  "$PYTHON" -m pip list 2>/dev/null | grep -i -E "^(nvidia-|torch|triton|pybind11|pytest)" | sed 's/^/package: /'
}
install_wheels() { # what the machine lacks, from the carried wheelhouse/ (see the top), into $WORK only
  local status=0 entry wheel target
  for entry in "nvidia_mathdx:$MATHDX" "torch_pruning:$SITE"; do # cuFFTDx is headers only: kept off PYTHONPATH
    wheel=${entry%%:*} target=${entry#*:}
    if compgen -G "wheelhouse/$wheel-*.whl" >/dev/null; then
      "$PYTHON" -m pip install -q --no-deps --target "$target" wheelhouse/"$wheel"-*.whl || status=1
    else
      echo "wheelhouse/ lacks $wheel-*.whl: fetch it with the pip download line at the top of bench/gpu_check.sh"
      status=1
    fi
  done
  return "$status"
}
build_package() {
  MBDL_FAST_CUDA=1 MBDL_FAST_CUDA_ARCHS=90 MAX_JOBS="$(nproc)" MBDL_FAST_MATHDX_ROOT="$MATHDX/nvidia/mathdx" \
    "$PYTHON" -m pip install -v --no-build-isolation --no-deps --target "$SITE" .
}
extension_report() { # from /: the installed package, not the source tree
  (cd / && "$PYTHON" -c "import mbdl_fast
from mbdl_fast import _C
from mbdl_fast._extension import cuda_extension_status, level1_status, level2_status
print('mbdl_fast:', mbdl_fast.__file__)
print('built_with:', _C.built_with())
print('cuda_extension_status:', cuda_extension_status())
print('level1_status:', level1_status())
print('level2_status:', level2_status())
print('backends:', mbdl_fast.backends())")
}
run_pytest() { # python -P: the installed package (PYTHONPATH), never the source tree's mbdl_fast
  "$PYTHON" -P -m pytest -q -p no:cacheprovider "$@"
}
xdist() { "$PYTHON" -c "import xdist" 2>/dev/null && echo "-n 8"; } # parallel where pytest-xdist is installed

standin() { # dry run: quick stand-ins that write what the real command would, then fail or hang if asked
  local what=$1
  shift
  case $what in
  smi_query) echo "stand-in (dry run, no GPU)" ;;
  torch_versions) echo "python: $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')" &&
    echo "torch: stand-in (dry run: no GPU)" ;;
  tool_versions) echo "cpus: $(nproc)" ;;
  install_wheels) echo "stand-in: would install wheelhouse/*.whl into $MATHDX and $SITE" ;;
  build_package) printf '%s\n' "stand-in: would build with MBDL_FAST_CUDA=1 MBDL_FAST_CUDA_ARCHS=90 into $SITE" \
    "-- Level-1 DC step: stand-in (dry run)" "-- Level-2 DC step: stand-in (dry run)" ;;
  extension_report) echo "extension: stand-in (dry run)" ;;
  run_pytest) "$PYTHON" bench/gpu_check.py standin "$@" ;;
  *) echo "standin: no stand-in for '$what'" >&2; return 2 ;;
  esac || return
  if in_list "$STAGE" "$DRY_HANG"; then echo "stand-in: hanging until the cap (--dry-hang $STAGE)"; sleep 3600; fi
  if in_list "$STAGE" "$DRY_FAIL"; then echo "1 failed (stand-in: failing as asked, --dry-fail $STAGE)"; return 1; fi
}

gpu_settings() { # the settings a run must leave as it found them (read only)
  local field value
  for field in persistence_mode compute_mode mig.mode.current power.limit clocks.applications.graphics \
    clocks.applications.memory ecc.mode.current; do
    value=$(gpu smi_query "$field" 2>&1) || value="unreadable: $value"
    echo "$field: ${value%%$'\n'*}"
  done
}

# --- The stages: the GPU command of each (capped), then its report (made whatever the command returned).
stage_versions() {
  echo "date: $(date -u +%FT%TZ)"
  echo "device: $(gpu smi_query name,driver_version,memory.total,clocks.max.sm,clocks.max.memory)"
  gpu tool_versions
  gpu torch_versions
}
stage_build() { # a missing wheel fails the stage, after building what can be built without it
  local wheels=0
  rm -rf "$SITE" "$MATHDX" || return
  gpu install_wheels || wheels=1
  gpu build_package && gpu extension_report >"$RES/extension.txt" && cat "$RES/extension.txt" && return "$wheels"
}
# -k by name: test_op_dc_step_cuda.py's items all match "cuda" (its module name); the CPU reference loops are left
# out.
stage_tests_cuda_l1() {
  gpu run_pytest tests/test_op_dc_step_cuda.py tests/test_op_mri_prox.py tests/test_op_dc_step.py tests/test_build.py \
    -k "(cuda or kspace) and not level2 and not ref_matches_loop"
}
stage_tests_cuda_l2() { gpu run_pytest tests/test_op_dc_step_cuda.py -k level2; }
stage_tests_triton() { # $(xdist) unquoted: empty or two words
  # shellcheck disable=SC2046
  gpu run_pytest tests/test_op_dc_step.py tests/test_op_mri_prox.py tests/test_op_mri_forward.py tests/test_op_conv2d.py \
    tests/test_layers.py tests/test_accelerate.py tests/test_execution.py $(xdist) \
    -k "not (cuda_backend or cuda_kspace or cuda_single or cuda_multi or cuda_prox or kspace)"
}
stage_bench_dc_step() { gpu run_pytest bench/test_bench_dc_step.py --benchmark-json="$RES/dc_step_gpu.json"; }
stage_bench_prox() { gpu run_pytest bench/test_bench_prox.py --benchmark-json="$RES/prox_gpu.json"; }
stage_bench_conv() { mkdir -p "$RES/conv" && gpu run_pytest bench/test_bench_conv.py --benchmark-json="$RES/conv/bench.json"; }
stage_bench_ladder() {
  mkdir -p "$RES/ladder" &&
    MBDL_FAST_BENCH_NOTES="$RES/ladder/skipped.jsonl" gpu run_pytest bench/test_bench_ladder.py \
      --benchmark-json="$RES/ladder/bench.json"
}
stage_bench_nm() { gpu run_pytest bench/test_bench_nm.py --benchmark-json="$RES/nm_gpu.json"; }
stage_tests_rest() {
  # shellcheck disable=SC2046
  gpu run_pytest tests $(xdist) --ignore=tests/test_op_dc_step_cuda.py --ignore=tests/test_op_mri_prox.py \
    --ignore=tests/test_op_dc_step.py --ignore=tests/test_op_mri_forward.py --ignore=tests/test_op_conv2d.py \
    --ignore=tests/test_layers.py --ignore=tests/test_accelerate.py --ignore=tests/test_execution.py
}
export -f gpu smi_query tool_versions torch_versions install_wheels build_package extension_report run_pytest xdist standin in_list
mapfile -t STAGE_FUNCTIONS < <(compgen -A function stage_)
export -f "${STAGE_FUNCTIONS[@]}"

report_versions() { cp "$1" "$RES/versions.txt" && grep -m1 '^device: ' "$1" | cut -d' ' -f2-; }
report_build() { grep -o -E 'Level-[12] DC step: .*' "$1" | cut -c1-60 | paste -sd ';' -; }
bench_table() { if [ -s "$RES/$1.json" ]; then "$PYTHON" bench/report.py "$RES/$1.json" >"$RES/$1.md"; fi; }
ladder_table() {
  if [ -s "$RES/$1/bench.json" ]; then
    "$PYTHON" bench/ladder_report.py report "$RES/$1/bench.json" --out "$RES/$1/report" ${2:+--notes "$2"} >/dev/null
  fi
}
report_bench_dc_step() { bench_table dc_step_gpu; }
report_bench_prox() { bench_table prox_gpu; }
report_bench_nm() { bench_table nm_gpu; }
report_bench_conv() { ladder_table conv; }
report_bench_ladder() { ladder_table ladder "$RES/ladder/skipped.jsonl"; }

last_line() { grep -v '^[[:space:]]*$' "$1" | tail -n 1 | tr -d '=\r' | sed 's/^ *//; s/ *$//'; }
record() { # record NAME RESULT RC SECONDS CAP NOTE -> one row of stages.tsv
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$(printf '%s' "$6" | tr '\t\n' '  ' | cut -c1-110)" \
    >>"$RES/stages.tsv"
}
pack() { # $OUT: summary.md, gpu_results.tar.gz, gpu_logs.tar.gz, each replaced whole (mv) after every stage
  local limit=$((15 * 1024 * 1024)) cut=$WORK/logs_cut log
  if "$PYTHON" bench/gpu_check.py summary "$RES" >"$RES/summary.md.part" 2>>"$LOGS/reports.log"; then
    mv "$RES/summary.md.part" "$RES/summary.md"
  else
    { echo "(the summary failed: logs/reports.log)"; cat "$RES/stages.tsv"; } >"$RES/summary.md"
    rm -f "$RES/summary.md.part"
  fi
  cp "$RES/summary.md" "$OUT/summary.md.part" && mv "$OUT/summary.md.part" "$OUT/summary.md"
  tar -czf "$OUT/gpu_results.tar.gz.part" -C "$WORK" gpu && mv "$OUT/gpu_results.tar.gz.part" "$OUT/gpu_results.tar.gz"
  tar -czf "$OUT/gpu_logs.tar.gz.part" -C "$WORK" logs || return
  if [ "$(stat -c %s "$OUT/gpu_logs.tar.gz.part")" -gt "$limit" ]; then # the device tool returns files <= 16 MiB
    rm -rf "$cut" && mkdir -p "$cut/logs"
    for log in "$LOGS"/*; do tail -c 2M "$log" >"$cut/logs/$(basename "$log")"; done
    tar -czf "$OUT/gpu_logs.tar.gz.part" -C "$cut" logs
  fi
  mv "$OUT/gpu_logs.tar.gz.part" "$OUT/gpu_logs.tar.gz"
}

STAGE_PID=""
stop_stage() { if [ -n "$STAGE_PID" ]; then kill -KILL -- "-$STAGE_PID" 2>/dev/null; fi; }
trap stop_stage EXIT
trap 'stop_stage; exit 143' TERM INT

run_stage() { # run_stage INDEX NAME
  local index=$1 name=$2 log rc=0 result note t0 elapsed cap_ms bound_ms left_ms limit="cap"
  log=$LOGS/$(printf '%02d' "$index")_$name.log
  cap_ms=$((CAP[$name] * 1000 / SCALE))
  left_ms=$((DEADLINE_MS - $(now_ms)))
  if [ "$left_ms" -lt $((MIN_START_S * 1000 / SCALE)) ]; then
    say "$name: skipped, $(secs $((left_ms > 0 ? left_ms : 0)))s left before the deadline"
    record "$name" "skipped: no time left" "" 0 "$(secs "$cap_ms")" "$(secs $((left_ms > 0 ? left_ms : 0)))s left"
    STATUS=1
    pack
    return
  fi
  bound_ms=$cap_ms
  if [ "$left_ms" -lt "$cap_ms" ]; then bound_ms=$left_ms limit="deadline"; fi
  say "$name: start (cap $(secs "$cap_ms")s, runs at most $(secs "$bound_ms")s)"
  t0=$(now_ms)
  STAGE=$name timeout -s INT -k "$(secs $((GRACE_S * 1000 / SCALE)))" "$(secs "$bound_ms")" bash -c "stage_$name" \
    >"$log" 2>&1 &
  STAGE_PID=$!
  wait "$STAGE_PID" || rc=$?
  STAGE_PID=""
  elapsed=$(secs $(($(now_ms) - t0)))
  case $rc in
  0) result="ok" ;;
  124 | 137) result="stopped at the $limit ($(secs "$bound_ms")s)" ;;
  *) result="failed (rc=$rc)" ;;
  esac
  if declare -F "report_$name" >/dev/null; then
    note=$("report_$name" "$log" 2>>"$LOGS/reports.log") || { [ "$rc" -ne 0 ] || rc=1 result="failed (its report)"; }
  fi
  [ -n "${note:-}" ] || note=$(last_line "$log")
  say "$name: $result in ${elapsed}s: $note"
  record "$name" "$result" "$rc" "$elapsed" "$(secs "$cap_ms")" "$note"
  [ "$rc" -eq 0 ] || STATUS=1
  pack
}

STATUS=0
say "gpu_check: $([ "$DRY" -eq 1 ] && echo "DRY RUN (stand-ins, times x1/60)" || echo "on $(hostname)"), budget ${BUDGET_S}s, work $WORK, OUT $OUT"
printf 'stage\tresult\trc\tseconds\tcap\tnote\n' >"$RES/stages.tsv"
{ [ "$DRY" -eq 1 ] && echo "dry run: true"; echo "# before"; gpu_settings; } >"$RES/gpu_settings.txt"
index=0
for name in "${STAGES[@]}"; do
  index=$((index + 1))
  if [ -n "$SELECTED" ] && ! in_list "$name" "$SELECTED"; then continue; fi
  run_stage "$index" "$name"
done
{ echo "# after"; gpu_settings; } >>"$RES/gpu_settings.txt"
pack

for table in dc_step_gpu.md prox_gpu.md ladder/report.md; do
  if [ -s "$RES/$table" ]; then printf '\n--- %s\n' "$table" && head -c 2500 "$RES/$table"; fi
done
printf '\n=== in %s:' "$OUT" && for file in "$OUT"/*; do printf ' %s' "${file##*/}"; done && printf '\n\n'
cat "$RES/summary.md"
exit "$STATUS"
