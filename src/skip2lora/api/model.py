"""Skip2LoRAModel: a Hugging Face causal LM with Skip2-LoRA adapters, as a torch module any training code can drive.

It holds the method itself (`methods.skip2lora.method.Skip2LoRAMethod`, the one `skip2lora finetune` trains):
trunk, adapters, Skip-Cache, loss and file format are the method's; this module only turns a Hugging Face style
call (input_ids, attention_mask, labels) into the method's batch and its (loss_sum, count) back into a Hugging
Face output, so transformers.Trainer, a plain loop or Lightning train it unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.base import causal_lm_loss_sum
from ..methods.skip2lora.adapter_config import ADAPTER_CONFIG, Skip2LoRAAdapterConfig
from ..methods.skip2lora.method import Skip2LoRAMethod, restore_skip2lora
from ..models import model_info
from .batches import IdRegistry, method_batch, samples_from
from .errors import Skip2LoRAValueError, as_value_errors
from .config import TASKS, Skip2LoRAConfig


class Skip2LoRAModel(nn.Module):
    """The frozen base model plus trainable skip adapters (and, for seq_cls, a class head).

    forward(input_ids, attention_mask=None, labels=None, sample_id=None) returns the model's own output type
    (CausalLMOutputWithPast / SequenceClassifierOutput) with `loss` when labels are given. In training mode with
    labels, the trunk runs without autograd (or not at all: the Skip-Cache) and a causal LM's head runs only at
    the loss positions, so `logits` is None there; in eval mode, or without labels, the model's own forward runs
    with the adapters' correction added at its head and every logit comes back.
    """

    accepts_loss_kwargs = True
    """transformers.Trainer passes num_items_in_batch (the loss tokens of the whole accumulated step)."""

    def __init__(self, method: Skip2LoRAMethod, config: Skip2LoRAConfig) -> None:
        super().__init__()
        self.method = method
        self.skip2lora_config = config
        self._ids = IdRegistry()
        if method.cache is not None and method.cache.mode == "disk":
            # Features first seen during training wait in memory until a shard fills; these write the rest.
            weakref.finalize(self, method.cache.flush)

    def train(self, mode: bool = True) -> "Skip2LoRAModel":
        """As nn.Module's; leaving training (evaluation, the end of a run) writes a disk cache's pending features."""
        if not mode and self.method.cache is not None:
            self.method.cache.flush()
        return super().train(mode)

    # -- what it wraps --------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """The wrapped Hugging Face model (frozen)."""
        return self.method.model

    @property
    def config(self) -> Any:
        """The wrapped model's Hugging Face config (Trainer and generation read it)."""
        return self.method.model.config

    @property
    def block_indices(self) -> list[int]:
        return list(self.method.block_indices)

    def print_trainable_parameters(self) -> None:
        counts = self.method.parameter_counts()
        print(f"trainable params: {counts.trainable:,} || all params: {counts.total:,} || "
              f"trainable%: {100 * counts.trainable_ratio:.4f}")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapters (and class head): what an optimizer needs."""
        return self.method.trainable_parameters()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        """Only what trains (adapters, class head), as PEFT's checkpoints hold only the adapter: the frozen base
        comes from its own files. transformers.Trainer's and Lightning's checkpoints stay small and save tied
        weights without complaint; load_state_dict takes such a dict back."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        trainable = {prefix + "method." + name for name in self.method.named_trainable_parameters()}
        return type(full)((key, value) for key, value in full.items() if key in trainable)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """The trainable tensors back (the frozen base is left as it is); strict: every one must be there."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        trainable = {"method." + name for name in self.method.named_trainable_parameters()}
        missing = sorted(set(result.missing_keys) & trainable)
        if strict and (missing or result.unexpected_keys):
            raise Skip2LoRAValueError(f"the state dict does not fit these adapters (missing {missing[:3]}, "
                                      f"unexpected {result.unexpected_keys[:3]}): load one saved from the same "
                                      "Skip2LoRAConfig")
        return result

    def cache_stats(self) -> Optional[dict]:
        """Skip-Cache hits, misses, samples and size so far (None without a cache)."""
        return self.method.cache_stats()

    # -- before training ------------------------------------------------------------------------
    def prepare(self, data: Iterable) -> "Skip2LoRAModel":
        """Before training, in one call: with block_indices "auto", choose the blocks from `data`; then fill the
        Skip-Cache with every sample of `data` in one batched no-grad pass (longest first, a shared prompt prefix
        run once). `data`: a dataset of rows (input_ids, labels, optional sample_id) or the DataLoader training
        will use. Call it before the optimizer is made: "auto" builds fresh adapters for the chosen blocks."""
        method = self.method
        with as_value_errors():
            samples = samples_from(data, method.kind, method.num_labels, self._ids)
            if not samples:
                raise Skip2LoRAValueError("prepare() got no sample with a loss position: pass the training data")
            method.prepare(samples, [], next(method.model.parameters()).device)
        self.skip2lora_config.block_indices = list(method.block_indices)
        return self

    # -- forward --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, sample_id: Optional[Any] = None,
                num_items_in_batch: Optional[Union[int, torch.Tensor]] = None, **kwargs: Any) -> Any:
        """Loss (with labels) and logits, as the wrapped model's forward returns them. `sample_id`: optional, one
        id per row, checked (an id reused for other content is refused); the cache keys are content hashes."""
        method = self.method
        if method.blocks_pending:
            raise Skip2LoRAValueError('block_indices "auto": call model.prepare(train_data) before training')
        if method.kind == "classification":
            return self._classify(input_ids, attention_mask, labels, sample_id, num_items_in_batch)
        if labels is None or not self.training:
            return self._own_forward(input_ids, attention_mask, labels, num_items_in_batch, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        batch = method_batch(input_ids, attention_mask, labels, method.kind, None)
        self._ids.check(sample_id, batch["content_hashes"])
        loss_sum, count = method(batch)  # the training forward of `skip2lora finetune`
        return CausalLMOutputWithPast(loss=loss_sum / _divisor(num_items_in_batch, count), logits=None)

    def _own_forward(self, input_ids, attention_mask, labels, num_items_in_batch, **kwargs) -> Any:
        """The model's own forward with the adapters' correction hooked in at its head: every position's logits."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self.method.corrections_applied():
            output = self.method.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if labels is not None:
            from .batches import checked_labels

            labels = checked_labels(labels.to(input_ids.device), input_ids, "generation", None)
            loss_sum, count = causal_lm_loss_sum(output.logits, labels)
            # A new output, not an attribute set on the old one: loss comes first, as in the model's own outputs.
            output = type(output)(loss=loss_sum / _divisor(num_items_in_batch, count),
                                  **{key: value for key, value in output.items() if key != "loss"})
        return output

    def _classify(self, input_ids, attention_mask, labels, sample_id, num_items_in_batch) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        method = self.method
        batch = method_batch(input_ids, attention_mask, labels, method.kind, method.num_labels)
        if labels is None:  # nothing to key the cache with (its entries hold the targets): the trunk runs
            with method.cache_paused():
                return SequenceClassifierOutput(logits=method.classify(batch))
        self._ids.check(sample_id, batch["content_hashes"])
        logits = method.classify(batch)
        targets = batch["class_labels"]
        loss = F.cross_entropy(logits.float(), targets, reduction="sum") / _divisor(num_items_in_batch, targets.numel())
        return SequenceClassifierOutput(loss=loss, logits=logits)

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped model's own generate() (KV cache, any decoding settings) with the adapters applied."""
        if self.method.kind != "generation":
            raise Skip2LoRAValueError("this Skip2-LoRA model is a seq_cls classifier: call it for logits instead")
        was_training = self.training
        self.eval()
        try:
            with self.method.corrections_applied():
                return self.method.model.generate(*args, **kwargs)
        finally:
            self.train(was_training)

    # -- files ----------------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write adapter_config.json and adapter_model.safetensors (and the tokenizer, when one was given): the
        files `skip2lora finetune` writes to OUT/final, which `skip2lora generate --checkpoint` loads. They are
        written into a hidden staging folder first and each renamed into place, the config last; other files in
        the folder stay."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory, prefix=".skip2lora-save-"))
        try:
            self.method.save(staging)
            # Weights and tokenizer first, the config that names them last: a reader never sees a config
            # without its weights. Other files in the folder stay.
            for item in sorted(staging.iterdir(), key=lambda f: f.name == ADAPTER_CONFIG):
                os.replace(item, directory / item.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(cls, base_model: Union[nn.Module, str], directory: Union[str, Path], tokenizer: Any = None,
                        cache: str = "none", device: Optional[str] = None) -> "Skip2LoRAModel":
        """Saved adapters (from save_pretrained or a `skip2lora finetune` OUT/final) on `base_model`: the model
        itself, or a name `skip2lora` knows (smollm2-135m, tiny, a Hugging Face folder...). `cache` = ram or disk
        to train further with the Skip-Cache."""
        from ..models import load_base_model

        with as_value_errors():
            saved = Skip2LoRAAdapterConfig.read(Path(directory))
            if isinstance(base_model, str):
                model, loaded_tokenizer, info = load_base_model(base_model, device=device or "cpu")
                tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
            else:
                model, info = base_model, _info_of(base_model, saved.base_model_name_or_path)
            task = {v: k for k, v in TASKS.items()}[saved.task]
            config = Skip2LoRAConfig(block_indices=list(saved.block_indices), r=saved.r, alpha=saved.alpha,
                                     dropout=saved.dropout, task=task, num_labels=saved.num_labels,
                                     pooling=saved.pooling, cache=cache, input_norm=saved.input_norm,
                                     output=saved.output)
            method = restore_skip2lora(model, tokenizer, info, Path(directory), config.method_config())
        return cls(method, config)


def get_skip2lora_model(model: nn.Module, config: Skip2LoRAConfig, tokenizer: Any = None,
                        base_model_name_or_path: Optional[str] = None) -> Skip2LoRAModel:
    """Wrap a Hugging Face causal LM (AutoModelForCausalLM; for seq_cls too: the class head is new) with
    Skip2-LoRA: its weights are frozen, the skip adapters (and class head) train.

    `tokenizer` is optional (saved beside the adapters when given). `base_model_name_or_path` is what
    `skip2lora generate` reloads the base from (default: the model's own name_or_path). A block index out of range,
    a model whose logits trunk + head cannot reproduce, or a bad setting raises a ValueError naming the fix.
    """
    if not isinstance(config, Skip2LoRAConfig):
        raise Skip2LoRAValueError(f"config must be a skip2lora.Skip2LoRAConfig, got {type(config).__name__}")
    if type(model).__name__.endswith("ForSequenceClassification"):
        raise Skip2LoRAValueError(f"{type(model).__name__}: pass the causal LM (AutoModelForCausalLM) with task "
                                  "seq_cls; Skip2-LoRA adds its own class head")
    with as_value_errors():
        info = _info_of(model, base_model_name_or_path)
        method = Skip2LoRAMethod(model, tokenizer, config.method_task, config.method_config(), info,
                                 num_labels=config.num_labels, seed=config.seed)
    if not method.blocks_pending:
        config.block_indices = list(method.block_indices)  # resolved: negative indices counted from the end
    return Skip2LoRAModel(method, config)


def _info_of(model: nn.Module, name_or_path: Optional[str]) -> Any:
    path = name_or_path or getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    return model_info(model, Path(str(path)).name or type(model).__name__, str(path))


def _divisor(num_items_in_batch: Optional[Union[int, torch.Tensor]], count: int) -> Union[int, torch.Tensor]:
    """Hugging Face's convention: the mean over this batch's loss units, or over the whole accumulated step's."""
    if num_items_in_batch is None:
        return max(int(count), 1)
    return num_items_in_batch
