"""Checkpoint loading: every storage variant, and every way a file can be wrong."""

import pickle

import pytest
import torch

from posequant.core.errors import ArchitectureError, CheckpointError
from posequant.exporter import load_checkpoint, resolve_model

from conftest import small_model


def save_variant(model: torch.nn.Module, path, variant: str):
    sd = model.state_dict()
    if variant == "plain":
        torch.save(sd, path)
    elif variant == "wrapped_state_dict":  # the bearpaw / HRNet checkpoint.pth layout
        torch.save({"epoch": 3, "state_dict": sd, "perf": 0.5, "optimizer": {"lr": 1e-3}}, path)
    elif variant == "wrapped_best_state_dict":
        torch.save({"best_state_dict": sd, "epoch": 140}, path)
    elif variant == "wrapped_model":
        torch.save({"model": sd}, path)
    elif variant == "module_prefix":  # saved from nn.DataParallel
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    elif variant == "model_module_prefix":
        torch.save({"state_dict": {f"model.module.{k}": v for k, v in sd.items()}}, path)
    elif variant == "legacy_format":  # pre-1.6 torch.save, as the 2018-2019 official releases
        state = {"epoch": 140, "arch": "pose", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                 "optimizer": torch.optim.Adam(model.parameters()).state_dict()}
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif variant == "torchscript":
        torch.jit.trace(model, torch.zeros(1, 3, 64, 64), check_trace=False).save(str(path))
    else:
        raise ValueError(variant)


VARIANTS = ["plain", "wrapped_state_dict", "wrapped_best_state_dict", "wrapped_model", "module_prefix",
            "model_module_prefix", "legacy_format", "torchscript"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("suffix", [".pth", ".pth.tar", ".pt"])
def test_variants_load_to_the_same_weights(tmp_path, variant, suffix):
    model = small_model("pose_resnet")
    path = tmp_path / f"ckpt{suffix}"
    save_variant(model, path, variant)
    ckpt = load_checkpoint(path)
    ref = model.state_dict()
    assert set(ckpt.state_dict) == set(ref)
    assert all(torch.equal(ckpt.state_dict[k], ref[k]) for k in ref)
    assert resolve_model(ckpt).family == "pose_resnet"
    assert (ckpt.module is not None) == (variant == "torchscript")


def test_pickled_module_needs_trust(tmp_path):
    model = small_model("hourglass")
    path = tmp_path / "full_model.pth"
    torch.save(model, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(path)
    ckpt = load_checkpoint(path, trust_pickle=True)
    assert ckpt.module is not None and "pickled HourglassNet" in ckpt.container
    assert resolve_model(ckpt).family == "hourglass"


def test_unknown_torchscript_model_is_used_as_is(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.ReLU()).eval()
    path = tmp_path / "ts.pt"
    torch.jit.script(net).save(str(path))
    pose = resolve_model(load_checkpoint(path))
    assert pose.family == "torchscript"


# ---- bad input: one clear CheckpointError, never a raw torch/pickle exception ----

@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.pth"
    torch.save(small_model("pose_resnet").state_dict(), path)
    return path


def test_missing(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_empty(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(path)


def test_truncated(tmp_path, good_file):
    data = good_file.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_corrupt_bytes(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    data[100:4000] = bytes(3900)  # zero out the zip's first records
    path = tmp_path / "corrupt.pth"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt|corrupt"):
        load_checkpoint(path)


def test_legacy_pickle_truncated(tmp_path):
    path = tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps({"a": 1})[:5])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"\xff\xd8\xff\xe0 JFIF image", b"hello, this is a text file\n"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "thing.pth"
    path.write_bytes(content * 10)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_dict_without_weights(tmp_path):
    path = tmp_path / "opt.pth"
    torch.save({"epoch": 1, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match="without model weights"):
        load_checkpoint(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, bad):
    sd = small_model("pose_resnet").state_dict()
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = bad
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"'layer2.0.conv1.weight' has 1 (NaN|Inf)"):
        load_checkpoint(path)


def test_tiny_negative_running_var_is_accepted(tmp_path):
    # trained models can carry dead BN channels with var = -1e-12 (see the ultralight model)
    sd = small_model("pose_resnet").state_dict()
    sd["bn1.running_var"][0] = -7.8e-13
    path = tmp_path / "ok.pth"
    torch.save(sd, path)
    load_checkpoint(path)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    sd = small_model("pose_resnet").state_dict()
    sd["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "mismatch.pth"
    torch.save(sd, path)
    with pytest.raises(ArchitectureError, match=r"'layer1.0.conv2.weight' has shape \(64, 64, 1, 1\) but the "
                                                r"model expects \(64, 64, 3, 3\)"):
        resolve_model(load_checkpoint(path))


def test_arch_family_typo(good_file):
    with pytest.raises(ArchitectureError, match="did you mean 'pose_resnet'"):
        resolve_model(load_checkpoint(good_file), "pose_resnt")


def test_arch_family_wrong(good_file):
    with pytest.raises(ArchitectureError, match="is not a HRNet PoseHighResolutionNet checkpoint"):
        resolve_model(load_checkpoint(good_file), "pose_hrnet")


ARCH_FILE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, joints=4):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, joints, 1)
    def forward(self, x):
        return self.head(torch.relu(self.body(x)))[:, :, ::4, ::4]

def build():
    return Net()

def build_other():
    return Net(joints=5)

def not_a_model():
    return 42

def broken():
    raise RuntimeError("boom")
"""


@pytest.fixture
def arch_file(tmp_path):
    path = tmp_path / "my_arch.py"
    path.write_text(ARCH_FILE)
    return path


@pytest.fixture
def custom_ckpt(tmp_path, arch_file):
    ns = {}
    exec(ARCH_FILE, ns)
    path = tmp_path / "custom.pth"
    torch.save({"model": {f"module.{k}": v for k, v in ns["build"]().state_dict().items()}}, path)
    return path


def test_custom_arch_from_file(custom_ckpt, arch_file):
    pose = resolve_model(load_checkpoint(custom_ckpt), f"{arch_file}:build")
    assert pose.family == "custom" and pose.arch_config == {"builder": f"{arch_file}:build"}


def test_custom_arch_from_module(custom_ckpt, arch_file, monkeypatch):
    monkeypatch.syspath_prepend(str(arch_file.parent))
    assert resolve_model(load_checkpoint(custom_ckpt), "my_arch:build").family == "custom"


@pytest.mark.parametrize("spec,match", [
    ("{dir}/missing.py:build", "not found"),
    ("{file}:nothere", "has no function 'nothere'"),
    ("{file}:not_a_model", "returned int, not a torch nn.Module"),
    ("{file}:broken", r"calling broken\(\) failed \(RuntimeError: boom\)"),
    ("no_such_package_xyz.models:build", "cannot import no_such_package_xyz.models"),
    ("{file}", "must be FILE.py:build_fn"),
    ("{syntax}:build", "cannot import .*SyntaxError"),
    ("{file}:build_other", r"'head.weight' has shape \(4, 8, 1, 1\) but the model expects \(5, 8, 1, 1\)"),
])
def test_custom_arch_errors(custom_ckpt, arch_file, tmp_path, spec, match):
    syntax = tmp_path / "bad_syntax.py"
    syntax.write_text("def build(:\n")
    spec = spec.format(dir=tmp_path, file=arch_file, syntax=syntax)
    with pytest.raises(ArchitectureError, match=match):
        resolve_model(load_checkpoint(custom_ckpt), spec)


def test_custom_arch_missing_keys(tmp_path, arch_file):
    path = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(2)}, path)
    with pytest.raises(ArchitectureError, match=r"key\(s\) the model needs are missing \(e.g. body.weight"):
        resolve_model(load_checkpoint(path), f"{arch_file}:build")
