"""Saved MPII predictions: every format and layout round-trips; bad files fail in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from posequant.benchmarks import predictions
from posequant.benchmarks.metrics import mpii_pckh
from posequant.benchmarks.predictions import eval_mpii_preds, load_mpii_preds, save_mpii_preds
from posequant.calibration import load_mpii_gt
from posequant.core.errors import DataError, PosequantError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MPII_GT = SHARED / "data" / "mpii-mini" / "annot" / "gt_valid.mat"
J = 16


def sample_preds(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 400, (n, J, 2))


def write_preds(path: Path, array: np.ndarray, name: str = "preds") -> Path:
    """Write ``array`` as stored, in the format the suffix names."""
    if path.suffix == ".mat":
        scipy.io.savemat(path, {name: array})
    elif path.suffix == ".h5":
        h5py = pytest.importorskip("h5py")
        with h5py.File(path, "w") as f:
            f[name] = array
    elif path.suffix == ".npy":
        np.save(path, array)
    else:
        path.write_text(json.dumps(array.tolist()))
    return path


@pytest.mark.parametrize("suffix", [".mat", ".h5", ".npy", ".json"])
@pytest.mark.parametrize("layout", ["people_first", "matlab"])
def test_every_format_and_layout_reads_back(tmp_path, suffix, layout):
    preds = sample_preds()
    stored = preds if layout == "people_first" else np.transpose(preds, (1, 2, 0))  # 16 x 2 x N
    loaded = load_mpii_preds(write_preds(tmp_path / f"p{suffix}", stored))
    np.testing.assert_array_equal(loaded, preds)


def test_pos_pred_src_name_and_single_person(tmp_path):
    preds = sample_preds(1)
    for stored in (np.transpose(preds, (1, 2, 0)), preds[0]):  # MATLAB drops the trailing 1 of 16 x 2 x 1
        path = write_preds(tmp_path / "p.mat", stored, name="pos_pred_src")
        np.testing.assert_array_equal(load_mpii_preds(path), preds)


@pytest.mark.parametrize("matlab_header", [True, False])
def test_matlab_v73_mat_files_are_read_through_h5py(tmp_path, matlab_header):
    h5py = pytest.importorskip("h5py")
    preds = sample_preds(4)
    path = tmp_path / "p73.mat"
    with h5py.File(path, "w", userblock_size=512 if matlab_header else 0) as f:
        f["pos_pred_src"] = np.transpose(preds, (1, 2, 0)).T  # MATLAB's 16 x 2 x N, column-major
    if matlab_header:  # what MATLAB -v7.3 puts in front: text, then version 0x0200, then "IM"
        with open(path, "r+b") as f:
            f.write(b"MATLAB 7.3 MAT-file".ljust(116) + bytes(8) + b"\x00\x02IM")
    np.testing.assert_array_equal(load_mpii_preds(path), preds)


def test_save_then_eval_gives_the_same_table_bit_for_bit(tmp_path):
    gt = synthetic_gt(5)
    preds = (np.transpose(gt["pos_gt_src"], (2, 0, 1)) - 1 + np.random.default_rng(1).normal(0, 6, (5, J, 2)))
    for dtype in (np.float32, np.float64):
        zero_based = preds.astype(dtype)
        path = save_mpii_preds(tmp_path / f"pred_{np.dtype(dtype).name}.mat", zero_based)
        stored = scipy.io.loadmat(path)["preds"]
        assert stored.shape == (5, J, 2) and stored.dtype == dtype  # HRNet's pred.mat: N x 16 x 2, 1-based
        np.testing.assert_array_equal(stored, zero_based + 1.0)
        direct = mpii_pckh(zero_based, gt, one_based=False)
        assert eval_mpii_preds(path, gt).table == direct.table
        assert 0 < direct["PCKh@0.1"]["Mean"] < 100


def test_zero_based_flag(tmp_path):
    gt = synthetic_gt(2)
    joints = np.transpose(gt["pos_gt_src"], (2, 0, 1))
    path = write_preds(tmp_path / "p.npy", joints + 2.0)  # 1-based, 2 px off in x and y
    assert eval_mpii_preds(path, gt)["PCKh@0.1"]["Mean"] == pytest.approx(100)  # 2.8 px = 0.094 head sizes
    assert eval_mpii_preds(path, gt, zero_based=True)["PCKh@0.1"]["Mean"] == 0.0  # +1: 4.2 px = 0.141


def test_save_is_atomic(tmp_path, monkeypatch):
    path = save_mpii_preds(tmp_path / "pred.mat", sample_preds())

    def broken_savemat(f, mdict):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(scipy.io, "savemat", broken_savemat)
    with pytest.raises(PosequantError, match="disk full"):  # one line naming the file, not a traceback
        save_mpii_preds(path, sample_preds(seed=1))
    np.testing.assert_array_equal(load_mpii_preds(path), sample_preds() + 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["pred.mat"]


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(DataError, match=r"\.mat"):
        save_mpii_preds(tmp_path / "pred.npy", sample_preds())
    with pytest.raises(DataError, match="shape"):
        save_mpii_preds(tmp_path / "pred.mat", np.zeros((3, 17, 2)))
    with pytest.raises(PosequantError, match="does not exist"):
        save_mpii_preds(tmp_path / "no" / "pred.mat", sample_preds())


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.txt", None, "use one of"),
        ("p.mat", {"something": np.zeros((3, J, 2))}, "no variable 'preds' or 'pos_pred_src' \\(found something\\)"),
        ("p.npy", np.zeros((3, 17, 2)), r"shape \(3, 17, 2\)"),
        ("p.npy", np.zeros((J, 2, 3, 1)), r"shape \(16, 2, 3, 1\)"),
        ("p.json", "[[1, 2], [3]]", "list of 16"),
        ("p.json", "{oops", "not valid JSON"),
        ("p.npy", np.array(["a"] * (3 * J * 2)).reshape(3, J, 2), "not numbers"),
    ],
)
def test_bad_files_are_one_line_data_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, dict):
        scipy.io.savemat(path, content)
    elif isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_text(content or "")
    with pytest.raises(DataError, match=message) as info:
        load_mpii_preds(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_nan_and_count_mismatch(tmp_path):
    preds = sample_preds()
    preds[2, 13, 1] = np.nan
    with pytest.raises(DataError, match=r"person 2, joint 13 \(l_shoulder\)"):
        load_mpii_preds(write_preds(tmp_path / "nan.npy", preds))
    path = write_preds(tmp_path / "ok.json", sample_preds())
    with pytest.raises(DataError, match="holds 3 people but the ground truth has 5"):
        load_mpii_preds(path, num_people=5)
    with pytest.raises(DataError, match="does not exist"):
        load_mpii_preds(tmp_path / "missing.mat")


def test_missing_h5py_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "p.h5"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(DataError, match="needs h5py, which is not installed"):
        predictions.load_mpii_preds(path)


@pytest.mark.shared
@pytest.mark.skipif(not MPII_GT.is_file(), reason="../shared/data/mpii-mini not available")
def test_real_gt_round_trip(tmp_path):
    gt = load_mpii_gt(MPII_GT)
    joints0 = np.transpose(gt["pos_gt_src"], (2, 0, 1)) - 1.0
    path = save_mpii_preds(tmp_path / "pred.mat", joints0)
    for source in (MPII_GT, MPII_GT.parents[1], gt):  # the file, the dataset root, the dict
        table = eval_mpii_preds(path, source)["PCKh@0.5"]
        assert table == pytest.approx(dict.fromkeys(table, 100.0))
    with pytest.raises(DataError, match="holds 4 people but the ground truth has 5"):
        eval_mpii_preds(save_mpii_preds(tmp_path / "four.mat", joints0[:4]), gt)


def synthetic_gt(num_people: int) -> dict:
    rng = np.random.default_rng(num_people)
    boxes = np.zeros((2, 2, num_people))
    boxes[1] = np.array([30.0, 40.0])[:, None]  # head size 30
    return {"jnt_missing": np.zeros((J, num_people), dtype=np.uint8),
            "pos_gt_src": rng.integers(100, 500, (J, 2, num_people)).astype(np.float64),
            "headboxes_src": boxes}
