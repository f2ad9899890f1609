"""``mixed --base X``: the base's own model passes run with ``mixed``; bases whose weights ignore the bit width are
refused."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from mixed_toys import TwoBranch, run_pass, toy_recipe
from quantplug_mixed.fixed_levels import check_bit_width_matters

from quantplug import hookimpl
from quantplug.api import apply
from quantplug.config import ComponentRef
from quantplug.errors import ConfigError
from quantplug.interfaces import Rounding
from quantplug.modules import quant_layers
from quantplug.plugins import Session
from quantplug.recipes import resolve_recipe

FAST = {"calib.num_samples": 64, "calib.batch_size": 32, "weight.bits": 3}
FISHER = {"name": "mixed", "options": {"sensitivity": "fisher", "samples": 32}}


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(entry_points=True)


def _need(session: Session, *recipes: str) -> None:
    missing = [r for r in recipes if r not in session.recipes]
    if missing:
        pytest.skip(f"needs the recipes {missing} (quantplug-kmeans, quantplug-dfq, quantplug-qat, quantplug-lowbit)")


@pytest.mark.parametrize(("base", "base_passes"), [("kmeans", ["kmeans"]), ("qat", ["qat"]),
                                                   ("dfq", ["equalize", "absorb-bias", "bias-correct"])])
def test_the_base_passes_are_kept_with_mixed_first(session: Session, base: str, base_passes: list[str]) -> None:
    _need(session, base)
    for preset, overrides in ((None, None), ("fisher", None), (None, {"passes": [FISHER]})):
        recipe = resolve_recipe(session, "mixed", base=base, preset=preset, overrides=overrides)
        assert [p.name for p in recipe.passes] == ["mixed", *base_passes], (preset, overrides)
        assert recipe.passes[0].options == ({} if preset is None and overrides is None else
                                            {"sensitivity": "fisher", **({"samples": 32} if overrides else {})})
    # the base's pass options can be changed in the same list (matched by name)
    recipe = resolve_recipe(session, "mixed", base=base,
                            overrides={"passes": [FISHER, {"name": base_passes[-1], "options": {"x": 1}}]})
    assert [p.name for p in recipe.passes] == ["mixed", base_passes[-1], *base_passes[:-1]]
    assert recipe.passes[1].options == {"x": 1}


def test_mixed_over_kmeans_clusters_each_layer_at_its_allocated_width(session: Session) -> None:
    _need(session, "kmeans")
    result = apply("mixed", "testing:tiny-resnet", base="kmeans", session=session, eval_samples=32,
                   evaluate_fp=False,
                   overrides={**FAST, "passes": [FISHER]})  # kmeans keeps its own options (4 epochs)
    assert list(result.passes) == ["mixed", "kmeans"]
    assert len(result.passes["kmeans"]["epoch_losses"]) == 4
    bits = result.passes["mixed"]["bits"]
    assert len(set(bits.values())) > 1 and result.passes["mixed"]["average_bits"] <= 3.0
    layers = dict(quant_layers(result.model))
    assert set(layers) == set(bits)  # kmeans shares every layer's weights, first and last too
    for name, layer in layers.items():
        assert layer.has_codebook, name
        assert layer.weight_spec.bits == bits[name] == result.passes["kmeans"]["layers"][name]["bits"]
        assert layer.weight_codebook.numel() == 2 ** bits[name]
        assert layer.quantized_weight().unique().numel() <= 2 ** bits[name]


def test_mixed_over_dfq_runs_equalization_allocation_and_bias_correction_in_stage_order(session: Session) -> None:
    _need(session, "dfq")
    result = apply("mixed", "testing:tiny-resnet", base="dfq", session=session, eval_samples=32, evaluate_fp=False,
                   overrides={**FAST, "passes": [FISHER]})
    # float (equalize, absorb-bias), prepared (mixed), quantized (bias-correct)
    assert list(result.passes) == ["equalize", "absorb-bias", "mixed", "bias-correct"]
    assert result.recipe.weight_observer.name == "minmax"  # dfq's own settings are kept too
    bits = result.passes["mixed"]["bits"]
    assert len(set(bits.values()) - {8}) > 1
    assert {n: m.weight_spec.bits for n, m in quant_layers(result.model)} == bits


@pytest.mark.parametrize(("base", "component"), [("twn", "rounding 'ternary' (3 values)"),
                                                 ("bwn", "rounding 'binary' (2 values)"),
                                                 ("ttq", "model pass 'ttq' (3 values)")])
def test_bases_whose_weights_ignore_the_bit_width_are_refused(session: Session, base: str, component: str) -> None:
    _need(session, base)
    with pytest.raises(ConfigError, match=rf"{re.escape(component)}.*fixed number of values whatever its bit width"):
        apply("mixed", "testing:tiny-resnet", base=base, session=session, eval_samples=16, evaluate_fp=False,
              overrides={"calib.num_samples": 32, "calib.batch_size": 32, "passes": [FISHER]})


class FourLevelRounding(Rounding):
    """A made-up rounding declaring that its weights always take 4 values."""

    name = "four-levels"
    fixed_weight_levels: ClassVar[int] = 4

    @dataclass(frozen=True)
    class Config:
        pass


class FourLevelPlugin:
    @staticmethod
    @hookimpl
    def register_roundings(register: Any) -> None:
        register(FourLevelRounding)


def test_a_plugin_declares_fixed_levels_with_a_class_attribute() -> None:
    import dataclasses

    session = Session(entry_points=False, plugins=[FourLevelPlugin()])
    recipe = dataclasses.replace(toy_recipe(3), rounding=ComponentRef("four-levels"))
    with pytest.raises(ConfigError, match="rounding 'four-levels' \\(4 values\\)"):
        check_bit_width_matters(recipe, session)
    check_bit_width_matters(toy_recipe(3), session)  # nearest follows the bit width
    # the pass itself refuses before measuring anything
    with pytest.raises(ConfigError, match="fixed number of values"):
        run_pass(TwoBranch(), torch.randn(16, 32), dataclasses.replace(toy_recipe(3), rounding=ComponentRef("ternary")),
                 sensitivity="fisher")
