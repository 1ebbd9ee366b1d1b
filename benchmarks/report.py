"""Human-readable tables for evaluation results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posequant.core.table import format_table

PCKH_COLUMNS = ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean")


def format_metrics(metrics: dict[str, Any]) -> str:
    if "PCKh@0.5" in metrics:
        rows = [[key] + [f"{metrics[key][c]:.2f}" for c in PCKH_COLUMNS] for key in ("PCKh@0.5", "PCKh@0.1")]
        return format_table(["", *PCKH_COLUMNS], rows)
    lines = [format_table(["AP", "AP50", "AP75", "AR"], [[f"{metrics[k]:.3f}" for k in ("AP", "AP50", "AP75", "AR")]])]
    pck = metrics.get("PCK@0.2")
    if pck:
        lines.append("PCK@0.2 (% of joints within 0.2 x box size)")
        lines.append(format_table(["joint", "PCK@0.2"], [[k, f"{v:.2f}"] for k, v in pck.items()]))
    return "\n".join(lines)


def _scored_on(result) -> str:
    """Who was scored: the ground truth's people, or detection boxes (which, and how many OKS-NMS kept)."""
    b = getattr(result, "boxes", None)
    if not b:
        return f"{result.people} people"
    source = (f"{b['layout']} detector {Path(b['detector']).name}, score >= {b['det_score']:g}, NMS IoU "
              f"{b['det_iou']:g}" if b["source"] == "detector" else Path(b["path"]).name)
    return f"{result.people} person boxes ({source}; {b['kept_after_oks_nms']} kept by OKS-NMS {b['oks_thre']:g})"


def format_eval(result) -> str:
    head = (f"{result.format.upper()} {result.split}: {_scored_on(result)}, backend {result.backend} "
            f"({result.device}), flip {'on' if result.flip else 'off'}, batch {result.batch}, "
            f"{result.people_per_s:.1f} people/s")
    if result.skipped:
        head += f", {len(result.skipped)} missing or unreadable image(s) skipped"
    if result.partial:
        scope = "their images" if result.format == "coco" else "their ground truth"
        head += f"\n(part of the split: scored on these {result.people} people and {scope} only)"
    return head + "\n" + format_metrics(result.metrics)
