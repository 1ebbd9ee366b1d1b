"""Stacked hourglass as in bearpaw/pytorch-pose (pose/models/hourglass.py, ``HourglassNet``).

Pre-activation bottlenecks (BN -> ReLU -> conv, expansion 2), any number of stacks and blocks.
Module names and shapes equal the official ones (hg_s{2,8}_b1 checkpoints load strictly).
The network returns one heatmap tensor per stack; the exporter keeps the last one.
Training pipeline: RGB, /255, minus the MPII mean (0.4404, 0.4440, 0.4327), no division by std.
The official code fixes depth 4, 128 features and a 64-channel stem; they are detected here too,
so smaller variants (used by our tests) work the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._common import Family, StateDict, count_indices

MPII_MEAN = (0.4404, 0.4440, 0.4327)


class Bottleneck(nn.Module):
    expansion = 2

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 2, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual


class Hourglass(nn.Module):
    def __init__(self, block, num_blocks, planes, depth):
        super().__init__()
        self.depth = depth
        hg = []
        for i in range(depth):
            # [skip branch, down branch, up branch] (+ the bottom branch at the innermost level)
            res = [self._make_residual(block, num_blocks, planes) for _ in range(4 if i == 0 else 3)]
            hg.append(nn.ModuleList(res))
        self.hg = nn.ModuleList(hg)

    @staticmethod
    def _make_residual(block, num_blocks, planes):
        return nn.Sequential(*[block(planes * block.expansion, planes) for _ in range(num_blocks)])

    def _forward(self, n, x):
        up1 = self.hg[n - 1][0](x)
        low1 = self.hg[n - 1][1](F.max_pool2d(x, 2, stride=2))
        low2 = self._forward(n - 1, low1) if n > 1 else self.hg[n - 1][3](low1)
        low3 = self.hg[n - 1][2](low2)
        return up1 + F.interpolate(low3, scale_factor=2)

    def forward(self, x):
        return self._forward(self.depth, x)


@dataclass(frozen=True)
class HourglassConfig:
    num_stacks: int = 2
    num_blocks: int = 1
    num_joints: int = 16
    depth: int = 4  # recursion depth of each hourglass (official: 4)
    num_feats: int = 128  # official: 128
    stem_channels: int = 64  # official: 64

    @property
    def name(self) -> str:
        return f"hg_s{self.num_stacks}_b{self.num_blocks}"


class HourglassNet(nn.Module):
    def __init__(self, cfg: HourglassConfig):
        super().__init__()
        block = Bottleneck
        self.inplanes = cfg.stem_channels
        self.num_feats = cfg.num_feats
        self.num_stacks = cfg.num_stacks
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=True)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_residual(block, self.inplanes, 1)
        self.layer2 = self._make_residual(block, self.inplanes, 1)
        self.layer3 = self._make_residual(block, self.num_feats, 1)
        self.maxpool = nn.MaxPool2d(2, stride=2)

        ch = self.num_feats * block.expansion
        hg, res, fc, score, fc_, score_ = [], [], [], [], [], []
        for i in range(cfg.num_stacks):
            hg.append(Hourglass(block, cfg.num_blocks, self.num_feats, cfg.depth))
            res.append(self._make_residual(block, self.num_feats, cfg.num_blocks))
            fc.append(self._make_fc(ch, ch))
            score.append(nn.Conv2d(ch, cfg.num_joints, 1, bias=True))
            if i < cfg.num_stacks - 1:  # intermediate supervision feeds back into the next stack
                fc_.append(nn.Conv2d(ch, ch, 1, bias=True))
                score_.append(nn.Conv2d(cfg.num_joints, ch, 1, bias=True))
        self.hg = nn.ModuleList(hg)
        self.res = nn.ModuleList(res)
        self.fc = nn.ModuleList(fc)
        self.score = nn.ModuleList(score)
        self.fc_ = nn.ModuleList(fc_)
        self.score_ = nn.ModuleList(score_)

    def _make_residual(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=True))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _make_fc(self, inplanes, outplanes):
        # official order: conv, then BN, then ReLU
        return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, bias=True), nn.BatchNorm2d(inplanes),
                             self.relu)

    def forward(self, x) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.maxpool(self.layer1(x))))
        out = []
        for i in range(self.num_stacks):
            y = self.fc[i](self.res[i](self.hg[i](x)))
            score = self.score[i](y)
            out.append(score)
            if i < self.num_stacks - 1:
                x = x + self.fc_[i](y) + self.score_[i](score)
        return out


def build(cfg: HourglassConfig) -> HourglassNet:
    return HourglassNet(cfg).eval()


def detect(sd: StateDict) -> HourglassConfig:
    score = sd["score.0.weight"]
    return HourglassConfig(
        num_stacks=count_indices(sd, "score.", ".weight"),
        num_blocks=count_indices(sd, "res.0.", ".conv1.weight"),
        num_joints=score.shape[0],
        depth=count_indices(sd, "hg.0.hg.", ".0.0.conv1.weight"),
        num_feats=score.shape[1] // Bottleneck.expansion,
        stem_channels=sd["conv1.weight"].shape[0],
    )


FAMILY = Family(
    name="hourglass",
    title="Stacked hourglass (bearpaw HourglassNet)",
    signature=("conv1.weight", "hg.0.hg.0.0.0.conv1.weight", "score.0.weight"),
    config_type=HourglassConfig,
    detect=detect,
    build=build,
    color="rgb",
    mean=MPII_MEAN,
    std=(1.0, 1.0, 1.0),
    presets={f"hg_s{s}_b{b}": HourglassConfig(num_stacks=s, num_blocks=b)
             for s, b in ((1, 1), (2, 1), (4, 1), (8, 1))},
)
