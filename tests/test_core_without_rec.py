"""The core knows no application: every module outside rec/ and studies/ imports with rec/ hidden from the
import system, a core run needs no plug-in, and no two folders of the package import each other."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from test_imports import PACKAGE, imports_of, module_name

APPLICATIONS = ("skip2lora.rec", "skip2lora.studies")


def core_modules() -> list[str]:
    names = [module_name(p) for p in sorted(PACKAGE.rglob("*.py"))]
    return [n for n in names if not n.startswith(APPLICATIONS) and not n.endswith("__main__")]


HIDE_REC = textwrap.dedent("""
    import importlib, importlib.abc, sys

    class HideRec(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "skip2lora.rec" or name.startswith("skip2lora.rec."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, HideRec())
""")


def run_hidden(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE_REC + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=240)


def test_every_core_module_imports_with_rec_hidden():
    modules = core_modules()
    assert "skip2lora.config" in modules and "skip2lora.methods.base" in modules and len(modules) > 40
    result = run_hidden(f"""
        for name in {modules!r}:
            importlib.import_module(name)
        assert not any(m.startswith("skip2lora.rec") for m in sys.modules)
        print("imported", len({modules!r}))
    """)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_registries_work_without_rec_and_name_its_parts_when_it_is_there():
    result = run_hidden("""
        from skip2lora.config import DATASET_NAMES, build_finetune_config, finetune_config_class, FinetuneConfig
        from skip2lora.errors import UserError
        from skip2lora.methods import method_class
        assert finetune_config_class() is FinetuneConfig and "rec-teacher" not in DATASET_NAMES
        assert method_class("lora").__name__ == "LoRAMethod"
        try:
            method_class("ilora")
        except UserError as exc:
            print("refused:", exc)
        cfg = build_finetune_config({"model": "tiny", "method": "lora"})
        assert not hasattr(cfg, "ilora")
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: unknown method 'ilora'" in result.stdout

    from skip2lora.config import DATASET_NAMES, finetune_config_class
    from skip2lora.inference import CHECKPOINT_LOADERS
    from skip2lora.methods import method_class
    from skip2lora.report.registry import run_report

    from skip2lora.plugins import load_plugins

    assert method_class("ilora").__name__ == "ILoRATeacher"  # the plug-in loads on the first unknown name
    load_plugins()  # (a no-op once loaded; other tests may have imported rec's method module directly)
    assert "rec-teacher" in DATASET_NAMES and "ilora" in CHECKPOINT_LOADERS and run_report("rec") is not None
    assert "ilora" in {f.name for f in __import__("dataclasses").fields(finetune_config_class())}


def folder_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_two_folders_import_each_other():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = set()
    for name, path in files.items():
        for target in imports_of(path, set(files)):
            a, b = folder_of(name), folder_of(target)
            if a != b and target != "skip2lora":
                edges.add((a, b))
    assert sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b) == []


def test_the_loop_asks_the_method_what_several_devices_cannot_do(tmp_path, capsys):
    """train/fabric.py names no method: Skip2-LoRA's own multi_device_refusal refuses an automatic block choice."""
    from skip2lora.cli import main

    out = tmp_path / "o"
    assert main(["finetune", "--model", "tiny", "--device", "cpu", "--method", "skip2lora",
                 "--skip2lora.block_indices", "auto", "--devices", "2", "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: skip2lora.block_indices auto chooses blocks in one process, not 2") and "\n" not in err
    assert not out.exists()
    fabric_source = (PACKAGE / "train" / "fabric.py").read_text()
    assert not any(f'"{name}"' in fabric_source for name in ("lora", "qlora", "skip2lora", "full", "ilora"))
