"""Issue 13, "data and numbers": corrupt ground truth, non-finite options, gates that cannot judge.

Synthetic MPII and COCO sets are written to tmp dirs and corrupted one way per case; the models
are tiny random-weight exports (the COCO set is labelled with the float model's own predictions,
so the float model scores AP 1 on it and anything left in the ground truth unpredicted shows).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import scipy.io
import torch
from click.testing import CliRunner
from test_bench_gate import SIZE, SMALL_COCO, with_meta
from test_bench_gate import quantize as ort_quantize
from test_calibration_datasets import mpii_record, write_image, write_json
from test_eval_bad_input import write_gt

import posequant
from posequant.benchmarks.evaluate import evaluate
from posequant.benchmarks.gate import FLOAT_FLOOR, UnscorableError, _drop_check, different_source, gate
from posequant.benchmarks.latency import bench
from posequant.benchmarks.metrics import coco_keypoint_ap
from posequant.benchmarks.synthetic import make_coco_set
from posequant.calibration.datasets import open_dataset
from posequant.calibration.images import image_size
from posequant.calibration.quantize import eval_split_overlap, quantize
from posequant.calibration.reader import calibration_set
from posequant.cli import main
from posequant.core.args import ArgumentError
from posequant.core.errors import DataError, PosequantError
from posequant.core.metadata import read_meta
from posequant.core.numbers import OptionError, check_number, normalisation
from posequant.demo import randomise
from posequant.exporter import export_pose
from posequant.exporter.zoo import pose_resnet
from posequant.pipeline import GateBudget, run_pipeline

NON_FINITE = ["nan", "inf", "-inf", "NaN"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(res, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    return lines[0]


def bad_option(res, option: str) -> str:
    """click's answer to a bad option value: exit 2 before any work, naming the option."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    assert f"Invalid value for '{option}'" in res.output, res.output
    return res.output


@pytest.fixture(scope="module")
def models(tmp_path_factory, small_checkpoints):
    d = tmp_path_factory.mktemp("adv-models")
    ckpt = d / "coco.pth"
    torch.manual_seed(0)
    torch.save(randomise(pose_resnet.build(SMALL_COCO)).state_dict(), ckpt)
    coco = export_pose(ckpt, d / "coco.onnx", input_size=SIZE, verify_model=False).output
    mpii = export_pose(small_checkpoints["pose_resnet"], d / "mpii.onnx", input_size=(64, 64),
                       verify_model=False).output
    return SimpleNamespace(dir=d, ckpt=ckpt, coco=coco, coco_int8=ort_quantize(coco, d / "coco.int8.onnx"), mpii=mpii)


@pytest.fixture(scope="module")
def coco(models):
    """COCO train (2 images) and val (3 images, 6 people) labelled with the float model's predictions."""
    return make_coco_set(models.dir / "coco-set", models.coco, val_images=3, train_images=2)


def coco_variant(src: Path, dst: Path, mutate, split: str = "val") -> Path:
    """A copy of the COCO set at ``src`` (images linked) whose ``split`` annotations ``mutate`` edits."""
    for d in src.iterdir():
        if d.is_dir() and d.name != "annotations":
            (dst / d.name).parent.mkdir(parents=True, exist_ok=True)
            (dst / d.name).symlink_to(d.resolve())
    shutil.copytree(src / "annotations", dst / "annotations")
    ann = dst / "annotations" / f"person_keypoints_{split}2017.json"
    doc = json.loads(ann.read_text())
    mutate(doc)
    ann.write_text(json.dumps(doc))  # NaN / Infinity as Python's json (and pycocotools) read them
    return dst


def mpii_set(root: Path, mutate=None, gt_mutate=None) -> Path:
    """Four MPII people on four images (80x60) with a gt_valid.mat; ``mutate(records)`` corrupts them."""
    records = []
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg"]):
        write_image(root / "images" / name, seed=i)
        records.append(mpii_record(name, [41.0, 31.0 - i], 0.2 + 0.02 * i, offset=float(i)))
    write_json(root / "annot" / "valid.json", records)
    write_gt(root)  # gt from the clean records: the json's corruption is what is tested
    if mutate:
        mutate(records)
        write_json(root / "annot" / "valid.json", records)
    if gt_mutate:
        path = root / "annot" / "gt_valid.mat"
        gt = scipy.io.loadmat(path)
        gt_mutate(gt)
        scipy.io.savemat(path, {k: v for k, v in gt.items() if not k.startswith("__")})
    return root


# ---- numbers: every numeric option of every command ------------------------------------------------

OPTION_CASES = [  # (command and the arguments it needs, option)
    (["gate", "--float", "f.onnx", "--int8", "q.onnx", "--data", "d"], "--max-drop"),
    (["gate", "--float", "f.onnx", "--int8", "q.onnx", "--data", "d"], "--max-joint-drop"),
    (["gate", "--float", "f.onnx", "--int8", "q.onnx", "--data", "d"], "--min-speedup"),
    (["quantize", "m.onnx", "--calib", "d"], "--max-drop"),
    (["pipeline", "c.pth", "--calib", "d", "--val", "d"], "--max-drop"),
    (["pipeline", "c.pth", "--calib", "d", "--val", "d"], "--max-joint-drop"),
    (["pipeline", "c.pth", "--calib", "d", "--val", "d"], "--min-speedup"),
    (["export-pose", "c.pth"], "--rtol"),
]


@pytest.mark.parametrize("value", [*NON_FINITE, "-1", "-0.5"])
@pytest.mark.parametrize("args,option", OPTION_CASES, ids=[f"{a[0]}{o}" for a, o in OPTION_CASES])
def test_every_float_option_refuses_non_finite_and_negative(tmp_path, args, option, value):
    if value.startswith("-") and option in ("--max-drop", "--max-joint-drop"):
        pytest.skip("a negative drop budget is allowed: INT8 must beat float (test_negative_drop_budgets_...)")
    out = tmp_path / "out"
    where = ["--json", out] if args[0] == "gate" else ["-o", out]
    res = invoke(*args, *where, option, value)
    text = bad_option(res, option)
    assert "finite" in text or "at least 0" in text or "greater than 0" in text
    assert not out.exists()  # refused before any work: nothing written, no folder made


INT_CASES = [
    (["quantize", "m.onnx", "--calib", "d"], "--seed", "-1"),
    (["quantize", "m.onnx", "--calib", "d"], "--num-samples", "0"),
    (["quantize", "m.onnx", "--calib", "d"], "--num-samples", "nan"),
    (["eval", "m.onnx", "--data", "d"], "--batch", "0"),
    (["eval", "m.onnx", "--data", "d"], "--limit", "-3"),
    (["bench", "m.onnx"], "--runs", "0"),
    (["bench", "m.onnx"], "--warmup", "-1"),
    (["bench", "m.onnx"], "--threads", "inf"),
    (["gate", "--float", "f.onnx", "--int8", "q.onnx", "--data", "d"], "--runs", "nan"),
    (["pipeline", "c.pth", "--calib", "d", "--val", "d"], "--num-samples", "-5"),
    (["export-pose", "c.pth"], "--data-samples", "0"),
]


@pytest.mark.parametrize("args,option,value", INT_CASES, ids=[f"{a[0]}{o}={v}" for a, o, v in INT_CASES])
def test_integer_options_refuse_out_of_range(args, option, value):
    bad_option(invoke(*args, option, value), option)


@pytest.mark.parametrize("option,value,why", [
    ("--mean", "0.485,116,0.406", "mixes 0-1 and 0-255"),
    ("--mean", "120,0.5,100", "mixes 0-1 and 0-255"),
    ("--std", "0.229,57,0.225", "mixes 0-1 and 0-255"),
    ("--mean", "nan,0.4,0.4", "finite"),
    ("--mean", "0.4,inf,0.4", "finite"),
    ("--std", "0.2,0.2,nan", "finite"),
    ("--std", "0.2,0,0.2", "positive"),
    ("--std", "-0.2,0.2,0.2", "at least 0"),
    ("--mean", "-0.1,0.4,0.4", "at least 0"),
    ("--mean", "300,200,100", "above 255"),
    ("--mean", "0.4,0.4", "3 comma-separated"),
])
def test_mean_std_units_and_values(tmp_path, option, value, why):
    out = tmp_path / "x.onnx"
    text = bad_option(invoke("export-pose", "c.pth", "-o", out, option, value), option)
    assert why in text and not out.exists()


@pytest.mark.parametrize("values,expected", [
    ((0.485, 0.456, 0.406), (0.485, 0.456, 0.406)),
    ((123.675, 116.28, 103.53), (0.485, 0.456, 0.406)),
    ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),  # hourglass' "no std": 0-1 units
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((0.0, 128.0, 255.0), (0.0, 128 / 255, 1.0)),  # zero is the same in both units
])
def test_normalisation_accepts_one_unit(values, expected):
    assert normalisation(values, "mean") == pytest.approx(expected, abs=1e-6)


def test_negative_drop_budgets_are_kept_and_negative_speedups_refused():
    budget = GateBudget(max_drop=-1.0, max_joint_drop=-0.5)  # stricter: INT8 must beat float
    assert (budget.max_drop, budget.max_joint_drop) == (-1.0, -0.5)
    with pytest.raises(OptionError, match="min_speedup"):
        GateBudget(min_speedup=-1.0)


def test_library_checks_numbers_like_the_cli(tmp_path, models):
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(OptionError, match="max_drop"):
            GateBudget(max_drop=bad)
        with pytest.raises(OptionError, match="min_speedup"):
            GateBudget(min_speedup=bad)
        with pytest.raises(OptionError, match="max_joint_drop"):  # before any file is looked at
            gate(tmp_path / "nope.onnx", tmp_path / "nope.onnx", tmp_path, max_joint_drop=bad)
        with pytest.raises(OptionError, match="max_drop"):
            quantize(tmp_path / "nope.onnx", tmp_path, max_drop=bad)
    with pytest.raises(OptionError, match="--rtol"):
        export_pose(models.ckpt, tmp_path / "x.onnx", input_size=SIZE, rtol=math.nan)
    with pytest.raises(OptionError, match="mixes"):
        export_pose(models.ckpt, tmp_path / "x.onnx", input_size=SIZE, mean=(0.485, 116, 0.406))
    with pytest.raises(PosequantError, match="seed"):
        quantize(models.coco, tmp_path, seed=-1)
    assert not (tmp_path / "x.onnx").exists()
    assert check_number("x", "0.25") == 0.25 and check_number("x", 0) == 0.0


# ---- the library checks its arguments as the CLI does (issue 22) --------------------------------------------

API_CASES = [  # (what is called, the one line it must give)
    (lambda m, t: evaluate(m.coco, m.set, limit=-1), "limit -1 must be at least 1"),
    (lambda m, t: evaluate(m.coco, m.set, limit=0), "limit 0 must be at least 1"),  # was: every person
    (lambda m, t: evaluate(m.coco, m.set, batch=0), "batch 0 must be at least 1"),  # was: a bare AssertionError
    (lambda m, t: evaluate(m.coco, m.set, limit="two"), "limit 'two' is not a whole number"),
    (lambda m, t: evaluate(m.coco, m.set, limit=2.5), "limit 2.5 is not a whole number"),
    (lambda m, t: evaluate(m.coco, m.set, limit=True), "limit True is not a whole number"),
    (lambda m, t: evaluate(m.coco, m.set, threads=0), "threads 0 must be at least 1"),
    (lambda m, t: gate(m.coco, m.coco_int8, m.set, limit=-1), "limit -1 must be at least 1"),  # was: a verdict
    (lambda m, t: gate(m.coco, m.coco_int8, m.set, runs=0), "runs 0 must be at least 1"),
    (lambda m, t: gate(m.coco, m.coco_int8, m.set, worst=-1), "worst -1 must be at least 0"),
    (lambda m, t: bench([m.coco], threads=-2), "threads -2 must be at least 1"),  # was: it ran
    (lambda m, t: bench([m.coco], batches=[1, 0]), "batches 0 must be at least 1"),
    (lambda m, t: bench([m.coco], warmup=-1), "warmup -1 must be at least 0"),
    (lambda m, t: bench([]), "models is empty"),
    (lambda m, t: bench([m.coco, 3]), "models: 3 is not a model"),
    (lambda m, t: export_pose(m.ckpt, t / "x.onnx", input_size=(256,)), "input_size (256,) is not a size"),
    (lambda m, t: export_pose(m.ckpt, t / "x.onnx", input_size=(0, 48)), "input_size: size 0x48 must be positive"),
    (lambda m, t: export_pose(m.ckpt, t / "x.onnx", batch=0), "batch 0 must be at least 1"),
    (lambda m, t: export_pose(m.ckpt, t / "x.onnx", data_samples=0), "data_samples 0 must be at least 1"),
    (lambda m, t: quantize(m.coco, m.set, output=t / "x.onnx", num_samples=0), "num_samples 0 must be at least 1"),
    (lambda m, t: quantize(m.coco, m.set, output=t / "x.onnx", seed=True), "seed True is not a whole number"),
    (lambda m, t: run_pipeline(m.ckpt, m.set, m.set, t / "run", runs=0), "runs 0 must be at least 1"),
    (lambda m, t: posequant.predict(m.coco, 3, t / "p"), "inputs 3 is not a list of inputs"),
    (lambda m, t: posequant.predict(m.coco, [], t / "p"), "inputs is empty"),
]


@pytest.mark.parametrize("case", range(len(API_CASES)), ids=[c[1] for c in API_CASES])
def test_the_library_refuses_what_the_cli_refuses(models, coco, tmp_path, case):
    call, message = API_CASES[case]
    m = SimpleNamespace(**vars(models), set=coco)
    with pytest.raises(ArgumentError) as err:
        call(m, tmp_path)
    assert str(err.value) == message or str(err.value).startswith(message), str(err.value)
    assert not list(tmp_path.iterdir())  # before any work


def test_the_library_takes_what_the_cli_takes(models, coco, tmp_path):
    """A single path where a list goes is one item (was: its characters, "model . not found"), a number may come
    as its string, a size as 'HxW', backend names in any case or alias."""
    timed = bench(str(models.coco), backends="ORT", batches=1, warmup="0", runs=1)
    assert {(Path(r.model).name, r.backend, r.batch) for r in timed.rows} == {("coco.onnx", "ort", 1)}
    assert evaluate(models.coco, coco, limit="2", flip=False, backend="onnxruntime").people == 2
    hw = f"{SIZE[0]}x{SIZE[1]}"
    assert export_pose(models.ckpt, tmp_path / "x.onnx", input_size=hw, verify_model=False).meta.input_size == SIZE
    image = next((coco / "val2017").iterdir())
    assert len(posequant.predict(models.coco, image, tmp_path / "p", flip=False).to_dict()) > 0


def test_a_nan_drop_never_passes_a_check():
    check = _drop_check("AP (x100)", {"float": math.nan, "int8": 50.0, "delta": math.nan}, 0.5)
    assert check.passed is False
    assert _drop_check("AP", {"float": 60.0, "int8": 59.8, "delta": -0.2}, 0.5).passed


# ---- COCO: duplicate ids, -1 AP, degenerate records ---------------------------------------------------


def _dup_ann(doc):
    doc["annotations"][1]["id"] = doc["annotations"][0]["id"]


def _dup_image(doc):
    doc["images"][1]["id"] = doc["images"][0]["id"]


def _no_keypoints_counted(doc):  # pycocotools ignores ground truth with num_keypoints 0: AP -1
    for a in doc["annotations"]:
        a["num_keypoints"] = 0


@pytest.mark.parametrize("mutate,message", [
    (_dup_ann, "1 annotation id(s) occur more than once (1)"),
    (_dup_image, "1 image id(s) occur more than once (1)"),
    (_no_keypoints_counted, "no ground truth to score against (AP -1)"),
])
def test_coco_sets_that_cannot_be_scored_are_refused(models, coco, tmp_path, mutate, message):
    root = coco_variant(coco, tmp_path / "c", mutate)
    out = tmp_path / "r.json"
    res = invoke("eval", models.coco, "--data", root, "--no-flip", "--json", out)
    assert message in one_error_line(res) and not out.exists()


def test_gate_never_passes_on_duplicate_ids(models, coco, tmp_path):
    root = coco_variant(coco, tmp_path / "c", _dup_ann)
    res = invoke("gate", "--float", models.coco, "--int8", models.coco_int8, "--data", root, "--no-flip",
                 "--runs", "1", "--min-speedup", "0")
    assert "occur more than once" in one_error_line(res) and "PASS" not in res.output


def _set(index, key, value, sub=None):
    def mutate(doc):
        target = doc["annotations"][index]
        if sub is None:
            target[key] = value
        else:
            target[key][sub] = value
    return mutate


def _image_size_zero(doc):
    doc["images"][0]["width"] = 0


COCO_RECORDS = [  # (mutation, annotation index spoilt, what the warning says)
    (_set(1, "bbox", 0.0, 2), 1, "bbox size 0x"),
    (_set(1, "bbox", -10.0, 3), 1, "bbox size 70x-10"),
    (_set(2, "bbox", math.nan, 0), 2, "bbox [nan"),
    (_set(2, "bbox", math.inf, 3), 2, "bbox"),
    (_set(3, "keypoints", math.nan, 4), 3, "keypoints hold NaN or inf"),
    (_set(3, "keypoints", -math.inf, 0), 3, "keypoints hold NaN or inf"),
    (_set(4, "keypoints", 7, 2), 4, "keypoint visibility 7"),
    (_set(5, "area", math.nan), 5, "area nan"),
]


@pytest.mark.parametrize("mutate,index,why", COCO_RECORDS, ids=[w for _, _, w in COCO_RECORDS])
def test_degenerate_coco_records_are_skipped_named_and_out_of_the_ground_truth(models, coco, tmp_path,
                                                                                mutate, index, why):
    root = coco_variant(coco, tmp_path / "c", mutate)
    out = tmp_path / "r.json"
    res = invoke("eval", models.coco, "--data", root, "--no-flip", "--json", out)
    assert res.exit_code == 0, res.output
    warning = next(ln for ln in res.output.splitlines() if ln.startswith("warning:"))
    assert "1 records" in warning and f"annotations[{index}]" in warning and why in warning
    doc = json.loads(out.read_text())
    assert doc["people"] == 5 and doc["partial"] is True and len(doc["skipped_records"]) == 1
    # the skipped person is out of the ground truth too: the rest still score as labelled (AP 1)
    assert doc["metrics"]["AP"] == pytest.approx(1.0)


def test_image_of_zero_size_skips_its_people_and_all_bad_is_refused(models, coco, tmp_path):
    ds = open_dataset(coco_variant(coco, tmp_path / "a", _image_size_zero), input_size=SIZE)
    assert len(ds) == 4 and len(ds.invalid) == 2 and "image size 0x120" in ds.invalid[0]

    def all_bad(doc):
        for a in doc["annotations"]:
            a["bbox"][2] = 0.0
    with pytest.raises(DataError, match="every person annotation .* degenerate"):
        open_dataset(coco_variant(coco, tmp_path / "b", all_bad), input_size=SIZE)


def test_coco_ap_leaves_excluded_annotations_out(coco, models):
    ds = open_dataset(coco, input_size=SIZE)
    res = evaluate(models.coco, coco, flip=False)
    from posequant.benchmarks.metrics import coco_results

    results = coco_results([p.image_id for p in ds.people], res.preds, res.maxvals)
    # drop one person's result: missed while its annotation counts, not when it is excluded
    missed = coco_keypoint_ap(ds.coco_json, results[1:])["AP"]
    excluded = coco_keypoint_ap(ds.coco_json, results[1:], exclude_ann_ids=[ds.people[0].ann_id])["AP"]
    assert missed < 0.99 and excluded == pytest.approx(1.0)


# ---- MPII: degenerate records and head boxes ------------------------------------------------------------


def _mpii(index, key, value, sub=None):
    def mutate(records):
        if sub is None:
            records[index][key] = value
        else:
            records[index][key][sub] = value
    return mutate


MPII_RECORDS = [
    (_mpii(1, "scale", 0.0), "scale 0"),
    (_mpii(1, "scale", -0.5), "scale -0.5"),
    (_mpii(1, "scale", math.nan), "scale nan"),
    (_mpii(1, "scale", 1000.0), "scale 1000 (a person 200000 px tall)"),
    (_mpii(1, "center", [math.nan, 30.0]), "centre [nan, 30.0]"),
    (_mpii(1, "center", [5000.0, 30.0]), "far outside the 80x60 image"),
    (_mpii(1, "center", [40.0, -900.0]), "far outside the 80x60 image"),
    (_mpii(1, "joints", [math.nan, 3.0], 4), "joints hold NaN or inf"),
    (_mpii(1, "joints_vis", 2, 3), "joints_vis holds 2"),
    (_mpii(1, "joints_vis", 0.5, 3), "joints_vis holds 0.5"),
]


@pytest.mark.parametrize("mutate,why", MPII_RECORDS, ids=[w for _, w in MPII_RECORDS])
def test_degenerate_mpii_records_are_skipped_in_eval_and_calibration(models, tmp_path, mutate, why):
    root = mpii_set(tmp_path / "mpii", mutate)
    out = tmp_path / "r.json"
    res = invoke("eval", models.mpii, "--data", root, "--no-flip", "--json", out)
    assert res.exit_code == 0, res.output  # a NaN centre is not blamed on the predictions
    warning = next(ln for ln in res.output.splitlines() if ln.startswith("warning:"))
    assert "b.jpg (record 1)" in warning and why in warning
    doc = json.loads(out.read_text())
    assert doc["people"] == 3 and doc["partial"] is True and doc["skipped_records"][0].startswith("b.jpg")

    said = []
    calib = calibration_set(root, read_meta(models.mpii), num_samples=10, warn=said.append)
    assert len(calib.crops) == 3 and all(p.image.name != "b.jpg" for p in calib.crops.people)
    assert any("b.jpg (record 1)" in s and why in s for s in said)


def test_mpii_structure_errors_and_all_bad_are_refused(models, tmp_path):
    wrong_count = mpii_set(tmp_path / "a", _mpii(0, "joints", [[1.0, 2.0]] * 15))
    assert "16 [x, y] pairs" in one_error_line(invoke("eval", models.mpii, "--data", wrong_count, "--no-flip"))

    def all_bad(records):
        for r in records:
            r["scale"] = 0
    res = invoke("eval", models.mpii, "--data", mpii_set(tmp_path / "b", all_bad), "--no-flip")
    assert "every one of the 4 people" in one_error_line(res)


def test_many_bad_records_are_summarised(models, tmp_path):
    def three_bad(records):
        for r in records[:3]:
            r["scale"] = -1
    ds = open_dataset(mpii_set(tmp_path / "m", three_bad), input_size=(64, 64))
    assert len(ds) == 1 and "and 0 more" not in ds.invalid_warning()
    assert ds.invalid_warning().startswith("3 records of")


def test_zero_head_boxes_are_named_and_all_zero_cannot_be_scored(models, tmp_path):
    def one_zero(gt):
        gt["headboxes_src"][:, :, 2] = 5.0  # both corners equal: zero size
    root = mpii_set(tmp_path / "a", gt_mutate=one_zero)
    res = invoke("eval", models.mpii, "--data", root, "--no-flip")
    assert res.exit_code == 0, res.output
    assert "1 people have a zero-size head box" in res.output and "c.jpg (record 2)" in res.output

    def all_zero(gt):
        gt["headboxes_src"][:] = 5.0
    res = invoke("eval", models.mpii, "--data", mpii_set(tmp_path / "b", gt_mutate=all_zero), "--no-flip")
    assert "no joint of the 4 people" in one_error_line(res)


# ---- gate: unscorable data, the float floor, models of another source ------------------------------------


def _far_keypoints(doc):  # finite, plausible-looking labels the float model never hits
    for a in doc["annotations"]:
        a["keypoints"] = [v + 400.0 if i % 3 != 2 else v for i, v in enumerate(a["keypoints"])]


def test_gate_refuses_a_float_model_scoring_near_zero(models, coco, tmp_path):
    root = coco_variant(coco, tmp_path / "c", _far_keypoints)
    res = invoke("gate", "--float", models.coco, "--int8", models.coco_int8, "--data", root, "--no-flip",
                 "--runs", "1", "--min-speedup", "0", "--max-drop", "100", "--max-joint-drop", "100")
    line = one_error_line(res)
    assert f"below {FLOAT_FLOOR:g}" in line and "preprocessing" in line and "PASS" not in res.output


@pytest.mark.parametrize("changes,field", [
    ({"source_sha256": "0" * 64}, "source_sha256"),
    ({"color": "rgb"}, "color"),
    ({"mean": (0.5, 0.5, 0.5)}, "mean"),
    ({"std": (1.0, 1.0, 1.0)}, "std"),
    ({"flip_pairs": ((1, 2),)}, "flip_pairs"),
])
def test_gate_refuses_models_of_another_source_or_preprocessing(models, tmp_path, changes, field):
    if field == "color" and read_meta(models.coco).color == "rgb":
        changes = {"color": "bgr"}
    q = with_meta(models.coco_int8, tmp_path / "q.onnx", **changes)
    res = invoke("gate", "--float", models.coco, "--int8", q, "--data", tmp_path, "--report", tmp_path / "rep")
    line = one_error_line(res)
    assert f"differ in {field}" in line and "--allow-different-source" in line
    assert not (tmp_path / "rep").exists()
    assert [d.split(" ")[0] for d in different_source(read_meta(models.coco), read_meta(q))] == [field]


def test_allow_different_source_gates_anyway(models, coco, tmp_path):
    q = with_meta(models.coco_int8, tmp_path / "q.onnx", source_sha256="f" * 64)
    args = ["gate", "--float", models.coco, "--int8", q, "--data", coco, "--no-flip", "--runs", "1",
            "--min-speedup", "0", "--max-drop", "100", "--max-joint-drop", "100"]
    assert invoke(*args).exit_code == 2
    res = invoke(*args, "--allow-different-source")
    assert res.exit_code == 0, res.output
    assert "gate: PASS" in res.output


def test_gate_library_raises_unscorable(models, coco, tmp_path):
    root = coco_variant(coco, tmp_path / "c", _far_keypoints)
    with pytest.raises(UnscorableError):
        gate(models.coco, models.coco_int8, root, flip=False, runs=1, warmup=0, min_speedup=0)


# ---- --keep-float names, calibrating on the evaluated split -------------------------------------------------


def test_keep_float_unknown_node_is_refused_with_did_you_mean(models, coco, tmp_path):
    import onnx

    real = next(n.name for n in onnx.load(str(models.coco)).graph.node if n.op_type == "Conv")
    out = tmp_path / "q.onnx"
    res = invoke("quantize", models.coco, "--calib", coco, "-o", out, "--keep-float", real[:-1] + "x")
    line = one_error_line(res)
    assert "has no node of that name" in line and "did you mean" in line and real in line
    res = invoke("quantize", models.coco, "--calib", coco, "-o", out, "--keep-float", "no_such_node",
                 "--keep-float", real)
    assert "--keep-float no_such_node" in one_error_line(res) and not out.exists()


def test_calibrating_on_the_eval_split_warns_and_the_hint_says_so(models, tmp_path):
    root = mpii_set(tmp_path / "mpii")  # valid only: calibration falls back to it
    out = tmp_path / "q.onnx"
    res = invoke("quantize", models.mpii, "--calib", root, "-o", out, "--engine", "ort", "--num-samples", "2")
    assert res.exit_code == 0, res.output
    assert "warning: calibrating on MPII 'valid'" in res.output
    assert "the split calibration used" in res.output.split("next:")[1]


def test_budget_on_the_calibration_split_and_an_unscored_float_model_warn(models, tmp_path):
    def tiny_heads(gt):  # 1 px head boxes: a random model scores PCKh ~0 here
        gt["headboxes_src"][1] = gt["headboxes_src"][0] + 1.0
    root = mpii_set(tmp_path / "mpii", gt_mutate=tiny_heads)
    out, js = tmp_path / "q.onnx", tmp_path / "q.json"
    res = invoke("quantize", models.mpii, "--calib", root, "--val", root, "-o", out, "--json", js, "--engine", "ort",
                 "--num-samples", "2", "--max-drop", "100")
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]
    assert any("the split --val scores" in w for w in warnings), res.output
    assert any("below 5" in w and "budget measures nothing" in w for w in warnings), res.output
    assert "the split --val scores" in json.loads(js.read_text())["calibration"]["eval_split_overlap"]


def test_eval_split_overlap_points_at_the_other_split(models, coco, tmp_path):
    assert "the split eval and gate score" in eval_split_overlap(coco, "coco", "val")
    assert eval_split_overlap(coco, "coco", "train") is None
    val = open_dataset(coco, input_size=SIZE)
    assert "the split --val scores" in eval_split_overlap(coco, "coco", "val", val)
    assert eval_split_overlap(coco, "coco", "train", val) is None
    out = tmp_path / "q.onnx"
    res = invoke("quantize", models.coco, "--calib", coco, "--split", "val", "-o", out, "--engine", "ort",
                 "--num-samples", "2")
    assert res.exit_code == 0, res.output
    hint = res.output.split("next:")[1]
    assert "--split train" in hint and "held-out split 'train'" in hint


@pytest.mark.parametrize("suffix,params,known", [
    (".jpg", [], True),
    (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], True),
    (".png", [], True),
    (".bmp", [], False),  # not read from the header: the centre check is left out, nothing is refused
])
def test_image_size_from_the_header(tmp_path, suffix, params, known):
    path = tmp_path / f"x{suffix}"
    cv2.imwrite(str(path), np.zeros((37, 53, 3), np.uint8), params)
    assert image_size(path) == ((37, 53) if known else None)
    path.write_bytes(path.read_bytes()[:12])  # truncated header: unknown, never an exception
    assert image_size(path) is None


def test_many_duplicate_ids_are_summarised(coco, tmp_path):
    def every_twice(doc):  # every annotation twice: 6 ids repeated, 5 named
        doc["annotations"] = [dict(a, id=a["id"]) for a in doc["annotations"]] * 2
    with pytest.raises(DataError, match=r"6 annotation id\(s\) occur more than once \(.* and 1 more\)"):
        open_dataset(coco_variant(coco, tmp_path / "c", every_twice), input_size=SIZE)


def test_eval_preds_on_ground_truth_that_cannot_be_scored(tmp_path):
    def all_zero(gt):
        gt["headboxes_src"][:] = 5.0
    root = mpii_set(tmp_path / "m", gt_mutate=all_zero)
    preds = tmp_path / "p.npy"
    np.save(preds, np.full((4, 16, 2), 20.0))
    out = tmp_path / "r.json"
    res = invoke("eval-preds", preds, "--gt", root / "annot" / "gt_valid.mat", "--json", out)
    assert "no joint of the ground truth can be scored" in one_error_line(res) and not out.exists()
