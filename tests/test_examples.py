"""Every example under examples/ runs with --tiny, and the Trainer script switches from PEFT LoRA to Skip2-LoRA by
changing at most three lines (the diff docs/python_api.md shows)."""

from __future__ import annotations

import difflib
import importlib.util
import math
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_trainer_script_changes_three_lines_from_peft_lora_to_skip2lora():
    lora = (EXAMPLES / "trainer_lora.py").read_text().splitlines()
    skip2lora = (EXAMPLES / "trainer_skip2lora.py").read_text().splitlines()
    changed = [line for line in difflib.unified_diff(lora, skip2lora, lineterm="", n=0)
               if line[:1] == "+" and not line.startswith("+++")]
    assert 1 <= len(changed) <= 3, changed


@pytest.mark.parametrize("name", ["trainer_skip2lora", "trainer_lora"])
def test_trainer_examples_run_tiny(name, tmp_path, capsys):
    metrics = load(name).main(["--tiny", "--out", str(tmp_path)])
    assert math.isfinite(metrics["eval_loss"])
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_torch_loop_example_runs_tiny(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["torch_loop.py", "--tiny"])
    runpy.run_path(str(EXAMPLES / "torch_loop.py"), run_name="__main__")
    assert "epoch 2: mean loss" in capsys.readouterr().out


def test_lightning_example_runs_tiny():
    metrics = load("lightning_skip2lora").main(["--tiny"])
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])


def test_the_readme_snippet_runs_on_the_tiny_model():
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme[readme.index("## Use it from Python"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")].replace('load_model("smollm2-135m")', 'load_model("tiny")')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = scope["model"]
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_the_trainer_benchmark_runs_tiny_and_renders_its_table(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# page\n\n<!-- trainer-bench:start -->\n<!-- trainer-bench:end -->\n\nafter\n")
    load("bench_trainer").main(["--tiny", "--json", str(tmp_path / "bench.json"), "--doc", str(doc),
                                "--scratch", str(tmp_path / "runs")])
    import json

    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result["runs"]) == {"lora", "skip2lora"} and "cpu_model_name" in result
    assert all(len(run["epoch_s"]) == 2 for run in result["runs"].values())
    assert result["runs"]["skip2lora"]["cache"]["cache_misses"] == 0  # every epoch read the prebuilt cache
    text = doc.read_text()
    assert "| Skip2-LoRA + Skip-Cache |" in text and text.endswith("after\n")
