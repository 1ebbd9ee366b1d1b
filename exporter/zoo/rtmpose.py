"""RTMPose (mmpose 1.x ``TopdownPoseEstimator``): the CSPNeXt backbone and the RTMCCHead SimCC head, written
from mmpose's definitions in its module tree, so mmpose's checkpoints load strictly with their own key names.

Read from open-mmlab/mmpose (and mmdet's CSPNeXt, which the configs name with ``_scope_='mmdet'``; the same
network): ``models/backbones/cspnext.py`` (``CSPNeXt``: a three-ConvModule ``stem``, then ``stage1..4``, each
a stride-2 ConvModule, the last stage's ``SPPBottleneck`` from ``csp_darknet.py``, and a ``CSPLayer``),
``models/utils/csp_layer.py`` (``CSPLayer``: ``main_conv``/``short_conv``/``final_conv``, ``blocks`` of
``CSPNeXtBlock``, ``attention`` = ``ChannelAttention``), ``models/heads/coord_cls_heads/rtmcc_head.py``
(``RTMCCHead``: ``final_layer`` conv, ``mlp`` = ScaleNorm + Linear, ``gau`` = ``RTMCCBlock``, ``cls_x``/
``cls_y``), ``models/utils/rtmcc_block.py`` (the gated attention unit, ``Scale``) and
``models/utils/transformer.py`` (``ScaleNorm``). mmcv's ``ConvModule`` is conv (no bias) -> ``bn`` -> the
activation; ``DepthwiseSeparableConvModule`` is ``depthwise_conv`` then ``pointwise_conv``.

Everything is read from the weights: the stages' widths (``widen_factor``: the stem's channels / 64), their
blocks (``deepen_factor``), expand ratio, channel attention, depthwise stages; the head's joints, kernel,
hidden size, attention size and expansion, relative position bias; the input size and split ratio from
``cls_x``/``cls_y`` and the flattened feature map (H/32 x W/32). The saved config (mmengine's ``meta``)
gives what weights cannot: BatchNorm's eps (RTMPose's ``SyncBN``: 1e-5), the GAU's activation (SiLU).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from posequant.core.metadata import IMAGENET_MEAN, IMAGENET_STD

from ._common import Family, StateDict, count_indices, has

# CSPNeXt's arch settings (in, out, blocks, add_identity, use_spp) per stage, before widen/deepen
ARCH = {"P5": ((64, 128, 3, True, False), (128, 256, 6, True, False), (256, 512, 6, True, False),
               (512, 1024, 3, False, True)),
        "P6": ((64, 128, 3, True, False), (128, 256, 6, True, False), (256, 512, 6, True, False),
               (512, 768, 3, True, False), (768, 1024, 3, False, True))}
STRIDE = 32  # the backbone's last stage: the head's feature map is input / 32
SIZES = {0.375: "t", 0.5: "s", 0.75: "m", 1.0: "l", 1.25: "x"}  # widen_factor -> mmpose's model name


# ---- mmcv bricks -----------------------------------------------------------------------------------


class ConvModule(nn.Module):
    """mmcv's ConvModule with a norm: ``conv`` (no bias), ``bn``, then SiLU (``act=False``: none)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, eps: float = 1e-5,
                 act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=eps)
        self.activate = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, eps: float = 1e-5):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, k, stride, groups=cin, eps=eps)
        self.pointwise_conv = ConvModule(cin, cout, 1, eps=eps)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


def _conv(depthwise: bool, cin: int, cout: int, k: int, stride: int, eps: float) -> nn.Module:
    return DepthwiseSeparableConvModule(cin, cout, k, stride, eps) if depthwise else ConvModule(cin, cout, k, stride,
                                                                                                  eps=eps)


# ---- CSPNeXt -----------------------------------------------------------------------------------------


class ChannelAttention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, channels, 1, 1, 0, bias=True)
        self.act = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.act(self.fc(self.global_avgpool(x)))


class CSPNeXtBlock(nn.Module):
    def __init__(self, channels: int, add_identity: bool, depthwise: bool, eps: float, kernel_size: int = 5):
        super().__init__()
        self.conv1 = _conv(depthwise, channels, channels, 3, 1, eps)  # expansion 1.0 inside a CSPLayer
        self.conv2 = DepthwiseSeparableConvModule(channels, channels, kernel_size, 1, eps)
        self.add_identity = add_identity

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        return out + x if self.add_identity else out


class CSPLayer(nn.Module):
    def __init__(self, cin: int, cout: int, expand_ratio: float, num_blocks: int, add_identity: bool,
                 depthwise: bool, channel_attention: bool, eps: float):
        super().__init__()
        mid = int(cout * expand_ratio)
        self.main_conv = ConvModule(cin, mid, 1, eps=eps)
        self.short_conv = ConvModule(cin, mid, 1, eps=eps)
        self.final_conv = ConvModule(2 * mid, cout, 1, eps=eps)
        self.blocks = nn.Sequential(*[CSPNeXtBlock(mid, add_identity, depthwise, eps) for _ in range(num_blocks)])
        self.attention = ChannelAttention(2 * mid) if channel_attention else None

    def forward(self, x):
        y = torch.cat((self.blocks(self.main_conv(x)), self.short_conv(x)), dim=1)
        if self.attention is not None:
            y = self.attention(y)
        return self.final_conv(y)


class SPPBottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float, kernel_sizes=(5, 9, 13)):
        super().__init__()
        mid = cin // 2
        self.conv1 = ConvModule(cin, mid, 1, eps=eps)
        self.poolings = nn.ModuleList([nn.MaxPool2d(k, 1, k // 2) for k in kernel_sizes])
        self.conv2 = ConvModule(mid * (len(kernel_sizes) + 1), cout, 1, eps=eps)

    def forward(self, x):
        x = self.conv1(x)
        return self.conv2(torch.cat([x] + [pool(x) for pool in self.poolings], dim=1))


class CSPNeXt(nn.Module):
    """``out_indices=(last stage,)``: the one feature map RTMCCHead reads."""

    def __init__(self, cfg: "RTMPoseConfig"):
        super().__init__()
        w, eps = cfg.widen_factor, cfg.bn_eps
        first = ARCH[cfg.arch][0][0]
        self.stem = nn.Sequential(ConvModule(3, int(first * w // 2), 3, 2, eps=eps),
                                  ConvModule(int(first * w // 2), int(first * w // 2), 3, 1, eps=eps),
                                  ConvModule(int(first * w // 2), int(first * w), 3, 1, eps=eps))
        self.num_stages = len(ARCH[cfg.arch])
        for i, ((cin, cout, _, identity, spp), blocks) in enumerate(zip(ARCH[cfg.arch], cfg.stage_blocks), start=1):
            cin, cout = int(cin * w), int(cout * w)
            stage = [_conv(cfg.depthwise, cin, cout, 3, 2, eps)]
            if spp:
                stage.append(SPPBottleneck(cout, cout, eps))
            stage.append(CSPLayer(cout, cout, cfg.expand_ratio, blocks, identity, cfg.depthwise,
                                  cfg.channel_attention, eps))
            self.add_module(f"stage{i}", nn.Sequential(*stage))

    def forward(self, x):
        x = self.stem(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"stage{i}")(x)
        return x


# ---- RTMCCHead ------------------------------------------------------------------------------------------


class ScaleNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.scale = dim ** -0.5
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x):
        norm = torch.linalg.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class Scale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.scale


def rope(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Rotary position embedding over axis ``dim`` (mmpose's ``rope``, one spatial axis)."""
    shape = x.shape
    position = torch.arange(shape[dim], dtype=torch.int, device=x.device)
    for _ in range(dim + 1, len(shape) - 1):
        position = position.unsqueeze(-1)
    half = shape[-1] // 2
    inv_freq = 10000 ** (torch.arange(half, dtype=torch.int, device=x.device) / float(half))
    sinusoid = position[..., None] * inv_freq[None, None, :]
    sin, cos = torch.sin(sinusoid), torch.cos(sinusoid)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RTMCCBlock(nn.Module):
    """The gated attention unit, self-attention form (the one RTMCCHead builds), dropout and drop path off."""

    def __init__(self, num_token: int, dims: int, e: int, s: int, act: str, use_rel_bias: bool, pos_enc: bool):
        super().__init__()
        self.s, self.e, self.use_rel_bias, self.pos_enc = s, e, use_rel_bias, pos_enc
        if use_rel_bias:
            self.w = nn.Parameter(torch.zeros(2 * num_token - 1))
        self.o = nn.Linear(e, dims, bias=False)
        self.uv = nn.Linear(dims, 2 * e + s, bias=False)
        self.gamma = nn.Parameter(torch.zeros(2, s))
        self.beta = nn.Parameter(torch.zeros(2, s))
        self.ln = ScaleNorm(dims)
        self.act_fn = nn.SiLU() if act == "SiLU" else nn.ReLU()
        self.res_scale = Scale(dims)  # in dims == out dims in RTMCCHead: the shortcut is always there
        self.sqrt_s = math.sqrt(s)

    def rel_pos_bias(self, seq_len: int) -> torch.Tensor:
        t = F.pad(self.w[:2 * seq_len - 1], [0, seq_len]).repeat(seq_len)
        t = t[..., :-seq_len].reshape(-1, seq_len, 3 * seq_len - 2)
        r = (2 * seq_len - 1) // 2
        return t[..., r:-r]

    def forward(self, inputs):
        x = self.act_fn(self.uv(self.ln(inputs)))
        u, v, base = torch.split(x, [self.e, self.e, self.s], dim=2)
        base = base.unsqueeze(2) * self.gamma[None, None, :] + self.beta
        if self.pos_enc:
            base = rope(base, dim=1)
        q, k = torch.unbind(base, dim=2)
        qk = torch.bmm(q, k.permute(0, 2, 1))
        if self.use_rel_bias:
            qk = qk + self.rel_pos_bias(q.size(1))[:, :q.size(1), :k.size(1)]
        kernel = torch.square(F.relu(qk / self.sqrt_s))
        return self.res_scale(inputs) + self.o(u * torch.bmm(kernel, v))


class RTMCCHead(nn.Module):
    def __init__(self, cfg: "RTMPoseConfig"):
        super().__init__()
        h, w = cfg.input_size
        fh, fw = h // STRIDE, w // STRIDE
        k = cfg.final_kernel
        self.final_layer = nn.Conv2d(cfg.in_channels, cfg.num_joints, k, 1, k // 2)
        self.mlp = nn.Sequential(ScaleNorm(fh * fw), nn.Linear(fh * fw, cfg.hidden_dims, bias=False))
        self.gau = RTMCCBlock(cfg.num_joints, cfg.hidden_dims, int(cfg.hidden_dims * cfg.expansion_factor), cfg.s,
                              cfg.act_fn, cfg.use_rel_bias, cfg.pos_enc)
        self.cls_x = nn.Linear(cfg.hidden_dims, int(w * cfg.simcc_split_ratio), bias=False)
        self.cls_y = nn.Linear(cfg.hidden_dims, int(h * cfg.simcc_split_ratio), bias=False)

    def forward(self, feats):
        x = self.gau(self.mlp(torch.flatten(self.final_layer(feats), 2)))
        return self.cls_x(x), self.cls_y(x)


class RTMPose(nn.Module):
    """Returns (simcc_x N x J x W*r, simcc_y N x J x H*r)."""

    def __init__(self, cfg: "RTMPoseConfig"):
        super().__init__()
        self.backbone = CSPNeXt(cfg)
        self.head = RTMCCHead(cfg)

    def forward(self, x):
        return self.head(self.backbone(x))


# ---- config, build, detect -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RTMPoseConfig:
    widen_factor: float = 0.375
    stage_blocks: tuple[int, ...] = (1, 1, 1, 1)  # CSPNeXt blocks per stage: max(round(n * deepen_factor), 1)
    arch: str = "P5"
    expand_ratio: float = 0.5
    channel_attention: bool = True
    depthwise: bool = False
    bn_eps: float = 1e-5  # RTMPose's configs: norm_cfg=dict(type='SyncBN')
    num_joints: int = 17
    input_size: tuple[int, int] = (256, 192)  # H x W
    simcc_split_ratio: float = 2.0
    final_kernel: int = 7
    hidden_dims: int = 256
    s: int = 128
    expansion_factor: float = 2.0
    act_fn: str = "SiLU"
    use_rel_bias: bool = False
    pos_enc: bool = False
    layout: str = "mmpose1"

    @property
    def in_channels(self) -> int:
        return int(ARCH[self.arch][-1][1] * self.widen_factor)

    @property
    def name(self) -> str:
        size = SIZES.get(self.widen_factor, f"w{self.widen_factor:g}")
        joints = {17: "coco", 133: "wholebody", 26: "halpe26"}.get(self.num_joints, f"{self.num_joints}kpt")
        return f"rtmpose-{size}_{joints}-{self.input_size[0]}x{self.input_size[1]}"


def build(cfg: RTMPoseConfig) -> RTMPose:
    if cfg.arch not in ARCH or len(cfg.stage_blocks) != len(ARCH[cfg.arch]):
        raise ValueError(f"arch {cfg.arch} with {len(cfg.stage_blocks)} stages")
    if cfg.input_size[0] % STRIDE or cfg.input_size[1] % STRIDE:
        raise ValueError(f"input size {cfg.input_size} is not a multiple of the backbone's stride {STRIDE}")
    return RTMPose(cfg).eval()


def is_rtmpose(backbone: StateDict, head: StateDict) -> bool:
    """mmpose's CSPNeXt keys (prefix removed) with an RTMCCHead."""
    return all(k in backbone for k in BACKBONE_SIGNATURE) and all(k in head for k in HEAD_SIGNATURE)


def _stage_conv(sd: StateDict, i: int) -> str:
    return f"stage{i}.0.conv.weight" if has(sd, f"stage{i}.0.conv.weight") else f"stage{i}.0.pointwise_conv.conv.weight"


def detect(backbone: StateDict, head: StateDict, config_text: str = "") -> RTMPoseConfig:
    """The config from the weights (prefixes removed), and from the saved config what they cannot say.
    Raises ValueError when the weights are inconsistent with any RTMPose."""
    arch = "P6" if has(backbone, "stage5.0.conv.weight") or has(backbone, "stage5.0.pointwise_conv.conv.weight") \
        else "P5"
    widen = backbone["stem.2.conv.weight"].shape[0] / ARCH[arch][0][0]
    for i, (_, cout, *_rest) in enumerate(ARCH[arch], start=1):
        got = backbone[_stage_conv(backbone, i)].shape[0]
        if got != int(cout * widen):
            raise ValueError(f"stage{i} has {got} channels, not {int(cout * widen)} (widen factor {widen:g})")
    csp = {i: 2 if spp else 1 for i, (*_r, spp) in enumerate(ARCH[arch], start=1)}  # the CSPLayer's index
    blocks = tuple(count_indices(backbone, f"stage{i}.{csp[i]}.blocks.", ".conv2.pointwise_conv.conv.weight")
                   for i in csp)
    if not all(blocks):
        raise ValueError(f"a CSPNeXt stage without blocks ({list(blocks)})")
    out1 = int(ARCH[arch][0][1] * widen)
    expand = backbone[f"stage1.{csp[1]}.main_conv.conv.weight"].shape[0] / out1
    final = head["final_layer.weight"]
    flatten, hidden = head["mlp.1.weight"].shape[1], head["mlp.1.weight"].shape[0]
    lx, ly = head["cls_x.weight"].shape[0], head["cls_y.weight"].shape[0]
    e = head["gau.o.weight"].shape[1]
    # flatten = (H / 32) (W / 32) with W = lx / r and H = ly / r: r^2 = lx ly / (32^2 flatten)
    ratio = math.sqrt(lx * ly / (STRIDE * STRIDE * flatten))
    ratio = round(ratio * 4) / 4 if abs(ratio * 4 - round(ratio * 4)) < 1e-6 else ratio
    input_size = (round(ly / ratio), round(lx / ratio))
    if (input_size[0] // STRIDE) * (input_size[1] // STRIDE) != flatten:
        raise ValueError(f"cls_x ({lx}), cls_y ({ly}) and the head's {flatten} features give no input size")
    return RTMPoseConfig(
        widen_factor=widen, stage_blocks=blocks, arch=arch, expand_ratio=expand,
        channel_attention=has(backbone, f"stage1.{csp[1]}.attention.fc.weight"),
        depthwise=not has(backbone, "stage1.0.conv.weight"), bn_eps=_bn_eps(config_text),
        num_joints=final.shape[0], input_size=input_size, simcc_split_ratio=ratio, final_kernel=final.shape[2],
        hidden_dims=hidden, s=head["gau.uv.weight"].shape[0] - 2 * e, expansion_factor=e / hidden,
        act_fn=_gau_act(config_text), use_rel_bias=has(head, "gau.w"),
        pos_enc=bool(re.search(r"pos_enc\s*=\s*True", config_text)),
    )


def _bn_eps(text: str) -> float:
    """BatchNorm's eps: the saved config's ``norm_cfg`` (RTMPose's configs: ``dict(type='SyncBN')``, torch's 1e-5);
    a config without one has CSPNeXt's default (BN, eps 1e-3); no config: RTMPose's."""
    if not text:
        return 1e-5
    m = re.search(r"norm_cfg\s*=\s*dict\(([^)]*)\)", text)
    if not m:
        return 1e-3
    eps = re.search(r"\beps\s*=\s*([0-9.eE+-]+)", m.group(1))
    return float(eps.group(1)) if eps else 1e-5


def _gau_act(text: str) -> str:
    m = re.search(r"act_fn\s*=\s*['\"](\w+)['\"]", text)
    return m.group(1) if m and m.group(1) in ("SiLU", "ReLU") else "SiLU"


BACKBONE_SIGNATURE = ("stem.0.conv.weight", "stem.2.conv.weight")
HEAD_SIGNATURE = ("final_layer.weight", "mlp.1.weight", "gau.uv.weight", "cls_x.weight", "cls_y.weight")

FAMILY = Family(
    name="rtmpose",
    title="RTMPose (CSPNeXt + RTMCCHead, SimCC)",
    signature=tuple(f"backbone.{k}" for k in BACKBONE_SIGNATURE) + tuple(f"head.{k}" for k in HEAD_SIGNATURE),
    config_type=RTMPoseConfig,
    detect=lambda sd: detect({k[9:]: v for k, v in sd.items() if k.startswith("backbone.")},
                             {k[5:]: v for k, v in sd.items() if k.startswith("head.")}),
    build=build,
    color="rgb",  # bgr_to_rgb=True
    mean=IMAGENET_MEAN,  # 123.675/116.28/103.53 and 58.395/57.12/57.375 in 0-255 units: ImageNet's exactly
    std=IMAGENET_STD,
    presets={c.name: c for c in (RTMPoseConfig(widen_factor=w, stage_blocks=b)  # mmpose's deepen 0.167/0.33/0.67/1
                                  for w, b in ((0.375, (1, 1, 1, 1)), (0.5, (1, 2, 2, 1)), (0.75, (2, 4, 4, 2)),
                                               (1.0, (3, 6, 6, 3))))},
)
