"""Skeleton pictures, in one style for the gate's disagreements.png and ``predict``'s overlays.

Two models side by side: the first (float) in green, the second (INT8, or ``--compare``'s) in orange,
a legend strip on top saying which is which. A joint's dot is coloured by its score (red 0 -> green 1).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

FLOAT_BGR, INT8_BGR, TRUTH_BGR = (80, 200, 0), (0, 140, 255), (255, 255, 255)  # green, orange, white
LEGEND = (("float model", FLOAT_BGR, "line"), ("INT8 model", INT8_BGR, "line"), ("ground truth", TRUTH_BGR, "cross"))
BAND = 22  # px: the legend strip and each row's label
FONT = cv2.FONT_HERSHEY_SIMPLEX


def label(img: np.ndarray, text: str, color) -> None:
    """``text`` in ``color`` on a black box in the top-left corner of ``img`` (in place)."""
    (w, h), base = cv2.getTextSize(text, FONT, 0.45, 1)
    cv2.rectangle(img, (0, 0), (w + 8, h + base + 6), (0, 0, 0), -1)
    cv2.putText(img, text, (4, h + 3), FONT, 0.45, color, 1, cv2.LINE_AA)


def text_band(width: int, text: str, scale: float = 0.45) -> np.ndarray:
    """A dark strip BAND px high with ``text`` in white, shrunk until it fits."""
    band = np.full((BAND, width, 3), 40, np.uint8)
    while scale > 0.25 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > width - 8:
        scale -= 0.05
    cv2.putText(band, text, (4, BAND - 7), FONT, scale, TRUTH_BGR, 1, cv2.LINE_AA)
    return band


def legend_band(width: int, legend: Sequence[tuple[str, tuple, str]] = LEGEND) -> np.ndarray:
    """What the colours mean: a swatch (a line or a cross) and a name for each (name, colour, mark)."""
    band = np.full((BAND, width, 3), 40, np.uint8)
    x, mid = 6, BAND // 2
    for name, color, mark in legend:
        if mark == "line":
            cv2.line(band, (x, mid), (x + 16, mid), color, 3)
        else:
            cv2.drawMarker(band, (x + 8, mid), color, cv2.MARKER_CROSS, 9, 1)
        x += 22
        cv2.putText(band, name, (x, mid + 5), FONT, 0.4, TRUTH_BGR, 1, cv2.LINE_AA)
        x += cv2.getTextSize(name, FONT, 0.4, 1)[0][0] + 14
    return band


def score_bgr(score: float) -> tuple[int, int, int]:
    """A joint score as a colour: red at 0 (or below), yellow at 0.5, green at 1 (or above)."""
    s = float(np.clip(score, 0.0, 1.0)) if np.isfinite(score) else 0.0
    return (0, int(round(255 * min(1.0, 2 * s))), int(round(255 * min(1.0, 2 * (1 - s)))))


def draw_skeleton(img: np.ndarray, points: np.ndarray, skeleton, color, *, show: np.ndarray | None = None,
                  scores: np.ndarray | None = None, radius: int = 3) -> np.ndarray:
    """Bones in ``color`` between the ``show``n joints (all by default), in place; each joint a dot in
    ``color``, or, given ``scores``, in :func:`score_bgr` and larger for surer joints. Returns ``img``."""
    pts = np.round(np.asarray(points, dtype=np.float64)).astype(int)
    show = np.ones(len(pts), bool) if show is None else np.asarray(show, bool)
    width = max(1, radius // 2 + 1)
    for a, b in skeleton:
        if show[a] and show[b]:
            cv2.line(img, tuple(pts[a]), tuple(pts[b]), color, width, cv2.LINE_AA)
    for j in np.flatnonzero(show):
        dot, r = color, radius
        if scores is not None:
            s = float(np.ravel(scores)[j])
            dot, r = score_bgr(s), max(2, int(round(radius * (0.6 + 0.8 * float(np.clip(s, 0, 1))))))
        cv2.circle(img, tuple(pts[j]), r, dot, -1, cv2.LINE_AA)
        cv2.circle(img, tuple(pts[j]), r, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def draw_box(img: np.ndarray, bbox, color, text: str | None = None, thickness: int = 2) -> np.ndarray:
    """A person box (x, y, w, h) in ``color``, in place, with ``text`` (its score) on a dark tab at its top
    left; the text grows with ``thickness`` (pictures draw thicker lines on larger images)."""
    x, y, w, h = (float(v) for v in bbox)
    p1, p2 = (int(round(x)), int(round(y))), (int(round(x + w)), int(round(y + h)))
    cv2.rectangle(img, p1, p2, color, thickness, cv2.LINE_8)  # axis-aligned: crisp edges
    if text:
        scale, weight = max(0.45, thickness / 4), max(1, thickness // 3)
        (tw, th), base = cv2.getTextSize(text, FONT, scale, weight)
        x0, top = max(0, p1[0]), max(0, p1[1] - th - base - 4)
        cv2.rectangle(img, (x0, top), (x0 + tw + 6, top + th + base + 4), (40, 40, 40), -1)
        cv2.putText(img, text, (x0 + 3, top + th + 2), FONT, scale, color, weight, cv2.LINE_AA)
    return img
