"""The ``packed`` backend: weight-only int8 / int4 layers that store their weights packed.

``mode: weight_only`` on the fake backend simulates: the model keeps float weights. Here each
``nn.Linear`` (and transformers' ``Conv1D``) becomes a :class:`PackedLinear` that holds its
integer weights as they are stored in memory and on disk -- one byte per weight at 5-8 bits,
two per byte at 2-4 bits -- with one scale (and zero point) per output channel or per group
of input features, and computes with float activations:

* ``int8pack``: 8-bit signed symmetric per-channel weights through ``torch._weight_int8pack_mm``;
* ``int4pack``: 4-bit per-group weights (group size 32, 64, 128 or 256) through
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (its CPU-specific layout is built from the
  stored nibbles when the layer first runs, and never saved);
* ``dequant``: anything else (other bit widths, per-group int8): the weight is dequantized
  for each call, then ``F.linear``.

``PackedLinear.kernel`` names torch's kernel a layer can use; on its first calls with few
rows (decoding) and with many (prefill) the layer times it against dequantize-then-matmul and
keeps the faster (``PackedLinear.chosen``, shown in its ``repr``): on some CPUs torch's
weight-only kernels are many times slower than float.
A layer also takes an ``input_scale`` (weight methods such as AWQ scale input channels).

    >>> import torch, qswap
    >>> q = qswap.quantize(torch.nn.Linear(256, 16), "w4_packed")
    >>> q.kernel, q.qweight.dtype, tuple(q.qweight.shape)
    ('int4pack', torch.uint8, (16, 128))
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qswap.backends import fake
from qswap.exceptions import PlanError
from qswap.quantizers import QParams
from qswap.rounding import expand_qparams
from qswap.tree import replace_module

__all__ = [
    "PackedEmbedding",
    "PackedLinear",
    "check_layer",
    "lower",
    "pack_nibbles",
    "unpack_nibbles",
]

_INT4_GROUPS = (32, 64, 128, 256)
_FEW_ROWS = 8  # inputs of at most this many rows (decoding) time the kernels on their own
_TIMED_RUNS = 3


def pack_nibbles(codes: Tensor) -> Tensor:
    """Two 4-bit codes (0..15) per byte along the last axis: the even one in the low nibble.

    >>> pack_nibbles(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)).tolist()
    [[33, 15]]
    """
    if codes.shape[-1] % 2:
        raise PlanError(f"packing 4-bit codes needs an even row length, got {codes.shape[-1]}")
    u = codes.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """The codes :func:`pack_nibbles` packed (uint8, twice as long on the last axis).

    >>> unpack_nibbles(torch.tensor([[33, 15]], dtype=torch.uint8)).tolist()
    [[1, 2, 15, 0]]
    """
    if torch.onnx.is_in_onnx_export():  # ONNX has no bitwise AND on integers: same by division
        hi = torch.div(packed, 16, rounding_mode="floor")
        lo = packed - hi * 16
    else:
        lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _per_group(qp: QParams, in_features: int) -> tuple[Tensor, Tensor, int]:
    """Scales and zero points as ``(out, groups)`` and the group size (per channel: one group)."""
    scale, zero = qp.scale.to(torch.float32), qp.zero_point.to(torch.int32)
    if scale.dim() == 2:
        assert qp.group_size is not None
        return scale, zero, qp.group_size
    if scale.dim() == 1 and scale.numel() > 1:
        return scale[:, None], zero[:, None], in_features
    return scale.reshape(1, 1), zero.reshape(1, 1), in_features


class _Packed(nn.Module):
    """Packed integer weights ``(rows, in_features)`` with per-row or per-group scales.

    Buffers (all saved): ``qweight`` -- the codes ``q - quant_min`` as uint8, two per byte at
    up to 4 bits (``(rows, in / 2)``), one per byte above (``(rows, in)``; int8 as they are
    for signed 8-bit); ``scales`` (float32) and ``zero_points`` (the smallest integer type
    that holds them: int8 on signed grids) ``(rows, groups)``. ``weight`` reads the
    dequantized float weight, as code written for the float layer expects.
    """

    qweight: Tensor
    scales: Tensor
    zero_points: Tensor

    def __init__(
        self,
        codes: Tensor,
        scales: Tensor,
        zero_points: Tensor,
        quant_range: tuple[int, int],
        group_size: int,
    ) -> None:
        super().__init__()
        rows, in_features = codes.shape
        qmin, qmax = quant_range
        self.rows, self.in_features = int(rows), int(in_features)
        self.quant_min, self.quant_max, self.group_size = qmin, qmax, int(group_size)
        self.bits = max(1, (qmax - qmin).bit_length())
        if self.bits <= 4:
            stored = pack_nibbles(codes - qmin)
        elif (qmin, qmax) == (-128, 127):
            stored = codes.to(torch.int8)
        else:
            stored = (codes - qmin).to(torch.uint8)
        self.register_buffer("qweight", stored.contiguous())
        self.register_buffer("scales", scales.to(torch.float32).contiguous())
        # the smallest integer type that holds the zero points (int8 for any signed grid)
        lo, hi = (int(zero_points.min()), int(zero_points.max())) if zero_points.numel() else (0, 0)
        zdtype = next(
            t
            for t in (torch.int8, torch.int16, torch.int32)
            if torch.iinfo(t).min <= lo and hi <= torch.iinfo(t).max
        )
        self.register_buffer("zero_points", zero_points.to(zdtype).contiguous())

    @staticmethod
    def _codes(module: nn.Module, spec: Any, rows_axis: int) -> tuple[Tensor, QParams, Tensor]:
        """``module``'s float weight as ``(rows, in)`` and its codes on the calibrated grid."""
        qp: QParams = spec.qparams["weight"]
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise PlanError(
                f"layer {spec.name!r}: backend 'packed' runs 2-D weights (Linear, Conv1D, "
                f"Embedding), got {type(module).__name__}"
            )
        w = weight.detach().to(torch.float32)
        if (qp.axis or 0) != rows_axis:
            w = w.t()
        full_scale, full_zero = expand_qparams(qp, (w.shape[0], w.shape[1]))
        # as torch's fake-quantize kernels round (times the inverse scale): the same codes
        codes = torch.round(w * (1.0 / full_scale)) + full_zero
        return w, qp, codes.clamp(qp.quant_min, qp.quant_max).to(torch.int32)

    def _dequantize(self, stored: Tensor, scales: Tensor, zero_points: Tensor) -> Tensor:
        """Rows of stored codes (and their scales, zero points) as float32 ``(n, in)``."""
        if self.bits <= 4:
            w = unpack_nibbles(stored).to(torch.float32)  # q - quant_min
            offset = zero_points.to(torch.int32) - self.quant_min
        else:
            w = stored.to(torch.float32)  # q (int8), or q - quant_min (uint8)
            offset = (
                zero_points.to(torch.int32)
                if stored.dtype == torch.int8
                else zero_points.to(torch.int32) - self.quant_min
            )
        groups = scales.shape[1]
        view = w.view(w.shape[0], groups, self.in_features // groups)
        # exact integer offsets, then one rounding: the fake-quant simulation's own values
        shift, scale = offset.to(torch.float32).unsqueeze(-1), scales.unsqueeze(-1)
        if torch.onnx.is_in_onnx_export():  # the exporter's trace loses in-place ops on views
            return ((view - shift) * scale).reshape(w.shape)
        view.sub_(shift).mul_(scale)
        return w

    @property
    def weight(self) -> Tensor:
        """The dequantized weight ``(q - zero_point) * scale``, float32 ``(rows, in)``."""
        return self._dequantize(self.qweight, self.scales, self.zero_points)

    def _describe(self) -> str:
        bits = f"int{self.bits}" if self.quant_min < 0 else f"uint{self.bits}"
        group = (
            "per_channel"
            if self.group_size >= self.in_features
            else f"group_size={self.group_size}"
        )
        return f"{bits} {group}"


class PackedLinear(_Packed):
    """A Linear with packed integer weights and float activations (the ``packed`` backend).

    Buffers (all saved): those of the packed weight (``qweight``, ``scales``,
    ``zero_points``, rows = output features) and ``input_scale`` ``(in,)`` or empty.
    """

    #: the modes in which the layer applies a weight method's ``input_scale`` (AWQ)
    input_scale_modes: ClassVar[frozenset[str]] = frozenset({"weight_only"})
    input_scale: Tensor

    def __init__(
        self,
        codes: Tensor,
        scales: Tensor,
        zero_points: Tensor,
        quant_range: tuple[int, int],
        group_size: int,
        bias: Tensor | None,
        input_scale: Tensor | None = None,
        transposed: bool = False,
    ) -> None:
        super().__init__(codes, scales, zero_points, quant_range, group_size)
        self.out_features = self.rows
        #: the float layer held its weight as ``(in, out)`` (transformers' ``Conv1D``)
        self.transposed = transposed
        empty = torch.zeros(0, dtype=torch.float32)
        self.register_buffer("input_scale", empty if input_scale is None else input_scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)
        #: torch's weight-only kernel that can run this layer, or "dequant" where none can
        self.kernel = self._pick_kernel()
        #: what runs, measured on first use: for few rows ("few") and for more ("many")
        self.chosen: dict[str, str] = {}
        self._int4: tuple[Tensor, Tensor] | None = None  # the int4 kernel's own layout, built once

    def _pick_kernel(self) -> str:
        symmetric = not bool(self.zero_points.any())
        per_channel = self.scales.shape[1] == 1 and self.scales.shape[0] == self.out_features
        if self.qweight.dtype == torch.int8 and symmetric and per_channel:
            return "int8pack"
        if (
            self.bits == 4
            and self.quant_max - self.quant_min == 15
            and self.group_size in _INT4_GROUPS
            and self.in_features % self.group_size == 0
            and self.out_features % 16 == 0  # torch's int4 layout packs rows in sixteens
            and self.scales.shape == (self.out_features, self.in_features // self.group_size)
        ):
            return "int4pack"
        return "dequant"

    @classmethod
    def from_float(cls, module: nn.Module, spec: Any) -> PackedLinear:
        """Round ``module``'s float weight onto the grid calibration chose (``spec.qparams``).

        ``spec`` is the layer's ``LayerSpec``; an ``(in, out)`` weight (transformers'
        ``Conv1D``, channel axis 1) is transposed.
        """
        w, qp, codes = cls._codes(module, spec, rows_axis=0)
        scale, zero, group = _per_group(qp, w.shape[1])
        bias = getattr(module, "bias", None)
        return cls(
            codes,
            scale,
            zero,
            (qp.quant_min, qp.quant_max),
            group,
            bias if isinstance(bias, Tensor) else None,
            getattr(spec, "input_scale", None),
            transposed=(qp.axis or 0) != 0,
        )

    def float_shape(self, slot: str) -> tuple[int, ...] | None:
        """The shape ``slot`` had on the float layer (a saved file checks the model against it)."""
        if slot != "weight":
            return None
        rows, cols = self.out_features, self.in_features
        return (cols, rows) if self.transposed else (rows, cols)

    def _int4_operands(self) -> tuple[Tensor, Tensor]:
        if self._int4 is None or self._int4[0].device != self.qweight.device:
            u = unpack_nibbles(self.qweight).to(torch.int32)  # q - quant_min, in 0..15
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
            # the kernel computes (u - 8) * s + z; we need (q - zp) * s with q = u + quant_min
            zeros = (8 + self.quant_min - self.zero_points.to(torch.int32)).to(torch.float32)
            zeros = zeros * self.scales
            sz = torch.stack([self.scales.t(), zeros.t()], dim=-1).contiguous()
            self._int4 = (packed, sz)
        return self._int4

    def _run(self, kernel: str, flat: Tensor) -> Tensor:
        if kernel == "int8pack":
            return torch._weight_int8pack_mm(flat, self.qweight, self.scales[:, 0])
        if kernel == "int4pack":
            packed, sz = self._int4_operands()
            out: Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, packed, self.group_size, sz
            )
            return out
        if self.kernel == "int8pack":  # one scale per row, no zero point: scale after the matmul
            return F.linear(flat, self.qweight.to(flat.dtype)) * self.scales[:, 0]
        return F.linear(flat, self.weight)

    def _choose(self, flat: Tensor) -> str:
        """The faster of torch's kernel and dequantize-then-matmul here, for this many rows.

        Measured once per layer for few rows (decoding, <= 8) and for more (prefill, batches):
        on some CPUs torch's weight-only kernels are much slower than dequantizing the weight
        (its bytes stay packed; a float copy lives only during the call).
        """
        if self.kernel == "dequant" or flat.device.type != "cpu":
            return self.kernel
        key = "few" if flat.shape[0] <= _FEW_ROWS else "many"
        found = self.chosen.get(key)
        if found is None:
            times = {}
            with torch.no_grad():
                for kernel in (self.kernel, "dequant"):
                    self._run(kernel, flat)  # warm up (builds the int4 layout once)
                    start = time.perf_counter()
                    for _ in range(_TIMED_RUNS):
                        self._run(kernel, flat)
                    times[kernel] = time.perf_counter() - start
            found = min(times, key=lambda k: times[k])
            self.chosen[key] = found
        return found

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.to(torch.float32)
        if self.input_scale.numel():
            flat = flat * self.input_scale
        y = self._run(self._choose(flat), flat)
        if self.bias is not None:
            y.add_(self.bias)  # y is this call's own new tensor
        y = y.view(*x.shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        saved = state_dict.get(prefix + "input_scale")
        if isinstance(saved, Tensor) and saved.shape != self.input_scale.shape:
            # a layer rebuilt from its qparams has no input scale yet (AWQ stored one)
            self.input_scale = torch.zeros_like(saved, dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._int4 = None  # new bytes: the kernel layout is built again

    def extra_repr(self) -> str:
        scaled = ", input_scale" if self.input_scale.numel() else ""
        chosen = "".join(f", {key} rows: {k}" for key, k in sorted(self.chosen.items()))
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self._describe()}, kernel={self.kernel}{chosen}{scaled}"
        )


class PackedEmbedding(_Packed):
    """An ``nn.Embedding`` with packed integer rows: a lookup dequantizes only the rows it reads.

    One scale (and zero point) per row, or per group of ``group_size`` features in a row,
    as calibration chose for the weight (``axis: 0``). A language model's ``lm_head`` tied to
    its embedding and rounded the same way shares these bytes (see :func:`lower`).
    """

    def __init__(
        self,
        codes: Tensor,
        scales: Tensor,
        zero_points: Tensor,
        quant_range: tuple[int, int],
        group_size: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(codes, scales, zero_points, quant_range, group_size)
        self.num_embeddings, self.embedding_dim = self.rows, self.in_features
        self.dtype = dtype  # the float embedding's: a bfloat16 model's rows stay bfloat16
        self.padding_idx = padding_idx
        self.max_norm, self.norm_type = max_norm, norm_type
        self._plain: bool | None = None  # codes are int8 with zero points 0: rows are q * scale

    def _plain_codes(self) -> bool:
        if self._plain is None:
            self._plain = self.qweight.dtype == torch.int8 and not bool(self.zero_points.any())
        return self._plain

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._plain = None

    @classmethod
    def from_float(cls, module: nn.Module, spec: Any) -> PackedEmbedding:
        """Round an ``nn.Embedding``'s rows onto the grid calibration chose (``spec.qparams``)."""
        if not isinstance(module, nn.Embedding):
            raise PlanError(
                f"layer {spec.name!r}: PackedEmbedding packs nn.Embedding, got "
                f"{type(module).__name__}"
            )
        qp: QParams = spec.qparams["weight"]
        if (qp.axis or 0) != 0 and qp.scale.numel() > 1:
            raise PlanError(
                f"layer {spec.name!r}: packed embeddings keep one scale per row or per group "
                f"in a row (axis: 0), not axis {qp.axis}"
            )
        w, qp, codes = cls._codes(module, spec, rows_axis=0)
        scale, zero, group = _per_group(qp, w.shape[1])
        return cls(
            codes,
            scale,
            zero,
            (qp.quant_min, qp.quant_max),
            group,
            module.padding_idx,
            module.max_norm,
            module.norm_type,
            module.weight.dtype if module.weight.is_floating_point() else torch.float32,
        )

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        if self._plain_codes() and not torch.onnx.is_in_onnx_export():
            # a decoding step reads one row: three small ops instead of the general eight
            rows = self.qweight.index_select(0, flat).to(torch.float32)
            scales = self.scales.index_select(0, flat).unsqueeze(-1)
            rows.view(flat.numel(), scales.shape[1], -1).mul_(scales)
        else:
            rows = self._dequantize(self.qweight[flat], self.scales[flat], self.zero_points[flat])
        if self.max_norm is not None:
            # what nn.Embedding's max_norm returns (torch.embedding_renorm_'s factor), applied
            # to the rows read; the packed bytes themselves are never rewritten
            norms = rows.norm(p=self.norm_type, dim=-1, keepdim=True)
            factor = (self.max_norm / (norms + 1e-7)).clamp(max=1.0)
            rows = torch.where(norms > self.max_norm, rows * factor, rows)
        rows = rows.view(*ids.shape, self.embedding_dim)
        return rows if self.dtype == torch.float32 else rows.to(self.dtype)

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        norm = "" if self.max_norm is None else f", max_norm={self.max_norm}"
        dtype = "" if self.dtype == torch.float32 else f", dtype={self.dtype}"
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._describe()}{pad}{norm}{dtype}"


def check_layer(layer: Any) -> str | None:
    """What the packed kernels cannot run of ``layer`` (None: they can)."""
    if layer.mode != "weight_only":
        return "backend 'packed' runs weight-only layers (activations stay float)"
    if layer.slots:
        return f"backend 'packed' quantizes only the weight, not {', '.join(layer.slots)}"
    w = layer.weight
    if w is None:
        return "backend 'packed' needs a weight spec"
    if w.granularity == "per_tensor":
        return "backend 'packed' stores one scale per output channel or group, not per tensor"
    return None


def lower(
    model: nn.Module,
    layers: Mapping[str, Any],
    example_args: tuple[Any, ...],
    example_kwargs: Mapping[str, Any],
) -> nn.Module:
    """The packed backend's lowering (``qswap.registry.Lowering``): each layer packed in place.

    A layer without a packed counterpart (the plan's generic fake-quant of a convolution,
    an embedding) is simulated as on the fake backend.
    """
    packed = (PackedLinear, PackedEmbedding)
    generic = {n: layer for n, layer in layers.items() if layer.counterpart not in packed}
    if generic:
        model = fake.lower(model, generic, example_args, example_kwargs)
    first: dict[int, _Packed] = {}  # by float weight: the packed layer made from it first
    for name, layer in layers.items():
        if name in generic:
            continue
        module = model.get_submodule(name)
        new = cast(_Packed, layer.counterpart.from_float(module, layer))
        weight = getattr(module, "weight", None)
        _share_tied(first.setdefault(id(weight), new), new)
        model = replace_module(model, (name, *layer.aliases), new)
    return model


def _share_tied(first: _Packed, other: _Packed) -> None:
    """Make ``other`` hold ``first``'s tensors where both packed the same weight alike.

    An ``lm_head`` tied to the embedding, rounded to nearest on the same grid, stores the
    same bytes: one copy in memory and in ``qswap.save``'s file.
    """
    names = ("qweight", "scales", "zero_points")
    if other is first or any(
        getattr(first, n).shape != getattr(other, n).shape
        or getattr(first, n).dtype != getattr(other, n).dtype
        or not torch.equal(getattr(first, n), getattr(other, n))
        for n in names
    ):
        return
    for n in names:
        setattr(other, n, getattr(first, n))
