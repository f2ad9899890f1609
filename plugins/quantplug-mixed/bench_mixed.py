"""Uniform vs mixed-precision weights at the same average bit width: one model, one job at a time.

    OMP_NUM_THREADS=1 python plugins/quantplug-mixed/bench_mixed.py zoo:resnet18-fmnist --data fmnist --bits 3 \\
        --configs uniform hessian fisher output_mse --out plugins/quantplug-mixed/results/resnet18-w3.json

Each configuration is a ``quantplug.api.apply`` run (recipe ``--base``, default ``nearest``; ``uniform`` runs the base
alone at ``--bits``, the others run ``mixed`` on top of it with that sensitivity and an average of ``--budget`` weight
bits, by default ``--bits``: the size of the uniform run).
Rows go to the JSON file (appended, keyed by model / base / config, so reruns replace their row) and a markdown table
next to it is rewritten after every run. The 1-minute load average (``os.getloadavg``) is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from quantplug.api import apply

logger = logging.getLogger("bench_mixed")

COLUMNS = ("model", "base", "config", "budget_bits", "weight bits (allocated)", "weight bits (all)", "weight KiB",
           "fp top-1", "top-1", "drop", "pass s", "run s", "load before/after", "bits by kind")


def run_config(model: str, data: str, base: str, config: str, bits: int, overrides: dict[str, Any],
               eval_samples: int | None, budget: float | None = None) -> dict[str, Any]:
    """One run; returns the table row (plus the per-layer bit map)."""
    options = dict(overrides)
    options["weight.bits"] = bits
    if config == "uniform":
        plugin, recipe_base = base, None
    else:
        plugin, recipe_base = "mixed", (None if base == "nearest" else base)
        pass_options: dict[str, Any] = {"sensitivity": config}
        if budget is not None:
            pass_options["budget"] = budget
        options["passes"] = [{"name": "mixed", "options": pass_options}]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = apply(plugin, model, data=data, base=recipe_base, overrides=options, eval_samples=eval_samples)
    seconds = time.perf_counter() - start
    summary = result.passes.get("mixed", {})
    layers = _weight_bits(result.model)
    allocated = summary.get("average_bits")
    fp, quant = result.fp_metrics.get("top1"), result.quant_metrics["top1"]
    return {
        "model": model, "base": base, "config": config,
        "weight bits (allocated)": round(allocated, 3) if allocated is not None else bits,
        "weight bits (all)": round(_average(layers), 3),
        "weight KiB": round(sum(n * b for n, b in layers.values()) / 8 / 1024, 1),
        "fp top-1": round(fp, 2) if fp is not None else None,
        "top-1": round(quant, 2),
        "drop": round(fp - quant, 2) if fp is not None else None,
        "pass s": summary.get("seconds"),
        "run s": round(seconds, 1),
        "load before/after": f"{load_before:.1f}/{os.getloadavg()[0]:.1f}",
        "bits by kind": ", ".join(f"{k} {v:.2f}" for k, v in summary.get("average_bits_by_kind", {}).items()),
        "bit_map": {name: b for name, (_, b) in layers.items()},
        "recipe": result.recipe.name,
        "eval_samples": eval_samples,
    }


def _weight_bits(model: Any) -> dict[str, tuple[int, int]]:
    from quantplug.modules import quant_layers

    return {n: (m.weight.numel(), m.weight_spec.bits) for n, m in quant_layers(model) if m.weight_spec is not None}


def _average(layers: dict[str, tuple[int, int]]) -> float:
    return sum(n * b for n, b in layers.values()) / max(sum(n for n, _ in layers.values()), 1)


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["model"], row["base"], row["config"], row["budget_bits"], json.dumps(row["overrides"], sort_keys=True))


def write_table(rows: Sequence[dict[str, Any]], path: str) -> None:
    commands = list(dict.fromkeys(r["command"] for r in rows if r.get("command")))
    lines = ["Commands:", "", *(f"    {c}" for c in commands), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in COLUMNS) + " |")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", default=None)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--base", default="nearest")
    parser.add_argument("--budget", type=float, default=None,
                        help="average weight bits of the mixed runs (default: --bits, the uniform run's size)")
    parser.add_argument("--configs", nargs="+", default=["uniform", "hessian"])
    parser.add_argument("--eval-samples", type=int, default=None, help="default: the whole test set")
    parser.add_argument("-o", dest="overrides", action="append", default=[], help="recipe override path=value")
    parser.add_argument("--out", required=True, help="JSON file of rows; the markdown table goes next to it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    overrides = {}
    for text in args.overrides:
        key, _, value = text.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    rows: list[dict[str, Any]] = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)["rows"]
    command = "OMP_NUM_THREADS=1 python plugins/quantplug-mixed/bench_mixed.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    for config in args.configs:
        row = run_config(args.model, args.data, args.base, config, args.bits, overrides, args.eval_samples,
                         None if config == "uniform" else args.budget)
        budget = args.bits if config == "uniform" or args.budget is None else args.budget
        row.update(budget_bits=budget, overrides=overrides, commit=_commit(), command=command)
        rows = [r for r in rows if _key(r) != _key(row)] + [row]
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
        os.replace(tmp, args.out)
        write_table(rows, os.path.splitext(args.out)[0] + ".md")
        logger.info("%s %s: top-1 %.2f", args.model, config, row["top-1"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
