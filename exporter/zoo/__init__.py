"""The model zoo: architecture families, detected from a checkpoint's keys and shapes.

One file per family (``pose_resnet``, ``pose_hrnet``, ``hourglass``, ``rtmpose``); each exposes a config
dataclass, ``build(config)``, ``detect(state_dict)`` and a :class:`Family` record. Custom
architectures come in through :func:`import_builder` (``file.py:fn`` or ``pkg.module:fn``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from posequant.core.errors import ArchitectureError
from posequant.core.metadata import IMAGENET_MEAN, IMAGENET_STD

from . import hourglass, mmpose, pose_hrnet, pose_resnet, rtmpose
from ._common import Family, StateDict

FAMILIES: dict[str, Family] = {f.name: f for f in (pose_resnet.FAMILY, pose_hrnet.FAMILY, hourglass.FAMILY,
                                                   rtmpose.FAMILY)}
PRESETS: dict[str, tuple[Family, Any]] = {
    name: (fam, cfg) for fam in FAMILIES.values() for name, cfg in fam.presets.items()
}


@dataclasses.dataclass(frozen=True)
class Detected:
    family: Family
    config: Any

    @property
    def name(self) -> str:
        return self.config.name

    def build(self) -> torch.nn.Module:
        return self.family.build(self.config)

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


def detect_architecture(sd: StateDict, where: str = "checkpoint", config_text: str = "") -> Detected:
    """Which family and config produced ``sd``; ArchitectureError naming the expected keys if none.
    ``config_text``: the config an mmpose checkpoint saved (what its weights cannot say)."""
    layout = mmpose.layout_of(sd)
    if layout:
        return detect_mmpose(sd, layout, where, config_text)
    for fam in FAMILIES.values():
        if fam.matches(sd):
            try:
                return Detected(fam, fam.detect(sd))
            except (ValueError, KeyError, IndexError) as e:
                raise ArchitectureError(
                    f"{where} looks like {fam.title} but its layers are inconsistent ({e}); "
                    "pass --arch FILE.py:build_fn to load it into your own model definition") from None
    expected = "; ".join(f"{f.title}: {', '.join(f.signature)}" for f in FAMILIES.values())
    sample = ", ".join(list(sd)[:4]) + (", ..." if len(sd) > 4 else "")
    raise ArchitectureError(
        f"{where}: unknown architecture (keys start {sample}); expected the keys of one of "
        f"[{expected}]; for another model pass --arch FILE.py:build_fn")


def detect_mmpose(sd: StateDict, layout: str, where: str = "checkpoint", config_text: str = "") -> Detected:
    """An mmpose top-down checkpoint: the family from its backbone's keys, the head from the head's."""
    title = mmpose.TITLE[layout]
    backbone, head = mmpose.parts(sd, layout)
    if layout == "mmpose1" and rtmpose.is_rtmpose(backbone, head):  # RTMPose: CSPNeXt + RTMCCHead (SimCC)
        try:
            return Detected(rtmpose.FAMILY, rtmpose.detect(backbone, head, config_text))
        except (ValueError, KeyError, IndexError) as e:
            raise ArchitectureError(
                f"{where} looks like an {title} RTMPose model but its layers are inconsistent ({e}); "
                "pass --arch FILE.py:build_fn to load it into your own model definition") from None
    other = mmpose.not_heatmap_head(head)
    if other:
        raise ArchitectureError(f"{where} is an {title} model with {other}: not supported yet (posequant "
                                "exports top-down heatmap models)")
    view = {**backbone, **head}  # backbone and head key names do not overlap in these families
    for fam in FAMILIES.values():
        if fam.backbone_signature and all(k in backbone for k in fam.backbone_signature):
            try:
                cfg = fam.detect(view)
            except (ValueError, KeyError, IndexError) as e:
                raise ArchitectureError(
                    f"{where} looks like an {title} {fam.title} but its layers are inconsistent ({e}); "
                    "pass --arch FILE.py:build_fn to load it into your own model definition") from None
            # mmpose never builds a deconvolution bias: such a key is left for the strict load to name
            changes = {"layout": layout}
            if hasattr(cfg, "deconv_with_bias"):
                changes["deconv_with_bias"] = False
            cfg = dataclasses.replace(cfg, **changes)
            try:
                pose_resnet.check_layout(cfg)
            except ValueError as e:
                raise ArchitectureError(f"{where}: {e} is not supported") from None
            return Detected(fam, cfg)
    known = "; ".join(f"{f.title}: backbone.{', backbone.'.join(f.backbone_signature)}"
                      for f in FAMILIES.values() if f.backbone_signature)
    sample = ", ".join(list(backbone)[:3])
    raise ArchitectureError(
        f"{where}: an {title} checkpoint whose backbone is not one posequant builds (keys start backbone."
        f"{sample}); supported: [{known}]; for another model pass --arch FILE.py:build_fn")


def import_builder(spec: str) -> Callable[[], torch.nn.Module]:
    """``path/to/file.py:fn`` or ``package.module:fn`` -> the callable, with one-line errors."""
    target, sep, fn_name = spec.rpartition(":")
    if not sep or not target or not fn_name:
        raise ArchitectureError(f"--arch {spec!r} must be FILE.py:build_fn or package.module:build_fn")
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target)
            if not path.is_file():
                raise ArchitectureError(f"--arch file {path} not found: check the path")
            mod_name = f"posequant_arch_{abs(hash(str(path.resolve())))}"
            mod_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ArchitectureError:
        raise
    except Exception as e:  # the user's code: any error while importing it is theirs
        raise ArchitectureError(
            f"--arch {spec}: cannot import {target} ({type(e).__name__}: {e}); fix the file or "
            "the module path") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ArchitectureError(f"--arch {spec}: {target} has no function {fn_name!r}")
    return fn


def build_custom(spec: str) -> torch.nn.Module:
    fn = import_builder(spec)
    try:
        model = fn()
    except Exception as e:
        raise ArchitectureError(f"--arch {spec}: calling {fn.__name__}() failed ({type(e).__name__}: {e})") from None
    if not isinstance(model, torch.nn.Module):
        raise ArchitectureError(f"--arch {spec}: {fn.__name__}() returned {type(model).__name__}, not a torch nn.Module")
    return model.eval()


__all__ = [
    "FAMILIES", "PRESETS", "Family", "Detected", "detect_architecture", "import_builder",
    "build_custom", "detect_mmpose", "IMAGENET_MEAN", "IMAGENET_STD", "pose_resnet", "pose_hrnet", "hourglass",
    "mmpose", "rtmpose",
]
