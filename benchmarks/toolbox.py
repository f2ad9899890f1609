"""The classic toolbox on the zoo models: one table per plugin (DFQ, QAT, k-means, low-bit, mixed precision).

Every number is copied from a results file a plugin committed, which names the command that measured it (each
section of the output repeats those commands and the machine load during them); nothing is measured here.

    python benchmarks/toolbox.py                  # rewrite benchmarks/results/toolbox.md
    python benchmarks/toolbox.py --check          # exit 1 if the committed table is not what the sources give

Sources (relative to the repository root): ``plugins/quantplug-dfq/results.md`` (``bench_dfq.py`` writes only
markdown), ``plugins/quantplug-qat/results.json``, ``plugins/quantplug-kmeans/results/fmnist.json``,
``plugins/quantplug-lowbit/results/fmnist.json``, ``plugins/quantplug-mixed/results/w3-nearest.json`` and
``w3-qdrop.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "toolbox.md"
MODEL_NAMES = {"zoo:resnet18-fmnist": "ResNet-18", "zoo:mobilenetv2-fmnist": "MobileNetV2"}
MODEL_ORDER = ("zoo:mobilenetv2-fmnist", "zoo:resnet18-fmnist")


class SourceError(Exception):
    """A results file is missing, malformed or lacks a row the table needs."""


@dataclass(frozen=True)
class Section:
    """One plugin's part of the table: title, the commands behind it, load range, notes and a markdown table."""

    title: str
    commands: tuple[str, ...]
    loads: tuple[float, ...]
    setup: str
    table: str
    notes: str = ""

    def render(self) -> str:
        commands = "\n".join(self.commands)
        load = f"{min(self.loads):.1f} to {max(self.loads):.1f}" if self.loads else "not recorded"
        parts = [f"## {self.title}", "", self.setup, "", f"1-minute load average before / after the rows: {load} "
                 "(2 cores shared with other jobs; the rows ran one after another, each with `OMP_NUM_THREADS=1`).", "",
                 "```bash", commands, "```", "", self.table]
        if self.notes:
            parts += ["", self.notes]
        return "\n".join(parts)


def read_json(relative: str) -> dict[str, Any]:
    path = ROOT / relative
    if not path.is_file():
        raise SourceError(f"{relative} is missing: run the command that writes it (see this script's docstring)")
    return json.loads(path.read_text())


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> str:
    """``align``: one character per column, ``l`` or ``r``."""
    align = align or "l" * len(header)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)])


def pct(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def model_label(model: str, fp_top1: float) -> str:
    return f"{MODEL_NAMES.get(model, model)} ({fp_top1:.2f})"


def parse_load_pair(text: str) -> tuple[float, float]:
    """``"8.5 / 7.5"`` or ``"8.5/7.5"`` -> (8.5, 7.5)."""
    before, after = (float(x) for x in text.replace(" ", "").split("/"))
    return before, after


# --- DFQ ------------------------------------------------------------------------------------------------------

DFQ_COMMAND = "OMP_NUM_THREADS=1 python plugins/quantplug-dfq/bench_dfq.py --out plugins/quantplug-dfq/results.md"
DFQ_COLUMNS = {
    "none (per-tensor baseline)": "per-tensor baseline",
    "BC empirical": "BC only",
    "CLE": "CLE",
    "CLE + BA": "CLE + BA",
    "CLE + BA + BC analytic (data-free)": "CLE + BA + BC analytic",
    "CLE + BA + BC empirical (dfq default)": "CLE + BA + BC empirical (`dfq`)",
}


def dfq_section() -> Section:
    path = ROOT / "plugins/quantplug-dfq/results.md"
    if not path.is_file():
        raise SourceError("plugins/quantplug-dfq/results.md is missing: run " + DFQ_COMMAND)
    cells: dict[tuple[str, str], dict[str, float]] = {}
    fp: dict[str, float] = {}
    loads: list[float] = []
    for line in path.read_text().splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cols) != 8 or not cols[0].startswith("zoo:"):
            continue
        model, wa, passes, fp_top1, top1, _, _, load = cols
        if passes not in DFQ_COLUMNS:
            raise SourceError(f"unknown DFQ configuration {passes!r} in {path.name}")
        cells.setdefault((model, wa), {})[passes] = float(top1)
        fp[model] = float(fp_top1)
        loads += parse_load_pair(load)
    header = ["model (FP top-1)", "W/A", *DFQ_COLUMNS.values()]
    rows = []
    def order(key: tuple[str, str]) -> tuple[int, int]:  # models in MODEL_ORDER, wider weights first
        return MODEL_ORDER.index(key[0]), -int(re.match(r"W(\d+)", key[1]).group(1))  # type: ignore[union-attr]

    for (model, wa), by_config in sorted(cells.items(), key=lambda kv: order(kv[0])):
        missing = [c for c in DFQ_COLUMNS if c not in by_config]
        if missing:
            raise SourceError(f"DFQ results lack {missing} for {model} {wa}")
        rows.append([model_label(model, fp[model]), wa, *(pct(by_config[c]) for c in DFQ_COLUMNS)])
    return Section(
        title="quantplug-dfq: cross-layer equalization (CLE), bias absorption (BA), bias correction (BC)",
        commands=(DFQ_COMMAND,),
        loads=tuple(loads),
        setup=("Per-tensor weights and activations, nearest rounding, 256 calibration images, first and last layer "
               "at 8 bits; top-1 (%) on the full 10 000-image Fashion-MNIST test set (MobileNetV2 at 48x48, "
               "`fmnist:48`; ResNet-18 at 32x32). Source: `plugins/quantplug-dfq/results.md` (with wall times)."),
        table=markdown_table(header, rows, "ll" + "r" * len(DFQ_COLUMNS)),
    )


# --- QAT ------------------------------------------------------------------------------------------------------

QAT_SOURCES = ("plugins/quantplug-qat/results.json", "plugins/quantplug-qat/results-nearest.json")


def qat_section() -> Section:
    sources = [read_json(source) for source in QAT_SOURCES]
    rows, loads = [], []
    options: set[str] = set()
    records = [r for data in sources for r in data["rows"]]
    for r in sorted(records, key=lambda r: (MODEL_ORDER.index(r["model"]), -r["a_bits"], r["base"] != "nearest")):
        gap = r["fp_top1"] - r["ptq_top1"]
        recovered = f"{(r['qat_top1'] - r['ptq_top1']) / gap:.0%}" if gap > 0 else "n/a"
        shortened = ", ".join(f"{k}={v}" for k, v in r["ptq_overrides"].items())
        base = r["base"] + (f" `{r['preset']}`" if r.get("preset") else "") + (f", {shortened}" if shortened else "")
        rows.append([model_label(r["model"], r["fp_top1"]), f"W{r['w_bits']}A{r['a_bits']}", base,
                     pct(r["ptq_top1"]), pct(r["qat_top1"]), f"{r['qat_top1'] - r['ptq_top1']:+.2f}", recovered,
                     f"{r['ptq_seconds']:.0f} + {r['qat_seconds']:.0f}"])
        loads += [r["load_before"], r["load_after"]]
        options.add(json.dumps({k: v for k, v in r["qat_options"].items() if k != "data"}))
    header = ["model (FP top-1)", "W/A", "PTQ base", "PTQ top-1", "+ QAT top-1", "change", "gap recovered",
              "wall s (PTQ + QAT)"]
    return Section(
        title="quantplug-qat: quantization-aware fine-tuning (STE + LSQ steps) from a PTQ result",
        commands=tuple(data["invocation"] for data in sources),
        loads=tuple(loads),
        setup=("The PTQ base runs through `quantplug.api.apply`, then the `qat` pass on that model as "
               "`quantplug apply --plugin qat --base BASE` does. Per-channel weights, per-tensor activations, first "
               "and last layer at 8 bits. `nearest`: 256 calibration images, no reconstruction; `qdrop`: its "
               "`cpu-fast` preset (512 calibration images), shortened for the CPU budget by the overrides in the "
               "*PTQ base* column (QDrop's own schedule: 20 000 iterations per unit). "
               f"QAT options: {'; '.join(sorted(options))}, on the model's own training split. Top-1 (%) on the full "
               "test set. *gap recovered* = (QAT - PTQ) / (FP - PTQ). Sources: "
               + ", ".join(f"`{s}`" for s in QAT_SOURCES) + "."),
        table=markdown_table(header, rows, "lllrrrrr"),
    )


# --- k-means ----------------------------------------------------------------------------------------------------

KMEANS_JOBS = {  # row label -> (k-means only job, k-means + fine-tuning job, nearest per-tensor baseline job)
    "4": ("kmeans --preset no-finetune", "kmeans", "nearest --w-bits 4"),
    "3": (None, "kmeans --w-bits 3", None),
    "2": ("kmeans --w-bits 2 --preset no-finetune", "kmeans --w-bits 2", "nearest --w-bits 2"),
    "8 conv / 5 fc (`official`)": (None, "kmeans --preset official", None),
}


def recipe_table_rows(relative: str) -> tuple[str, dict[tuple[str, str], dict[str, Any]], list[float]]:
    """The invocation, rows by (model, job) and the loads of a ``benchmarks/recipe_table.py`` json file."""
    data = read_json(relative)
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    loads: list[float] = []
    for r in data["rows"]:
        if r.get("returncode", 0) != 0 or "quant" not in r:
            continue
        by_key[(r["model"], r["job"])] = r
        loads += [r["load_before"], r["load_after"]]
    return data["invocation"], by_key, loads


def find_job(rows: dict[tuple[str, str], dict[str, Any]], model: str, prefix: str | None) -> dict[str, Any] | None:
    """The row of ``model`` whose job is ``prefix`` exactly or starts with ``prefix + ' '`` (extra overrides)."""
    if prefix is None:
        return None
    hits = [r for (m, job), r in rows.items() if m == model and (job == prefix or
                                                                  (prefix.startswith("nearest") and
                                                                   job.startswith(prefix + " ")))]
    if len(hits) != 1:
        raise SourceError(f"expected one row for {model} / {prefix!r}, found {len(hits)}")
    return hits[0]


def kmeans_section() -> Section:
    invocation, rows_by_key, loads = recipe_table_rows("plugins/quantplug-kmeans/results/fmnist.json")
    rows = []
    for model in MODEL_ORDER:
        for bits, jobs in KMEANS_JOBS.items():
            found = [find_job(rows_by_key, model, job) for job in jobs]
            fp = next(r for r in found if r is not None)["fp"]["top1"]
            rows.append([model_label(model, fp), bits, *(pct(r["quant"]["top1"]) if r else "" for r in found)])
    header = ["model (FP top-1)", "weight bits", "k-means only", "k-means + centroid fine-tuning",
              "nearest, per-tensor affine"]
    return Section(
        title="quantplug-kmeans: k-means codebooks (Deep Compression), weights only",
        commands=(invocation,),
        loads=tuple(loads),
        setup=("Every layer (first and last too) gets a `2^bits`-entry codebook; 1 024 calibration images; "
               "fine-tuning 4 epochs over them (Adam, lr 1e-3 in units of max|W|). The affine baseline has the "
               "same granularity (one grid per layer, every layer, weights only). Top-1 (%) on the full test set. "
               "Source: `plugins/quantplug-kmeans/results/fmnist.json` (commands and wall times per row in "
               "`fmnist.md`)."),
        table=markdown_table(header, rows, "llrrr"),
    )


# --- low-bit ----------------------------------------------------------------------------------------------------

LOWBIT_JOBS = ("bwn", "binaryconnect", "twn", "bwn --preset reconstruct", "twn --preset reconstruct", "ttq")


def lowbit_section() -> Section:
    invocation, rows_by_key, loads = recipe_table_rows("plugins/quantplug-lowbit/results/fmnist.json")
    rows = []
    for model in MODEL_ORDER:
        found = [find_job(rows_by_key, model, job) for job in LOWBIT_JOBS]
        assert all(r is not None for r in found)
        rows.append([model_label(model, found[0]["fp"]["top1"]), *(pct(r["quant"]["top1"]) for r in found)])
    header = ["model (FP top-1)", *(f"`{job}`" for job in LOWBIT_JOBS)]
    return Section(
        title="quantplug-lowbit: binary (BWN, BinaryConnect) and ternary (TWN, TTQ) weights",
        commands=(invocation,),
        loads=tuple(loads),
        setup=("Full-precision activations; `bwn`, `binaryconnect`, `twn` are the closed forms applied after "
               "training; `--preset reconstruct` trains the latent weights block by block (500 steps per block); "
               "`ttq` learns the two scales and the assignments (8 epochs over 1 024 images). Top-1 (%) on the full "
               "test set. Source: `plugins/quantplug-lowbit/results/fmnist.json` (the ResNet-18 rows are kept from a "
               "first run of the same command, the MobileNetV2 rows come from the `--resume` run at 48x48)."),
        table=markdown_table(header, rows, "l" + "r" * len(LOWBIT_JOBS)),
    )


# --- mixed precision ------------------------------------------------------------------------------------------

MIXED_SOURCES = ("plugins/quantplug-mixed/results/w3-nearest.json", "plugins/quantplug-mixed/results/w3-qdrop.json")


def mixed_section() -> Section:
    rows, loads, commands = [], [], []
    records = [r for source in MIXED_SOURCES for r in read_json(source)["rows"]]
    records.sort(key=lambda r: (MODEL_ORDER.index(r["model"]), r["base"] != "nearest", -r["budget_bits"],
                                r["config"] != "uniform"))
    for r in records:
        budget = r["budget_bits"]
        method = "uniform" if r["config"] == "uniform" else f"mixed, `{r['config']}` sensitivity"
        overrides = ", ".join(f"{k}={v}" for k, v in (r.get("overrides") or {}).items())
        base = r["base"] + (f" ({overrides})" if overrides else "")
        rows.append([model_label(r["model"], r["fp top-1"]), base, method, f"{budget:g}",
                     f"{r['weight bits (all)']:.3f}", f"{r['weight KiB']:.0f}", pct(r["top-1"]),
                     f"{-r['drop']:+.2f}", r["bits by kind"] or ""])
        loads += parse_load_pair(r["load before/after"])
        if r["command"] not in commands:
            commands.append(r["command"])
    header = ["model (FP top-1)", "base recipe", "allocation", "budget (avg bits)", "weight bits (all layers)",
              "weight KiB", "top-1", "change", "bits by layer kind"]
    return Section(
        title="quantplug-mixed: per-layer weight bits under a size budget (exact allocation)",
        commands=tuple(commands),
        loads=tuple(loads),
        setup=("Candidate widths 2, 3, 4, 8 per layer; the budget is the average weight bits over the allocated "
               "layers (first and last layer at 8 bits in every row); 8-bit per-tensor activations; the base recipe "
               "calibrates (and for `qdrop` reconstructs, here at 500 iterations per unit instead of 20 000) with "
               "the chosen bit map. Top-1 (%) on the full test set. Sources: "
               + ", ".join(f"`{s}`" for s in MIXED_SOURCES) + "."),
        table=markdown_table(header, rows, "llllrrrrl"),
    )


SECTIONS = (dfq_section, qat_section, kmeans_section, lowbit_section, mixed_section)


def render() -> str:
    intro = ("# The classic toolbox on the zoo models\n\n"
             "Generated by `python benchmarks/toolbox.py` from the results files the plugins commit; each section "
             "lists the commands that measured its numbers and the machine load while they ran. Models: "
             "`zoo:resnet18-fmnist` (32x32, data `fmnist`) and `zoo:mobilenetv2-fmnist` (48x48, data `fmnist:48`, "
             "the size it was trained at), BatchNorm folded, calibration images from the training split (seed 0). "
             "Every top-1 is on all 10 000 Fashion-MNIST test images; the binomial standard error at 92 % is "
             "0.27 points. Wall times (in the source files) come from a 2-core machine shared with other jobs.")
    return "\n\n".join([intro, *(section().render() for section in SECTIONS)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            sys.stderr.write(f"{args.out} is out of date: run python benchmarks/toolbox.py\n")
            return 1
        return 0
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
