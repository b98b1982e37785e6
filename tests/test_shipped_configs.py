"""Every YAML shipped under configs/ parses with the command it belongs to and passes that command's checks
(nothing runs; a new folder of configs must be given its reader here, or this test fails)."""

from __future__ import annotations

from pathlib import Path

import pytest

from skip2lora.cli import COMMANDS
from skip2lora.cli.arguments import build_options, config_file_first, expand_aliases, function_parser, options_class, parse
from skip2lora.config import build_finetune_config, finetune_parser
from skip2lora.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


def finetune(path: Path) -> None:
    cfg = build_finetune_config(parse(finetune_parser(), config_file_first(expand_aliases([str(path)]))).as_dict())
    assert cfg.method in ("lora", "qlora", "full", "skip2lora", "ilora")


def experiment(path: Path) -> None:
    from skip2lora.experiments.runner import load_spec, plan_runs, validate_runs

    spec, base_dir = load_spec(path)
    runs = plan_runs(spec, base_dir, Path("/nonexistent-out"))
    assert runs
    validate_runs(runs)


def benchmark_suite(path: Path) -> None:
    from skip2lora.bench.suite import load_suite

    assert load_suite(path).configs


def efficiency(path: Path) -> None:
    from skip2lora.studies.efficiency.claims import load_claims
    from skip2lora.studies.efficiency.grid import load_efficiency_spec
    from skip2lora.studies.efficiency.study import plan

    if path.name == "claims.yaml":
        assert load_claims(path)
        return
    try:
        plan(load_efficiency_spec(path))
    except UserError as exc:  # a study that uses the learning-rate check's picks needs that check's output first
        assert "run the learning-rate check first" in str(exc), str(exc)
        assert "\nlearning_rates:" in path.read_text()


def rec(path: Path) -> None:
    """A rec config belongs to the command its name starts with; ilora-smollm2 is a `finetune` config."""
    if path.stem == "ilora-smollm2":
        return finetune(path)
    command = {"sasrec": "rec student", "speed": "rec speed"}.get(path.stem.split("-")[0], "rec pipeline")
    function = COMMANDS[command].load()
    values = parse(function_parser(command, function), config_file_first([str(path)])).as_dict()
    for key in ("config", "__path__"):
        values.pop(key, None)
    build_options(options_class(function), values)


READERS = {"finetune": finetune, "experiments": experiment, "bench": benchmark_suite, "efficiency": efficiency,
           "rec": rec}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_parses_and_checks(path):
    folder = path.relative_to(CONFIGS).parts[0]
    assert folder in READERS, f"configs/{folder}/ has no reader in this test: add one"
    READERS[folder](path)
