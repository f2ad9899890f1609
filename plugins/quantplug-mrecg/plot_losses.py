"""Plot the per-unit reconstruction loss of one or more quantplug runs (the oscillation MRECG removes).

    python plugins/quantplug-mrecg/plot_losses.py runs/brecq runs/mrecg --out losses.png

Each run directory holds the ``quantplug.json`` manifest that ``quantplug apply --out`` writes; its ``units``
list has, per reconstructed unit, ``name``, ``layers``, ``loss_before`` and ``loss_after`` (and ``pass_name``).
The x axis is the number of quantized layers reconstructed so far (the end of each unit), so runs with
different granularities (layer, block, MRECG's mixed units) line up on the same network depth. Each line is
one run and pass; ``--before`` adds the nearest-rounding losses dashed. The legend reports the peak loss and
the oscillation, ``sum_i max(0, L_i - L_{i+1})``: the total of the drops between consecutive units, zero for
a loss that only grows with depth (MRECG's Theorem 1 for equivalent modules).

A run recorded by ``benchmarks/fidelity.py`` is named ``FIDELITY.json#MODEL/SETTING/METHOD/SEED`` (the
worker keeps each run's per-unit records), e.g.
``benchmarks/results/fidelity-extra-resnet18.json#zoo:resnet18-fmnist/W2A4/qdrop/0``.

Needs matplotlib (``pip install quantplug-mrecg[plot]``); draws with the Agg backend (no display).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("plot_losses")


@dataclass
class Series:
    """The per-unit losses of one pass of one run."""

    label: str
    names: list[str] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)


def oscillation(losses: Sequence[float]) -> float:
    """Total of the drops between consecutive units: ``sum_i max(0, L_i - L_{i+1})``."""
    return float(sum(max(0.0, a - b) for a, b in zip(losses, losses[1:])))


def load_fidelity_run(ref: str) -> dict[str, Any]:
    """``FILE.json#MODEL/SETTING/METHOD/SEED``: one run of a fidelity benchmark, as a manifest-like dict."""
    file, _, selector = ref.partition("#")
    parts = selector.split("/")
    if len(parts) != 4 or not parts[3].isdigit():
        raise ValueError(f"{ref!r}: name a fidelity run as FILE.json#MODEL/SETTING/METHOD/SEED")
    model, setting, method, seed = parts[0], parts[1], parts[2], int(parts[3])
    if not Path(file).is_file():
        raise FileNotFoundError(f"{file} not found (a JSON written by benchmarks/fidelity.py)")
    with open(file) as f:
        data = json.load(f)
    for row in data.get("rows", []):
        if (row["model"], row["setting"], row["method"]) != (model, setting, method):
            continue
        for run in row["runs"]:
            if run.get("seed") == seed:
                if not run.get("unit_records"):
                    raise ValueError(f"{ref}: the run has no per-unit records (recorded before they were kept, "
                                     f"or it failed: {run.get('error', 'no error')})")
                return {"units": run["unit_records"], "recipe": run.get("recipe", {})}
    raise ValueError(f"{ref}: no such run in {file}")


def load_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    if "#" in str(run_dir):
        return load_fidelity_run(str(run_dir))
    path = Path(run_dir)
    manifest = path / "quantplug.json" if path.is_dir() else path
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: pass a run directory written by `quantplug apply --out`")
    with open(manifest) as f:
        data = json.load(f)
    if not data.get("units"):
        raise ValueError(f"{manifest} lists no reconstructed units (a run with recon.iters=0?)")
    return data


def series_of(run_dir: str | os.PathLike[str], pass_name: str | None = None) -> list[Series]:
    """One ``Series`` per reconstruction pass of the run (or only ``pass_name``)."""
    data = load_run(run_dir)
    recipe = data.get("recipe", {}).get("name", "")
    if "#" in str(run_dir):  # a fidelity run: its METHOD/SEED names it
        name = "/".join(str(run_dir).split("#", 1)[1].split("/")[1:])
    else:
        name = Path(run_dir).name
    base = f"{name} ({recipe})" if recipe else name
    passes: dict[str, Series] = {}
    for unit in data["units"]:
        name = unit.get("pass_name", "joint")
        if pass_name is not None and name != pass_name:
            continue
        label = base if name == "joint" else f"{base} [{name}]"
        s = passes.setdefault(name, Series(label))
        previous = s.depth[-1] if s.depth else 0
        s.names.append(unit["name"])
        s.depth.append(previous + max(1, len(unit.get("layers", []))))
        s.before.append(float(unit["loss_before"]))
        s.after.append(float(unit["loss_after"]))
    return list(passes.values())


def plot(
    run_dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    pass_name: str | None = None,
    before: bool = False,
    log_scale: bool = True,
    title: str | None = None,
) -> Path:
    """Write a PNG of the per-unit losses of ``run_dirs`` to ``out`` (written to a temporary file, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_series = [s for run in run_dirs for s in series_of(run, pass_name)]
    if not all_series:
        raise ValueError(f"no units of pass {pass_name!r} in {', '.join(map(str, run_dirs))}")
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    for i, s in enumerate(all_series):
        color = f"C{i % 10}"
        label = f"{s.label}: peak {max(s.after):.3g}, oscillation {oscillation(s.after):.3g}"
        ax.plot(s.depth, s.after, marker="o", color=color, label=label)
        if before:
            ax.plot(s.depth, s.before, marker=".", linestyle="--", color=color, alpha=0.6,
                    label=f"{s.label}: nearest rounding (loss before)")
    if log_scale and all(v > 0 for s in all_series for v in s.after + (s.before if before else [])):
        ax.set_yscale("log")
    ax.set_xlabel("quantized layers reconstructed (end of each unit)")
    ax.set_ylabel("reconstruction loss after the unit")
    ax.set_title(title or "Per-unit reconstruction loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=out_path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out_path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("wrote %s", out_path)
    return out_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+",
                        help="run directories, quantplug.json files, or FIDELITY.json#MODEL/SETTING/METHOD/SEED")
    parser.add_argument("--out", "-o", default="reconstruction_losses.png", help="PNG to write")
    parser.add_argument("--pass", dest="pass_name", default=None,
                        help="only this pass (joint, weights, activations); default: every pass")
    parser.add_argument("--before", action="store_true", help="also draw the nearest-rounding losses")
    parser.add_argument("--linear", action="store_true", help="linear y axis (default: log)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = plot(args.runs, args.out, pass_name=args.pass_name, before=args.before,
                    log_scale=not args.linear, title=args.title)
    except (FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    for run in args.runs:
        for s in series_of(run, args.pass_name):
            logger.info("%s: %d units, peak %.4g, oscillation %.4g", s.label, len(s.after), max(s.after),
                        oscillation(s.after))
    logger.info("plot: %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
