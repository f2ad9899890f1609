"""Every built-in component passes the conformance suite that third-party plugins use."""

from __future__ import annotations

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
