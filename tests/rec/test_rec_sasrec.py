"""SASRec's contract: shapes, causality, padding invariance, and a padding row that stays zero."""

from __future__ import annotations

import pytest
import torch

from skip2lora.errors import UserError
from skip2lora.rec.student.config import SASRecConfig
from skip2lora.rec.student.sasrec import SASRec


def model(loss: str = "ce", dropout: float = 0.0) -> SASRec:
    torch.manual_seed(0)
    return SASRec(n_items=20, max_seq_len=6, cfg=SASRecConfig(hidden=16, blocks=2, heads=2, dropout=dropout, loss=loss))


def test_forward_and_full_sort_scores_shapes():
    net = model().eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    assert net(seq).shape == (2, 16)
    scores = net.full_sort_scores(seq)
    assert scores.shape == (2, 21)
    assert torch.isinf(scores[:, 0]).all() and (scores[:, 0] < 0).all()
    assert torch.isfinite(scores[:, 1:]).all()
    assert torch.allclose(scores[:, 1:], net(seq) @ net.item_emb.weight[1:].t())  # shared item embeddings


def test_attention_is_causal_and_padding_does_not_leak():
    net = model().eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6]])
    changed = seq.clone()
    changed[0, 5] = 9
    with torch.no_grad():
        a, b = net.encode(seq), net.encode(changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)  # earlier positions never see a later item
    assert not torch.allclose(a[:, 5], b[:, 5])
    # A shorter history in a shorter tensor gives the same user representation (positions align at the end).
    with torch.no_grad():
        assert torch.allclose(net(seq), net(seq[:, 2:]), atol=1e-5)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_padding_row_stays_zero_after_training(loss):
    net = model(loss, dropout=0.2).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    inputs = torch.tensor([[0, 0, 1, 2, 3, 4], [0, 5, 6, 7, 8, 9]])
    targets = torch.tensor([[0, 0, 2, 3, 4, 5], [0, 6, 7, 8, 9, 10]])
    first = None
    for _ in range(20):
        loss_value = net.loss(inputs, targets)
        first = first if first is not None else float(loss_value.detach())
        loss_value.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(loss_value.detach()) < first
    assert torch.count_nonzero(net.item_emb.weight[0]) == 0


def test_bad_model_settings_are_one_line():
    for kwargs, message in [({"hidden": 10, "heads": 3}, "must divide"), ({"loss": "bpr"}, "unknown loss"),
                            ({"dropout": 1.0}, "dropout")]:
        with pytest.raises(UserError, match=message) as caught:
            SASRecConfig(**kwargs)
        assert "\n" not in str(caught.value)
