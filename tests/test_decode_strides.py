"""Decoding at any heatmap stride (1, 2, 4, 8): the real heatmap size maps joints back to the image,
argmax + the official quarter-pixel offset works on Sigmoid / non-Gaussian heatmaps, and the flip
test's shift follows the stride. Synthetic heatmaps whose true peak is known; no model needed."""

from __future__ import annotations

import numpy as np
import pytest

from posequant.core.decoding import average_flip, dataset_order, decode_heatmaps, flip_shift, heatmaps_to_joints
from posequant.core.transforms import PIXEL_STD
from posequant.core.keypoints import MPII
from posequant.core.metadata import IMAGENET_MEAN, IMAGENET_STD, ModelMeta

INPUT = (64, 48)  # H x W
STRIDES = (1, 2, 4, 8)


def meta_for(stride: int, channel_joints=()) -> ModelMeta:
    h, w = INPUT
    return ModelMeta("onnx", "mpii", MPII.joint_names, MPII.flip_pairs, MPII.skeleton, INPUT, (h // stride, w // stride),
                     "rgb", IMAGENET_MEAN, IMAGENET_STD, channel_joints=channel_joints)


def identity_box(n: int):
    """Centres and scales that make the person box the input itself: image px == input px."""
    h, w = INPUT
    return np.tile([w / 2, h / 2], (n, 1)), np.tile([w / PIXEL_STD, h / PIXEL_STD], (n, 1))


@pytest.mark.parametrize("stride", STRIDES)
def test_sigmoid_plateau_decodes_to_the_known_peak_at_any_stride(stride):
    """A flat 0.5 (a Sigmoid of zero) with one peak, a higher right and lower neighbour: not Gaussian."""
    h, w = INPUT[0] // stride, INPUT[1] // stride
    hm = np.full((1, 16, h, w), 0.5, np.float32)
    rng = np.random.default_rng(stride)
    truth = []
    for j in range(16):
        u, v = int(rng.integers(2, w - 2)), int(rng.integers(2, h - 2))
        hm[0, j, v, u] = 0.99
        hm[0, j, v, u + 1], hm[0, j, v, u - 1] = 0.7, 0.6  # offset +1/4 in x
        hm[0, j, v - 1, u], hm[0, j, v + 1, u] = 0.8, 0.55  # offset -1/4 in y
        truth.append(((u + 0.25) * stride, (v - 0.25) * stride))
    centers, scales = identity_box(1)
    preds, maxvals = decode_heatmaps(hm, centers, scales)
    np.testing.assert_allclose(preds[0], np.array(truth), atol=1e-4)
    assert np.allclose(maxvals, 0.99)


@pytest.mark.parametrize("stride", STRIDES)
def test_peaks_at_the_border_get_no_offset(stride):
    h, w = INPUT[0] // stride, INPUT[1] // stride
    hm = np.zeros((1, 2, h, w), np.float32)
    hm[0, 0, 0, w - 1] = 1.0  # top-right corner
    hm[0, 1, h - 1, 1] = 1.0  # official: 1 < px < w - 1, so column 1 is not refined either
    hm[0, 1, h - 1, 2] = 0.5
    preds, _ = decode_heatmaps(hm, *identity_box(1))
    np.testing.assert_allclose(preds[0], [[(w - 1) * stride, 0], [1 * stride, (h - 1) * stride]], atol=1e-4)


def test_flip_shift_follows_the_stride():
    assert {s: flip_shift(48, 48 // s) for s in STRIDES} == {1: 0, 2: 1, 4: 1, 8: 1}
    assert flip_shift(192, 48) == 1  # the official stride 4: its one-pixel SHIFT_HEATMAP


def _gaussian(x_heatmap: float, y: float, hw: tuple[int, int], sigma: float = 1.5) -> np.ndarray:
    ys, xs = np.mgrid[0:hw[0], 0:hw[1]]
    return np.exp(-((xs - x_heatmap) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2)).astype(np.float32)


@pytest.mark.parametrize("stride", STRIDES)
def test_flip_test_shift_is_right_for_the_stride(stride):
    """An equivariant toy model puts joint x at heatmap x / s. Mirrored, the joint is at W - 1 - x; the
    flipped-back heatmap lags (s - 1) / s pixels. The stride's shift decodes at least as close to the
    truth as the other choice, and at stride 1 (no shift) exactly."""
    h, w = INPUT[0] // stride, INPUT[1] // stride
    W = INPUT[1]
    xs = np.linspace(10, W - 11, 23)
    errors = {}
    for shift in (0, 1):
        err = []
        for x in xs:
            plain = _gaussian(x / stride, h / 2, (h, w))
            mirrored = _gaussian((W - 1 - x) / stride, h / 2, (h, w))
            hm = np.broadcast_to(plain, (1, 16, h, w)).copy()
            hm_f = np.broadcast_to(mirrored, (1, 16, h, w)).copy()
            avg = average_flip(hm, hm_f, MPII.flip_pairs, shift=shift)
            preds, _ = decode_heatmaps(avg, *identity_box(1))
            err.append(abs(preds[0, 0, 0] - x))
        errors[shift] = float(np.mean(err))
    ours = flip_shift(W, w)
    assert errors[ours] <= errors[1 - ours] + 1e-9, errors
    if stride == 1:
        assert errors[0] < 0.25 * 1 and errors[1] > errors[0] + 0.2  # the official 1 px would move every joint


@pytest.mark.parametrize("stride", STRIDES)
def test_heatmaps_to_joints_uses_the_real_heatmap_size_and_the_channel_order(stride):
    h, w = INPUT[0] // stride, INPUT[1] // stride
    perm = list(np.random.default_rng(0).permutation(16))  # channel c holds MPII joint perm[c]
    # joint j's place in image px, on the heatmap grid where the quarter offset applies (not the border)
    truth = np.array([[2 + j % (w - 4), 2 + (j // (w - 4)) % (h - 4)] for j in range(16)], np.float32) * stride
    hm = np.zeros((1, 16, h, w), np.float32)
    for c, j in enumerate(perm):
        u, v = truth[j] / stride
        hm[0, c, int(v), int(u)] = 1.0
    meta = meta_for(stride, tuple(perm))
    assert np.array_equal(dataset_order(hm, meta)[0, perm[3]], hm[0, 3])
    preds, _ = heatmaps_to_joints(meta, hm, *identity_box(1))
    np.testing.assert_allclose(preds[0], truth, atol=1e-4)
    # the flip test in the dataset's order: a mirrored input mirrors every joint and swaps left and right
    mirrored = np.zeros_like(hm)
    flip = MPII.flip_permutation()
    shift = flip_shift(INPUT[1], w)
    for c, j in enumerate(perm):
        u, v = truth[flip[j]] / stride
        mirrored[0, c, int(v), w - 1 - int(u) + shift] = 1.0  # flipped back and shifted, it lands on u
    both, _ = heatmaps_to_joints(meta, hm, *identity_box(1), heatmaps_flipped=mirrored)
    np.testing.assert_allclose(both[0], truth, atol=1e-4)
