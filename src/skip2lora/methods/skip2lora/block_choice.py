"""Choosing the blocks Skip2LoRAMethod taps (block_indices auto, `skip2lora blocks`), as a mixin: survey every
block's features through the Skip-Cache, probe each block, choose a few greedily (block_selection.py)."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ...errors import UserError
from .adapters import SkipAdapterBank, validate_layer_indices
from .block_probes import AdapterProbe, RidgeProbe, SurveyedFeatures
from .block_selection import BlockSelection, probe_sample, selection_from_probe
from .cache import CachedFeatures
from .trunk import CausalLMTrunk


class BlockChoice:
    """select_blocks() and use_blocks(); the attributes they read (cfg, info, cache, seed, ...) are
    Skip2LoRAMethod's."""

    def select_blocks(self, train_samples: list, device: torch.device) -> BlockSelection:
        """Survey every block's features on a sample of the training data (through the Skip-Cache), probe
        each block, and choose a few greedily (block_selection.py). The method keeps every block hooked."""
        if not self.blocks_pending:
            raise RuntimeError("select_blocks needs a method built with block_indices auto")
        cfg, started = self.cfg, time.perf_counter()
        if cfg.select_max_blocks > self.info.num_layers:
            raise UserError(f"skip2lora.select_max_blocks {cfg.select_max_blocks} exceeds the {self.info.num_layers} "
                            f"blocks of {self.info.name}: choose at most {self.info.num_layers}")
        picked = probe_sample(len(train_samples), cfg.select_probe_samples, self.seed)
        if len(picked) < 10:
            raise UserError(f"block selection needs at least 10 training samples, got {len(picked)}: add training "
                            "data or list skip2lora.block_indices")
        per_sample = self._surveyed([train_samples[i] for i in picked], device)
        features = SurveyedFeatures.from_samples(per_sample, self.block_indices, device)
        return selection_from_probe(
            self._block_probe(features), features, self.kind, cfg.select_max_blocks, cfg.select_min_gain,
            train_samples=len(train_samples), value_bytes=self.cache.dtype.itemsize if self.cache else 4,
            survey_s=time.perf_counter() - started)

    def _surveyed(self, samples: list, device: torch.device) -> list[CachedFeatures]:
        """Every block's features of these samples: read from the Skip-Cache where stored, else computed (as
        the prebuild does) and stored there, so a later run on any subset of the blocks prebuilds none."""
        started = time.perf_counter()
        found = {s.content_hash: self.cache.get(s.content_hash) for s in samples} if self.cache else {}
        missing = [s for s in samples if found.get(s.content_hash) is None]
        surveyed = tqdm(self._computed(missing, device), total=len(missing), desc="block survey", unit="sample",
                        leave=False, dynamic_ncols=True, disable=len(missing) < 4 * self.cfg.cache_build_batch_size)
        for sample, feats in surveyed:
            found[sample.content_hash] = feats
            if self.cache is not None and not self.cache.full:
                self.cache.put(sample.content_hash, feats)
        if self.cache is not None:
            self.cache.flush()
            self.cache.build_time_s += time.perf_counter() - started
        return [found[s.content_hash] for s in samples]

    def _block_probe(self, features: SurveyedFeatures):
        if self.kind == "classification":
            return RidgeProbe(features, self.num_labels, row_norm=self.cfg.input_norm, seed=self.seed)
        out_features = self.info.vocab_size if self.output_mode == "logits" else self.info.hidden_size

        def make_adapters(blocks):
            return SkipAdapterBank(blocks, self.info.hidden_size, out_features, self.cfg.r, self.cfg.alpha, 0.0,
                                   self.cfg.input_norm).to(features.final.device)

        return AdapterProbe(features, self._loss_sum, make_adapters, self.cfg.select_probe_steps, self.probe_lr,
                            self.cfg.select_max_blocks, seed=self.seed)

    def use_blocks(self, block_indices: list[int]) -> None:
        """Tap these blocks from now on: hooks, fresh adapters (seeded as a run that listed them), cache lookups,
        and the config that run.json and adapter_config.json record."""
        self.block_indices = validate_layer_indices(block_indices, self.info.num_layers)
        self.trunk.remove()
        self.trunk = CausalLMTrunk(self.model, self.block_indices)
        self.trunk.autocast_dtype = self.trunk_autocast
        self._build_trainable()
        if self.cache is not None:
            self.cache.use_blocks(self.block_indices)
        self.cfg.block_indices = list(self.block_indices)
        self.blocks_pending = False
