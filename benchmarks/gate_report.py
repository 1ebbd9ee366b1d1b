"""The gate's report folder (report.md, report.json, disagreements.png) and its terminal summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from posequant.calibration import crop_person, read_image
from posequant.core.errors import DataError, PosequantError
from posequant.core.fileio import check_outputs, output_dir, write_bytes_atomic
from posequant.core.metadata import ModelMeta
from posequant.core.table import format_table

from .drawing import (  # noqa: F401  (BAND, LEGEND, TRUTH_BGR: the picture's style, named here too)
    BAND,
    FLOAT_BGR,
    INT8_BGR,
    LEGEND,
    TRUTH_BGR,
    draw_skeleton,
    legend_band,
    text_band,
)
from .drawing import label as _label
from .metrics import agreement_line

PANEL_HEIGHT = 256

REPORT_FILES = ("report.md", "report.json", "disagreements.png")


def prepare_report_dir(path: str | Path, inputs: dict[str, str | Path | None] | None = None) -> Path:
    """Check the report folder now, so a bad path fails before minutes of evaluation; it is created
    only when the report is written (a failed gate leaves no empty folder behind)."""
    check_outputs({"--report/": (path, REPORT_FILES)}, inputs or {})
    return Path(path)


# ---- terminal ----------------------------------------------------------------------------------


def _check_rows(result) -> list[list[str]]:
    rows = []
    for c in result.checks:
        if c.kind == "speedup":
            vals = [f"{v:.2f} ms" if v is not None else "-" for v in (c.float_value, c.int8_value)]
            change = f"{c.value:.2f}x" if c.value is not None else "-"
            budget = f">= {c.limit:g}x"
        elif c.kind == "agreement":
            vals, change, budget = ["1", f"{c.int8_value:.3f}"], f"{c.value - 1:+.3f}", f">= {c.limit:g}"
        else:
            vals = [f"{c.float_value:.2f}", f"{c.int8_value:.2f}"]
            change, budget = f"{-c.value:+.2f}", f"drop <= {c.limit:g}"
        rows.append([c.name, *vals, change, budget, "pass" if c.passed else "FAIL"])
    return rows


CHECK_HEADERS = ["check", "float", "INT8", "change", "budget", "result"]


def cpu_lines(result) -> list[str]:
    """This CPU's kind and the one the INT8 graph was made for; the note when they differ in a way that matters."""
    c = result.cpu or {}
    if not c:
        return []
    source = f" ({c['source']})" if c.get("source") else ""
    lines = [f"cpu: this machine is {c['here']}{source}; the INT8 graph was made for "
             f"{c.get('made_for') or 'an unknown kind'}"]
    if c.get("note"):
        lines.append(f"note: {c['note']}")
    return lines


def boxes_lines(result) -> list[str]:
    """Which detection boxes the extra AP check used (none without --boxes / --detector)."""
    b = getattr(result, "boxes", None)
    if not b:
        return []
    how = (f"{b['layout']} detector, {b['precision']}, score >= {b['det_score']:g}, NMS IoU {b['det_iou']:g}"
           if b["source"] == "detector" else "detection results")
    return [f"boxes: {b['boxes']} person boxes on {b['images']} images from {Path(b['path']).name} ({how}); "
            f"{b['kept_after_oks_nms']} kept by OKS-NMS ({b['oks_thre']:g}) for the float model"]


def agreement_lines(result) -> list[str]:
    """The INT8 keypoints against the float ones on the same people, whether or not it is a check."""
    a = getattr(result, "agreement", None)
    if not a:
        return []
    return [agreement_line(a)]


def _other_warnings(result) -> list[str]:
    note = (result.cpu or {}).get("note") or ""
    return [w for w in result.latency.warnings if not (note and note.startswith(w))]  # bench's copy of the note


def format_gate(result) -> str:
    head = (f"gate: {'PASS' if result.passed else 'FAIL'}  ({result.dataset}, {result.people} people, flip "
            f"{'on' if result.flip else 'off'}; {result.backend} on {result.device})")
    lines = [head, format_table(CHECK_HEADERS, _check_rows(result))]
    lines += [f"  failed: {r}" for r in result.reasons]
    lines += [f"  {line}" for line in agreement_lines(result) + boxes_lines(result) + cpu_lines(result)]
    if result.latency:
        lines += [f"  warning: {w}" for w in _other_warnings(result)]
    if result.report_files:
        lines.append(f"report: {result.report_files[0]}")
    return "\n".join(lines)


# ---- report.md ---------------------------------------------------------------------------------


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _delta_rows(table: dict[str, dict[str, float]]) -> list[list[str]]:
    return [[k, f"{d['float']:.2f}", f"{d['int8']:.2f}", f"{d['delta']:+.2f}"]
            + ([d["joints"]] if "joints" in d else []) for k, d in table.items()]


def format_markdown(result, png: str | None) -> str:
    verdict = "PASS" if result.passed else "FAIL"
    md = [f"# INT8 gate: {verdict}", "",
          f"- float model: `{result.float_model}`", f"- INT8 model: `{result.int8_model}`",
          f"- data: `{result.data}` ({result.dataset}, {result.people} people, flip test "
          f"{'on' if result.flip else 'off'}); evaluated and timed on {result.backend} ({result.device})", ""]
    if result.reasons:
        md += ["Failed:", ""] + [f"- {r}" for r in result.reasons] + [""]
    notes = agreement_lines(result) + boxes_lines(result) + cpu_lines(result)
    md += [f"- {line}" for line in notes] + ([""] if notes else [])
    md += ["## Checks", "", _md_table(CHECK_HEADERS, _check_rows(result)), "",
           "Changes are INT8 minus float, in points (COCO AP x 100, PCK/PCKh in percent).", "",
           "## Metrics", "", _md_table(["metric", "float", "INT8", "change"], _delta_rows(result.scores)), "",
           "## Per-joint deltas", "", *joint_sections(result)]
    if result.latency:
        md += ["", "## Latency", "", _latency_markdown(result.latency)]
    md += ["", "## Where the models disagree most", ""]
    if png:
        md += [f"![float (left) and INT8 (right) skeletons]({png})", ""]
    md.append("Skeletons over the labelled joints; white crosses are the ground truth.\n")
    md.append(_md_table(["#", "image", "person", "mean distance of labelled joints (% of person size)"],
                        [[i + 1, f"`{Path(p['image']).name}`", _who(p.get("person"), p.get("ann_id")),
                          f"{100 * p['disagreement']:.2f}"] for i, p in enumerate(result.disagreements)]))
    return "\n".join(md) + "\n"


def joint_sections(result) -> list[str]:
    """Markdown lines after "Per-joint deltas": each joint group once (its numbers are a check above), then
    the joints one by one where the dataset scores them (COCO's PCK@0.2; MPII's PCKh columns are the groups)."""
    lines = ["Each joint group's float and INT8 scores are in the checks above."]
    pooled = {g: d["joints"] for g, d in result.groups.items() if "joints" in d}
    if pooled:  # COCO: how many labelled joints each group pools (one joint is 100 / n points)
        lines += ["", _md_table(["joint group", "labelled joints pooled", "one joint (points)"],
                                [[g, n, f"{100 / n:.2f}" if n else "-"] for g, n in pooled.items()])]
    if result.joints:
        lines += ["", _md_table(["joint", "float", "INT8", "change"], _delta_rows(result.joints))]
    else:
        lines += ["", "MPII's PCKh is reported per joint pair (left and right together; Head is the head "
                      "top), as the official table does: there are no finer per-joint numbers."]
    return lines


def _who(index, ann_id) -> str:
    if index is None:
        return "-"
    return f"{index}" + (f" (annotation {ann_id})" if ann_id is not None else "")


def _latency_markdown(latency) -> str:
    rows = [[Path(r.model).name, r.backend, r.precision, r.batch, f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}",
             f"{r.p99_ms:.2f}", f"{r.throughput:.1f}", "-" if r.speedup is None else f"{r.speedup:.2f}x"]
            for r in latency.rows]
    m = latency.machine
    flags = ", ".join(k for k, v in m["cpu_flags"].items() if v) or "none"
    lines = [_md_table(["model", "backend", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s",
                        "vs ORT fp32"], rows), "",
             f"{latency.settings['runs']} interleaved rounds; {m['cpu']} (flags: {flags}), {m['threads']} threads"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + "; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items())]
    lines += [f"- skipped {s['backend']}: {s['reason']}" for s in latency.skipped]
    lines += [f"- warning: {w}" for w in latency.warnings]
    return "\n".join(lines)


# ---- disagreements.png -------------------------------------------------------------------------


def row_label(rank: int, person, score: float) -> str:
    """Which person a row shows: rank, image file, record index (COCO: annotation id), drift."""
    who = _who(person.index, person.ann_id)
    return f"#{rank} {Path(person.image).name}, person {who}: drift {100 * score:.2f}% of person size"


def _to_crop(points: np.ndarray, trans: np.ndarray) -> np.ndarray:
    return np.round(np.c_[points, np.ones(len(points))] @ trans.T).astype(int)  # image pixels -> crop pixels


def _panel(crop: np.ndarray, trans: np.ndarray, joints: np.ndarray, person, skeleton, color, text: str) -> np.ndarray:
    """The predicted skeleton over the labelled joints, with the ground truth as white crosses."""
    img = crop.copy()
    show = person.labelled(len(joints))
    draw_skeleton(img, _to_crop(joints, trans), skeleton, color, show=show)
    if person.joints is not None:
        for p in _to_crop(np.asarray(person.joints), trans)[show]:
            cv2.drawMarker(img, tuple(p), (255, 255, 255), cv2.MARKER_CROSS, 7, 1, cv2.LINE_AA)
    _label(img, text, color)
    return img


def draw_disagreements(meta: ModelMeta, people, float_preds: np.ndarray, int8_preds: np.ndarray,
                       scores: Sequence[float]) -> np.ndarray | None:
    """One row per person: the float skeleton (left) and the INT8 one (right) on the same crop.

    A legend on top says which colour is which; each row is headed by :func:`row_label` (image, person,
    drift). Only labelled joints are drawn (elsewhere both models guess); white crosses are the ground truth.
    """
    h = PANEL_HEIGHT
    w = int(round(h * meta.input_size[1] / meta.input_size[0]))
    rows = []
    for rank, (person, fp, qp, score) in enumerate(zip(people, float_preds, int8_preds, scores), 1):
        try:
            image = read_image(person.image)
        except DataError:
            continue
        crop, trans = crop_person(image, person.center, person.scale, (h, w))
        gap = np.full((h, 6, 3), 255, np.uint8)
        panels = np.hstack([_panel(crop, trans, fp, person, meta.skeleton, FLOAT_BGR, "float"), gap,
                            _panel(crop, trans, qp, person, meta.skeleton, INT8_BGR, f"INT8 {100 * score:.1f}%")])
        rows.append(np.vstack([text_band(panels.shape[1], row_label(rank, person, score)), panels]))
    if not rows:
        return None
    sep = np.full((6, rows[0].shape[1], 3), 255, np.uint8)
    return np.vstack([legend_band(rows[0].shape[1]), sep, *[x for r in rows for x in (r, sep)][:-1]])


# ---- the folder --------------------------------------------------------------------------------


def write_report(result, folder: Path, meta: ModelMeta, people) -> list[str]:
    """Write disagreements.png (when the images can be read), report.md and report.json; their paths.

    All three or none: a write that fails (a full disk, SIGTERM) removes what this call wrote, and the folder
    when it made it."""
    idx = [p["index"] for p in result.disagreements]
    picture = draw_disagreements(meta, people, result.float_eval.preds[idx], result.int8_eval.preds[idx],
                                 [p["disagreement"] for p in result.disagreements])
    contents: dict[str, bytes] = {}
    if picture is not None:
        ok, buf = cv2.imencode(".png", picture)
        if ok:
            contents["disagreements.png"] = buf.tobytes()
    png = "disagreements.png" if contents else None
    result.report_files = [str(folder / n) for n in ("report.md", "report.json", *contents)]
    contents["report.md"] = format_markdown(result, png).encode("utf-8")
    contents["report.json"] = (json.dumps(result.to_dict(), indent=2, default=str) + "\n").encode("utf-8")
    written: list[Path] = []
    with output_dir(folder, "--report"):
        try:
            for name, data in contents.items():
                write_bytes_atomic(folder / name, data, "--report")
                written.append(folder / name)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
    return result.report_files


# ---- GitHub Actions --------------------------------------------------------------------------------


def step_summary_markdown(result) -> str:
    """report.md as a job summary: the same Markdown, the picture named (a summary cannot show a file)."""
    md = format_markdown(result, None)
    if result.report_files:
        md += f"\nThe full report, with disagreements.png, is in `{Path(result.report_files[0]).parent}`.\n"
    return md


def _summary_error(path: Path, why: str) -> PosequantError:
    return PosequantError(f"cannot append the gate summary to $GITHUB_STEP_SUMMARY {path} ({why}): "
                          "unset the variable or point it to a writable file")


def check_step_summary(environ=None) -> Path | None:
    """The file ``$GITHUB_STEP_SUMMARY`` names (None when unset or empty), refused now if it cannot be
    appended to, so a bad path fails before minutes of evaluation rather than after the verdict."""
    name = (os.environ if environ is None else environ).get("GITHUB_STEP_SUMMARY")
    if not name:
        return None
    path = Path(name)
    if path.is_dir():
        raise _summary_error(path, "a directory")
    if not path.parent.is_dir():
        raise _summary_error(path, f"its folder {path.parent} does not exist")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise _summary_error(path, "permission denied")
    return path


def append_step_summary(result, environ=None) -> Path | None:
    """Append the gate's Markdown to the file ``$GITHUB_STEP_SUMMARY`` names (GitHub shows it on the run's
    page; other steps append there too, so never overwrite); nothing when the variable is unset or empty."""
    path = check_step_summary(environ)
    if path is None:
        return None
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(step_summary_markdown(result) + "\n")
    except OSError as e:
        raise _summary_error(path, e.strerror or str(e)) from None
    return path
