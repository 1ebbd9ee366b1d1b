"""bench and gate: latency rows and machine facts, the INT8 gate's verdicts, report files and bad input.

INT8 models are made here with plain onnxruntime quantize_static (QDQ, per-channel). The gate runs
on a small synthetic COCO set whose ground truth is the float model's own predictions, so the float
model scores 100 and a broken INT8 model visibly does not; the trained model is gated on coco-mini.
"""

import json
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

from posequant.benchmarks.evaluate import evaluate
from posequant.benchmarks.gate import gate
from posequant.benchmarks.gate_report import format_gate
from posequant.benchmarks.latency import bench, onnx_precision
from posequant.benchmarks.machine import gpu_name
from posequant.benchmarks.runners import make_runner
from posequant.cli import main
from posequant.core.errors import PosequantError
from posequant.core.keypoints import MPII
from posequant.core.metadata import read_meta, write_meta
from posequant.demo import randomise
from posequant.exporter import export_pose
from posequant.exporter.zoo import pose_resnet

from conftest import COCO_MINI, TRAINED_ARCH, TRAINED_CKPT, needs_shared

# A small Simple Baselines model with COCO's 17 joints: three ConvTranspose layers, quick to export.
SMALL_COCO = pose_resnet.PoseResNetConfig(depth=18, num_joints=17, deconv_filters=(32, 32, 32))
SIZE = (64, 32)  # a size the stride-32 backbone divides (64x48 gave 16x16 heatmaps, not 16x12)
LOOSE = dict(max_drop=50.0, max_joint_drop=60.0)  # random weights: INT8 moves some joints, never all
FAST = dict(runs=2, warmup=1, flip=False)


class Reader(CalibrationDataReader):
    def __init__(self, inputs):
        self.it = iter({"input": x} for x in inputs)

    def get_next(self):
        return next(self.it, None)


def quantize(float_onnx, out, inputs=None, **options):
    meta = read_meta(float_onnx)
    if inputs is None:
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal((1, 3, *meta.input_size), dtype=np.float32) for _ in range(4)]
    quantize_static(str(float_onnx), str(out), Reader(inputs), quant_format=QuantFormat.QDQ, per_channel=True,
                    **options)
    return out


def break_int8(src, dst, factor=0.0, at="weights"):
    """Scale the last convolution's weight scales (by 0: constant heatmaps, every joint at the box corner),
    or with ``at="output"`` the scale of the output's DequantizeLinear (by NaN: NaN heatmaps)."""
    model = onnx.load(str(src))
    producer = {o: n for n in model.graph.node for o in n.output}
    if at == "output":
        scale_name = producer[model.graph.output[0].name].input[1]
    else:
        last_conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
        scale_name = producer[last_conv.input[1]].input[1]
    init = next(i for i in model.graph.initializer if i.name == scale_name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), scale_name))
    onnx.save(model, str(dst))
    return dst


def with_meta(src, dst, **changes):
    model = onnx.load(str(src))
    write_meta(model, read_meta(model).with_(**changes))
    # stands for a model of another size or joint set: the graph's static dims must not say otherwise
    # (read_meta holds the graph to its metadata)
    if "input_size" in changes or "joint_names" in changes:
        for value, first in ((model.graph.input[0], 2), (model.graph.output[0], 1)):
            for dim in value.type.tensor_type.shape.dim[first:]:
                dim.dim_param = "free"
    onnx.save(model, str(dst))
    return dst


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res, code=2):
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    ckpt = d / "pose_resnet.pth"
    torch.manual_seed(0)
    torch.save(randomise(pose_resnet.build(SMALL_COCO)).state_dict(), ckpt)
    float_onnx = export_pose(ckpt, d / "float.onnx", input_size=SIZE, verify_model=False).output
    int8 = quantize(float_onnx, d / "int8.onnx")
    return SimpleNamespace(dir=d, ckpt=ckpt, float=float_onnx, int8=int8, broken=break_int8(int8, d / "broken.onnx"))


@pytest.fixture(scope="module")
def coco(models):
    """8 people on 4 smooth random images, labelled with the float model's own predictions."""
    root = models.dir / "coco"
    (root / "val2017").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(4):
        name = f"{i + 1:012d}.jpg"
        image = cv2.resize(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), (160, 120), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(root / "val2017" / name), image)
        images.append({"id": i + 1, "file_name": name, "width": 160, "height": 120})
        for k, box in enumerate(([10.0, 10.0, 60.0, 100.0], [80.0, 5.0, 70.0, 110.0])):
            centre = [box[0] + box[2] / 2, box[1] + box[3] / 2, 2]
            anns.append({"id": 10 * i + k + 1, "image_id": i + 1, "bbox": box, "keypoints": centre * 17,
                         "area": box[2] * box[3], "iscrowd": 0, "category_id": 1, "num_keypoints": 17})
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    ann = root / "annotations" / "person_keypoints_val2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(doc))
    preds = evaluate(models.float, root, flip=False).preds
    for a, p in zip(anns, preds):
        a["keypoints"] = [float(v) for xy in p for v in (*xy, 2)]
    ann.write_text(json.dumps(doc))
    return root


# ---- bench -------------------------------------------------------------------------------------


def test_precision_comes_from_the_graph(models):
    assert onnx_precision(models.float) == "fp32"
    assert onnx_precision(models.int8) == "int8"
    assert read_meta(models.int8).precision == "fp32"  # quantize_static keeps the float metadata


def test_bench_rows_speedups_and_machine_facts(models):
    res = bench([models.float, models.int8], backends=["ort", "openvino"], batches=(1, 2), runs=3, warmup=1)
    got = {(r.model, r.backend, r.precision, r.batch) for r in res.rows}
    for batch in (1, 2):
        assert (str(models.float), "ort", "fp32", batch) in got
        assert (str(models.int8), "ort", "int8", batch) in got
        assert (str(models.float), "openvino", "fp32", batch) in got
        assert (str(models.int8), "openvino", "int8", batch) in got
    for r in res.rows:
        assert 0 < r.p50_ms <= r.p90_ms <= r.p99_ms and r.runs == 3 and r.device == "cpu"
        assert r.throughput == pytest.approx(r.batch * 1e3 / r.p50_ms)
        base = res.row(models.float, "ort", "fp32", r.batch)
        assert r.speedup == pytest.approx(base.p50_ms / r.p50_ms)  # one model family: one baseline
        assert r.model_mb > 0
    assert res.row(models.int8, "ort", "int8").model_mb < res.row(models.float, "ort", "fp32").model_mb / 2
    m = res.machine
    assert {"cpu", "cpu_flags", "threads", "gpu", "versions"} <= set(m)
    assert {"avx512_vnni", "amx_int8", "avx512_bf16"} <= set(m["cpu_flags"])
    assert {"onnxruntime", "onnx", "torch"} <= set(m["versions"])
    bf16 = res.row(models.float, "openvino", "bf16")
    assert (bf16 is None) == any(s["reason"].startswith("bf16") for s in res.skipped)  # run, or said why not


def test_openvino_static_shapes_compile_once_per_shape_and_match_dynamic(models):
    # bench compiles OpenVINO for each batch's fixed shape (faster kernels); the numbers must not change
    dynamic = make_runner("openvino", onnx_path=models.float, threads=1)
    static = make_runner("openvino", onnx_path=models.float, threads=1, static_shapes=True)
    rng = np.random.default_rng(1)
    for batch in (1, 2, 1):
        x = rng.standard_normal((batch, 3, *SIZE), dtype=np.float32)
        np.testing.assert_allclose(static.infer(x), dynamic.infer(x), rtol=1e-4, atol=1e-4)
    assert sorted(static.compiled_by_shape) == [(1, 3, *SIZE), (2, 3, *SIZE)]
    assert all(c.input(0).get_partial_shape().is_static for c in static.compiled_by_shape.values())


def test_bench_checkpoint_runs_torch_eager_too(models):
    res = bench([models.ckpt], backends=["torch", "ort"], batches=(1,), runs=2, warmup=1,
                export_options=dict(input_size=SIZE))
    torch_row, ort_row = res.row(models.ckpt, "torch", "fp32"), res.row(models.ckpt, "ort", "fp32")
    assert torch_row and ort_row and ort_row.speedup == 1.0
    assert torch_row.speedup == pytest.approx(ort_row.p50_ms / torch_row.p50_ms)


def test_bench_onnx_cannot_run_torch(models):
    with pytest.raises(PosequantError, match="nothing could be benchmarked.*needs a checkpoint"):
        bench([models.float], backends=["torch"], batches=(1,), runs=1, warmup=0)


def test_bench_warns_about_float_deconvolutions(models, tmp_path):
    q = models.int8
    partial = quantize(models.float, tmp_path / "partial.onnx", op_types_to_quantize=["Conv"])
    res = bench([q, partial], backends=["ort"], batches=(1,), runs=1, warmup=0)
    text = "\n".join(res.warnings)
    assert f"{q}: 3 ConvTranspose" in text and "no INT8 ConvTranspose kernel" in text
    assert f"{partial}: 3 of 3 ConvTranspose" in text and "not quantized" in text
    assert f"{q}: 3 of 3" not in text


def test_bench_cli_table_and_json(models, tmp_path):
    out = tmp_path / "bench.json"
    res = invoke("bench", models.float, models.int8, "--backend", "ort", "--batch", "1,2", "--runs", "2",
                 "--warmup", "1", "--threads", "1", "--json", out)
    assert res.exit_code == 0, res.output
    assert "p50 ms" in res.output and "vs ORT fp32" in res.output and "int8" in res.output
    doc = json.loads(out.read_text())
    assert set(doc) >= {"results", "machine", "skipped", "warnings"}
    assert len(doc["results"]) == 4 and doc["machine"]["threads"] == 1
    for row in doc["results"]:
        assert {"model", "backend", "precision", "device", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput",
                "memory_mb", "model_mb", "speedup"} <= set(row)
        assert row["precision"] in ("fp32", "int8")


@pytest.mark.parametrize("args,expect", [
    (["--backend", "tensorrt"], "tensorrt does not run on cpu"),
    (["--backend", "openvno"], "did you mean openvino"),
    (["--device", "cuda"], "no CUDA GPU"),
])
def test_bench_bad_backend_or_device(models, args, expect):
    if "cuda" in args and gpu_name():
        pytest.skip("this machine has a GPU")
    res = invoke("bench", models.float, *args, "--runs", "1")
    assert res.exit_code == 2, res.output
    assert expect in res.output and "Traceback" not in res.output


# ---- gate --------------------------------------------------------------------------------------


def test_gate_passes_and_writes_the_report(models, coco, tmp_path):
    res = gate(models.float, models.int8, coco, min_speedup=0.0, report_dir=tmp_path / "rep", **LOOSE, **FAST)
    assert res.passed and not res.reasons, res.reasons
    assert res.people == 8 and res.main_metric == "AP"
    assert res.scores["AP"]["float"] == pytest.approx(100.0)  # labelled with its own predictions
    assert list(res.groups) == ["Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle"]
    assert [c.name for c in res.checks][-1].startswith("speedup on ort") and res.speedup > 0
    files = {p.split("/")[-1] for p in res.report_files}
    assert files == {"report.md", "report.json", "disagreements.png"}
    md = (tmp_path / "rep" / "report.md").read_text()
    for part in ("# INT8 gate: PASS", "## Per-joint deltas", "## Latency", "disagreements.png", "left_wrist"):
        assert part in md
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["passed"] is True and doc["latency"]["results"] and len(doc["disagreements"]) == 6
    png = cv2.imread(str(tmp_path / "rep" / "disagreements.png"))
    assert png.shape[1] == 2 * 128 + 6 and png.shape[0] >= 256  # float | INT8 panels, 256 px high (1:2, as SIZE)


def test_gate_fails_a_broken_int8_model(models, coco):
    res = gate(models.float, models.broken, coco, min_speedup=0.0, **LOOSE, **FAST)
    assert not res.passed
    assert any(r.startswith("AP (x100) dropped") for r in res.reasons), res.reasons
    assert res.scores["AP"]["int8"] < 50
    assert res.disagreements[0]["disagreement"] > 0.1


def test_gate_agreement_is_reported_and_can_be_a_check(models, coco):
    """The agreement of INT8 with float keypoints is always measured; --min-agreement makes it a check that a
    broken model fails while the AP budget alone (loosened here) lets it through."""
    res = gate(models.float, models.int8, coco, min_speedup=0.0, min_agreement=0.5, **LOOSE, **FAST)
    assert res.passed and 0.5 <= res.agreement["OKS"] <= 1.0
    assert res.checks[-2].kind == "agreement" and res.checks[-2].passed
    assert "agreement with float keypoints: OKS" in format_gate(res)
    assert res.to_dict()["agreement"] == res.agreement
    broken = gate(models.float, models.broken, coco, min_speedup=0.0, max_drop=100.0, max_joint_drop=100.0,
                  min_agreement=0.9, **FAST)
    assert not broken.passed and broken.reasons == [
        f"agreement with float keypoints (OKS) {broken.agreement['OKS']:.3f} (needs >= 0.9)"]
    plain = gate(models.float, models.int8, coco, min_speedup=0.0, **LOOSE, **FAST)
    assert plain.agreement and all(c.kind != "agreement" for c in plain.checks)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_gate_min_agreement_is_an_oks(models, coco, value):
    res = invoke("gate", "--float", models.float, "--int8", models.int8, "--data", coco, "--min-agreement", value)
    assert res.exit_code == 2 and "--min-agreement" in res.output and "Traceback" not in res.output


def test_gate_int8_model_with_nan_output_fails(models, coco, tmp_path):
    nan = break_int8(models.int8, tmp_path / "nan.onnx", factor=np.nan, at="output")
    res = invoke("gate", "--float", models.float, "--int8", nan, "--data", coco, "--no-flip", "--runs", "1")
    assert "gate FAIL" in one_line_error(res, code=1) and "NaN" in res.output


def test_gate_cli_exit_1_when_not_fast_enough(models, coco, tmp_path):
    out = tmp_path / "gate.json"
    res = invoke("gate", "--float", models.float, "--int8", models.int8, "--data", coco, "--min-speedup", "100",
                 "--max-drop", "50", "--max-joint-drop", "60", "--no-flip", "--runs", "2", "--json", out)
    assert res.exit_code == 1, res.output
    assert "gate: FAIL" in res.output and "needs >= 100x" in res.output
    doc = json.loads(out.read_text())
    assert doc["passed"] is False and len(doc["reasons"]) == 1 and doc["checks"][-1]["kind"] == "speedup"


@pytest.mark.parametrize("case,expect", [
    ("int8_as_float", "is an INT8 model"),
    ("float_as_int8", "has no quantization nodes"),
    ("input_size", "different input sizes (64x32 float, 32x24 INT8)"),
    ("keypoints", "different keypoint sets"),
    ("missing", "not found"),
    ("tensorrt", "tensorrt does not run on cpu"),
    ("cuda", "no CUDA GPU"),
])
def test_gate_bad_input_is_one_line_exit_2(models, coco, tmp_path, case, expect):
    if case == "cuda" and gpu_name():
        pytest.skip("this machine has a GPU")
    f, q, extra = models.float, models.int8, []
    if case == "int8_as_float":
        f, q = models.int8, models.int8
    elif case == "float_as_int8":
        q = models.float
    elif case == "input_size":
        q = with_meta(models.int8, tmp_path / "q.onnx", input_size=(32, 24), heatmap_size=(8, 6))
    elif case == "keypoints":
        q = with_meta(models.int8, tmp_path / "q.onnx", keypoints="mpii", joint_names=MPII.joint_names,
                      flip_pairs=MPII.flip_pairs, skeleton=MPII.skeleton)
    elif case == "missing":
        q = tmp_path / "nope.onnx"
    elif case == "tensorrt":
        extra = ["--backend", "tensorrt"]
    else:
        extra = ["--device", "cuda"]
    res = invoke("gate", "--float", f, "--int8", q, "--data", coco, "--report", tmp_path / "rep", *extra)
    assert expect in one_line_error(res)


# ---- the trained model on real people ----------------------------------------------------------


@pytest.mark.shared
@needs_shared(TRAINED_CKPT, COCO_MINI)
def test_gate_trained_model_on_coco_mini(tmp_path):
    """posequant's own INT8 (made for this CPU's kind, so exact here whatever the kind) passes a real gate; a
    broken one fails it. (Plain quantize_static graphs saturate on AVX2 CPUs: see tests/test_saturation.py.)"""
    from posequant.calibration.quantize import quantize as posequant_quantize
    from posequant.core.cpu import cpu_kind

    f = export_pose(TRAINED_CKPT, tmp_path / "ul.onnx", arch=TRAINED_ARCH, input_size=(256, 192), keypoints="coco",
                    color="rgb", verify_model=False).output
    q = posequant_quantize(f, COCO_MINI, split="train", output=tmp_path / "ul_int8.onnx").output
    res = gate(f, q, COCO_MINI, max_drop=3.0, max_joint_drop=8.0, min_speedup=0.0, runs=3, warmup=1,
               report_dir=tmp_path / "rep")
    assert res.cpu["here"] == res.cpu["made_for"] == cpu_kind().name and res.cpu["note"] is None
    assert res.people == 68 and res.flip
    assert 45 < res.scores["AP"]["float"] < 60  # a trained model on real people
    assert abs(res.scores["AP"]["delta"]) < 3 and res.passed, res.reasons
    assert (tmp_path / "rep" / "disagreements.png").stat().st_size > 10_000
    broken = gate(f, break_int8(q, tmp_path / "broken.onnx"), COCO_MINI, min_speedup=0.0, runs=1, warmup=0,
                  flip=False, limit=16)
    assert not broken.passed and broken.scores["AP"]["int8"] < 5 < broken.scores["AP"]["float"]
