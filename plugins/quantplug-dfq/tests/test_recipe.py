"""The dfq recipe: resolution and presets, a run end to end, save and load."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from quantplug_dfq.activations import ChannelClip
from quantplug_dfq.equalize import EqualizePass

from quantplug.api import apply
from quantplug.config import PerTensor
from quantplug.errors import ArtifactError
from quantplug.export import load
from quantplug.plugins import Session
from quantplug.recipes import resolve_recipe
from quantplug.testing.conformance import RecipeSmoke


def test_dfq_is_per_tensor_minmax_nearest_with_three_passes() -> None:
    session = Session()
    recipe = resolve_recipe(session, "dfq")
    assert isinstance(recipe.weight.granularity, PerTensor) and recipe.weight.bits == 8
    assert recipe.weight_observer.name == "minmax" and recipe.rounding.name == "nearest" and recipe.recon.iters == 0
    assert [p.name for p in recipe.passes] == ["equalize", "absorb-bias", "bias-correct"]
    assert recipe.passes[-1].options["mode"] == "empirical"
    analytic = resolve_recipe(session, "dfq", preset="analytic")
    assert analytic.passes[-1].options["mode"] == "analytic"
    equalize_only = resolve_recipe(session, "dfq", preset="equalize-only")
    assert [p.name for p in equalize_only.passes] == ["equalize"]  # cross-layer equalization, nothing else


def test_run_saves_and_loads_to_the_same_outputs(tmp_path: Any) -> None:
    session = Session()
    overrides = {"weight.bits": 4, "calib.num_samples": 64, "calib.batch_size": 32}
    result = apply("dfq", "testing:tiny-resnet", overrides=overrides, eval_samples=64, out_dir=str(tmp_path / "run"),
                   session=session)
    assert set(result.passes) == {"equalize", "absorb-bias", "bias-correct"}
    assert len(result.passes["equalize"]["pairs"]) == 3 and result.passes["equalize"]["converged"]
    loaded = load(str(tmp_path / "run"), session=session)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


PASSES_WITH_CLIPS = {
    "dfq": None,  # the recipe as is: equalize (relu6=clip), absorb-bias, bias-correct
    "relu6-as-relu": [{"name": "equalize", "options": {"relu6": "relu"}}, {"name": "absorb-bias"}],
}


@pytest.mark.parametrize("passes", list(PASSES_WITH_CLIPS))
def test_run_whose_relu6_became_channel_clips_loads(tmp_path: Any, mobilenet_session: Session,
                                                    passes: str) -> None:
    overrides: dict[str, Any] = {"weight.bits": 4, "calib.num_samples": 32, "calib.batch_size": 32}
    if PASSES_WITH_CLIPS[passes] is not None:
        overrides["passes"] = PASSES_WITH_CLIPS[passes]
    result = apply("dfq", "dfq-test:tiny-mobilenet", overrides=overrides, eval_samples=32,
                   out_dir=str(tmp_path / "run"), session=mobilenet_session)
    clips = {n for n, m in result.model.named_modules() if isinstance(m, ChannelClip)}
    assert clips and set(result.passes["equalize"]["channel_clips"]) == clips
    loaded = load(str(tmp_path / "run"), session=mobilenet_session)
    assert {n for n, m in loaded.named_modules() if isinstance(m, ChannelClip)} == clips
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


def test_a_recorded_clip_the_model_lacks_is_a_clear_error(tiny_mobilenet) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ArtifactError, match="stem.7"):
        EqualizePass().rebuild(tiny_mobilenet(), {"channel_clips": {"stem.7": {"channels": 8, "channel_dim": 1}}})


@pytest.mark.slow
def test_relu6_model_round_trip(tmp_path: Any) -> None:
    pytest.importorskip("quantplug_torchvision")
    session = Session()
    overrides = {"calib.num_samples": 32, "calib.batch_size": 32, "passes": [{"name": "equalize"}]}
    result = apply("dfq", "zoo:mobilenetv2-fmnist", overrides=overrides, eval_samples=32,
                   out_dir=str(tmp_path / "run"), session=session)
    assert result.passes["equalize"]["replaced_activations"] == 35
    loaded = load(str(tmp_path / "run"), session=session)
    assert sum(isinstance(m, ChannelClip) for m in loaded.modules()) == 35
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


class TestDFQRecipe(RecipeSmoke):
    recipe = "dfq"
