"""Model zoo: official key names and shapes, and detection of every depth, width and variant."""

import pytest
import torch

from posequant.core.errors import ArchitectureError
from posequant.exporter.zoo import FAMILIES, PRESETS, detect_architecture, hourglass, pose_hrnet, pose_resnet

# Spot checks against key names and shapes of the released checkpoints.
OFFICIAL_KEYS = {
    "pose_resnet_50": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer4.2.bn3.running_var": (2048,),
        "deconv_layers.0.weight": (2048, 256, 4, 4),
        "deconv_layers.7.running_mean": (256,),
        "final_layer.weight": (17, 256, 1, 1),
        "final_layer.bias": (17,),
    },
    "pose_resnet_18": {"layer4.1.conv2.weight": (512, 512, 3, 3), "deconv_layers.0.weight": (512, 256, 4, 4)},
    "pose_hrnet_w32": {
        "conv2.weight": (64, 64, 3, 3),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "transition1.0.0.weight": (32, 256, 3, 3),
        "transition1.1.0.0.weight": (64, 256, 3, 3),
        "transition3.3.0.0.weight": (256, 128, 3, 3),
        "stage2.0.fuse_layers.0.1.0.weight": (32, 64, 1, 1),
        "stage3.3.fuse_layers.2.0.0.0.weight": (32, 32, 3, 3),
        "stage3.3.fuse_layers.2.0.1.0.weight": (128, 32, 3, 3),
        "stage4.2.fuse_layers.0.3.0.weight": (32, 256, 1, 1),
        "stage4.2.branches.3.3.conv2.weight": (256, 256, 3, 3),
        "final_layer.weight": (17, 32, 1, 1),
    },
    "pose_hrnet_w48": {"transition1.0.0.weight": (48, 256, 3, 3), "final_layer.weight": (17, 48, 1, 1)},
    "hg_s2_b1": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.0.weight": (256, 128, 1, 1),
        "hg.0.hg.0.3.0.conv1.weight": (128, 256, 1, 1),
        "hg.1.hg.3.2.0.conv3.bias": (256,),
        "fc.0.1.running_mean": (256,),
        "score.1.weight": (16, 256, 1, 1),
        "score_.0.weight": (256, 16, 1, 1),
        "fc_.0.weight": (256, 256, 1, 1),
    },
}
ABSENT_KEYS = {
    "pose_resnet_50": ["deconv_layers.0.bias"],
    "pose_hrnet_w32": ["stage4.2.fuse_layers.1.0.0.0.weight"],  # last module keeps one output
    "hg_s2_b1": ["layer3.0.downsample.0.weight", "score_.1.weight", "hg.0.hg.1.3.0.conv1.weight"],
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_KEYS))
def test_official_key_names_and_shapes(name):
    fam, cfg = PRESETS[name]
    sd = fam.build(cfg).state_dict()
    for key, shape in OFFICIAL_KEYS[name].items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    for key in ABSENT_KEYS.get(name, []):
        assert key not in sd, key


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_detection_of_every_preset(name):
    fam, cfg = PRESETS[name]
    det = detect_architecture(fam.build(cfg).state_dict())
    assert det.family is fam
    assert det.config == cfg
    assert det.name == name


@pytest.mark.parametrize("cfg", [
    pose_resnet.PoseResNetConfig(depth=18, num_joints=16, deconv_filters=(64, 32), deconv_kernels=(3, 2)),
    pose_resnet.PoseResNetConfig(depth=34, deconv_filters=(32, 32, 32, 16), deconv_kernels=(4, 3, 2, 4),
                                 deconv_with_bias=True, final_conv_kernel=3),
    pose_resnet.PoseResNetConfig(depth=50, num_joints=14, deconv_filters=(16,), deconv_kernels=(2,)),
])
def test_pose_resnet_variants(cfg):
    model = pose_resnet.build(cfg)
    assert detect_architecture(model.state_dict()).config == cfg
    out = model(torch.zeros(1, 3, 64, 64))
    up = 2 ** len(cfg.deconv_kernels)
    assert out.shape == (1, cfg.num_joints, 2 * up, 2 * up)  # backbone stride 32, each deconv x2


def test_hrnet_nonstandard_stages_and_bottleneck_branches():
    stages = (
        pose_hrnet.StageConfig(2, "BOTTLENECK", (1, 2), (8, 16)),
        pose_hrnet.StageConfig(1, "BASIC", (1, 1, 2), (8, 16, 32)),
        pose_hrnet.StageConfig(2, "BASIC", (2, 1, 1, 1), (8, 16, 32, 64)),
    )
    cfg = pose_hrnet.PoseHRNetConfig(stages, num_joints=16, final_conv_kernel=3)
    model = pose_hrnet.build(cfg)
    assert detect_architecture(model.state_dict()).config == cfg
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 16, 16, 16)


@pytest.mark.parametrize("cfg", [
    hourglass.HourglassConfig(num_stacks=1, num_blocks=2, num_feats=16, stem_channels=16, depth=3),
    hourglass.HourglassConfig(num_stacks=3, num_blocks=1, num_joints=17, num_feats=8, stem_channels=8),
])
def test_hourglass_variants(cfg):
    model = hourglass.build(cfg)
    assert detect_architecture(model.state_dict()).config == cfg
    outs = model(torch.zeros(1, 3, 64, 64))
    assert len(outs) == cfg.num_stacks and outs[-1].shape == (1, cfg.num_joints, 16, 16)


def test_unknown_architecture_names_expected_keys():
    sd = {"encoder.weight": torch.zeros(3), "decoder.weight": torch.zeros(3)}
    with pytest.raises(ArchitectureError) as e:
        detect_architecture(sd, "ckpt.pth")
    msg = str(e.value)
    assert "unknown architecture" in msg and "encoder.weight" in msg and "--arch" in msg
    for fam in FAMILIES.values():
        assert fam.signature[1] in msg


def test_inconsistent_pose_resnet_is_reported():
    sd = pose_resnet.build(pose_resnet.PoseResNetConfig(depth=18)).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("layer3.1.")}  # 1 block where 2 belong
    with pytest.raises(ArchitectureError, match="match no depth"):
        detect_architecture(sd)
