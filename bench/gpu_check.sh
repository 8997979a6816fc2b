#!/usr/bin/env bash
# On a lent GPU machine (see shared/GPU.md), in one call, from the repository root:
#   bash bench/gpu_check.sh
# 1. versions; 2. build and install the package with the CUDA extension from what is installed there
#    (pip install --no-build-isolation --no-deps: no package index there), Level-1 DC step included when the
#    nvidia-cufft wheel (or the toolkit) has the cuFFT headers; 3. the host-side C++ tests (ctest); 4. the CUDA
#    backend's GPU tests, then the whole test suite with the GPU visible (Triton and CUDA for real); 5. the DC-step
#    benchmarks (every backend, CUDA Level 1 included, with the copy-bandwidth reference) and the N:M (2:4) bench,
#    JSON + Markdown reports. Full logs go to $OUT (default bench/results/gpu); a short table is printed last.
# A failing stage does not stop the later ones; the exit code is non-zero when any stage failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-8}"
if [ -d /usr/local/cuda/bin ]; then export PATH="$PATH:/usr/local/cuda/bin"; fi

declare -a ROWS=()
status=0
stage() {  # stage NAME RC SUMMARY SECONDS
  ROWS+=("$(printf '| %-22s | %-4s | %5ss | %s |' "$1" "$([ "$2" -eq 0 ] && echo ok || echo "rc=$2")" "$4" "$3")")
  [ "$2" -eq 0 ] || status=1
}
last_line() { tail -n 1 "$1" 2>/dev/null | tr -d '\r' | cut -c1-90; }

# 1. versions
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
  cmake --version | head -1
  pip list 2>/dev/null | grep -i -E "^(nvidia-|torch|triton|pybind11|pytest)" || true
} >"$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

# 2. build. The GPU machine has no package index: wheels the build needs and it lacks (nvidia-mathdx for the
#    Level-2 step, 23 MB) come in wheelhouse/, carried with the call:
#      pip download --no-deps -d wheelhouse "nvidia-mathdx>=25.6,<26"      # here, once
#      run(command="bash bench/gpu_check.sh", carry=["wheelhouse"])        # the device tool
t=$SECONDS
if compgen -G "wheelhouse/*.whl" >/dev/null; then
  pip install --no-deps --no-index wheelhouse/*.whl >"$OUT/wheelhouse.log" 2>&1 || cat "$OUT/wheelhouse.log"
fi
MBDL_FAST_CUDA=1 pip install -v --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1
rc=$?
stage "build + install" $rc "$(grep -m1 -o 'Level-1 DC step: .*' "$OUT/build.log" | cut -c1-90)" $((SECONDS - t))
stage "build: Level 2" $rc "$(grep -m1 -o 'Level-2 DC step: .*' "$OUT/build.log" | cut -c1-90)" 0
(cd / && python - <<'PY'
import mbdl_fast
from mbdl_fast import _C
from mbdl_fast._extension import cuda_extension_status, level1_status, level2_status

print("built_with:", _C.built_with())
print("cuda_extension_status:", cuda_extension_status())
print("level1_status:", level1_status())
print("level2_status:", level2_status())
print("backends:", mbdl_fast.backends())
PY
) 2>&1 | tee "$OUT/extension.txt"

# 3. host-side C++ tests
t=$SECONDS
{
  cmake -S . -B build/ctest -G Ninja -DMBDL_FAST_EXTENSION=OFF -DMBDL_FAST_TESTS=ON &&
    cmake --build build/ctest -j "$MAX_JOBS" &&
    ctest --test-dir build/ctest --output-on-failure
} >"$OUT/ctest.log" 2>&1
rc=$?
stage "ctest (host C++)" $rc "$(grep -m1 'tests passed' "$OUT/ctest.log")" $((SECONDS - t))

# 4. tests: the CUDA backend first (its failures are the news), then everything. The pytest script, not
# `python -m pytest`: the installed package, not the source tree, must be imported.
t=$SECONDS
pytest -q -rs tests/test_cuda_backend.py -p no:cacheprovider >"$OUT/tests_cuda_backend.log" 2>&1
rc=$?
stage "tests: cuda backend" $rc "$(last_line "$OUT/tests_cuda_backend.log")" $((SECONDS - t))
t=$SECONDS
pytest -q -rs tests -p no:cacheprovider >"$OUT/tests.log" 2>&1
rc=$?
stage "tests: all" $rc "$(last_line "$OUT/tests.log")" $((SECONDS - t))

# 5. benchmarks
t=$SECONDS
pytest -q bench/test_bench_dc_step.py -p no:cacheprovider --benchmark-json="$OUT/dc_step_gpu.json" \
  >"$OUT/bench_dc_step.log" 2>&1
rc=$?
stage "bench: DC step" $rc "$(last_line "$OUT/bench_dc_step.log")" $((SECONDS - t))
if [ -s "$OUT/dc_step_gpu.json" ]; then python bench/report.py "$OUT/dc_step_gpu.json" >"$OUT/dc_step_gpu.md"; fi
t=$SECONDS
pytest -q bench/test_bench_prox.py -p no:cacheprovider --benchmark-json="$OUT/prox_gpu.json" >"$OUT/bench_prox.log" 2>&1
rc=$?
stage "bench: prox_l2" $rc "$(last_line "$OUT/bench_prox.log")" $((SECONDS - t))
if [ -s "$OUT/prox_gpu.json" ]; then python bench/report.py "$OUT/prox_gpu.json" >"$OUT/prox_gpu.md"; fi
t=$SECONDS
pytest -q bench/test_bench_nm.py -p no:cacheprovider --benchmark-json="$OUT/nm_gpu.json" >"$OUT/bench_nm.log" 2>&1
rc=$?
stage "bench: N:M 2:4" $rc "$(last_line "$OUT/bench_nm.log")" $((SECONDS - t))
if [ -s "$OUT/nm_gpu.json" ]; then python bench/report.py "$OUT/nm_gpu.json" >"$OUT/nm_gpu.md"; fi

# --- issue 6: fast layers (FastConv2d, Triton conv), accelerate() (CUDA graphs), the DEQ/DU ladder and conv bench.
t=$SECONDS
pytest -q -rs tests/test_layers.py tests/test_accelerate.py -p no:cacheprovider >"$OUT/tests_fast_layers.log" 2>&1
rc=$?
stage "tests: layers+graphs" $rc "$(last_line "$OUT/tests_fast_layers.log")" $((SECONDS - t))
t=$SECONDS
python bench/ladder_report.py run --out "$OUT/ladder" --suite all >"$OUT/bench_ladder.log" 2>&1
rc=$?
stage "bench: ladder + conv" $rc "$(grep -m1 -E '^[0-9]+ (passed|failed)' "$OUT/bench_ladder.log")" $((SECONDS - t))
if [ -s "$OUT/ladder/report.md" ]; then
  echo
  echo "--- $OUT/ladder/report.md"
  cat "$OUT/ladder/report.md"
fi

# GB/s at the bandwidth floor (DESIGN.md "What fast means"), per DC-step row.
if [ -s "$OUT/dc_step_gpu.json" ]; then
  python - "$OUT/dc_step_gpu.json" >"$OUT/dc_step_floor.md" <<'PY'
import json
import sys

data = json.load(open(sys.argv[1]))
rows = {}
for b in data["benchmarks"]:
    e = b["extra_info"]
    rows.setdefault(e["size"], {})[e["variant"]] = (b["stats"]["median"], e.get("floor_gbps"))
print("| size | variant | median ms | GB/s at the floor | % of copy |")
print("|---|---|---:|---:|---:|")
for size, variants in rows.items():
    copy = (variants.get("copy") or (None, None))[1]
    for name, (median, gbps) in sorted(variants.items(), key=lambda kv: kv[1][0]):
        pct = f"{100 * gbps / copy:.0f}%" if gbps and copy else "-"
        print(f"| {size} | {name} | {median * 1e3:.3f} | {gbps:.0f} | {pct} |" if gbps else f"| {size} | {name} | {median * 1e3:.3f} | - | - |")
PY
fi

echo
echo "=== logs and reports in $OUT"
for f in "$OUT/dc_step_gpu.md" "$OUT/dc_step_floor.md" "$OUT/nm_gpu.md"; do
  if [ -s "$f" ]; then
    echo
    echo "--- $f"
    cat "$f"
  fi
done
echo
echo "=== summary ($(head -1 "$OUT/versions.txt" 2>/dev/null); $(sed -n 2,3p "$OUT/versions.txt" | tail -1 | cut -d, -f1))"
echo "| stage                  | rc   |  time  | result |"
echo "|------------------------|------|--------|--------|"
printf '%s\n' "${ROWS[@]}"
exit "$status"
