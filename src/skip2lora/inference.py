"""Load a fine-tuned result (PEFT LoRA adapter, Skip2-LoRA adapter, full checkpoint) for inference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Optional

import torch

from .errors import UserError
from .methods.base import FinetuneMethod
from .models import load_base_model, load_tokenizer, resolve_model_dir

if TYPE_CHECKING:
    from .data import Example


def read_adapter_config(checkpoint: Path) -> Optional[dict]:
    path = checkpoint / "adapter_config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): the checkpoint is damaged") from exc


# Loaders of checkpoints whose adapter_config.json names a method an application registers:
# method -> loader(checkpoint, device, base_model).
CheckpointLoader = Callable[[Path, torch.device, Optional[str]], FinetuneMethod]
CHECKPOINT_LOADERS: dict[str, CheckpointLoader] = {}


def register_checkpoint_loader(method: str, loader: CheckpointLoader) -> None:
    """Load checkpoints whose adapter_config.json says `"method": method` with `loader`."""
    CHECKPOINT_LOADERS[method] = loader


def registered_loader(method: Optional[str]) -> Optional[CheckpointLoader]:
    if method and method not in CHECKPOINT_LOADERS and method not in ("skip2lora", "lora"):
        from .plugins import load_plugins

        load_plugins()
    return CHECKPOINT_LOADERS.get(method) if method else None


def checkpoint_method(checkpoint: Path) -> str:
    """'skip2lora', 'lora' (PEFT adapter), 'full' (complete HF checkpoint) or a method whose loader an
    application registered (ilora: the recommendation teacher)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"checkpoint {checkpoint} does not exist: point --checkpoint at OUT/final of a run")
    adapter = read_adapter_config(checkpoint)
    if adapter is not None:
        method = adapter.get("method")
        return method if method == "skip2lora" or registered_loader(method) else "lora"
    if (checkpoint / "config.json").exists():
        return "full"
    raise UserError(f"{checkpoint} holds neither adapter_config.json nor config.json: point --checkpoint at OUT/final of a run")


def load_for_inference(checkpoint: Path, device: torch.device, base_model: Optional[str] = None) -> FinetuneMethod:
    """A method object ready for generate()/classify(), whatever produced the checkpoint."""
    checkpoint = Path(checkpoint)
    method = checkpoint_method(checkpoint)
    if method == "skip2lora":
        from .methods.skip2lora.method import load_skip2lora

        return load_skip2lora(checkpoint, device, base_model)
    if method in CHECKPOINT_LOADERS:
        return CHECKPOINT_LOADERS[method](checkpoint, device, base_model)
    if method == "lora":
        from peft import PeftModel

        adapter = read_adapter_config(checkpoint)
        base = base_model or adapter.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{checkpoint}/adapter_config.json names no base model: pass --model")
        task = "classification" if adapter.get("task_type") == "SEQ_CLS" else "generation"
        num_labels = _num_labels(checkpoint) if task == "classification" else None
        from .methods.lora import BASE_QUANTIZATION, keep_4bit_layers_differentiable

        quantized = (checkpoint / BASE_QUANTIZATION).exists()  # a QLoRA adapter: its base was 4-bit in training
        model, tokenizer, _ = load_base_model(base, task=task, num_labels=num_labels, device=str(device),
                                              quantize_4bit=quantized)
        if quantized:
            keep_4bit_layers_differentiable(model)  # the 4-bit kernels training used: the outputs training saw
        try:
            peft_model = PeftModel.from_pretrained(model, str(checkpoint)).to(device).eval()
        except Exception as exc:  # truncated weights, an adapter for another base model
            raise damaged_checkpoint(checkpoint, exc) from exc
        return FinetuneMethod(peft_model, tokenizer, task)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(str(checkpoint))
        is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        loader = AutoModelForSequenceClassification if is_classifier else AutoModelForCausalLM
        model = loader.from_pretrained(str(checkpoint)).to(device).eval()
    except Exception as exc:
        raise damaged_checkpoint(checkpoint, exc) from exc
    return FinetuneMethod(model, load_tokenizer(checkpoint), "classification" if is_classifier else "generation")


def damaged_checkpoint(checkpoint: Path, exc: BaseException) -> UserError:
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return UserError(f"could not load the checkpoint {checkpoint}: {reason} (is a file in it truncated or damaged?)")


def _num_labels(checkpoint: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as handle:
            for key in handle.keys():
                if key.endswith("score.weight") or key.endswith("score.modules_to_save.weight"):
                    return int(handle.get_slice(key).get_shape()[0])
    except Exception as exc:  # missing or damaged weights file
        raise damaged_checkpoint(checkpoint, exc) from exc
    raise UserError(f"{checkpoint} is a classification adapter without a score head")


def merge_lora(checkpoint: Path, out_dir: Path, device: torch.device, overwrite: bool = False) -> Path:
    """Fold a PEFT LoRA adapter into its base weights and save a plain Hugging Face directory.

    An existing out_dir (file or non-empty folder) is replaced only with `overwrite`, and never when it is,
    holds or lies inside the checkpoint or the base model's folder.
    """
    from .paths import atomic_directory, check_output_dir

    method_name = checkpoint_method(checkpoint)
    if method_name == "skip2lora":
        raise UserError(
            "Skip2-LoRA adapters read intermediate blocks and add at the last layer, so they cannot be merged "
            "into the base weights: use `skip2lora generate --checkpoint ...` (base + adapters) instead"
        )
    if method_name == "full":
        raise UserError(f"{checkpoint} is already a full checkpoint: nothing to merge")
    if method_name != "lora":
        raise UserError(f"a {method_name} checkpoint cannot be merged into the base weights (only a plain LoRA "
                        "adapter folds into them): load it with `skip2lora generate --checkpoint ...` instead")
    base = (read_adapter_config(Path(checkpoint)) or {}).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{checkpoint}/adapter_config.json names no base model: the checkpoint is damaged")
    check_output_dir(out_dir, overwrite, protected=[Path(checkpoint), resolve_model_dir(base)])
    method = load_for_inference(checkpoint, device)
    merged = method.model.merge_and_unload()

    def fill(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        method.tokenizer.save_pretrained(str(tmp))

    return atomic_directory(Path(out_dir), fill)


def read_task_file(checkpoint: Path) -> Optional[dict]:
    """task.json beside the weights: how training formatted inputs, and the class names."""
    from .outdir import TASK_JSON, read_json_file

    path = Path(checkpoint) / TASK_JSON
    return read_json_file(path, "task file") if path.exists() else None


def read_prompts(path: Path) -> list[Example]:
    """Prompts from a file: JSONL (each line a string, or an object with `instruction` and optionally `input`)
    for a .jsonl/.json file, otherwise one prompt per non-blank line."""
    from .data import Example

    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist: check the path")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix not in (".jsonl", ".json"):
        return [Example(sample_id=str(n), instruction=line.strip()) for n, line in enumerate(lines)]
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {number} is not valid JSON ({exc.msg}): write one prompt per line") from exc
        if isinstance(item, dict) and isinstance(item.get("instruction"), str):
            prompts.append(Example(sample_id=str(number), instruction=item["instruction"], input=item.get("input") or ""))
        elif isinstance(item, str):
            prompts.append(Example(sample_id=str(number), instruction=item))
        else:
            raise UserError(f"{path} line {number} is neither a string nor an object with an instruction")
    return prompts


def generate_command(checkpoint: Path, prompt: Optional[str] = None, prompts_file: Optional[Path] = None,
                     max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                     seed: Optional[int] = None, batch_size: int = 8,
                     prompt_style: Optional[Literal["auto", "alpaca", "chat", "plain"]] = None,
                     model: Optional[str] = None, device: str = "auto") -> int:
    """Generate text from a fine-tuned checkpoint (base + adapters, with the KV cache), greedy or sampled.

    One prompt prints its answer; a prompts file prints one JSON line per prompt ({"prompt", "output"}).

    Args:
        checkpoint: OUT/final (or OUT/best) of a run.
        prompt: The instruction to answer.
        prompts_file: A file of prompts instead: one per line, or JSONL (strings or {"instruction", "input"}).
        max_new_tokens: Tokens to generate at most.
        temperature: 0 is greedy decoding; above 0 samples (higher: more varied).
        top_p: When sampling: draw from the smallest set of tokens holding this much probability.
        seed: When sampling: seed of the draw, so a run can be repeated (unset: a fresh draw each time).
        batch_size: Prompts generated together (left-padded).
        prompt_style: How to format the prompt; unset: as the run was trained (task.json), else auto.
        model: Base model, when not the one the checkpoint records.
        device: auto, cpu, cuda or cuda:N.
    """
    from .data import Example
    from .env import resolve_device

    if max_new_tokens < 1:
        raise UserError("--max_new_tokens must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError(f"--temperature must be >= 0 and --top_p in (0, 1] (got {temperature}, {top_p})")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1 (got {batch_size})")
    if (prompt is None) == (prompts_file is None):
        raise UserError("pass one of --prompt TEXT or --prompts_file FILE")
    examples = read_prompts(prompts_file) if prompts_file else [Example(sample_id="cli", instruction=prompt)]
    if not examples:
        raise UserError(f"prompts file {prompts_file} holds no prompts")
    task = read_task_file(checkpoint) or {}
    style = prompt_style or task.get("prompt_style") or "auto"
    torch_device = resolve_device(device)
    method = load_for_inference(Path(checkpoint), torch_device, model)
    if method.kind != "generation":
        raise UserError(f"{checkpoint} is a classifier: use `skip2lora predict`")
    outputs = generate_texts(method, examples, style, max_new_tokens, temperature, top_p, seed, batch_size, torch_device)
    if prompts_file is None:
        print(outputs[0])
    else:
        for example, output in zip(examples, outputs):
            print(json.dumps({"prompt": example.instruction, "output": output}, ensure_ascii=False))
    return 0


def generate_texts(method: FinetuneMethod, examples: list, style: str, max_new_tokens: int, temperature: float,
                   top_p: float, seed: Optional[int], batch_size: int, device: torch.device) -> list[str]:
    """The answers to the prompts, batch by batch (a progress bar with an estimate when there are several)."""
    from tqdm.auto import tqdm

    from .data import format_prompt
    from .train.evaluate import left_padded

    if seed is not None:
        torch.manual_seed(seed)
    method.eval()
    texts = [format_prompt(example, method.tokenizer, style) for example in examples]
    encoded = [method.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    outputs = []
    with tqdm(total=len(encoded), desc="generate", unit="prompt", leave=False, disable=len(encoded) <= batch_size) as bar:
        for start in range(0, len(encoded), batch_size):
            ids, mask = left_padded(encoded[start:start + batch_size], method.tokenizer.pad_token_id)
            new_tokens = method.generate(ids.to(device), mask.to(device), max_new_tokens, temperature, top_p)
            outputs += [method.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]
            bar.update(len(ids))
    return outputs


def parse_texts(text: str) -> list[str]:
    """One text, or a JSON list of texts."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            texts = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise UserError(f"--text looks like a JSON list but is not valid JSON: {exc.msg}") from exc
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise UserError("--text as a JSON list must hold strings only")
        return texts
    return [text]


def predict_command(checkpoint: Path, text: str, model: Optional[str] = None, device: str = "auto",
                    prompt_style: Optional[Literal["auto", "alpaca", "chat", "plain"]] = None) -> int:
    """Classify texts with a fine-tuned classification checkpoint.

    Args:
        checkpoint: OUT/final (or OUT/best) of a classification run.
        text: One text, or a JSON list of texts.
        model: Base model, when not the one the checkpoint records.
        device: auto, cpu, cuda or cuda:N.
        prompt_style: How inputs are formatted; unset: as the run was trained (task.json).
    """
    from .config import DataConfig
    from .data import collate, make_example, tokenize_examples
    from .env import resolve_device

    texts = parse_texts(text)
    if not texts:
        raise UserError("--text holds no texts: pass one text or a JSON list of them")
    task = read_task_file(checkpoint)
    if task is None:
        raise UserError(f"{checkpoint} has no task.json: point --checkpoint at OUT/final of a classification run")
    if task.get("kind") != "classification":
        raise UserError(f"{checkpoint} is a generation checkpoint: use `skip2lora generate`")
    torch_device = resolve_device(device)
    method = load_for_inference(Path(checkpoint), torch_device, model)
    try:
        data_cfg = DataConfig(name=task["data_name"], max_seq_length=task["max_seq_length"],
                              prompt_style=prompt_style or task.get("prompt_style") or "auto")
        names = list(task["label_names"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"{checkpoint}/task.json lacks {exc}: the checkpoint is damaged") from exc
    samples = tokenize_examples([make_example(instruction=t, label=0) for t in texts], method.tokenizer, data_cfg,
                                "classification")
    batch = {k: (v.to(torch_device) if hasattr(v, "to") else v)
             for k, v in collate(samples, method.tokenizer.pad_token_id).items()}
    method.eval()
    with torch.no_grad():
        probabilities = torch.softmax(method.classify(batch).float(), dim=-1)
    for one, probs in zip(texts, probabilities):
        best = int(probs.argmax())
        print(f"{names[best]}\t{float(probs[best]):.3f}\t{one[:80]}")
    return 0


def merge_command(checkpoint: Path, out_dir: Path, device: str = "cpu", overwrite: bool = False) -> int:
    """Merge a LoRA adapter into its base model and save a Hugging Face directory.

    Args:
        checkpoint: OUT/final of a LoRA run.
        out_dir: Where the merged model goes: a new or empty folder (an existing one only with --overwrite,
            and never the checkpoint's or the base model's folder).
        device: Device to merge on.
        overwrite: Replace an existing file or non-empty folder at out_dir.
    """
    from .env import resolve_device

    path = merge_lora(Path(checkpoint), Path(out_dir), resolve_device(device), overwrite)
    print(f"[skip2lora] merged model written to {path}")
    return 0


__all__ = ["checkpoint_method", "register_checkpoint_loader", "generate_command", "load_for_inference", "merge_command", "merge_lora",
           "predict_command", "resolve_model_dir"]
