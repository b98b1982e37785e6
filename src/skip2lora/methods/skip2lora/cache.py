"""Skip-Cache: the frozen trunk's features per sample, computed once and reused in later epochs.

Only the positions that carry loss are kept (one per sample for classification, the response tokens
for generation). Keys are content-addressed: the run key hashes the base weights, the tokenizer, the
dtype and max_seq_length and names the store; within it a sample's key is the hash of its token ids
(`TokenizedSample.content_hash`, computed once at tokenisation). Any change gives a miss, never stale
features. Each entry records which blocks its features hold, so one store serves every block choice:
a lookup hits when the entry holds every block the caller needs (features surveyed for all blocks by
`skip2lora blocks` serve a later run on any subset) and returns those rows only. On disk, shards are
safetensors files written atomically with a checksum; a damaged shard is reported in one warning line,
dropped, and its samples are rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save

from ... import paths
from ...errors import UserError, os_user_error, warn
from ...precision import BF16

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: entries record their blocks (the run key no longer names them)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def feature_dtype_name(cache_dtype: str, precision: str) -> str:
    """The dtype trunk features are kept in: skip2lora.cache_dtype, or for auto the run's precision (bf16 under
    either bf16 precision: half the RAM and disk of fp32, and no finer than the forward that made them)."""
    if cache_dtype != "auto":
        return cache_dtype
    return "bfloat16" if precision in BF16 else "float32"


@dataclass
class CachedFeatures:
    """One sample's trunk features at its loss positions."""

    blocks: torch.Tensor  # [n_blocks, P, d]
    final: torch.Tensor  # [P, d]
    targets: torch.Tensor  # [P]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.blocks, self.final, self.targets))


def run_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]


def _checksum(tensors: dict[str, torch.Tensor], blocks_json: str = "") -> str:
    digest = hashlib.sha1(blocks_json.encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SkipCache:
    """RAM or disk store of CachedFeatures, with hit/miss/size statistics."""

    def __init__(
        self,
        mode: str,
        fingerprint: dict,
        dtype: str = "float32",
        directory: Optional[Path] = None,
        budget_mb: Optional[float] = None,
        shard_samples: int = 256,
        block_indices: Optional[Sequence[int]] = None,
    ) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"cache mode must be memory or disk, got {mode}")
        self.mode = mode
        self.fingerprint = {**fingerprint, "cache_dtype": dtype, "format": FORMAT_VERSION}
        self.key = run_key(self.fingerprint)
        self.dtype = DTYPES[dtype]
        self.budget_bytes = None if budget_mb is None else int(budget_mb * 1024 * 1024)
        self.budget_mb = budget_mb
        self.hits = self.misses = 0
        self.bytes = 0
        self.full = False
        self.build_time_s = 0.0
        self._memory: dict[str, CachedFeatures] = {}
        self._pending: dict[str, CachedFeatures] = {}
        self._index: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        # Per key: the blocks its features hold, in row order (None: unrecorded, served as stored).
        self._blocks_of: dict[str, Optional[tuple[int, ...]]] = {}
        self._sizes: dict[str, int] = {}
        self.block_indices: Optional[list[int]] = None if block_indices is None else list(block_indices)
        """The blocks a lookup returns, in this order; set it again to serve another block choice."""
        self.shard_samples = shard_samples
        self.directory: Optional[Path] = None
        if mode == "disk":
            if directory is None:
                raise ValueError("a disk cache needs a directory")
            self.directory = Path(directory) / self.key
            if Path(directory).exists() and not Path(directory).is_dir():
                raise UserError(f"skip2lora.cache_dir {directory} is a file: point it at a folder")
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                paths.atomic_write_json(self.directory / "manifest.json", self.fingerprint)
            except OSError as exc:  # checked before training starts: unwritable, read-only, a file in the way
                raise os_user_error(exc, f"cannot use skip2lora.cache_dir {directory}") from exc
            self._load_index()

    # -- reads -----------------------------------------------------------------------------
    def get(self, key: str) -> Optional[CachedFeatures]:
        """The sample's features for `block_indices`, or None (a miss) when it is not stored for all of them."""
        found = None
        if key in self:
            found = self._memory.get(key) or self._pending.get(key)
            if found is None:
                found = self._read_from_shard(key)
            found = self._narrowed(found, self._blocks_of.get(key))
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def __contains__(self, key: str) -> bool:
        """Whether the sample is stored with every block a lookup needs."""
        if key not in self._memory and key not in self._pending and key not in self._index:
            return False
        stored = self._blocks_of.get(key)
        return stored is None or self.block_indices is None or set(self.block_indices) <= set(stored)

    def _narrowed(self, features: CachedFeatures, stored: Optional[tuple[int, ...]]) -> CachedFeatures:
        """The rows of the needed blocks, in their order (the stored tensor itself when it is exactly those)."""
        if stored is None or self.block_indices is None or list(stored) == self.block_indices:
            return features
        rows = torch.tensor([stored.index(b) for b in self.block_indices])
        return CachedFeatures(features.blocks.index_select(0, rows), features.final, features.targets)

    def use_blocks(self, block_indices: Sequence[int]) -> None:
        """Serve these blocks from now on. In RAM, every entry keeps only their rows: nothing else will read the
        others (a disk store keeps them all, for later runs on other blocks)."""
        self.block_indices = list(block_indices)
        if self.mode != "memory":
            return
        for key, features in self._memory.items():
            if key in self:
                self._memory[key] = self._narrowed(features, self._blocks_of.get(key))
                self._blocks_of[key] = tuple(self.block_indices)
                size = self._memory[key].nbytes()
                self.bytes += size - self._sizes[key]
                self._sizes[key] = size

    def __len__(self) -> int:
        return len(self._sizes)  # every stored sample once, wherever it lives

    # -- writes ----------------------------------------------------------------------------
    def put(self, key: str, features: CachedFeatures, block_indices: Optional[Sequence[int]] = None) -> bool:
        """Store a sample's features, whose block rows are `block_indices` (default: this cache's own);
        False once the size budget is reached (the sample stays uncached)."""
        blocks = block_indices if block_indices is not None else self.block_indices
        if blocks is not None and len(blocks) != features.blocks.size(0):
            raise ValueError(f"features hold {features.blocks.size(0)} blocks, not the {len(blocks)} named")
        stored = CachedFeatures(
            features.blocks.detach().to("cpu", self.dtype).contiguous(),
            features.final.detach().to("cpu", self.dtype).contiguous(),
            features.targets.detach().to("cpu", torch.int64).contiguous(),
        )
        size = stored.nbytes()
        if self.budget_bytes is not None and self.bytes + size > self.budget_bytes:
            if not self.full:
                self.full = True
                warn(f"skip-cache budget of {self.budget_mb:g} MB reached after {len(self)} samples: "
                     "later samples run the trunk every step; raise skip2lora.cache_budget_mb or use "
                     "--skip2lora.cache disk")
            return False
        self.bytes += size - self._sizes.get(key, 0)  # a sample stored again (with other blocks) replaces itself
        self._sizes[key] = size
        self._blocks_of[key] = None if blocks is None else tuple(int(b) for b in blocks)
        if self.mode == "memory":
            self._memory[key] = stored
        else:
            self._pending[key] = stored
            if len(self._pending) >= self.shard_samples:
                self.flush()
        return True

    def flush(self) -> None:
        """Write pending samples to a new shard (atomic: a killed run leaves no partial shard)."""
        if self.mode != "disk" or not self._pending:
            return
        tensors: dict[str, torch.Tensor] = {}
        for key, feats in self._pending.items():
            tensors[f"{key}.blocks"] = feats.blocks
            tensors[f"{key}.final"] = feats.final
            tensors[f"{key}.targets"] = feats.targets
        blocks_json = json.dumps({key: self._blocks_of.get(key) for key in self._pending})
        metadata = {"keys": json.dumps(list(self._pending)), "blocks": blocks_json,
                    "checksum": _checksum(tensors, blocks_json)}
        shard = self.directory / f"shard-{os.getpid()}-{len(list(self.directory.glob('shard-*'))):06d}.safetensors"
        try:
            paths.atomic_write_bytes(shard, save(tensors, metadata=metadata))
        except OSError as exc:  # a full or read-only disk: the shards written before stay whole
            raise os_user_error(exc, f"could not write skip-cache shard {shard}") from exc
        for key in self._pending:
            self._index[key] = shard
        self._pending = {}

    # -- disk internals --------------------------------------------------------------------
    def _load_index(self) -> None:
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            try:
                with safe_open(str(shard), "pt") as handle:
                    metadata = handle.metadata() or {}
                    keys = json.loads(metadata["keys"])
                    blocks_json = metadata["blocks"]
                    tensors = {name: handle.get_tensor(name) for name in handle.keys()}
                if _checksum(tensors, blocks_json) != metadata["checksum"]:
                    raise ValueError("checksum mismatch")
            except Exception as exc:  # any damage: truncated file, bad header, flipped bytes
                reason = " ".join(str(exc).split())[:120] or type(exc).__name__
                warn(f"skip-cache shard {shard} is damaged ({reason}); it is removed and its samples rebuilt")
                shard.unlink(missing_ok=True)
                continue
            blocks_of = json.loads(blocks_json)
            for key in keys:
                stored = None if blocks_of.get(key) is None else tuple(blocks_of[key])
                if key in self._index and len(self._blocks_of.get(key) or ()) > len(stored or ()):
                    continue  # stored twice: keep the copy that holds more blocks
                self._index[key] = shard
                self._blocks_of[key] = stored
                size = sum(tensors[f"{key}.{part}"].numel() * tensors[f"{key}.{part}"].element_size()
                           for part in ("blocks", "final", "targets"))
                self.bytes += size - self._sizes.get(key, 0)  # a later shard's copy replaces an earlier one
                self._sizes[key] = size

    def _read_from_shard(self, key: str) -> Optional[CachedFeatures]:
        shard = self._index[key]
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(shard), "pt")  # memory-mapped
        return CachedFeatures(handle.get_tensor(f"{key}.blocks"), handle.get_tensor(f"{key}.final"),
                              handle.get_tensor(f"{key}.targets"))

    # -- report ----------------------------------------------------------------------------
    def stats(self) -> dict:
        lookups = self.hits + self.misses
        return {
            "cache_mode": self.mode,
            "cache_samples": len(self),
            "cache_size_mb": self.bytes / 2**20,
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_hit_rate": self.hits / lookups if lookups else None,
            "cache_build_s": self.build_time_s,
            "cache_budget_reached": self.full,
        }


def fill_cache(cache: SkipCache, samples: list, computed: Callable[[list], Iterator[tuple[Any, CachedFeatures]]],
               window: int, deadline: Optional[float], batch_size: int) -> tuple[int, int, Optional[str]]:
    """Put the samples' features into the cache, `window` samples at a time (`computed(chunk)` yields
    (sample, features)), with a progress bar; stop early at the cache budget, or before a window once
    time.perf_counter() passes `deadline`. Returns (samples cached, their tokens, "cache_budget_mb" /
    "max_time_s" / None for what stopped it). The cache is flushed either way."""
    from tqdm.auto import tqdm

    built, tokens, stopped_by = 0, 0, None
    with tqdm(total=len(samples), desc="skip-cache build", unit="sample", leave=False, dynamic_ncols=True,
              disable=len(samples) < 4 * batch_size) as bar:
        for first in range(0, len(samples), max(1, window)):
            if deadline is not None and time.perf_counter() >= deadline:
                stopped_by = "max_time_s"
                break
            for sample, feats in computed(samples[first:first + window]):
                if not cache.put(sample.content_hash, feats):
                    stopped_by = "cache_budget_mb"  # the rest run the trunk each step
                    break
                built, tokens = built + 1, tokens + len(sample.input_ids)
                bar.update(1)
            if stopped_by:
                break
    cache.flush()
    return built, tokens, stopped_by
