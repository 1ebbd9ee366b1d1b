"""Graph rewrites for the deconvolution head, applied to the float model before quantization.

ONNX Runtime has no int8 ConvTranspose kernel on CPU: in a QDQ model a ConvTranspose runs as
DequantizeLinear -> float ConvTranspose -> QuantizeLinear. A stride-s ConvTranspose is exactly
s*s ordinary convolutions on the un-upsampled input (one per output phase) whose outputs are
interleaved by DepthToSpace; ORT quantizes those as QLinearConv. The phase convolutions together
carry the same multiply-adds as the ConvTranspose (each kernel tap belongs to exactly one phase).

Derivation, per axis: ConvTranspose writes input row ``i`` with tap ``k`` to output row
``o = i*s - pad_begin + k``. For output phase ``r`` (``o = s*m + r``) the taps with
``(r + pad_begin - k) % s == 0`` read input row ``m + d`` with ``d = (r + pad_begin - k) / s``: a
convolution over offsets ``d_min..d_max`` with pads ``(-d_min, d_max)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass(frozen=True)
class RewriteReport:
    folded_batchnorms: list[str]  # ConvTranspose nodes that absorbed the BatchNormalization after them
    rewritten: list[str]  # ConvTranspose nodes replaced by phase convolutions + DepthToSpace
    skipped: dict[str, str]  # ConvTranspose node -> why it was left as it is


class _Graph:
    """Lookups over a GraphProto that the rewrites keep up to date."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}
        self._names = {n.name for n in self.graph.node} | set(self.inits)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if tensor in n.input]

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def set_array(self, name: str, value: np.ndarray) -> None:
        new = numpy_helper.from_array(value, name)
        if name in self.inits:
            self.inits[name].CopyFrom(new)
        else:
            self.graph.initializer.append(new)
            self.inits[name] = self.graph.initializer[-1]

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def drop_unused_initializers(self) -> None:
        used = {i for n in self.graph.node for i in n.input} | self.outputs
        keep = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        self.inits = {i.name: i for i in self.graph.initializer}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _per_output_channel(weight: np.ndarray, group: int) -> np.ndarray:
    """ConvTranspose weight (Cin, Cout/g, kH, kW) viewed as (g, Cin/g, Cout/g, kH, kW)."""
    cin, cout_g = weight.shape[:2]
    return weight.reshape(group, cin // group, cout_g, *weight.shape[2:])


def fold_deconv_batchnorm(model: onnx.ModelProto) -> list[str]:
    """Fold each inference BatchNormalization that alone consumes a ConvTranspose's output into it.

    PyTorch's exporter folds BatchNorm into Conv but leaves it after ConvTranspose, where it would
    become a separate float op (and a separately quantized tensor) in the INT8 model.
    """
    g = _Graph(model)
    folded = []
    for bn in list(g.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        deconv = next((n for n in g.graph.node if bn.input[0] in n.output), None)
        if deconv is None or deconv.op_type != "ConvTranspose" or deconv.output[0] in g.outputs:
            continue
        if len(g.consumers(deconv.output[0])) != 1:
            continue
        weight = g.array(deconv.input[1])
        params = [g.array(n) for n in bn.input[1:5]]
        if weight is None or any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = _attrs(bn).get("epsilon", 1e-5)
        factor = gamma / np.sqrt(var + eps)
        group = _attrs(deconv).get("group", 1)
        w = _per_output_channel(weight.astype(np.float64), group)
        w = w * factor.reshape(group, 1, -1, *([1] * (weight.ndim - 2)))
        bias = g.array(deconv.input[2]) if len(deconv.input) > 2 and deconv.input[2] else np.zeros(len(factor))
        new_bias = (bias.astype(np.float64) - mean) * factor + beta
        # fresh initializer names: the originals may be shared with other nodes
        w_name, b_name = g.unique(f"{deconv.name or 'deconv'}_W_bnfold"), g.unique(f"{deconv.name or 'deconv'}_B_bnfold")
        g.set_array(w_name, w.reshape(weight.shape).astype(weight.dtype))
        g.set_array(b_name, new_bias.astype(weight.dtype))
        x = deconv.input[0]
        del deconv.input[:]
        deconv.input.extend([x, w_name, b_name])
        deconv.output[0] = bn.output[0]
        g.graph.node.remove(bn)
        folded.append(deconv.name)
    g.drop_unused_initializers()
    return folded



def _phase_taps(kernel: int, stride: int, pad_begin: int, phase: int) -> tuple[list[int], int]:
    """Kernel taps (in offset order) feeding output ``phase`` along one axis, and the smallest offset."""
    taps = [k for k in range(kernel) if (phase + pad_begin - k) % stride == 0]
    offsets = [(phase + pad_begin - k) // stride for k in taps]
    order = np.argsort(offsets)
    return [taps[i] for i in order], min(offsets) if offsets else 0


def _why_not(node: onnx.NodeProto, weight: np.ndarray | None) -> str | None:
    """Why this ConvTranspose cannot become phase convolutions (None when it can)."""
    a = _attrs(node)
    if weight is None:
        return "its weight is not a constant initializer"
    if weight.ndim != 4:
        return f"{weight.ndim - 2}-D deconvolution (only 2-D is rewritten)"
    strides = list(a.get("strides", [1, 1]))
    if len(set(strides)) != 1 or strides[0] < 2:
        return f"strides {strides} (needs equal strides >= 2)"
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        return "dilated"
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or "output_shape" in a:
        return "auto_pad/output_shape set"
    s = strides[0]
    pads = list(a.get("pads", [0, 0, 0, 0]))
    out_pad = list(a.get("output_padding", [0, 0]))
    for axis in (0, 1):
        k = weight.shape[2 + axis]
        if k + out_pad[axis] - pads[axis] - pads[axis + 2] != s:
            return f"kernel {k}, pads {pads}, output_padding {out_pad}: output is not exactly stride x input"
        for r in range(s):
            taps, dmin = _phase_taps(k, s, pads[axis], r)
            dmax = dmin + len(taps) - 1
            if not taps or dmin > 0 or dmax < 0:
                return f"output phase {r} would need a cropped convolution"
    return None


def rewrite_deconvs(model: onnx.ModelProto, *, only: set[str] | None = None,
                    grouped_only: bool = False) -> tuple[list[str], dict[str, str]]:
    """Replace each stride-s ConvTranspose, in place: a group-1 one by s*s phase Convs + Concat +
    DepthToSpace (DCR), same multiply-adds; a grouped one by one grouped Conv + DepthToSpace (CRD).
    ``grouped_only``: leave the group-1 ones alone.

    Returns the rewritten node names and {node: reason} for those left alone.
    """
    g = _Graph(model)
    rewritten, skipped = [], {}
    for node in list(g.graph.node):
        if node.op_type != "ConvTranspose" or (only is not None and node.name not in only):
            continue
        if grouped_only and _attrs(node).get("group", 1) == 1:
            continue
        weight = g.array(node.input[1])
        reason = _why_not(node, weight)
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if not reason and _attrs(node).get("group", 1) != 1 and has_bias and g.array(node.input[2]) is None:
            reason = "grouped, with a bias that is not a constant initializer"
        if reason:
            skipped[node.name] = reason
            continue
        if _attrs(node).get("group", 1) == 1:
            _replace_with_phases(g, node, weight)
        else:
            _replace_with_grouped_conv(g, node, weight)
        rewritten.append(node.name)
    g.drop_unused_initializers()
    return rewritten, skipped


def _replace_with_phases(g: _Graph, node: onnx.NodeProto, weight: np.ndarray) -> None:
    a = _attrs(node)
    s = a["strides"][0]
    group = a.get("group", 1)
    pads = list(a.get("pads", [0, 0, 0, 0]))
    cin, cout_g, kh, kw = weight.shape
    # (Cin, Cout/g, kH, kW) -> Conv layout (Cout, Cin/g, kH, kW)
    w = _per_output_channel(weight, group).transpose(0, 2, 1, 3, 4).reshape(group * cout_g, cin // group, kh, kw)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    base = node.name or "ConvTranspose"
    phase_outputs, new_nodes = [], []
    for ry in range(s):
        taps_y, dmin_y = _phase_taps(kh, s, pads[0], ry)
        for rx in range(s):
            taps_x, dmin_x = _phase_taps(kw, s, pads[1], rx)
            # Conv is cross-correlation over offsets dmin..dmax: tap order = offset order
            wp = np.ascontiguousarray(w[:, :, taps_y][:, :, :, taps_x])
            w_name = g.unique(f"{base}_phase{ry}{rx}_W")
            g.set_array(w_name, wp)
            out = g.unique(f"{base}_phase{ry}{rx}")
            conv_pads = [-dmin_y, -dmin_x, dmin_y + len(taps_y) - 1, dmin_x + len(taps_x) - 1]
            new_nodes.append(helper.make_node(
                "Conv", [node.input[0], w_name] + ([bias] if bias else []), [out], name=out,
                kernel_shape=[len(taps_y), len(taps_x)], pads=conv_pads, strides=[1, 1], group=group))
            phase_outputs.append(out)
    # DCR: output[c, y*s + i, x*s + j] = input[(i*s + j)*C + c, y, x], i.e. phases concatenated in order
    cat = g.unique(f"{base}_phases")
    new_nodes.append(helper.make_node("Concat", phase_outputs, [cat], name=cat, axis=1))
    new_nodes.append(helper.make_node("DepthToSpace", [cat], [node.output[0]], name=g.unique(f"{base}_d2s"),
                                      blocksize=s, mode="DCR"))
    index = list(g.graph.node).index(node)
    g.graph.node.remove(node)
    for offset, new in enumerate(new_nodes):
        g.graph.node.insert(index + offset, new)


def _replace_with_grouped_conv(g: _Graph, node: onnx.NodeProto, weight: np.ndarray) -> None:
    """A grouped (e.g. depthwise) ConvTranspose as ONE grouped Conv + DepthToSpace (CRD).

    Each group's s*s phase kernels are zero-embedded in a common window and stacked as that group's
    output channels, so the Conv's output channel ``c*s*s + i*s + j`` is phase (i, j) of channel c:
    DepthToSpace's CRD order. One Conv instead of s*s phase Convs + Concat keeps a per-output-channel
    weight scale for every phase (quantizers take axis 1 of a ConvTranspose weight, which is 1 wide
    for a depthwise one: one scale for the whole tensor) and a single-input node that NNCF's bias
    correction can cut out. The window costs extra multiply-adds (9 vs 4 taps per phase for kernel 4,
    stride 2), which is little for a grouped convolution.
    """
    a = _attrs(node)
    s = a["strides"][0]
    group = a.get("group", 1)
    pads = list(a.get("pads", [0, 0, 0, 0]))
    cin, cout_g, kh, kw = weight.shape
    w = _per_output_channel(weight, group).transpose(0, 2, 1, 3, 4)  # (g, Cout/g, Cin/g, kH, kW)
    phases = [[_phase_taps(k, s, pads[axis], r) for r in range(s)] for axis, k in enumerate((kh, kw))]
    # common window over all phases: offsets lo..hi per axis
    lo = [min(d for _, d in phases[axis]) for axis in (0, 1)]
    hi = [max(d + len(t) - 1 for t, d in phases[axis]) for axis in (0, 1)]
    size = [h - l + 1 for l, h in zip(lo, hi)]
    out = np.zeros((group, cout_g, s, s, cin // group, *size), dtype=weight.dtype)
    for ry, (taps_y, dmin_y) in enumerate(phases[0]):
        for rx, (taps_x, dmin_x) in enumerate(phases[1]):
            y0, x0 = dmin_y - lo[0], dmin_x - lo[1]
            out[:, :, ry, rx, :, y0:y0 + len(taps_y), x0:x0 + len(taps_x)] = w[..., taps_y, :][..., taps_x]
    base = node.name or "ConvTranspose"
    w_name = g.unique(f"{base}_grouped_W")
    g.set_array(w_name, out.reshape(group * cout_g * s * s, cin // group, *size))
    inputs = [node.input[0], w_name]
    if len(node.input) > 2 and node.input[2]:
        bias = g.array(node.input[2])
        b_name = g.unique(f"{base}_grouped_B")
        g.set_array(b_name, np.repeat(bias, s * s))
        inputs.append(b_name)
    conv_out = g.unique(f"{base}_grouped")
    new_nodes = [
        helper.make_node("Conv", inputs, [conv_out], name=conv_out, kernel_shape=size, strides=[1, 1], group=group,
                         pads=[-lo[0], -lo[1], hi[0], hi[1]]),
        helper.make_node("DepthToSpace", [conv_out], [node.output[0]], name=g.unique(f"{base}_d2s"),
                         blocksize=s, mode="CRD"),
    ]
    index = list(g.graph.node).index(node)
    g.graph.node.remove(node)
    for offset, new in enumerate(new_nodes):
        g.graph.node.insert(index + offset, new)


def deconv_macs(model: onnx.ModelProto) -> int:
    """Multiply-adds per input pixel of all ConvTranspose weights (a size proxy used in reports)."""
    g = _Graph(model)
    return sum(int(g.array(n.input[1]).size) for n in g.graph.node
               if n.op_type == "ConvTranspose" and g.array(n.input[1]) is not None)


def max_relative_diff(a: onnx.ModelProto, b: onnx.ModelProto, input_shape: tuple[int, ...], *, seed: int = 0,
                      runs: int = 2) -> float:
    """max |out_a - out_b| / max |out_a| over seeded N(0,1) inputs, run with ONNX Runtime; the worst output
    when there are several (SimCC's x and y)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = [ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]) for m in (a, b)]
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(runs):
        x = rng.standard_normal(input_shape).astype(np.float32)
        names = [o.name for o in sessions[0].get_outputs()]
        outs_a, outs_b = (s.run(names, {s.get_inputs()[0].name: x}) for s in sessions)
        for ya, yb in zip(outs_a, outs_b):
            worst = max(worst, float(np.abs(ya - yb).max() / max(np.abs(ya).max(), 1e-12)))
    return worst
