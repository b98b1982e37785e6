"""Teacher outputs for every training sample, written in resumable safetensors shards with an index.

```
DIR/index.json                     format, dataset, n_items, k, the settings that made them, finished shards
DIR/shard-00000.safetensors        rows [first, first + shard_size) of the sample list:
                                     topk_ids     int64   [R, k]  item ids (1..N, the dataset's index space)
                                     topk_scores  float32 [R, k]  the teacher's scores of those items, best first
                                     confidences  float32 [R, k]  softmax of topk_scores (temperature 1)
                                     full_scores  float16 [R, N]  optional: every item's score, column c = item c+1
DIR/item_embeddings.safetensors    item_embeddings float32 [N, d], row i = item i+1 (once per item; the pipeline
                                     stores the teacher's own title states, TeacherScorer.title_states)
```

Confidence. DLLM2Rec's teacher generates a title, grounds it to items by embedding distance and weighs
candidate r by exp(-distance_r). Our teachers score the catalogue directly, so the distance of candidate r is
the score gap to the top candidate, d_r = s_1 - s_r >= 0, and exp(-d_r / T) normalised over the top-k is
softmax(s / T): the stored confidences are that at T = 1; distillation recomputes it at its own temperature
from topk_scores. The top candidate always weighs exp(0) = 1 before normalising, so it never underflows.

Writing is resumable: shard i always covers the same rows (the sample list and shard_size are part of the
settings), each shard is built in memory and renamed into place whole, and the index names a shard only once
its file is in place. A rerun keeps every finished shard whose checksum still matches, regenerates the rest,
and refuses (one line) if any setting differs from the ones recorded. DIR/.lock keeps two writers apart.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ...errors import UserError, warn
from ...locking import lock_or_refuse
from ...paths import atomic_write_bytes, atomic_write_json
from ..student.config import RecOutputsConfig, config_to_dict
from ..student.data import RecSample

FORMAT = "skip2lora-teacher-outputs"
FORMAT_VERSION = 1
INDEX = "index.json"
EMBEDDINGS = "item_embeddings.safetensors"
FP16_MAX = 65504.0

Scorer = Callable[[list[RecSample]], torch.Tensor]
"""samples -> [len(samples), n_items] scores (column c = item c + 1), or [len(samples), n_items + 1] as
SASRec.full_sort_scores gives them (column 0 = padding, dropped). Higher is better."""
EmbeddingSource = Callable[[], torch.Tensor]
"""() -> [n_items, d] LLM item embeddings (row i = item i + 1), or [n_items + 1, d] with row 0 = padding."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_fingerprint(values: Sequence[str]) -> str:
    """One sha256 over an ordered list of ids (sample ids, raw item ids)."""
    return sha256_hex("\n".join(values).encode())


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def output_settings(cfg: RecOutputsConfig, dataset_name: str, item_ids: Sequence[str], sample_ids: Sequence[str],
                    teacher: Optional[dict], with_embeddings: bool) -> dict:
    """Everything that decides the files' content: a resume must find exactly these recorded."""
    return {**config_to_dict(cfg), "dataset": dataset_name, "n_items": len(item_ids),
            "items_sha256": text_fingerprint(item_ids), "samples": len(sample_ids),
            "samples_sha256": text_fingerprint(sample_ids), "item_embeddings": with_embeddings,
            # JSON round trip, so tuples and lists compare equal with what a resume reads back.
            "teacher": json.loads(json.dumps(teacher or {}, default=str))}


def newest_training_samples(dataset, count: Optional[int]) -> list[RecSample]:
    """Every training sample (count None), or each user's newest `count` training positions; a count above
    every user's number of training positions is refused in one line (it would select them all)."""
    samples = list(dataset.training_samples())
    if count is None:
        return samples
    per_user: dict[str, list[RecSample]] = {}
    for sample in samples:
        per_user.setdefault(sample.sample_id.rsplit(":", 1)[0], []).append(sample)
    longest = max((len(rows) for rows in per_user.values()), default=0)
    if count > longest:
        raise UserError(f"--outputs.newest_positions {count} is larger than any user's {longest} training positions: "
                        f"lower it, or leave it unset for every position")
    return [sample for rows in per_user.values() for sample in rows[-count:]]


def check_request(cfg: RecOutputsConfig, n_items: int, sample_ids: Sequence[str]) -> None:
    """Refuse what cannot be written before anything is written."""
    if cfg.k > n_items:
        raise UserError(f"candidate count k={cfg.k} is larger than the catalogue of {n_items} items: lower "
                        "--outputs.k")
    if not sample_ids:
        raise UserError("there are no training samples to score: check the dataset")
    seen: set[str] = set()
    for sample_id in sample_ids:
        if sample_id in seen:
            raise UserError(f"sample id {sample_id} occurs twice in the samples to score: ids must be unique")
        seen.add(sample_id)


def catalogue_scores_checked(scores: torch.Tensor, batch: list[RecSample], n_items: int) -> torch.Tensor:
    """The scorer's answer as float32 [B, n_items] on CPU; a wrong shape or NaN is one line."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != len(batch) \
            or scores.shape[1] not in (n_items, n_items + 1):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise UserError(f"the teacher returned scores of shape {shape} for {len(batch)} samples: expected "
                        f"[{len(batch)}, {n_items}] (or [{len(batch)}, {n_items + 1}] with a padding column 0)")
    scores = scores.detach().float().cpu()
    if scores.shape[1] == n_items + 1:
        scores = scores[:, 1:]
    bad = torch.isnan(scores).any(dim=1)
    if bad.any():
        raise UserError(f"the teacher's scores for sample {batch[int(bad.nonzero()[0])].sample_id} contain NaN")
    return scores


def top_candidates(scores: torch.Tensor, k: int, batch: list[RecSample]) -> dict[str, torch.Tensor]:
    """Top-k item ids (ties: the lower item id first, so results never depend on the sort kernel), their scores
    and confidences."""
    values, columns = torch.sort(scores, dim=1, descending=True, stable=True)
    values, columns = values[:, :k].contiguous(), columns[:, :k]
    bad = ~torch.isfinite(values).all(dim=1)
    if bad.any():
        raise UserError(f"the teacher gave fewer than k={k} finite scores for sample "
                        f"{batch[int(bad.nonzero()[0])].sample_id}: lower --outputs.k")
    return {"topk_ids": (columns + 1).to(torch.int64), "topk_scores": values,
            "confidences": torch.softmax(values, dim=1)}


def score_shard(samples: list[RecSample], scorer: Scorer, cfg: RecOutputsConfig, n_items: int) -> dict:
    """One shard's tensors: the scorer called on inference batches of `inference_batch_size` samples."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(samples), cfg.inference_batch_size):
        batch = samples[start:start + cfg.inference_batch_size]
        scores = catalogue_scores_checked(scorer(batch), batch, n_items)
        row = top_candidates(scores, cfg.k, batch)
        if cfg.full_scores:
            row["full_scores"] = scores.clamp(-FP16_MAX, FP16_MAX).half()
        for name, tensor in row.items():
            parts.setdefault(name, []).append(tensor)
    return {name: torch.cat(tensors).contiguous() for name, tensors in parts.items()}


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    # One metadata key: safetensors writes several in hash order, and equal shards must be equal bytes.
    return save(tensors, metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})


def file_matches(path: Path, sha256: str) -> bool:
    try:
        return sha256_hex(path.read_bytes()) == sha256
    except OSError:
        return False


def _first_difference(recorded: dict, wanted: dict) -> Optional[str]:
    for key in sorted(set(recorded) | set(wanted)):
        if recorded.get(key) != wanted.get(key):
            return key
    return None


def _short(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def start_or_resume(folder: Path, settings: dict) -> dict:
    """The index to continue: a fresh one, or the recorded one when its settings are these."""
    index_path = folder / INDEX
    if not index_path.is_file():
        strangers = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
        if strangers:
            raise UserError(f"{folder} is not empty ({strangers[0]}, ...) and holds no teacher outputs: choose a new "
                            "or empty folder")
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "dataset": settings["dataset"],
                "n_items": settings["n_items"], "k": settings["k"], "settings": settings,
                "confidence": "softmax of topk_scores at temperature 1 (= exp(-(s_1 - s_r)) normalised over the top-k)",
                "complete": False, "shards": [], "item_embeddings": None}
    from ...outdir import read_json_file

    index = read_json_file(index_path, "teacher-output index")
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{index_path} is not a version-{FORMAT_VERSION} teacher-output index: choose a new folder")
    key = _first_difference(index.get("settings", {}), settings)
    if key is not None:
        raise UserError(f"teacher outputs in {folder} were made with {key}={_short(index['settings'].get(key))}, not "
                        f"{_short(settings.get(key))}: resume with the same settings or write to a new folder")
    kept = []
    for shard in index["shards"]:
        if file_matches(folder / shard["file"], shard["sha256"]):
            kept.append(shard)
        else:
            warn(f"teacher-output shard {folder / shard['file']} is missing or damaged: it is generated again")
    index["shards"] = kept
    embeddings = index.get("item_embeddings")
    if embeddings and not file_matches(folder / embeddings["file"], embeddings["sha256"]):
        warn(f"{folder / EMBEDDINGS} is missing or damaged: it is computed again")
        index["item_embeddings"] = None
    return index


def write_embeddings(folder: Path, source: EmbeddingSource, n_items: int) -> dict:
    started = time.perf_counter()
    table = source()
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] not in (n_items, n_items + 1):
        shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise UserError(f"the teacher returned item embeddings of shape {shape}: expected [{n_items}, d]")
    table = table.detach().float().cpu()
    table = (table[1:] if table.shape[0] == n_items + 1 else table).contiguous()
    if not torch.isfinite(table).all():
        raise UserError("the teacher's item embeddings contain NaN or inf")
    data = safetensors_bytes({"item_embeddings": table})
    atomic_write_bytes(folder / EMBEDDINGS, data)
    return {"file": EMBEDDINGS, "rows": int(table.shape[0]), "dim": int(table.shape[1]), "sha256": sha256_hex(data),
            "seconds": time.perf_counter() - started}


def write_teacher_outputs(out_dir: Path, dataset, scorer: Scorer, cfg: Optional[RecOutputsConfig] = None, *,
                          teacher: Optional[dict] = None, item_embeddings: Optional[EmbeddingSource] = None,
                          samples: Optional[Sequence[RecSample]] = None, log: Callable[[str], None] = print) -> dict:
    """Score every training sample of `dataset` (a RecDataset; or the given `samples`) with `scorer` and write the
    shards and the index into `out_dir`, resuming a write interrupted there. `teacher` (JSON) says what made
    the scores and is recorded with the settings. Returns the index, plus this call's `generated_shards`,
    `kept_shards` and `write_s` (not stored)."""
    cfg = cfg or RecOutputsConfig()
    samples = list(newest_training_samples(dataset, cfg.newest_positions) if samples is None else samples)
    sample_ids = [s.sample_id for s in samples]
    check_request(cfg, dataset.n_items, sample_ids)
    settings = output_settings(cfg, dataset.name, dataset.item_ids, sample_ids, teacher, item_embeddings is not None)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_or_refuse(folder, "another teacher-output writer", "wait for it or choose another folder")
    try:
        return _write_locked(folder, samples, scorer, cfg, settings, item_embeddings, log)
    finally:
        lock.release()


def _write_locked(folder: Path, samples: list[RecSample], scorer: Scorer, cfg: RecOutputsConfig, settings: dict,
                  item_embeddings: Optional[EmbeddingSource], log: Callable[[str], None]) -> dict:
    started = time.perf_counter()
    index = start_or_resume(folder, settings)
    for stale in folder.glob(".*.tmp"):  # atomic_write_bytes' temporaries a killed writer left behind
        if stale.name.startswith((".shard-", f".{INDEX}.", f".{EMBEDDINGS}.")):
            stale.unlink(missing_ok=True)
    done = {shard["number"] for shard in index["shards"]}
    planned = range(0, (len(samples) + cfg.shard_size - 1) // cfg.shard_size)
    kept = len(done)
    if done and not index["complete"]:
        log(f"resuming teacher outputs in {folder}: {kept} of {len(planned)} shards kept")
    # Recorded before any work, so an interrupted first shard still leaves the settings a resume must match.
    index.update(planned_shards=len(planned), complete=False)
    atomic_write_json(folder / INDEX, index)
    for number in planned:
        if number in done:
            continue
        rows = samples[number * cfg.shard_size:(number + 1) * cfg.shard_size]
        shard_started = time.perf_counter()
        data = safetensors_bytes(score_shard(rows, scorer, cfg, settings["n_items"]))
        atomic_write_bytes(folder / shard_name(number), data)
        seconds = time.perf_counter() - shard_started
        index["shards"].append({"number": number, "file": shard_name(number), "rows": len(rows),
                                "sample_ids": [s.sample_id for s in rows], "sha256": sha256_hex(data),
                                "seconds": seconds})
        index["shards"].sort(key=lambda shard: shard["number"])
        atomic_write_json(folder / INDEX, index)  # the shard counts as done only from here on
        log(f"teacher outputs: shard {number + 1}/{len(planned)} ({len(rows)} samples, {seconds:.1f}s)")
    if item_embeddings is not None and index["item_embeddings"] is None:
        index["item_embeddings"] = write_embeddings(folder, item_embeddings, settings["n_items"])
    index["complete"] = True
    index["generation_s"] = sum(s["seconds"] for s in index["shards"]) + (index["item_embeddings"] or {}).get(
        "seconds", 0.0)
    atomic_write_json(folder / INDEX, index)
    return {**index, "generated_shards": len(planned) - kept, "kept_shards": kept,
            "write_s": time.perf_counter() - started}
