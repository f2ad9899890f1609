"""Per-layer, per-bit-width sensitivity: how much the task suffers when one layer's weights get ``b`` bits.

Three measurements, all on the full-precision (BN-folded) model and the calibration data, with ``Delta_i(b) =
Q_b(W_i) - W_i`` the weight perturbation of layer ``i`` quantized at ``b`` bits by the recipe's own weight grid and
observer (so the error is the one calibration will produce):

* ``hessian`` (HAWQ-V2, Dong et al., NeurIPS 2020; the ILP of HAWQ-V3, Yao et al., ICML 2021):
  ``Omega_i(b) = Tr(H_i) / n_i * ||Delta_i(b)||^2``, ``H_i`` the Hessian of the task loss w.r.t. ``W_i`` (its
  diagonal block), ``n_i`` the number of weights. The trace comes from Hutchinson's estimator
  ``Tr(H) = E[z^T H z]``, ``z`` Rademacher, with ``H z`` a Hessian-vector product (double back-propagation). One
  ``z`` over all layers gives every layer's trace at once: ``E[z_i^T (H z)_i] = Tr(H_ii)`` because the cross terms
  have mean zero. Iterations stop when the running mean of the total trace changes by less than ``tol``
  (relative), or after ``iters`` (PyHessian's ``trace(maxIter=100, tol=1e-3)``, Yao et al., 2020).
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

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


def hutchinson_traces(model: nn.Module, adapter: ModelAdapter, names: Sequence[str], batches: Sequence[Batch],
                      device: torch.device, *, iters: int = 100, tol: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """``Tr(H_i)`` of the mean task loss over ``batches`` for each layer ``i`` of ``names`` (Hutchinson).

    Returns the total trace of each diagonal block (divide by the weight count for HAWQ's average trace).
    """
    work, params = _with_grad(model, names)
    total = sum(batch_size_of(x) for x, _ in batches)
    generator = torch.Generator().manual_seed(seed)
    sums = [0.0] * len(params)
    previous = None
    done = 0
    for done in range(1, iters + 1):
        zs = [(torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p.dtype).to(p.device) for p in params]
        hz = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            inputs, targets = adapter.prepare_batch((x, y), device)
            loss = adapter.task_loss(adapter.forward(work, inputs), targets) * (batch_size_of(x) / total)
            grads = _grads(loss, params, create_graph=True)
            curved = [(g, z) for g, z in zip(grads, zs) if g.requires_grad]
            if not curved:
                continue  # the loss is linear in these weights: their Hessian is zero
            hvp = torch.autograd.grad([g for g, _ in curved], params, grad_outputs=[z for _, z in curved],
                                      allow_unused=True)
            for acc, h in zip(hz, hvp):
                if h is not None:
                    acc += h.detach()
        for i, (z, h) in enumerate(zip(zs, hz)):
            sums[i] += float((z * h).sum())
        mean_total = sum(sums) / done
        if previous is not None and abs(mean_total - previous) / (abs(previous) + 1e-6) < tol:
            break
        previous = mean_total
    logger.info("hutchinson: %d iterations, total trace %.4g", done, sum(sums) / max(done, 1))
    return {name: s / max(done, 1) for name, s in zip(names, sums)}


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
