"""export_pose: every family and checkpoint variant to verified ONNX, metadata, options, failures."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_checkpoint import VARIANTS, save_variant

from posequant.core.errors import ExportError, PosequantError, VerificationError
from posequant.core.metadata import ModelMeta, read_meta
from posequant.exporter import export_pose
from posequant.exporter.verify import compare_heatmaps

from conftest import SMALL, small_model

FAMILY_DEFAULTS = {  # colour, mean, std of each family's own training code
    "pose_resnet": ("bgr", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "pose_hrnet": ("rgb", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "hourglass": ("rgb", (0.4404, 0.4440, 0.4327), (1.0, 1.0, 1.0)),
}


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def torch_last(model, x):
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return (out[-1] if isinstance(out, list) else out).numpy()


@pytest.mark.parametrize("family", sorted(SMALL))
def test_family_exports_and_verifies(tmp_path, small_checkpoints, family):
    cfg, size = SMALL[family]
    out = tmp_path / f"{family}.onnx"
    result = export_pose(small_checkpoints[family], out, input_size=size)
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # self-contained
    rep = result.verification
    assert rep.passed and rep.max_rel_diff < 1e-4
    assert rep.cases[0].argmax_agreement == 1.0

    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["heatmaps"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    meta = read_meta(out)
    color, mean, std = FAMILY_DEFAULTS[family]
    assert (meta.family, meta.color, meta.input_size) == (family, color, size)
    assert meta.mean == pytest.approx(mean) and meta.std == pytest.approx(std)
    assert meta.num_joints == cfg.num_joints
    assert meta.heatmap_size == (size[0] // 4, size[1] // 4)
    assert meta.keypoints == {16: "mpii", 17: "coco"}[cfg.num_joints]
    assert meta.source_sha256 == result.checkpoint.sha256 and len(meta.source_sha256) == 64
    assert meta.arch_config and meta.posequant_version

    # dynamic batch: 3 people at once, same numbers as PyTorch (last stack for the hourglass)
    x = np.random.default_rng(1).standard_normal((3, 3, *size), dtype=np.float32)
    ref = torch_last(small_model(family), x)
    got = run_onnx(out, x)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", sorted(SMALL))
def test_every_checkpoint_variant_exports(tmp_path, family, variant):
    _, size = SMALL[family]
    model = small_model(family)
    ckpt = tmp_path / "ckpt.pth.tar"
    if variant == "torchscript":
        torch.jit.trace(model, torch.zeros(1, 3, *size), check_trace=False).save(str(ckpt))
    else:
        save_variant(model, ckpt, variant)
    result = export_pose(ckpt, input_size=size)
    assert result.output == tmp_path / "ckpt.onnx"
    assert result.meta.family == family and result.verification.passed


def test_pickled_module_exports_with_trust(tmp_path):
    model = small_model("hourglass")
    ckpt = tmp_path / "full.pth"
    torch.save(model, ckpt)
    result = export_pose(ckpt, tmp_path / "hg.onnx", input_size=(64, 64), trust_pickle=True)
    assert result.meta.family == "hourglass" and result.verification.passed


def test_fixed_batch_and_options(tmp_path, small_checkpoints):
    out = tmp_path / "fixed.onnx"
    result = export_pose(small_checkpoints["pose_resnet"], out, input_size=(96, 64), batch=2, opset=18,
                         color="RGB", mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                         simplify=False)
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert model.opset_import[0].version == 18
    meta = result.meta
    assert meta.color == "rgb" and meta.input_size == (96, 64) and meta.heatmap_size == (24, 16)
    assert meta.mean == pytest.approx((0.485, 0.456, 0.406)) and meta.std == pytest.approx((0.229, 0.224, 0.225))
    assert "simplify_s" not in result.timings


def test_metadata_round_trip(tmp_path, small_checkpoints):
    out = tmp_path / "m.onnx"
    meta = export_pose(small_checkpoints["pose_resnet"], out, input_size=(64, 64)).meta
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["input_size"] == "64x64" and props["color"] == "bgr" and props["num_joints"] == "16"
    assert json.loads(props["flip_pairs"]) == [[0, 5], [1, 4], [2, 3], [10, 15], [11, 14], [12, 13]]
    assert json.loads(props["joint_names"])[9] == "head_top"
    assert json.loads(props["arch_config"])["depth"] == 18
    assert ModelMeta.from_props(props) == meta


def test_keypoints_must_match_joint_count(tmp_path, small_checkpoints):
    with pytest.raises(PosequantError, match="--keypoints coco has 17 joints but the model outputs 16"):
        export_pose(small_checkpoints["pose_resnet"], tmp_path / "x.onnx", input_size=(64, 64), keypoints="coco")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("kwargs,match", [
    ({"opset": 13}, "too old"),
    ({"batch": 0}, "at least 1"),
    ({"color": "hsv"}, "rgb or bgr"),
    ({"mean": (0.1, 0.2)}, "3 values"),
    ({"std": (0.1, 0.0, 0.2)}, "positive"),
])
def test_bad_options(tmp_path, small_checkpoints, kwargs, match):
    with pytest.raises(PosequantError, match=match):
        export_pose(small_checkpoints["pose_resnet"], tmp_path / "x.onnx", **kwargs)


def test_input_size_too_small_for_the_model(tmp_path, small_checkpoints):
    # the size, why, and the sizes it does fit (the hourglass halves 4 times after a stride-4 stem)
    with pytest.raises(ExportError, match=r"--input-size 16x16: the model cannot run.*multiples of 64: use 64x64$"):
        export_pose(small_checkpoints["hourglass"], tmp_path / "x.onnx", input_size=(16, 16))


@pytest.mark.parametrize("where", ["missing_dir", "is_dir", "under_file"])
def test_unwritable_output_fails_before_work(tmp_path, small_checkpoints, where):
    target = {
        "missing_dir": tmp_path / "no" / "such" / "dir" / "m.onnx",
        "is_dir": tmp_path,
        "under_file": small_checkpoints["pose_resnet"] / "m.onnx",
    }[where]
    with pytest.raises(PosequantError, match="does not exist|is a directory|not a directory|cannot write"):
        export_pose(small_checkpoints["pose_resnet"], target)


LYING_ARCH = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
    def forward(self, x):
        y = self.conv(x)
        if torch.onnx.is_in_onnx_export():  # a model whose exported graph is not what eager runs
            y = y * 1.01
        return y

def build():
    return Net()
"""


def test_verification_failure_writes_nothing(tmp_path):
    arch = tmp_path / "lying.py"
    arch.write_text(LYING_ARCH)
    ns = {}
    exec(LYING_ARCH, ns)
    ckpt = tmp_path / "lying.pth"
    torch.save(ns["build"]().state_dict(), ckpt)
    out = tmp_path / "lying.onnx"
    with pytest.raises(VerificationError, match=r"disagrees with PyTorch \(.*relative .* > 0.0001 on random inputs "
                                                r"\(seed 0\)\); nothing was written"):
        export_pose(ckpt, out, arch=f"{arch}:build", input_size=(64, 64))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix not in (".py", ".pth")] == []  # no temp files
    # the same model passes when verification is off (the user asked for it)
    export_pose(ckpt, out, arch=f"{arch}:build", input_size=(64, 64), verify_model=False)
    assert out.exists()


def test_compare_heatmaps_ties_are_not_mismatches():
    ref = np.zeros((1, 2, 4, 4), np.float32)
    ref[0, 0, 1, 1] = 1.0
    ref[0, 1, 2, 2] = ref[0, 1, 3, 3] = 0.5  # a tie
    out = ref.copy()
    out[0, 1, 3, 3] += 1e-7  # the tie breaks the other way
    out[0, 0, 1, 2] = 2.0  # a real disagreement
    res = compare_heatmaps("x", ref, out, atol=1e-5)
    assert res.joint_agreement == (0.0, 0.0)
    assert res.argmax_mismatches == 1
    assert res.max_abs_diff == pytest.approx(2.0)
