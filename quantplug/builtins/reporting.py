"""``quantplug report RUN_DIR [--png PATH]``: a readable summary of a run's manifest, and a loss chart.

The text summary covers what ``quantplug.json`` records: the model and data, the resolved recipe (quant
specs, components, calibration and reconstruction settings), the component providers and versions, the
bit map, the reconstruction plan, the per-unit records (loss before / after, iterations, seconds, pass),
full-precision versus quantized metrics, and the environment. ``--png`` draws the per-unit
reconstruction loss before and after as a grouped bar chart (matplotlib, Agg backend: no display needed;
``pip install matplotlib`` or ``pip install quantplug[report]``).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from quantplug import console
from quantplug.errors import QuantplugError
from quantplug.export import read_manifest
from quantplug.hookspecs import hookimpl

logger = logging.getLogger(__name__)

#: above this many layers the bit map is summarized per bit-width pair instead of listed per layer
MAX_LISTED_LAYERS = 32
MATPLOTLIB_HINT = "pip install matplotlib (or pip install quantplug[report])"


# --------------------------------------------------------------------------- formatting helpers
def _fmt_num(value: Any, spec: str = ".4g") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else str(value)
    return format(value, spec)


def _fmt_bits(bits: Any) -> str:
    return "fp" if bits in (None, 0, 32) else str(bits)


def _fmt_granularity(g: Any) -> str:
    if isinstance(g, str):
        return g
    if not isinstance(g, Mapping):
        return "n/a"
    kind = str(g.get("kind", "per_tensor"))
    if kind == "per_channel":
        return f"per_channel(axis={g.get('axis', 0)})"
    if kind == "per_group":
        return f"per_group(size={g.get('group_size', '?')})"
    return kind


def _fmt_spec(spec: Any, observer: Any) -> str:
    if not isinstance(spec, Mapping):
        return "full precision"
    sym = "symmetric" if spec.get("symmetric") else "asymmetric"
    text = f"{spec.get('bits', '?')}-bit {sym} {_fmt_granularity(spec.get('granularity'))}"
    return text + f", observer {_fmt_ref(observer)}"


def _fmt_ref(ref: Any) -> str:
    if not isinstance(ref, Mapping):
        return "n/a" if ref is None else str(ref)
    options = ref.get("options") or {}
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    return f"{ref.get('name', '?')}({opts})" if opts else str(ref.get("name", "?"))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ",
           right: Sequence[bool] | None = None) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    right = right or [False] * len(header)
    out = []
    for row in (header, *rows):
        cells = [str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(row, widths, right)]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def unit_label(unit: Mapping[str, Any]) -> str:
    """A unit's name, with its pass when the run had more than the joint one (BRECQ's weights / activations)."""
    name = str(unit.get("name", unit.get("index", "?")))
    pass_name = unit.get("pass_name", "joint")
    return name if pass_name in (None, "joint") else f"{name} [{pass_name}]"


# --------------------------------------------------------------------------- text report
def render_report(manifest: Mapping[str, Any], run_dir: str | None = None) -> str:
    """The manifest of a run (``quantplug.json``) as a text summary."""
    lines: list[str] = []
    recipe: Mapping[str, Any] = manifest.get("recipe") or {}
    title = f"quantplug run {run_dir}" if run_dir else "quantplug run"
    lines += [title, "=" * len(title)]
    lines.append(f"model:   {manifest.get('model_id', 'n/a')}"
                 + (f"  options {dict(manifest['model_options'])}" if manifest.get("model_options") else ""))
    eval_samples = manifest.get("eval_samples")
    lines.append(f"data:    {manifest.get('data', 'n/a')}  (evaluation samples: "
                 f"{'all' if eval_samples is None else eval_samples})")
    wall = _fmt_num(manifest.get("wall_seconds"), ".1f")
    lines.append(f"seed:    {manifest.get('seed', 'n/a')}    wall time: {wall} s")
    export = manifest.get("export")
    if isinstance(export, Mapping):
        lines.append(f"export:  format {export.get('format', '?')} of {export.get('source', '?')}")

    lines += ["", f"recipe: {recipe.get('name', 'n/a')}"]
    if recipe.get("source"):
        lines.append(f"  source      {recipe['source']}")
    lines.append(f"  weights     {_fmt_spec(recipe.get('weight'), recipe.get('weight_observer'))}")
    lines.append(f"  activations {_fmt_spec(recipe.get('activation'), recipe.get('activation_observer'))}")
    transforms = ", ".join(_fmt_ref(t) for t in recipe.get("data_transforms") or []) or "none"
    lines.append(f"  components  rounding {_fmt_ref(recipe.get('rounding'))}, loss {_fmt_ref(recipe.get('loss'))}, "
                 f"scheduler {_fmt_ref(recipe.get('scheduler'))}, "
                 f"activation policy {_fmt_ref(recipe.get('activation_policy'))}, data transforms {transforms}")
    calib = recipe.get("calib") or {}
    if calib:
        lines.append(f"  calibration {calib.get('num_samples')} samples, batch {calib.get('batch_size')}, "
                     f"seed {calib.get('seed')}")
    recon = recipe.get("recon") or {}
    if recon:
        steps = (f", activation steps learned (lr {_fmt_num(recon.get('act_lr'))})"
                 if recon.get("learn_act_step") else "")
        lines.append(f"  reconstruct {recon.get('iters')} iterations per unit, batch {recon.get('batch_size')}, "
                     f"lr {_fmt_num(recon.get('lr'))}, order {recon.get('order')}, cache {recon.get('cache')}{steps}")
    bits = recipe.get("bits") or {}
    if bits:
        over = bits.get("overrides") or []
        lines.append(f"  bit policy  first layer {_fmt_bits(bits.get('first_layer_bits'))}, last layer "
                     f"{_fmt_bits(bits.get('last_layer_bits'))}" + (f", overrides {over}" if over else ""))

    providers: Mapping[str, str] = manifest.get("providers") or {}
    versions: Mapping[str, str] = manifest.get("versions") or {}
    if providers:
        lines += ["", "providers:"]
        lines += _table(["component", "provider", "version"],
                        [[k, str(v), str(versions.get(k, "?"))] for k, v in sorted(providers.items())])

    lines += _bit_map_lines(manifest.get("bit_map") or [])
    plan = manifest.get("plan") or []
    lines += ["", f"plan ({len(plan)} units, scheduler {_fmt_ref(recipe.get('scheduler'))}): {', '.join(plan)}"]
    lines += _unit_lines(manifest.get("units") or [])
    lines += _metric_lines(manifest.get("metrics") or {})

    env: Mapping[str, Any] = manifest.get("environment") or {}
    if env:
        lines += ["", "environment: " + ", ".join(f"{k} {v}" for k, v in sorted(env.items()))]
    return "\n".join(lines) + "\n"


def _bit_map_lines(bit_map: Sequence[Mapping[str, Any]]) -> list[str]:
    if not bit_map:
        return ["", "bit map: n/a"]
    lines = ["", f"bit map ({len(bit_map)} layers):"]
    if len(bit_map) <= MAX_LISTED_LAYERS:
        rows = [[str(b.get("name", "?")), _fmt_bits(b.get("weight_bits")), _fmt_bits(b.get("input_bits"))]
                for b in bit_map]
        return lines + _table(["layer", "weight bits", "input bits"], rows, right=[False, True, True])
    groups: dict[tuple[str, str], list[str]] = {}
    for b in bit_map:
        key = (_fmt_bits(b.get("weight_bits")), _fmt_bits(b.get("input_bits")))
        groups.setdefault(key, []).append(str(b.get("name", "?")))
    rows = []
    for (w, a), names in sorted(groups.items()):
        shown = ", ".join(names[:4]) + (f", ... (+{len(names) - 4})" if len(names) > 4 else "")
        rows.append([w, a, str(len(names)), shown])
    return lines + _table(["weight bits", "input bits", "layers", "names"], rows, right=[True, True, True, False])


def _unit_lines(units: Sequence[Mapping[str, Any]]) -> list[str]:
    if not units:
        return ["", "units: none recorded"]
    rows = []
    total_iters, total_seconds = 0, 0.0
    for u in units:
        before, after = u.get("loss_before"), u.get("loss_after")
        change = "n/a"
        if isinstance(before, (int, float)) and isinstance(after, (int, float)) and before:
            change = f"{100.0 * (after - before) / before:+.1f}%"
        iters, seconds = u.get("iters", 0) or 0, u.get("seconds", 0.0) or 0.0
        total_iters += int(iters)
        total_seconds += float(seconds)
        rows.append([str(u.get("index", "")), unit_label(u), str(len(u.get("layers") or [])), str(iters),
                     _fmt_num(seconds, ".2f"), _fmt_num(before), _fmt_num(after), change])
    lines = ["", f"units ({len(units)} reconstructed, {total_iters} iterations, {total_seconds:.1f} s):"]
    return lines + _table(["#", "unit", "layers", "iters", "seconds", "loss before", "loss after", "change"], rows,
                          right=[True, False, True, True, True, True, True, True])


def _metric_lines(metrics: Mapping[str, Any]) -> list[str]:
    fp: Mapping[str, Any] = metrics.get("fp") or {}
    quant: Mapping[str, Any] = metrics.get("quant") or {}
    if not fp and not quant:
        return ["", "metrics: none recorded"]
    rows = []
    for key in list(quant) + [k for k in fp if k not in quant]:
        f, q = fp.get(key), quant.get(key)
        delta = _fmt_num(q - f, "+.2f") if isinstance(f, (int, float)) and isinstance(q, (int, float)) else "n/a"
        rows.append([key, _fmt_num(f, ".2f"), _fmt_num(q, ".2f"), delta])
    return ["", "metrics:"] + _table(["metric", "full precision", "quantized", "delta"], rows,
                                     right=[False, True, True, True])


# --------------------------------------------------------------------------- chart
def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise QuantplugError(f"the loss chart needs matplotlib: {MATPLOTLIB_HINT}") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_unit_losses(manifest: Mapping[str, Any], path: str | os.PathLike[str]) -> str:
    """Write a PNG bar chart of each unit's reconstruction loss before and after; returns the path.

    The y axis is logarithmic when the losses span more than two orders of magnitude (first and last
    units often differ that much). The file is written to a temporary name and renamed.
    """
    units = manifest.get("units") or []
    if not units:
        raise QuantplugError("the run records no reconstruction units, so there is no loss to plot")
    plt = _pyplot()
    labels = [unit_label(u) for u in units]
    before = [float(u.get("loss_before") or 0.0) for u in units]
    after = [float(u.get("loss_after") or 0.0) for u in units]
    positive = [v for v in before + after if v > 0]
    log_scale = bool(positive) and len(positive) == len(before) + len(after) and max(positive) / min(positive) > 100
    width = 0.4
    xs = list(range(len(units)))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * len(units) + 3.5), 4.2), dpi=100)
    try:
        ax.bar([x - width / 2 for x in xs], before, width, label="before reconstruction", color="#9aa5b1")
        ax.bar([x + width / 2 for x in xs], after, width, label="after reconstruction", color="#2f6db5")
        for x, b, a in zip(xs, before, after):  # relative change above each pair (invisible on a log axis)
            if b > 0:
                ax.annotate(f"{100.0 * (a - b) / b:+.1f}%", (x, max(a, b)), textcoords="offset points",
                            xytext=(0, 3), ha="center", fontsize=7, color="#333333")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=45 if len(units) > 6 else 0, ha="right" if len(units) > 6 else "center",
                           fontsize=8)
        if log_scale:
            ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * (3.0 if log_scale else 1.1))  # room for the percentages
        ax.set_ylabel("reconstruction loss" + (" (log scale)" if log_scale else ""))
        recipe = manifest.get("recipe") or {}
        ax.set_title(f"{recipe.get('name', '?')} on {manifest.get('model_id', '?')}: per-unit loss", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        target = os.path.abspath(os.fspath(path))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".quantplug-report-", suffix=".png", dir=os.path.dirname(target))
        os.close(fd)
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    finally:
        plt.close(fig)
    logger.info("wrote the loss chart of %d units to %s", len(units), target)
    return target


# --------------------------------------------------------------------------- CLI: quantplug report
def cmd_report(args: argparse.Namespace) -> int:
    """``quantplug report RUN_DIR [--png PATH]``: print the summary; write the chart when asked."""
    manifest = read_manifest(args.run_dir)
    console.out(render_report(manifest, args.run_dir), end="")
    if args.png:
        console.out(f"loss chart written to {plot_unit_losses(manifest, args.png)}")
    return 0


@hookimpl
def register_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="summarize a saved run (recipe, bit map, plan, per-unit losses, metrics); --png draws the losses",
        description="Print a readable summary of RUN_DIR/quantplug.json (the output of `quantplug apply`); with "
                    "--png also write a bar chart of each unit's reconstruction loss before and after "
                    "(needs matplotlib).",
    )
    p.add_argument("run_dir", help="run directory written by `quantplug apply`")
    p.add_argument("--png", default=None, metavar="PATH", help="write the per-unit loss chart to this PNG file")
    p.set_defaults(func=cmd_report)


__all__ = ["cmd_report", "plot_unit_losses", "render_report", "unit_label"]
