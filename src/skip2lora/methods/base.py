"""The one contract every fine-tuning method keeps, and the registry methods add themselves to.

A method is an `nn.Module` wrapping the base model: `forward(batch)` returns `(loss_sum, count)`, the
summed loss over the batch's loss-carrying units (tokens or samples) and how many there were. The
training loop, the benchmark and the studies call only what is defined here; none of them asks which
method it is running.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, warn

if TYPE_CHECKING:
    from ..config import FinetuneConfig
    from ..models import ModelInfo

METHOD_REGISTRY: dict[str, type["FinetuneMethod"]] = {}


def copy_checked(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, fix: str) -> None:
    """Copy saved tensors into live parameters, refusing (one line, naming `fix`) a tensor of another shape."""
    with torch.no_grad():
        for name, param in params.items():
            if state[name].shape != param.shape:
                raise UserError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, this run expects "
                                f"{tuple(param.shape)}: {fix}")
            param.copy_(state[name].to(param.device, param.dtype))


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make a method buildable by its config name (`--method NAME`)."""

    def add(cls: type) -> type:
        cls.name = name
        METHOD_REGISTRY[name] = cls
        return cls

    return add


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                       count: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over positions whose label is not -100, and their count (counted on
    the device unless the caller already knows it)."""
    shifted_logits = logits[:, :-1, :]
    shifted_labels = labels[:, 1:]
    count = int((shifted_labels != -100).sum()) if count is None else count
    loss = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)).float(),
        shifted_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, count


def stored_numel(param: torch.Tensor) -> int:
    """Weights a parameter holds. bitsandbytes packs two 4-bit weights per stored element; its quant_state
    keeps the real shape, so a 4-bit model counts as many parameters as its full-precision original."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(math.prod(shape)) if shape is not None else int(param.numel())


@dataclass(frozen=True)
class ParameterCounts:
    """The one definition of the parameter figures every report prints."""

    total: int
    """Frozen base weights (4-bit ones counted as weights) plus everything new that trains."""
    trainable: int
    adapter: Optional[int]
    """Parameters of the adapters alone (None for full fine-tuning)."""
    weights_mb: float
    """Bytes of all parameters and buffers as stored (4-bit weights packed)."""

    @property
    def trainable_ratio(self) -> float:
        return self.trainable / max(self.total, 1)

    def as_dict(self) -> dict:
        return {"total": self.total, "trainable": self.trainable, "adapter": self.adapter,
                "trainable_ratio": self.trainable_ratio, "weights_mb": self.weights_mb}


def probe_batch(method: "FinetuneMethod", rows: int = 2, length: int = 12) -> dict:
    """A small right-padded batch of ordinary token ids, for checks made once at setup."""
    vocab = int(getattr(method.tokenizer, "vocab_size", 0) or len(method.tokenizer))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, min(vocab, 1000)), (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, length - 3:] = 0  # one row padded, as real batches are
    pad = getattr(method.tokenizer, "pad_token_id", None)
    if pad is not None:
        ids[ids == pad] = 3
        ids[0, length - 3:] = pad
    device = next(method.parameters()).device
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


class FinetuneMethod(nn.Module):
    """Base class: the model being trained, its tokenizer and the task kind ("generation" or "classification").

    Subclasses say which parameters train, how a batch becomes a loss and how results are saved.
    """

    name: ClassVar[str] = "base"
    time_parts: bool = False
    """Switch: time the named parts of the training forward (waits for the device at each part)."""

    def __init__(self, model: nn.Module, tokenizer: Any, kind: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.loss_path = "full"  # "fast" once use_fast_loss_path() has checked it against the model's own logits

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def load_options(cls, cfg: "FinetuneConfig", kind: str) -> dict:
        """How the base model must be loaded for this method (task head, 4-bit)."""
        return {"task": kind, "quantize_4bit": False}

    @classmethod
    def multi_device_refusal(cls, cfg: "FinetuneConfig", world: int) -> Optional[str]:
        """Why this config cannot run on `world` (> 1) processes, in one sentence, or None when it can."""
        return None

    @classmethod
    def four_bit_setting(cls, cfg: "FinetuneConfig") -> Optional[str]:
        """The setting that makes load_options ask for 4-bit base weights (named in refusals), or None when
        this config loads them in full precision."""
        return None

    @classmethod
    def create(cls, model: nn.Module, tokenizer: Any, info: "ModelInfo", cfg: "FinetuneConfig", kind: str,
               num_labels: Optional[int]) -> "FinetuneMethod":
        raise NotImplementedError

    # -- what trains ---------------------------------------------------------------------------
    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.named_trainable_parameters().values())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a resume needs (frozen weights are reloaded from the base model)."""
        return {n: p.detach().clone() for n, p in self.named_trainable_parameters().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:

        params = self.named_trainable_parameters()
        missing = set(params) - set(state)
        if missing:
            raise UserError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}): "
                            "it was written by another method or configuration")
        copy_checked(params, state, "checkpoint", "resume with the settings it was trained with")

    def trainable_settings(self) -> dict:
        """What the trainable tensors depend on besides method, model and data, by config name: a resume
        whose values differ is refused (train/checkpoint.py)."""
        return {"task": self.kind}

    def parameter_counts(self) -> ParameterCounts:
        unique = {id(p): p for p in self.parameters()}
        trainable = sum(p.numel() for p in self.trainable_parameters())
        tensors = [*unique.values(), *self.buffers()]
        return ParameterCounts(
            total=sum(stored_numel(p) for p in unique.values()),
            trainable=int(trainable),
            adapter=self.adapter_parameter_count(),
            weights_mb=sum(t.numel() * t.element_size() for t in tensors) / 2**20,
        )

    def adapter_parameter_count(self) -> Optional[int]:
        return None

    # -- forward and loss ----------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed loss over the batch's loss-carrying units (tokens or samples) and their count."""
        if self.loss_path == "fast":
            return self.fast_forward(batch)
        if self.kind == "classification":
            logits = self.classify(batch)
            labels = batch["class_labels"].to(logits.device)
            return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
        outputs = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss, count = causal_lm_loss_sum(outputs.logits, batch["labels"].to(outputs.logits.device),
                                         batch.get("num_loss_positions"))
        return loss, count

    def classify(self, batch: dict) -> torch.Tensor:
        if self.loss_path == "fast":
            return self._fast_class_logits(batch)
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    # -- the output head only where the loss is ------------------------------------------------
    def hf_model(self) -> nn.Module:
        """The Hugging Face model itself (under a PEFT wrapper, its base model with the adapters in place)."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    def _decoder(self) -> nn.Module:
        # Found once: the fast path asks for it every step.
        if "_found_decoder" not in self.__dict__:
            from .skip2lora.trunk import find_decoder

            self.__dict__["_found_decoder"] = find_decoder(self.hf_model())
        return self.__dict__["_found_decoder"]

    def _final_hidden(self, batch: dict) -> torch.Tensor:
        return self._decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    def output_head(self):
        """The model's own output computation from its final hidden state (output_head.OutputHead), found once."""
        if "_found_output_head" not in self.__dict__:
            from .output_head import find_output_head

            self.__dict__["_found_output_head"] = find_output_head(self.hf_model(), self._decoder())
        return self.__dict__["_found_output_head"]

    def _fast_class_logits(self, batch: dict) -> torch.Tensor:
        hidden = self._final_hidden(batch)
        last = batch["attention_mask"].sum(dim=1) - 1  # right-padded: the last real token summarises the text
        pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        return self.hf_model().score(pooled)

    def fast_forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        """The final hidden states at the loss positions only, through the head and loss in chunks."""
        from .head_loss import head_ce_sum

        if self.kind == "classification":
            logits = self._fast_class_logits(batch)
            labels = batch["class_labels"].to(logits.device)
            return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
        hidden = self._final_hidden(batch)
        next_labels = batch["labels"][:, 1:].to(hidden.device)
        keep = next_labels != -100
        count = batch.get("num_loss_positions")
        count = int(keep.sum()) if count is None else count
        loss = head_ce_sum(hidden[:, :-1][keep], self.output_head(), next_labels[keep])
        return loss, count

    def use_fast_loss_path(self) -> bool:
        """Switch to the head-only-where-the-loss-is path if, on a probe input, it reproduces the model's own
        logits (relative 1e-4); otherwise keep the plain path and say why."""
        try:
            probe = probe_batch(self)
            was_training = self.training
            self.eval()
            with torch.no_grad():
                own = self.model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
                if self.kind == "classification":
                    fast = self._fast_class_logits(probe).float()
                else:
                    fast = self.output_head()(self._final_hidden(probe)).float()
            self.train(was_training)
        except (AttributeError, TypeError, ValueError, UserError) as exc:
            return self._keep_full_path(f"its layout is not one this path knows ({type(exc).__name__}: {exc})")
        scale = own.abs().max().clamp(min=1.0)
        if own.shape != fast.shape or float((own - fast).abs().max() / scale) > 1e-4:
            return self._keep_full_path("the final hidden state + head do not reproduce its logits")
        self.loss_path = "fast"
        return True

    def head_path(self) -> str:
        """Where the output head runs in training: 'fast' (loss positions only, chunked) or 'full' (every position)."""
        return self.loss_path

    def _keep_full_path(self, reason: str) -> bool:
        warn(f"{type(self.hf_model()).__name__}: {reason}; training uses the full-logits path (train.loss_path full)")
        self.loss_path = "full"
        return False

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0) -> torch.Tensor:
        """Generation with the KV cache (left-padded rows); returns only the new tokens. Temperature 0 is greedy;
        above 0 it samples from the tokens of the top_p probability mass (no top-k cut), seeded by torch's RNG."""
        sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0
                    else {"do_sample": False})
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **sampling,
        )
        return out[:, input_ids.size(1):]

    # -- hooks the loop calls ------------------------------------------------------------------
    def prepare(self, train_samples: list, val_samples: list, device: torch.device, planned: Optional[list] = None,
                time_budget_s: Optional[float] = None) -> None:
        """Called once before training with the tokenised data (the Skip-Cache build uses it). `planned`: the
        training samples the run's steps will use, in order of first use (None: all); `time_budget_s`: the
        run's training-time budget, which preparation counts against."""

    def prepare_notes(self) -> list[str]:
        """Lines for the console about what prepare() decided (blocks chosen, cache built); none by default."""
        return []

    def on_epoch_start(self, epoch: int) -> None:
        """Called when the data stream enters a new epoch (a disk Skip-Cache flushes here)."""

    # -- measurements the benchmark and run.json read -----------------------------------------
    def cache_stats(self) -> Optional[dict]:
        """Skip-Cache statistics (hits, misses, samples, size), None for methods without a cache."""
        return None

    def forward_parts_s(self) -> dict[str, float]:
        """Seconds spent so far in the named parts of the training forward (empty when not split)."""
        return {}

    def cache_paused(self) -> AbstractContextManager:
        """While active, batches neither read nor fill a cache (the benchmark's untimed warm-up uses it)."""
        return nullcontext()

    def head_floor_ms(self, batches: list[dict], iters: int) -> Optional[float]:
        """Mean ms of the head and loss alone over the loss positions, where the method can isolate them."""
        return None

    def summary_extras(self) -> dict:
        """Method-specific figures for run.json."""
        return {}

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write the fine-tuned result in the format users of this method know."""
        raise NotImplementedError
