"""Activation ranges after the quantizer has placed them, each change kept only where it measurably helps.

Two ways one scale per activation tensor starves part of it, found on the development models
(docs/quantize.md, "INT8 across models"):

- **Borrowed ranges.** A quantizer whose scale was set by other tensors: NNCF gives the inputs of a Concat
  one shared scale, so a branch of range +-1.6 concatenated with one of +-30 keeps a step of 0.22, about
  14 levels (EfficientPose's detection blocks). :func:`own_ranges` gives such a tensor the range it has
  on the calibration crops (NNCF's own estimator: the mean over crops of each crop's min and max) when it
  would use less than half of the codes. The quantized graph stays valid: every Q/DQ pair carries its own
  scale; ONNX Runtime requantizes at the Concat (QLinearConcat takes a scale per input).
- **Depthwise inputs.** A depthwise convolution reads each channel alone, but ONNX Runtime's QLinearConv
  takes one input scale: after Swish or ReLU6 the channels' ranges differ by 100x, and the small ones
  keep a handful of levels (EfficientPose: one such tensor alone cost 5.6% relative heatmap error).
  :func:`depthwise_channel_scales` quantizes the input per channel (scale s_c, the tensor's zero point)
  and dequantizes it with one scale s, folding s_c / s into the depthwise weight scales: the int8 weight
  codes, the integer arithmetic and ORT's fusion stay as they were, and each channel gets a step no
  coarser than before (the same clipping envelope). 5.6% -> 0.2% on that tensor.

:func:`mse_ranges` picks each per-tensor range among clips of the observed extremes by least squared
quantization error. Range changes keep the graph's form: a symmetric quantizer (TensorRT) keeps its zero
point, a convolution's int32 bias follows its input's new scale, and a quantizer moved ahead of a
DepthToSpace or Concat (its zero point may clamp for a ReLU) is left alone.

:func:`refine_ranges` applies each change to a copy and keeps it only when the relative output error
against the float model, measured on calibration crops in the graph's QDQ semantics, drops by
:data:`MIN_GAIN`: on ultralight-simplepose neither helps (its NNCF ranges are already fine) and the
depthwise one costs a little, so a change that helps one model and hurts another is chosen per model.
"""

from __future__ import annotations

import copy
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .qdq import links

LEVELS = 255
USE = 0.5  # a tensor using less than this share of the codes gets its own range
FUSED_OUTPUTS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Concat", "MaxPool", "AveragePool",
                 "GlobalAveragePool", "Relu", "Clip", "DepthToSpace", "Resize", "Transpose", "Reshape"}
MIN_GAIN = 0.05  # a change is kept when it cuts the relative output error by at least 5%


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _session(model: onnx.ModelProto, *, qdq_semantics: bool = False, extra: Iterable[str] = ()):
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in extra)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if qdq_semantics:  # DequantizeLinear -> float op -> QuantizeLinear: what the graph says, on any CPU
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def tensor_stats(model: onnx.ModelProto, tensors: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, dict]:
    """Per tensor of the float ``model``: ``mean_min``/``mean_max`` (mean over crops of each crop's extreme,
    NNCF's MEAN_MINMAX) and ``channel_min``/``channel_max`` (per channel, over everything)."""
    out: dict[str, dict] = {t: {"mean_min": 0.0, "mean_max": 0.0, "channel_min": None, "channel_max": None}
                            for t in tensors}
    if not tensors:
        return out
    sess = _session(model, extra=tensors)
    count = 0
    for feed in feeds:
        for t, x in zip(tensors, sess.run(tensors, feed)):
            s = out[t]
            flat = x.reshape(x.shape[0], -1)
            s["mean_min"] += float(flat.min(axis=1).sum())
            s["mean_max"] += float(flat.max(axis=1).sum())
            if x.ndim == 4:
                lo, hi = x.min(axis=(0, 2, 3)), x.max(axis=(0, 2, 3))
                s["channel_min"] = lo if s["channel_min"] is None else np.minimum(s["channel_min"], lo)
                s["channel_max"] = hi if s["channel_max"] is None else np.maximum(s["channel_max"], hi)
        count += next(iter(feed.values())).shape[0]
    for s in out.values():
        s["mean_min"] /= max(count, 1)
        s["mean_max"] /= max(count, 1)
    return out


def _stats_for(known: dict[str, dict] | None, model: onnx.ModelProto, tensors: list[str],
               feeds: list[dict[str, np.ndarray]]) -> dict[str, dict]:
    """:func:`tensor_stats` of ``tensors``, reusing those already in ``known`` (one pass for every change)."""
    known = dict(known or {})
    missing = [t for t in tensors if t not in known]
    if missing:
        known.update(tensor_stats(model, missing, feeds))
    return known


def _activation_inputs(q: onnx.ModelProto, prepared: onnx.ModelProto) -> list[str]:
    """The float tensors of ``prepared`` that ``q`` quantizes as activations."""
    known = {o for n in prepared.graph.node for o in n.output} | {i.name for i in prepared.graph.input}
    inits = {i.name for i in q.graph.initializer}
    return sorted({n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in known
                   and n.input[0] not in inits})


def _scalar(inits: dict, name: str) -> np.ndarray | None:
    if name not in inits:
        return None
    value = numpy_helper.to_array(inits[name])
    return value if value.size == 1 else None


def _set_new(g: onnx.GraphProto, inits: dict, name: str, value: np.ndarray) -> str:
    base, n = name, 1
    while name in inits:  # a second change to the same tensor (own range, then its MSE range)
        name, n = f"{base}_{n}", n + 1
    tensor = numpy_helper.from_array(value, name)
    g.initializer.append(tensor)
    inits[name] = g.initializer[-1]
    return name


def _zero_for(lo: float, step: np.float32, dtype) -> np.ndarray:
    code = int(round(-lo / float(step)))
    return np.array(np.clip(code, 0, 255) if dtype == np.uint8 else np.clip(code - 128, -128, 127), dtype)


def _plain_quantizers(q: onnx.ModelProto, prepared: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                      stats: dict[str, dict] | None):
    """Per-tensor activation quantizers of ``q`` read only by DequantizeLinear nodes, with the graph's
    initializers, its (producers, consumers) and the statistics of their tensors. One moved ahead of data
    movement (``qdq.quantize_data_movement``: its codes reach the DequantizeLinear through a DepthToSpace or
    Concat, and its zero point may stand in for a ReLU) keeps its range: changing it alone would break that
    chain."""
    g = q.graph
    inits = {i.name: i for i in g.initializer}
    producers, consumers = links(g)
    known = {o for n in prepared.graph.node for o in n.output} | {i.name for i in prepared.graph.input}
    quantizers = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] in known and len(n.input) > 2
                  and _scalar(inits, n.input[1]) is not None and _scalar(inits, n.input[2]) is not None
                  and consumers.get(n.output[0])
                  and all(c.op_type == "DequantizeLinear" for c in consumers[n.output[0]])]
    stats = _stats_for(stats, prepared, sorted({n.input[0] for n in quantizers}), feeds)
    return inits, (producers, consumers), quantizers, stats


def _zero_code(zero: np.ndarray) -> int:
    """The zero point as a code from 0 to LEVELS, whatever the integer type."""
    return int(zero.reshape(-1)[0]) + (128 if zero.dtype == np.int8 else 0)


def _symmetric_step(lo: float, hi: float, z: int) -> float:
    """The finest step that holds [lo, hi] with the zero point kept at code ``z``."""
    return max(hi / max(LEVELS - z, 1), (-lo / z) if z else 0.0)


def own_ranges(q: onnx.ModelProto, prepared: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], *,
               stats: dict[str, dict] | None = None, symmetric: bool = False) -> list[str]:
    """Give each per-tensor activation quantizer that uses less than :data:`USE` of its codes on the
    calibration crops the tensor's own range, in place (``symmetric``: the step alone, the zero point kept,
    as TensorRT requires). Returns the tensors changed."""
    g = q.graph
    inits, graph_links, quantizers, stats = _plain_quantizers(q, prepared, feeds, stats)
    changed = []
    for qn in quantizers:
        scale = float(_scalar(inits, qn.input[1]).reshape(-1)[0])
        zero = _scalar(inits, qn.input[2])
        s = stats[qn.input[0]]
        lo, hi = min(s["mean_min"], 0.0), max(s["mean_max"], 0.0)
        if not hi > lo:
            continue
        if symmetric:
            step = np.float32(_symmetric_step(lo, hi, _zero_code(zero)))
            if not step > 0 or step >= USE * scale:
                continue
        else:
            if hi - lo >= USE * LEVELS * scale:
                continue
            step = np.float32((hi - lo) / LEVELS)
        _set_range(g, inits, graph_links, qn, "own", step, None if symmetric else _zero_for(lo, step, zero.dtype))
        changed.append(qn.input[0])
    return changed


def depthwise_channel_scales(q: onnx.ModelProto, prepared: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], *,
                             stats: dict[str, dict] | None = None) -> list[str]:
    """Per-channel input scales for the depthwise convolutions of a QDQ graph whose input quantizer has one
    scale and feeds only them, folded into their weight scales (see the module's docstring), in place.
    Returns the convolutions changed."""
    g = q.graph
    inits = {i.name: i for i in g.initializer}
    producers, consumers = links(g)
    found = []
    for conv in g.node:
        if conv.op_type != "Conv" or int(_attr(conv, "group", 1)) == 1 or len(conv.input) < 2:
            continue
        dx, dw = producers.get(conv.input[0]), producers.get(conv.input[1])
        if dx is None or dw is None or dx.op_type != "DequantizeLinear" or dw.op_type != "DequantizeLinear":
            continue
        qx = producers.get(dx.input[0])
        w = inits.get(dw.input[0])
        if qx is None or qx.op_type != "QuantizeLinear" or w is None or len(qx.input) < 3 or len(dw.input) < 2:
            continue
        if tuple(w.dims[:2]) != (int(_attr(conv, "group")), 1):  # one input channel per group, one output each
            continue
        if consumers.get(qx.output[0]) != [dx] or consumers.get(dx.output[0]) != [conv]:
            continue
        if _scalar(inits, qx.input[1]) is None or _scalar(inits, qx.input[2]) is None:
            continue
        source = producers.get(qx.input[0])
        if source is not None and (source.op_type in FUSED_OUTPUTS or all(
                producers.get(t) is not None and producers[t].op_type == "DequantizeLinear" for t in source.input)):
            continue  # ORT would fuse this Q into its producer's QLinear op, which takes one output scale only
        found.append((conv, dx, dw, qx))
    stats = _stats_for(stats, prepared, [qx.input[0] for *_, qx in found], feeds)
    changed = []
    for conv, dx, dw, qx in found:
        s = stats[qx.input[0]]
        if s["channel_min"] is None:
            continue
        step = float(_scalar(inits, qx.input[1]).reshape(-1)[0])
        zero = _scalar(inits, qx.input[2])
        z = int(zero.reshape(-1)[0]) + (128 if zero.dtype == np.int8 else 0)  # codes above the zero point
        lo, hi = np.minimum(s["channel_min"], 0.0), np.maximum(s["channel_max"], 0.0)
        need = np.maximum(hi / max(LEVELS - z, 1), (-lo / z) if z else 0.0)
        # never coarser than the one scale (the same clipping envelope); dead channels get a fine step
        per_channel = np.clip(need, step / 256, step).astype(np.float32)
        common = np.float32(per_channel.max())
        channels = per_channel.size
        name = qx.name or qx.output[0]
        qx.input[1] = _set_new(g, inits, f"{name}_channel_scales", per_channel)
        qx.input[2] = _set_new(g, inits, f"{name}_channel_zeros", np.full(channels, zero.reshape(-1)[0], zero.dtype))
        for a in list(qx.attribute):
            if a.name == "axis":
                qx.attribute.remove(a)
        qx.attribute.append(helper.make_attribute("axis", 1))
        dx.input[1] = _set_new(g, inits, f"{dx.name or dx.output[0]}_common_scale", np.array(common, np.float32))
        w_scale = numpy_helper.to_array(inits[dw.input[1]]).astype(np.float32).reshape(-1)
        w_scale = np.broadcast_to(w_scale, (channels,)) * (per_channel / common)
        wname = dw.name or dw.output[0]
        dw.input[1] = _set_new(g, inits, f"{wname}_folded_scales", w_scale.astype(np.float32))
        if len(dw.input) > 2 and dw.input[2] in inits:  # a per-tensor weight's zero point becomes one per channel
            w_zero = numpy_helper.to_array(inits[dw.input[2]])
            dw.input[2] = _set_new(g, inits, f"{wname}_folded_zeros", np.broadcast_to(w_zero.reshape(-1)[:1],
                                                                                    (channels,)).astype(w_zero.dtype))
        for a in list(dw.attribute):
            if a.name == "axis":
                dw.attribute.remove(a)
        dw.attribute.append(helper.make_attribute("axis", 0))
        _rescale_bias(g, inits, producers, conv, common * w_scale.astype(np.float32))
        changed.append(conv.name or conv.output[0])
    return changed


def _set_range(g, inits, graph_links, qn: onnx.NodeProto, tag: str, step: np.float32, zero: np.ndarray | None
               ) -> None:
    """Give ``qn`` and the DequantizeLinear nodes after it the scale ``step`` and (unless None: a symmetric
    quantizer keeps its own) the zero point ``zero``; the int32 bias of a convolution they feed follows the
    new x_scale * w_scale (else ORT leaves that convolution in float)."""
    producers, consumers = graph_links
    name = qn.name or qn.output[0]
    qn.input[1] = _set_new(g, inits, f"{name}_{tag}_scale", np.array(step, np.float32))
    if zero is not None:
        qn.input[2] = _set_new(g, inits, f"{name}_{tag}_zero", zero)
    x_scale = np.float32(step).reshape(-1)
    for dq in consumers.get(qn.output[0], []):
        dq.input[1], dq.input[2] = qn.input[1], qn.input[2]  # every reader is a DequantizeLinear
        for conv in consumers.get(dq.output[0], []):
            if conv.op_type != "Conv" or conv.input[0] != dq.output[0] or len(conv.input) < 3:
                continue
            dw = producers.get(conv.input[1])
            if dw is None or dw.op_type != "DequantizeLinear" or dw.input[1] not in inits:
                continue
            w_scale = numpy_helper.to_array(inits[dw.input[1]]).astype(np.float32).reshape(-1)
            _rescale_bias(g, inits, producers, conv, x_scale * w_scale)


def _rescale_bias(g, inits, producers, conv: onnx.NodeProto, scale: np.ndarray) -> None:
    """An int32 bias behind a DequantizeLinear keeps its float values at the new x_scale * w_scale."""
    if len(conv.input) < 3 or not conv.input[2]:
        return
    db = producers.get(conv.input[2])
    if db is None or db.op_type != "DequantizeLinear" or db.input[0] not in inits:
        return
    old = numpy_helper.to_array(inits[db.input[1]]).astype(np.float64)
    values = numpy_helper.to_array(inits[db.input[0]]).astype(np.float64) * old
    scale = scale.astype(np.float32)
    codes = np.rint(values / scale).clip(-2**31, 2**31 - 1).astype(np.int32)
    name = db.name or db.output[0]
    db.input[0] = _set_new(g, inits, f"{name}_rescaled", codes)
    db.input[1] = _set_new(g, inits, f"{name}_rescaled_scale", scale)
    if len(db.input) > 2 and db.input[2] in inits and numpy_helper.to_array(inits[db.input[2]]).size == 1:
        db.input[2] = _set_new(g, inits, f"{name}_rescaled_zero", np.zeros(scale.size, np.int32))
    if not any(a.name == "axis" for a in db.attribute):
        db.attribute.append(helper.make_attribute("axis", 0))


BINS = 2048
CLIPS = np.linspace(0.25, 1.0, 16)  # candidate ranges, as fractions of the observed extremes


def _histograms(model: onnx.ModelProto, bounds: dict[str, tuple[float, float]], feeds: list[dict[str, np.ndarray]]
                ) -> dict[str, np.ndarray]:
    tensors = sorted(bounds)
    sess = _session(model, extra=tensors)
    hists = {t: np.zeros(BINS) for t in tensors}
    for feed in feeds:
        for t, x in zip(tensors, sess.run(tensors, feed)):
            lo, hi = bounds[t]
            hists[t] += np.histogram(np.clip(x, lo, hi), bins=BINS, range=(lo, hi))[0]
    return hists


def _fake_quant_mse(centers: np.ndarray, counts: np.ndarray, lo: float, hi: float, unsigned: bool) -> float:
    step = (hi - lo) / LEVELS
    zero = np.clip(np.round(-lo / step), 0, LEVELS)
    codes = np.clip(np.round(centers / step) + zero, 0, LEVELS)
    return float((counts * (centers - (codes - zero) * step) ** 2).sum())


def mse_ranges(q: onnx.ModelProto, prepared: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], *,
               stats: dict[str, dict] | None = None, symmetric: bool = False) -> list[str]:
    """Per-tensor activation ranges chosen by the least mean squared quantization error on the calibration
    crops, among clips of the observed extremes (outliers otherwise set the step for everything), in place
    (``symmetric``: the zero point kept, the step alone chosen). Returns the tensors whose range changed."""
    g = q.graph
    inits, graph_links, quantizers, stats = _plain_quantizers(q, prepared, feeds, stats)
    bounds = {}
    for t, s in stats.items():
        lo = min(float(np.min(s["channel_min"])) if s["channel_min"] is not None else s["mean_min"], 0.0)
        hi = max(float(np.max(s["channel_max"])) if s["channel_max"] is not None else s["mean_max"], 0.0)
        if hi > lo:
            bounds[t] = (lo, hi)
    hists = _histograms(prepared, bounds, feeds)
    changed = []
    for qn in quantizers:
        t = qn.input[0]
        if t not in bounds:
            continue
        lo, hi = bounds[t]
        edges = np.linspace(lo, hi, BINS + 1)
        centers, counts = (edges[:-1] + edges[1:]) / 2, hists[t]
        zero = _scalar(inits, qn.input[2])
        scale = float(_scalar(inits, qn.input[1]).reshape(-1)[0])
        z_now = _zero_code(zero)
        now = (-z_now * scale, (LEVELS - z_now) * scale)
        best, best_range = _fake_quant_mse(centers, counts, *now, True), None
        full = _symmetric_step(lo, hi, z_now)
        for c in CLIPS:
            cand = (-z_now * full * c, (LEVELS - z_now) * full * c) if symmetric else (lo * c, hi * c)
            err = _fake_quant_mse(centers, counts, *cand, True)
            if err < 0.98 * best:
                best, best_range = err, cand
        if best_range is None:
            continue
        step = np.float32((best_range[1] - best_range[0]) / LEVELS)
        _set_range(g, inits, graph_links, qn, "mse", step,
                   None if symmetric else _zero_for(best_range[0], step, zero.dtype))
        changed.append(t)
    return changed


def _runs_fused(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> bool:
    """ONNX Runtime builds and runs ``model`` with its fusions on (what the change is for)."""
    try:
        _session(model).run(None, feed)
        return True
    except Exception:  # noqa: BLE001 - ORT's kernels refuse a fused op's arguments in many ways
        return False


def output_error(model: onnx.ModelProto, reference: list[list[np.ndarray]], feeds: list[dict[str, np.ndarray]]
                 ) -> float:
    """sum((out - ref)^2) / sum(ref^2) over every output and crop, ``model`` in its QDQ semantics."""
    sess = _session(model, qdq_semantics=True)
    num = den = 0.0
    for feed, ref in zip(feeds, reference):
        for out, r in zip(sess.run(None, feed), ref):
            r = r.astype(np.float64)
            num += float(((out - r) ** 2).sum())
            den += float((r ** 2).sum())
    return num / den if den else 0.0


def refine_ranges(q: onnx.ModelProto, prepared: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], *,
                  check: list[dict[str, np.ndarray]], depthwise: bool = True, symmetric: bool = False
                  ) -> tuple[onnx.ModelProto, dict]:
    """Try :func:`own_ranges`, :func:`mse_ranges`, then :func:`depthwise_channel_scales` (``depthwise``: ONNX
    Runtime's form), each on a copy of what was kept so far; keep each only when it cuts the output error on
    the ``check`` crops by :data:`MIN_GAIN`.
    Returns the graph and what was tried, measured and kept."""
    reference = [_session(prepared).run(None, f) for f in check]
    error = output_error(q, reference, check)
    stats = tensor_stats(prepared, _activation_inputs(q, prepared), feeds)  # one pass serves every change
    report: dict = {"error_before": error}
    steps = [("own_ranges", own_ranges), ("mse_ranges", mse_ranges)]
    if depthwise:
        steps.append(("depthwise_channel_scales", depthwise_channel_scales))
    for key, change in steps:
        trial = copy.deepcopy(q)
        touched = (change(trial, prepared, feeds, stats=stats) if key == "depthwise_channel_scales"
                   else change(trial, prepared, feeds, stats=stats, symmetric=symmetric))
        if not touched:
            report[key] = {"changed": 0, "kept": False}
            continue
        after = output_error(trial, reference, check)
        kept = after <= (1 - MIN_GAIN) * error and _runs_fused(trial, check[0])
        report[key] = {"changed": len(touched), "error": after, "kept": kept}
        if kept:
            q, error = trial, after
    report["error_after"] = error
    return q, report
