"""Issue 22, class 5, "predict's names and ids": inputs that repeat, names that meet, ids that must stay put.

Each trial gives ``predict`` what a user's folders hold: one photo without a number among numbered ones, two
files with one number or one name in different folders, the same file twice (a symlink, a folder and a file
in it), box files naming several inputs or boxes that are no person on their image, a rerun into the folder
of an earlier one that is interrupted, a video that FFmpeg cannot open. A tiny random hourglass model and
tiny images: what is tested is the bookkeeping, not the joints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_calibration_datasets import write_image

import posequant
from posequant.benchmarks.predict import (
    COMPARE_RESULTS_FILE,
    RESULTS_FILE,
    SUMMARY_FILE,
    box_problem,
    gather_inputs,
    image_ids,
    output_names,
    predict,
)
from posequant.cli import main
from posequant.core.args import ArgumentError
from posequant.core.errors import PosequantError
from posequant.exporter import export_pose

from conftest import small_model


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("predict-names")
    ckpt = d / "hourglass.pth"
    torch.save(small_model("hourglass").state_dict(), ckpt)
    model = export_pose(ckpt, d / "model.onnx", input_size=(64, 64), verify_model=False).output
    return SimpleNamespace(dir=d, model=model)


def images(folder: Path, *names: str) -> list[Path]:
    """Tiny distinct JPEGs (80 x 60) at these names under ``folder``."""
    out = []
    for i, name in enumerate(names):
        write_image(folder / name, seed=i + 7 * len(name))
        out.append(folder / name)
    return out


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def warnings_of(res) -> list[str]:
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    return [ln for ln in res.output.splitlines() if ln.startswith("warning:")]


def refused(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith(("error:", "Error:"))]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def results(out: Path) -> list[dict]:
    return json.loads((out / RESULTS_FILE).read_text())


def summary(out: Path) -> dict:
    return json.loads((out / SUMMARY_FILE).read_text())


# ---- image ids: the number in the name, never renumbered by the images beside it ---------------------------


def test_an_image_without_a_number_leaves_the_others_ids_alone(w, tmp_path):
    folder = tmp_path / "in"
    images(folder, "000000000007.jpg", "000000000139.jpg", "selfie.jpg")
    out = tmp_path / "out"
    said = warnings_of(invoke("predict", w.model, folder, "-o", out, "--no-flip"))
    assert [r["image_id"] for r in results(out)] == [7, 139, -1]  # sorted: 0000...7, 0000...139, selfie
    assert len(said) == 1 and "selfie.jpg (no number: -1)" in said[0] and "keep the number" in said[0], said
    doc = summary(out)
    assert doc["ids_not_in_names"] == [str(folder / "selfie.jpg")]
    assert doc["image_ids"] == {str(folder / "000000000007.jpg"): 7, str(folder / "000000000139.jpg"): 139,
                                str(folder / "selfie.jpg"): -1}


def test_ids_are_the_numbers_in_the_names_or_negative_in_input_order(tmp_path):
    a, b, c, d, e = (tmp_path / n for n in ("a/img1.jpg", "b/img01.jpg", "c/5.jpg", "x.jpg", "y.jpg"))
    assert image_ids([a, b, c, d, e]) == {a: -1, b: -2, c: 5, d: -3, e: -4}  # 1 is shared: neither owns it
    assert image_ids([c, d, e]) == {c: 5, d: -1, e: -2}  # an image added after moves no other id
    assert image_ids([c, d, a]) == {c: 5, d: -1, a: 1}  # alone, img1.jpg owns its 1
    assert image_ids([d, e]) == {d: -1, e: -2}


def test_a_shared_number_is_said_and_a_folder_without_numbers_is_quiet(w, tmp_path):
    images(tmp_path / "cam1", "frame_0001.jpg")
    images(tmp_path / "cam2", "frame_0001.jpg", "frame_0002.jpg")
    out = tmp_path / "out"
    said = warnings_of(invoke("predict", w.model, tmp_path / "cam1", tmp_path / "cam2", "-o", out, "--no-flip"))
    assert [r["image_id"] for r in results(out)] == [-1, -2, 2]
    assert len(said) == 1 and "shares 1" in said[0] and "2 of 3 images" in said[0], said
    plain = tmp_path / "plain"
    images(plain, "beach.jpg", "party.jpg")
    assert warnings_of(invoke("predict", w.model, plain, "-o", tmp_path / "out2", "--no-flip")) == []
    assert [r["image_id"] for r in results(tmp_path / "out2")] == [-1, -2]


# ---- the same file twice is predicted once ------------------------------------------------------------------


def test_the_same_file_given_twice_is_predicted_once(w, tmp_path):
    folder = tmp_path / "in"
    a, b = images(folder, "000000000001.jpg", "000000000002.jpg")
    link = tmp_path / "link.jpg"
    link.symlink_to(b)
    out = tmp_path / "out"
    spelled = folder / ".." / "in" / a.name
    said = warnings_of(invoke("predict", w.model, folder, a, link, spelled, "-o", out, "--no-flip"))
    assert [r["image_id"] for r in results(out)] == [1, 2]  # one result per image, each its own id
    assert summary(out)["images"] == 2 and sorted(p.name for p in out.glob("*.pose.jpg")) == [
        "000000000001.pose.jpg", "000000000002.pose.jpg"]
    assert len(said) == 1 and "3 inputs given more than once are predicted once" in said[0], said
    assert f"{a} (again), {link} (the same file as {b}), {spelled} (the same file as {a})" in said[0]


def test_gather_inputs_keeps_the_first_of_each_file(tmp_path):
    a, b = images(tmp_path / "in", "a.jpg", "b.jpg")
    os.link(a, tmp_path / "hard.jpg")
    given = gather_inputs([b, tmp_path / "in", tmp_path / "hard.jpg"])
    assert given.files == [b, a] and given.repeats == [(b, b), (tmp_path / "hard.jpg", a)]


# ---- output names: distinct and predictable, or a refusal naming what to rename -----------------------------


def test_inputs_with_one_name_get_their_folders_in_their_names(tmp_path):
    files = [tmp_path / p for p in ("x/person.jpg", "person.2.jpg", "y/person.jpg", "z/a.jpg", "z/a.png",
                                    "clip.mp4", "v/clip.avi", "clip.jpg")]
    assert list(output_names(files).values()) == [
        "x_person.pose.jpg", "person.2.pose.jpg", "y_person.pose.jpg", "a.jpg.pose.jpg", "a.png.pose.jpg",
        "clip.pose.mp4", "v_clip.pose.mp4", "clip.pose.jpg"]


def test_two_photos_named_alike_in_two_folders_are_both_drawn(w, tmp_path):
    """The trial's case: "-o .../person.2.pose.jpg and -o .../person.2.pose.jpg are the same file"."""
    x, p2, y = images(tmp_path, "x/person.jpg", "person.2.jpg", "y/person.jpg")
    out = tmp_path / "out"
    warnings_of(invoke("predict", w.model, x, p2, y, "-o", out, "--no-flip"))
    assert sorted(p.name for p in out.glob("*.pose.jpg")) == ["person.2.pose.jpg", "x_person.pose.jpg",
                                                             "y_person.pose.jpg"]
    drawn = {p.name: cv2.imread(str(p)) for p in out.glob("*.pose.jpg")}
    assert not np.array_equal(drawn["x_person.pose.jpg"], drawn["y_person.pose.jpg"])  # each its own photo


def test_a_name_that_still_meets_another_is_refused_naming_both(w, tmp_path):
    inputs = images(tmp_path, "cam1/frame.jpg", "cam2/frame.jpg", "cam1_frame.jpg")
    out = tmp_path / "out"
    line = refused(invoke("predict", w.model, *inputs, "-o", out))
    assert f"inputs {inputs[0]} and {inputs[2]} would both be drawn to cam1_frame.pose.jpg" in line, line
    assert "rename one of them" in line and not out.exists()


# ---- --boxes: one image per box, and boxes that are persons on it -------------------------------------------


@pytest.mark.parametrize("entry, names, expect", [
    ({"file_name": "frame.jpg"}, ("cam1/frame.jpg", "cam2/frame.jpg"), "file_name 'frame.jpg' matches 2 inputs"),
    ({"image_id": 1}, ("a/img1.jpg", "b/img01.jpg"), "image_id 1 matches 2 inputs"),
])
def test_a_box_naming_two_inputs_is_refused_naming_them(w, tmp_path, entry, names, expect):
    inputs = images(tmp_path / "in", *names)
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{**entry, "bbox": [5, 5, 30, 40], "score": 0.9}]))
    out = tmp_path / "out"
    line = refused(invoke("predict", w.model, *inputs, "--boxes", dets, "-o", out))
    assert expect in line and all(str(p) in line for p in inputs), line
    assert not out.exists()


def test_boxes_that_are_no_person_are_skipped_with_one_warning_per_kind(w, tmp_path):
    (image,) = images(tmp_path / "in", "000000000001.jpg")  # 80 x 60
    boxes = [[10, 10, 30, 30],  # a person
             [0, 0, 0, 10], [5, 5, -3, 10], [20, 20, 0.5, 0.5],  # zero, negative, under a pixel
             [100, 0, 20, 20], [-50, 0, 20, 20], [0, 60, 10, 10]]  # right of, left of, below the image
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": 1, "bbox": b, "score": 1} for b in boxes]))
    out = tmp_path / "out"
    said = warnings_of(invoke("predict", w.model, image, "--boxes", dets, "-o", out, "--no-flip"))
    assert len(results(out)) == 1 and results(out)[0]["box"] == [10, 10, 30, 30]
    assert len(said) == 2, said
    assert "skipped 3 boxes of zero or negative size, or under a pixel (" in said[0], said
    assert "000000000001.jpg [0, 0, 0, 10] on 80x60" in said[0]
    assert "skipped 3 boxes wholly outside their images" in said[1] and "[-50, 0, 20, 20]" in said[1]
    assert len(summary(out)["skipped_boxes"]) == 6
    assert [box_problem(b, 80, 60) for b in boxes] == [None] + ["empty"] * 3 + ["outside"] * 3
    assert box_problem([79.5, 10, 5, 5], 80, 60) == "outside"  # less than a pixel of it on the image


def test_a_nan_box_is_refused_naming_the_entry(w, tmp_path):
    (image,) = images(tmp_path / "in", "000000000001.jpg")
    dets = tmp_path / "dets.json"
    dets.write_text('[{"image_id": 1, "bbox": [1, 2, 3, 4]}, {"image_id": 1, "bbox": [NaN, 2, 3, 4]}]')
    line = refused(invoke("predict", w.model, image, "--boxes", dets, "-o", tmp_path / "out"))
    assert "(entry 1): bbox [nan, 2, 3, 4] is not [x, y, w, h] (4 finite numbers)" in line, line


# ---- a rerun into an earlier run's folder: old results are never taken for this run's -----------------------


def _earlier_run(out: Path) -> None:
    out.mkdir()
    for name in (RESULTS_FILE, COMPARE_RESULTS_FILE, SUMMARY_FILE):
        (out / name).write_text('"earlier run"')
    (out / "a.pose.jpg").write_bytes(b"earlier picture")
    (out / "other.pose.jpg").write_bytes(b"not this run's name")


def test_a_rerun_without_compare_leaves_no_earlier_comparison(w, tmp_path):
    a, b = images(tmp_path / "in", "a.jpg", "b.jpg")
    out = tmp_path / "out"
    _earlier_run(out)
    predict(w.model, [a, b], out, flip=False)
    assert not (out / COMPARE_RESULTS_FILE).exists() and len(results(out)) == 2
    assert (out / "a.pose.jpg").read_bytes() != b"earlier picture"
    assert (out / "other.pose.jpg").read_bytes() == b"not this run's name"  # not this run's: left alone


def test_a_folder_under_a_results_name_is_one_line(w, tmp_path):
    (image,) = images(tmp_path / "in", "a.jpg")
    out = tmp_path / "out"
    (out / RESULTS_FILE).mkdir(parents=True)
    line = refused(invoke("predict", w.model, image, "-o", out))
    assert f"cannot remove {RESULTS_FILE}" in line and "choose another -o" in line, line
    assert sorted(p.name for p in out.iterdir()) == [RESULTS_FILE]


# The CLI in a child process whose disk is slow at one name: it says SLOW, then blocks, for SIGTERM.
SLOW_AT = """
import os, sys, time
real = os.replace
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith(sys.argv[1]):
        print("SLOW", dst, file=sys.__stderr__, flush=True)
        time.sleep(120)
    return real(src, dst, *args, **kwargs)
os.replace = replace
from posequant.cli import main
main(sys.argv[2:], prog_name="posequant")
"""


def test_an_interrupted_rerun_leaves_no_results_beside_its_pictures(w, tmp_path):
    inputs = images(tmp_path / "in", "a.jpg", "b.jpg", "c.jpg")
    out = tmp_path / "out"
    _earlier_run(out)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_AT, "c.pose.jpg", "predict", w.model, *inputs, "-o", out,
                             "--no-flip"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith("SLOW"), line + proc.stderr.read()
        # a.pose.jpg and b.pose.jpg are this run's by now; the earlier results are gone
        assert (out / "b.pose.jpg").exists() and (out / "a.pose.jpg").read_bytes() != b"earlier picture"
        assert not (out / RESULTS_FILE).exists() and not (out / SUMMARY_FILE).exists()
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and err.rstrip().endswith("terminated"), err
    # none of this run's files, no results: nothing that disagrees; what is not the run's is left alone
    assert sorted(p.name for p in out.iterdir()) == ["other.pose.jpg"]


# ---- a video FFmpeg cannot open: one line of ours, FFmpeg's own words only with --verbose --------------------


def test_a_truncated_video_is_one_warning_and_ffmpeg_speaks_only_when_verbose(w, tmp_path):
    (image,) = images(tmp_path / "in", "000000000001.jpg")
    video = tmp_path / "in" / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (80, 60))
    for i in range(3):
        writer.write(np.full((60, 80, 3), 60 * i, np.uint8))
    writer.release()
    video.write_bytes(video.read_bytes()[:200])  # cut before its index (mp4's "moov" atom)
    # fresh processes: FFmpeg leaves out a line that repeats its last one, and the file descriptors are the test's
    run = [sys.executable, "-m", "posequant"]
    args = ["predict", w.model, image, video, "--no-flip", "-o"]
    quiet = subprocess.run([*run, *args, tmp_path / "out"], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stdout.startswith("predict: 1 images"), quiet.stderr
    said = quiet.stderr.splitlines()
    assert len(said) == 1 and said[0].startswith("warning: skipped 1 of 2 inputs"), quiet.stderr
    assert f"{video}: not a readable video" in said[0] and "--verbose" in said[0]
    verbose = subprocess.run([*run, "--verbose", *args, tmp_path / "out2"], capture_output=True, text=True,
                             timeout=120)
    assert verbose.returncode == 0 and "moov atom not found" in verbose.stderr, verbose.stderr


# ---- the library checks predict's inputs itself ------------------------------------------------------------


def test_the_library_takes_one_path_and_refuses_a_number(w, tmp_path):
    (image,) = images(tmp_path / "in", "000000000003.jpg")
    assert posequant.predict is predict and predict.posequant_checks  # declared in its module, not in the API
    assert predict(w.model, str(image), tmp_path / "out", flip=False).image_ids == {str(image): 3}
    with pytest.raises(ArgumentError, match="inputs: 3 is not an input"):
        predict(w.model, [3], tmp_path / "out2")
    with pytest.raises(PosequantError, match="predict needs at least one|inputs is empty"):
        predict(w.model, [], tmp_path / "out3")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()
