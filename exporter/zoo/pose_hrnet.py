"""HRNet PoseHighResolutionNet (leoxiaobin/deep-high-resolution-net.pytorch, lib/models/pose_hrnet.py).

Module names and tensor shapes equal the official ones, so pose_hrnet_w32/w48 checkpoints load
with strict=True. The training pipeline reads RGB, /255, ImageNet mean/std.

mmpose's ``HRNet`` backbone has the official module names and shapes (its stem ``conv1``/``bn1``/
``conv2``/``bn2``, ``layer1``, ``transition*``, ``stage*`` with the same blocks, fuse layers and
single-output last module), so ``layout`` only moves it under ``backbone.`` and puts mmpose's
heatmap head (``keypoint_head.*`` / ``head.*``, see pose_resnet.HeatmapHead) after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from posequant.core.metadata import IMAGENET_MEAN, IMAGENET_STD

from ._common import BN_MOMENTUM, Family, StateDict, count_indices, has

# The official pose_hrnet.py defines the same two blocks as pose_resnet.py (same names and shapes);
# mmpose's heatmap head and top-down wrapper are shared too.
from .pose_resnet import (
    HEAD_NAME,
    BasicBlock,
    Bottleneck,
    HeatmapHead,
    TopDown,
    check_layout,
    detect_head,
    make_res_layer,
)

BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


@dataclass(frozen=True)
class StageConfig:
    num_modules: int
    block: str  # "BASIC" or "BOTTLENECK"
    num_blocks: tuple[int, ...]  # per branch
    num_channels: tuple[int, ...]  # per branch

    @property
    def num_branches(self) -> int:
        return len(self.num_channels)


def standard_stages(width: int) -> tuple[StageConfig, StageConfig, StageConfig]:
    """Stages 2-4 of the released w32/w48 configs (experiments/*/hrnet/w{32,48}_*.yaml)."""
    w = width
    return (
        StageConfig(1, "BASIC", (4, 4), (w, 2 * w)),
        StageConfig(4, "BASIC", (4, 4, 4), (w, 2 * w, 4 * w)),
        StageConfig(3, "BASIC", (4, 4, 4, 4), (w, 2 * w, 4 * w, 8 * w)),
    )


@dataclass(frozen=True)
class PoseHRNetConfig:
    stages: tuple[StageConfig, StageConfig, StageConfig]
    num_joints: int = 17
    final_conv_kernel: int = 1
    layout: str = "official"  # pose_resnet.LAYOUTS
    # mmpose heads only (the official HRNet has a bare final conv): deconvolutions and extra convs
    deconv_filters: tuple[int, ...] = ()
    deconv_kernels: tuple[int, ...] = ()
    conv_channels: tuple[int, ...] = ()
    conv_kernels: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        return self.stages[0].num_channels[0]

    @property
    def name(self) -> str:
        return f"pose_hrnet_w{self.width}"


class HighResolutionModule(nn.Module):
    def __init__(self, stage: StageConfig, num_inchannels: list[int], multi_scale_output=True):
        super().__init__()
        self.num_branches = stage.num_branches
        self.num_inchannels = num_inchannels
        self.multi_scale_output = multi_scale_output
        block = BLOCKS[stage.block]
        self.branches = nn.ModuleList(
            self._make_one_branch(i, block, stage.num_blocks[i], stage.num_channels[i])
            for i in range(self.num_branches)
        )
        self.fuse_layers = self._make_fuse_layers()
        self.relu = nn.ReLU(True)

    def _make_one_branch(self, i, block, num_blocks, channels):
        downsample = None
        if self.num_inchannels[i] != channels * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.num_inchannels[i], channels * block.expansion, 1, 1, bias=False),
                nn.BatchNorm2d(channels * block.expansion, momentum=BN_MOMENTUM),
            )
        layers = [block(self.num_inchannels[i], channels, 1, downsample)]
        self.num_inchannels[i] = channels * block.expansion
        layers += [block(self.num_inchannels[i], channels) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def _make_fuse_layers(self):
        if self.num_branches == 1:
            return None
        cin = self.num_inchannels
        fuse_layers = []
        for i in range(self.num_branches if self.multi_scale_output else 1):
            row = []
            for j in range(self.num_branches):
                if j > i:  # lower resolution: 1x1 conv, then nearest upsampling
                    row.append(nn.Sequential(
                        nn.Conv2d(cin[j], cin[i], 1, 1, 0, bias=False),
                        nn.BatchNorm2d(cin[i]),
                        nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
                    ))
                elif j == i:
                    row.append(None)
                else:  # higher resolution: (i - j) stride-2 3x3 convs
                    convs = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = cin[i] if last else cin[j]
                        layers = [nn.Conv2d(cin[j], cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout)]
                        if not last:
                            layers.append(nn.ReLU(True))
                        convs.append(nn.Sequential(*layers))
                    row.append(nn.Sequential(*convs))
            fuse_layers.append(nn.ModuleList(row))
        return nn.ModuleList(fuse_layers)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        fused = []
        for i, row in enumerate(self.fuse_layers):
            y = x[0] if i == 0 else row[0](x[0])
            for j in range(1, self.num_branches):
                y = y + (x[j] if i == j else row[j](x[j]))
            fused.append(self.relu(y))
        return fused


class HRNetBackbone(nn.Module):
    """Stem, layer1, transitions and stages: returns the highest-resolution branch."""

    def __init__(self, cfg: PoseHRNetConfig):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(Bottleneck, 64, 4)

        pre = [256]
        for n, stage in enumerate(cfg.stages, start=1):
            channels = [c * BLOCKS[stage.block].expansion for c in stage.num_channels]
            setattr(self, f"transition{n}", self._make_transition_layer(pre, channels))
            last = n == len(cfg.stages)
            modules, pre = self._make_stage(stage, channels, multi_scale_output=not last)
            setattr(self, f"stage{n + 1}", modules)
        self.branch_counts = [s.num_branches for s in cfg.stages]
        self.out_channels = pre[0]

    def _make_transition_layer(self, pre, cur):
        layers = []
        for i in range(len(cur)):
            if i < len(pre):
                layers.append(None if cur[i] == pre[i] else nn.Sequential(
                    nn.Conv2d(pre[i], cur[i], 3, 1, 1, bias=False),
                    nn.BatchNorm2d(cur[i]),
                    nn.ReLU(inplace=True),
                ))
            else:  # a new, lower-resolution branch grown from the lowest existing one
                convs = []
                for j in range(i + 1 - len(pre)):
                    cout = cur[i] if j == i - len(pre) else pre[-1]
                    convs.append(nn.Sequential(
                        nn.Conv2d(pre[-1], cout, 3, 2, 1, bias=False),
                        nn.BatchNorm2d(cout),
                        nn.ReLU(inplace=True),
                    ))
                layers.append(nn.Sequential(*convs))
        return nn.ModuleList(layers)

    def _make_layer(self, block, planes, blocks, stride=1):
        layer, self.inplanes = make_res_layer(block, self.inplanes, planes, blocks, stride)
        return layer

    def _make_stage(self, stage: StageConfig, num_inchannels, multi_scale_output=True):
        modules = []
        for i in range(stage.num_modules):
            # only the last module of the last stage drops the multi-scale outputs
            multi = multi_scale_output or i != stage.num_modules - 1
            modules.append(HighResolutionModule(stage, num_inchannels, multi))
            num_inchannels = modules[-1].num_inchannels
        return nn.Sequential(*modules), num_inchannels

    def forward(self, x):
        x = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        y_list = [self.layer1(x)]
        for n, branches in enumerate(self.branch_counts, start=1):
            transition = getattr(self, f"transition{n}")
            x_list = []
            for i in range(branches):
                # The official forward feeds every transition the lowest-resolution output; that only
                # runs when the changed branches are new ones, where it equals this (and this also
                # runs stage configs that change an existing branch's width).
                src = y_list[i] if i < len(y_list) else y_list[-1]
                x_list.append(src if transition[i] is None else transition[i](src))
            y_list = getattr(self, f"stage{n + 1}")(x_list)
        return y_list[0]


class PoseHighResolutionNet(HRNetBackbone):
    """The official tree: the backbone's modules and ``final_layer``."""

    def __init__(self, cfg: PoseHRNetConfig):
        super().__init__(cfg)
        k = cfg.final_conv_kernel
        self.final_layer = nn.Conv2d(self.out_channels, cfg.num_joints, k, 1, 1 if k == 3 else 0)

    def forward(self, x):
        return self.final_layer(super().forward(x))


def build(cfg: PoseHRNetConfig) -> nn.Module:
    check_layout(cfg)
    if len(cfg.deconv_filters) != len(cfg.deconv_kernels):
        raise ValueError("deconv_filters and deconv_kernels differ in length")
    if cfg.layout == "official":
        if cfg.deconv_filters:
            raise ValueError("the official HRNet has no deconvolutions (mmpose layouts only)")
        return PoseHighResolutionNet(cfg).eval()
    assert cfg.layout in HEAD_NAME
    backbone = HRNetBackbone(cfg)
    head = HeatmapHead(cfg.layout, backbone.out_channels, cfg.num_joints, cfg.deconv_filters, cfg.deconv_kernels,
                       cfg.conv_channels, cfg.conv_kernels, cfg.final_conv_kernel)
    return TopDown(cfg.layout, backbone, head).eval()


def _detect_stage(sd: StateDict, n: int) -> StageConfig:
    p = f"stage{n}."
    modules = count_indices(sd, p, ".branches.0.0.conv1.weight")
    branches = count_indices(sd, f"{p}0.branches.", ".0.conv1.weight")
    if modules == 0 or branches == 0:
        raise ValueError(f"no modules found under '{p}'")
    blocks = tuple(count_indices(sd, f"{p}0.branches.{b}.", ".conv1.weight") for b in range(branches))
    channels = tuple(sd[f"{p}0.branches.{b}.0.conv1.weight"].shape[0] for b in range(branches))
    block = "BOTTLENECK" if has(sd, f"{p}0.branches.0.0.conv3.weight") else "BASIC"
    return StageConfig(modules, block, blocks, channels)


def detect(sd: StateDict) -> PoseHRNetConfig:
    head = detect_head(sd)
    del head["deconv_with_bias"]  # neither the official HRNet nor mmpose has a deconv bias
    return PoseHRNetConfig(stages=tuple(_detect_stage(sd, n) for n in (2, 3, 4)), **head)


FAMILY = Family(
    name="pose_hrnet",
    title="HRNet PoseHighResolutionNet",
    signature=("conv1.weight", "transition1.0.0.weight", "stage2.0.branches.0.0.conv1.weight",
               "final_layer.weight"),
    config_type=PoseHRNetConfig,
    detect=detect,
    build=build,
    color="rgb",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    presets={f"pose_hrnet_w{w}": PoseHRNetConfig(standard_stages(w)) for w in (18, 32, 48)},
    backbone_signature=("conv1.weight", "transition1.0.0.weight", "stage2.0.branches.0.0.conv1.weight"),
)
