"""mmpose 0.x / 1.x top-down heatmap checkpoints: layouts, detection, wrappers, test-time defaults,
strict-load failures and export through the CLI.

The expected key names and shapes below are written from mmpose's code (not from ours):
``mmpose/models/backbones/resnet.py`` (``ResNet``: ``conv1``/``bn1`` via build_norm_layer postfix 1,
``ResLayer`` downsample ``[AvgPool2d,] conv, norm``; ``ResNetV1d``: deep ``stem`` of three
ConvModules ``conv``/``bn``), ``backbones/hrnet.py``, 0.x ``heads/topdown_heatmap_simple_head.py``
(``deconv_layers``, ``final_layer`` holding the extra convs as ``final_layer.{3i}``) and 1.x
``heads/heatmap_heads/heatmap_head.py`` (``deconv_layers``, ``conv_layers``, ``final_layer``, no
deconvolution bias), under ``backbone.`` and ``keypoint_head.`` (0.x ``TopDown``) or ``head.``
(1.x ``TopdownPoseEstimator``).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from posequant.cli import main
from posequant.core.errors import ArchitectureError, CheckpointError
from posequant.core.metadata import IMAGENET_MEAN, IMAGENET_STD, read_meta
from posequant.demo import randomise
from posequant.exporter import load_checkpoint, resolve_model
from posequant.exporter.zoo import detect_architecture, mmpose, pose_hrnet, pose_resnet

R, H = pose_resnet, pose_hrnet
HEAD = {"mmpose0": "keypoint_head", "mmpose1": "head"}


def build(cfg, device="cpu"):
    builder = R.build if isinstance(cfg, R.PoseResNetConfig) else H.build
    with torch.device(device):  # "meta": shapes only, for the large configs (no weights allocated)
        return builder(cfg)


def res(layout, depth=50, **kw):
    return R.PoseResNetConfig(depth=depth, layout=layout, **kw)


def hrnet(layout, width=32, **kw):
    return H.PoseHRNetConfig(H.standard_stages(width), layout=layout, **kw)


# ---- key names and shapes, from mmpose's code ---------------------------------------------------

def _res50_keys(head):  # td-hm_res50_8xb64-210e_coco-256x192 / 0.x res50_coco_256x192
    return {
        "backbone.conv1.weight": (64, 3, 7, 7),
        "backbone.bn1.running_var": (64,),
        "backbone.layer1.0.conv1.weight": (64, 64, 1, 1),
        "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.layer1.0.downsample.1.running_mean": (256,),
        "backbone.layer2.0.conv2.weight": (128, 128, 3, 3),  # style='pytorch': the stride sits on conv2
        "backbone.layer3.5.bn3.weight": (1024,),
        "backbone.layer4.2.conv3.weight": (2048, 512, 1, 1),
        f"{head}.deconv_layers.0.weight": (2048, 256, 4, 4),
        f"{head}.deconv_layers.1.running_mean": (256,),
        f"{head}.deconv_layers.3.weight": (256, 256, 4, 4),
        f"{head}.deconv_layers.7.num_batches_tracked": (),
        f"{head}.final_layer.weight": (17, 256, 1, 1),
        f"{head}.final_layer.bias": (17,),
    }


def _hrnet_w32_keys(head):  # td-hm_hrnet-w32_8xb64-210e_coco-256x192
    return {
        "backbone.conv1.weight": (64, 3, 3, 3),
        "backbone.bn2.weight": (64,),
        "backbone.layer1.0.conv3.weight": (256, 64, 1, 1),
        "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.transition1.0.0.weight": (32, 256, 3, 3),
        "backbone.transition1.1.0.0.weight": (64, 256, 3, 3),
        "backbone.transition3.3.0.0.weight": (256, 128, 3, 3),
        "backbone.stage2.0.branches.1.3.conv2.weight": (64, 64, 3, 3),
        "backbone.stage3.3.fuse_layers.2.0.1.0.weight": (128, 32, 3, 3),
        "backbone.stage4.2.fuse_layers.0.3.0.weight": (32, 256, 1, 1),
        f"{head}.final_layer.weight": (17, 32, 1, 1),
        f"{head}.final_layer.bias": (17,),
    }


MMPOSE_KEYS = {
    "res50 0.x": (res("mmpose0"), _res50_keys("keypoint_head")),
    "res50 1.x": (res("mmpose1"), _res50_keys("head")),
    "resnetv1d50 1.x": (res("mmpose1", deep_stem=True, avg_down=True), {  # td-hm_resnetv1d50_8xb64-210e_coco
        "backbone.stem.0.conv.weight": (32, 3, 3, 3),
        "backbone.stem.0.bn.running_var": (32,),
        "backbone.stem.1.conv.weight": (32, 32, 3, 3),
        "backbone.stem.2.conv.weight": (64, 32, 3, 3),
        "backbone.stem.2.bn.weight": (64,),
        "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),  # stride 1: no pool
        "backbone.layer2.0.downsample.1.weight": (512, 256, 1, 1),  # [AvgPool2d, conv, norm]
        "backbone.layer2.0.downsample.2.running_mean": (512,),
        "head.final_layer.weight": (17, 256, 1, 1),
    }),
    "hrnet-w32 0.x": (hrnet("mmpose0"), _hrnet_w32_keys("keypoint_head")),
    "hrnet-w32 1.x": (hrnet("mmpose1"), _hrnet_w32_keys("head")),
    "hrnet-w48 mpii 1.x": (hrnet("mmpose1", 48, num_joints=16), {  # td-hm_hrnet-w48_8xb32-210e_mpii-256x256
        "backbone.transition1.0.0.weight": (48, 256, 3, 3),
        "backbone.stage4.0.branches.3.0.conv1.weight": (384, 384, 3, 3),
        "head.final_layer.weight": (16, 48, 1, 1),
    }),
    "res18 extra convs 0.x": (res("mmpose0", 18, deconv_filters=(64,), deconv_kernels=(4,),
                                  conv_channels=(64, 64), conv_kernels=(1, 3)), {
        "keypoint_head.final_layer.0.weight": (64, 64, 1, 1),
        "keypoint_head.final_layer.0.bias": (64,),
        "keypoint_head.final_layer.1.running_mean": (64,),
        "keypoint_head.final_layer.3.weight": (64, 64, 3, 3),
        "keypoint_head.final_layer.6.weight": (17, 64, 1, 1),
        "keypoint_head.final_layer.6.bias": (17,),
    }),
    "res18 extra convs 1.x": (res("mmpose1", 18, deconv_filters=(64,), deconv_kernels=(4,),
                                  conv_channels=(32,), conv_kernels=(3,)), {
        "head.conv_layers.0.weight": (32, 64, 3, 3),
        "head.conv_layers.0.bias": (32,),
        "head.conv_layers.1.running_var": (32,),
        "head.final_layer.weight": (17, 32, 1, 1),
    }),
}
ABSENT = {
    "res50 0.x": ["backbone.stem.0.conv.weight", "keypoint_head.deconv_layers.0.bias", "conv1.weight",
                  "keypoint_head.conv_layers.0.weight"],
    "res50 1.x": ["head.deconv_layers.0.bias", "head.conv_layers.0.weight", "deconv_layers.0.weight"],
    "resnetv1d50 1.x": ["backbone.conv1.weight", "backbone.bn1.weight", "backbone.layer2.0.downsample.0.weight"],
    "hrnet-w32 0.x": ["keypoint_head.deconv_layers.0.weight", "final_layer.weight"],
    "hrnet-w32 1.x": ["head.deconv_layers.0.weight", "backbone.stage4.2.fuse_layers.1.0.0.0.weight"],
    "res18 extra convs 0.x": ["keypoint_head.final_layer.weight", "keypoint_head.conv_layers.0.weight"],
    "res18 extra convs 1.x": ["head.final_layer.0.weight"],
}


@pytest.mark.parametrize("name", sorted(MMPOSE_KEYS))
def test_mmpose_key_names_and_shapes(name):
    cfg, keys = MMPOSE_KEYS[name]
    sd = build(cfg, "meta").state_dict()
    for key, shape in keys.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    for key in ABSENT.get(name, []):
        assert key not in sd, key
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"backbone", HEAD[cfg.layout]}


# ---- detection ----------------------------------------------------------------------------------

DETECT = [res(layout, depth) for layout in ("mmpose0", "mmpose1") for depth in (18, 34, 50, 101, 152)] + [
    res("mmpose1", 50, deep_stem=True, avg_down=True),
    res("mmpose0", 101, deep_stem=True, avg_down=True, num_joints=16),
    res("mmpose0", 18, deconv_filters=(64, 32), deconv_kernels=(3, 2), final_conv_kernel=3, num_joints=14),
    res("mmpose0", 34, conv_channels=(256, 256), conv_kernels=(1, 3)),
    res("mmpose1", 34, conv_channels=(128,), conv_kernels=(3,), deconv_filters=(256, 128), deconv_kernels=(4, 4)),
    hrnet("mmpose0", 32), hrnet("mmpose1", 32), hrnet("mmpose0", 48, num_joints=16), hrnet("mmpose1", 48),
]


@pytest.mark.parametrize("cfg", DETECT, ids=lambda c: f"{c.name}-{c.layout}-{c.num_joints}j")
def test_detects_depth_width_joints_and_head(cfg):
    det = detect_architecture(build(cfg, "meta").state_dict(), "ckpt.pth")
    assert det.config == cfg
    assert det.name == (f"pose_resnet{'v1d' if getattr(cfg, 'deep_stem', False) else ''}_{cfg.depth}"
                        if isinstance(cfg, R.PoseResNetConfig) else f"pose_hrnet_w{cfg.width}")


def _copy_into(src: torch.nn.Module, dst: torch.nn.Module, rename) -> torch.nn.Module:
    dst.load_state_dict({rename(k): v for k, v in src.state_dict().items()}, strict=True)
    return dst


@pytest.mark.parametrize("layout", ["mmpose0", "mmpose1"])
@pytest.mark.parametrize("family", ["pose_resnet", "pose_hrnet"])
def test_mmpose_tree_computes_the_official_network(family, layout):
    """mmpose's ResNet/HRNet + head and the official models are one function: same weights, same output."""
    if family == "pose_resnet":
        official = R.PoseResNetConfig(depth=18, deconv_filters=(32, 32), deconv_kernels=(4, 4))
        backbone_keys = ("conv1", "bn1", "layer")
    else:
        official = H.PoseHRNetConfig(TINY_STAGES)
        backbone_keys = ("conv", "bn", "layer", "transition", "stage")
    src = randomise(build(official), 1)
    dst = build(dataclasses.replace(official, layout=layout))

    def rename(k):
        return f"backbone.{k}" if k.startswith(backbone_keys) else f"{HEAD[layout]}.{k}"

    _copy_into(src, dst, rename)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


# ---- checkpoints as mmpose saves them -----------------------------------------------------------

SMALL_RES = res("mmpose1", 18, deconv_filters=(16, 16, 16), deconv_kernels=(4, 4, 4))
# one module, one block per branch: the same code paths as the released stages, built in a fraction of the time
TINY_STAGES = (H.StageConfig(1, "BASIC", (1, 1), (8, 16)), H.StageConfig(1, "BASIC", (1, 1, 1), (8, 16, 32)),
               H.StageConfig(1, "BASIC", (1, 1, 1, 1), (8, 16, 32, 64)))
SMALL_HRNET_0 = H.PoseHRNetConfig(TINY_STAGES, layout="mmpose0")
CFG_1X = """codec = dict(type='MSRAHeatmap', input_size=(192, 256), heatmap_size=(48, 64), sigma=2)
model = dict(type='TopdownPoseEstimator',
    data_preprocessor=dict(type='PoseDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
    test_cfg=dict(flip_test=True, flip_mode='heatmap', shift_heatmap=True))
"""
CFG_1X_UDP = CFG_1X.replace("type='MSRAHeatmap'", "type='UDPHeatmap'")
CFG_0X = """data_cfg = dict(image_size=[256, 256], heatmap_size=[64, 64], num_output_channels=16)
model = dict(type='TopDown', test_cfg=dict(flip_test=True, post_process='default', shift_heatmap=True))
"""


def mmengine_meta(cfg_text=CFG_1X):
    # what mmengine's Runner.save_checkpoint writes: config text, dataset metainfo with numpy arrays
    return {"epoch": 210, "iter": 100, "cfg": cfg_text, "seed": 0, "mmengine_version": "0.10.3",
            "dataset_meta": {"dataset_name": "coco", "num_keypoints": 17,
                             "sigmas": np.linspace(0.025, 0.107, 17).astype(np.float32),
                             "keypoint_colors": np.zeros((17, 3), np.uint8), "flip_indices": list(range(17))}}


def mmcv_meta(cfg_text=CFG_0X):
    return {"mmcv_version": "1.7.0", "time": "Fri Jul 10 12:00:00 2020", "epoch": 210, "config": cfg_text}


@functools.lru_cache(maxsize=None)
def _small(cfg, seed):
    return randomise(build(cfg), seed)


def small(cfg, seed=0):
    """A seeded random model, built once per config (tests only read it)."""
    return _small(cfg, seed)


def save(path, obj):
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def res1(tmp_path_factory):
    model = small(SMALL_RES)
    path = tmp_path_factory.mktemp("mm") / "td-hm_res18_8xb64-210e_coco-256x192-abcdef12_20230101.pth"
    return model, save(path, {"meta": mmengine_meta(), "state_dict": model.state_dict()})


def test_mmengine_wrapper_with_numpy_meta_loads_without_trust(res1):
    model, path = res1
    ckpt = load_checkpoint(path)  # weights_only: numpy arrays in meta are data, not code
    assert ckpt.container == "state_dict['state_dict']"
    assert ckpt.meta["cfg"] == CFG_1X and isinstance(ckpt.meta["dataset_meta"]["sigmas"], np.ndarray)
    assert set(ckpt.state_dict) == set(model.state_dict())
    pose = resolve_model(ckpt)
    assert (pose.family, pose.name, pose.arch_config["layout"]) == ("pose_resnet", "pose_resnet_18", "mmpose1")
    # mmpose's test-time defaults: RGB (also for ResNet), 0-255 mean/std = ImageNet in 0-1 units,
    # and the input size of the codec (W 192, H 256)
    assert (pose.color, pose.mean, pose.std, pose.input_size) == ("rgb", IMAGENET_MEAN, IMAGENET_STD, (256, 192))
    for m255, s255, m, s in zip(mmpose.MMPOSE_MEAN_255, mmpose.MMPOSE_STD_255, IMAGENET_MEAN, IMAGENET_STD):
        assert m255 / 255 == pytest.approx(m, abs=1e-15) and s255 / 255 == pytest.approx(s, abs=1e-15)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(pose.module(x), model(x), rtol=0, atol=0)


def test_other_pickled_objects_in_meta_still_need_trust(tmp_path):
    model = small(SMALL_RES)
    path = save(tmp_path / "m.pth", {"meta": {"x": __import__("collections").OrderedDict(a=1),
                                                "hub": torch.nn.ReLU()}, "state_dict": model.state_dict()})
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(path)


def test_unpublished_mmengine_checkpoint_says_what_to_do(tmp_path, monkeypatch):
    """A training checkpoint (epoch_210.pth) also pickles mmengine objects (message_hub's HistoryBuffer)."""
    import sys
    import types

    mod = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self):
            self.data = [1.0]

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = mod.__name__, "HistoryBuffer"
    mod.HistoryBuffer = HistoryBuffer
    for name in ("mmengine", "mmengine.logging", mod.__name__):
        monkeypatch.setitem(sys.modules, name, mod if name == mod.__name__ else types.ModuleType(name))
    path = save(tmp_path / "epoch_210.pth", {"meta": mmengine_meta(), "state_dict": small(SMALL_RES).state_dict(),
                                             "message_hub": {"log_scalars": {"loss": HistoryBuffer()}}})
    for name in ("mmengine", "mmengine.logging", mod.__name__):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(CheckpointError, match=r"OpenMMLab training state .*HistoryBuffer.*publish_model"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"pickles objects of the Python module 'mmengine', which is not "
                                              r"installed"):
        load_checkpoint(path, trust_pickle=True)


@pytest.mark.parametrize("wrapper", ["plain", "state_dict", "mmcv meta"])
def test_0x_hrnet_wrappers(tmp_path, wrapper):
    model = small(SMALL_HRNET_0)
    sd = model.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd},
           "mmcv meta": {"meta": mmcv_meta(), "state_dict": sd, "optimizer": {"state": {}}}}[wrapper]
    path = save(tmp_path / "hrnet_w8_mpii_256x256-1234abcd_20200708.pth", obj)
    pose = resolve_model(load_checkpoint(path))
    assert (pose.family, pose.name, pose.arch_config["layout"], pose.color) == (
        "pose_hrnet", "pose_hrnet_w8", "mmpose0", "rgb")
    assert pose.input_size == (256, 256)  # from the config (image_size W, H) or mmpose's file name (HxW)


@pytest.mark.parametrize("meta, name, size", [
    (None, "td-hm_hrnet-w32_8xb64-210e_coco-384x288-ca5956af_20220909.pth", (384, 288)),
    (None, "res50_coco_256x192-ec54d7f3_20200709.pth", (256, 192)),
    (None, "epoch_210.pth", None),
    ({"cfg": CFG_1X}, "model.pth", (256, 192)),
    ({"config": CFG_0X}, "x_coco-384x288.pth", (256, 256)),  # the saved config wins over the name
    ({"cfg": "codec = dict(\n    type='MSRAHeatmap',\n    input_size=(\n        288,\n        384,\n    ))"}, "m.pth",
     (384, 288)),  # pretty_text may break the tuple over lines
])
def test_input_size_from_config_or_name(meta, name, size):
    got = mmpose.read_pipeline(meta, name)
    assert (got.decoding, got.input_size) == ("default", size)


@pytest.mark.parametrize("meta, name, kind", [
    ({"cfg": CFG_1X_UDP}, "model.pth", "UDP"),
    ({"config": CFG_0X.replace("post_process='default'", "use_udp=True, post_process='default'")}, "m.pth", "UDP"),
    ({"cfg": CFG_1X.replace("sigma=2)", "sigma=2, unbiased=True)")}, "m.pth", "DARK"),
    (None, "td-hm_hrnet-w32_udp-8xb64-210e_coco-256x192-73ede547_20220914.pth", "UDP"),
    (None, "hrnet_w32_coco_256x192_dark-07f147eb_20200812.pth", "DARK"),
])
def test_udp_and_dark_checkpoints_are_refused(tmp_path, meta, name, kind):
    sd = small(SMALL_RES).state_dict()
    path = save(tmp_path / name, {"meta": meta, "state_dict": sd} if meta else sd)
    with pytest.raises(ArchitectureError, match=f"trained for {kind} heatmap decoding") as e:
        resolve_model(load_checkpoint(path))
    assert "\n" not in str(e.value)


def test_data_preprocessor_keys_give_the_normalisation(tmp_path):
    sd = dict(small(SMALL_RES).state_dict())
    sd["data_preprocessor.mean"] = torch.tensor([127.5, 127.5, 127.5]).view(3, 1, 1)
    sd["data_preprocessor.std"] = torch.tensor([63.75, 63.75, 63.75]).view(3, 1, 1)
    pose = resolve_model(load_checkpoint(save(tmp_path / "m.pth", {"state_dict": sd})))
    assert pose.mean == (0.5, 0.5, 0.5) and pose.std == (0.25, 0.25, 0.25)
    sd["data_preprocessor.scale"] = torch.ones(3)
    with pytest.raises(ArchitectureError, match="data_preprocessor.scale"):
        resolve_model(load_checkpoint(save(tmp_path / "m2.pth", {"state_dict": sd})))


# ---- layouts that are not ours: one line naming the key -----------------------------------------

def _resolve_sd(tmp_path, sd):
    return resolve_model(load_checkpoint(save(tmp_path / "bad.pth", {"meta": {}, "state_dict": sd})))


def test_missing_key_is_named(tmp_path):
    sd = {k: v for k, v in small(SMALL_RES).state_dict().items() if k != "head.final_layer.bias"}
    with pytest.raises(ArchitectureError, match=r"missing \(e\.g\. head\.final_layer\.bias\)"):
        _resolve_sd(tmp_path, sd)


@pytest.mark.parametrize("extra", ["head.deconv_layers.0.bias", "backbone.layer1.0.se.fc.weight", "neck.conv.weight"])
def test_unexpected_key_is_named(tmp_path, extra):
    sd = dict(small(SMALL_RES).state_dict())
    sd[extra] = torch.zeros(16)
    with pytest.raises(ArchitectureError, match=rf"not in the model \(e\.g\. {extra}\)"):
        _resolve_sd(tmp_path, sd)


def test_wrong_shape_is_named(tmp_path):
    sd = dict(small(SMALL_RES).state_dict())
    sd["backbone.layer3.0.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    with pytest.raises(ArchitectureError, match=r"'backbone.layer3.0.conv2.weight' has shape \(256, 256, 1, 1\) "
                                                r"but the model expects \(256, 256, 3, 3\)"):
        _resolve_sd(tmp_path, sd)


@pytest.mark.parametrize("keys, match", [
    ({"backbone.patch_embed.proj.weight": (768, 3, 16, 16), "head.final_layer.weight": (17, 768, 1, 1)},
     r"mmpose 1\.x checkpoint whose backbone is not one posequant builds \(keys start backbone\.patch_embed"),
    ({"backbone.conv1.weight": (64, 3, 7, 7), "head.cls_x.weight": (384, 512), "head.mlp.0.weight": (256, 512)},
     r"mmpose 1\.x model with a SimCC head on a backbone posequant does not build for it .* not supported yet"),
    ({"backbone.layer1.0.conv1.weight": (64, 64, 3, 3), "backbone.layer4.0.conv1.weight": (512, 256, 3, 3),
      "keypoint_head.deconv_layers.0.weight": (512, 256, 4, 4)},
     r"mmpose 0\.x Simple Baselines PoseResNet but its layers are inconsistent"),
])
def test_other_mmpose_models_get_one_line(tmp_path, keys, match):
    sd = {k: torch.zeros(shape) for k, shape in keys.items()}
    with pytest.raises(ArchitectureError, match=match) as e:
        _resolve_sd(tmp_path, sd)
    assert "\n" not in str(e.value)


def test_inspect_cli_shows_layout_and_trained_size(tmp_path, res1):
    model, _ = res1
    path = save(tmp_path / "m.pth", {"meta": mmengine_meta(CFG_1X.replace("(192, 256)", "(96, 128)")),
                                     "state_dict": model.state_dict()})
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "pose_resnet_18 (pose_resnet)" in result.output and "layout: mmpose1" in result.output
    assert "input        128x96 by default, RGB" in result.output


def test_arch_option_must_agree(res1):
    _, path = res1
    assert resolve_model(load_checkpoint(path), "pose_resnet").family == "pose_resnet"
    with pytest.raises(ArchitectureError, match="not pose_hrnet"):
        resolve_model(load_checkpoint(path), "pose_hrnet")


# ---- export-pose through the CLI ----------------------------------------------------------------

@pytest.mark.parametrize("cfg", [SMALL_RES, SMALL_HRNET_0], ids=lambda c: f"{c.name}-{c.layout}")
def test_export_pose_cli_parity(tmp_path, cfg):
    model = small(cfg, seed=3)
    meta = mmengine_meta(CFG_1X.replace("(192, 256)", "(64, 96)")) if cfg.layout == "mmpose1" else mmcv_meta()
    ckpt = save(tmp_path / "mm.pth", {"meta": meta, "state_dict": model.state_dict()})
    out, js = tmp_path / "mm.onnx", tmp_path / "mm.json"
    args = ["export-pose", str(ckpt), "-o", str(out), "--json", str(js)]
    if cfg.layout == "mmpose0":
        args += ["--input-size", "64x64"]  # overrides the config's 256x256
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    size = (96, 64) if cfg.layout == "mmpose1" else (64, 64)  # 1.x: the codec's input_size (W 64, H 96)
    m = read_meta(out)
    assert (m.family, m.color, m.input_size, m.mean, m.std) == (
        cfg.name.rsplit("_", 1)[0], "rgb", size, IMAGENET_MEAN, IMAGENET_STD)
    assert m.arch_config["layout"] == cfg.layout and m.num_joints == cfg.num_joints
    assert json.loads(js.read_text())["verification"]["passed"]

    x = np.random.default_rng(0).standard_normal((2, 3, *size)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == (2, cfg.num_joints, size[0] // 4, size[1] // 4)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert (got.reshape(2, cfg.num_joints, -1).argmax(-1) == want.reshape(2, cfg.num_joints, -1).argmax(-1)).all()


def test_export_pose_cli_refuses_udp_in_one_line(tmp_path):
    ckpt = save(tmp_path / "m.pth", {"meta": mmengine_meta(CFG_1X_UDP), "state_dict": small(SMALL_RES).state_dict()})
    result = CliRunner().invoke(main, ["export-pose", str(ckpt), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert "UDP" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()
