"""INT8 on CPUs whose u8s8 kernels saturate: the CPU kinds, the numpy model of the int16 pair sums (checked
against ONNX Runtime on whatever CPU runs the tests), and the pair-fitted graphs that cannot saturate."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from posequant.calibration import saturation as S
from posequant.calibration.quantize import quantize
from posequant.calibration.reader import calibration_set
from posequant.core.cpu import ENV, detected_kind
from posequant.core.metadata import read_meta

from conftest import COCO_MINI, TRAINED_ARCH, TRAINED_CKPT, needs_shared
from qdq_cases import PATHS, conv_model, matmul_model, run_ort, saturating_case

HERE = detected_kind()  # what the kernels do here (POSEQUANT_CPU_KIND names what graphs are made for)


# ---- the pair model ------------------------------------------------------------------------------------
# (the kind itself and each kernel path against the model: tests/test_saturation_kernels.py, torch-free)


def test_saturation_count_sees_the_saturating_pairs():
    cin, cout, k, group, pads = PATHS["convsym_3x3"]
    w, b, x, sw = saturating_case(cin, cout, k, group, pads)
    (conv,) = S.quantized_convs(conv_model(w, b, 0.02, 3, sw, 1.0, 0, group=group, pads=pads))
    r = S.conv_saturation(conv, w, x)
    assert r.saturated > 0 and r.worst > 32767
    # brute force over every pair of every position: the same count
    cols = S.im2col(x.astype(np.int32), conv)[..., 0, :]  # (N, Ho, Wo, K), one group
    w2 = S.reduction_weights(w, conv).astype(np.int32)
    sums = cols[..., None, 0::2] * w2[:, 0::2] + cols[..., None, 1::2] * w2[:, 1::2]
    assert r.saturated == int(((sums > 32767) | (sums < -32768)).sum())
    assert r.pairs == sums.size


@pytest.mark.parametrize("cin", [3, 8])
def test_pair_layouts(cin):
    flat, tap = S.pair_index(cin, 9, "flat"), S.pair_index(cin, 9, "tap")
    assert (flat[:, 1] - flat[:, 0] == 1).all() and (flat[:, 0] % 2 == 0).all()
    assert (tap[:, 0] // cin == tap[:, 1] // cin).all()  # never across a kernel tap
    if cin % 2 == 0:
        assert np.array_equal(np.unique(flat, axis=0), np.unique(tap, axis=0))
    else:  # odd channels: ORT's flattened pairs cross taps, oneDNN's do not
        assert (flat[:, 0] // cin != flat[:, 1] // cin).any()


# ---- the pair fit -------------------------------------------------------------------------------------


def _float_conv_graph(cin=16, cout=24, k=3, seed=1) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    w[:, 1::2] = np.abs(w[:, 1::2]) * np.sign(w[:, 0::2])  # neighbours of the same sign: many risky pairs
    return w


def test_fit_leaves_no_pair_that_can_saturate_and_keeps_the_mean():
    w_float = _float_conv_graph()
    cout = w_float.shape[0]
    amax = np.abs(w_float).reshape(cout, -1).max(axis=1)
    sw = (amax / 127).astype(np.float32)
    w8 = np.clip(np.rint(w_float / sw.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    rng = np.random.default_rng(2)
    b = rng.integers(-300, 300, cout).astype(np.int32)
    sx, zx = 0.05, 10
    model = conv_model(w8, b, sx, zx, sw, 0.5, 128, pads=(1, 1, 1, 1))
    (conv,) = S.quantized_convs(model)
    assert S.risky_pairs(model) > 0
    x = rng.integers(0, 256, (4, 16, 9, 8)).astype(np.uint8)
    means = {conv.codes: x.astype(np.float64).mean(axis=(0, 2, 3))}
    before = S.conv_accumulators(conv, w8, x, saturate=False) * (sx * sw).reshape(1, -1, 1, 1) \
        + (b * sx * sw).reshape(1, -1, 1, 1)

    report = S.fit_pair_scales(model, {conv.name: w_float}, input_means=means)
    assert report.convs == 1 and 0 < report.channels <= cout and report.of_channels == cout
    assert all(7.0 <= bits < 8.0 for bits in report.bits.values())
    (conv,) = S.quantized_convs(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w_new = inits[conv.weight]
    assert S.risky_pairs(model) == 0
    assert S.conv_saturation(conv, w_new, np.full_like(x, 255)).saturated == 0  # the worst input cannot either
    # the weights stay the float weights' nearest codes at the new scales, and the scales only grew
    assert (conv.w_scale >= sw).all()
    assert np.abs(w_new * conv.w_scale.reshape(-1, 1, 1, 1) - w_float).max() <= conv.w_scale.max() / 2 + 1e-6
    # bias scale = x scale * weight scale (what ORT's QLinearConv assumes); the mean output is kept
    assert np.allclose(inits["sb"], np.float32(sx) * conv.w_scale)
    after = S.conv_accumulators(conv, w_new, x, saturate=False) * (sx * conv.w_scale).reshape(1, -1, 1, 1) \
        + (inits["b"] * inits["sb"]).reshape(1, -1, 1, 1)
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # borders read padding, not the mean
    assert np.abs((after - before)[interior].mean(axis=(0, 2, 3))).max() < 0.1 * np.abs(before).mean()
    assert onnx.checker.check_model(model) is None
    # and ORT runs the fitted graph exactly, on any CPU
    got = run_ort(model, x)
    assert np.array_equal(got, S.conv_output_codes(conv, w_new, inits["b"], x, 0.5, 128, saturate=False))


def test_fit_keeps_a_per_tensor_weight_per_tensor():
    """ORT's --per-tensor weights: one scale for the conv. The fit widens that one scale and the bias's, in their
    own shapes; a per-channel bias scale without an axis made ORT refuse the DequantizeLinear once it ran alone
    (found on an AVX2 CPU: the budget loop's float splice unfused it)."""
    w_float = _float_conv_graph()
    sw = np.array([np.abs(w_float).max() / 127], np.float32)
    w8 = np.clip(np.rint(w_float / sw[0]), -127, 127).astype(np.int8)
    rng = np.random.default_rng(5)
    b = rng.integers(-300, 300, w8.shape[0]).astype(np.int32)
    model = conv_model(w8, b, 0.05, 10, sw, 0.5, 128, pads=(1, 1, 1, 1))
    assert S.risky_pairs(model) > 0
    (conv,) = S.quantized_convs(model)
    x = rng.integers(0, 256, (2, 16, 9, 8)).astype(np.uint8)
    report = S.fit_pair_scales(model, {conv.name: w_float}, input_means={conv.codes: x.mean(axis=(0, 2, 3))})
    assert report.channels == 1 and S.risky_pairs(model) == 0
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits["sw"].shape == () and inits["sb"].shape == () and inits["sw"] > sw[0]
    assert onnx.checker.check_model(model, full_check=True) is None
    (conv,) = S.quantized_convs(model)
    exact = S.conv_output_codes(conv, inits["w"], inits["b"], x, 0.5, 128, saturate=False)
    assert np.array_equal(run_ort(model, x), exact)
    assert np.abs(run_ort(model, x, fused=False).astype(int) - exact).max() <= 1  # each node alone runs too


def test_fit_touches_nothing_that_cannot_saturate():
    rng = np.random.default_rng(3)
    w8 = rng.integers(-60, 61, (16, 8, 1, 1)).astype(np.int8)  # |w_i| + |w_j| <= 120: safe already
    sw = np.full(16, 0.01, np.float32)
    model = conv_model(w8, None, 0.1, 0, sw, 1.0, 0)
    before = model.SerializeToString()
    (conv,) = S.quantized_convs(model)
    report = S.fit_pair_scales(model, {conv.name: w8 * 0.01})
    assert report.convs == 1
    assert report.channels == 0 and model.SerializeToString() == before


@pytest.mark.parametrize("kind", ["matmul", "gemm"])
def test_fit_of_a_matmul_leaves_no_pair_that_can_saturate(kind):
    """RTMPose's Linear layers: a MatMul (weight K x N, no bias) or a Gemm (N x K, int32 bias). After the fit no
    pair along K can saturate, each column lost at most one bit, and ORT's fused int8 kernel computes the graph's
    exact integers on this CPU, whatever its kind."""
    rng = np.random.default_rng(7)
    k, n = 48, 20
    w_float = rng.standard_normal((k, n)).astype(np.float32)
    w_float[1::2] = np.abs(w_float[1::2]) * np.sign(w_float[0::2])  # neighbours along K of the same sign
    sw = (np.abs(w_float).max(axis=0) / 127).astype(np.float32)
    w8 = np.clip(np.rint(w_float / sw), -127, 127).astype(np.int8)
    real = w_float if kind == "matmul" else np.ascontiguousarray(w_float.T)
    w8 = w8 if kind == "matmul" else np.ascontiguousarray(w8.T)
    b = rng.integers(-300, 300, n).astype(np.int32) if kind == "gemm" else None
    model = matmul_model(w8, b, 0.05, 10, sw, 0.5, 128, kind=kind)
    assert S.risky_pairs(model) > 0
    (op,) = S.quantized_matmuls(model)
    x = rng.integers(0, 256, (3, 4, k) if kind == "matmul" else (5, k)).astype(np.uint8)
    report = S.fit_pair_scales(model, {op.name: real}, input_means={op.codes: x.reshape(-1, k).mean(axis=0)})
    assert report.matmuls == 1 and report.convs == 0 and 0 < report.channels <= n
    assert all(7.0 <= bits < 8.0 for bits in report.bits.values())
    assert S.risky_pairs(model) == 0 and onnx.checker.check_model(model, full_check=True) is None
    (op,) = S.quantized_matmuls(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert (op.w_scale >= sw).all()
    scales = op.w_scale.reshape(1, -1) if kind == "matmul" else op.w_scale.reshape(-1, 1)
    assert np.abs(inits["w"] * scales - real).max() <= op.w_scale.max() / 2 + 1e-6  # nearest codes at the new scales
    if kind == "gemm":
        assert np.allclose(inits["sb"], np.float32(0.05) * op.w_scale)  # bias scale = x scale * weight scale
    full = np.full_like(x, 255)
    assert np.array_equal(S.matmul_accumulators(op, inits["w"], full, saturate=True),
                          S.matmul_accumulators(op, inits["w"], full, saturate=False))
    exact = S.matmul_output_codes(op, inits["w"], inits.get("b"), x, 0.5, 128, saturate=False)
    assert np.array_equal(run_ort(model, x), exact)


# ---- the trained model: the graph made for AVX2 never saturates, the one made for VNNI would ----------


@pytest.fixture(scope="module")
def trained_graphs(tmp_path_factory):
    from posequant.exporter import export_pose

    d = tmp_path_factory.mktemp("sat")
    float_path = d / "model.onnx"
    export_pose(TRAINED_CKPT, float_path, arch=TRAINED_ARCH, input_size=(256, 192), keypoints="coco", color="rgb",
                verify_model=False)
    out = {"float": float_path}
    for cpu in ("vnni", "avx2"):
        out[cpu] = quantize(float_path, COCO_MINI, split="train", cpu=cpu, output=d / f"{cpu}.onnx").output
    return out


@pytest.mark.shared
@needs_shared(TRAINED_CKPT, COCO_MINI)
def test_trained_avx2_graph_never_saturates_and_the_vnni_graph_would(trained_graphs):
    meta = read_meta(trained_graphs["float"])
    crops = calibration_set(COCO_MINI, meta, num_samples=8, split="train", warn=lambda m: None).crops
    counts = {cpu: S.saturation_counts(onnx.load(str(trained_graphs[cpu])), crops.feeds()) for cpu in ("vnni", "avx2")}
    vnni, avx2 = (sum(c.saturated for c in counts[k]) for k in ("vnni", "avx2"))
    assert vnni > 1000, "the 8-bit graph saturates on an AVX2 CPU (the loss issue 12 measured)"
    assert avx2 == 0
    assert max(c.worst for c in counts["avx2"]) <= 32767
    # by construction, too: no weight pair left that could reach int16's limit with any input
    q = onnx.load(str(trained_graphs["avx2"]))
    assert S.risky_pairs(q) == 0
    stamped = read_meta(q)
    assert stamped.precision == "int8"
    import json

    settings = json.loads(next(p.value for p in q.metadata_props if p.key == "quantization"))
    assert settings["cpu"] == "avx2" and settings["exact_on"] == "every CPU kind"
    assert settings["pair_fit"]["channels_rescaled"] > 0


@pytest.mark.shared
@needs_shared(TRAINED_CKPT, COCO_MINI)
def test_trained_graph_convolutions_match_onnxruntime_on_this_cpu(trained_graphs):
    """Every quantized convolution of the real 8-bit graph, on real input codes: ORT's fused kernel equals the
    numpy model of this CPU's kind (saturating on AVX2 / AVX-512 without VNNI, exact elsewhere)."""
    q = onnx.load(str(trained_graphs["vnni"]))
    meta = read_meta(q)
    crops = calibration_set(COCO_MINI, meta, num_samples=2, split="train", warn=lambda m: None).crops
    convs = [c for c in S.quantized_convs(q) if not c.transpose]
    codes = next(S.capture_codes(q, convs, itertools.islice(crops.feeds(), 1)))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    differs = 0
    for conv in convs:
        w, x = inits[conv.weight], codes[conv.codes]
        b = inits[conv.bias] if conv.bias and conv.bias_int else None
        acc = S.conv_accumulators(conv, w, x, saturate=False) + (b.reshape(1, -1, 1, 1) if b is not None else 0)
        real = acc * (conv.x_scale * S.output_scales(conv)).reshape(1, -1, 1, 1)
        lo, hi = min(float(real.min()), 0.0), max(float(real.max()), 1e-6)
        sy = (hi - lo) / 255
        zy = int(round(-lo / sy))
        model = conv_model(w, b, conv.x_scale, conv.x_zero, conv.w_scale, sy, zy, group=conv.group, pads=conv.pads,
                            strides=conv.strides)
        got = run_ort(model, x)
        expected = S.conv_output_codes(conv, w, b, x, sy, zy, saturate=bool(HERE.saturates_on("ort")))
        assert np.array_equal(got, expected), conv.name
        other = S.conv_output_codes(conv, w, b, x, sy, zy, saturate=not HERE.saturates_on("ort"))
        differs += not np.array_equal(expected, other)
    assert differs >= 3  # saturation changes real outputs: the comparison above can tell the kinds apart


@pytest.mark.shared
@needs_shared(TRAINED_CKPT, COCO_MINI)
def test_trained_graphs_on_this_cpu_against_their_exact_twin(trained_graphs):
    """ORT's heatmaps for each 8-bit graph equal its exact integer semantics (the uint8-weight twin, exact on
    every CPU) bit for bit, except the VNNI graph on a CPU whose ORT kernels saturate, where most differ."""
    meta = read_meta(trained_graphs["float"])
    crops = calibration_set(COCO_MINI, meta, num_samples=4, split="train", warn=lambda m: None).crops
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for cpu in ("vnni", "avx2"):
        model = onnx.load(str(trained_graphs[cpu]))
        plain, twin = (ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                       for m in (model, S.exact_twin(model)))
        differs = np.mean([(plain.run(None, f)[0] != twin.run(None, f)[0]).mean() for f in crops.feeds()])
        if cpu == "vnni" and HERE.saturates_on("ort"):
            assert differs > 0.05, differs
        else:
            assert differs == 0.0, (cpu, HERE.name, differs)


@pytest.mark.shared
@needs_shared(TRAINED_CKPT, COCO_MINI)
def test_trained_avx2_graph_stays_as_close_to_float(trained_graphs):
    """The pair fit costs at most a little fidelity: heatmap error vs float on the val crops (exact semantics)."""
    from posequant.calibration import iter_batches, open_dataset

    meta = read_meta(trained_graphs["float"])
    ds = open_dataset(COCO_MINI, input_size=meta.input_size, split="val")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                for k, p in trained_graphs.items()}
    err = {"vnni": 0.0, "avx2": 0.0}
    norm = 0.0
    for batch in iter_batches(ds, meta, batch_size=8, limit=32):
        f = sessions["float"].run(None, {"input": batch.inputs})[0].astype(np.float64)
        norm += float((f ** 2).sum())
        for k in err:
            err[k] += float(((sessions[k].run(None, {"input": batch.inputs})[0] - f) ** 2).sum())
    rel = {k: v / norm for k, v in err.items()}
    assert rel["vnni"] < 0.02 and rel["avx2"] < 1.25 * rel["vnni"] + 0.002, rel


# ---- gate and bench across CPU kinds --------------------------------------------------------------


@pytest.mark.shared
@needs_shared(TRAINED_CKPT, COCO_MINI)
@pytest.mark.parametrize("pretend, graph", [("avx2", "vnni"), ("vnni", "avx2"), ("amx", "vnni")])
def test_gate_and_bench_say_when_the_graph_was_made_for_another_cpu(trained_graphs, monkeypatch, pretend, graph):
    """On a saturating CPU an 8-bit graph gets one line naming the fix and what saturation costs (measured
    against the graph's exact semantics); a pair-fitted graph on an exact CPU gets one line naming what
    --cpu would keep; a graph made for an exact kind on another exact kind gets none."""
    from posequant.benchmarks import latency
    from posequant.benchmarks.gate import gate
    from posequant.benchmarks.gate_report import format_gate

    monkeypatch.setenv(ENV, pretend)  # as a user building for another machine would
    res = gate(trained_graphs["float"], trained_graphs[graph], COCO_MINI, min_speedup=0.0, runs=1, warmup=0,
               flip=False, limit=16)
    assert res.cpu["here"] == pretend and res.cpu["made_for"] == graph
    text = format_gate(res)
    note = res.cpu["note"]
    if pretend == "avx2":
        assert "saturating int16 pairs" in note and "--cpu avx2" in note and "measured here" in note
        assert isinstance(res.cpu["saturation_cost_points"], float)
    elif graph == "avx2":
        assert "--cpu vnni would keep full 8-bit weights" in note and "saturation_cost_points" not in res.cpu
    else:
        assert note is None
    assert text.count("note:") == (note is not None)  # said once, not again among bench's warnings
    bench_notes = [w for w in latency.bench([trained_graphs[graph]], backends=["ort"], batches=(1,), runs=1,
                                            warmup=0).warnings if "quantized for" in w]
    assert len(bench_notes) == (note is not None)
