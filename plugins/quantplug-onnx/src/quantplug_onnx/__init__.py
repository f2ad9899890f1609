"""quantplug-onnx: export a quantized run to ONNX with QuantizeLinear / DequantizeLinear (QDQ) nodes.

Registers the exporter ``onnx``::

    quantplug export RUN_DIR --format onnx --out DIR [-o opset=21] [-o low_bit_container=int8]

What the graph contains for every quantized layer:

* its input activation (if quantized): ``QuantizeLinear -> DequantizeLinear`` with an ``int8`` (symmetric
  grid) or ``uint8`` (asymmetric grid) scale / zero point, per-tensor, or per-channel with ``axis``; for
  grids narrower than 8 bits a ``Min`` / ``Max`` clamp to the grid's range follows the pair (exact);
* its weight: the integer codes as an initializer feeding ``DequantizeLinear``: ``int8`` / ``uint8`` for
  5 to 8 bits, ``int4`` / ``uint4`` for 2 to 4 bits (opset 21 or later); per-channel weights use ``axis``,
  per-group weights ``block_size`` (opset 21 or later) on the ``[out, in * kh * kw]`` view of the weight,
  reshaped to the layer's shape after dequantization.

How: every ``QuantConv2d`` / ``QuantLinear`` of the loaded run is replaced by a module that calls two
``torch.library`` custom ops (``quantplug_onnx::quantize_dequantize`` and ``quantplug_onnx::dequantize``,
with eager kernels identical to quantplug's fake quantization); ``torch.onnx.export(dynamo=True)``
translates them through ``custom_translation_table`` into ``QuantizeLinear`` / ``DequantizeLinear``; a
last pass with the ``onnx`` package narrows the codes of 2-4 bit layers to ``INT4`` / ``UINT4``
initializers. The result is checked with ``onnx.checker`` and, by default, run with onnxruntime on a batch
of the run's data and compared with the PyTorch fake-quant model (``max_abs_diff`` in the manifest).

``load_session(DIR)`` opens an export in onnxruntime after checking that the directory is complete and intact.

Heavy imports (onnx, onnxruntime, onnxscript, the torch exporter) happen only when exporting or loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from quantplug.hookspecs import hookimpl
from quantplug.interfaces import Exporter

__version__ = "0.1.0"

ONNX_FILE = "model.onnx"
MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear
INT4_OPSET = 21  # INT4 / UINT4 tensors and DequantizeLinear's block_size


class OnnxExporter(Exporter):
    """ONNX with QuantizeLinear / DequantizeLinear pairs (activations) and DequantizeLinear of integer weights.

    Follows the ONNX QDQ format of onnxruntime's quantization tool ("operator-oriented" QDQ): integer
    weights feed DequantizeLinear; activations pass through a QuantizeLinear / DequantizeLinear pair.
    """

    name = "onnx"

    @dataclass(frozen=True)
    class Config:
        """Options of the ONNX exporter.

        ``opset``: ONNX opset (13 or later; 21 or later for int4 weights and per-group ``block_size``).
        ``low_bit_container``: ``int4`` stores 2-4 bit weights as INT4 / UINT4 (opset 21), ``int8`` widens
        them to int8 / uint8 (any opset). ``dynamic_batch``: leave the batch dimension symbolic.
        ``verify``: run the exported graph with onnxruntime on a batch of the run's data and record the
        largest absolute difference from the PyTorch fake-quant model. ``batch_size``: size of that batch
        (also the example input of the export; at least 2 with ``dynamic_batch``).
        ``optimize``: let the torch exporter run the onnxscript optimizer (constant folding, no fusion of
        the QDQ nodes). ``strip_metadata``: drop the exporter's per-node debugging metadata (stack traces).
        """

        opset: int = INT4_OPSET
        low_bit_container: str = "int4"
        dynamic_batch: bool = True
        verify: bool = True
        batch_size: int = 8
        optimize: bool = True
        strip_metadata: bool = True

    def export(self, model: nn.Module | None, run_dir: Any, out_dir: Any, *, session: Any = None,
               example_inputs: Any = None) -> dict[str, Any]:
        """Write ``out_dir/model.onnx`` and ``out_dir/quantplug.json`` (atomically); return a summary.

        ``model`` is the quantized model of ``run_dir`` (loaded when None); ``session`` resolves the run's
        model adapter and data source (a default ``Session()`` when None); ``example_inputs`` overrides the
        batch taken from the run's data.
        """
        from quantplug_onnx._export import export_onnx

        return export_onnx(self.config, model, os.fspath(run_dir), os.fspath(out_dir), session=session,
                           example_inputs=example_inputs)


def load_session(export_dir: str | os.PathLike[str], *, exact: bool = True) -> Any:
    """An onnxruntime session of an ONNX export directory; a clear ``ArtifactError`` when the directory is
    incomplete or corrupt (missing or unreadable manifest, missing graph, SHA-256 mismatch, weight types that
    disagree with the manifest). See ``quantplug_onnx._load``."""
    from quantplug_onnx._load import load_session as _load_session

    return _load_session(export_dir, exact=exact)


@hookimpl
def register_exporters(register) -> None:  # type: ignore[no-untyped-def]
    register(OnnxExporter)


__all__ = ["INT4_OPSET", "MIN_OPSET", "ONNX_FILE", "OnnxExporter", "__version__", "load_session"]
