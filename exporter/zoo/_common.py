"""What every architecture family file shares: the Family record and state_dict helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

StateDict = Mapping[str, torch.Tensor]
BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class Family:
    """One architecture family: how to recognise, configure and build it, and how it was trained."""

    name: str
    title: str
    signature: tuple[str, ...]  # keys whose presence identifies the family
    config_type: type
    detect: Callable[[StateDict], Any]  # state_dict -> config (raises ValueError when inconsistent)
    build: Callable[[Any], torch.nn.Module]  # config -> model in eval mode
    color: str  # channel order of the training pipeline
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    presets: dict[str, Any] = field(default_factory=dict)
    # backbone keys (prefix removed) that identify the family inside an mmpose checkpoint; () = none
    backbone_signature: tuple[str, ...] = ()

    def matches(self, sd: StateDict) -> bool:
        return all(k in sd for k in self.signature)


def has(sd: StateDict, key: str) -> bool:
    return key in sd


def count_indices(sd: StateDict, prefix: str, suffix: str, step: int = 1) -> int:
    """How many consecutive ``prefix{i*step}suffix`` keys exist, from i = 0."""
    n = 0
    while f"{prefix}{n * step}{suffix}" in sd:
        n += 1
    return n
