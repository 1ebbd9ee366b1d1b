"""Saved MPII predictions: read them in any common format, write them as HRNet's ``pred.mat``.

Files hold N x 16 x 2 (HRNet's ``pred.mat``) or 16 x 2 x N (the official MATLAB
``pos_pred_src``) coordinates; both are read as N x 16 x 2. Coordinates are 1-based (MATLAB
convention) unless the caller says they are 0-based, as Python code produces them.
:func:`save_mpii_preds` writes what :func:`eval_mpii_preds` reads back, by default, to the very
same PCKh table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from posequant.calibration.datasets import load_mpii_gt
from posequant.core.errors import DataError
from posequant.core.fileio import atomic_path
from posequant.core.keypoints import MPII

from .metrics import PCKhResult, check_predictions, mpii_pckh

PRED_VARIABLES = ("preds", "pos_pred_src")  # HRNet's pred.mat, the official MATLAB name
SUFFIXES = (".mat", ".h5", ".hdf5", ".npy", ".json")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def load_mpii_preds(path: str | os.PathLike, *, num_people: int | None = None) -> np.ndarray:
    """Predictions as stored (same pixel convention and dtype), as an N x 16 x 2 array.

    ``.mat`` (variable ``preds`` or ``pos_pred_src``; MATLAB -v7.3 files too, via h5py),
    ``.h5``/``.hdf5`` (dataset ``preds`` or ``pos_pred_src``; needs h5py), ``.npy``, ``.json``
    (nested lists). ``num_people``, when given, must match.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"cannot read predictions from {path}: use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"predictions file {path} does not exist: check the path")
    readers = {".mat": _read_mat, ".h5": _read_h5, ".hdf5": _read_h5, ".npy": _read_npy, ".json": _read_json}
    preds = check_predictions(_people_first(readers[suffix](path), path), MPII.num_joints, str(path))
    if num_people is not None and len(preds) != num_people:
        raise DataError(f"{path} holds {len(preds)} people but the ground truth has {num_people}: "
                        "predictions must cover every person, in the annotation file's order")
    return preds


def check_save_preds(path: str | os.PathLike, data: str | os.PathLike, *, format: str | None = None,
                     split: str | None = None, limit: int | None = None, skip_missing: bool = False) -> None:
    """Refuse, before the evaluation, a ``--save-preds`` that could only fail after it."""
    from posequant.calibration.datasets import open_dataset

    if Path(path).suffix.lower() != ".mat":
        raise DataError(f"--save-preds {path}: predictions are saved as .mat (HRNet's pred.mat layout): "
                        "name the file *.mat")
    if limit:
        raise DataError("--save-preds writes every person of the split (as gt_valid.mat has them): leave out --limit")
    if skip_missing:
        raise DataError("--save-preds needs every person of the split (as gt_valid.mat has them): "
                        "leave out --skip-missing")
    ds = open_dataset(data, input_size=(256, 256), format=format, split=split)  # reads the annotations only
    if ds.format != "mpii":
        raise DataError(f"--save-preds writes MPII predictions, but --data {data} is {ds.format.upper()}: "
                        "use --json for COCO results")
    if ds.invalid:
        raise DataError(f"--save-preds needs every person of the split (as gt_valid.mat has them), but "
                        f"{len(ds.invalid)} record(s) of {ds.annotation_file} have degenerate ground truth: "
                        "fix them, or evaluate without --save-preds")


def save_mpii_preds(path: str | os.PathLike, preds_zero_based: np.ndarray, option: str = "--save-preds") -> Path:
    """Write 0-based N x 16 x 2 predictions as HRNet's ``pred.mat``: ``preds``, N x 16 x 2, +1.0.

    Written atomically. The +1.0 is done in the predictions' dtype, as HRNet does, so reading the
    file back (1-based, the default) gives the PCKh of the original predictions bit for bit.
    """
    from scipy.io import savemat

    path = Path(path)
    if path.suffix.lower() != ".mat":
        raise DataError(f"predictions are saved as .mat (HRNet's pred.mat layout), not {path.name}: name the file *.mat")
    preds = check_predictions(preds_zero_based, MPII.num_joints)
    with atomic_path(path, option) as tmp, open(tmp, "wb") as f:
        savemat(f, {"preds": preds + 1.0})
    return path


def eval_mpii_preds(
    preds_path: str | os.PathLike, gt: str | os.PathLike | Mapping[str, Any], *, zero_based: bool = False
) -> PCKhResult:
    """PCKh of a saved predictions file; ``gt`` is ``gt_valid.mat`` (or a dataset root) or its dict."""
    gt = load_mpii_gt(gt) if isinstance(gt, (str, os.PathLike)) else gt
    preds = load_mpii_preds(preds_path, num_people=np.shape(gt["pos_gt_src"])[-1])
    result = mpii_pckh(preds, gt, one_based=not zero_based)
    if not np.isfinite(result.table["PCKh@0.5"]["Mean"]):  # never print a score on what cannot be scored
        raise DataError("no joint of the ground truth can be scored (none labelled with a non-zero head box): "
                        "use the official gt_valid.mat")
    return result


# ---- readers: each returns the stored array ---------------------------------------------------


def _read_mat(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises several types for damaged files
        if isinstance(e, NotImplementedError) or _is_hdf5(path):  # MATLAB -v7.3 saves HDF5
            return _read_h5(path, matlab=True)
        raise DataError(f"{path} is not a readable .mat file ({e}): save it again") from None
    return mat[_variable_name(path, [k for k in mat if not k.startswith("__")])]


def _read_h5(path: Path, *, matlab: bool = False) -> np.ndarray:
    try:
        import h5py
    except ImportError:
        raise DataError(f"reading {path} needs h5py, which is not installed: pip install h5py, "
                        "or save the predictions as .mat, .npy or .json") from None
    try:
        with h5py.File(path, "r") as f:
            name = _variable_name(path, list(f.keys()))
            array = np.asarray(f[name])
    except OSError as e:
        raise DataError(f"{path} is not a readable HDF5 file ({e}): save it again") from None
    # MATLAB writes column-major: h5py sees its 16 x 2 x N as N x 2 x 16.
    return array.T if matlab else array


def _is_hdf5(path: Path) -> bool:
    # The HDF5 signature sits at offset 0, or 512 after a MATLAB header.
    with open(path, "rb") as f:
        head = f.read(520)
    return HDF5_SIGNATURE in (head[:8], head[512:520])


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a plain numeric .npy file ({e}): save it with numpy.save") from None


def _read_json(path: Path) -> np.ndarray:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): save a list of 16 x [x, y] per person") from None
    try:
        return np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path} does not hold a list of 16 x [x, y] numbers per person: fix or regenerate it") from None


def _variable_name(path: Path, names: list[str]) -> str:
    for name in PRED_VARIABLES:
        if name in names:
            return name
    found = ", ".join(names) or "nothing"
    raise DataError(f"{path} has no variable {' or '.join(map(repr, PRED_VARIABLES))} (found {found}): "
                    "save the predictions under 'preds'")


def _people_first(array: np.ndarray, path: Path) -> np.ndarray:
    """N x 16 x 2 from either layout (the two can never be confused: axis 1 is 16 or 2)."""
    joints = MPII.num_joints
    if array.shape == (joints, 2):  # one person; MATLAB drops the trailing 1 of 16 x 2 x 1
        return array[None]
    if array.ndim == 3 and array.shape[1:] == (joints, 2):
        return array
    if array.ndim == 3 and array.shape[:2] == (joints, 2):
        return np.transpose(array, (2, 0, 1))
    raise DataError(f"{path} holds an array of shape {array.shape}: expected N x {joints} x 2 (HRNet's pred.mat) "
                    f"or {joints} x 2 x N (MATLAB's pos_pred_src)")
