"""DLLM2Rec's importance-aware ranking distillation (Cui et al., RecSys 2024), as one loss module.

For each training position p with the teacher's top-k candidates c_1..c_k (best first), a sampled negative
n and the student's item scores s:

    loss_p = sum_r  w_pr * ( -log sigmoid(s[c_r]) - log(1 - sigmoid(s[n])) )
    w_pr   = mix_pr / sum_r' mix_pr',   mix = g_pos * position + g_conf * confidence + g_cons * consistency

    position_r    = e^(-r / lambda) / sum_r' e^(-r' / lambda)              r = 1..k
    confidence_r  = exp(-d_r / T) / sum_r' exp(-d_r' / T),  d_r = teacher score gap to its top-1 candidate
                    (= softmax(topk_scores / T); the top-1 term is exp(0) = 1, so the sum never underflows)
    consistency_r = 1 if c_r is in the student's current top-k else 0        (not normalised, as in DLLM2Rec)

and the distillation loss is the mean of loss_p over positions (DLLM2Rec: the batch mean of each candidate's
weighted term, summed over candidates; the same number). Defaults follow DLLM2Rec's official main.py:
g = 0.3 / 0.5 / 0.1, lambda = 1, k = 10, one negative per position shared by the k candidates. One deliberate
difference: DLLM2Rec writes the negative's term as log sigmoid(1 - s[n]), which looks like a slip for
log sigmoid(-s[n]) = log(1 - sigmoid(s[n])); we use the latter, the standard BCE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def position_weights(k: int, decay: float = 1.0, device=None) -> torch.Tensor:
    """[k] e^(-rank / decay) for ranks 1..k, normalised to sum 1."""
    weights = torch.exp(-torch.arange(1, k + 1, dtype=torch.float32, device=device) / decay)
    return weights / weights.sum()


def confidence_weights(topk_scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[P, k] exp(-(s_1 - s_r) / T) normalised over the k: a softmax, shifted so it cannot underflow."""
    return torch.softmax(topk_scores.float() / temperature, dim=-1)


def consistency_weights(candidates: torch.Tensor, student_top: torch.Tensor) -> torch.Tensor:
    """[P, k] 1.0 where candidate c_r is among the student's current top items ([P, k']), else 0.0."""
    return (candidates.unsqueeze(2) == student_top.unsqueeze(1)).any(dim=2).float()


class RankingDistillationLoss(nn.Module):
    """Weighted BCE of the teacher's top-k candidates (positives) against one sampled negative per position."""

    def __init__(self, k: int = 10, gamma_position: float = 0.3, gamma_confidence: float = 0.5,
                 gamma_consistency: float = 0.1, position_lambda: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.k, self.position_lambda, self.temperature = k, position_lambda, temperature
        self.gammas = (gamma_position, gamma_confidence, gamma_consistency)

    def weights(self, student_top: torch.Tensor, candidates: torch.Tensor, topk_scores: torch.Tensor) -> torch.Tensor:
        """[P, k] mixed, normalised weights from the student's current top-k item ids and the teacher's top-k."""
        mixed = (self.gammas[0] * position_weights(self.k, self.position_lambda, topk_scores.device)
                 + self.gammas[1] * confidence_weights(topk_scores, self.temperature)
                 + self.gammas[2] * consistency_weights(candidates, student_top))
        return mixed / mixed.sum(dim=1, keepdim=True)

    def forward(self, hidden: torch.Tensor, item_table: torch.Tensor, candidates: torch.Tensor,
                topk_scores: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """The student scores item i as hidden . item_table[i] (SASRec: its shared item embeddings, row 0 =
        padding). hidden [P, d], candidates [P, k] item ids best first, topk_scores [P, k] the teacher's scores of
        them, negatives [P] item ids -> the mean weighted loss (a scalar)."""
        candidates, topk_scores = candidates[:, :self.k], topk_scores[:, :self.k]
        with torch.no_grad():  # only the top-k choice needs every item's score: no gradient, no [P, N] backward
            student_top = (hidden @ item_table[1:].t()).topk(self.k, dim=1).indices + 1
        weights = self.weights(student_top, candidates, topk_scores)
        positive_scores = torch.einsum("pd,pkd->pk", hidden, item_table[candidates]).float()
        negative_scores = (hidden * item_table[negatives]).sum(-1, keepdim=True).float()
        positive = F.softplus(-positive_scores)   # -log sigmoid(s[c_r])
        negative = F.softplus(negative_scores)    # -log(1 - sigmoid(s[n]))
        return (weights * (positive + negative)).sum(dim=1).mean()


def sample_negatives(targets: torch.Tensor, n_items: int) -> torch.Tensor:
    """One item per position, uniform over the items other than its target (ids 1..N)."""
    drawn = torch.randint(1, n_items, targets.shape, device=targets.device)
    return drawn + (drawn >= targets).long()  # skip the target: uniform over the remaining N - 1
