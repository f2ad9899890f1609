"""quantplug: post-training quantization where every method is a plugin."""

from __future__ import annotations

from quantplug.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "__version__"]
