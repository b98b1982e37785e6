"""OUT/best/ of a recommendation run: the weights, the configs that rebuild model and data, the item ids.

```
best/model.safetensors   SASRec state dict
best/rec.json            kind, method, epoch, validation metrics, model / data / eval configs, n_items
best/items.json          raw item id of every remapped item (1..N), to check the data still matches
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import UserError
from ...outdir import RunDir, read_json_file
from .config import RecDataConfig, RecEvalConfig, SASRecConfig, config_to_dict
from ..distill.embedding import EmbeddingDistillation, attach_embedding_distillation, embedding_distillation_of
from .sasrec import SASRec

REC_JSON, ITEMS_JSON, WEIGHTS = "rec.json", "items.json", "model.safetensors"


@dataclass
class LoadedStudent:
    model: SASRec
    info: dict
    data: RecDataConfig
    eval: RecEvalConfig
    item_ids: list[str]


def save_best_student(run_dir: RunDir, model: SASRec, dataset, cfg, epoch: int, validation: dict) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    info = {"kind": "rec", "method": "sasrec", "epoch": epoch, "validation": validation, "n_items": model.n_items,
            "max_seq_len": model.max_seq_len, "model": config_to_dict(model.cfg), "data": config_to_dict(cfg.data),
            "eval": config_to_dict(cfg.eval), "seed": cfg.seed}
    distilled = embedding_distillation_of(model)
    if distilled is not None:  # its projection and LLM table are in the state dict; this rebuilds the module
        info["embedding_distillation"] = distilled.describe()

    def fill(folder: Path) -> None:
        save_file(state, str(folder / WEIGHTS))
        (folder / REC_JSON).write_text(json.dumps(info, indent=2) + "\n")
        (folder / ITEMS_JSON).write_text(json.dumps({"item_ids": dataset.item_ids}) + "\n")

    return run_dir.write_result("best", fill)


def load_student(folder: Path) -> LoadedStudent:
    """A best/ folder back into a model (eval mode, CPU) and the configs that made its data."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / REC_JSON).is_file():
        raise UserError(f"{folder} has no {REC_JSON}: point --checkpoint at OUT/best of a `rec student` run")
    info = read_json_file(folder / REC_JSON, REC_JSON)
    if info.get("kind") != "rec" or info.get("method") != "sasrec":
        raise UserError(f"{folder / REC_JSON} is not a SASRec checkpoint (kind {info.get('kind')}, method "
                        f"{info.get('method')})")
    if not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder} has no {WEIGHTS}: the checkpoint is incomplete")
    model = SASRec(int(info["n_items"]), int(info["max_seq_len"]), SASRecConfig(**info["model"]))
    if info.get("embedding_distillation"):
        ed = info["embedding_distillation"]
        table = torch.zeros(model.n_items + 1, int(ed["llm_dim"]))  # filled by load_state_dict
        attach_embedding_distillation(model, EmbeddingDistillation(table, model.cfg.hidden, float(ed["ed_weight"])))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    model.eval()
    item_ids = read_json_file(folder / ITEMS_JSON, ITEMS_JSON)["item_ids"]
    return LoadedStudent(model, info, RecDataConfig(**info["data"]), RecEvalConfig(**info["eval"]), item_ids)


def check_student_items(loaded: LoadedStudent, dataset, where: Path) -> None:
    """The checkpoint must score the dataset's items: the same count, then the same raw ids."""
    if loaded.model.n_items != dataset.n_items:
        raise UserError(f"checkpoint {where} scores {loaded.model.n_items} items, the {dataset.name} data has "
                        f"{dataset.n_items}: use a checkpoint trained on this data")
    if dataset.item_ids != loaded.item_ids:
        raise UserError(f"the {dataset.name} data now has other items than checkpoint {where} was trained on: point "
                        "--data_path at the files the checkpoint was trained on")


def student_dataset(folder: Path):
    """The dataset a checkpoint was trained on (from its rec.json), refused unless its items are the checkpoint's
    items in the same order: a model or teacher over another catalogue would score the wrong items."""
    from .data import load_dataset

    loaded = load_student(folder)
    dataset = load_dataset(loaded.data)
    if dataset.item_ids != loaded.item_ids:
        raise UserError(f"{folder} was trained on {len(loaded.item_ids)} items, its dataset {dataset.name} now has "
                        f"{dataset.n_items} (or other ids): retrain the student on this data")
    return dataset
