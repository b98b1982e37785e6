"""Wire DLLM2Rec-style distillation into the student's training (rec/train.py).

Every target position of every training window is one training sample (`u{user}:{position}`), so each position
is matched by sample id to its row of the teacher outputs, once, before training. The step module then adds
lam x ranking distillation to the student's own loss; embedding distillation lives in the model itself (it is
used in validation and test too, as in DLLM2Rec).

Control 'shuffled teacher' (`shuffle_between_users`): the users' row blocks are put in a seeded random order
and every row takes the row m places further on (m = the most rows one user has), so every sample receives
another user's teacher ranking and each teacher row is used exactly once.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from ...errors import UserError
from ..student.config import RecDistilledStudentConfig
from ..student.data import PAD, TrainWindows
from .losses import RankingDistillationLoss, sample_negatives
from .embedding import EmbeddingDistillation, attach_embedding_distillation
from ..teacher.outputs_reader import TeacherOutputs, load_teacher_outputs


def user_of(sample_id: str) -> str:
    return sample_id.rsplit(":", 1)[0]


def shuffled_between_users(sample_ids: list[str], seed: int) -> torch.Tensor:
    """donor [S]: row i takes teacher row donor[i], always from another user; a permutation of 0..S-1."""
    blocks: dict[str, list[int]] = {}
    for row, sample_id in enumerate(sample_ids):
        blocks.setdefault(user_of(sample_id), []).append(row)
    users = list(blocks)
    order = torch.randperm(len(users), generator=torch.Generator().manual_seed(seed)).tolist()
    laid_out = [row for position in order for row in blocks[users[position]]]
    shift = max(len(rows) for rows in blocks.values())
    if 2 * shift > len(laid_out):
        raise UserError(f"cannot shuffle teacher outputs between users: one user holds {shift} of the "
                        f"{len(laid_out)} samples (more than half)")
    donor = torch.empty(len(laid_out), dtype=torch.long)
    for i, row in enumerate(laid_out):
        donor[row] = laid_out[(i + shift) % len(laid_out)]
    return donor


def teacher_rows_of_windows(windows: TrainWindows, dataset, outputs: TeacherOutputs) -> torch.Tensor:
    """[W, L] the teacher row of each window position's sample, matched by sample id (-1 where the position has
    no target, or no row: outputs written for each user's newest positions only)."""
    rows = torch.full_like(windows.positions, -1)
    for w, t in (windows.positions >= 0).nonzero().tolist():
        sample_id = dataset.sample_id(int(windows.users[w]), int(windows.positions[w, t]))
        rows[w, t] = outputs.row_or_none(sample_id)
    return rows


@contextmanager
def captured_output(module: nn.Module):
    """Keep the last output of `module` in box['value'] while the block runs."""
    box: dict = {}
    handle = module.register_forward_hook(lambda _module, _args, output: box.__setitem__("value", output))
    try:
        yield box
    finally:
        handle.remove()


class DistilledLoss(nn.Module):
    """student loss + lam x ranking distillation at every target position (the step module of a distilled run)."""

    def __init__(self, model, window_rows: torch.Tensor, outputs: TeacherOutputs,
                 ranking: Optional[RankingDistillationLoss], lam: float) -> None:
        super().__init__()
        self.model, self.ranking, self.lam = model, ranking, lam
        # Buffers, so Fabric moves them to the device with the module; never saved.
        self.register_buffer("window_rows", window_rows, persistent=False)
        self.register_buffer("topk_ids", outputs.topk_ids[:, :ranking.k] if ranking else outputs.topk_ids[:, :0],
                             persistent=False)
        self.register_buffer("topk_scores", outputs.topk_scores[:, :ranking.k].float() if ranking else
                             outputs.topk_scores[:, :0], persistent=False)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                window_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.ranking is None or self.lam == 0:
            return self.model.loss(inputs, targets)
        # The student's own loss runs encode once; its final hidden states are reused for the teacher's terms.
        with captured_output(self.model.final_norm) as hidden:
            loss = self.model.loss(inputs, targets)
        rows = self.window_rows[window_index]
        keep = (targets != PAD) & (rows >= 0)  # distillation applies where the position has a teacher row
        if not bool(keep.any()):
            return loss
        rows = rows[keep]
        negatives = sample_negatives(targets[keep], self.model.n_items)
        return loss + self.lam * self.ranking(hidden["value"][keep], self.model.item_emb.weight, self.topk_ids[rows],
                                              self.topk_scores[rows], negatives)


def variant_name(cfg) -> str:
    """run.json's method: which parts of distillation ran (the controls are separate rows of a report)."""
    parts = [name for name, on in (("rd", cfg.rd), ("ed", cfg.ed)) if on]
    return "sasrec+" + "+".join(parts) + ("-shuffled" if cfg.shuffle_between_users else "")


def setup_distillation(cfg: RecDistilledStudentConfig, model, dataset, windows: TrainWindows) -> tuple[nn.Module, dict]:
    """Load and align the teacher outputs, attach embedding distillation to `model`; returns the step module and
    the run.json block that describes the distillation."""
    started = time.perf_counter()
    dcfg = cfg.distill
    outputs = load_teacher_outputs(dcfg.teacher_outputs, dataset)
    if dcfg.k > outputs.k:
        raise UserError(f"--distill.k={dcfg.k} is larger than the k={outputs.k} candidates the teacher outputs in "
                        f"{dcfg.teacher_outputs} hold: lower --distill.k")
    if dataset.n_items < 2:
        raise UserError("distillation needs at least 2 items (one candidate and one negative)")
    rows = teacher_rows_of_windows(windows, dataset, outputs)
    if dcfg.shuffle_between_users:
        donor = shuffled_between_users(outputs.sample_ids, cfg.seed)
        rows = torch.where(rows >= 0, donor[rows.clamp(min=0)], rows)
    if dcfg.ed:
        table = outputs.padded_item_embeddings()
        if table is None:
            raise UserError(f"teacher outputs in {dcfg.teacher_outputs} hold no item embeddings: set --distill.ed "
                            "false or write the outputs with item embeddings")
        attach_embedding_distillation(model, EmbeddingDistillation(table, cfg.model.hidden, dcfg.ed_weight))
    ranking = None
    if dcfg.rd:
        ranking = RankingDistillationLoss(dcfg.k, dcfg.gamma_position, dcfg.gamma_confidence, dcfg.gamma_consistency,
                                          dcfg.position_lambda, dcfg.temperature)
    module = DistilledLoss(model, rows, outputs, ranking, dcfg.lam)
    targets = int((windows.positions >= 0).sum())
    summary = {"variant": variant_name(dcfg), "teacher_outputs": str(dcfg.teacher_outputs),
               "teacher": outputs.index["settings"].get("teacher", {}), "outputs_k": outputs.k,
               "samples": len(outputs), "positions_with_rows": int((rows >= 0).sum()), "target_positions": targets,
               "llm_dim": None if outputs.item_embeddings is None
               else int(outputs.item_embeddings.shape[1]), "shuffle_seed": cfg.seed if dcfg.shuffle_between_users
               else None, "load_s": time.perf_counter() - started}
    return module, summary
