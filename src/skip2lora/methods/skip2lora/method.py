"""Skip2-LoRA: low-rank adapters from intermediate blocks straight to the last layer.

The trunk is frozen, runs in eval mode and never builds an autograd graph; the gradient reaches only
the adapters (and a new classification head) through the frozen output head. Since the trunk's
features never change, the Skip-Cache keeps them per sample and later epochs skip the trunk.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ...config import FinetuneConfig, Skip2LoRAConfig
from ...env import synchronize
from ...errors import UserError
from ...models import ModelInfo, weights_fingerprint
from ...paths import cache_root
from ..base import FinetuneMethod, register_method
from .adapter_config import ADAPTER_WEIGHTS, Skip2LoRAAdapterConfig
from .adapters import SkipAdapterBank, validate_layer_indices
from .block_selection import BlockSelection
from .cache import DTYPES, CachedFeatures, SkipCache, feature_dtype_name
from ..output_head import check_reproduces_model
from ..head_loss import head_ce_sum
from .trunk import CausalLMTrunk
from .block_choice import BlockChoice
from .prebuild import CachePrebuild



def full_precision(device: torch.device):
    """Autocast off: the adapters and the head run in fp32 under bf16-mixed. An adapter's correction starts far
    below bf16's resolution of the hidden state it is added to, so a bf16 head would not see it in the loss."""
    return torch.autocast(device.type, enabled=False)


def loss_positions(batch: dict, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample: the positions whose output carries loss, and the targets there.

    Generation: position p predicts token p+1, so p is kept where labels[p+1] != -100.
    Classification: the last real token, whose features summarise the sequence.
    """
    result = []
    if kind == "classification":
        last = batch["attention_mask"].sum(dim=1) - 1
        for row in range(last.size(0)):
            result.append((last[row:row + 1], batch["class_labels"][row:row + 1]))
        return result
    next_labels = batch["labels"][:, 1:]
    for row in range(next_labels.size(0)):
        positions = (next_labels[row] != -100).nonzero(as_tuple=True)[0]
        result.append((positions, next_labels[row, positions]))
    return result


@register_method("skip2lora")
class Skip2LoRAMethod(CachePrebuild, BlockChoice, FinetuneMethod):

    probe_lr: float = 1e-3
    """Learning rate of the generation block probes; create() sets the run's own train.lr."""

    def __init__(self, model: nn.Module, tokenizer, kind: str, cfg: Skip2LoRAConfig, info: ModelInfo,
                 num_labels: Optional[int] = None, seed: int = 0,
                 max_seq_length: Optional[int] = None, precision: str = "32-true") -> None:
        super().__init__(model, tokenizer, kind)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self.cfg = cfg
        self.info = info
        self.seed = seed
        # auto: every block is hooked until prepare() has chosen some (select_blocks, then use_blocks).
        self.blocks_pending = cfg.block_indices == "auto"
        wanted = list(range(info.num_layers)) if self.blocks_pending else cfg.block_indices
        self.block_indices = validate_layer_indices(wanted, info.num_layers)
        self.trunk = CausalLMTrunk(model, self.block_indices)
        if kind == "generation":  # a classifier's head is new: only generation must match the model's logits
            check_reproduces_model(model, self.trunk.features, self.trunk.head, info.vocab_size)
        # bf16-mixed: the frozen trunk's forward (the cache build, and misses) runs under bf16 autocast; its
        # features are kept in bf16 whether cached or not, so a cache hit returns exactly what a miss computes.
        self.precision = precision
        self.trunk_autocast = torch.bfloat16 if precision == "bf16-mixed" else None
        self.trunk.autocast_dtype = self.trunk_autocast
        self.feature_dtype_name = feature_dtype_name(cfg.cache_dtype, precision)
        self.feature_dtype = DTYPES[self.feature_dtype_name]
        if kind == "classification" and not num_labels:
            raise UserError("classification with skip2lora needs the number of labels")
        self.output_mode = "logits" if (cfg.output == "logits" and kind == "generation") else "hidden"
        self.num_labels = num_labels
        self.class_head: Optional[nn.Linear] = None
        self._build_trainable()
        self.selection: Optional[BlockSelection] = None
        self.pooling = cfg.pooling if kind == "classification" else "last"
        self.max_seq_length = max_seq_length
        self.cache: Optional[SkipCache] = None
        if cfg.cache != "none":
            self.cache = SkipCache(
                cfg.cache, self.cache_fingerprint(), self.feature_dtype_name,
                directory=cfg.cache_dir or (cache_root() / "skip-cache"), budget_mb=cfg.cache_budget_mb,
                block_indices=self.block_indices,
            )
        self.trunk_time_s = 0.0
        self.parts_s: dict[str, float] = {}
        self.shared_prefix_tokens = 0
        self.prebuild: Optional[dict] = None
        self._prefix_reuse_ok: Optional[bool] = None

    def _build_trainable(self) -> None:
        """Fresh adapters for the current blocks (and a fresh class head), seeded as at construction: blocks
        chosen by auto start from exactly the weights a run that listed them would."""
        device = next(self.model.parameters()).device
        info, cfg = self.info, self.cfg
        out_features = info.vocab_size if self.output_mode == "logits" else info.hidden_size
        torch.manual_seed(self.seed)
        self.adapters = SkipAdapterBank(
            self.block_indices, info.hidden_size, out_features, cfg.r, cfg.alpha, cfg.dropout, cfg.input_norm
        ).to(device)
        if self.kind == "classification":
            self.class_head = nn.Linear(info.hidden_size, self.num_labels).to(device)
            nn.init.normal_(self.class_head.weight, std=0.02)
            nn.init.zeros_(self.class_head.bias)

    # -- identity of the features, for the cache key ------------------------------------------
    def cache_fingerprint(self) -> dict:
        if self.info.weights_fingerprint is None:
            # A hash of the weights' bytes as loaded, never a memo keyed on file names or times: features
            # computed from other weights must miss, however the weights file was changed.
            self.info.weights_fingerprint = weights_fingerprint(self.model)
        tokenizer = None  # the Python API may run without one: its keys hash the token ids themselves
        if self.tokenizer is not None:
            vocab = self.tokenizer.get_vocab()
            # A sample of the vocabulary: cheap to hash, and any retrained tokenizer changes it.
            tokenizer_hash = json.dumps(sorted(vocab.items())[:: max(1, len(vocab) // 2048)])
            tokenizer = hashlib.sha1(tokenizer_hash.encode()).hexdigest()[:16] + f":{len(vocab)}"
        return {
            "weights": self.info.weights_fingerprint,
            "model_dtype": str(next(self.model.parameters()).dtype),
            "precision": self.precision,  # features of a bf16 forward never serve an fp32 run, nor the reverse
            "tokenizer": tokenizer,
            # No block list: every entry records its own blocks, so one store serves every block choice.
            "kind": self.kind,
            "pooling": self.pooling,
            "max_seq_length": self.max_seq_length,
        }

    @classmethod
    def load_options(cls, cfg: FinetuneConfig, kind: str) -> dict:
        # The trunk is always the causal LM: a classifier's head is new and lives beside the adapters.
        return {"task": "generation", "quantize_4bit": cfg.skip2lora.quantize_trunk}

    @classmethod
    def four_bit_setting(cls, cfg: FinetuneConfig) -> Optional[str]:
        return "skip2lora.quantize_trunk" if cfg.skip2lora.quantize_trunk else None

    @classmethod
    def multi_device_refusal(cls, cfg: FinetuneConfig, world: int) -> Optional[str]:
        if cfg.skip2lora.block_indices == "auto":
            # Each rank sees its own share of the data, so each could choose other blocks than the rest.
            return (f"skip2lora.block_indices auto chooses blocks in one process, not {world}: run `skip2lora "
                    "blocks CONFIG.yaml` first and pass the block_indices it prints")
        return None

    @classmethod
    def create(cls, model: nn.Module, tokenizer: Any, info: ModelInfo, cfg: FinetuneConfig, kind: str,
               num_labels: Optional[int]) -> "Skip2LoRAMethod":
        method = cls(model, tokenizer, kind, cfg.skip2lora, info, num_labels=num_labels, seed=cfg.seed,
                     max_seq_length=cfg.data.max_seq_length,
                     precision=cfg.precision if cfg.precision != "auto" else "32-true")
        method.probe_lr = cfg.train.lr  # block probes (generation) train at the run's own learning rate
        if not method.blocks_pending:
            cfg.skip2lora.block_indices = list(method.block_indices)  # run.json records them resolved (-1 -> N-1)
        return method

    def trainable_settings(self) -> dict:
        settings = {"task": self.kind, "skip2lora.block_indices": self.block_indices, "skip2lora.r": self.cfg.r,
                    "skip2lora.alpha": self.cfg.alpha, "skip2lora.input_norm": self.cfg.input_norm,
                    "skip2lora.output": self.output_mode, "skip2lora.pooling": self.pooling}
        if self.blocks_pending:  # chosen in prepare(), after a resume's check: the tensor names are checked then
            del settings["skip2lora.block_indices"]
        return settings

    # -- what trains -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Skip2LoRAMethod":
        super().train(mode)
        self.model.eval()  # the trunk stays deterministic: that is what makes its features cacheable
        return self

    def adapter_parameter_count(self) -> int:
        return sum(p.numel() for p in self.adapters.parameters())

    # -- features ----------------------------------------------------------------------------
    def _trunk_features(self, batch: dict, rows: list[int], prefix: Optional[tuple[int, object]] = None
                        ) -> list[CachedFeatures]:
        """Run the frozen trunk on some rows of a batch; keep only their loss positions.

        `prefix` = (length, key/value state) of a prompt prefix all these rows start with: only what
        follows it runs through the trunk (every loss position lies after it).
        """
        started = time.perf_counter()
        input_ids = batch["input_ids"][rows]
        attention_mask = batch["attention_mask"][rows]
        width = int(attention_mask.sum(dim=1).max())
        skip, state = prefix if prefix is not None else (0, None)
        blocks, final = self.trunk.features(input_ids[:, skip:width], attention_mask[:, skip:width], state)
        sub_batch = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if self.pooling == "mean":
            result = self._mean_pooled(blocks, final, sub_batch)
        else:
            result = []
            for local, (positions, targets) in enumerate(loss_positions(sub_batch, self.kind)):
                kept = positions - skip  # the trunk saw only what follows the shared prefix
                result.append(CachedFeatures(blocks=torch.stack([blocks[k][local, kept] for k in self.block_indices]),
                                             final=final[local, kept], targets=targets))
        self.trunk_time_s += time.perf_counter() - started
        # Rounded to the feature dtype here, not only on storing: cached and uncached steps see the same values.
        return [CachedFeatures(f.blocks.to(self.feature_dtype), f.final.to(self.feature_dtype), f.targets)
                for f in result]

    def _mean_pooled(self, blocks: dict, final: torch.Tensor, batch: dict) -> list[CachedFeatures]:
        """Per sample, one feature row per block (and final): the mean over its real tokens."""
        width = final.size(1)
        mask = batch["attention_mask"][:, :width].unsqueeze(-1).to(final.dtype)
        counts = mask.sum(dim=1).clamp(min=1)
        pooled = {k: (blocks[k] * mask).sum(dim=1) / counts for k in self.block_indices}
        pooled_final = (final * mask).sum(dim=1) / counts
        return [CachedFeatures(blocks=torch.stack([pooled[k][row:row + 1] for k in self.block_indices]),
                               final=pooled_final[row:row + 1], targets=batch["class_labels"][row:row + 1])
                for row in range(final.size(0))]

    def batch_features(self, batch: dict) -> CachedFeatures:
        """All loss positions of the batch, from the cache where seen before, else from the trunk."""
        rows = batch["input_ids"].size(0)
        per_sample: list[Optional[CachedFeatures]] = [None] * rows
        keys: list[Optional[str]] = [None] * rows
        if self.cache is not None:
            # Keys were hashed once per sample at tokenisation: no device read, no hashing per step.
            keys = list(batch["content_hashes"])
            per_sample = [self.cache.get(key) for key in keys]
        missing = [row for row in range(rows) if per_sample[row] is None]
        if missing:
            started = time.perf_counter()
            for row, feats in zip(missing, self._trunk_features(batch, missing)):
                per_sample[row] = feats
                if self.cache is not None:
                    self.cache.put(keys[row], feats)
            if self.cache is not None:
                self.cache.build_time_s += time.perf_counter() - started
        device = batch["input_ids"].device
        return CachedFeatures(
            blocks=torch.cat([f.blocks for f in per_sample], dim=1).to(device, torch.float32),
            final=torch.cat([f.final for f in per_sample], dim=0).to(device, torch.float32),
            targets=torch.cat([f.targets for f in per_sample], dim=0).to(device),
        )

    def corrected(self, feats: CachedFeatures) -> torch.Tensor:
        """The adapters' summed correction for the features' positions."""
        return self.adapters({k: feats.blocks[i] for i, k in enumerate(self.block_indices)})

    # -- forward and loss --------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        device = batch["input_ids"].device
        mark = time.perf_counter()
        feats = self.batch_features(batch)
        mark = self._lap("features", mark, device)
        count = int(feats.targets.numel())
        with full_precision(device):
            correction = self.corrected(feats)
            mark = self._lap("adapters", mark, device)
            if self.kind == "classification":
                logits = self.class_head(feats.final + correction)
                loss = F.cross_entropy(logits.float(), feats.targets, reduction="sum")
            else:
                loss = self._loss_sum(feats.final, correction, feats.targets)
        self._lap("head_loss", mark, device)
        return loss, count

    def _loss_sum(self, final: torch.Tensor, correction: Optional[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """Generation: summed cross-entropy of the frozen head given the adapters' correction (None: none)."""
        if self.output_mode == "logits":
            with torch.no_grad():
                base_logits = self.trunk.head(final)
            logits = base_logits if correction is None else base_logits + correction
            return F.cross_entropy(logits, targets, reduction="sum")
        return head_ce_sum(final if correction is None else final + correction, self.trunk.head, targets)

    def _lap(self, name: str, mark: float, device: torch.device) -> float:
        """Accumulate the forward's parts (features = cache lookups + trunk on misses) when timing is on."""
        if self.time_parts and self.training:
            synchronize(device)
            now = time.perf_counter()
            self.parts_s[name] = self.parts_s.get(name, 0.0) + now - mark
            return now
        return mark

    def forward_parts_s(self) -> dict[str, float]:
        return dict(self.parts_s)

    @contextmanager
    def cache_paused(self) -> Iterator[None]:
        cache, self.cache = self.cache, None
        try:
            yield
        finally:
            self.cache = cache

    def head_floor_ms(self, batches: list[dict], iters: int) -> Optional[float]:
        """The floor under a cached step: the frozen head and its loss over the loss positions alone (forward
        and the gradient to its input, chunked as training does it), with the features already at hand."""
        if self.cache is None or self.kind != "generation":
            return None
        seconds = []
        for i in range(iters):
            with torch.no_grad():
                feats = self.batch_features(batches[i % len(batches)])
            hidden = feats.final.detach().clone().requires_grad_(True)
            started = time.perf_counter()
            head_ce_sum(hidden, self.trunk.head, feats.targets).backward()
            seconds.append(time.perf_counter() - started)
        return 1000.0 * sum(seconds) / len(seconds)

    def cache_stats(self) -> Optional[dict]:
        if self.cache is None:
            return None
        self.cache.flush()
        return self.cache.stats()

    def classify(self, batch: dict) -> torch.Tensor:
        feats = self.batch_features(batch)
        with full_precision(feats.final.device):
            return self.class_head(feats.final + self.corrected(feats))

    def _live_correction(self, captured: dict, positions: int) -> torch.Tensor:
        return self.adapters({k: captured[k][:, -positions:, :] for k in self.block_indices})

    def corrections_applied(self) -> AbstractContextManager:
        """While active, the model's own forward (and so its generate()) gives base + adapters: a hook adds the
        adapters' correction at the head (or to the logits), computed from the blocks the trunk's hooks capture."""
        hook = self.trunk.logits_correction if self.output_mode == "logits" else self.trunk.head_correction
        return hook(self._live_correction)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0) -> torch.Tensor:
        """Base + adapters with the model's own KV-cached generate(): hooks add the correction at the head."""
        if self.kind != "generation":
            raise UserError("this Skip2-LoRA checkpoint is a classifier: use `skip2lora predict`")
        with self.corrections_applied():
            return super().generate(input_ids, attention_mask, max_new_tokens, temperature, top_p)

    # -- persistence -------------------------------------------------------------------------
    def adapter_config(self) -> Skip2LoRAAdapterConfig:
        return Skip2LoRAAdapterConfig(
            base_model_name_or_path=self.info.path, base_model_name=self.info.name, task=self.kind,
            num_labels=self.num_labels, block_indices=self.block_indices, r=self.cfg.r, alpha=self.cfg.alpha,
            dropout=self.cfg.dropout, input_norm=self.cfg.input_norm, pooling=self.pooling,
            output=self.output_mode, hidden_size=self.info.hidden_size, vocab_size=self.info.vocab_size,
        )

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.named_trainable_parameters().items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        self.adapter_config().write(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    def head_path(self) -> str:
        return "fast"  # the frozen head always runs only at the loss positions, chunked (head_loss)

    def summary_extras(self) -> dict:
        extras = {"trunk_forward_s": self.trunk_time_s, "block_indices": self.block_indices,
                  "forward_parts_s": self.forward_parts_s(), "shared_prefix_tokens": self.shared_prefix_tokens,
                  "feature_dtype": self.feature_dtype_name,
                  "cache_prebuild": self.prebuild,
                  "block_selection": self.selection.as_dict() if self.selection is not None else None}
        extras.update(self.cache_stats() or {})
        return extras

    def on_epoch_start(self, epoch: int) -> None:
        if self.cache is not None:
            self.cache.flush()


def load_skip2lora(checkpoint: Path, device: torch.device, base_model: Optional[str] = None) -> Skip2LoRAMethod:
    """Base model + saved Skip2-LoRA adapters (and classification head), ready for inference."""
    from ...models import load_base_model

    config = Skip2LoRAAdapterConfig.read(Path(checkpoint))
    model, tokenizer, info = load_base_model(base_model or config.base_model_name_or_path, device=str(device))
    return restore_skip2lora(model, tokenizer, info, checkpoint)


def restore_skip2lora(model: nn.Module, tokenizer: Any, info: ModelInfo, checkpoint: Path,
                      cfg: Optional[Skip2LoRAConfig] = None) -> Skip2LoRAMethod:
    """Saved adapters (and classification head) on a loaded base model: `skip2lora generate` and the Python API's
    from_pretrained both come through here. `cfg` replaces the saved settings that do not shape the tensors
    (the cache, for further training); it must name the saved blocks."""
    config = Skip2LoRAAdapterConfig.read(Path(checkpoint))
    for param in model.parameters():
        param.requires_grad_(False)
    method = Skip2LoRAMethod(model, tokenizer, config.task, cfg or config.method_config(), info,
                             num_labels=config.num_labels)
    weights = Path(checkpoint) / ADAPTER_WEIGHTS
    try:
        state = load_file(str(weights))
    except Exception as exc:  # missing, truncated or damaged: safetensors raises its own error types
        raise UserError(f"could not read the adapter weights {weights}: {' '.join(str(exc).split())[:200]}") from exc
    method.load_trainable_state_dict(state)
    method.eval()
    return method
