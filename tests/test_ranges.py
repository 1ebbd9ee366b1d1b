"""calibration/ranges.py: borrowed activation ranges, MSE-chosen ranges and per-channel depthwise inputs on
small QDQ graphs whose numbers are known, and refine_ranges' rule (a change is kept only where it helps)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from posequant.calibration import ranges as R

from qdq_cases import run_ort


def _init(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ort_ops(model, folder) -> set[str]:
    """The op types of ``model`` as ONNX Runtime optimizes it (its fusions on)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(str(folder / "optimized.onnx")).graph.node}


def _qdq(tensor, out, scale, zero, name):
    """Q -> DQ on ``tensor`` with scalar scale / uint8 zero point initializers named after ``name``."""
    inits = [_init(f"{name}_s", scale), _init(f"{name}_z", zero, np.uint8)]
    nodes = [helper.make_node("QuantizeLinear", [tensor, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_Q"),
             helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [out], name=f"{name}_DQ")]
    return nodes, inits


# ---- borrowed ranges ---------------------------------------------------------------------------------


def _concat_graphs():
    """x -> 1x1 conv "small" (outputs ~ +-1) and "big" (~ +-30) -> Concat -> output. The float graph, and a QDQ
    one whose two branches share the big branch's scale, as NNCF's unified Concat scales make it."""
    rng = np.random.default_rng(0)
    w_small = rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32)
    w_big = rng.normal(0, 10.0, (4, 3, 1, 1)).astype(np.float32)
    inits = [_init("w_small", w_small), _init("w_big", w_big)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])
    convs = [helper.make_node("Conv", ["x", "w_small"], ["small"], name="small"),
             helper.make_node("Conv", ["x", "w_big"], ["big"], name="big")]
    float_model = _model(convs + [helper.make_node("Concat", ["small", "big"], ["y"], axis=1, name="cat")],
                         inits, [x], [y])
    q_small, i_small = _qdq("small", "small_dq", 60.0 / 255, 128, "small")
    q_big, i_big = _qdq("big", "big_dq", 60.0 / 255, 128, "big")
    qdq = _model(convs + q_small + q_big + [helper.make_node("Concat", ["small_dq", "big_dq"], ["y"], axis=1,
                                                             name="cat")], inits + i_small + i_big, [x], [y])
    feeds = [{"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    return float_model, qdq, feeds


def _error_of(model, float_model, feeds, channels, output: str | None = None) -> float:
    """Relative squared error of ``model``'s output channels ``channels`` (of tensor ``output``: default the
    graph's output) against the float model's output, in the QDQ semantics."""
    num = den = 0.0
    sess = R._session(model, qdq_semantics=True, extra=[output] if output else [])
    for f in feeds:
        ref = R._session(float_model).run(None, f)[0][:, channels].astype(np.float64)
        out = sess.run([output] if output else None, f)[0][:, channels]
        num, den = num + float(((out - ref) ** 2).sum()), den + float((ref ** 2).sum())
    return num / den


def test_a_borrowed_range_becomes_the_tensors_own():
    float_model, qdq, feeds = _concat_graphs()
    small = slice(0, 4)
    before = _error_of(qdq, float_model, feeds, small)
    assert R.own_ranges(qdq, float_model, feeds) == ["small"]  # "big" uses its codes: left alone
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    q = next(n for n in qdq.graph.node if n.name == "small_Q")
    dq = next(n for n in qdq.graph.node if n.name == "small_DQ")
    assert list(q.input[1:]) == list(dq.input[1:])  # the pair keeps one scale
    stats = R.tensor_stats(float_model, ["small"], feeds)["small"]
    span = max(stats["mean_max"], 0) - min(stats["mean_min"], 0)
    assert float(inits[q.input[1]]) == pytest.approx(span / 255, rel=1e-6)
    assert _error_of(qdq, float_model, feeds, small) < 0.1 * before  # about 14 levels before, 255 now
    assert onnx.checker.check_model(qdq, full_check=True) is None


# ---- depthwise inputs per channel ----------------------------------------------------------------------


def _depthwise_graphs(seed=1, quantized_output=True):
    """x (4 channels whose ranges differ 100x) -> Q/DQ (one scale) -> depthwise 3x3 conv (int8 weights per
    channel, int32 bias) -> y, as an ORT-target graph has it; and the float graph it quantizes."""
    rng = np.random.default_rng(seed)
    c = 4
    w = rng.normal(0, 0.5, (c, 1, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.2, c).astype(np.float32)
    sw = (np.abs(w).reshape(c, -1).max(axis=1) / 127).astype(np.float32)
    w8 = np.clip(np.rint(w / sw.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    gains = np.array([100.0, 10.0, 1.0, 0.5], np.float32).reshape(1, c, 1, 1)
    feeds = [{"x": (np.abs(rng.normal(0, 1, (1, c, 6, 6))) * gains).astype(np.float32)} for _ in range(8)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 6])
    conv = dict(group=c, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    float_model = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="dw", **conv)],
                         [_init("w", w), _init("b", b)], [x], [y])
    sx = float(max(f["x"].max() for f in feeds)) / 255
    nodes, inits = _qdq("x", "x_dq", sx, 0, "x")
    inits += [_init("w8", w8, np.int8), _init("sw", sw), _init("zw", np.zeros(c), np.int8),
              _init("b32", np.rint(b / (sx * sw)), np.int32), _init("sb", sx * sw), _init("zb", np.zeros(c), np.int32)]
    nodes += [helper.make_node("DequantizeLinear", ["w8", "sw", "zw"], ["w_dq"], axis=0, name="w_DQ"),
              helper.make_node("DequantizeLinear", ["b32", "sb", "zb"], ["b_dq"], axis=0, name="b_DQ"),
              helper.make_node("Conv", ["x_dq", "w_dq", "b_dq"], ["y_f"], name="dw", **conv)]
    out_nodes, out_inits = _qdq("y_f", "y", 200.0 / 255, 128, "y")  # quantized output: ORT fuses QLinearConv
    if not quantized_output:
        out_nodes, out_inits = [helper.make_node("Identity", ["y_f"], ["y"])], []
    return float_model, _model(nodes + out_nodes, inits + out_inits, [x], [y]), feeds


def test_depthwise_inputs_get_a_scale_per_channel_folded_into_the_weight_scales(tmp_path):
    float_model, qdq, feeds = _depthwise_graphs()
    small = slice(2, 4)  # the channels 100x below the largest
    before = _error_of(qdq, float_model, feeds, small, "y_f")  # before the output's own quantizer
    codes_before = numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name == "w8"))
    assert R.depthwise_channel_scales(qdq, float_model, feeds) == ["dw"]
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    nodes = {n.name: n for n in qdq.graph.node}
    scales = inits[nodes["x_Q"].input[1]]
    assert scales.shape == (4,) and scales[0] > 50 * scales[3]  # each channel its own step
    assert inits[nodes["x_DQ"].input[1]].size == 1  # and one scale where ORT's QLinearConv reads it
    assert np.array_equal(inits[nodes["w_DQ"].input[0]], codes_before)  # the int8 codes stay
    assert _error_of(qdq, float_model, feeds, small, "y_f") < 0.01 * before
    assert onnx.checker.check_model(qdq, full_check=True) is None
    # ORT still fuses it into QLinearConv, and the fused kernel computes what the graph says
    assert "QLinearConv" in _ort_ops(qdq, tmp_path)
    for f in feeds[:2]:  # within one output step (200/255): the fused kernel requantizes once, not twice
        fused, exact = run_ort(qdq, f["x"]), run_ort(qdq, f["x"], fused=False)
        assert np.abs(fused - exact).max() <= 200.0 / 255 + 1e-6


def test_a_shared_or_multi_consumer_input_is_left_alone():
    float_model, qdq, feeds = _depthwise_graphs()
    extra = helper.make_node("Relu", ["x_dq"], ["side"], name="side")
    qdq.graph.node.append(extra)
    qdq.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    assert R.depthwise_channel_scales(qdq, float_model, feeds) == []


# ---- MSE ranges, and keeping only what helps ---------------------------------------------------------------


def _outlier_graphs(scale_output: bool):
    """x (Student's t, 3 degrees of freedom: a long tail) -> Q/DQ with the min/max range -> y = x, or, when
    ``scale_output``, y = relu(x - 8): then only the tail reaches the output."""
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_t(3, (1, 2, 64, 64)).astype(np.float32)} for _ in range(8)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 64, 64])
    lo, hi = float(min(f["x"].min() for f in feeds)), float(max(f["x"].max() for f in feeds))
    step = (hi - lo) / 255
    nodes, inits = _qdq("x", "x_dq", step, round(-lo / step), "x")
    if scale_output:
        tail = [helper.make_node("Sub", ["{}", "eight"], ["d"]), helper.make_node("Relu", ["d"], ["y"])]
        consts = [_init("eight", 8.0)]
    else:
        tail, consts = [helper.make_node("Identity", ["{}"], ["y"])], []

    def reading(source):
        return [helper.make_node(n.op_type, [i.format(source) for i in n.input], list(n.output)) for n in tail]

    return (_model(reading("x"), consts, [x], [y]), _model(nodes + reading("x_dq"), inits + consts, [x], [y]),
            feeds)


def test_mse_ranges_clip_rare_outliers_that_set_everyones_step():
    float_model, qdq, feeds = _outlier_graphs(scale_output=False)
    reference = [R._session(float_model).run(None, f) for f in feeds]
    before = R.output_error(qdq, reference, feeds)
    assert R.mse_ranges(qdq, float_model, feeds) == ["x"]
    step = float(numpy_helper.to_array(next(i for i in qdq.graph.initializer if i.name.endswith("_mse_scale"))))
    lo, hi = float(min(f["x"].min() for f in feeds)), float(max(f["x"].max() for f in feeds))
    assert step < 0.95 * (hi - lo) / 255
    assert R.output_error(qdq, reference, feeds) < before


def test_refine_keeps_a_change_only_where_the_output_error_falls():
    float_model, qdq, feeds = _outlier_graphs(scale_output=True)  # clipping the outliers now ruins the output
    q, report = R.refine_ranges(qdq, float_model, feeds, check=feeds, depthwise=False)
    assert report["mse_ranges"]["changed"] == 1 and report["mse_ranges"]["kept"] is False
    assert report["mse_ranges"]["error"] > report["error_before"]
    assert report["error_after"] == report["error_before"] and q is qdq
    float_model, qdq, feeds = _depthwise_graphs(quantized_output=False)
    q, report = R.refine_ranges(qdq, float_model, feeds, check=feeds)
    assert report["depthwise_channel_scales"]["kept"] is True and report["error_after"] < report["error_before"]


# ---- what a range change must carry with it ------------------------------------------------------------------


def _with_init(model, name, value, dtype):
    for i in model.graph.initializer:
        if i.name == name:
            i.CopyFrom(_init(name, value, dtype))
    return model


def test_symmetric_ranges_keep_the_zero_point():
    """TensorRT takes int8 zero point 0 only: a symmetric quantizer's new range changes its step alone."""
    float_model, qdq, feeds = _outlier_graphs(scale_output=False)
    lo, hi = float(min(f["x"].min() for f in feeds)), float(max(f["x"].max() for f in feeds))
    step = max(hi / 127, -lo / 128)
    _with_init(_with_init(qdq, "x_z", 0, np.int8), "x_s", step, np.float32)
    reference = [R._session(float_model).run(None, f) for f in feeds]
    before = R.output_error(qdq, reference, feeds)
    assert R.mse_ranges(qdq, float_model, feeds, symmetric=True) == ["x"]
    q = next(n for n in qdq.graph.node if n.name == "x_Q")
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    assert q.input[2] == "x_z" and inits["x_z"].dtype == np.int8 and not inits["x_z"].any()
    assert float(inits[q.input[1]]) < 0.95 * step and R.output_error(qdq, reference, feeds) < before
    # the borrowed-range change alike
    float_model, qdq, feeds = _concat_graphs()
    for name in ("small", "big"):
        _with_init(_with_init(qdq, f"{name}_z", 0, np.int8), f"{name}_s", 30.0 / 127, np.float32)
    assert R.own_ranges(qdq, float_model, feeds, symmetric=True) == ["small"]
    q = next(n for n in qdq.graph.node if n.name == "small_Q")
    stats = R.tensor_stats(float_model, ["small"], feeds)["small"]
    expected = max(stats["mean_max"] / 127, -stats["mean_min"] / 128)
    assert q.input[2] == "small_z" and float(numpy_helper.to_array(
        next(i for i in qdq.graph.initializer if i.name == q.input[1]))) == pytest.approx(expected, rel=1e-6)


def test_a_convolutions_int32_bias_follows_its_inputs_new_scale(tmp_path):
    """ORT fuses a QDQ convolution into QLinearConv only when its int32 bias is dequantized with
    x_scale * w_scale: a new input range that left the bias alone would leave the convolution in float."""
    float_model, qdq, feeds = _depthwise_graphs()
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    bias = inits["b32"] * inits["sb"]
    _with_init(qdq, "x_s", float(inits["x_s"]) * 8, np.float32)  # a range 8x too wide: own_ranges narrows it
    _with_init(qdq, "b32", np.rint(bias / (inits["sb"] * 8)), np.int32)
    _with_init(qdq, "sb", inits["sb"] * 8, np.float32)
    assert R.own_ranges(qdq, float_model, feeds) == ["x"]
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    nodes = {n.name: n for n in qdq.graph.node}
    x_scale, w_scale = inits[nodes["x_Q"].input[1]], inits[nodes["w_DQ"].input[1]]
    b_dq = nodes["b_DQ"]
    assert np.allclose(inits[b_dq.input[1]], x_scale * w_scale, rtol=1e-6)
    assert np.abs(inits[b_dq.input[0]] * inits[b_dq.input[1]] - bias).max() <= (8 * inits["sb"]).max()
    assert onnx.checker.check_model(qdq, full_check=True) is None
    assert "QLinearConv" in _ort_ops(qdq, tmp_path)
    for f in feeds[:2]:
        assert np.array_equal(run_ort(qdq, f["x"]), run_ort(qdq, f["x"], fused=False))


def test_a_quantizer_moved_ahead_of_data_movement_keeps_its_range():
    """x -> Q -> DepthToSpace -> DQ: the DequantizeLinear is not the quantizer's consumer, and the zero point
    may stand in for a ReLU; neither change touches it."""
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_t(3, (1, 4, 4, 4)).astype(np.float32)} for _ in range(4)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])
    float_model = _model([helper.make_node("DepthToSpace", ["x"], ["y"], blocksize=2)], [], [x], [y])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x_Q"),
             helper.make_node("DepthToSpace", ["xq"], ["yq"], blocksize=2),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"], name="y_DQ")]
    qdq = _model(nodes, [_init("s", 40.0 / 255), _init("z", 128, np.uint8)], [x], [y])
    assert R.own_ranges(qdq, float_model, feeds) == [] and R.mse_ranges(qdq, float_model, feeds) == []
