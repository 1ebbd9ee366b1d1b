"""The README's main job on a built-in default.

The demo runs the pipeline (export -> quantize -> gate). With a shared/ folder that has the trained
ultralight-simplepose model and coco-mini, on that real model and real data, with the CI gate's
budgets (and a parity check against the model's original ONNX graph). Without it, on a Simple
Baselines pose_resnet_18 with seeded random weights (random BatchNorm statistics too) and a
synthetic COCO set labelled by its own float predictions: the mechanics, not accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from posequant.exporter import export_pose
from posequant.exporter.zoo import pose_resnet
from posequant.pipeline import GateBudget

TRAINED = Path("models/ultralight-simplepose")
COCO_MINI = Path("data/coco-mini")
# The CI gate's budgets (scripts/ci_gate.sh, docs/ci-gate.md): on 68 people one joint of a group is 0.6-2.1 points.
TRAINED_BUDGET = GateBudget(max_drop=2.0, max_joint_drop=4.5, min_speedup=1.0)
SYNTHETIC_MODEL = pose_resnet.PoseResNetConfig(depth=18, num_joints=17, deconv_filters=(64, 64, 64))
SYNTHETIC_SIZE = (128, 96)
# Random weights: INT8 moves a share of the joints a real model would keep; loose enough for that,
# tight enough to fail a broken model (every joint off: a drop of ~100).
SYNTHETIC_BUDGET = GateBudget(max_drop=50.0, max_joint_drop=60.0, min_speedup=1.0)


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

    from posequant.calibration import iter_batches, open_dataset
    from posequant.core.metadata import read_meta

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


def _synthetic_inputs(out_dir: Path, progress) -> tuple[Path, Path]:
    """A random-weights COCO pose_resnet_18 checkpoint and a COCO set labelled by its own float export."""
    from posequant.benchmarks.synthetic import make_coco_set

    ckpt = out_dir / "pose_resnet_18_random.pth"
    torch.manual_seed(0)
    torch.save(randomise(pose_resnet.build(SYNTHETIC_MODEL)).state_dict(), ckpt)
    labeller = export_pose(ckpt, out_dir / "labeller.onnx", input_size=SYNTHETIC_SIZE, verify_model=False)
    data = make_coco_set(out_dir / "synthetic-coco", labeller.output, val_images=8, train_images=16)
    labeller.output.unlink()
    return ckpt, data


def run_demo(out_dir: Path, shared: Path | None, *, echo: Callable[[str], None] = print,
             progress: Callable[[str], None] | None = None):
    """Run the pipeline (export, quantize, gate) on a built-in default; return its PipelineResult."""
    from posequant.core.fileio import check_outputs, output_dir
    from posequant.pipeline import RUN_FILES

    out_dir = Path(out_dir)
    check_outputs({"-o/": (out_dir, RUN_FILES)}, {"--shared": shared})  # before minutes of work
    with output_dir(out_dir, "-o"):  # a failed demo leaves no empty folder behind
        return _run_demo(out_dir, shared, echo, progress)


def _run_demo(out_dir: Path, shared: Path | None, echo: Callable[[str], None], progress):
    from posequant.pipeline import format_pipeline, run_pipeline

    if shared is not None and (shared / TRAINED).is_dir() and (shared / COCO_MINI).is_dir():
        src, data = shared / TRAINED, shared / COCO_MINI
        echo(f"demo: the pipeline on the trained ultralight-simplepose model from {src}, calibrated on coco-mini "
             f"train, gated on coco-mini val with the CI budgets")
        result = run_pipeline(
            src / "ultralight_simplepose_coco_256x192.pth", data, data, out_dir,
            arch=f"{src / 'ultralight_simplepose.py'}:build_model", input_size=(256, 192), keypoints="coco",
            color="rgb", calib_split="train", val_split="val", budget=TRAINED_BUDGET, progress=progress)
        echo(format_pipeline(result))
        diff = original_onnx_parity(result.export.output, src / "ultralight_simplepose_coco_256x192.onnx", data)
        echo(f"parity with the model's original ONNX on 10 real crops: max abs diff {diff:.2e}")
        return result
    echo("demo: no shared/ data given; the pipeline on a Simple Baselines pose_resnet_18 (COCO, "
         f"{SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]}) with seeded random weights and a synthetic COCO set labelled by "
         "its own float predictions: this shows the mechanics and INT8's drift from float, not accuracy")
    ckpt, data = _synthetic_inputs(out_dir, progress)
    result = run_pipeline(ckpt, data, data, out_dir, input_size=SYNTHETIC_SIZE, calib_split="train", val_split="val",
                          budget=SYNTHETIC_BUDGET, flip=False, progress=progress)
    echo(format_pipeline(result))
    return result
