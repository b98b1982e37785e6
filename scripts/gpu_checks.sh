#!/usr/bin/env bash
# GPU checks, as one script for a machine with CUDA and the project's dependencies importable:
# the CUDA tests; bf16-mixed and bf16-true fine-tuning; QLoRA on GPU; Skip2-LoRA cached and uncached;
# FSDP on one GPU; the benchmark on SmolLM2-135M (4 x 256) and on a ~1.1B random Llama (4 x 512).
# Every result lands in OUT_DIR (JSON, run folders, logs); `skip2lora report-bench OUT_DIR/*.json` renders them.
# Usage: scripts/gpu_checks.sh [OUT_DIR]
set -uo pipefail
out=${1:-out/gpu}
mkdir -p "$out"
run() { echo "== $*" | tee -a "$out/summary.log"; "$@" >"$out/$1-$(date +%s%N).log" 2>&1; echo "   exit $?" | tee -a "$out/summary.log"; }
python3 -c "import torch; assert torch.cuda.is_available(); print('GPU:', torch.cuda.get_device_name(0))" | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log"
tiny="--model smollm2-135m --device cuda --data.name instruct --data.num_train 256 --data.num_val 32 --max_steps 30"
for precision in bf16-mixed bf16-true; do
  run python3 -m skip2lora.cli finetune $tiny --method lora --precision $precision --out_dir "$out/lora-$precision"
done
run python3 -m skip2lora.cli finetune $tiny --method qlora --out_dir "$out/qlora"
for cache in memory none; do
  run python3 -m skip2lora.cli finetune $tiny --method skip2lora --skip2lora.cache $cache --out_dir "$out/skip2lora-$cache"
done
run python3 -m skip2lora.cli finetune $tiny --method lora --strategy fsdp --devices 1 --out_dir "$out/lora-fsdp"
python3 -m skip2lora.cli benchmark --model smollm2-135m --device cuda --batch_size 4 --seq_len 256 \
    --iters 10 --warmup 3 --out_dir "$out" 2>&1 | tee "$out/bench_smollm2.log"
python3 -m skip2lora.cli benchmark --model random-llama-1b --device cuda --batch_size 4 --seq_len 512 \
    --iters 10 --warmup 3 --out_dir "$out" 2>&1 | tee "$out/bench_llama1b.log"
