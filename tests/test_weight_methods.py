"""GPTQ and AWQ cores: the grid they keep, the output error they save over round-to-nearest."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from qswap.weight_methods import awq_clip, awq_scales, fake_quantize, gptq, moment_root

# 4-bit symmetric, per group of 32 input channels
QMIN, QMAX, GROUP = -8, 7, 32


def _qparams(w: Tensor) -> tuple[Tensor, Tensor]:
    """Max-abs symmetric scales per (row, group of GROUP inputs), expanded to w's shape."""
    peak = w.reshape(w.shape[0], -1, GROUP).abs().amax(-1, keepdim=True)
    scale = (peak / QMAX).clamp_min(1e-8).expand(-1, -1, GROUP).reshape(w.shape)
    return scale, torch.zeros_like(scale)


def _rtn(w: Tensor) -> Tensor:
    """The caller's round-to-nearest quantizer: qparams from the weight it is given."""
    scale, zero = _qparams(w)
    return fake_quantize(w, scale, zero, QMIN, QMAX)


def _layer(seed: int, samples: int = 512) -> tuple[Tensor, Tensor]:
    """A (64, 128) weight and correlated inputs x = z @ M (a Hessian far from diagonal)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(samples, 128, generator=g) @ torch.randn(128, 128, generator=g)
    return w, x


def _hessian(x: Tensor) -> Tensor:
    return x.T.double() @ x.double()


def _output_error(x: Tensor, w: Tensor, q: Tensor) -> float:
    """||X W^T - X Q^T||^2, in float64."""
    x64 = x.double()
    return float(((x64 @ w.double().T - x64 @ q.double().T) ** 2).sum())


def _naive_gptq(w: Tensor, h: Tensor, scale: Tensor, zero: Tensor, damp: float) -> Tensor:
    """Column by column with an explicit inverse (OBQ's update, no Cholesky, no batching)."""
    w = w.double().clone()
    h = h.double() + damp * h.diagonal().double().mean() * torch.eye(h.shape[0]).double()
    hinv = torch.linalg.inv(h)
    out = torch.empty(w.shape)
    for j in range(w.shape[1]):
        q = fake_quantize(w[:, j].float(), scale[:, j], zero[:, j], QMIN, QMAX)
        out[:, j] = q
        error = (w[:, j] - q.double()) / hinv[j, j]
        w[:, j + 1 :] -= error[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return out


def test_fake_quantize_by_hand() -> None:
    """round(w / s) + zp, clamped to [qmin, qmax], back to floats; per-row qparams broadcast."""
    w = torch.tensor([[0.26, -0.9, 3.0], [0.5, 0.74, -0.1]])
    scale = torch.tensor([[0.5], [0.25]])
    zero = torch.tensor([[2], [-1]], dtype=torch.int32)
    # row 0: round(.52, -1.8, 6) = (1, -2, 6) + 2 = (3, 0, 8) -> clamp [0, 7] = (3, 0, 7)
    #        -> (1, -2, 5) * 0.5. row 1: round(2, 2.96, -.4) = (2, 3, -0) - 1 = (1, 2, -1)
    #        -> clamp = (1, 2, 0) -> (2, 3, 1) * 0.25
    expected = torch.tensor([[0.5, -1.0, 2.5], [0.5, 0.75, 0.25]])
    out = fake_quantize(w, scale, zero, 0, 7)
    assert out.dtype == w.dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # ties round half to even: 0.25 / 0.5 = 0.5 -> 0, 0.75 / 0.5 = 1.5 -> 2
    ties = fake_quantize(torch.tensor([0.25, 0.75]), torch.tensor(0.5), torch.tensor(0), -8, 7)
    assert ties.tolist() == [0.0, 1.0]


def test_gptq_on_grid_and_leaves_inputs_alone() -> None:
    w, x = _layer(0)
    h = _hessian(x)
    scale, zero = _qparams(w)
    before = [t.clone() for t in (w, h, scale, zero)]
    for act_order in (False, True):
        q = gptq(w, h, scale, zero, QMIN, QMAX, act_order=act_order)
        assert q.shape == w.shape and q.dtype == w.dtype
        assert q.data_ptr() != w.data_ptr()
        assert torch.equal(fake_quantize(q, scale, zero, QMIN, QMAX), q)
        assert not torch.equal(q, fake_quantize(w, scale, zero, QMIN, QMAX))  # not plain RTN
    for old, new in zip(before, (w, h, scale, zero), strict=True):
        assert torch.equal(old, new)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_gptq_keeps_dtype_and_grid_in_other_dtypes(dtype: torch.dtype) -> None:
    w, x = _layer(1, samples=256)
    scale, zero = _qparams(w.to(dtype))
    q = gptq(w.to(dtype), _hessian(x), scale, zero, QMIN, QMAX)
    assert q.dtype == dtype
    assert torch.equal(fake_quantize(q, scale, zero, QMIN, QMAX), q)


def test_gptq_matches_the_column_by_column_update() -> None:
    """The lazy-batch Cholesky form gives what OBQ's explicit-inverse update gives."""
    w, x = _layer(2)
    h = _hessian(x)
    scale, zero = _qparams(w)
    reference = _naive_gptq(w, h, scale, zero, damp=0.01)
    for block_size in (128, 32, 7):
        q = gptq(w, h, scale, zero, QMIN, QMAX, block_size=block_size)
        # the same grid point nearly everywhere (float rounding may flip a near-tie)
        assert (q != reference).float().mean() < 1e-3, block_size


def test_gptq_beats_rtn_on_correlated_inputs() -> None:
    """Measured for seeds 0..4: 0.48-0.49 of RTN's output error."""
    for seed in range(5):
        w, x = _layer(seed)
        scale, zero = _qparams(w)
        rtn = _output_error(x, w, fake_quantize(w, scale, zero, QMIN, QMAX))
        q = gptq(w, _hessian(x), scale, zero, QMIN, QMAX)
        assert _output_error(x, w, q) < 0.7 * rtn, seed


@pytest.mark.parametrize("seed", range(5))
def test_act_order_helps_with_a_few_loud_channels(seed: int) -> None:
    """8 of 128 inputs 10x louder: act-order quantizes them first, while every other column
    can still absorb their error. Measured for seeds 0..4: act-order 0.17-0.21 of RTN, without 0.41-0.55."""
    w, x = _layer(seed)
    g = torch.Generator().manual_seed(100 + seed)
    loud = torch.randperm(128, generator=g)[:8]
    x[:, loud] *= 10
    h = _hessian(x)
    scale, zero = _qparams(w)
    rtn = _output_error(x, w, fake_quantize(w, scale, zero, QMIN, QMAX))
    plain = _output_error(x, w, gptq(w, h, scale, zero, QMIN, QMAX))
    ordered = _output_error(x, w, gptq(w, h, scale, zero, QMIN, QMAX, act_order=True))
    assert ordered < 0.4 * rtn
    assert ordered < 0.75 * plain


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_input_column_is_rounded_to_nearest(act_order: bool) -> None:
    w, x = _layer(3)
    dead = [5, 77]
    x[:, dead] = 0
    h = _hessian(x)
    scale, zero = _qparams(w)
    q = gptq(w, h, scale, zero, QMIN, QMAX, act_order=act_order)
    rtn = fake_quantize(w, scale, zero, QMIN, QMAX)
    assert torch.isfinite(q).all()
    assert torch.equal(q[:, dead], rtn[:, dead])
    assert torch.equal(fake_quantize(q, scale, zero, QMIN, QMAX), q)
    assert _output_error(x, w, q) < 0.7 * _output_error(x, w, rtn)
    assert torch.equal(h[dead, dead], torch.zeros(2, dtype=h.dtype))  # not patched in place


def test_gptq_retries_damping_then_gives_up() -> None:
    w = torch.tensor([[0.3, -0.2], [0.1, 0.45]])
    scale, zero = torch.full_like(w, 0.1), torch.zeros_like(w)
    singular = torch.ones(2, 2, dtype=torch.float64)  # x = (1, 1) only: rank 1
    q = gptq(w, singular, scale, zero, QMIN, QMAX, damp=0.0)
    assert torch.isfinite(q).all() and torch.equal(fake_quantize(q, scale, zero, QMIN, QMAX), q)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq(w, -torch.eye(2), scale, zero, QMIN, QMAX)
    with pytest.raises(ValueError, match=r"hessian must be \(in, in\)"):
        gptq(w, torch.eye(3), scale, zero, QMIN, QMAX)


def _outlier_inputs(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(512, 128, generator=g)
    x[:, torch.randperm(128, generator=g)[:4]] *= 20
    return w, x


def test_awq_scales_protect_outlier_channels() -> None:
    """Measured for seeds 0..4: alpha 0.30-0.35, 0.22-0.33 of RTN's output error."""
    for seed in range(5):
        w, x = _outlier_inputs(seed)
        scales, alpha = awq_scales(w, x, _rtn)
        assert scales.shape == (128,) and scales.dtype == w.dtype
        assert 0 < alpha < 1
        expected = x.abs().mean(0) ** alpha
        torch.testing.assert_close(scales, expected / (expected.max() * expected.min()).sqrt())
        rtn = _output_error(x, w, _rtn(w))
        awq = _output_error(x, w, _rtn(w * scales) / scales)
        assert awq < 0.5 * rtn, seed


def test_awq_alpha_zero_is_rtn() -> None:
    w, x = _outlier_inputs(0)
    scales, alpha = awq_scales(w, x, _rtn, grid=1)  # the grid holds alpha = 0 only
    assert alpha == 0.0
    assert torch.equal(scales, torch.ones(128))
    # when every scaling hurts (a quantizer that punishes any s != 1), alpha = 0 is kept
    scales, alpha = awq_scales(w, x, lambda v: v if torch.equal(v, w) else v * 0)
    assert alpha == 0.0 and torch.equal(scales, torch.ones(128))
    # and ties keep it too: a quantizer to zeros gives every alpha the very same error
    scales, alpha = awq_scales(w, x, torch.zeros_like)
    assert alpha == 0.0 and torch.equal(scales, torch.ones(128))


def test_awq_zero_input_channel_stays_finite() -> None:
    w, x = _outlier_inputs(1)
    x[:, 3] = 0
    scales, alpha = awq_scales(w, x, _rtn)
    assert alpha > 0 and torch.isfinite(scales).all() and (scales >= 1e-4).all()


def _rtn_rows(w: Tensor) -> Tensor:
    """4-bit symmetric round to nearest, one scale per row."""
    scale = (w.abs().amax(1, keepdim=True) / QMAX).clamp_min(1e-8).expand_as(w)
    return fake_quantize(w, scale, torch.zeros_like(scale), QMIN, QMAX)


def test_awq_clip_cuts_heavy_tails_and_is_never_worse_than_rtn_per_row() -> None:
    """Heavy-tailed weights (Student's t, 2 degrees of freedom): measured for seeds 0..4,
    clipping leaves 0.925-0.948 of RTN's held-out output error, in per-row and in 32-input
    groups; on the sample itself no row is worse than RTN."""
    for seed in range(5):
        torch.manual_seed(seed)
        w = torch.distributions.StudentT(2.0).sample((64, 128))
        x, held = torch.randn(512, 128), torch.randn(512, 128)
        clipped = awq_clip(w, x, _rtn_rows, None)
        assert clipped.shape == w.shape and clipped.dtype == w.dtype
        assert (clipped.abs() <= w.abs()).all() and (clipped != w).any()
        assert _output_error(held, w, _rtn_rows(clipped)) < 0.97 * _output_error(
            held, w, _rtn_rows(w)
        )
        rows = ((x.double() @ (_rtn_rows(clipped) - w).double().T) ** 2).sum(0)
        plain = ((x.double() @ (_rtn_rows(w) - w).double().T) ** 2).sum(0)
        assert (rows <= plain).all(), seed
        grouped = awq_clip(w, x, _rtn, GROUP)
        assert _output_error(held, w, _rtn(grouped)) < _output_error(held, w, _rtn(w))


def test_awq_clip_keeps_the_range_when_cutting_cannot_help() -> None:
    w, x = _layer(0)
    # a quantizer that is exact: any clipping only adds error
    assert torch.equal(awq_clip(w, x, lambda v: v, GROUP), w)
    # max_shrink 0: the only ratio is 1
    assert torch.equal(awq_clip(w, x, _rtn, GROUP, max_shrink=0.0), w)
    with pytest.raises(ValueError, match="max_shrink"):
        awq_clip(w, x, _rtn, GROUP, max_shrink=1.0)
    with pytest.raises(ValueError, match="shapes"):
        awq_clip(w, x[:, :5], _rtn, GROUP)


def test_a_moment_root_stands_in_for_every_input_row() -> None:
    """AWQ scores scales on ``F`` with ``F.T F = X.T X / n`` instead of the rows: the same
    errors up to float rounding, so the same alpha and scales, at ``in`` rows; a
    rank-deficient matrix (fewer rows than features) included."""
    for rows in (512, 40):
        w, x = _outlier_inputs(0)
        x = x[:rows]
        root = moment_root(x.T @ x / rows)
        assert root.shape == (128, 128)
        torch.testing.assert_close(root.T @ root, x.T @ x / rows, rtol=1e-4, atol=1e-3)
        direct, alpha = awq_scales(w, x, _rtn)
        stood_in, same = awq_scales(w, root, _rtn, activation=x.abs().mean(0))
        assert alpha == same and torch.allclose(direct, stood_in, rtol=1e-5)
    with pytest.raises(ValueError, match="square"):
        moment_root(torch.zeros(2, 3))
