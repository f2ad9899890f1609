"""Results table of recipes on models: one ``quantplug apply`` command per cell, run one at a time.

Each job is the exact command line printed in the table (``quantplug apply --plugin R [--preset P] MODEL --data D
--json --no-save`` plus extra ``-o`` overrides), run as a subprocess with ``OMP_NUM_THREADS`` set, on the full test
set unless ``--eval-samples`` is given. The machine's 1-minute load average (``/proc/loadavg``, what ``uptime``
prints) is recorded before and after every job, because the wall times depend on it. The markdown table and a
json file are rewritten after every job, so an interrupted run keeps what it measured.

    python benchmarks/recipe_table.py --models zoo:resnet18-fmnist zoo:mobilenetv2-fmnist --data fmnist \\
        --model-data zoo:mobilenetv2-fmnist=fmnist:48 --jobs bwn twn ttq "kmeans --w-bits 2" \\
        --out plugins/quantplug-lowbit/results/fmnist

``--resume`` keeps the rows of an earlier run of the same table whose command is unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from quantplug.export import atomic_write_text


def load_average() -> float:
    """The 1-minute load average (as ``uptime`` shows it)."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def job_command(job: str, model: str, data: str | None, eval_samples: int | None) -> list[str]:
    """``quantplug apply`` for one job: ``job`` is ``RECIPE [extra CLI arguments]``."""
    recipe, *extra = shlex.split(job)
    cmd = ["quantplug", "apply", "--plugin", recipe, model, "--json", "--no-save", *extra]
    if data:
        cmd += ["--data", data]
    if eval_samples:
        cmd += ["--eval-samples", str(eval_samples)]
    return cmd


def run_job(cmd: list[str], threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "QUANTPLUG_PROGRESS": "0"}
    load_before = load_average()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {"command": shlex.join(cmd), "seconds": seconds, "load_before": load_before,
                           "load_after": load_average(), "returncode": proc.returncode}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return row
    result = json.loads(proc.stdout)
    row.update(fp=result["fp"], quant=result["quant"], recipe=result["recipe"])
    return row


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| model | job | FP top-1 | top-1 | delta | wall (s) | load before / after | command |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['job']} | | failed | | {r['seconds']:.0f} | "
                         f"{r['load_before']:.1f} / {r['load_after']:.1f} | `{r['command']}`: {r['error']} |")
            continue
        fp, q = r["fp"].get("top1"), r["quant"].get("top1")
        delta = f"{q - fp:+.2f}" if fp is not None else ""
        fp_text = f"{fp:.2f}" if fp is not None else ""
        lines.append(f"| {r['model']} | {r['job']} | {fp_text} | {q:.2f} | {delta} | {r['seconds']:.0f} | "
                     f"{r['load_before']:.1f} / {r['load_after']:.1f} | `{r['command']}` |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--jobs", nargs="+", required=True, help='recipe plus CLI arguments, e.g. "ttq" or '
                                                                  '"bwn --preset reconstruct"')
    parser.add_argument("--data", default=None, help="data spec of every model (default: each model's own)")
    parser.add_argument("--model-data", action="append", default=[], metavar="MODEL=DATA",
                        help="data spec of one model, e.g. zoo:mobilenetv2-fmnist=fmnist:48 (overrides --data)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of OUT.json whose command is unchanged instead of running them again")
    parser.add_argument("--eval-samples", type=int, default=None, help="default: the full test set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="output path without extension (.md and .json are written)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    invocation = shlex.join(["python", "benchmarks/recipe_table.py", *(argv if argv is not None else sys.argv[1:])])
    started = time.strftime("%Y-%m-%d %H:%M")
    model_data = dict(item.split("=", 1) for item in args.model_data)
    previous: dict[str, dict[str, Any]] = {}
    if args.resume and out.with_suffix(".json").is_file():
        previous = {r["command"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]
                    if "error" not in r}
    rows: list[dict[str, Any]] = []
    for model in args.models:
        for job in args.jobs:
            cmd = job_command(job, model, model_data.get(model, args.data), args.eval_samples)
            kept = previous.get(shlex.join(cmd))
            row = kept if kept is not None else {"model": model, "job": job, **run_job(cmd, args.threads)}
            rows.append(row)
            header = (f"Produced by `{invocation}` (started {started}; torch {torch.__version__}, Python "
                      f"{platform.python_version()}, OMP_NUM_THREADS={args.threads}, "
                      f"{os.cpu_count()} cores shared with other jobs; load = 1-minute load average).")
            atomic_write_text(out.with_suffix(".md"), markdown(rows, header))
            atomic_write_text(out.with_suffix(".json"), json.dumps({"invocation": invocation, "rows": rows}, indent=2))
            status = "failed" if "error" in row else f"{row['quant'].get('top1', float('nan')):.2f}"
            print(f"{model} | {job}: {status} ({row['seconds']:.0f} s{', kept' if kept else ''})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
