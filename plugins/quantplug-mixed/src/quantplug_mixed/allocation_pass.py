"""The ``mixed`` model pass: measure per-layer sensitivity, solve the bit allocation exactly, set the bit widths."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantplug.config import MAX_BITS, MIN_BITS
from quantplug.errors import ConfigError
from quantplug.interfaces import ModelPass, PassContext
from quantplug.modules import QuantLayer
from quantplug.prepare import set_weight_bits
from quantplug_mixed.allocator import minimum_cost, solve
from quantplug_mixed.fixed_levels import check_bit_width_matters
from quantplug_mixed.layers import LayerInfo, describe_layers
from quantplug_mixed.sensitivity import (
    METHODS,
    fisher_diagonals,
    hutchinson_traces,
    iter_perturbations,
    output_errors,
    quantize_weight,
    take_samples,
)

logger = logging.getLogger(__name__)

BUDGET_KINDS = ("avg_bits", "bytes", "bops")


def _bits_tuple(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, (int, str)) or value is None:
        value = [value] if isinstance(value, int) else list(value or ())
    out = []
    for b in value:
        if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
            raise ConfigError(f"mixed {what}: bit widths are integers from {MIN_BITS} to {MAX_BITS}; got {b!r}")
        out.append(b)
    return tuple(sorted(set(out)))


def _readable(value: float) -> str:
    """``1,234,567`` or ``1,234.125``: no exponent, whatever the model size."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:,.3f}"


class MixedPrecisionPass(ModelPass):
    """Per-layer weight bit widths under a size or bit-operation budget (HAWQ-V2/V3-style, exact allocation).

    Dong et al., "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks", NeurIPS 2020 (sensitivity
    ``Tr(H_i)/n_i * ||Q_b(W_i) - W_i||^2``); Yao et al., "HAWQ-V3: Dyadic Neural Network Quantization", ICML 2021
    (the allocation as an integer program under model-size / BOPs budgets). Stage ``prepared``: after the pass,
    calibration and any reconstruction run on the chosen bit map.

    Options: ``budget`` (None: what the recipe's uniform ``weight.bits`` costs) of ``budget_kind`` ``avg_bits``
    (average weight bits over the allocated layers), ``bytes`` (weight bytes of all quantized layers) or ``bops``
    (sum of MACs x weight bits x input bits per sample); ``candidates`` (bit widths to choose from);
    ``depthwise_candidates`` (default: the candidates >= ``depthwise_min_bits``) and ``pointwise_candidates``
    (default: ``candidates``); ``sensitivity`` (``hessian``, ``fisher``, ``output_mse``) measured on ``samples``
    calibration samples; for ``hessian``, at most ``hutchinson_iters`` probes per layer, fewer once the relative
    standard error of a layer's trace is below ``hutchinson_tol``. Layers whose bits the recipe's
    bit policy sets (first, last, overrides) keep them and count against ``bytes`` / ``bops`` budgets.
    """

    name = "mixed"
    stage = "prepared"

    @dataclass(frozen=True)
    class Config:
        budget: float | None = None
        budget_kind: str = "avg_bits"
        candidates: tuple = (2, 3, 4, 8)
        depthwise_candidates: tuple = ()
        depthwise_min_bits: int = 4
        pointwise_candidates: tuple = ()
        sensitivity: str = "hessian"
        samples: int = 256
        hutchinson_iters: int = 50
        hutchinson_tol: float = 0.1

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        c = self.config
        if c.budget_kind not in BUDGET_KINDS:
            raise ConfigError(f"mixed budget_kind must be one of {', '.join(BUDGET_KINDS)}; got {c.budget_kind!r}")
        if c.sensitivity not in METHODS:
            raise ConfigError(f"mixed sensitivity must be one of {', '.join(METHODS)}; got {c.sensitivity!r}")
        if c.budget is not None and (isinstance(c.budget, bool) or not isinstance(c.budget, (int, float))
                                     or not math.isfinite(c.budget) or c.budget <= 0):
            raise ConfigError(f"mixed budget must be a positive number (null: the uniform cost); got {c.budget!r}")
        if isinstance(c.samples, bool) or not isinstance(c.samples, int) or c.samples < 1:
            raise ConfigError(f"mixed samples must be a positive integer; got {c.samples!r}")
        if isinstance(c.hutchinson_iters, bool) or not isinstance(c.hutchinson_iters, int) or c.hutchinson_iters < 1:
            raise ConfigError(f"mixed hutchinson_iters must be a positive integer; got {c.hutchinson_iters!r}")
        if not isinstance(c.hutchinson_tol, (int, float)) or c.hutchinson_tol < 0:
            raise ConfigError(f"mixed hutchinson_tol must be >= 0; got {c.hutchinson_tol!r}")
        self.candidates = _bits_tuple(c.candidates, "candidates")
        if not self.candidates:
            raise ConfigError("mixed candidates: give at least one bit width, e.g. [2, 3, 4, 8]")
        explicit_dw = _bits_tuple(c.depthwise_candidates, "depthwise_candidates")
        self.depthwise = explicit_dw or tuple(b for b in self.candidates if b >= c.depthwise_min_bits)
        if not self.depthwise:
            raise ConfigError(f"mixed: no candidate is >= depthwise_min_bits={c.depthwise_min_bits}; add a larger "
                              "candidate or set depthwise_candidates")
        self.pointwise = _bits_tuple(c.pointwise_candidates, "pointwise_candidates") or self.candidates

    # ------------------------------------------------------------------ pieces
    def candidates_for(self, layer: LayerInfo) -> tuple[int, ...]:
        if layer.fixed_bits is not None:
            return (layer.fixed_bits,)
        if layer.kind == "depthwise":
            return self.depthwise
        if layer.kind == "pointwise":
            return self.pointwise
        return self.candidates

    def cost(self, layer: LayerInfo, bits: int) -> int:
        return layer.bops(bits) if self.config.budget_kind == "bops" else layer.weight_cost(bits)

    def budget_for(self, layers: Sequence[LayerInfo], uniform_bits: int) -> int:
        """The budget in cost units (weight bits or BOPs) left for the allocated layers."""
        c = self.config
        allocated = [x for x in layers if x.allocated]
        fixed = sum(self.cost(x, x.fixed_bits) for x in layers if x.fixed_bits is not None)
        if c.budget is None:
            return sum(self.cost(x, uniform_bits) for x in allocated)
        if c.budget_kind == "avg_bits":
            return math.floor(c.budget * sum(x.numel for x in allocated) + 1e-6)
        total = c.budget * 8 if c.budget_kind == "bytes" else c.budget
        return math.floor(total + 1e-6) - fixed

    def in_budget_units(self, layers: Sequence[LayerInfo], cost: int) -> str:
        """``cost`` of the allocated layers (weight bits or BOPs) stated as ``budget`` is given (``budget_kind``)."""
        kind = self.config.budget_kind
        if kind == "avg_bits":
            weights = sum(x.numel for x in layers if x.allocated)
            return f"{cost / weights:.4g} average weight bits ({cost} bits over {weights} allocated weights)"
        fixed = sum(self.cost(x, x.fixed_bits) for x in layers if x.fixed_bits is not None)
        if kind == "bytes":
            return f"{_readable((cost + fixed) / 8)} weight bytes (fixed layers included)"
        return f"{_readable(cost + fixed)} BOPs per sample (fixed layers included)"

    def check_feasible(self, layers: Sequence[LayerInfo], costs: Sequence[Sequence[int]], budget: int,
                       uniform_bits: int) -> None:
        """``ConfigError`` in the user's units if even the cheapest allocation exceeds ``budget``."""
        cheapest = minimum_cost(costs)
        if cheapest <= budget:
            return
        c = self.config
        given = (f"budget={c.budget}, budget_kind={c.budget_kind}" if c.budget is not None
                 else f"budget: null = the cost of uniform {uniform_bits}-bit weights, budget_kind={c.budget_kind}")
        smallest = {x.kind: min(self.candidates_for(x)) for x in layers if x.allocated}
        raise ConfigError(
            f"mixed: the budget ({given}) is {self.in_budget_units(layers, budget)}, below the cheapest allocation: "
            f"{self.in_budget_units(layers, cheapest)}, with every allocated layer at its smallest candidate "
            f"({', '.join(f'{k} {b} bits' for k, b in sorted(smallest.items()))}). Raise the budget or add smaller "
            "candidate bit widths")

    def sensitivities(self, model: nn.Module, ctx: PassContext, layers: Sequence[LayerInfo]
                      ) -> tuple[dict[str, dict[int, float]], dict[str, Any]]:
        """``Omega_i(b)`` for every allocated layer and candidate, and method-specific extras for the summary."""
        recipe, c = ctx.recipe, self.config
        names = [x.name for x in layers]
        candidates = {x.name: self.candidates_for(x) for x in layers}
        fp_layers = {name: ctx.fp_model.get_submodule(name) for name in names}
        grid = {x.name: model.get_submodule(x.name).weight_spec for x in layers}

        def quantized(name: str, bits: int) -> torch.Tensor:
            return quantize_weight(fp_layers[name].weight, grid[name].with_bits(bits), ctx.session, recipe)

        batches = take_samples(ctx.calib_inputs, ctx.calib_targets, c.samples)
        if not batches:
            raise ConfigError("mixed needs calibration data to measure sensitivities (calib.num_samples >= 1)")
        extras: dict[str, Any] = {}
        table: dict[str, dict[int, float]] = {name: {} for name in names}
        if c.sensitivity == "output_mse":
            table = output_errors(ctx.fp_model, ctx.adapter, names, candidates, quantized, batches, ctx.device)
        elif c.sensitivity == "hessian":
            traces = hutchinson_traces(ctx.fp_model, ctx.adapter, names, batches, ctx.device,
                                       iters=c.hutchinson_iters, tol=c.hutchinson_tol, seed=ctx.seed)
            negative = [n for n, t in traces.items() if t.trace < 0]
            if negative:
                logger.warning("mixed: negative Hessian trace estimates (set to 0) for %s: raise hutchinson_iters "
                               "or lower hutchinson_tol", negative)
            mean_trace = {x.name: max(traces[x.name].trace, 0.0) / x.numel for x in layers}
            for name, bits, delta in iter_perturbations(ctx.fp_model, names, candidates, quantized):
                table[name][bits] = mean_trace[name] * float((delta.double() ** 2).sum())
            extras["trace_relative_stderr"] = {n: (t.stderr / abs(t.trace) if t.trace else None)
                                               for n, t in traces.items()}
            extras["trace_probes"] = {n: t.iterations for n, t in traces.items()}
            extras["mean_trace"] = mean_trace
        else:
            fisher = fisher_diagonals(ctx.fp_model, ctx.adapter, names, batches, ctx.device)
            for name, bits, delta in iter_perturbations(ctx.fp_model, names, candidates, quantized):
                table[name][bits] = float((fisher[name].double() * delta.double() ** 2).sum())
            extras["fisher_trace"] = {n: float(f.sum()) for n, f in fisher.items()}
        return table, extras

    # ------------------------------------------------------------------ run
    def run(self, model: nn.Module, ctx: PassContext) -> dict[str, Any]:
        start = time.perf_counter()
        recipe = ctx.recipe
        check_bit_width_matters(recipe, ctx.session)
        sample = ctx.adapter.prepare_batch((ctx.calib_inputs[0], ctx.calib_targets[0]), ctx.device)[0]
        layers = describe_layers(model, ctx.fp_model, ctx.adapter, recipe, sample)
        allocated = [x for x in layers if x.allocated]
        if not allocated:
            logger.warning("mixed: no layer left to allocate (every quantized layer is fixed by the bit policy)")
            return {"bits": {x.name: x.weight_bits for x in layers}, "allocated_layers": 0}
        uniform_bits = recipe.weight.bits
        budget = self.budget_for(layers, uniform_bits)
        options = [self.candidates_for(x) for x in allocated]
        costs = [[self.cost(x, b) for b in opts] for x, opts in zip(allocated, options)]
        self.check_feasible(layers, costs, budget, uniform_bits)  # before the (costly) sensitivities
        table, extras = self.sensitivities(model, ctx, allocated)
        values = [[table[x.name][b] for b in opts] for x, opts in zip(allocated, options)]
        answer = solve(costs, values, budget)
        chosen = {x.name: opts[k] for x, opts, k in zip(allocated, options, answer.choice)}
        for name, bits in chosen.items():
            layer = model.get_submodule(name)
            assert isinstance(layer, QuantLayer)
            if layer.weight_spec is not None and layer.weight_spec.bits != bits:
                set_weight_bits(layer, bits)
        final = {x.name: chosen.get(x.name, x.weight_bits) for x in layers}
        summary = self.summarize(layers, final, table, uniform_bits, budget, answer.sensitivity)
        summary.update(extras)
        summary["seconds"] = round(time.perf_counter() - start, 3)
        summary["max_frontier"] = answer.max_frontier
        logger.info("mixed: %s average %.3f bits over %d layers (predicted sensitivity %.4g; uniform W%d %.4g)",
                    self.config.sensitivity, summary["average_bits"], len(allocated), answer.sensitivity,
                    uniform_bits, summary["uniform"]["sensitivity"] or float("nan"))
        return summary

    def summarize(self, layers: Sequence[LayerInfo], bits: Mapping[str, int], table: Mapping[str, Mapping[int, float]],
                  uniform_bits: int, budget: int, objective: float) -> dict[str, Any]:
        """JSON-able record of the allocation for the run manifest."""
        allocated = [x for x in layers if x.allocated]
        n_alloc = sum(x.numel for x in allocated)
        n_all = sum(x.numel for x in layers)

        def totals(pick: Mapping[str, int]) -> dict[str, Any]:
            return {"weight_bytes": sum(x.weight_cost(pick[x.name]) for x in layers) / 8,
                    "bops": sum(x.bops(pick[x.name]) for x in layers)}

        uniform = {x.name: (x.fixed_bits if x.fixed_bits is not None else uniform_bits) for x in layers}
        uniform_known = all(uniform_bits in table[x.name] for x in allocated)
        by_kind: dict[str, list[LayerInfo]] = {}
        for x in allocated:
            by_kind.setdefault(x.kind, []).append(x)
        return {
            "sensitivity": self.config.sensitivity,
            "budget_kind": self.config.budget_kind,
            "budget": self.config.budget,
            "budget_units": budget,
            "candidates": {"default": list(self.candidates), "depthwise": list(self.depthwise),
                           "pointwise": list(self.pointwise)},
            "bits": dict(bits),
            "allocated_layers": len(allocated),
            "average_bits": sum(x.numel * bits[x.name] for x in allocated) / n_alloc,
            "model_average_bits": sum(x.numel * bits[x.name] for x in layers) / n_all,
            "average_bits_by_kind": {k: sum(x.numel * bits[x.name] for x in v) / sum(x.numel for x in v)
                                     for k, v in sorted(by_kind.items())},
            **totals(bits),
            "predicted_sensitivity": objective,
            "uniform": {"bits": uniform_bits, **totals(uniform),
                        "sensitivity": (sum(table[x.name][uniform_bits] for x in allocated)
                                        if uniform_known else None)},
            "table": {name: {str(b): v for b, v in row.items()} for name, row in table.items()},
        }
