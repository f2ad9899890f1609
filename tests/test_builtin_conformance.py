"""Every built-in component passes the conformance suite that third-party plugins use."""

from __future__ import annotations

import pytest
import torch

from quantplug.builtins.losses import LpLoss
from quantplug.builtins.observers import (
    ACIQObserver,
    AvgMinMaxObserver,
    EMAObserver,
    KLObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
)
from quantplug.builtins.roundings import NearestRounding, StochasticRounding
from quantplug.builtins.schedulers import (
    BlockScheduler,
    GroupScheduler,
    LayerScheduler,
    NetworkScheduler,
    StageScheduler,
)
from quantplug.builtins.testing_models import TinyModelAdapter
from quantplug.testing.conformance import (
    AdapterConformance,
    LossConformance,
    ObserverConformance,
    RecipeSmoke,
    RoundingConformance,
    SchedulerConformance,
)


class TestNearestRounding(RoundingConformance):
    component = NearestRounding


class TestStochasticRounding(RoundingConformance):
    component = StochasticRounding


class TestMinMax(ObserverConformance):
    component = MinMaxObserver


class TestEMA(ObserverConformance):
    component = EMAObserver


class TestAvgMinMax(ObserverConformance):
    component = AvgMinMaxObserver


class TestPercentile(ObserverConformance):
    component = PercentileObserver


class TestMSE(ObserverConformance):
    component = MSEObserver


class TestMSEOneDimensional(ObserverConformance):
    component = MSEObserver
    options = {"search": "range", "p": 2.0}


class TestACIQLaplace(ObserverConformance):
    component = ACIQObserver


class TestACIQGaussian(ObserverConformance):
    component = ACIQObserver
    options = {"distribution": "gaussian"}


class TestKL(ObserverConformance):
    component = KLObserver


class TestLpLoss(LossConformance):
    component = LpLoss


class TestLpLossMean(LossConformance):
    component = LpLoss
    options = {"p": 2.4, "reduction": "mean"}


class TestLayerScheduler(SchedulerConformance):
    component = LayerScheduler


class TestBlockScheduler(SchedulerConformance):
    component = BlockScheduler


class TestStageScheduler(SchedulerConformance):
    component = StageScheduler


class TestNetworkScheduler(SchedulerConformance):
    component = NetworkScheduler


class TestGroupScheduler(SchedulerConformance):
    component = GroupScheduler
    options = {"groups": []}


class TestTinyResNetAdapter(AdapterConformance):
    component = TinyModelAdapter
    model_id = "testing:tiny-resnet"


class TestTinyDecoderAdapter(AdapterConformance):
    component = TinyModelAdapter
    model_id = "testing:tiny-decoder"


class TestNearestRecipe(RecipeSmoke):
    recipe = "nearest"


class TestNearestLSQRecipe(RecipeSmoke):
    recipe = "nearest-lsq"


def test_recipe_smoke_reload_check_catches_a_run_that_reloads_differently(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from quantplug.api import apply
    from quantplug.plugins import Session

    session = Session(entry_points=False)
    result = apply("nearest", "testing:tiny-resnet", session=session, out_dir=str(tmp_path / "run"),
                   overrides={"calib.num_samples": 32, "calib.batch_size": 32}, eval_samples=16, evaluate_fp=False)
    smoke = TestNearestRecipe()
    smoke.check_reload(session, result.model, str(tmp_path / "run"))  # the saved run: identical
    with torch.no_grad():
        result.model.get_submodule("head.fc").bias.add_(1e-3)  # the model no longer matches what was saved
    with pytest.raises(AssertionError, match="reloads with other outputs"):
        smoke.check_reload(session, result.model, str(tmp_path / "run"))
