"""SimCC models through every command, on a tiny random-weight SimCC network exported as "someone else's" ONNX:
stamping (x and y told apart by their lengths, or named), eval, quantize (MatMul weights pair-fitted, the
budget's harm ranking on both outputs), gate, bench, convert (the IR keeps the head), predict; and a model
file opened once knows its head. The trained model is tests/test_lightposnet.py.
"""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from posequant.benchmarks.evaluate import evaluate
from posequant.benchmarks.synthetic import make_coco_set
from posequant.calibration.quantize import BudgetError, quantize
from posequant.cli import main
from posequant.core.errors import MetadataError, PosequantError
from posequant.core.keypoints import COCO
from posequant.core.metadata import read_meta
from posequant.core.opened import open_model
from posequant.exporter import export_pose
from posequant.exporter.onnx_in import UnsupportedModelError

SIZE = (64, 48)  # H x W


class TinySimCC(torch.nn.Module):
    """Convolutions to stride 4, the joints' feature maps flattened, then one Linear per axis (RTMCCHead's shape,
    without the attention): x has W * r bins, y H * r. ``swap`` returns y first (the graph's order then says
    nothing); ``perm`` reorders the joints (another joint order)."""

    def __init__(self, size=SIZE, ratio=2.0, swap=False, perm=None, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        h, w = size
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 17, 1))
        self.fx = torch.nn.Linear((h // 4) * (w // 4), int(w * ratio))
        self.fy = torch.nn.Linear((h // 4) * (w // 4), int(h * ratio))
        self.swap, self.perm = swap, perm

    def forward(self, image):
        f = torch.flatten(self.body(image), 2)
        x, y = torch.relu(self.fx(f)), torch.relu(self.fy(f))
        if self.perm is not None:
            x, y = x[:, self.perm], y[:, self.perm]
        return (y, x) if self.swap else (x, y)


def save_onnx(module, path, *, size=SIZE, names=("px", "py"), batch=None):
    buf = io.BytesIO()
    dynamic = None if batch else {n: {0: "n"} for n in ("image", *names)}
    torch.onnx.export(module.eval(), (torch.zeros(batch or 1, 3, *size),), buf, dynamo=False, opset_version=17,
                      input_names=["image"], output_names=list(names), dynamic_axes=dynamic)
    path.write_bytes(buf.getvalue())
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res, code=2):
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The tiny model with y as its first output, stamped, and a COCO set labelled by it."""
    d = tmp_path_factory.mktemp("simcc")
    src = save_onnx(TinySimCC(swap=True), d / "tiny.onnx", names=("py", "px"))
    stamped = export_pose(src, d / "tiny.stamped.onnx", keypoints="coco", color="rgb")
    data = make_coco_set(d / "coco", stamped.output, val_images=3, train_images=4)
    return {"dir": d, "src": src, "stamped": stamped, "float": stamped.output, "data": data}


# ---- stamping ---------------------------------------------------------------------------------------------


def test_x_and_y_are_told_apart_by_their_lengths(work):
    meta, res = work["stamped"].meta, work["stamped"]
    assert (meta.head, meta.simcc_split_ratio, meta.outputs) == ("simcc", 2.0, ("px", "py"))
    assert (meta.heatmap_size, meta.input_size, meta.keypoints) == ((128, 96), SIZE, "coco")
    assert meta.arch_config == {"input": "image", "outputs": ["px", "py"], "batch": "dynamic"}
    assert [c.name for c in res.verification.cases] == ["random inputs (seed 0), py", "random inputs (seed 0), px"]
    assert res.verification.passed and read_meta(res.output) == meta
    opened = open_model(res.output)
    assert (opened.format, opened.head, opened.outputs, opened.batch) == ("onnx", "simcc", ("px", "py"), None)


def test_a_square_input_needs_the_names(tmp_path):
    src = save_onnx(TinySimCC(size=(48, 48)), tmp_path / "sq.onnx", size=(48, 48), names=("a", "b"))
    line = one_line_error(invoke("export-pose", src, "--keypoints", "coco", "--color", "rgb"))
    assert "both fit the square 48x48 input" in line and "--simcc-outputs a,b" in line
    res = invoke("export-pose", src, "--keypoints", "coco", "--color", "rgb", "--simcc-outputs", "b,a",
                 "-o", tmp_path / "s.onnx")
    assert res.exit_code == 0, res.output
    assert read_meta(tmp_path / "s.onnx").outputs == ("b", "a")
    line = one_line_error(invoke("export-pose", src, "--keypoints", "coco", "--color", "rgb", "--simcc-outputs",
                                 "a,c", "-o", tmp_path / "t.onnx"))
    assert "--simcc-outputs 'a,c'" in line and "its outputs: a, b" in line
    assert not (tmp_path / "t.onnx").exists()


def test_lengths_that_give_no_one_split_ratio_are_refused(tmp_path):
    class Skewed(TinySimCC):  # x at ratio 2, y at ratio 1
        def __init__(self):
            super().__init__()
            self.fy = torch.nn.Linear(12 * 16, SIZE[0])

    src = save_onnx(Skewed(), tmp_path / "skew.onnx")
    with pytest.raises(UnsupportedModelError, match="split ratios must agree"):
        export_pose(src, tmp_path / "s.onnx", keypoints="coco", color="rgb")
    line = one_line_error(invoke("export-pose", src, "--keypoints", "coco", "--color", "rgb", "--simcc-outputs",
                                 "px,py", "-o", tmp_path / "t.onnx"))
    assert "x 96/48 = 2, y 64/64 = 1" in line


def test_simcc_outputs_is_refused_for_a_heatmap_model(tmp_path, small_checkpoints):
    heat = export_pose(small_checkpoints["pose_resnet"], tmp_path / "h.onnx", input_size=(64, 64)).output
    line = one_line_error(invoke("export-pose", heat, "--simcc-outputs", "a,b", "-o", tmp_path / "x.onnx"))
    assert "has one heatmap output" in line


def test_stamped_again_keeps_the_head(work, tmp_path):
    again = export_pose(work["float"], tmp_path / "again.onnx", color="bgr").meta
    assert (again.head, again.outputs, again.color) == ("simcc", ("px", "py"), "bgr")
    assert again.source_sha256 == work["stamped"].meta.source_sha256


def test_metadata_that_names_another_output_is_one_line(work, tmp_path):
    model = onnx.load(str(work["float"]))
    for p in model.metadata_props:
        if p.key == "outputs":
            p.value = json.dumps(["px", "nope"])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(MetadataError, match="has no output 'nope'"):
        read_meta(tmp_path / "bad.onnx")
    line = one_line_error(invoke("eval", tmp_path / "bad.onnx", "--data", work["data"]))
    assert "bad.onnx has no output 'nope'" in line


def test_joint_order_is_mapped_at_decoding(work, tmp_path):
    perm = [5, 0, 16, 3, 8, 1, 12, 7, 2, 15, 9, 4, 14, 11, 6, 13, 10]
    src = save_onnx(TinySimCC(swap=True, perm=perm), tmp_path / "perm.onnx", names=("py", "px"))
    names = ",".join(COCO.joint_names[j] for j in perm)
    stamped = export_pose(src, tmp_path / "perm.stamped.onnx", joints=names, color="rgb").output
    for flip in (False, True):  # the flip test swaps pairs in the set's order, after the mapping
        a = evaluate(work["float"], work["data"], flip=flip)
        b = evaluate(stamped, work["data"], flip=flip)
        np.testing.assert_allclose(b.preds, a.preds, atol=1e-3)
        assert flip or b.metrics["AP"] > 0.99  # the set is labelled by this model, flip off


# ---- every command ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8(work):
    return quantize(work["float"], work["data"], split="train", output=work["dir"] / "tiny.int8.onnx", cpu="avx2",
                    warn=lambda m: None)


def test_quantize_fits_the_matmul_weights_and_keeps_the_head(int8):
    fit = int8.settings["pair_fit"]
    assert fit["matmuls"] == 2 and fit["convs"] == 3  # the two Linear layers, the three convolutions
    meta = read_meta(int8.output)
    assert (meta.precision, meta.head, meta.outputs) == ("int8", "simcc", ("px", "py"))
    from posequant.calibration import saturation as S

    q = onnx.load(str(int8.output))
    ops = S.quantized_matmuls(q)  # their inputs reach them through a Reshape, which ORT moves the DequantizeLinear past
    assert len(ops) == 2 and all(op.codes_dequantized for op in ops) and S.risky_pairs(q) == 0
    # so on this CPU, whatever its kind, ORT's fused int8 kernels compute the graph's exact integers
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((4, 3, *SIZE)).astype(np.float32)
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"image": x})
            for m in (q, S.exact_twin(q))]
    for got, exact in zip(*runs):
        assert np.array_equal(got, exact)


def test_the_budget_ranks_harm_on_both_outputs_and_evaluates_simcc(work):
    """An impossible budget (INT8 must beat float by 50 points): the loop ranks the nodes by the error of the x
    and y vectors, keeps some in float, measures each step, and fails with the step closest to the budget;
    nothing is written."""
    out = work["dir"] / "never.onnx"
    with pytest.raises(BudgetError) as err:
        quantize(work["float"], work["data"], split="train", output=out, val=work["data"], max_drop=-50,
                 warn=lambda m: None)
    result = err.value.result
    steps = result.budget_steps
    assert len(steps) >= 2 and steps[1]["kept_float"] and not out.exists()
    closest = min(steps, key=lambda s: (s["drop"], len(s["kept_float"])))
    assert sorted(result.kept_float) == sorted(closest["kept_float"])
    ev = result.evaluation
    assert ev.metric == "AP" and ev.float_value > 99 and ev.agreement["OKS"] > 0.5


def test_harm_ranking_compares_both_simcc_outputs(work, int8):
    """Keeping the most harmful node in float brings the outputs closer to float than keeping the least harmful."""
    import onnxruntime as ort

    from posequant.calibration.quantize import rank_harm
    from posequant.calibration.reader import calibration_set

    meta = read_meta(work["float"])
    calib = calibration_set(work["data"], meta, num_samples=8, split="train", input_name="image", warn=lambda m: None)
    prepared = onnx.load(str(work["float"]))
    ranking = rank_harm(prepared, int8.model, calib, limit=8)
    assert len(ranking) >= 4
    x = next(iter(calib.crops.feeds()))

    def error(path) -> float:
        runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["px", "py"], x)
                for p in (work["float"], path)]
        return sum(float(((q - f) ** 2).sum()) for f, q in zip(*runs))

    errors = {}
    for name in (ranking[0], ranking[-1]):
        out = work["dir"] / f"keep_{len(errors)}.onnx"
        quantize(work["float"], work["data"], split="train", output=out, keep_float=[name], warn=lambda m: None)
        errors[name] = error(out)
    assert errors[ranking[0]] < errors[ranking[-1]]


def test_eval_gate_bench_convert_and_predict(work, int8, tmp_path):
    data, fp, qp = work["data"], work["float"], int8.output
    res = invoke("eval", qp, "--data", data, "--no-flip", "--json", tmp_path / "e.json")  # labelled flip off
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]["AP"] > 0.5
    res = invoke("gate", "--float", fp, "--int8", qp, "--data", data, "--no-flip", "--min-speedup", "0",
                 "--max-drop", "100", "--max-joint-drop", "100", "--runs", "2", "--json", tmp_path / "g.json")
    assert res.exit_code == 0, res.output
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["passed"] and g["float_metrics"]["AP"] > 0.99 and g["people"] == 6
    res = invoke("bench", fp, qp, "--batch", "1", "--runs", "2", "--backend", "ort", "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    assert {r["precision"] for r in json.loads((tmp_path / "b.json").read_text())["results"]} == {"fp32", "int8"}
    res = invoke("convert", qp, "--to", "openvino", "-o", tmp_path / "ir")
    assert res.exit_code == 0, res.output
    xml = tmp_path / "ir" / "tiny.int8.xml"
    ir = open_model(xml)
    assert ir.format == "ir" and ir.meta == read_meta(qp) and ir.head == "simcc"
    on_ir, on_ort = evaluate(xml, data, flip=True), evaluate(qp, data, flip=True)
    assert np.abs(on_ir.preds - on_ort.preds).max() < 2.0  # OpenVINO's int8 kernels vs ORT's: a bin or two
    res = invoke("predict", xml, data / "val2017", "--compare", fp, "-o", tmp_path / "pred", "--json",
                 tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["images"] == 3 and p["people"] == 3
    results = json.loads((tmp_path / "pred" / "keypoints.json").read_text())
    assert len(results) == 3 and len(results[0]["keypoints"]) == 51


def test_a_model_without_metadata_gets_the_stamp_command(work):
    with pytest.raises(PosequantError, match="stamp it first: posequant export-pose"):
        quantize(work["src"], work["data"], input_size=SIZE, keypoints="coco", color="rgb",
                 output=work["dir"] / "x.onnx")


def test_pipeline_takes_a_simcc_onnx(work, tmp_path):
    from posequant.pipeline import GateBudget, run_pipeline

    res = run_pipeline(work["src"], work["data"], work["data"], tmp_path / "out", keypoints="coco", color="rgb",
                       budget=GateBudget(max_drop=100, max_joint_drop=100, min_speedup=0), flip=False, runs=2)
    assert res.passed and res.export.meta.head == "simcc" and res.quantize.meta.outputs == ("px", "py")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["gate"]["float_metrics"]["AP"] > 0.99
