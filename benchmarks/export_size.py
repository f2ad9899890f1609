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

Every model runs through its adapter (``adapter.forward``), so Hugging Face models (whose raw output is a
``ModelOutput``) are compared on the logits the adapter extracts, exactly like the exporters do. The number
of test samples is capped per model so that one batch of outputs stays under ``--max-output-mb`` (a decoder's
logits are sequence x vocabulary per sample).

    python benchmarks/export_size.py                                    # zoo CNN + zoo decoder, W8A8 / W4A8
    python benchmarks/export_size.py --models testing:tiny-resnet,testing:tiny-decoder --configs w4a8,w3a4
    python benchmarks/export_size.py --data zoo:mobilenetv2-fmnist=fmnist:48 --models zoo:mobilenetv2-fmnist
    python benchmarks/export_size.py --out benchmarks/results/export.md # the saved table

Needs ``pip install ./plugins/quantplug-onnx`` for the ONNX rows (skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from quantplug.api import apply
from quantplug.builtins.exporters import PACKED_WEIGHTS, IntExporter, directory_bytes, load_packed, split_aliases
from quantplug.export import WEIGHTS, load, read_manifest, unshared
from quantplug.plugins import Session

DEFAULT_MODELS = ("zoo:resnet18-fmnist", "zoo:opt-austen")
logger = logging.getLogger("export_size")


@dataclass
class Row:
    model: str
    config: str
    samples: int
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
    """A session with the installed plugins (model adapters for zoo / Hugging Face models, the onnx exporter)."""
    try:
        import quantplug_onnx
    except ImportError:
        quantplug_onnx = None
    return Session(), quantplug_onnx


def take(inputs: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch of model inputs (a tensor, a mapping or a tuple of tensors)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, Mapping):
        return {k: v[start:stop] for k, v in inputs.items()}
    return tuple(t[start:stop] for t in inputs)


def batch_size_of(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs[0]
    return int(first.shape[0])


def onnx_feeds(inputs: Any) -> tuple[torch.Tensor, ...]:
    """The graph inputs in the exporter's order (a mapping's keys in order, else positional)."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, Mapping):
        return tuple(inputs.values())
    return tuple(inputs)


def eval_inputs(session: Session, run_dir: Path, samples: int) -> Any:
    manifest = read_manifest(str(run_dir))
    adapter = session.adapter_for(manifest["model_id"])
    data = manifest["data"]
    dataset = session.model_data(manifest["model_id"], data, "test", num_samples=samples,
                                 model_options=manifest.get("model_options"))
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=samples, shuffle=False)))
    inputs, _ = adapter.prepare_batch(batch, torch.device("cpu"))
    return inputs


def sample_budget(session: Session, model_id: str, data: str | None, samples: int, max_output_mb: float) -> int:
    """``samples``, lowered so that the float model's outputs for one batch fit ``max_output_mb``."""
    adapter = session.adapter_for(model_id)
    data = data or adapter.default_data(model_id)
    if not data:
        raise SystemExit(f"{model_id} has no default data; pass --data {model_id}=SPEC")
    dataset = session.model_data(model_id, data, "test", num_samples=1)
    inputs, _ = adapter.prepare_batch(next(iter(torch.utils.data.DataLoader(dataset, batch_size=1))),
                                      torch.device("cpu"))
    model = adapter.load(model_id, device=torch.device("cpu")).eval()
    with torch.no_grad():
        per_sample = adapter.forward(model, inputs).numel() * 4
    return max(1, min(samples, int(max_output_mb * 2**20 // per_sample)))


def max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a_t = torch.as_tensor(a).detach().float()
    b_t = torch.as_tensor(b).detach().float()
    if a_t.shape != b_t.shape:
        raise ValueError(f"output shapes differ: {tuple(a_t.shape)} vs {tuple(b_t.shape)}")
    return float((a_t - b_t).abs().max())


def float_bytes(session: Session, model_id: str, tmp: Path) -> int:
    adapter = session.adapter_for(model_id)
    model = adapter.fold_batchnorm(adapter.load(model_id, device=torch.device("cpu")).eval())
    path = tmp / f"float-{model_id.replace(':', '-').replace('/', '-')}.safetensors"
    state, _ = split_aliases({k: v.detach() for k, v in model.state_dict().items()})  # tied weights once
    save_file(unshared(state), str(path))
    return path.stat().st_size


def metric_text(result: Any) -> str:
    """The run's headline metric, full precision -> quantized (top-1 or perplexity)."""
    for key, fmt in (("top1", "{:.2f} %"), ("accuracy", "{:.2f} %"), ("perplexity", "{:.2f}")):
        if key in result.quant_metrics:
            fp = result.fp_metrics.get(key)
            before = fmt.format(fp) + " -> " if fp is not None else ""
            return f"{key} {before}{fmt.format(result.quant_metrics[key])}"
    return ""


def measure(model_id: str, data: str | None, w_bits: int, a_bits: int, samples: int, calib: int,
            tmp: Path) -> list[Row]:
    session, onnx_plugin = session_with_plugins()
    adapter = session.adapter_for(model_id)
    config = f"W{w_bits}A{a_bits}"
    run_dir = tmp / f"{model_id.replace(':', '-')}-{config}"
    result = apply("nearest", model_id, data=data, session=session, out_dir=str(run_dir), eval_samples=samples,
                   overrides={"calib.num_samples": calib, "weight.bits": w_bits, "activation.bits": a_bits})
    model = result.model
    assert model is not None
    model.eval()
    x = eval_inputs(session, run_dir, samples)
    n = batch_size_of(x)
    label = f"{model_id} ({read_manifest(str(run_dir))['data']})"
    with torch.no_grad():
        ref = adapter.forward(model, x)
        one_by_one = torch.cat([adapter.forward(model, take(x, i, i + 1)) for i in range(n)])
        noise = max_diff(one_by_one, ref)
        reloaded = adapter.forward(load(str(run_dir), session=session), x)
    rows = [
        Row(label, config, n, "float (fp32 state dict)", float_bytes(session, model_id, tmp), None, None,
            note="baseline"),
        Row(label, config, n, "fake-quant run (safetensors)", (run_dir / WEIGHTS).stat().st_size,
            sum(directory_bytes(run_dir).values()), max_diff(reloaded, ref),
            note=f"{metric_text(result)}; PyTorch batch vs one-by-one: {noise:.3g}"),
    ]
    int_dir = tmp / f"{run_dir.name}-int"
    IntExporter().export(model, run_dir, int_dir)
    with torch.no_grad():
        packed_out = adapter.forward(load_packed(int_dir, session=session), x)
    rows.append(Row(label, config, n, "int (packed safetensors)", (int_dir / PACKED_WEIGHTS).stat().st_size,
                    sum(directory_bytes(int_dir).values()), max_diff(packed_out, ref)))
    if onnx_plugin is None:
        rows.append(Row(label, config, n, "onnx (QDQ)", 0, None, None, note="quantplug-onnx not installed"))
        return rows
    from quantplug_onnx._export import run_onnxruntime

    onnx_dir = tmp / f"{run_dir.name}-onnx"
    info = onnx_plugin.OnnxExporter().export(model, run_dir, onnx_dir, session=session)
    path = str(onnx_dir / "model.onnx")
    feeds = onnx_feeds(x)
    exact = run_onnxruntime(path, feeds, exact=True)
    default = run_onnxruntime(path, feeds, exact=False)
    agree = float((torch.as_tensor(exact).argmax(-1) == ref.argmax(-1)).float().mean())
    weight_types = sorted(set(info["weight_types"].values()))
    rows.append(Row(label, config, n, f"onnx (QDQ, opset {info['opset']})", os.path.getsize(path),
                    sum(directory_bytes(onnx_dir).values()), max_diff(exact, ref), max_diff(default, ref),
                    note="weights " + "/".join(weight_types) + f"; argmax agreement {100 * agree:.2f} %"))
    return rows


def fmt_bytes(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


def render(rows: list[Row], args: argparse.Namespace, command: str, context: Mapping[str, str]) -> str:
    lines = [
        "# Deployable formats: bytes on disk and output difference",
        "",
        f"Produced by `{command}` on {context['date']} (torch {torch.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
        f"{torch.get_num_threads()} thread(s); load average {context['load_before']} at the start, "
        f"{context['load_after']} at the end; {context['minutes']} minutes).",
        "",
        "Round-to-nearest PTQ (`--plugin nearest`: per-channel asymmetric weights, per-tensor asymmetric "
        f"activations, first and last layer at 8 bits), {args.calib} calibration samples. Differences are the "
        "largest absolute difference of the model outputs (the logits the model adapter returns) from the "
        "PyTorch fake-quant model in memory, over the *samples* test samples of the data named after the model "
        f"(at most {args.samples}, fewer where one batch of outputs would exceed {args.max_output_mb:g} MB). "
        "*weights* is the weights file alone (`model.safetensors`, `model.packed.safetensors`, `model.onnx`), "
        "*directory* adds the manifest (`quantplug.json`, which copies the run's recipe, per-unit losses and "
        "metrics). *ratio* is weights / float.",
        "",
        "| model (data) | setting | samples | format | weights (bytes) | ratio | directory (bytes) | max abs diff | "
        "onnxruntime defaults | note |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
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
        lines.append(f"| {row.model} | {row.config} | {row.samples} | {row.fmt} | {fmt_bytes(row.weights_bytes)} | "
                     f"{ratio} | {fmt_bytes(row.dir_bytes)} | {diff} | {diff_default} | {row.note} |")
    lines += [
        "",
        "Notes:",
        "",
        "* *float* is the full-precision model's state dict as it is quantized (batch norm folded into the "
        "convolutions), in safetensors, tied weights stored once.",
        "* The run's `model.safetensors` keeps the full-precision weights next to the integer codes (so a run can "
        "be re-reconstructed); the packed format drops both for the codes at their bit width. Tensors that are "
        "not quantized (embeddings, norms, biases, activation scales) stay fp32 in every format.",
        "* The packed format and the reloaded run are bit-identical to the fake-quant model (difference 0).",
        "* onnxruntime sums in a different order than PyTorch; now and then an activation lands on the other "
        "side of a rounding boundary and one code step propagates to the logits. The *note* of the fake-quant "
        "row gives PyTorch's own difference between running the batch at once and one sample at a time: the "
        "same order of magnitude. *max abs diff* for ONNX uses onnxruntime with "
        "`session.qdq_matmulnbits_accuracy_level=0` and the `WeightBiasQuantization` optimizer disabled; "
        "*onnxruntime defaults* is a plain `InferenceSession`, whose fused 4-bit `MatMulNBits` re-quantizes "
        "its input to int8 blocks and whose bias quantization rounds float biases to int32. *argmax agreement* "
        "is the share of samples (tokens for a decoder) whose largest logit is the same in onnxruntime "
        "(exact settings) and PyTorch.",
        "* Where PyTorch's own batch / one-by-one difference is 0 (the decoder: its row-wise matrix products do "
        "not depend on the batch), it gives no scale for the onnxruntime difference; that difference may also "
        "come from onnxruntime's float kernels (layer norm, softmax) and was not broken down further. The "
        "argmax agreement shows what it does to predictions.",
        "* ONNX stores 2-4 bit weights as INT4 / UINT4 (two per byte), so 2- and 3-bit layers take as much room "
        "as 4-bit ones there; the packed format stores every width densely.",
    ]
    if any(row.model.startswith("testing:") for row in rows):
        lines.append("* The tiny models have a few thousand parameters, so fixed costs (safetensors headers with "
                     "one entry per tensor, ONNX graph structure) weigh much more than they would on larger models.")
    lines.append("")
    return "\n".join(lines)


def parse_data(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        model_id, sep, spec = item.partition("=")
        if not sep or not model_id or not spec:
            raise SystemExit(f"bad --data {item!r}; use MODEL=DATA, e.g. zoo:mobilenetv2-fmnist=fmnist:48")
        out[model_id] = spec
    return out


def load_average() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model ids")
    parser.add_argument("--configs", default="w8a8,w4a8", help="comma-separated bit settings, e.g. w4a8,w3a8")
    parser.add_argument("--data", action="append", default=[], metavar="MODEL=DATA",
                        help="data of a model (default: the adapter's default data), e.g. "
                             "zoo:mobilenetv2-fmnist=fmnist:48")
    parser.add_argument("--samples", type=int, default=256, help="test samples for the output comparison (at most)")
    parser.add_argument("--max-output-mb", type=float, default=64.0,
                        help="fewer samples where one batch of fp32 outputs would exceed this")
    parser.add_argument("--calib", type=int, default=256, help="calibration samples")
    parser.add_argument("--out", default=None, help="write the markdown table here (default: print it)")
    args = parser.parse_args(argv)
    data = parse_data(args.data)
    torch.set_num_threads(1)
    os.environ.setdefault("QUANTPLUG_PROGRESS", "0")
    command = "python benchmarks/export_size.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    context = {"date": datetime.date.today().isoformat(), "load_before": load_average()}
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="quantplug-export-bench-") as tmp:
        for model_id in [m.strip() for m in args.models.split(",") if m.strip()]:
            session, _ = session_with_plugins()
            samples = sample_budget(session, model_id, data.get(model_id), args.samples, args.max_output_mb)
            for config in args.configs.split(","):
                w_bits, a_bits = parse_config(config)
                logger.info("%s %s: %d samples", model_id, config, samples)
                rows += measure(model_id, data.get(model_id), w_bits, a_bits, samples, args.calib, Path(tmp))
    context.update(load_after=load_average(), minutes=f"{(time.perf_counter() - started) / 60:.1f}")
    text = render(rows, args, command.strip(), context)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(main())
