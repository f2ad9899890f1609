"""Recipes: serialization round trip, overrides from the CLI, resolution of bases and presets."""

from __future__ import annotations

import pytest

from quantplug.config import PerGroup, QuantSpec, Recipe, apply_overrides, parse_override
from quantplug.errors import ConfigError, UnknownComponentError
from quantplug.recipes import RecipeSpec, resolve_recipe


def test_recipe_round_trips_through_json_dict() -> None:
    r = apply_overrides(Recipe(), {"weight.granularity": "per_group", "weight.granularity.group_size": 16,
                                   "bits.overrides": [["layer1.*", 3, 4]]})
    back = Recipe.from_dict(r.to_dict())
    assert back == r
    assert back.weight.granularity == PerGroup(16)
    assert back.bits.overrides == (("layer1.*", 3, 4),)


def test_overrides_parse_and_validate() -> None:
    assert parse_override("recon.iters=500") == ("recon.iters", 500)
    assert parse_override("rounding.name=adaround") == ("rounding.name", "adaround")
    assert parse_override("recon.learn_act_step=true") == ("recon.learn_act_step", True)
    r = apply_overrides(Recipe(), dict([parse_override("recon.iters=7"), parse_override("rounding.options.x=0.5")]))
    assert r.recon.iters == 7 and r.rounding.options == {"x": 0.5}
    with pytest.raises(ConfigError, match="unknown override path"):
        apply_overrides(Recipe(), {"recon.iterz": 5})
    with pytest.raises(ConfigError, match="2 to 8"):
        apply_overrides(Recipe(), {"weight.bits": 12})
    with pytest.raises(ConfigError, match="path.to.field=value"):
        parse_override("recon.iters")
    with pytest.raises(ConfigError):
        apply_overrides(Recipe(), {"recon.cache": "gpu"})


def test_activation_can_be_removed_and_restored() -> None:
    r = apply_overrides(Recipe(), {"activation": None})
    assert r.activation is None
    r2 = apply_overrides(r, {"activation.bits": 4})
    assert r2.activation == QuantSpec(4)


def test_resolution_walks_bases_presets_and_base_swap(session) -> None:  # type: ignore[no-untyped-def]
    session.recipes.register(RecipeSpec("child", extends="nearest-lsq", overrides={"recon.batch_size": 7},
                                        presets={"fast": {"recon.iters": 3}}), "test")
    session.recipes.register(RecipeSpec("other", overrides={"recon.lr": 0.5}), "test")
    r = resolve_recipe(session, "child")
    assert r.recon.learn_act_step and r.recon.batch_size == 7 and r.recon.iters == 2000
    r = resolve_recipe(session, "child", preset="fast", overrides={"recon.lr": 0.25})
    assert r.recon.iters == 3 and r.recon.lr == 0.25
    swapped = resolve_recipe(session, "child", base="other")
    assert swapped.name == "child+other" and swapped.recon.lr == 0.5 and not swapped.recon.learn_act_step
    with pytest.raises(ConfigError, match="no preset"):
        resolve_recipe(session, "child", preset="slow")
    with pytest.raises(UnknownComponentError, match="pip install quantplug-qdorp"):
        resolve_recipe(session, "qdorp")


def test_a_recipe_that_adds_passes_keeps_those_of_its_base(session) -> None:  # type: ignore[no-untyped-def]
    def refs(*names: str, **options: object) -> list[dict[str, object]]:
        return [{"name": n, "options": dict(options) if n == "extra" else {}} for n in names]

    session.recipes.register(RecipeSpec("two-passes", overrides={"passes": refs("p1", "p2")}), "test")
    session.recipes.register(RecipeSpec("adder", extends="nearest", overrides={"passes": refs("extra")},
                                        presets={"strong": {"passes": refs("extra", strength=2)}},
                                        adds_passes=True), "test")
    session.recipes.register(RecipeSpec("replacer", extends="nearest", overrides={"passes": refs("extra")}), "test")
    names = lambda r: [p.name for p in r.passes]  # noqa: E731
    assert names(resolve_recipe(session, "adder")) == ["extra"]
    assert names(resolve_recipe(session, "adder", base="two-passes")) == ["extra", "p1", "p2"]
    assert names(resolve_recipe(session, "replacer", base="two-passes")) == ["extra"]  # the default: replaced
    # a preset or the user's passes change the recipe's own pass (same name) and keep the base's
    r = resolve_recipe(session, "adder", base="two-passes", preset="strong")
    assert names(r) == ["extra", "p1", "p2"] and r.passes[0].options == {"strength": 2}
    r = resolve_recipe(session, "adder", base="two-passes",
                       overrides={"passes": [{"name": "p2", "options": {"k": 1}}, *refs("extra")]})
    assert names(r) == ["p2", "extra", "p1"] and r.passes[0].options == {"k": 1}


def test_overrides_do_not_mutate_the_mappings_they_come_from() -> None:
    """A preset's nested value must survive a later override of one of its fields (order of resolutions)."""
    from quantplug.config import Recipe, apply_overrides

    preset = {"weight": {"bits": 2, "symmetric": True, "granularity": {"kind": "per_channel", "axis": 0}}}
    apply_overrides(Recipe(), {**preset, "weight.granularity": {"kind": "per_tensor"}})
    assert preset["weight"]["granularity"] == {"kind": "per_channel", "axis": 0}


def test_component_options_are_checked_against_their_types() -> None:
    """A component's options are typed like recipe fields: a string for a number is an error naming the option
    (it used to reach the component and fail later, or not at all); an integer for a float is converted."""
    from quantplug.builtins.observers import PercentileObserver

    with pytest.raises(ConfigError, match=r"percentile.percentile must be a number, got '99.9' \(str\)"):
        PercentileObserver.make_config({"percentile": "99.9"})
    with pytest.raises(ConfigError, match=r"percentile.max_samples must be an integer, got 1.5"):
        PercentileObserver.make_config({"max_samples": 1.5})
    with pytest.raises(ConfigError, match="has no option"):
        PercentileObserver.make_config({"pct": 99.0})
    config = PercentileObserver.make_config({"percentile": 99})
    assert config.percentile == 99.0 and isinstance(config.percentile, float)
    # through a recipe override, as the CLI passes it: refused before any data is read
    from quantplug.api import apply
    from quantplug.plugins import Session

    with pytest.raises(ConfigError, match="percentile.percentile must be a number"):
        apply("nearest", "testing:tiny-resnet", session=Session(), dry_run=True,
              overrides={"activation_observer.name": "percentile", "activation_observer.options.percentile": "high"})
