"""Activation regularization: zero when the quantized intermediates equal the FP ones, the value by hand,
cached and recomputed FP outputs agree, gradients reach the intermediates, hooks come off."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from quantplug_nwq import EXTRA_PREFIX, ActivationRegularizationLoss, kl_divergence

from quantplug.api import build_quant_model
from quantplug.builtins.losses import LpLoss
from quantplug.engine import RunContext, unit_module
from quantplug.errors import ConfigError, QuantplugError
from quantplug.interfaces import LossContext, ReconUnit
from quantplug.plugins import Session
from quantplug.recipes import resolve_recipe
from quantplug.testing.conformance import LossConformance

os.environ.setdefault("QUANTPLUG_PROGRESS", "0")
torch.set_num_threads(1)

MODEL = "testing:tiny-resnet"


class TestActivationRegularizationConformance(LossConformance):
    component = ActivationRegularizationLoss


class TestActivationRegularizationKLConformance(LossConformance):
    component = ActivationRegularizationLoss
    options = {"output_loss": "kl", "temperature": 2.0}


# --------------------------------------------------------------------------- helpers
def _run(q_model_is_fp: bool = True, num_samples: int = 48) -> RunContext:
    """A run on the tiny ResNet; its 'quantized' model is an exact FP copy unless told otherwise."""
    session = Session()
    recipe = resolve_recipe(session, "nwq", overrides={"calib.num_samples": num_samples})
    adapter = session.adapter_for(MODEL)
    fp_model, q_model = build_quant_model(adapter, MODEL, recipe, torch.device("cpu"))
    if q_model_is_fp:
        q_model = copy.deepcopy(fp_model)
    spec = adapter.default_data(MODEL)
    assert spec is not None
    dataset = session.data_source_for(spec).load(spec, "train", num_samples=num_samples, seed=0)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=16))
    blocks = adapter.blocks(fp_model)
    plan = session.make("scheduler", recipe.scheduler).plan(blocks)
    return RunContext(session, recipe, adapter, fp_model, q_model, blocks, [b[0] for b in batches],
                      [b[1] for b in batches], torch.device("cpu"), plan=plan, model_id=MODEL)


def _loss(**options: object) -> ActivationRegularizationLoss:
    return ActivationRegularizationLoss(ActivationRegularizationLoss.make_config(options))


def _evaluate(loss: ActivationRegularizationLoss, run: RunContext, unit: ReconUnit,
              idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, unit output, FP target) on the calibration samples ``idx``, as the engine computes them."""
    extras = {k: v.detach().cpu() for k, v in loss.capture_extras(run, unit).items()}
    x = torch.cat(run.calib_inputs)[idx]
    target = unit_module(run, run.fp_model, unit)(x).detach()
    out = unit_module(run, run.q_model, unit)(x)
    return loss(out, target, LossContext({k: v[idx] for k, v in extras.items()}, 0.5)), out, target


def _perturb(model: torch.nn.Module, name: str, amount: float = 0.05) -> None:
    with torch.no_grad():
        w = model.get_submodule(name).weight
        w.add_(amount * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))


@pytest.fixture()
def run() -> RunContext:
    return _run()


# --------------------------------------------------------------------------- behaviour
def test_regularization_is_zero_when_intermediates_equal_full_precision(run: RunContext) -> None:
    unit = run.plan[0]
    assert unit.name == "network" and len(unit.blocks) == 5
    loss = _loss(ar_weight=10.0)
    loss.begin(run, unit)
    _perturb(run.q_model, "head.fc")  # only the final layer differs: every intermediate output is FP
    value, out, target = _evaluate(loss, run, unit, torch.arange(20))
    output_only = LpLoss()(out, target, LossContext())
    assert float(output_only) > 0
    assert float(value) == pytest.approx(float(output_only), rel=1e-6)
    loss.end(run, unit)


def test_loss_without_a_forward_pass_says_so(run: RunContext) -> None:
    loss = _loss()
    loss.begin(run, run.plan[0])
    with pytest.raises(QuantplugError, match="no quantized output of block 'stem'"):
        loss(torch.zeros(2, 10), torch.zeros(2, 10), LossContext())
    loss.end(run, run.plan[0])


@pytest.mark.parametrize("fp_features", ["cache", "recompute"])
def test_value_by_hand_with_a_perturbed_middle_block(run: RunContext, fp_features: str) -> None:
    unit = run.plan[0]
    _perturb(run.q_model, "layer1.0.conv1")
    loss = _loss(ar_weight=0.3, fp_features=fp_features)
    loss.begin(run, unit)
    idx = torch.tensor([3, 1, 4, 15, 9, 26])
    value, out, target = _evaluate(loss, run, unit, idx)
    loss.end(run, unit)
    x_fp = x_q = torch.cat(run.calib_inputs)[idx]
    lp = LpLoss()
    expected = lp(out, target, LossContext())
    reg = torch.zeros(())
    for block in run.blocks[:-1]:  # every block but the last one (the head, whose output is the unit output)
        x_fp = run.adapter.block_module(run.fp_model, block)(x_fp)
        x_q = run.adapter.block_module(run.q_model, block)(x_q)
        reg = reg + lp(x_q, x_fp, LossContext())
    assert float(reg) > 0
    assert float(value) == pytest.approx(float(expected + 0.3 * reg), rel=1e-5)


def test_cached_and_recomputed_full_precision_outputs_agree() -> None:
    run = _run(q_model_is_fp=False)  # the real quantized model
    unit = run.plan[0]
    values = []
    for mode in ("cache", "recompute"):
        loss = _loss(fp_features=mode)
        loss.begin(run, unit)
        values.append(float(_evaluate(loss, run, unit, torch.arange(32))[0]))
        loss.end(run, unit)
    assert values[0] == pytest.approx(values[1], rel=1e-6)


def test_extras_hold_every_intermediate_block_in_the_requested_dtype(run: RunContext) -> None:
    extras = _loss(cache_dtype="float16").capture_extras(run, run.plan[0])
    assert sorted(extras) == sorted(EXTRA_PREFIX + b.name for b in run.blocks[:-1])
    x = torch.cat(run.calib_inputs)
    for block in run.blocks[:-1]:
        x = run.adapter.block_module(run.fp_model, block)(x)
        cached = extras[EXTRA_PREFIX + block.name]
        assert cached.dtype == torch.float16 and cached.shape == x.shape
        assert torch.allclose(cached.float(), x, atol=1e-2, rtol=1e-2)
    single_block = ReconUnit("layer1.0", blocks=("layer1.0",))
    assert _loss().capture_extras(run, single_block) == {}  # nothing in between: plain output loss


def test_gradient_reaches_the_intermediate_outputs_through_the_hooks(run: RunContext) -> None:
    unit = run.plan[0]
    _perturb(run.q_model, "layer1.0.conv1")
    layer = run.q_model.get_submodule("layer1.0.conv1")
    loss = _loss()
    loss.begin(run, unit)
    layer.weight.requires_grad_(True)
    with_ar = torch.autograd.grad(_evaluate(loss, run, unit, torch.arange(16))[0], layer.weight)[0]
    loss.end(run, unit)
    plain = _loss(ar_weight=0.0)
    plain.begin(run, unit)
    without = torch.autograd.grad(_evaluate(plain, run, unit, torch.arange(16))[0], layer.weight)[0]
    plain.end(run, unit)
    assert not torch.allclose(with_ar, without)


def test_end_removes_every_hook(run: RunContext) -> None:
    modules = list(run.q_model.modules())
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    loss = _loss(fp_features="recompute")
    loss.begin(run, run.plan[0])
    loss.begin(run, run.plan[0])  # a second begin replaces, never stacks, the hooks
    during = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
    assert during == before + 4 + 1  # four intermediate blocks, one entry pre-hook
    loss.end(run, run.plan[0])
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules) == before


def test_kl_output_loss_by_hand() -> None:
    q = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    fp = torch.tensor([[0.0, 2.0, 1.0], [0.5, 0.0, 1.0]])
    p = torch.softmax(fp / 2, 1)
    expected = (p * (p.log() - torch.log_softmax(q / 2, 1))).sum() / 2
    assert float(kl_divergence(q, fp, 2.0)) == pytest.approx(float(expected), rel=1e-6)
    loss = _loss(output_loss="kl", temperature=2.0)
    assert float(loss(q, fp, LossContext())) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("options", [
    {"ar_weight": -1.0}, {"output_loss": "l1"}, {"temperature": 0.0}, {"fp_features": "disk"},
    {"cache_dtype": "int8"},
])
def test_bad_options_are_config_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        _loss(**options)
