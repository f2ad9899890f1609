"""Built-in exporter ``int`` (packed integer weights), its loader, and the ``quantplug export`` command.

Packed-integer artifact (an export directory):

* ``model.packed.safetensors``: for every layer with quantized weights, the integer codes packed at their
  bit width into a ``uint8`` tensor ``<layer>.weight_packed``; the layer's scales and zero points (fp32, one
  per row of its granularity, as in the run); and every other tensor of the run's state unchanged (biases,
  activation-quantizer parameters, layers kept in full precision, embeddings, norms). The full-precision
  ``<layer>.weight`` and the unpacked ``<layer>.weight_codes`` of packed layers are not stored.
* ``quantplug.json``: a copy of the run's manifest plus ``export`` (format, source) and ``packing``
  (layout, per-layer bits / grid / shape / byte count, the SHA-256 of the weights file).

Bit layout (``PACKING_LAYOUT``): a layer's codes are taken in row-major order of the weight tensor, each
stored as the unsigned value ``code - qmin`` (``qmin`` = -2^(b-1) for a symmetric grid, 0 otherwise) in
``b`` bits. Value ``i`` occupies bits ``[i*b, (i+1)*b)`` of one little-endian bit stream, least significant
bit first, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8``. So 2-bit codes pack four to a byte,
4-bit two to a byte (the first code in the low nibble), 8-bit one to a byte, and 3-bit codes densely,
eight codes in three bytes. The last byte is zero-padded. Any width from 1 to 8 bits works the same way.

Lookup-table layers (``QuantLayer.set_codebook``: k-means weight sharing, TTQ) are packed the same way: their
indices (``0 .. K-1``, ``qmin`` 0) at ``ceil(log2 K)`` bits into ``<layer>.weight_packed``, their codebook kept as
``<layer>.weight_codebook`` (fp32, K entries); the manifest entry says ``"kind": "codebook"``.

Tied tensors (views of the same memory, such as a language model's embedding and its output projection) are
stored once: ``packing.aliases`` maps each further name to the stored one, and loading puts the stored tensor
back under every name.

The packing version is the lowest that describes the export, so older quantplug versions refuse what they
would misread: 1 (affine codes only), 2 (lookup-table layers), 3 (tied tensors stored once).

``load_packed(dir)`` unpacks the codes, rebuilds the model through its adapter exactly as
``quantplug.export.load`` does, and loads the state: the forward pass uses the same integer codes, scales
and zero points, so outputs are identical (``torch.equal``) to the fake-quant model of the run. Each packed
layer's ``weight`` parameter is set to its dequantized codes (the full-precision weight is not shipped).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from quantplug import console
from quantplug.errors import ArtifactError, ConfigError
from quantplug.export import MANIFEST, atomic_directory, build_from_manifest, read_manifest, unshared
from quantplug.hookspecs import hookimpl
from quantplug.integrity import check_quant_layers, sha256_file
from quantplug.interfaces import Exporter
from quantplug.modules import QuantLayer, quant_layers

logger = logging.getLogger(__name__)

PACKED_WEIGHTS = "model.packed.safetensors"
PACKING_VERSION = 3  # 2: lookup-table (codebook) layers; 3: tied tensors stored once (``packing.aliases``)
PACKING_LAYOUT = "lsb-first-bitstream"
_CHUNK = 1 << 20  # codes per packing step (a multiple of 8, so every chunk starts on a byte boundary)


# --------------------------------------------------------------------------- bit packing
def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` values of ``bits`` bits each."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"can pack 1 to 8 bits per code, not {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int, qmin: int = 0) -> torch.Tensor:
    """Pack integer ``codes`` (any shape, values in ``[qmin, qmin + 2^bits - 1]``) into a flat ``uint8`` tensor.

    See the module docstring for the layout.
    """
    _check_bits(bits)
    flat = codes.detach().reshape(-1).to("cpu", torch.int32)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < qmin or hi > qmin + (1 << bits) - 1:
            raise ConfigError(
                f"codes in [{lo}, {hi}] do not fit {bits} bits starting at {qmin}; "
                f"expected [{qmin}, {qmin + (1 << bits) - 1}]"
            )
    values = (flat - qmin).numpy().astype(np.uint8)
    n = values.size
    out = np.zeros(packed_nbytes(n, bits), dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        chunk = values[start:start + _CHUNK]
        bitmat = (chunk[:, None] >> shifts) & 1
        packed = np.packbits(bitmat.reshape(-1), bitorder="little")
        offset = start * bits // 8
        out[offset:offset + packed.size] = packed
    return torch.from_numpy(out)


def unpack_codes(
    packed: torch.Tensor, bits: int, numel: int, qmin: int = 0, dtype: torch.dtype = torch.int16
) -> torch.Tensor:
    """Inverse of ``pack_codes``: a flat tensor of ``numel`` codes of ``dtype``."""
    _check_bits(bits)
    data = packed.detach().reshape(-1).to("cpu")
    if data.dtype != torch.uint8:
        raise ArtifactError(f"packed codes must be uint8, got {data.dtype}")
    expected = packed_nbytes(numel, bits)
    if data.numel() != expected:
        raise ArtifactError(f"packed codes have {data.numel()} bytes; {numel} codes of {bits} bits need {expected}")
    raw = data.numpy()
    values = np.empty(numel, dtype=np.int16)
    shifts = np.arange(bits, dtype=np.uint16)
    for start in range(0, numel, _CHUNK):
        m = min(_CHUNK, numel - start)
        offset = start * bits // 8
        bitmat = np.unpackbits(raw[offset:offset + packed_nbytes(m, bits)], bitorder="little", count=m * bits)
        values[start:start + m] = (bitmat.reshape(m, bits).astype(np.uint16) << shifts).sum(1, dtype=np.uint16)
    return (torch.from_numpy(values) + qmin).to(dtype)


# --------------------------------------------------------------------------- atomic output
def check_out_dir(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Refuse to write an export over its own source directory, inside it, or around it.

    Paths are compared after resolving symbolic links (``os.path.realpath``; ``os.path.samefile`` when both
    exist), so a link to the run, or ``run/../run``, counts as the run itself.
    """
    run, out = os.path.realpath(os.fspath(run_dir)), os.path.realpath(os.fspath(out_dir))
    same = run == out
    if not same and os.path.exists(run) and os.path.exists(out):
        same = os.path.samefile(run, out)
    if same:
        raise ConfigError(f"the export directory {out_dir} is the run directory itself; choose another --out")
    if out.startswith(run.rstrip(os.sep) + os.sep):
        raise ConfigError(f"the export directory {out_dir} is inside the run directory {run_dir}; choose an --out "
                          "outside it, e.g. the default RUN-FORMAT next to the run")
    if run.startswith(out.rstrip(os.sep) + os.sep):
        raise ConfigError(f"the export directory {out_dir} contains the run directory {run_dir}, which replacing it "
                          "would delete; choose another --out")


def directory_bytes(path: str | os.PathLike[str]) -> dict[str, int]:
    """Sizes on disk of the files directly in ``path`` (name -> bytes)."""
    root = os.fspath(path)
    return {name: os.path.getsize(os.path.join(root, name)) for name in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, name))}


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    with open(os.path.join(directory, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, default=str)


# --------------------------------------------------------------------------- the int exporter
def codebook_index_bits(entries: int) -> int:
    """Bits per index of a lookup table with ``entries`` values (at least 1)."""
    return max(1, math.ceil(math.log2(max(entries, 1))))


def _pack_codebook_layer(layer: QuantLayer, prefix: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Replace a lookup-table layer's weight and indices in ``state`` by its packed indices; its manifest entry."""
    assert layer.weight_codebook is not None and layer.weight_indices is not None
    bits = codebook_index_bits(layer.weight_codebook.numel())
    state.pop(prefix + "weight", None)
    state.pop(prefix + "weight_indices", None)
    packed = pack_codes(layer.weight_indices, bits, 0)
    key = prefix + "weight_packed"
    state[key] = packed
    return {
        "kind": "codebook",
        "key": key,
        "codebook_key": prefix + "weight_codebook",
        "entries": layer.weight_codebook.numel(),
        "bits": bits,
        "qmin": 0,
        "shape": list(layer.weight_indices.shape),
        "numel": layer.weight_indices.numel(),
        "codes_dtype": "uint8",
        "nbytes": packed.numel(),
    }


def split_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied tensors once: ``(state without the aliases, alias name -> stored name)``.

    Two names alias when their tensors are the same view of the same memory (storage, offset, shape, strides,
    dtype), as ``tie_weights`` leaves a language model's embedding and output projection.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[Any, ...], str] = {}
    for name, tensor in state.items():
        if not tensor.numel():
            kept[name] = tensor
            continue
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()), tensor.dtype)
        if view in first:
            aliases[name] = first[view]
        else:
            first[view] = name
            kept[name] = tensor
    return kept, aliases


def packing_version(layers: dict[str, dict[str, Any]], aliases: dict[str, str]) -> int:
    """The lowest packing version that describes an export (see the module docstring)."""
    if aliases:
        return 3
    return 2 if any(v.get("kind") == "codebook" for v in layers.values()) else 1


def _layer_codes(layer: QuantLayer, name: str) -> torch.Tensor:
    if layer.weight_codes is not None:
        return layer.weight_codes
    logger.info("layer %s was not hardened; packing its round-to-nearest codes", name)
    return layer.nearest_codes().to(torch.int16)


class IntExporter(Exporter):
    """Packed integer weights: codes at their bit width (2/3/4/8...), fp32 scales and zero points, in safetensors.

    Loadable with ``quantplug.builtins.exporters.load_packed`` (and ``quantplug.export.load``), giving
    outputs identical to the fake-quant model. Layout: see ``quantplug.builtins.exporters``.
    """

    name = "int"

    @dataclass(frozen=True)
    class Config:
        """The packed-integer format has no options."""

    def export(self, model: nn.Module | None, run_dir: Any, out_dir: Any, *, session: Any = None) -> dict[str, Any]:
        """Write the packed export of ``model`` (the quantized model of ``run_dir``; loaded when None)."""
        run_dir, out_dir = os.fspath(run_dir), os.fspath(out_dir)
        check_out_dir(run_dir, out_dir)
        manifest = read_manifest(run_dir)
        if model is None:
            from quantplug.export import load

            model = load(run_dir, session=session)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        layers: dict[str, dict[str, Any]] = {}
        float_weight_bytes = packed_weight_bytes = 0
        for name, layer in quant_layers(model):
            if not layer.quantizes_weight:
                continue
            prefix = f"{name}." if name else ""
            if layer.has_codebook:
                layers[name] = _pack_codebook_layer(layer, prefix, state)
                float_weight_bytes += layer.weight.numel() * layer.weight.element_size()
                packed_weight_bytes += layers[name]["nbytes"]
                continue
            spec = layer.weight_spec
            assert spec is not None
            codes = _layer_codes(layer, name)
            state.pop(prefix + "weight", None)
            state.pop(prefix + "weight_codes", None)
            packed = pack_codes(codes, spec.bits, spec.qmin)
            key = prefix + "weight_packed"
            state[key] = packed
            float_weight_bytes += layer.weight.numel() * layer.weight.element_size()
            packed_weight_bytes += packed.numel()
            layers[name] = {
                "key": key,
                "bits": spec.bits,
                "qmin": spec.qmin,
                "qmax": spec.qmax,
                "symmetric": spec.symmetric,
                "granularity": spec.granularity.kind,
                "shape": list(codes.shape),
                "numel": codes.numel(),
                "codes_dtype": str(codes.dtype).removeprefix("torch."),
                "nbytes": packed.numel(),
            }
        if not layers:
            logger.warning("%s has no layer with quantized weights; the export holds float tensors only", run_dir)
        state, aliases = split_aliases(state)
        version = packing_version(layers, aliases)
        with atomic_directory(out_dir) as tmp:
            weights = os.path.join(tmp, PACKED_WEIGHTS)
            save_file(unshared(state), weights, metadata={"format": "quantplug-packed", "version": str(version)})
            out_manifest = {
                **{k: v for k, v in manifest.items() if k not in ("export", "packing", "weights")},
                "export": {"format": self.name, "source": os.path.abspath(run_dir),
                           "source_export": manifest.get("export")},
                "packing": {
                    "version": version,
                    "layout": PACKING_LAYOUT,
                    "layout_doc": "code - qmin in `bits` bits, row-major over the weight; value i at stream bits "
                                  "[i*bits, (i+1)*bits); stream bit k = bit (k % 8) of byte k // 8",
                    "file": PACKED_WEIGHTS,
                    "sha256": sha256_file(weights),
                    "bytes": os.path.getsize(weights),
                    "layers": layers,
                    "aliases": aliases,
                },
            }
            write_manifest(tmp, out_manifest)
        files = directory_bytes(out_dir)
        info = {"format": self.name, "out_dir": os.path.abspath(out_dir), "files": files,
                "bytes": sum(files.values()), "packed_layers": len(layers),
                "packed_weight_bytes": packed_weight_bytes, "float_weight_bytes": float_weight_bytes}
        logger.info("packed %d layers into %s (%d bytes)", len(layers), out_dir, info["bytes"])
        return info


# --------------------------------------------------------------------------- loader
def read_packed_state(export_dir: str, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a packed export with codes unpacked (``<layer>.weight_codes``), after integrity checks."""
    packing = manifest.get("packing")
    if not isinstance(packing, dict):
        raise ArtifactError(f"{export_dir}/{MANIFEST} has no packing section: it is not a packed-integer export")
    version = packing.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{export_dir}/{MANIFEST}: packing.version is {version!r}, not a whole number from 1; "
                            "the manifest was edited or is corrupt: re-run `quantplug export --format int`")
    if version > PACKING_VERSION or packing.get("layout") != PACKING_LAYOUT:
        raise ArtifactError(f"{export_dir} uses packing {packing.get('layout')!r} version {packing.get('version')}; "
                            "upgrade quantplug to read it")
    filename = packing.get("file", PACKED_WEIGHTS)
    path = os.path.join(export_dir, os.path.basename(str(filename)))
    if not os.path.isfile(path):
        raise ArtifactError(f"{export_dir} has no {filename}; the export directory is incomplete: "
                            "re-run `quantplug export --format int`")
    expected = packing.get("sha256")
    if expected and sha256_file(path) != expected:
        raise ArtifactError(f"{path} is corrupt (its SHA-256 does not match the manifest); "
                            "re-run `quantplug export --format int`")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is corrupt ({exc}); re-run `quantplug export --format int`") from exc
    layers = packing.get("layers")
    if not isinstance(layers, dict):
        raise ArtifactError(f"{export_dir}/{MANIFEST}: packing.layers is missing; the manifest is incomplete")
    for name, info in layers.items():
        try:
            key, bits, qmin = info["key"], int(info["bits"]), int(info["qmin"])
            numel, shape = int(info["numel"]), [int(s) for s in info["shape"]]
            dtype = getattr(torch, str(info["codes_dtype"]))
            if not isinstance(dtype, torch.dtype) or dtype.is_floating_point:
                raise ValueError(f"codes_dtype {info['codes_dtype']!r} is not an integer dtype")
            if math.prod(shape) != numel or any(s < 0 for s in shape):
                raise ValueError(f"shape {info['shape']!r} does not hold its numel {numel}")
            if info.get("kind", "affine") not in ("affine", "codebook"):
                raise ValueError(f"kind {info['kind']!r} is neither 'affine' (the default) nor 'codebook'")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"{export_dir}/{MANIFEST}: packing entry of layer {name!r} is incomplete or corrupt ({exc})"
            ) from exc
        if key not in state:
            raise ArtifactError(f"{path} lacks {key!r} (packed codes of {name!r}); the export is incomplete")
        try:
            codes = unpack_codes(state.pop(key), bits, numel, qmin, dtype)
        except (ArtifactError, ConfigError) as exc:
            raise ArtifactError(f"{path}: packed codes of {name!r} are corrupt: {exc}") from exc
        prefix = f"{name}." if name else ""
        target = "weight_indices" if info.get("kind") == "codebook" else "weight_codes"
        state[prefix + target] = codes.reshape(shape)
    aliases = packing.get("aliases", {})
    if not isinstance(aliases, dict):
        raise ArtifactError(f"{export_dir}/{MANIFEST}: packing.aliases is not a mapping; the manifest is corrupt")
    for alias, stored in aliases.items():
        if stored not in state:
            raise ArtifactError(f"{path} lacks {stored!r} (stored once for the tied {alias!r}); "
                                "the export is incomplete")
        state[alias] = state[stored]
    return state


def load_packed(export_dir: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                session: Any = None) -> nn.Module:
    """Rebuild the quantized model of a packed-integer export directory (outputs identical to the run's)."""
    export_dir = os.fspath(export_dir)
    manifest = read_manifest(export_dir)
    state = read_packed_state(export_dir, manifest)
    device = torch.device(device)
    model = build_from_manifest(manifest, device, session)
    packed_layers = list(manifest["packing"]["layers"])
    modules = dict(model.named_modules())
    for name in packed_layers:
        layer = modules.get(name)
        if not isinstance(layer, QuantLayer) or layer.weight_spec is None:
            raise ArtifactError(f"{export_dir}: packed layer {name!r} is not a quantized layer of "
                                f"{manifest['model_id']!r}; the export does not match the model")
        entry = manifest["packing"]["layers"][name]
        codebook_key = (f"{name}." if name else "") + "weight_codebook"
        if (entry.get("kind") == "codebook") != (codebook_key in state):
            said, found = ("a lookup-table (codebook)", "no") if entry.get("kind") == "codebook" else ("an affine", "a")
            raise ArtifactError(
                f"{export_dir}: the manifest says layer {name!r} is {said} layer, but {PACKED_WEIGHTS} has {found} "
                f"{codebook_key!r}; the manifest was edited or is corrupt: re-run `quantplug export --format int`"
            )
        if entry.get("kind") != "codebook" and (int(entry["bits"]), int(entry["qmin"])) != (
                layer.weight_spec.bits, layer.weight_spec.qmin):
            raise ArtifactError(
                f"{export_dir}: layer {name!r} is packed at {entry['bits']} bits from {entry['qmin']}, but the "
                f"run's recipe and bit map give it {layer.weight_spec.bits}-bit weights from "
                f"{layer.weight_spec.qmin}; the manifest is corrupt or edited: re-run `quantplug export --format int`"
            )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ArtifactError(f"{export_dir}: weights do not match the model {manifest['model_id']!r}: {exc}") from exc
    dropped = {f"{n}.weight" if n else "weight" for n in packed_layers}
    missing = sorted(set(result.missing_keys) - dropped)
    if missing or result.unexpected_keys:
        raise ArtifactError(f"{export_dir}: weights do not match the model {manifest['model_id']!r} "
                            f"(missing {missing[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}); "
                            "the export is incomplete or from another model")
    with torch.no_grad():
        for name in packed_layers:
            layer = modules[name]
            assert isinstance(layer, QuantLayer)
            codes = layer.weight_indices if layer.has_codebook else layer.weight_codes
            assert codes is not None
            if tuple(codes.shape) != tuple(layer.weight.shape):
                raise ArtifactError(f"{export_dir}: codes of {name!r} have shape {tuple(codes.shape)}, "
                                    f"the layer's weight {tuple(layer.weight.shape)}")
            if layer.has_codebook:
                assert layer.weight_codebook is not None
                if int(codes.max()) >= layer.weight_codebook.numel():
                    raise ArtifactError(f"{export_dir}: indices of {name!r} exceed its codebook of "
                                        f"{layer.weight_codebook.numel()} entries; the export is corrupt")
                layer.weight.copy_(layer.codebook_weight())
            else:
                layer.weight.copy_(layer.dequantize_codes(codes))
            layer.invalidate_cache()
    check_quant_layers(model, None, os.path.join(export_dir, PACKED_WEIGHTS), "re-run `quantplug export --format int`")
    return model.to(device).eval()


def is_packed_export(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` holds a packed-integer export (its manifest names the ``int`` format)."""
    try:
        manifest = read_manifest(os.fspath(directory))
    except ArtifactError:
        return False
    return (manifest.get("export") or {}).get("format") == IntExporter.name


# --------------------------------------------------------------------------- CLI: quantplug export
def _default_out(run_dir: str, fmt: str) -> str:
    return os.path.normpath(os.path.abspath(run_dir)) + f"-{fmt}"


def cmd_export(args: argparse.Namespace) -> int:
    """``quantplug export RUN_DIR --format NAME --out DIR``: write a deployable artifact of a saved run."""
    from quantplug import cli
    from quantplug.config import parse_override
    from quantplug.export import load

    session = cli._session()
    cls = session.exporters.get(args.format)  # unknown format: the registry's error lists what is registered
    options = dict(parse_override(o) for o in args.option)
    exporter = cls(cls.make_config(options))
    out = args.out or _default_out(args.run_dir, args.format)
    check_out_dir(args.run_dir, out)
    read_manifest(args.run_dir)  # clear error for a missing / partial run before loading anything
    model = load(args.run_dir, device=args.device, session=session)
    kwargs: dict[str, Any] = {}
    params = inspect.signature(exporter.export).parameters
    if "session" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs["session"] = session
    info = exporter.export(model, args.run_dir, out, **kwargs)
    if args.json:
        console.out(json.dumps(info, indent=2, default=str))
        return 0
    console.out(f"{args.format} export of {args.run_dir} written to {info.get('out_dir', out)}")
    files = info.get("files") or {}
    for name, size in files.items():
        console.out(f"  {name:<32} {size:>12,d} bytes")
    if "bytes" in info:
        console.out(f"  {'total':<32} {info['bytes']:>12,d} bytes")
    if info.get("float_weight_bytes"):
        console.out(f"  quantized weights: {info['packed_weight_bytes']:,d} bytes packed "
              f"({info['float_weight_bytes']:,d} bytes as fp32) in {info['packed_layers']} layers")
    for key in ("max_abs_diff", "max_abs_diff_ort_default"):
        if isinstance(info.get(key), (int, float)):
            console.out(f"  {key}: {info[key]:.3g}")
    return 0


@hookimpl
def register_exporters(register) -> None:  # type: ignore[no-untyped-def]
    register(IntExporter)


@hookimpl
def register_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a deployable artifact of a saved run (packed integers, ONNX QDQ, ...)",
        description="Export RUN_DIR (the output of `quantplug apply`) with the exporter named by --format; "
                    "`quantplug list exporter` shows the registered formats.",
    )
    p.add_argument("run_dir", help="run directory written by `quantplug apply`")
    p.add_argument("--format", required=True, help="exporter name: int, onnx (quantplug-onnx), ...")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR-FORMAT next to the run)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="NAME=VALUE",
                   help="exporter option, e.g. -o opset=21 for onnx (see `quantplug show exporter NAME`)")
    p.add_argument("--device", default="cpu", help="device to load the run on")
    p.add_argument("--json", action="store_true", help="print the export summary as JSON")
    p.set_defaults(func=cmd_export)


__all__ = [
    "IntExporter",
    "PACKED_WEIGHTS",
    "atomic_directory",
    "check_out_dir",
    "directory_bytes",
    "is_packed_export",
    "load_packed",
    "pack_codes",
    "packed_nbytes",
    "read_packed_state",
    "unpack_codes",
    "write_manifest",
]
