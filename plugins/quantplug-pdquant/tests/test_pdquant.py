"""PD-Quant: the prediction-difference loss, the rest-of-network chain, distribution correction, the recipe."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from quantplug_pdquant import (
    BNTarget,
    DistributionCorrection,
    PredictionDifferenceLoss,
    correct_inputs,
    statistics_loss,
    unit_bn_targets,
)
from quantplug_pdquant.dc import statistics_distance
from torch import nn

from quantplug.api import build_quant_model
from quantplug.bn_fold import fold_batchnorm
from quantplug.engine import RunContext, unit_module
from quantplug.errors import ConfigError, IncompatibleComponentsError
from quantplug.interfaces import LossContext, ReconUnit
from quantplug.plugins import Session
from quantplug.recipes import resolve_recipe
from quantplug.testing.conformance import LossConformance, RecipeSmoke

os.environ.setdefault("QUANTPLUG_PROGRESS", "0")
torch.set_num_threads(1)

MODEL = "testing:tiny-resnet"


# --------------------------------------------------------------------------- helpers
def _tiny_run(num_samples: int = 64) -> RunContext:
    session = Session()
    recipe = resolve_recipe(session, "pdquant", preset="cpu-fast", overrides={"calib.num_samples": num_samples})
    adapter = session.adapter_for(MODEL)
    fp_model, q_model = build_quant_model(adapter, MODEL, recipe, torch.device("cpu"))
    spec = adapter.default_data(MODEL)
    assert spec is not None
    dataset = session.data_source_for(spec).load(spec, "train", num_samples=num_samples, seed=0)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=32))
    blocks = adapter.blocks(fp_model)
    plan = session.make("scheduler", recipe.scheduler).plan(blocks)
    return RunContext(session, recipe, adapter, fp_model, q_model, blocks, [b[0] for b in batches],
                      [b[1] for b in batches], torch.device("cpu"), plan=plan, model_id=MODEL)


@pytest.fixture(scope="module")
def run() -> RunContext:
    return _tiny_run()


def _unit(run: RunContext, block: str) -> ReconUnit:
    return next(u for u in run.plan if u.blocks and u.blocks[-1] == block)


@torch.no_grad()
def _unit_io(run: RunContext, unit: ReconUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP unit's input and output for all calibration samples, by running the block chain."""
    x = torch.cat(run.calib_inputs)
    for block in run.blocks:
        if block.name == unit.blocks[0]:
            break
        x = run.adapter.block_module(run.fp_model, block)(x)
    return x, unit_module(run, run.fp_model, unit)(x)


# --------------------------------------------------------------------------- the pd loss
def test_pd_loss_by_hand_on_small_logits() -> None:
    out = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    tgt = torch.tensor([[0.0, 2.0, 1.0], [0.5, 0.0, 1.0]])
    T, lam = 4.0, 0.1
    loss = PredictionDifferenceLoss(PredictionDifferenceLoss.make_config({"temperature": T, "lambda_r": lam}))
    # standalone (not bound to a run): the output is the prediction, the target the FP prediction
    mse = ((1 + 0 + 1) + (0 + 1 + 4)) / 2  # squared error summed over classes, averaged over samples
    kl = 0.0
    for o, t in zip(out.tolist(), tgt.tolist()):
        p = [math.exp(v / T) / sum(math.exp(u / T) for u in t) for v in t]
        q = [math.exp(v / T) / sum(math.exp(u / T) for u in o) for v in o]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = mse + (kl / 2) / lam  # KLDivLoss(batchmean) / lambda_r
    assert float(loss(out, tgt, LossContext())) == pytest.approx(expected, rel=1e-5)
    # bound with an identity rest (the head unit): the FP prediction is the captured fp_logits extra
    loss.bind(nn.Sequential())
    fp = tgt + 5.0  # a softmax is shift-invariant: same KL as above
    assert float(loss(out, tgt, LossContext({"fp_logits": fp}))) == pytest.approx(expected, rel=1e-5)


def test_pd_options_are_validated() -> None:
    with pytest.raises(ConfigError):
        PredictionDifferenceLoss(PredictionDifferenceLoss.make_config({"lambda_r": 0.0}))
    with pytest.raises(ConfigError):
        PredictionDifferenceLoss.make_config({"T": 4.0})


def test_rest_of_network_reproduces_fp_logits_and_loss_is_zero_at_fp_output(run: RunContext) -> None:
    unit = _unit(run, "layer1.0")
    loss = PredictionDifferenceLoss()
    extras = loss.capture_extras(run, unit)
    with torch.no_grad():
        reference = torch.cat([run.fp_model(x) for x in run.calib_inputs])
    assert torch.allclose(extras["fp_logits"], reference, atol=1e-6)
    _, z = _unit_io(run, unit)
    assert loss.rest is not None and len(loss.rest) == len(run.blocks) - 2  # stem and layer1.0 come before
    with torch.no_grad():
        assert torch.allclose(loss.rest(z), reference, atol=1e-5, rtol=1e-4)
    ctx = LossContext({"fp_logits": extras["fp_logits"]})
    assert float(loss(z, z, ctx)) == pytest.approx(0.0, abs=1e-6)
    # the gradient flows through the FP rest back to the unit output, never into the FP parameters
    out = (z + 0.05 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    value = loss(out, z, ctx)
    assert float(value.detach()) > 0
    value.backward()
    assert out.grad is not None and out.grad.abs().sum() > 0
    assert all(p.grad is None for p in run.fp_model.parameters())


def test_pd_term_uses_the_quantized_output_and_mse_the_mixed_one() -> None:
    out = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
    tgt = torch.tensor([[0.0, 2.0, 1.0], [0.5, 0.0, 1.0]])
    quantized = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    code = PredictionDifferenceLoss()
    mixed = PredictionDifferenceLoss(PredictionDifferenceLoss.make_config({"pd_input": "mixed"}))
    assert code.needs_quantized_output and not mixed.needs_quantized_output
    mse = float(((out - tgt) ** 2).sum(1).mean())
    for loss in (code, mixed):
        loss.bind(nn.Sequential())
    fp = {"fp_logits": tgt}
    kl_quantized = float(code(quantized, tgt, LossContext(fp))) - float(((quantized - tgt) ** 2).sum(1).mean())
    kl_out = float(code(out, tgt, LossContext(fp))) - mse
    assert kl_quantized != pytest.approx(kl_out)
    # "quantized": MSE on the output, KL on quantized_output; "mixed": both on the output
    assert float(code(out, tgt, LossContext(fp, 0.0, quantized))) == pytest.approx(mse + kl_quantized, rel=1e-5)
    assert float(mixed(out, tgt, LossContext(fp, 0.0, quantized))) == pytest.approx(mse + kl_out, rel=1e-5)
    # no quantized output given (evaluation, or no mixing policy): the output is used
    assert float(code(out, tgt, LossContext(fp))) == pytest.approx(mse + kl_out, rel=1e-5)
    with pytest.raises(ConfigError):
        PredictionDifferenceLoss(PredictionDifferenceLoss.make_config({"pd_input": "drop"}))


def test_engine_gives_pd_the_output_of_the_purely_quantized_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under QDrop's drop the KL term sees a second forward on the quantized input with the drop off."""
    from quantplug.api import apply

    seen: list[tuple[bool, bool]] = []
    original = PredictionDifferenceLoss.__call__

    def recording(self, output, target, context):  # type: ignore[no-untyped-def]
        q = context.quantized_output
        seen.append((q is not None, q is not None and not torch.allclose(q, output)))
        return original(self, output, target, context)

    monkeypatch.setattr(PredictionDifferenceLoss, "__call__", recording)
    overrides = {"recon.iters": 4, "calib.num_samples": 64, "weight.bits": 2, "activation.bits": 2,
                 "data_transforms": []}
    apply("pdquant", MODEL, overrides=overrides, evaluate_fp=False, eval_samples=64)
    assert any(given for given, _ in seen)
    assert any(differs for _, differs in seen)  # drop-mixed and purely quantized outputs differ
    seen.clear()
    apply("pdquant", MODEL, overrides={**overrides, "loss.options.pd_input": "mixed"}, evaluate_fp=False,
          eval_samples=64)
    assert seen and not any(given for given, _ in seen)


def test_released_code_branch_keeps_the_drop_inside_the_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    """pd_input="quantized_with_drop": the second forward quantizes the unit input in full, the drop stays on."""
    from quantplug_qdrop import DropPolicy

    from quantplug.api import apply

    entry: list[bool] = []
    masks: list[tuple[bool, bool]] = []  # (unit input?, every element quantized?) while the entry is in full
    original_select = DropPolicy.select

    def toggling(self, in_full):  # type: ignore[no-untyped-def]
        entry.append(in_full)
        self._entry_in_full = in_full

    def selecting(self, x):  # type: ignore[no-untyped-def]
        mask, keep = original_select(self, x)
        if self._entry_in_full:
            masks.append((x is self._quant_input, bool(mask.all())))
        return mask, keep

    monkeypatch.setattr(DropPolicy, "quantize_unit_entry", toggling)
    monkeypatch.setattr(DropPolicy, "select", selecting)
    overrides = {"recon.iters": 3, "calib.num_samples": 64, "weight.bits": 2, "activation.bits": 2,
                 "data_transforms": [], "loss.options.pd_input": "quantized_with_drop"}
    result = apply("pdquant", MODEL, overrides=overrides, evaluate_fp=False, eval_samples=64)
    learned_units = sum(1 for r in result.records if r.iters)
    assert entry == [True, False] * 3 * learned_units  # on for the second forward of every step, then off
    assert any(unit_input and full for unit_input, full in masks)  # the unit input: quantized in full
    assert any(not unit_input and not full for unit_input, full in masks)  # inside: still dropped
    assert not any(unit_input and not full for unit_input, full in masks)


def test_released_code_branch_needs_a_policy_that_controls_the_entry() -> None:
    from quantplug.api import apply

    overrides = {"recon.iters": 2, "calib.num_samples": 32, "weight.bits": 2, "activation.bits": 4,
                 "data_transforms": [], "loss.options.pd_input": "quantized_with_drop",
                 "activation_policy": {"name": "annealing-mixup"}}
    with pytest.raises(IncompatibleComponentsError, match="drop policy"):
        apply("pdquant", MODEL, overrides=overrides, evaluate_fp=False, eval_samples=32)


def test_pd_needs_block_units(run: RunContext) -> None:
    with pytest.raises(IncompatibleComponentsError, match="block"):
        PredictionDifferenceLoss().capture_extras(run, ReconUnit("stem.conv", layer="stem.conv"))


class TestPDConformance(LossConformance):
    """The kit gives all-ones extras and never calls ``capture_extras``: the loss runs standalone."""

    component = PredictionDifferenceLoss


# --------------------------------------------------------------------------- distribution correction
def test_folded_statistics_give_back_the_pre_bn_output() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
        bn.weight.copy_(torch.tensor([1.5, -0.7, 0.3, 2.0]))
        bn.bias.copy_(torch.randn(4))
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        prebn = model[0](x)
    folded = fold_batchnorm(copy.deepcopy(model))
    target = BNTarget.from_stats("0", folded.quantplug_bn_stats["0"])
    with torch.no_grad():
        f = folded[0](x)
        assert torch.allclose(target.prebn(f), prebn, atol=1e-5)
        # the official loss on the BN input, by hand
        eps = 1e-6
        m = prebn.reshape(5, 4, -1).mean(2)
        s = torch.sqrt(prebn.reshape(5, 4, -1).var(2) + eps)
        by_hand = ((bn.running_mean - m).norm() ** 2 + (torch.sqrt(bn.running_var + eps) - s).norm() ** 2) / 5
        assert float(statistics_loss(target.prebn(f), target)) == pytest.approx(float(by_hand), rel=1e-4)
        # in folded terms: the target mean is beta, the target std |gamma| sqrt(var + 1e-6) / sqrt(var + bn_eps)
        s_bn = torch.sqrt(bn.running_var + bn.eps)
        fm = f.reshape(5, 4, -1).mean(2)
        assert torch.allclose(fm - bn.bias, (m - bn.running_mean) * bn.weight / s_bn, atol=1e-5)
        std_f = f.reshape(5, 4, -1).std(2)
        ratio = bn.weight.abs() / s_bn
        assert torch.allclose(std_f, prebn.reshape(5, 4, -1).std(2) * ratio, rtol=1e-4, atol=1e-6)


def _batch_stat_distance(module: nn.Module, convs: list, x: torch.Tensor) -> float:
    return statistics_distance(module, convs, x, statistics="batch")


def test_distribution_correction_moves_statistics_toward_running_statistics(run: RunContext) -> None:
    unit = _unit(run, "layer1.0")
    convs = unit_bn_targets(run, unit)
    assert [t.name for _, t in convs] == ["layer1.0.conv1", "layer1.0.conv2"]
    module = unit_module(run, run.fp_model, unit)
    x, _ = _unit_io(run, unit)
    x = x[:16] * 1.5 + 0.2  # push the inputs off the training distribution
    transform = DistributionCorrection(DistributionCorrection.make_config({"steps": 80, "lr": 1e-2}))
    with torch.no_grad():  # the engine may call it under no_grad
        corrected = transform.apply(run, unit, x)
    assert corrected.shape == x.shape and not corrected.requires_grad
    before_sample, after_sample = (statistics_distance(module, convs, v) for v in (x, corrected))
    before_batch, after_batch = (_batch_stat_distance(module, convs, v) for v in (x, corrected))
    assert after_sample < 0.8 * before_sample
    assert after_batch < before_batch
    assert all(p.grad is None and not p.requires_grad for p in run.fp_model.parameters())


def test_small_lambda_c_keeps_input_close_large_moves_it(run: RunContext) -> None:
    unit = _unit(run, "layer1.0")
    convs = unit_bn_targets(run, unit)
    module = unit_module(run, run.fp_model, unit)
    x, _ = _unit_io(run, unit)
    x = x[:16] * 1.5 + 0.2
    moved = {}
    for lambda_c in (1e-5, 0.02, 10.0):
        cfg = DistributionCorrection.make_config({"steps": 60, "lr": 1e-2, "lambda_c": lambda_c})
        moved[lambda_c] = float((correct_inputs(module, convs, x, cfg) - x).norm() / x.norm())
    # the anchor weight is 1 / lambda_c: a small lambda_c pins the input, a large one lets it move
    assert moved[1e-5] < 0.01
    assert moved[1e-5] < moved[0.02] < moved[10.0]


def test_units_without_batch_norm_are_left_unchanged(run: RunContext) -> None:
    head = _unit(run, "head")
    x = torch.randn(4, 16, 8, 8)
    assert DistributionCorrection().apply(run, head, x) is x


def test_dc_options_are_validated() -> None:
    with pytest.raises(ConfigError):
        DistributionCorrection(DistributionCorrection.make_config({"lambda_c": 0.0}))
    with pytest.raises(ConfigError):
        DistributionCorrection(DistributionCorrection.make_config({"statistics": "global"}))


# --------------------------------------------------------------------------- the recipe
def test_pdquant_recipe_is_qdrop_plus_pd_and_dc() -> None:
    s = Session()
    r = resolve_recipe(s, "pdquant")
    assert (r.rounding.name, r.scheduler.name, r.activation_policy.name) == ("adaround", "block", "drop")
    assert r.loss.name == "pd" and dict(r.loss.options) == {"temperature": 4.0, "lambda_r": 0.1}
    assert [t.name for t in r.data_transforms] == ["distribution_correction"]
    assert dict(r.data_transforms[0].options) == {"lambda_c": 0.02, "steps": 500, "lr": 1e-3}
    assert r.recon.lr == 3e-3 and r.rounding.options["reg_weight"] == 0.01 and r.recon.act_lr == 4e-5
    assert r.recon.iters == 20000 and r.recon.batch_size == 32 and r.calib.num_samples == 1024
    mb = resolve_recipe(s, "pdquant", preset="official-mobilenetv2")
    assert mb.loss.options["temperature"] == 1.0 and mb.rounding.options["reg_weight"] == 0.1
    assert mb.data_transforms[0].options["lambda_c"] == 0.005
    fast = resolve_recipe(s, "pdquant", preset="cpu-fast")
    assert fast.recon.iters < 20000 and fast.data_transforms[0].options["steps"] < 500


class TestPDQuantRecipe(RecipeSmoke):
    recipe = "pdquant"
    overrides = {"recon.iters": 20, "calib.num_samples": 64, "calib.batch_size": 32,
                 "data_transforms": [{"name": "distribution_correction", "options": {"steps": 20}}]}
