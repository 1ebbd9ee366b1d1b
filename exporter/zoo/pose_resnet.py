"""Simple Baselines PoseResNet (microsoft/human-pose-estimation.pytorch, lib/models/pose_resnet.py).

Module names and tensor shapes equal the official ones, so the released checkpoints
(pose_resnet_{50,101,152}_{256x256,384x384,256x192}.pth.tar) load with strict=True.
Training pipeline feeds cv2's BGR images, /255, then ImageNet mean/std (RGB-ordered values
applied to BGR channels, as the original code does).
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


def make_res_layer(block, inplanes, planes, blocks, stride=1):
    """A ResNet stage (``_make_layer`` of the official code); returns it and its output channels."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
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


@dataclass(frozen=True)
class PoseResNetConfig:
    depth: int = 50
    num_joints: int = 17
    deconv_filters: tuple[int, ...] = (256, 256, 256)
    deconv_kernels: tuple[int, ...] = (4, 4, 4)
    deconv_with_bias: bool = False
    final_conv_kernel: int = 1

    @property
    def name(self) -> str:
        return f"pose_resnet_{self.depth}"


class PoseResNet(nn.Module):
    def __init__(self, cfg: PoseResNetConfig):
        super().__init__()
        block, layers = RESNET_SPEC[cfg.depth]
        self.inplanes = 64
        self.deconv_with_bias = cfg.deconv_with_bias
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.deconv_layers = self._make_deconv_layer(cfg.deconv_filters, cfg.deconv_kernels)
        k = cfg.final_conv_kernel
        self.final_layer = nn.Conv2d(cfg.deconv_filters[-1], cfg.num_joints, k, 1, 1 if k == 3 else 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        layer, self.inplanes = make_res_layer(block, self.inplanes, planes, blocks, stride)
        return layer

    def _make_deconv_layer(self, filters, kernels):
        layers = []
        for planes, kernel in zip(filters, kernels):
            padding, output_padding = DECONV_PADDING[kernel]
            layers += [
                nn.ConvTranspose2d(self.inplanes, planes, kernel, 2, padding, output_padding,
                                   bias=self.deconv_with_bias),
                nn.BatchNorm2d(planes, momentum=BN_MOMENTUM),
                nn.ReLU(inplace=True),
            ]
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.final_layer(self.deconv_layers(x))


def build(cfg: PoseResNetConfig) -> PoseResNet:
    if cfg.depth not in RESNET_SPEC:
        raise ValueError(f"depth {cfg.depth} not in {sorted(RESNET_SPEC)}")
    if len(cfg.deconv_filters) != len(cfg.deconv_kernels):
        raise ValueError("deconv_filters and deconv_kernels differ in length")
    return PoseResNet(cfg).eval()


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
    n_deconv = count_indices(sd, "deconv_layers.", ".weight", step=3)
    deconv_w = [sd[f"deconv_layers.{3 * i}.weight"] for i in range(n_deconv)]
    final = sd["final_layer.weight"]
    return PoseResNetConfig(
        depth=depth,
        num_joints=final.shape[0],
        deconv_filters=tuple(w.shape[1] for w in deconv_w),
        deconv_kernels=tuple(w.shape[2] for w in deconv_w),
        deconv_with_bias=has(sd, "deconv_layers.0.bias"),
        final_conv_kernel=final.shape[2],
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
)
