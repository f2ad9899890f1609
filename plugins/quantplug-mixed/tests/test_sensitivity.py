"""Sensitivity maths: Hutchinson against the exact Hessian trace, the Fisher diagonal, output errors, ordering."""

from __future__ import annotations

import math

import pytest
import torch
from mixed_toys import SmallMLP, ToyAdapter, TwoBranch, labelled_batches, run_pass, toy_recipe
from quantplug_mixed.sensitivity import (
    TraceEstimate,
    fisher_diagonals,
    hutchinson_traces,
    output_errors,
    quantize_weight,
    take_samples,
)
from torch.func import functional_call

from quantplug.plugins import Session

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _exact_hessian_blocks(model: SmallMLP, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    total = sum(x.shape[0] for x in xs)
    out = {}
    for name in ("fc1", "fc2", "fc3"):
        key = f"{name}.weight"
        weight = model.get_submodule(name).weight.detach().clone()

        def loss_of(w: torch.Tensor, key: str = key) -> torch.Tensor:
            return sum(torch.nn.functional.cross_entropy(functional_call(model, {key: w}, (x,)), y) * x.shape[0] / total
                       for x, y in zip(xs, ys))  # type: ignore[return-value]

        n = weight.numel()
        out[name] = torch.autograd.functional.hessian(loss_of, weight).reshape(n, n)
    return out


def test_hutchinson_matches_the_exact_hessian_trace_of_each_layer() -> None:
    torch.manual_seed(0)
    model = SmallMLP().double()
    x = torch.randn(48, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(0))
    exact = _exact_hessian_blocks(model, [x], [y])
    iters = 600
    estimate = hutchinson_traces(model, ToyAdapter(), ["fc1", "fc2", "fc3"], [(x, y)], CPU, iters=iters, tol=0.0,
                                 seed=1)
    for name, hessian in exact.items():
        trace = float(hessian.diagonal().sum())
        # Var(z^T H z) = 2 * sum_{a != b} H_ab^2 for Rademacher z: allow four standard errors of the mean
        off_diagonal = float((hessian ** 2).sum() - (hessian.diagonal() ** 2).sum())
        tolerance = 4 * (2 * off_diagonal / iters) ** 0.5
        assert trace > 0
        assert estimate[name].iterations == iters
        assert abs(estimate[name].trace - trace) < tolerance, (name, estimate[name], trace, tolerance)
        assert tolerance < 0.25 * trace  # the check is tight enough to mean something
        assert estimate[name].stderr == pytest.approx((2 * off_diagonal / iters) ** 0.5, rel=0.3)


def test_hutchinson_averages_over_the_batches_and_stops_when_settled() -> None:
    torch.manual_seed(0)
    model = SmallMLP().double()
    x = torch.randn(40, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(0))
    halves = [(x[:20], y[:20]), (x[20:], y[20:])]
    exact = _exact_hessian_blocks(model, [x], [y])  # the mean loss over both halves
    estimate = hutchinson_traces(model, ToyAdapter(), ["fc1", "fc2", "fc3"], halves, CPU, iters=800, tol=0.0)
    for name, hessian in exact.items():
        assert estimate[name].trace == pytest.approx(float(hessian.diagonal().sum()), rel=0.12)
    settled = hutchinson_traces(model, ToyAdapter(), ["fc1", "fc2", "fc3"], halves, CPU, iters=800, tol=0.2)
    for value in settled.values():
        assert 3 <= value.iterations < 800
        assert value.stderr <= 0.2 * abs(value.trace)


def test_fisher_diagonal_is_the_mean_squared_per_sample_gradient() -> None:
    torch.manual_seed(0)
    model = SmallMLP()
    xs, ys = labelled_batches(model, torch.randn(12, 6), 5)
    fisher = fisher_diagonals(model, ToyAdapter(), ["fc2"], list(zip(xs, ys)), CPU)
    expected = torch.zeros_like(model.fc2.weight)
    for x, y in zip(torch.cat(xs), torch.cat(ys)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[None]), y[None]).backward()
        expected += model.fc2.weight.grad ** 2
    assert torch.allclose(fisher["fc2"], expected / 12, rtol=1e-5, atol=1e-9)


def test_output_errors_vanish_without_perturbation_and_grow_with_it() -> None:
    torch.manual_seed(0)
    model = SmallMLP()
    xs, ys = labelled_batches(model, torch.randn(20, 6), 8)
    batches = list(zip(xs, ys))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def perturbed(name: str, bits: int) -> torch.Tensor:
        w = model.get_submodule(name).weight.detach()
        return w + (0.0 if bits == 8 else 2.0 ** -bits) * torch.ones_like(w)

    errors = output_errors(model, ToyAdapter(), ["fc1", "fc3"], {"fc1": (2, 4, 8), "fc3": (2, 8)}, perturbed,
                           batches, CPU)
    assert errors["fc1"][8] == 0.0 and errors["fc3"][8] == 0.0
    assert errors["fc1"][2] > errors["fc1"][4] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the reference is untouched


def test_take_samples_covers_the_requested_count_in_whole_batches() -> None:
    xs = [torch.zeros(4, 2)] * 5
    ys = [torch.zeros(4)] * 5
    assert len(take_samples(xs, ys, 9)) == 3
    assert len(take_samples(xs, ys, 100)) == 5


@pytest.mark.parametrize("method", ["hessian", "fisher", "output_mse"])
def test_the_layer_with_larger_curvature_gets_more_bits(method: str) -> None:
    # A and B hold identical weights (identical quantization error); B's output is scaled by 4, so its Hessian
    # trace is 16x A's. With room for one upgrade, B gets it, whatever the gain's sign of the measurement
    torch.manual_seed(0)
    model = TwoBranch(gain=4.0)
    inputs = torch.randn(64, 32)
    q_model, summary = run_pass(model, inputs, toy_recipe(3), sensitivity=method, candidates=[2, 4], budget=3.0,
                                hutchinson_iters=200, hutchinson_tol=0.0)
    assert summary["bits"] == {"a": 2, "b": 4}
    assert q_model.b.weight_spec.bits == 4 and q_model.a.weight_spec.bits == 2
    if method == "hessian":
        ratio = summary["mean_trace"]["b"] / summary["mean_trace"]["a"]
        assert ratio == pytest.approx(16.0, rel=0.25)
        assert summary["trace_probes"] == {"a": 200, "b": 200}
    # swap the roles: the branch scaled up now is A
    q_model, summary = run_pass(TwoBranch(gain=0.25), inputs, toy_recipe(3), sensitivity=method, candidates=[2, 4],
                                budget=3.0)
    assert summary["bits"] == {"a": 4, "b": 2}


def test_hessian_sensitivity_is_the_mean_trace_times_the_squared_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # HAWQ-V2: Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2, with layers of 84, 49 and 21 weights so that
    # Tr * ||Delta||^2 or Tr / n^2 * ||Delta||^2 would give other numbers; the traces are fixed to known values
    import quantplug_mixed.allocation_pass as allocation_pass

    traces = {"fc1": 3.0, "fc2": 5.0, "fc3": 7.0}
    monkeypatch.setattr(allocation_pass, "hutchinson_traces",
                        lambda *args, **kwargs: {n: TraceEstimate(t, 0.1, 4) for n, t in traces.items()})
    torch.manual_seed(0)
    model = SmallMLP(features=12, hidden=7, classes=3)
    recipe = toy_recipe(3)
    _, summary = run_pass(model, torch.randn(32, 12), recipe, budget=3.0)
    session = Session(entry_points=False)
    sizes = {"fc1": 84, "fc2": 49, "fc3": 21}
    for name, trace in traces.items():
        weight = model.get_submodule(name).weight.detach()
        assert weight.numel() == sizes[name]
        assert summary["mean_trace"][name] == pytest.approx(trace / sizes[name], rel=1e-12)
        errors = {}
        for bits in (2, 3, 4, 8):
            delta = quantize_weight(weight, recipe.weight.with_bits(bits), session, recipe) - weight
            errors[bits] = float((delta.double() ** 2).sum())
            assert summary["table"][name][str(bits)] == pytest.approx(trace / sizes[name] * errors[bits], rel=1e-9)
        assert errors[2] > errors[3] > errors[4] > errors[8] > 0  # real, distinct perturbations


def test_hessian_sensitivity_works_on_a_transformer() -> None:
    # the fused CPU attention kernel has no double backward; the Hessian-vector products use the maths kernel
    from quantplug.api import apply

    result = apply("mixed", "testing:tiny-decoder", eval_samples=16, evaluate_fp=False,
                   overrides={"calib.num_samples": 32, "calib.batch_size": 16, "weight.bits": 3,
                              "passes": [{"name": "mixed", "options": {"samples": 16, "hutchinson_iters": 4}}]})
    summary = result.passes["mixed"]
    assert summary["sensitivity"] == "hessian" and summary["allocated_layers"] == 11  # 13 minus first and last
    assert all(1 <= p <= 4 for p in summary["trace_probes"].values())
    assert all(math.isfinite(t) and t >= 0 for t in summary["mean_trace"].values())
    assert sum(t > 0 for t in summary["mean_trace"].values()) >= 10
    assert summary["average_bits"] <= 3.0 and len(set(summary["bits"].values()) - {8}) > 1
    assert torch.backends.cuda.flash_sdp_enabled()  # the kernel choice is restored afterwards
