"""Engine benchmark: time per reconstruction step against a plain forward + backward, cache bytes, memory.

For each unit (a ResNet-18 basic block at 224x224 and at the zoo's 32x32, MobileNetV2 inverted
residuals, an OPT-125m-shaped decoder layer when ``transformers`` is installed) and batch 32:

* ``fp fwd+bwd``: the full-precision unit, weight gradients on, MSE to a target, ``backward``;
* one reconstruction step of quantplug's engine (``ReconstructionEngine.optimize``: cache reads,
  activation policy, fake-quantized forward, loss, rounding regularizer, backward, Adam) with
  AdaRound, FlexRound and QDrop (AdaRound rounding, drop policy, learned activation steps) at W4A4;
  all three run on the same block unit so the ratios compare like with like;
* cache bytes per calibration sample for the unit (inputs, targets, and fp inputs for QDrop) in the
  fp32, fp16 and disk caches; peak resident memory as the calibration set grows (cpu vs disk cache);
  resident memory after each unit of a whole run;
* the OPT row times one decoder layer of an OPT-125m-shaped model (random init) on 32 sequences of 32
  tokens (a step of 1 024 tokens costs about as much as a ResNet-18 block at 224x224 here), with a fifth of the
  steps per round;
* the estimated wall time of an official-default QDrop run (20 000 steps per block) of ResNet-18 at
  224x224 from the measured step times.

Timings interleave the baseline and the methods in rounds and report medians, so machine load
affects both sides alike; the table states the thread count, the torch build and the load.

    python benchmarks/engine.py --out benchmarks/results/engine.md
    python benchmarks/engine.py --quick   # fewer units and steps, for a smoke check
"""

from __future__ import annotations

import argparse
import copy
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

import torch
from torch import nn

from quantplug.export import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
W_BITS, A_BITS, BATCH = 4, 4, 32
METHODS = {
    "adaround": {"recipe": "adaround", "overrides": {"scheduler.name": "block", "recon.learn_act_step": False}},
    "flexround": {"recipe": "flexround", "overrides": {"scheduler.name": "block"}},
    "qdrop": {"recipe": "qdrop", "overrides": {"recon.order": "joint", "recon.learn_act_step": True}},
}
# (model id, input resolution, unit names): random-init torchvision models time the same as trained ones
UNITS = [
    ("torchvision:resnet18", 224, ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]),
    ("zoo:resnet18-fmnist", 32, ["layer1.0", "layer3.0"]),
    ("torchvision:mobilenet_v2", 224, ["features.2", "features.14"]),
]
QUICK_UNITS = [("zoo:resnet18-fmnist", 32, ["layer1.0"])]
# an OPT-125m-shaped decoder (hidden 768, 12 heads, FFN 3072; two random-init layers), sequences of this length
OPT_ID, OPT_SEQ = "opt-125m-shaped", 32


def opt_model_id() -> str:
    """A local directory holding a random-init OPT with OPT-125m's layer shapes (needs ``transformers``)."""
    import tempfile

    from transformers import OPTConfig, OPTForCausalLM

    directory = os.path.join(tempfile.gettempdir(), "quantplug-bench-opt-125m-shaped")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        torch.manual_seed(0)
        config = OPTConfig(hidden_size=768, num_attention_heads=12, ffn_dim=3072, num_hidden_layers=2,
                           word_embed_proj_dim=768, vocab_size=50272, max_position_embeddings=2048)
        OPTForCausalLM(config).save_pretrained(directory)
    return "local:" + directory


def calibration_inputs(model_id: str, resolution: int, samples: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sizes = [min(BATCH, samples - i) for i in range(0, samples, BATCH)]
    if model_id == OPT_ID:
        return [torch.randint(4, 50000, (n, resolution), generator=gen) for n in sizes]
    return [torch.randn(n, 3, resolution, resolution, generator=gen) for n in sizes]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- building a unit
def build_engine(method: str, model_id: str, resolution: int, samples: int, cache: str = "cpu") -> tuple[Any, Any]:
    """A ReconstructionEngine on ``model_id`` for ``method`` with ``samples`` random calibration images."""
    from quantplug.api import build_quant_model, resolve
    from quantplug.calibrate import calibrate_activations, calibrate_weights
    from quantplug.engine import ReconstructionEngine, RunContext
    from quantplug.plugins import Session

    session = Session()
    spec = METHODS[method]
    overrides = {"weight.bits": W_BITS, "activation.bits": A_BITS, "weight_observer.name": "minmax",
                 "activation_observer.name": "minmax", "calib.num_samples": samples, "calib.batch_size": BATCH,
                 "recon.batch_size": BATCH, "recon.cache": cache, **spec["overrides"]}
    recipe = resolve(session, spec["recipe"], base=None, preset=None, overrides=overrides)
    load_id = opt_model_id() if model_id == OPT_ID else model_id
    adapter = session.adapter_for(load_id)
    device = torch.device("cpu")
    fp_model, q_model = build_quant_model(adapter, load_id, recipe, device)
    inputs = calibration_inputs(model_id, resolution, samples)
    targets = [x if model_id == OPT_ID else torch.zeros(x.shape[0], dtype=torch.long) for x in inputs]
    calibrate_weights(q_model, session, recipe)
    calibrate_activations(q_model, adapter, list(zip(inputs, targets))[:2], session, recipe, device)
    blocks = adapter.blocks(fp_model)
    scheduler = session.make("scheduler", recipe.scheduler)
    scheduler.bind(fp_model)
    plan = scheduler.plan(blocks)
    run = RunContext(session, recipe, adapter, fp_model, q_model, blocks, inputs, targets, device, seed=0, plan=plan)
    engine = ReconstructionEngine(run, rounding=session.make("rounding", recipe.rounding),
                                  loss=session.make("loss", recipe.loss),
                                  policy=session.make("activation_policy", recipe.activation_policy))
    return engine, plan


def find_unit(plan: list[Any], name: str) -> tuple[int, Any]:
    for i, unit in enumerate(plan):
        if unit.name == name or name in unit.blocks or unit.name.endswith("." + name):
            return i, unit
    raise SystemExit(f"no unit {name!r} in the plan: {[u.name for u in plan]}")


def fp_step_fn(engine: Any, unit: Any, work: Any) -> Any:
    """One plain full-precision forward + backward of the unit (weight gradients on), MSE to the target."""
    from quantplug.engine import unit_module

    module = copy.deepcopy(unit_module(engine.run, engine.run.fp_model, unit))
    for p in module.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    n = work.inputs.num

    def step() -> None:
        idx = torch.randint(n, (BATCH,), generator=gen)
        x = work.inputs.read(idx, torch.device("cpu"))
        y = work.targets.read(idx, torch.device("cpu"))
        module.zero_grad(set_to_none=True)
        out = module(x)
        loss = nn.functional.mse_loss(out[0] if isinstance(out, tuple) else out, y)
        loss.backward()

    return step


def time_unit(model_id: str, resolution: int, unit_name: str, steps: int, rounds: int) -> dict[str, Any]:
    """Median seconds per step: fp forward+backward and each method, interleaved in ``rounds``."""
    setups = {}
    for method in METHODS:
        engine, plan = build_engine(method, model_id, resolution, samples=2 * BATCH)
        index, unit = find_unit(plan, unit_name)
        work = engine.setup_unit(index, unit)
        setups[method] = (engine, work)
    engine0, work0 = setups["qdrop"]
    fp_step = fp_step_fn(engine0, work0.unit, work0)
    times: dict[str, list[float]] = {"fp": [], **{m: [] for m in METHODS}}
    fp_step()  # warm-up
    for engine, work in setups.values():
        engine.optimize(work, 2)
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            fp_step()
        times["fp"].append((time.perf_counter() - t0) / steps)
        for method, (engine, work) in setups.items():
            t0 = time.perf_counter()
            engine.optimize(work, steps)
            times[method].append((time.perf_counter() - t0) / steps)
    cache = {}
    for mode, nbytes in (("fp32", 4), ("fp16", 2)):
        per_sample = sum(c.nbytes // c.num for c in (work0.inputs, work0.targets, work0.fp_inputs) if c is not None)
        cache[mode] = per_sample * nbytes // 4
    for _, work in setups.values():
        work.close()
    return {"model": model_id, "resolution": resolution, "unit": unit_name,
            "seconds": {k: statistics.median(v) for k, v in times.items()}, "cache_bytes_per_sample": cache}


# --------------------------------------------------------------------------- memory
def memory_growth(samples: int, cache: str) -> dict[str, Any]:
    """Peak RSS of caching and reconstructing one zoo ResNet-18 unit with ``samples`` calibration images."""
    engine, plan = build_engine("qdrop", "zoo:resnet18-fmnist", 32, samples=samples, cache=cache)
    index, unit = find_unit(plan, "layer1.0")
    before = _rss_mib()
    work = engine.setup_unit(index, unit)
    engine.optimize(work, 5)
    work.close()
    return {"samples": samples, "cache": cache, "rss_before_mib": before, "peak_mib": _peak_mib()}


def per_unit_rss(iters: int) -> dict[str, Any]:
    """Resident memory after each unit of a whole QDrop run on the zoo ResNet-18 (``iters`` steps per unit)."""
    from quantplug import hookimpl
    from quantplug.api import apply
    from quantplug.plugins import Session

    rss: list[float] = []

    class Probe:
        @hookimpl
        def on_unit_end(self, run: Any, unit: Any, record: Any) -> None:
            rss.append(_rss_mib())

    session = Session(plugins=[Probe()])
    apply("qdrop", "zoo:resnet18-fmnist", data="fmnist-subset", session=session, eval_samples=64, evaluate_fp=False,
          overrides={"weight.bits": 2, "activation.bits": 4, "recon.iters": iters, "recon.order": "joint",
                     "calib.num_samples": 256})
    return {"rss_mib": rss}


# --------------------------------------------------------------------------- driver
def run_worker(kind: str, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    env = {**os.environ, "QUANTPLUG_PROGRESS": "0", "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec), "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_main(kind: str, spec: dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    if kind == "time":
        out = time_unit(spec["model"], spec["resolution"], spec["unit"], spec["steps"], spec["rounds"])
    elif kind == "memory":
        out = memory_growth(spec["samples"], spec["cache"])
    elif kind == "units":
        out = per_unit_rss(spec["iters"])
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    print(json.dumps(out))


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def render(args: argparse.Namespace, timing: list[dict[str, Any]], memory: list[dict[str, Any]],
           units: dict[str, Any], loads: list[str], command: str) -> str:
    lines = [
        "# Engine: reconstruction step time, cache bytes and memory", "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} (torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}, {args.threads} thread(s), "
        f"{os.cpu_count()} cores; load average (1/5/15 min) at start / end: {loads[0]} and {loads[-1]}).", "",
    ]
    if not timing:
        return "\n".join(lines + _memory_lines(args, memory, units)) + "\n"
    lines += [
        f"Batch {BATCH}, W{W_BITS}A{A_BITS}, median seconds per step over {args.rounds} interleaved rounds of "
        f"{args.steps} steps. *ratio* = method step / plain fp forward+backward of the same unit and batch "
        "(target: at most 1.2).", "",
        "| model | input | unit | fp fwd+bwd (s) | AdaRound (s) | ratio | FlexRound (s) | ratio | QDrop (s) | ratio "
        "| cache B/sample fp32 | fp16 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in timing:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['resolution']} | {row['unit']} | error: {row['error']} |")
            continue
        s = row["seconds"]
        cells = [f"{s['fp']:.4f}"]
        for m in METHODS:
            cells += [f"{s[m]:.4f}", f"{s[m] / s['fp']:.2f}"]
        c = row["cache_bytes_per_sample"]
        size = f"{row['resolution']} tokens" if row["model"] == OPT_ID else f"{row['resolution']}x{row['resolution']}"
        lines.append(f"| {row['model']} | {size} | {row['unit']} | "
                     + " | ".join(cells) + f" | {c['fp32']:,} | {c['fp16']:,} |")
    r224 = [r for r in timing if r.get("model") == "torchvision:resnet18" and "seconds" in r]
    if r224:
        per_block = sum(r["seconds"]["qdrop"] for r in r224) * 2  # two blocks per stage; .0 blocks are the dearer
        lines += ["", "Estimated official-default QDrop run of ResNet-18 at 224x224 (20 000 steps per block, "
                  f"8 blocks, the measured stage-first block time for both blocks of a stage): "
                  f"**{per_block * 20000 / 3600:.1f} h** of reconstruction steps (the official code: about 17 h "
                  "on this machine, 0.33 / 0.20 / 0.14 / 0.14 s per step)."]
    return "\n".join(lines + _memory_lines(args, memory, units)) + "\n"


def _memory_lines(args: argparse.Namespace, memory: list[dict[str, Any]], units: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if memory:
        lines += ["", "## Peak resident memory as the calibration set grows (QDrop, zoo ResNet-18 layer1.0)", "",
                  "| samples | cache | RSS before caching (MiB) | peak RSS (MiB) |", "|---:|---|---:|---:|"]
        for m in memory:
            if "error" in m:
                lines.append(f"| | | error: {m['error']} | |")
                continue
            lines.append(f"| {m['samples']} | {m['cache']} | {m['rss_before_mib']:.0f} | {m['peak_mib']:.0f} |")
    if units.get("rss_mib"):
        rss = units["rss_mib"]
        lines += ["", "## Resident memory after each unit of a whole run", "",
                  f"QDrop W2A4 on the zoo ResNet-18, {args.unit_iters} steps per unit, 256 samples: "
                  + ", ".join(f"{v:.0f}" for v in rss) + f" MiB (first {rss[0]:.0f}, last {rss[-1]:.0f}, "
                  f"largest step up {max(b - a for a, b in zip(rss, rss[1:])) if len(rss) > 1 else 0:.0f} MiB)."]
    elif "error" in units:
        lines += ["", f"Per-unit memory: error {units['error']}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one small unit, few steps, no memory scaling")
    parser.add_argument("--samples", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--unit-iters", type=int, default=50)
    parser.add_argument("--only", choices=["timing", "memory", "units"], default=None,
                        help="run one section (write it to another --out: the default file holds all three)")
    parser.add_argument("--out", default=str(RESULTS / "engine.md"))
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker[0], json.loads(args.worker[1]), args.threads)
        return
    command = "python benchmarks/engine.py " + shlex.join(sys.argv[1:])
    loads = [load_average()]
    units = QUICK_UNITS if args.quick else UNITS
    if args.quick:
        args.steps, args.rounds, args.samples = 3, 2, []
    if not args.quick:
        try:
            import transformers  # noqa: F401

            units = [*units, (OPT_ID, OPT_SEQ, ["layers.0"])]
        except ImportError:
            print("transformers is not installed: the OPT decoder layer row is skipped", file=sys.stderr)
    if args.only not in (None, "timing"):
        units = []
    if args.only not in (None, "memory"):
        args.samples = []
    timing = []
    for model_id, resolution, names in units:
        for name in names:
            steps = max(1, args.steps // 5) if model_id == OPT_ID else args.steps
            row = run_worker("time", {"model": model_id, "resolution": resolution, "unit": name,
                                      "steps": steps, "rounds": args.rounds}, args.threads)
            row.setdefault("model", model_id)
            row.setdefault("resolution", resolution)
            row.setdefault("unit", name)
            timing.append(row)
            print(json.dumps(row), flush=True)
    memory = [run_worker("memory", {"samples": n, "cache": c}, args.threads)
              for n in args.samples for c in ("cpu", "disk")]
    skip_units = args.quick or args.only not in (None, "units")
    unit_rss = {} if skip_units else run_worker("units", {"iters": args.unit_iters}, args.threads)
    loads.append(load_average())
    text = render(args, timing, memory, unit_rss, loads, command)
    print(text)
    atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
