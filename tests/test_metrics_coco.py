"""COCO keypoint AP through pycocotools on a tiny synthetic json, OKS cross-checked, and (tier 2) coco-mini."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest

from posequant.benchmarks.metrics import COCO_STATS, coco_keypoint_ap, coco_results, oks
from posequant.calibration import open_dataset
from posequant.core.errors import DataError
from posequant.core.keypoints import COCO

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COCO_MINI = SHARED / "data" / "coco-mini"
K = COCO.num_joints
AREA = 10000.0  # a "large" person (> 96^2)
THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCOeval's OKS thresholds


def person_keypoints(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(20, 120, (K, 2)).astype(np.float64)


@pytest.fixture
def coco_json(tmp_path: Path) -> Path:
    """Images 1 and 2 with one person each, image 3 with nobody (a subset file may have such)."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 200, "height": 200} for i in (1, 2, 3)]
    annotations = []
    for ann_id, image_id in ((10, 1), (20, 2)):
        xy = person_keypoints(image_id)
        flat = np.concatenate([xy, np.full((K, 1), 2.0)], axis=1).reshape(-1).tolist()
        annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                            "keypoints": flat, "num_keypoints": K, "area": AREA, "bbox": [10, 10, 120, 120]})
    categories = [{"id": 1, "name": "person", "supercategory": "person",
                   "keypoints": list(COCO.joint_names), "skeleton": []}]
    path = tmp_path / "person_keypoints_tiny.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def results_for(image_ids, offset=(0.0, 0.0)) -> list[dict]:
    coords = np.stack([person_keypoints(i) + offset for i in image_ids])
    return coco_results(image_ids, coords, np.ones((len(image_ids), K, 1)))


def test_perfect_predictions_give_ap_1_and_print_nothing(coco_json, capsys):
    result = coco_keypoint_ap(coco_json, results_for([1, 2]))
    assert list(result.metrics) == list(COCO_STATS)
    for name in ("AP", "AP50", "AP75", "APl", "AR", "AR50", "AR75", "ARl"):
        assert result[name] == pytest.approx(1.0), name
    assert result["APm"] == -1.0  # no medium-sized ground truth: pycocotools' -1
    assert "Average Precision" in result.summary
    assert capsys.readouterr().out == ""


def test_shifted_predictions_score_what_their_oks_says(coco_json):
    offset = (8 * 0.6, 8 * 0.8)  # 8 px off everywhere: OKS 0.734
    gt = np.stack([person_keypoints(i) for i in (1, 2)])
    similarity = oks(gt + offset, gt, np.ones((2, K)), np.full(2, AREA))
    assert similarity == pytest.approx([0.7337, 0.7337], abs=1e-4)
    result = coco_keypoint_ap(coco_json, results_for([1, 2], offset))
    expected_ap = np.mean(similarity[0] >= THRESHOLDS)  # one person per image: all or nothing per threshold
    assert result["AP"] == pytest.approx(expected_ap) == 0.5
    assert result["AP50"] == pytest.approx(1.0) and result["AP75"] == 0.0


def test_oks_matches_pycocotools(coco_json):
    from pycocotools.coco import COCO as CocoApi
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(3)
    gt = person_keypoints(1)[None]
    preds = gt + rng.normal(0, 5, gt.shape)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = CocoApi(str(coco_json))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(coco_results([1], preds, np.ones((1, K, 1)))), "keypoints")
        evaluator.evaluate()
    assert oks(preds, gt, np.ones((1, K)), np.array([AREA]))[0] == pytest.approx(evaluator.ious[(1, 1)][0, 0])


def test_a_missed_person_halves_recall(coco_json):
    result = coco_keypoint_ap(coco_json, results_for([1]))
    assert result["AR"] == pytest.approx(0.5)
    assert result["AP"] == pytest.approx(51 / 101)  # precision 1 at the recall points 0 .. 0.5


def test_image_ids_score_only_those_images(coco_json):
    # person 2 unpredicted: missed over the whole file, out of scope with image_ids=[1]
    assert coco_keypoint_ap(coco_json, results_for([1]))["AR"] == pytest.approx(0.5)
    only = coco_keypoint_ap(coco_json, results_for([1]), image_ids=[1, 1])
    assert only["AP"] == pytest.approx(1.0) and only["AR"] == pytest.approx(1.0)
    with pytest.raises(DataError, match=r"image_ids name 1 images .* lacks \(e\.g\. 99\)"):
        coco_keypoint_ap(coco_json, results_for([1]), image_ids=[1, 99])
    with pytest.raises(DataError, match=r"results for 1 images outside image_ids \(e\.g\. 2\)"):
        coco_keypoint_ap(coco_json, results_for([1, 2]), image_ids=[1])


def test_results_are_not_modified(coco_json):
    results = results_for([1, 2])
    before = copy.deepcopy(results)
    coco_keypoint_ap(coco_json, results)
    assert results == before


def test_coco_results_score_like_hrnet():
    coords = np.arange(2 * K * 2, dtype=np.float64).reshape(2, K, 2)
    maxvals = np.full((2, K, 1), 0.1)
    maxvals[0, :4, 0] = [0.3, 0.5, 0.7, 0.2]  # 0.2 is not above the threshold
    results = coco_results(np.array([5, 6]), coords, maxvals, box_scores=[0.5, 1.0])
    assert results[0]["score"] == pytest.approx(0.5 * 0.5)  # mean(0.3, 0.5, 0.7) x box 0.5
    assert results[1]["score"] == 0.0  # no joint above 0.2
    assert results[0]["keypoints"][:6] == [0.0, 1.0, 0.3, 2.0, 3.0, 0.5]
    assert results[1] == json.loads(json.dumps(results[1]))  # plain Python types
    assert type(results[0]["image_id"]) is int and results[0]["category_id"] == 1


def test_bad_input_is_a_data_error(coco_json, tmp_path):
    with pytest.raises(DataError, match="image ids"):
        coco_keypoint_ap(coco_json, results_for([1]) + [{**results_for([1])[0], "image_id": 99}])
    with pytest.raises(DataError, match="no COCO results"):
        coco_keypoint_ap(coco_json, [])
    with pytest.raises(DataError, match="does not exist"):
        coco_keypoint_ap(tmp_path / "nope.json", results_for([1]))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="not a COCO annotation file"):
        coco_keypoint_ap(broken, results_for([1]))
    short = results_for([1])
    short[0]["keypoints"] = short[0]["keypoints"][:-3]
    with pytest.raises(DataError, match="51 keypoint numbers"):
        coco_keypoint_ap(coco_json, short)
    with pytest.raises(DataError, match=r"person 0, joint 3 \(left_ear\)"):
        coords = np.zeros((1, K, 2))
        coords[0, 3, 1] = np.nan
        coco_results([1], coords, np.ones((1, K, 1)))


@pytest.mark.shared
@pytest.mark.skipif(not COCO_MINI.is_dir(), reason="../shared/data/coco-mini not available")
def test_real_coco_gt_as_predictions_gives_ap_1():
    dataset = open_dataset(COCO_MINI, input_size=(256, 192), split="val")
    image_ids = [p.image_id for p in dataset]
    joints = np.stack([p.joints for p in dataset])
    maxvals = np.stack([p.joints_vis for p in dataset])[:, :, None]
    result = coco_keypoint_ap(dataset.coco_json, coco_results(image_ids, joints, maxvals))
    assert result["AP"] == pytest.approx(1.0) and result["AR"] == pytest.approx(1.0)
    worse = coco_keypoint_ap(dataset.coco_json, coco_results(image_ids, joints + 6.0, maxvals))
    assert worse["AP"] < 0.95
