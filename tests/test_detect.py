"""Detect, then pose: the detector stage, OKS-NMS and rescoring, COCO AP on detection boxes, predict --detector,
EXIF orientation.

Exact cases on small graphs made here: a YOLOX-layout ONNX whose output is a constant we choose (so decoding,
letterbox and NMS are checked by hand), hand-computed OKS and rescoring, HRNet's own OKS-NMS loop as the
reference. Real data (YOLOX-Nano, the trained model, coco-mini) where ../shared has it.
"""

from __future__ import annotations

import json
import math
import shutil
import struct

import cv2
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from posequant import cli
from posequant.benchmarks import detect
from posequant.benchmarks.detect import (
    Box,
    DetectorError,
    coco_boxes,
    grid_cells,
    letterbox,
    nms,
    open_detector,
)
from posequant.benchmarks.drawing import FLOAT_BGR
from posequant.benchmarks.evaluate import evaluate
from posequant.benchmarks.metrics import (
    coco_keypoint_ap,
    detection_results,
    oks_iou,
    oks_nms,
    rescore,
)
from posequant.benchmarks.predict import RESULTS_FILE, SUMMARY_FILE, predict
from posequant.benchmarks.synthetic import BOXES, make_coco_set
from posequant.calibration import exif_orientation, read_image
from posequant.core.errors import DataError, PosequantError
from posequant.core.keypoints import COCO_SIGMAS
from posequant.demo import randomise
from posequant.exporter import export_pose
from posequant.exporter.zoo import pose_resnet

from conftest import COCO_MINI, MPII_CALIB, MPII_MINI, SHARED, TRAINED_ARCH, TRAINED_CKPT, needs_shared

YOLOX_NANO = SHARED / "models" / "yolox-nano" / "yolox_nano_coco_416.onnx"
SIZE = (64, 64)  # the small detectors' input: cells 8x8 + 4x4 + 2x2 = 84
CLASSES = 2


# ---- a YOLOX-layout ONNX whose output we choose -----------------------------------------------------


def yolox_like(path, rows: dict[int, list[float]], *, size=SIZE, classes=CLASSES, cells=None, qdq=False):
    """A graph with YOLOX's input and output shapes returning a constant: row ``i`` of the 1 x cells x
    (5 + classes) output is ``rows[i]`` (x, y, log w, log h, objectness, class scores), other rows score 0.
    The input flows into the output (times 0), so it is a real input; ``qdq`` puts Quantize/DequantizeLinear
    on it, as an INT8 (QDQ) export has."""
    n = cells or detect.YoloxLayout().cells(size)
    out = np.zeros((1, n, 5 + classes), np.float32)
    for i, row in rows.items():
        out[0, i] = row
    nodes, first = [], "images"
    inits = [numpy_helper.from_array(out, "table"), numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    if qdq:
        inits += [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.uint8), "zp")]
        nodes += [helper.make_node("QuantizeLinear", ["images", "s", "zp"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"])]
        first = "dq"
    nodes += [helper.make_node("ReduceSum", [first], ["total"], keepdims=0),
              helper.make_node("Mul", ["total", "zero"], ["nothing"]),
              helper.make_node("Add", ["table", "nothing"], ["output"])]
    graph = helper.make_graph(nodes, "yolox_like",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *size])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, n, 5 + classes])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def cell(stride: int, gx: int, gy: int, size=SIZE) -> int:
    """The output row of grid cell (gx, gy) at ``stride``: strides 8, 16, 32 in order, each row-major."""
    before = sum((size[0] // s) * (size[1] // s) for s in (8, 16, 32) if s < stride)
    return before + gy * (size[1] // stride) + gx


def row(x, y, w_cells, h_cells, obj, *classes):
    return [x, y, math.log(w_cells), math.log(h_cells), obj, *classes]


# On a 64x64 canvas; a 32 x 128 photo is letterboxed at r = min(64/32, 64/128) = 0.5.
HAND = {
    # A: cell (2, 3) at stride 8, centre (2.5, 3.5) cells = (20, 28) px, 4 x 8 cells = 32 x 64 px; person 0.9 x 0.8
    cell(8, 2, 3): row(0.5, 0.5, 4, 8, 0.9, 0.8, 0.1),
    # B: A moved 0.25 cells right (IoU 30/34 = 0.88 with A), lower score 0.6: suppressed
    cell(8, 2, 3) + 1: row(-0.25, 0.5, 4, 8, 1.0, 0.6, 0.0),
    # C: a high person score but another class is the cell's best (YOLOX's max over classes): not a person
    cell(8, 6, 6): row(0.0, 0.0, 2, 2, 1.0, 0.7, 0.9),
    # D: person score exactly at the threshold (1.0 x 0.5 >= 0.5 kept)
    cell(16, 3, 3): row(0.0, 0.0, 1, 1, 1.0, 0.5, 0.0),
    # E: below it
    cell(16, 0, 3): row(0.0, 0.0, 1, 1, 1.0, 0.49, 0.0),
    # F: a stride-32 cell (1, 1): centre (32, 32), 1 x 1 cells = 32 x 32 px; IoU with A 640/2432: kept
    cell(32, 1, 1): row(0.0, 0.0, 1, 1, 0.625, 0.8, 0.0),
}


@pytest.fixture(scope="module")
def hand_detector(tmp_path_factory):
    return yolox_like(tmp_path_factory.mktemp("det") / "hand.onnx", HAND)


def test_yolox_decoding_score_rule_and_nms_by_hand(hand_detector):
    det = open_detector(hand_detector, score=0.5, iou=0.65)
    assert det.size == SIZE and det.layout.name == "yolox" and det.precision == "fp32"
    boxes = det.detect(np.zeros((32, 128, 3), np.uint8))
    # canvas boxes / r (0.5); A reaches above the photo (y < 0): detector boxes are not clipped
    expect = [((8.0, -8.0, 64.0, 128.0), 0.72), ((32.0, 32.0, 64.0, 64.0), 0.5), ((80.0, 80.0, 32.0, 32.0), 0.5)]
    assert len(boxes) == 3, boxes
    got = sorted(boxes, key=lambda b: (-round(b.score, 6), b.bbox[0]))
    for b, (bbox, score) in zip(got, expect):
        np.testing.assert_allclose(b.bbox, bbox, atol=1e-4)
        assert b.score == pytest.approx(score, abs=1e-6)
    assert det.calls == 1 and det.seconds > 0
    # a lower threshold lets E in; a looser NMS keeps B
    assert len(open_detector(hand_detector, score=0.45, iou=0.65).detect(np.zeros((32, 128, 3), np.uint8))) == 4
    assert len(open_detector(hand_detector, score=0.5, iou=0.9).detect(np.zeros((32, 128, 3), np.uint8))) == 4


def test_letterbox_top_left_and_padding():
    image = np.full((3, 5, 3), 200, np.uint8)  # r = min(8/3, 8/5) = 1.6: 4 x 8 pixels of image
    canvas, r = letterbox(image, (8, 8))
    assert r == pytest.approx(1.6) and canvas.shape == (8, 8, 3)
    assert (canvas[:4] == 200).all() and (canvas[4:] == 114).all()
    tall = np.zeros((16, 4, 3), np.uint8)  # r = 0.5: 8 x 2, the rest of each row padded
    canvas, r = letterbox(tall, (8, 8))
    assert r == 0.5 and (canvas[:, :2] == 0).all() and (canvas[:, 2:] == 114).all()


def test_grid_cells_order():
    grid, stride = grid_cells((64, 32), (8, 16, 32))  # 8x4 + 4x2 + 2x1 = 42 cells
    assert len(grid) == 42 and stride[:32].ravel().tolist() == [8] * 32 and stride[-2:].ravel().tolist() == [32, 32]
    assert grid[5].tolist() == [1, 1]  # row-major: 4 cells per row at stride 8
    assert grid[32 + 3].tolist() == [1, 1] and grid[41].tolist() == [0, 1]


@pytest.mark.parametrize("shift, kept", [(2.048, 1), (2.195, 2)])  # IoU 0.660 and 0.640 around 0.65
def test_nms_drops_boxes_above_the_iou(shift, kept):
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [shift, 0.0, 10.0, 10.0]])
    iou = (10 - shift) / (10 + shift)
    assert (iou > 0.65) == (kept == 1)
    assert nms(boxes, np.array([0.9, 0.8]), 0.65).tolist() == list(range(kept))
    assert nms(boxes, np.array([0.7, 0.8]), 0.65).tolist() == ([1] if kept == 1 else [1, 0])  # best first


def test_an_int8_qdq_detector_without_metadata_is_accepted(tmp_path):
    path = yolox_like(tmp_path / "q.onnx", HAND, qdq=True)
    det = open_detector(path, score=0.5, iou=0.65)
    assert det.precision == "int8"
    assert len(det.detect(np.zeros((32, 128, 3), np.uint8))) == 3


@pytest.mark.parametrize("case, expect", [
    ("wrong_cells", "is not a detector layout posequant decodes"),
    ("four_d_output", "is not a detector layout"),
    ("pose_model", "is a posequant pose model"),
    ("not_onnx", "a detector is an ONNX file"),
    ("empty", "is empty"),
    ("missing", "not found"),
])
def test_detector_files_other_than_yolox_are_refused_in_one_line(tmp_path, tiny, case, expect):
    path = tmp_path / "det.onnx"
    if case == "wrong_cells":
        yolox_like(path, {}, cells=80)
    elif case == "four_d_output":
        path = tiny.model.parent / "m0.onnx"  # a pose model without its metadata: 1 x 17 x h x w
        m = onnx.load(str(path))
        del m.metadata_props[:]
        path = tmp_path / "bare.onnx"
        onnx.save(m, str(path))
    elif case == "pose_model":
        path = tiny.model
    elif case == "not_onnx":
        path = tmp_path / "det.pth"
        path.write_bytes(b"x")
    elif case == "empty":
        path.write_bytes(b"")
    with pytest.raises(DetectorError, match=expect) as e:
        open_detector(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("score, iou", [(0.0, 0.65), (1.5, 0.65), (float("nan"), 0.65), (0.3, 0.0), (0.3, 2.0)])
def test_thresholds_are_checked(hand_detector, score, iou):
    with pytest.raises(PosequantError, match="--det-score|--det-iou"):
        open_detector(hand_detector, score=score, iou=iou)


def test_cli_defaults_are_the_detect_stage_defaults():
    assert (cli.DET_IOU, cli.DET_SCORE_PREDICT, cli.DET_SCORE_EVAL) == (
        detect.DEFAULT_IOU, detect.PREDICT_SCORE, detect.EVAL_SCORE)


# ---- OKS-NMS and rescoring (HRNet's lib/nms/nms.py, coco.py::evaluate) -------------------------------


def hrnet_oks_nms(kpts_db, thresh):
    """HRNet's ``oks_nms`` and ``oks_iou`` (sigmas None, in_vis_thre None), transcribed as the reference."""
    sigmas = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10.0
    variances = (sigmas * 2) ** 2

    def oks_iou_ref(g, d, a_g, a_d):
        xg, yg = g[0::3], g[1::3]
        ious = np.zeros(d.shape[0])
        for n_d in range(d.shape[0]):
            dx, dy = d[n_d, 0::3] - xg, d[n_d, 1::3] - yg
            e = (dx ** 2 + dy ** 2) / variances / ((a_g + a_d[n_d]) / 2 + np.spacing(1)) / 2
            ious[n_d] = np.sum(np.exp(-e)) / e.shape[0] if e.shape[0] != 0 else 0.0
        return ious

    scores = np.array([k["score"] for k in kpts_db])
    kpts = np.array([k["keypoints"].flatten() for k in kpts_db])
    areas = np.array([k["area"] for k in kpts_db])
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        ovr = oks_iou_ref(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]])
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


def test_oks_by_hand():
    g = np.zeros((17, 3))
    d = g.copy()
    d[:, :2] += (3.0, 4.0)  # every joint 5 px off
    # exp(-25 / (2 sigma)^2 / mean area / 2), mean area (1000 + 3000) / 2
    expect = np.mean([math.exp(-25 / (2 * s) ** 2 / (2000 + np.spacing(1)) / 2) for s in COCO_SIGMAS])
    assert oks_iou(g, d[None], 1000.0, np.array([3000.0]))[0] == pytest.approx(expect, rel=1e-12)
    assert oks_iou(g, g[None], 1000.0, np.array([1000.0]))[0] == 1.0


def test_oks_nms_keeps_the_best_of_each_cluster_as_hrnet():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 200, (3, 17, 2))
    poses, scores, areas = [], [], []
    for k, centre in enumerate(base):  # three people, each found three times with jitter
        for j in range(3):
            poses.append(np.concatenate([centre + rng.normal(0, 1.5 * j, (17, 2)), rng.uniform(0, 1, (17, 1))], 1))
            scores.append(rng.uniform(0, 1))
            areas.append(rng.uniform(4000, 9000))
    poses, scores, areas = np.array(poses, np.float32), np.array(scores), np.array(areas)
    for thresh in (0.5, 0.9, 0.99):
        ref = hrnet_oks_nms([{"keypoints": p, "score": s, "area": a} for p, s, a in zip(poses, scores, areas)], thresh)
        assert oks_nms(poses, scores, areas, thresh) == [int(i) for i in ref]
    assert len(oks_nms(poses, scores, areas, 0.5)) == 3  # one per person


def test_rescoring_and_nms_per_image_by_hand():
    maxvals = np.full((3, 17, 1), 0.1)
    maxvals[0, :2, 0] = (0.3, 0.5)  # mean of the joints above 0.2: 0.4
    maxvals[1, :1, 0] = 0.2  # 0.2 is not above 0.2: no joint counts, score 0
    maxvals[2, :3, 0] = (0.9, 0.9, 0.6)  # 0.8
    assert rescore(maxvals, [0.5, 1.0, 0.25]).tolist() == pytest.approx([0.2, 0.0, 0.2])
    coords = np.zeros((3, 17, 2), np.float32)
    coords[2] += 500  # far from the others
    coords[1] += 0.5  # on top of person 0 (OKS ~1): the lower score goes
    results, kept = detection_results([7, 7, 9], coords, maxvals, [0.5, 1.0, 0.25], [1e4, 1e4, 1e4])
    assert kept == [0, 2] and [r["image_id"] for r in results] == [7, 9]
    assert [r["score"] for r in results] == pytest.approx([0.2, 0.2])
    # each image on its own: an identical person on another image stays
    _, kept = detection_results([7, 8, 9], coords, maxvals, [0.5, 1.0, 0.25], [1e4, 1e4, 1e4])
    assert kept == [0, 1, 2]


# ---- COCO AP on detection boxes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random COCO pose model at 64x32 and a synthetic COCO set it labels (2 people per 160x120 image)."""
    d = tmp_path_factory.mktemp("detpose")
    torch.manual_seed(0)
    cfg = pose_resnet.PoseResNetConfig(depth=18, num_joints=17, deconv_filters=(32, 32, 32))
    torch.save(randomise(pose_resnet.build(cfg), 0).state_dict(), d / "m0.pth")
    model = export_pose(d / "m0.pth", d / "m0.onnx", input_size=(64, 32), verify_model=False).output
    coco = make_coco_set(d / "coco", model, val_images=3, train_images=1)
    # the synthetic set's two boxes, as a 64x64 YOLOX-layout detector finds them on a 160x120 image (r = 0.4)
    found = {cell(8, 2, 3): row(0.0, 0.0, 3, 5, 1.0, 0.9, 0.0),  # [10, 10, 60, 100]
             cell(8, 5, 3): row(0.75, 0.0, 3.5, 5.5, 1.0, 0.8, 0.0)}  # [80, 5, 70, 110]
    detector = yolox_like(d / "people.onnx", found)
    return type("Tiny", (), dict(dir=d, model=model, coco=coco, detector=detector,
                                 ann=coco / "annotations/person_keypoints_val2017.json"))


def gt_as_detections(ann_path, score=1.0):
    """The ground-truth boxes as detection results, clipped as eval clips them (so the crops are eval's)."""
    from posequant.calibration import clip_box

    doc = json.loads(ann_path.read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
    return [{"image_id": a["image_id"], "category_id": 1, "bbox": list(clip_box(a["bbox"], *sizes[a["image_id"]])),
             "score": score} for a in doc["annotations"]]


def test_ground_truth_boxes_as_detections_give_the_ground_truth_ap(tiny, tmp_path):
    """Same crops, box score 1, people apart (OKS-NMS keeps all): the detection path scores eval's own AP;
    a duplicate box adds a person OKS-NMS takes out again; another category is left out, as HRNet does."""
    dets = gt_as_detections(tiny.ann)
    dup = dict(dets[0], score=0.5)
    other = dict(dets[1], category_id=2)
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets + [dup, other]))
    gt = evaluate(tiny.model, tiny.coco, flip=False)
    res = evaluate(tiny.model, tiny.coco, flip=False, boxes=path)
    assert res.metrics["AP"] == pytest.approx(gt.metrics["AP"], abs=1e-12) and gt.metrics["AP"] == 1.0
    assert res.people == 7 and res.boxes["kept_after_oks_nms"] == 6 and res.boxes["source"] == "file"
    assert "PCK@0.2" not in res.metrics and res.to_dict()["boxes"]["boxes"] == 7
    assert gt.to_dict()["boxes"] == {"source": "ground truth"}
    # image 1's boxes: its two people, then the duplicate; the crops are eval's own
    np.testing.assert_array_equal(np.delete(res.preds, 2, axis=0), gt.preds)
    np.testing.assert_array_equal(res.preds[2], res.preds[0])


def test_a_wrong_box_costs_ap(tiny, tmp_path):
    dets = gt_as_detections(tiny.ann)
    dets[0]["bbox"] = [100.0, 60.0, 20.0, 30.0]  # one person's box elsewhere
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    assert evaluate(tiny.model, tiny.coco, flip=False, boxes=path).metrics["AP"] < 0.9


@pytest.mark.parametrize("case, expect", [
    ("unknown_image", "boxes on images the annotations do not list"),
    ("list_image_id", "boxes on images the annotations do not list"),
    ("both", "not both"),
    ("limit", "--limit counts ground-truth people"),
    ("no_boxes", "no person boxes"),
])
def test_detection_boxes_that_cannot_be_scored_are_refused(tiny, tmp_path, case, expect):
    path = tmp_path / "dets.json"
    dets = gt_as_detections(tiny.ann)
    kw = {"boxes": path}
    if case == "unknown_image":
        dets[0]["image_id"] = 404
    elif case == "list_image_id":
        dets[0]["image_id"] = [1]
    elif case == "both":
        kw["detector"] = tiny.detector
    elif case == "limit":
        kw["limit"] = 2
    elif case == "no_boxes":
        dets = [dict(d, score=0.001) for d in dets]
        kw = {"detector": tiny.detector, "det_score": 0.95}
    path.write_text(json.dumps(dets))
    with pytest.raises(PosequantError, match=expect):
        evaluate(tiny.model, tiny.coco, flip=False, **kw)


@pytest.mark.shared
@needs_shared(MPII_MINI)
def test_mpii_has_no_detection_scoring(tiny, tmp_path, small_checkpoints):
    path = tmp_path / "dets.json"
    path.write_text("[]")
    onnx_path = export_pose(small_checkpoints["pose_resnet"], tmp_path / "pr.onnx", input_size=(64, 64),
                            verify_model=False).output
    with pytest.raises(DataError, match="MPII: detection boxes are scored with COCO"):
        evaluate(onnx_path, MPII_MINI, boxes=path)


def test_coco_boxes_reads_file_names_and_threshold(tiny, tmp_path):
    from posequant.calibration import open_dataset

    ds = open_dataset(tiny.coco, input_size=(64, 32))
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"file_name": "000000000002.jpg", "bbox": [1, 2, 3, 4], "score": 0.3},
                                {"image_id": 3, "bbox": [1, 2, 3, 4], "score": 0.1}]))
    found = coco_boxes(path, ds.image_files, min_score=0.2)
    assert {k: len(v) for k, v in found.by_image.items()} == {1: 0, 2: 1, 3: 0}


def test_detector_eval_equals_predicts_keypoints(tiny, tmp_path):
    """eval --detector and predict --detector share the detection path: predict's keypoints.json scores
    eval's AP; its boxes, their scores and both timings are reported."""
    ev = evaluate(tiny.model, tiny.coco, flip=True, detector=tiny.detector, det_score=0.5)
    assert ev.boxes["source"] == "detector" and ev.boxes["boxes"] == 6
    res = predict(tiny.model, [tiny.coco / "val2017"], tmp_path / "out", detector=tiny.detector, det_score=0.5)
    results = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    assert res.people == len(results) == ev.boxes["kept_after_oks_nms"] and res.boxes == 6
    assert coco_keypoint_ap(tiny.ann, results).metrics["AP"] == pytest.approx(ev.metrics["AP"], abs=1e-12)
    assert sorted({r["box_score"] for r in results}) == pytest.approx([0.8, 0.9])
    np.testing.assert_allclose(sorted(r["box"] for r in results)[0], BOXES[0], atol=1e-3)
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["detector"]["layout"] == "yolox" and summary["detector_ms_per_image_or_frame"] > 0
    assert summary["pose_ms_per_image_or_frame"] > 0


def test_overlay_draws_each_box_in_the_models_colour(tiny):
    from posequant.benchmarks.predict import overlay
    from posequant.core.metadata import read_meta

    image = np.zeros((120, 160, 3), np.uint8)
    none = np.zeros((0, 17, 2)), np.zeros((0, 17, 1))
    picture = overlay(image, read_meta(tiny.model), *none, boxes=[Box((10.0, 30.0, 60.0, 80.0), 0.9)])
    assert (picture[50:100, 10] == FLOAT_BGR).all() and (picture[50:100, 70] == FLOAT_BGR).all()
    assert (picture[50:100, 30] == 0).all()  # inside: untouched


def test_cli_eval_and_predict_take_the_detector(tiny, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli.main, ["eval", str(tiny.model), "--data", str(tiny.coco), "--detector", str(tiny.detector),
                                   "--det-score", "0.5", "--no-flip", "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert "COCO val: 6 person boxes (yolox detector people.onnx, score >= 0.5" in res.output
    assert json.loads((tmp_path / "e.json").read_text())["boxes"]["detector"] == str(tiny.detector)
    res = runner.invoke(cli.main, ["predict", str(tiny.model), str(tiny.coco / "val2017" / "000000000001.jpg"),
                                   "--detector", str(tiny.detector), "-o", str(tmp_path / "out"), "--no-flip"])
    assert res.exit_code == 0, res.output
    assert "detector people.onnx (yolox, fp32" in res.output and "pose" in res.output


@pytest.mark.parametrize("args, expect", [
    (["--detector", "{bad}"], "is not a detector layout"),
    (["--detector", "{det}", "--boxes", "{dets}"], "not both"),
    (["--detector", "{det}", "--json", "{det}"], "would destroy the input"),
    (["--detector", "{det}", "--det-score", "0"], "--det-score"),
    (["--detector", "{det}", "--det-iou", "nan"], "--det-iou"),
])
def test_predict_detector_mistakes_are_one_line_exit_2(tiny, tmp_path, args, expect):
    bad = yolox_like(tmp_path / "bad.onnx", {}, cells=83)
    dets = tmp_path / "dets.json"
    dets.write_text("[]")
    before = tiny.detector.read_bytes()
    out = tmp_path / "out"
    args = [a.format(bad=bad, det=tiny.detector, dets=dets) for a in args]
    res = CliRunner().invoke(cli.main, ["predict", str(tiny.model), str(tiny.coco / "val2017"), "-o", str(out), *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith(("error:", "Error:"))]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in res.output, res.output
    assert not out.exists() and tiny.detector.read_bytes() == before


def test_gate_adds_an_ap_check_on_detector_boxes(tiny, tmp_path):
    from test_bench_gate import quantize  # plain ORT quantize_static, as the gate tests make INT8

    from posequant.benchmarks.gate import DETECTOR_AP, gate

    int8 = quantize(tiny.model, tmp_path / "m0.int8.onnx")
    result = gate(tiny.model, int8, tiny.coco, flip=False, runs=1, warmup=0, min_speedup=0, max_drop=100,
                  max_joint_drop=100, detector=tiny.detector, det_score=0.5)
    assert DETECTOR_AP in result.scores and result.boxes["boxes"] == 6
    check = next(c for c in result.checks if c.name.startswith(DETECTOR_AP))
    assert check.float_value == pytest.approx(100 * evaluate(tiny.model, tiny.coco, flip=False, detector=tiny.detector,
                                                               det_score=0.5).metrics["AP"])
    assert result.to_dict()["boxes"]["source"] == "detector"
    with pytest.raises(PosequantError, match="--limit"):
        gate(tiny.model, int8, tiny.coco, limit=2, detector=tiny.detector)


# ---- EXIF orientation ---------------------------------------------------------------------------------


def with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an APP1 EXIF segment holding only the Orientation tag (big-endian TIFF), after SOI."""
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_predict_draws_and_reports_as_a_viewer_shows_the_photo(tiny, tmp_path):
    """A phone photo stored sideways with Orientation 6 (turn 90 degrees clockwise to view): predict gives the
    joints and picture of the photo as shown, equal to those of the turned pixels saved without a tag."""
    source = (tiny.coco / "val2017" / "000000000001.jpg").read_bytes()
    tagged = tmp_path / "in" / "phone.jpg"
    tagged.parent.mkdir()
    tagged.write_bytes(with_orientation(source, 6))
    stored = read_image(tagged)
    assert exif_orientation(tagged) == 6 and stored.shape == (120, 160, 3)
    shown = cv2.rotate(stored, cv2.ROTATE_90_CLOCKWISE)
    np.testing.assert_array_equal(read_image(tagged, upright=True), shown)
    turned = tmp_path / "in2" / "phone.png"
    turned.parent.mkdir()
    cv2.imwrite(str(turned), shown)  # lossless: the same pixels
    a = predict(tiny.model, [tagged], tmp_path / "a", flip=False)
    b = predict(tiny.model, [turned], tmp_path / "b", flip=False)
    ka = json.loads((tmp_path / "a" / RESULTS_FILE).read_text())
    kb = json.loads((tmp_path / "b" / RESULTS_FILE).read_text())
    assert a.people == b.people == 1 and ka[0]["keypoints"] == kb[0]["keypoints"] and ka[0]["box"][2:] == [120, 160]
    assert cv2.imread(str(tmp_path / "a" / "phone.pose.jpg")).shape == (160, 120, 3)


def test_box_files_keep_the_stored_pixels_and_say_so(tiny, tmp_path):
    tagged = tmp_path / "000000000001.jpg"
    tagged.write_bytes(with_orientation((tiny.coco / "val2017" / tagged.name).read_bytes(), 6))
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "bbox": BOXES[0], "score": 1}]))
    said = []
    predict(tiny.model, [tagged], tmp_path / "out", boxes=dets, flip=False, warn=said.append)
    assert len(said) == 1 and "EXIF orientation" in said[0] and "stored pixels" in said[0]
    assert cv2.imread(str(tmp_path / "out" / "000000000001.pose.jpg")).shape == (120, 160, 3)


def test_eval_scores_the_stored_pixels_as_the_official_code(tiny, tmp_path):
    """HRNet reads with IMREAD_IGNORE_ORIENTATION (annotations are on the stored pixels): an orientation tag
    changes nothing in eval."""
    root = tmp_path / "coco"
    shutil.copytree(tiny.coco, root)
    image = root / "val2017" / "000000000001.jpg"
    image.write_bytes(with_orientation(image.read_bytes(), 8))
    a, b = evaluate(tiny.model, tiny.coco, flip=False), evaluate(tiny.model, root, flip=False)
    np.testing.assert_array_equal(a.preds, b.preds)


def test_exif_orientation_of_other_files(tmp_path):
    png = tmp_path / "a.png"
    cv2.imwrite(str(png), np.zeros((4, 4, 3), np.uint8))
    jpg = tmp_path / "a.jpg"
    jpg.write_bytes(cv2.imencode(".jpg", np.zeros((4, 4, 3), np.uint8))[1].tobytes())
    assert exif_orientation(png) == exif_orientation(jpg) == exif_orientation(tmp_path / "none.jpg") == 1
    plain = jpg.read_bytes()
    for o in (3, 8):
        jpg.write_bytes(with_orientation(plain, o))
        assert exif_orientation(jpg) == o


# ---- the real detector, model and data --------------------------------------------------------------------


@pytest.mark.shared
@needs_shared(YOLOX_NANO, COCO_MINI)
def test_yolox_nano_boxes_on_coco_mini_val():
    """Our decoding of YOLOX-Nano against its README's independent measurement (person box AP 0.488, AP50 0.80)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from posequant.benchmarks.detect import detect_images
    from posequant.calibration import open_dataset

    ds = open_dataset(COCO_MINI, input_size=(256, 192))
    found = detect_images(open_detector(YOLOX_NANO, score=0.01), ds.image_files, read_image)
    results = [{"image_id": k, "category_id": 1, "bbox": list(b.bbox), "score": b.score}
               for k, boxes in found.by_image.items() for b in boxes]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ds.coco_json))
        e = COCOeval(gt, gt.loadRes(results), "bbox")
        e.params.catIds = [1]
        e.evaluate()
        e.accumulate()
        e.summarize()
    assert e.stats[0] == pytest.approx(0.488, abs=0.02) and e.stats[1] == pytest.approx(0.80, abs=0.03)


@pytest.mark.slow
@pytest.mark.shared
@needs_shared(YOLOX_NANO, TRAINED_CKPT, COCO_MINI)
def test_trained_model_on_yolox_nano_boxes(tmp_path):
    """The protocol on real data: AP with detector boxes below AP with ground-truth boxes (YOLOX-Nano finds
    about 91% of coco-mini val's people), both those of a trained model."""
    model = export_pose(TRAINED_CKPT, tmp_path / "m.onnx", arch=TRAINED_ARCH, input_size=(256, 192),
                        keypoints="coco", color="rgb").output
    gt = evaluate(model, COCO_MINI)
    det = evaluate(model, COCO_MINI, detector=YOLOX_NANO)
    assert 0.3 < det.metrics["AP"] < gt.metrics["AP"] and det.boxes["boxes"] > 68  # measured 0.433 vs 0.509


@pytest.mark.shared
@needs_shared(YOLOX_NANO, TRAINED_CKPT, MPII_CALIB)
def test_two_people_get_two_skeletons(tmp_path):
    model = export_pose(TRAINED_CKPT, tmp_path / "m.onnx", arch=TRAINED_ARCH, input_size=(256, 192),
                        keypoints="coco", color="rgb").output
    photo = MPII_CALIB / "025508722.jpg"  # a bowler and a spectator
    whole = predict(model, [photo], tmp_path / "whole", flip=False)
    res = predict(model, [photo], tmp_path / "out", detector=YOLOX_NANO, flip=False)
    assert whole.people == 1 and res.people == 2
    boxes = [r["box"] for r in json.loads((tmp_path / "out" / RESULTS_FILE).read_text())]
    assert abs(boxes[0][0] - boxes[1][0]) > 200  # side by side, not one figure
