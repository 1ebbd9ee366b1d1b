"""``posequant predict``: images, folders and videos; COCO results eval's scorer reads back; pictures; bad input.

Mechanics on tiny random-weight models and a synthetic COCO set; the trained ultralight model on
../shared's mpii-calib-images and coco-mini val when they are there. Also the gate's $GITHUB_STEP_SUMMARY.
"""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from posequant.benchmarks.drawing import BAND, score_bgr
from posequant.benchmarks.evaluate import evaluate
from posequant.benchmarks.metrics import coco_keypoint_ap
from posequant.benchmarks.predict import (
    COMPARE_RESULTS_FILE,
    RESULTS_FILE,
    SUMMARY_FILE,
    iter_frames_lines,
    load_boxes,
    number_in_name,
    overlay,
    predict,
)
from posequant.benchmarks.synthetic import make_coco_set
from posequant.cli import main
from posequant.core.errors import DataError
from posequant.core.metadata import read_meta
from posequant.demo import randomise
from posequant.exporter import export_pose
from posequant.exporter.zoo import pose_resnet

from conftest import COCO_MINI, MPII_CALIB, TRAINED_ARCH, TRAINED_CKPT, needs_shared

SMALL_COCO = pose_resnet.PoseResNetConfig(depth=18, num_joints=17, deconv_filters=(32, 32, 32))
SIZE = (64, 32)


def _export(d, seed):
    ckpt = d / f"m{seed}.pth"
    torch.manual_seed(seed)
    torch.save(randomise(pose_resnet.build(SMALL_COCO), seed).state_dict(), ckpt)
    return export_pose(ckpt, d / f"m{seed}.onnx", input_size=SIZE, verify_model=False).output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two random COCO models (the second for --compare), a synthetic COCO set labelled by the first, a video."""
    d = tmp_path_factory.mktemp("predict")
    first, second = _export(d, 0), _export(d, 1)
    coco = make_coco_set(d / "coco", first, val_images=3, train_images=1)
    video = d / "clip.avi"
    frames = [cv2.imread(str(p)) for p in sorted((coco / "val2017").iterdir())]
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 7.0, frames[0].shape[1::-1])
    for f in frames:
        writer.write(f)
    writer.release()
    return type("Tiny", (), dict(dir=d, model=first, other=second, coco=coco, val=coco / "val2017", video=video))


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def one_line_error(res, code=2):
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith(("error:", "Error:"))]  # ours, or click's
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def gt_boxes(coco_root, split="val"):
    """The ground-truth person boxes as COCO detections (no score: 1), the people eval scores."""
    doc = json.loads((coco_root / "annotations" / f"person_keypoints_{split}2017.json").read_text())
    return [{"image_id": a["image_id"], "bbox": a["bbox"]} for a in doc["annotations"]
            if a.get("num_keypoints", 1) > 0 and not a.get("iscrowd")]


# ---- mechanics ------------------------------------------------------------------------------------


def test_gt_boxes_give_evals_coco_ap(tiny, tmp_path):
    """The results JSON scored by eval's COCO scorer is eval's AP: same crops, decoding and rescoring."""
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(gt_boxes(tiny.coco)))
    res = predict(tiny.model, [tiny.val], tmp_path / "out", boxes=dets, flip=True)
    results = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    assert res.images == 3 and res.people == 6 == len(results)
    assert {r["image_id"] for r in results} == {1, 2, 3} and all(len(r["keypoints"]) == 51 for r in results)
    ap = coco_keypoint_ap(tiny.coco / "annotations/person_keypoints_val2017.json", results).metrics["AP"]
    ev = evaluate(tiny.model, tiny.coco, flip=True)
    assert ap == pytest.approx(ev.metrics["AP"], abs=1e-6)
    # eval's own joints, person by person (same order: the annotation file's)
    joints = np.array([r["keypoints"] for r in results]).reshape(6, 17, 3)
    np.testing.assert_allclose(joints[..., :2], ev.preds, atol=1e-3)


def test_whole_image_is_one_person_and_overlays_are_written(tiny, tmp_path):
    out = tmp_path / "out"
    res = invoke("predict", tiny.model, tiny.val, "-o", out, "--no-flip", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "predict: 3 images, 3 people" in res.output
    results = json.loads((out / RESULTS_FILE).read_text())
    assert [r["image_id"] for r in results] == [1, 2, 3]  # the number in 000000000001.jpg ...
    for name in ("000000000001", "000000000002", "000000000003"):
        picture = cv2.imread(str(out / f"{name}.pose.jpg"))
        source = cv2.imread(str(tiny.val / f"{name}.jpg"))
        assert picture.shape == source.shape
        assert np.abs(picture.astype(int) - source).max() > 100  # something was drawn
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["images"] == 3 and summary["people"] == 3 and summary["ms_per_image_or_frame"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["files"] == summary["files"]


def test_joint_dot_is_coloured_by_its_score(tiny):
    meta = read_meta(tiny.model)
    image = np.zeros((200, 200, 3), np.uint8)
    joints = np.full((1, 17, 2), 150.0)
    joints[0, 0] = (40, 40)
    scores = np.full((1, 17, 1), 0.0)
    scores[0, 0] = 1.0
    pic = overlay(image, meta, joints, scores)
    assert tuple(pic[40, 40]) == score_bgr(1.0) == (0, 255, 0)
    assert tuple(pic[150, 150]) == score_bgr(0.0) == (0, 0, 255)


def test_video_keeps_its_frame_rate_and_writes_a_line_per_frame(tiny, tmp_path):
    out = tmp_path / "out"
    res = predict(tiny.model, [tiny.video], out, flip=False)
    assert res.frames == 3 and res.images == 0
    cap = cv2.VideoCapture(str(out / "clip.pose.mp4"))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(7.0)
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == 3
    lines = list(iter_frames_lines(out / "clip.frames.jsonl"))
    assert [x["frame"] for x in lines] == [0, 1, 2] and lines[1]["time_s"] == pytest.approx(1 / 7)
    assert all(len(x["people"]) == 1 and len(x["people"][0]["keypoints"]) == 51 for x in lines)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_compare_draws_both_models_side_by_side(tiny, tmp_path):
    out = tmp_path / "out"
    res = invoke("predict", tiny.model, tiny.val / "000000000001.jpg", "--compare", tiny.other, "-o", out)
    assert res.exit_code == 0, res.output
    picture = cv2.imread(str(out / "000000000001.pose.jpg"))
    h, w = cv2.imread(str(tiny.val / "000000000001.jpg")).shape[:2]
    assert picture.shape[:2] == (h + BAND, 2 * w + 6)
    a = json.loads((out / RESULTS_FILE).read_text())
    b = json.loads((out / COMPARE_RESULTS_FILE).read_text())
    assert len(a) == len(b) == 1 and a[0]["keypoints"] != b[0]["keypoints"]


def test_unreadable_images_are_skipped_counted_and_named(tiny, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.jpg").write_bytes((tiny.val / "000000000001.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "bad.mp4").write_bytes(b"not a video")
    res = invoke("predict", tiny.model, folder, "-o", tmp_path / "out", "--no-flip")
    assert res.exit_code == 0, res.output
    warning = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "skipped 2 of 3" in warning[0] and "broken.jpg" in warning[0], res.output
    assert "bad.mp4" in warning[0]
    assert json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())["images"] == 1


def test_number_in_name_and_boxes_matching(tiny):
    images = sorted(tiny.val.iterdir())
    assert number_in_name(images[0]) == 1 and number_in_name(tiny.dir / "frame.jpg") is None
    p = tiny.dir / "dets_match.json"
    p.write_text(json.dumps([{"image_id": 2, "bbox": [1, 2, 30, 40], "score": 0.9},
                             {"file_name": "000000000003.jpg", "bbox": [5, 5, 20, 20], "score": 0.2}]))
    boxes = load_boxes(p, images)
    assert [len(boxes[i]) for i in images] == [0, 1, 1] and boxes[images[1]][0].score == 0.9
    assert [len(v) for v in load_boxes(p, images, min_score=0.5).values()] == [0, 1, 0]


@pytest.mark.parametrize("case, expect", [
    ("not_json", "is not readable JSON"),
    ("not_list", "not a list of detections"),
    ("unknown_image", "names 1 images not among the inputs"),
    ("bad_bbox", "is not [x, y, w, h]"),
    ("no_image_key", "neither image_id nor file_name"),
    ("no_metadata", "has no posequant metadata"),
    ("not_a_model", "predict runs an exported model"),
    ("unknown_suffix", "is neither an image"),
    ("missing_input", "does not exist"),
    ("all_unreadable", "none of the 1 inputs could be read"),
    ("out_in_input", "inside the input folder"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny, tmp_path, case, expect):
    model, inputs, extra = tiny.model, [tiny.val], []
    dets = tmp_path / "dets.json"
    out = tmp_path / "out"
    if case == "not_json":
        dets.write_text("[{")
    elif case == "not_list":
        dets.write_text("{}")
    elif case == "unknown_image":
        dets.write_text(json.dumps([{"image_id": 99, "bbox": [0, 0, 10, 10], "score": 1}]))
    elif case == "bad_bbox":
        dets.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 10], "score": 1}]))
    elif case == "no_image_key":
        dets.write_text(json.dumps([{"bbox": [0, 0, 10, 10], "score": 1}]))
    elif case == "no_metadata":
        m = onnx.load(str(tiny.model))
        del m.metadata_props[:]
        model = tmp_path / "bare.onnx"
        onnx.save(m, str(model))
    elif case == "not_a_model":
        model = tmp_path / "model.pth"
        model.write_bytes(b"x")
    elif case == "unknown_suffix":
        inputs = [tmp_path / "notes.txt"]
        inputs[0].write_text("hi")
    elif case == "missing_input":
        inputs = [tmp_path / "nope.jpg"]
    elif case == "all_unreadable":
        inputs = [tmp_path / "broken.png"]
        inputs[0].write_bytes(b"\x89PNG\r\n\x1a\nxx")
    elif case == "out_in_input":
        folder = tmp_path / "imgs"
        folder.mkdir()
        (folder / "a.jpg").write_bytes((tiny.val / "000000000001.jpg").read_bytes())
        inputs, out = [folder], folder / "out"
    if dets.exists():
        extra = ["--boxes", dets]
    res = invoke("predict", model, *inputs, "-o", out, *extra)
    assert expect in one_line_error(res), res.output
    assert not out.exists()  # nothing half-written, not even an empty folder


def test_load_boxes_refuses_a_missing_file(tiny):
    with pytest.raises(DataError, match="does not exist"):
        load_boxes(tiny.dir / "nope.json", [])


# ---- the gate's $GITHUB_STEP_SUMMARY ------------------------------------------------------------


@pytest.fixture(scope="module")
def int8(tiny):
    from test_bench_gate import quantize  # plain ORT quantize_static, as the gate tests make INT8

    return quantize(tiny.model, tiny.dir / "m0.int8.onnx")


def test_gate_appends_its_markdown_to_the_step_summary(tiny, int8, tmp_path):
    """On GitHub Actions the gate's report.md goes on the run's page: appended, as other steps append too."""
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    args = ["gate", "--float", tiny.model, "--int8", int8, "--data", tiny.coco, "--no-flip", "--runs", "1",
            "--min-speedup", "0", "--max-drop", "50", "--max-joint-drop", "60"]
    res = invoke(*args, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert res.exit_code == 0, res.output
    text = summary.read_text()
    assert text.startswith("# earlier step\n") and text.count("# INT8 gate: PASS") == 1, text
    assert "## Checks" in text and "$GITHUB_STEP_SUMMARY" in res.output
    invoke(*args, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert summary.read_text().count("# INT8 gate:") == 2  # appended again, never overwritten
    res = invoke(*args, env={"GITHUB_STEP_SUMMARY": str(tmp_path / "no" / "such" / "summary.md")})
    assert "cannot append the gate summary" in one_line_error(res)
    assert "gate:" not in res.output  # refused before the run, not after the verdict
    before = {p.name for p in tmp_path.iterdir()}
    res = invoke(*args, env={"GITHUB_STEP_SUMMARY": ""})  # unset (empty): nothing written
    assert res.exit_code == 0 and {p.name for p in tmp_path.iterdir()} == before


# ---- the trained model on real data ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "ultralight.onnx"
    export_pose(TRAINED_CKPT, out, arch=TRAINED_ARCH, input_size=(256, 192), keypoints="coco", color="rgb")
    return out


@needs_shared(TRAINED_CKPT, COCO_MINI)
def test_trained_model_on_coco_mini_val_scores_evals_ap(trained, tmp_path):
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(gt_boxes(COCO_MINI)))
    predict(trained, [COCO_MINI / "val2017"], tmp_path / "out", boxes=dets)
    results = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    ap = coco_keypoint_ap(COCO_MINI / "annotations/person_keypoints_val2017.json", results).metrics["AP"]
    ev = evaluate(trained, COCO_MINI)
    assert ev.metrics["AP"] > 0.3  # a trained model, not noise
    assert ap == pytest.approx(ev.metrics["AP"], abs=1e-4)


@needs_shared(TRAINED_CKPT, MPII_CALIB)
def test_trained_model_on_mpii_calib_images(trained, tmp_path):
    res = predict(trained, [MPII_CALIB], tmp_path / "out")
    assert res.images == 7 and res.people == 7 and not res.skipped
    results = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    assert [r["image_id"] for r in results] == sorted(int(p.stem) for p in MPII_CALIB.iterdir())
    assert np.mean([r["score"] for r in results]) > 0.2  # measured 0.38: whole crowded frames as one person
    # the folder dataset's whole-image people through eval's batches give the same joints
    from posequant.benchmarks.runners import make_runner
    from posequant.calibration import iter_batches, open_dataset
    from posequant.core.decoding import heatmaps_to_joints

    meta = read_meta(trained)
    runner = make_runner("ort", onnx_path=trained)
    ds = open_dataset(MPII_CALIB, input_size=meta.input_size, format="folder")
    b = next(iter_batches(ds, meta, batch_size=7, flip=True))
    ref, _ = heatmaps_to_joints(meta, runner.infer(b.inputs), b.centers, b.scales, runner.infer(b.inputs_flipped))
    np.testing.assert_allclose(np.array([r["keypoints"] for r in results]).reshape(7, 17, 3)[..., :2], ref, atol=1e-2)
    assert len(os.listdir(tmp_path / "out")) == 7 + 2


def test_progress_bar_only_when_asked_or_on_a_terminal(tiny, tmp_path, capfd):
    predict(tiny.model, [tiny.val], tmp_path / "a", flip=False)  # not a terminal here: no bar
    assert "predict" not in capfd.readouterr().err
    predict(tiny.model, [tiny.val], tmp_path / "b", flip=False, progress_bar=True)
    err = capfd.readouterr().err
    assert "predict:" in err and "/3 [" in err  # tqdm's bar over the 3 images, on stderr


@pytest.mark.parametrize("case, expect", [
    ("out_is_a_file", "is a file"),
    ("json_is_the_input", "would destroy the input"),
    ("json_is_the_model", "would destroy the input"),
    ("json_is_an_output", "are the same file"),
])
def test_outputs_are_checked_before_work_and_never_an_input(tiny, tmp_path, case, expect):
    image = tmp_path / "a.jpg"
    image.write_bytes((tiny.val / "000000000001.jpg").read_bytes())
    before = image.read_bytes()
    out, extra = tmp_path / "out", []
    if case == "out_is_a_file":
        out = tmp_path / "file"
        out.write_text("x")
    elif case == "json_is_the_input":
        extra = ["--json", image]
    elif case == "json_is_the_model":
        extra = ["--json", tiny.model]
    elif case == "json_is_an_output":
        out.mkdir()  # an earlier run's folder
        extra = ["--json", out / RESULTS_FILE]
    res = invoke("predict", tiny.model, image, "-o", out, *extra)
    assert expect in one_line_error(res)
    assert image.read_bytes() == before and read_meta(tiny.model).num_joints == 17


def test_json_to_stdout(tiny, tmp_path):
    res = invoke("predict", tiny.model, tiny.val / "000000000002.jpg", "-o", tmp_path / "out", "--no-flip",
                 "--json", "-")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["images"] == 1 and doc["image_ids"] == {str(tiny.val / "000000000002.jpg"): 2}
