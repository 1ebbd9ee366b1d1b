"""``inspect_checkpoint``: what a checkpoint holds and which architecture it was detected as."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .export import DEFAULT_INPUT_SIZE, probe_output
from .model import resolve_model


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    sha256: str
    container: str
    stripped_prefix: str
    family: str
    name: str
    arch_config: dict[str, Any] = field(default_factory=dict)
    num_joints: int | None = None
    num_parameters: int = 0
    num_tensors: int = 0
    default_input_size: tuple[int, int] | None = None
    color: str = ""
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["path"] = str(self.path)
        return d


def inspect_checkpoint(path: str | Path, *, arch: str | None = None, trust_pickle: bool = False) -> CheckpointInfo:
    ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
    pose = resolve_model(ckpt, arch)
    joints = pose.num_joints or probe_output(pose.module, (256, 192))[0]
    return CheckpointInfo(
        path=ckpt.path, sha256=ckpt.sha256, container=ckpt.container,
        stripped_prefix=ckpt.stripped_prefix, family=pose.family, name=pose.name,
        arch_config=pose.arch_config, num_joints=joints, num_parameters=pose.num_parameters,
        num_tensors=len(ckpt.state_dict),
        default_input_size=pose.input_size or (DEFAULT_INPUT_SIZE.get(joints, (256, 256)) if joints else None),
        color=pose.color, mean=tuple(pose.mean), std=tuple(pose.std),
    )
