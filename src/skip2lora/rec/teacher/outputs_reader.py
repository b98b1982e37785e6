"""Read teacher outputs (rec/outputs.py's folder) back as a dataset whose rows follow the training samples.

`load_teacher_outputs(folder, dataset)` checks the catalogue (dataset name, item count and ids) and the sample
ids against the training set, and returns the rows in `dataset.training_samples()` order; a missing or extra
id is one UserError line naming the first one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from ...errors import UserError
from ...outdir import read_json_file
from .outputs import FORMAT, FORMAT_VERSION, INDEX, sha256_hex, text_fingerprint

ROW_TENSORS = ("topk_ids", "topk_scores", "confidences", "full_scores")


@dataclass
class TeacherOutputs(Dataset):
    """One row per sample: `topk_ids` [S, k] (item ids 1..N), `topk_scores` and `confidences` [S, k], optional
    `full_scores` [S, N] float16 (column c = item c + 1); `item_embeddings` [N, d] (row i = item i + 1) or None."""

    folder: Path
    index: dict
    sample_ids: list[str]
    topk_ids: torch.Tensor
    topk_scores: torch.Tensor
    confidences: torch.Tensor
    full_scores: Optional[torch.Tensor] = None
    item_embeddings: Optional[torch.Tensor] = None
    _rows: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rows = {sample_id: row for row, sample_id in enumerate(self.sample_ids)}

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def n_items(self) -> int:
        return int(self.index["n_items"])

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, row: int) -> dict:
        item = {"sample_id": self.sample_ids[row]}
        for name in ROW_TENSORS:
            tensor = getattr(self, name)
            if tensor is not None:
                item[name] = tensor[row]
        return item

    def row_of(self, sample_id: str) -> int:
        """The row holding `sample_id` (KeyError if none)."""
        return self._rows[sample_id]

    def row_or_none(self, sample_id: str) -> int:
        """The row holding `sample_id`, or -1 (outputs written for some positions only)."""
        return self._rows.get(sample_id, -1)

    def padded_item_embeddings(self) -> Optional[torch.Tensor]:
        """[N + 1, d] with a zero row 0 for padding, so item ids index it directly."""
        if self.item_embeddings is None:
            return None
        return torch.cat([self.item_embeddings.new_zeros(1, self.item_embeddings.shape[1]), self.item_embeddings])

    def aligned(self, sample_ids: Sequence[str]) -> "TeacherOutputs":
        """The rows reordered to follow `sample_ids`; an id missing on either side is one UserError line."""
        wanted = list(sample_ids)
        missing = [s for s in wanted if s not in self._rows]
        if missing:
            raise UserError(f"teacher outputs in {self.folder} do not match the training set: training sample "
                            f"{missing[0]} has no teacher row ({len(missing)} missing): regenerate them for this data")
        wanted_set = set(wanted)
        extra = [s for s in self.sample_ids if s not in wanted_set]
        if extra:
            raise UserError(f"teacher outputs in {self.folder} do not match the training set: teacher row "
                            f"{extra[0]} is not a training sample ({len(extra)} extra): regenerate them for this data")
        order = torch.tensor([self._rows[s] for s in wanted], dtype=torch.long)
        rows = {name: getattr(self, name)[order] for name in ROW_TENSORS if getattr(self, name) is not None}
        return replace(self, sample_ids=wanted, **rows)


def _load_file(folder: Path, entry: dict, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    path = folder / entry["file"]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read ({exc.strerror}): rerun the pipeline (or the writer) to "
                        "regenerate it") from exc
    if sha256_hex(data) != entry["sha256"]:
        raise UserError(f"{what} {path} is damaged (checksum differs from {INDEX}): rerun the pipeline (or the "
                        "writer) to regenerate it")
    return load(data)


def read_teacher_outputs(folder: Path) -> TeacherOutputs:
    """Every row of a complete teacher-output folder, in the order they were written."""
    folder = Path(folder)
    index = read_json_file(folder / INDEX, "teacher-output index")
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{folder / INDEX} is not a version-{FORMAT_VERSION} teacher-output index")
    if not index.get("complete"):
        raise UserError(f"teacher outputs in {folder} are incomplete ({len(index.get('shards', []))} of "
                        f"{index.get('planned_shards', '?')} shards): rerun the pipeline (or the writer) to "
                        "finish them")
    parts: dict[str, list[torch.Tensor]] = {}
    sample_ids: list[str] = []
    for entry in index["shards"]:
        tensors = _load_file(folder, entry, "teacher-output shard")
        rows = int(tensors["topk_ids"].shape[0])
        if rows != entry["rows"] or len(entry["sample_ids"]) != rows:
            raise UserError(f"teacher-output shard {folder / entry['file']} holds {rows} rows, the index says "
                            f"{entry['rows']}: rerun the pipeline (or the writer) to regenerate it")
        sample_ids.extend(entry["sample_ids"])
        for name, tensor in tensors.items():
            parts.setdefault(name, []).append(tensor)
    if len(set(sample_ids)) != len(sample_ids):
        raise UserError(f"teacher outputs in {folder} hold a sample id twice: regenerate them")
    rows = {name: torch.cat(tensors) for name, tensors in parts.items()}
    embeddings = None
    if index.get("item_embeddings"):
        embeddings = _load_file(folder, index["item_embeddings"], "teacher item embeddings")["item_embeddings"]
    return TeacherOutputs(folder, index, sample_ids, rows["topk_ids"], rows["topk_scores"], rows["confidences"],
                          rows.get("full_scores"), embeddings)


def check_catalogue(outputs: TeacherOutputs, dataset) -> None:
    """The outputs must rank the same items as the dataset: name, count and raw ids."""
    index, folder = outputs.index, outputs.folder
    if index["dataset"] != dataset.name:
        raise UserError(f"teacher outputs in {folder} are for {index['dataset']}, not {dataset.name}: point at the "
                        "outputs made for this dataset")
    if index["n_items"] != dataset.n_items:
        raise UserError(f"teacher outputs in {folder} rank {index['n_items']} items, the dataset has "
                        f"{dataset.n_items}: regenerate them for this data")
    if index["settings"]["items_sha256"] != text_fingerprint(dataset.item_ids):
        raise UserError(f"teacher outputs in {folder} were made for other item ids than this {dataset.name} data: "
                        "regenerate them for this data")


def load_teacher_outputs(folder: Path, dataset, sample_ids: Optional[Sequence[str]] = None) -> TeacherOutputs:
    """The outputs aligned to the training samples they were written for (every one, or each user's newest
    `newest_positions`, as recorded; or to `sample_ids`), catalogue checked."""
    from .outputs import newest_training_samples

    outputs = read_teacher_outputs(folder)
    check_catalogue(outputs, dataset)
    if sample_ids is None:
        newest = outputs.index["settings"].get("newest_positions")
        sample_ids = [s.sample_id for s in newest_training_samples(dataset, newest)]
    return outputs.aligned(sample_ids)
