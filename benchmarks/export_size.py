"""Bytes on disk and output fidelity of each deployable format, per model and bit setting.

For every model and setting the script quantizes with round-to-nearest (``quantplug apply --plugin nearest``,
per-channel asymmetric weights, per-tensor asymmetric activations, first / last layer at 8 bits), saves the
run, exports it with every requested exporter, and measures on ``--samples`` test samples of the model's
default data:

* bytes on disk of the weights file of each format (``model.safetensors`` of the run, the packed
  ``model.packed.safetensors``, ``model.onnx``) and of the whole directory (manifest included);
* the largest absolute output difference from the PyTorch fake-quant model in memory: the run reloaded with
  ``quantplug.export.load``, the packed export reloaded with ``load_packed``, the ONNX graph run by
  onnxruntime on CPU, with exact settings (fp32 ``MatMulNBits``, float biases) and with onnxruntime's
  defaults;
* the float model as the baseline: its state dict (batch norm folded, as it is quantized) in safetensors;
* PyTorch's own noise floor: the fake-quant model run one sample at a time vs the whole batch.

    python benchmarks/export_size.py                                    # tiny models, W4A8 and W3A4
    python benchmarks/export_size.py --models testing:tiny-resnet --configs w4a8 --samples 64
    python benchmarks/export_size.py --out benchmarks/results/export.md # the saved table

Needs ``pip install ./plugins/quantplug-onnx`` for the ONNX rows (skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from quantplug.api import apply
from quantplug.builtins import exporters
from quantplug.builtins.exporters import PACKED_WEIGHTS, IntExporter, directory_bytes, load_packed
from quantplug.export import WEIGHTS, load, read_manifest
from quantplug.plugins import Session

DEFAULT_MODELS = ("testing:tiny-resnet", "testing:tiny-decoder")


@dataclass
class Row:
    model: str
    config: str
    fmt: str
    weights_bytes: int
    dir_bytes: int | None
    diff: float | None
    diff_default: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def parse_config(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"w(\d)a(\d+)", text.strip().lower())
    if not match:
        raise SystemExit(f"bad config {text!r}; use e.g. w4a8,w3a4")
    return int(match.group(1)), int(match.group(2))


def session_with_plugins() -> tuple[Session, Any]:
    try:
        import quantplug_onnx
    except ImportError:
        quantplug_onnx = None
    plugins = [exporters] + ([quantplug_onnx] if quantplug_onnx is not None else [])
    return Session(entry_points=False, plugins=plugins), quantplug_onnx


def eval_inputs(session: Session, run_dir: Path, samples: int) -> torch.Tensor:
    manifest = read_manifest(str(run_dir))
    adapter = session.adapter_for(manifest["model_id"])
    data = manifest["data"]
    dataset = session.data_source_for(data).load(data, "test", num_samples=samples, seed=0)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=samples, shuffle=False)))
    inputs, _ = adapter.prepare_batch(batch, torch.device("cpu"))
    return inputs


def max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a_np = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    b_np = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    return float(np.abs(a_np.astype(np.float64) - b_np.astype(np.float64)).max())


def float_bytes(session: Session, model_id: str, tmp: Path) -> int:
    adapter = session.adapter_for(model_id)
    model = adapter.fold_batchnorm(adapter.load(model_id, device=torch.device("cpu")).eval())
    path = tmp / f"float-{model_id.replace(':', '-').replace('/', '-')}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def measure(model_id: str, w_bits: int, a_bits: int, samples: int, calib: int, tmp: Path) -> list[Row]:
    session, onnx_plugin = session_with_plugins()
    config = f"W{w_bits}A{a_bits}"
    run_dir = tmp / f"{model_id.replace(':', '-')}-{config}"
    result = apply("nearest", model_id, session=session, out_dir=str(run_dir), eval_samples=samples,
                   overrides={"calib.num_samples": calib, "weight.bits": w_bits, "activation.bits": a_bits})
    model = result.model
    assert model is not None
    model.eval()
    x = eval_inputs(session, run_dir, samples)
    with torch.no_grad():
        ref = model(x)
        one_by_one = torch.cat([model(x[i:i + 1]) for i in range(min(samples, 256))])
        noise = max_diff(one_by_one, ref[: one_by_one.shape[0]])
        reloaded = load(str(run_dir), session=session)(x)
    rows = [
        Row(model_id, config, "float (state dict, BN folded)", float_bytes(session, model_id, tmp), None, None,
            note="baseline"),
        Row(model_id, config, "fake-quant run (safetensors)", (run_dir / WEIGHTS).stat().st_size,
            sum(directory_bytes(run_dir).values()), max_diff(reloaded, ref),
            note=f"PyTorch batch vs one-by-one: {noise:.3g}"),
    ]
    int_dir = tmp / f"{run_dir.name}-int"
    IntExporter().export(model, run_dir, int_dir)
    with torch.no_grad():
        packed_out = load_packed(int_dir, session=session)(x)
    rows.append(Row(model_id, config, "int (packed safetensors)", (int_dir / PACKED_WEIGHTS).stat().st_size,
                    sum(directory_bytes(int_dir).values()), max_diff(packed_out, ref)))
    if onnx_plugin is None:
        rows.append(Row(model_id, config, "onnx (QDQ)", 0, None, None, note="quantplug-onnx not installed"))
        return rows
    from quantplug_onnx._export import run_onnxruntime

    onnx_dir = tmp / f"{run_dir.name}-onnx"
    info = onnx_plugin.OnnxExporter().export(model, run_dir, onnx_dir, session=session)
    path = str(onnx_dir / "model.onnx")
    exact = run_onnxruntime(path, (x,), exact=True)
    default = run_onnxruntime(path, (x,), exact=False)
    weight_types = sorted(set(info["weight_types"].values()))
    rows.append(Row(model_id, config, f"onnx (QDQ, opset {info['opset']})", os.path.getsize(path),
                    sum(directory_bytes(onnx_dir).values()), max_diff(exact, ref), max_diff(default, ref),
                    note="weights " + "/".join(weight_types)))
    return rows


def fmt_bytes(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


def render(rows: list[Row], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# Deployable formats: bytes on disk and output difference",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()} "
        f"(torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s)).",
        "",
        "Round-to-nearest PTQ (`--plugin nearest`: per-channel asymmetric weights, per-tensor asymmetric "
        f"activations, first and last layer at 8 bits), {args.calib} calibration samples; differences are the "
        f"largest absolute difference of the model outputs (logits) from the PyTorch fake-quant model over "
        f"{args.samples} test samples of the model's default data. *weights* is the weights file alone "
        "(`model.safetensors`, `model.packed.safetensors`, `model.onnx`), *directory* adds the manifest "
        "(`quantplug.json`, which copies the run's recipe, per-unit losses and metrics). *ratio* is weights / float.",
        "",
        "| model | setting | format | weights (bytes) | ratio | directory (bytes) | max abs diff | "
        "onnxruntime defaults | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    base: dict[tuple[str, str], int] = {}
    for row in rows:
        if row.note == "baseline":
            base[(row.model, row.config)] = row.weights_bytes
    for row in rows:
        b = base.get((row.model, row.config))
        ratio = f"{row.weights_bytes / b:.2f}" if b and row.weights_bytes else ""
        diff = "" if row.diff is None else f"{row.diff:.3g}"
        diff_default = "" if row.diff_default is None else f"{row.diff_default:.3g}"
        lines.append(f"| {row.model} | {row.config} | {row.fmt} | {fmt_bytes(row.weights_bytes)} | {ratio} | "
                     f"{fmt_bytes(row.dir_bytes)} | {diff} | {diff_default} | {row.note} |")
    lines += [
        "",
        "Notes:",
        "",
        "* The run's `model.safetensors` keeps the full-precision weights next to the integer codes (so a run can "
        "be re-reconstructed); the packed format drops both for the codes at their bit width.",
        "* The packed format and the reloaded run are bit-identical to the fake-quant model (difference 0).",
        "* onnxruntime sums in a different order than PyTorch; now and then an activation lands on the other "
        "side of a rounding boundary and one code step propagates to the logits. The *note* of the fake-quant "
        "row gives PyTorch's own difference between running the batch at once and one sample at a time: the "
        "same order of magnitude. *max abs diff* for ONNX uses onnxruntime with "
        "`session.qdq_matmulnbits_accuracy_level=0` and the `WeightBiasQuantization` optimizer disabled; "
        "*onnxruntime defaults* is a plain `InferenceSession`, whose fused 4-bit `MatMulNBits` re-quantizes "
        "its input to int8 blocks and whose bias quantization rounds float biases to int32.",
        "* The tiny models have a few thousand parameters, so fixed costs (safetensors headers with one entry "
        "per tensor, ONNX graph structure) weigh much more than they would on larger models.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model ids")
    parser.add_argument("--configs", default="w4a8,w3a4", help="comma-separated bit settings, e.g. w4a8,w3a4")
    parser.add_argument("--samples", type=int, default=256, help="test samples for the output comparison")
    parser.add_argument("--calib", type=int, default=256, help="calibration samples")
    parser.add_argument("--out", default=None, help="write the markdown table here (default: print it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("QUANTPLUG_PROGRESS", "0")
    command = "python benchmarks/export_size.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="quantplug-export-bench-") as tmp:
        for model_id in [m.strip() for m in args.models.split(",") if m.strip()]:
            for config in args.configs.split(","):
                w_bits, a_bits = parse_config(config)
                rows += measure(model_id, w_bits, a_bits, args.samples, args.calib, Path(tmp))
    text = render(rows, args, command.strip())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
