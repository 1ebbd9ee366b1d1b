"""``gate``: is an INT8 model good enough to ship in place of its float original?

Both models are evaluated on the same people with the same pipeline and timed in one interleaved
benchmark. The INT8 model passes when its main metric (COCO AP, MPII PCKh@0.5) drops by at most
``max_drop`` points, each joint group (head, shoulders, ..., ankles) by at most ``max_joint_drop``
points, and it is at least ``min_speedup`` times faster on the chosen backend. The result is an
object; only the CLI turns it into an exit code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from posequant.calibration import open_dataset
from posequant.core.args import Runtime, Whole, checked
from posequant.core.cpu import cpu_kind, kind_source
from posequant.core.errors import PosequantError
from posequant.core.metadata import ModelMeta
from posequant.core.opened import ModelFile, open_model
from posequant.core.numbers import check_number

from .detect import DEFAULT_IOU, EVAL_SCORE
from .evaluate import EvalResult, ModelOutputError, evaluate, person_boxes
from .gate_report import prepare_report_dir, write_report
from .latency import BenchResult, bench, check_backend, onnx_precision
from .metrics import FLOAT_FLOOR, agreement_of, box_size, main_metric, pck
from .runners import model_format, resolve_backend

# COCO joints pooled into the groups MPII's PCKh table reports, so both read alike.
COCO_GROUPS = {
    "Head": ("nose", "left_eye", "right_eye", "left_ear", "right_ear"),
    "Shoulder": ("left_shoulder", "right_shoulder"),
    "Elbow": ("left_elbow", "right_elbow"),
    "Wrist": ("left_wrist", "right_wrist"),
    "Hip": ("left_hip", "right_hip"),
    "Knee": ("left_knee", "right_knee"),
    "Ankle": ("left_ankle", "right_ankle"),
}
MPII_GROUPS = ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle")
# Metadata the two models must share (besides input size and keypoints, which are always required):
# the float checkpoint they were made from, and how their inputs are prepared and outputs decoded.
SAME_SOURCE_FIELDS = ("source_sha256", "color", "mean", "std", "flip_pairs", "head", "heatmap_size",
                      "simcc_split_ratio")
DETECTOR_AP = "AP on detector boxes"  # the extra check with --boxes / --detector


class GateInputError(PosequantError):
    """The two models cannot be compared (wrong kind, different inputs or keypoints)."""


class UnscorableError(PosequantError):
    """The data or the float model cannot be scored (no people, NaN or -1 metrics, float near zero)."""


class BrokenInt8Error(PosequantError):
    """The INT8 model's output cannot even be scored (NaN/inf heatmaps): the gate fails."""

    exit_code = 1


@dataclass
class Check:
    name: str
    value: float | None  # drop in points (float - INT8), or the speedup
    limit: float
    passed: bool
    kind: str  # "drop" (value <= limit); "speedup" or "agreement" (value >= limit)
    float_value: float | None = None  # the metric in points, or the median latency in ms
    int8_value: float | None = None

    def describe(self) -> str:
        if self.value is None:
            return f"{self.name}: not measured"
        if self.kind == "speedup":
            return f"{self.name} {self.value:.2f}x (needs >= {self.limit:g}x)"
        if self.kind == "agreement":
            return f"{self.name} {self.value:.3f} (needs >= {self.limit:g})"
        return f"{self.name} dropped {self.value:.2f} points (budget {self.limit:g})"


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]  # one line per failed check; empty when passed
    checks: list[Check]
    float_model: str
    int8_model: str
    data: str
    dataset: str  # e.g. "COCO val"
    people: int
    backend: str
    device: str
    flip: bool
    main_metric: str  # "AP" (x100) or "PCKh@0.5"
    scores: dict[str, dict[str, float]]  # metric -> {"float", "int8", "delta"} in points; delta = INT8 - float
    groups: dict[str, dict[str, float]]  # per joint group (checked): COCO PCK@0.2, MPII PCKh@0.5; same layout
    joints: dict[str, dict[str, float]]  # per joint, COCO PCK@0.2; empty for MPII (its PCKh groups are the pairs)
    speedup: float | None
    latency: BenchResult | None
    float_eval: EvalResult = field(repr=False)
    int8_eval: EvalResult = field(repr=False)
    disagreements: list[dict[str, Any]] = field(default_factory=list)  # people where the two differ most
    report_files: list[str] = field(default_factory=list)
    cpu: dict[str, Any] = field(default_factory=dict)  # this CPU's kind, what the INT8 graph was made for, notes
    boxes: dict[str, Any] | None = None  # with --boxes/--detector: the detection boxes both were scored on too
    agreement: dict[str, float] | None = None  # INT8 keypoints against float's, on the same people

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "reasons": self.reasons,
            "checks": [vars(c) for c in self.checks],
            "float_model": self.float_model, "int8_model": self.int8_model, "data": self.data,
            "dataset": self.dataset, "people": self.people, "backend": self.backend, "device": self.device,
            "flip": self.flip, "main_metric": self.main_metric, "scores": self.scores, "groups": self.groups,
            "joints": self.joints,
            "speedup": self.speedup,
            "float_metrics": self.float_eval.metrics, "int8_metrics": self.int8_eval.metrics,
            "latency": self.latency.to_dict() if self.latency else None,
            "disagreements": self.disagreements, "report_files": self.report_files, "cpu": self.cpu,
            "boxes": self.boxes, "agreement": self.agreement,
        }


# ---- input checks ------------------------------------------------------------------------------


def _check_models(float_model: Path, int8_model: Path, allow_different_source: bool = False
                  ) -> tuple[ModelFile, ModelFile]:
    for opt, path in (("--float", float_model), ("--int8", int8_model)):
        if not path.exists():
            raise GateInputError(f"{opt} {path} not found: check the path")
        if path.suffix.lower() != ".onnx" and model_format(path) == "onnx":
            raise GateInputError(f"{opt} {path} is not an .onnx file (or an OpenVINO .xml / TensorRT .engine): "
                                 "export checkpoints with `posequant export-pose` first")
    # read (and checked against their graphs) first: a damaged file is named before anything else is said of it
    fopened, qopened = open_model(float_model), open_model(int8_model)
    fmeta, qmeta = fopened.meta, qopened.meta
    if onnx_precision(float_model) == "int8":
        raise GateInputError(f"--float {float_model} is an INT8 model (it has quantization nodes): give the "
                             "float export as --float and the quantized model as --int8")
    if onnx_precision(int8_model) != "int8":
        raise GateInputError(f"--int8 {int8_model} has no quantization nodes (QuantizeLinear/DequantizeLinear): "
                             "it is a float model; give the quantized model as --int8")
    if fmeta.input_size != qmeta.input_size:
        raise GateInputError(f"the models take different input sizes ({_hw(fmeta)} float, {_hw(qmeta)} INT8): "
                             "quantize the same float export you gate against")
    if (fmeta.keypoints, fmeta.joint_names) != (qmeta.keypoints, qmeta.joint_names):
        raise GateInputError(f"the models predict different keypoint sets ({fmeta.keypoints}, {fmeta.num_joints} "
                             f"joints float; {qmeta.keypoints}, {qmeta.num_joints} INT8): gate a model against "
                             "its own quantized version")
    differing = different_source(fmeta, qmeta)
    if differing and not allow_different_source:
        raise GateInputError(f"the models differ in {', '.join(differing)} (metadata of {float_model.name} and "
                             f"{int8_model.name}): the INT8 model was not made from this float model, or is "
                             "prepared differently; quantize this float export, or pass --allow-different-source "
                             "if that is intended")
    return fopened, qopened


def different_source(a: ModelMeta, b: ModelMeta) -> list[str]:
    """Which of :data:`SAME_SOURCE_FIELDS` differ between two models' metadata (mean/std to 1e-6)."""
    out = []
    for name in SAME_SOURCE_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if name in ("mean", "std"):
            same = len(x) == len(y) and np.allclose(x, y, rtol=0, atol=1e-6)
        else:
            same = x == y
        if not same:
            out.append(f"{name} ({_short(x)} float, {_short(y)} INT8)")
    return out


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else str(list(value) if isinstance(value, tuple) else value)
    return (text[:12] + "...") if len(text) > 15 else (text or "none")


def _hw(meta: ModelMeta) -> str:
    return f"{meta.input_size[0]}x{meta.input_size[1]}"


# ---- scores ------------------------------------------------------------------------------------


def _delta(f: float, q: float) -> dict[str, float]:
    return {"float": f, "int8": q, "delta": q - f}


def _coco_groups(meta: ModelMeta, people, preds: np.ndarray) -> dict[str, tuple[float, int]]:
    """PCK@0.2 of each joint group, pooled over its labelled joints, and how many joints that is."""
    gt = np.stack([p.joints for p in people])
    vis = np.stack([p.joints_vis for p in people])
    norm = box_size(np.stack([p.bbox for p in people]))
    index = {n: i for i, n in enumerate(meta.joint_names)}
    out = {}
    for group, names in COCO_GROUPS.items():
        idx = [index[n] for n in names if n in index]
        if idx:
            value = pck(preds[:, idx], gt[:, idx], vis[:, idx], norm, threshold=0.2,
                        joint_names=[meta.joint_names[i] for i in idx])["Mean"]
            out[group] = (value, int(((vis[:, idx] > 0) & (norm > 0)[:, None]).sum()))
    return out


def _scores(meta: ModelMeta, fmt: str, people, fe: EvalResult, qe: EvalResult):
    """(main metric name, {metric: delta}, {group: delta}, {joint: delta}), all in points."""
    if not fe.metrics or not qe.metrics:
        raise GateInputError("no metrics: MPII PCKh needs every annotated person, so drop --limit")
    if fmt == "mpii":
        f, q = fe.metrics["PCKh@0.5"], qe.metrics["PCKh@0.5"]
        main = "PCKh@0.5"
        scores = {main: _delta(f["Mean"], q["Mean"]),
                  "PCKh@0.1": _delta(fe.metrics["PCKh@0.1"]["Mean"], qe.metrics["PCKh@0.1"]["Mean"])}
        groups = {g: _delta(f[g], q[g]) for g in MPII_GROUPS if g in f}
        # MPII's official PCKh table is per group (a left/right pair; Head is the head top):
        # no finer per-joint numbers to add, so the groups are not repeated as "joints"
        return main, scores, groups, {}
    main = "AP"
    scores = {k: _delta(100 * fe.metrics[k], 100 * qe.metrics[k]) for k in ("AP", "AP50", "AP75", "AR")}
    fp, qp = fe.metrics["PCK@0.2"], qe.metrics["PCK@0.2"]
    scores["PCK@0.2"] = _delta(fp["Mean"], qp["Mean"])
    fg, qg = _coco_groups(meta, people, fe.preds), _coco_groups(meta, people, qe.preds)
    # "joints": how many labelled joints the group pools (one joint is 100 / joints points)
    groups = {g: {**_delta(fg[g][0], qg[g][0]), "joints": fg[g][1]} for g in fg}
    joints = {j: _delta(fp[j], qp[j]) for j in meta.joint_names if j in fp}
    return main, scores, groups, joints


def _drop_check(name: str, d: dict[str, float], budget: float) -> Check:
    drop = -d["delta"]
    return Check(name, drop, budget, bool(np.isfinite(drop) and drop <= budget), "drop", d["float"], d["int8"])


def check_scorable(main: str, scores: dict[str, dict[str, float]], people: int, dataset: str) -> None:
    """Refuse to judge what cannot be scored: no people, a NaN main metric, or a float model near zero."""
    if people < 1:
        raise UnscorableError(f"no people of {dataset} were scored: check the dataset")
    f, q = scores[main]["float"], scores[main]["int8"]
    unit = "AP x 100" if main == "AP" else main
    if not (np.isfinite(f) and np.isfinite(q)):
        raise UnscorableError(f"{unit} on {dataset} is not a number (float {f}, INT8 {q}): the data cannot be "
                              "scored; check its annotations")
    if f < FLOAT_FLOOR:
        raise UnscorableError(f"the float model scores {unit} {f:.2f} on {dataset} (below {FLOAT_FLOOR:g}): it is "
                              "not being scored at all, so no drop can be judged; check the model's preprocessing "
                              "(colour, mean/std, input size) and joint order against the data")


def disagreement(people, float_preds: np.ndarray, int8_preds: np.ndarray) -> np.ndarray:
    """Per person: mean distance between the two models' labelled joints, as a fraction of the person's size.

    Unlabelled joints (occluded, out of the picture) are left out: both models guess there.
    """
    size = np.array([max(p.scale) * 200.0 for p in people])
    dist = np.linalg.norm(float_preds - int8_preds, axis=2)
    mask = np.stack([p.labelled(dist.shape[1]) for p in people])
    mean = (dist * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)
    return mean / np.maximum(size, 1e-6)


def _cpu_facts(int8_model: ModelFile, backend: str, device: str, common: dict, *, qe: EvalResult, say
               ) -> dict[str, Any]:
    """This CPU's kind, the one the INT8 graph was made for, and a note when they differ in a way that
    matters; when this CPU may saturate a graph not made for it, what that costs, measured: the INT8 model
    evaluated again with its exact semantics (ONNX Runtime, optimizations off)."""
    import onnx

    from posequant.calibration.saturation import cpu_mismatch, quantization_settings

    here = cpu_kind()
    if int8_model.format != "onnx":  # an IR / engine: the exact-semantics re-run needs the ONNX graph
        return {"here": here.name, "source": kind_source(), "made_for": _quantization_of(int8_model.path).get("cpu"),
                "note": None}
    proto = onnx.load(str(int8_model.path), load_external_data=False)
    settings = quantization_settings(proto)
    facts: dict[str, Any] = {"here": here.name, "source": kind_source(), "made_for": settings.get("cpu"), "note": None}
    if device != "cpu" or backend not in ("ort", "openvino"):
        return facts
    facts["note"] = cpu_mismatch(proto, int8_model.path.name, here, backend)
    if facts["note"] and here.saturates_on(backend):
        say("measuring what saturation costs here: the INT8 model again, with exact int8 semantics")
        exact = evaluate(int8_model, qe.dataset, **{**common, "backend": "ort-reference"}, warn=lambda m: None)
        cost = main_metric(exact.metrics)[1] - main_metric(qe.metrics)[1]
        facts["saturation_cost_points"] = cost
        facts["note"] += f"; measured here: {cost:+.2f} points of the main metric lost to saturation"
    return facts


def _quantization_of(path: Path) -> dict:
    """The quantization settings an IR or engine carries over from its ONNX file ({} if none)."""
    import json

    from posequant.core.enginefile import engine_info
    from posequant.core.irfile import ir_props, load_ir

    props = ir_props(load_ir(path)) if model_format(path) == "ir" else engine_info(path)["props"]
    try:
        value = json.loads(props.get("quantization", "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# ---- the gate ----------------------------------------------------------------------------------


@checked(limit=Whole(1, optional=True), batch=Whole(1), threads=Whole(1, optional=True), warmup=Whole(0), runs=Whole(1),
         worst=Whole(0), backend=Runtime(), device=Runtime())
def gate(
    float_model: str | Path,
    int8_model: str | Path,
    data: str | Path,
    *,
    max_drop: float = 0.5,
    max_joint_drop: float = 2.0,
    min_speedup: float = 1.5,
    min_agreement: float | None = None,
    device: str = "cpu",
    backend: str | None = None,
    flip: bool = True,
    split: str | None = None,
    limit: int | None = None,
    batch: int = 8,
    threads: int | None = None,
    warmup: int = 5,
    runs: int = 30,
    report_dir: str | Path | None = None,
    worst: int = 6,
    allow_different_source: bool = False,
    boxes: str | Path | None = None,
    detector: str | Path | None = None,
    det_score: float = EVAL_SCORE,
    det_iou: float = DEFAULT_IOU,
    progress: Callable[[str], None] | None = None,
) -> GateResult:
    """Evaluate and time ``int8_model`` against ``float_model`` on ``data`` (MPII or COCO).

    Drops are in points: COCO AP x 100, MPII PCKh@0.5, and per joint group PCK@0.2 (COCO) or
    PCKh@0.5 (MPII). The agreement of the INT8 keypoints with the float ones on the same people (OKS with
    the float model as ground truth, ``metrics.keypoint_agreement``) is always measured; with
    ``min_agreement`` it is a check too: on a few dozen people it is far steadier than AP. The speedup is the float model's median batch-1 latency (a fixed-batch model's: at
    its own batch) over the INT8 model's, both on ``backend`` (float at fp32; fp16 on TensorRT). Bad
    input raises :class:`PosequantError`.
    The two models must come from the same source checkpoint and share their preprocessing
    (:data:`SAME_SOURCE_FIELDS`) unless ``allow_different_source``. Data that cannot be scored (no
    people, NaN or -1 metrics, the float model below :data:`FLOAT_FLOOR`) raises :class:`UnscorableError`.

    With ``boxes`` (COCO detection results) or ``detector`` (run once, on ``backend``), both models are also
    evaluated on those person boxes (``evaluate``'s HRNet path) and their AP there is one more check, within
    ``max_drop``: what INT8 costs end to end. The ground-truth-box checks stay as they are.
    """
    say = progress or (lambda msg: None)
    # negative drop budgets demand that INT8 beat float (stricter, never a silent pass)
    max_drop = check_number("max_drop", max_drop, minimum=None)
    max_joint_drop = check_number("max_joint_drop", max_joint_drop, minimum=None)
    min_speedup = check_number("min_speedup", min_speedup)
    if min_agreement is not None:
        min_agreement = check_number("min_agreement", min_agreement, maximum=1.0)
    float_model, int8_model, data = Path(float_model), Path(int8_model), Path(data)
    fopened, qopened = _check_models(float_model, int8_model, allow_different_source)  # each file opened once
    fmeta = fopened.meta
    # None: ort, or the one backend both an IR (openvino) or engine (tensorrt) pair runs on
    for path in sorted((float_model, int8_model), key=lambda p: model_format(p) == "onnx"):  # an IR/engine first
        backend = resolve_backend(path, backend)
    check_backend(backend, device, engines=model_format(float_model) == model_format(int8_model) == "engine")
    if report_dir is not None:
        report_dir = prepare_report_dir(report_dir, {"--float": float_model, "--int8": int8_model, "--data": data})

    common = dict(split=split, flip=flip, backend=backend, device=device, batch=batch, limit=limit, threads=threads)
    found = None
    if boxes is not None or detector is not None:  # checked and found before minutes of evaluation
        if limit:
            raise GateInputError("--limit counts ground-truth people; with --boxes or --detector gate the whole split")
        say("finding the person boxes" + (f" with {Path(detector).name}" if detector else f" in {Path(boxes).name}"))
        ds = open_dataset(data, input_size=fmeta.input_size, split=split)
        found = person_boxes(ds, boxes=boxes, detector=detector, det_score=det_score, det_iou=det_iou,
                             backend=backend, device=device)
    say(f"evaluating the float model {float_model.name}")
    fe = evaluate(fopened, data, progress=say, **common, warn=lambda m: say(f"warning: {m}"))
    name, value = main_metric(fe.metrics)  # a float model scoring ~0 fails here, before the INT8 run
    check_scorable(name, {name: _delta(value, value)}, fe.people, f"{fe.format.upper()} {fe.split}")
    say(f"evaluating the INT8 model {int8_model.name}")
    try:
        qe = evaluate(qopened, data, progress=say, **common, warn=lambda m: None)  # the same records: said once
    except ModelOutputError as e:
        raise BrokenInt8Error(f"gate FAIL: {e}") from None
    cpu = _cpu_facts(qopened, backend, device, common, qe=qe, say=say)
    ds = open_dataset(data, input_size=fmeta.input_size, format=fe.format, split=fe.split)
    people = ds.people[:limit] if limit else ds.people
    assert len(people) == fe.people == qe.people, "both evaluations must cover the same people"
    main, scores, groups, joints = _scores(fmeta, fe.format, people, fe, qe)
    check_scorable(main, scores, fe.people, f"{fe.format.upper()} {fe.split}")
    box_info = None
    if found is not None:
        say(f"evaluating both models on the {found.count} person boxes")
        on_boxes = {**common, "limit": None, "boxes": found}
        fd = evaluate(fopened, data, **on_boxes, warn=lambda m: None)
        try:
            qd = evaluate(qopened, data, **on_boxes, warn=lambda m: None)
        except ModelOutputError as e:
            raise BrokenInt8Error(f"gate FAIL: {e}") from None
        scores[DETECTOR_AP] = _delta(100 * fd.metrics["AP"], 100 * qd.metrics["AP"])
        box_info = fd.boxes

    say(f"timing both on {backend} ({device})")
    timed = fopened.batch or 1  # a fixed-batch model runs only at its own batch
    latency = bench([float_model, int8_model], device=device, backends=[backend], batches=(timed,), threads=threads,
                    warmup=warmup, runs=runs)
    frow = latency.row(float_model, backend, "fp32", timed) or latency.row(float_model, backend, "fp16", timed)
    qrow = latency.row(int8_model, backend, "int8", timed)  # fp16 above: TensorRT
    speedup = frow.p50_ms / qrow.p50_ms if frow and qrow else None

    unit = f"{main} (x100)" if main == "AP" else main
    checks = [_drop_check(unit, scores[main], max_drop)]
    if DETECTOR_AP in scores:
        checks.append(_drop_check(f"{DETECTOR_AP} (x100)", scores[DETECTOR_AP], max_drop))
    checks += [_drop_check(f"joint group {g}", d, max_joint_drop) for g, d in groups.items() if np.isfinite(d["delta"])]
    agreement = agreement_of(fe, qe, fmeta.keypoints)
    if min_agreement is not None:
        checks.append(Check("agreement with float keypoints (OKS)", agreement["OKS"], min_agreement,
                            agreement["OKS"] >= min_agreement, "agreement", 1.0, agreement["OKS"]))
    checks.append(Check(f"speedup on {backend} ({device}, batch {timed})", speedup, min_speedup,
                        speedup is not None and speedup >= min_speedup, "speedup",
                        frow.p50_ms if frow else None, qrow.p50_ms if qrow else None))
    reasons = [c.describe() for c in checks if not c.passed]

    d = disagreement(people, fe.preds, qe.preds)
    order = np.argsort(-d, kind="stable")[:worst]
    worst_people = [{"index": int(i), "image": str(people[i].image), "person": people[i].index,
                     "ann_id": people[i].ann_id, "disagreement": float(d[i])} for i in order]
    result = GateResult(
        not reasons, reasons, checks, str(float_model), str(int8_model), str(data), f"{fe.format.upper()} {fe.split}",
        fe.people, backend, device, flip, main, scores, groups, joints, speedup, latency, fe, qe, worst_people,
        cpu=cpu, boxes=box_info, agreement=agreement)
    if report_dir is not None:
        say(f"writing the report to {report_dir}")
        result.report_files = write_report(result, report_dir, fmeta, [people[i] for i in order])
    return result
