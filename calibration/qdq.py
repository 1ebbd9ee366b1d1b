"""Small facts about, and exact fix-ups of, QDQ ONNX graphs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
             "DynamicQuantizeLinear", "QLinearAdd"}


def links(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """(tensor -> the node that makes it, tensor -> the nodes that read it) of ``graph``."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    return producers, consumers


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QUANT_OPS for n in model.graph.node)


class _Consts:
    """Constant tensors of a graph (initializers and Constant nodes), readable and writable by name."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.inits = {i.name: i for i in graph.initializer}
        self.nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def get(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        if name in self.nodes:
            return numpy_helper.to_array(self.nodes[name].attribute[0].t)
        return None

    def set(self, name: str, value: np.ndarray) -> None:
        tensor = numpy_helper.from_array(value, name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
        else:
            self.nodes[name].attribute[0].t.CopyFrom(tensor)


def make_ort_friendly(model: onnx.ModelProto, *, sink: bool = True) -> dict[str, int]:
    """Rewrite a QDQ model so that ONNX Runtime's CPU fusions apply; the computed values do not change.

    - int8 activations become uint8 with the zero point moved by 128 (the same dequantized
      values): ORT fuses DQ -> Conv/Add -> Q into QLinearConv/QLinearAdd only when input and
      output types agree, and NNCF gives ReLU outputs uint8 but other activations int8.
    - float Conv biases become int32 with scale x_scale * w_scale behind a DequantizeLinear,
      the form ORT's QLinearConv takes (rounding of at most half a bias step).
    - the rewritten deconvolutions' Concat / DepthToSpace run on uint8 (``quantize_data_movement``),
      and depthwise ones become true depthwise convolutions (``split_grouped_phases``); the last
      one's DepthToSpace moves to the heatmaps (``sink_depth_to_space``; ``sink=False`` leaves that to the
      caller, to run after anything that re-fits weight scales).
    """
    g = model.graph
    consts = _Consts(g)
    producers = {o: n for n in g.node for o in n.output}
    moved = set()
    for node in g.node:
        # activations: Q nodes, and the DQ nodes that read them (weights are DQ of constants)
        is_activation = node.op_type == "QuantizeLinear" or (
            node.op_type == "DequantizeLinear" and node.input[0] in producers
            and producers[node.input[0]].op_type == "QuantizeLinear")
        if not is_activation or len(node.input) < 3 or node.input[2] in moved:
            continue
        zp = consts.get(node.input[2])
        if zp is not None and zp.dtype == np.int8:
            consts.set(node.input[2], (zp.astype(np.int16) + 128).astype(np.uint8))
            moved.add(node.input[2])
    biases = 0
    new_nodes = []
    for node in g.node:
        if node.op_type != "Conv" or len(node.input) < 3 or node.input[2] not in consts.inits:
            continue
        dq_x, dq_w = producers.get(node.input[0]), producers.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        x_scale, w_scale = consts.get(dq_x.input[1]), consts.get(dq_w.input[1])
        if x_scale is None or w_scale is None or x_scale.size != 1:
            continue
        bias = consts.get(node.input[2]).astype(np.float64)
        scale = np.broadcast_to(x_scale.astype(np.float64).reshape(()) * w_scale.astype(np.float64).reshape(-1), bias.shape)
        q = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        base = f"{node.name or node.output[0]}_bias"  # one bias may feed several convs (phase convolutions)
        names = (f"{base}_quantized", f"{base}_scale", f"{base}_zero_point", f"{base}_dequantized")
        g.initializer.extend([numpy_helper.from_array(q, names[0]),
                              numpy_helper.from_array(scale.astype(np.float32), names[1]),
                              numpy_helper.from_array(np.zeros(bias.shape, np.int32), names[2])])
        new_nodes.append(onnx.helper.make_node("DequantizeLinear", list(names[:3]), [names[3]],
                                               name=f"{base}_DequantizeLinear", axis=0))
        node.input[2] = names[3]
        biases += 1
    for i, dq in enumerate(new_nodes):
        g.node.insert(i, dq)
    _drop_unused_initializers(g)
    del g.value_info[:]  # stale element types after the zero-point move; ORT re-infers them
    chains = quantize_data_movement(model)
    depthwise = split_grouped_phases(model)
    sunk = sink_depth_to_space(model) if sink else 0
    return {"zero_points_to_uint8": len(moved), "int32_biases": biases, "uint8_depth_to_space": chains,
            "depthwise_phase_splits": depthwise, "depth_to_space_to_output": sunk}


def make_openvino_friendly(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite NNCF's OpenVINO-placed QDQ model so that OpenVINO's fast kernels apply; the computed
    values do not change. The rewritten deconvolutions' Concat / DepthToSpace move int8 data
    (``quantize_data_movement``) and depthwise ones become true depthwise convolutions
    (``split_grouped_phases``): OpenVINO runs a grouped convolution with several outputs per group on
    a generic kernel (the trained model: 1.6 -> 1.0 ms, bit-exact). Biases stay float, as OpenVINO
    takes them; moving the last DepthToSpace to the heatmaps measured no gain there.
    """
    return {"uint8_depth_to_space": quantize_data_movement(model),
            "depthwise_phase_splits": split_grouped_phases(model)}


def make_tensorrt_friendly(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite a symmetric QDQ model into the form TensorRT's explicit quantization takes: every
    activation quantizer signed int8 with zero point 0 (TensorRT rejects uint8 and non-zero points).

    - int8 with zero point 0: kept.
    - uint8 with zero point 128 (ORT's symmetric uint8): the same values as int8 with 0, exactly.
    - uint8 with zero point 0 (NNCF's unsigned quantizer after a ReLU): int8 with the scale widened
      by 255/127, as TensorRT itself quantizes such tensors (one bit less for ReLU outputs).

    Raises ValueError for an asymmetric quantizer (any other zero point). Returns counts.
    """
    g = model.graph
    consts = _Consts(g)
    producers, consumers = links(g)
    taken = set(consts.inits) | {t for n in g.node for t in (*n.input, *n.output)}

    def fresh(base: str) -> str:
        name = base
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    counts = {"kept": 0, "shifted": 0, "widened": 0, "float_biases": 0}
    for q in [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts.inits]:
        zp = consts.get(q.input[2]) if len(q.input) > 2 else None
        scale = consts.get(q.input[1])
        if zp is None or scale is None:
            continue
        if zp.dtype == np.int8 and not np.any(zp):
            counts["kept"] += 1
            continue
        if zp.dtype != np.uint8 or not (np.all(zp == 128) or not np.any(zp)):
            raise ValueError(f"{q.name or q.output[0]}: asymmetric activation quantizer (zero point {zp.ravel()[:1]}); "
                             "TensorRT needs symmetric ones")
        new_scale = scale if np.all(zp == 128) else (scale.astype(np.float64) * 255 / 127).astype(scale.dtype)
        counts["shifted" if np.all(zp == 128) else "widened"] += 1
        names = [fresh(f"{q.input[1]}_trt"), fresh(f"{q.input[2]}_trt")]
        g.initializer.extend([numpy_helper.from_array(new_scale, names[0]),
                              numpy_helper.from_array(np.zeros(zp.shape, np.int8), names[1])])
        for node in [q] + [c for c in consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"]:
            node.input[1], node.input[2] = names
    # int32 biases behind a DequantizeLinear (ORT's quantizer): TensorRT dequantizes int8 only, so
    # they go back to float constants (the same values)
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        value = consts.get(dq.input[0])
        if value is None or value.dtype != np.int32:
            continue
        scale = consts.get(dq.input[1]).astype(np.float64)
        zero = consts.get(dq.input[2]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
        name = fresh(f"{dq.output[0]}_float")
        g.initializer.append(numpy_helper.from_array(((value - zero) * scale).astype(np.float32), name))
        for c in consumers.get(dq.output[0], []):
            c.input[list(c.input).index(dq.output[0])] = name
        g.node.remove(dq)
        counts["float_biases"] += 1
    _drop_unused_initializers(g)
    del g.value_info[:]  # element types changed
    return counts


def quantize_data_movement(model: onnx.ModelProto) -> int:
    """Move the quantizer after ``Conv(s) -> [Concat] -> DepthToSpace -> [Relu] -> QuantizeLinear`` (the
    rewritten deconvolutions) up to each Conv's output, so that Concat and DepthToSpace move uint8 data
    and every Conv is followed by its own QuantizeLinear: ORT then fuses DQ -> Conv -> Q into QLinearConv
    instead of running the convolutions in float. Exact: quantizing commutes with moving elements,
    and a uint8 quantizer with zero point 0 clamps at 0, which is the ReLU it replaces.

    Returns how many chains were moved. Run after the zero points are uint8 (``make_ort_friendly``).
    """
    g = model.graph
    consts = _Consts(g)
    outputs = {o.name for o in g.output}
    producers, consumers = links(g)

    def sole(t: str, consumer: onnx.NodeProto) -> bool:
        return t not in outputs and [id(c) for c in consumers.get(t, [])] == [id(consumer)]

    moved = 0
    for q in [n for n in g.node if n.op_type == "QuantizeLinear"]:
        if len(q.input) < 3 or consts.get(q.input[1]) is None or consts.get(q.input[1]).size != 1:
            continue
        zp = consts.get(q.input[2])
        if zp is None or zp.dtype != np.uint8:
            continue
        node, relu = producers.get(q.input[0]), None
        if node is not None and node.op_type == "Relu" and sole(node.output[0], q):
            if int(zp) != 0:  # only then does the uint8 clamp at 0 equal the ReLU
                continue
            relu, node = node, producers.get(node.input[0])
        after = relu or q
        if node is None or node.op_type != "DepthToSpace" or not sole(node.output[0], after):
            continue
        d2s, src = node, producers.get(node.input[0])
        concat = None
        if src is not None and src.op_type == "Concat" and sole(src.output[0], d2s):
            concat = src
            convs = [producers.get(t) for t in concat.input]
            if not all(c is not None and c.op_type == "Conv" and sole(c.output[0], concat) for c in convs):
                continue
        elif src is not None and src.op_type == "Conv" and sole(src.output[0], d2s):
            convs = [src]
        else:
            continue
        reader = concat or d2s
        new_q = []
        for c in convs:
            out = f"{c.output[0]}_quantized"
            new_q.append(onnx.helper.make_node("QuantizeLinear", [c.output[0], q.input[1], q.input[2]], [out],
                                               name=f"{c.name or c.output[0]}_QuantizeLinear"))
            reader.input[list(reader.input).index(c.output[0])] = out
        d2s.output[0] = q.output[0]
        for dead in (relu, q):
            if dead is not None:
                g.node.remove(dead)
        index = list(g.node).index(reader)
        for offset, n in enumerate(new_q):
            g.node.insert(index + offset, n)
        moved += 1
    if moved:
        used = {i for n in g.node for i in n.input} | outputs  # the weight and bias DQs a rescale left unread
        for n in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]:
            g.node.remove(n)
        _drop_unused_initializers(g)
        del g.value_info[:]
    return moved


def split_grouped_phases(model: onnx.ModelProto) -> int:
    """Split each quantized grouped phase convolution (a rewritten depthwise deconvolution:
    ``Conv(group=C, C*s*s outputs) -> Q -> DepthToSpace(CRD)``) into s*s true depthwise convolutions,
    each cropped to its phase's taps, + Concat + DepthToSpace(DCR), on the same int8 weights, int32
    biases and output quantizer. ORT runs a depthwise QLinearConv with its fast kernel but a
    grouped one with several outputs per group slowly (the trained model: 41% of its INT8 time in
    the last deconvolution), and so does OpenVINO (0.55 of 1.25 ms). Exact: the taps cropped away
    are zero, and each output value is computed from the same integers. Biases may be int32 behind
    a DequantizeLinear (ORT) or float constants (OpenVINO). Done after NNCF, which calibrates and
    bias-corrects the single grouped convolution (it cannot cut the Concat of phase convolutions).
    """
    g = model.graph
    consts = _Consts(g)
    producers, consumers = links(g)
    outputs = {o.name for o in g.output}
    split = 0
    for conv in [n for n in g.node if n.op_type == "Conv"]:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in conv.attribute}
        group = a.get("group", 1)
        after = consumers.get(conv.output[0], [])
        if group == 1 or len(after) != 1 or after[0].op_type != "QuantizeLinear" or conv.output[0] in outputs:
            continue
        q = after[0]
        d2s = consumers.get(q.output[0], [])
        if len(d2s) != 1 or d2s[0].op_type != "DepthToSpace" or q.output[0] in outputs:
            continue
        d2s = d2s[0]
        da = {x.name: onnx.helper.get_attribute_value(x) for x in d2s.attribute}
        if da.get("mode", b"DCR") not in (b"CRD", "CRD"):
            continue
        block = da["blocksize"]
        dq_w = producers.get(conv.input[1])
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        dq_b = producers.get(conv.input[2]) if has_bias else None
        float_bias = consts.get(conv.input[2]) if has_bias and dq_b is None else None  # OpenVINO's form
        if dq_w is None or dq_w.op_type != "DequantizeLinear" or (dq_b is not None and dq_b.op_type != "DequantizeLinear"):
            continue
        if has_bias and dq_b is None and (float_bias is None or float_bias.size != group * block * block):
            continue
        w, w_scale = consts.get(dq_w.input[0]), consts.get(dq_w.input[1])
        w_zp = consts.get(dq_w.input[2]) if len(dq_w.input) > 2 else None
        if w is None or w_scale is None or w.ndim != 4 or w.shape[1] != 1 or w.shape[0] != group * block * block:
            continue
        if w_scale.size != w.shape[0] or (w_zp is not None and np.any(w_zp != 0)):
            continue
        bias = [consts.get(t) for t in dq_b.input] if dq_b is not None else None
        if bias is not None and (any(b is None for b in bias[:2]) or bias[1].size != w.shape[0]):
            continue
        pads = list(a.get("pads", [0, 0, 0, 0]))
        base = conv.name or conv.output[0]
        new_nodes, quantized = [], []
        for phase in range(block * block):
            rows = np.arange(group) * block * block + phase  # CRD: channel c*s*s + phase
            wp = w[rows]
            nz_y, nz_x = np.nonzero(np.abs(wp).sum(axis=(0, 1)) if wp.size else np.zeros(wp.shape[2:]))
            y0, y1 = (int(nz_y.min()), int(nz_y.max()) + 1) if nz_y.size else (0, 1)
            x0, x1 = (int(nz_x.min()), int(nz_x.max()) + 1) if nz_x.size else (0, 1)
            # crop only as far as the pads allow (they must stay >= 0)
            y0, x0 = min(y0, pads[0]), min(x0, pads[1])
            y1, x1 = max(y1, w.shape[2] - pads[2]), max(x1, w.shape[3] - pads[3])
            new_pads = [pads[0] - y0, pads[1] - x0, pads[2] - (w.shape[2] - y1), pads[3] - (w.shape[3] - x1)]
            names = {k: f"{base}_phase{phase}_{k}" for k in ("w", "w_scale", "w_zp", "b", "b_scale", "b_zp",
                                                              "w_dq", "b_dq", "conv", "q")}
            g.initializer.extend([
                numpy_helper.from_array(np.ascontiguousarray(wp[:, :, y0:y1, x0:x1]), names["w"]),
                numpy_helper.from_array(w_scale.reshape(-1)[rows], names["w_scale"]),
                numpy_helper.from_array(np.zeros(group, w.dtype), names["w_zp"])])
            new_nodes.append(onnx.helper.make_node("DequantizeLinear", [names["w"], names["w_scale"], names["w_zp"]],
                                                   [names["w_dq"]], name=names["w_dq"], axis=0))
            inputs = [conv.input[0], names["w_dq"]]
            if float_bias is not None:
                g.initializer.append(numpy_helper.from_array(float_bias.reshape(-1)[rows], names["b"]))
                inputs.append(names["b"])
            elif bias is not None:
                g.initializer.extend([numpy_helper.from_array(bias[0].reshape(-1)[rows], names["b"]),
                                      numpy_helper.from_array(bias[1].reshape(-1)[rows], names["b_scale"]),
                                      numpy_helper.from_array(np.zeros(group, bias[0].dtype), names["b_zp"])])
                new_nodes.append(onnx.helper.make_node("DequantizeLinear", [names["b"], names["b_scale"], names["b_zp"]],
                                                       [names["b_dq"]], name=names["b_dq"], axis=0))
                inputs.append(names["b_dq"])
            new_nodes.append(onnx.helper.make_node(
                "Conv", inputs, [names["conv"]], name=names["conv"], group=group, kernel_shape=[y1 - y0, x1 - x0],
                pads=new_pads, strides=list(a.get("strides", [1, 1])), dilations=list(a.get("dilations", [1, 1]))))
            new_nodes.append(onnx.helper.make_node("QuantizeLinear", [names["conv"], *q.input[1:]], [names["q"]],
                                                   name=names["q"]))
            quantized.append(names["q"])
        new_nodes.append(onnx.helper.make_node("Concat", quantized, [f"{base}_phases"], name=f"{base}_phases", axis=1))
        new_nodes.append(onnx.helper.make_node("DepthToSpace", [f"{base}_phases"], [d2s.output[0]],
                                               name=d2s.name or f"{base}_d2s", blocksize=block, mode="DCR"))
        index = list(g.node).index(conv)
        for dead in (conv, q, d2s):
            g.node.remove(dead)
        for offset, n in enumerate(new_nodes):
            g.node.insert(index + offset, n)
        split += 1
    if split:
        used = {t for n in g.node for t in n.input}
        for n in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] not in used | outputs]:
            g.node.remove(n)  # the grouped convolution's weight and bias dequantizers
        _drop_unused_initializers(g)
        del g.value_info[:]
    return split


PER_PIXEL_OPS = {"Relu", "Clip", "QuantizeLinear", "DequantizeLinear"}  # and 1x1 convolutions


def _per_pixel(node: onnx.NodeProto, producers: dict, consts: _Consts) -> bool:
    """Does ``node`` compute each pixel from that pixel alone (so it commutes with DepthToSpace)?"""
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):  # per tensor, or per channel
        scale = consts.get(node.input[1])
        return scale is not None and (scale.size == 1 or a.get("axis", 1) in (1, -3))
    if node.op_type in PER_PIXEL_OPS:
        return True
    if node.op_type != "Conv":
        return False
    kernel = a.get("kernel_shape")
    if kernel is None:  # from the weight, an initializer or the constant behind its DequantizeLinear
        dq = producers.get(node.input[1])
        w = consts.get(dq.input[0] if dq is not None and dq.op_type == "DequantizeLinear" else node.input[1])
        kernel = None if w is None else w.shape[2:]
    return (kernel is not None and all(k == 1 for k in kernel)
            and all(v == 1 for v in list(a.get("strides", [])) + list(a.get("dilations", [])))
            and not any(a.get("pads", [])))


def sink_depth_to_space(model: onnx.ModelProto) -> int:
    """Move a DepthToSpace(DCR) that only per-pixel ops (1x1 Conv, Relu, Clip, Q/DQ) separate from the
    graph output down to that output: the s*s phases are reshaped into the batch, run through those
    ops at the low resolution, and rearranged at the end, on the heatmaps. For the rewritten last
    deconvolution this puts the rearrangement on J heatmap channels instead of hundreds of feature
    channels, where ONNX Runtime's uint8 DepthToSpace and the layout transposes around it were up to
    18% of the INT8 time. Exact: per-pixel ops commute with moving pixels.

    Returns how many DepthToSpace nodes were moved.
    """
    g = model.graph
    if not any(n.op_type == "DepthToSpace" for n in g.node):
        return 0
    consts = _Consts(g)
    producers, consumers = links(g)
    outputs = {o.name for o in g.output}
    inferred = onnx.shape_inference.infer_shapes(model)
    channels = {v.name: v.type.tensor_type.shape.dim[1].dim_value
                for v in [*inferred.graph.value_info, *inferred.graph.output]
                if len(v.type.tensor_type.shape.dim) == 4}
    moved = 0
    for d2s in [n for n in g.node if n.op_type == "DepthToSpace"]:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in d2s.attribute}
        if a.get("mode", b"DCR") not in (b"DCR", "DCR"):
            continue  # CRD interleaves phases within each channel: not a reshape into the batch
        chain, t = [], d2s.output[0]
        while t not in outputs:
            after = consumers.get(t, [])
            if len(after) != 1 or after[0].input[0] != t or not _per_pixel(after[0], producers, consts):
                chain = []
                break
            chain.append(after[0])
            t = after[0].output[0]
        block = a["blocksize"]
        c_in, c_out = channels.get(d2s.input[0], 0), channels.get(t, 0)
        if not chain or not c_in or not c_out:
            continue
        rescale = _channel_scales_to_move(chain, producers, consts)
        if rescale is None:
            continue
        base = d2s.name or d2s.output[0]
        names = [f"{base}_phases_as_batch_shape", f"{base}_phases_as_batch", f"{base}_phases_as_channels_shape",
                 f"{t}_phases", f"{t}_phases_as_channels"]
        g.initializer.extend([  # 0 keeps that dimension: the spatial size is whatever the input's is
            numpy_helper.from_array(np.array([-1, c_in // block**2, 0, 0], np.int64), names[0]),
            numpy_helper.from_array(np.array([-1, c_out * block**2, 0, 0], np.int64), names[2])])
        to_batch = onnx.helper.make_node("Reshape", [d2s.input[0], names[0]], [names[1]], name=names[1])
        chain[0].input[0] = names[1]
        chain[-1].output[0] = names[3]
        to_channels = onnx.helper.make_node("Reshape", [names[3], names[2]], [names[4]], name=names[4])
        tail = _scales_behind_reshape(g, consts, producers, chain[-1], rescale, names[4], block) if rescale else []
        rearrange = onnx.helper.make_node("DepthToSpace", [tail[-1].output[0] if tail else names[4]], [t], name=base,
                                          blocksize=block, mode="DCR")
        index = list(g.node).index(d2s)
        g.node.remove(d2s)
        g.node.insert(index, to_batch)
        index = list(g.node).index(chain[-1])
        for i, node in enumerate([to_channels, *tail, rearrange]):
            g.node.insert(index + 1 + i, node)
        moved += 1
    if moved:
        used = {i for n in g.node for i in n.input} | outputs  # the weight and bias DQs a rescale left unread
        for n in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] not in used]:
            g.node.remove(n)
        _drop_unused_initializers(g)
        del g.value_info[:]
    return moved


def _channel_scales_to_move(chain: list[onnx.NodeProto], producers: dict, consts: _Consts
                            ) -> tuple[np.ndarray, np.ndarray | None] | tuple[()] | None:
    """What a sunk chain needs so that OpenVINO computes it as its QDQ graph says.

    OpenVINO's CPU plugin (2026.4) carries a per-channel dequantization (a 1x1 convolution's per-channel weight
    scales, its int32 bias) through the Reshape that takes the phases out of the batch in the wrong channel
    order: joint j's heatmap at phase p got the scale of channel (p * J + j) // s^2 (relative L2 0.4 on the
    trained model's --target ort file; ONNX Runtime computes it right). A per-tensor dequantization, or one
    followed by a QuantizeLinear before the Reshape, is carried correctly. So: ``()`` when no per-channel
    dequantization reaches the Reshape; (weight scales, float bias or None) of the last convolution when it does
    and can be moved behind the Reshape (:func:`_scales_behind_reshape`); None when the chain is left alone.
    """
    tail = chain
    for i, node in enumerate(chain):
        if node.op_type == "QuantizeLinear":
            tail = chain[i + 1:]  # requantized: what came before reaches the Reshape per tensor
    convs = [n for n in tail if n.op_type == "Conv"]
    per_channel = []
    for conv in convs:
        dq = producers.get(conv.input[1])
        scale = consts.get(dq.input[1]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if scale is not None and scale.size > 1:
            per_channel.append((conv, dq, scale))
    if not per_channel:
        return ()
    conv, dq, scale = per_channel[-1]
    zero = consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if len(per_channel) > 1 or conv is not chain[-1] or (zero is not None and np.any(zero)):
        return None
    bias = None
    if len(conv.input) > 2 and conv.input[2]:
        bdq = producers.get(conv.input[2])
        if bdq is not None and bdq.op_type == "DequantizeLinear":
            q, bscale = consts.get(bdq.input[0]), consts.get(bdq.input[1])
            bzero = consts.get(bdq.input[2]) if len(bdq.input) > 2 and bdq.input[2] else 0
            bias = None if q is None or bscale is None else ((q.astype(np.float64) - bzero) * bscale).astype(np.float32)
        else:
            bias = consts.get(conv.input[2])
        if bias is None:
            return None
    return scale.astype(np.float32).reshape(-1), bias


def _scales_behind_reshape(g: onnx.GraphProto, consts: _Consts, producers: dict, conv: onnx.NodeProto,
                           rescale: tuple[np.ndarray, np.ndarray | None], after: str, block: int
                           ) -> list[onnx.NodeProto]:
    """The last convolution of a sunk chain with its weights at one scale (the same int8 codes) and no bias; its
    per-channel scales and its bias applied behind the Reshape out of the batch instead, tiled over the phases
    as DepthToSpace (DCR) orders the channels: conv(x, q * s_j) + b_j = conv(x, q) * s_j + b_j. The nodes that
    follow the Reshape (Mul, Add); the caller feeds the last one to the DepthToSpace."""
    scale, bias = rescale
    dq = producers[conv.input[1]]
    base = conv.name or conv.output[0]
    unit = [f"{base}_weight_unit_scale", f"{base}_weight_zero_point", f"{base}_weight_codes"]
    g.initializer.extend([numpy_helper.from_array(np.array(1.0, np.float32), unit[0]),
                          numpy_helper.from_array(np.array(0, consts.get(dq.input[0]).dtype), unit[1])])
    codes = onnx.helper.make_node("DequantizeLinear", [dq.input[0], unit[0], unit[1]], [unit[2]], name=unit[2])
    g.node.insert(list(g.node).index(conv), codes)
    conv.input[1] = unit[2]
    del conv.input[2:]
    names = [f"{base}_scales_by_phase", f"{after}_scaled", f"{base}_bias_by_phase", f"{after}_biased"]
    tiled = np.tile(scale, block**2).reshape(1, -1, 1, 1)
    g.initializer.append(numpy_helper.from_array(tiled, names[0]))
    nodes = [onnx.helper.make_node("Mul", [after, names[0]], [names[1]], name=names[1])]
    if bias is not None:
        g.initializer.append(numpy_helper.from_array(np.tile(bias, block**2).reshape(1, -1, 1, 1), names[2]))
        nodes.append(onnx.helper.make_node("Add", [names[1], names[2]], [names[3]], name=names[3]))
    return nodes


def _drop_unused_initializers(g: onnx.GraphProto) -> None:
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def int8_deconvolutions(model: onnx.ModelProto) -> dict[str, str]:
    """Per backend, how the model's deconvolutions run: 'int8', 'float' or 'none' (no ConvTranspose)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    deconvs = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    if not deconvs:
        rewritten = any(n.op_type == "DepthToSpace" for n in model.graph.node)
        return {"ort": "int8 (phase convolutions)" if rewritten else "none",
                "openvino": "int8 (phase convolutions)" if rewritten else "none"}
    quantized = all(n.input[0] in producers and producers[n.input[0]].op_type == "DequantizeLinear" for n in deconvs)
    return {"ort": "float (ORT has no int8 ConvTranspose on CPU)",
            "openvino": "int8" if quantized else "float"}
