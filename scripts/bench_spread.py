"""How far the accuracy metrics move under harmless changes: the spread every accuracy assertion of the test
suite must sit above (tests/test_quantize.py, tests/test_bench_gate.py, scripts/ci_gate.sh cite it).

The trained ultralight model, float vs INT8 on coco-mini val (68 people), for INT8 graphs that differ only in
ways that should not matter: the CPU kind it is made for and run on (this machine's kind; ``--cpu vnni``
run with exact integer kernels, i.e. what a VNNI or AMX CPU computes, via the exact twin; ``--cpu portable``),
the calibration draw (64 of the 86 train people, seeds 1-3), and the runtime (the default file on OpenVINO).
Library versions are the other harmless change: run the script once per environment (e.g. with an older
onnxruntime or opencv first on PYTHONPATH) and combine the JSON files.

    .venv/bin/python scripts/bench_spread.py --json spread-here.json
    PYTHONPATH=/tmp/ort-1.31.1 .venv/bin/python scripts/bench_spread.py --label "onnxruntime 1.31.1" --json b.json
    .venv/bin/python scripts/bench_spread.py --combine spread-here.json b.json

Per graph: AP and PCK@0.2 drops (flip off / on), the worst joint group's PCK@0.2 drop (the gate's check),
the relative heatmap error against float, and the agreement of INT8 with float keypoints
(``benchmarks.metrics.keypoint_agreement``: OKS, share of joints within 2% / 5% of the person size).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GROUPS = {"Head": (0, 1, 2, 3, 4), "Shoulder": (5, 6), "Elbow": (7, 8), "Wrist": (9, 10), "Hip": (11, 12),
          "Knee": (13, 14), "Ankle": (15, 16)}


def heatmap_error(a: Path, b: Path, inputs: list[np.ndarray]) -> float:
    """sum((b - a)^2) / sum(a^2) of the two models' heatmaps on ``inputs`` (ORT)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sa, sb = (ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in (a, b))
    num = den = 0.0
    for x in inputs:
        ya, yb = sa.run(None, {"input": x})[0].astype(np.float64), sb.run(None, {"input": x})[0]
        num += float(((yb - ya) ** 2).sum())
        den += float((ya ** 2).sum())
    return num / den


def worst_group_drop(f, q) -> tuple[str, float]:
    """The joint group whose PCK@0.2 (pooled over its joints) drops most."""
    from posequant.core.keypoints import COCO

    fp, qp = f.metrics["PCK@0.2"], q.metrics["PCK@0.2"]
    drops = {g: float(np.mean([fp[COCO.joint_names[j]] for j in js]) - np.mean([qp[COCO.joint_names[j]] for j in js]))
             for g, js in GROUPS.items()}
    g = max(drops, key=drops.get)
    return g, drops[g]


def measure(shared: Path, label: str) -> dict:
    import onnx

    from posequant.benchmarks.evaluate import evaluate
    from posequant.benchmarks.machine import library_versions
    from posequant.benchmarks.metrics import keypoint_agreement, person_size
    from posequant.calibration import iter_batches, open_dataset
    from posequant.calibration.quantize import quantize
    from posequant.calibration.saturation import exact_twin
    from posequant.core.cpu import cpu_kind
    from posequant.core.keypoints import COCO_SIGMAS
    from posequant.core.metadata import read_meta
    from posequant.exporter import export_pose

    model_dir = shared / "models" / "ultralight-simplepose"
    coco = shared / "data" / "coco-mini"
    here = cpu_kind().name
    out: dict = {"label": label, "cpu_kind": here, "versions": library_versions(), "graphs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp = tmp / "float.onnx"
        export_pose(model_dir / "ultralight_simplepose_coco_256x192.pth", fp,
                    arch=f"{model_dir / 'ultralight_simplepose.py'}:build_model", input_size=(256, 192),
                    keypoints="coco", color="rgb", verify_model=False)
        meta = read_meta(fp)
        ds = open_dataset(coco, input_size=meta.input_size, split="val")
        inputs = [b.inputs for b in iter_batches(ds, meta, batch_size=8)]
        graphs = {  # name -> (quantize options, evaluated on, made exact by the twin)
            f"default (--cpu auto: {here})": ({}, "ort", False),
            "--cpu vnni, exact kernels (as on VNNI/AMX)": ({"cpu": "vnni"}, "ort", True),
            "--cpu portable": ({"cpu": "portable"}, "ort", False),
            **{f"64 people, seed {s}": ({"num_samples": 64, "seed": s}, "ort", False) for s in (1, 2, 3)},
            "default, on OpenVINO": ({}, "openvino", False),
        }
        floats = {}
        made: dict[str, Path] = {}
        for name, (options, backend, twin) in graphs.items():
            t0 = time.perf_counter()
            key = json.dumps(options, sort_keys=True)
            if key not in made:
                made[key] = quantize(fp, coco, split="train", output=tmp / f"q{len(made)}.onnx", **options).output
            path = made[key]
            if twin:
                path = tmp / f"twin{len(made)}.onnx"
                onnx.save(exact_twin(onnx.load(str(made[key]))), str(path))
            row = {"heatmap_error_pct": 100 * heatmap_error(fp, path, inputs) if backend == "ort" else None}
            for flip in (False, True):
                if (backend, flip) not in floats:
                    floats[backend, flip] = evaluate(fp, coco, split="val", flip=flip, backend=backend)
                f = floats[backend, flip]
                q = evaluate(path, coco, split="val", flip=flip, backend=backend)
                tag = "flip" if flip else "noflip"
                row[f"AP_drop_{tag}"] = 100 * (f.metrics["AP"] - q.metrics["AP"])
                row[f"PCK_drop_{tag}"] = f.metrics["PCK@0.2"]["Mean"] - q.metrics["PCK@0.2"]["Mean"]
                row[f"worst_group_{tag}"] = worst_group_drop(f, q)
                agree = keypoint_agreement(f.preds, q.preds, person_size(f.scales), sigmas=COCO_SIGMAS)
                row.update({f"{k}_{tag}": v for k, v in agree.items()})
                row[f"float_AP_{tag}"] = 100 * f.metrics["AP"]
            row["seconds"] = time.perf_counter() - t0
            out["graphs"][name] = row
            print(f"  {name}: AP drop {row['AP_drop_noflip']:+.2f} / {row['AP_drop_flip']:+.2f}, "
                  f"OKS {row['OKS_noflip']:.4f}, within 5% {row['within_5%_noflip']:.1f}", file=sys.stderr)
    return out


COLUMNS = [("AP_drop_noflip", "AP drop", ".2f"), ("AP_drop_flip", "AP drop flip", ".2f"),
           ("PCK_drop_noflip", "PCK drop", ".2f"), ("worst_group_flip", "worst group flip", None),
           ("heatmap_error_pct", "heatmap err %", ".3f"), ("OKS_noflip", "OKS", ".4f"),
           ("OKS_min_noflip", "OKS min", ".3f"), ("within_2%_noflip", "<=2%", ".1f"),
           ("within_5%_noflip", "<=5%", ".1f"), ("OKS_flip", "OKS flip", ".4f")]


def table(runs: list[dict]) -> str:
    from posequant.core.table import format_table

    def cell(v, fmt):
        if v is None:
            return "-"
        if fmt is None:
            return f"{v[0]} {v[1]:+.2f}"
        return format(v, fmt)

    rows, values = [], {c: [] for c, _, _ in COLUMNS}
    for run in runs:
        for name, r in run["graphs"].items():
            rows.append([f"{run['label']}: {name}", *(cell(r.get(c), f) for c, _, f in COLUMNS)])
            for c, _, _ in COLUMNS:
                v = r.get(c)
                if v is not None:
                    values[c].append(v[1] if isinstance(v, list | tuple) else v)
    rows.append(["spread (min .. max)", *(f"{min(values[c]):{f or '.2f'}} .. {max(values[c]):{f or '.2f'}}"
                                          if values[c] else "-" for c, _, f in COLUMNS)])
    floats = sorted({round(r["float_AP_noflip"], 2) for run in runs for r in run["graphs"].values()})
    head = f"float AP (no flip) across the runs: {', '.join(map(str, floats))}"
    return head + "\n" + format_table(["graph", *(h for _, h, _ in COLUMNS)], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--label", default=None, help="names this environment in the table (default: its versions)")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    ap.add_argument("--combine", type=Path, nargs="+", help="print the spread over these JSON files instead")
    args = ap.parse_args()
    if args.combine:
        print(table([json.loads(p.read_text()) for p in args.combine]))
        return
    from posequant.benchmarks.machine import library_versions

    v = library_versions()
    import cv2

    label = args.label or f"ort {v.get('onnxruntime')}, opencv {cv2.__version__}"
    run = measure(args.shared, label)
    if args.json:
        args.json.write_text(json.dumps(run, indent=2))
    print(table([run]))


if __name__ == "__main__":
    main()
