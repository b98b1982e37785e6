"""A saved recommendation teacher back for scoring, whatever method trained it.

`load_teacher(folder, device) -> (method, prompt settings, dataset folder)` reads the checkpoint's
adapter_config.json:

- an iLoRA teacher (`finetune --method ilora`): `load_ilora`; its prompt settings are in its adapter_config.json
  and its dataset is the SASRec copy it carries (folder/sasrec);
- a Skip2-LoRA (or PEFT LoRA) teacher (`finetune --method skip2lora|lora` on data.name rec-teacher): loaded as
  `skip2lora generate` loads it; its prompt settings and dataset come from the run's config in run.json beside
  the folder (OUT/run.json for OUT/final or OUT/best): data.candidates, history_items, max_seq_length,
  prompt_style and seed, and data.path, the student's OUT/best whose rec.json names the dataset.

Anything else (a full checkpoint, a run not trained on rec-teacher) is one UserError line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import UserError

REC_TEACHER = "rec-teacher"


def finetune_prompt_settings(folder: Path) -> tuple[dict, Path]:
    """(PromptSettings as a dict, the student's best folder) of a finetune run's result folder, from the
    run.json beside it; a run not trained on data.name rec-teacher is refused in one line."""
    from ...outdir import RunDir
    from .prompts import HISTORY_SOURCE, TEACHER_SOURCES, PromptSettings

    folder = Path(folder)
    run_json = RunDir(folder.parent).run_json
    if not run_json.is_file():
        raise UserError(f"{folder} has no run.json beside it ({run_json}): point at OUT/final or OUT/best of a "
                        "`skip2lora finetune` run on data.name rec-teacher")
    config = RunDir(folder.parent).read_run_json().get("config")
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        raise UserError(f"{run_json} records no data config: the run folder is damaged")
    if data.get("name") not in TEACHER_SOURCES:
        raise UserError(f"{folder} is not a recommendation teacher: its run trained on data.name "
                        f"{data.get('name')!r}, not {' or '.join(TEACHER_SOURCES)}")
    try:
        settings = PromptSettings(candidates=int(data["candidates"]), history_items=int(data["history_items"]),
                                  max_tokens=int(data["max_seq_length"]), style=str(data["prompt_style"]),
                                  seed=int(data["seed"]),
                                  training="history" if data["name"] == HISTORY_SOURCE else "candidates")
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{run_json} lacks the prompt setting data.{exc}: the run folder is damaged") from exc
    if not data.get("path"):
        raise UserError(f"{run_json} records no data.path (the student's OUT/best): the run folder is damaged")
    return settings.as_dict(), Path(data["path"])


def load_teacher(folder: Path, device: torch.device | str) -> tuple[Any, dict, Path]:
    """(the teacher in eval mode, its PromptSettings as a dict, the folder whose rec.json names its dataset)
    from OUT/final or OUT/best of an ilora, skip2lora or lora run on data.name rec-teacher."""
    from ...inference import checkpoint_method, load_for_inference
    from .ilora import SASREC_DIR, load_ilora

    folder, device = Path(folder), torch.device(device)
    method_name = checkpoint_method(folder)
    if method_name == "full":
        raise UserError(f"{folder} is a full model checkpoint, not a recommendation teacher: point at OUT/final of "
                        "an ilora or skip2lora run on data.name rec-teacher")
    if method_name == "ilora":
        teacher = load_ilora(folder, device)
        if not teacher.prompt_settings:
            raise UserError(f"{folder} records no prompt settings: it was not trained on data.name {REC_TEACHER}")
        return teacher, dict(teacher.prompt_settings), folder / SASREC_DIR
    settings, dataset_folder = finetune_prompt_settings(folder)  # checked before the model loads
    method = load_for_inference(folder, device)
    if method.kind != "generation":
        raise UserError(f"{folder} is a classifier, not a recommendation teacher (a generation run on data.name "
                        f"{REC_TEACHER})")
    if method_name == "skip2lora":
        attach_training_cache(method, folder)
    return method.eval(), settings, dataset_folder


def attach_training_cache(method: Any, folder: Path) -> bool:
    """Give a loaded Skip2-LoRA teacher the disk Skip-Cache its training run filled (skip2lora.cache disk), so
    scoring reads the trunk features of the prompts it trained on instead of running the trunk again. The
    cache's fingerprint (weights, precision, tokenizer, max_seq_length) must be the run's: set from its
    run.json, so features of any other trunk miss. False (nothing attached) for a memory cache or none."""
    from ...methods.skip2lora.cache import SkipCache
    from ...outdir import RunDir
    from ...paths import cache_root

    config = RunDir(Path(folder).parent).read_run_json().get("config") or {}
    skip = config.get("skip2lora") or {}
    if skip.get("cache") != "disk":
        return False
    method.max_seq_length = (config.get("data") or {}).get("max_seq_length")
    directory = Path(skip["cache_dir"]) if skip.get("cache_dir") else cache_root() / "skip-cache"
    method.cache = SkipCache("disk", method.cache_fingerprint(), method.feature_dtype_name, directory=directory,
                             block_indices=method.block_indices)
    return True

