"""Integrity of saved weights: the SHA-256 of a weights file, and the checks ``load`` runs on every quantized layer.

``load_state_dict`` alone accepts a damaged run: a layer whose ``weight_codes`` were deleted silently falls back
to round-to-nearest of its float weight, float or out-of-range codes dequantize to values off the integer grid,
codes of the wrong shape broadcast, NaN or negative scales pass through. ``save_run`` therefore records, per
weight-quantizing layer, what it hardened (affine codes or lookup-table indices, and their dtype) and the SHA-256
of ``model.safetensors``; ``check_quant_layers`` verifies each layer after loading against that record and
against its quantizer (codes in ``[qmin, qmax]`` with the weight's shape; scales finite, positive and one per row
of the granularity, ``quantplug.quantizer.to_rows``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from quantplug.errors import ArtifactError, ConfigError
from quantplug.modules import QuantLayer, quant_layers
from quantplug.quantizer import to_rows

CODES = "codes"
CODEBOOK = "codebook"


def sha256_file(path: str) -> str:
    """The hex SHA-256 of the file at ``path`` (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hardened_record(model: nn.Module) -> dict[str, dict[str, str]]:
    """``{layer: {"kind": "codes" | "codebook", "dtype": ...}}`` for every layer holding hardened weights."""
    record: dict[str, dict[str, str]] = {}
    for name, layer in quant_layers(model):
        if layer.weight_indices is not None:
            record[name] = {"kind": CODEBOOK, "dtype": _dtype_name(layer.weight_indices.dtype)}
        elif layer.weight_codes is not None:
            record[name] = {"kind": CODES, "dtype": _dtype_name(layer.weight_codes.dtype)}
    return record


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_integer(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool


def _hardened_problem(layer: QuantLayer, entry: Any) -> str | None:
    """What contradicts the manifest's record of this layer's hardened weights (None: nothing)."""
    if not isinstance(entry, Mapping) or entry.get("kind") not in (CODES, CODEBOOK):
        return f"has the manifest record {entry!r}, not {{'kind': 'codes' or 'codebook', 'dtype': ...}}"
    assert layer.weight_quantizer is not None
    if not layer.weight_quantizer.active:
        return "has an uninitialized weight quantizer (its 'initialized' flag is off), but the run hardened it"
    if entry["kind"] == CODEBOOK:
        held, what = layer.weight_indices, "lookup-table indices (weight_indices)"
    else:
        held, what = layer.weight_codes, "integer codes (weight_codes)"
    if held is None:
        return f"lacks its {what}, which the run saved; it would silently fall back to other weights"
    expected = entry.get("dtype")
    if expected is not None and _dtype_name(held.dtype) != expected:
        return f"holds {what} of dtype {_dtype_name(held.dtype)}, saved as {expected}"
    return None


def _codebook_problem(layer: QuantLayer) -> str | None:
    indices, codebook = layer.weight_indices, layer.weight_codebook
    assert indices is not None
    if codebook is None:
        return "has lookup-table indices but no codebook (weight_codebook)"
    if not codebook.is_floating_point() or codebook.dim() != 1 or not 1 <= codebook.numel() <= 256:
        return f"has a codebook of {tuple(codebook.shape)} {_dtype_name(codebook.dtype)}, not 1 to 256 floats"
    if not torch.isfinite(codebook).all():
        return "has NaN or inf codebook entries"
    if not _is_integer(indices):
        return f"has lookup-table indices of dtype {_dtype_name(indices.dtype)}, not an integer dtype"
    if tuple(indices.shape) != tuple(layer.weight.shape):
        return f"has lookup-table indices of shape {tuple(indices.shape)}, the weight {tuple(layer.weight.shape)}"
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook.numel()):
        return f"has lookup-table indices outside [0, {codebook.numel() - 1}] (its codebook has {codebook.numel()})"
    return None


def _affine_problem(layer: QuantLayer) -> str | None:
    spec, quantizer, codes = layer.weight_spec, layer.weight_quantizer, layer.weight_codes
    assert spec is not None and quantizer is not None
    if codes is not None:
        if not _is_integer(codes):
            return f"has codes of dtype {_dtype_name(codes.dtype)}, not an integer dtype"
        if tuple(codes.shape) != tuple(layer.weight.shape):
            return f"has codes of shape {tuple(codes.shape)}, the weight {tuple(layer.weight.shape)}"
        if codes.numel() and (int(codes.min()) < spec.qmin or int(codes.max()) > spec.qmax):
            return (f"has codes in [{int(codes.min())}, {int(codes.max())}], outside its {spec.bits}-bit grid "
                    f"[{spec.qmin}, {spec.qmax}]")
    if not quantizer.active:
        return None  # the layer keeps float weights: its scale is not used
    try:
        rows = to_rows(layer.weight.detach(), spec).shape[0]
    except ConfigError as exc:
        return f"cannot be split by its granularity {spec.granularity.kind} ({exc})"
    scale, zero_point = quantizer.scale.detach(), quantizer.zero_point.detach()
    if tuple(scale.shape) != (rows,) or tuple(zero_point.shape) != (rows,):
        return (f"has {tuple(scale.shape)} scales and {tuple(zero_point.shape)} zero points, but its "
                f"{spec.granularity.kind} granularity needs one per row: ({rows},)")
    if not torch.isfinite(scale).all() or bool((scale <= 0).any()):
        return "has NaN, inf, zero or negative weight scales"
    if not torch.isfinite(zero_point).all():
        return "has NaN or inf weight zero points"
    return None


def layer_problem(layer: QuantLayer, entry: Any = None) -> str | None:
    """What is wrong with a loaded weight-quantizing layer (None: nothing); ``entry`` is the manifest's record of
    its hardened weights, if the run recorded one."""
    if entry is not None:
        problem = _hardened_problem(layer, entry)
        if problem:
            return problem
    assert layer.weight_quantizer is not None
    hardened = layer.weight_indices is not None or layer.weight_codes is not None
    if hardened and not layer.weight_quantizer.active:
        return ("holds hardened weights, but its weight quantizer is uninitialized (its 'initialized' flag is off), "
                "so they would be ignored")
    if layer.weight_indices is not None:
        return _codebook_problem(layer)
    return _affine_problem(layer)


def check_quant_layers(model: nn.Module, hardened: Mapping[str, Any] | None, path: str, redo: str) -> None:
    """Raise ``ArtifactError`` naming the first damaged quantized layer of a loaded model and the file it came from.

    ``hardened`` is the run's record (``hardened_record`` at save; None for runs saved before it was kept: their
    layers are checked for consistency only). ``redo`` is the command that recreates the file.
    """
    hardened = hardened or {}
    layers = {name: layer for name, layer in quant_layers(model) if layer.weight_spec is not None}
    unknown = sorted(set(hardened) - set(layers))
    if unknown:
        raise ArtifactError(f"{path}: the manifest records hardened weights for {unknown[:5]}, which are not "
                            "weight-quantizing layers of the rebuilt model; the manifest was edited or belongs to "
                            f"another run: restore it or {redo}")
    for name, layer in layers.items():
        problem = layer_problem(layer, hardened.get(name))
        if problem:
            raise ArtifactError(f"{path}: layer {name!r} {problem}; the file is damaged or was edited: restore it "
                                f"from a copy or {redo}")
