"""Time the MSE observer on ResNet-18: the official QDrop algorithm (re-implemented) vs quantplug's ``mse``.

Setup (QDrop's official MSE configuration): torchvision ``resnet18()`` with random weights (seeded), random
BatchNorm statistics folded into the convolutions, eval mode; 64 images of N(0, 1) noise at 224x224 (seeded).
Weights are quantized per-channel asymmetric; activations (the input of every conv / linear layer, captured
with forward pre-hooks over the batch of 64) per-tensor asymmetric; the first and last layer at 8 bits,
the others at ``--bits`` (4 by default; ``--also-2bit`` adds a 2-bit row).

(a) ``official``: a Python loop over the candidates, each candidate fake-quantizing the whole tensor and
    taking the Lp mean, as QDrop's ``MSEObserver`` does (written from its description, not copied).
(b) ``quantplug``: ``quantplug.builtins.observers.MSEObserver`` (observe + compute).

Both choose a clipping range per tensor (per channel for weights); the objective ``mean |fq(x) - x|^2.4`` of
both choices is computed on the full tensor and the largest relative difference is reported.

    python benchmarks/observer_speed.py                 # full comparison (hours: see the saved table)
    python benchmarks/observer_speed.py --quick         # baseline on 1 in 10 ranges / 1 in 16 zero points, scaled
    python benchmarks/observer_speed.py --layers 5      # only the first 5 layers, full
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantplug.builtins.observers import MSEObserver
from quantplug.config import PerChannel, PerTensor, QuantSpec
from quantplug.export import atomic_write_text
from quantplug.quantizer import fake_quant, qparams_from_range, to_rows

P_NORM = 2.4
NUM_CANDIDATES = 100
RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- model
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ``BatchNorm2d`` that directly follows a ``Conv2d`` (torchvision ResNet layout) into it."""
    pairs: list[tuple[nn.Module, str, str]] = []
    for parent in model.modules():
        names = [n for n, _ in parent.named_children()]
        children = dict(parent.named_children())
        for a, b in zip(names, names[1:]):
            if isinstance(children[a], nn.Conv2d) and isinstance(children[b], nn.BatchNorm2d):
                pairs.append((parent, a, b))
    with torch.no_grad():
        for parent, conv_name, bn_name in pairs:
            conv: nn.Conv2d = getattr(parent, conv_name)
            bn: nn.BatchNorm2d = getattr(parent, bn_name)
            factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            folded = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
                bias=True,
            )
            folded.weight.copy_(conv.weight * factor.reshape(-1, 1, 1, 1))
            folded.bias.copy_((bias - bn.running_mean) * factor + bn.bias)
            setattr(parent, conv_name, folded)
            setattr(parent, bn_name, nn.Identity())
    return model


def build_model(seed: int) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random but plausible BatchNorm statistics, so the fold is not an identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
    return fold_batchnorm(model).eval()


def capture_inputs(model: nn.Module, images: torch.Tensor) -> list[tuple[str, nn.Module, torch.Tensor]]:
    captured: dict[str, torch.Tensor] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = []
    for name, module in layers:

        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            captured[name] = args[0].detach().clone()

        hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return [(n, m, captured[n]) for n, m in layers]


# --------------------------------------------------------------------------- (a) the official algorithm
class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class OfficialMSE:
    """QDrop's MSEObserver search, re-implemented: one full-tensor fake-quantization per candidate."""

    def __init__(self, bits: int, ch_axis: int, p: float = P_NORM, num: int = NUM_CANDIDATES) -> None:
        self.qmin, self.qmax = 0, 2**bits - 1  # asymmetric
        self.ch_axis = ch_axis  # -1: per-tensor
        self.p, self.num = p, num
        self.eps = torch.tensor(1e-8)
        self.candidates = 0

    def _qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.min(lo, torch.zeros_like(lo))
        hi = torch.max(hi, torch.zeros_like(hi))
        scale = torch.max((hi - lo) / float(self.qmax - self.qmin), self.eps)
        zero_point = torch.clamp(self.qmin - torch.round(lo / scale), self.qmin, self.qmax)
        return scale, zero_point

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, self.ch_axis).flatten(1) if self.ch_axis != 0 else x.flatten(1)

    def _score(self, x: torch.Tensor, new_min: torch.Tensor, new_max: torch.Tensor) -> torch.Tensor:
        self.candidates += 1
        scale, zero_point = self._qparams(new_min, new_max)
        if self.ch_axis == -1:
            s, z = scale.item(), int(zero_point.item())
        else:
            shape = [1] * x.dim()
            shape[self.ch_axis] = x.shape[self.ch_axis]
            s, z = scale.reshape(shape), zero_point.reshape(shape)
        xq = (torch.clamp(_RoundSTE.apply(x / s) + z, self.qmin, self.qmax) - z) * s
        err = (xq - x).abs().pow(self.p)
        return err.mean() if self.ch_axis == -1 else self._rows(err).mean(1)

    def _minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ch_axis == -1:
            return torch.aminmax(x)
        return torch.aminmax(self._rows(x), dim=1)

    def search(
        self, x_orig: torch.Tensor, range_stride: int = 1, zp_stride: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        x = x_orig.clone().detach().to(torch.float32)
        one_side = "pos" if x.min() >= 0.0 else "neg" if x.max() <= 0.0 else "no"
        x_min, x_max = self._minmax(x)
        best_score = torch.zeros_like(x_min) + 1e10
        best_min, best_max = x_min.clone(), x_max.clone()
        if one_side != "no":  # 1-D search
            xrange = torch.max(x_min.abs(), x_max)
            for i in range(range_stride, self.num + 1, range_stride):
                thres = xrange / self.num * i
                new_min = torch.zeros_like(x_min) if one_side == "pos" else -thres
                new_max = torch.zeros_like(x_max) if one_side == "neg" else thres
                score = self._score(x, new_min, new_max)
                best_min = torch.where(score < best_score, new_min, best_min)
                best_max = torch.where(score < best_score, new_max, best_max)
                best_score = torch.min(score, best_score)
            return best_min, best_max, "1-D"
        if self.ch_axis != -1:
            x_min, x_max = torch.min(x_min, torch.zeros_like(x_min)), torch.max(x_max, torch.zeros_like(x_max))
        xrange = x_max - x_min
        for i in range(range_stride, self.num + 1, range_stride):
            tmp_min = torch.zeros_like(x_min)
            tmp_max = xrange / self.num * i
            tmp_delta = (tmp_max - tmp_min) / float(self.qmax - self.qmin)
            for zp in range(self.qmin, self.qmax + 1, zp_stride):
                new_min = tmp_min - zp * tmp_delta
                new_max = tmp_max - zp * tmp_delta
                score = self._score(x, new_min, new_max)
                best_min = torch.where(score < best_score, new_min, best_min)
                best_max = torch.where(score < best_score, new_max, best_max)
                best_score = torch.min(best_score, score)
        return best_min, best_max, "2-D"

    def total_candidates(self, kind: str) -> int:
        return self.num if kind == "1-D" else self.num * (self.qmax - self.qmin + 1)


# --------------------------------------------------------------------------- measurement
@dataclass
class Measurement:
    layer: str
    part: str  # weight | activation
    bits: int
    numel: int
    search: str = ""
    official_s: float = float("nan")  # process CPU time
    official_wall_s: float = float("nan")
    official_extrapolated: bool = False
    quantplug_s: float = float("nan")  # process CPU time
    quantplug_wall_s: float = float("nan")
    rel_diff_max: float = float("nan")  # max over rows of (obj_b - obj_a) / obj_a (positive: quantplug worse)
    rel_diff_abs_max: float = float("nan")
    reused: bool = False
    official_from_file: bool = False
    official_min: list[float] = field(default_factory=list)
    official_max: list[float] = field(default_factory=list)


def objective(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    rows = to_rows(x, spec)
    xq = fake_quant(rows, scale.reshape(-1, 1), zero_point.reshape(-1, 1), spec.qmin, spec.qmax)
    return (xq - rows).abs().pow(P_NORM).mean(1).double()


def measure(
    layer: str,
    part: str,
    x: torch.Tensor,
    bits: int,
    quick: bool,
    skip_official: bool,
    log: Any,
    previous: Measurement | None = None,
) -> Measurement:
    spec = QuantSpec(bits, False, PerChannel(0) if part == "weight" else PerTensor())
    m = Measurement(layer, part, bits, x.numel())
    # (b) quantplug
    c0, t0 = time.process_time(), time.perf_counter()
    observer = MSEObserver(spec)
    observer.observe(to_rows(x, spec))
    scale_b, zp_b = observer.compute()
    m.quantplug_s, m.quantplug_wall_s = time.process_time() - c0, time.perf_counter() - t0
    if skip_official:
        return m
    # (a) official
    if previous is not None and not previous.official_extrapolated:
        m.search, m.official_s, m.official_from_file = previous.search, previous.official_s, True
        m.official_wall_s = previous.official_wall_s
        best_min, best_max = torch.tensor(previous.official_min), torch.tensor(previous.official_max)
    else:
        official = OfficialMSE(bits, ch_axis=0 if part == "weight" else -1)
        range_stride, zp_stride = (10, 16) if quick else (1, 1)
        c0, t0 = time.process_time(), time.perf_counter()
        best_min, best_max, kind = official.search(x, range_stride, zp_stride)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        m.search = kind
        total = official.total_candidates(kind)
        m.official_s = cpu * total / official.candidates
        m.official_wall_s = wall * total / official.candidates
        m.official_extrapolated = official.candidates < total
    if not m.official_extrapolated:
        m.official_min = best_min.reshape(-1).tolist()
        m.official_max = best_max.reshape(-1).tolist()
        scale_a, zp_a = qparams_from_range(best_min.reshape(-1), best_max.reshape(-1), spec)
        obj_a = objective(x, spec, scale_a, zp_a)
        obj_b = objective(x, spec, scale_b, zp_b)
        rel = (obj_b - obj_a) / obj_a.clamp(min=1e-30)
        m.rel_diff_max = float(rel.max())
        m.rel_diff_abs_max = float(rel.abs().max())
    print(
        f"  {layer:24s} {part:10s} {bits}b {m.search:3s} numel={x.numel():>9d}  official {m.official_s:9.2f}s"
        f"{' (extrapolated)' if m.official_extrapolated else ''}{' (from file)' if m.official_from_file else ''}"
        f"  quantplug {m.quantplug_s:7.3f}s (CPU; wall {m.official_wall_s:.1f}s / {m.quantplug_wall_s:.3f}s)"
        f"  ratio {m.official_s / m.quantplug_s:8.1f}x  rel.diff {m.rel_diff_max:+.2e}",
        file=log,
        flush=True,
    )
    return m


def run_config(
    layers: list[tuple[str, nn.Module, torch.Tensor]],
    num_layers: int,
    bits: int,
    quick: bool,
    skip_official: bool,
    reuse: dict[tuple[str, str, int], Measurement],
    log: Any,
    previous: dict[tuple[str, str, int], Measurement],
) -> list[Measurement]:
    out: list[Measurement] = []
    last = len(layers) - 1  # first and last layer of the whole model keep 8 bits
    for k, (name, module, inp) in enumerate(layers[:num_layers]):
        b = 8 if k in (0, last) else bits
        for part, tensor in (("weight", module.weight.detach()), ("activation", inp)):
            key = (name, part, b)
            if key in reuse:
                m = Measurement(**{**reuse[key].__dict__, "reused": True})
                print(f"  {name:24s} {part:10s} {b}b (same configuration as above: reused)", file=log, flush=True)
            else:
                m = measure(name, part, tensor, b, quick, skip_official, log, previous.get(key))
                reuse[key] = m
            out.append(m)
    return out


def summarize(rows: list[Measurement]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for part in ("weight", "activation", "total"):
        sel = [r for r in rows if part == "total" or r.part == part]
        a = sum(r.official_s for r in sel)
        b = sum(r.quantplug_s for r in sel)
        a_wall = sum(r.official_wall_s for r in sel)
        b_wall = sum(r.quantplug_wall_s for r in sel)
        summary[part] = (a, b, a / b if b > 0 else float("nan"), a_wall, b_wall, a_wall / b_wall)
    diffs = [r.rel_diff_max for r in rows if r.rel_diff_max == r.rel_diff_max]
    absdiffs = [r.rel_diff_abs_max for r in rows if r.rel_diff_abs_max == r.rel_diff_abs_max]
    summary["rel_diff_max"] = max(diffs) if diffs else float("nan")
    summary["rel_diff_abs_max"] = max(absdiffs) if absdiffs else float("nan")
    summary["compared"] = len(diffs)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4, help="bit width of the middle layers (default 4)")
    parser.add_argument("--also-2bit", action="store_true", help="add a row with the middle layers at 2 bits")
    parser.add_argument("--layers", type=int, default=0, help="only the first N conv/linear layers (0: all)")
    parser.add_argument("--quick", action="store_true", help="time 1/10 of the ranges and 1/16 of the zero points")
    parser.add_argument("--skip-official", action="store_true", help="time quantplug only (development)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS / "observer_speed.md")
    parser.add_argument(
        "--reuse-official",
        type=Path,
        default=None,
        help="take the official timings and choices from the .json of an earlier full run (stated in the table)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    log = sys.stdout
    model = build_model(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 2)
    images = torch.randn(args.batch, 3, 224, 224, generator=gen)
    layers = capture_inputs(model, images)
    num_layers = min(args.layers, len(layers)) if args.layers else len(layers)
    print(
        f"{num_layers} of {len(layers)} layers, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        flush=True,
    )

    configs = [args.bits] + ([2] if args.also_2bit and args.bits != 2 else [])
    reuse: dict[tuple[str, str, int], Measurement] = {}
    previous: dict[tuple[str, str, int], Measurement] = {}
    if args.reuse_official is not None:
        for rows in json.loads(args.reuse_official.read_text()).values():
            for row in rows:
                if not row["reused"]:
                    m = Measurement(**row)
                    previous[(m.layer, m.part, m.bits)] = m
    results: dict[int, list[Measurement]] = {}
    started = time.time()
    for bits in configs:
        print(f"W{bits}A{bits} (first / last layer 8 bits):", flush=True)
        results[bits] = run_config(layers, num_layers, bits, args.quick, args.skip_official, reuse, log, previous)
    wall = time.time() - started

    mode = "quick (official timed on 1/10 of ranges, 1/16 of zero points, extrapolated)" if args.quick else "full"
    if args.layers:
        mode += f", first {args.layers} layers only"
    if args.skip_official:
        mode += ", official baseline NOT run"
    if previous:
        mode += f", official timings and choices taken from {args.reuse_official.name} (an earlier full run)"
    lines = [
        "# MSE observer speed: official QDrop algorithm vs quantplug",
        "",
        f"- command: `{command}`",
        f"- mode: **{mode}**",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}, wall time {wall / 60:.1f} min",
        f"- torch {torch.__version__}, {torch.get_num_threads()} thread(s) (`torch.set_num_threads`; other jobs"
        " shared this 2-core machine during the run), CPU: "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}",
        f"- `GLIBC_TUNABLES`: `{os.environ.get('GLIBC_TUNABLES', '')}` (empty: unset)",
        "- model: torchvision `resnet18()` with random weights and random BatchNorm statistics folded into the"
        f" convs, eval mode; {args.batch} images of N(0, 1) noise, 224x224, seed {args.seed}",
        "- weights: per-channel asymmetric; activations (inputs of every conv / linear, captured with forward"
        " pre-hooks over the one batch): per-tensor asymmetric; first and last layer 8 bits",
        f"- MSE search: p = {P_NORM}, {NUM_CANDIDATES} candidates; QDrop's rule: 1-D search for one-sided data,"
        " 2-D (range x zero point) otherwise",
        "- (a) official: Python loop over candidates, each fake-quantizing the whole tensor (re-implemented);"
        " (b) quantplug `mse` observer (default options: exact on values for weights, histogram for activations)",
        "- rel. diff: (objective of (b)'s choice - objective of (a)'s choice) / objective of (a)'s choice,"
        " objective = mean |fq(x) - x|^2.4 on the full tensor, per channel for weights; max over tensors / rows",
        "",
        "Times are process CPU seconds (single thread; the machine was shared, so CPU time is the fair measure),"
        " wall-clock seconds in the last columns.",
        "",
        "| config | part | official (a) [CPU s] | quantplug (b) [CPU s] | speed-up (a)/(b) | max rel. diff (b vs a)"
        " | (a) wall [s] | (b) wall [s] | wall speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bits, rows in results.items():
        s = summarize(rows)
        for part in ("weight", "activation", "total"):
            a, b, ratio, a_wall, b_wall, ratio_wall = s[part]
            diff = ""
            if part == "total":
                diff = f"{s['rel_diff_max']:+.2e} (abs {s['rel_diff_abs_max']:.2e}, {s['compared']} tensors)"
            label = {"weight": "weights", "activation": "activations", "total": "**total**"}[part]
            lines.append(
                f"| W{bits}A{bits} | {label} | {a:.1f} | {b:.2f} | {ratio:.1f}x | {diff} | {a_wall:.1f} | {b_wall:.2f}"
                f" | {ratio_wall:.1f}x |"
            )
    if any(r.reused for rows in results.values() for r in rows):
        lines += [
            "",
            "The 2-bit row reuses the measurements of the tensors whose configuration is identical in the 4-bit"
            " row (first and last layer, 8 bits): same tensor, same bits, same work.",
        ]
    lines += ["", "## Per tensor", ""]
    for bits, rows in results.items():
        lines += [
            f"### W{bits}A{bits}",
            "",
            "| layer | part | bits | numel | search | official [CPU s] | quantplug [CPU s] | speed-up | rel. diff"
            " | official [wall s] | quantplug [wall s] |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            extra = " (extrap.)" if r.official_extrapolated else ""
            extra += " (reused)" if r.reused else ""
            lines.append(
                f"| {r.layer} | {r.part} | {r.bits} | {r.numel} | {r.search} | {r.official_s:.2f}{extra} |"
                f" {r.quantplug_s:.3f} | {r.official_s / r.quantplug_s:.1f}x | {r.rel_diff_max:+.1e} |"
                f" {r.official_wall_s:.2f} | {r.quantplug_wall_s:.3f} |"
            )
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(args.output, text)
    raw = {str(b): [r.__dict__ for r in rows] for b, rows in results.items()}
    atomic_write_text(args.output.with_suffix(".json"), json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
