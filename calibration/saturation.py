"""INT8 convolutions and matrix products on CPUs whose u8 x s8 kernels saturate: a model of that arithmetic,
a count of what saturates on real data, and weights that cannot saturate, by construction.

On x86 without VNNI (AVX2, AVX-512 without VNNI) ONNX Runtime's and oneDNN's int8 convolutions multiply
raw uint8 activation codes by int8 weight codes with VPMADDUBSW, which adds each *pair* of neighbouring
products into int16 with saturation (``posequant.core.cpu``). Which two products form a pair
(read from MLAS and oneDNN; docs/int8-on-x86.md gives the sources):

- the reduction runs over (kernel row, kernel column, input channel), channel fastest, per group;
- ONNX Runtime: pairs ``(k, k+1)``, k even, of that flattened order ("flat"), zero-padded at the end;
  with an even channel count these are channel pairs ``(c, c+1)`` within one kernel tap;
- oneDNN (OpenVINO): channel pairs ``(c, c+1)``, c even, within each tap, channels padded per tap ("tap");
- depthwise convolutions widen to int16 or int32 on both: exact; signed activations are shifted into
  uint8 (zero point + 128) before they reach these kernels;
- MatMul and Gemm with int8 constant weights (ORT fuses them into QLinearMatMul, MatMulIntegerToFloat or
  QGemm; oneDNN into its int8 inner product) reduce over K, the weight's input dimension: both pair
  ``(k, k+1)``, k even, zero-padded at the end, i.e. the flat order of a 1x1 convolution with K channels
  (measured bit for bit, ``tests/test_saturation_kernels.py``). Products of two activations (attention) run
  u8 x u8 on ORT, which widens first: exact, and left out.

A pair saturates only if ``|a0*w0 + a1*w1| > 32767``; with ``a <= 255`` that needs two weights of the
same sign with ``|w0| + |w1| > 128``. :func:`fit_pair_scales` gives each output channel that has such a
pair (in either layout) the smallest weight scale under which none is left (at most one bit coarser),
requantizes it from the float weights and moves the mean change into the bias (a MatMul has none: its
mean change stays, a fraction of one weight step): the graph is then exact on every CPU kind.
:func:`saturation_counts` measures how many pair sums of a graph would saturate on real data;
:func:`conv_output_codes` and :func:`matmul_output_codes` compute what a saturating (or exact) kernel
outputs, to check the model against ONNX Runtime and OpenVINO themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from posequant.core.cpu import INT16_MAX, PAIR_WEIGHT_LIMIT

from .qdq import links

LAYOUTS = ("flat", "tap")  # ONNX Runtime's pairing, oneDNN's pairing
LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")  # ORT moves DequantizeLinear past these
INT16_MIN = -INT16_MAX - 1


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@dataclass
class QConv:
    """One convolution (or MatMul / Gemm: ``kind``) of a QDQ graph that runs on int8 kernels: int8 weights,
    integer input codes. A matrix product is described as the 1x1 convolution it reduces like: K input
    channels (the weight's input dimension), N output channels, one tap."""

    node: onnx.NodeProto
    codes: str  # the tensor holding the input's integer codes (what the DequantizeLinear reads)
    x_scale: float
    x_zero: int  # as the kernels see it: uint8 (a signed input's zero point + 128)
    x_signed: bool
    weight: str  # initializer of the int8 weight codes
    w_scale: np.ndarray  # (M,) or (1,)
    bias: str | None  # initializer of the bias: int32 codes behind a DequantizeLinear, or float
    bias_int: bool
    group: int
    transpose: bool
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]
    in_channels: int = 0  # per group
    out_channels: int = 0  # in all
    kind: str = "conv"  # "conv"; "matmul": weight K x N (MatMul, Gemm transB=0); "gemm": weight N x K (transB=1)
    # ``codes`` holds the dequantized input past layout ops (DequantizeLinear -> Reshape -> MatMul, which ORT
    # fuses by moving the DequantizeLinear down): read back into codes by :func:`input_codes`
    codes_dequantized: bool = False

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def depthwise(self) -> bool:
        return self.in_channels == 1 and self.group > 1

    @property
    def saturates(self) -> bool:
        """Whether a saturating CPU runs it through VPMADDUBSW (depthwise kernels widen: exact)."""
        return not self.depthwise

    @property
    def channel_axis(self) -> int:
        """The input's channel axis: 1 for a convolution's N x C x H x W, the last for a matrix product's ... x K."""
        return 1 if self.kind == "conv" else -1


def _const(inits: dict, name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _int8_weight(inits: dict, dw: onnx.NodeProto, ndim: int) -> np.ndarray | None:
    """The int8 weight codes a DequantizeLinear reads, when they are constant, of rank ``ndim`` and symmetric
    (zero point 0: what posequant writes; asymmetric weights are left alone); else None."""
    w = _const(inits, dw.input[0])
    if w is None or w.dtype != np.int8 or w.ndim != ndim:
        return None
    w_zero = _const(inits, dw.input[2]) if len(dw.input) > 2 else None
    return None if w_zero is not None and w_zero.any() else w


def _input_quantization(inits: dict, dx: onnx.NodeProto) -> tuple[float, int, bool] | None:
    """(scale, zero point as the kernels see it: uint8, signed or not) of an input DequantizeLinear with one scale;
    None for per-channel activations (OpenVINO's depthwise inputs: not on the u8s8 GEMM path)."""
    sx, zx = _const(inits, dx.input[1]), _const(inits, dx.input[2]) if len(dx.input) > 2 else None
    if sx is None or sx.size != 1:
        return None
    signed = zx is not None and zx.dtype == np.int8
    zero = int(zx.reshape(-1)[0]) + (128 if signed else 0) if zx is not None else (128 if signed else 0)
    return float(sx.reshape(-1)[0]), zero, signed


def _bias(inits: dict, producers: dict, node: onnx.NodeProto) -> tuple[str | None, bool]:
    """The initializer of a node's bias (its third input) and whether it is int32 codes behind a DequantizeLinear."""
    if len(node.input) < 3 or not node.input[2]:
        return None, False
    db = producers.get(node.input[2])
    if db is not None and db.op_type == "DequantizeLinear" and db.input[0] in inits:
        return db.input[0], True
    return (node.input[2], False) if node.input[2] in inits else (None, False)


def quantized_convs(model: onnx.ModelProto) -> list[QConv]:
    """The Conv/ConvTranspose nodes whose input and weights come through DequantizeLinear from integer codes."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers, _ = links(g)
    out = []
    for n in g.node:
        if n.op_type not in ("Conv", "ConvTranspose") or len(n.input) < 2:
            continue
        dx, dw = producers.get(n.input[0]), producers.get(n.input[1])
        if not (dx is not None and dw is not None and dx.op_type == dw.op_type == "DequantizeLinear"):
            continue
        w, x = _int8_weight(inits, dw, 4), _input_quantization(inits, dx)
        if w is None or x is None:
            continue
        bias, bias_int = _bias(inits, producers, n)
        group = int(_attr(n, "group", 1))
        transpose = n.op_type == "ConvTranspose"
        kernel = tuple(int(k) for k in w.shape[2:])
        pads = tuple(int(p) for p in _attr(n, "pads", [0, 0, 0, 0]))
        in_ch = w.shape[0] // group if transpose else w.shape[1]
        out_ch = w.shape[1] * group if transpose else w.shape[0]
        out.append(QConv(n, dx.input[0], *x, dw.input[0],
                         _const(inits, dw.input[1]).reshape(-1).astype(np.float32), bias, bias_int, group,
                         transpose, kernel, tuple(int(s) for s in _attr(n, "strides", [1, 1])), pads,
                         tuple(int(d) for d in _attr(n, "dilations", [1, 1])), in_ch, out_ch))
    return out


def quantized_matmuls(model: onnx.ModelProto) -> list[QConv]:
    """The MatMul/Gemm nodes whose input comes through DequantizeLinear from integer codes and whose second input
    is a constant int8 weight (per tensor, or per output column), as the 1x1 convolutions they reduce like."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers, _ = links(g)
    out = []
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            continue
        if n.op_type == "Gemm" and (_attr(n, "transA", 0) or _attr(n, "alpha", 1.0) != 1.0
                                    or _attr(n, "beta", 1.0) != 1.0):
            continue  # not what quantizers write; left alone
        dx, dw = producers.get(n.input[0]), producers.get(n.input[1])
        moved = False  # ORT moves a DequantizeLinear past layout ops onto the MatMul, then fuses it
        while dx is not None and dx.op_type in LAYOUT_OPS:
            dx, moved = producers.get(dx.input[0]), True
        if not (dx is not None and dw is not None and dx.op_type == dw.op_type == "DequantizeLinear"):
            continue
        w, x = _int8_weight(inits, dw, 2), _input_quantization(inits, dx)
        if w is None or x is None:
            continue
        kind = "gemm" if n.op_type == "Gemm" and _attr(n, "transB", 0) else "matmul"
        k_dim, n_dim = (1, 0) if kind == "gemm" else (0, 1)
        w_scale = _const(inits, dw.input[1]).reshape(-1).astype(np.float32)
        if w_scale.size > 1 and (w_scale.size != w.shape[n_dim] or _attr(dw, "axis", 1) % 2 != n_dim):
            continue  # scales along K: not one scale per output; left alone
        bias, bias_int = _bias(inits, producers, n)  # a MatMul has two inputs: none
        out.append(QConv(n, n.input[0] if moved else dx.input[0], *x, dw.input[0], w_scale, bias, bias_int, 1,
                         False, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), int(w.shape[k_dim]), int(w.shape[n_dim]),
                         kind, moved))
    return out


def input_codes(value: np.ndarray, op: QConv) -> np.ndarray:
    """The integer codes of an op's input as captured (:func:`capture_codes`): as they are, or read back from the
    dequantized values (exact: (code - zero) * scale in float32, divided by the scale, rounds to the code)."""
    if not op.codes_dequantized:
        return value
    zero = op.x_zero - (128 if op.x_signed else 0)
    codes = np.rint(np.asarray(value, np.float32) / np.float32(op.x_scale)) + zero
    return codes.astype(np.int8 if op.x_signed else np.uint8)


def quantized_ops(model: onnx.ModelProto) -> list[QConv]:
    """Every operation of the graph that runs on int8 weight kernels: convolutions, then matrix products."""
    return quantized_convs(model) + quantized_matmuls(model)


# ---- pairs ------------------------------------------------------------------------------------------


def reduction_weights(w: np.ndarray, conv: QConv) -> np.ndarray:
    """The weights as (output channel, K) with K = (kernel row, kernel column, input channel of its group),
    channel fastest: the order the kernels reduce over (a matrix product: (N, K))."""
    if conv.kind != "conv":
        return w.T if conv.kind == "matmul" else w
    kh, kw = conv.kernel
    if conv.transpose:  # (C_in, M/g, kh, kw): output channel m of group g reads input channels of group g
        cin_g, m_g = conv.in_channels, w.shape[1]
        w = w.reshape(conv.group, cin_g, m_g, kh, kw).transpose(0, 2, 3, 4, 1).reshape(conv.group * m_g, -1)
        return w
    return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


def pair_index(channels: int, taps: int, layout: str) -> np.ndarray:
    """(P, 2) indices into the K of one output channel that a kernel adds as one int16 pair."""
    k = taps * channels
    if layout == "flat":
        first = np.arange(0, k - 1, 2)
        return np.stack([first, first + 1], axis=1)
    if layout != "tap":
        raise ValueError(layout)
    c = np.arange(0, channels - 1, 2)
    return np.concatenate([np.stack([t * channels + c, t * channels + c + 1], axis=1) for t in range(taps)])


def conv_pairs(conv: QConv) -> np.ndarray:
    """Every (i, j) pair of K that some kernel adds in int16, in either layout (the same when channels are even)."""
    taps = conv.kernel[0] * conv.kernel[1]
    both = np.concatenate([pair_index(conv.in_channels, taps, layout) for layout in LAYOUTS])
    return np.unique(both, axis=0)


def risky(w2: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(R, 3) rows (m, i, j): weight pairs that can saturate, i.e. the same sign and |w_i| + |w_j| > 128."""
    a, b = w2[:, pairs[:, 0]].astype(np.int32), w2[:, pairs[:, 1]].astype(np.int32)
    bad = (a * b > 0) & (np.abs(a) + np.abs(b) > PAIR_WEIGHT_LIMIT)
    m, p = np.nonzero(bad)
    return np.stack([m, pairs[p, 0], pairs[p, 1]], axis=1)


# ---- saturation-free weights ------------------------------------------------------------------------


@dataclass
class PairFit:
    """What :func:`fit_pair_scales` changed."""

    convs: int = 0  # convolutions on the saturating kernels
    matmuls: int = 0  # MatMul / Gemm with int8 weights, on the same kernels
    channels: int = 0  # output channels (weight scales) whose scale grew
    of_channels: int = 0  # output channels of those convolutions
    bits: dict[str, float] = field(default_factory=dict)  # conv -> effective bits of its coarsest channel

    def to_dict(self) -> dict:
        return {"convs": self.convs, "matmuls": self.matmuls, "channels_rescaled": self.channels,
                "channels": self.of_channels, "coarsest_bits": min(self.bits.values(), default=8.0)}


def _pair_peak(w2: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(M,) per output channel, the largest |w_i| + |w_j| over same-sign pairs (0 when there is none)."""
    a, b = w2[:, pairs[:, 0]], w2[:, pairs[:, 1]]
    return np.where(a * b > 0, np.abs(a) + np.abs(b), 0).max(axis=1, initial=0)


def fit_pair_scales(model: onnx.ModelProto, float_weights: dict[str, np.ndarray], *,
                    input_means: dict[str, np.ndarray] | None = None) -> PairFit:
    """Give every non-depthwise quantized convolution weight scales under which no pair of its int8
    weights (ONNX Runtime's or oneDNN's pairing) can saturate an int16 sum, in place.

    Per weight scale (output channel), the smallest scale with ``|w_i| + |w_j| <= 128`` for every
    same-sign pair: channels that have no such pair keep their 8-bit scale, the others lose at most one
    bit. The weights are requantized from ``float_weights`` (conv node name -> float weight, the graph
    NNCF quantized); with ``input_means`` (codes tensor -> mean code per input channel) the mean change
    of each output moves into the bias, as bias correction does.
    """
    report = PairFit()
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers, consumers = links(g)
    for conv in quantized_ops(model):
        if not conv.saturates or conv.name not in float_weights:
            continue
        if conv.kind == "conv":
            report.convs += 1
        else:
            report.matmuls += 1
        w_old = numpy_helper.to_array(inits[conv.weight]).astype(np.float64)
        real = np.asarray(float_weights[conv.name], np.float64)
        old = _weight_scales(conv, w_old.shape).astype(np.float64)
        pairs = conv_pairs(conv)
        index = _scale_index(conv)  # row of the reduction weights -> its scale
        original = conv.w_scale.astype(np.float64).copy()
        scales = original.copy()
        peak = np.zeros_like(scales)
        np.maximum.at(peak, index, _pair_peak(reduction_weights(real, conv), pairs))
        need = peak / (PAIR_WEIGHT_LIMIT - 1)  # rounding adds at most one code to a pair
        grow = need > scales
        report.of_channels += scales.size
        if not grow.any():
            continue
        scales = np.where(grow, need, scales).astype(np.float32)
        w_new = _requantize(real, conv, scales)
        while True:  # float32 rounding of the scale can still leave a pair at 129: widen that scale a hair
            over = np.zeros(scales.size, bool)
            np.logical_or.at(over, index, _pair_peak(reduction_weights(w_new, conv), pairs) > PAIR_WEIGHT_LIMIT)
            if not over.any():
                break
            wider = np.nextafter(scales * np.float32(1.0005), np.float32(np.inf))
            scales = np.where(over, wider, scales).astype(np.float32)
            w_new = _requantize(real, conv, scales)
        report.channels += int(grow.sum())
        # levels of the coarsest channel: 2 * 127 * (8-bit scale / fitted scale) + 1
        report.bits[conv.name] = round(float(np.log2(2 * 127 * (original / scales).min() + 1)), 2)
        conv.w_scale = scales
        dw = producers[conv.node.input[1]]
        _set(g, inits, consumers, dw, 0, numpy_helper.from_array(w_new.astype(np.int8), conv.weight))
        # a per-tensor scale stays one value in its own shape (a per-axis one would need an axis attribute)
        _set(g, inits, consumers, dw, 1, numpy_helper.from_array(_like(scales, inits[dw.input[1]]), dw.input[1]))
        if conv.bias is not None:
            shift = np.zeros(conv.out_channels)
            if input_means is not None and conv.codes in input_means:
                change = w_new * _weight_scales(conv, w_old.shape) - w_old * old  # float weight units
                shift = _mean_output_change(conv, change, input_means[conv.codes])
            _rebias(g, inits, producers, consumers, conv, shift)
    return report


def _scale_index(conv: QConv) -> np.ndarray:
    """(M,) which weight scale each output channel (row of the reduction weights) uses."""
    m = np.arange(conv.out_channels)
    if conv.w_scale.size == 1:
        return np.zeros_like(m)
    return m % conv.w_scale.size if conv.transpose else m


def _requantize(real: np.ndarray, conv: QConv, scales: np.ndarray) -> np.ndarray:
    conv.w_scale = scales.astype(np.float32)
    return np.clip(np.rint(real / _weight_scales(conv, real.shape).astype(np.float64)), -127, 127)


def _set(g: onnx.GraphProto, inits: dict, consumers: dict, node: onnx.NodeProto, slot: int,
         value: onnx.TensorProto) -> None:
    """Replace input ``slot`` of ``node`` with ``value``; an initializer other nodes read too gets a copy."""
    name = node.input[slot]
    if len(consumers.get(name, [])) > 1:
        value.name = f"{name}_pairfit_{node.name or node.output[0]}"
        g.initializer.append(value)
        inits[value.name] = g.initializer[-1]
        consumers[name] = [n for n in consumers[name] if n is not node]
        consumers[value.name] = [node]
        node.input[slot] = value.name
    else:
        value.name = name
        inits[name].CopyFrom(value)


def _mean_output_change(conv: QConv, change: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(M,) mean change of each output, sum_k dw_k * mean input_k (dequantized), over the positions."""
    taps = conv.kernel[0] * conv.kernel[1]
    m_per_group = conv.out_channels // conv.group
    mu = (np.asarray(means, np.float64) - conv.x_zero) * conv.x_scale
    per_group = mu.reshape(conv.group, conv.in_channels)
    x = np.stack([np.tile(per_group[m // m_per_group], taps) for m in range(conv.out_channels)])  # (M, K)
    shift = (reduction_weights(change, conv) * x).sum(axis=1)
    if conv.transpose:  # an output pixel of a stride-s deconvolution receives 1/s^2 of the taps on average
        shift /= conv.strides[0] * conv.strides[1]
    return shift


def _rebias(g, inits, producers, consumers, conv: QConv, shift: np.ndarray) -> None:
    """Subtract ``shift`` (float units) from the bias; an int32 bias is requantized at x_scale * w_scale."""
    if not conv.bias_int:
        b = numpy_helper.to_array(inits[conv.bias])
        node = next(n for n in consumers[conv.bias] if n is conv.node)
        _set(g, inits, consumers, node, 2, numpy_helper.from_array((b - shift).astype(b.dtype), conv.bias))
        return
    db = producers[conv.node.input[2]]
    b = numpy_helper.to_array(inits[db.input[0]]).astype(np.float64) * numpy_helper.to_array(inits[db.input[1]])
    scale = (np.float32(conv.x_scale) * output_scales(conv).astype(np.float32)).astype(np.float32)
    codes = np.rint((b - shift) / scale).clip(-2**31, 2**31 - 1).astype(np.int32)
    _set(g, inits, consumers, db, 0, numpy_helper.from_array(codes, db.input[0]))
    _set(g, inits, consumers, db, 1, numpy_helper.from_array(_like(scale, inits[db.input[1]]), db.input[1]))


def _like(scales: np.ndarray, old: onnx.TensorProto) -> np.ndarray:
    """``scales`` in the shape of the scale they replace: one value stays a scalar or [1] (per tensor: the
    values are all equal then), so the DequantizeLinear's axis and zero point still fit."""
    size = int(np.prod(old.dims)) if old.dims else 1
    if size == 1:
        return np.asarray(scales, np.float32).reshape(-1)[:1].reshape(tuple(old.dims))
    return np.asarray(scales, np.float32)


def _weight_scales(conv: QConv, shape: tuple[int, ...]) -> np.ndarray:
    """The weight scales broadcast to the weight's shape (per output channel: Conv axis 0, ConvTranspose axis 1,
    MatMul's K x N axis 1, Gemm's N x K axis 0)."""
    if conv.w_scale.size == 1:
        return conv.w_scale.reshape((1,) * len(shape))
    if conv.kind != "conv":
        return conv.w_scale.reshape((1, -1) if conv.kind == "matmul" else (-1, 1))
    return conv.w_scale.reshape((1, -1, 1, 1) if conv.transpose else (-1, 1, 1, 1))


def output_scales(conv: QConv) -> np.ndarray:
    """(M,) weight scale of each output channel."""
    if conv.w_scale.size == 1:
        return np.full(conv.out_channels, conv.w_scale[0], np.float32)
    return np.tile(conv.w_scale, conv.group) if conv.transpose else conv.w_scale


# ---- the arithmetic on data -------------------------------------------------------------------------


def _windows(x: np.ndarray, conv: QConv) -> Iterator[np.ndarray]:
    """For each kernel tap (row-major), the (N, C, Ho, Wo) input codes it multiplies, padding = zero point."""
    top, left, bottom, right = conv.pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=conv.x_zero)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel, conv.strides, conv.dilations
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    for i in range(kh):
        for j in range(kw):
            yield xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]


def im2col(x: np.ndarray, conv: QConv) -> np.ndarray:
    """(N, Ho, Wo, group, K) input codes, K = (tap, channel) as :func:`reduction_weights`."""
    taps = np.stack(list(_windows(x, conv)), axis=1)  # (N, T, C, Ho, Wo)
    n, t, c, ho, wo = taps.shape
    taps = taps.reshape(n, t, conv.group, c // conv.group, ho, wo)
    return taps.transpose(0, 4, 5, 2, 1, 3).reshape(n, ho, wo, conv.group, t * (c // conv.group))


def kernel_codes(x: np.ndarray, conv: QConv) -> np.ndarray:
    """Input codes as the kernels see them: uint8 values (signed inputs shifted by 128), as int32."""
    x = np.asarray(x)
    return x.astype(np.int32) + 128 if conv.x_signed else x.astype(np.int32)


@dataclass
class ConvSaturation:
    name: str
    pairs: int  # pair sums computed over the data (every pair of every output position)
    saturated: int  # of them, outside int16
    worst: int  # the largest |pair sum| seen among pairs that can saturate (0: none can)


def conv_saturation(conv: QConv, w: np.ndarray, x: np.ndarray) -> ConvSaturation:
    """Count the int16 pair sums (ONNX Runtime's pairing) of ``conv`` that saturate on input codes ``x``."""
    if conv.transpose:
        raise ValueError("the saturation model covers Conv; ConvTranspose runs in float on ONNX Runtime CPU")
    codes = kernel_codes(x, conv)
    w2 = reduction_weights(w, conv).astype(np.int32)
    taps = conv.kernel[0] * conv.kernel[1]
    pairs = pair_index(conv.in_channels, taps, "flat")
    windows = list(_windows(codes, conv))
    positions = windows[0].shape[0] * windows[0].shape[2] * windows[0].shape[3]
    total, hit, worst = positions * conv.out_channels * len(pairs), 0, 0
    m_per_group = conv.out_channels // conv.group
    for m, i, j in risky(w2, pairs):
        g = m // m_per_group
        ci, cj = g * conv.in_channels + i % conv.in_channels, g * conv.in_channels + j % conv.in_channels
        s = w2[m, i] * windows[i // conv.in_channels][:, ci] + w2[m, j] * windows[j // conv.in_channels][:, cj]
        hit += int(np.count_nonzero((s > INT16_MAX) | (s < INT16_MIN)))
        worst = max(worst, int(np.abs(s).max()))
    return ConvSaturation(conv.name, total, hit, worst)


def conv_accumulators(conv: QConv, w: np.ndarray, x: np.ndarray, *, saturate: bool,
                      layout: str = "flat") -> np.ndarray:
    """The int32 accumulators (N, M, Ho, Wo) the kernels compute, bias left out: exact, or with the
    int16 saturation of the AVX2 / AVX-512 (no VNNI) u8s8 kernels, pairing as ONNX Runtime ("flat") or
    oneDNN, i.e. OpenVINO ("tap") does."""
    codes = kernel_codes(x, conv)
    cols = im2col(codes, conv).astype(np.int64)  # (N, Ho, Wo, G, K)
    w2 = reduction_weights(w, conv).astype(np.int64)  # (M, K)
    m_per_group = conv.out_channels // conv.group
    wg = w2.reshape(conv.group, m_per_group, -1)
    acc = np.einsum("nhwgk,gmk->nhwgm", cols, wg).reshape(*cols.shape[:3], conv.out_channels)
    acc -= conv.x_zero * w2.sum(axis=1)  # the zero point, exact in both (row sums)
    if saturate and conv.saturates:
        pairs = pair_index(conv.in_channels, conv.kernel[0] * conv.kernel[1], layout)
        for m, i, j in risky(w2.astype(np.int32), pairs):
            g = m // m_per_group
            s = w2[m, i] * cols[..., g, i] + w2[m, j] * cols[..., g, j]
            acc[..., m] += np.clip(s, INT16_MIN, INT16_MAX) - s
    return acc.transpose(0, 3, 1, 2)


def conv_output_codes(conv: QConv, w: np.ndarray, bias: np.ndarray | None, x: np.ndarray, y_scale: float,
                      y_zero: int, *, saturate: bool, y_dtype=np.uint8, layout: str = "flat") -> np.ndarray:
    """The output codes of the fused kernel (ONNX Runtime's QLinearConv): accumulators plus the int32 bias,
    requantized in float32 by x_scale * w_scale / y_scale, rounded half to even, plus the zero point."""
    acc = conv_accumulators(conv, w, x, saturate=saturate, layout=layout)
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64).reshape(1, -1, 1, 1)
    scale = (np.float32(conv.x_scale) * output_scales(conv).astype(np.float32)) / np.float32(y_scale)
    y = np.rint(acc.astype(np.float32) * scale.reshape(1, -1, 1, 1).astype(np.float32)) + y_zero
    info = np.iinfo(y_dtype)
    return np.clip(y, info.min, info.max).astype(y_dtype)


def matmul_accumulators(op: QConv, w: np.ndarray, x: np.ndarray, *, saturate: bool) -> np.ndarray:
    """The int32 accumulators (..., N) a MatMul / Gemm kernel computes from input codes ``x`` (..., K), bias left
    out: exact, or with the int16 pair saturation (pairs (k, k+1), k even: ORT's and oneDNN's alike)."""
    codes = kernel_codes(x, op).astype(np.int64)
    w2 = reduction_weights(w, op).astype(np.int64)  # (N, K)
    acc = codes @ w2.T - op.x_zero * w2.sum(axis=1)
    if saturate and op.saturates:
        for m, i, j in risky(w2.astype(np.int32), pair_index(op.in_channels, 1, "flat")):
            s = w2[m, i] * codes[..., i] + w2[m, j] * codes[..., j]
            acc[..., m] += np.clip(s, INT16_MIN, INT16_MAX) - s
    return acc


def matmul_output_codes(op: QConv, w: np.ndarray, bias: np.ndarray | None, x: np.ndarray, y_scale: float,
                        y_zero: int, *, saturate: bool, y_dtype=np.uint8) -> np.ndarray:
    """The output codes of ORT's QLinearMatMul / QGemm: the accumulators plus the int32 bias, requantized in float32
    by x_scale * w_scale / y_scale, rounded half to even, plus the zero point."""
    acc = matmul_accumulators(op, w, x, saturate=saturate)
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64)
    scale = (np.float32(op.x_scale) * output_scales(op).astype(np.float32)) / np.float32(y_scale)
    y = np.rint(acc.astype(np.float32) * scale.astype(np.float32)) + y_zero
    info = np.iinfo(y_dtype)
    return np.clip(y, info.min, info.max).astype(y_dtype)


def capture_codes(model: onnx.ModelProto, convs: Iterable[QConv], feeds: Iterable[dict[str, np.ndarray]]
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Per feed, the input codes of ``convs`` in the graph's own (exact) semantics: ONNX Runtime with
    graph optimizations off runs DequantizeLinear -> float op -> QuantizeLinear."""
    import onnxruntime as ort

    names = sorted({c.codes for c in convs})
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    for name in names:
        if name not in known:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    for feed in feeds:
        values = dict(zip(outputs, session.run(None, feed)))
        yield {name: values[name] for name in names}


def saturation_counts(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]]) -> list[ConvSaturation]:
    """For each quantized Conv on the saturating kernels, how many of its pair sums would saturate on
    ``feeds`` (ONNX Runtime's pairing, on AVX2 or AVX-512 without VNNI)."""
    convs = [c for c in quantized_convs(model) if c.saturates and not c.transpose]
    inits = {i.name: i for i in model.graph.initializer}
    weights = {c.name: numpy_helper.to_array(inits[c.weight]) for c in convs}
    totals = {c.name: ConvSaturation(c.name, 0, 0, 0) for c in convs}
    for codes in capture_codes(model, convs, feeds):
        for c in convs:
            r = conv_saturation(c, weights[c.name], codes[c.codes])
            t = totals[c.name]
            t.pairs, t.saturated, t.worst = t.pairs + r.pairs, t.saturated + r.saturated, max(t.worst, r.worst)
    return list(totals.values())


def input_means(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean kernel code per input channel of every quantized convolution's (and matrix product's: per K) input,
    over ``feeds``."""
    convs = [c for c in quantized_ops(model) if c.saturates]
    sums: dict[str, np.ndarray] = {}
    count = 0
    for codes in capture_codes(model, convs, feeds):
        count += 1
        for c in convs:
            x = np.moveaxis(kernel_codes(input_codes(codes[c.codes], c), c), c.channel_axis, -1)
            sums[c.codes] = sums.get(c.codes, 0) + x.reshape(-1, x.shape[-1]).mean(axis=0)
    return {k: v / max(count, 1) for k, v in sums.items()}


# ---- a graph made for one CPU kind, run on another ---------------------------------------------------


def risky_pairs(model: onnx.ModelProto) -> int:
    """Weight pairs of the graph's quantized convolutions and matrix products that can saturate an int16 sum
    with some input."""
    inits = {i.name: i for i in model.graph.initializer}
    total = 0
    for conv in quantized_ops(model):
        if conv.saturates:
            w2 = reduction_weights(numpy_helper.to_array(inits[conv.weight]), conv).astype(np.int32)
            total += len(risky(w2, conv_pairs(conv)))
    return total


def quantization_settings(model: onnx.ModelProto) -> dict:
    """The settings posequant stamped into an INT8 model ({} for other files)."""
    import json

    entry = next((p.value for p in model.metadata_props if p.key == "quantization"), None)
    try:
        return json.loads(entry) if entry else {}
    except ValueError:
        return {}


def cpu_mismatch(model: onnx.ModelProto, label: str, here, backend: str | None = None) -> str | None:
    """One line when an INT8 graph was not made for this CPU kind (``here``, a ``CpuKind``) and that matters:
    a graph that can saturate on a saturating CPU (on ``backend``'s kernels; None: on any backend's), or a
    pair-fitted graph on a CPU that needs no fit."""
    settings = quantization_settings(model)
    made_for = settings.get("cpu")
    fitted = settings.get("pair_fit") is not None
    saturates = here.saturates_on(backend) if backend else here.saturates
    if saturates:
        if fitted:
            return None
        n = risky_pairs(model)
        if not n:
            return None
        source = f"quantized for {made_for}" if made_for else "not made by posequant for this CPU kind"
        names = {"ort": "ONNX Runtime", "openvino": "OpenVINO"}
        on = "" if backend or set(here.saturating) == {"ort", "openvino"} else \
            f" on {' and '.join(names[b] for b in here.saturating)}"
        return (f"{label} was {source}, but this CPU ({here.name}) adds int8 products in saturating int16 pairs{on}: "
                f"{n} of its weight pairs can saturate here, so INT8 computes other values than its graph says; "
                f"re-quantize with --cpu {here.name} (or --cpu portable) for a graph that is exact on every CPU")
    if fitted and made_for != here.name and here.saturates is False:  # no backend needs the fit here
        fit = settings["pair_fit"]
        return (f"{label} was quantized for {made_for}: {fit['channels_rescaled']} of {fit['channels']} weight scales "
                f"were widened (up to one bit) so that no int16 pair can saturate; this CPU ({here.name}) computes "
                f"exactly either way, so --cpu {here.name} would keep full 8-bit weights")
    return None


def exact_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with its int8 weight codes as uint8 (code + 128, zero point + 128): every dequantized
    value is unchanged, but ONNX Runtime then runs its u8u8 kernels, which widen both operands to int16
    before multiplying (PMADDWD: int32 products and sums), so they are exact on every x86 CPU kind. Run on
    ONNX Runtime, it gives the bit-exact integer results of the graph's int8 semantics on any machine: what
    a VNNI or AMX CPU computes for the original file. A reference for tests and measurements; ship the
    original (u8u8 is slower, and oneDNN takes no uint8 weights)."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    inits = {i.name: i for i in twin.graph.initializer}
    shifted: set[str] = set()
    for n in twin.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        if inits[n.input[0]].data_type != onnx.TensorProto.INT8:
            continue
        names = [n.input[0]]
        if len(n.input) > 2 and n.input[2] in inits:
            names.append(n.input[2])
        else:  # no zero point: it is 0, so the twin needs one of 128 in the scale's shape
            zero = numpy_helper.from_array(np.full(tuple(inits[n.input[1]].dims), 128, np.uint8),
                                           f"{n.input[0]}_twin_zero")
            twin.graph.initializer.append(zero)
            del n.input[2:]
            n.input.append(zero.name)
        for name in names:
            if name in shifted:
                continue
            shifted.add(name)
            codes = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
            inits[name].CopyFrom(numpy_helper.from_array(codes.astype(np.uint8), name))
    return twin
