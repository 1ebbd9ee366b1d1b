"""The genuinely trained ultralight-simplepose model from ../shared: export, verify on real crops,
and reproduce the model's original ONNX graph."""

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from posequant.calibration import iter_batches, open_dataset
from posequant.cli import main
from posequant.core.metadata import read_meta

from conftest import COCO_MINI, MPII_MINI, TRAINED_ARCH, TRAINED_CKPT, TRAINED_ONNX, needs_shared

pytestmark = [pytest.mark.shared, needs_shared(TRAINED_CKPT, COCO_MINI)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "ultralight.onnx"
    args = ["export-pose", str(TRAINED_CKPT), "-o", str(out), "--arch", TRAINED_ARCH,
            "--input-size", "256x192", "--keypoints", "coco", "--color", "rgb", "--data", str(COCO_MINI)]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and "coco val crops" in res.output
    return out


def test_metadata_of_trained_model(exported):
    meta = read_meta(exported)
    assert (meta.family, meta.keypoints, meta.input_size, meta.heatmap_size) == ("custom", "coco", (256, 192), (64, 48))
    assert meta.color == "rgb" and meta.mean == pytest.approx((0.485, 0.456, 0.406))
    assert meta.flip_pairs[0] == (1, 2) and meta.joint_names[0] == "nose"
    assert meta.arch_config == {"builder": TRAINED_ARCH}


def test_reproduces_the_original_onnx_on_real_crops(exported):
    meta = read_meta(exported)
    ours = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    theirs = ort.InferenceSession(str(TRAINED_ONNX), providers=["CPUExecutionProvider"])
    ds = open_dataset(COCO_MINI, input_size=meta.input_size)
    n = 0
    for batch in iter_batches(ds, meta, batch_size=1, limit=16):
        a = ours.run(None, {"input": batch.inputs})[0]
        b = theirs.run(None, {"data": batch.inputs})[0]
        assert a.shape == b.shape == (1, 17, 64, 48)
        assert np.abs(a - b).max() < 1e-4
        assert b.max() > 0.1  # real crops give real peaks
        assert (a.reshape(17, -1).argmax(1) == b.reshape(17, -1).argmax(1)).all()
        n += 1
    assert n == 16


def test_dynamic_batch_matches_single(exported):
    meta = read_meta(exported)
    sess = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    batch = next(iter_batches(open_dataset(COCO_MINI, input_size=meta.input_size), meta, batch_size=4, limit=4))
    together = sess.run(None, {"input": batch.inputs})[0]
    alone = np.concatenate([sess.run(None, {"input": x[None]})[0] for x in batch.inputs])
    assert np.abs(together - alone).max() < 1e-5


@needs_shared(MPII_MINI)
def test_verify_on_mpii_crops(tmp_path):
    from posequant.exporter import export_pose

    res = export_pose(TRAINED_CKPT, tmp_path / "m.onnx", arch=TRAINED_ARCH, keypoints="coco",
                      color="rgb", data=MPII_MINI, data_samples=5)
    assert res.verification.passed and res.verification.cases[1].samples == 5
