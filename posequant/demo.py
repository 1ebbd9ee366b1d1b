"""The README's main job on a built-in default.

With a shared/ folder that has the trained ultralight-simplepose model and coco-mini, the demo
exports that real model and verifies it on real person crops (and against the model's original
ONNX graph). Without it, it makes a Simple Baselines pose_resnet_50 with seeded random weights
(random BatchNorm statistics too) and exports that: the mechanics, not accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exporter import export_pose
from exporter.report import format_export
from exporter.zoo import pose_resnet

TRAINED = Path("models/ultralight-simplepose")
COCO_MINI = Path("data/coco-mini")


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights *and* BatchNorm statistics, so BN is not an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
    return model


def original_onnx_parity(exported: Path, original: Path, data: Path) -> float:
    """Max abs difference between our export and the model's original ONNX on real crops."""
    import onnxruntime as ort

    from calibration import iter_batches, open_dataset
    from posequant.metadata import read_meta

    meta = read_meta(exported)
    ds = open_dataset(data, input_size=meta.input_size)
    ours = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    theirs = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in iter_batches(ds, meta, batch_size=1, limit=10):
        a = ours.run(None, {"input": batch.inputs})[0]
        b = theirs.run(None, {theirs.get_inputs()[0].name: batch.inputs})[0]
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def run_demo(out_dir: Path, shared: Path | None, *, echo: Callable[[str], None] = print,
             progress: Callable[[str], None] | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if shared is not None and (shared / TRAINED).is_dir() and (shared / COCO_MINI).is_dir():
        src = shared / TRAINED
        echo(f"demo: exporting the trained ultralight-simplepose model from {src}")
        result = export_pose(
            src / "ultralight_simplepose_coco_256x192.pth", out_dir / "ultralight_simplepose.onnx",
            arch=f"{src / 'ultralight_simplepose.py'}:build_model", input_size=(256, 192),
            keypoints="coco", color="rgb", data=shared / COCO_MINI, progress=progress)
        echo(format_export(result))
        diff = original_onnx_parity(result.output, src / "ultralight_simplepose_coco_256x192.onnx",
                                    shared / COCO_MINI)
        echo(f"parity with the model's original ONNX on 10 real crops: max abs diff {diff:.2e}")
        return
    echo("demo: no shared/ data given; exporting a Simple Baselines pose_resnet_50 (MPII, 256x256) "
         "with seeded random weights: this shows the mechanics, not accuracy")
    ckpt = out_dir / "pose_resnet_50_random.pth"
    model = randomise(pose_resnet.build(pose_resnet.PoseResNetConfig(depth=50, num_joints=16)))
    torch.save(model.state_dict(), ckpt)
    result = export_pose(ckpt, out_dir / "pose_resnet_50_random.onnx", progress=progress)
    echo(format_export(result))
