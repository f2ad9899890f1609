"""Fidelity benchmark: methods x bit settings x models x seeds, full test-set accuracy, time and memory.

Every run is a separate worker process (so its peak resident memory is its own) calling
``quantplug.api.apply`` with identical calibration data and seeds across methods. The table is
printed and written to ``benchmarks/results/fidelity.md`` (and ``.json``) together with the exact
command, the thread count, the torch version and the machine load.

    python benchmarks/fidelity.py --models zoo:resnet18-fmnist zoo:mobilenetv2-fmnist \
        --settings W4A4 W3A3 W2A4 W2A2 --methods nearest adaround brecq qdrop --preset cpu-fast

Two-bit settings run ``--seeds-2bit`` seeds (default 3) and report mean and spread (min..max).

A method is ``PLUGIN[+BASE][#PRESET][@PATH=VALUE,...]``: ``mrecg+qdrop`` is ``--plugin mrecg --base qdrop``;
``qdrop@recon.cache=fp16`` adds recipe overrides to that method only; ``qdrop#official`` runs that method with
its own preset instead of ``--preset`` (a time-to-accuracy row next to the fast preset's; ``--set`` overrides
still apply, so run such rows in their own invocation without ``-o recon.iters=...``). A setting is ``W<bits>A<bits>``
or ``W<bits>`` (weights only, activations in full precision).
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def parse_setting(text: str) -> tuple[int, int]:
    """``W2A4`` -> (2, 4); ``W4`` (weights only) -> (4, 32)."""
    text = text.upper()
    w, _, a = text[1:].partition("A")
    if not text.startswith("W") or not w.isdigit() or not (a.isdigit() or (a == "" and "A" not in text)):
        raise argparse.ArgumentTypeError(f"settings look like W2A4 (or W4 for weights only), got {text!r}")
    return int(w), int(a) if a else 32


def setting_name(w_bits: int, a_bits: int) -> str:
    return f"W{w_bits}" if a_bits >= 32 else f"W{w_bits}A{a_bits}"


def parse_method(text: str) -> dict[str, Any]:
    """``PLUGIN[+BASE][#PRESET][@PATH=VALUE,...]`` -> plugin, base, the method's own preset (None: ``--preset``)
    and its own recipe overrides."""
    from quantplug.config import parse_override

    head, _, extra = text.partition("@")
    head, has_preset, preset = head.partition("#")
    plugin, _, base = head.partition("+")
    if not plugin or (has_preset and (not preset or "#" in preset)):
        raise argparse.ArgumentTypeError(f"methods look like PLUGIN[+BASE][#PRESET][@PATH=VALUE,...], got {text!r}")
    overrides = dict(parse_override(o) for o in extra.split(",") if o)
    return {"plugin": plugin, "base": base or None, "preset": preset or None, "overrides": overrides}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process; return metrics, wall time and peak RSS."""
    import torch

    from quantplug.api import apply, cli_overrides

    torch.set_num_threads(spec["threads"])
    code = code_version()  # before the run: the code this process imported, not what was committed meanwhile
    t0 = time.perf_counter()
    overrides = {**cli_overrides(w_bits=spec["w_bits"], a_bits=spec["a_bits"]), "calib.seed": spec["seed"],
                 "calib.num_samples": spec["calib"], **spec.get("overrides", {})}
    run_dir = spec.get("run_dir")  # with --runs-dir: checkpoints after every unit, resumed if interrupted
    result = apply(spec.get("plugin", spec["method"]), spec["model"], data=spec.get("data"), base=spec.get("base"),
                   preset=spec.get("preset"), overrides=overrides, eval_samples=spec.get("eval_samples"),
                   evaluate_fp=spec["evaluate_fp"], out_dir=run_dir, resume=run_dir is not None)
    return {
        "fp": result.fp_metrics,
        "quant": result.quant_metrics,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": _cpu_seconds(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "recipe": result.recipe.to_dict(),
        "code": code,
        "units": len(result.records),
        # reconstruction time summed over units: over every process when an interrupted run was resumed
        "recon_seconds": sum(r.seconds for r in result.records),
        # per-unit losses (plugins/quantplug-mrecg/plot_losses.py reads them as FILE.json#MODEL/SETTING/METHOD/SEED)
        "unit_records": [asdict(r) for r in result.records],
    }


def code_version() -> str:
    """The repository commit the run used (``+dirty`` with uncommitted changes), so rows can be traced to code."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "quantplug", "plugins",
                                "adapters"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) or "unknown"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
    parser.add_argument("--methods", nargs="+", default=["nearest", "adaround", "brecq", "qdrop"],
                        help="PLUGIN[+BASE][#PRESET][@PATH=VALUE,...], e.g. mrecg+qdrop, qdrop@recon.cache=fp16, "
                        "qdrop#official")
    parser.add_argument("--preset", default="cpu-fast")
    parser.add_argument("--data", default=None,
                        help="data spec (calibration: train split, eval: test split); default: the full Fashion-MNIST "
                        "at each zoo model's own input size (fmnist:32 for ResNet-18, fmnist:48 for MobileNetV2)")
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=None, help="default: the whole test split")
    parser.add_argument("--seeds-2bit", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--override", action="append", default=[], metavar="PATH=VALUE",
                        help="recipe override for every run (e.g. recon.iters=500)")
    parser.add_argument("--mobilenet-reg-weight", type=float, default=0.1,
                        help="AdaRound lambda on MobileNetV2 (the official MobileNetV2 configs use 0.1), for every "
                        "method whose rounding is adaround")
    parser.add_argument("--out", default=str(RESULTS / "fidelity.md"))
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs already recorded in --out's JSON (same configurations) and run the rest")
    parser.add_argument("--runs-dir", default=None,
                        help="save every run under DIR/<model>/<setting>/<method>/seed<N> with a checkpoint after "
                        "each unit; an interrupted run resumes there (for runs longer than a session)")
    parser.add_argument("--reuse", action="append", default=[], metavar="JSON",
                        help="also reuse the runs recorded in this JSON of another table (same configurations; "
                        "with --resume; repeatable)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from quantplug.config import parse_override

    common = dict(parse_override(o) for o in args.override)
    command = "python benchmarks/fidelity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    load_start = os.getloadavg()
    recorded: list[dict[Any, Any]] = []  # this table's own runs first, then --reuse tables in order
    earlier: dict[str, Any] = {"rows": [], "commands": []}  # rows this invocation does not ask for are kept
    if args.resume:
        recorded = [previous_runs(Path(path)) for path in [args.out, *args.reuse]]
        earlier = recorded_table(Path(args.out))
    commands = [c for c in earlier["commands"] if c != command] + [command]
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    fp_cache: dict[str, dict[str, float]] = {}
    methods = {m: parse_method(m) for m in args.methods}
    adaround_based = {m for m, parts in methods.items()
                      if rounding_of(parts, parts["preset"] or args.preset) == "adaround"}
    for model in args.models:
        for w_bits, a_bits in args.settings:
            setting = setting_name(w_bits, a_bits)
            seeds = [args.seed + i for i in range(args.seeds_2bit if min(w_bits, a_bits) <= 2 else 1)]
            # seed-major: every method gets its first seed before any gets its second
            for seed in seeds:
                for method, parts in methods.items():
                    spec = run_spec(args, common, model, (w_bits, a_bits), method, parts, seed,
                                    adaround=method in adaround_based, evaluate_fp=model not in fp_cache)
                    key = (model, setting, method)
                    row = rows.setdefault(key, {"model": model, "setting": setting, "method": method, "runs": []})
                    config = {k: spec[k] for k in CONFIG_KEYS}
                    out = recorded_run(recorded, (model, setting, method, seed), config)
                    if out is None:
                        out = run_worker(spec)
                        out["load_after"] = os.getloadavg()[0]
                        out["config"] = config
                    if "error" not in out and out.get("fp"):
                        fp_cache[model] = out["fp"]
                    elif model not in fp_cache:
                        fp_recorded = [d[("fp", model)] for d in recorded if ("fp", model) in d]
                        if fp_recorded:
                            fp_cache[model] = fp_recorded[0]
                    row["runs"].append({"seed": seed, **out})
                    print(f"{model} {setting} {method} seed {seed}: "
                          f"{out.get('quant', {}).get('top1', out.get('error'))}", flush=True)
                    # rewrite after every run: an interrupted benchmark keeps what it measured
                    write_table(merged(rows, earlier), fp_cache, args, commands, load_start, os.getloadavg(),
                                quiet=True)
    write_table(merged(rows, earlier), fp_cache, args, commands, load_start, os.getloadavg())


#: what decides a run's result besides (model, setting, method, seed): a recorded run is reused only if these match
CONFIG_KEYS = ("plugin", "base", "calib", "data", "eval_samples", "preset", "overrides")


def run_spec(args: argparse.Namespace, common: dict[str, Any], model: str, bits: tuple[int, int], method: str,
             parts: dict[str, Any], seed: int, *, adaround: bool, evaluate_fp: bool) -> dict[str, Any]:
    """Everything a worker needs for one run."""
    overrides = dict(common)
    if "mobilenet" in model and adaround:
        overrides["rounding.options.reg_weight"] = args.mobilenet_reg_weight
    overrides.update(parts["overrides"])
    return {"method": method, "plugin": parts["plugin"], "base": parts["base"], "model": model,
            "w_bits": bits[0], "a_bits": bits[1], "seed": seed, "calib": args.calib_samples,
            "data": args.data or model_data(model), "eval_samples": args.eval_samples,
            "preset": (parts["preset"] or args.preset) if parts["plugin"] != "nearest" else None,
            "overrides": overrides,
            "threads": args.threads, "evaluate_fp": evaluate_fp,
            "run_dir": run_dir(args.runs_dir, model, setting_name(*bits), method, seed)}


def recorded_run(recorded: list[dict[Any, Any]], key: tuple[str, str, str, int],
                 config: dict[str, Any]) -> dict[str, Any] | None:
    """The first recorded run of ``key`` made with ``config`` (runs recorded before 2026-11-22 carry no config and
    are trusted); None if there is none."""
    candidates = [d[key] for d in recorded if key in d]
    out = next((c for c in candidates if c.get("config", config) == config), None)
    if out is None and candidates:
        print(f"{' '.join(map(str, key))}: recorded with {candidates[0].get('config')}, now {config}: running again",
              flush=True)
    return out


def run_dir(root: str | None, model: str, setting: str, method: str, seed: int) -> str | None:
    if root is None:
        return None
    safe = [part.replace(":", "_").replace("/", "_").replace("@", "_at_") for part in (model, method)]
    return str(Path(root) / safe[0] / setting / safe[1] / f"seed{seed}")


def rounding_of(parts: dict[str, Any], preset: str) -> str:
    """The rounding component the method's recipe uses (its MobileNetV2 lambda applies only to adaround)."""
    from quantplug.api import resolve
    from quantplug.plugins import Session

    if parts["plugin"] == "nearest":
        return "nearest"
    recipe = resolve(Session(), parts["plugin"], base=parts["base"], preset=preset, overrides=parts["overrides"])
    return recipe.rounding.name


def model_data(model: str) -> str:
    """The full Fashion-MNIST at the resolution the zoo model was trained on (its default data is the subset)."""
    from quantplug.plugins import Session

    default = Session().adapter_for(model).default_data(model) or "fmnist:32"
    return default.replace("fmnist-subset", "fmnist")


def recorded_table(out: Path) -> dict[str, Any]:
    """``out``'s JSON as ``fidelity_summary.read_table`` reads it (no rows, commands or fp if there is none yet)."""
    path = out.with_suffix(".json")
    if not path.is_file():
        return {"rows": [], "commands": [], "fp": {}}
    from quantplug.testing.scripts import load_script

    summary = load_script(Path(__file__).with_name("fidelity_summary.py"))
    try:
        return summary.read_table(path)
    except summary.SourceError as exc:
        raise SystemExit(f"error: {exc}") from exc


def previous_runs(out: Path) -> dict[Any, Any]:
    """Runs recorded in ``out``'s JSON by an earlier invocation, keyed (model, setting, method, seed)."""
    data = recorded_table(out)
    done: dict[Any, Any] = {("fp", m): v for m, v in data["fp"].items()}
    for row in data["rows"]:
        for run in row.get("runs", []):
            if "error" not in run:
                done[(row["model"], row["setting"], row["method"], run["seed"])] = {
                    k: v for k, v in run.items() if k != "seed"}
    return done


def merged(rows: dict[tuple[str, str, str], dict[str, Any]], earlier: dict[str, Any]) -> list[dict[str, Any]]:
    """This invocation's rows, then the earlier rows it did not ask for (a table accumulates across invocations).
    An earlier row's seeds that this invocation did not run are kept too."""
    out = []
    for key, row in rows.items():
        old = next((r for r in earlier["rows"] if (r["model"], r["setting"], r["method"]) == key), None)
        seeds = {run["seed"] for run in row["runs"]}
        extra = [run for run in (old or {}).get("runs", []) if run["seed"] not in seeds]
        out.append({**row, "runs": sorted(row["runs"] + extra, key=lambda run: run["seed"])})
    out += [r for r in earlier["rows"] if (r["model"], r["setting"], r["method"]) not in rows]
    return out


def write_table(rows: list[dict[str, Any]], fp: dict[str, dict[str, float]], args: argparse.Namespace,
                commands: list[str], load_start: tuple[float, ...], load_end: tuple[float, ...],
                quiet: bool = False) -> None:
    import torch

    from quantplug.export import atomic_write_text

    lines = [
        "# Fidelity: nearest vs reconstruction methods on the zoo models",
        "",
        "Commands (with `--resume` a table keeps the runs of earlier invocations; the last one is the latest, and "
        "the machine and settings lines below describe it; each run's JSON entry records its own configuration):",
        "",
        *(f"- `{c}`" for c in commands),
        "",
        f"Machine: {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s) per run, "
        f"Python {platform.python_version()}; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end "
        "(other jobs share the machine when this is above the thread count). "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', 'unset')}.",
        "",
        f"Preset `{args.preset}` for the reconstruction methods (a method named `NAME#PRESET` uses its own); "
        f"calibration {args.calib_samples} training images "
        f"(same images and seeds for every method); evaluation on {args.eval_samples or 'all'} test images of "
        f"`{args.data or 'fmnist:<size the model was trained at>'}`. "
        f"Two-bit settings: mean (min..max) over {args.seeds_2bit} seeds.",
        "",
        "*CPU s* is the run's own processor time (user + system), which machine load does not inflate; *wall s*"
        " includes waiting for a core and is only comparable between runs made under the same load.",
        "",
        "| model | FP top-1 | setting | method | seeds | top-1 | CPU s / run | wall s / run | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = [run for run in r["runs"] if "error" not in run]
        errors = [run["error"] for run in r["runs"] if "error" in run]
        fp_top1 = fp.get(r["model"], {}).get("top1")
        fp_text = f"{fp_top1:.2f}" if fp_top1 is not None else "n/a"
        top1 = summarize([run["quant"]["top1"] for run in ok]) if ok else f"error: {errors[:1]}"
        cpu = [run["cpu_seconds"] for run in ok if "cpu_seconds" in run]
        cpu_text = f"{statistics.mean(cpu):.0f}" if cpu else "n/a"
        secs = f"{statistics.mean(run['seconds'] for run in ok):.0f}" if ok else "n/a"
        rss = f"{max(run['peak_rss_mib'] for run in ok):.0f}" if ok else "n/a"
        seeds = ",".join(str(run["seed"]) for run in ok) or "-"
        lines.append(f"| {r['model']} | {fp_text} | {r['setting']} | {r['method']} | {seeds} | {top1} | {cpu_text} "
                     f"| {secs} | {rss} |")
    text = "\n".join(lines) + "\n"
    if not quiet:
        print(text)
    out = Path(args.out)
    atomic_write_text(out, text)
    atomic_write_text(out.with_suffix(".json"),
                      json.dumps({"command": commands[-1], "commands": commands, "rows": rows, "fp": fp}, indent=2))


if __name__ == "__main__":
    main()
