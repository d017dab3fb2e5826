"""Weight quantization beyond round-to-nearest: the numerical core of GPTQ and AWQ.

Both methods quantize a linear layer's weight ``W`` (``(out, in)``) to a uniform grid while
looking at what the layer computes, ``x @ W.T``, on calibration inputs, instead of at the
weight alone. These are pure tensor functions: no module, hook or config is touched here.

GPTQ (Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", 2022, arXiv:2210.17323) minimises the layer
output error ``tr((W - Q) H (W - Q)^T)`` with ``H = sum x x^T`` over the calibration
inputs. It quantizes one input column at a time (the Optimal Brain Quantization step) and
moves the rounding error of that column onto the columns not yet quantized, weighted by
the inverse Hessian, so they can compensate for it. Written with the upper Cholesky factor
``U`` of ``H^-1`` (``H^-1 = U^T U``), column ``j`` quantizes to ``q = quant(w_j)`` and the
remaining columns ``k > j`` receive ``w_k -= (w_j - q) / U[j, j] * U[j, k]``. Updates are
applied lazily, ``block_size`` columns at a time, then once to the rest of the matrix as a
single matrix product. The grid (scale and zero point) is fixed beforehand from the
original weight, so the result stays on the grid the caller picked (:func:`gptq`).

AWQ (Lin, Tang, Tang, Yang, Dang, Gan and Han, "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration", 2023, arXiv:2306.00978) observes that the input
channels with large activations matter most, and protects them by scaling: ``W @ x ==
(W * s) @ (x / s)`` for any per-input-channel ``s > 0``, so the layer can quantize
``W * s`` and fold ``1 / s`` into whatever produces ``x``. Scaling a salient channel up
shrinks its relative rounding error. ``s = mean(|x|) ** alpha`` with ``alpha`` found by a
grid search that minimises the output error on the calibration inputs (:func:`awq_scales`;
the inputs' second moments stand in for them through :func:`moment_root`).

    >>> w = torch.tensor([[0.30, -0.70], [1.00, 0.26]])
    >>> scale, zero = torch.full_like(w, 0.25), torch.zeros_like(w)
    >>> fake_quantize(w, scale, zero, -4, 3)
    tensor([[ 0.2500, -0.7500],
            [ 0.7500,  0.2500]])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["awq_scales", "fake_quantize", "gptq"]

#: how many times gptq retries a failed Cholesky factorisation, each with 10x the damping
_CHOLESKY_RETRIES = 4
#: the damping a retry starts from when the caller asked for none (fraction of mean(diag(H)))
_RETRY_DAMP_FLOOR = 1e-6
#: the smallest AWQ scale (before and after normalisation), so ``1 / s`` stays finite
_AWQ_MIN_SCALE = 1e-4


def fake_quantize(
    weight: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int
) -> Tensor:
    """``(clamp(round(weight / scale) + zero_point, qmin, qmax) - zero_point) * scale``.

    Elementwise; ``scale`` and ``zero_point`` broadcast to ``weight``'s shape (per-tensor,
    per-channel or per-group parameters expanded to ``(out, in)``). ``round`` is
    half-to-even. The result has ``weight``'s shape and dtype, and applying the function
    again with the same parameters returns it unchanged.

    >>> fake_quantize(torch.tensor([0.1, 0.5, 2.0, -3.0]), torch.tensor(0.2), torch.tensor(1), 0, 10)
    tensor([ 0.0000,  0.4000,  1.8000, -0.2000])
    """
    zp = zero_point.to(scale.dtype if scale.is_floating_point() else weight.dtype)
    with torch.no_grad():
        q = torch.clamp(torch.round(weight / scale) + zp, qmin, qmax)
        return ((q - zp) * scale).to(weight.dtype)


def _factor_inverse(hessian: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor ``U`` of ``(hessian + damping * I)^-1``, damping retried."""
    mean_diag = float(torch.diagonal(hessian).mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    fraction = damp
    tried: list[float] = []
    lower: Tensor
    upper: Tensor
    for attempt in range(_CHOLESKY_RETRIES + 1):
        if attempt:
            fraction = max(fraction, _RETRY_DAMP_FLOOR) * 10
        tried.append(fraction)
        lower, info = torch.linalg.cholesky_ex(hessian + fraction * mean_diag * eye)
        if int(info) != 0:
            continue
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if int(info) == 0 and bool(torch.isfinite(upper).all()):
            return upper
    raise ValueError(
        f"gptq: the Hessian of shape {tuple(hessian.shape)} is not positive definite even "
        f"with damping {', '.join(f'{f:g}' for f in tried)} (fractions of its mean diagonal, "
        f"{mean_diag:g}). Fix: pass the sum of x x^T over the layer's calibration inputs (a "
        "symmetric positive semi-definite matrix), use more calibration data, or raise damp"
    )


def gptq(
    weight: Tensor,
    hessian: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> Tensor:
    """Quantize ``weight`` with GPTQ on a fixed grid; returns a new tensor, grid values only.

    ``weight`` is ``(out, in)``; ``hessian`` is ``(in, in)``, the sum of ``x x^T`` over the
    layer's calibration inputs (any positive multiple of it gives the same result, up to
    rounding; float64 is fine). ``scale`` and ``zero_point`` have (or broadcast to)
    ``weight``'s shape and are *fixed*: the caller computes them from the original weight,
    and every entry of the result equals :func:`fake_quantize` of itself with them. The
    result has ``weight``'s shape and dtype. Columns are quantized in order (by decreasing
    ``diag(hessian)`` with ``act_order``), each one's rounding error spread over the
    columns after it to greedily minimise ``tr((W - Q) H (W - Q)^T)``, with the lazy-batch
    Cholesky formulation of the paper (``block_size`` columns per batch).

    ``damp`` is the fraction of ``mean(diag(H))`` added to the diagonal; should the Cholesky
    factorisation still fail, it is retried with 10x the damping a few times, then a
    ``ValueError`` is raised. Dead inputs (``H[i, i] == 0``, a feature that is always zero)
    get ``H[i, i] = 1`` and nothing off the diagonal, so their columns are rounded to
    nearest and neither give nor take error. The arguments are not modified; the factoring
    and the error updates run in float64.

    With a diagonal Hessian (uncorrelated inputs) there is nothing to compensate with, and
    GPTQ is round-to-nearest:

    >>> w = torch.tensor([[0.31, -0.52, 0.18], [0.07, 0.44, -0.61]])
    >>> s, zp = torch.full_like(w, 0.1), torch.zeros_like(w)
    >>> torch.equal(gptq(w, torch.diag(torch.tensor([1.0, 2.0, 3.0])), s, zp, -8, 7),
    ...             fake_quantize(w, s, zp, -8, 7))
    True
    """
    if weight.dim() != 2:
        raise ValueError(f"gptq: weight must be (out, in), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"gptq: hessian must be (in, in) = {(cols, cols)} for a weight of shape "
            f"{tuple(weight.shape)}, got {tuple(hessian.shape)}"
        )
    if block_size < 1:
        raise ValueError(f"gptq: block_size must be >= 1, got {block_size}")
    if not damp >= 0:
        raise ValueError(f"gptq: damp must be >= 0, got {damp}")
    try:
        scale = torch.broadcast_to(scale, weight.shape)
        zero_point = torch.broadcast_to(zero_point, weight.shape)
    except RuntimeError as e:
        raise ValueError(
            f"gptq: scale {tuple(scale.shape)} and zero_point {tuple(zero_point.shape)} must "
            f"broadcast to the weight's shape {tuple(weight.shape)}"
        ) from e

    with torch.no_grad():
        h = hessian.detach().to(device=weight.device, dtype=torch.float64, copy=True)
        if not bool(torch.isfinite(h).all()):
            raise ValueError("gptq: the hessian has non-finite entries (inf or nan)")
        dead = torch.diagonal(h) == 0
        h[dead, :] = 0
        h[:, dead] = 0
        h[dead, dead] = 1

        w = weight.detach().to(torch.float64, copy=True)
        perm: Tensor | None = None
        if act_order:
            perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
            w, h = w[:, perm], h[perm][:, perm]
            scale, zero_point = scale[:, perm], zero_point[:, perm]

        upper = _factor_inverse(h, damp)
        out = torch.empty(rows, cols, dtype=weight.dtype, device=weight.device)
        for start in range(0, cols, block_size):
            stop = min(start + block_size, cols)
            block = w[:, start:stop]  # a view: updates within the block land in w
            errors = torch.empty_like(block)
            u_block = upper[start:stop, start:stop]
            for j in range(stop - start):
                col = start + j
                q = fake_quantize(
                    block[:, j].to(weight.dtype), scale[:, col], zero_point[:, col], qmin, qmax
                )
                out[:, col] = q
                error = (block[:, j] - q.to(torch.float64)) / u_block[j, j]
                block[:, j + 1 :] -= error.unsqueeze(1) * u_block[j, j + 1 :].unsqueeze(0)
                errors[:, j] = error
            w[:, stop:] -= errors @ upper[start:stop, stop:]

        if perm is not None:
            out = out[:, torch.argsort(perm)]
    return out


def awq_scales(
    weight: Tensor,
    inputs: Tensor,
    quantize: Callable[[Tensor], Tensor],
    *,
    grid: int = 20,
    activation: Tensor | None = None,
) -> tuple[Tensor, float]:
    """AWQ's per-input-channel scales ``s``: quantize ``weight * s``, divide the input by ``s``.

    ``weight`` is ``(out, in)``, ``inputs`` ``(n, in)`` a sample of the layer's inputs, and
    ``quantize(w)`` the caller's round-to-nearest fake quantizer (it computes its own
    qparams from the ``w`` it gets). For ``alpha`` in ``0, 1/grid, ..., (grid-1)/grid``
    the candidate is ``s = mean(|x|, dim=0) ** alpha``, normalised by
    ``sqrt(s.max() * s.min())`` as in the paper and clamped to ``>= 1e-4`` (also before
    normalising, so an input channel that is always zero cannot divide by zero); its error
    is ``mean((inputs @ (quantize(weight * s) / s).T - inputs @ weight.T) ** 2)``.

    ``activation`` (``(in,)``) replaces ``mean(|x|, dim=0)`` where ``inputs`` are not the
    inputs themselves but a factor of their second moments (:func:`moment_root`): the error
    depends on the rows only through ``inputs.T @ inputs``.

    Returns the ``s`` with the least error (of ``weight``'s dtype, shape ``(in,)``) and its
    ``alpha``. ``alpha = 0`` gives ``s = ones``, plain round-to-nearest, and ties keep the
    smaller ``alpha``, so the result is never worse than round-to-nearest on ``inputs``.

    >>> w = torch.tensor([[0.5, -0.25], [1.0, 0.75]])
    >>> awq_scales(w, torch.ones(3, 2), torch.round, grid=1)
    (tensor([1., 1.]), 0.0)
    """
    if weight.dim() != 2 or inputs.dim() != 2 or inputs.shape[1] != weight.shape[1]:
        raise ValueError(
            f"awq_scales: weight must be (out, in) and inputs (n, in), got shapes "
            f"{tuple(weight.shape)} and {tuple(inputs.shape)}"
        )
    if grid < 1:
        raise ValueError(f"awq_scales: grid must be >= 1, got {grid}")

    with torch.no_grad():
        work = torch.promote_types(torch.promote_types(weight.dtype, inputs.dtype), torch.float32)
        x = inputs.detach().to(device=weight.device, dtype=work)
        reference = x @ weight.detach().to(work).T
        mean = x.abs().mean(dim=0) if activation is None else activation.to(x)
        activation = mean.clamp_min(_AWQ_MIN_SCALE)

        best_scales = torch.ones(weight.shape[1], dtype=weight.dtype, device=weight.device)
        best_alpha, best_error = 0.0, math.inf
        for step in range(grid):
            alpha = step / grid
            s = activation.pow(alpha)
            s = (s / torch.sqrt(s.max() * s.min())).clamp_min(_AWQ_MIN_SCALE)
            s = s.to(weight.dtype)
            restored = quantize(weight.detach() * s) / s
            error = float(torch.mean((x @ restored.to(work).T - reference) ** 2))
            if error < best_error:
                best_scales, best_alpha, best_error = s, alpha, error
    return best_scales, best_alpha


def awq_clip(
    weight: Tensor,
    inputs: Tensor,
    quantize: Callable[[Tensor], Tensor],
    group_size: int | None,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
) -> Tensor:
    """AWQ's clipping search: shrink each group's range where that lowers the output error.

    For ``r`` in ``1, 1 - max_shrink/grid, ..., 1 - max_shrink (grid-1)/grid`` every group of
    ``group_size`` inputs of every row (the whole row when ``group_size`` is None) is clamped
    to ``r`` times its own ``[min, max]`` and quantized by ``quantize`` (the caller's
    round-to-nearest, whose qparams follow the clamped range). Each group keeps the ``r``
    whose error on ``inputs`` restricted to its own columns,
    ``sum_n (x_n,g . (w_g - q_g)) ** 2``, is least. A row's error also has cross terms between
    its groups, so a row whose total error on ``inputs`` came out higher than unclipped keeps
    its unclipped weight: the result is never worse than round-to-nearest, row by row.

    Returns the clamped weight (``weight``'s shape and dtype); quantizing it with
    ``quantize`` gives the chosen rounding.

        >>> w = torch.tensor([[0.3, 0.3, 0.3, 4.0]])
        >>> x = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the outlier weight meets a zero input
        >>> def rtn(v):  # 4-bit symmetric, one scale for the row
        ...     scale = v.abs().amax() / 7
        ...     return (v / scale).round() * scale
        >>> awq_clip(w, x, rtn, None)  # the range shrinks until 0.3 is on the grid
        tensor([[0.3000, 0.3000, 0.3000, 2.1000]])
    """
    if weight.dim() != 2 or inputs.dim() != 2 or inputs.shape[1] != weight.shape[1]:
        raise ValueError(
            f"awq_clip: weight must be (out, in) and inputs (n, in), got shapes "
            f"{tuple(weight.shape)} and {tuple(inputs.shape)}"
        )
    if grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise ValueError(
            f"awq_clip: grid must be >= 1 and max_shrink in [0, 1), got {grid} and {max_shrink}"
        )
    features = weight.shape[1]
    size = group_size or features
    with torch.no_grad():
        work = torch.promote_types(torch.promote_types(weight.dtype, inputs.dtype), torch.float32)
        w = weight.detach().to(work)
        x = inputs.detach().to(device=weight.device, dtype=work)
        starts = range(0, features, size)
        grams = [x[:, s : s + size].T @ x[:, s : s + size] for s in starts]
        lows, highs = [], []
        for s in starts:
            block = w[:, s : s + size]
            lows.append(block.amin(dim=1, keepdim=True).clamp_max(0).expand_as(block))
            highs.append(block.amax(dim=1, keepdim=True).clamp_min(0).expand_as(block))
        low, high = torch.cat(lows, dim=1), torch.cat(highs, dim=1)

        def rounded(candidate: Tensor) -> Tensor:
            return quantize(candidate.to(weight.dtype)).to(work)

        def group_errors(quantized: Tensor) -> Tensor:
            diff = w - quantized
            return torch.stack(
                [
                    ((diff[:, s : s + size] @ gram) * diff[:, s : s + size]).sum(dim=1)
                    for s, gram in zip(starts, grams, strict=True)
                ],
                dim=1,
            )  # (out, groups)

        plain_q = rounded(w)  # the unclipped rounding, scored here and kept where it wins
        best = w.clone()
        best_error = group_errors(plain_q)
        for step in range(1, grid):
            ratio = 1.0 - max_shrink * step / grid
            candidate = torch.minimum(torch.maximum(w, low * ratio), high * ratio)
            error = group_errors(rounded(candidate))
            better = error < best_error  # ties keep the wider range
            best_error = torch.where(better, error, best_error)
            mask = better.repeat_interleave(size, dim=1)[:, :features]
            best = torch.where(mask, candidate, best)
        # keep each row unclipped where its whole-row error (cross terms included) grew
        reference = x @ w.T
        plain = ((x @ plain_q.T - reference) ** 2).sum(dim=0)
        clipped = ((x @ rounded(best).T - reference) ** 2).sum(dim=0)
        keep = (clipped <= plain).unsqueeze(1)
        return torch.where(keep, best, w).to(weight.dtype)


def moment_root(moments: Tensor) -> Tensor:
    """A square ``F`` with ``F.T @ F == moments`` for a symmetric positive semi-definite
    ``moments`` (``sum x x^T / n`` over a layer's inputs): ``F``'s rows stand in for every
    input row in an output error ``sum_n (x_n . d) ** 2 == d @ moments @ d``, at the cost of
    ``in`` rows however many the calibration had. From the eigendecomposition, negative
    rounding-error eigenvalues set to 0.

        >>> h = torch.tensor([[4.0, 2.0], [2.0, 2.0]])
        >>> f = moment_root(h)
        >>> torch.allclose(f.T @ f, h, atol=1e-5)
        True
    """
    if moments.dim() != 2 or moments.shape[0] != moments.shape[1]:
        raise ValueError(f"moment_root: a square matrix is needed, got {tuple(moments.shape)}")
    work = moments.to(torch.float64)
    values, vectors = torch.linalg.eigh((work + work.T) / 2)
    root: Tensor = values.clamp_min(0).sqrt().unsqueeze(1) * vectors.T
    return root.to(moments.dtype)
