"""Simple Baselines PoseResNet (microsoft/human-pose-estimation.pytorch, lib/models/pose_resnet.py).

Module names and tensor shapes equal the official ones, so the released checkpoints
(pose_resnet_{50,101,152}_{256x256,384x384,256x192}.pth.tar) load with strict=True.
Training pipeline feeds cv2's BGR images, /255, then ImageNet mean/std (RGB-ordered values
applied to BGR channels, as the original code does).

``layout`` builds the same network with mmpose's module tree instead (``TopdownHeatmapSimpleHead``
/ ``HeatmapHead`` on mmpose's ``ResNet``/``ResNetV1d``, see ``mmpose.py``): ``backbone.*`` plus
``keypoint_head.*`` (0.x) or ``head.*`` (1.x), ResNetV1d's deep ``stem`` and average-pool
downsampling, and the head's extra conv layers, so mmpose checkpoints load strictly unrenamed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from posequant.core.metadata import IMAGENET_MEAN, IMAGENET_STD

from ._common import BN_MOMENTUM, Family, StateDict, count_indices, has


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


def make_res_layer(block, inplanes, planes, blocks, stride=1, avg_down=False):
    """A ResNet stage (``_make_layer`` of the official code); returns it and its output channels.

    ``avg_down``: mmpose's ResNetV1d downsampling (``ResLayer``): a 2x2 average pool, then a
    stride-1 1x1 conv, so the shortcut's conv sits at ``downsample.1`` instead of ``downsample.0``.
    """
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        pool, conv_stride = [], stride
        if avg_down and stride != 1:
            pool, conv_stride = [nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)], 1
        downsample = nn.Sequential(
            *pool,
            nn.Conv2d(inplanes, planes * block.expansion, 1, conv_stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion, momentum=BN_MOMENTUM),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    inplanes = planes * block.expansion
    layers += [block(inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), inplanes


RESNET_SPEC = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}

# kernel -> (padding, output_padding), so that every deconvolution exactly doubles the size
DECONV_PADDING = {4: (1, 0), 3: (1, 1), 2: (0, 0)}

# Where the weights sit: the official flat tree, or mmpose's backbone + head (mmpose.py reads them).
LAYOUTS = ("official", "mmpose0", "mmpose1")
HEAD_NAME = {"mmpose0": "keypoint_head", "mmpose1": "head"}


@dataclass(frozen=True)
class PoseResNetConfig:
    depth: int = 50
    num_joints: int = 17
    deconv_filters: tuple[int, ...] = (256, 256, 256)
    deconv_kernels: tuple[int, ...] = (4, 4, 4)
    deconv_with_bias: bool = False
    final_conv_kernel: int = 1
    layout: str = "official"  # one of LAYOUTS
    deep_stem: bool = False  # mmpose ResNetV1d: three 3x3 convs (`stem.*`) instead of conv1/bn1
    avg_down: bool = False  # mmpose ResNetV1d: average-pool shortcut downsampling
    conv_channels: tuple[int, ...] = ()  # mmpose head's extra conv+BN+ReLU layers before final_layer
    conv_kernels: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"pose_resnet{'v1d' if self.deep_stem else ''}_{self.depth}"


class ConvModule(nn.Module):
    """mmcv's ConvModule as mmpose's deep stem uses it: ``conv`` (no bias), ``bn``, ReLU."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class ResNetBackbone(nn.Module):
    """The stem and four stages; key names of the official PoseResNet and of mmpose's ResNet(V1d)."""

    def __init__(self, cfg: PoseResNetConfig):
        super().__init__()
        block, layers = RESNET_SPEC[cfg.depth]
        self.inplanes = 64
        self.avg_down = cfg.avg_down
        if cfg.deep_stem:
            self.stem = nn.Sequential(ConvModule(3, 32, 2), ConvModule(32, 32, 1), ConvModule(32, 64, 1))
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)

    def _make_layer(self, block, planes, blocks, stride=1):
        layer, self.inplanes = make_res_layer(block, self.inplanes, planes, blocks, stride, self.avg_down)
        return layer

    def features(self, x):
        x = self.stem(x) if hasattr(self, "stem") else self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(self.maxpool(x)))))

    forward = features


def make_deconv_layers(inplanes, filters, kernels, bias=False) -> nn.Sequential:
    layers = []
    for planes, kernel in zip(filters, kernels):
        padding, output_padding = DECONV_PADDING[kernel]
        layers += [
            nn.ConvTranspose2d(inplanes, planes, kernel, 2, padding, output_padding, bias=bias),
            nn.BatchNorm2d(planes, momentum=BN_MOMENTUM),
            nn.ReLU(inplace=True),
        ]
        inplanes = planes
    return nn.Sequential(*layers)


def make_conv_layers(inplanes, channels, kernels) -> list[nn.Module]:
    """mmpose's intermediate head convs: Conv2d (with bias, 'same' padding), BN, ReLU each."""
    layers = []
    for planes, kernel in zip(channels, kernels):
        layers += [nn.Conv2d(inplanes, planes, kernel, 1, (kernel - 1) // 2),
                   nn.BatchNorm2d(planes, momentum=BN_MOMENTUM), nn.ReLU(inplace=True)]
        inplanes = planes
    return layers


def final_conv(inplanes, joints, kernel) -> nn.Conv2d:
    return nn.Conv2d(inplanes, joints, kernel, 1, 1 if kernel == 3 else 0)


class HeatmapHead(nn.Module):
    """mmpose's top-down heatmap head, module for module.

    0.x ``TopdownHeatmapSimpleHead``: ``deconv_layers``, then ``final_layer`` (a bare conv, or a
    Sequential of the extra conv/BN/ReLU layers ending in the conv: ``final_layer.{3n}``).
    1.x ``HeatmapHead``: ``deconv_layers``, ``conv_layers``, ``final_layer`` (always a bare conv).
    Both build deconvolutions without bias; empty parts are ``nn.Identity`` (no keys).
    """

    def __init__(self, layout, inplanes, joints, deconv_filters, deconv_kernels, conv_channels, conv_kernels,
                 final_kernel, deconv_bias=False):
        super().__init__()
        self.deconv_layers = (make_deconv_layers(inplanes, deconv_filters, deconv_kernels, deconv_bias)
                              if deconv_filters else nn.Identity())
        inplanes = deconv_filters[-1] if deconv_filters else inplanes
        convs = make_conv_layers(inplanes, conv_channels, conv_kernels)
        inplanes = conv_channels[-1] if conv_channels else inplanes
        final = final_conv(inplanes, joints, final_kernel)
        if layout == "mmpose1":
            self.conv_layers = nn.Sequential(*convs) if convs else nn.Identity()
            self.final_layer = final
        else:
            self.conv_layers = nn.Identity()
            self.final_layer = nn.Sequential(*convs, final) if convs else final

    def forward(self, x):
        return self.final_layer(self.conv_layers(self.deconv_layers(x)))


class TopDown(nn.Module):
    """mmpose's top-down model: ``backbone`` then ``keypoint_head`` (0.x ``TopDown``) or ``head``
    (1.x ``TopdownPoseEstimator``); the backbone returns the one feature map the head reads."""

    def __init__(self, layout: str, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head_name = HEAD_NAME[layout]
        setattr(self, self.head_name, head)

    def forward(self, x):
        return getattr(self, self.head_name)(self.backbone(x))


class PoseResNet(ResNetBackbone):
    """The official flat tree: the backbone's modules, ``deconv_layers`` and ``final_layer``."""

    def __init__(self, cfg: PoseResNetConfig):
        super().__init__(cfg)
        self.deconv_layers = make_deconv_layers(self.inplanes, cfg.deconv_filters, cfg.deconv_kernels,
                                                cfg.deconv_with_bias)
        inplanes = cfg.deconv_filters[-1] if cfg.deconv_filters else self.inplanes
        self.final_layer = final_conv(inplanes, cfg.num_joints, cfg.final_conv_kernel)

    def forward(self, x):
        return self.final_layer(self.deconv_layers(self.features(x)))


def check_layout(cfg) -> None:
    """Options that only one layout has (shared with pose_hrnet)."""
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"layout {cfg.layout!r} not in {LAYOUTS}")
    if len(cfg.conv_channels) != len(cfg.conv_kernels):
        raise ValueError("conv_channels and conv_kernels differ in length")
    if cfg.layout == "official" and cfg.conv_channels:
        raise ValueError("the official code has no extra head conv layers (mmpose layouts only)")
    if cfg.layout == "mmpose1" and cfg.final_conv_kernel != 1:
        # 1.x takes the final conv's padding from the config (default 0), which the weights do not record
        raise ValueError(f"an mmpose 1.x final_layer with kernel {cfg.final_conv_kernel} (its padding is "
                         "not recorded in the weights)")


def build(cfg: PoseResNetConfig):
    if cfg.depth not in RESNET_SPEC:
        raise ValueError(f"depth {cfg.depth} not in {sorted(RESNET_SPEC)}")
    if len(cfg.deconv_filters) != len(cfg.deconv_kernels):
        raise ValueError("deconv_filters and deconv_kernels differ in length")
    check_layout(cfg)
    if cfg.layout == "official":
        if cfg.deep_stem or cfg.avg_down:
            raise ValueError("deep_stem/avg_down are mmpose's ResNetV1d (mmpose layouts only)")
        return PoseResNet(cfg).eval()
    backbone = ResNetBackbone(cfg)
    head = HeatmapHead(cfg.layout, backbone.inplanes, cfg.num_joints, cfg.deconv_filters, cfg.deconv_kernels,
                       cfg.conv_channels, cfg.conv_kernels, cfg.final_conv_kernel, cfg.deconv_with_bias)
    return TopDown(cfg.layout, backbone, head).eval()


def detect_head(sd: StateDict) -> dict:
    """The head's config from its keys (official, or mmpose's with the ``head.`` prefix removed)."""
    n_deconv = count_indices(sd, "deconv_layers.", ".weight", step=3)
    deconv_w = [sd[f"deconv_layers.{3 * i}.weight"] for i in range(n_deconv)]
    if has(sd, "final_layer.weight"):
        final = sd["final_layer.weight"]
        n_conv = count_indices(sd, "conv_layers.", ".weight", step=3)  # mmpose 1.x
        conv_w = [sd[f"conv_layers.{3 * i}.weight"] for i in range(n_conv)]
    else:  # mmpose 0.x: the extra convs and the final conv share one Sequential
        n = count_indices(sd, "final_layer.", ".weight", step=3)
        if n == 0:
            raise KeyError("final_layer.weight")
        conv_w = [sd[f"final_layer.{3 * i}.weight"] for i in range(n - 1)]
        final = sd[f"final_layer.{3 * (n - 1)}.weight"]
    return dict(
        num_joints=final.shape[0],
        deconv_filters=tuple(w.shape[1] for w in deconv_w),
        deconv_kernels=tuple(w.shape[2] for w in deconv_w),
        deconv_with_bias=has(sd, "deconv_layers.0.bias"),
        final_conv_kernel=final.shape[2],
        conv_channels=tuple(w.shape[0] for w in conv_w),
        conv_kernels=tuple(w.shape[2] for w in conv_w),
    )


def detect(sd: StateDict) -> PoseResNetConfig:
    """Read the config back from a state_dict (the inverse of ``build``)."""
    bottleneck = has(sd, "layer1.0.conv3.weight")
    blocks = tuple(count_indices(sd, f"layer{i}.", ".conv1.weight") for i in range(1, 5))
    depth = next((d for d, (b, n) in RESNET_SPEC.items()
                  if n == blocks and (b is Bottleneck) == bottleneck), None)
    if depth is None:
        kind = "Bottleneck" if bottleneck else "BasicBlock"
        raise ValueError(f"ResNet stages with {list(blocks)} {kind} blocks match no depth in "
                         f"{sorted(RESNET_SPEC)}")
    return PoseResNetConfig(
        depth=depth,
        deep_stem=has(sd, "stem.0.conv.weight"),
        avg_down=has(sd, "layer2.0.downsample.1.weight") and sd["layer2.0.downsample.1.weight"].dim() == 4,
        **detect_head(sd),
    )


FAMILY = Family(
    name="pose_resnet",
    title="Simple Baselines PoseResNet",
    signature=("conv1.weight", "layer1.0.conv1.weight", "deconv_layers.0.weight", "final_layer.weight"),
    config_type=PoseResNetConfig,
    detect=detect,
    build=build,
    color="bgr",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    presets={f"pose_resnet_{d}": PoseResNetConfig(depth=d) for d in RESNET_SPEC},
    backbone_signature=("layer1.0.conv1.weight", "layer4.0.conv1.weight"),
)
