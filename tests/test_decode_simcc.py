"""SimCC decoding as mmpose does it (``get_simcc_maximum``, ``SimCCLabel.decode``, ``flip_vectors`` in
``RTMCCHead.predict``), on hand-made vectors whose answers are worked out by hand; and the one decoder that
eval, gate, predict and quantize use picks the head from the metadata. No model needed."""

from __future__ import annotations

import numpy as np
import pytest

from posequant.core.decoding import (
    decode,
    decode_simcc,
    flip_simcc,
    head_of,
    heatmaps_to_joints,
    simcc_maximum,
    simcc_to_joints,
)
from posequant.core.errors import MetadataError
from posequant.core.keypoints import COCO
from posequant.core.metadata import IMAGENET_MEAN, IMAGENET_STD, ModelMeta
from posequant.core.transforms import PIXEL_STD

INPUT = (8, 6)  # H x W


def simcc_meta(ratio: float = 2.0, channel_joints=()) -> ModelMeta:
    h, w = INPUT
    return ModelMeta("onnx", "coco", COCO.joint_names, COCO.flip_pairs, COCO.skeleton, INPUT,
                     (int(h * ratio), int(w * ratio)), "rgb", IMAGENET_MEAN, IMAGENET_STD,
                     channel_joints=channel_joints, head="simcc", simcc_split_ratio=ratio, outputs=("sx", "sy"))


def identity_box(n: int):
    """Centres and scales that make the person box the input itself: image px == crop px."""
    h, w = INPUT
    return np.tile([w / 2, h / 2], (n, 1)), np.tile([w / PIXEL_STD, h / PIXEL_STD], (n, 1))


def test_maximum_is_each_vectors_argmax_and_the_smaller_peak():
    x = np.array([[[0.0, 0.2, 0.9, 0.1], [0.5, 0.5, 0.1, 0.0]]], np.float32)  # joint 1: a tie, the first wins
    y = np.array([[[0.3, 0.8, 0.1], [0.0, 0.1, 0.7]]], np.float32)
    locs, vals = simcc_maximum(x, y)
    np.testing.assert_array_equal(locs[0], [[2, 1], [0, 2]])
    np.testing.assert_allclose(vals[0], [0.8, 0.5])  # min(0.9, 0.8), min(0.5, 0.7)
    assert locs.dtype == np.float32


def test_a_joint_whose_score_is_not_positive_sits_at_minus_one():
    """mmpose: locs[vals <= 0] = -1, before the division by the split ratio. RTMPose's raw logits can be
    negative, so this happens in practice."""
    x = np.array([[[-3.0, -1.0, -2.0], [0.0, 0.0, 0.0], [0.1, 0.4, 0.2]]], np.float32)
    y = np.array([[[0.5, 0.9], [0.3, 0.2], [-0.1, -0.2]]], np.float32)
    locs, vals = simcc_maximum(x, y)
    np.testing.assert_array_equal(locs[0], [[-1, -1], [-1, -1], [-1, -1]])  # scores -1, 0, -0.1
    np.testing.assert_allclose(vals[0], [-1.0, 0.0, -0.1])
    preds, scores = decode_simcc(x, y, 2.0, *identity_box(1), INPUT)
    np.testing.assert_allclose(preds[0], -0.5, atol=1e-5)  # -1 bin / 2 = -0.5 crop px
    assert scores.shape == (1, 3, 1)


@pytest.mark.parametrize("ratio", [1.0, 2.0, 3.0])
def test_bins_divided_by_the_split_ratio_are_crop_pixels(ratio):
    h, w = INPUT
    lx, ly = int(w * ratio), int(h * ratio)
    x, y = np.zeros((1, 17, lx), np.float32), np.zeros((1, 17, ly), np.float32)
    bins = [(j % lx, (3 * j) % ly) for j in range(17)]
    for j, (bx, by) in enumerate(bins):
        x[0, j, bx], y[0, j, by] = 1.0, 0.5
    preds, scores = decode_simcc(x, y, ratio, *identity_box(1), INPUT)
    np.testing.assert_allclose(preds[0], np.array(bins) / ratio, atol=1e-4)
    np.testing.assert_allclose(scores[0, :, 0], 0.5)


def test_crop_pixels_go_back_through_the_crop():
    """A box twice the input's size, centred at (100, 50): crop px (u, v) is image px centre + 2 (u - W/2, v - H/2)."""
    h, w = INPUT
    x, y = np.zeros((1, 17, 2 * w), np.float32), np.zeros((1, 17, 2 * h), np.float32)
    x[0, :, 9], y[0, :, 4] = 1.0, 1.0  # crop (4.5, 2.0)
    centers, scales = np.array([[100.0, 50.0]]), np.array([[2 * w / PIXEL_STD, 2 * h / PIXEL_STD]])
    preds, _ = decode_simcc(x, y, 2.0, centers, scales, INPUT)
    np.testing.assert_allclose(preds[0], np.tile([100 + 2 * (4.5 - 3), 50 + 2 * (2.0 - 4)], (17, 1)), atol=1e-4)


def test_flip_reverses_x_swaps_the_pairs_and_leaves_y_in_place():
    rng = np.random.default_rng(0)
    x, y = rng.random((2, 17, 12), dtype=np.float32), rng.random((2, 17, 16), dtype=np.float32)
    fx, fy = flip_simcc(x, y, COCO.flip_pairs)
    np.testing.assert_array_equal(fx[:, 1], x[:, 2, ::-1])  # left_eye takes right_eye's x, reversed
    np.testing.assert_array_equal(fx[:, 0], x[:, 0, ::-1])  # the nose has no pair
    np.testing.assert_array_equal(fy[:, 5], y[:, 6])  # left_shoulder takes right_shoulder's y, as it is
    back = flip_simcc(fx, fy, COCO.flip_pairs)
    np.testing.assert_array_equal(back[0], x)  # an involution
    np.testing.assert_array_equal(back[1], y)


def _one_hot(n: int, at: int, value: float = 1.0) -> np.ndarray:
    v = np.zeros(n, np.float32)
    v[at] = value
    return v


def test_flip_test_has_no_shift_as_in_mmpose():
    """Ratio 2, a joint at crop px 2: bin 4. The mirrored crop has its mirror joint at W - 1 - 2 = 3, bin 6 of 12,
    which reversed is bin 12 - 1 - 6 = 5: one bin (half a pixel) to the right, and mmpose does not shift it back.
    Equal peaks average to a tie (the first, bin 4, wins); a stronger mirrored peak wins (bin 5: 2.5 px)."""
    meta = simcc_meta(2.0)
    h, w = INPUT
    y = np.tile(_one_hot(2 * h, 6), (1, 17, 1))
    x = np.tile(_one_hot(2 * w, 4), (1, 17, 1))
    mirrored = np.tile(_one_hot(2 * w, 6), (1, 17, 1))  # every joint: its mirror joint is at the same place
    preds, scores = simcc_to_joints(meta, x, y, *identity_box(1), flipped=(mirrored, y))
    np.testing.assert_allclose(preds[0], np.tile([2.0, 3.0], (17, 1)), atol=1e-4)
    np.testing.assert_allclose(scores[0, :, 0], 0.5)  # min(mean x peak 0.5, y peak 1)
    stronger = np.tile(_one_hot(2 * w, 6, 1.2), (1, 17, 1))
    preds, _ = simcc_to_joints(meta, x, y, *identity_box(1), flipped=(stronger, y))
    np.testing.assert_allclose(preds[0, :, 0], 2.5, atol=1e-4)


def test_flip_test_swaps_left_and_right():
    """A mirrored crop shows the left wrist where the right wrist was: the flip test must put it back."""
    meta = simcc_meta(1.0)
    h, w = INPUT
    lw, rw = COCO.joint_names.index("left_wrist"), COCO.joint_names.index("right_wrist")
    x, y = np.zeros((1, 17, w), np.float32), np.zeros((1, 17, h), np.float32)
    xm, ym = np.zeros_like(x), np.zeros_like(y)
    x[0, :, 3] = y[0, :, 3] = xm[0, :, w - 1 - 3] = ym[0, :, 3] = 0.1  # every joint at (3, 3), mirrored (2, 3)
    x[0, lw, 1] = y[0, lw, 6] = 1.0  # the left wrist at (1, 6)
    xm[0, rw, w - 1 - 1] = ym[0, rw, 6] = 1.0  # mirrored: the right wrist's channel sees it, at (4, 6)
    preds, _ = simcc_to_joints(meta, x, y, *identity_box(1), flipped=(xm, ym))
    np.testing.assert_allclose(preds[0, lw], [1, 6], atol=1e-4)
    np.testing.assert_allclose(preds[0, rw], [3, 3], atol=1e-4)


def test_channel_order_is_put_into_the_sets_order_first():
    perm = list(np.random.default_rng(1).permutation(17))  # channel c holds COCO joint perm[c]
    meta = simcc_meta(1.0, tuple(perm))
    h, w = INPUT
    x, y = np.zeros((1, 17, w), np.float32), np.zeros((1, 17, h), np.float32)
    truth = np.array([[j % w, (2 * j) % h] for j in range(17)], np.float32)
    for c, j in enumerate(perm):
        x[0, c, int(truth[j, 0])], y[0, c, int(truth[j, 1])] = 1.0, 1.0
    preds, _ = decode(meta, (x, y), *identity_box(1))
    np.testing.assert_allclose(preds[0], truth, atol=1e-4)


def test_the_head_comes_from_the_metadata():
    heat = simcc_meta().with_(head="heatmap", simcc_split_ratio=None, outputs=(), heatmap_size=(2, 2))
    assert head_of(heat).name == "heatmap" and head_of(simcc_meta()).name == "simcc"
    hm = np.zeros((1, 17, 2, 2), np.float32)
    hm[0, :, 1, 0] = 1.0
    a, b = decode(heat, (hm,), *identity_box(1)), heatmaps_to_joints(heat, hm, *identity_box(1))
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("shapes", [[(2, 17, 12)], [(2, 17, 12), (2, 17, 15)], [(2, 16, 12), (2, 16, 16)],
                                    [(2, 17, 16), (2, 17, 12)], [(2, 17, 12, 1), (2, 17, 16)]])
def test_outputs_that_are_not_the_metadatas_are_one_line(shapes):
    with pytest.raises(MetadataError) as err:
        head_of(simcc_meta()).check([np.zeros(s, np.float32) for s in shapes], "m.onnx")
    line = str(err.value)
    assert "\n" not in line and "m.onnx" in line and "N x 17 x 12 (x) and N x 17 x 16 (y)" in line
    head_of(simcc_meta()).check([np.zeros((2, 17, 12)), np.zeros((2, 17, 16))], "m.onnx")  # fits: no error
