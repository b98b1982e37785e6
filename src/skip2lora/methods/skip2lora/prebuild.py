"""The Skip-Cache prebuild of Skip2LoRAMethod (a mixin): before training, one no-grad pass of the frozen trunk
over the samples the run will use, longest first in batches, a prompt prefix every sample shares run once."""

from __future__ import annotations

import time
from typing import Any, Iterator, Optional

import torch

from ..output_head import TOLERANCE, probe_ids
from .cache import CachedFeatures, fill_cache

# A prompt prefix shared by every sample of a cache build is computed once when at least this long.
MIN_SHARED_PREFIX = 4


class CachePrebuild:
    """prepare() and its helpers; the attributes they read (cfg, cache, trunk, kind, ...) are Skip2LoRAMethod's."""

    def prepare(self, train_samples: list, val_samples: list, device: torch.device, planned: Optional[list] = None,
                time_budget_s: Optional[float] = None) -> None:
        """With block_indices auto, choose the blocks first (select_blocks: its features land in the cache).
        Then prebuild the cache of the samples the run will use (`planned`; None: every training sample) in one
        no-grad pass; a sample outside it is cached on first sight. Validation features are cached on first
        sight during evaluation, whose cost is not training time for any method."""
        started = time.perf_counter()
        if self.blocks_pending:
            self.selection = self.select_blocks(train_samples, device)
            self.use_blocks(self.selection.chosen)
        if self.cache is None or not self.cfg.cache_prebuild:
            return
        build_started = time.perf_counter()
        wanted = train_samples if planned is None else planned
        pending = [s for s in wanted if s.content_hash not in self.cache]
        # Without a time budget: one window, longest first overall (the least padding). With one: windows in order
        # of first use, so a budget spent mid-build leaves the first steps' samples cached and the rest to later.
        window = len(pending) if time_budget_s is None else 8 * self.cfg.cache_build_batch_size
        deadline = None if time_budget_s is None else started + time_budget_s
        built, tokens, stopped_by = fill_cache(self.cache, pending, lambda chunk: self._computed(chunk, device),
                                               window, deadline, self.cfg.cache_build_batch_size)
        elapsed = time.perf_counter() - build_started
        self.cache.build_time_s += elapsed
        # The prebuild alone (not the features cached later on first sight), to hold against inference speed.
        self.prebuild = {"samples": built, "planned_samples": len(wanted), "already_cached": len(wanted) - len(pending),
                         "train_samples": len(train_samples), "stopped_by": stopped_by, "tokens": tokens,
                         "seconds": elapsed, "tokens_per_s": tokens / elapsed if elapsed > 0 else None}

    def prepare_notes(self) -> list[str]:
        notes = [self.selection.describe()] if self.selection is not None else []
        if self.prebuild is not None:
            built = self.prebuild
            why = {"max_time_s": "; the time budget ran out, the rest are cached on first use",
                   "cache_budget_mb": "; the cache budget is full"}.get(built["stopped_by"] or "", "")
            found = f", {built['already_cached']:,} were cached already" if built["already_cached"] else ""
            notes.append(f"skip-cache: the run's steps use {built['planned_samples']:,} of {built['train_samples']:,} "
                         f"training samples{found}; prebuilt {built['samples']:,} in {built['seconds']:.1f}s{why}")
        return notes

    def _computed(self, samples: list, device: torch.device) -> Iterator[tuple[Any, CachedFeatures]]:
        """(sample, its trunk features) for every sample: longest first in batches of cache_build_batch_size
        (similar lengths together: little padding), a prompt prefix they all share run once."""
        from ...data import collate

        ordered = sorted(samples, key=lambda s: len(s.input_ids), reverse=True)
        prefix = self._shared_prefix(ordered, device)
        size = max(1, self.cfg.cache_build_batch_size)
        for start in range(0, len(ordered), size):
            chunk = ordered[start:start + size]
            batch = collate(chunk, getattr(self.tokenizer, "pad_token_id", None) or 0)  # padding is masked: any id
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            yield from zip(chunk, self._trunk_features(batch, list(range(len(chunk))), prefix))

    def _shared_prefix(self, samples: list, device: torch.device) -> Optional[tuple[int, object]]:
        """(length, key/value state) of the longest token prefix that every sample shares and that ends
        before each sample's first loss position, when it is long enough to be worth computing once."""
        # Mean pooling needs every position's features, the prefix's too: no sharing there.
        if not samples or not self.cfg.share_prefix or self.pooling == "mean" or not self._prefix_reuse_exact():
            return None
        first = samples[0].input_ids
        length = min(len(s.input_ids) for s in samples) - 1  # at least one position must follow it
        for sample in samples[1:]:
            same = 0
            while same < length and sample.input_ids[same] == first[same]:
                same += 1
            length = same
        if self.kind == "generation":
            length = min([length] + [s.prompt_length - 1 for s in samples])
        self.shared_prefix_tokens = max(length, 0)
        if length < MIN_SHARED_PREFIX:
            return None
        prefix_ids = torch.tensor([first[:length]], dtype=torch.long, device=device)
        return length, self.trunk.prefix_state(prefix_ids)

    def _prefix_reuse_exact(self) -> bool:
        """Checked once on a probe: reusing a prefix's keys and values gives the features of a full pass."""
        if self._prefix_reuse_ok is None:
            ids = probe_ids(self.info.vocab_size).to(next(self.model.parameters()).device)
            dtype = self.trunk_autocast or next(self.model.parameters()).dtype
            tolerance = TOLERANCE.get(dtype, 2e-2)
            self._prefix_reuse_ok = self.trunk.prefix_reuse_is_exact(ids, MIN_SHARED_PREFIX, tolerance)
        return self._prefix_reuse_ok
