"""Import a stand-alone script (a benchmark, a docs generator, a plotting tool) as a module, for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: str | Path, name: str | None = None) -> ModuleType:
    """Execute the script at ``path`` as module ``name`` (default: ``quantplug_script_<stem>``) and return it.

    The module is registered in ``sys.modules`` before it runs: dataclasses defined in a script look their
    module up there.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such script")
    name = name or f"quantplug_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
