"""pipeline: export -> quantize -> gate into one folder, on a tiny random-weights COCO model and the
synthetic COCO set labelled by its own float predictions (posequant.benchmarks.synthetic)."""

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from posequant.benchmarks.evaluate import evaluate
from posequant.benchmarks.latency import onnx_precision
from posequant.benchmarks.synthetic import make_coco_set
from posequant.cli import main
from posequant.demo import randomise
from posequant.exporter import export_pose
from posequant.exporter.zoo import pose_resnet
from posequant.pipeline import GateBudget, run_pipeline

from conftest import COCO_MINI, TRAINED_ARCH, TRAINED_CKPT, needs_shared

TINY = pose_resnet.PoseResNetConfig(depth=18, num_joints=17, deconv_filters=(32, 32, 32))
SIZE = (64, 32)  # a size the stride-32 backbone divides (64x48 gave 16x16 heatmaps, not 16x12)
LOOSE = GateBudget(max_drop=50.0, max_joint_drop=60.0, min_speedup=0.0)  # random weights: INT8 moves some joints
FILES = ("model.onnx", "model.int8.onnx", "quantize.md", "quantize.json", "gate/report.md", "gate/report.json",
         "summary.json")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    ckpt = d / "tiny.pth"
    torch.manual_seed(0)
    torch.save(randomise(pose_resnet.build(TINY)).state_dict(), ckpt)
    labeller = export_pose(ckpt, d / "labeller.onnx", input_size=SIZE, verify_model=False).output
    return ckpt, make_coco_set(d / "coco", labeller)


def test_synthetic_set_is_labelled_by_the_float_model(inputs, tmp_path):
    ckpt, data = inputs
    float_onnx = export_pose(ckpt, tmp_path / "f.onnx", input_size=SIZE, verify_model=False).output
    for split, people in (("val", 8), ("train", 16)):
        res = evaluate(float_onnx, data, split=split, flip=False)
        assert res.people == people and res.metrics["AP"] == pytest.approx(1.0)


def test_pipeline_writes_one_folder_and_passes_a_loose_budget(inputs, tmp_path):
    ckpt, data = inputs
    out = tmp_path / "out"
    lines = []
    res = run_pipeline(ckpt, data, data, out, input_size=SIZE, budget=LOOSE, flip=False, runs=3,
                       progress=lines.append)
    assert res.passed and not res.gate.reasons
    for name in FILES:
        assert (out / name).is_file(), name
    assert onnx_precision(out / "model.onnx") == "fp32" and onnx_precision(out / "model.int8.onnx") == "int8"
    onnx.checker.check_model(str(out / "model.int8.onnx"))
    assert [ln[:5] for ln in lines if ln.startswith("[")] == ["[1/3]", "[2/3]", "[3/3]"]  # stages, in order
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is True and summary["gate"]["dataset"] == "COCO val" and summary["gate"]["people"] == 8
    assert summary["quantize"]["calibration"]["split"] == "train" and summary["quantize"]["calibration"]["people"] == 16
    assert summary["gate"]["scores"]["AP"]["float"] == pytest.approx(100.0)
    assert set(summary["seconds"]) == {"export", "quantize", "gate", "total"}


def test_pipeline_fails_an_impossible_budget(inputs, tmp_path):
    ckpt, data = inputs
    res = run_pipeline(ckpt, data, data, tmp_path / "out", input_size=SIZE, flip=False, runs=3,
                       budget=GateBudget(max_drop=50.0, max_joint_drop=60.0, min_speedup=1000.0))
    assert not res.passed and len(res.gate.reasons) == 1 and "speedup" in res.gate.reasons[0]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["passed"] is False


def test_cli_pipeline_exit_codes(inputs, tmp_path):
    ckpt, data = inputs
    common = [str(ckpt), "--calib", str(data), "--val", str(data), "--input-size", "64x32", "--no-flip",
              "--runs", "3", "--max-drop", "50", "--max-joint-drop", "60"]
    ok = CliRunner().invoke(main, ["pipeline", *common, "-o", str(tmp_path / "a"), "--min-speedup", "0"])
    assert ok.exit_code == 0, ok.output
    assert "pipeline: PASS" in ok.output and "summary:" in ok.output and "quantize" in ok.output
    bad = CliRunner().invoke(main, ["pipeline", *common, "-o", str(tmp_path / "b"), "--min-speedup", "1000"])
    assert bad.exit_code == 1 and "pipeline: FAIL" in bad.output


def test_cli_pipeline_bad_input_is_one_line(inputs, tmp_path):
    ckpt, data = inputs
    res = CliRunner().invoke(main, ["pipeline", str(ckpt), "--calib", str(tmp_path / "nowhere"), "--val", str(data),
                                    "--input-size", "64x32", "-o", str(tmp_path / "c")])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output


# ---- the GitHub Actions workflow's commands, run here ---------------------------------------------


def _workflow():
    """(env, [(step name, script)]) of .github/workflows/posequant-gate.yml, read without a YAML library:
    the file keeps to ``KEY: value`` lines under ``env:`` and ``run: |`` blocks."""
    from conftest import REPO

    lines = (REPO / ".github/workflows/posequant-gate.yml").read_text().splitlines()
    env, steps, i = {}, [], 0
    while i < len(lines):
        line = lines[i]
        if line == "env:":
            i += 1
            while i < len(lines) and lines[i].startswith("  ") and ":" in lines[i]:
                key, value = lines[i].strip().split(":", 1)
                env[key] = value.split(" #")[0].strip().strip('"')
                i += 1
            continue
        if line.strip().startswith("- name:"):
            name = line.split(":", 1)[1].strip()
            if i + 1 < len(lines) and lines[i + 1].strip() == "run: |":
                indent = len(lines[i + 1]) - len(lines[i + 1].lstrip()) + 2
                i += 2
                body = []
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) >= indent):
                    body.append(lines[i][indent:])
                    i += 1
                steps.append((name, "\n".join(body)))
                continue
        i += 1
    return env, steps


def ci_gate_budgets() -> dict[str, str]:
    """The defaults of scripts/ci_gate.sh's ``NAME=${NAME:-value}`` budget lines."""
    import re

    from conftest import REPO

    text = (REPO / "scripts/ci_gate.sh").read_text()
    return dict(re.findall(r"^(MAX_DROP|MAX_JOINT_DROP|MIN_SPEEDUP)=\$\{\1:-([0-9.]+)\}$", text, re.M))


def test_demo_and_ci_gate_share_their_budgets():
    from posequant.demo import TRAINED_BUDGET

    ci = ci_gate_budgets()
    assert set(ci) == {"MAX_DROP", "MAX_JOINT_DROP", "MIN_SPEEDUP"}
    assert (float(ci["MAX_DROP"]), float(ci["MAX_JOINT_DROP"]), float(ci["MIN_SPEEDUP"])) == (
        TRAINED_BUDGET.max_drop, TRAINED_BUDGET.max_joint_drop, TRAINED_BUDGET.min_speedup)


@pytest.mark.shared
@needs_shared(TRAINED_CKPT, COCO_MINI)
def test_github_workflow_commands_gate_the_trained_model(tmp_path):
    """Every step of the workflow but the install (posequant is installed here) runs as written, on the
    trained model and coco-mini, and leaves the report the upload step collects."""
    import os
    import subprocess
    import sys

    env, steps = _workflow()
    assert [n for n, _ in steps][:1] == ["Install posequant (CPU torch first; a bare torch pulls several GB of CUDA wheels)"]
    assert {"CHECKPOINT", "ARCH", "EXPORT_OPTIONS", "CALIB", "VAL", "MAX_DROP", "BACKEND"} <= set(env)
    ci = ci_gate_budgets()  # the CI gate's accuracy budgets for 68 people; speed is for scripts, not tests
    env.update(CHECKPOINT=str(TRAINED_CKPT), ARCH=TRAINED_ARCH, CALIB=str(COCO_MINI),
               VAL=str(COCO_MINI), MAX_DROP=ci["MAX_DROP"], MAX_JOINT_DROP=ci["MAX_JOINT_DROP"], MIN_SPEEDUP="0")
    summary = tmp_path / "step-summary.md"  # GitHub sets GITHUB_STEP_SUMMARY in every step
    summary.write_text("")
    run_env = {**os.environ, **env, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
               "GITHUB_STEP_SUMMARY": str(summary)}
    for name, script in steps[1:]:
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=run_env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"step {name!r} failed:\n{res.stdout}\n{res.stderr}"
    for f in ("gate/report.md", "gate/report.json", "gate/disagreements.png", "quantize.md", "quantize.json"):
        assert (tmp_path / "gate-out" / f).is_file(), f
    assert json.loads((tmp_path / "gate-out/gate/report.json").read_text())["passed"] is True
    text = summary.read_text()  # the quantize report, then the gate's report.md, appended in that order
    quantize_md = (tmp_path / "gate-out/quantize.md").read_text()
    assert text.startswith(quantize_md) and text.count("# INT8 gate: PASS") == 1, text
    assert text.index("# INT8 gate: PASS") > len(quantize_md) - 1 and "## Checks" in text


@pytest.mark.slow  # a whole pipeline run (~20 s here) for one phrase
def test_pipeline_of_an_onnx_model_says_what_it_was_verified_against(inputs, tmp_path):
    """An ONNX input is stamped and checked against the original ONNX file, not PyTorch (issue 22)."""
    from posequant.pipeline import format_pipeline

    ckpt, data = inputs
    model = export_pose(ckpt, tmp_path / "m.onnx", input_size=SIZE, verify_model=False).output
    res = run_pipeline(model, data, data, tmp_path / "out", budget=LOOSE, flip=False, runs=1, num_samples=4)
    text = format_pipeline(res)
    assert "verified vs the original ONNX" in text and "PyTorch" not in text
