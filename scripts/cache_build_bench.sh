#!/usr/bin/env bash
# Skip-Cache build time and memory, fp32 vs bf16 (Skip2-LoRA, blocks 0-5, the authorship task), one thread,
# in a quiet window. Each precision runs in its own worker process of one `skip2lora benchmark`; the JSON lands
# in OUT_DIR (default docs/bench) and `skip2lora benchmark-report` renders its "Fine-tuning time" table, whose
# "prepare s" is the cache build, "cache MB" the store and "peak MB above start" what the build added.
# The target: the bf16 build >= 1.8x faster than fp32 on a CPU with avx512_bf16 or AMX, cache halved.
# Usage: scripts/cache_build_bench.sh [MODEL] [OUT_DIR] [SAMPLES]
set -euo pipefail
model=${1:-smollm2-135m}
out=${2:-docs/bench}
samples=${3:-256}
pairs="skip2lora-6-cached skip2lora-6-cached-bf16"
python3 -m skip2lora.cli benchmark --suite configs/bench/precision.yaml --model "$model" --threads 1 \
    --only $pairs --iters 2 --warmup 1 --epochs 1 --samples "$samples" --seq_len 256 \
    --epoch_only $pairs --epoch_tasks authorship --out_dir "$out"
echo "render with: skip2lora benchmark-report $out/*.json --out docs/results.md --readme README.md"
