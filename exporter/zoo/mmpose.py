"""mmpose top-down heatmap checkpoints: which layout a state_dict has, and what the checkpoint says
about its test-time pipeline.

Layouts (from mmpose's code, ``mmpose/models/detectors/top_down.py`` in 0.x and
``mmpose/models/pose_estimators/topdown.py`` in 1.x):

- ``mmpose0``: ``backbone.*`` + ``keypoint_head.*`` (``TopdownHeatmapSimpleHead``: ``deconv_layers``,
  ``final_layer``, the extra convs inside ``final_layer`` as ``final_layer.{0,1,...}``);
- ``mmpose1``: ``backbone.*`` + ``head.*`` (``HeatmapHead``: ``deconv_layers``, ``conv_layers``,
  ``final_layer``). ``data_preprocessor`` registers its mean/std as non-persistent buffers, so
  mmpose's own files have no ``data_preprocessor.*`` keys; where a converted file has them they
  are read as the normalisation (0-255 units), not loaded into the network.

The backbone is mmpose's ``ResNet``/``ResNetV1d`` or ``HRNet``; the families build it in mmpose's
module tree (``layout`` in their configs), so every key loads unrenamed and strictly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from posequant.core.errors import ArchitectureError, CheckpointError
from posequant.core.metadata import IMAGENET_MEAN, IMAGENET_STD

from ._common import StateDict

HEAD_PREFIX = {"mmpose0": "keypoint_head.", "mmpose1": "head."}
TITLE = {"mmpose0": "mmpose 0.x", "mmpose1": "mmpose 1.x"}
PREPROCESSOR = "data_preprocessor."
# mmpose's configs normalise in 0-255 units: mean 123.675/116.28/103.53, std 58.395/57.12/57.375 in
# RGB (1.x: bgr_to_rgb=True; 0.x: images loaded as RGB, ToTensor /255, then these /255 values).
# Those are exactly 255 x ImageNet's, so ImageNet in 0-1 units is the same normalisation.
MMPOSE_MEAN_255 = (123.675, 116.28, 103.53)
MMPOSE_STD_255 = (58.395, 57.12, 57.375)


def layout_of(sd: StateDict) -> str | None:
    """``mmpose0``/``mmpose1`` when the keys are a top-down model's ``backbone`` + head, else None."""
    if not any(k.startswith("backbone.") for k in sd):
        return None
    for layout, prefix in HEAD_PREFIX.items():
        if any(k.startswith(prefix) for k in sd):
            return layout
    return None


def parts(sd: StateDict, layout: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The backbone's and the head's keys without their prefixes (for detection only)."""
    head = HEAD_PREFIX[layout]
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return backbone, {k[len(head):]: v for k, v in sd.items() if k.startswith(head)}


def not_heatmap_head(head: StateDict) -> str | None:
    """What the head is when it is not a heatmap head (SimCC, regression), for a one-line refusal."""
    if any(k.startswith(("cls_x", "cls_y", "mlp", "gau.")) for k in head):
        return ("a SimCC head on a backbone posequant does not build for it (RTMPose's RTMCCHead on CSPNeXt is "
                "supported)")
    if any(k.startswith("fc.") for k in head) and "final_layer.weight" not in head:
        return "a regression head (fc: coordinates, not heatmaps)"
    return None


def split_preprocessor(sd: StateDict, where: str) -> tuple[dict[str, torch.Tensor], tuple | None, tuple | None]:
    """Remove ``data_preprocessor.mean/std``; return the weights and that mean/std in 0-1 units."""
    pre = {k[len(PREPROCESSOR):]: v for k, v in sd.items() if k.startswith(PREPROCESSOR)}
    if not pre:
        return dict(sd), None, None
    extra = sorted(set(pre) - {"mean", "std"})
    if extra:
        raise ArchitectureError(f"{where}: unexpected key {PREPROCESSOR}{extra[0]} (a data_preprocessor "
                                "has only mean and std); this is not a layout posequant reads")
    values = {}
    for name, t in pre.items():
        if t.numel() != 3:
            raise ArchitectureError(f"{where}: key {PREPROCESSOR}{name} has shape {tuple(t.shape)}, expected 3 "
                                    "values (one per colour channel)")
        values[name] = tuple(float(v) / 255 for v in t.flatten())
        shown = ", ".join(f"{v:g}" for v in t.flatten().tolist())
        if not all(math.isfinite(v) for v in values[name]) or (name == "std" and min(values[name]) <= 0):
            raise CheckpointError(f"{where}: key {PREPROCESSOR}{name} holds [{shown}]"
                                  f"{', a std that is not positive' if name == 'std' else ''}: the normalisation "
                                  "is damaged (a bad conversion); fix or remove the data_preprocessor keys and give "
                                  "--mean/--std")
    weights = {k: v for k, v in sd.items() if not k.startswith(PREPROCESSOR)}
    return weights, values.get("mean"), values.get("std")


# ---- what the saved config says (mmengine/mmcv keep it in checkpoint['meta']) ----------------------


@dataclass(frozen=True)
class SavedPipeline:
    """The checkpoint's test pipeline, as far as its file says."""

    decoding: str = "default"  # "default" (argmax + quarter offset; SimCC: argmax) | "udp" | "dark"
    input_size: tuple[int, int] | None = None  # (H, W)
    evidence: str = ""  # where the above was read


def config_text(meta: Any) -> str:
    """mmengine saves ``meta['cfg']`` (the config's text); mmcv-era runners may use ``config``."""
    if isinstance(meta, Mapping):
        for key in ("cfg", "config"):
            if isinstance(meta.get(key), str):
                return meta[key]
    return ""


_SIZE_IN_NAME = re.compile(r"(?<![\dx])(\d{2,4})x(\d{2,4})(?!\d)")


def _size_from_config(text: str) -> tuple[int, int] | None:
    # 1.x codec ``input_size=(192, 256)``; 0.x ``image_size=[192, 256]``: both (W, H)
    m = re.search(r"\b(?:input_size|image_size)\s*=\s*[\[(]\s*(\d+)\s*,\s*(\d+)\s*,?\s*[\])]", text)
    return (int(m.group(2)), int(m.group(1))) if m else None


def read_pipeline(meta: Any, filename: str) -> SavedPipeline:
    """Decoding and input size from the saved config, else from mmpose's file naming.

    A config that uses UDP (``UDPHeatmap`` codec, ``use_udp=True``) or DARK (``unbiased=True``,
    ``post_process='unbiased'``) was trained for another decoding; so were files whose mmpose
    name says ``udp``/``dark``. Without either, the checkpoint cannot say, and the default
    (MSRAHeatmap / post_process='default') is assumed.
    """
    text = config_text(meta)
    name = filename.lower()
    decoding, evidence = "default", ""
    if text:
        if re.search(r"UDPHeatmap|use_udp\s*=\s*True", text):
            decoding, evidence = "udp", "its saved config (UDP codec / use_udp=True)"
        elif re.search(r"unbiased\s*=\s*True|post_process\s*=\s*['\"]unbiased", text):
            decoding, evidence = "dark", "its saved config (unbiased=True: DARK decoding)"
        elif re.search(r"use_dark\s*=\s*True", text):
            decoding, evidence = "dark", "its saved config (SimCCLabel use_dark=True: DARK refinement)"
    if decoding == "default" and re.search(r"(^|[_\-.])udp([_\-.]|$)", name):
        decoding, evidence = "udp", "its file name (udp)"
    elif decoding == "default" and re.search(r"(^|[_\-.])dark([_\-.]|$)", name):
        decoding, evidence = "dark", "its file name (dark)"
    size = _size_from_config(text) if text else None
    if size is None:
        m = _SIZE_IN_NAME.search(name)  # mmpose names say HxW: coco-256x192 is H 256, W 192
        size = (int(m.group(1)), int(m.group(2))) if m else None
    return SavedPipeline(decoding, size, evidence)


def default_normalisation() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """mmpose's mean/std in posequant's 0-1 units: ImageNet's values exactly (see MMPOSE_MEAN_255)."""
    return IMAGENET_MEAN, IMAGENET_STD
