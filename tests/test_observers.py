"""Tests of the built-in observers: numbers against hand computations and brute-force references."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pluggy
import pytest
import torch

from quantplug import hookspecs
from quantplug.builtins import observers as obs
from quantplug.config import PerChannel, PerGroup, QuantSpec
from quantplug.errors import ConfigError, DataError
from quantplug.quantizer import fake_quant, qparams_from_range, to_rows

P = 2.4
ALL = obs.BUILTIN_OBSERVERS


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6, atol: float = 0.0) -> None:
    """Like ``torch.testing.assert_close`` (whose first call imports torch.distributed: seconds)."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    ok = torch.isclose(got.double(), expected.double(), rtol=rtol, atol=atol)
    assert bool(ok.all()), f"not close: got {got[~ok].tolist()} expected {expected[~ok].tolist()}"


def _qparams_equal(got: tuple[torch.Tensor, torch.Tensor], lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> None:
    scale, zp = qparams_from_range(lo, hi, spec)
    assert_close(got[0], scale, rtol=1e-6)
    assert torch.equal(got[1], zp), (got[1], zp)


# --------------------------------------------------------------------------- registration / API
def test_register_observers_through_pluggy() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(obs)
    registered: list[type] = []
    pm.hook.register_observers(register=registered.append)
    names = [cls.name for cls in registered]
    assert names == ["minmax", "ema", "avg_minmax", "percentile", "mse", "aciq", "kl"]
    for cls in registered:
        assert cls.name == cls.name.lower()
        assert cls.__doc__ and len(cls.__doc__.strip()) > 40
        config = cls.Config()
        assert dataclasses.is_dataclass(config)
        fields = dataclasses.fields(config)
        if fields:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(config, fields[0].name, getattr(config, fields[0].name))


def test_unknown_and_bad_options() -> None:
    with pytest.raises(ConfigError):
        obs.MSEObserver.make_config({"nope": 1})
    with pytest.raises(ConfigError):
        obs.MSEObserver.make_config({"search": "grid"})
    with pytest.raises(ConfigError):
        obs.EMAObserver.make_config({"averaging_constant": 0.0})
    with pytest.raises(ConfigError):
        obs.ACIQObserver.make_config({"distribution": "cauchy"})
    with pytest.raises(ConfigError, match="asymmetric"):
        obs.MSEObserver(QuantSpec(4, True), obs.MSEObserver.Config(search="range_zero_point"))
    with pytest.raises(ConfigError):
        obs.KLObserver(QuantSpec(8, False), obs.KLObserver.Config(num_bins=128))


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_raises(cls: type, bad: float) -> None:
    rows = torch.randn(3, 50, generator=_gen(0))
    rows[1, 7] = bad
    observer = cls(QuantSpec(4, False, PerChannel(0)))
    with pytest.raises(DataError, match="contains NaN or inf values: check the model inputs / calibration data"):
        observer.observe(rows)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_compute_before_observe_raises(cls: type) -> None:
    with pytest.raises(DataError, match="before observe"):
        cls(QuantSpec(8, False)).compute()


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_bad_shapes_raise(cls: type) -> None:
    observer = cls(QuantSpec(8, False, PerChannel(0)))
    with pytest.raises(DataError, match="rows"):
        observer.observe(torch.randn(10))
    observer.observe(torch.randn(4, 10, generator=_gen(1)))
    with pytest.raises(DataError, match="rows"):
        observer.observe(torch.randn(5, 10))


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_group_rows_same_device_and_dtype(cls: type, symmetric: bool) -> None:
    spec = QuantSpec(4, symmetric, PerGroup(16))
    weight = torch.randn(6, 4, 2, 2, generator=_gen(2)) * torch.linspace(0.1, 3.0, 6).reshape(-1, 1, 1, 1)
    rows = to_rows(weight, spec)
    assert rows.shape == (6, 16)
    observer = cls(spec)
    observer.observe(rows, batch_size=None)
    observer.observe(rows * 1.1)
    scale, zp = observer.compute()
    assert scale.shape == zp.shape == (6,)
    assert scale.device == rows.device and zp.device == rows.device
    assert scale.dtype == torch.float32 and zp.dtype == torch.float32
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    assert torch.equal(zp, zp.round())
    if symmetric:
        assert bool((zp == 0).all())
    else:
        assert bool(((zp >= spec.qmin) & (zp <= spec.qmax)).all())


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_constant_and_zero_rows(cls: type) -> None:
    rows = torch.tensor([[0.0] * 8, [2.5] * 8, [-1.0] * 8])
    observer = cls(QuantSpec(8, False, PerChannel(0)))
    observer.observe(rows)
    scale, zp = observer.compute()
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert bool(torch.isfinite(zp).all())
    # each constant row is represented to within half a step, the zero row exactly
    restored = fake_quant(rows, scale[:, None], zp[:, None], 0, 255)
    assert bool(((restored - rows).abs() <= scale[:, None] / 2 + 1e-6).all()), (restored, scale)
    assert bool((restored[0] == 0).all())


# --------------------------------------------------------------------------- min / max family
def test_minmax_running_range() -> None:
    spec = QuantSpec(8, False, PerChannel(0))
    observer = obs.MinMaxObserver(spec)
    observer.observe(torch.tensor([[1.0, -2.0, 3.0], [0.5, 5.0, 4.0]]))
    observer.observe(torch.tensor([[-4.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    _qparams_equal(observer.compute(), torch.tensor([-4.0, 0.5]), torch.tensor([3.0, 5.0]), spec)
    # symmetric: max |x| / ((qmax - qmin) / 2)
    sym = obs.MinMaxObserver(QuantSpec(8, True))
    sym.observe(torch.tensor([[1.0, -6.35, 3.0]]))
    scale, zp = sym.compute()
    assert_close(scale, torch.tensor([6.35 / 127.5]))
    assert float(zp) == 0.0


def test_ema_hand_computed() -> None:
    spec = QuantSpec(8, False)
    observer = obs.EMAObserver(spec, obs.EMAObserver.Config(averaging_constant=0.5))
    observer.observe(torch.tensor([[0.0, 10.0]]))
    observer.observe(torch.tensor([[-2.0, 6.0]]))
    observer.observe(torch.tensor([[-1.0, 12.0]]))
    # min: 0 -> 0 + .5 * (-2 - 0) = -1 -> -1 + .5 * (-1 + 1) = -1 ; max: 10 -> 8 -> 8 + .5 * 4 = 10
    _qparams_equal(observer.compute(), torch.tensor([-1.0]), torch.tensor([10.0]), spec)
    default = obs.EMAObserver(spec)
    assert default.config.averaging_constant == 0.01
    default.observe(torch.tensor([[0.0, 10.0]]))
    default.observe(torch.tensor([[-100.0, 110.0]]))
    _qparams_equal(default.compute(), torch.tensor([-1.0]), torch.tensor([11.0]), spec)


def test_avg_minmax_per_batch_and_per_sample() -> None:
    spec = QuantSpec(8, False)
    # without batch_size each observe() is one sample, like QDrop's AvgMinMaxObserver
    observer = obs.AvgMinMaxObserver(spec)
    observer.observe(torch.tensor([[-1.0, 2.0, 0.5, 4.0]]))
    observer.observe(torch.tensor([[-3.0, 1.0, 0.0, 0.0]]))
    _qparams_equal(observer.compute(), torch.tensor([-2.0]), torch.tensor([2.5]), spec)
    # with batch_size the elements are split into samples: [-1, 2] [.5, 4] | [-3, 1] [0, 0]
    observer = obs.AvgMinMaxObserver(spec)
    observer.observe(torch.tensor([[-1.0, 2.0, 0.5, 4.0]]), batch_size=2)
    observer.observe(torch.tensor([[-3.0, 1.0, 0.0, 0.0]]), batch_size=2)
    _qparams_equal(
        observer.compute(), torch.tensor([(-1 + 0.5 - 3 + 0) / 4]), torch.tensor([(2 + 4 + 1 + 0) / 4]), spec
    )
    # per-channel activations [B=2, C=2, 2]: rows hold (batch, spatial) in order
    act = torch.tensor([[[1.0, 2.0], [-1.0, 0.0]], [[3.0, 5.0], [-5.0, 1.0]]])
    pc = QuantSpec(8, False, PerChannel(1))
    observer = obs.AvgMinMaxObserver(pc)
    observer.observe(to_rows(act, pc), batch_size=2)
    _qparams_equal(observer.compute(), torch.tensor([2.0, -3.0]), torch.tensor([3.5, 0.5]), pc)
    with pytest.raises(DataError, match="batch_size"):
        observer.observe(to_rows(act, pc), batch_size=3)


# --------------------------------------------------------------------------- percentile
@pytest.mark.parametrize("percentile", [99.99, 99.0, 90.0])
def test_percentile_exact_matches_torch_quantile(percentile: float) -> None:
    q = percentile / 100
    g = _gen(4)
    chi2 = torch.randn(3, 2, 30000, generator=g).pow(2).sum(0)  # Student's t with 3 degrees of freedom
    x = torch.randn(2, 30000, generator=g) / (chi2 / 3).sqrt() + torch.tensor([[0.5], [-1.0]])
    asym = QuantSpec(8, False, PerChannel(0))
    observer = obs.PercentileObserver(asym, obs.PercentileObserver.Config(percentile=percentile))
    for part in x.chunk(3, dim=1):
        observer.observe(part)
    # numpy in float64 (torch.quantile rounds q to float32, which moves the rank by (n - 1) * 6e-8)
    low = torch.from_numpy(np.quantile(x.double().numpy(), 1 - q, axis=1)).float()
    high = torch.from_numpy(np.quantile(x.double().numpy(), q, axis=1)).float()
    assert_close(high, torch.quantile(x, q, dim=1), rtol=1e-2, atol=1e-3)
    scale, zp = observer.compute()
    ref_scale, ref_zp = qparams_from_range(low, high, asym)
    assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    assert torch.allclose(zp, ref_zp, atol=1.0)
    sym = QuantSpec(8, True, PerChannel(0))
    observer = obs.PercentileObserver(sym, obs.PercentileObserver.Config(percentile=percentile))
    observer.observe(x)
    amax = torch.from_numpy(np.quantile(x.abs().numpy(), q, axis=1)).float()
    assert_close(observer.compute()[0], amax / 127.5, rtol=1e-5, atol=0)


def test_percentile_subsample_is_bounded_seeded_and_close() -> None:
    x = torch.randn(1, 400_000, generator=_gen(3))
    spec = QuantSpec(8, True)
    config = obs.PercentileObserver.Config(percentile=99.0, max_samples=20_000, seed=7)
    results = []
    for _ in range(2):
        observer = obs.PercentileObserver(spec, config)
        for part in x.chunk(8, dim=1):
            observer.observe(part)
        assert observer._sample is not None and observer._sample.shape[1] == 20_000
        results.append(observer.compute()[0])
    assert torch.equal(results[0], results[1])
    exact = torch.quantile(x.abs(), 0.99) / 127.5
    assert abs(float(results[0]) / float(exact) - 1) < 0.03
    observer = obs.PercentileObserver(spec, obs.PercentileObserver.Config(percentile=100.0, max_samples=16))
    observer.observe(x)
    assert_close(observer.compute()[0], x.abs().max().reshape(1) / 127.5)


# --------------------------------------------------------------------------- MSE: brute-force reference
def _lp(rows: torch.Tensor, spec: QuantSpec, new_min: torch.Tensor, new_max: torch.Tensor) -> torch.Tensor:
    """Objective of QDrop's MSE observer for one candidate per row: mean |fake_quant(x) - x|^p."""
    scale, zp = qparams_from_range(new_min, new_max, spec)
    xq = fake_quant(rows, scale[:, None], zp[:, None], spec.qmin, spec.qmax)
    return (xq - rows).abs().pow(P).mean(1).double()


def brute_force_mse(
    rows: torch.Tensor, spec: QuantSpec, num: int = 100, search: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every candidate of the official search, scored exactly on the raw values, first strict minimum kept."""
    lo, hi = torch.aminmax(rows, dim=1)
    one_side = "pos" if bool(lo.min() >= 0) else "neg" if bool(hi.max() <= 0) else "no"
    if search == "auto":
        search = "range" if (one_side != "no" or spec.symmetric) else "range_zero_point"
    best = torch.full((rows.shape[0],), 1e10, dtype=torch.float64)
    best_min, best_max = lo.clone(), hi.clone()

    def consider(new_min: torch.Tensor, new_max: torch.Tensor) -> None:
        nonlocal best, best_min, best_max
        score = _lp(rows, spec, new_min, new_max)
        better = score < best
        best_min = torch.where(better, new_min, best_min)
        best_max = torch.where(better, new_max, best_max)
        best = torch.minimum(score, best)

    if search == "range":
        xrange = torch.maximum(lo.abs(), hi)
        for i in range(1, num + 1):
            thres = xrange / num * i
            consider(
                torch.zeros_like(thres) if one_side == "pos" else -thres,
                torch.zeros_like(thres) if one_side == "neg" else thres,
            )
    else:
        # every (range, zero point) candidate; the zero points of one range are scored together, and the first
        # strict minimum in (range, zp) order is kept, as the official double loop does
        lo0, hi0 = lo.clamp(max=0), hi.clamp(min=0)
        xrange = hi0 - lo0
        zps = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float32)[:, None]
        for i in range(1, num + 1):
            tmp_max = xrange / num * i
            delta = (tmp_max - torch.zeros_like(tmp_max)) / float(spec.qmax - spec.qmin)
            new_min = torch.zeros_like(tmp_max) - zps * delta  # [zp, rows]
            new_max = tmp_max - zps * delta
            scale, zp = qparams_from_range(new_min, new_max, spec)
            xq = fake_quant(rows[None], scale[..., None], zp[..., None], spec.qmin, spec.qmax)
            scores = (xq - rows[None]).abs().pow(P).mean(2).double()
            first = scores.argmin(0, keepdim=True)
            score = scores.gather(0, first).squeeze(0)
            better = score < best
            best_min = torch.where(better, new_min.gather(0, first).squeeze(0), best_min)
            best_max = torch.where(better, new_max.gather(0, first).squeeze(0), best_max)
            best = torch.minimum(score, best)
    return best_min, best_max, best


def _check_against(
    observer: obs.MSEObserver, rows: torch.Tensor, spec: QuantSpec, best: torch.Tensor, rtol: float
) -> torch.Tensor:
    got_min, got_max = observer.search_range()
    got = _lp(rows, spec, got_min, got_max)
    assert bool((got <= best * (1 + rtol) + 1e-12).all()), float(((got - best) / best).max())
    scale, zp = observer.compute()
    ref_scale, ref_zp = qparams_from_range(got_min, got_max, spec)
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)
    return got


def _exact_mse(spec: QuantSpec, **options: object) -> obs.MSEObserver:
    return obs.MSEObserver(spec, obs.MSEObserver.make_config({"method": "exact", **options}))


MSE_EXACT_CASES = [
    ("per-tensor 1-D relu 4b", lambda g: torch.randn(1, 20000, generator=g).relu(), QuantSpec(4, False)),
    ("per-tensor 1-D relu 8b", lambda g: torch.randn(1, 20000, generator=g).relu() ** 2, QuantSpec(8, False)),
    ("per-tensor 1-D negative", lambda g: -(torch.rand(1, 5000, generator=g) ** 3), QuantSpec(4, False)),
    ("per-tensor 1-D symmetric", lambda g: torch.randn(1, 8000, generator=g), QuantSpec(3, True)),
    ("per-tensor 2-D 4b", lambda g: torch.randn(1, 8000, generator=g) + 0.7, QuantSpec(4, False)),
    ("per-tensor 2-D 8b", lambda g: torch.randn(1, 1500, generator=g) * 2 - 0.5, QuantSpec(8, False)),
    ("per-channel 2-D 4b", lambda g: torch.randn(12, 300, generator=g) * torch.rand(12, 1, generator=g), None),
    ("per-channel 2-D 3b laplace", lambda g: torch.empty(8, 400).exponential_(generator=g) - 0.6, None),
    ("per-channel 2-D 2b", lambda g: torch.randn(8, 200, generator=g) + 0.3, None),
    ("per-channel 1-D symmetric", lambda g: torch.randn(8, 200, generator=g), None),
    ("per-group 2-D 4b", lambda g: torch.randn(16, 32, generator=g), None),
]
_PC_SPECS = {
    "per-channel 2-D 4b": QuantSpec(4, False, PerChannel(0)),
    "per-channel 2-D 3b laplace": QuantSpec(3, False, PerChannel(0)),
    "per-channel 2-D 2b": QuantSpec(2, False, PerChannel(0)),
    "per-channel 1-D symmetric": QuantSpec(4, True, PerChannel(0)),
    "per-group 2-D 4b": QuantSpec(4, False, PerGroup(32)),
}


@pytest.mark.parametrize("name,make,spec", MSE_EXACT_CASES, ids=[c[0] for c in MSE_EXACT_CASES])
def test_mse_exact_matches_brute_force(name: str, make: object, spec: QuantSpec | None) -> None:
    spec = spec or _PC_SPECS[name]
    rows = make(_gen(10))  # type: ignore[operator]
    best_min, best_max, best = brute_force_mse(rows, spec)
    observer = _exact_mse(spec)
    for part in rows.chunk(2, dim=1):
        observer.observe(part)
    got = _check_against(observer, rows, spec, best, rtol=1e-6)
    # evaluated exactly, the chosen candidate is the official one wherever the optimum is unambiguous
    got_min, got_max = observer.search_range()
    same = (got_min == best_min) & (got_max == best_max)
    tie = (got - best).abs() <= 1e-6 * best
    assert bool((same | tie).all())
    assert float(same.float().mean()) >= 0.75


def test_mse_2d_8bit_per_channel_exact_vs_brute_force() -> None:
    spec = QuantSpec(8, False, PerChannel(0))
    g = _gen(11)
    rows = torch.randn(24, 256, generator=g) * torch.rand(24, 1, generator=g) + 0.2 * torch.randn(24, 1, generator=g)
    rows[3] = rows[3].abs()  # one-sided row inside two-sided data
    _, _, best = brute_force_mse(rows, spec)
    observer = obs.MSEObserver(spec)  # auto: exact for small rows
    observer.observe(rows)
    _check_against(observer, rows, spec, best, rtol=1e-6)


def test_mse_search_options_and_candidate_sets() -> None:
    g = _gen(12)
    rows = torch.randn(4, 500, generator=g) + 0.4
    spec = QuantSpec(4, False, PerChannel(0))
    for search in ("range", "range_zero_point"):
        observer = _exact_mse(spec, search=search, num_candidates=37, p=2.0)
        observer.observe(rows)
        lo, hi = observer.search_range()
        # the chosen candidate is a member of the official candidate set
        if search == "range":
            xrange = torch.maximum(rows.min(1).values.abs(), rows.max(1).values)
            i = torch.round(hi / (xrange / 37))
            assert_close(hi, xrange / 37 * i)
            assert_close(lo, -hi)
        else:
            assert bool((lo <= 0).all() & (hi >= 0).all())


HIST_CASES = [
    ("relu 8b 1-D", lambda g: torch.randn(1, 400_000, generator=g).relu(), QuantSpec(8, False), "range"),
    ("relu^2 4b 1-D", lambda g: torch.randn(1, 400_000, generator=g).relu() ** 2, QuantSpec(4, False), "range"),
    ("gauss sym 8b", lambda g: torch.randn(1, 400_000, generator=g), QuantSpec(8, True), "range"),
    ("gauss 4b 2-D", lambda g: torch.randn(1, 100_000, generator=g) + 0.3, QuantSpec(4, False), "2d"),
    ("laplace 2b 2-D", lambda g: torch.empty(1, 100_000).exponential_(generator=g) - 0.8, QuantSpec(2, False), "2d"),
    ("gauss 8b 2-D", lambda g: torch.randn(1, 10_000, generator=g), QuantSpec(8, False), "2d"),
]


@pytest.mark.parametrize("name,make,spec,kind", HIST_CASES, ids=[c[0] for c in HIST_CASES])
def test_mse_histogram_close_to_brute_force(name: str, make: object, spec: QuantSpec, kind: str) -> None:
    rows = make(_gen(13))  # type: ignore[operator]
    _, _, best = brute_force_mse(rows, spec)
    observer = obs.MSEObserver(spec, obs.MSEObserver.Config(method="histogram"))
    for part in rows.chunk(3, dim=1):
        observer.observe(part)
    assert observer._hist is not None
    _check_against(observer, rows, spec, best, rtol=5e-3)


def test_mse_auto_switches_to_histogram_and_merges_exactly() -> None:
    g = _gen(14)
    parts = [torch.randn(1, 30_000, generator=g).relu() * s for s in (0.5, 1.0, 3.0, 2.0)]
    spec = QuantSpec(4, False)
    config = obs.MSEObserver.Config(exact_max_elements=50_000, histogram_bins=1024)
    streamed = obs.MSEObserver(spec, config)
    for part in parts:
        streamed.observe(part)
    assert streamed._hist is not None  # switched after the second batch, range grew twice
    at_once = obs.MSEObserver(spec, config)
    at_once.observe(torch.cat(parts, dim=1))
    assert torch.equal(streamed._hist.counts, at_once._hist.counts)  # type: ignore[union-attr]
    assert torch.equal(streamed.compute()[0], at_once.compute()[0])


def test_mse_histogram_edge_cases() -> None:
    g = _gen(19)
    spec = QuantSpec(8, False, PerChannel(0))
    config = obs.MSEObserver.Config(method="histogram", histogram_bins=256)
    rows = torch.stack(
        [
            1000.0 + 0.01 * torch.randn(5000, generator=g),  # tiny spread far from 0
            torch.zeros(5000),  # all zeros
            torch.randn(5000, generator=g).relu(),  # point mass at 0
            -3.0 * torch.rand(5000, generator=g),  # one-sided negative
        ]
    )
    observer = obs.MSEObserver(spec, config)
    observer.observe(rows[:, :2500])
    observer.observe(rows[:, 2500:] * 2)
    scale, zp = observer.compute()
    assert bool(torch.isfinite(scale).all() & (scale > 0).all())
    assert bool(((zp >= 0) & (zp <= 255)).all())
    assert observer._hist is not None and float(observer._hist.counts.sum()) == 4 * 5000


# --------------------------------------------------------------------------- ACIQ
def _golden(f: object, a: float, b: float) -> float:
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    while b - a > 1e-9:
        if f(c) < f(d):  # type: ignore[operator]
            b, d = d, c
            c = b - ratio * (b - a)
        else:
            a, c = c, d
            d = a + ratio * (b - a)
    return (a + b) / 2


@pytest.mark.parametrize("bits", range(2, 10))
def test_aciq_constants_minimize_the_closed_form(bits: int) -> None:
    def rounding(alpha: float) -> float:
        return alpha**2 / (3 * 4**bits)

    def laplace(alpha: float) -> float:  # b = 1: 2 b^2 exp(-alpha / b)
        return 2 * math.exp(-alpha) + rounding(alpha)

    def gaussian(alpha: float) -> float:  # sigma = 1
        clip = (alpha**2 + 1) * math.erfc(alpha / math.sqrt(2)) - math.sqrt(2 / math.pi) * alpha * math.exp(
            -(alpha**2) / 2
        )
        return clip + rounding(alpha)

    assert abs(obs.ACIQ_LAPLACE[bits] - _golden(laplace, 0.1, 30.0)) < 0.01
    assert abs(obs.ACIQ_GAUSSIAN[bits] - _golden(gaussian, 0.1, 30.0)) < 0.01


@pytest.mark.parametrize("distribution", ["laplace", "gaussian"])
@pytest.mark.parametrize("bits", [4, 8])
def test_aciq_ranges(distribution: str, bits: int) -> None:
    g = _gen(15)
    x = torch.empty(2, 60_000).exponential_(generator=g) * torch.where(torch.rand(2, 60_000, generator=g) < 0.5, -1, 1)
    x = x * torch.tensor([[1.0], [0.3]]) + torch.tensor([[0.2], [-0.1]])
    spec = QuantSpec(bits, False, PerChannel(0))
    observer = obs.ACIQObserver(spec, obs.ACIQObserver.Config(distribution=distribution))
    for part in x.chunk(4, dim=1):
        observer.observe(part)
    x64 = x.double()
    mean = x64.mean(1)
    if distribution == "laplace":
        alpha = obs.ACIQ_LAPLACE[bits] * (x64 - mean[:, None]).abs().mean(1)
    else:
        alpha = obs.ACIQ_GAUSSIAN[bits] * x64.std(1, unbiased=False)
    low = torch.maximum(mean - alpha, x64.min(1).values).float()
    high = torch.minimum(mean + alpha, x64.max(1).values).float()
    scale, zp = observer.compute()
    ref_scale, ref_zp = qparams_from_range(low, high, spec)
    assert_close(scale, ref_scale, rtol=1e-4, atol=0)
    assert torch.allclose(zp, ref_zp, atol=1.0)


def test_aciq_one_sided() -> None:
    g = _gen(16)
    relu = torch.empty(1, 50_000).exponential_(generator=g) * torch.where(
        torch.rand(1, 50_000, generator=g) < 0.5, 0, 1
    )
    spec = QuantSpec(4, False)
    observer = obs.ACIQObserver(spec)
    observer.observe(relu)
    b = relu[relu > 0].double().mean()  # exponential (half-Laplace) fit of the non-zero values
    alpha = float(obs.ACIQ_LAPLACE[5] * b)  # 2^4 levels over [0, alpha]: the step of a 5-bit symmetric grid
    _qparams_equal(observer.compute(), torch.tensor([0.0]), torch.tensor([alpha]).float(), spec)
    negative = obs.ACIQObserver(spec, obs.ACIQObserver.Config(distribution="gaussian"))
    negative.observe(-relu)
    sigma = float(relu[relu > 0].double().pow(2).mean().sqrt())
    _qparams_equal(negative.compute(), torch.tensor([-obs.ACIQ_GAUSSIAN[5] * sigma]).float(), torch.tensor([0.0]), spec)


# --------------------------------------------------------------------------- KL
def tensorrt_reference(hist: np.ndarray, levels: int) -> int:
    """The pseudo-code of Migacz's slides, literally: a loop over thresholds and over bins."""
    divergences = []
    for i in range(levels, len(hist) + 1):
        reference = hist[:i].astype(np.float64).copy()
        reference[i - 1] += hist[i:].sum()
        space = np.linspace(0, i, levels + 1)
        group = np.digitize(np.arange(i), space) - 1
        merged = np.zeros(levels)
        nonzero = np.zeros(levels)
        for k in range(i):
            merged[group[k]] += hist[k]
            nonzero[group[k]] += hist[k] != 0
        candidate = np.zeros(i)
        for k in range(i):
            if hist[k] != 0:
                candidate[k] = merged[group[k]] / nonzero[group[k]]
        p = reference / reference.sum()
        q = candidate / candidate.sum() if candidate.sum() > 0 else candidate
        if np.any((p > 0) & (q == 0)):
            divergences.append(np.inf)
            continue
        mask = p > 0
        divergences.append(float(np.sum(p[mask] * np.log(p[mask] / q[mask]))))
    return levels + int(np.argmin(divergences))


KL_CASES = [
    ("gaussian sym 8b", lambda g: torch.randn(1, 50_000, generator=g), QuantSpec(8, True), 512),
    ("laplace asym 8b", lambda g: torch.empty(1, 50_000).exponential_(generator=g) - 1.0, QuantSpec(8, False), 1024),
    ("relu asym 8b", lambda g: torch.randn(1, 50_000, generator=g).relu(), QuantSpec(8, False), 1024),
    (
        "student-t sym 6b",
        lambda g: torch.randn(1, 30_000, generator=g) / torch.rand(1, 30_000, generator=g),
        QuantSpec(6, True),
        512,
    ),
]


@pytest.mark.parametrize("name,make,spec,bins", KL_CASES, ids=[c[0] for c in KL_CASES])
def test_kl_matches_tensorrt_loop(name: str, make: object, spec: QuantSpec, bins: int) -> None:
    x = make(_gen(17))  # type: ignore[operator]
    one_sided = bool(x.min() >= 0) and not spec.symmetric
    levels = 2**spec.bits if one_sided else 2 ** (spec.bits - 1)
    top = float(x.abs().max())
    hist, _ = np.histogram(x.abs().double().numpy(), bins=bins, range=(0.0, top))
    hist[0] -= int((x == 0).sum())  # the observer leaves the exact zeros out (the ReLU case has half its values there)
    expected = tensorrt_reference(hist, levels)
    assert int(obs.kl_best_bins(torch.from_numpy(hist)[None], levels)[0]) == expected
    observer = obs.KLObserver(spec, obs.KLObserver.Config(num_bins=bins))
    observer.observe(x)
    t = expected * top / bins
    low = torch.tensor([0.0 if one_sided else -t])
    _qparams_equal(observer.compute(), low.float(), torch.tensor([t]).float(), spec)


@pytest.mark.parametrize("symmetric", [False, True])
def test_kl_clips_relu_outputs_near_the_mse_optimum(symmetric: bool) -> None:
    """Half of a ReLU's outputs are exactly 0: kept in bin 0 they pulled the KL threshold down to 1.75 (8 bits,
    ReLU of a standard normal) and the quantization error to about 700 times the MSE observer's."""
    x = torch.randn(1, 200_000, generator=_gen(19)).relu()
    spec = QuantSpec(8, symmetric)
    errors = {}
    for cls in (obs.KLObserver, obs.MSEObserver):
        observer = cls(spec)
        observer.observe(x)
        scale, zp = observer.compute()
        errors[cls.name] = float((fake_quant(x, scale[:, None], zp[:, None], spec.qmin, spec.qmax) - x).pow(2).mean())
        if cls is obs.KLObserver:
            top = float(scale[0]) * (spec.qmax - spec.qmin) / (2 if symmetric else 1)
            assert 3.9 < top < 4.6, top  # the MSE observer picks 4.52; the zero spike gave 1.75
    assert errors["kl"] < 3 * errors["mse"], errors


def test_kl_multi_batch_extends_bins_exactly() -> None:
    g = _gen(18)
    x = torch.randn(1, 40_000, generator=g)
    spec = QuantSpec(8, True)
    bins = 512
    many = obs.KLObserver(spec, obs.KLObserver.Config(num_bins=bins))
    parts = sorted(x.chunk(4, dim=1), key=lambda t: float(t.abs().max()))  # max grows batch after batch
    for part in parts:
        many.observe(part)
    # reference: the first batch's histogram over [0, its max], then bins of the same width appended for the rest
    first = parts[0].abs().double().numpy()
    width = float(first.max()) / bins
    total_bins = math.ceil(float(x.abs().max()) / width)
    hist = np.zeros(total_bins)
    hist[:bins] = np.histogram(first, bins=bins, range=(0.0, bins * width))[0]
    rest = torch.cat(parts[1:], dim=1).abs().double().numpy()
    hist += np.histogram(rest, bins=total_bins, range=(0.0, total_bins * width))[0]
    assert many._hist is not None and many._hist.shape[1] == total_bins
    np.testing.assert_array_equal(many._hist[0].numpy(), hist)
    t = tensorrt_reference(hist, 128) * width
    _qparams_equal(many.compute(), torch.tensor([-t]).float(), torch.tensor([t]).float(), spec)
    # a first batch with a tiny range: bins are appended, then merged in pairs to stay under 8 * num_bins
    tiny = obs.KLObserver(spec, obs.KLObserver.Config(num_bins=bins))
    tiny.observe(x[:, :1000] * 0.01)
    tiny.observe(x)
    assert tiny._hist is not None and bins <= tiny._hist.shape[1] <= 8 * bins
    assert float(tiny._hist.sum()) == 41_000
    assert bool(torch.isfinite(tiny.compute()[0]).all())
