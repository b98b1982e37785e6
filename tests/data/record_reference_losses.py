# Run once on the pre-redesign code (commit 86f5e94): .venv/bin/python tests/data/record_reference_losses.py
"""Record per-step train losses and eval losses of fixed-seed tiny runs with the pre-redesign code."""
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import tiny_config
from skip2lora.train import run_finetune
# The pre-redesign code let bitsandbytes repack 4-bit weights for inference on AVX512-BF16 CPUs, which cut
# QLoRA's gradients after the first evaluation (fixed since); the reference is recorded without that repacking.
import bitsandbytes.nn.modules as bnb_modules
bnb_modules.has_avx512bf16 = lambda: False
import csv
cases = {
  "lora-tiny": dict(method="lora", model="tiny"),
  "full-tiny": dict(method="full", model="tiny"),
  "skip2lora-tiny": dict(method="skip2lora", model="tiny"),
  "skip2lora-gpt2-nocache": dict(method="skip2lora", model="tiny-gpt2", skip2lora__cache="none"),
  "lora-gpt2-accum": dict(method="lora", model="tiny-gpt2"),
  "qlora-tiny": dict(method="qlora", model="tiny"),
}
out = {}
for name, kw in cases.items():
    with tempfile.TemporaryDirectory() as d:
        kw = dict(kw); method = kw.pop("method"); model = kw.pop("model")
        cfg = tiny_config(Path(d) / "run", method, model, train__max_steps=6, **kw)
        run_finetune(cfg, show_progress=False)
        rows = list(csv.DictReader(open(next((Path(d)/"run"/"logs"/"csv").glob("version_*/metrics.csv")))))
        out[name] = {"settings": {"method": method, "model": model, **{k: v for k, v in kw.items()}},
                     "train_loss": [float(r["train_loss"]) for r in rows if r["train_loss"]],
                     "val_loss": [float(r["val_loss"]) for r in rows if r["val_loss"]]}
        print(name, out[name]["train_loss"])
Path("tests/data/reference_losses.json").write_text(json.dumps(out, indent=1) + "\n")
