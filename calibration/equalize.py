"""Activation-range equalization: even out the channels of ReLU activations before INT8.

ORT's QLinearConv (and TensorRT) take one activation scale per tensor. When one channel of a
tensor spans 0..8 and most others 0..0.3, the small channels get a handful of levels: on the
trained model the ReLU between the head's second pointwise convolution and the last deconvolution
loses 6.8% (relative) to rounding alone, three times the next-worst tensor.

ReLU commutes with a positive per-channel scale, so for ``Conv1 -> ReLU -> Conv2`` (optionally
``Conv1 -> DepthToSpace -> ReLU -> Conv2``, the rewritten depthwise deconvolution) dividing channel c
of Conv1's weights and bias by ``a_c`` and multiplying Conv2's weights for input channel c by
``a_c`` leaves the float model unchanged (Nagel et al., "Data-Free Quantization", 2019, use the
same identity on weight ranges). We choose ``a_c`` from activation ranges measured on calibration
crops: for a depthwise Conv2 (each channel on its own, per-channel weight scales) the ranges are
made equal; for a dense Conv2 the range is split between activation and weight, SmoothQuant-style
(``a_c = sqrt(range_c / weight_range_c)``), since its input columns share a weight scale.
ReLU6 (Clip) does not commute with scaling, so MobileNet's backbone is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .qdq import links

DEAD = 1e-3  # channels below this fraction of the largest range are left alone (scaling them up amplifies noise)


@dataclass(frozen=True)
class Pair:
    conv1: int  # positions in graph.node (names may be empty or repeated)
    conv2: int
    tensor: str  # the ReLU output between them: the tensor being equalized
    block: int  # DepthToSpace block between Conv1 and ReLU (1: none), CRD order
    depthwise: bool  # Conv2 sees each input channel on its own


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def find_pairs(model: onnx.ModelProto) -> list[Pair]:
    """``Conv -> [DepthToSpace CRD] -> Relu -> Conv`` chains whose middle tensors feed nothing else."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    producer, consumers = links(g)
    outputs = {o.name for o in g.output}

    def only(t: str) -> onnx.NodeProto | None:
        c = consumers.get(t, [])
        return c[0] if len(c) == 1 and t not in outputs else None

    index = {id(n): i for i, n in enumerate(g.node)}
    pairs = []
    for relu in g.node:
        if relu.op_type != "Relu":
            continue
        conv2 = only(relu.output[0])
        if conv2 is None or conv2.op_type != "Conv" or conv2.input[0] != relu.output[0] or conv2.input[1] not in inits:
            continue
        before = producer.get(relu.input[0])
        block = 1
        if before is not None and before.op_type == "DepthToSpace" and _attr(before, "mode", b"DCR") in (b"CRD", "CRD"):
            if only(before.output[0]) is not relu:
                continue
            block = _attr(before, "blocksize")
            before = producer.get(before.input[0])
        if before is None or before.op_type != "Conv" or before.input[1] not in inits or only(before.output[0]) is None:
            continue
        w2 = next(i for i in g.initializer if i.name == conv2.input[1])
        if len(w2.dims) != 4:  # 2-D convolutions only: the ranges are taken per channel over H x W
            continue
        depthwise = _attr(conv2, "group", 1) > 1 and w2.dims[1] == 1
        pairs.append(Pair(index[id(before)], index[id(conv2)], relu.output[0], block, depthwise))
    return pairs


def channel_ranges(model: onnx.ModelProto, tensors: list[str], feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per channel: the mean over crops of each crop's largest value (NNCF's MEAN_MINMAX, per channel)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    sums = {t: 0.0 for t in tensors}
    count = 0
    for feed in feeds:
        for t, x in zip(tensors, sess.run(tensors, feed)):
            sums[t] = sums[t] + x.max(axis=(2, 3)).sum(axis=0).astype(np.float64)
        count += next(iter(feed.values())).shape[0]
    return {t: s / max(count, 1) for t, s in sums.items()}


def equalize_relu_ranges(model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]]) -> list[str]:
    """Equalize every ``find_pairs`` chain of ``model`` in place; returns the equalized tensors.

    One statistics pass is enough: each step preserves the float function, so a tensor's channel
    ranges change only by its own scale.
    """
    pairs = find_pairs(model)
    if not pairs:
        return []
    ranges = channel_ranges(model, [p.tensor for p in pairs], feeds)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = model.graph.node
    done = []
    for p in pairs:
        r = ranges[p.tensor]
        top = float(r.max())
        if not np.isfinite(top) or top <= 0:
            continue
        live = r > DEAD * top
        conv2 = nodes[p.conv2]
        w2 = numpy_helper.to_array(inits[conv2.input[1]]).astype(np.float64)
        group2 = _attr(conv2, "group", 1)
        cin_g, cout_g = w2.shape[1], w2.shape[0] // group2
        if p.depthwise:
            scale = r / top
        else:
            # the largest Conv2 weight each input channel meets (its rows in its group)
            wr = np.array([np.abs(w2[(c // cin_g) * cout_g:(c // cin_g + 1) * cout_g, c % cin_g]).max()
                           for c in range(len(r))])
            scale = np.sqrt(r / np.maximum(wr, 1e-12))
            scale = scale / scale[live].max() if live.any() else scale
        scale = np.where(live & (scale > 0), scale, 1.0)
        # Conv2: multiply weights of input channel c by scale_c
        for c, s in enumerate(scale):
            gi = c // cin_g
            w2[gi * cout_g:(gi + 1) * cout_g, c % cin_g] *= s
        _set(model, inits, conv2, 1, w2)
        # Conv1: divide output channel c (its block*block DepthToSpace phases) by scale_c
        conv1 = nodes[p.conv1]
        w1 = numpy_helper.to_array(inits[conv1.input[1]]).astype(np.float64)
        per_out = np.repeat(scale, p.block * p.block)
        w1 = w1 / per_out.reshape(-1, *([1] * (w1.ndim - 1)))
        _set(model, inits, conv1, 1, w1)
        if len(conv1.input) > 2 and conv1.input[2]:
            _set(model, inits, conv1, 2, numpy_helper.to_array(inits[conv1.input[2]]).astype(np.float64) / per_out)
        done.append(p.tensor)
    return done


def _set(model: onnx.ModelProto, inits: dict, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
    """Give ``node`` its own copy of input ``index`` (initializers may be shared) holding ``value``."""
    old = inits[node.input[index]]
    dtype = numpy_helper.to_array(old).dtype
    name = f"{node.input[index]}_eq"
    while name in inits:
        name += "_"
    new = numpy_helper.from_array(value.astype(dtype), name)
    model.graph.initializer.append(new)
    inits[name] = model.graph.initializer[-1]
    node.input[index] = name
    used = {t for n in model.graph.node for t in n.input}
    if old.name not in used:
        model.graph.initializer.remove(old)
        del inits[old.name]
