"""Model inputs as they come from adapters: a tensor, or a dict of tensors (token ids, attention masks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["to_device"]


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` on ``device``: a tensor moved, a mapping (a dict, a tokenizer's ``BatchEncoding``) moved value by value
    into a dict (nested), anything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x
