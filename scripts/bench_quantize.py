"""Issue 4's figures: INT8 accuracy of three quantizers on the trained model, and what the
deconvolution rewrite does to pose_resnet_50's INT8 latency.

    .venv/bin/python scripts/bench_quantize.py [--shared ../shared] [--runs 40] [--json out.json]

Part 1 (needs --shared): the trained ultralight-simplepose model, exported from its checkpoint,
calibrated on the coco-mini train people and evaluated on the val people (no flip test), with
(a) plain ORT quantize_static (QDQ, per-channel, MinMax, U8 activations), (b) NNCF defaults
(`nncf.quantize` on the same ONNX), (c) posequant's defaults for each target. Same crops for all.
Part 2: pose_resnet_50 at 256x256 (seeded random weights), batch 1, 2 threads: ORT FP32 vs INT8 on
ORT and OpenVINO with and without the rewrite, repetitions interleaved, medians.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from benchmarks.evaluate import evaluate
from benchmarks.runners import OpenVINORunner, OrtRunner
from calibration.quantize import quantize
from calibration.reader import OrtCalibrationReader, calibration_set
from exporter import export_pose
from exporter.zoo import pose_resnet
from posequant.demo import randomise
from posequant.metadata import read_meta
from posequant.table import format_table


def accuracy(shared: Path, tmp: Path) -> list[dict]:
    trained = shared / "models/ultralight-simplepose"
    coco = shared / "data/coco-mini"
    float_path = tmp / "ultralight.onnx"
    export_pose(trained / "ultralight_simplepose_coco_256x192.pth", float_path,
                arch=f"{trained / 'ultralight_simplepose.py'}:build_model", input_size=(256, 192),
                keypoints="coco", color="rgb")
    meta = read_meta(float_path)
    calib = calibration_set(coco, meta, num_samples=10_000, split="train", warn=lambda m: None)
    models = {"float": float_path}

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    models["ORT quantize_static (plain)"] = tmp / "ort_plain.onnx"
    quantize_static(str(float_path), str(models["ORT quantize_static (plain)"]), OrtCalibrationReader(calib.crops),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)

    import nncf

    models["NNCF defaults"] = tmp / "nncf.onnx"
    q = nncf.quantize(onnx.load(str(float_path)), nncf.Dataset(calib.crops, lambda x: {"input": x}),
                      subset_size=len(calib.crops))
    onnx.save(q, str(models["NNCF defaults"]))
    for target in ("ort", "openvino"):
        name = f"posequant (target {target})"
        models[name] = tmp / f"posequant_{target}.onnx"
        quantize(float_path, coco, output=models[name], split="train", target=target, warn=lambda m: None)
    rows = []
    for name, path in models.items():
        m = evaluate(path, coco, flip=False).metrics
        rows.append({"quantizer": name, "AP": m["AP"], "PCK@0.2": m["PCK@0.2"]["Mean"], "path": str(path)})
    base = rows[0]
    for r in rows:
        r["AP_drop_points"] = 100 * (base["AP"] - r["AP"])
        r["PCK_drop_points"] = base["PCK@0.2"] - r["PCK@0.2"]
    return rows


def latency(shared: Path, tmp: Path, runs: int) -> list[dict]:
    ckpt = tmp / "pose_resnet_50.pth"
    torch.manual_seed(0)
    torch.save(randomise(pose_resnet.build(pose_resnet.PoseResNetConfig(depth=50, num_joints=16))).state_dict(), ckpt)
    float_path = tmp / "pose_resnet_50.onnx"
    export_pose(ckpt, float_path, input_size=(256, 256))
    calib = shared / "data/mpii-calib-images"
    if not calib.is_dir():
        calib = shared / "data/mpii-mini"
    paths = {}
    for rewrite in (True, False):
        paths[rewrite] = tmp / f"pose_resnet_50.int8.{'rewrite' if rewrite else 'plain'}.onnx"
        quantize(float_path, calib, output=paths[rewrite], rewrite_deconv=rewrite, warn=lambda m: None)
    configs = [("ORT FP32", OrtRunner(float_path, threads=2))]
    for rewrite, label in ((False, "without rewrite"), (True, "with rewrite")):
        configs.append((f"ORT INT8 {label}", OrtRunner(paths[rewrite], threads=2)))
        configs.append((f"OpenVINO INT8 {label}", OpenVINORunner(paths[rewrite], threads=2)))
    x = np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)
    for _, r in configs:
        for _ in range(3):
            r.infer(x)
    times = {name: [] for name, _ in configs}
    for _ in range(runs):  # interleaved: drift on a shared machine hits every configuration alike
        for name, r in configs:
            t = time.perf_counter()
            r.infer(x)
            times[name].append(1e3 * (time.perf_counter() - t))
    base = float(np.median(times["ORT FP32"]))
    return [{"config": name, "p50_ms": float(np.median(t)), "speedup_vs_ort_fp32": base / float(np.median(t))}
            for name, t in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (args.shared / "models").is_dir() and not args.skip_accuracy:
            out["accuracy"] = acc = accuracy(args.shared, tmp)
            print("trained ultralight-simplepose, coco-mini val (68 people), no flip, calibrated on coco-mini train (86)")
            print(format_table(["quantizer", "AP", "AP drop (pts)", "PCK@0.2", "PCK drop (pts)"],
                               [[r["quantizer"], f"{r['AP']:.3f}", f"{r['AP_drop_points']:+.1f}",
                                 f"{r['PCK@0.2']:.2f}", f"{r['PCK_drop_points']:+.2f}"] for r in acc]))
        out["latency"] = lat = latency(args.shared, tmp, args.runs)
        print(f"\npose_resnet_50 256x256, batch 1, 2 threads, median of {args.runs} interleaved runs")
        print(format_table(["config", "p50 ms", "vs ORT FP32"],
                           [[r["config"], f"{r['p50_ms']:.1f}", f"{r['speedup_vs_ort_fp32']:.2f}x"] for r in lat]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
