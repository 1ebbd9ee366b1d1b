"""evaluate / eval / eval-preds on the real data in ../shared."""

import json

import pytest
from click.testing import CliRunner

from posequant.benchmarks.evaluate import evaluate
from posequant.benchmarks.metrics import coco_keypoint_ap, coco_results
from posequant.calibration import open_dataset
from posequant.cli import main
from posequant.core.errors import DataError
from posequant.exporter import export_pose

from conftest import COCO_MINI, MPII_MINI, TRAINED_ARCH, TRAINED_CKPT, needs_shared

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def trained_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "ultralight.onnx"
    export_pose(TRAINED_CKPT, out, arch=TRAINED_ARCH, input_size=(256, 192), keypoints="coco", color="rgb")
    return out


@needs_shared(TRAINED_CKPT, COCO_MINI)
def test_backends_agree_on_trained_model(trained_onnx):
    results = {be: evaluate(trained_onnx, COCO_MINI, backend=be, flip=False) for be in ("ort", "openvino")}
    results["torch"] = evaluate(TRAINED_CKPT, COCO_MINI, backend="torch", flip=False, export_options=dict(
        arch=TRAINED_ARCH, input_size=(256, 192), keypoints="coco", color="rgb"))
    ref = results["ort"].metrics
    assert results["ort"].people == 68
    assert 0.45 < ref["AP"] < 0.6 and ref["PCK@0.2"]["Mean"] > 88  # a trained model on real people
    for be, res in results.items():
        assert res.metrics["AP"] == pytest.approx(ref["AP"], abs=2e-3), be
        assert res.metrics["PCK@0.2"]["Mean"] == pytest.approx(ref["PCK@0.2"]["Mean"], abs=0.2), be


@needs_shared(TRAINED_CKPT, COCO_MINI)
def test_limited_coco_run_is_scored_on_its_own_images(trained_onnx, tmp_path):
    ds = open_dataset(COCO_MINI, input_size=(256, 192))
    first = list(dict.fromkeys(p.image_id for p in ds.people))[:6]
    n = sum(p.image_id in first for p in ds.people)
    assert {p.image_id for p in ds.people[:n]} == set(first)  # --limit n covers whole images
    res = evaluate(trained_onnx, COCO_MINI, flip=False, limit=n)
    assert res.people == n and res.partial and res.to_dict()["partial"] is True
    # reference: pycocotools on a file holding just those images and all their annotations
    data = json.loads(ds.coco_json.read_text())
    data["images"] = [im for im in data["images"] if im["id"] in first]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in first]
    (tmp_path / "subset.json").write_text(json.dumps(data))
    results = coco_results([p.image_id for p in ds.people[:n]], res.preds, res.maxvals)
    expected = coco_keypoint_ap(tmp_path / "subset.json", results)
    for key in ("AP", "AP50", "AP75", "AR"):
        assert res.metrics[key] == pytest.approx(expected[key], abs=1e-12), key
    # scored against the whole file instead, the people never predicted count as missed
    assert coco_keypoint_ap(ds.coco_json, results)["AR"] < expected["AR"] / 2


@needs_shared(TRAINED_CKPT, COCO_MINI)
def test_flip_changes_predictions(trained_onnx):
    off = evaluate(trained_onnx, COCO_MINI, flip=False, limit=8)
    on = evaluate(trained_onnx, COCO_MINI, flip=True, limit=8)
    assert on.people == off.people == 8
    assert abs(on.preds - off.preds).max() > 0.1


@needs_shared(TRAINED_CKPT, MPII_MINI)
def test_joint_count_mismatch(trained_onnx):
    with pytest.raises(DataError, match="17 joints .* MPII with 16"):
        evaluate(trained_onnx, MPII_MINI)


@needs_shared(MPII_MINI)
def test_mpii_eval_save_preds_round_trip(tmp_path, small_checkpoints):
    onnx_path = tmp_path / "pr.onnx"
    export_pose(small_checkpoints["pose_resnet"], onnx_path, input_size=(256, 256))
    run = CliRunner()
    res = run.invoke(main, ["eval", str(onnx_path), "--data", str(MPII_MINI), "--json", str(tmp_path / "e.json"),
                            "--save-preds", str(tmp_path / "pred.mat")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "PCKh@0.5" in res.output and "Shoulder" in res.output
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["people"] == 5 and set(evaluated["metrics"]) == {"PCKh@0.5", "PCKh@0.1"}
    res2 = run.invoke(main, ["eval-preds", str(tmp_path / "pred.mat"), "--gt", str(MPII_MINI / "annot" / "gt_valid.mat"),
                             "--json", str(tmp_path / "p.json")], catch_exceptions=False)
    assert res2.exit_code == 0, res2.output
    assert json.loads((tmp_path / "p.json").read_text())["metrics"] == evaluated["metrics"]
