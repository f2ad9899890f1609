"""FlexRound's language experiments on this machine's models: nearest vs AdaRound vs FlexRound.

Per-tensor weight quantization of every Linear layer inside the transformer layers (embeddings and the
LM head in full precision) at W8, W4, W3 (weights only) and W8A8 (8-bit inputs of those layers too),
with round-to-nearest, AdaRound (layer-wise) and FlexRound (block-wise); at W8A8 FlexRound also runs
with QDrop-style input mixing (``activation_policy=drop``, p = 0.5, the FlexRound recipe's default).
Models: ``zoo:opt-austen`` and ``zoo:gptneo-austen`` (held-out perplexity on Austen's *Persuasion*),
``zoo:minilm`` (all-MiniLM-L6-v2, cosine of the sentence embedding to full precision).

Every run is a separate worker process (its peak resident memory is its own) calling
``quantplug.api.apply`` with the same calibration windows and seed across methods; the table is
rewritten after every run to ``benchmarks/results/transformers_flexround.md`` (and ``.json``).

    OMP_NUM_THREADS=1 python benchmarks/transformers_flexround.py --iters 200 --calib-samples 128

Lee et al., "FlexRound: Learnable Rounding based on Element-wise Division for Post-Training
Quantization", ICML 2023, section 4 (BERT on GLUE, GPT-Neo / OPT on WikiText-2 and PTB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from quantplug.export import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {"W8": (8, None), "W4": (4, None), "W3": (3, None), "W8A8": (8, 8)}
#: method label -> (recipe, extra overrides)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "nearest": ("nearest", {}),
    "adaround": ("adaround", {}),
    "flexround": ("flexround", {"activation_policy": {"name": "quantized", "options": {}}}),
    "flexround+qdrop": ("flexround", {}),
}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this process: metrics, wall time and peak RSS."""
    import torch

    from quantplug.api import apply

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    result = apply(spec["recipe"], spec["model"], overrides=spec["overrides"], eval_samples=spec["eval_samples"],
                   evaluate_fp=spec["evaluate_fp"])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "fp": result.fp_metrics,
        "quant": result.quant_metrics,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "units": len(result.records),
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "QUANTPLUG_PROGRESS": "0", "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def is_encoder(model: str) -> bool:
    return "minilm" in model


def run_overrides(method: str, setting: str, args: argparse.Namespace,
                  encoder: bool = False) -> tuple[str, dict[str, Any]]:
    recipe, extra = METHODS[method]
    w_bits, a_bits = SETTINGS[setting]
    overrides: dict[str, Any] = {
        "weight.bits": w_bits, "weight.granularity": "per_tensor", "calib.num_samples": args.calib_samples,
        "calib.batch_size": args.calib_batch, "calib.seed": args.seed,
        # every Linear of the transformer layers at the setting's bits (no 8-bit first / last layer)
        "bits.first_layer_bits": None, "bits.last_layer_bits": None,
    }
    if recipe != "nearest":
        iters = args.encoder_iters if encoder else args.iters
        overrides |= {"recon.iters": iters, "recon.batch_size": args.recon_batch}
    if a_bits is None:
        overrides |= {"activation": None, "recon.learn_act_step": False}
    else:
        overrides["activation.bits"] = a_bits
    return recipe, overrides | extra


def metric_of(model: str) -> str:
    return "embedding_cosine" if is_encoder(model) else "perplexity"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["zoo:opt-austen", "zoo:gptneo-austen", "zoo:minilm"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--iters", type=int, default=200, help="iterations per unit (the papers use 5 000 / 20 000)")
    parser.add_argument("--encoder-iters", type=int, default=50, help="iterations per unit for MiniLM")
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration windows of 128 tokens")
    parser.add_argument("--calib-batch", type=int, default=16)
    parser.add_argument("--recon-batch", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=256, help="held-out windows of the decoders")
    parser.add_argument("--encoder-eval-samples", type=int, default=64, help="held-out windows of MiniLM")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "transformers_flexround.md"))
    parser.add_argument("--resume", action="store_true",
                        help="reuse the runs recorded in --out's JSON with the same configuration (delete the JSON "
                             "when a model's weights change)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    command = "OMP_NUM_THREADS=1 python benchmarks/transformers_flexround.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    load_start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    fp: dict[str, dict[str, float]] = {}
    done: dict[str, dict[str, Any]] = {}
    previous = Path(args.out).with_suffix(".json")
    if args.resume and previous.is_file():
        recorded = json.loads(previous.read_text())
        done = {json.dumps(r["spec"], sort_keys=True): r for r in recorded.get("rows", [])
                if "spec" in r and "error" not in r}
        fp = {m: v for m, v in recorded.get("fp", {}).items() if m in args.models}
    for setting in args.settings:  # setting-major: an interrupted run still covers every model at the first settings
        for model in args.models:
            for method in args.methods:
                if method == "flexround+qdrop" and SETTINGS[setting][1] is None:
                    continue  # input mixing acts on quantized activations only
                recipe, overrides = run_overrides(method, setting, args, encoder=is_encoder(model))
                spec = {"recipe": recipe, "model": model, "overrides": overrides, "threads": args.threads,
                        "eval_samples": args.encoder_eval_samples if is_encoder(model) else args.eval_samples}
                key = json.dumps(spec, sort_keys=True)
                if key in done:
                    out = {k: v for k, v in done[key].items() if k not in ("model", "setting", "method", "spec")}
                else:
                    out = run_worker({**spec, "evaluate_fp": model not in fp})
                if out.get("fp"):
                    fp[model] = out["fp"]
                rows.append({"model": model, "setting": setting, "method": method, "spec": spec, **out})
                value = out.get("quant", {}).get(metric_of(model), out.get("error"))
                print(f"{model} {setting} {method}: {value}", flush=True)
                write_table(rows, fp, args, command, load_start, quiet=True)
    write_table(rows, fp, args, command, load_start)


def write_table(rows: list[dict[str, Any]], fp: dict[str, dict[str, float]], args: argparse.Namespace,
                command: str, load_start: tuple[float, ...], quiet: bool = False) -> None:
    import torch

    load_end = os.getloadavg()
    lines = [
        "# FlexRound language experiments: nearest vs AdaRound vs FlexRound on OPT, GPT-Neo and MiniLM",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} cores shared with other jobs (load average {load_start[0]:.1f} at start, "
        f"{load_end[0]:.1f} at end), {args.threads} thread per run, torch {torch.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        "Per-tensor weights for every Linear layer of the transformer layers (embeddings and LM head full "
        "precision); W8A8 also quantizes those layers' inputs (8-bit, per-tensor). "
        f"**Reduced budget** for this CPU: {args.iters} iterations per unit for the decoders and "
        f"{args.encoder_iters} for MiniLM (FlexRound's released code: 5 000 per block; AdaRound: 20 000 per "
        f"layer), {args.calib_samples} calibration windows of 128 tokens from the five training novels "
        f"(seed {args.seed}), reconstruction batch {args.recon_batch}. Decoders: perplexity on the first "
        f"{args.eval_samples} held-out 128-token windows of *Persuasion* (lower is better); MiniLM: cosine of the "
        f"mean-pooled sentence embedding to the full-precision one on {args.encoder_eval_samples} windows "
        "(higher is better). AdaRound reconstructs layer by layer, FlexRound block by block; "
        "`flexround+qdrop` adds QDrop's input mixing (p = 0.5), which acts only when activations are quantized.",
        "",
        "*CPU s* is the run's own processor time (user + system), which machine load does not inflate; *wall s* "
        "includes waiting for a core.",
        "",
        "| model | FP | setting | method | quantized | CPU s | wall s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key = metric_of(r["model"])
        fp_value = fp.get(r["model"], {}).get(key)
        fp_text = f"{fp_value:.4f}" if fp_value is not None else "n/a"
        if "error" in r:
            value, cpu, secs, rss = f"error: {r['error'][:80]}", "n/a", "n/a", "n/a"
        else:
            value = f"{r['quant'][key]:.4f}"
            cpu = f"{r['cpu_seconds']:.0f}" if "cpu_seconds" in r else "n/a"
            secs, rss = f"{r['seconds']:.0f}", f"{r['peak_rss_mib']:.0f}"
        lines.append(f"| {r['model']} | {fp_text} | {r['setting']} | {r['method']} | {value} | {cpu} | {secs} "
                     f"| {rss} |")
    text = "\n".join(lines) + "\n"
    if not quiet:
        print(text)
    out = Path(args.out)
    atomic_write_text(out, text)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"command": command, "rows": rows, "fp": fp}, indent=2))


if __name__ == "__main__":
    main()
