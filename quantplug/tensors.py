"""Model inputs as they come from adapters: a tensor, or a dict of tensors (token ids, attention masks)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from quantplug.errors import ConfigError

__all__ = ["fingerprint", "resolve_device", "to_device"]


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


def fingerprint(values: Iterable[Any]) -> str:
    """A SHA-256 hex digest of ``values`` (tensors, mappings of tensors, None), in order: equal digests mean equal
    data (dtype, shape and bytes). A resumed run compares its calibration data with the checkpoint's by this."""
    digest = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, Mapping):
            for key in sorted(x, key=str):
                digest.update(str(key).encode())
                feed(x[key])
        else:
            digest.update(repr(x).encode())

    for value in values:
        feed(value)
    return digest.hexdigest()
