"""MPII PCKh and PCK on hand-computed cases, an independent per-joint oracle, and (tier 2) real MPII GT."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from posequant.benchmarks.metrics import OFFICIAL_RNG, PCKH_ROWS, box_size, mpii_pckh, pck, pckh_curve
from posequant.calibration import load_mpii_gt
from posequant.core.errors import DataError
from posequant.core.keypoints import COCO, MPII

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MPII_MINI = SHARED / "data" / "mpii-mini"
GT_NAMES = ("rank", "rkne", "rhip", "lhip", "lkne", "lank", "pelv", "thor",
            "neck", "head", "rwri", "relb", "rsho", "lsho", "lelb", "lwri")
HEAD = 30.0  # head size of a (0, 0)-(30, 40) head box: 0.6 x 50, exactly 30.0 in float64
J = MPII.num_joints

pytestmark = pytest.mark.filterwarnings("error")  # no 0/0 or inf warnings may leak


def make_gt(num_people: int, *, missing=(), zero_head=(), seed: int = 0) -> dict:
    """Official-layout GT: 1-based joints, head size HEAD, ``missing`` (person, joint) pairs."""
    rng = np.random.default_rng(seed)
    joints = rng.integers(100, 500, (num_people, J, 2)).astype(np.float64)  # exact sums at boundaries
    jnt_missing = np.zeros((J, num_people), dtype=np.uint8)
    for person, joint in missing:
        jnt_missing[joint, person] = 1
    boxes = np.zeros((2, 2, num_people))
    boxes[1] = np.array([30.0, 40.0])[:, None]
    boxes[:, :, list(zero_head)] = 7.0  # both corners equal: a zero-size head box
    names = np.empty((1, J), dtype=object)
    names[0] = [np.array([n]) for n in GT_NAMES]  # as loadmat returns them
    return {"dataset_joints": names, "jnt_missing": jnt_missing,
            "pos_gt_src": np.transpose(joints, (1, 2, 0)), "headboxes_src": boxes}


def gt_joints(gt: dict) -> np.ndarray:
    """The 1-based GT as N x 16 x 2 predictions."""
    return np.transpose(gt["pos_gt_src"], (2, 0, 1)).copy()


def test_perfect_predictions_in_both_conventions():
    gt = make_gt(3)
    for preds, one_based in ((gt_joints(gt), True), (gt_joints(gt) - 1.0, False)):
        result = mpii_pckh(preds, gt, one_based=one_based)
        for key in ("PCKh@0.5", "PCKh@0.1"):
            assert set(result[key]) == {*PCKH_ROWS, "Mean"}
            assert result[key] == pytest.approx(dict.fromkeys(result[key], 100.0))
        np.testing.assert_array_equal(result.joint_count, [3] * J)


def test_one_based_flag_matters():
    gt = make_gt(2)
    preds = gt_joints(gt) + 2.0
    # 1-based: 2 px off in x and y (0.094 head sizes); 0-based: +1 makes it 3 px (0.141).
    assert mpii_pckh(preds, gt, one_based=True)["PCKh@0.1"]["Mean"] == pytest.approx(100)
    assert mpii_pckh(preds, gt, one_based=False)["PCKh@0.1"]["Mean"] == 0.0


def test_distance_exactly_at_threshold_is_correct():
    gt = make_gt(2)
    preds = gt_joints(gt)
    # A 3-4-5 offset scaled to exactly 0.5 x 30 = 15 px (person 0) and just beyond (person 1).
    preds[0, 9] += [9.0, 12.0]
    preds[1, 9] += [9.0, 12.0 + 1e-9]
    # 0.1 x 30 = 3 px on the right knee.
    preds[0, 1] += [0.0, 3.0]
    preds[1, 1] += [0.0, 3.0 + 1e-9]
    result = mpii_pckh(preds, gt, one_based=True)
    assert result.per_joint["PCKh@0.5"][9] == 50.0
    assert result.per_joint["PCKh@0.1"][9] == 0.0
    assert result.per_joint["PCKh@0.5"][1] == 100.0
    assert result.per_joint["PCKh@0.1"][1] == 50.0
    assert result["PCKh@0.1"]["Knee"] == 0.5 * (50.0 + 100.0)


def test_missing_joints_are_not_counted():
    gt = make_gt(2, missing=[(0, 10), (1, 10), (0, 12)])
    preds = gt_joints(gt)
    preds[0, 12] += 1000.0  # wrong, but unlabelled: ignored
    preds[1, 12] += 1000.0  # wrong and labelled
    result = mpii_pckh(preds, gt, one_based=True)
    assert result.joint_count[12] == 1 and result.joint_count[10] == 0
    assert result.per_joint["PCKh@0.5"][12] == 0.0
    assert math.isnan(result.per_joint["PCKh@0.5"][10])  # r_wrist labelled nowhere: 0/0
    assert math.isnan(result["PCKh@0.5"]["Wrist"])
    # The Mean stays finite: 25 counted joints (2 people x 14, minus 2 r_wrists and 1 r_shoulder), 1 wrong.
    assert result["PCKh@0.5"]["Mean"] == pytest.approx(100 * 24 / 25)


def test_zero_size_head_box_excludes_the_person():
    gt = make_gt(3, zero_head=[1])
    preds = gt_joints(gt)
    preds[1] += 1000.0  # would be wrong everywhere, but person 1 cannot be scaled
    preds[2, 9] += 1000.0
    result = mpii_pckh(preds, gt, one_based=True)
    np.testing.assert_array_equal(result.joint_count, [2] * J)
    assert result["PCKh@0.5"]["Head"] == 50.0
    assert result["PCKh@0.5"]["Shoulder"] == 100.0


def test_mean_weights_joints_by_count_and_excludes_pelvis_and_thorax_only():
    gt = make_gt(4, missing=[(p, 0) for p in range(3)])  # r_ankle labelled once
    preds = gt_joints(gt)
    preds[:, 6:8] += 1000.0  # pelvis and thorax all wrong: not in the Mean
    preds[3, 0] += 1000.0  # the single r_ankle is wrong
    result = mpii_pckh(preds, gt, one_based=True)
    # 14 joints x 4 people - 3 missing r_ankles = 53 counted, 1 wrong; the unweighted mean
    # over joints would be (13 x 100 + 0) / 14 = 92.9 instead.
    assert result["PCKh@0.5"]["Mean"] == pytest.approx(100 * 52 / 53)
    assert result["PCKh@0.5"]["Ankle"] == 50.0
    preds = gt_joints(gt)
    preds[0, 8] += 1000.0  # upper neck wrong once: it is in the Mean
    assert mpii_pckh(preds, gt, one_based=True)["PCKh@0.5"]["Mean"] == pytest.approx(100 * 52 / 53)


def test_table_rows_average_left_and_right():
    gt = make_gt(2)
    preds = gt_joints(gt)
    preds[0, 12] += 100.0  # one r_shoulder of two wrong: 50; l_shoulder 100
    preds[:, 15] += 100.0  # l_wrist always wrong
    table = mpii_pckh(preds, gt, one_based=True)["PCKh@0.5"]
    assert table["Shoulder"] == 75.0 and table["Wrist"] == 50.0 and table["Elbow"] == 100.0


def test_curve_bin_11_is_0_11_not_0_1():
    gt = make_gt(2)
    preds = gt_joints(gt)
    preds[:, :, 0] += 0.105 * HEAD  # every joint at 0.105 head sizes: wrong at 0.1, right at 0.11
    curve = pckh_curve(preds, gt, one_based=True)
    ours = mpii_pckh(preds, gt, one_based=True)
    assert len(OFFICIAL_RNG) == 51 and OFFICIAL_RNG[11] == pytest.approx(0.11)
    assert curve.mean[11] == pytest.approx(100.0)  # what the official code calls "Mean@0.1"
    assert ours["PCKh@0.1"]["Mean"] == 0.0 == curve.mean[10]
    np.testing.assert_array_equal(curve.per_joint[50], ours.per_joint["PCKh@0.5"])


def oracle_pckh(preds1: np.ndarray, gt: dict, threshold: float) -> np.ndarray:
    """Per-joint PCKh written out person by person (1-based predictions)."""
    correct, count = np.zeros(J), np.zeros(J)
    for n in range(preds1.shape[0]):
        box = gt["headboxes_src"][:, :, n]
        head = 0.6 * math.hypot(*(box[1] - box[0]))
        for j in range(J):
            if gt["jnt_missing"][j, n] or head == 0:
                continue
            count[j] += 1
            x, y = preds1[n, j]
            correct[j] += math.hypot(x - gt["pos_gt_src"][j, 0, n], y - gt["pos_gt_src"][j, 1, n]) / head <= threshold
    return 100 * correct / count


def test_matches_a_person_by_person_oracle_on_random_data():
    rng = np.random.default_rng(1)
    gt = make_gt(40, missing=[(int(p), int(j)) for p, j in rng.integers(0, [40, J], (60, 2))], zero_head=[5])
    preds = (gt_joints(gt) - 1.0 + rng.normal(0, 6, (40, J, 2))).astype(np.float32)
    result = mpii_pckh(preds, gt, one_based=False)
    for key, t in (("PCKh@0.5", 0.5), ("PCKh@0.1", 0.1)):
        expected = oracle_pckh(preds + 1.0, gt, t)  # +1 in float32, as the official code
        np.testing.assert_allclose(result.per_joint[key], expected)
        counts = result.joint_count
        keep = np.ones(J, bool)
        keep[[6, 7]] = False
        assert result[key]["Mean"] == pytest.approx(np.sum(expected[keep] * counts[keep]) / counts[keep].sum())
        assert 0 < result[key]["Mean"] < 100


def test_bad_input_is_a_data_error():
    gt = make_gt(2)
    preds = gt_joints(gt)
    with pytest.raises(DataError, match="3 predictions for 2"):
        mpii_pckh(np.concatenate([preds, preds[:1]]), gt, one_based=True)
    preds[1, 9, 0] = np.nan
    with pytest.raises(DataError, match=r"person 1, joint 9 \(head_top\)"):
        mpii_pckh(preds, gt, one_based=True)
    with pytest.raises(DataError, match=r"shape \(2, 17, 2\)"):
        mpii_pckh(np.zeros((2, 17, 2)), gt, one_based=True)
    gt["dataset_joints"] = gt["dataset_joints"][:, ::-1]
    with pytest.raises(DataError, match="official order"):
        mpii_pckh(gt_joints(gt), gt, one_based=True)


def test_one_line_messages():
    with pytest.raises(DataError) as info:
        mpii_pckh(np.full((1, J, 2), np.inf), make_gt(1), one_based=True)
    assert "\n" not in str(info.value)


# ---- PCK ---------------------------------------------------------------------------------------


def test_pck_at_exactly_the_threshold_and_visibility():
    gt = np.zeros((2, 17, 2))
    visible = np.ones((2, 17))
    boxes = np.array([[0, 0, 50, 100], [10, 10, 40, 20]])  # max(w, h) = 100 and 40
    norm = box_size(boxes)
    np.testing.assert_array_equal(norm, [100, 40])
    preds = gt.copy()
    preds[0, 0] = [12.0, 16.0]  # 20 px = 0.2 x 100: correct
    preds[1, 0] = [0.0, 8.000001]  # just over 0.2 x 40
    preds[1, 5] = [100.0, 0.0]  # wrong but invisible
    visible[1, 5] = 0
    result = pck(preds, gt, visible, norm)
    assert list(result)[:17] == list(COCO.joint_names) and "Mean" in result
    assert result["nose"] == 50.0 and result["left_shoulder"] == 100.0
    assert result["Mean"] == pytest.approx(100 * 32 / 33)  # 33 visible joints, 1 wrong


def test_pck_zero_norm_and_names():
    gt = np.zeros((2, 3, 2))
    preds = gt + 1.0
    result = pck(preds, gt, np.ones((2, 3)), np.array([0.0, 10.0]), threshold=0.2, joint_names=["a", "b", "c"])
    assert result == {"a": 100.0, "b": 100.0, "c": 100.0, "Mean": 100.0}  # person 0 not counted
    result = pck(preds, gt, np.zeros((2, 3)), np.array([10.0, 10.0]), joint_names=["a", "b", "c"])
    assert all(math.isnan(v) for v in result.values())
    with pytest.raises(DataError, match="one entry per person"):
        pck(preds, gt, np.ones((2, 3)), np.array([1.0]), joint_names=["a", "b", "c"])


# ---- real data ---------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.skipif(not (MPII_MINI / "annot" / "gt_valid.mat").is_file(), reason="../shared/data/mpii-mini not available")
def test_real_mpii_gt_as_predictions_scores_100():
    gt = load_mpii_gt(MPII_MINI / "annot" / "gt_valid.mat")
    joints = np.transpose(gt["pos_gt_src"], (2, 0, 1))
    for preds, one_based in ((joints, True), (joints - 1.0, False)):
        result = mpii_pckh(preds, gt, one_based=one_based)
        for table in result.table.values():
            assert table == pytest.approx(dict.fromkeys(table, 100.0))
    assert result.joint_count[0] == 3  # r_ankle is missing for two of the five people
    off = mpii_pckh(joints + 30.0, gt, one_based=True)["PCKh@0.5"]["Mean"]
    assert off < 100
