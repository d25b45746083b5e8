#!/usr/bin/env bash
# The checks that need a GPU, in one run: the CUDA-only tests, then the Qwen2-VL benchmark on CUDA at the
# real 2B size (28 text layers, 32 vision blocks, bfloat16) against transformers.
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# Expects torch with CUDA, pytest and transformers 5.23.0 importable (wheels under .whl/ are installed into
# /tmp/site first, for a machine without a package index). Logs and the benchmark's JSON go to OUT_DIR.
set -o pipefail
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -rs \
    tests/test_cuda.py tests/engine/test_cuda_graphs.py tests/engine/test_paged_attention.py 2>&1 | tee "$out/tests.log"

timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/bench_qwen2_vl.py --device cuda --dtype bf16 \
    --text-layers 28 --vision-depth 32 --threads 8 --repeat 5 --decode-tokens 64 --engine-tokens 16,64 \
    --cache /tmp/ocula-bench --json "$out/bench.json" 2>&1 | grep -v "it/s]" | tee "$out/bench.log"

# where one engine request's time goes on the GPU (a request whose image was seen before)
(cd benchmarks && timeout "${PROFILE_TIMEOUT:-90}" python3 profile_request.py /tmp/ocula-bench/qwen2_vl_2b_t28_v32_bf16 \
    --device cuda --dtype bf16 --top 25 2>&1 | tee "$out/profile.log" | head -80)
