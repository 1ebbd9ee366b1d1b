"""Small QDQ convolutions for the kernel tests, built with onnx.helper alone (no torch: `make test-avx2` runs
the tests that use them under qemu, where importing torch takes minutes)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from posequant.calibration import saturation as S

# (in channels, out channels, kernel, group, pads): ORT's paths on x86 -- channels a multiple of 4, >= 16 outputs:
# the symmetric conv kernel; 3 channels / 17 outputs: im2col + QGEMM, pairs across taps; grouped: QGEMM per group
PATHS = {"convsym_1x1": (32, 32, 1, 1, (0, 0, 0, 0)), "convsym_3x3": (16, 16, 3, 1, (1, 1, 1, 1)),
         "gemm_stem": (3, 16, 3, 1, (1, 1, 1, 1)), "gemm_17_outputs": (24, 17, 1, 1, (0, 0, 0, 0)),
         "gemm_grouped": (8, 8, 3, 2, (1, 1, 1, 1))}


def conv_model(w: np.ndarray, b: np.ndarray | None, sx: float, zx: int, sw: np.ndarray, sy: float, zy: int, *,
               group: int = 1, pads=(0, 0, 0, 0), strides=(1, 1)) -> onnx.ModelProto:
    """uint8 codes -> DequantizeLinear -> Conv (int8 weights, int32 bias) -> QuantizeLinear: ORT fuses it
    into QLinearConv, i.e. runs it on its int8 kernels. ``sw`` of size 1 is a per-tensor weight scale."""
    per_tensor = sw.size == 1
    zw = np.zeros(() if per_tensor else sw.size, np.int8)
    inits = [numpy_helper.from_array(np.array(sx, np.float32), "sx"),
             numpy_helper.from_array(np.array(zx, np.uint8), "zx"),
             numpy_helper.from_array(w.astype(np.int8), "w"),
             numpy_helper.from_array(sw.astype(np.float32).reshape(() if per_tensor else -1), "sw"),
             numpy_helper.from_array(zw, "zw"),
             numpy_helper.from_array(np.array(sy, np.float32), "sy"),
             numpy_helper.from_array(np.array(zy, np.uint8), "zy")]
    axis = {} if per_tensor else {"axis": 0}
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], **axis)]
    conv_in = ["xf", "wf"]
    if b is not None:
        sb = (np.float32(sx) * sw).astype(np.float32)
        inits += [numpy_helper.from_array(b.astype(np.int32), "b"),
                  numpy_helper.from_array(sb.reshape(() if per_tensor else -1), "sb"),
                  numpy_helper.from_array(np.zeros(() if per_tensor else sw.size, np.int32), "zb")]
        nodes.append(helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"], **axis))
        conv_in.append("bf")
    nodes += [helper.make_node("Conv", conv_in, ["yf"], group=group, pads=list(pads), strides=list(strides),
                               kernel_shape=list(w.shape[2:])),
              helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, "conv",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, ["n", "c", "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, ["n", "m", "ho", "wo"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_ort(model: onnx.ModelProto, x: np.ndarray, *, fused: bool = True) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not fused:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def run_openvino(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled({0: x})[0]


def saturating_case(cin, cout, k, group, pads, seed=0):
    """A convolution whose pair sums saturate: large same-sign weights on neighbouring channels, big input codes."""
    rng = np.random.default_rng(seed)
    cg = cin // group
    w = rng.integers(-127, 128, (cout, cg, k, k)).astype(np.int8)
    w[:, :, :, :] = np.where(rng.random(w.shape) < 0.5, 120, w)  # many pairs of 120 + 120 > 128
    x = rng.integers(150, 256, (2, cin, 7, 6)).astype(np.uint8)
    b = rng.integers(-5000, 5000, cout).astype(np.int32)
    sw = rng.uniform(0.001, 0.003, cout).astype(np.float32)
    return w, b, x, sw


def saturating_model(path: str, seed: int = 0):
    """One case of PATHS with an output scale that spans its exact outputs: (model, conv, w, b, x, sy, zy)."""
    cin, cout, k, group, pads = PATHS[path]
    w, b, x, sw = saturating_case(cin, cout, k, group, pads, seed)
    sx, zx = 0.02, 3
    (conv,) = S.quantized_convs(conv_model(w, b, sx, zx, sw, 1.0, 0, group=group, pads=pads))
    real = (S.conv_accumulators(conv, w, x, saturate=False) + b.reshape(1, -1, 1, 1)) * (sx * sw).reshape(1, -1, 1, 1)
    sy = float(real.max() - real.min()) / 255
    zy = int(np.clip(round(-real.min() / sy), 0, 255))
    model = conv_model(w, b, sx, zx, sw, sy, zy, group=group, pads=pads)
    (conv,) = S.quantized_convs(model)
    return model, conv, w, b, x, sy, zy


# (K, N, kind): ORT fuses a QDQ MatMul into QLinearMatMul, a Gemm into QGemm; K odd pads the last pair
MATMULS = {"matmul_64x32": (64, 32, "matmul"), "matmul_odd_k": (7, 16, "matmul"),
           "matmul_17_outputs": (24, 17, "matmul"), "gemm_64x32": (64, 32, "gemm"), "gemm_odd_k": (7, 16, "gemm")}


def matmul_model(w: np.ndarray, b: np.ndarray | None, sx: float, zx: int, sw: np.ndarray, sy: float | None, zy: int,
                 *, kind: str = "matmul") -> onnx.ModelProto:
    """uint8 codes -> DequantizeLinear -> MatMul (weight K x N) or Gemm (transB: weight N x K, int32 bias) ->
    QuantizeLinear, or with ``sy`` None a float output (ORT: MatMulIntegerToFloat). ``sw`` per output column."""
    per_tensor = sw.size == 1
    n_axis = 1 if kind == "matmul" else 0
    inits = [numpy_helper.from_array(np.array(sx, np.float32), "sx"),
             numpy_helper.from_array(np.array(zx, np.uint8), "zx"),
             numpy_helper.from_array(w.astype(np.int8), "w"),
             numpy_helper.from_array(sw.astype(np.float32).reshape(() if per_tensor else -1), "sw"),
             numpy_helper.from_array(np.zeros(() if per_tensor else sw.size, np.int8), "zw")]
    axis = {} if per_tensor else {"axis": n_axis}
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], **axis)]
    ins = ["xf", "wf"]
    if b is not None:
        assert kind == "gemm", "a MatMul has no bias input"
        sb = (np.float32(sx) * sw).astype(np.float32)
        inits += [numpy_helper.from_array(b.astype(np.int32), "b"),
                  numpy_helper.from_array(sb.reshape(() if per_tensor else -1), "sb"),
                  numpy_helper.from_array(np.zeros(() if per_tensor else sw.size, np.int32), "zb")]
        nodes.append(helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"], **({} if per_tensor else
                                                                                         {"axis": 0})))
        ins.append("bf")
    out = "y" if sy is None else "yf"
    nodes.append(helper.make_node("MatMul", ins, [out]) if kind == "matmul" else
                 helper.make_node("Gemm", ins, [out], transB=1))
    if sy is not None:
        inits += [numpy_helper.from_array(np.array(sy, np.float32), "sy"),
                  numpy_helper.from_array(np.array(zy, np.uint8), "zy")]
        nodes.append(helper.make_node("QuantizeLinear", ["yf", "sy", "zy"], ["y"]))
    k, n = w.shape[1 - n_axis], w.shape[n_axis]
    batch = ["n", "t"] if kind == "matmul" else ["n"]
    y_type = TensorProto.FLOAT if sy is None else TensorProto.UINT8
    graph = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info("x", TensorProto.UINT8, [*batch, k])],
                              [helper.make_tensor_value_info("y", y_type, [*batch, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def saturating_matmul(path: str, seed: int = 0, *, float_output: bool = False):
    """One case of MATMULS whose pair sums saturate, with an output scale spanning its exact outputs:
    (model, op, w, b, x, sy, zy); a 3-D input for MatMul (N x T x K), 2-D for Gemm."""
    k, n, kind = MATMULS[path]
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (k, n)).astype(np.int8)
    w = np.where(rng.random(w.shape) < 0.5, 120, w).astype(np.int8)  # many pairs of 120 + 120 > 128
    w = w if kind == "matmul" else np.ascontiguousarray(w.T)
    b = rng.integers(-5000, 5000, n).astype(np.int32) if kind == "gemm" else None
    sw = rng.uniform(0.001, 0.003, n).astype(np.float32)
    x = rng.integers(150, 256, (2, 5, k) if kind == "matmul" else (6, k)).astype(np.uint8)
    sx, zx = 0.02, 3
    (op,) = S.quantized_matmuls(matmul_model(w, b, sx, zx, sw, 1.0, 0, kind=kind))
    real = (S.matmul_accumulators(op, w, x, saturate=False) + (0 if b is None else b)) * (sx * sw)
    sy = float(real.max() - real.min()) / 255
    zy = int(np.clip(round(-real.min() / sy), 0, 255))
    model = matmul_model(w, b, sx, zx, sw, None if float_output else sy, zy, kind=kind)
    (op,) = S.quantized_matmuls(model)
    return model, op, w, b, x, sy, zy
