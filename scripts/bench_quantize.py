"""Issue 4's figures: INT8 accuracy of three quantizers on the trained model, and what the
deconvolution rewrite does to pose_resnet_50's INT8 latency.

    .venv/bin/python scripts/bench_quantize.py [--shared ../shared] [--runs 40] [--json out.json]

Part 1 (needs --shared): the trained ultralight-simplepose model, exported from its checkpoint,
calibrated on the coco-mini train people and evaluated on the val people (no flip test), with
(a) plain ORT quantize_static (QDQ, per-channel, MinMax, U8 activations), (b) NNCF defaults
(`nncf.quantize` on the same ONNX), (c) posequant's defaults for each target, and without its
equalization / deconvolution rewrite. Same crops for all. Also scored on the train split.
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

from posequant.benchmarks.evaluate import evaluate
from posequant.benchmarks.metrics import oks
from posequant.benchmarks.runners import OpenVINORunner, OrtRunner
from posequant.calibration.datasets import open_dataset
from posequant.calibration.quantize import quantize
from posequant.calibration.reader import OrtCalibrationReader, calibration_set
from posequant.core.metadata import read_meta
from posequant.core.table import format_table
from posequant.demo import randomise
from posequant.exporter import export_pose
from posequant.exporter.zoo import pose_resnet

SPLITS = ("val", "train")


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
    variants = {"posequant defaults (target ort)": {},
                "posequant --target openvino": {"target": "openvino"},
                "posequant --activations symmetric": {"activations": "symmetric"},
                "posequant --target tensorrt (scored on ORT CPU)": {"target": "tensorrt"},
                "posequant --no-equalize": {"equalize": False},
                "posequant --no-rewrite-deconv": {"rewrite_deconv": False},
                "posequant --no-equalize --no-rewrite-deconv": {"equalize": False, "rewrite_deconv": False}}
    for i, (name, options) in enumerate(variants.items()):
        models[name] = tmp / f"posequant_{i}.onnx"
        quantize(float_path, coco, output=models[name], split="train", warn=lambda m: None, **options)
    rows, float_preds = [], {}
    people = {split: open_dataset(coco, input_size=meta.input_size, split=split).people for split in SPLITS}
    for name, path in models.items():
        row = {"quantizer": name, "path": str(path)}
        for split in SPLITS:  # train is the calibration split: a second, larger check of fidelity
            res = evaluate(path, coco, split=split, flip=False)
            float_preds.setdefault(split, res.preds)
            # fidelity: OKS of the INT8 model's joints against the float model's (labelled joints, GT area),
            # far less noisy than AP on a few dozen people
            agree = oks(res.preds, float_preds[split], np.stack([p.joints_vis for p in people[split]]),
                        np.array([p.area for p in people[split]]))
            row[split] = {"AP": res.metrics["AP"], "PCK@0.2": res.metrics["PCK@0.2"]["Mean"],
                          "OKS_vs_float": float(np.nanmean(agree))}
        rows.append(row)
    base = rows[0]
    for r in rows:
        for split in SPLITS:
            r[split]["AP_drop_points"] = 100 * (base[split]["AP"] - r[split]["AP"])
            r[split]["PCK_drop_points"] = base[split]["PCK@0.2"] - r[split]["PCK@0.2"]
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
        configs.append((f"OpenVINO INT8 {label}", OpenVINORunner(paths[rewrite], threads=2, static_shapes=True)))
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
            print("trained ultralight-simplepose, no flip, calibrated on coco-mini train (86 people); "
                  "val: 68 held-out people, train: the 86 calibration people")
            print(format_table(["quantizer"] + [f"{split} {c}" for split in SPLITS for c in
                                                ("AP", "drop", "PCK@0.2", "drop", "OKS vs float")],
                               [[r["quantizer"]] + [x for split in SPLITS for x in (
                                   f"{r[split]['AP']:.3f}", f"{r[split]['AP_drop_points']:+.2f}",
                                   f"{r[split]['PCK@0.2']:.2f}", f"{r[split]['PCK_drop_points']:+.2f}",
                                   f"{r[split]['OKS_vs_float']:.4f}")]
                                for r in acc]))
        out["latency"] = lat = latency(args.shared, tmp, args.runs)
        print(f"\npose_resnet_50 256x256, batch 1, 2 threads, median of {args.runs} interleaved runs")
        print(format_table(["config", "p50 ms", "vs ORT FP32"],
                           [[r["config"], f"{r['p50_ms']:.1f}", f"{r['speedup_vs_ort_fp32']:.2f}x"] for r in lat]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
