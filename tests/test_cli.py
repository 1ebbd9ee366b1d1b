"""The CLI through click's CliRunner: output, exit codes, one-line errors, no tracebacks."""

import json

import pytest
import torch
from click.testing import CliRunner

import posequant
from posequant.cli import main


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and posequant.__version__ in res.output


def test_inspect_reports_detected_architecture(small_checkpoints, tmp_path):
    out = tmp_path / "info.json"
    res = invoke("inspect", small_checkpoints["pose_hrnet"], "--json", out)
    assert res.exit_code == 0, res.output
    assert "pose_hrnet_w8 (pose_hrnet)" in res.output
    assert "stage4: 3 module(s), basic blocks [4, 4, 4, 4], channels [8, 16, 32, 64]" in res.output
    info = json.loads(out.read_text())
    n = sum(p.numel() for p in __import__("conftest").small_model("pose_hrnet").parameters())
    assert info["num_parameters"] == n and f"{n:,}" in res.output
    assert info["num_joints"] == 17 and info["color"] == "rgb"


def test_export_pose_prints_verification_and_writes(small_checkpoints, tmp_path):
    out = tmp_path / "model.onnx"
    js = tmp_path / "export.json"
    res = invoke("export-pose", small_checkpoints["hourglass"], "-o", out, "--input-size", "64x64",
                 "--keypoints", "mpii", "--json", js)
    assert res.exit_code == 0, res.output
    assert "max abs diff" in res.output and "rel diff" in res.output and "PASS" in res.output
    assert "head_top" in res.output  # per-joint agreement table
    assert out.is_file()
    data = json.loads(js.read_text())
    assert data["verification"]["passed"] and data["metadata"]["input_size"] == "64x64"


def test_export_pose_options_parse(small_checkpoints, tmp_path):
    out = tmp_path / "m.onnx"
    res = invoke("export-pose", small_checkpoints["pose_resnet"], "-o", out, "--input-size", "64x64",
                 "--batch", "1", "--mean", "0.5,0.5,0.5", "--std", "0.25, 0.25, 0.25", "--color", "rgb",
                 "--no-simplify")
    assert res.exit_code == 0, res.output
    from posequant.core.metadata import read_meta

    meta = read_meta(out)
    assert meta.mean == (0.5, 0.5, 0.5) and meta.std == (0.25, 0.25, 0.25) and meta.color == "rgb"


def one_line_error(res, code=2):
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    return lines[0]


def _write(path, data):
    path.write_bytes(data)
    return path


def _save(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("make,expect", [
    (lambda d: d / "missing.pth", "not found"),
    (lambda d: _write(d / "empty.pth", b""), "empty"),
    (lambda d: _write(d / "notes.txt", b"hello"), "not a PyTorch checkpoint"),
    (lambda d: _save(d / "u.pth", {"x.weight": torch.zeros(1)}), "unknown architecture"),
])
def test_bad_checkpoints_give_one_line(tmp_path, make, expect):
    path = make(tmp_path)
    res = invoke("export-pose", path, "-o", tmp_path / "out.onnx")
    assert expect in one_line_error(res)
    assert not (tmp_path / "out.onnx").exists()


def test_bad_arch_gives_one_line(small_checkpoints, tmp_path):
    res = invoke("export-pose", small_checkpoints["pose_resnet"], "--arch", tmp_path / "nope.py:build")
    assert "not found" in one_line_error(res)


def test_unwritable_output_gives_one_line(small_checkpoints, tmp_path):
    res = invoke("export-pose", small_checkpoints["pose_resnet"], "-o", tmp_path / "missing" / "m.onnx")
    assert "does not exist" in one_line_error(res)


def test_bad_input_size_is_a_usage_error(small_checkpoints):
    res = invoke("export-pose", small_checkpoints["pose_resnet"], "--input-size", "256")
    assert res.exit_code == 2 and "HxW" in res.output


def test_inspect_of_pickled_model_without_trust(tmp_path):
    path = tmp_path / "full.pth"
    torch.save(__import__("conftest").small_model("hourglass"), path)
    res = invoke("inspect", path)
    assert "--trust-pickle" in one_line_error(res)
    assert invoke("inspect", path, "--trust-pickle").exit_code == 0
