#!/usr/bin/env bash
# The CUDA checks of a lent GPU machine, in one run: the CUDA tests and the exactness tests on
# the GPU's own torch build, then bench_local.py, bench_quant.py and bench_offload.py (quick:
# capped cache, prefetch, compute on a miss over the real PCIe link) on the GPU, and the hybrid
# CPU/GPU placement (its CUDA tests, then bench_hybrid.py: CPU-only, cache-only and the
# planner's hybrid over the real link, costs measured on this GPU). Logs go to $OUT (or
# ./gpu-out).
# Usage, from the repository root: bash benchmarks/gpu_check.sh
set -uo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_exactness.py \
    tests/test_cache.py tests/test_generation.py 2>&1 | tee "$out/cuda_tests.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_quant_model.py -k cuda 2>&1 \
    | tee -a "$out/cuda_tests.log"
timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_hybrid.py \
    "tests/test_cuda.py::test_cuda_hybrid_placement_matches_the_reference" 2>&1 \
    | tee "$out/hybrid_tests.log"
timeout 300 python3 benchmarks/bench_local.py --device cuda --workdir /tmp/offload_rt_bench \
    --steps 64 --repeats 3 2>&1 | tee "$out/bench_cuda.log"
timeout 300 python3 benchmarks/bench_quant.py --device cuda --workdir /tmp/offload_rt_bench \
    2>&1 | tee "$out/bench_quant_cuda.log"
timeout 120 python3 benchmarks/bench_offload.py --device cuda --workdir /tmp/offload_rt_bench \
    --quick 2>&1 | tee "$out/bench_offload_cuda.log"
timeout 240 python3 benchmarks/bench_hybrid.py --device cuda --workdir /tmp/offload_rt_bench \
    --steps 16 --repeats 2 2>&1 | tee "$out/bench_hybrid_cuda.log"
