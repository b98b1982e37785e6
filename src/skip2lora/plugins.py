"""Applications plug into the core through registries; the core never imports them by name.

An application is a sub-package of skip2lora with a `plugin.py`, or any installed package that names a
module in the `skip2lora.plugins` entry-point group. Importing that module registers what it adds: a
fine-tuning method (methods.register_method), a config section (config.register_config_extension), a data
source (data.register_source), a checkpoint loader (inference.register_checkpoint_loader) and a report for
its run folders (report.register_run_report). `load_plugins()` runs once, the first time a registry is asked
for a name it does not hold, so a run of a core method never imports an application.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path

ENTRY_POINT_GROUP = "skip2lora.plugins"
_state = {"loaded": False}


def bundled_plugins() -> list[str]:
    """The package's own applications: every sub-package that holds a plugin.py (found on disk, not imported)."""
    package = Path(__file__).parent
    return [f"{__package__}.{path.parent.name}.plugin" for path in sorted(package.glob("*/plugin.py"))]


def load_plugins() -> None:
    """Import every application's plugin module once; an application that cannot be imported is left out."""
    if _state["loaded"]:
        return
    _state["loaded"] = True  # first, so a plugin's own imports never come back here
    names = bundled_plugins() + [entry.value for entry in entry_points(group=ENTRY_POINT_GROUP)]
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise  # the plugin is there but one of its own imports is broken: say so
