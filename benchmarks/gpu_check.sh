#!/usr/bin/env bash
# The CUDA checks of a lent GPU machine, in one run that fits a 10-minute command: the CUDA
# tests and the exactness tests on the GPU's own torch build, the hybrid CPU/GPU placement (its
# CUDA tests, then bench_hybrid.py: CPU-only, cache-only and the planner's hybrid over the real
# link, costs measured on this GPU), then bench_local.py, bench_quant.py and bench_offload.py
# (quick: capped cache, prefetch, compute on a miss over the real PCIe link) on the GPU. Most
# important first: each step gets its own cap or what is left of BUDGET_S (default 540 s),
# and a step with under 30 s left is skipped and says so. Logs go to $OUT (or ./gpu-out).
# Usage, from the repository root: bash benchmarks/gpu_check.sh
set -uo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))

step() {  # step CAP_S LOG COMMAND...: COMMAND under min(CAP_S, time left), appended to LOG
    local cap=$1 log="$out/$2"
    shift 2
    local left=$(( deadline - $(date +%s) ))
    if (( left < 30 )); then
        echo "skipped, out of budget: $*" | tee -a "$log"
        return
    fi
    (( cap > left )) && cap=$left
    timeout "$cap" "$@" 2>&1 | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
step 150 cuda_tests.log python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_exactness.py tests/test_cache.py tests/test_generation.py
step 60 cuda_tests.log python3 -m pytest -q -p no:cacheprovider tests/test_quant_model.py -k cuda
step 90 hybrid_tests.log python3 -m pytest -q -s -p no:cacheprovider tests/test_hybrid.py \
    "tests/test_cuda.py::test_cuda_hybrid_placement_matches_the_reference"
step 120 bench_hybrid_cuda.log python3 benchmarks/bench_hybrid.py --device cuda \
    --workdir /tmp/offload_rt_bench --steps 16 --repeats 2
step 90 bench_cuda.log python3 benchmarks/bench_local.py --device cuda \
    --workdir /tmp/offload_rt_bench --steps 64 --repeats 3
step 90 bench_quant_cuda.log python3 benchmarks/bench_quant.py --device cuda \
    --workdir /tmp/offload_rt_bench
step 60 bench_offload_cuda.log python3 benchmarks/bench_offload.py --device cuda \
    --workdir /tmp/offload_rt_bench --quick
