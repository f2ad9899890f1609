"""Summary of the fidelity tables: settings x methods per model, the papers' orderings checked, README blocks.

Reads every ``benchmarks/results/fidelity-*.json`` that ``benchmarks/fidelity.py`` wrote (each names the command
that measured it) and writes ``benchmarks/results/fidelity.md``: one table per model (rows: bit settings; columns:
methods; cells: mean top-1 and, over several seeds, the spread min..max), the orderings the papers claim checked at
every setting, and the commands behind the numbers. Nothing is measured here.

It also fills the measured blocks of the plugin READMEs: a README line
``<!-- fidelity: nearest adaround brecq -->`` is followed by the same kind of table for those methods, up to the
line ``<!-- /fidelity -->``.

    python benchmarks/fidelity_summary.py          # rewrite benchmarks/results/fidelity.md and the README blocks
    python benchmarks/fidelity_summary.py --check  # exit 1 if either differs from what the JSON files give
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "fidelity.md"
MODEL_ORDER = ("zoo:resnet18-fmnist", "zoo:mobilenetv2-fmnist")
SETTING_ORDER = ("W4", "W3", "W4A8", "W4A4", "W3A3", "W2A4", "W2A2")
#: methods recorded under a model-specific label, shown under one name (footnoted in the table)
ALIASES = {"pdquant@loss.options.temperature=1.0": "pdquant"}
ALIAS_NOTES = {"pdquant@loss.options.temperature=1.0": "PD-Quant on MobileNetV2 with T = 1 (the official "
               "MobileNetV2 setting, `run_script.py`)"}
#: (lower, higher, strict): the papers' claims. strict: the higher method must win beyond the seed spread
ORDERINGS: tuple[tuple[str, str, bool], ...] = (
    ("nearest", "adaround", True), ("adaround", "brecq", True), ("brecq", "qdrop", False),
    ("qdrop", "pdquant", False), ("brecq", "mrecg+brecq", False), ("qdrop", "mrecg+qdrop", False),
    ("qdrop", "nwq", False), ("adaround@weight.granularity=per_tensor", "flexround", False),
    ("qdrop@weight.granularity=per_tensor", "flexround", False),
    ("qdrop", "qdrop@recon.cache=fp16", False),
)
#: column order of the summary; other methods (variants such as ``qdrop@recon.cache=fp16``) follow, as first seen
METHOD_ORDER = ("nearest", "adaround", "brecq", "qdrop", "pdquant", "mrecg+brecq", "mrecg+qdrop", "nwq",
                "nearest@weight.granularity=per_tensor", "adaround@weight.granularity=per_tensor",
                "qdrop@weight.granularity=per_tensor", "flexround")
#: time to accuracy (issue 9): a fast preset must come within this many top-1 points of the method's official-default
#: run (``METHOD#official``) in at most this share of its CPU time
TTA_POINTS, TTA_SHARE = 0.3, 0.20
README_BLOCK = re.compile(r"(<!-- fidelity: (?P<methods>[^>]*?) -->\n)(?P<body>.*?)(<!-- /fidelity -->)", re.S)


class SourceError(Exception):
    """A fidelity JSON is missing or malformed."""


@dataclass
class Cell:
    """The runs of one method at one setting on one model."""

    top1: list[float]
    cpu_seconds: list[float | None]  # None: not known (see run_cpu_seconds)
    source: str

    def text(self) -> str:
        mean = statistics.mean(self.top1)
        if len(self.top1) == 1:
            return f"{mean:.2f}"
        return f"{mean:.2f} ({min(self.top1):.2f}..{max(self.top1):.2f})"


@dataclass
class Tables:
    cells: dict[tuple[str, str, str], Cell]
    fp: dict[str, float]
    commands: dict[str, list[str]]
    aliased: set[str]

    def methods(self, model: str) -> list[str]:
        """The methods measured on ``model``: the known ones in ``METHOD_ORDER``, then the others as first seen."""
        seen: list[str] = []
        for m, _, method in self.cells:
            if m == model and method not in seen:
                seen.append(method)
        return sorted(seen, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER),
                                           seen.index(m)))

    def settings(self, model: str, methods: Iterable[str] | None = None) -> list[str]:
        wanted = set(methods) if methods is not None else None
        found = {s for m, s, method in self.cells if m == model and (wanted is None or method in wanted)}
        return sorted(found, key=lambda s: SETTING_ORDER.index(s) if s in SETTING_ORDER else len(SETTING_ORDER))


def read_table(path: Path) -> dict[str, Any]:
    """The ``rows``, ``commands`` (oldest first) and ``fp`` of one JSON written by ``benchmarks/fidelity.py``.

    Raises SourceError when the file cannot be read or is not such a table."""
    try:
        data = json.loads(Path(path).read_text())
        rows = data["rows"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{path}: not a fidelity table JSON ({exc}); rerun benchmarks/fidelity.py") from exc
    commands = data.get("commands") or [data.get("command") or "(not recorded)"]
    return {"rows": rows, "commands": commands, "fp": data.get("fp", {})}


def load(paths: Sequence[Path] | None = None) -> Tables:
    """All runs without errors. A (model, setting, method) measured in several files takes the union of their seeds
    (so two processes can share a table's seeds, each writing its own file); a seed found in several files is taken
    from the file with the most seeds of that cell (files reuse each other's runs, so their numbers agree). Runs of
    one cell recorded with different configurations are an error: such a variant needs its own method label."""
    paths = list(paths) if paths is not None else sorted(RESULTS.glob("fidelity-*.json"))
    found: dict[tuple[str, str, str], list[tuple[str, list[dict]]]] = {}
    fp: dict[str, float] = {}
    commands: dict[str, list[str]] = {}
    aliased: set[str] = set()
    for path in paths:
        data = read_table(path)
        rows = data["rows"]
        commands[path.with_suffix(".md").name] = data["commands"]
        for model, metrics in data["fp"].items():
            if metrics and metrics.get("top1") is not None:
                fp[model] = metrics["top1"]
        for row in rows:
            ok = [run for run in row["runs"] if "error" not in run]
            if not ok:
                continue
            method = ALIASES.get(row["method"], row["method"])
            if method != row["method"]:
                aliased.add(row["method"])
            found.setdefault((row["model"], row["setting"], method), []).append((path.with_suffix(".md").name, ok))
    return Tables({key: merged_cell(key, sources) for key, sources in found.items()}, fp, commands, aliased)


def merged_cell(key: tuple[str, str, str], sources: list[tuple[str, list[dict]]]) -> Cell:
    """One cell from the runs several files hold of it: seeds in order, each from the file with the most seeds."""
    by_seed: dict[int, dict] = {}
    used: list[str] = []
    for name, runs in sorted(sources, key=lambda source: -len(source[1])):
        fresh = [run for run in runs if run["seed"] not in by_seed]
        by_seed.update((run["seed"], run) for run in fresh)
        if fresh:
            used.append(name)
    configs = {json.dumps(run["config"], sort_keys=True) for run in by_seed.values() if run.get("config")}
    if len(configs) > 1:
        raise SourceError(f"{' / '.join(key)}: {', '.join(used)} hold runs of this cell with different "
                          f"configurations ({' vs '.join(sorted(configs))}); give the variant its own method label "
                          "(METHOD@path=value) or rerun it with the same options")
    runs = [by_seed[seed] for seed in sorted(by_seed)]
    return Cell([run["quant"]["top1"] for run in runs], [run_cpu_seconds(run) for run in runs], ", ".join(used))


def run_cpu_seconds(run: dict) -> float | None:
    """The processor time of a run. A run resumed from a checkpoint (its units' wall time adds up to more than
    the last process's wall time) spans processes: its units' own CPU time (``cpu_seconds`` of each unit
    record) counts then, and None when units from before that record was kept lack it."""
    units = run.get("unit_records") or []
    resumed = sum(u.get("seconds", 0.0) for u in units) > run.get("seconds", float("inf"))
    if not resumed:
        return run.get("cpu_seconds", 0.0)
    unit_cpu = [u.get("cpu_seconds") for u in units]
    return None if any(c is None for c in unit_cpu) else sum(unit_cpu)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def model_table(tables: Tables, model: str, methods: Sequence[str]) -> list[str]:
    rows = []
    for setting in tables.settings(model, methods):
        cells = [tables.cells.get((model, setting, m)) for m in methods]
        rows.append([setting, *(c.text() if c else "-" for c in cells)])
    return markdown_table(["setting", *methods], rows)


def fp_text(tables: Tables, model: str) -> str:
    fp = tables.fp.get(model)
    return f"full precision {fp:.2f}" if fp is not None else "full precision not recorded"


def ordering_verdict(low: Cell, high: Cell, strict: bool) -> str:
    """How the measured gain of ``high`` over ``low`` reads against the claim ``low < high`` (``<=`` if not strict)."""
    gain = statistics.mean(high.top1) - statistics.mean(low.top1)
    several = len(low.top1) > 1 and len(high.top1) > 1
    if gain >= 0:
        if not several:
            word = "holds (one seed)"
        elif min(high.top1) > max(low.top1):
            word = "holds beyond the seed spread"
        else:
            word = "holds on the mean only, within the seed spread" if strict else "holds, within the seed spread"
    elif not several:
        word = "reversed (one seed)"
    elif max(high.top1) < min(low.top1):
        word = "reversed beyond the seed spread"
    else:
        word = "reversed on the mean, within the seed spread"
    return f"{gain:+.2f} points: {word}"


def ordering_lines(tables: Tables, model: str, methods: Sequence[str] | None = None) -> list[str]:
    """The claimed orderings measured on ``model`` (only pairs of ``methods`` when given)."""
    lines = []
    for setting in tables.settings(model):
        for low, high, strict in ORDERINGS:
            if methods is not None and not (low in methods and high in methods):
                continue
            a, b = tables.cells.get((model, setting, low)), tables.cells.get((model, setting, high))
            if a is None or b is None:
                continue
            claim = "<" if strict else "<="
            lines.append(f"- {setting}: {low} {claim} {high}: {ordering_verdict(a, b, strict)}")
    return lines


def time_to_accuracy_lines(tables: Tables, model: str) -> list[str]:
    """Each method measured as ``METHOD#official`` and with a faster schedule (the table's row ``METHOD``, or a row
    ``METHOD#PRESET`` of another preset such as ``cpu-fast``): the accuracy gap and the share of the official
    run's CPU time (processor time: comparable across machine loads, unlike wall)."""
    lines = []
    for m, setting, label in sorted(tables.cells):
        method, _, preset = label.partition("#")
        if m != model or preset != "official":
            continue
        official = tables.cells[(model, setting, label)]
        fast_labels = sorted(other for mm, ss, other in tables.cells if mm == model and ss == setting
                             and other != label and (other == method or other.startswith(method + "#")))
        for fast_label in fast_labels:
            fast = tables.cells[(model, setting, fast_label)]
            gap = statistics.mean(fast.top1) - statistics.mean(official.top1)
            accuracy = "met" if round(gap, 2) >= -TTA_POINTS else "missed"  # as printed
            name = "the table's schedule" if fast_label == method else f"preset {fast_label.partition('#')[2]}"
            known = None not in fast.cpu_seconds and None not in official.cpu_seconds
            official_cpu = statistics.mean(official.cpu_seconds) if known else 0.0  # type: ignore[arg-type]
            if known and official_cpu > 0:
                share = statistics.mean(fast.cpu_seconds) / official_cpu  # type: ignore[arg-type]
                speed = "met" if share <= TTA_SHARE else "missed"
                cost = f"in {100 * share:.1f} % of its CPU time (target: at most {100 * TTA_SHARE:.0f} %: {speed})"
            else:
                cost = ("CPU share not measured (a run resumed across processes before units recorded their CPU "
                        "time)")
            lines.append(f"- {setting} {method}, {name}: {fast.text()} vs official {official.text()}: {gap:+.2f} "
                         f"points (target: within {TTA_POINTS}: {accuracy}) {cost}")
    return lines


def render(tables: Tables) -> str:
    out = ["# Fidelity summary: the zoo CNNs, every method measured so far", "",
           "Built by `python benchmarks/fidelity_summary.py` from the tables `benchmarks/results/fidelity-*.md` "
           "listed under Sources (each lists every run with its seeds, CPU seconds, wall time and peak memory, and "
           "the machine load). Cells: full test-set top-1 (%); with several seeds, mean (min..max). A dash: not "
           "measured yet.", ""]
    models = [m for m in MODEL_ORDER if any(k[0] == m for k in tables.cells)]
    models += sorted({k[0] for k in tables.cells} - set(models))
    for model in models:
        out += [f"## {model} ({fp_text(tables, model)})", "", *model_table(tables, model, tables.methods(model)), ""]
        lines = ordering_lines(tables, model)
        if lines:
            out += ["Orderings the papers claim (gain of the right-hand method over the left-hand one):", "", *lines,
                    ""]
        tta = time_to_accuracy_lines(tables, model)
        if tta:
            out += ["Time to accuracy (faster schedules against the official defaults, `METHOD#official`):",
                    "", *tta, ""]
    notes = [f"- `{ALIASES[label]}`: {note}." for label, note in ALIAS_NOTES.items() if label in tables.aliased]
    if notes:
        out += ["Notes:", "", *notes, ""]
    out += ["## Sources", ""]
    for name, commands in sorted(tables.commands.items()):
        out += [f"- `benchmarks/results/{name}`:", *(f"  - `{c}`" for c in commands)]
    return "\n".join(out) + "\n"


def readme_block(tables: Tables, methods: Sequence[str]) -> str:
    out = []
    for model in MODEL_ORDER:
        if not tables.settings(model, methods):
            continue
        out += [f"**{model}** ({fp_text(tables, model)}; full test set; mean (min..max) over seeds):", "",
                *model_table(tables, model, methods), ""]
        lines = ordering_lines(tables, model, methods)
        out += lines + ([""] if lines else [])
    if not out:
        out = ["Not measured yet.", ""]
    out.append("Generated by `python benchmarks/fidelity_summary.py` from `benchmarks/results/fidelity-*.json` "
               "(commands and machine load in `benchmarks/results/fidelity.md`).")
    return "\n".join(out) + "\n"


def update_readme(text: str, tables: Tables) -> str:
    return README_BLOCK.sub(lambda m: m.group(1) + readme_block(tables, m.group("methods").split()) + m.group(4),
                            text)


def readmes() -> list[Path]:
    return sorted((ROOT / "plugins").glob("*/README.md"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    try:
        tables = load()
    except SourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wanted = {OUT: render(tables)}
    for readme in readmes():
        text = readme.read_text()
        wanted[readme] = update_readme(text, tables)
    stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text() != text]
    from quantplug.export import atomic_write_text  # torch only when a file is written
    if args.check:
        for p in stale:
            print(f"out of date: {p.relative_to(ROOT)} (run python benchmarks/fidelity_summary.py)", file=sys.stderr)
        return 1 if stale else 0
    for p in stale:
        atomic_write_text(p, wanted[p])
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
