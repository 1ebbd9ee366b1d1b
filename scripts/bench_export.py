"""Export + simplify + verify time, and ONNX-vs-PyTorch differences, per family at official sizes.

    .venv/bin/python scripts/bench_export.py [--shared ../shared] [--json out.json]

Models have seeded random weights and BatchNorm statistics (no released weights may be downloaded
here); the trained ultralight-simplepose model is added when --shared has it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from posequant.core.table import format_table
from posequant.demo import randomise
from posequant.exporter import export_pose
from posequant.exporter.zoo import PRESETS, hourglass, pose_hrnet, pose_resnet

CASES = [  # (name, config, input size, keypoints)
    ("pose_resnet_50", pose_resnet.PoseResNetConfig(depth=50, num_joints=16), (256, 256)),
    ("pose_resnet_152", pose_resnet.PoseResNetConfig(depth=152, num_joints=17), (384, 288)),
    ("pose_hrnet_w32", PRESETS["pose_hrnet_w32"][1], (256, 192)),
    ("pose_hrnet_w48", PRESETS["pose_hrnet_w48"][1], (384, 288)),
    ("hg_s2_b1", hourglass.HourglassConfig(num_stacks=2, num_blocks=1), (256, 256)),
    ("hg_s8_b1", hourglass.HourglassConfig(num_stacks=8, num_blocks=1), (256, 256)),
]
BUILD = {pose_resnet.PoseResNetConfig: pose_resnet.build, pose_hrnet.PoseHRNetConfig: pose_hrnet.build,
         hourglass.HourglassConfig: hourglass.build}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name, cfg, size in CASES:
            ckpt = Path(tmp) / f"{name}.pth"
            torch.save(randomise(BUILD[type(cfg)](cfg)).state_dict(), ckpt)
            jobs.append((name, ckpt, dict(input_size=size)))
        trained = args.shared / "models/ultralight-simplepose"
        if trained.is_dir():
            jobs.append(("ultralight (trained)", trained / "ultralight_simplepose_coco_256x192.pth", dict(
                arch=f"{trained / 'ultralight_simplepose.py'}:build_model", input_size=(256, 192),
                keypoints="coco", color="rgb", data=args.shared / "data/coco-mini")))
        for name, ckpt, kwargs in jobs:
            t = time.perf_counter()
            res = export_pose(ckpt, Path(tmp) / f"{name.split()[0]}.onnx", **kwargs)
            wall = time.perf_counter() - t
            rep = res.verification
            tm = res.timings
            rows.append([name, f"{res.meta.input_size[0]}x{res.meta.input_size[1]}", f"{res.num_parameters / 1e6:.1f}M",
                         f"{rep.max_abs_diff:.2e}", f"{rep.max_rel_diff:.2e}",
                         f"{min(c.argmax_agreement for c in rep.cases) * 100:.0f}%",
                         f"{tm['export_s']:.1f}", f"{tm.get('simplify_s', 0):.1f}", f"{tm['verify_s']:.1f}",
                         f"{wall:.1f}"])
            results.append({"model": name, "input_size": list(res.meta.input_size), "parameters": res.num_parameters,
                            "max_abs_diff": rep.max_abs_diff, "max_rel_diff": rep.max_rel_diff,
                            "timings_s": tm, "wall_s": wall, "cases": rep.to_dict()["cases"]})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_table(["model", "input", "params", "max abs diff", "rel diff", "argmax agree",
                        "export s", "simplify s", "verify s", "total s"], rows))
    if args.json:
        args.json.write_text(json.dumps({"results": results}, indent=2))


if __name__ == "__main__":
    main()
