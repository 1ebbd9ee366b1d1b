"""posequant convert: OpenVINO IR (.xml + .bin) carrying posequant's metadata, INT8 kept as int8, the IR
run by eval/bench/gate on OpenVINO, TensorRT refused in one line where it is absent, and bad input.

A tiny random pose_resnet (COCO-17, 64x32) always; the trained ultralight model on coco-mini crops when
../shared has it. INT8 models are made with plain onnxruntime quantize_static (QDQ, per-channel).
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

from posequant.benchmarks.evaluate import evaluate
from posequant.benchmarks.runners import make_runner
from posequant.calibration import open_dataset
from posequant.calibration.preprocess import iter_batches
from posequant.cli import main
from posequant.core import irfile
from posequant.core.enginefile import tensorrt_problem
from posequant.core.errors import PosequantError
from posequant.core.metadata import read_meta
from posequant.demo import randomise
from posequant.exporter import export_pose
from posequant.exporter.convert import convert
from posequant.exporter.zoo import pose_resnet

from conftest import COCO_MINI, TRAINED_ARCH, TRAINED_CKPT, needs_shared

SMALL_COCO = pose_resnet.PoseResNetConfig(depth=18, num_joints=17, deconv_filters=(32, 32, 32))
SIZE = (64, 32)


class Reader(CalibrationDataReader):
    def __init__(self, inputs):
        self.it = iter({"input": x} for x in inputs)

    def get_next(self):
        return next(self.it, None)


def qdq(float_onnx, out, size):
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, 3, *size), dtype=np.float32) for _ in range(4)]
    quantize_static(str(float_onnx), str(out), Reader(inputs), quant_format=QuantFormat.QDQ, per_channel=True)
    return out


def synthetic_coco(root, n_images=2):
    """A few smooth random images with two boxed people each (ground truth: box centres)."""
    (root / "val2017").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n_images):
        name = f"{i + 1:012d}.jpg"
        image = cv2.resize(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), (160, 120), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(root / "val2017" / name), image)
        images.append({"id": i + 1, "file_name": name, "width": 160, "height": 120})
        for k, box in enumerate(([10.0, 10.0, 60.0, 100.0], [80.0, 5.0, 70.0, 110.0])):
            centre = [box[0] + box[2] / 2, box[1] + box[3] / 2, 2]
            anns.append({"id": 10 * i + k + 1, "image_id": i + 1, "bbox": box, "keypoints": centre * 17,
                         "area": box[2] * box[3], "iscrowd": 0, "category_id": 1, "num_keypoints": 17})
    ann = root / "annotations" / "person_keypoints_val2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("convert")
    ckpt = d / "pose_resnet.pth"
    torch.manual_seed(0)
    torch.save(randomise(pose_resnet.build(SMALL_COCO)).state_dict(), ckpt)
    f = export_pose(ckpt, d / "float.onnx", input_size=SIZE, verify_model=False).output
    q = qdq(f, d / "int8.onnx", SIZE)
    fr, qr = convert(f, "openvino"), convert(q, "openvino", output=d / "ir")
    coco = synthetic_coco(d / "coco")
    # ground truth: the float model's own predictions, so the gate has a score to judge a drop from
    ann = coco / "annotations" / "person_keypoints_val2017.json"
    doc = json.loads(ann.read_text())
    for a, pred in zip(doc["annotations"], evaluate(f, coco, flip=False).preds):
        a["keypoints"] = [float(v) for xy in pred for v in (*xy, 2)]
    ann.write_text(json.dumps(doc))
    return SimpleNamespace(dir=d, float=f, int8=q, float_ir=fr.output, int8_ir=qr.output, fres=fr, qres=qr,
                           coco=coco)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res, code=2):
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def crops(meta, root, limit=8):
    ds = open_dataset(root, input_size=meta.input_size)
    return np.concatenate([b.inputs for b in iter_batches(ds.people, meta, batch_size=4, limit=limit)])


def max_diff(onnx_path, xml_path, inputs):
    ort = make_runner("ort", onnx_path=onnx_path).infer(inputs)
    ov = make_runner("openvino", onnx_path=xml_path).infer(inputs)
    return float(np.abs(ort - ov).max()), float(np.abs(ort).max())


# ---- the IR ------------------------------------------------------------------------------------


def test_the_pair_is_written_where_asked(tiny):
    assert tiny.float_ir == tiny.float.with_suffix(".xml") and irfile.bin_path(tiny.float_ir).is_file()
    assert tiny.int8_ir == tiny.dir / "ir" / "int8.xml" and (tiny.dir / "ir" / "int8.bin").is_file()
    assert not [p for p in tiny.dir.rglob(".*")]  # no temporary files left beside them
    assert tiny.fres.precision == "fp32" and tiny.qres.precision == "int8"


@pytest.mark.parametrize("which", ["float", "int8"])
def test_metadata_round_trip(tiny, which):
    onnx_path, xml = getattr(tiny, which), getattr(tiny, f"{which}_ir")
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    assert irfile.ir_props(irfile.load_ir(xml)) == props  # every key, verbatim
    assert read_meta(xml) == read_meta(onnx_path)


def test_float_ir_matches_onnx(tiny):
    inputs = crops(read_meta(tiny.float), tiny.coco)
    diff, scale = max_diff(tiny.float, tiny.float_ir, inputs)
    assert scale > 0 and diff <= 1e-4 * max(1.0, scale)


def test_int8_ir_keeps_int8_weights(tiny):
    fbin, qbin = (os.path.getsize(irfile.bin_path(p)) for p in (tiny.float_ir, tiny.int8_ir))
    assert qbin < 0.35 * fbin  # int8 weights: about a quarter of the float .bin
    ir = irfile.load_ir(tiny.int8_ir)
    ops = ir.get_ops()
    int8_consts = [o for o in ops if o.get_type_name() == "Constant" and o.get_element_type().get_type_name() == "i8"]
    assert int8_consts and any(o.get_type_name() == "FakeQuantize" for o in ops)
    assert irfile.ir_precision(ir) == "int8" and irfile.ir_precision(irfile.load_ir(tiny.float_ir)) == "fp32"
    # what OpenVINO runs from the IR is what it runs from the QDQ ONNX file, exactly (read_model + save_model;
    # convert_model read the QDQ graph otherwise: up to one output quantization step apart, issue 22)
    inputs = crops(read_meta(tiny.int8), tiny.coco, limit=4)
    a = make_runner("openvino", onnx_path=tiny.int8).infer(inputs)
    b = make_runner("openvino", onnx_path=tiny.int8_ir).infer(inputs)
    assert np.array_equal(a, b)


def test_compress_weights_fp16_halves_the_float_bin(tiny, tmp_path):
    res = convert(tiny.float, "openvino", output=tmp_path / "half.xml", compress_weights="fp16")
    full = os.path.getsize(irfile.bin_path(tiny.float_ir))
    assert 0.4 * full < os.path.getsize(irfile.bin_path(res.output)) < 0.6 * full
    assert res.precision == "fp16" and read_meta(res.output) == read_meta(tiny.float)
    # the weights only: inputs and outputs stay f32
    diff, scale = max_diff(tiny.float, res.output, crops(read_meta(tiny.float), tiny.coco, limit=4))
    assert diff <= 1e-2 * max(1.0, scale)


@pytest.mark.shared
@needs_shared(TRAINED_CKPT, COCO_MINI)
def test_trained_model_ir_matches_onnx_on_real_crops(tmp_path):
    f = export_pose(TRAINED_CKPT, tmp_path / "ul.onnx", arch=TRAINED_ARCH, input_size=(256, 192), keypoints="coco",
                    color="rgb", verify_model=False).output
    xml = convert(f, "openvino").output
    assert read_meta(xml) == read_meta(f)
    inputs = crops(read_meta(f), COCO_MINI, limit=8)
    diff, scale = max_diff(f, xml, inputs)
    assert scale > 0.1 and diff <= 1e-4  # trained heatmaps peak near 1


# ---- commands on the IR ------------------------------------------------------------------------


def test_eval_on_the_ir_runs_openvino_and_scores_like_onnx(tiny, tmp_path):
    out = tmp_path / "eval.json"
    res = invoke("eval", tiny.float_ir, "--data", tiny.coco, "--no-flip", "--json", out)
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert got["backend"] == "openvino" and got["people"] == 4
    ref = evaluate(tiny.float, tiny.coco, flip=False)
    assert got["metrics"]["AP"] == pytest.approx(ref.metrics["AP"], abs=1e-3)


def test_eval_on_the_ir_with_another_backend_is_one_line(tiny):
    line = one_line_error(invoke("eval", tiny.float_ir, "--data", tiny.coco, "--backend", "ort"))
    assert "OpenVINO IR" in line and "openvino" in line


def test_bench_times_the_ir_on_openvino_only(tiny, tmp_path):
    out = tmp_path / "bench.json"
    res = invoke("bench", tiny.float, tiny.float_ir, tiny.int8_ir, "--backend", "ort,openvino", "--batch", "1",
                 "--runs", "2", "--warmup", "1", "--json", out)
    assert res.exit_code == 0, res.output
    rows = {(r["model"], r["backend"], r["precision"]) for r in json.loads(out.read_text())["results"]}
    assert (str(tiny.float_ir), "openvino", "fp32") in rows and (str(tiny.int8_ir), "openvino", "int8") in rows
    assert not any(m in (str(tiny.float_ir), str(tiny.int8_ir)) and b == "ort" for m, b, _ in rows)
    assert "an OpenVINO IR runs on openvino only" in res.output


def test_gate_on_two_irs(tiny, tmp_path):
    out = tmp_path / "gate.json"
    res = invoke("gate", "--float", tiny.float_ir, "--int8", tiny.int8_ir, "--data", tiny.coco, "--no-flip",
                 "--max-drop", 100, "--max-joint-drop", 100, "--min-speedup", 0, "--runs", 2, "--json", out)
    assert res.exit_code in (0, 1), res.output
    got = json.loads(out.read_text())
    assert got["backend"] == "openvino" and got["float_model"] == str(tiny.float_ir)
    assert got["latency"]["results"][0]["backend"] == "openvino"


# ---- bad input ---------------------------------------------------------------------------------


def test_an_xml_without_its_bin_is_one_line(tiny, tmp_path):
    lone = tmp_path / "lone.xml"
    shutil.copy(tiny.float_ir, lone)
    line = one_line_error(invoke("eval", lone, "--data", tiny.coco))
    assert "lone.bin" in line and "convert" in line
    with pytest.raises(PosequantError, match="lone.bin"):
        read_meta(lone)


def test_an_xml_that_is_not_ir_is_one_line(tiny, tmp_path):
    fake = tmp_path / "fake.xml"
    fake.write_text("not xml at all\n")
    fake.with_suffix(".bin").write_bytes(b"\0" * 16)
    assert "not an OpenVINO IR" in one_line_error(invoke("bench", fake, "--runs", 1))
    other = tmp_path / "other.xml"  # XML, but not a network
    other.write_text('<?xml version="1.0"?>\n<svg></svg>\n')
    other.with_suffix(".bin").write_bytes(b"\0" * 16)
    assert "cannot be read as an OpenVINO IR" in one_line_error(invoke("eval", other, "--data", tiny.coco))


def test_an_ir_without_posequant_metadata_is_one_line(tiny, tmp_path):
    import openvino as ov

    plain = tmp_path / "plain.xml"
    ov.save_model(ov.convert_model(str(tiny.float)), str(plain), compress_to_fp16=False)
    # convert_model of ONNX does not carry metadata_props over: only posequant convert does
    assert "no posequant metadata" in one_line_error(invoke("eval", plain, "--data", tiny.coco))


def test_output_onto_the_input_is_refused(tiny, tmp_path):
    link = tmp_path / "link.xml"
    link.symlink_to(tiny.float)
    line = one_line_error(invoke("convert", tiny.float, "--to", "openvino", "-o", link))
    assert "is the input MODEL" in line
    assert link.is_symlink() and onnx.load(str(tiny.float), load_external_data=False).graph.node  # untouched
    assert "is written as a .xml file" in one_line_error(invoke("convert", tiny.float, "--to", "openvino",
                                                                "-o", tiny.float))


def test_no_half_pair_when_the_bin_cannot_be_written(tiny, tmp_path):
    (tmp_path / "m.bin").mkdir()  # the .bin's place is taken by a folder
    line = one_line_error(invoke("convert", tiny.float, "--to", "openvino", "-o", tmp_path / "m.xml"))
    assert "m.bin" in line and "directory" in line
    assert not (tmp_path / "m.xml").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


def test_a_new_output_folder_is_made_and_an_onnx_without_metadata_refused(tiny, tmp_path):
    res = invoke("convert", tiny.float, "--to", "openvino", "-o", tmp_path / "new")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "new" / "float.xml").is_file() and (tmp_path / "new" / "float.bin").is_file()
    bare = tmp_path / "bare.onnx"
    m = onnx.load(str(tiny.float))
    del m.metadata_props[:]
    onnx.save(m, str(bare))
    assert "no posequant metadata" in one_line_error(invoke("convert", bare, "--to", "openvino",
                                                            "-o", tmp_path / "gone"))
    assert not (tmp_path / "gone").exists()


@pytest.mark.skipif(tensorrt_problem() is None, reason="TensorRT and a GPU are here: the engine can be built")
def test_tensorrt_here_is_one_line(tiny, tmp_path):
    line = one_line_error(invoke("convert", tiny.float, "--to", "tensorrt", "-o", tmp_path / "m.engine"))
    assert "--to tensorrt" in line and tensorrt_problem() in line
    assert not list(tmp_path.iterdir())
    # an engine file (whatever its bytes) cannot run here either, nor on the CPU
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    engine.with_name("m.engine.json").write_text(json.dumps(
        {"props": {p.key: p.value for p in onnx.load(str(tiny.float)).metadata_props}, "precision": "fp32",
         "batch": None}))
    assert "--device cuda" in one_line_error(invoke("eval", engine, "--data", tiny.coco))
    line = one_line_error(invoke("eval", engine, "--data", tiny.coco, "--device", "cuda"))
    assert "tensorrt" in line.lower() or "cuda" in line.lower()


def test_json_onto_the_irs_weights_is_refused(tiny):
    weights = irfile.bin_path(tiny.float_ir)
    before = weights.stat().st_size
    line = one_line_error(invoke("eval", tiny.float_ir, "--data", tiny.coco, "--json", weights))
    assert "is the input MODEL (.bin)" in line and weights.stat().st_size == before


def test_predict_runs_an_ir_on_openvino_like_its_onnx(tiny, tmp_path):
    """predict on the .xml picks OpenVINO by itself and finds the joints the ONNX file finds there."""
    import cv2

    onnx_path, xml = tiny.float, tiny.float_ir
    image = tmp_path / "person.jpg"
    cv2.imwrite(str(image), (np.random.default_rng(0).random((96, 80, 3)) * 255).astype(np.uint8))
    runs = {}
    for name, model, extra in (("xml", xml, []), ("onnx", onnx_path, ["--backend", "openvino"])):
        res = invoke("predict", model, image, "-o", tmp_path / name, "--no-flip", *extra)
        assert res.exit_code == 0, res.output
        runs[name] = json.loads((tmp_path / name / "keypoints.json").read_text())
    assert json.loads((tmp_path / "xml" / "predict.json").read_text())["backend"] == "openvino"
    assert np.allclose(runs["xml"][0]["keypoints"], runs["onnx"][0]["keypoints"], atol=1e-3)


# ---- OpenVINO runs a --target ort file as its QDQ graph says (issue 22) ------------------------------------


def sunk_chain(per_channel: bool, bias: bool) -> onnx.ModelProto:
    """uint8 phases -> DepthToSpace -> DQ -> 1x1 Conv (int8 weights, per channel or per tensor, with or without an
    int32 bias) -> heatmaps: the tail of a rewritten last deconvolution. Weight codes within +-63, so no int16
    pair can saturate on any CPU: OpenVINO must then compute exactly what the QDQ graph says."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c, j = 8, 3
    w = rng.standard_normal((j, c, 1, 1)).astype(np.float32)
    scale = (np.abs(w).reshape(j, -1).max(1) / 63 if per_channel else np.array(np.abs(w).max() / 63)).astype(np.float32)
    codes = np.round(w / (scale.reshape(-1, 1, 1, 1) if per_channel else scale)).astype(np.int8)
    inits = [numpy_helper.from_array(codes, "wq"), numpy_helper.from_array(scale, "ws"),
             numpy_helper.from_array(np.zeros(scale.shape, np.int8), "wz"),
             numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
             numpy_helper.from_array(np.array(10, np.uint8), "xz")]
    axis = {"axis": 0} if per_channel else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DepthToSpace", ["xq"], ["xd"], blocksize=2, mode="DCR"),
             helper.make_node("DequantizeLinear", ["xd", "xs", "xz"], ["xf"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wf"], **axis),
             helper.make_node("Conv", ["xf", "wf", *(["bf"] if bias else [])], ["y"])]
    if bias:
        bscale = (0.02 * scale).astype(np.float32) * np.ones(j, np.float32)
        inits += [numpy_helper.from_array(rng.integers(-500, 500, j).astype(np.int32), "bq"),
                  numpy_helper.from_array(bscale, "bs"), numpy_helper.from_array(np.zeros(j, np.int32), "bz")]
        nodes.insert(4, helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bf"], axis=0))
    graph = helper.make_graph(nodes, "tail",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4 * c, 6, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", j, 12, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("per_channel,bias", [(True, False), (True, True), (False, False)])
def test_the_sunk_depth_to_space_runs_on_openvino_as_its_qdq_graph_says(tmp_path, per_channel, bias):
    """OpenVINO 2026.4 applied the heatmap layer's per-channel weight scales in the wrong channel order behind the
    Reshape that takes the phases out of the batch (relative L2 0.4 on the trained model's --target ort file):
    those scales now come after that Reshape."""
    import onnxruntime as ort

    from posequant.calibration.qdq import sink_depth_to_space

    model = sunk_chain(per_channel, bias)
    x = np.random.default_rng(1).uniform(-0.2, 4.0, (2, 32, 6, 5)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the QDQ graph's own semantics
    reference = ort.InferenceSession(model.SerializeToString(), opts).run(None, {"x": x})[0]
    assert sink_depth_to_space(model) == 1
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "sunk.onnx"
    onnx.save(model, str(path))
    sunk = ort.InferenceSession(model.SerializeToString(), opts).run(None, {"x": x})[0]
    on_openvino = make_runner("openvino", onnx_path=path).infer(x)
    scale = np.abs(reference).max()
    assert np.abs(sunk - reference).max() <= 1e-5 * scale  # exact for ORT
    assert np.abs(on_openvino - reference).max() <= 1e-5 * scale, np.abs(on_openvino - reference).max() / scale
