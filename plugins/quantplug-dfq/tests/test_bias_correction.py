"""Bias correction: the clipped-normal mean, empirical correction removes the output mean shift layer by
layer, analytic correction matches the weight-error bias measured on data when DFQ's assumptions hold."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from quantplug_dfq.activations import clipped_normal_mean
from quantplug_dfq.bias_correction import BiasCorrectionPass, channel_means
from torch import nn

from quantplug.bn_fold import fold_batchnorm
from quantplug.calibrate import calibrate_activations, calibrate_weights
from quantplug.config import PerTensor, QuantSpec, Recipe
from quantplug.errors import ConfigError
from quantplug.interfaces import ModelAdapter, PassContext
from quantplug.modules import QuantConv2d, quant_layers
from quantplug.plugins import Session
from quantplug.prepare import prepare_model
from quantplug.quantizer import qparams_from_range, to_rows
from quantplug.testing.conformance import ModelPassConformance


@pytest.mark.parametrize("mean,std,upper", [(0.0, 1.0, math.inf), (1.5, 0.7, math.inf), (-2.0, 1.0, math.inf),
                                            (2.0, 3.0, 6.0), (5.0, 2.0, 6.0), (0.3, 0.2, 0.5)])
def test_clipped_normal_mean_matches_monte_carlo(mean: float, std: float, upper: float) -> None:
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * std + mean
    sample = z.clamp(0.0, upper).mean()
    value = clipped_normal_mean(torch.tensor([mean]), torch.tensor([std]), upper)
    assert float(value) == pytest.approx(float(sample), abs=4 * std / math.sqrt(z.numel()) + 1e-6)


def test_clipped_normal_mean_degenerate_std() -> None:
    value = clipped_normal_mean(torch.tensor([-1.0, 2.0, 9.0]), torch.zeros(3), 6.0)
    assert value.tolist() == [0.0, 2.0, 6.0]


# ------------------------------------------------------------------------------------------ empirical
def _quantized(model: nn.Module, batches: list[torch.Tensor], bits: int = 3) -> nn.Module:
    """Per-tensor ``bits``-bit weights (first and last layer 8 bit), 8-bit activations, nearest codes."""
    session = Session(entry_points=False)
    recipe = Recipe(weight=QuantSpec(bits, False, PerTensor()))
    adapter = ModelAdapter()
    q = copy.deepcopy(model)
    prepare_model(q, adapter, recipe)
    calibrate_weights(q, session, recipe)
    calibrate_activations(q, adapter, [(x, torch.zeros(len(x))) for x in batches], session, recipe, torch.device("cpu"))
    for _, layer in quant_layers(q):
        layer.set_codes(layer.nearest_codes())
    return q


def _mean_gap(q: nn.Module, fp: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer: E[y_fp] - E[y_q] per channel over ``batches`` (all layers at once)."""
    means: dict[str, dict[str, torch.Tensor]] = {"q": {}, "fp": {}}
    for key, model in (("q", q), ("fp", fp)):
        handles = []
        for name, _ in quant_layers(q):
            def hook(m, a, out, name=name, key=key):  # type: ignore[no-untyped-def]
                s, n = channel_means(m, out)
                means[key][name] = means[key].get(name, 0) + s / n / len(batches)

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        with torch.no_grad():
            for x in batches:
                model(x)
        for h in handles:
            h.remove()
    return {n: (means["fp"][n] - means["q"][n]).float() for n in means["q"]}


def test_empirical_correction_removes_every_layers_output_bias(tiny_mobilenet) -> None:  # type: ignore[no-untyped-def]
    fp = tiny_mobilenet()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(32, 3, 12, 12, generator=gen) for _ in range(2)]
    q = _quantized(fp, batches)
    gap_before = _mean_gap(q, fp, batches)
    first_gap = gap_before["stem.0"].clone()
    first_bias = q.stem[0].bias.detach().clone()
    ctx = PassContext(None, Recipe(), ModelAdapter(), fp, batches, [None, None], torch.device("cpu"), 0, "quantized")
    summary = BiasCorrectionPass().run(q, ctx)
    assert len(summary["corrected"]) == 9 and summary["skipped"] == {}
    # the first layer's bias moved by exactly E[W x] - E[W_q x_q]
    assert torch.allclose(q.stem[0].bias - first_bias, first_gap, atol=1e-5)
    gap_after = _mean_gap(q, fp, batches)
    worst_before = max(float(g.abs().max()) for g in gap_before.values())
    assert worst_before > 1e-2  # 3-bit per-tensor weights do shift the means
    for name, gap in gap_after.items():
        assert float(gap.abs().max()) < 1e-4 * max(1.0, float(gap_before[name].abs().max())) + 1e-5, name


# ------------------------------------------------------------------------------------------ analytic
class Pair(nn.Module):
    """x -> identity 1x1 conv -> BN(gamma, beta) -> activation -> 1x1 conv (the layer corrected)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.a = nn.Conv2d(6, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6, eps=0.0)
        self.act = act
        self.b = nn.Conv2d(6, 4, 1)
        with torch.no_grad():
            self.a.weight.copy_(torch.eye(6).reshape(6, 6, 1, 1))
            self.bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0, 1.5, 0.3, 3.0]))
            self.bn.bias.copy_(torch.tensor([1.0, -0.5, 2.0, 0.0, 0.2, 4.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.bn(self.a(x))))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6()], ids=["relu", "relu6"])
def test_analytic_correction_matches_the_measured_weight_error_bias(act: nn.Module) -> None:
    torch.manual_seed(0)
    fp = fold_batchnorm(Pair(act).eval())
    q = copy.deepcopy(fp)
    spec = QuantSpec(3, False, PerTensor())
    q.b = QuantConv2d(fp.b, spec, None)  # only the consumer's weights are quantized
    rows = to_rows(q.b.weight.detach(), spec)
    q.b.weight_quantizer.set_qparams(*qparams_from_range(rows.min(1).values, rows.max(1).values, spec))
    q.b.set_codes(q.b.nearest_codes())
    x = torch.randn(4096, 6, 4, 4, generator=torch.Generator().manual_seed(3))  # pre-activation N(beta, gamma^2)
    with torch.no_grad():
        measured_shift = (q(x) - fp(x)).mean((0, 2, 3))  # E[W_q x] - E[W x]
    bias = q.b.bias.detach().clone()
    ctx = PassContext(None, Recipe(), ModelAdapter(), fp, [], [], torch.device("cpu"), 0, "quantized")
    summary = BiasCorrectionPass(BiasCorrectionPass.Config(mode="analytic")).run(q, ctx)
    assert list(summary["corrected"]) == ["b"]
    assert float(measured_shift.abs().max()) > 0.05  # there is a bias to remove
    assert torch.allclose(bias - q.b.bias, measured_shift, atol=0.01)
    with torch.no_grad():
        assert float((q(x) - fp(x)).mean((0, 2, 3)).abs().max()) < 0.01


def test_analytic_skips_a_layer_called_on_two_inputs() -> None:
    class TwoInputs(Pair):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.act(self.bn(self.a(x)))) + self.b(x)  # b also reads x, whose mean is not E[act]

    torch.manual_seed(0)
    fp = fold_batchnorm(TwoInputs(nn.ReLU()).eval())
    q = copy.deepcopy(fp)
    spec = QuantSpec(3, False, PerTensor())
    q.b = QuantConv2d(fp.b, spec, None)
    rows = to_rows(q.b.weight.detach(), spec)
    q.b.weight_quantizer.set_qparams(*qparams_from_range(rows.min(1).values, rows.max(1).values, spec))
    q.b.set_codes(q.b.nearest_codes())
    bias = q.b.bias.detach().clone()
    ctx = PassContext(None, Recipe(), ModelAdapter(), fp, [], [], torch.device("cpu"), 0, "quantized")
    summary = BiasCorrectionPass(BiasCorrectionPass.Config(mode="analytic")).run(q, ctx)
    assert summary["corrected"] == {} and "several inputs" in summary["skipped"]["b"]
    assert torch.equal(q.b.bias, bias)


def test_analytic_skips_layers_without_known_input_and_bad_mode(tiny_mobilenet) -> None:  # type: ignore[no-untyped-def]
    fp = tiny_mobilenet()
    batches = [torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(4))]
    q = _quantized(fp, batches)
    ctx = PassContext(None, Recipe(), ModelAdapter(), fp, [], [], torch.device("cpu"), 0, "quantized")
    summary = BiasCorrectionPass(BiasCorrectionPass.Config(mode="analytic")).run(q, ctx)
    # the image-fed stem and the last conv (fed by block2's residual sum) have no BN-described input;
    # block2's expansion reads block1's projection directly (no activation: E[x] = beta)
    assert set(summary["skipped"]) == {"stem.0", "last.0"}
    assert len(summary["corrected"]) == 7
    with pytest.raises(ConfigError, match="mode"):
        BiasCorrectionPass(BiasCorrectionPass.Config(mode="magic"))


class TestEmpiricalConformance(ModelPassConformance):
    component = BiasCorrectionPass


class TestAnalyticConformance(ModelPassConformance):
    component = BiasCorrectionPass
    options = {"mode": "analytic"}
