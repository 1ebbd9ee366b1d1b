"""Eval throughput (people/s) and accuracy of the trained model on coco-mini val, per backend and flip setting.

    .venv/bin/python scripts/bench_eval.py [--shared ../shared] [--backends torch,ort,openvino]
        [--batches 1,8] [--repeat 1] [--json out.json]

The trained ultralight-simplepose model is exported from its checkpoint (as the tests do); each
run is a whole ``evaluate`` (decode, warp, inference, flip, decoding) over the 68 val people, so
people/s is end-to-end evaluation speed, not bare inference latency (that is ``posequant bench``).
AP and PCK@0.2 must agree between backends; the largest difference is printed under the table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from posequant.benchmarks.evaluate import evaluate
from posequant.core.table import format_table
from posequant.exporter import export_pose

CKPT = "models/ultralight-simplepose/ultralight_simplepose_coco_256x192.pth"
ARCH = "models/ultralight-simplepose/ultralight_simplepose.py:build_model"
DATA = "data/coco-mini"


def _csv(cast):
    return lambda text: [cast(v) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--backends", type=_csv(str), default=["torch", "ort", "openvino"])
    ap.add_argument("--batches", type=_csv(int), default=[1, 8])
    ap.add_argument("--repeat", type=int, default=1, help="Runs per setting; the fastest is reported.")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ckpt, data = args.shared / CKPT, args.shared / DATA
    # the trained model's own settings (its checkpoint carries no metadata)
    options = dict(arch=str(args.shared / ARCH), input_size=(256, 192), keypoints="coco", color="rgb")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_pose(ckpt, Path(tmp) / "ultralight.onnx", **options).output
        for backend in args.backends:
            # torch evaluates the checkpoint itself (re-exported each run, unverified, outside the timing)
            model = ckpt if backend == "torch" else onnx_path
            export_options = {**options, "verify_model": False} if backend == "torch" else None
            # untimed warm-up: the first inferences of a fresh process pay one-off start-up costs
            evaluate(model, data, backend=backend, flip=False, limit=8, export_options=export_options)
            for flip in (False, True):
                for batch in args.batches:
                    best = None
                    for _ in range(args.repeat):
                        res = evaluate(model, data, backend=backend, flip=flip, batch=batch,
                                       export_options=export_options)
                        best = res if best is None or res.seconds < best.seconds else best
                    runs.append({"backend": backend, "flip": flip, "batch": batch, "people": best.people,
                                 "seconds": best.seconds, "people_per_s": best.people_per_s,
                                 "AP": best.metrics["AP"], "PCK@0.2": best.metrics["PCK@0.2"]["Mean"],
                                 "metrics": best.metrics})
                    print(f"  {backend:8s} flip {'on ' if flip else 'off'} batch {batch}: "
                          f"{best.people_per_s:6.1f} people/s", flush=True)
    rows = [[r["backend"], "on" if r["flip"] else "off", r["batch"], r["people"], f"{r['people_per_s']:.1f}",
             f"{r['AP']:.3f}", f"{r['PCK@0.2']:.2f}"] for r in runs]
    print("\ncoco-mini val, trained ultralight-simplepose 256x192 (float32, CPU)")
    print(format_table(["backend", "flip", "batch", "people", "people/s", "AP", "PCK@0.2"], rows))
    spread = {}
    for flip in (False, True):
        same = [r for r in runs if r["flip"] == flip]
        spread[flip] = {k: max(r[k] for r in same) - min(r[k] for r in same) for k in ("AP", "PCK@0.2")}
        print(f"flip {'on ' if flip else 'off'}: backends agree to AP {spread[flip]['AP']:.4f}, "
              f"PCK@0.2 {spread[flip]['PCK@0.2']:.2f} points (largest difference)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "spread": {str(k): v for k, v in spread.items()}}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
