"""scripts/profile_openvino.py: multiply-add counts per convolution kind, and a profile that adds up."""

from __future__ import annotations

import importlib.util

import openvino as ov
import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


def load_script():
    spec = importlib.util.spec_from_file_location("profile_openvino", REPO / "scripts" / "profile_openvino.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """Dense 3x3 conv, depthwise 3x3 conv (no padding), stride-2 deconvolution: MACs known by hand."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, groups=8),
                              torch.nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)).eval()
    path = tmp_path_factory.mktemp("profile") / "tiny.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["heatmaps"],
                      dynamic_axes={"input": {0: "batch"}, "heatmaps": {0: "batch"}})
    return path


def test_conv_macs_counts_each_kind(tiny_onnx):
    script = load_script()
    model = ov.Core().read_model(str(tiny_onnx))
    model.reshape({model.inputs[0]: [1, 3, 16, 16]})
    macs = sorted(script.conv_macs(model).values())
    dense = 8 * 16 * 16 * 3 * 3 * 3  # outputs x (input channels x taps)
    depthwise = 8 * 14 * 14 * 3 * 3  # outputs x taps of one channel
    deconv = 8 * 14 * 14 * 4 * 4 * 4  # inputs x (output channels x taps): no multiplications by zero
    assert macs == sorted([dense, depthwise, deconv])


def test_profile_adds_up(tiny_onnx):
    script = load_script()
    r = script.profile(tiny_onnx, (16, 16), threads=1, runs=3)
    assert r["convs"] == 3  # each convolution's time found and matched to its multiply-adds
    assert r["gmac"] * 1e9 == pytest.approx(8 * 16 * 16 * 27 + 8 * 14 * 14 * 9 + 8 * 14 * 14 * 64)
    assert 0 < r["conv_ms"] <= r["node_ms"]
    assert r["p50_ms"] > 0 and r["conv_tmacs"] > 0
    assert sum(c["mmac"] for c in r["slowest_convs"]) == pytest.approx(r["gmac"] * 1e3)
