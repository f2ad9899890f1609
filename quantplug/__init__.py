"""quantplug: post-training quantization where every method is a plugin.

The Python entry points are importable from the package itself (loaded on first use, so that importing
``quantplug`` stays cheap for plugins and the CLI): ``quantplug.apply`` (quantize a model with a recipe,
``quantplug.api.apply``), ``quantplug.load`` (rebuild a saved run, ``quantplug.export.load``),
``quantplug.Session`` (the plugin registry), ``quantplug.Recipe`` and ``quantplug.QuantSpec``.
"""

from __future__ import annotations

import importlib
from typing import Any

from quantplug.hookspecs import hookimpl

__version__ = "0.1.0"

#: public name -> (module, attribute), imported on first access
_LAZY = {
    "apply": ("quantplug.api", "apply"),
    "load": ("quantplug.export", "load"),
    "Session": ("quantplug.plugins", "Session"),
    "Recipe": ("quantplug.config", "Recipe"),
    "QuantSpec": ("quantplug.config", "QuantSpec"),
}

__all__ = ["hookimpl", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'quantplug' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
