"""Bad input to ``eval`` / ``eval-preds`` (issue 3, section 5): one ``error:`` line, exit 2, no output file.

Synthetic MPII and COCO sets written here, and small random-weight models: what is tested is
the error path and the scoring of partial runs, not accuracy.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import scipy.io
from click.testing import CliRunner
from onnx import helper
from test_calibration_datasets import coco_root as coco_root  # noqa: F401 (fixture)
from test_calibration_datasets import mpii_root as mpii_root  # noqa: F401 (fixture)

from posequant.benchmarks.evaluate import evaluate, score
from posequant.benchmarks.metrics import MPII_GT_JOINTS, mpii_pckh
from posequant.calibration import load_mpii_gt, open_dataset
from posequant.cli import main
from posequant.core.metadata import read_meta
from posequant.exporter import export_pose

from conftest import MPII_MINI, needs_shared


@pytest.fixture(scope="module")
def models(tmp_path_factory, small_checkpoints) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {
        "mpii": export_pose(small_checkpoints["pose_resnet"], d / "mpii.onnx", input_size=(64, 64)).output,
        "coco": export_pose(small_checkpoints["pose_hrnet"], d / "coco.onnx", input_size=(128, 96)).output,
    }


def write_gt(root: Path) -> Path:
    """``annot/gt_valid.mat`` for the records of ``annot/valid.json``, as the official file lays it out."""
    records = json.loads((root / "annot" / "valid.json").read_text())
    joints = np.stack([np.asarray(r["joints"], dtype=np.float64) for r in records], axis=2)  # 16 x 2 x N, 1-based
    vis = np.stack([np.asarray(r["joints_vis"]) for r in records], axis=1)
    heads = np.stack([[[0.0, 0.0], [10.0, 10.0]]] * len(records), axis=2)
    names = np.array([[np.array([n]) for n in MPII_GT_JOINTS]], dtype=object)
    path = root / "annot" / "gt_valid.mat"
    scipy.io.savemat(path, {"dataset_joints": names, "jnt_missing": (vis == 0).astype(np.uint8),
                            "pos_gt_src": joints, "headboxes_src": heads})
    return path


_JSON_DIR: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def _json_dir(tmp_path):
    """Each test's ``--json`` goes into its own pytest tmp_path (cleaned up by pytest, not left in /tmp)."""
    _JSON_DIR["dir"] = tmp_path
    yield
    _JSON_DIR.clear()


def run(*args) -> tuple[object, Path]:
    """Invoke the CLI with ``--json OUT`` added; tracebacks propagate and fail the test."""
    out = Path(tempfile.mkdtemp(dir=_JSON_DIR["dir"])) / "result.json"  # a fresh folder per call
    res = CliRunner().invoke(main, [str(a) for a in args] + ["--json", str(out)], catch_exceptions=False)
    return res, out


def one_error_line(res, out: Path) -> str:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert not out.exists()  # nothing half-done is left behind
    return lines[0]


# ---- missing and unreadable images --------------------------------------------------------------


def test_missing_images_are_named_and_counted_then_skipped(models, mpii_root):
    write_gt(mpii_root)
    (mpii_root / "images" / "a.jpg").unlink()
    res, out = run("eval", models["mpii"], "--data", mpii_root)
    line = one_error_line(res, out)
    assert "1 of 3 images" in line and "a.jpg" in line and "--skip-missing" in line

    res, out = run("eval", models["mpii"], "--data", mpii_root, "--skip-missing")
    assert res.exit_code == 0, res.output
    written = json.loads(out.read_text())
    assert written["people"] == 2 and written["partial"] is True
    assert [Path(p).name for p in written["skipped_images"]] == ["a.jpg"]
    assert "scored on these 2 people" in res.output


def test_undecodable_image_fails_or_is_skipped(models, coco_root):
    (coco_root / "val2017" / "000000000003.jpg").write_bytes(b"not a jpeg")
    res, out = run("eval", models["coco"], "--data", coco_root, "--no-flip")
    assert "cannot decode image" in one_error_line(res, out)
    res = evaluate(models["coco"], coco_root, flip=False, skip_missing=True)
    assert res.people == 2 and res.partial  # image 3's person left out, image 7's two kept
    assert [Path(p).name for p in res.skipped] == ["000000000003.jpg"]


def test_mpii_subset_is_scored_against_its_own_ground_truth_columns(mpii_root, models):
    write_gt(mpii_root)
    (mpii_root / "images" / "a.jpg").unlink()
    ds = open_dataset(mpii_root, input_size=(64, 64), skip_missing=True)
    perfect = np.stack([p.joints for p in ds.people])  # b.jpg and c.jpg: gt columns 1 and 2
    metrics = score(read_meta(models["mpii"]), ds, ds.people, perfect, np.ones((2, 16, 1)))
    assert metrics["PCKh@0.1"]["Mean"] == 100.0
    # the same predictions against the first two columns (what a prefix would take) are wrong
    gt = load_mpii_gt(mpii_root)
    prefix = {k: (v[..., :2] if k in ("jnt_missing", "pos_gt_src", "headboxes_src") else v) for k, v in gt.items()}
    assert mpii_pckh(perfect, prefix, one_based=False)["PCKh@0.1"]["Mean"] < 100.0


# ---- malformed annotation files -------------------------------------------------------------------


def test_malformed_mpii_json(models, mpii_root):
    path = mpii_root / "annot" / "valid.json"
    records = json.loads(path.read_text())
    records[2]["center"] = [1.0]
    path.write_text(json.dumps(records))
    res, out = run("eval", models["mpii"], "--data", mpii_root)
    line = one_error_line(res, out)
    assert str(path) in line and "entry 2, field 'center'" in line


@pytest.mark.parametrize("damage, message", [
    (lambda gt: gt["headboxes_src"].__setitem__((0, 1, 1), np.nan), r"person 1, field 'headboxes_src': not a finite"),
    (lambda gt: gt["pos_gt_src"].__setitem__((3, 0, 2), np.inf), r"person 2, field 'pos_gt_src': not a finite"),
    (lambda gt: gt.update(headboxes_src=gt["headboxes_src"][..., :2]), r"'headboxes_src' has shape \(2, 2, 2\)"),
    (lambda gt: gt.pop("jnt_missing"), r"has no field 'jnt_missing'"),
])
def test_malformed_gt_valid_mat(models, mpii_root, damage, message):
    path = write_gt(mpii_root)
    gt = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    damage(gt)
    scipy.io.savemat(path, gt)
    res, out = run("eval", models["mpii"], "--data", mpii_root)
    line = one_error_line(res, out)
    assert str(path) in line
    assert re.search(message, line), line


def test_gt_valid_mat_of_another_release(models, mpii_root):
    path = write_gt(mpii_root)
    records = json.loads((mpii_root / "annot" / "valid.json").read_text())
    (mpii_root / "annot" / "valid.json").write_text(json.dumps(records[:2]))
    res, out = run("eval", models["mpii"], "--data", mpii_root)
    assert f"{path} has 3 people but annot/valid.json lists 2" in one_error_line(res, out)


def test_missing_gt_valid_mat(models, mpii_root):
    res, out = run("eval", models["mpii"], "--data", mpii_root)
    assert "gt_valid.mat does not exist" in one_error_line(res, out)


def test_truncated_gt_valid_mat(models, mpii_root, tmp_path):
    path = write_gt(mpii_root)
    path.write_bytes(path.read_bytes()[:200])
    np.save(tmp_path / "p.npy", np.zeros((3, 16, 2)))
    res, out = run("eval-preds", tmp_path / "p.npy", "--gt", path)
    assert "is not a readable .mat file" in one_error_line(res, out)


def test_malformed_coco_json(models, coco_root):
    path = coco_root / "annotations" / "person_keypoints_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["bbox"] = "wide"
    path.write_text(json.dumps(data))
    res, out = run("eval", models["coco"], "--data", coco_root)
    line = one_error_line(res, out)
    assert str(path) in line and "annotations[1], field 'bbox'" in line


# ---- model, data and predictions that do not fit --------------------------------------------------


def test_joint_count_mismatch(models, mpii_root, coco_root):
    write_gt(mpii_root)
    res, out = run("eval", models["coco"], "--data", mpii_root)
    assert "predicts 17 joints (coco) but" in one_error_line(res, out)
    res, out = run("eval", models["mpii"], "--data", coco_root)
    assert "predicts 16 joints (mpii) but" in one_error_line(res, out)


def test_unknown_layout(models, tmp_path):
    (tmp_path / "data" / "annot").mkdir(parents=True)
    (tmp_path / "data" / "notes.txt").write_text("hello")
    res, out = run("eval", models["mpii"], "--data", tmp_path / "data")
    assert "cannot tell the dataset layout" in one_error_line(res, out)


def test_image_folder_is_not_evaluable(models, tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "x.jpg"), np.zeros((8, 8, 3), np.uint8))
    res, out = run("eval", models["mpii"], "--data", tmp_path)
    assert "without annotations" in one_error_line(res, out)


def test_prediction_count_and_nan(mpii_root, tmp_path):
    gt = write_gt(mpii_root)
    np.save(tmp_path / "two.npy", np.zeros((2, 16, 2)))
    res, out = run("eval-preds", tmp_path / "two.npy", "--gt", gt)
    assert "holds 2 people but the ground truth has 3" in one_error_line(res, out)
    preds = np.ones((3, 16, 2))
    preds[1, 4, 1] = np.nan
    np.save(tmp_path / "nan.npy", preds)
    res, out = run("eval-preds", tmp_path / "nan.npy", "--gt", gt)
    assert "person 1, joint 4 (l_knee) is [1.0, nan]" in one_error_line(res, out)


def nan_model(model: Path, out: Path) -> Path:
    """The same model (and metadata) with ``log(-|heatmaps|)`` appended: NaN or -inf everywhere."""
    m = onnx.load(str(model))
    name = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = ["raw" if o == name else o for o in node.output]
    m.graph.node.extend([helper.make_node("Abs", ["raw"], ["abs"]), helper.make_node("Neg", ["abs"], ["neg"]),
                         helper.make_node("Log", ["neg"], [name])])
    onnx.save(m, str(out))
    return out


@pytest.mark.shared
@needs_shared(MPII_MINI)
def test_nan_heatmaps_from_the_model(models, tmp_path):
    broken = nan_model(models["mpii"], tmp_path / "nan.onnx")
    res, out = run("eval", broken, "--data", MPII_MINI)
    assert "output NaN or inf heatmaps for 5 of 5 people" in one_error_line(res, out)
    res = evaluate(models["mpii"], MPII_MINI)  # the unbroken model goes through
    assert res.people == 5 and not res.partial


def test_unwritable_json_fails_before_the_run(models, mpii_root, tmp_path):
    write_gt(mpii_root)
    res = CliRunner().invoke(main, ["eval", str(models["mpii"]), "--data", str(mpii_root),
                                    "--json", str(tmp_path / "no" / "e.json")], catch_exceptions=False)
    assert res.exit_code == 2 and res.output.startswith("error: the folder of --json")


def test_save_preds_refuses_partial_runs(models, mpii_root, tmp_path):
    write_gt(mpii_root)
    res, out = run("eval", models["mpii"], "--data", mpii_root, "--limit", "1", "--save-preds", tmp_path / "p.mat")
    assert "leave out --limit" in one_error_line(res, out)
    (mpii_root / "images" / "b.jpg").unlink()
    res, out = run("eval", models["mpii"], "--data", mpii_root, "--skip-missing", "--save-preds", tmp_path / "p.mat")
    assert "leave out --skip-missing" in one_error_line(res, out)  # refused before the evaluation
    assert not (tmp_path / "p.mat").exists() and not out.exists()
