"""The ONNX export itself: QDQ custom ops, the export wrapper, the INT4 pass, and the onnxruntime check."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quantplug.builtins.exporters import (
    atomic_directory,
    check_out_dir,
    directory_bytes,
    sha256_file,
    write_manifest,
)
from quantplug.config import PerChannel, PerGroup, PerTensor, QuantSpec
from quantplug.errors import ConfigError, QuantplugError
from quantplug.export import read_manifest
from quantplug.modules import QuantConv2d, QuantLayer, QuantLinear, quant_layers, set_submodule
from quantplug.quantizer import AffineQuantizer
from quantplug_onnx import INT4_OPSET, MIN_OPSET, ONNX_FILE

logger = logging.getLogger(__name__)

_TORCH_EXPORTER_MIN_OPSET = 18  # the torch exporter builds at 18 or later, then converts down


class OnnxExportError(QuantplugError):
    """The model cannot be expressed in ONNX with the requested options."""


# --------------------------------------------------------------------------- custom ops
def _along(t: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """Reshape a 0-d or 1-d quantization parameter to broadcast against a tensor of ``rank`` along ``axis``."""
    if t.dim() == 0:
        return t
    shape = [1] * rank
    shape[axis % rank] = -1
    return t.reshape(shape)


@torch.library.custom_op("quantplug_onnx::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, lo: torch.Tensor,
                        hi: torch.Tensor, axis: int, narrow: int) -> torch.Tensor:
    """ONNX ``DequantizeLinear(QuantizeLinear(x))`` in the dtype of ``zero_point`` (int8 / uint8), then, when
    ``narrow``, a clamp to ``[lo, hi]`` (the dequantized ends of a grid narrower than the container)."""
    info = torch.iinfo(zero_point.dtype)
    s = _along(scale, x.dim(), axis)
    z = _along(zero_point, x.dim(), axis).to(x.dtype)
    codes = torch.clamp(torch.round(x / s) + z, info.min, info.max)
    y = (codes - z) * s
    if narrow:
        y = torch.maximum(torch.minimum(y, hi), lo)
    return y


@quantize_dequantize.register_fake
def _(x, scale, zero_point, lo, hi, axis, narrow):  # type: ignore[no-untyped-def]
    return torch.empty_like(x)


@torch.library.custom_op("quantplug_onnx::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
               block_size: int) -> torch.Tensor:
    """ONNX ``DequantizeLinear``: per-tensor, per-axis, or blocked (``block_size`` > 0) along ``axis``."""
    if block_size > 0:
        s = scale.repeat_interleave(block_size, dim=axis)
        z = zero_point.repeat_interleave(block_size, dim=axis).float()
    else:
        s = _along(scale, codes.dim(), axis)
        z = _along(zero_point, codes.dim(), axis).float()
    return (codes.float() - z) * s


@dequantize.register_fake
def _(codes, scale, zero_point, axis, block_size):  # type: ignore[no-untyped-def]
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def _translation_table(opset: int) -> dict[Any, Any]:
    """onnxscript translations of the two custom ops (traced: Python branches run at export time)."""
    import onnxscript

    op = onnxscript.values.Opset("", max(opset, _TORCH_EXPORTER_MIN_OPSET))

    def quantize_dequantize_onnx(x, scale, zero_point, lo, hi, axis: int, narrow: int):  # type: ignore[no-untyped-def]
        q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
        y = op.DequantizeLinear(q, scale, zero_point, axis=axis)
        if narrow:
            y = op.Max(op.Min(y, hi), lo)
        return y

    def dequantize_onnx(codes, scale, zero_point, axis: int, block_size: int):  # type: ignore[no-untyped-def]
        if block_size > 0:
            return op.DequantizeLinear(codes, scale, zero_point, axis=axis, block_size=block_size)
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    return {
        torch.ops.quantplug_onnx.quantize_dequantize.default: quantize_dequantize_onnx,
        torch.ops.quantplug_onnx.dequantize.default: dequantize_onnx,
    }


# --------------------------------------------------------------------------- export modules
def _container(spec: QuantSpec) -> torch.dtype:
    return torch.int8 if spec.qmin < 0 else torch.uint8


class ActivationQDQ(nn.Module):
    """An activation quantizer as one QuantizeLinear / DequantizeLinear pair (+ clamp for narrow grids)."""

    def __init__(self, quantizer: AffineQuantizer, where: str) -> None:
        super().__init__()
        spec = quantizer.spec
        g = spec.granularity
        if isinstance(g, PerGroup):
            raise OnnxExportError(f"{where}: per-group activation quantization has no ONNX QDQ form; "
                                  "use per-tensor or per-channel activations")
        dtype = _container(spec)
        scale = quantizer.scale.detach().float().reshape(-1).cpu()
        zero_point = quantizer.zero_point.detach().reshape(-1).cpu()
        self.axis = g.axis if isinstance(g, PerChannel) else 0
        if isinstance(g, PerTensor):
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        info = torch.iinfo(dtype)
        self.narrow = int((spec.qmin, spec.qmax) != (info.min, info.max))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point.round().to(dtype))
        self.register_buffer("lo", (spec.qmin - zero_point) * scale)
        self.register_buffer("hi", (spec.qmax - zero_point) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.lo, self.hi
        if self.narrow and lo.dim() > 0:
            lo, hi = _along(lo, x.dim(), self.axis), _along(hi, x.dim(), self.axis)
        return torch.ops.quantplug_onnx.quantize_dequantize(x, self.scale, self.zero_point, lo, hi, self.axis,
                                                            self.narrow)


@dataclass(frozen=True)
class WeightInfo:
    """How one layer's weight is stored in the graph."""

    layer: str
    bits: int
    signed: bool
    granularity: str
    onnx_type: str  # INT4, UINT4, INT8, UINT8
    codes_key: str


class WeightDQ(nn.Module):
    """A layer's integer weight codes (int8 / uint8 buffer) through DequantizeLinear, reshaped to the weight."""

    def __init__(self, layer: QuantLayer, where: str) -> None:
        super().__init__()
        spec, q = layer.weight_spec, layer.weight_quantizer
        assert spec is not None and q is not None
        if layer.has_codebook:
            raise OnnxExportError(
                f"layer {where!r} holds lookup-table (codebook) weights (k-means, TTQ), which have no affine integer "
                "codes: ONNX QDQ cannot carry them; use `quantplug export --format int`, which packs the codebook "
                "and its indices, or a recipe without lookup-table weights")
        codes = layer.weight_codes if layer.weight_codes is not None else layer.nearest_codes()
        codes = codes.detach().cpu().round().to(torch.int32)
        dtype = _container(spec)
        scale = q.scale.detach().float().reshape(-1).cpu()
        zero_point = q.zero_point.detach().reshape(-1).cpu().round()
        self.shape = tuple(layer.weight.shape)
        self.block_size = 0
        self.axis = 0
        g = spec.granularity
        if isinstance(g, PerTensor):
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        elif isinstance(g, PerChannel):
            self.axis = g.axis % codes.dim()
        elif isinstance(g, PerGroup):
            codes = codes.reshape(codes.shape[0], -1)  # quantplug's per-group rows: runs of the flattened input
            scale = scale.reshape(codes.shape[0], -1)
            zero_point = zero_point.reshape(codes.shape[0], -1)
            self.axis, self.block_size = 1, g.group_size
        else:  # pragma: no cover - config validation prevents this
            raise OnnxExportError(f"{where}: unknown granularity {g!r}")
        self.register_buffer("codes", codes.to(dtype))
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point.to(dtype))

    def forward(self) -> torch.Tensor:
        w = torch.ops.quantplug_onnx.dequantize(self.codes, self.scale, self.zero_point, self.axis, self.block_size)
        return w.reshape(self.shape) if self.block_size else w


class ExportLayer(nn.Module):
    """A ``QuantConv2d`` / ``QuantLinear`` rebuilt from QDQ custom ops (same outputs as the original)."""

    def __init__(self, layer: QuantLayer, name: str) -> None:
        super().__init__()
        q = layer.input_quantizer
        self.input_qdq = ActivationQDQ(q, name) if q is not None and q.active else None
        if layer.quantizes_weight:
            self.weight_dq: WeightDQ | None = WeightDQ(layer, name)
            self.weight = None
        else:
            self.weight_dq = None
            self.register_buffer("weight", layer.weight.detach().clone())
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        self.register_buffer("bias", bias)
        if isinstance(layer, QuantConv2d):
            if layer.padding_mode != "zeros":
                raise OnnxExportError(f"{name}: only zero padding is supported")
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                             groups=layer.groups)
        elif isinstance(layer, QuantLinear):
            self.conv = None
        else:
            raise OnnxExportError(f"{name}: cannot export quantized layer of type {type(layer).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_qdq is not None:
            x = self.input_qdq(x)
        w = self.weight_dq() if self.weight_dq is not None else self.weight
        if self.conv is not None:
            return F.conv2d(x, w, self.bias, **self.conv)
        return F.linear(x, w, self.bias)


class AdapterForward(nn.Module):
    """Runs the model the way its adapter does (``adapter.forward(model, inputs)``)."""

    def __init__(self, model: nn.Module, adapter: Any, keys: tuple[str, ...] | None) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.keys = keys

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        inputs: Any = dict(zip(self.keys, args)) if self.keys is not None else args[0] if len(args) == 1 else args
        out = self.adapter.forward(self.model, inputs)
        if not isinstance(out, torch.Tensor):
            raise OnnxExportError(f"the adapter's forward returned {type(out).__name__}; the ONNX exporter needs "
                                  "a single tensor output")
        return out


def export_model(model: nn.Module, config: Any) -> tuple[nn.Module, dict[str, WeightInfo]]:
    """A copy of ``model`` with every quantized layer replaced by an ``ExportLayer``; checks ``config``."""
    clone = copy.deepcopy(model).cpu().eval()
    weights: dict[str, WeightInfo] = {}
    for name, layer in list(quant_layers(clone)):
        spec = layer.weight_spec
        if layer.quantizes_weight and spec is not None:
            g = spec.granularity
            if isinstance(g, PerGroup) and config.opset < INT4_OPSET:
                raise OnnxExportError(
                    f"layer {name!r} has per-group weights (group_size={g.group_size}): DequantizeLinear's "
                    f"block_size needs ONNX opset {INT4_OPSET} or later, not {config.opset}; export with "
                    f"-o opset={INT4_OPSET}"
                )
            low = spec.bits <= 4 and config.low_bit_container == "int4"
            if low and config.opset < INT4_OPSET:
                raise OnnxExportError(
                    f"layer {name!r} has {spec.bits}-bit weights: ONNX opset {config.opset} has no INT4 / UINT4 "
                    f"type (added in opset {INT4_OPSET}); export with -o opset={INT4_OPSET}, or with "
                    "-o low_bit_container=int8 to store them in 8-bit containers"
                )
            signed = spec.qmin < 0
            kind = ("INT" if signed else "UINT") + ("4" if low else "8")
            weights[name] = WeightInfo(name, spec.bits, signed, g.kind, kind, codes_key(name))
        set_submodule(clone, name, ExportLayer(layer, name))
    return clone, weights


# --------------------------------------------------------------------------- onnx passes
def narrow_to_int4(model_proto: Any, weights: Mapping[str, WeightInfo]) -> int:
    """Replace the int8 / uint8 code initializers (and zero points) of 2-4 bit layers by INT4 / UINT4 ones."""
    import ml_dtypes
    from onnx import numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    targets = {w.codes_key: w for w in weights.values() if w.onnx_type in ("INT4", "UINT4")}
    done: set[str] = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in targets:
            continue
        info = targets[node.input[0]]
        np_type = ml_dtypes.int4 if info.signed else ml_dtypes.uint4
        for index in (0, 2):
            if index >= len(node.input) or node.input[index] not in inits:
                raise OnnxExportError(f"layer {info.layer!r}: DequantizeLinear input {index} is not an initializer; "
                                      "cannot narrow it to 4 bits")
            source = inits[node.input[index]]
            array = numpy_helper.to_array(source).astype(np.int32)
            new_name = f"{source.name}.{info.onnx_type.lower()}"
            if new_name not in inits:
                tensor = numpy_helper.from_array(array.astype(np_type), new_name)
                graph.initializer.append(tensor)
                inits[new_name] = tensor
            node.input[index] = new_name
        done.add(info.codes_key)
    missing = sorted(set(targets) - done)
    if missing:
        raise OnnxExportError(f"could not find the DequantizeLinear of {missing[:3]} in the exported graph; "
                              "export with -o low_bit_container=int8")
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(done)


def strip_metadata(model_proto: Any) -> None:
    """Drop the exporter's per-node debugging metadata (stack traces, FX nodes) and intermediate value_info."""
    for node in model_proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model_proto.graph.value_info[:]  # intermediate shape annotations: optional, onnxruntime infers them
    for value in (*model_proto.graph.input, *model_proto.graph.output):
        del value.metadata_props[:]
    for tensor in model_proto.graph.initializer:
        del tensor.metadata_props[:]


def count_ops(model_proto: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model_proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def initializer_types(model_proto: Any, weights: Mapping[str, WeightInfo]) -> dict[str, str]:
    """Layer -> ONNX element type of the code initializer feeding its DequantizeLinear."""
    return codes_types(model_proto, {w.layer: w.codes_key for w in weights.values()})


def codes_key(layer: str) -> str:
    """Name of the initializer holding ``layer``'s weight codes (before the INT4 pass adds a suffix)."""
    return f"model.{layer}.weight_dq.codes"


def codes_types(model_proto: Any, keys: Mapping[str, str]) -> dict[str, str]:
    """Layer -> ONNX element type of the initializer named ``keys[layer]`` (or ``<key>.<suffix>``) that feeds
    a DequantizeLinear."""
    from onnx import TensorProto

    inits = {t.name: t for t in model_proto.graph.initializer}
    out: dict[str, str] = {}
    for node in model_proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        for layer, key in keys.items():
            if node.input[0] == key or node.input[0].startswith(key + "."):
                out[layer] = TensorProto.DataType.Name(inits[node.input[0]].data_type)
    return out


# --------------------------------------------------------------------------- inputs and checks
def _as_args(inputs: Any) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...] | None]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), None
    if isinstance(inputs, Mapping):
        keys = tuple(inputs)
        return tuple(inputs[k] for k in keys), keys
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs), None
    raise OnnxExportError(f"cannot export a model whose inputs are {type(inputs).__name__}; "
                          "the adapter must feed tensors")


def example_batch(session: Any, manifest: Mapping[str, Any], adapter: Any, batch_size: int) -> Any:
    """``batch_size`` samples of the run's test data, prepared by the adapter (model inputs only)."""
    data = manifest.get("data") or adapter.default_data(manifest["model_id"])
    if not data:
        raise ConfigError("the run records no data; pass example_inputs to the exporter")
    dataset = session.model_data(manifest["model_id"], data, "test", num_samples=batch_size,
                                 model_options=manifest.get("model_options"))
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)))
    inputs, _ = adapter.prepare_batch(batch, torch.device("cpu"))
    return inputs


#: onnxruntime settings that keep its graph optimizations faithful to the QDQ graph (``exact=True``):
#: * fusing DequantizeLinear(int4) + MatMul into MatMulNBits re-quantizes the float input to int8 blocks at the
#:   default accuracy level 4, an approximation; level 0 keeps the fused kernel in fp32;
#: * the ``WeightBiasQuantization`` transformer rounds float Conv / Gemm biases to int32 at scale
#:   ``input_scale * weight_scale``; quantplug keeps biases in float, so it is disabled.
EXACT_ORT_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
EXACT_ORT_DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def ort_session(path: str, exact: bool = True) -> Any:
    """An onnxruntime CPU session (one thread) of ``path``.

    ``exact``: use ``EXACT_ORT_CONFIG`` / ``EXACT_ORT_DISABLED_OPTIMIZERS`` (else onnxruntime's defaults).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    disabled: list[str] = []
    if exact:
        for key, value in EXACT_ORT_CONFIG.items():
            options.add_session_config_entry(key, value)
        disabled = list(EXACT_ORT_DISABLED_OPTIMIZERS)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def run_onnxruntime(path: str, args: tuple[torch.Tensor, ...], exact: bool = True) -> np.ndarray:
    """Run ``path`` with onnxruntime on CPU (one thread, see ``ort_session``) and return the first output."""
    sess = ort_session(path, exact)
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(sess.get_inputs(), args)}
    return sess.run(None, feeds)[0]


# --------------------------------------------------------------------------- entry point
def _summary(exc: BaseException) -> str:
    """The useful part of the torch exporter's long error text."""
    text = str(exc)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:3])[:600]


def export_onnx(config: Any, model: nn.Module | None, run_dir: str, out_dir: str, *, session: Any = None,
                example_inputs: Any = None) -> dict[str, Any]:
    """Export ``model`` (the quantized model of ``run_dir``) to ``out_dir/model.onnx``; see ``OnnxExporter``."""
    import onnx

    from quantplug.export import load
    from quantplug.plugins import Session

    if config.opset < MIN_OPSET:
        raise OnnxExportError(f"ONNX opset {config.opset} is not supported: per-axis QuantizeLinear / "
                              f"DequantizeLinear need opset {MIN_OPSET} or later")
    if config.low_bit_container not in ("int4", "int8"):
        raise ConfigError(f"low_bit_container must be 'int4' or 'int8', not {config.low_bit_container!r}")
    check_out_dir(run_dir, out_dir)
    manifest = read_manifest(run_dir)
    session = session or Session()
    if model is None:
        model = load(run_dir, session=session)
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        model = copy.deepcopy(model).cpu()  # export and check on CPU without moving the caller's model
    model = model.eval()
    adapter = session.adapter_for(manifest["model_id"])
    if example_inputs is None:
        batch = config.batch_size if not config.dynamic_batch else max(config.batch_size, 2)
        example_inputs = example_batch(session, manifest, adapter, batch)
    args, keys = _as_args(example_inputs)
    wrapped, weights = export_model(model, config)
    module = AdapterForward(wrapped, adapter, keys).eval()
    reference_module = AdapterForward(model, adapter, keys).eval()
    dynamic_shapes = None
    if config.dynamic_batch:
        batch_dim = torch.export.Dim("batch")
        dynamic_shapes = (tuple({0: batch_dim} for _ in args),)  # forward(*args): one varargs entry
    input_names = list(keys) if keys is not None else ["input"] if len(args) == 1 else [f"input_{i}"
                                                                                          for i in range(len(args))]
    with torch.no_grad():
        reference = reference_module(*args)
        logger.info("exporting %s to ONNX opset %d", manifest["model_id"], config.opset)
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=config.opset, optimize=config.optimize,
                custom_translation_table=_translation_table(config.opset), dynamic_shapes=dynamic_shapes,
                input_names=input_names, output_names=["output"], verbose=False,
            )
        except OnnxExportError:
            raise
        except Exception as exc:
            raise OnnxExportError(f"torch.onnx.export failed for {manifest['model_id']!r}: {_summary(exc)}") from exc
    assert program is not None
    proto = program.model_proto
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), config.opset)
    if opset != config.opset:
        raise OnnxExportError(
            f"torch.onnx could not convert the graph of {manifest['model_id']!r} to ONNX opset {config.opset} "
            f"(it kept opset {opset}); export with -o opset={max(opset, _TORCH_EXPORTER_MIN_OPSET)} or later"
        )
    narrowed = narrow_to_int4(proto, weights)
    if config.strip_metadata:
        strip_metadata(proto)
    info: dict[str, Any] = {
        "format": "onnx",
        "opset": opset,
        "inputs": input_names,
        "dynamic_batch": config.dynamic_batch,
        "int4_layers": narrowed,
        "weight_types": initializer_types(proto, weights),
        "ops": count_ops(proto),
        "onnx": onnx.__version__,
        "torch": torch.__version__,
    }
    with atomic_directory(out_dir) as tmp:
        path = os.path.join(tmp, ONNX_FILE)
        large = proto.ByteSize() > 1_800_000_000
        onnx.save_model(proto, path, save_as_external_data=large, location=ONNX_FILE + ".data" if large else None)
        info["file"] = ONNX_FILE
        info["sha256"] = sha256_file(path)
        if large:
            info["external_data"] = {"file": ONNX_FILE + ".data", "sha256": sha256_file(path + ".data")}
        try:
            onnx.checker.check_model(path, full_check=True)  # by path: works with external data too
        except onnx.checker.ValidationError as exc:
            raise OnnxExportError(f"the exported graph of {manifest['model_id']!r} is not valid ONNX: {exc}") from exc
        if config.verify:
            ref = reference.detach().cpu().numpy().astype(np.float64)
            for key, exact in (("max_abs_diff", True), ("max_abs_diff_ort_default", False)):
                out = run_onnxruntime(path, args, exact)
                if out.shape != ref.shape:
                    raise OnnxExportError(f"onnxruntime output shape {out.shape} differs from PyTorch {ref.shape}")
                info[key] = float(np.abs(out.astype(np.float64) - ref).max())
            info["ort_exact"] = {"config": EXACT_ORT_CONFIG,
                                 "disabled_optimizers": list(EXACT_ORT_DISABLED_OPTIMIZERS)}
            info["verified_samples"] = int(args[0].shape[0])
            import onnxruntime

            info["onnxruntime"] = onnxruntime.__version__
        export_manifest = {
            **{k: v for k, v in manifest.items() if k not in ("export", "packing", "weights")},
            "export": {**info, "source": os.path.abspath(run_dir), "config": dataclasses.asdict(config)},
        }
        write_manifest(tmp, export_manifest)
    files = directory_bytes(out_dir)
    info.update(out_dir=os.path.abspath(out_dir), files=files, bytes=sum(files.values()))
    logger.info("wrote %s (%d bytes, max |onnxruntime - torch| = %s)", out_dir, info["bytes"],
                info.get("max_abs_diff"))
    return info
