"""The iLoRA teacher (Kong et al., NeurIPS 2024) as a fine-tuning method on the one loop.

The LLM gets a mixture of LoRA experts on its attention projections (moe_lora.py); a gate maps the frozen,
pretrained SASRec's user representation of the sample's history to softmax weights over the experts, and
every adapted layer mixes its experts with those weights. Only the experts and the gate's linear layer
train. Precision, accumulation, gradient checkpointing, the 4-bit base and the loss path come from
`finetune`'s own options; the prompts come from data.name rec-teacher (rec/prompts.py), whose batches carry
`item_history` for the gate.

A result folder (OUT/final, OUT/best) holds
```
adapter_config.json         method "ilora", the experts' shape, the gate, the base model, the prompt settings
adapter_model.safetensors   every adapted layer's lora_A / lora_B, and router.weight / router.bias (the gate)
sasrec/                     the frozen SASRec the gate reads (model.safetensors, rec.json, items.json)
tokenizer files
```
`load_ilora(folder, device)` rebuilds the teacher from it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ...config import FinetuneConfig
from .config import ILoRAConfig
from ...errors import UserError
from ...methods.base import FinetuneMethod, copy_checked, probe_batch, register_method
from ...models import ModelInfo
from ...outdir import read_json_file
from ..student.saved import ITEMS_JSON, REC_JSON, WEIGHTS, load_student
from .moe_lora import ExpertGate, add_moe_lora, attention_projections, moe_lora_layers
from ..student.sasrec import SASRec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SASREC_DIR = "sasrec"


def require_bitsandbytes() -> None:
    """QLoRA needs bitsandbytes: say so in one line before any model is loaded."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("ilora.quantize_base (a QLoRA base) needs bitsandbytes: pip install bitsandbytes, or leave "
                        "ilora.quantize_base off")


@register_method("ilora")
class ILoRATeacher(FinetuneMethod):
    """An LLM with gated LoRA experts; the gate reads a frozen SASRec's representation of the user's history."""

    def __init__(self, model: nn.Module, tokenizer: Any, sasrec: SASRec, sasrec_folder: Path, cfg: ILoRAConfig,
                 gradient_checkpointing: bool = False, quantized: bool = False) -> None:
        if quantized:
            from peft import prepare_model_for_kbit_training

            from ...methods.lora import keep_4bit_layers_differentiable

            # Casts norms to fp32 and lets inputs require grad so checkpointed blocks backprop. Non-reentrant
            # checkpointing: the gate's weights enter every block from outside and must receive their gradient.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
            keep_4bit_layers_differentiable(model)
        elif gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        targets = attention_projections(model, cfg.target_modules)
        gate = ExpertGate(cfg.experts)
        adapted = add_moe_lora(model, targets, gate, cfg.r // cfg.experts, cfg.alpha, cfg.dropout, cfg.scaling)
        super().__init__(model, tokenizer, "generation")
        device = next(model.parameters()).device
        self.expert_gate = gate
        self.sasrec = sasrec.to(device).eval().requires_grad_(False)
        self.router = nn.Linear(sasrec.cfg.hidden, cfg.experts, device=device)
        self.ilora, self.target_modules, self.adapted_modules = cfg, targets, adapted
        self.sasrec_folder, self.quantized = Path(sasrec_folder), quantized
        self.base_model_name: Optional[str] = None
        self.base_model_path: Optional[str] = None
        self.prompt_settings: Optional[dict] = None  # rec/prompts.PromptSettings: how its prompts were made

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def load_options(cls, cfg: FinetuneConfig, kind: str) -> dict:
        from .prompts import TEACHER_SOURCES

        if cfg.data.name not in TEACHER_SOURCES:
            raise UserError(f"method ilora trains on data.name rec-teacher or rec-teacher-history (its gate reads "
                            f"each prompt's item history), not {cfg.data.name!r}")
        if cfg.ilora.quantize_base:
            require_bitsandbytes()
        return {"task": kind, "quantize_4bit": cfg.ilora.quantize_base}

    @classmethod
    def four_bit_setting(cls, cfg: FinetuneConfig) -> Optional[str]:
        return "ilora.quantize_base" if cfg.ilora.quantize_base else None

    @classmethod
    def create(cls, model: nn.Module, tokenizer: Any, info: ModelInfo, cfg: FinetuneConfig, kind: str,
               num_labels: Optional[int]) -> "ILoRATeacher":
        from .prompts import PromptSettings

        folder = cfg.ilora.sasrec_checkpoint or cfg.data.path
        if folder is None:
            raise UserError("method ilora needs the frozen SASRec for its gate: --ilora.sasrec_checkpoint OUT/best "
                            "of a `rec student` run (or --data.path, which rec-teacher reads)")
        loaded = load_student(folder)
        if cfg.data.path is not None and Path(folder) != Path(cfg.data.path):
            data_items = json.loads((Path(cfg.data.path) / ITEMS_JSON).read_text())["item_ids"]
            if data_items != loaded.item_ids:
                raise UserError(f"ilora.sasrec_checkpoint {folder} was trained on {len(loaded.item_ids)} items, "
                                f"data.path {cfg.data.path} has {len(data_items)} (or other ids): use one dataset")
        method = cls(model, tokenizer, loaded.model, Path(folder), cfg.ilora,
                     gradient_checkpointing=cfg.train.gradient_checkpointing, quantized=cfg.ilora.quantize_base)
        method.base_model_name, method.base_model_path = info.name, info.path
        method.prompt_settings = PromptSettings.from_data_config(cfg.data).as_dict()
        cfg.ilora.target_modules = method.target_modules  # run.json records what was adapted, resolved
        if cfg.train.loss_path == "fast":
            method.use_fast_loss_path()
        return method

    def train(self, mode: bool = True) -> "ILoRATeacher":
        super().train(mode)
        self.sasrec.eval()  # frozen and deterministic: its dropout never runs
        return self

    # -- the gate ------------------------------------------------------------------------------
    def gate_weights(self, item_history: torch.Tensor) -> torch.Tensor:
        """[batch, experts] softmax weights from left-padded item ids [batch, length] (newest last)."""
        history = item_history[:, -self.sasrec.max_seq_len:].to(self.router.weight.device)
        with torch.no_grad():
            user = self.sasrec(history)
        return torch.softmax(self.router(user.to(self.router.weight.dtype)).float(), dim=-1)

    def route(self, item_history: Optional[torch.Tensor]) -> torch.Tensor:
        """Set every adapted layer's expert weights for the coming forward; returns them."""
        if item_history is None:
            raise UserError("the iLoRA teacher needs each prompt's item history (its gate reads the user's SASRec "
                            "representation): build inputs with rec/prompts.py or data.name rec-teacher")
        weights = self.gate_weights(item_history)
        self.expert_gate.set(weights)
        return weights

    # -- forward, generation -------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        self.route(batch.get("item_history"))
        return super().forward(batch)

    def final_hidden(self, batch: dict) -> torch.Tensor:
        """The final (normed) hidden states [batch, length, d] with the batch's gate applied."""
        self.route(batch.get("item_history"))
        return self._final_hidden(batch)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 item_history: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.route(item_history)
        return super().generate(input_ids, attention_mask, max_new_tokens)

    def use_fast_loss_path(self) -> bool:
        # The probe has no item history: a uniform gate is as good as any for checking the head.
        rows = probe_batch(self)["input_ids"].size(0)
        self.expert_gate.set(torch.full((rows, self.ilora.experts), 1.0 / self.ilora.experts))
        try:
            return super().use_fast_loss_path()
        finally:
            self.expert_gate.weights = None

    # -- what trains ---------------------------------------------------------------------------
    def trainable_settings(self) -> dict:
        return {"task": self.kind, "ilora.experts": self.ilora.experts, "ilora.r": self.ilora.r,
                "ilora.alpha": self.ilora.alpha, "ilora.scaling": self.ilora.scaling,
                "ilora.target_modules": self.target_modules,
                "ilora.quantize_base": self.quantized}

    def adapter_parameter_count(self) -> int:
        return sum(p.numel() for p in self.adapter_state_dict().values())

    def summary_extras(self) -> dict:
        return {"ilora": {"experts": self.ilora.experts, "adapted_modules": len(self.adapted_modules),
                          "sasrec_checkpoint": str(self.sasrec_folder)}}

    # -- persistence ---------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The experts of every adapted layer and the gate, by the names the safetensors file uses."""
        state = {}
        for name, layer in moe_lora_layers(self.model).items():
            state[f"{name}.lora_A.weight"] = layer.lora_A.weight
            state[f"{name}.lora_B.weight"] = layer.lora_B.weight
        state["router.weight"], state["router.bias"] = self.router.weight, self.router.bias
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor], source: Path) -> None:
        own = self.adapter_state_dict()
        if set(state) != set(own):
            missing = sorted(set(own) - set(state)) or sorted(set(state) - set(own))
            raise UserError(f"{source} does not match this teacher ({missing[0]} differs): it was saved for another "
                            "base model or settings")
        copy_checked(own, state, str(source), "it was saved for another base model or settings")

    def adapter_config(self) -> dict:
        cfg = self.ilora
        return {"method": "ilora", "peft_type": "ILORA", "base_model_name_or_path": self.base_model_path,
                "base_model_name": self.base_model_name, "experts": cfg.experts, "r": cfg.r,
                "rank_per_expert": cfg.r // cfg.experts, "alpha": cfg.alpha, "scaling": cfg.scaling,
                "dropout": cfg.dropout,
                "target_modules": list(self.target_modules), "adapted_modules": len(self.adapted_modules),
                "quantized_base": self.quantized,
                "gate": {"input": "SASRec user representation (hidden state at the newest position)",
                         "input_dim": int(self.router.in_features), "sasrec": SASREC_DIR, "shared_by_all_layers": True},
                "prompt": self.prompt_settings}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)  # as the other methods' save does
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.adapter_state_dict().items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))
        (directory / ADAPTER_CONFIG).write_text(json.dumps(self.adapter_config(), indent=2) + "\n")
        (directory / SASREC_DIR).mkdir()
        for name in (WEIGHTS, REC_JSON, ITEMS_JSON):
            shutil.copy2(self.sasrec_folder / name, directory / SASREC_DIR / name)
        self.tokenizer.save_pretrained(str(directory))


def read_teacher_config(folder: Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{folder} has no {ADAPTER_CONFIG}: point at OUT/final of an ilora run")
    config = read_json_file(path, "teacher config")
    if config.get("method") != "ilora":
        raise UserError(f"{path} is not an iLoRA teacher (method {config.get('method')!r})")
    return config


def load_ilora(folder: Path, device: torch.device, base_model: Optional[str] = None) -> ILoRATeacher:
    """A saved teacher (OUT/final or OUT/best of an ilora run) back on its base model, in eval mode."""
    from safetensors.torch import load_file

    from ...models import load_base_model

    folder = Path(folder)
    config = read_teacher_config(folder)
    if config.get("quantized_base"):
        require_bitsandbytes()
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{folder / ADAPTER_CONFIG} names no base model: pass the base model")
    model, tokenizer, _ = load_base_model(base, device=str(device), quantize_4bit=bool(config.get("quantized_base")))
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        # A teacher saved before the scaling option existed was scaled by alpha over the total rank.
        settings = ILoRAConfig(experts=config["experts"], r=config["r"], alpha=config["alpha"],
                               dropout=config["dropout"], target_modules=config["target_modules"],
                               scaling=config.get("scaling", "total"))
    except KeyError as exc:
        raise UserError(f"{folder / ADAPTER_CONFIG} lacks {exc}: the teacher folder is damaged") from exc
    sasrec = load_student(folder / SASREC_DIR).model
    teacher = ILoRATeacher(model, tokenizer, sasrec, folder / SASREC_DIR, settings,
                           quantized=bool(config.get("quantized_base")))
    try:
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as exc:  # missing, truncated or damaged: safetensors raises its own error types
        raise UserError(f"could not read {folder / ADAPTER_WEIGHTS}: {' '.join(str(exc).split())[:160]}") from exc
    teacher.load_adapter_state(state, folder / ADAPTER_WEIGHTS)
    teacher.base_model_name, teacher.base_model_path = config.get("base_model_name"), base
    teacher.prompt_settings = config.get("prompt")
    return teacher.eval()
