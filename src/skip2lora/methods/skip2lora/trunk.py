"""A frozen Hugging Face causal LM seen as trunk (embeddings + blocks + final norm) and head.

Nothing here names one architecture's modules: the decoder comes from `get_decoder()` (or the base
model prefix), the blocks are the decoder's ModuleList with one entry per layer, and the head is the
model's output embedding. Llama-style and GPT-2-style models both fit.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ...errors import UserError
from ...models import num_hidden_layers
from ..output_head import OutputHead, find_output_head


def find_decoder(model: nn.Module) -> nn.Module:
    getter = getattr(model, "get_decoder", None)
    if callable(getter):
        decoder = getter()
        if decoder is not None and decoder is not model:
            return decoder
    prefix = getattr(model, "base_model_prefix", "")
    decoder = getattr(model, prefix, None) if prefix else None
    if decoder is None:
        raise ValueError(f"cannot find the decoder stack of {type(model).__name__}")
    return decoder


def find_blocks(decoder: nn.Module, num_layers: int) -> nn.ModuleList:
    """The ModuleList holding exactly one module per transformer layer."""
    candidates = [m for _, m in decoder.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not candidates:
        raise ValueError(f"cannot find a list of {num_layers} blocks in {type(decoder).__name__}")
    return candidates[0]


def block_output(output) -> torch.Tensor:
    """Decoder layers return a tensor or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


class CausalLMTrunk:
    """Runs the frozen trunk and hands back the selected blocks' outputs and the final-normed state."""

    def __init__(self, model: nn.Module, block_indices: Sequence[int]) -> None:
        self.model = model
        self.num_layers = num_hidden_layers(model.config)
        try:
            self.decoder = find_decoder(model)
            self.blocks = find_blocks(self.decoder, self.num_layers)
        except ValueError as exc:
            raise UserError(f"Skip2-LoRA cannot run on {type(model).__name__}: {exc}") from exc
        self.head: OutputHead = find_output_head(model, self.decoder)
        self.block_indices = list(block_indices)
        self.autocast_dtype: Optional[torch.dtype] = None
        """Set (bf16) to run the trunk's forward under autocast: the bf16-mixed cache build and misses."""
        self.captured: dict[int, torch.Tensor] = {}
        self._hooks = [
            self.blocks[index].register_forward_hook(self._make_capture(index)) for index in self.block_indices
        ]
        # When every block is adapted up to the last, later blocks still run for the final state.

    def _make_capture(self, index: int):
        def capture(_module, _inputs, output) -> None:
            self.captured[index] = block_output(output)

        return capture

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prefix: Optional[Any] = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """({block: [B, T, d]}, final [B, T, d]) with no autograd graph: the trunk never backpropagates.

        With `prefix` (from `prefix_state`), the inputs are what follows that shared prefix and the
        features cover those positions only: the prefix's keys and values are reused, not recomputed.
        """
        self.captured = {}
        with self._autocast(input_ids.device):
            final = self._decoder_final(input_ids, attention_mask, prefix)
        blocks, self.captured = self.captured, {}
        return blocks, final

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    def _decoder_final(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: Optional[Any]
                       ) -> torch.Tensor:
        if prefix is None:
            final = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        else:
            past = copy.deepcopy(prefix)
            past.batch_repeat_interleave(input_ids.size(0))
            ones = torch.ones((input_ids.size(0), past.get_seq_length()), dtype=attention_mask.dtype,
                              device=attention_mask.device)
            final = self.decoder(input_ids=input_ids, attention_mask=torch.cat([ones, attention_mask], dim=1),
                                 past_key_values=past, use_cache=True).last_hidden_state
        return final

    @torch.no_grad()
    def prefix_state(self, prefix_ids: torch.Tensor) -> Any:
        """Run a prompt prefix that many samples share once; its key/value cache stands in for it later."""
        self.captured = {}
        with self._autocast(prefix_ids.device):
            past = self.decoder(input_ids=prefix_ids, use_cache=True).past_key_values
        self.captured = {}
        return past

    @contextmanager
    def head_correction(self, correction) -> Iterator[None]:
        """While active, every call of the head adds `correction(captured blocks, n_positions)` to the hidden
        state entering it (before any transform the head applies). Used for generation."""
        def pre_hook(_module, args):
            hidden = args[0]
            extra = correction(self.captured, hidden.shape[-2])
            return (hidden + extra.to(hidden.dtype),) + tuple(args[1:])

        handle = self.head.entry.register_forward_pre_hook(pre_hook)
        try:
            yield
        finally:
            handle.remove()
            self.captured = {}

    @contextmanager
    def logits_correction(self, correction) -> Iterator[None]:
        """While active, the model's logits get `correction(...)` added after everything its forward does to
        them (scaling, soft-capping), as training adds it to the head stage's output."""
        def hook(_module, _args, output):
            logits = output.logits
            output.logits = logits + correction(self.captured, logits.shape[-2]).to(logits.dtype)
            return output

        handle = self.model.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
            self.captured = {}

    @torch.no_grad()
    def prefix_reuse_is_exact(self, ids: torch.Tensor, split: int, atol: float) -> bool:
        """Whether features computed after a reused prefix state equal those of one full pass (some
        architectures' caches or position handling do not allow the shortcut)."""
        mask = torch.ones_like(ids)
        try:
            _, full = self.features(ids, mask)
            _, after = self.features(ids[:, split:], mask[:, split:], self.prefix_state(ids[:, :split]))
        except Exception:
            return False
        scale = max(1.0, float(full.abs().max()))
        return after.shape == full[:, split:].shape and bool((after - full[:, split:]).abs().max() <= atol * scale)

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
