#!/usr/bin/env bash
# GPU checks for a machine with CUDA and the project's dependencies importable:
# the CUDA test file, then the benchmark on SmolLM2-135M (4 x 256) and on a ~1.1B random Llama (4 x 512).
# Usage: scripts/gpu_checks.sh [OUT_DIR]
set -euo pipefail
out=${1:-out/gpu}
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(); print('GPU:', torch.cuda.get_device_name(0))"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log"
python3 -m skip2lora.cli benchmark --model smollm2-135m --device cuda --batch_size 4 --seq_len 256 \
    --iters 10 --warmup 3 --out_dir "$out" 2>&1 | tee "$out/bench_smollm2.log"
python3 -m skip2lora.cli benchmark --model random-llama-1b --device cuda --batch_size 4 --seq_len 512 \
    --iters 10 --warmup 3 --out_dir "$out" 2>&1 | tee "$out/bench_llama1b.log"
