"""Model inputs as they come from adapters: a tensor, or a dict of tensors (token ids, attention masks)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["to_device"]


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` on ``device``: a tensor moved, a dict moved value by value (nested), anything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x
