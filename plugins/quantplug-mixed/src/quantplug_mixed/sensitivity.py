"""Per-layer, per-bit-width sensitivity: how much the task suffers when one layer's weights get ``b`` bits.

Three measurements, all on the full-precision (BN-folded) model and the calibration data, with ``Delta_i(b) =
Q_b(W_i) - W_i`` the weight perturbation of layer ``i`` quantized at ``b`` bits by the recipe's own weight grid and
observer (so the error is the one calibration will produce):

* ``hessian`` (HAWQ-V2, Dong et al., NeurIPS 2020; the ILP of HAWQ-V3, Yao et al., ICML 2021):
  ``Omega_i(b) = Tr(H_i) / n_i * ||Delta_i(b)||^2``, ``H_i`` the Hessian of the task loss w.r.t. ``W_i`` (its
  diagonal block), ``n_i`` the number of weights. The trace comes from Hutchinson's estimator
  ``Tr(H) = E[z^T H z]``, ``z`` Rademacher, with ``H z`` a Hessian-vector product (double back-propagation),
  block by block as HAWQ does (PyHessian, Yao et al., 2020). A single ``z`` over all layers would give every
  layer's trace from one product (``E[z_i^T (H z)_i] = Tr(H_ii)``), but the cross terms ``z_i^T H_ij z_j`` make
  it useless here: on the ResNet-18 zoo model after 60 probes half of the layers still had a relative standard
  error near 1 (see the README).
* ``fisher``: the second-order term with the empirical Fisher diagonal as curvature,
  ``Omega_i(b) = sum_j F_jj Delta_ij(b)^2``, ``F = mean over samples of g (.) g``, ``g`` the per-sample gradient of
  the task loss (one backward pass per sample, labels from the data), as in Fisher-based sensitivity
  (LeCun et al., "Optimal Brain Damage", 1990; BRECQ's Fisher approximation, Li et al., ICLR 2021).
* ``output_mse``: quantize layer ``i`` alone at ``b`` bits and measure the mean squared change of the model's
  output on the calibration samples (the per-layer quantization error on calibration data, as in ZeroQ's
  sensitivity, Cai et al., CVPR 2020, which uses a KL divergence instead of the MSE).

Each assumes the damage of several quantized layers adds up (HAWQ, ZeroQ); only the allocation uses that.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from quantplug.config import QuantSpec, Recipe
from quantplug.errors import QuantplugError
from quantplug.interfaces import ModelAdapter
from quantplug.quantizer import fake_quant_rows, to_rows

logger = logging.getLogger(__name__)

METHODS = ("hessian", "fisher", "output_mse")

Batch = tuple[Any, Any]


def batch_size_of(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.shape[0])
    if isinstance(x, Mapping):
        return batch_size_of(next(iter(x.values())))
    return len(x)


def take_samples(inputs: Sequence[Any], targets: Sequence[Any], samples: int) -> list[Batch]:
    """Whole calibration batches, in order, until at least ``samples`` samples are covered."""
    out: list[Batch] = []
    count = 0
    for x, y in zip(inputs, targets):
        if count >= samples:
            break
        out.append((x, y))
        count += batch_size_of(x)
    return out


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, session: Any, recipe: Recipe) -> torch.Tensor:
    """``Q_b(W)``: ``weight`` on the grid ``spec`` with the scale the recipe's weight observer picks."""
    observer = session.make("observer", recipe.weight_observer, spec)
    observer.observe(to_rows(weight.detach(), spec))
    scale, zero_point = observer.compute()
    return fake_quant_rows(weight.detach(), scale.to(weight.device), zero_point.to(weight.device), spec)


def _weights(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    params = []
    for name in names:
        weight = model.get_submodule(name).weight
        params.append(weight)
    return params


def _with_grad(model: nn.Module, names: Sequence[str]) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of ``model`` whose only trainable tensors are the weights of ``names``."""
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    params = _weights(work, names)
    for p in params:
        p.requires_grad_(True)
    return work, params


def _grads(loss: torch.Tensor, params: Sequence[nn.Parameter], create_graph: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


@dataclass(frozen=True)
class TraceEstimate:
    """A Hutchinson estimate of one layer's ``Tr(H_ii)``: the mean, its standard error, the probes used."""

    trace: float
    stderr: float
    iterations: int


def _rademacher(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(like.dtype).to(like.device)


def hutchinson_traces(model: nn.Module, adapter: ModelAdapter, names: Sequence[str], batches: Sequence[Batch],
                      device: torch.device, *, iters: int = 50, tol: float = 0.1, seed: int = 0,
                      ) -> dict[str, TraceEstimate]:
    """``Tr(H_ii)`` of the task loss for each layer ``i`` of ``names``: block-wise Hutchinson, as HAWQ-V2.

    Iteration ``t`` takes calibration batch ``t mod len(batches)``, one forward pass and the first-order gradients
    with their graph, then for each layer a Rademacher ``z_i`` and ``H_ii z_i = d(g_i . z_i)/dW_i`` (a double
    backward restricted to the layer, so no cross-layer term ``z_i^T H_ij z_j`` adds noise). A layer stops once the
    standard error of its running mean is at most ``tol`` times the mean (checked after a full pass over the
    batches and at least 3 probes); every layer stops after ``iters`` probes. Scaled-dot-product attention runs
    on its maths backend here: the fused kernels (flash attention on CPU) have no second derivative.
    """
    work, params = _with_grad(model, names)
    generator = torch.Generator().manual_seed(seed)
    values: list[list[float]] = [[] for _ in params]
    active = list(range(len(params)))
    min_iters = max(3, len(batches))
    # the fused attention kernels (flash, memory-efficient) have no double backward: attention runs as plain maths
    with sdpa_kernel(SDPBackend.MATH):
        for t in range(iters):
            if not active:
                break
            x, y = batches[t % len(batches)]
            inputs, targets = adapter.prepare_batch((x, y), device)
            loss = adapter.task_loss(adapter.forward(work, inputs), targets)
            grads = torch.autograd.grad(loss, [params[i] for i in active], create_graph=True, allow_unused=True)
            for i, g in zip(active, grads):
                z = _rademacher(params[i].shape, generator, params[i])
                value = 0.0
                if g is not None and g.requires_grad:  # else the loss is linear in this layer: H_ii = 0
                    (hz,) = torch.autograd.grad(g, params[i], grad_outputs=z, retain_graph=True, allow_unused=True)
                    value = float((z * hz).sum()) if hz is not None else 0.0
                values[i].append(value)
            del loss, grads
            if t + 1 >= min_iters:
                active = [i for i in active if not _settled(values[i], tol)]
    out = {}
    for name, vals in zip(names, values):
        mean, stderr = _mean_stderr(vals)
        out[name] = TraceEstimate(mean, stderr, len(vals))
    logger.info("hutchinson: %d-%d probes per layer, total trace %.4g", min(len(v) for v in values),
                max(len(v) for v in values), sum(e.trace for e in out.values()))
    return out


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.inf
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _settled(values: Sequence[float], tol: float) -> bool:
    mean, stderr = _mean_stderr(values)
    return stderr <= tol * abs(mean)


def fisher_diagonals(model: nn.Module, adapter: ModelAdapter, names: Sequence[str], batches: Sequence[Batch],
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal ``mean_n g_n (.) g_n`` of each layer's weights, one backward pass per sample."""
    work, params = _with_grad(model, names)
    sums = [torch.zeros_like(p) for p in params]
    count = 0
    for x, y in batches:
        inputs, targets = adapter.prepare_batch((x, y), device)
        for n in range(batch_size_of(x)):
            loss = adapter.task_loss(adapter.forward(work, _index(inputs, n)), _index(targets, n))
            for acc, g in zip(sums, _grads(loss, params)):
                acc += g.detach() ** 2
            count += 1
    if count == 0:
        raise QuantplugError("no calibration samples to estimate the Fisher information from")
    return {name: s / count for name, s in zip(names, sums)}


def _index(x: Any, n: int) -> Any:
    """Sample ``n`` of a batch, keeping the batch dimension."""
    if isinstance(x, torch.Tensor):
        return x[n:n + 1]
    if isinstance(x, Mapping):
        return {k: _index(v, n) for k, v in x.items()}
    return x[n:n + 1]


@torch.no_grad()
def output_errors(model: nn.Module, adapter: ModelAdapter, names: Sequence[str],
                  candidates: Mapping[str, Sequence[int]], quantized: Callable[[str, int], torch.Tensor],
                  batches: Sequence[Batch], device: torch.device) -> dict[str, dict[int, float]]:
    """Mean squared output change when only layer ``name`` has its weights at ``b`` bits (``quantized(name, b)``)."""
    work = copy.deepcopy(model).eval()
    inputs = [adapter.prepare_batch((x, y), device)[0] for x, y in batches]
    reference = [adapter.forward(work, x) for x in inputs]
    out: dict[str, dict[int, float]] = {}
    for name in names:
        weight = work.get_submodule(name).weight
        original = weight.detach().clone()
        out[name] = {}
        for bits in candidates[name]:
            weight.copy_(quantized(name, bits))
            error = sum(float(((adapter.forward(work, x) - ref) ** 2).sum()) for x, ref in zip(inputs, reference))
            out[name][bits] = error / max(sum(r.numel() for r in reference), 1)
        weight.copy_(original)
    return out


def iter_perturbations(model: nn.Module, names: Sequence[str], candidates: Mapping[str, Sequence[int]],
                       quantized: Callable[[str, int], torch.Tensor]) -> Iterator[tuple[str, int, torch.Tensor]]:
    """``(name, bits, Q_b(W) - W)`` for every layer and candidate, one tensor at a time."""
    for name in names:
        weight = model.get_submodule(name).weight.detach()
        for bits in candidates[name]:
            yield name, bits, quantized(name, bits) - weight
