#!/usr/bin/env bash
# On a lent GPU machine (see shared/GPU.md), in one call: build the package with the CUDA extension,
# run the whole test suite with the GPU visible (Triton and CUDA for real), run the DC-step benchmarks,
# write the report. Full logs go to $OUT (or bench/results/gpu), a short table is printed last.
#   bash bench/gpu_check.sh
set -uo pipefail
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/versions.txt"

# No package index there: build with what is installed.
start=$SECONDS
MBDL_FAST_CUDA=1 pip install --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1
echo "build: rc=$? in $((SECONDS - start)) s" | tee -a "$OUT/versions.txt"

(cd / && python -c "import mbdl_fast; print(mbdl_fast.backends())") 2>&1 | tee -a "$OUT/versions.txt"
pytest -q tests -x -p no:cacheprovider >"$OUT/tests.log" 2>&1
echo "tests: rc=$? $(tail -1 "$OUT/tests.log")"
pytest -q bench/test_bench_dc_step.py -p no:cacheprovider --benchmark-json="$OUT/dc_step_gpu.json" >"$OUT/bench.log" 2>&1
echo "bench: rc=$?"
python bench/report.py "$OUT/dc_step_gpu.json" | tee "$OUT/dc_step_gpu.md"
