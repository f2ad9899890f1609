"""The ``mixed`` pass and recipe: budgets, depthwise apart, fixed layers, CLI, save -> load, conformance."""

from __future__ import annotations

import json
import math

import pytest
import torch
from mixed_toys import DepthwiseNet, TwoBranch, pass_context, run_pass, toy_recipe
from quantplug_mixed import MIXED, MixedPrecisionPass, layer_kind

from quantplug.api import apply
from quantplug.errors import ConfigError
from quantplug.export import load
from quantplug.modules import quant_layers
from quantplug.plugins import Session
from quantplug.recipes import resolve_recipe
from quantplug.testing.conformance import ModelPassConformance

FAST = {"calib.num_samples": 64, "calib.batch_size": 32}


class TestMixedConformance(ModelPassConformance):
    component = MixedPrecisionPass
    options = {"hutchinson_iters": 20}


def _images(n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------- layer kinds, budgets
def test_layer_kinds() -> None:
    net = DepthwiseNet()
    assert [layer_kind(m) for m in (net.stem, net.dw, net.pw, net.head)] == ["conv", "depthwise", "pointwise",
                                                                                "linear"]


def test_depthwise_layers_get_their_own_candidates_and_the_ends_stay_fixed() -> None:
    torch.manual_seed(0)
    # budget 2.5 bits on average over dw (72 weights) and pw (256 weights): the cheapest depthwise width is 4
    q_model, summary = run_pass(DepthwiseNet(), _images(), toy_recipe(3, fixed_ends=True), budget=2.5,
                                hutchinson_iters=10)
    bits = summary["bits"]
    assert bits["stem"] == 8 and bits["head"] == 8  # first / last: the recipe's bit policy
    assert bits["dw"] in (4, 8) and bits["pw"] in (2, 3, 4, 8)
    assert summary["candidates"]["depthwise"] == [4, 8]
    assert 72 * bits["dw"] + 256 * bits["pw"] <= math.floor(2.5 * (72 + 256))
    assert summary["allocated_layers"] == 2
    assert q_model.dw.weight_spec.bits == bits["dw"] and q_model.pw.weight_spec.bits == bits["pw"]
    # too small for 4-bit depthwise weights: a clear error in the budget's own units, naming the remedy
    with pytest.raises(ConfigError, match=r"budget=2.0, budget_kind=avg_bits\) is 2 average weight bits \(656 bits "
                       r"over 328 allocated weights\), below the cheapest allocation: 2.439 average weight bits "
                       r"\(800 bits.*\(depthwise 4 bits, pointwise 2 bits\). Raise the budget"):
        run_pass(DepthwiseNet(), _images(), toy_recipe(3, fixed_ends=True), budget=2.0, hutchinson_iters=10)
    # depthwise candidates can be given explicitly, and pointwise ones apart
    _, summary = run_pass(DepthwiseNet(), _images(), toy_recipe(3, fixed_ends=True), budget=3.0,
                          depthwise_candidates=[2], pointwise_candidates=[3], sensitivity="output_mse")
    assert summary["bits"]["dw"] == 2 and summary["bits"]["pw"] == 3


def test_default_budget_is_the_uniform_cost_and_never_exceeded() -> None:
    torch.manual_seed(0)
    for kind in ("avg_bits", "bytes", "bops"):
        q_model, summary = run_pass(DepthwiseNet(), _images(), toy_recipe(4, fixed_ends=True), budget_kind=kind,
                                    sensitivity="fisher")
        uniform = summary["uniform"]
        if kind == "bops":
            assert summary["bops"] <= uniform["bops"]
        else:
            assert summary["weight_bytes"] <= uniform["weight_bytes"]
            assert summary["average_bits"] <= 4.0
        assert summary["predicted_sensitivity"] <= uniform["sensitivity"] + 1e-12  # uniform W4 is feasible


def test_bytes_and_bops_budgets_are_absolute_totals() -> None:
    torch.manual_seed(0)
    _, base = run_pass(DepthwiseNet(), _images(), toy_recipe(4, fixed_ends=True), sensitivity="fisher")
    budget = base["uniform"]["weight_bytes"] - 40  # 320 bits less than uniform W4
    _, summary = run_pass(DepthwiseNet(), _images(), toy_recipe(4, fixed_ends=True), sensitivity="fisher",
                          budget_kind="bytes", budget=budget)
    assert summary["weight_bytes"] <= budget
    assert summary["average_bits"] < 4
    bops = base["uniform"]["bops"] * 0.9  # 0.8 is below the cheapest (dw >= 4 bits)
    _, summary = run_pass(DepthwiseNet(), _images(), toy_recipe(4, fixed_ends=True), sensitivity="fisher",
                          budget_kind="bops", budget=bops)
    assert summary["bops"] <= bops
    # bops = MACs x weight bits x input bits; here inputs are not quantized (32 bits)
    assert summary["uniform"]["bops"] == (3 * 8 * 9 * 64 * 8 + 8 * 9 * 64 * 4 + 8 * 32 * 64 * 4 + 32 * 5 * 8) * 32


def test_an_impossible_budget_is_reported_in_the_units_it_was_given_in() -> None:
    # stem and head fixed at 8 bits (216 + 160 weights); the cheapest: dw (72 weights) at 4, pw (256) at 2 bits
    fixed_bits = (216 + 160) * 8
    cheapest_bytes = (fixed_bits + 72 * 4 + 256 * 2) / 8
    with pytest.raises(ConfigError, match=rf"budget=400.0, budget_kind=bytes\) is 400 weight bytes \(fixed layers "
                       rf"included\), below the cheapest allocation: {cheapest_bytes:,g} weight bytes"):
        run_pass(DepthwiseNet(), _images(), toy_recipe(3, fixed_ends=True), budget_kind="bytes", budget=400)
    macs = {"stem": 3 * 9 * 8 * 64, "dw": 9 * 8 * 64, "pw": 8 * 32 * 64, "head": 32 * 5}
    cheapest_bops = (macs["stem"] * 8 + macs["dw"] * 4 + macs["pw"] * 2 + macs["head"] * 8) * 32
    with pytest.raises(ConfigError, match=rf"budget_kind=bops\) is 1,000 BOPs per sample .*cheapest allocation: "
                       rf"{cheapest_bops:,} BOPs per sample"):
        run_pass(DepthwiseNet(), _images(), toy_recipe(3, fixed_ends=True), budget_kind="bops", budget=1000)
    # the default budget (uniform --w-bits) can be impossible too: 2-bit weights, depthwise layers need 4
    with pytest.raises(ConfigError,
                       match=r"budget: null = the cost of uniform 2-bit weights, budget_kind=avg_bits\) is 2 average "
                             r"weight bits"):
        run_pass(DepthwiseNet(), _images(), toy_recipe(2, fixed_ends=True))


def test_bad_options_raise_clear_errors() -> None:
    for options, message in (({"budget_kind": "flops"}, "budget_kind"), ({"sensitivity": "kl"}, "sensitivity"),
                             ({"candidates": [1, 4]}, "bit widths"), ({"candidates": []}, "at least one"),
                             ({"budget": -1}, "positive"), ({"samples": 0}, "samples"),
                             ({"candidates": [2, 3], "depthwise_min_bits": 4}, "depthwise_min_bits"),
                             ({"budget_size": 3}, "no option")):
        with pytest.raises(ConfigError, match=message):
            MixedPrecisionPass(MixedPrecisionPass.make_config(options))


def test_weight_bits_cannot_change_after_calibration() -> None:
    from quantplug.prepare import set_weight_bits

    q_model, ctx = pass_context(TwoBranch(), torch.randn(16, 32), toy_recipe(3))
    from quantplug.calibrate import calibrate_weights

    calibrate_weights(q_model, ctx.session, ctx.recipe)
    with pytest.raises(ConfigError, match="before calibration"):
        set_weight_bits(q_model.a, 4)


# ----------------------------------------------------------------------------------------- recipe, runs
def test_recipe_composes_with_any_base() -> None:
    session = Session(entry_points=True)
    recipe = resolve_recipe(session, "mixed")
    assert [p.name for p in recipe.passes] == ["mixed"] and recipe.rounding.name == "nearest"
    assert MIXED.extends == "nearest"
    if "qdrop" in session.recipes:
        recipe = resolve_recipe(session, "mixed", base="qdrop")
        assert recipe.name == "mixed+qdrop" and recipe.passes[0].name == "mixed"
        assert recipe.rounding.name == "adaround" and recipe.activation_policy.name == "drop"
    recipe = resolve_recipe(session, "mixed", preset="fisher")
    assert recipe.passes[0].options["sensitivity"] == "fisher"


def test_run_saves_the_real_bit_map_and_loads_back_identically(tmp_path) -> None:  # type: ignore[no-untyped-def]
    session = Session(entry_points=True)
    overrides = {**FAST, "weight.bits": 3,
                 "passes": [{"name": "mixed", "options": {"sensitivity": "fisher", "samples": 32}}]}
    result = apply("mixed", "testing:tiny-resnet", overrides=overrides, eval_samples=64, out_dir=str(tmp_path / "run"),
                   session=session)
    manifest = json.loads((tmp_path / "run" / "quantplug.json").read_text())
    recorded = {b["name"]: b["weight_bits"] for b in manifest["bit_map"]}
    actual = {n: m.weight_spec.bits for n, m in quant_layers(result.model)}
    assert recorded == actual == manifest["passes"]["mixed"]["bits"]
    assert len(set(recorded.values()) - {8}) > 1  # really mixed (not uniform 3 bits)
    assert manifest["passes"]["mixed"]["average_bits"] <= 3.0
    loaded = load(str(tmp_path / "run"), session=session)
    assert {n: m.weight_spec.bits for n, m in quant_layers(loaded)} == actual
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


def test_cli_runs_the_recipe(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from quantplug.cli import main

    code = main(["apply", "--plugin", "mixed", "testing:tiny-resnet", "--w-bits", "3", "--calib-samples", "64",
                 "--eval-samples", "64", "--out", str(tmp_path / "cli"),
                 "-o", 'passes=[{"name": "mixed", "options": {"sensitivity": "output_mse"}}]'])
    assert code == 0
    manifest = json.loads((tmp_path / "cli" / "quantplug.json").read_text())
    assert manifest["recipe"]["passes"][0]["options"] == {"sensitivity": "output_mse"}
    assert manifest["passes"]["mixed"]["sensitivity"] == "output_mse"
