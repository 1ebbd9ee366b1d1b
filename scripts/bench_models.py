"""INT8 across models: every trained model in ../shared, quantized four ways, judged on its task metric, on
its agreement with the float model, on quantize time and on INT8 speed. This is how a change to posequant's
quantization is judged (docs/quantize.md, "INT8 across models").

    .venv/bin/python scripts/bench_models.py [--shared ../shared] [--models ultralight,efficientpose,lightposnet]
        [--runs 30] [--json out.json] [--skip-ac]

The development set:
- ultralight: ultralight-simplepose (MobileNetV2 + deconvolutions, COCO heatmaps), from its checkpoint;
- efficientpose: EfficientPose RT (EfficientNet with SE gates and Swish, MPII in its own joint order,
  stride-1 heatmaps), stamped from its ONNX;
- lightposnet: LightPosNet (MobileNetV3-style with coordinate attention, SimCC head), stamped from its
  ONNX when this posequant takes SimCC models (else listed as skipped).
All are calibrated on the 86 coco-mini train people (the MPII model on COCO people: calibration uses crops,
not labels). The task metric is scored on the model's own labelled set with no flip test (COCO AP on the
68 coco-mini val people; MPII PCKh@0.5 on the 5 mpii-mini people, a noisy figure); the agreement (OKS of
INT8 keypoints against float ones; over the surer half of the joints, by the float model's scores; and the
share of joints within 5% of the person size) on the 68 coco-mini val people for every model. Each INT8
graph is scored as it runs on this CPU and, for the agreement, with exact integer kernels too (its exact
twin: what a VNNI or AMX CPU computes).

Quantizers, all on the same calibration crops:
- posequant: `posequant.quantize` with its defaults (``--cpu auto``);
- nncf: `nncf.quantize(model, dataset)`, nothing else;
- nncf-ac: `nncf.quantize_with_accuracy_control` with the task metric on the scored set, max drop 0.5
  points (the issue's goal), NNCF's defaults otherwise;
- ort: ONNX Runtime's `quantize_static` (QDQ, per-channel weights, MinMax, uint8 activations).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
EFFICIENTPOSE_JOINTS = ("head_top,upper_neck,r_shoulder,r_elbow,r_wrist,thorax,l_shoulder,l_elbow,l_wrist,pelvis,"
                        "r_hip,r_knee,r_ankle,l_hip,l_knee,l_ankle")
QUANTIZERS = ("posequant", "nncf", "nncf-ac", "ort")
AC_MAX_DROP = 0.5


@dataclass
class DevModel:
    name: str
    scored_on: str  # dataset folder under shared/data
    scored_split: str | None
    make: str  # "checkpoint" or "onnx"
    source: str  # under shared/models
    options: dict


def dev_set(shared: Path) -> dict[str, DevModel]:
    m = shared / "models"
    return {
        "ultralight": DevModel("ultralight", "coco-mini", "val", "checkpoint",
                               "ultralight-simplepose/ultralight_simplepose_coco_256x192.pth",
                               {"arch": f"{m / 'ultralight-simplepose' / 'ultralight_simplepose.py'}:build_model",
                                "input_size": (256, 192), "keypoints": "coco", "color": "rgb"}),
        "efficientpose": DevModel("efficientpose", "mpii-mini", None, "onnx",
                                  "efficientpose-rt/efficientpose_rt_mpii_224x224.onnx",
                                  {"color": "rgb", "joints": EFFICIENTPOSE_JOINTS}),
        "lightposnet": DevModel("lightposnet", "coco-mini", "val", "onnx",
                                "lightposnet-simcc/lightposnet_simcc_coco_256x192.onnx",
                                {"color": "rgb", "keypoints": "coco"}),
    }


def make_float(model: DevModel, shared: Path, out: Path) -> Path:
    from posequant.exporter import export_pose

    return export_pose(shared / "models" / model.source, out, verify_model=False, **model.options).output


def _with_meta(q: onnx.ModelProto, float_path: Path, out: Path) -> Path:
    """The quantized graph with the float model's posequant metadata, precision int8 (what eval needs)."""
    src = onnx.load(str(float_path), load_external_data=False)
    del q.metadata_props[:]
    for p in src.metadata_props:
        entry = q.metadata_props.add()
        entry.key, entry.value = p.key, ("int8" if p.key == "precision" else p.value)
    onnx.save(q, str(out))
    return out


def _task(path: Path, model: DevModel, shared: Path) -> float:
    from posequant.benchmarks.evaluate import evaluate
    from posequant.benchmarks.metrics import main_metric

    res = evaluate(path, shared / "data" / model.scored_on, split=model.scored_split, flip=False,
                   warn=lambda m: None)
    return main_metric(res.metrics)[1]


def float_nodes(q: onnx.ModelProto) -> int:
    """Convolutions and matrix products whose weights are not quantized."""
    producers = {o: n for n in q.graph.node for o in n.output}
    inits = {i.name for i in q.graph.initializer}
    count = 0
    for n in q.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1:
            w = n.input[1]
            quantized = w in producers and producers[w].op_type == "DequantizeLinear"
            count += (w in inits or w in producers) and not quantized
    return count


def run_quantizer(kind: str, model: DevModel, float_path: Path, shared: Path, calib, tmp: Path) -> Path:
    import nncf

    dataset = nncf.Dataset(calib.crops, lambda x: {calib.crops.input_name: x})
    proto = onnx.load(str(float_path))
    if kind == "posequant":
        from posequant.calibration.quantize import quantize

        return quantize(float_path, shared / "data" / "coco-mini", split="train", output=tmp / "posequant.onnx",
                        warn=lambda m: None).output
    if kind == "nncf":
        return _with_meta(nncf.quantize(proto, dataset, subset_size=len(calib.crops)), float_path, tmp / "nncf.onnx")
    if kind == "nncf-ac":
        def validate(candidate, _items):
            path = _with_meta(candidate if isinstance(candidate, onnx.ModelProto) else onnx.load(candidate),
                              float_path, tmp / "nncf-ac-candidate.onnx")
            return _task(path, model, shared), None

        val_crops = [f for f in calib.crops.feeds()]
        q = nncf.quantize_with_accuracy_control(proto, dataset, nncf.Dataset(val_crops), validate,
                                                max_drop=AC_MAX_DROP, subset_size=len(calib.crops))
        return _with_meta(q, float_path, tmp / "nncf-ac.onnx")
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from posequant.calibration.reader import OrtCalibrationReader

    quantize_static(str(float_path), str(tmp / "ort-raw.onnx"), OrtCalibrationReader(calib.crops),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return _with_meta(onnx.load(str(tmp / "ort-raw.onnx")), float_path, tmp / "ort.onnx")


def speedups(float_path: Path, int8: dict[str, Path], runs: int) -> dict[str, dict[str, float]]:
    """INT8 p50 / float p50 per backend at batch 1, interleaved rounds, medians (posequant.bench)."""
    from posequant.benchmarks.latency import bench

    res = bench([float_path, *int8.values()], backends=["ort", "openvino"], batches=(1,), runs=runs, warmup=3)
    p50 = {(Path(r.model).name, r.backend): r.p50_ms for r in res.rows}
    out = {}
    for kind, path in int8.items():
        out[kind] = {be: p50[(float_path.name, be)] / p50[(path.name, be)]
                     for be in ("ort", "openvino") if (path.name, be) in p50 and (float_path.name, be) in p50}
    out["float_ms"] = {be: p50[(float_path.name, be)] for be in ("ort", "openvino") if (float_path.name, be) in p50}
    return out


def measure(model: DevModel, shared: Path, kinds: tuple[str, ...], runs: int, log) -> dict:
    from posequant.benchmarks.agreement import agreement
    from posequant.calibration.reader import calibration_set
    from posequant.calibration.saturation import exact_twin
    from posequant.core.metadata import read_meta

    coco = shared / "data" / "coco-mini"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        float_path = make_float(model, shared, tmp / "float.onnx")
        meta = read_meta(float_path)
        proto = onnx.load(str(float_path))
        calib = calibration_set(coco, meta, split="train", input_name=proto.graph.input[0].name,
                                batch=proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 1,
                                warn=lambda m: None)
        out = {"float": {"task": _task(float_path, model, shared)}, "int8": {}}
        int8 = {}
        for kind in kinds:
            log(f"{model.name}: {kind}")
            t0 = time.perf_counter()
            path = run_quantizer(kind, model, float_path, shared, calib, tmp)
            seconds = time.perf_counter() - t0
            int8[kind] = path
            twin = _with_meta(exact_twin(onnx.load(str(path))), float_path, tmp / f"{kind}.twin.onnx")
            here = agreement(float_path, path, coco, split="val").agreement
            exact = agreement(float_path, twin, coco, split="val").agreement
            out["int8"][kind] = {"task": _task(path, model, shared), "agreement": here, "agreement_exact": exact,
                                 "float_nodes": float_nodes(onnx.load(str(path))), "quantize_s": seconds}
        out["speed"] = speedups(float_path, int8, runs)
        return out


def table(results: dict, cpu: str) -> str:
    from posequant.core.table import format_table

    rows = []
    for name, r in results.items():
        if "skipped" in r:
            rows.append([name, "-", f"skipped: {r['skipped']}"] + ["-"] * 9)
            continue
        rows.append([name, "float", f"{r['float']['task']:.2f}", "-", "1", "1", "1", "-", "-", "-", "-", "-"])
        for kind, q in r["int8"].items():
            sp = r["speed"].get(kind, {})
            rows.append([name, kind, f"{q['task']:.2f}", f"{r['float']['task'] - q['task']:+.2f}",
                         f"{q['agreement']['OKS']:.3f}", f"{q['agreement']['OKS_confident']:.3f}",
                         f"{q['agreement_exact']['OKS']:.3f}",
                         f"{q['agreement']['within_5%']:.1f}", str(q["float_nodes"]), f"{q['quantize_s']:.0f}",
                         f"{sp.get('ort', float('nan')):.2f}x", f"{sp.get('openvino', float('nan')):.2f}x"])
    head = ["model", "quantizer", "task metric", "drop", "OKS here", "surer half", "OKS exact", "<=5% here",
            "float nodes", "quantize s", "ORT speedup", "OpenVINO speedup"]
    return f"CPU: {cpu}\n" + format_table(head, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--models", default="ultralight,efficientpose,lightposnet")
    ap.add_argument("--runs", type=int, default=30, help="timed rounds per configuration")
    ap.add_argument("--skip-ac", action="store_true", help="leave out NNCF's accuracy control (the slowest)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from posequant.benchmarks.machine import machine_facts
    from posequant.core.errors import PosequantError

    facts = machine_facts()
    cpu = f"{facts['cpu']}: {facts['cpu_kind_title']} ({facts['cpu_kind_source']}); {facts['cores']} cores"
    kinds = tuple(k for k in QUANTIZERS if not (args.skip_ac and k == "nncf-ac"))
    models = dev_set(args.shared)
    results = {}
    for name in args.models.split(","):
        try:
            results[name] = measure(models[name], args.shared, kinds, args.runs,
                                    lambda m: print(m, file=sys.stderr, flush=True))
        except PosequantError as e:  # e.g. a SimCC model before posequant takes them
            results[name] = {"skipped": str(e).splitlines()[0][:100]}
        print(table({name: results[name]}, cpu), file=sys.stderr, flush=True)
    print(table(results, cpu))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "machine": facts, "results": results}, indent=2, default=float))


if __name__ == "__main__":
    main()
