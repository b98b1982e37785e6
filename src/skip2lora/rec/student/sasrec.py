"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over a user's item sequence.

The contract the teacher gate and distillation rely on:
- `forward(seq) -> [B, d]`: the user representation (the hidden state at the last, newest position);
- `full_sort_scores(seq) -> [B, n_items + 1]`: a score for every item, column 0 (padding) = -inf;
- `loss(inputs, targets)`: mean training loss over every non-padding position.
Item embeddings are shared with the output layer. The padding row (item 0) stays exactly zero: it is
looked up with `padding_idx` (no gradient) and never used as an output class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import SASRecConfig
from .data import PAD


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, hidden))


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a position-wise feed-forward layer."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, heads, dropout)
        self.ffn_norm = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), allowed))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class SASRec(nn.Module):
    def __init__(self, n_items: int, max_seq_len: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.n_items, self.max_seq_len, self.cfg = n_items, max_seq_len, cfg
        self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(max_seq_len, cfg.hidden)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.heads, cfg.dropout) for _ in range(cfg.blocks))
        self.final_norm = nn.LayerNorm(cfg.hidden)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded item ids -> [B, L, d] hidden states (padding positions zeroed)."""
        length = seq.shape[1]
        real = seq != PAD
        positions = torch.arange(self.max_seq_len - length, self.max_seq_len, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.cfg.hidden) + self.pos_emb(positions)
        x = self.emb_drop(x) * real.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        # A query may read earlier real items; a padding query reads only itself (no empty softmax row).
        allowed = (causal & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=seq.device)
        allowed = allowed.unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed) * real.unsqueeze(-1)
        return self.final_norm(x)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """The user representation: the hidden state at the newest (last) position, [B, d]."""
        return self.encode(seq)[:, -1, :]

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [..., n_items] scores of items 1..N (the padding row is not a class)."""
        return hidden @ self.item_emb.weight[1:].t()

    def full_sort_scores(self, seq: torch.Tensor) -> torch.Tensor:
        """Scores of every item for the next position, [B, n_items + 1], column 0 (padding) = -inf."""
        logits = self.item_logits(self(seq)).float()
        return F.pad(logits, (1, 0), value=float("-inf"))

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over every position that has a target (targets == 0 are skipped)."""
        hidden = self.encode(inputs)
        keep = targets != PAD
        hidden, targets = hidden[keep], targets[keep]
        if self.cfg.loss == "ce":
            # Full softmax over all N items; class c is item c + 1.
            return F.cross_entropy(self.item_logits(hidden).float(), targets - 1)
        # Original SASRec: the target against one uniformly sampled negative (may rarely equal the target).
        negatives = torch.randint(1, self.n_items + 1, targets.shape, device=targets.device)
        pos = (hidden * self.item_emb(targets)).sum(-1).float()
        neg = (hidden * self.item_emb(negatives)).sum(-1).float()
        return F.binary_cross_entropy_with_logits(torch.cat([pos, neg]),
                                                  torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]))
