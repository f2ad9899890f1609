"""MRECG: exact solver against brute force, capacities, published schemes, recipe composition, conformance."""

from __future__ import annotations

import itertools
import logging
import math
import random

import pytest
import torch
from quantplug_mrecg import (
    SCHEMES,
    MRECGScheduler,
    block_param_counts,
    capacities,
    default_k,
    feasible,
    groups_from_mask,
    objective,
    parse_scheme,
    solve,
)

from quantplug.errors import ConfigError
from quantplug.interfaces import UnitSpec
from quantplug.plugins import Session
from quantplug.recipes import resolve_recipe
from quantplug.testing.conformance import RecipeSmoke, SchedulerConformance
from quantplug.testing.models import tiny_resnet

torch.set_num_threads(1)


def _blocks(names: list[str] | tuple[str, ...], layers: int = 2) -> list[UnitSpec]:
    return [UnitSpec(n, (n,), tuple(f"{n}.conv{i}" for i in range(layers))) for n in names]


def _make(**options: object) -> MRECGScheduler:
    return MRECGScheduler(MRECGScheduler.make_config(options))


# ----------------------------------------------------------------------------------------- solver
def _brute_force(diffs: list[float], k: int, lam: float, allowed: list[bool], max_group: int | None) -> float:
    best = -math.inf
    for mask in itertools.product((0, 1), repeat=len(diffs)):
        if feasible(mask, allowed, max_group):
            best = max(best, objective(mask, diffs, k, lam))
    return best


@pytest.mark.parametrize("max_group", [None, 2, 3, 4])
def test_solver_is_the_exact_optimum_on_random_capacities(max_group: int | None) -> None:
    rng = random.Random(1234 + (max_group or 0))
    for _ in range(60):
        n = rng.randint(2, 10)  # blocks
        cm = [rng.uniform(0.0, 3.0) if rng.random() < 0.8 else float(rng.randint(0, 3)) for _ in range(n)]
        diffs = [(a - b) ** 2 for a, b in zip(cm, cm[1:])]
        k = rng.randint(0, n - 1)
        lam = rng.choice([0.0, 0.05, 0.5, 1.0, 10.0, 1e6])
        allowed = [rng.random() < 0.85 for _ in diffs]
        mask = solve(diffs, k, lam, allowed, max_group)
        assert len(mask) == len(diffs) and feasible(mask, allowed, max_group)
        assert objective(mask, diffs, k, lam) == pytest.approx(_brute_force(diffs, k, lam, allowed, max_group),
                                                               abs=1e-9), (cm, k, lam, allowed, max_group)


def test_unbounded_groups_pick_the_largest_differences_and_chain() -> None:
    # the two largest differences are consecutive pairs (1-2, 2-3): one unit of three blocks, like (7, 7, 7)
    cm = [1.0, 1.1, 3.0, 0.5, 0.6, 0.7]
    diffs = [(a - b) ** 2 for a, b in zip(cm, cm[1:])]
    mask = solve(diffs, k=2, lam=1e6, max_group=None)
    assert mask == [0, 1, 1, 0, 0]
    assert groups_from_mask(len(cm), mask) == [[0], [1, 2, 3], [4], [5]]
    # with units of at most two blocks the second merge moves to the best pair that does not chain
    assert solve(diffs, k=2, lam=1e6, max_group=2) == [1, 0, 1, 0, 0]


def test_lambda_controls_how_far_the_merge_count_strays_from_k() -> None:
    diffs = [4.0, 0.0, 2.5, 0.01, 1.0, 3.0]
    assert sum(solve(diffs, k=2, lam=1e6, max_group=None)) == 2  # large lambda: exactly k merges
    assert solve(diffs, k=2, lam=1e6, max_group=None) == [1, 0, 0, 0, 0, 1]
    assert solve(diffs, k=0, lam=0.0, max_group=None) == [1, 0, 1, 1, 1, 1]  # lambda 0: every positive difference
    assert solve(diffs, k=0, lam=10.0, max_group=None) == [0] * 6  # merging costs more than any difference gains


def test_default_k_and_groups() -> None:
    assert [default_k(p) for p in (0, 1, 2, 7, 15, 16)] == [0, 1, 1, 2, 4, 4]
    assert groups_from_mask(4, [0, 0, 0]) == [[0], [1], [2], [3]]
    assert groups_from_mask(1, []) == [[0]]


# ----------------------------------------------------------------------------------------- capacity
def test_capacity_definitions_on_tiny_resnet() -> None:
    model = tiny_resnet()
    blocks = model.quant_blocks()
    counts = block_param_counts(model, blocks)
    # stem 3x8x3x3; layer1.x 2 x 8x8x3x3; layer2.0 8x16x3x3 + 16x16x3x3 + downsample 8x16; head 16x10
    assert counts == [216, 1152, 1152, 1152 + 2304 + 128, 160]
    assert capacities(blocks, "params", counts) == pytest.approx([math.log(c) for c in counts])
    assert sum(capacities(blocks, "params_norm", counts)) == pytest.approx(1.0)
    assert capacities(blocks, "layers") == [1.0, 2.0, 2.0, 3.0, 1.0]
    with pytest.raises(ConfigError):
        capacities(blocks, "flops")


def test_search_uses_weight_counts_once_bound_and_falls_back_to_layers_with_a_warning(caplog) -> None:  # type: ignore[no-untyped-def]
    model = tiny_resnet()
    blocks = model.quant_blocks()
    bound = _make(scheme="", k=1)
    bound.bind(model)
    assert [u.name for u in bound.plan(blocks)] == ["stem", "layer1.0", "layer1.1+layer2.0", "head"]
    assert bound.last_capacities == pytest.approx([math.log(c) for c in block_param_counts(model, blocks)])
    unbound = _make(scheme="")
    with caplog.at_level(logging.WARNING, logger="quantplug_mrecg"):
        unbound.plan(blocks)
    assert "capacity=layers" in caplog.text and unbound.last_capacities == [1.0, 2.0, 2.0, 3.0, 1.0]
    # explicit capacities, one per block: the largest jump wins; stem and head stay alone (fixed_ends)
    explicit = _make(scheme="", capacities=[0.0, 5.0, 1.0, 1.2, 9.0], k=1)
    assert [u.name for u in explicit.plan(blocks)] == ["stem", "layer1.0+layer1.1", "layer2.0", "head"]
    free = _make(scheme="", capacities=[0.0, 5.0, 1.0, 1.2, 9.0], k=1, lam=1e6, fixed_ends=False)
    assert [u.name for u in free.plan(blocks)] == ["stem", "layer1.0", "layer1.1", "layer2.0+head"]


def test_blocks_without_layers_are_never_merged() -> None:
    blocks = [UnitSpec("embed", ("embed",), ()), *_blocks(["a", "b", "c", "d"]), UnitSpec("norm", ("norm",), ())]
    plan = _make(scheme="", capacities=[9.0, 0.0, 4.0, 0.0, 4.0, 9.0], k=5, lam=1e6, fixed_ends=False).plan(blocks)
    assert [u.blocks for u in plan] == [("a", "b", "c"), ("d",)]  # max_group 3; embed / norm skipped


def test_option_validation() -> None:
    for bad in ({"lam": -1.0}, {"k": -2}, {"capacity": "flops"}, {"max_group": 1}, {"scheme": "vgg16"},
                {"scheme": "[1, ()]"}, {"scheme": "not a list"}):
        with pytest.raises(ConfigError):
            _make(**bad)


# ----------------------------------------------------------------------------------------- schemes
RESNET18 = ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1",
            "head"]
MBV2 = ["stem", *(f"features.{i}" for i in range(1, 18)), "head"]


def test_published_schemes_parse_to_their_unit_sizes() -> None:
    assert parse_scheme("[1, 2, (3, 3), (4, 4), 5, 6, 7, 8]") == [1, 1, 2, 2, 1, 1, 1, 1]
    assert parse_scheme([1, 2, [3, 3, 3], 4]) == [1, 1, 3, 1]
    for key, scheme in SCHEMES.items():
        published = parse_scheme(scheme.published)
        assert sum(scheme.sizes) == len(scheme.blocks), key
        if key == "mobilenetv2":  # MQBench stacks features.0 and features.1 into its first unit
            assert scheme.sizes == (published[0] + 1, *published[1:])
        else:
            assert list(scheme.sizes) == published, key


def test_resnet18_scheme_maps_to_blocks() -> None:
    plan = _make(scheme="resnet18").plan(_blocks(RESNET18))
    assert [u.blocks for u in plan] == [
        ("stem",), ("layer1.0",), ("layer1.1", "layer2.0"), ("layer2.1", "layer3.0"), ("layer3.1",), ("layer4.0",),
        ("layer4.1",), ("head",)]


def test_mobilenetv2_scheme_maps_to_blocks() -> None:
    plan = _make(scheme="mobilenetv2").plan(_blocks(MBV2))
    assert [u.blocks for u in plan] == [
        ("stem", "features.1"), ("features.2",), ("features.3", "features.4"), ("features.5",),
        ("features.6", "features.7"), ("features.8",), ("features.9", "features.10", "features.11"),
        ("features.12", "features.13", "features.14"), ("features.15",), ("features.16", "features.17"), ("head",)]
    assert [u.name for u in plan][-2:] == ["features.16+features.17", "head"]


def test_resnet50_and_regnet_schemes_map_to_blocks() -> None:
    plan = _make(scheme="resnet50").plan(_blocks(SCHEMES["resnet50"].blocks))
    merged = [u.blocks for u in plan if len(u.blocks) > 1]
    assert merged == [("layer1.2", "layer2.0"), ("layer2.3", "layer3.0", "layer3.1"), ("layer3.5", "layer4.0")]
    plan = _make(scheme="reg600").plan(_blocks(SCHEMES["regnetx600m"].blocks))
    merged = [u.blocks for u in plan if len(u.blocks) > 1]
    assert merged == [
        ("trunk_output.block2.block2-2", "trunk_output.block3.block3-0", "trunk_output.block3.block3-1"),
        ("trunk_output.block3.block3-4", "trunk_output.block4.block4-0"),
        ("trunk_output.block4.block4-5", "trunk_output.block4.block4-6")]


def test_auto_uses_a_published_scheme_only_for_its_model_and_mismatches_are_errors() -> None:
    auto = _make(scheme="auto")
    assert len(auto.plan(_blocks(RESNET18))) == 8
    assert len(auto.plan(_blocks(MBV2))) == 11
    tiny = tiny_resnet().quant_blocks()
    assert [u.name for u in auto.plan(tiny)] == [u.name for u in _make(scheme="").plan(tiny)]  # searched
    with pytest.raises(ConfigError, match="resnet18"):
        _make(scheme="resnet18").plan(tiny)
    with pytest.raises(ConfigError, match="covers 3 blocks"):
        _make(scheme="[1, (2, 2)]").plan(tiny)
    assert [u.blocks for u in _make(scheme="[1, (2, 2), (3, 3)]").plan(tiny)] == [
        ("stem",), ("layer1.0", "layer1.1"), ("layer2.0", "head")]


def test_schemes_match_the_torchvision_adapters_blocks() -> None:
    torchvision = pytest.importorskip("torchvision")
    structure = pytest.importorskip("quantplug_torchvision.structure")
    for key, build in (("resnet18", torchvision.models.resnet18), ("mobilenetv2", torchvision.models.mobilenet_v2)):
        blocks = structure.blocks_of(build(weights=None))
        assert tuple(b.name for b in blocks) == SCHEMES[key].blocks, key
        assert len(_make(scheme="auto").plan(blocks)) == len(parse_scheme(SCHEMES[key].published))


# ----------------------------------------------------------------------------------------- recipe
def test_recipe_is_a_scheduler_modifier_composing_with_brecq_and_qdrop() -> None:
    s = Session()
    default = resolve_recipe(s, "mrecg")
    brecq = resolve_recipe(s, "mrecg", base="brecq")
    qdrop = resolve_recipe(s, "mrecg", base="qdrop")
    assert default.scheduler.name == brecq.scheduler.name == qdrop.scheduler.name == "mrecg"
    assert default.scheduler.options == {"scheme": "auto"}
    plain_brecq, plain_qdrop = resolve_recipe(s, "brecq"), resolve_recipe(s, "qdrop")
    # everything but the scheduler (and the name) comes from the base
    for composed, plain in ((default, plain_brecq), (brecq, plain_brecq), (qdrop, plain_qdrop)):
        a, b = composed.to_dict(), plain.to_dict()
        for key in ("scheduler", "name", "source"):
            a.pop(key), b.pop(key)
        assert a == b
    assert qdrop.name == "mrecg+qdrop" and qdrop.activation_policy.name == "drop" and qdrop.loss.name == "mse"
    assert brecq.loss.name == "fisher_diag" and brecq.recon.order == "weights_first"
    mbv2 = resolve_recipe(s, "mrecg", base="qdrop", preset="official-mobilenetv2")
    assert mbv2.scheduler.options["scheme"] == "mobilenetv2" and mbv2.rounding.options["reg_weight"] == 0.1
    assert (mbv2.calib.num_samples, mbv2.recon.batch_size) == (4096, 256)
    assert resolve_recipe(s, "mrecg", preset="search").scheduler.options["scheme"] == ""
    s.make("scheduler", qdrop.scheduler)  # the options are valid


# ----------------------------------------------------------------------------------------- conformance
class TestMRECGSchedulerConformance(SchedulerConformance):
    component = MRECGScheduler


class TestMRECGSearchConformance(SchedulerConformance):
    component = MRECGScheduler
    options = {"scheme": "", "capacity": "layers", "k": 3, "lam": 0.0, "max_group": 0, "fixed_ends": False}


class TestMRECGRecipe(RecipeSmoke):
    recipe = "mrecg"
    base = "qdrop"
