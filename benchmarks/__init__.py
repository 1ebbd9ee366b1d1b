"""Benchmarks: metrics (pure functions of arrays) and saved-prediction files."""

from .metrics import (
    CocoKeypointAP,
    PCKhCurve,
    PCKhResult,
    box_size,
    check_predictions,
    coco_keypoint_ap,
    coco_results,
    mpii_pckh,
    oks,
    pck,
    pckh_curve,
)
from .predictions import eval_mpii_preds, load_mpii_preds, save_mpii_preds

__all__ = [
    "CocoKeypointAP",
    "PCKhCurve",
    "PCKhResult",
    "box_size",
    "check_predictions",
    "coco_keypoint_ap",
    "coco_results",
    "eval_mpii_preds",
    "load_mpii_preds",
    "mpii_pckh",
    "oks",
    "pck",
    "pckh_curve",
    "save_mpii_preds",
]
