"""Choose the centroid fine-tuning step on held-out *training* images (never the test set).

For each model, codebook size and fine-tuning setting, run the ``kmeans`` recipe (calibration: 1 024 training
images, seed 0) and measure top-1 on 2 000 other training images (seed 1; the two draws share about 34 images
by chance). Writes ``lr_validation.md`` / ``.json`` next to this file (or ``--out``), rewritten after every run,
with the 1-minute load average before / after each run.

    OMP_NUM_THREADS=1 python plugins/quantplug-kmeans/results/lr_validation.py \
        --models zoo:mobilenetv2-fmnist --bits 4 8 --settings "no fine-tuning" "lr 1e-3, unit max|W|" \
        "lr 1e-3, unit spacing"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from quantplug.api import apply
from quantplug.evaluate import evaluate
from quantplug.plugins import Session

HERE = Path(__file__).resolve().parent
MODELS = {"zoo:mobilenetv2-fmnist": "fmnist:48", "zoo:resnet18-fmnist": "fmnist"}
SETTINGS: dict[str, dict[str, Any]] = {
    "no fine-tuning": {"epochs": 0},
    "lr 1e-3, unit max|W|": {"lr": 1e-3, "lr_unit": "max"},
    "lr 1e-3, unit spacing": {"lr": 1e-3, "lr_unit": "spacing"},
    "lr 3e-3, unit spacing": {"lr": 3e-3, "lr_unit": "spacing"},
    "lr 1e-2, unit spacing": {"lr": 1e-2, "lr_unit": "spacing"},
}


def validation_top1(model: torch.nn.Module, session: Session, model_id: str, data: str) -> float:
    adapter = session.adapter_for(model_id)
    held_out = session.data_source_for(data).load(data, "train", num_samples=2000, seed=1)
    return evaluate(model, adapter, DataLoader(held_out, batch_size=256), torch.device("cpu"))["top1"]


def markdown(rows: list[dict[str, Any]], invocation: str) -> str:
    """The table of ``rows`` (``|`` in a setting's label escaped for markdown)."""
    lines = [f"Produced by `{invocation}`: top-1 on 2 000 held-out training images (seed 1), calibration and "
             "fine-tuning on 1 024 others (seed 0); never the test set.",
             "", "| model | bits | setting | validation top-1 | calibration task loss | seconds | "
             "load before / after |",
             "|---|---:|---|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['bits']} | {r['setting'].replace('|', chr(92) + '|')} | "
              f"{r['validation_top1']:.2f} | {r['calib_loss']:.4f} | {r['seconds']:.0f} | "
              f"{r['load_before']:.1f} / {r['load_after']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=HERE / "lr_validation", help="path without extension")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    invocation = "OMP_NUM_THREADS=1 python " + shlex.join(["plugins/quantplug-kmeans/results/lr_validation.py",
                                                            *(argv if argv is not None else sys.argv[1:])])
    rows: list[dict[str, Any]] = []
    for model_id in args.models:
        data = MODELS[model_id]
        session = Session()
        for bits in args.bits:
            for label in args.settings:
                options = SETTINGS[label]
                load_before = os.getloadavg()[0]
                t0 = time.perf_counter()
                result = apply("kmeans", model_id, data=data, eval_samples=16, evaluate_fp=False, session=session,
                               overrides={"weight.bits": bits, "passes": [{"name": "kmeans", "options": options}]})
                assert result.model is not None
                rows.append({"model": model_id, "bits": bits, "setting": label, "options": options,
                             "validation_top1": validation_top1(result.model, session, model_id, data),
                             "calib_loss": result.passes["kmeans"]["loss_after"],
                             "seconds": time.perf_counter() - t0, "load_before": load_before,
                             "load_after": os.getloadavg()[0]})
                print(rows[-1], flush=True)
                args.out.with_suffix(".md").write_text(markdown(rows, invocation))
                args.out.with_suffix(".json").write_text(json.dumps({"invocation": invocation, "rows": rows},
                                                                    indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
