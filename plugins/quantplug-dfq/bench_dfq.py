"""Per-tensor W8A8 / W6A8 top-1 of DFQ's steps on the quantplug zoo models (the table in this plugin's README).

Every configuration is the ``dfq`` recipe (nearest rounding, per-tensor asymmetric min-max weights, MSE
activations, 256 calibration samples) with a different ``passes`` slot, evaluated on the full Fashion-MNIST
test set unless ``--eval-samples`` says otherwise. The table is rewritten after every row, with the
1-minute load average before and after the row (``os.getloadavg``, what ``uptime`` prints).

    OMP_NUM_THREADS=1 python plugins/quantplug-dfq/bench_dfq.py --out plugins/quantplug-dfq/results.md
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from typing import Any

import torch
from quantplug_dfq import dfq_passes

from quantplug.api import apply
from quantplug.plugins import Session

DATA = {"zoo:mobilenetv2-fmnist": "fmnist:48", "zoo:resnet18-fmnist": "fmnist"}
EQUALIZE = {"name": "equalize", "options": {}}
ABSORB = {"name": "absorb-bias", "options": {}}
CONFIGS: dict[str, list[dict[str, Any]]] = {
    "none (per-tensor baseline)": [],
    "BC empirical": [{"name": "bias-correct", "options": {"mode": "empirical"}}],
    "CLE": [EQUALIZE],
    "CLE + BA": [EQUALIZE, ABSORB],
    "CLE + BA + BC analytic (data-free)": dfq_passes("analytic"),
    "CLE + BA + BC empirical (dfq default)": dfq_passes("empirical"),
}
HEADER = ("| model | W/A | passes | FP top-1 | quantized top-1 | delta | seconds | load before / after |\n"
          "|---|---|---|---|---|---|---|---|\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DATA))
    parser.add_argument("--w-bits", nargs="+", type=int, default=[8, 6])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--eval-samples", type=int, default=None, help="default: the full 10 000-image test set")
    parser.add_argument("--out", default="results.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    session = Session()
    rows: list[str] = []
    started = time.strftime("%Y-%m-%d %H:%M")
    for model in args.models:
        for w_bits in args.w_bits:
            for label in args.configs:
                load_before = os.getloadavg()[0]
                t0 = time.perf_counter()
                result = apply("dfq", model, data=DATA[model], eval_samples=args.eval_samples, session=session,
                               overrides={"weight.bits": w_bits, "activation.bits": 8, "passes": CONFIGS[label]})
                seconds = time.perf_counter() - t0
                fp, q = result.fp_metrics["top1"], result.quant_metrics["top1"]
                rows.append(f"| {model} | W{w_bits}A8 | {label} | {fp:.2f} | {q:.2f} | {q - fp:+.2f} | {seconds:.0f} | "
                            f"{load_before:.1f} / {os.getloadavg()[0]:.1f} |")
                write(args.out, rows, args, started)
                print(rows[-1], flush=True)


def write(path: str, rows: list[str], args: argparse.Namespace, started: str) -> None:
    evaluated = f"first {args.eval_samples}" if args.eval_samples else "all 10 000"
    text = (f"Fashion-MNIST test images: {evaluated}. Started {started}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), {platform.machine()}, {os.cpu_count()} cores.\n\n"
            + HEADER + "\n".join(rows) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
