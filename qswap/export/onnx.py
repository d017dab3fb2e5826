"""QDQ ONNX export: a quantized qswap model as ONNX that ONNX Runtime runs on integer kernels.

``export_onnx(qmodel, example_inputs, path)`` writes a QuantizeLinear/DequantizeLinear
("QDQ") graph, opset 13 or later, with per-tensor and per-channel scales:

* a **fake** model (backend ``fake``) is exported as it computes: every fake-quantizer
  becomes a Q/DQ pair with the same scale, zero point and rounding;
* an **int8** model (backends ``x86``/``qnnpack``) is exported as its integer kernels
  compute: one Q/DQ pair per integer tensor, the skip connections that run as quantized
  ``add``/``add_relu``/``cat`` as Q/DQ around ``Add``/``Concat``.

A **packed** model (backend ``packed``: weight-only int4/int8, RTN, GPTQ or AWQ) is exported
with each :class:`qswap.backends.packed.PackedLinear` as ONNX Runtime's ``MatMulNBits``
(domain ``com.microsoft``): its bytes as stored (two 4-bit codes per byte, one 5-8-bit code
per byte), one scale and zero point per block of input features, activations float.

Weights are stored as int8 initializers behind a DequantizeLinear and biases as float, so
the graph computes exactly what qswap computes; at ``ORT_ENABLE_EXTENDED`` or above ONNX
Runtime fuses it into ``QLinearConv``, ``QGemm``, ``QLinearAdd``... (rounding biases to
int32 as its integer kernels need; :func:`onnx_session` opens it that way).

How close can ONNX Runtime get? Two int8 implementations round differently (ONNX Runtime
rounds biases to int32, PyTorch's x86 kernels keep them float; sums run in another order),
so each layer's integer output may differ by one step in a few elements. In a deep network
such a difference moves the layers after it, and the outputs of a ResNet may end up a few
steps apart (qswap itself changes a few outputs with the batch size).
:func:`compare_layers` checks the export where a bound holds: every layer, fed the integers
ONNX Runtime computed for its input, within one step of qswap's layer.

Needs the ``onnx`` extra (``pip install 'qswap[onnx]'``). The export uses torch's
TorchScript-based exporter (``dynamo=False``), whose deprecation warning is silenced here.

    >>> import torch, qswap  # doctest: +SKIP
    >>> qmodel = qswap.quantize(model, "w8a8_minmax", calib_data=batches)  # doctest: +SKIP
    >>> qswap.export_onnx(qmodel, (x,), "model.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from qswap.exceptions import FileError, PlanError, UnsupportedModuleError
from qswap.persist.artifact import check_writable, write_atomic
from qswap.plan import restore_training, set_eval
from qswap.trace import flatten_tensors, function_name

if TYPE_CHECKING:
    import onnx

__all__ = [
    "MAX_OPSET",
    "MIN_OPSET",
    "LayerAgreement",
    "compare_layers",
    "export_onnx",
    "onnx_session",
    "onnxruntime_saturates",
    "ort_optimized_ops",
    "saturating_layers",
]

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear
MAX_OPSET = 20  # the highest opset torch's TorchScript-based exporter writes
_EXTRA = "pip install 'qswap[onnx]'"
# The (quant_min, quant_max) ranges a QuantizeLinear of opset <= 20 can hold exactly; (0, 127)
# is uint8 followed by a Clip, as torch's exporter writes it.
_ONNX_RANGES = ((0, 255), (-128, 127), (0, 127))

Optimization = Literal["disable", "basic", "extended", "all"]


def _require(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as exc:
        raise ImportError(
            f"qswap's ONNX export needs the {name!r} package, which is not installed; "
            f"install the extra with: {_EXTRA}"
        ) from exc


@functools.cache
def onnxruntime_saturates() -> bool:
    """Whether ONNX Runtime's u8 x s8 integer kernels saturate pairs on this machine.

    Measured once per process with one ``QLinearConv`` over four channels of 255 x 127
    (``qswap.cpu`` explains). ``False`` when onnxruntime is not installed (nothing runs there).

    >>> isinstance(onnxruntime_saturates(), bool)
    True
    """
    try:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        return False
    try:
        ort = _require("onnxruntime")
    except ImportError:
        return False

    channels = 4
    inits = [
        helper.make_tensor("xs", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("xz", TensorProto.UINT8, [], [0]),
        helper.make_tensor("w", TensorProto.INT8, [1, channels, 1, 1], [127] * channels),
        helper.make_tensor("ws", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("wz", TensorProto.INT8, [], [0]),
        helper.make_tensor("ys", TensorProto.FLOAT, [], [1000.0]),
        helper.make_tensor("yz", TensorProto.UINT8, [], [0]),
    ]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    graph = helper.make_graph(
        [node],
        "qswap_vnni_probe",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, channels, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 1, 1, 1])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = min(proto.ir_version, 8)
    onnx.checker.check_model(proto)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        session = ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    x = np.full((1, channels, 1, 1), 255, dtype=np.uint8)
    got = int(session.run(None, {"x": x})[0].ravel()[0])
    return got != round(channels * 255 * 127 / 1000)


# --------------------------------------------------------------------------- checks


def _check_exportable(model: nn.Module) -> None:
    """Refuse, naming the layer, what QDQ ONNX of opset <= 20 cannot hold exactly."""
    from qswap.state import state_of

    state = state_of(model)
    if state is None:
        return
    if state.stage != "converted":
        raise UnsupportedModuleError(
            "export_onnx() got a model that qswap.prepare() returned but convert() has not "
            "converted yet; export the result of qswap.convert() (or qswap.quantize())"
        )
    mode = state.plan.config.mode
    if mode == "dynamic":
        raise UnsupportedModuleError(
            "export_onnx() cannot export mode 'dynamic': its activation scales are computed "
            "per batch at run time, which a QDQ graph cannot hold; use mode: static"
        )
    for name, layer in state.layers.items():
        if layer.backend == "packed":
            continue  # MatMulNBits holds its groups and bit widths; _nbits_twin checks each
        for slot, qp in layer.qparams.items():
            where = f"layer {name or '(root)'!r} ({layer.module_type.__name__}), slot {slot!r}"
            if qp.granularity == "per_group":
                raise UnsupportedModuleError(
                    f"{where}: per-group scales have no QDQ form in opset <= {MAX_OPSET}; "
                    "use granularity: per_channel (axis: 0) or per_tensor for this layer"
                )
            if (qp.quant_min, qp.quant_max) not in _ONNX_RANGES:
                raise UnsupportedModuleError(
                    f"{where}: integer range [{qp.quant_min}, {qp.quant_max}] has no QDQ form; "
                    "QuantizeLinear holds int8 [-128, 127] or uint8 [0, 255] (or [0, 127] "
                    "with reduce_range). Use bits: 8 for this slot (a rule can keep other "
                    "layers as they are), or skip the layer"
                )


# --------------------------------------------------------------------------- int8 emulation

_MARK = (
    "_qswap_qdq"  # on a float tensor: the (scale, zero_point) of the quint8 tensor it stands for
)

QP = tuple[float, int]


def _mark(t: Tensor, qp: QP) -> Tensor:
    setattr(t, _MARK, qp)
    return t


def _mark_of(obj: Any) -> QP | None:
    if isinstance(obj, Tensor):
        found: QP | None = getattr(obj, _MARK, None)
        return found
    return None


def _marks(tensors: Sequence[Any]) -> tuple[QP, ...] | None:
    """The qparams marked on each of ``tensors``; ``None`` when one has none."""
    marks = tuple(_mark_of(t) for t in tensors)
    if any(m is None for m in marks):
        return None
    return cast(tuple[QP, ...], marks)


def _fq(x: Tensor, qp: QP) -> Tensor:
    """``x`` rounded to the quint8 grid of ``qp`` (exported as one QuantizeLinear/DequantizeLinear)."""
    return torch.fake_quantize_per_tensor_affine(x, qp[0], qp[1], 0, 255)


def _remark(obj: Any, qp: QP) -> Any:
    """Give every float tensor in ``obj`` the grid ``qp`` (as a native int8 op would keep it)."""
    if isinstance(obj, Tensor):
        if not obj.is_floating_point():
            return obj
        with torch._C.DisableTorchFunction():
            return _mark(_fq(obj, qp), qp)
    if isinstance(obj, tuple):
        items = [_remark(o, qp) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_remark(o, qp) for o in obj]
    return obj


def _unmark(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        if _MARK in obj.__dict__:
            delattr(obj, _MARK)
        return obj
    if isinstance(obj, (list, tuple)):
        for o in obj:
            _unmark(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            _unmark(o)
    return obj


class _QDQLayer(nn.Module):
    """What one torch int8 module computes, in float: quantize-dequantize at each integer tensor."""

    weight: Tensor
    bias: Tensor | None
    running_mean: Tensor
    running_var: Tensor
    w_scale: Tensor
    w_zero_point: Tensor

    def __init__(self, q: nn.Module) -> None:
        super().__init__()
        from qswap.backends import torch_int8 as ti

        self.name = type(q).__name__
        self.relu = isinstance(
            q,
            (
                ti.QuantizedLinearReLU,
                ti.QuantizedConvReLU1d,
                ti.QuantizedConvReLU2d,
                ti.QuantizedConvReLU3d,
                ti.QuantizedBNReLU2d,
                ti.QuantizedBNReLU3d,
            ),
        )
        int8: Any = q
        self.in_qp: QP = (
            float(getattr(int8, "input_scale", 1.0)),
            int(getattr(int8, "input_zero_point", 0)),
        )
        self.out_qp: QP = (float(int8.scale), int(int8.zero_point))
        self.kind: str
        self.conv_args: dict[str, Any] = {}
        if isinstance(q, (ti.QuantizedBatchNorm2d, ti.QuantizedBatchNorm3d)):
            self.kind = "bn"
            bn: Any = q
            self.register_buffer("weight", bn.weight.detach().float().clone())
            self.register_buffer("bias", bn.bias.detach().float().clone())
            self.register_buffer("running_mean", bn.running_mean.detach().float().clone())
            self.register_buffer("running_var", bn.running_var.detach().float().clone())
            self.eps = float(bn.eps)
            return
        packed: Any = q
        qweight: Tensor = packed.weight()
        bias: Tensor | None = packed.bias()
        self.register_buffer("weight", qweight.dequantize())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        if qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            self.register_buffer("w_scale", qweight.q_per_channel_scales().float())
            self.register_buffer("w_zero_point", qweight.q_per_channel_zero_points().int())
            self.w_axis: int | None = int(qweight.q_per_channel_axis())
        else:
            self.register_buffer("w_scale", torch.tensor(float(qweight.q_scale())))
            self.register_buffer("w_zero_point", torch.tensor(int(qweight.q_zero_point())))
            self.w_axis = None
        if isinstance(q, (ti.QuantizedLinear, ti.QuantizedLinearReLU)):
            self.kind = "linear"
            return
        conv: Any = q
        if conv.padding_mode != "zeros":
            raise UnsupportedModuleError(
                f"{self.name}: export_onnx() writes convolutions with zero padding only, not "
                f"padding_mode={conv.padding_mode!r}; skip this layer with a rule"
            )
        self.kind = f"conv{len(conv.kernel_size)}d"
        self.conv_args = {
            "stride": tuple(conv.stride),
            "padding": tuple(conv.padding),
            "dilation": tuple(conv.dilation),
            "groups": int(conv.groups),
        }

    def forward(self, x: Tensor) -> Tensor:
        """Quantize the input (unless it already is), compute in float, quantize the output."""
        with torch._C.DisableTorchFunction():
            qp = _mark_of(x) or self.in_qp
            x = _fq(x.float(), qp)
            if self.kind == "bn":
                y = F.batch_norm(
                    x,
                    self.running_mean,
                    self.running_var,
                    self.weight,
                    self.bias,
                    False,
                    0.0,
                    self.eps,
                )
            else:
                if self.w_axis is None:
                    w = torch.fake_quantize_per_tensor_affine(
                        self.weight, float(self.w_scale), int(self.w_zero_point), -128, 127
                    )
                else:
                    w = torch.fake_quantize_per_channel_affine(
                        self.weight, self.w_scale, self.w_zero_point, self.w_axis, -128, 127
                    )
                if self.kind == "linear":
                    y = F.linear(x, w, self.bias)
                else:
                    conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[self.kind]
                    y = conv(x, w, self.bias, **self.conv_args)
            if self.relu:
                y = torch.relu(y)
            y = _fq(y, self.out_qp)
        return _mark(y, self.out_qp)

    def extra_repr(self) -> str:
        return f"{self.name}, in={self.in_qp}, out={self.out_qp}"


class _QDQReLU(nn.ReLU):
    """An int8 model's ReLU on integer tensors: keeps the grid of its input."""

    def forward(self, input: Tensor) -> Tensor:
        qp = _mark_of(input)
        with torch._C.DisableTorchFunction():
            y = torch.relu(input)
            if qp is None:
                return y
            return _mark(_fq(y, qp), qp)


class _Emulate(TorchFunctionMode):
    """The int8 runtime's dispatch, on float tensors that carry the qparams of their int8 twin."""

    def __init__(self, runtime: Any) -> None:
        super().__init__()
        self.runtime = runtime
        self.seen: dict[tuple[Any, ...], int] = {}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        from qswap.dataflow import GRID_FUNCTIONS

        kwargs = kwargs or {}
        tensors = flatten_tensors([args, kwargs], [])
        marks = [m for m in (_mark_of(t) for t in tensors) if m is not None]
        if not marks:
            return func(*args, **kwargs)
        name = function_name(func)
        if name in GRID_FUNCTIONS or name.endswith(".__get__"):
            out = func(*args, **kwargs)
            if name in ("torch.Tensor.dequantize", "torch.Tensor.int_repr"):
                return _unmark(out)
            return _remark(out, marks[0])
        if name in self.runtime.op_names:
            result = self._integer_op(name, args, kwargs)
            if result is not None:
                return result
        return _unmark(func(*args, **kwargs))

    def _integer_op(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        from qswap.backends.torch_int8 import recorded_op

        found = recorded_op(self.runtime, self.seen, name, args, kwargs, _marks)
        if found is None:
            return None
        op, tensors, dim = found
        qp: QP = (float(op.scale), int(op.zero_point))
        with torch._C.DisableTorchFunction():
            if op.kind == "cat":
                y = torch.cat(tensors, dim)
            else:
                y = torch.add(tensors[0], tensors[1])
                if op.kind == "add_relu":
                    y = torch.relu(y)
            return _mark(_fq(y, qp), qp)


class _Emulated(nn.Module):
    """Runs an int8 model's float twin under :class:`_Emulate`; outputs plain float tensors."""

    def __init__(self, model: nn.Module, runtime: Any) -> None:
        super().__init__()
        self.model = model
        self.runtime = runtime

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _Emulate(self.runtime):
            out = self.model(*args, **kwargs)
        return _unmark(out)


def _int8_twin(model: nn.Module) -> nn.Module:
    """A float copy of a torch-int8 model that computes what its integer kernels compute."""
    from qswap.backends import torch_int8 as ti

    runtime = getattr(model, "_qswap_int8", None)
    twin = copy.deepcopy(model)
    for hooks in (twin._forward_pre_hooks, twin._forward_hooks):
        for key, hook in list(hooks.items()):
            if getattr(hook, "__self__", None) is runtime:
                del hooks[key]
                twin._forward_pre_hooks_with_kwargs.pop(key, None)
                twin._forward_hooks_with_kwargs.pop(key, None)
                twin._forward_hooks_always_called.pop(key, None)
    if isinstance(twin, ti.IntegerModule):
        return _Emulated(_QDQLayer(twin), runtime)
    for path, module in list(twin.named_modules(remove_duplicate=False)):
        if not path:
            continue
        replacement: nn.Module | None = None
        if isinstance(module, ti.IntegerModule):
            replacement = _QDQLayer(module)
        elif isinstance(module, ti.IntegerReLU):
            replacement = _QDQReLU(inplace=False)
        elif isinstance(module, ti.IntegerNative):
            replacement = ti.float_native(cast(nn.Module, module))  # the mode sees it again
        if replacement is None:
            continue
        for name in ti.HOOK_DICTS:
            getattr(replacement, name).update(getattr(module, name))
        parent_path, _, attr = path.rpartition(".")
        parent = twin.get_submodule(parent_path) if parent_path else twin
        parent._modules[attr] = replacement
    return _Emulated(twin, runtime)


# --------------------------------------------------------------------------- MatMulNBits

_NBITS_BLOCKS = (16, 32, 64, 128, 256)  # block sizes ONNX Runtime's MatMulNBits runs


class _MatMulNBits(torch.autograd.Function):
    """``x @ W^T`` where ``W`` is stored as ``MatMulNBits`` stores it; exported as that op."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        b: Tensor,
        scales: Tensor,
        zero_points: Tensor,
        k: int,
        n: int,
        bits: int,
        block: int,
    ) -> Tensor:
        del ctx
        blocks = b.shape[1]
        if bits == 4:
            codes = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(n, blocks, block)
            zeros = torch.stack([zero_points & 0xF, zero_points >> 4], dim=-1).reshape(n, -1)
        else:
            codes, zeros = b, zero_points.reshape(n, blocks)
        w = (codes.float() - zeros[:, :blocks, None].float()) * scales.reshape(n, blocks, 1)
        return x @ w.reshape(n, -1)[:, :k].t()

    @staticmethod
    def symbolic(
        g: Any,
        x: Any,
        b: Any,
        scales: Any,
        zero_points: Any,
        k: int,
        n: int,
        bits: int,
        block: int,
    ) -> Any:
        out = g.op(
            "com.microsoft::MatMulNBits",
            x,
            b,
            scales,
            zero_points,
            K_i=k,
            N_i=n,
            bits_i=bits,
            block_size_i=block,
        )
        sizes = x.type().varyingSizes() if x.type().kind() == "TensorType" else None
        if sizes:
            out.setType(x.type().with_sizes([*sizes[:-1], n]))
        return out


class _NBitsLinear(nn.Module):
    """Export-only stand-in of a ``PackedLinear``: its codes in ``MatMulNBits``'s layout.

    ``B`` is ``(N, blocks, block * bits / 8)`` uint8 (4-bit: two codes per byte, the first in
    the low nibble, as ``PackedLinear`` stores them), ``scales`` ``(N * blocks,)`` and
    ``zero_points`` uint8 (4-bit: two per byte), all on the codes ``q - quant_min``; a
    per-channel layer repeats its scale over every block of its row.
    """

    def __init__(self, layer: Any, name: str) -> None:
        super().__init__()
        n, k = layer.out_features, layer.in_features
        bits = 4 if layer.bits <= 4 else 8
        group = layer.group_size
        if group >= k:  # per channel: any block size (the same scale in each): the fewest bytes
            block = min(_NBITS_BLOCKS, key=lambda b: -(-k // b) * (b * bits / 8 + 4.5))
        elif group in _NBITS_BLOCKS:
            block = group
        else:
            raise UnsupportedModuleError(
                f"layer {name!r}: groups of {group} input features have no MatMulNBits form "
                f"(its block size is one of {', '.join(map(str, _NBITS_BLOCKS))}); quantize "
                "this layer with one of those group sizes"
            )
        blocks = -(-k // block)
        codes = unpack_codes(layer)  # (n, k): q - quant_min
        zeros = (layer.zero_points.to(torch.int32) - layer.quant_min).to(torch.uint8)
        scales = layer.scales
        if group >= k:
            scales, zeros = scales.expand(n, blocks), zeros.expand(n, blocks)
        padded = F.pad(codes, (0, blocks * block - k))
        if bits == 4:
            stored = padded[:, 0::2] | (padded[:, 1::2] << 4)
            zeros = F.pad(zeros, (0, blocks % 2))
            zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
        else:
            stored = padded
        self.k, self.n, self.nbits, self.block = k, n, bits, block
        self.register_buffer("B", stored.reshape(n, blocks, -1).contiguous())
        self.register_buffer("scales", scales.reshape(-1).to(torch.float32).contiguous())
        self.register_buffer("zero_points", zeros.reshape(-1).contiguous())
        self.register_buffer("input_scale", layer.input_scale.clone())
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.float32)
        scale = cast(Tensor, self.input_scale)
        if scale.numel():
            x = x * scale
        y = cast(
            Tensor,
            _MatMulNBits.apply(  # type: ignore[no-untyped-call]
                x, self.B, self.scales, self.zero_points, self.k, self.n, self.nbits, self.block
            ),
        )
        return y if self.bias is None else y + self.bias


def unpack_codes(layer: Any) -> Tensor:
    """A ``PackedLinear``'s codes ``q - quant_min`` as ``(out, in)`` uint8."""
    from qswap.backends.packed import unpack_nibbles

    stored: Tensor = layer.qweight
    if layer.bits <= 4:
        return unpack_nibbles(stored)
    if stored.dtype == torch.int8:  # q as it is, on [-128, 127]
        return (stored.to(torch.int16) - int(layer.quant_min)).to(torch.uint8)
    return stored


def _nbits_twin(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` with every ``PackedLinear`` as :class:`_NBitsLinear` (None: none)."""
    from qswap.backends.packed import PackedLinear

    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        return None
    twin = copy.deepcopy(model)
    if isinstance(twin, PackedLinear):
        return _NBitsLinear(twin, "")
    for path, module in list(twin.named_modules(remove_duplicate=False)):
        if path and isinstance(module, PackedLinear):
            parent_path, _, attr = path.rpartition(".")
            parent = twin.get_submodule(parent_path) if parent_path else twin
            parent._modules[attr] = _NBitsLinear(module, path)
    return twin


# --------------------------------------------------------------------------- export


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """Silence what torch's TorchScript exporter says about itself (and only that)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"You are using the legacy TorchScript-based ONNX export"
        )
        warnings.filterwarnings(
            "ignore",
            message=r"The feature will be removed",
            category=DeprecationWarning,
            module=r"torch\.onnx",
        )
        # tracing records qswap's Python-side checks (``if scale.numel() == 0``) as constants,
        # which is what an exported model needs: its qparams are fixed
        tracer_warning: type[Warning] = getattr(torch.jit, "TracerWarning", UserWarning)
        warnings.filterwarnings("ignore", category=tracer_warning)
        warnings.filterwarnings(
            "ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel"
        )
        yield


def _unexportable(out: Any) -> str | None:
    """The type name of the first thing in a model's output an ONNX graph cannot return."""
    if out is None or isinstance(out, (Tensor, bool, int, float, str)):
        return None
    if isinstance(out, Mapping):
        items: Any = out.values()
    elif isinstance(out, (tuple, list)):
        items = out
    else:
        return type(out).__name__
    for item in items:
        found = _unexportable(item)
        if found is not None:
            return found
    return None


def _split(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise UnsupportedModuleError(
        f"export_onnx() needs example inputs as a tensor, a tuple of positional arguments or a "
        f"dict of keyword arguments, got {type(example_inputs).__name__}"
    )


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int = 17,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    quantize_bias: bool = False,
) -> Path:
    """Write ``model`` (a qswap fake or int8 model, or a float one) as QDQ ONNX to ``path``.

    ``example_inputs`` is a tensor, a tuple of positional arguments or a dict of keyword
    arguments; with ``dynamic_batch`` the first dimension of every input and output may
    vary. Biases stay float, as qswap computes them (ONNX Runtime rounds them to int32 itself
    when it fuses a convolution); ``quantize_bias=True`` stores them as int32 behind a
    DequantizeLinear (scale = input scale x weight scale) for runtimes that want that. The
    file is written to a temporary name and renamed, so ``path`` never holds a half-written
    model. Returns ``path``.

    >>> import torch, qswap  # doctest: +SKIP
    >>> x = torch.randn(8, 4)  # doctest: +SKIP
    >>> q = qswap.quantize(torch.nn.Linear(4, 3), "w8a8_minmax", calib_data=[x])  # doctest: +SKIP
    >>> qswap.export_onnx(q, x, "linear.onnx")  # doctest: +SKIP
    PosixPath('linear.onnx')
    """
    _require("onnx")
    check_writable(Path(path))  # a folder or a path under a file: say so before exporting
    twin = getattr(model, "torch_twin", None)
    if isinstance(twin, nn.Module):  # a model another runtime runs: export what it was made from
        model = twin
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModuleError(
            f"opset must be an integer from {MIN_OPSET} (per-channel QuantizeLinear) to "
            f"{MAX_OPSET} (the highest torch's exporter writes), got {opset!r}"
        )
    _check_exportable(model)
    args, kwargs = _split(example_inputs)
    wrap = (
        "wrap the model in a module whose forward takes tensors and returns tensors (for a "
        "transformers model: model(input_ids=ids, attention_mask=torch.ones_like(ids), "
        "use_cache=False).logits) and export that"
    )
    for key, value in [*enumerate(args), *kwargs.items()]:
        if not isinstance(value, Tensor):
            raise UnsupportedModuleError(
                f"export_onnx(): example input {key!r} is a {type(value).__name__}; the graph's "
                f"inputs are tensors: {wrap}"
            )
    runtime = getattr(model, "_qswap_int8", None)
    target = _int8_twin(model) if runtime is not None else (_nbits_twin(model) or model)
    n_in = len(args) + len(kwargs)
    names_in = (
        list(input_names)
        if input_names is not None
        else ([f"input_{i}" for i in range(len(args))] + list(kwargs) if n_in > 1 else ["input"])
    )
    buffer = io.BytesIO()
    training = set_eval(target)  # the model's modes come back as they were, whatever happens
    try:
        with torch.no_grad():
            out = target(*args, **kwargs)
        odd = _unexportable(out)
        if odd is not None:
            raise UnsupportedModuleError(
                f"export_onnx(): this {type(model).__name__} returns a {odd}, which an ONNX "
                f"graph cannot output (a transformers model's KV cache): {wrap}"
            )
        n_out = len(flatten_tensors(out, []))
        names_out = (
            list(output_names)
            if output_names is not None
            else (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
        )
        dynamic_axes = (
            {name: {0: "batch"} for name in [*names_in, *names_out]} if dynamic_batch else None
        )
        with _exporter_quiet(), torch.no_grad():
            torch.onnx.export(
                target,
                args,
                cast(Any, buffer),
                kwargs=kwargs or None,
                dynamo=False,
                opset_version=opset,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                custom_opsets={"com.microsoft": 1},
            )
    except torch.onnx.errors.OnnxExporterError as exc:
        raise UnsupportedModuleError(
            f"torch's ONNX exporter could not export this {type(model).__name__}: {exc}"
        ) from exc
    finally:
        restore_training(training)
    onnx = _require("onnx")
    proto = onnx.load_from_string(buffer.getvalue())
    proto = _QDQGraph(proto).canonical(quantize_bias=quantize_bias)
    onnx.checker.check_model(proto)
    written = write_atomic(path, proto.SerializeToString())
    overflow = saturating_layers(model)
    if overflow and onnxruntime_saturates():
        shown = ", ".join(repr(n) for n in overflow[:3])
        more = f" and {len(overflow) - 3} more" if len(overflow) > 3 else ""
        warnings.warn(
            f"{written} is exact on CPUs with VNNI, but ONNX Runtime on this CPU will compute "
            f"saturated sums in {shown}{more} where it fuses them into integer kernels "
            f"(optimization 'extended' or above): {_SATURATION_FIX}",
            UserWarning,
            stacklevel=2,
        )
    return written


# --------------------------------------------------------------------------- graph rewriting


class _QDQGraph:
    """Rewrites an exported graph into the QDQ form ONNX Runtime fuses into integer kernels.

    Every rewrite keeps the computed values (up to the int32 rounding of biases):
    constant QuantizeLinear nodes on weights are folded into int8 initializers, no-op
    Cast/Identity nodes dropped, a ReLU right before a QuantizeLinear whose zero point is
    the lowest integer removed (the saturation already clamps at zero), a DequantizeLinear
    feeding a QuantizeLinear with the same parameters short-circuited, and (if asked) float
    biases of convolutions and GEMMs between Q/DQ pairs quantized to int32.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        import onnx
        from onnx import numpy_helper

        self.onnx = onnx
        self.nh = numpy_helper
        self.model = model
        self.graph = model.graph

    # -- helpers ---------------------------------------------------------------------

    def _consts(self) -> dict[str, Any]:
        return {i.name: self.nh.to_array(i) for i in self.graph.initializer}

    def _producers(self) -> dict[str, Any]:
        return {o: n for n in self.graph.node for o in n.output}

    def _consumers(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for n in self.graph.node:
            for i in n.input:
                out.setdefault(i, []).append(n)
        return out

    def _graph_outputs(self) -> set[str]:
        return {o.name for o in self.graph.output}

    def _rename_uses(self, old: str, new: str) -> None:
        for n in self.graph.node:
            for k, name in enumerate(n.input):
                if name == old:
                    n.input[k] = new

    def _add_init(self, array: Any, name: str) -> str:
        base, k = name, 0
        names = {i.name for i in self.graph.initializer}
        while name in names:
            k += 1
            name = f"{base}_{k}"
        self.graph.initializer.append(self.nh.from_array(array, name))
        return name

    def _remove_nodes(self, dead: list[Any]) -> None:
        ids = {id(n) for n in dead}
        keep = [n for n in self.graph.node if id(n) not in ids]
        del self.graph.node[:]
        self.graph.node.extend(keep)

    def _bypass(self, node: Any, source: str) -> bool:
        """Make consumers of ``node``'s only output read ``source``; False if it is a graph output."""
        out = node.output[0]
        if out in self._graph_outputs():
            return False
        self._rename_uses(out, source)
        return True

    # -- passes ----------------------------------------------------------------------

    def _constants_to_initializers(self) -> None:
        dead = []
        for n in self.graph.node:
            if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
                array = self.nh.to_array(n.attribute[0].t)
                self.graph.initializer.append(self.nh.from_array(array, n.output[0]))
                dead.append(n)
        self._remove_nodes(dead)

    def _drop_noops(self) -> None:
        import onnx

        inferred = onnx.shape_inference.infer_shapes(self.model)
        types: dict[str, int] = {}
        for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            types[vi.name] = vi.type.tensor_type.elem_type
        for i in self.graph.initializer:
            types[i.name] = i.data_type
        consts = {i.name for i in self.graph.initializer}
        dead = []
        for n in self.graph.node:
            if n.op_type == "Identity" and (n.input[0] in consts or n.input[0] in types):
                if self._bypass(n, n.input[0]):
                    dead.append(n)
            elif n.op_type == "Cast":
                to = next(a.i for a in n.attribute if a.name == "to")
                if types.get(n.input[0]) == to and self._bypass(n, n.input[0]):
                    dead.append(n)
        self._remove_nodes(dead)

    def _fold_weight_quantization(self) -> None:
        consts = self._consts()
        dead = []
        for n in self.graph.node:
            if n.op_type != "QuantizeLinear" or n.input[0] not in consts:
                continue
            if len(n.input) < 3 or n.input[1] not in consts or n.input[2] not in consts:
                continue
            x = torch.from_numpy(consts[n.input[0]].astype("float32"))
            scale = torch.from_numpy(consts[n.input[1]].astype("float32"))
            zp_np = consts[n.input[2]]
            zero_point = torch.from_numpy(zp_np.astype("int32"))
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if scale.dim() == 1 and x.dim() > 0:
                shape = [1] * x.dim()
                shape[axis] = -1
                scale = scale.reshape(shape)
                zero_point = zero_point.reshape(shape)
            info = torch.iinfo(torch.uint8 if zp_np.dtype.kind == "u" else torch.int8)
            # torch's fake-quantize arithmetic (x * (1 / scale), round half to even), so the
            # integers are exactly the ones qswap's fake-quantizer produced
            q = (torch.round(x * (1.0 / scale)) + zero_point).clamp(info.min, info.max)
            name = self._add_init(q.numpy().astype(zp_np.dtype), n.output[0] + "_quantized")
            self._rename_uses(n.output[0], name)
            dead.append(n)
        self._remove_nodes(dead)

    def _drop_relu_before_saturating_quantize(self) -> None:
        consts = self._consts()
        consumers = self._consumers()
        dead = []
        for n in self.graph.node:
            if n.op_type != "Relu" or n.output[0] in self._graph_outputs():
                continue
            users = consumers.get(n.output[0], [])
            if not users or any(u.op_type != "QuantizeLinear" for u in users):
                continue
            ok = True
            for u in users:
                zp = consts.get(u.input[2]) if len(u.input) > 2 else None
                if zp is None or zp.size != 1:
                    ok = False
                    break
                lowest = 0 if zp.dtype.kind == "u" else -128
                if int(zp.reshape(())) != lowest:
                    ok = False
                    break
            if ok:
                self._rename_uses(n.output[0], n.input[0])
                dead.append(n)
        self._remove_nodes(dead)

    def _short_circuit_dq_q(self) -> None:
        consts = self._consts()
        producers = self._producers()
        dead = []
        for n in self.graph.node:
            if n.op_type != "QuantizeLinear" or n.output[0] in self._graph_outputs():
                continue
            dq = producers.get(n.input[0])
            if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
                continue
            if len(n.input) < 3 or not self._same_const(consts, dq.input[1], n.input[1]):
                continue
            if not self._same_const(consts, dq.input[2], n.input[2]):
                continue
            if consts[dq.input[2]].dtype != consts[n.input[2]].dtype:
                continue
            if consts[n.input[1]].size != 1:
                continue
            self._rename_uses(n.output[0], dq.input[0])
            dead.append(n)
        self._remove_nodes(dead)

    @staticmethod
    def _same_const(consts: Mapping[str, Any], a: str, b: str) -> bool:
        if a not in consts or b not in consts:
            return False
        x, y = consts[a], consts[b]
        return bool(x.shape == y.shape and (x == y).all())

    def _quantize_biases(self) -> None:
        consts = self._consts()
        producers = self._producers()
        new_nodes: list[tuple[Any, Any]] = []
        for n in self.graph.node:
            if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in consts:
                continue
            if n.op_type == "Gemm":
                gemm = {a.name: a for a in n.attribute}
                if ("transA" in gemm and gemm["transA"].i) or (
                    "alpha" in gemm and gemm["alpha"].f != 1.0
                ):
                    continue
            dx = producers.get(n.input[0])
            dw = producers.get(n.input[1])
            if dx is None or dw is None or dx.op_type != "DequantizeLinear":
                continue
            if dw.op_type != "DequantizeLinear" or dw.input[0] not in consts:
                continue
            if dx.input[1] not in consts or dw.input[1] not in consts:
                continue
            sx = consts[dx.input[1]].astype("float32")
            sw = consts[dw.input[1]].astype("float32")
            if sx.size != 1:
                continue
            bias = consts[n.input[2]].astype("float32")
            scale = (sx.reshape(()) * sw).astype("float32")
            if scale.size not in (1, bias.size):
                continue
            import numpy as np

            q = np.round(bias / scale)
            if np.abs(q).max(initial=0) >= 2**31 - 1 or not np.isfinite(q).all():
                continue
            qname = self._add_init(q.astype("int32"), n.input[2] + "_int32")
            sname = self._add_init(
                np.broadcast_to(scale, bias.shape).astype("float32").copy()
                if scale.size != 1
                else scale.reshape(()),
                n.input[2] + "_scale",
            )
            zname = self._add_init(
                np.zeros(bias.shape if scale.size != 1 else (), dtype="int32"),
                n.input[2] + "_zero_point",
            )
            out = qname.replace("_int32", "_dequantized")  # unique: _add_init numbers reuses
            attrs = [self.onnx.helper.make_attribute("axis", 0)] if scale.size != 1 else []
            dq = self.onnx.helper.make_node(
                "DequantizeLinear", [qname, sname, zname], [out], name=out + "_node"
            )
            dq.attribute.extend(attrs)
            n.input[2] = out
            new_nodes.append((n, dq))
        for consumer, dq in new_nodes:
            nodes = list(self.graph.node)
            index = next(i for i, m in enumerate(nodes) if m is consumer)
            self.graph.node.insert(index, dq)

    def _prune(self) -> None:
        outputs = self._graph_outputs()
        while True:
            used = {i for n in self.graph.node for i in n.input} | outputs
            dead = [n for n in self.graph.node if not any(o in used for o in n.output)]
            if not dead:
                break
            self._remove_nodes(dead)
        used = {i for n in self.graph.node for i in n.input} | outputs
        keep = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)

    def canonical(self, *, quantize_bias: bool = False) -> onnx.ModelProto:
        """Apply every rewrite; returns the model (changed in place)."""
        self._constants_to_initializers()
        self._drop_noops()
        self._fold_weight_quantization()
        self._drop_relu_before_saturating_quantize()
        self._short_circuit_dq_q()
        self._prune()
        if quantize_bias:
            self._quantize_biases()
            self._prune()
        del self.graph.value_info[:]
        return self.model


# --------------------------------------------------------------------------- ONNX Runtime


def onnx_session(
    path: str | os.PathLike[str] | bytes,
    *,
    threads: int | None = None,
    optimization: Optimization = "extended",
) -> Any:
    """An ONNX Runtime CPU session for ``path`` (or a serialized model) at ``optimization`` level.

    ONNX Runtime fuses Q/DQ pairs into integer kernels only at ``extended`` or ``all``.
    ``threads`` sets the intra-op thread count (default: ONNX Runtime's choice).

    >>> sess = onnx_session("model.onnx", threads=1)  # doctest: +SKIP
    >>> sess.run(None, {"input": x.numpy()})[0]  # doctest: +SKIP
    """
    source = path if isinstance(path, bytes) else str(path)
    return _session(source, threads=threads, optimization=optimization)


def _session(
    source: str | bytes, *, threads: int | None = None, optimization: Optimization = "extended"
) -> Any:
    """An ONNX Runtime CPU session for a file name or a serialized model."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = _level(ort, optimization)
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _level(ort: Any, optimization: str) -> Any:
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise UnsupportedModuleError(
            f"optimization must be one of {', '.join(map(repr, levels))}, got {optimization!r}"
        )
    return levels[optimization]


def ort_optimized_ops(
    path: str | os.PathLike[str], *, optimization: Optimization = "extended"
) -> dict[str, int]:
    """How many nodes of each type ONNX Runtime runs after optimizing ``path`` (CPU).

    After a good QDQ export at ``extended``, convolutions show up as ``QLinearConv`` and
    only one ``QuantizeLinear``/``DequantizeLinear`` remains at each end of the graph.

    >>> ort_optimized_ops("model.onnx")  # doctest: +SKIP
    {'QuantizeLinear': 1, 'QLinearConv': 8, ...}
    """
    ort = _require("onnxruntime")
    onnx = _require("onnx")
    with tempfile.TemporaryDirectory(prefix="qswap-ort-") as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = _level(ort, optimization)
        options.optimized_model_filepath = out
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(out)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- layer-by-layer check

# the nodes that compute a layer with weights; between one and the QuantizeLinear of the
# layer's output there may be a ReLU the exporter kept or the bias Add of a MatMul
_COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class LayerAgreement:
    """How ONNX Runtime's integer output of one layer compares with qswap's on the same input.

    Both sides start from the integers ONNX Runtime computed for the layer's input.
    ``max_steps`` is the largest difference between the two integer outputs (steps of
    the layer's output scale) and ``differing`` how many of the ``elements`` differ at
    all. ``qparams_match`` is False when the file quantizes the layer's input or output
    with another scale or zero point than qswap.
    """

    layer: str
    node: str
    elements: int
    differing: int
    max_steps: int
    qparams_match: bool
    #: ONNX Runtime on this CPU adds this layer's u8 x s8 pairs in 16 bits, and its 8-bit
    #: activations and 8-bit weights can overflow them (``qswap.cpu``): the likely cause of
    #: a large difference, not the export
    saturates: bool = False

    @property
    def ok(self) -> bool:
        """Same grids and within one step everywhere: as close as two int8 kernels get."""
        return self.qparams_match and self.max_steps <= 1

    def __str__(self) -> str:
        share = self.differing / self.elements if self.elements else 0.0
        grids = "" if self.qparams_match else "; input/output qparams differ from qswap's"
        cause = ""
        if self.saturates and not self.ok:
            cause = f"; likely cause: {_SATURATION_FIX}"
        return (
            f"{self.layer or '(root)'} [{self.node}]: max {self.max_steps} step(s), "
            f"{share:.3%} of {self.elements} outputs differ{grids}{cause}"
        )


_SATURATION_FIX = (
    "this CPU has no VNNI, and ONNX Runtime's u8 x s8 kernels add pairs of products in 16 "
    "bits, which saturate with 8-bit activations and 8-bit weights; quantize with 7-bit "
    "weights (weight: {reduce_range: true}) or 7-bit activations (activation: "
    "{reduce_range: true}) to run on this CPU"
)


def saturating_layers(model: nn.Module) -> list[str]:
    """Layers of a converted model whose u8 x s8 pairs need more than 16 bits (``qswap.cpu``).

    They run exactly on CPUs with VNNI and saturate on x86 CPUs without it (fbgemm, ONNX
    Runtime). A model the plan narrowed for such a CPU has none.
    """
    from qswap.cpu import pair_saturates
    from qswap.state import state_of

    state = state_of(model)
    if state is None:
        return []
    found = []
    for name, layer in state.layers.items():
        w, x = layer.weight, layer.input
        if w is None or x is None or "weight" not in layer.qparams:
            continue
        lo, hi = x.quant_range()  # the grid calibration chose (reduce_range: 7 bits)
        if pair_saturates(act_codes=hi + (128 if lo < 0 else 0), weight_range=w.quant_range()):
            found.append(name)
    return found


@dataclasses.dataclass(frozen=True)
class _Site:
    """Where a layer sits in the graph: its node and the integer tensors of its input and output."""

    index: int
    node: str
    codes_in: str
    type_in: int
    qp_in: QP
    codes_out: str
    type_out: int
    qp_out: QP


def compare_layers(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    optimization: Optimization = "extended",
) -> list[LayerAgreement]:
    """Check an export layer by layer: ONNX Runtime against qswap, each layer on the same input.

    Runs ``path`` in ONNX Runtime on ``example_inputs`` (as :func:`export_onnx` takes
    them), finds every layer of ``model`` with int8 weights in the file by its weights,
    runs qswap's layer on the integers ONNX Runtime computed for that layer's input and
    compares the two integer outputs. In a correct export every layer is within one step
    (``all(row.ok for row in rows)``): that much two int8 kernels differ by rounding
    (ONNX Runtime rounds biases to int32, PyTorch's x86 kernels keep them float). The
    end-to-end outputs of a deep network may differ by more, as a one-step difference in
    an early layer moves the layers after it; this check tells that drift from a broken
    export. Layers whose input or output qswap leaves in float are not compared.

    Returns one :class:`LayerAgreement` per layer, in the order the graph runs them.

    >>> rows = compare_layers(qmodel, "model.onnx", x[:16])  # doctest: +SKIP
    >>> print(rows[0])  # doctest: +SKIP
    conv1 [/conv1/conv1.0/Conv]: max 1 step(s), 0.018% of 65536 outputs differ
    """
    from qswap.state import state_of

    onnx = _require("onnx")
    _require("onnxruntime")
    twin = getattr(model, "torch_twin", None)
    if isinstance(twin, nn.Module):  # qswap.backends.ort: compare the file with its torch twin
        model = twin
    state = state_of(model)
    if state is None or state.stage != "converted":
        raise UnsupportedModuleError(
            "compare_layers() needs the quantized model the file was exported from (what "
            f"qswap.quantize() or qswap.convert() returned), got a {type(model).__name__} "
            "that qswap has not converted"
        )
    weights = _layer_weights(model, state)
    if not weights:
        raise PlanError(
            f"compare_layers() found no layer of this {type(model).__name__} with int8 weights "
            "and a quantized input and output, so there is nothing to compare layer by layer; "
            "compare the model's outputs with ONNX Runtime's instead"
        )
    proto = _load_onnx_file(onnx, path)
    sites = _LayerGraph(proto).sites(weights, str(path))
    outputs = {o.name for o in proto.graph.output}
    for site in sites.values():
        for name, elem_type in ((site.codes_in, site.type_in), (site.codes_out, site.type_out)):
            if name not in outputs:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
                outputs.add(name)
    session = _session(proto.SerializeToString(), optimization=optimization)
    wanted = sorted({t for s in sites.values() for t in (s.codes_in, s.codes_out)})
    feed = _feed(session, example_inputs)
    codes = dict(zip(wanted, session.run(wanted, feed), strict=True))
    seen = _integer_inputs(model, list(sites), example_inputs)
    overflow = set(saturating_layers(model)) if onnxruntime_saturates() else set()
    with torch.no_grad():
        return [
            _agreement(model, state.layers[name], name, site, codes, seen.get(name), overflow)
            for name, site in sites.items()
        ]


def _load_onnx_file(onnx: Any, path: str | os.PathLike[str]) -> Any:
    """The ONNX model in ``path``; a missing, unreadable or corrupt file is a ``FileError``."""
    shown = str(path)
    if not os.path.exists(shown):
        raise FileError(
            f"ONNX file {shown!r} does not exist; check the path, or write it with "
            "qswap.export_onnx(qmodel, example_inputs, path)"
        )
    if os.path.isdir(shown):
        raise FileError(f"ONNX file {shown!r} is a folder, not a file; pass the .onnx file in it")
    try:
        proto = onnx.load(shown)
        onnx.checker.check_model(proto)
    except OSError as exc:
        raise FileError(f"ONNX file {shown!r} cannot be read: {exc.strerror or exc}") from exc
    except Exception as exc:  # protobuf's DecodeError, onnx's ValidationError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FileError(
            f"ONNX file {shown!r} is not a valid ONNX model ({first[:200]}); it is truncated, "
            "corrupt or another kind of file. Export it again with qswap.export_onnx"
        ) from exc
    if not proto.graph.node:
        raise FileError(
            f"ONNX file {shown!r} holds no graph (no nodes); it is empty, corrupt or another "
            "kind of file. Export it again with qswap.export_onnx"
        )
    return proto


def _layer_weights(model: nn.Module, state: Any) -> dict[str, Any]:
    """The integer weights of every layer whose weight, input and output qswap quantizes."""
    from qswap.backends.torch_int8 import IntegerModule
    from qswap.slots import param_location

    found: dict[str, Any] = {}
    for name, layer in state.layers.items():
        if not {"weight", "input", "output"} <= layer.qparams.keys():
            continue
        module = model.get_submodule(name)
        if isinstance(module, IntegerModule):
            packed = getattr(module, "weight", None)
            qweight = packed() if callable(packed) else None
            if isinstance(qweight, Tensor) and qweight.is_quantized:
                found[name] = qweight.int_repr().numpy()
            continue
        qp = layer.qparams["weight"]
        if qp.granularity == "per_group":
            continue
        owner, pname = param_location(module, "weight")
        weight = getattr(owner, pname).detach().float()
        scale, zero_point = qp.scale.float(), qp.zero_point
        if qp.axis is not None:
            shape = [1] * weight.dim()
            shape[qp.axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        found[name] = (torch.round(weight / scale) + zero_point).to(torch.int32).numpy()
    return found


class _LayerGraph:
    """Finds qswap's layers in an ONNX graph by their integer weights."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx import numpy_helper

        graph = model.graph
        self.consts: dict[str, Any] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.nodes = list(graph.node)
        self.producers = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def weight(self, node: Any) -> Any:
        """The integer weight of a Conv/Gemm/MatMul, laid out as torch keeps it; None if float."""
        if node.op_type not in _COMPUTE_OPS or len(node.input) < 2:
            return None
        dq = self.producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in self.consts:
            return None
        w = self.consts[dq.input[0]]
        attrs = {a.name: a for a in node.attribute}
        transposed = node.op_type == "MatMul" or (
            node.op_type == "Gemm" and not ("transB" in attrs and attrs["transB"].i)
        )
        return w.T if transposed and w.ndim == 2 else w

    def qparams(self, node: Any) -> QP | None:
        """The per-tensor (scale, zero point) of a QuantizeLinear/DequantizeLinear node."""
        scale = self.consts.get(node.input[1])
        zero_point = self.consts.get(node.input[2]) if len(node.input) > 2 else 0
        if scale is None or zero_point is None or scale.size != 1:
            return None
        import numpy as np

        return float(scale.reshape(())), int(np.asarray(zero_point).reshape(()))

    def elem_type(self, node: Any) -> int:
        """The ONNX element type of the integers a QuantizeLinear/DequantizeLinear works on."""
        import onnx

        zero_point = self.consts.get(node.input[2]) if len(node.input) > 2 else None
        if zero_point is None:
            return int(onnx.TensorProto.UINT8)
        return int(onnx.helper.np_dtype_to_tensor_dtype(zero_point.dtype))

    def sites(self, weights: Mapping[str, Any], where: str) -> dict[str, _Site]:
        """The site of each layer of ``weights``, in graph order; a layer not found is an error."""
        import numpy as np

        candidates = [(i, n, self.weight(n)) for i, n in enumerate(self.nodes)]
        candidates = [(i, n, w) for i, n, w in candidates if w is not None]
        claimed: set[int] = set()
        found: list[tuple[int, str, _Site]] = []
        for name, w in weights.items():
            for index, node, theirs in candidates:
                if index in claimed:
                    continue
                if theirs.shape == w.shape and np.array_equal(theirs, w):
                    claimed.add(index)
                    found.append((index, name, self._site(name, index, node, where)))
                    break
            else:
                raise PlanError(
                    f"layer {name!r}: no Conv, Gemm or MatMul node in {where} has its int8 "
                    f"weights (shape {list(w.shape)}); the file was not exported from this "
                    "model or its weights were changed since. Export it again with "
                    "qswap.export_onnx(model, example_inputs, path)"
                )
        return {name: site for _, name, site in sorted(found, key=lambda item: item[0])}

    def _site(self, name: str, index: int, node: Any, where: str) -> _Site:
        label = f"layer {name!r} (node {node.name!r} in {where})"
        dq = self.producers.get(node.input[0])
        qp_in = None if dq is None or dq.op_type != "DequantizeLinear" else self.qparams(dq)
        if dq is None or qp_in is None:
            raise PlanError(
                f"{label}: the input is not dequantized from per-tensor integers, while qswap "
                "quantizes it; export the model with qswap.export_onnx()"
            )
        tensor = node.output[0]
        while True:
            users = self.consumers.get(tensor, [])
            q = next((u for u in users if u.op_type == "QuantizeLinear"), None)
            if q is not None or len(users) != 1 or not self._epilogue(users[0]):
                break
            tensor = users[0].output[0]
        qp_out = None if q is None else self.qparams(q)
        if q is None or qp_out is None:
            raise PlanError(
                f"{label}: the output is not quantized to per-tensor integers, while qswap "
                "quantizes it; export the model with qswap.export_onnx()"
            )
        codes_out = q.output[0]
        # a [0, 127] range is written as uint8 followed by a Clip
        clip = next((u for u in self.consumers.get(codes_out, []) if u.op_type == "Clip"), None)
        return _Site(
            index=index,
            node=node.name or node.op_type,
            codes_in=dq.input[0],
            type_in=self.elem_type(dq),
            qp_in=qp_in,
            codes_out=codes_out if clip is None else clip.output[0],
            type_out=self.elem_type(q),
            qp_out=qp_out,
        )

    def _epilogue(self, node: Any) -> bool:
        """A ReLU, or the Add of a constant bias: part of the layer, before its QuantizeLinear."""
        if node.op_type == "Relu":
            return True
        return node.op_type == "Add" and any(i in self.consts for i in node.input)


def _feed(session: Any, example_inputs: Any) -> dict[str, Any]:
    """ONNX Runtime's input dict for ``example_inputs``, by position and then by name."""
    args, kwargs = _split(example_inputs)
    names = [i.name for i in session.get_inputs()]
    if len(args) > len(names):
        raise UnsupportedModuleError(
            f"got {len(args)} positional example inputs, but the file takes {len(names)}: "
            f"{', '.join(names)}"
        )
    feed = {**dict(zip(names, args, strict=False)), **kwargs}
    unknown = sorted(set(feed) - set(names))
    if unknown:
        raise UnsupportedModuleError(
            f"example inputs {', '.join(map(repr, unknown))} are not inputs of the file, "
            f"whose inputs are {', '.join(map(repr, names))}"
        )
    return {k: v.detach().cpu().numpy() if isinstance(v, Tensor) else v for k, v in feed.items()}


def _integer_inputs(model: nn.Module, names: Sequence[str], example_inputs: Any) -> dict[str, QP]:
    """The qparams of the quantized tensor each int8 layer gets when qswap runs ``model``.

    A layer after a quantized ``add`` gets the add's grid, not its own calibrated input's.
    """
    from qswap.backends.torch_int8 import IntegerModule

    found: dict[str, QP] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if name in found or not isinstance(x, Tensor):
                return
            if x.is_quantized:
                found[name] = (float(x.q_scale()), int(x.q_zero_point()))
            else:
                int8: Any = module
                found[name] = (float(int8.input_scale), int(int8.input_zero_point))

        return record

    handles = [
        module.register_forward_pre_hook(recorder(name))
        for name in names
        if isinstance(module := model.get_submodule(name), IntegerModule)
    ]
    if not handles:
        return found
    args, kwargs = _split(example_inputs)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return found


def _agreement(
    model: nn.Module,
    layer: Any,
    name: str,
    site: _Site,
    codes: Mapping[str, Any],
    seen: QP | None,
    overflow: set[str],
) -> LayerAgreement:
    """Run qswap's layer on ONNX Runtime's integer input; compare the integer outputs."""
    import numpy as np

    from qswap.backends.torch_int8 import IntegerModule

    module = model.get_submodule(name)
    ort_in, ort_out = codes[site.codes_in], codes[site.codes_out]
    if isinstance(module, IntegerModule):
        int8: Any = module
        qp_in: QP = seen or (float(int8.input_scale), int(int8.input_zero_point))
        x = torch._make_per_tensor_quantized_tensor(torch.from_numpy(ort_in), *qp_in)
        y: Tensor = module(x)
        qp_out: QP = (float(y.q_scale()), int(y.q_zero_point()))
        ours = y.int_repr().to(torch.int64)
    else:
        qin, qout = layer.qparams["input"], layer.qparams["output"]
        qp_in = (float(qin.scale), int(qin.zero_point))
        qp_out = (float(qout.scale), int(qout.zero_point))
        x = (torch.from_numpy(ort_in.astype(np.float32)) - qp_in[1]) * qp_in[0]
        y = module(x)
        ours = torch.round(y.double() / qp_out[0]).to(torch.int64) + qp_out[1]
    theirs = torch.from_numpy(ort_out.astype(np.int64))
    if ours.shape != theirs.shape:
        raise PlanError(
            f"layer {name!r}: ONNX Runtime's output of node {site.node!r} has shape "
            f"{list(theirs.shape)}, qswap's {list(ours.shape)}; the file does not compute "
            "this layer as the model does. Export it again with qswap.export_onnx()"
        )
    diff = (ours - theirs).abs()
    return LayerAgreement(
        layer=name,
        node=site.node,
        elements=diff.numel(),
        differing=int((diff > 0).sum()),
        max_steps=int(diff.max()) if diff.numel() else 0,
        qparams_match=_same_grid(site.qp_in, qp_in) and _same_grid(site.qp_out, qp_out),
        saturates=name in overflow,
    )


def _same_grid(a: QP, b: QP) -> bool:
    """The same zero point, and scales equal up to their float32 rounding."""
    return a[1] == b[1] and abs(a[0] - b[0]) <= 1e-6 * abs(b[0])
