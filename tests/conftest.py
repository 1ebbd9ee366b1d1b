"""Shared fixtures: small random-weight models of every family, and the ../shared real data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posequant.demo import randomise
from posequant.exporter.zoo import hourglass, pose_hrnet, pose_resnet

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRAINED_DIR = SHARED / "models" / "ultralight-simplepose"
TRAINED_CKPT = TRAINED_DIR / "ultralight_simplepose_coco_256x192.pth"
TRAINED_ONNX = TRAINED_DIR / "ultralight_simplepose_coco_256x192.onnx"
TRAINED_ARCH = f"{TRAINED_DIR / 'ultralight_simplepose.py'}:build_model"
COCO_MINI = SHARED / "data" / "coco-mini"
MPII_MINI = SHARED / "data" / "mpii-mini"
MPII_CALIB = SHARED / "data" / "mpii-calib-images"

# Small configs of each official family (same code paths as the released sizes), with an input size.
SMALL = {
    "pose_resnet": (pose_resnet.PoseResNetConfig(depth=18, num_joints=16, deconv_filters=(32, 32, 32)), (64, 64)),
    "pose_hrnet": (pose_hrnet.PoseHRNetConfig(pose_hrnet.standard_stages(8), num_joints=17), (128, 96)),
    "hourglass": (hourglass.HourglassConfig(num_stacks=2, num_blocks=1, num_joints=16, num_feats=16,
                                            stem_channels=16), (64, 64)),
}
BUILDERS = {"pose_resnet": pose_resnet.build, "pose_hrnet": pose_hrnet.build, "hourglass": hourglass.build}


def small_model(family: str, seed: int = 0) -> torch.nn.Module:
    cfg, _ = SMALL[family]
    torch.manual_seed(seed)
    return randomise(BUILDERS[family](cfg), seed)


def pytest_addoption(parser):
    parser.addoption("--qemu", action="store_true",
                     help="run the tests marked qemu, under qemu-x86_64 (make test-avx2); without it they are skipped")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--qemu"):
        return
    skip = pytest.mark.skip(reason="runs under qemu-x86_64: make test-avx2")
    for item in items:
        if "qemu" in item.keywords:
            item.add_marker(skip)


def needs_shared(*paths: Path):
    missing = [p for p in paths if not p.exists()]
    return pytest.mark.skipif(bool(missing), reason=f"../shared not available ({missing[:1]})")


@pytest.fixture(scope="session")
def small_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One plain state_dict file per family, saved once per session."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for family in SMALL:
        path = d / f"{family}.pth"
        torch.save(small_model(family).state_dict(), path)
        out[family] = path
    return out
