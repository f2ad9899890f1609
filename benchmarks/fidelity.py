"""Fidelity benchmark: methods x bit settings x models x seeds, full test-set accuracy, time and memory.

Every run is a separate worker process (so its peak resident memory is its own) calling
``quantplug.api.apply`` with identical calibration data and seeds across methods. The table is
printed and written to ``benchmarks/results/fidelity.md`` (and ``.json``) together with the exact
command, the thread count, the torch version and the machine load.

    python benchmarks/fidelity.py --models zoo:resnet18-fmnist zoo:mobilenetv2-fmnist \
        --settings W4A4 W3A3 W2A4 W2A2 --methods nearest adaround brecq qdrop --preset cpu-fast

Two-bit settings run ``--seeds-2bit`` seeds (default 3) and report mean and spread (min..max).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def parse_setting(text: str) -> tuple[int, int]:
    text = text.upper()
    if not (text.startswith("W") and "A" in text):
        raise argparse.ArgumentTypeError(f"settings look like W2A4, got {text!r}")
    w, a = text[1:].split("A")
    return int(w), int(a)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process; return metrics, wall time and peak RSS."""
    import torch

    from quantplug.api import apply

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    overrides = {"weight.bits": spec["w_bits"], "activation.bits": spec["a_bits"], "calib.seed": spec["seed"],
                 "calib.num_samples": spec["calib"], **spec.get("overrides", {})}
    result = apply(spec["method"], spec["model"], data=spec.get("data"), preset=spec.get("preset"),
                   overrides=overrides, eval_samples=spec.get("eval_samples"), evaluate_fp=spec["evaluate_fp"])
    return {
        "fp": result.fp_metrics,
        "quant": result.quant_metrics,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "recipe": result.recipe.to_dict(),
        "units": len(result.records),
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "QUANTPLUG_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({min(values):.2f}..{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["zoo:resnet18-fmnist", "zoo:mobilenetv2-fmnist"])
    parser.add_argument("--settings", nargs="+", type=parse_setting, default=[(4, 4), (3, 3), (2, 4), (2, 2)])
    parser.add_argument("--methods", nargs="+", default=["nearest", "adaround", "brecq", "qdrop"])
    parser.add_argument("--preset", default="cpu-fast")
    parser.add_argument("--data", default="fmnist:32", help="data spec (calibration: train split, eval: test split)")
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--seeds-2bit", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--override", action="append", default=[], metavar="PATH=VALUE",
                        help="recipe override for every run (e.g. recon.iters=500)")
    parser.add_argument("--mobilenet-reg-weight", type=float, default=0.1,
                        help="AdaRound lambda on MobileNetV2 (BRECQ / QDrop use 0.1)")
    parser.add_argument("--out", default=str(RESULTS / "fidelity.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from quantplug.config import parse_override

    common = dict(parse_override(o) for o in args.override)
    command = "python benchmarks/fidelity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    fp_cache: dict[str, dict[str, float]] = {}
    for model in args.models:
        for w_bits, a_bits in args.settings:
            seeds = [args.seed + i for i in range(args.seeds_2bit if min(w_bits, a_bits) <= 2 else 1)]
            for method in args.methods:
                overrides = dict(common)
                if "mobilenet" in model and method != "nearest":
                    overrides["rounding.options.reg_weight"] = args.mobilenet_reg_weight
                runs = []
                for seed in seeds:
                    spec = {"method": method, "model": model, "w_bits": w_bits, "a_bits": a_bits, "seed": seed,
                            "calib": args.calib_samples, "data": args.data, "eval_samples": args.eval_samples,
                            "preset": args.preset if method != "nearest" else None, "overrides": overrides,
                            "threads": args.threads, "evaluate_fp": model not in fp_cache}
                    out = run_worker(spec)
                    if "error" not in out and out["fp"]:
                        fp_cache[model] = out["fp"]
                    runs.append(out)
                    print(f"{model} W{w_bits}A{a_bits} {method} seed {seed}: "
                          f"{out.get('quant', {}).get('top1', out.get('error'))}", flush=True)
                ok = [r for r in runs if "error" not in r]
                rows.append({
                    "model": model, "setting": f"W{w_bits}A{a_bits}", "method": method, "seeds": seeds,
                    "top1": [r["quant"]["top1"] for r in ok], "seconds": [r["seconds"] for r in ok],
                    "peak_rss_mib": [r["peak_rss_mib"] for r in ok],
                    "errors": [r["error"] for r in runs if "error" in r],
                })
                # rewrite the table after every configuration: an interrupted benchmark keeps what it measured
                write_table(rows, fp_cache, args, command, load_start, os.getloadavg(), quiet=True)
    write_table(rows, fp_cache, args, command, load_start, os.getloadavg())


def write_table(rows: list[dict[str, Any]], fp: dict[str, dict[str, float]], args: argparse.Namespace,
                command: str, load_start: tuple[float, ...], load_end: tuple[float, ...], quiet: bool = False) -> None:
    import torch

    lines = [
        "# Fidelity: nearest vs reconstruction methods on the zoo models",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s) per run, "
        f"Python {platform.python_version()}; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end "
        "(other jobs share the machine when this is above the thread count). "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', 'unset')}.",
        "",
        f"Preset `{args.preset}` for the reconstruction methods; calibration {args.calib_samples} training images "
        f"(same images and seeds for every method); evaluation on {args.eval_samples or 'all'} test images of "
        f"`{args.data}`. Two-bit settings: mean (min..max) over {args.seeds_2bit} seeds.",
        "",
        "| model | FP top-1 | setting | method | top-1 | wall s / run | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fp_top1 = fp.get(r["model"], {}).get("top1")
        fp_text = f"{fp_top1:.2f}" if fp_top1 is not None else "n/a"
        top1 = summarize(r["top1"]) if r["top1"] else f"error: {r['errors'][:1]}"
        secs = f"{statistics.mean(r['seconds']):.0f}" if r["seconds"] else "n/a"
        rss = f"{max(r['peak_rss_mib']):.0f}" if r["peak_rss_mib"] else "n/a"
        lines.append(f"| {r['model']} | {fp_text} | {r['setting']} | {r['method']} | {top1} | {secs} | {rss} |")
    text = "\n".join(lines) + "\n"
    if not quiet:
        print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "fp": fp}, indent=2))


if __name__ == "__main__":
    main()
