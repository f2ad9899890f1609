"""How much quantization-aware fine-tuning recovers after PTQ on the quantplug zoo models (this plugin's README table).

For every model, bit width and PTQ base: run the base recipe through ``quantplug.api.apply`` (PTQ top-1 on the
test set), then run the ``qat`` pass on that quantized model exactly as ``quantplug apply --plugin qat --base
BASE`` does after PTQ (same recipe, seed and data) and evaluate again. Doing both in one process measures the
PTQ and the QAT accuracy of the same run. The table is rewritten after every row, with the 1-minute load
average before and after it (``os.getloadavg``, what ``uptime`` prints), and the rows are also written as JSON
next to it (``results.json`` for ``results.md``). ``--ptq-override KEY=VALUE`` shortens the PTQ schedule (e.g.
``recon.iters=500``); the overrides are recorded in the table header.

    OMP_NUM_THREADS=1 python plugins/quantplug-qat/bench_qat.py --out plugins/quantplug-qat/results.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from quantplug_qat import QATPass
from torch.utils.data import DataLoader

from quantplug.api import apply
from quantplug.evaluate import evaluate
from quantplug.interfaces import PassContext
from quantplug.plugins import Session

DATA = {"zoo:resnet18-fmnist": "fmnist", "zoo:mobilenetv2-fmnist": "fmnist:48"}
PRESETS = {"qdrop": "cpu-fast"}


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value parsed as JSON when it is JSON (``recon.iters=500``), else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


HEADER = ("| model | W/A | PTQ base | FP top-1 | PTQ top-1 | + QAT top-1 | recovered | PTQ s | QAT s | "
          "load before / after |\n|---|---|---|---|---|---|---|---|---|---|\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DATA))
    parser.add_argument("--bits", nargs="+", default=["2/4", "2/2"], help="W/A pairs")
    parser.add_argument("--bases", nargs="+", default=["nearest", "qdrop"])
    parser.add_argument("--qat", default='{"epochs": 2, "num_samples": 8192}',
                        help="qat pass options as JSON (data defaults to the model's data)")
    parser.add_argument("--eval-samples", type=int, default=None, help="default: the full 10 000-image test set")
    parser.add_argument("--ptq-override", type=parse_override, action="append", default=[],
                        help="KEY=VALUE recipe override of the PTQ base (repeatable), e.g. recon.iters=500")
    parser.add_argument("--out", default="results.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    session = Session()
    device = torch.device("cpu")
    rows: list[str] = []
    records: list[dict[str, Any]] = []
    ptq_overrides = dict(args.ptq_override)
    started = time.strftime("%Y-%m-%d %H:%M")
    for base in args.bases:
        for model in args.models:
            for bits in args.bits:
                w_bits, a_bits = (int(b) for b in bits.split("/"))
                data = DATA[model]
                load_before = os.getloadavg()[0]
                t0 = time.perf_counter()
                result = apply(base, model, data=data, preset=PRESETS.get(base), eval_samples=args.eval_samples,
                               overrides={**ptq_overrides, "weight.bits": w_bits, "activation.bits": a_bits},
                               session=session)
                ptq_seconds = time.perf_counter() - t0
                options = {"data": data, **json.loads(args.qat)}
                adapter = session.adapter_for(model)
                fp_model = adapter.fold_batchnorm(adapter.load(model, device=device).eval())
                ctx = PassContext(session, result.recipe, adapter, fp_model, [], [], device,
                                  result.recipe.calib.seed, "quantized", model_id=model)
                t1 = time.perf_counter()
                assert result.model is not None
                QATPass(QATPass.make_config(options)).run(result.model, ctx)
                test_set = session.model_data(model, data, "test", num_samples=args.eval_samples)
                test = list(DataLoader(test_set, batch_size=max(result.recipe.calib.batch_size, 64)))
                qat_top1 = evaluate(result.model, adapter, test, device, "evaluate qat")["top1"]
                qat_seconds = time.perf_counter() - t1
                fp, ptq = result.fp_metrics["top1"], result.quant_metrics["top1"]
                recovered = (qat_top1 - ptq) / (fp - ptq) if fp > ptq else float("nan")
                rows.append(f"| {model} | W{w_bits}A{a_bits} | {base}{' ' + PRESETS[base] if base in PRESETS else ''} "
                            f"| {fp:.2f} | {ptq:.2f} | {qat_top1:.2f} | {recovered:.0%} of the gap | "
                            f"{ptq_seconds:.0f} | {qat_seconds:.0f} | {load_before:.1f} / {os.getloadavg()[0]:.1f} |")
                records.append({"model": model, "data": data, "w_bits": w_bits, "a_bits": a_bits, "base": base,
                                "preset": PRESETS.get(base), "ptq_overrides": ptq_overrides, "qat_options": options,
                                "fp_top1": fp, "ptq_top1": ptq, "qat_top1": qat_top1, "ptq_seconds": ptq_seconds,
                                "qat_seconds": qat_seconds, "load_before": load_before,
                                "load_after": os.getloadavg()[0]})
                write(args.out, rows, records, args, started, options)
                print(rows[-1], flush=True)


def write(path: str, rows: list[str], records: list[dict[str, Any]], args: argparse.Namespace, started: str,
          options: dict) -> None:
    evaluated = f"first {args.eval_samples}" if args.eval_samples else "all 10 000"
    qat = {k: v for k, v in options.items() if k != "data"}
    invocation = "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv)
    ptq = ", ".join(f"{k}={json.dumps(v)}" for k, v in dict(args.ptq_override).items()) or "none"
    text = (f"Produced by `{invocation}`.\n\n"
            f"Fashion-MNIST test images: {evaluated}. PTQ overrides: {ptq}. "
            f"QAT options {json.dumps(qat)} (data: the model's own "
            f"training split). Started {started}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
            f"{platform.machine()}, {os.cpu_count()} cores.\n\n" + HEADER + "\n".join(rows) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    json_path = Path(path).with_suffix(".json")
    json_path.write_text(json.dumps({"invocation": invocation, "started": started, "rows": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
