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
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from quantplug.config import Recipe
from quantplug.errors import ArtifactError, ConfigError
from quantplug.integrity import check_quant_layers, hardened_record, sha256_file
from quantplug.tensors import resolve_device

logger = logging.getLogger(__name__)

MANIFEST = "quantplug.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def check_output_dir(out_dir: str | os.PathLike[str]) -> str:
    """The absolute path of ``out_dir`` if a run may be written there, else a ``ConfigError`` saying what to do.

    Allowed: a path that does not exist yet (missing parents are created), an empty directory, or an earlier
    quantplug output (a directory whose ``quantplug.json`` is a valid quantplug manifest, ``read_manifest``), which
    is replaced as a whole once the new one is complete. Refused: a file, a symbolic link, a non-empty directory
    without a valid ``quantplug.json`` (it is not ours to delete), the current working directory or one of its
    parents, and a parent that is not a writable directory. ``apply`` calls this before loading anything;
    ``atomic_directory`` again before replacing.
    """
    raw = os.fspath(out_dir)
    target = os.path.abspath(raw)
    cwd = os.path.realpath(os.getcwd())
    real = os.path.realpath(target)
    if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise ConfigError(f"--out {raw} is the current directory or one of its parents, which would be replaced "
                          "by the run; choose a new directory for --out, e.g. runs/NAME")
    if os.path.islink(target):
        raise ConfigError(f"--out {raw} is a symbolic link; pass the directory it points to, or choose another --out")
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise ConfigError(f"--out {raw} exists and is a file, not a run directory; choose another --out or "
                              "remove the file")
        if os.listdir(target) and not _is_quantplug_output(target):
            raise ConfigError(f"--out {raw} is a non-empty directory that is not a quantplug output (it has no "
                              f"valid {MANIFEST}), and it would be replaced as a whole; choose another --out (a new "
                              "or empty directory) or remove it yourself")
    ancestor = os.path.dirname(target)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"--out {raw}: {ancestor} is a file, so the output directory cannot be created there; "
                          "choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {raw}: cannot write to {ancestor} (permission denied); choose an --out in a "
                          "directory you can write to")
    return target


def _is_quantplug_output(directory: str) -> bool:
    """True when ``directory`` holds a valid quantplug manifest (a run or an export): a file that is merely
    named ``quantplug.json`` (another tool's, or a broken one) does not make a directory ours to delete."""
    try:
        read_manifest(directory)
    except ArtifactError:
        return False
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_modes(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (a file, or a directory and everything in it) the modes a plain ``mkdir`` / ``open`` gives
    under the user's umask: ``mkdtemp`` / ``mkstemp`` create 0700 / 0600, which colleagues cannot read."""
    mask = _umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    root = os.fspath(path)
    if not os.path.isdir(root):
        os.chmod(root, file_mode)
        return
    for directory, _, files in os.walk(root):
        os.chmod(directory, dir_mode)
        for name in files:
            file = os.path.join(directory, name)
            if not os.path.islink(file):
                os.chmod(file, file_mode)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary sibling directory of ``out_dir``; on success rename it to ``out_dir``.

    ``out_dir`` must pass ``check_output_dir`` (checked before and again just before the rename): an earlier
    quantplug output there is replaced; anything else is refused. On any error the temporary directory is
    removed and ``out_dir`` is left as it was.
    """
    target = check_output_dir(out_dir)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".quantplug-tmp-", dir=parent)
    try:
        yield tmp
        check_output_dir(out_dir)  # the directory may have changed while the run was working
        publish_modes(tmp)
        if os.path.isdir(target) and os.listdir(target):
            backup = os.path.join(parent, f".quantplug-old-{uuid.uuid4().hex}")
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            if os.path.isdir(target):
                os.rmdir(target)  # empty: replaced by the new run
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling file and a rename: readers (and an interrupted
    writer) never see a half-written file. Creates the parent directory; the file gets the umask's mode."""
    target = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".quantplug-tmp-", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        publish_modes(tmp)
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
    """Write ``out_dir`` atomically: everything goes to a temporary sibling directory, then a rename.

    The manifest gets ``weights``: the SHA-256 of ``model.safetensors`` and, per layer, what was hardened (affine
    codes or lookup-table indices, and their dtype), which ``load`` verifies (``quantplug.integrity``).
    """
    with atomic_directory(out_dir) as tmp:
        state = unshared(model.state_dict())
        weights = os.path.join(tmp, WEIGHTS)
        save_file(state, weights, metadata={"format": "quantplug", "version": str(FORMAT_VERSION)})
        manifest = {"format_version": FORMAT_VERSION, **manifest,
                    "weights": {"file": WEIGHTS, "sha256": sha256_file(weights), "hardened": hardened_record(model)}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=str)
    return os.path.abspath(out_dir)


# key -> (allowed types, required); "data" is what ``quantplug eval`` measures on without --data
MANIFEST_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "format_version": ((int,), True),
    "model_id": ((str,), True),
    "recipe": ((dict,), True),
    "data": ((str,), True),
    "model_options": ((dict, type(None)), False),
    "bit_map": ((list, type(None)), False),
    "eval_samples": ((int, type(None)), False),
    "export": ((dict, type(None)), False),
    "weights": ((dict, type(None)), False),
}


def check_manifest(manifest: Any, path: str) -> None:
    """Raise ``ArtifactError`` unless ``manifest`` has every required key with the right type."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a JSON object; the run directory is corrupt or from another tool: "
                            "re-run `quantplug apply` to recreate it")
    for key, (types, required) in MANIFEST_FIELDS.items():
        if key not in manifest:
            if required:
                raise ArtifactError(f"{path} lacks {key!r}; the run directory is incomplete or from another tool: "
                                    "re-run `quantplug apply` to recreate it")
            continue
        value = manifest[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ArtifactError(f"{path}: {key!r} is {value!r} ({type(value).__name__}), not {names}; the "
                                "manifest was edited or written by another tool: re-run `quantplug apply`")
    version = manifest["format_version"]
    if version < 1:
        raise ArtifactError(f"{path} has format_version {version}; the manifest is corrupt: re-run `quantplug apply`")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has format {version}; upgrade quantplug to read it")


def read_manifest(run_dir: str) -> dict[str, Any]:
    """The validated manifest of ``run_dir`` (``ArtifactError`` for a missing, corrupt or incomplete one)."""
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.isdir(run_dir):
        raise ArtifactError(f"{run_dir} is not a directory; pass the output directory of `quantplug apply`")
    if not os.path.isfile(path):
        raise ArtifactError(f"{run_dir} has no {MANIFEST}: it is not a quantplug run (or the run did not finish)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: invalid JSON and text that is not UTF-8
        raise ArtifactError(f"{path} is corrupt ({exc}); re-run `quantplug apply` to recreate it") from exc
    check_manifest(manifest, path)
    return manifest


REDO_RUN = "re-run `quantplug apply` to recreate it"


def weights_record(manifest: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """The manifest's ``weights`` section (``{}`` for a run saved before it was recorded), type-checked."""
    record = manifest.get("weights") or {}
    sha, hardened = record.get("sha256"), record.get("hardened")
    if (sha is not None and not isinstance(sha, str)) or (hardened is not None and not isinstance(hardened, dict)):
        raise ArtifactError(f"{os.path.join(run_dir, MANIFEST)}: 'weights' is {record!r}, not {{'sha256': str, "
                            f"'hardened': {{layer: ...}}}}; the manifest was edited or is corrupt: {REDO_RUN}")
    return record


def read_state(run_dir: str, manifest: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``run_dir/model.safetensors``; with ``manifest``, first checked against its recorded SHA-256
    (a run saved before the hash was recorded has none: nothing to check)."""
    path = os.path.join(run_dir, WEIGHTS)
    if not os.path.isfile(path):
        raise ArtifactError(f"{run_dir} has no {WEIGHTS}; the run directory is incomplete")
    expected = weights_record(manifest, run_dir).get("sha256") if manifest is not None else None
    if expected and sha256_file(path) != expected:
        raise ArtifactError(f"{path} is corrupt or was edited (its SHA-256 does not match the one {MANIFEST} "
                            f"recorded at save); restore the file from a copy or {REDO_RUN}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is corrupt ({exc}); re-run `quantplug apply` to recreate it") from exc


def recorded_bit_map(manifest: dict[str, Any]) -> list[Any]:
    """The manifest's ``bit_map`` as ``LayerBits`` (``ArtifactError`` for an entry that is not one)."""
    from quantplug.prepare import LayerBits

    entries = []
    for i, entry in enumerate(manifest.get("bit_map") or []):
        fields = ("name", "weight_bits", "input_bits")
        ok = isinstance(entry, dict) and set(entry) == set(fields) and isinstance(entry["name"], str)
        for key in ("weight_bits", "input_bits"):
            value = entry.get(key) if ok else None
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                ok = False
        if not ok:
            raise ArtifactError(f"bit_map entry {i} of the manifest of the {manifest.get('model_id')!r} run is "
                                f"{entry!r}, not {{'name': str, 'weight_bits': int or null, 'input_bits': int or "
                                "null}: the manifest was edited or is corrupt; re-run `quantplug apply`")
        entries.append(LayerBits(**entry))
    return entries


def build_from_manifest(manifest: dict[str, Any], device: str | torch.device = "cpu",
                        session: Any = None) -> nn.Module:
    """The prepared (not yet loaded) quantized model a manifest describes: its adapter loads the recorded model id
    with the recorded options, the recipe's ``float``-stage passes rebuild the modules they replaced (from their
    recorded summaries, ``ModelPass.rebuild``), and the recorded recipe and per-layer bits (a bit-allocation
    pass may have set them) prepare it."""
    from quantplug.api import build_quant_model
    from quantplug.plugins import Session

    session = session or Session()
    recipe = Recipe.from_dict(manifest["recipe"])
    adapter = session.adapter_for(manifest["model_id"])
    bit_map = recorded_bit_map(manifest) if manifest.get("bit_map") else None
    summaries = manifest.get("passes") or {}
    float_passes: list[Any] = []
    for ref in recipe.passes:
        if ref.name not in session.model_passes:
            logger.warning("model pass %r is not installed: modules it replaced (if any) cannot be rebuilt, so the "
                           "saved state may not fit; install the plugin that provides it", ref.name)
            continue
        model_pass = session.make("model_pass", ref)
        if model_pass.stage == "float":
            float_passes.append(model_pass)

    def rebuild(model: nn.Module) -> None:
        for p in float_passes:
            summary = summaries.get(p.name) if isinstance(summaries, dict) else None
            p.rebuild(model, summary if isinstance(summary, dict) else {})

    _, model = build_quant_model(adapter, manifest["model_id"], recipe, torch.device(device),
                                 manifest.get("model_options"), float_passes=rebuild if float_passes else None,
                                 bit_map=bit_map)
    return model


def load(run_dir: str, *, device: str | torch.device = "cpu", session: Any = None) -> nn.Module:
    """Rebuild the quantized model saved in ``run_dir`` on ``device`` (``ConfigError`` if it is unavailable)."""
    device = resolve_device(device)
    manifest = read_manifest(run_dir)
    fmt = (manifest.get("export") or {}).get("format")
    if fmt == "int":
        from quantplug.builtins.exporters import load_packed

        return load_packed(run_dir, device=device, session=session)
    if fmt is not None:
        raise ArtifactError(f"{run_dir} is a {fmt!r} export, not a PyTorch run: load it with its runtime (for "
                            "onnx: quantplug_onnx.load_session(dir), an onnxruntime session), or load the run it "
                            "came from")
    record = weights_record(manifest, run_dir)
    model = build_from_manifest(manifest, device, session)
    state = read_state(run_dir, manifest)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"{run_dir}: weights do not match the model {manifest['model_id']!r}: {exc}") from exc
    check_quant_layers(model, record.get("hardened"), os.path.join(run_dir, WEIGHTS), REDO_RUN)
    return model.to(device).eval()
