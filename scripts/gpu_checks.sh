#!/usr/bin/env bash
# GPU checks, as one script for a machine with CUDA and the project's dependencies importable:
# the CUDA tests; bf16-mixed and bf16-true fine-tuning; QLoRA on GPU; Skip2-LoRA cached and uncached;
# FSDP on one GPU; FSDP bf16 run -> kill -> resume equals the uninterrupted run (all GPUs); the benchmark on SmolLM2-135M (4 x 256) and on a ~1.1B random Llama (4 x 512).
# Every result lands in OUT_DIR (JSON, run folders, logs); `skip2lora benchmark-report OUT_DIR/*.json` renders them.
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
# FSDP saves what it trained: a bf16 run killed once its step-3 checkpoint exists and resumed from its last
# checkpoint must log the uninterrupted run's losses for every step it trains again. When this prints PASS, set
# FSDP_VERIFIED = True in src/skip2lora/train/fabric.py.
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
fsdp="$tiny --method lora --strategy fsdp --devices $gpus --precision bf16-mixed --max_steps 60 --train.save_interval 3 --eval.interval 30 --lora.dropout 0.1"
run python3 -m skip2lora.cli finetune $fsdp --out_dir "$out/fsdp-whole"
setsid python3 -m skip2lora.cli finetune $fsdp --out_dir "$out/fsdp-killed" >"$out/fsdp-killed.log" 2>&1 &
killed_pid=$!
until [ -f "$out/fsdp-killed/checkpoints/step-000003/progress.json" ] || ! kill -0 $killed_pid 2>/dev/null; do sleep 0.2; done
kill -9 -- -$killed_pid 2>/dev/null; wait $killed_pid 2>/dev/null
run python3 -m skip2lora.cli finetune $fsdp --out_dir "$out/fsdp-killed" --resume true
python3 - "$out/fsdp-whole" "$out/fsdp-killed" <<'PY' 2>&1 | tee -a "$out/summary.log"
import sys
from skip2lora.outdir import RunDir, read_metrics_csv
def losses(out, versions):
    rows = [r for p in versions(RunDir(out).metrics_versions()) for r in read_metrics_csv(p)[0]]
    return {int(r["step"]): r["train_loss"] for r in rows if r.get("train_loss") is not None}
whole, resumed = losses(sys.argv[1], list), losses(sys.argv[2], lambda v: v[-1:])  # the resumed attempt's rows
steps = sorted(resumed)
same = len(RunDir(sys.argv[2]).metrics_versions()) > 1 and steps[0] > 1 and all(
    abs(resumed[s] - whole[s]) <= 1e-4 * abs(whole[s]) for s in steps)
worst = max((abs(resumed[s] - whole.get(s, float("inf"))) / abs(whole.get(s, 1.0)) for s in steps), default=None)
print(f"FSDP bf16 kill -> resume equals uninterrupted: {'PASS' if same else 'FAIL'} (resumed steps "
      f"{steps[0] if steps else None}..{steps[-1] if steps else None}, largest relative loss difference {worst})")
PY
python3 -m skip2lora.cli benchmark --model smollm2-135m --device cuda --batch_size 4 --seq_len 256 \
    --iters 10 --warmup 3 --out_dir "$out" 2>&1 | tee "$out/bench_smollm2.log"
python3 -m skip2lora.cli benchmark --model random-llama-1b --device cuda --batch_size 4 --seq_len 512 \
    --iters 10 --warmup 3 --out_dir "$out" 2>&1 | tee "$out/bench_llama1b.log"
