"""Issue 12's figures: the trained model's INT8 graph made for each CPU kind, scored on this machine.

    .venv/bin/python scripts/bench_cpu_kinds.py [--shared ../shared] [--json out.json]

The trained ultralight-simplepose model, exported from its checkpoint, quantized on the 86 coco-mini
train people with ``--cpu vnni`` (8-bit weights: exact on VNNI/AMX, saturating on AVX2) and
``--cpu avx2`` (weight scales fitted so that no int16 pair sum can saturate: exact everywhere), for
``--target ort`` (scored on ONNX Runtime) and ``--target openvino`` (scored on OpenVINO). For each:
AP and PCK@0.2 drop against float on the 68 val people, flip test off and on, with this CPU's fused
kernels and (ORT) with the graph's exact semantics (optimizations off); heatmap error against float;
and the saturation model's count of pair sums that would saturate on an AVX2 / AVX-512 (no VNNI) CPU,
over the 86 calibration crops, with the weight pairs that could saturate at all.

On a VNNI/AMX machine it also runs every graph on OpenVINO with oneDNN capped to AVX-512 without VNNI
(``ONEDNN_MAX_CPU_ISA=AVX512_CORE``, in a subprocess: VPMADDUBSW kernels, as on such CPUs) and reports
how far its heatmaps are from the uncapped run (``--no-emulate`` skips it). ``AVX2`` as the cap makes
OpenVINO 2026.4's CPU plugin fail or output garbage on this kind of machine, so it is not used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from posequant.benchmarks.evaluate import evaluate
from posequant.calibration import iter_batches, open_dataset
from posequant.calibration.quantize import quantize
from posequant.calibration.reader import calibration_set
from posequant.calibration.saturation import risky_pairs, saturation_counts
from posequant.core.cpu import cpu_kind
from posequant.core.metadata import read_meta
from posequant.core.table import format_table
from posequant.exporter import export_pose

REPO = Path(__file__).resolve().parents[1]
GRAPHS = [("ort", "vnni"), ("ort", "avx2"), ("openvino", "vnni"), ("openvino", "avx2")]


def heatmap_error(model: Path, reference: Path, data: Path, backend: str) -> float:
    """Relative squared heatmap error of ``model`` against the float ``reference`` on the val crops."""
    from posequant.benchmarks.runners import make_runner

    meta = read_meta(reference)
    ds = open_dataset(data, input_size=meta.input_size, split="val")
    f, q = make_runner("ort", onnx_path=reference), make_runner(backend, onnx_path=model)
    err = norm = 0.0
    for b in iter_batches(ds, meta, batch_size=8):
        a = f.infer(b.inputs).astype(np.float64)
        err += float(((q.infer(b.inputs) - a) ** 2).sum())
        norm += float((a ** 2).sum())
    return err / norm


def openvino_heatmaps(paths: list[Path], data: Path, out: Path, isa: str | None) -> None:
    """Heatmaps of each model on OpenVINO for 32 val crops, in a subprocess with oneDNN capped to ``isa``."""
    import os
    import subprocess

    env = {**os.environ, **({"ONEDNN_MAX_CPU_ISA": isa} if isa else {})}
    code = ("import sys, numpy as np, openvino as ov\n"
            "from pathlib import Path\n"
            "from posequant.calibration import iter_batches, open_dataset\n"
            "from posequant.core.metadata import read_meta\n"
            "data, out, paths = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]\n"
            "meta = read_meta(paths[0])\n"
            "ds = open_dataset(data, input_size=meta.input_size, split='val')\n"
            "xs = [b.inputs for b in iter_batches(ds, meta, batch_size=8, limit=32)]\n"
            "core = ov.Core()\n"
            "for i, p in enumerate(paths):\n"
            "    c = core.compile_model(p, 'CPU')\n"
            "    np.save(out / f'{i}.npy', np.concatenate([c(x)[0] for x in xs]))\n")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(data), str(out), *map(str, paths)], env=env, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--no-emulate", action="store_true", help="skip the OpenVINO run capped to AVX-512 without VNNI")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    trained, coco = args.shared / "models/ultralight-simplepose", args.shared / "data/coco-mini"
    if not trained.is_dir() or not coco.is_dir():
        sys.exit(f"needs {trained} and {coco}")
    here = cpu_kind()
    rows, payload = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        float_path = export_pose(trained / "ultralight_simplepose_coco_256x192.pth", tmp / "float.onnx",
                                 arch=f"{trained / 'ultralight_simplepose.py'}:build_model", input_size=(256, 192),
                                 keypoints="coco", color="rgb", verify_model=False).output
        meta = read_meta(float_path)
        crops = calibration_set(coco, meta, num_samples=10_000, split="train", warn=lambda m: None).crops
        base = {flip: evaluate(float_path, coco, split="val", flip=flip).metrics for flip in (False, True)}
        for target, cpu in GRAPHS:
            print(f"quantizing --target {target} --cpu {cpu}", file=sys.stderr)
            res = quantize(float_path, coco, split="train", target=target, cpu=cpu, output=tmp / f"{target}_{cpu}.onnx",
                           warn=lambda m: None)
            proto = onnx.load(str(res.output))
            sat = saturation_counts(proto, crops.feeds())
            entry = {"target": target, "cpu": cpu, "risky_weight_pairs": risky_pairs(proto),
                     "saturating_pair_sums": sum(c.saturated for c in sat), "pair_sums": sum(c.pairs for c in sat),
                     "convs_saturating": sum(c.saturated > 0 for c in sat), "pair_fit": res.settings["pair_fit"]}
            backends = [target] + (["ort-reference"] if target == "ort" else [])
            for backend in backends:
                for flip in (False, True):
                    m = evaluate(res.output, coco, split="val", flip=flip, backend=backend).metrics
                    entry[f"{backend} flip {'on' if flip else 'off'}"] = {
                        "AP_drop": 100 * (base[flip]["AP"] - m["AP"]),
                        "PCK_drop": base[flip]["PCK@0.2"]["Mean"] - m["PCK@0.2"]["Mean"]}
                entry[f"{backend} heatmap_rel_err"] = heatmap_error(res.output, float_path, coco, backend)
            entry["path"] = res.output
            payload.append(entry)
            for backend in backends:
                off, on = entry[f"{backend} flip off"], entry[f"{backend} flip on"]
                rows.append([f"--target {target} --cpu {cpu}", backend,
                             f"{off['AP_drop']:.2f} / {on['AP_drop']:.2f}", f"{off['PCK_drop']:.2f} / {on['PCK_drop']:.2f}",
                             f"{entry[f'{backend} heatmap_rel_err']:.4f}",
                             f"{entry['saturating_pair_sums']:,} of {entry['pair_sums'] / 1e9:.1f}e9",
                             entry["risky_weight_pairs"]])
        emulated = []
        if not args.no_emulate and here.saturates is False and here.name != "arm64":
            paths = [e["path"] for e in payload]
            openvino_heatmaps(paths, coco, tmp / "uncapped", None)
            openvino_heatmaps(paths, coco, tmp / "capped", "AVX512_CORE")
            for i, e in enumerate(payload):
                a, b = np.load(tmp / "uncapped" / f"{i}.npy"), np.load(tmp / "capped" / f"{i}.npy")
                e["openvino_avx512_core_vs_exact"] = float(((a - b) ** 2).sum() / (a ** 2).sum())
                emulated.append([f"--target {e['target']} --cpu {e['cpu']}", f"{e['openvino_avx512_core_vs_exact']:.2e}",
                                 f"{float(np.abs(a - b).max()):.3f}"])
        for e in payload:
            e["path"] = str(e["path"])
    print(f"this CPU: {here.describe()}; float AP {100 * base[False]['AP']:.2f} / {100 * base[True]['AP']:.2f} "
          "(flip off / on)")
    print(format_table(["graph", "scored on", "AP drop off / on", "PCK@0.2 drop off / on", "heatmap err",
                        "saturating pair sums (AVX2 model)", "risky weight pairs"], rows))
    if emulated:
        print("OpenVINO with oneDNN capped to AVX-512 without VNNI (VPMADDUBSW) vs uncapped, 32 val crops:")
        print(format_table(["graph", "relative squared heatmap difference", "max abs difference"], emulated))
    if args.json:
        args.json.write_text(json.dumps({"cpu_kind": here.name, "float": base, "graphs": payload}, indent=2,
                                        default=str) + "\n")


if __name__ == "__main__":
    main()
