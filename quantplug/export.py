"""Save and load quantized runs: ``model.safetensors`` + ``quantplug.json`` written atomically.

A run directory holds the quantized model's state (hardened integer codes, scales, zero points and
the remaining float parameters) and a manifest with the resolved recipe, the component providers and
their versions, the seed, the data, per-unit losses and metrics. ``load`` rebuilds the model through
its adapter (from the recorded model id), prepares it with the recorded recipe and per-layer bit map, and
loads the state: outputs are identical to the model that was saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from quantplug.config import Recipe
from quantplug.errors import ArtifactError

MANIFEST = "quantplug.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary sibling directory of ``out_dir``; on success rename it to ``out_dir`` (replacing it).

    On any error the temporary directory is removed and ``out_dir`` is left as it was.
    """
    target = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".quantplug-tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(target):
            backup = target + ".old"
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling file and a rename: readers (and an interrupted
    writer) never see a half-written file. Creates the parent directory."""
    target = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".quantplug-tmp-", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` on the CPU, with tensors that share memory (tied weights, such as a language model's
    embedding and output projection) copied apart: safetensors refuses shared storage. Loading puts the same
    values back into every name, so tied parameters stay equal."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, value in state.items():
        tensor = value.detach()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else 0
        tensor = tensor.contiguous().cpu()
        if ptr and ptr in storages:
            tensor = tensor.clone()
        storages.add(ptr)
        out[name] = tensor
    return out


def save_run(model: nn.Module, manifest: dict[str, Any], out_dir: str) -> str:
    """Write ``out_dir`` atomically: everything goes to a temporary sibling directory, then a rename."""
    with atomic_directory(out_dir) as tmp:
        state = unshared(model.state_dict())
        save_file(state, os.path.join(tmp, WEIGHTS), metadata={"format": "quantplug", "version": str(FORMAT_VERSION)})
        manifest = {"format_version": FORMAT_VERSION, **manifest}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=str)
    return os.path.abspath(out_dir)


def read_manifest(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.isdir(run_dir):
        raise ArtifactError(f"{run_dir} is not a directory; pass the output directory of `quantplug apply`")
    if not os.path.isfile(path):
        raise ArtifactError(f"{run_dir} has no {MANIFEST}: it is not a quantplug run (or the run did not finish)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is corrupt ({exc}); re-run `quantplug apply` to recreate it") from exc
    for key in ("model_id", "recipe", "format_version"):
        if key not in manifest:
            raise ArtifactError(f"{path} lacks {key!r}; the run directory is incomplete or from another tool")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format {manifest['format_version']}; upgrade quantplug to read it")
    return manifest


def read_state(run_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(run_dir, WEIGHTS)
    if not os.path.isfile(path):
        raise ArtifactError(f"{run_dir} has no {WEIGHTS}; the run directory is incomplete")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is corrupt ({exc}); re-run `quantplug apply` to recreate it") from exc


def build_from_manifest(manifest: dict[str, Any], device: str | torch.device = "cpu",
                        session: Any = None) -> nn.Module:
    """The prepared (not yet loaded) quantized model a manifest describes: its adapter loads the recorded model id
    with the recorded options, and the recorded recipe and per-layer bits (a bit-allocation pass may have set
    them) prepare it."""
    from quantplug.api import build_quant_model
    from quantplug.plugins import Session
    from quantplug.prepare import LayerBits

    session = session or Session()
    recipe = Recipe.from_dict(manifest["recipe"])
    adapter = session.adapter_for(manifest["model_id"])
    bit_map = [LayerBits(**b) for b in manifest["bit_map"]] if manifest.get("bit_map") else None
    _, model = build_quant_model(adapter, manifest["model_id"], recipe, torch.device(device),
                                 manifest.get("model_options"), bit_map=bit_map)
    return model


def load(run_dir: str, *, device: str | torch.device = "cpu", session: Any = None) -> nn.Module:
    """Rebuild the quantized model saved in ``run_dir``."""
    manifest = read_manifest(run_dir)
    fmt = manifest.get("export", {}).get("format")
    if fmt == "int":
        from quantplug.builtins.exporters import load_packed

        return load_packed(run_dir, device=device, session=session)
    if fmt is not None:
        raise ArtifactError(f"{run_dir} is a {fmt!r} export, not a PyTorch run: load it with its runtime (for "
                            "onnx: quantplug_onnx.load_session(dir), an onnxruntime session), or load the run it "
                            "came from")
    model = build_from_manifest(manifest, device, session)
    state = read_state(run_dir)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"{run_dir}: weights do not match the model {manifest['model_id']!r}: {exc}") from exc
    return model.to(device).eval()
