"""From a checkpoint to a ready PyTorch model: pick the architecture, build it, load strictly."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import torch

from posequant.core.errors import ArchitectureError
from posequant.core.metadata import IMAGENET_MEAN, IMAGENET_STD

from .checkpoint import Checkpoint
from .zoo import FAMILIES, build_custom, detect_architecture, mmpose


class LastHeatmaps(torch.nn.Module):
    """Exports one tensor: models with intermediate supervision (hourglass) return a list per stack."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        if isinstance(out, (list, tuple)):
            out = out[-1]
        return out


@dataclass
class PoseModel:
    module: torch.nn.Module  # returns N x J x h x w heatmaps, or (simcc_x, simcc_y) for a SimCC model
    family: str  # pose_resnet | pose_hrnet | hourglass | rtmpose | custom | torchscript
    name: str
    arch_config: dict[str, Any] = field(default_factory=dict)
    color: str = "rgb"  # defaults of the family's training pipeline
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_joints: int | None = None  # None until the model has been run (custom models)
    input_size: tuple[int, int] | None = None  # what the checkpoint says it was trained at (mmpose), if anything
    simcc_split_ratio: float | None = None  # a SimCC model (RTMPose): its head fixes the input size too

    @property
    def head(self) -> str:
        return "simcc" if self.simcc_split_ratio else "heatmap"

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


def load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with one-line errors that name the keys and shapes."""
    expected = model.state_dict()
    if set(sd) != set(expected):
        # a wrapper's own prefix (e.g. 'model.', 'backbone.') that the target does not have
        for prefix in {k.split(".", 1)[0] + "." for k in sd}:
            if all(k.startswith(prefix) for k in sd):
                trimmed = {k[len(prefix):]: v for k, v in sd.items()}
                if set(trimmed) == set(expected):
                    sd = trimmed
                    break
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} key(s) the model needs are missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) are not in the model (e.g. {', '.join(unexpected[:3])})")
        raise ArchitectureError(f"{where} does not fit the model: {'; '.join(parts)}")
    for key, want in expected.items():
        got = sd[key]
        if tuple(got.shape) != tuple(want.shape):
            raise ArchitectureError(
                f"{where}: key {key!r} has shape {tuple(got.shape)} but the model expects "
                f"{tuple(want.shape)}: the checkpoint was trained with another configuration")
    model.load_state_dict(sd, strict=True)


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_model(ckpt: Checkpoint, arch: str | None = None) -> PoseModel:
    """Build the model the checkpoint belongs to and load its weights strictly."""
    where = str(ckpt.path)
    if arch and (":" in arch or arch.endswith(".py") or "/" in arch):
        module = build_custom(arch)
        load_strict(module, ckpt.state_dict, where)
        return PoseModel(LastHeatmaps(module).eval(), "custom", type(module).__name__,
                         {"builder": arch})
    if arch and arch not in FAMILIES:
        raise ArchitectureError(
            f"--arch {arch!r} is not a known family{_suggest(arch, FAMILIES)}: use one of "
            f"{', '.join(FAMILIES)} or FILE.py:build_fn")
    if mmpose.layout_of(ckpt.state_dict):
        return _resolve_mmpose(ckpt, arch)
    if arch:
        fam = FAMILIES[arch]
        if not fam.matches(ckpt.state_dict):
            raise ArchitectureError(
                f"{where} is not a {fam.title} checkpoint: expected keys {', '.join(fam.signature)}")
    try:
        det = detect_architecture(ckpt.state_dict, where)
    except ArchitectureError:
        if ckpt.module is not None:  # TorchScript or trusted pickle of an unknown model: use it as is
            return PoseModel(LastHeatmaps(ckpt.module).eval(), "torchscript" if isinstance(
                ckpt.module, torch.jit.ScriptModule) else "custom", type(ckpt.module).__name__)
        raise
    model = det.build()
    load_strict(model, ckpt.state_dict, where)
    fam = det.family
    return PoseModel(LastHeatmaps(model).eval(), fam.name, det.name, det.config_dict(),
                     fam.color, fam.mean, fam.std, det.config.num_joints)


def _resolve_mmpose(ckpt: Checkpoint, arch: str | None) -> PoseModel:
    """An mmpose top-down heatmap checkpoint, in mmpose's module tree, with mmpose's test-time defaults."""
    where = str(ckpt.path)
    weights, mean, std = mmpose.split_preprocessor(ckpt.state_dict, where)
    det = detect_architecture(weights, where, mmpose.config_text(ckpt.meta))
    if arch and det.family.name != arch:
        raise ArchitectureError(f"{where} is an mmpose {det.family.title} checkpoint, not {arch}: drop --arch "
                                f"or use --arch {det.family.name}")
    pipeline = mmpose.read_pipeline(ckpt.meta, ckpt.path.name)
    if pipeline.decoding != "default":
        raise ArchitectureError(
            f"{where} was trained for {pipeline.decoding.upper()} heatmap decoding (says {pipeline.evidence}); "
            "posequant decodes as mmpose's default codec does (argmax + quarter-pixel offset) and has no "
            f"{pipeline.decoding.upper()} decoding yet, so its scores would be wrong: use a non-"
            f"{pipeline.decoding.upper()} mmpose checkpoint")
    model = det.build()
    load_strict(model, weights, where)
    default_mean, default_std = mmpose.default_normalisation()
    ratio = getattr(det.config, "simcc_split_ratio", None)  # RTMPose: its input size is the head's own
    size = det.config.input_size if ratio else pipeline.input_size
    # mmpose feeds RGB (bgr_to_rgb / channel_order='rgb') for ResNet too, unlike Simple Baselines' BGR
    return PoseModel(model if ratio else LastHeatmaps(model).eval(), det.family.name, det.name, det.config_dict(),
                     "rgb", mean or default_mean, std or default_std, det.config.num_joints, size, ratio)
