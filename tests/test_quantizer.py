"""Quantizer maths against hand-computed values, for every granularity and both symmetries."""

from __future__ import annotations

import pytest
import torch

from quantplug.config import PerChannel, PerGroup, PerTensor, QuantSpec
from quantplug.errors import ConfigError
from quantplug.quantizer import (
    AffineQuantizer,
    fake_quant,
    fake_quant_rows,
    fake_quant_select,
    from_rows,
    grad_scale,
    qparams_from_range,
    round_ste,
    to_rows,
)


def test_grid_limits() -> None:
    assert (QuantSpec(4, False).qmin, QuantSpec(4, False).qmax) == (0, 15)
    assert (QuantSpec(4, True).qmin, QuantSpec(4, True).qmax) == (-8, 7)
    assert (QuantSpec(2, True).qmin, QuantSpec(2, True).qmax) == (-2, 1)
    assert (QuantSpec(8, False).qmin, QuantSpec(8, False).qmax) == (0, 255)


@pytest.mark.parametrize("bits", [1, 9, 0, 16])
def test_bad_bit_width_is_a_clear_error(bits: int) -> None:
    with pytest.raises(ConfigError, match="2 to 8"):
        QuantSpec(bits)


def test_asymmetric_per_tensor_hand_computed() -> None:
    spec = QuantSpec(2, False, PerTensor())  # grid 0..3
    scale, zp = qparams_from_range(torch.tensor([-1.0]), torch.tensor([2.0]), spec)
    assert scale.item() == pytest.approx(1.0)  # (2 - (-1)) / 3
    assert zp.item() == 1.0  # 0 - round(-1 / 1)
    x = torch.tensor([-1.4, -0.6, 0.2, 0.6, 1.49, 2.7])
    # codes: clamp(round(x) + 1, 0, 3) -> [0, 0, 1, 2, 2, 3] ; values (code - 1) * 1
    expected = torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0, 2.0])
    assert torch.equal(fake_quant_rows(x, scale, zp, spec), expected)


def test_symmetric_per_tensor_hand_computed() -> None:
    spec = QuantSpec(3, True, PerTensor())  # grid -4..3, scale = amax / 3.5
    scale, zp = qparams_from_range(torch.tensor([-0.5]), torch.tensor([3.5]), spec)
    assert scale.item() == pytest.approx(1.0) and zp.item() == 0.0
    x = torch.tensor([-5.0, -1.6, 0.4, 2.6, 3.9])
    assert torch.equal(fake_quant_rows(x, scale, zp, spec), torch.tensor([-4.0, -2.0, 0.0, 3.0, 3.0]))


def test_range_is_extended_to_include_zero() -> None:
    scale, zp = qparams_from_range(torch.tensor([1.0]), torch.tensor([4.0]), QuantSpec(2, False))
    assert scale.item() == pytest.approx(4.0 / 3) and zp.item() == 0.0


def test_per_channel_hand_computed() -> None:
    spec = QuantSpec(2, False, PerChannel(0))
    w = torch.tensor([[0.0, 1.0, 3.0], [-2.0, 0.0, 1.0]])
    rows = to_rows(w, spec)
    scale, zp = qparams_from_range(rows.min(1).values, rows.max(1).values, spec)
    assert scale.tolist() == pytest.approx([1.0, 1.0]) and zp.tolist() == [0.0, 2.0]
    out = fake_quant_rows(w, scale, zp, spec)
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 3.0], [-2.0, 0.0, 1.0]]))
    w2 = torch.tensor([[0.4, 1.6, 9.0], [-3.0, 0.49, 5.0]])
    assert torch.equal(fake_quant_rows(w2, scale, zp, spec), torch.tensor([[0.0, 2.0, 3.0], [-2.0, 0.0, 1.0]]))


def test_per_channel_other_axis_round_trips() -> None:
    spec = QuantSpec(8, False, PerChannel(1))
    x = torch.randn(2, 3, 4)
    rows = to_rows(x, spec)
    assert rows.shape == (3, 8)
    assert torch.equal(rows[1], x[:, 1].reshape(-1))
    assert torch.equal(from_rows(rows, x.shape, spec), x)


def test_per_group_hand_computed() -> None:
    spec = QuantSpec(2, True, PerGroup(2))  # grid -2..1 ; scale = amax / 1.5
    w = torch.tensor([[1.5, -3.0, 0.3, 0.15]])
    rows = to_rows(w, spec)
    assert rows.shape == (2, 2)
    scale, zp = qparams_from_range(rows.min(1).values, rows.max(1).values, spec)
    assert scale.tolist() == pytest.approx([2.0, 0.2])
    out = fake_quant_rows(w, scale, zp, spec)
    # group 0: 1.5/2=0.75->1 -> 2.0 ; -3/2=-1.5 -> round half to even -2 -> -4.0
    # group 1: 0.3/0.2=1.5 -> 2 -> clamp 1 -> 0.2 ; 0.15/0.2=0.75 -> 1 -> 0.2
    assert torch.allclose(out, torch.tensor([[2.0, -4.0, 0.2, 0.2]]))


def test_per_group_requires_divisible_size() -> None:
    with pytest.raises(ConfigError, match="multiple"):
        to_rows(torch.randn(4, 10), QuantSpec(4, False, PerGroup(4)))


def test_round_ste_passes_gradient() -> None:
    x = torch.tensor([0.3, 1.7], requires_grad=True)
    round_ste(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]


def test_fake_quant_gradient_zero_outside_grid_and_to_scale() -> None:
    x = torch.tensor([1.4, 10.0], requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    out = fake_quant(x, scale, torch.tensor(0.0), 0, 3)
    out.sum().backward()
    assert x.grad.tolist() == [1.0, 0.0]  # clipped element gets no gradient
    # d/ds [s * (round(x/s))] with STE = round(x/s) - x/s for the inside element, qmax for the clipped one
    assert scale.grad.item() == pytest.approx((1.0 - 1.4) + 3.0)


def test_affine_quantizer_learnable_step_and_freeze() -> None:
    q = AffineQuantizer(QuantSpec(4, False))
    x = torch.linspace(0, 1, 50)
    assert torch.equal(q(x), x)  # passes through until calibrated
    q.set_qparams(torch.tensor([1 / 15]), torch.tensor([0.0]))
    param = q.make_step_learnable()
    out = q(x)
    (out - 2 * x).square().sum().backward()
    assert param.grad is not None and param.grad.abs().item() > 0
    q.freeze_step()
    assert not isinstance(q.scale, torch.nn.Parameter)
    state = q.state_dict()
    q2 = AffineQuantizer(QuantSpec(4, False))
    q2.load_state_dict(state)
    assert torch.equal(q2(x), q(x))


def test_quantizer_rejects_bad_scale() -> None:
    q = AffineQuantizer(QuantSpec(4, False))
    with pytest.raises(ValueError):
        q.set_qparams(torch.tensor([float("nan")]), torch.tensor([0.0]))


def _composed(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, select: torch.Tensor | None,
              keep: torch.Tensor | None, factor: float) -> torch.Tensor:
    s = grad_scale(scale, factor)
    xq = fake_quant(x, s, zp, 0, 15)
    if select is None:
        return xq
    return torch.where(select, xq, x if keep is None else keep)


@pytest.mark.parametrize("mode", ["all", "drop-to-x", "drop-to-keep"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_fake_quant_select_matches_the_composed_expression(mode: str, per_channel: bool) -> None:
    """The fused node gives the values and the gradients (x, step, keep) of where(select, fake_quant(x), keep)."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=gen) * 2
    keep0 = torch.randn(4, 3, 5, 5, generator=gen)
    shape = (1, 3, 1, 1) if per_channel else ()
    scale0 = torch.full(shape, 0.3) if per_channel else torch.tensor(0.3)
    if per_channel:
        scale0 = scale0 * torch.tensor([1.0, 0.5, 2.0]).reshape(shape)
    zp = torch.full(shape, 7.0)
    select = None if mode == "all" else torch.rand(x0.shape, generator=gen) < 0.5
    results = []
    for fn in ("fused", "composed"):
        x = x0.clone().requires_grad_(True)
        scale = scale0.clone().requires_grad_(True)
        keep = keep0.clone().requires_grad_(True) if mode == "drop-to-keep" else None
        if fn == "fused":
            out = fake_quant_select(x, scale, zp, 0, 15, select, keep, 0.25)
        else:
            out = _composed(x, scale, zp, select, keep, 0.25)
        weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        (out * weights).sum().backward()
        results.append((out.detach(), x.grad, scale.grad, None if keep is None else keep.grad))
    (o1, gx1, gs1, gk1), (o2, gx2, gs2, gk2) = results
    assert torch.equal(o1, o2)
    assert torch.allclose(gx1, gx2) and torch.allclose(gs1, gs2, atol=1e-5)
    assert gs1.shape == scale0.shape and float(gs1.abs().sum()) > 0
    if mode == "drop-to-keep":
        assert torch.allclose(gk1, gk2) and torch.equal(gk1 == 0, select)


def test_affine_quantizer_selector_quantizes_only_selected_elements() -> None:
    q = AffineQuantizer(QuantSpec(4, False, PerTensor()))
    q.set_qparams(torch.tensor([0.1]), torch.tensor([3.0]))
    x = torch.linspace(-1, 1, 100)
    select = torch.arange(100) % 2 == 0
    q.selector = lambda t: (select, None)
    out = q(x)
    q.selector = None
    full = q(x)
    assert torch.equal(out[select], full[select]) and torch.equal(out[~select], x[~select])
    assert not torch.equal(full, x)


@pytest.mark.parametrize("fused", [False, True])
def test_edge_codes_keep_their_gradient_like_torch_learnable_fake_quant(fused: bool) -> None:
    """A value rounded to the grid's first or last code is not clipped: it gets the straight-through gradient and
    the LSQ step gradient ``round(v) - v``, as in torch's own learnable fake quantization and in the released code
    of BRECQ / QDrop / FlexRound (which ran on torch's former clamp subgradient). Current ``torch.clamp`` passes
    nothing at its bounds: a third of a 2-bit grid's weights would never train."""
    from quantplug.quantizer import fake_quant, fake_quant_select

    x0 = torch.tensor([-0.7, -0.2, 0.0, 0.1, 0.3, 1.4, 2.6, 2.9, 3.2, 3.6])
    x0 = torch.cat([x0, torch.randn(200, generator=torch.Generator().manual_seed(0)) * 2 + 1.5])
    grads = []
    for ours in (True, False):
        x = x0.clone().requires_grad_(True)
        s = torch.tensor([1.0], requires_grad=True)
        z = torch.tensor([0.0])
        if ours:
            out = (fake_quant_select if fused else fake_quant)(x, s, z, 0, 3)
        else:
            out = torch._fake_quantize_learnable_per_tensor_affine(x, s, z, 0, 3, 1.0)
        out.backward(torch.linspace(0.5, 1.5, x.numel()))
        grads.append((x.grad, s.grad))
    (ours_x, ours_s), (ref_x, ref_s) = grads
    assert torch.equal(ours_x, ref_x)
    assert torch.allclose(ours_s, ref_s, atol=1e-4)
    assert (ours_x[:10] != 0).tolist() == [False] + [True] * 8 + [False]  # only -0.7 and 3.6 are clipped
