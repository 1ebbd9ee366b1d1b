"""The affine transforms of the top-down pose repos (``lib/utils/transforms.py``): a person box to the
model's input crop, and crop (or heatmap) points back to image pixels.

Shared by cropping (``posequant.calibration``) and decoding (:mod:`posequant.core.decoding`), so both
map through the very same matrix. Sizes here are (W, H), as the official transforms take them.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

PIXEL_STD = 200.0  # the pose repos' box convention: scale = box size / 200 px


def get_affine_transform(
    center: Sequence[float],
    scale: Sequence[float] | float,
    rot: float,
    output_wh: Sequence[float],
    shift: Sequence[float] = (0.0, 0.0),
    inv: bool = False,
) -> np.ndarray:
    """2x3 matrix mapping the box (``center``, ``scale`` x 200 px) onto an output of ``output_wh`` = (W, H)."""
    if np.ndim(scale) == 0:
        scale = [scale, scale]
    center = np.asarray(center, dtype=np.float64)
    scale_px = np.asarray(scale, dtype=np.float64) * PIXEL_STD
    shift = np.asarray(shift, dtype=np.float32)
    dst_w, dst_h = output_wh[0], output_wh[1]

    rot_rad = np.pi * rot / 180
    src_dir = _rotate([0, scale_px[0] * -0.5], rot_rad)
    dst_dir = np.array([0, dst_w * -0.5], np.float32)

    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0, :] = center + scale_px * shift
    src[1, :] = center + src_dir + scale_px * shift
    dst[0, :] = [dst_w * 0.5, dst_h * 0.5]
    dst[1, :] = np.array([dst_w * 0.5, dst_h * 0.5]) + dst_dir
    src[2:, :] = _third_point(src[0, :], src[1, :])
    dst[2:, :] = _third_point(dst[0, :], dst[1, :])

    if inv:
        return cv2.getAffineTransform(np.float32(dst), np.float32(src))
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direct = a - b
    return b + np.array([-direct[1], direct[0]], dtype=np.float32)


def _rotate(point: Sequence[float], rot_rad: float) -> list[float]:
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    return [point[0] * cs - point[1] * sn, point[0] * sn + point[1] * cs]


def affine_transform(pt: Sequence[float], t: np.ndarray) -> np.ndarray:
    """Apply the 2x3 matrix ``t`` to one point."""
    return np.dot(t, np.array([pt[0], pt[1], 1.0]))[:2]


def transform_preds(
    coords: np.ndarray, center: Sequence[float], scale: Sequence[float], output_wh: Sequence[float]
) -> np.ndarray:
    """Map (J, 2) points from an ``output_wh`` crop (input or heatmap) back to image pixels (float64)."""
    t = get_affine_transform(center, scale, 0, output_wh, inv=True)
    x, y = coords[:, 0].astype(np.float64), coords[:, 1].astype(np.float64)
    # Written out (not a matmul) so the sums run in the same order as the official np.dot per point.
    return np.stack([t[0, 0] * x + t[0, 1] * y + t[0, 2], t[1, 0] * x + t[1, 1] * y + t[1, 2]], axis=1)


