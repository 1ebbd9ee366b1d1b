"""Issue 13, "outputs and early checks": every output option of every command, adversarially.

Each output option is tried at an input of its command (the same path, a hard link, a symlink, a
file inside an input folder), at a FIFO, a directory, a missing or read-only folder, ``-``, and
through a symlink to elsewhere; files must get the mode ``open()`` would give them under umask 022
and 077 (or keep the replaced file's), write errors must be one line naming the option, and checks
must come before the work. Tiny models and synthetic data: what is tested is the file handling.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_bench_gate import break_int8
from test_bench_gate import quantize as ort_quantize
from test_calibration_datasets import mpii_record, write_image, write_json
from test_eval_bad_input import write_gt

from posequant.benchmarks.gate import gate
from posequant.benchmarks.predictions import save_mpii_preds
from posequant.calibration.quantize import quantize
from posequant.cli import main
from posequant.core.errors import PosequantError
from posequant.core.fileio import check_outputs, output_dir, write_text_atomic
from posequant.exporter import export_pose
from posequant.pipeline import run_pipeline

from conftest import small_model

SIZE = "64x64"
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> SimpleNamespace:
    """A checkpoint, its float and INT8 exports, an MPII set with gt_valid.mat, a COCO set, saved
    predictions and a folder of calibration images: every kind of input the commands take."""
    d = tmp_path_factory.mktemp("adversarial")
    ckpt = d / "hourglass.pth"  # the smallest family (0.6 MB): fast to export, quantize, hash
    torch.save(small_model("hourglass").state_dict(), ckpt)
    onnx_model = export_pose(ckpt, d / "model.onnx", input_size=(64, 64), verify_model=False).output
    int8 = ort_quantize(onnx_model, d / "model.int8.onnx")
    mpii = d / "mpii"
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        write_image(mpii / "images" / name, seed=i)
    write_json(mpii / "annot" / "valid.json", [mpii_record("a.jpg", [41.0, 31.0], 0.2),
                                               mpii_record("b.jpg", [30.0, 25.0], 0.1, offset=1.0),
                                               mpii_record("c.jpg", [40.0, 30.0], 0.3)])
    gt = write_gt(mpii)
    coco = d / "coco"
    write_image(coco / "val2017" / "000000000001.jpg")
    write_json(coco / "annotations" / "person_keypoints_val2017.json", {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "width": 80, "height": 60}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [10.0, 5.0, 20.0, 40.0], "keypoints": [20, 20, 2] * 17,
                         "area": 800.0, "iscrowd": 0, "category_id": 1, "num_keypoints": 17}],
        "categories": [{"id": 1, "name": "person"}]})
    preds = save_mpii_preds(d / "preds.mat", np.random.default_rng(0).uniform(5, 50, (3, 16, 2)))
    images = d / "images"
    for i in range(3):
        write_image(images / f"{i}.jpg", seed=10 + i)
    return SimpleNamespace(dir=d, ckpt=ckpt, onnx=onnx_model, int8=int8, mpii=mpii, gt=gt, valid=mpii / "annot" / "valid.json",
                           coco=coco, preds=preds, images=images, image=images / "0.jpg")


# ---- how each command is called, with its output at OUT -------------------------------------------

FAST_GATE = ["--no-flip", "--runs", "1", "--min-speedup", "0", "--max-drop", "100", "--max-joint-drop", "100"]
COMMANDS = {
    "inspect": lambda w: ["inspect", w.ckpt],
    "export-pose": lambda w: ["export-pose", w.ckpt, "--input-size", SIZE, "--no-verify", "--no-simplify"],
    "eval": lambda w: ["eval", w.onnx, "--data", w.mpii, "--no-flip"],
    "eval-preds": lambda w: ["eval-preds", w.preds, "--gt", w.gt],
    "bench": lambda w: ["bench", w.onnx, "--backend", "ort", "--batch", "1", "--warmup", "0", "--runs", "1"],
    "gate": lambda w: ["gate", "--float", w.onnx, "--int8", w.int8, "--data", w.mpii, *FAST_GATE],
    "quantize": lambda w: ["quantize", w.onnx, "--calib", w.images, "--num-samples", "2", "--engine", "ort",
                           "--no-equalize", "--cpu", "portable"],
    "pipeline": lambda w: ["pipeline", w.ckpt, "--calib", w.images, "--val", w.mpii, "--input-size", SIZE,
                           "--num-samples", "2", *FAST_GATE],
}
# Every file output option, with an output name of the right kind.
FILE_OPTIONS = [
    ("inspect", "--json", "out.json"), ("export-pose", "-o", "out.onnx"), ("export-pose", "--json", "out.json"),
    ("eval", "--json", "out.json"), ("eval", "--save-preds", "out.mat"), ("eval-preds", "--json", "out.json"),
    ("bench", "--json", "out.json"), ("gate", "--json", "out.json"), ("quantize", "-o", "out.onnx"),
    ("quantize", "--report", "out.md"), ("quantize", "--json", "out.json"),
]
FOLDER_OPTIONS = [("gate", "--report"), ("pipeline", "-o"), ("demo", "-o")]
ids = [f"{c} {o}" for c, o, _ in FILE_OPTIONS]


def invoke(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def args_for(w, cmd: str, option: str, out, extra=()) -> list:
    base = ["demo", "--shared", w.dir] if cmd == "demo" else COMMANDS[cmd](w)
    if cmd in ("export-pose", "quantize") and option != "-o":  # not the default, beside the shared inputs
        base += ["-o", Path(tempfile.mkdtemp(dir=w.dir)) / "m.onnx"]
    return [*base, *extra, option, out]


def refused(res) -> str:
    """Exit 2, no traceback, exactly one error line (ours, or click's for a usage error); that line."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith(("error:", "Error:"))]
    assert len(lines) == 1, res.output
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def temp_files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.is_dir() for p in f.rglob(".*.tmp")]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (the CLI runs in-process), and restore it."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


# ---- 1. an output that is an input -----------------------------------------------------------------

# (command, output option, extra arguments, which input the output lands on)
ONTO_INPUT = [
    ("inspect", "--json", [], "ckpt"),
    ("export-pose", "-o", [], "ckpt"),
    ("export-pose", "--json", [], "ckpt"),
    ("export-pose", "-o", ["--data", "{mpii}"], "gt"),
    ("eval", "--json", [], "onnx"),
    ("eval", "--json", [], "gt"),
    ("eval", "--save-preds", [], "gt"),
    ("eval", "--save-preds", [], "valid"),
    ("eval", "--save-preds", [], "onnx"),
    ("eval-preds", "--json", [], "preds"),
    ("eval-preds", "--json", [], "gt"),
    ("bench", "--json", [], "onnx"),
    ("gate", "--json", [], "onnx"),
    ("gate", "--json", [], "int8"),
    ("gate", "--json", [], "valid"),
    ("quantize", "-o", [], "onnx"),
    ("quantize", "--report", [], "onnx"),
    ("quantize", "--json", [], "onnx"),
    ("quantize", "--json", [], "image"),
    ("quantize", "-o", ["--val", "{mpii}"], "gt"),
]


def _expand(w, extra):
    return [str(getattr(w, e[1:-1])) if e.startswith("{") else e for e in extra]


def _place(kind: str, src: Path, tmp: Path) -> Path:
    """The output path that lands on ``src``: the path itself, a hard link or a symlink to it."""
    if kind == "same":
        return src
    out = tmp / f"{kind}{src.suffix}"
    (os.link if kind == "hardlink" else os.symlink)(src, out)
    return out


@pytest.mark.parametrize("kind", ["same", "hardlink", "symlink"])
@pytest.mark.parametrize("cmd,option,extra,onto", ONTO_INPUT, ids=[f"{c} {o} onto {t}" + (" " + " ".join(e) if e
                                                                   else "") for c, o, e, t in ONTO_INPUT])
def test_output_onto_an_input_is_refused_and_the_input_kept(w, tmp_path, cmd, option, extra, onto, kind):
    src = getattr(w, onto)
    before = digest(src)
    out = _place(kind, src, tmp_path)
    line = refused(invoke(args_for(w, cmd, option, out, _expand(w, extra))))
    assert option in line and ("is the input" in line or "would overwrite" in line), line
    assert digest(src) == before
    assert kind != "symlink" or out.is_symlink()
    assert not temp_files(src.parent, tmp_path)


@pytest.mark.parametrize("kind", ["same", "symlink"])
@pytest.mark.parametrize("cmd,option", FOLDER_OPTIONS, ids=[f"{c} {o}" for c, o in FOLDER_OPTIONS])
def test_output_folder_at_an_input_file_is_refused(w, tmp_path, cmd, option, kind):
    before = digest(w.onnx)
    out = _place(kind, w.onnx, tmp_path)
    line = refused(invoke(args_for(w, cmd, option, out)))
    assert option in line and "file" in line, line
    assert digest(w.onnx) == before


def test_pipeline_folder_holding_an_input_file_is_refused(w, tmp_path):
    """``pipeline --calib imgs -o imgs`` a second time: model.onnx there is now a calibration input."""
    calib = tmp_path / "imgs"
    write_image(calib / "0.jpg")
    (calib / "model.onnx").write_bytes(w.onnx.read_bytes())
    res = invoke(["pipeline", w.ckpt, "--calib", calib, "--val", w.mpii, "--input-size", SIZE, "-o", calib])
    assert "would overwrite" in refused(res) and "--calib" in res.output
    assert digest(calib / "model.onnx") == digest(w.onnx)


def test_two_outputs_at_one_path_are_refused(w, tmp_path):
    out = tmp_path / "same.json"
    line = refused(invoke([*COMMANDS["quantize"](w), "--report", out, "--json", out]))
    assert "same file" in line and not out.exists()


@pytest.mark.parametrize("call", [
    lambda w: export_pose(w.ckpt, w.ckpt),
    lambda w: export_pose(w.ckpt, w.gt, data=w.mpii),
    lambda w: quantize(w.onnx, w.images, output=w.onnx),
    lambda w: quantize(w.onnx, w.images, output=w.image),
    lambda w: gate(w.onnx, w.int8, w.mpii, report_dir=w.mpii / "annot" / "valid.json"),
    lambda w: run_pipeline(w.ckpt, w.images, w.mpii, w.ckpt),
], ids=["export_pose", "export_pose data", "quantize", "quantize calib", "gate report", "run_pipeline"])
def test_library_entry_points_refuse_outputs_onto_inputs(w, call):
    before = {p: digest(p) for p in (w.ckpt, w.onnx, w.gt, w.image, w.valid)}
    with pytest.raises(PosequantError):
        call(w)
    assert {p: digest(p) for p in before} == before


# ---- 2. special files, directories, missing and read-only folders, '-' -----------------------------


@pytest.mark.parametrize("cmd,option,name", FILE_OPTIONS, ids=ids)
def test_fifo_output_is_refused(w, tmp_path, cmd, option, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    line = refused(invoke(args_for(w, cmd, option, fifo)))
    assert option in line and "special file" in line, line
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.parametrize("device", ["/dev/stdout", "/dev/null"])
@pytest.mark.parametrize("cmd,option", [("inspect", "--json"), ("export-pose", "-o"), ("eval", "--save-preds")])
def test_device_paths_are_refused_and_left_alone(w, cmd, option, device):
    """As root, an atomic write would replace /dev/null itself with a regular file."""
    line = refused(invoke(args_for(w, cmd, option, device)))
    assert option in line and "special file" in line, line
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("cmd,option,name", FILE_OPTIONS, ids=ids)
def test_directory_output_is_refused(w, tmp_path, cmd, option, name):
    folder = tmp_path / name
    folder.mkdir()
    line = refused(invoke(args_for(w, cmd, option, folder)))
    assert option in line and "directory" in line, line
    assert folder.is_dir() and not any(folder.iterdir())


@pytest.mark.parametrize("cmd,option,name", FILE_OPTIONS, ids=ids)
def test_missing_folder_names_the_option(w, tmp_path, cmd, option, name):
    line = refused(invoke(args_for(w, cmd, option, tmp_path / "no" / name)))
    assert f"error: the folder of {option} " in line and "does not exist" in line, line
    assert not (tmp_path / "no").exists()


@pytest.mark.skipif(ROOT, reason="root writes into read-only folders")
@pytest.mark.parametrize("cmd,option,name", FILE_OPTIONS, ids=ids)
def test_read_only_folder_names_the_option(w, tmp_path, cmd, option, name):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = refused(invoke(args_for(w, cmd, option, ro / name)))
    finally:
        ro.chmod(0o755)
    assert option in line and "permission" in line, line
    assert not any(ro.iterdir())


@pytest.mark.parametrize("cmd,option,name", [o for o in FILE_OPTIONS if o[1] != "--json"],
                         ids=[i for i, o in zip(ids, FILE_OPTIONS) if o[1] != "--json"])
def test_dash_is_only_for_json(w, tmp_path, cmd, option, name):
    line = refused(invoke(args_for(w, cmd, option, "-")))
    assert option in line and "standard output is only for --json" in line, line


@pytest.mark.parametrize("cmd,option", [("gate", "--report"), ("pipeline", "-o"), ("demo", "-o")])
def test_dash_is_not_a_folder(w, tmp_path, monkeypatch, cmd, option):
    monkeypatch.chdir(tmp_path)  # a folder named '-' would land here
    line = refused(invoke(args_for(w, cmd, option, "-")))
    assert option in line and not (tmp_path / "-").exists()


# ---- 2 and 3. written through symlinks, with open()'s modes; '-' is standard output --------------

# The cheap file outputs that a successful run writes (gate and quantize are covered once below).
WRITTEN = [o for o in FILE_OPTIONS if o[0] not in ("gate",)]


def _check_content(path: Path, name: str) -> None:
    data = Path(path).read_bytes()
    assert data, path
    if name.endswith(".json"):
        json.loads(data)
    elif name.endswith(".onnx"):
        import onnx
        onnx.load_from_string(data)


# mkstemp's 0600 is what umask 077 gives too: 022 tells them apart on every option, 077 (the umask
# is honoured, not a fixed 0644) on the cheap commands.
MODES = [(*o, 0o022) for o in WRITTEN] + [(*o, 0o077) for o in WRITTEN if o[0] in ("inspect", "eval", "eval-preds")]


@pytest.mark.parametrize("cmd,option,name,mask", MODES, ids=[f"{c} {o} umask {m:03o}" for c, o, _, m in MODES])
def test_new_output_gets_open_modes(w, tmp_path, umask, cmd, option, name, mask):
    umask(mask)
    out = tmp_path / name
    res = invoke(args_for(w, cmd, option, out))
    assert res.exit_code == 0, res.output
    _check_content(out, name)
    assert mode(out) == 0o666 & ~mask
    assert not temp_files(tmp_path)


@pytest.mark.parametrize("cmd,option,name", WRITTEN, ids=[f"{c} {o}" for c, o, _ in WRITTEN])
def test_symlink_elsewhere_is_written_through_and_the_mode_kept(w, tmp_path, cmd, option, name):
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir()
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / f"link-{name}"
    link.symlink_to(target)
    res = invoke(args_for(w, cmd, option, link))
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() != b"old"
    _check_content(target, name)
    assert mode(target) == 0o640
    assert not temp_files(tmp_path)


def test_dangling_symlink_creates_its_target(w, tmp_path, umask):
    umask(0o027)
    target, link = tmp_path / "t" / "out.json", tmp_path / "link.json"
    target.parent.mkdir()
    link.symlink_to(target)
    assert invoke([*COMMANDS["inspect"](w), "--json", link]).exit_code == 0
    assert link.is_symlink() and json.loads(target.read_text())["family"] == "hourglass"
    assert mode(target) == 0o640


JSON_COMMANDS = sorted({c for c, o, _ in FILE_OPTIONS if o == "--json"})


@pytest.mark.parametrize("cmd", JSON_COMMANDS)
def test_json_dash_is_standard_output_alone(w, tmp_path, monkeypatch, cmd):
    monkeypatch.chdir(tmp_path)  # nothing named '-' may appear
    res = invoke(args_for(w, cmd, "--json", "-"))
    assert res.exit_code in (0, 1), res.output  # gate may fail its budget: its JSON still comes
    payload = json.loads(res.stdout)  # stdout holds the JSON and nothing else
    assert isinstance(payload, dict) and res.stderr.strip()  # the human summary went to stderr
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_gate_report_folder_and_files_get_umask_modes(w, tmp_path, umask, mask):
    umask(mask)
    report, out = tmp_path / "r" / "gate", tmp_path / "g.json"
    res = invoke([*COMMANDS["gate"](w), "--report", report, "--json", out])
    assert res.exit_code == 0, res.output
    assert mode(report) == mode(report.parent) == 0o777 & ~mask
    for f in [*report.iterdir(), out]:
        assert mode(f) == 0o666 & ~mask, f


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_output_dir_modes_and_no_empty_folder_on_failure(tmp_path, umask, mask):
    umask(mask)
    with output_dir(tmp_path / "a" / "b") as d:
        write_text_atomic(d / "x.txt", "x")
    assert mode(tmp_path / "a") == mode(d) == 0o777 & ~mask and mode(d / "x.txt") == 0o666 & ~mask
    with pytest.raises(RuntimeError), output_dir(tmp_path / "c" / "d"):
        raise RuntimeError("the work failed")
    assert not (tmp_path / "c").exists()


def test_replacing_keeps_the_existing_mode(tmp_path, umask):
    umask(0o077)
    p = tmp_path / "x.json"
    p.write_text("{}")
    p.chmod(0o664)
    write_text_atomic(p, "[]")
    assert p.read_text() == "[]" and mode(p) == 0o664


# ---- 5. write errors after the work --------------------------------------------------------------


def _failing(monkeypatch, folder: Path, what: str, err: int):
    """Make os.replace (``what="replace"``) or tempfile.mkstemp fail with ``err`` for files in ``folder``
    only: the work runs, the write into ``folder`` fails as a full disk or a read-only mount would."""
    real = os.replace if what == "replace" else tempfile.mkstemp

    def fake(*a, **kw):
        where = Path(a[1]).parent if what == "replace" else Path(kw.get("dir", ""))
        if where == folder:
            raise OSError(err, os.strerror(err))
        return real(*a, **kw)

    if what == "replace":
        monkeypatch.setattr(os, "replace", fake)
    else:
        monkeypatch.setattr(tempfile, "mkstemp", fake)


ERRORS = {"ENOSPC": ("replace", errno.ENOSPC), "EROFS": ("mkstemp", errno.EROFS),
          "EACCES": ("mkstemp", errno.EACCES)}
# Every errno on the cheap commands, the full disk on the slow ones (the write path is the same).
WRITE_FAILURES = [(c, o, n, e) for c, o, n in [("inspect", "--json", "o.json"), ("eval", "--save-preds", "o.mat"),
                                                ("eval-preds", "--json", "o.json")] for e in ERRORS]
WRITE_FAILURES += [("export-pose", "-o", "o.onnx", "ENOSPC"), ("quantize", "--report", "o.md", "ENOSPC")]


@pytest.mark.parametrize("cmd,option,name,error", WRITE_FAILURES, ids=[f"{c} {o} {e}" for c, o, _, e in WRITE_FAILURES])
def test_write_error_is_one_line_naming_the_option(w, tmp_path, monkeypatch, cmd, option, name, error):
    what, err = ERRORS[error]
    folder = tmp_path / "out"
    folder.mkdir()
    _failing(monkeypatch, folder, what, err)
    line = refused(invoke(args_for(w, cmd, option, folder / name)))
    assert f"cannot write {option} {folder / name}: {os.strerror(err)}" in line, line
    assert list(folder.iterdir()) == []  # no temp file, no half output


def test_gate_report_on_a_full_disk_is_all_or_nothing(w, tmp_path, monkeypatch):
    """Was: an empty report folder (a new one), or the picture without its report (one that existed)."""
    new = tmp_path / "new" / "report"
    _failing(monkeypatch, new, "replace", errno.ENOSPC)
    line = refused(invoke([*COMMANDS["gate"](w), "--report", new]))
    assert "cannot write --report" in line and os.strerror(errno.ENOSPC) in line, line
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    real = os.replace

    def full_at_the_json(src, dst, *a, **kw):  # the picture and report.md fit, report.json does not
        if Path(dst).name == "report.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full_at_the_json)
    refused(invoke([*COMMANDS["gate"](w), "--report", mine]))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# ---- 4. a pipeline folder never mixes runs -------------------------------------------------------


def _stale_run(folder: Path) -> None:
    (folder / "gate").mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"passed": True}))
    (folder / "gate" / "report.md").write_text("PASS")
    (folder / "model.onnx").write_text("old model")
    (folder / "notes.txt").write_text("mine")


def test_pipeline_failing_at_export_leaves_no_stale_verdict(w, tmp_path):
    out = tmp_path / "run"
    _stale_run(out)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    refused(invoke(["pipeline", bad, "--calib", w.images, "--val", w.mpii, "--input-size", SIZE, "-o", out]))
    assert not (out / "summary.json").exists() and not (out / "gate" / "report.md").exists()
    assert not (out / "model.onnx").exists()
    assert (out / "notes.txt").read_text() == "mine"  # what is not the run's is left alone


def test_pipeline_failing_at_quantize_keeps_only_this_runs_files(w, tmp_path):
    out, empty = tmp_path / "run", tmp_path / "empty"
    _stale_run(out)
    empty.mkdir()
    refused(invoke(["pipeline", w.ckpt, "--calib", empty, "--val", w.mpii, "--input-size", SIZE, "-o", out]))
    assert not (out / "summary.json").exists() and not (out / "gate" / "report.md").exists()
    assert (out / "model.onnx").read_bytes() != b"old model"  # this run's export


# ---- 6. checks before the first expensive step; no empty folders ---------------------------------


@pytest.fixture
def junk_model(tmp_path) -> Path:
    """Not an ONNX file: a check that comes after opening the model would report that instead."""
    p = tmp_path / "junk.onnx"
    p.write_bytes(b"junk")
    return p


def test_save_preds_on_coco_is_refused_before_the_evaluation(w, tmp_path, junk_model):
    out = tmp_path / "r.json"
    line = refused(invoke(["eval", junk_model, "--data", w.coco, "--save-preds", tmp_path / "p.mat", "--json", out]))
    assert "--save-preds" in line and "COCO" in line and not out.exists()


def test_save_preds_with_skip_missing_is_refused_before_the_evaluation(w, tmp_path, junk_model):
    line = refused(invoke(["eval", junk_model, "--data", w.mpii, "--skip-missing", "--save-preds", tmp_path / "p.mat"]))
    assert "leave out --skip-missing" in line


@pytest.mark.parametrize("case", ["missing checkpoint", "val is an image folder", "val missing", "calib missing"])
def test_pipeline_checks_its_inputs_before_creating_the_folder(w, tmp_path, case):
    ckpt, calib, val = w.ckpt, w.images, w.mpii
    if case == "missing checkpoint":
        ckpt = tmp_path / "nope.pth"
    elif case == "val is an image folder":
        val = w.images
    elif case == "val missing":
        val = tmp_path / "nowhere"
    else:
        calib = tmp_path / "nowhere"
    out = tmp_path / "new" / "run"
    line = refused(invoke(["pipeline", ckpt, "--calib", calib, "--val", val, "--input-size", SIZE, "-o", out]))
    assert not (tmp_path / "new").exists(), line
    if case.startswith("val"):
        assert "--val" in line or "dataset folder" in line, line


def test_gate_with_a_nan_int8_model_leaves_no_report_folder(w, tmp_path):
    nan = break_int8(w.int8, tmp_path / "nan.onnx", factor=np.nan, at="output")
    report = tmp_path / "report"
    res = invoke(["gate", "--float", w.onnx, "--int8", nan, "--data", w.mpii, "--report", report, *FAST_GATE])
    assert res.exit_code == 1 and "gate FAIL" in res.output
    assert not report.exists()


# ---- 7. messages name the thing at fault ---------------------------------------------------------


@pytest.mark.parametrize("cmd", ["eval", "gate"])
def test_data_at_a_file_says_it_is_a_file(w, cmd):
    args = (["eval", w.onnx, "--data", w.gt] if cmd == "eval" else
            ["gate", "--float", w.onnx, "--int8", w.int8, "--data", w.gt, *FAST_GATE])
    line = refused(invoke(args))
    assert "is a file, not a folder" in line and "annot/" in line, line


def test_check_outputs_names_the_option_and_the_input(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(b"x")
    with pytest.raises(PosequantError, match=r"^--json \S*m\.onnx is the input MODEL \S*m\.onnx"):
        check_outputs({"--json": src}, {"MODEL": src})
    with pytest.raises(PosequantError, match=r"^--json \S*d/\.\./m\.onnx would overwrite \S*m\.onnx, a file of the input --data"):
        check_outputs({"--json": tmp_path / "d" / ".." / "m.onnx"}, {"--data": tmp_path})
    check_outputs({"--json": tmp_path / "new.json", "-o": None, "--report": "-"}, {"MODEL": src, "--val": None},
                  stdout_ok={"--report"})  # new files, even inside an input folder, are fine


# ---- 8. SIGTERM (CI runners, `timeout`) leaves nothing behind, as Ctrl-C does (issue 22) -------------------

# The CLI in a child process whose disk is slow: ``SLOW`` (os.replace or onnx.save) says so on stderr, then
# blocks, so the parent can send SIGTERM while the command's temporary files exist.
SLOW_DISK = """
import os, sys, time
import onnx
module, name = sys.argv[1].rsplit(".", 1)
owner = {"os": os, "onnx": onnx}[module]
real = getattr(owner, name)
def slow(*args, **kwargs):
    print("SLOW", args[1] if len(args) > 1 else args, file=sys.__stderr__, flush=True)
    time.sleep(120)
    return real(*args, **kwargs)
setattr(owner, name, slow)
from posequant.cli import main
main(sys.argv[2:], prog_name="posequant")
"""


def terminate_when_slow(slow: str, args: list, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``posequant ARGS`` until it blocks in ``slow``, send SIGTERM, and return how it ended."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_DISK, slow, *map(str, args)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("SLOW"):
                break
        assert seen and seen[-1].startswith("SLOW"), "".join(seen)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(args, proc.returncode, "", "".join(seen) + rest)


SIGTERM_CASES = {  # command -> (what is slow, its arguments with {out} and {w.*})
    "export-pose": ("os.replace", ["export-pose", "{ckpt}", "--input-size", SIZE, "--no-verify", "-o", "{out}/m.onnx"]),
    "convert": ("os.replace", ["convert", "{onnx}", "--to", "openvino", "-o", "{out}/m.xml"]),
    "quantize": ("onnx.save", ["quantize", "{onnx}", "--calib", "{images}", "--engine", "ort", "--num-samples", "2",
                               "--no-equalize", "--cpu", "portable", "-o", "{out}/q.onnx"]),
    "gate --report": ("os.replace", ["gate", "--float", "{onnx}", "--int8", "{int8}", "--data", "{mpii}", *FAST_GATE,
                                     "--report", "{out}/report"]),
}


@pytest.mark.parametrize("cmd", list(SIGTERM_CASES))
def test_sigterm_leaves_no_temporary_file(w, tmp_path, cmd):
    slow, args = SIGTERM_CASES[cmd]
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    scratch.mkdir()
    args = [a.format(out=out, **vars(w)) if isinstance(a, str) else a for a in args]
    res = terminate_when_slow(slow, args, env={"TMPDIR": str(scratch)})
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert res.stderr.rstrip().endswith("terminated") and "Traceback" not in res.stderr, res.stderr
    # no .tmp, no .m.XXXX/, no temp folder (ONNX Runtime keeps a session id in $TMPDIR/.ses on every run)
    assert list(out.iterdir()) == [] and [p.name for p in scratch.iterdir()] in ([], [".ses"])


def test_sigterm_in_the_library_removes_the_temporary_file_and_respects_a_handler(tmp_path):
    code = ("import sys, time\nfrom posequant.core.fileio import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'x' * 100000)\n    print('SLOW', flush=True)\n    time.sleep(120)\n")
    for handler in ("", "import signal; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"):
        proc = subprocess.Popen([sys.executable, "-c", "import sys\n" + handler + code, tmp_path / "o.bin"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().startswith("SLOW")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        # ours: Terminated (a KeyboardInterrupt) unwinds; the program's own handler is the one that runs
        assert ("Terminated" in err and proc.returncode == 1) if not handler else proc.returncode == 7, err
        assert list(tmp_path.iterdir()) == [], handler
