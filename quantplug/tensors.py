"""Model inputs as they come from adapters: a tensor, or a dict of tensors (token ids, attention masks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from quantplug.errors import ConfigError

__all__ = ["to_device"]


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` on ``device``: a tensor moved, a mapping (a dict, a tokenizer's ``BatchEncoding``) moved value by value
    into a dict (nested), anything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ``ConfigError`` for a malformed name or CUDA on a machine without it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a device name ({exc}); use e.g. --device cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev
