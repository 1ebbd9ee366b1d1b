"""mmpose RTMPose checkpoints (CSPNeXt + RTMCCHead, SimCC): key names and shapes, detection of size, blocks,
joints and input size from the weights, strict loading failures, and the export's parity with PyTorch.

The expected key names and shapes are written from mmpose's code (not from ours): ``models/backbones/cspnext.py``
(``stem`` of three ConvModules with ``int(64 * widen // 2)``, ``int(64 * widen)`` channels; ``stage{i}`` =
[stride-2 ConvModule, (last stage) ``SPPBottleneck`` with ``conv1`` to in // 2 and ``conv2`` from 4x that,
``CSPLayer``]), ``models/utils/csp_layer.py`` (``main_conv``/``short_conv`` to out * 0.5, ``final_conv``,
``blocks.{j}.conv1`` 3x3 and ``conv2`` a DepthwiseSeparableConvModule with kernel 5, ``attention.fc`` with a
bias), ``models/heads/coord_cls_heads/rtmcc_head.py`` and ``models/utils/rtmcc_block.py`` (``final_layer``
conv with bias, ``mlp`` = ScaleNorm ``g`` + Linear without bias, ``gau.uv`` 2e + s rows, ``gau.o``,
``gamma``/``beta`` 2 x s, ``ln.g``, ``res_scale.scale``; ``cls_x`` W * 2 and ``cls_y`` H * 2 rows), with the
sizes of mmpose's RTMPose configs (t: deepen 0.167 widen 0.375; s 0.33/0.5; m 0.67/0.75; l 1/1; the head's
``in_featuremap_size`` = input / 32, kernel 7, hidden 256, s 128, expansion 2).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from posequant.cli import main
from posequant.core.errors import ArchitectureError, PosequantError
from posequant.core.metadata import IMAGENET_MEAN, IMAGENET_STD, read_meta
from posequant.demo import randomise
from posequant.exporter import export_pose, load_checkpoint, resolve_model
from posequant.exporter.zoo import PRESETS, detect_architecture, rtmpose

T = rtmpose.RTMPoseConfig(widen_factor=0.375, stage_blocks=(1, 1, 1, 1))  # rtmpose-t_8xb256-420e_coco-256x192

RTMPOSE_T_KEYS = {
    "backbone.stem.0.conv.weight": (12, 3, 3, 3),
    "backbone.stem.0.bn.running_var": (12,),
    "backbone.stem.1.conv.weight": (12, 12, 3, 3),
    "backbone.stem.2.conv.weight": (24, 12, 3, 3),
    "backbone.stage1.0.conv.weight": (48, 24, 3, 3),
    "backbone.stage1.0.bn.num_batches_tracked": (),
    "backbone.stage1.1.main_conv.conv.weight": (24, 48, 1, 1),
    "backbone.stage1.1.short_conv.conv.weight": (24, 48, 1, 1),
    "backbone.stage1.1.final_conv.conv.weight": (48, 48, 1, 1),
    "backbone.stage1.1.blocks.0.conv1.conv.weight": (24, 24, 3, 3),
    "backbone.stage1.1.blocks.0.conv2.depthwise_conv.conv.weight": (24, 1, 5, 5),
    "backbone.stage1.1.blocks.0.conv2.depthwise_conv.bn.weight": (24,),
    "backbone.stage1.1.blocks.0.conv2.pointwise_conv.conv.weight": (24, 24, 1, 1),
    "backbone.stage1.1.attention.fc.weight": (48, 48, 1, 1),
    "backbone.stage1.1.attention.fc.bias": (48,),
    "backbone.stage3.1.blocks.0.conv2.pointwise_conv.bn.running_mean": (96,),
    "backbone.stage4.0.conv.weight": (384, 192, 3, 3),
    "backbone.stage4.1.conv1.conv.weight": (192, 384, 1, 1),
    "backbone.stage4.1.conv2.conv.weight": (384, 768, 1, 1),
    "backbone.stage4.2.main_conv.conv.weight": (192, 384, 1, 1),
    "backbone.stage4.2.attention.fc.weight": (384, 384, 1, 1),
    "head.final_layer.weight": (17, 384, 7, 7),
    "head.final_layer.bias": (17,),
    "head.mlp.0.g": (1,),
    "head.mlp.1.weight": (256, 48),
    "head.gau.uv.weight": (1152, 256),
    "head.gau.o.weight": (256, 512),
    "head.gau.gamma": (2, 128),
    "head.gau.beta": (2, 128),
    "head.gau.ln.g": (1,),
    "head.gau.res_scale.scale": (256,),
    "head.cls_x.weight": (384, 256),
    "head.cls_y.weight": (512, 256),
}
ABSENT = ["backbone.stage1.1.blocks.1.conv1.conv.weight", "backbone.stage1.0.conv.bias", "head.mlp.1.bias",
          "head.cls_x.bias", "head.gau.w", "head.gau.uv.bias", "backbone.stage4.1.poolings.0.weight"]


def test_rtmpose_t_key_names_and_shapes():
    sd = rtmpose.build(T).state_dict()
    for key, shape in RTMPOSE_T_KEYS.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    for key in ABSENT:
        assert key not in sd, key
    assert {k.split(".")[0] for k in sd} == {"backbone", "head"}
    # mmpose's model table: RTMPose-t has 3.34 M parameters
    assert round(sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) / 1e6,
                 2) == 3.34


# t/s/m/l body at both sizes, whole-body (133 joints), and the relative position bias some configs turn on
SIZES = {"t": (0.375, (1, 1, 1, 1)), "s": (0.5, (1, 2, 2, 1)), "m": (0.75, (2, 4, 4, 2)), "l": (1.0, (3, 6, 6, 3))}
DETECT = [rtmpose.RTMPoseConfig(widen_factor=w, stage_blocks=b, input_size=size, num_joints=joints)
          for w, b in SIZES.values() for size in ((256, 192), (384, 288)) for joints in (17, 133)]
DETECT.append(dataclasses.replace(T, use_rel_bias=True, num_joints=26))


@pytest.mark.parametrize("cfg", DETECT, ids=lambda c: c.name + ("-relbias" if c.use_rel_bias else ""))
def test_detects_size_blocks_joints_and_input_size_from_the_weights(cfg):
    with torch.device("meta"):  # shapes only: no weights allocated for the large ones
        sd = rtmpose.build(cfg).state_dict()
    det = detect_architecture(sd, "ckpt.pth")
    assert det.family is rtmpose.FAMILY and det.config == cfg
    w, h = cfg.input_size[1], cfg.input_size[0]
    assert tuple(sd["head.cls_x.weight"].shape) == (2 * w, 256) and tuple(sd["head.cls_y.weight"].shape) == (2 * h, 256)
    assert tuple(sd["head.mlp.1.weight"].shape) == (256, (h // 32) * (w // 32))
    assert tuple(sd["head.final_layer.weight"].shape) == (cfg.num_joints, int(1024 * cfg.widen_factor), 7, 7)


def test_every_preset_is_detected_by_its_name():
    for name, (fam, cfg) in PRESETS.items():
        if fam is rtmpose.FAMILY:
            with torch.device("meta"):
                assert detect_architecture(rtmpose.build(cfg).state_dict()).name == name


@pytest.mark.parametrize("text, eps, act", [
    ("", 1e-5, "SiLU"),  # no saved config: RTMPose's own (SyncBN)
    ("backbone=dict(type='CSPNeXt', norm_cfg=dict(type='SyncBN'), act_cfg=dict(type='SiLU'))\n"
     "head=dict(gau_cfg=dict(act_fn='SiLU'))", 1e-5, "SiLU"),
    ("backbone=dict(type='CSPNeXt', norm_cfg=dict(type='BN', momentum=0.03, eps=0.001))\n"
     "head=dict(gau_cfg=dict(act_fn='ReLU'))", 1e-3, "ReLU"),
    ("backbone=dict(type='CSPNeXt', widen_factor=0.375)", 1e-3, "SiLU"),  # CSPNeXt's default norm_cfg
])
def test_the_saved_config_says_what_the_weights_cannot(text, eps, act):
    cfg = rtmpose.detect(*_parts(rtmpose.build(T).state_dict()), text)
    assert (cfg.bn_eps, cfg.act_fn) == (eps, act)


def _parts(sd):
    return ({k[9:]: v for k, v in sd.items() if k.startswith("backbone.")},
            {k[5:]: v for k, v in sd.items() if k.startswith("head.")})


# ---- checkpoints as mmpose saves them --------------------------------------------------------------

CFG = """codec = dict(type='SimCCLabel', input_size=(192, 256), sigma=(4.9, 5.66), simcc_split_ratio=2.0,
    normalize=False, use_dark=False)
model = dict(type='TopdownPoseEstimator',
    data_preprocessor=dict(type='PoseDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
    backbone=dict(_scope_='mmdet', type='CSPNeXt', arch='P5', expand_ratio=0.5, deepen_factor=0.167,
                  widen_factor=0.375, out_indices=(4, ), channel_attention=True, norm_cfg=dict(type='SyncBN'),
                  act_cfg=dict(type='SiLU')),
    head=dict(type='RTMCCHead', in_channels=384, out_channels=17, input_size=codec['input_size'],
              in_featuremap_size=(6, 8), simcc_split_ratio=codec['simcc_split_ratio'], final_layer_kernel_size=7,
              gau_cfg=dict(hidden_dims=256, s=128, expansion_factor=2, dropout_rate=0., drop_path=0.,
                            act_fn='SiLU', use_rel_bias=False, pos_enc=False)),
    test_cfg=dict(flip_test=True))
"""


@pytest.fixture(scope="module")
def rtm_t(tmp_path_factory):
    """An RTMPose-t checkpoint with seeded random weights, saved as mmengine saves it (meta + state_dict)."""
    model = randomise(rtmpose.build(T), 0)
    path = tmp_path_factory.mktemp("rtm") / "rtmpose-t_8xb256-420e_coco-256x192.pth"
    torch.save({"meta": {"cfg": CFG, "epoch": 420}, "state_dict": model.state_dict()}, path)
    return model, path


def test_checkpoint_resolves_with_mmposes_test_time_preprocessing(rtm_t):
    _, path = rtm_t
    pose = resolve_model(load_checkpoint(path))
    assert (pose.family, pose.name, pose.head, pose.simcc_split_ratio) == ("rtmpose", "rtmpose-t_coco-256x192",
                                                                          "simcc", 2.0)
    assert pose.input_size == (256, 192) and pose.num_joints == 17
    assert pose.color == "rgb" and pose.mean == IMAGENET_MEAN and pose.std == IMAGENET_STD


def test_export_matches_pytorch_and_stamps_the_simcc_head(rtm_t, tmp_path):
    model, path = rtm_t
    res = export_pose(path, tmp_path / "rtm.onnx")
    assert res.verification.passed and res.verification.max_rel_diff <= 1e-4
    assert [c.name for c in res.verification.cases] == ["random inputs (seed 0), simcc_x",
                                                        "random inputs (seed 0), simcc_y"]
    meta = read_meta(res.output)
    assert (meta.head, meta.simcc_split_ratio, meta.outputs) == ("simcc", 2.0, ("simcc_x", "simcc_y"))
    assert (meta.heatmap_size, meta.input_size, meta.keypoints) == ((512, 384), (256, 192), "coco")
    # our own comparison too: the ONNX file on real-size inputs against the module, both outputs
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((3, 3, 256, 192)).astype(np.float32)
    sess = ort.InferenceSession(str(res.output), providers=["CPUExecutionProvider"])
    got = sess.run(["simcc_x", "simcc_y"], {"input": x})
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x))]
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.abs(g - w).max() <= 1e-4 * np.abs(w).max()


def test_input_size_is_the_heads_own(rtm_t, tmp_path):
    _, path = rtm_t
    with pytest.raises(PosequantError, match="head is built for 256x192 inputs .* leave --input-size out"):
        export_pose(path, tmp_path / "x.onnx", input_size=(384, 288))
    assert not (tmp_path / "x.onnx").exists()


def _load(tmp_path, sd):
    path = tmp_path / "m.pth"
    torch.save({"state_dict": sd}, path)
    return resolve_model(load_checkpoint(path))


@pytest.mark.parametrize("change, match", [
    (lambda sd: sd.pop("backbone.stage2.1.blocks.0.conv2.pointwise_conv.bn.running_var"),
     r"missing \(e\.g\. backbone\.stage2\.1\.blocks\.0\.conv2\.pointwise_conv\.bn\.running_var\)"),
    (lambda sd: sd.__setitem__("head.cls_x.bias", torch.zeros(384)), r"not in the model \(e\.g\. head\.cls_x\.bias\)"),
    (lambda sd: sd.__setitem__("head.gau.res_scale.scale", torch.zeros(255)),
     r"'head\.gau\.res_scale\.scale' has shape \(255,\) but the model expects \(256,\)"),
    (lambda sd: sd.__setitem__("backbone.stage3.0.conv.weight", torch.zeros(100, 96, 3, 3)),
     r"RTMPose model but its layers are inconsistent \(stage3 has 100 channels, not 192"),
])
def test_strict_loading_names_the_key(rtm_t, tmp_path, change, match):
    sd = dict(rtm_t[0].state_dict())
    change(sd)
    with pytest.raises(ArchitectureError, match=match) as e:
        _load(tmp_path, sd)
    assert "\n" not in str(e.value)


def test_inspect_and_export_through_the_cli(rtm_t, tmp_path):
    _, path = rtm_t
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    assert "rtmpose-t_coco-256x192 (rtmpose)" in res.output and "input        256x192 by default, RGB" in res.output
    res = CliRunner().invoke(main, ["export-pose", str(path), "-o", str(tmp_path / "t.onnx"), "--no-verify",
                                    "--json", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    assert "SimCC x 384, y 512 (split ratio 2)" in res.output
    props = json.loads((tmp_path / "t.json").read_text())["metadata"]
    assert props["head"] == "simcc" and json.loads(props["outputs"]) == ["simcc_x", "simcc_y"]
    assert [o.name for o in onnx.load(str(tmp_path / "t.onnx")).graph.output] == ["simcc_x", "simcc_y"]
    res = CliRunner().invoke(main, ["export-pose", str(path), "--simcc-outputs", "a,b", "-o", str(tmp_path / "u.onnx")])
    assert res.exit_code == 2 and "leave --simcc-outputs out" in res.output
