# Run once on the code before issue #21 (commit 4608838):
#   PYTHONPATH=src:tests:tests/rec .venv/bin/python tests/data/record_rec_reference.py
"""Record a fixed-seed SASRec student's (plain and distilled) per-epoch losses and test metrics."""
import json
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from fake_teacher import FakeTeacher
from rec_fixtures import synthetic_sequences, write_ml1m

from skip2lora.rec.student.config import (RecDataConfig, RecDistillConfig, RecDistilledStudentConfig, RecEvalConfig,
                                  RecStudentConfig, RecTrainConfig, SASRecConfig)
from skip2lora.rec.student.config import RecOutputsConfig
from skip2lora.rec.student.data import load_dataset
from skip2lora.rec.teacher.outputs import write_teacher_outputs
from skip2lora.rec.student.training import run_student


def record() -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        data = write_ml1m(d / "ml1m", synthetic_sequences(), 30)
        base = RecStudentConfig(out_dir=d / "plain", seed=3, device="cpu", tensorboard=False, threads=1,
                                data=RecDataConfig(name="ml-1m", path=data, max_seq_len=8),
                                model=SASRecConfig(hidden=16, blocks=1, heads=2, dropout=0.1),
                                train=RecTrainConfig(epochs=4, batch_size=16, lr=5e-3, patience=0),
                                eval=RecEvalConfig(k=10, ks=[1, 5, 10]))
        dataset = load_dataset(base.data)
        teacher = FakeTeacher(dataset.n_items, knows_pattern=True)
        write_teacher_outputs(d / "outputs", dataset, teacher, RecOutputsConfig(k=10, inference_batch_size=32,
                              shard_size=64), teacher={"model": "fake"}, item_embeddings=teacher.item_embeddings,
                              log=lambda _: None)
        values = {f.name: getattr(base, f.name) for f in fields(base)}
        distilled = RecDistilledStudentConfig(**{**values, "out_dir": d / "distilled"},
                                              distill=RecDistillConfig(teacher_outputs=d / "outputs"))
        for name, cfg in (("plain", base), ("distilled", distilled)):
            run = run_student(cfg)
            import csv
            metrics = next(cfg.out_dir.glob("logs/**/metrics.csv"))
            train_loss = [float(r["train_loss"]) for r in csv.DictReader(metrics.open()) if r.get("train_loss")]
            out[name] = {"test": run["summary"]["test"], "validation": run["summary"]["validation"],
                         "best_epoch": run["summary"]["best_epoch"], "train_loss": train_loss}
            for key in ("eval_s",):
                out[name]["test"].pop(key, None)
                out[name]["validation"].pop(key, None)
    out["paper_pretrain"] = record_paper_pretrain()
    return out


def record_paper_pretrain() -> dict:
    """The paper study's source-domain pretraining of a small MLP (fixed seed, with a remainder batch)."""
    import torch

    from skip2lora.studies.paper.models import MLP
    from skip2lora.studies.paper.training import pretrain

    torch.manual_seed(5)
    x, y = torch.randn(150, 12), torch.randint(0, 4, (150,))
    model = MLP([12, 16, 4])
    result = pretrain(model, x, y, epochs=3, batch_size=32, lr=1e-2, seed=2)
    return {"final_loss": result.final_loss, "source_accuracy": result.source_accuracy,
            "weight_sum": float(sum(p.double().sum() for p in model.parameters()))}


if __name__ == "__main__":
    result = record()
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "rec_reference.json"
    target.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1))
