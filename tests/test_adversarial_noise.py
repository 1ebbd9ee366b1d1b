"""Issue 13, "noise, help and reports": third-party chatter off the terminal (``--verbose`` brings it back),
truncated images found and skipped with a warning naming them, a help text on every option, one set of
backend/device names, README synopses that list every option, and the gate report's tables and picture.

Real triggers only: a truncated JPEG/PNG written here (libjpeg/libpng complain on fd 2), an ONNX Runtime
session asked for the CUDA provider on a machine without it, NNCF's progress bars; fd 1/2 are captured
with ``capfd`` to prove nothing leaks. One small random-weight COCO model, exported once per module.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import click
import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from posequant.benchmarks import gate as gate_mod
from posequant.benchmarks.gate_report import (
    BAND,
    FLOAT_BGR,
    INT8_BGR,
    LEGEND,
    draw_disagreements,
    format_markdown,
    row_label,
)
from posequant.benchmarks.runners import BACKENDS as RUNNER_BACKENDS
from posequant.calibration import Person, TruncatedImageError, read_image, skipped_image_warnings
from posequant.calibration.images import image_truncated
from posequant.calibration.quantize import TARGETS
from posequant.cli import ALIASES, BACKENDS, DEVICES, ONNX_BACKENDS, main
from posequant.core.errors import PosequantError, PosequantWarning
from posequant.core.metadata import read_meta
from posequant.core.quiet import is_verbose, ort_session, quiet, set_verbose
from posequant.demo import randomise
from posequant.exporter import export_pose
from posequant.exporter.zoo import pose_resnet

from conftest import REPO

README = REPO / "README.md"


def smooth_image(seed: int, size=(120, 160)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    return cv2.resize(small, size[::-1], interpolation=cv2.INTER_CUBIC)


def write_image(path: Path, seed: int, truncate: bool = False) -> Path:
    data = cv2.imencode(path.suffix, smooth_image(seed))[1].tobytes()
    path.write_bytes(data[: len(data) // 2] if truncate else data)
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def coco_model(tmp_path_factory) -> Path:
    """A Simple Baselines ResNet-18 with COCO's 17 joints at 64x32 (random weights; the stride-32 backbone takes multiples of 32)."""
    d = tmp_path_factory.mktemp("noise")
    torch.manual_seed(0)
    cfg = pose_resnet.PoseResNetConfig(depth=18, num_joints=17, deconv_filters=(16, 16, 16))
    ckpt = d / "coco.pth"
    torch.save(randomise(pose_resnet.build(cfg)).state_dict(), ckpt)
    return export_pose(ckpt, d / "coco.onnx", input_size=(64, 32), verify_model=False).output


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory) -> Path:
    """Two COCO images with one person each; the second image is truncated."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val2017").mkdir()
    images, anns = [], []
    for i in range(2):
        name = f"{i + 1:012d}.jpg"
        write_image(root / "val2017" / name, i, truncate=i == 1)
        images.append({"id": i + 1, "file_name": name, "width": 160, "height": 120})
        box = [20.0, 10.0, 60.0, 100.0]
        kps = [v for k in range(17) for v in (30.0 + 2 * k, 20.0 + 5 * k, 2)]
        anns.append({"id": 100 + i, "image_id": i + 1, "bbox": box, "keypoints": kps, "area": 6000.0,
                     "iscrowd": 0, "category_id": 1, "num_keypoints": 17})
    (root / "annotations").mkdir()
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    (root / "annotations" / "person_keypoints_val2017.json").write_text(json.dumps(doc))
    return root


# ---- quiet / --verbose -------------------------------------------------------------------------


def _chatter():
    os.write(1, b"C-level stdout\n")
    os.write(2, b"C-level stderr\n")
    print("python stdout")
    print("python stderr", file=sys.stderr)
    warnings.warn("a library's warning")
    logging.getLogger("some.library").error("a library's log line")


def test_quiet_keeps_every_channel_off_the_terminal(capfd):
    with quiet():
        _chatter()
        with quiet():  # nested: still quiet, and restored once
            os.write(2, b"inner\n")
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    print("ours again")
    os.write(2, b"fd 2 again\n")
    out, err = capfd.readouterr()
    assert out == "ours again\n" and err == "fd 2 again\n"


def test_verbose_lets_the_libraries_through_on_stderr(capfd):
    set_verbose(True)
    try:
        with quiet():
            print("python stdout")
            os.write(2, b"C-level stderr\n")
    finally:
        set_verbose(False)
    out, err = capfd.readouterr()
    assert out == ""  # stdout stays ours (results, JSON)
    assert "python stdout" in err and "C-level stderr" in err


def test_the_verbose_flag_is_global_and_resets_per_run(tmp_path):
    invoke("--verbose", "inspect", tmp_path / "missing.pth")
    assert is_verbose()
    invoke("inspect", tmp_path / "missing.pth")
    assert not is_verbose()


def _relu_model() -> bytes:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


CUDA_FIRST = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def no_cuda():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has ONNX Runtime's CUDA provider: no fallback to trigger")


def test_ort_provider_fallback_is_one_warning_in_our_words(no_cuda, capfd):
    import onnxruntime as ort

    with warnings.catch_warnings(record=True) as raw:  # the trigger is real: ORT complains on its own
        warnings.simplefilter("always")
        ort.InferenceSession(_relu_model(), providers=CUDA_FIRST)
    assert any("CUDAExecutionProvider" in str(w.message) for w in raw)
    capfd.readouterr()
    with pytest.warns(PosequantWarning, match=r"^CUDA provider unavailable, running on CPU$"):
        session = ort_session(_relu_model(), providers=CUDA_FIRST)
    assert session.get_providers() == ["CPUExecutionProvider"]
    out, err = capfd.readouterr()
    assert "CUDAExecutionProvider" not in out + err and "EP Error" not in out + err


def test_runners_refuse_a_provider_fallback(no_cuda):
    with pytest.raises(PosequantError, match="could not start its CUDA provider here and would run on CPU"):
        ort_session(_relu_model(), providers=CUDA_FIRST, fallback="error")


# ---- truncated images --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, complaint", [(".jpg", "Premature end of JPEG file"), (".png", "libpng error")])
def test_truncated_image_is_refused_before_the_decoder_complains(tmp_path, capfd, suffix, complaint):
    good = write_image(tmp_path / f"good{suffix}", 0)
    cut = write_image(tmp_path / f"cut{suffix}", 0, truncate=True)
    cv2.imread(str(cut))  # the trigger: the decoder itself writes to fd 2
    assert complaint in capfd.readouterr().err
    with pytest.raises(TruncatedImageError, match=rf"image .*cut\{suffix} is truncated"):
        read_image(cut)
    np.testing.assert_array_equal(read_image(good), cv2.imread(str(good)))
    out, err = capfd.readouterr()
    assert out == "" and err == "", err


def test_truncation_check_is_not_fooled_by_thumbnails_or_trailing_bytes():
    full = cv2.imencode(".jpg", smooth_image(1))[1].tobytes()
    thumb = cv2.imencode(".jpg", smooth_image(2, (12, 16)))[1].tobytes()  # a complete JPEG inside APP1
    payload = b"Exif\x00\x00" + thumb
    with_thumb = full[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + full[2:]
    assert not image_truncated(full) and not image_truncated(with_thumb)
    assert image_truncated(with_thumb[: len(with_thumb) - 400])  # the thumbnail's end marker does not count
    assert not image_truncated(full + b"\x00" * 16)  # padding after the end marker
    assert not image_truncated(b"BM" + b"\x00" * 64)  # other formats: left to the decoder


def test_skipped_image_warnings_name_the_images_by_reason(tmp_path):
    cut = write_image(tmp_path / "a.jpg", 0, truncate=True)
    junk = tmp_path / "b.jpg"
    junk.write_bytes(b"not an image")
    lines = skipped_image_warnings([cut, junk, tmp_path / "gone.jpg", cut], "calibration image")
    assert lines == [f"1 calibration image truncated, skipped: {cut}",
                     f"1 calibration image not decodable, skipped: {junk}",
                     f"1 calibration image missing, skipped: {tmp_path / 'gone.jpg'}"]


def test_quantize_skips_a_truncated_image_with_a_warning_and_nothing_leaks(coco_model, tmp_path, capfd):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        write_image(calib / f"ok{i}.jpg", i)
    cut = write_image(calib / "cut.jpg", 5, truncate=True)
    capfd.readouterr()
    res = invoke("quantize", coco_model, "--calib", calib, "--num-samples", "2", "--no-equalize",
                 "-o", tmp_path / "q.onnx", "--json", tmp_path / "q.json")
    assert res.exit_code == 0, res.output
    assert f"warning: 1 calibration image truncated, skipped: {cut}" in res.output
    out, err = capfd.readouterr()  # what reached fds 1/2 around CliRunner: libjpeg, NNCF's bars, ORT
    assert out == "" and err == "", (out, err)
    for noise in ("Premature end", "Bias correction", "Statistics collection", "━", "Traceback"):
        assert noise not in res.output
    doc = json.loads((tmp_path / "q.json").read_text())
    assert doc["calibration"]["skipped_images"] == [str(cut)]
    if doc["settings"]["bias_correction"] == "fast":  # NNCF gave up on full correction: said in our words
        assert "full bias correction cannot cut this graph" in res.output


def test_eval_refuses_a_truncated_image_or_skips_it_with_a_warning(coco_model, coco_set, capfd):
    cut = coco_set / "val2017" / "000000000002.jpg"
    res = invoke("eval", coco_model, "--data", coco_set, "--no-flip")
    assert res.exit_code == 2 and "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "truncated" in errors[0] and str(cut) in errors[0], res.output
    res = invoke("eval", coco_model, "--data", coco_set, "--no-flip", "--skip-missing")
    assert res.exit_code == 0, res.output
    assert f"warning: 1 image truncated, skipped: {cut}" in res.output
    assert "1 people" in res.output
    out, err = capfd.readouterr()
    assert "Premature end" not in out + err


# ---- help texts, backend names, README synopses ------------------------------------------------


def _commands(group: click.Group, prefix=("posequant",)):
    yield prefix, group
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def _options(cmd: click.Command):
    return [p for p in cmd.params if isinstance(p, click.Option) and p.name != "help"]


def test_every_option_of_every_command_has_help():
    missing = [f"{' '.join(path)} {p.opts[-1]}" for path, cmd in _commands(main) for p in _options(cmd)
               if not (p.help or "").strip()]
    assert not missing, f"options without help: {missing}"
    assert len(list(_commands(main))) >= 10  # the group and its 9 commands


def test_backend_and_device_names_are_one_definition():
    assert set(BACKENDS) == set(RUNNER_BACKENDS) and set(ONNX_BACKENDS) == set(TARGETS)
    seen = {}
    for path, cmd in _commands(main):
        for p in _options(cmd):
            if p.name in ("backend", "target", "device") and isinstance(p.type, click.Choice):
                seen[(path[-1], p.name)] = tuple(p.type.choices)
    assert seen[("eval", "backend")] == BACKENDS
    assert seen[("gate", "backend")] == seen[("quantize", "target")] == ONNX_BACKENDS
    assert set(seen[("pipeline", "target")]) <= set(ONNX_BACKENDS)
    assert {v for k, v in seen.items() if k[1] == "device"} == {DEVICES}
    assert {("eval", "device"), ("bench", "device"), ("gate", "device")} <= set(seen)


@pytest.mark.parametrize("command, option, given, expect", [
    ("eval", "backend", "ONNXRuntime", "ort"), ("eval", "backend", "pytorch", "torch"),
    ("eval", "device", "GPU", "cuda"), ("gate", "backend", "trt", "tensorrt"),
    ("quantize", "target", "ov", "openvino"), ("pipeline", "target", "OpenVINO", "openvino"),
    ("bench", "device", "CPU", "cpu"), ("eval", "backend", "ort", "ort"),
])
def test_old_and_other_spellings_of_a_backend_still_work(command, option, given, expect):
    cmd = main.commands[command]
    param = next(p for p in cmd.params if p.name == option)
    assert param.type_cast_value(click.Context(cmd), given) == expect


def test_bench_backend_list_takes_the_aliases(coco_model):
    res = invoke("bench", coco_model, "--backend", "ONNXRuntime,trt", "--runs", "1", "--warmup", "0", "--batch", "1")
    assert res.exit_code == 2 and "error: --backend tensorrt" in res.output, res.output  # trt became tensorrt
    bad = invoke("bench", coco_model, "--backend", "onnxrt")
    assert bad.exit_code == 2 and "did you mean" in bad.output
    assert set(ALIASES.values()) <= set(BACKENDS) | set(DEVICES)


def readme_synopses(text: str) -> dict[str, str]:
    """Per command, the synopsis lines of the README's code blocks: ``posequant CMD ...`` and the indented
    lines after it ("" for the group's own ``posequant [--verbose] ...``)."""
    out: dict[str, list[str]] = {}
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        current = None
        for line in block.splitlines():
            m = re.match(r"posequant (\S+)", line)
            if m:
                current = "" if m.group(1).startswith(("[", "-")) else m.group(1)
                out.setdefault(current, []).append(line.split("  #")[0])  # not the comments
            elif current is not None and line.startswith((" ", "\t")):
                out[current].append(line)
            else:
                current = None
    return {k: "\n".join(v) for k, v in out.items()}


def _mentions(text: str, opt: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(opt) + r"(?![\w-])", text) is not None


def documented_text() -> str:
    """README.md and the pages under docs/: a command's synopsis may live in either."""
    return "\n".join(p.read_text() for p in [README, *sorted((REPO / "docs").glob("*.md"))])


def test_readme_synopsis_lists_every_option_of_every_command():
    synopses = readme_synopses(documented_text())
    missing = []
    for path, cmd in _commands(main):
        name = "" if len(path) == 1 else path[-1]
        text = synopses.get(name, "")
        missing += [f"{' '.join(path)} {p.opts[-1]}" for p in _options(cmd)
                    if not any(_mentions(text, o) for o in p.opts + p.secondary_opts)]
    assert not missing, f"README synopses miss: {missing}"


def test_readme_synopsis_choices_are_the_commands_choices():
    synopses = readme_synopses(documented_text())
    wrong = []
    for path, cmd in _commands(main):
        text = synopses.get("" if len(path) == 1 else path[-1], "")
        for p in _options(cmd):
            if not isinstance(p.type, click.Choice):
                continue
            for opt in p.opts:
                for listed in re.findall(re.escape(opt) + r" ([\w-]+(?:\|[\w-]+)+)", text):
                    if set(listed.split("|")) != set(p.type.choices):
                        wrong.append(f"{path[-1]} {opt} {listed} (takes {'|'.join(p.type.choices)})")
    assert not wrong, wrong


# ---- gate report: joint groups once; the picture's legend and row labels -----------------------


def _fake_eval(metrics, preds=None):
    return SimpleNamespace(metrics=metrics, preds=preds)


def _report(main_metric, scores, groups, joints):
    checks = [gate_mod._drop_check(main_metric, scores[main_metric], 0.5)]
    checks += [gate_mod._drop_check(f"joint group {g}", d, 2.0) for g, d in groups.items()]
    return SimpleNamespace(passed=True, reasons=[], checks=checks, float_model="f.onnx", int8_model="q.onnx",
                           data="d", dataset="X", people=3, flip=False, backend="ort", device="cpu", cpu=None,
                           scores=scores, groups=groups, joints=joints, latency=None, disagreements=[])


def _group_rows(md: str, groups) -> dict[str, int]:
    """How many table rows name a group (as a check or on its own) and carry its float and INT8 numbers."""
    return {g: sum(ln.startswith((f"| {g} |", f"| joint group {g} |")) and f"| {d['float']:.2f} | {d['int8']:.2f} |" in ln
                   for ln in md.splitlines()) for g, d in groups.items()}


def test_mpii_report_shows_each_joint_group_once():
    cols = ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean")
    f = {"PCKh@0.5": {c: 50.0 + i for i, c in enumerate(cols)}, "PCKh@0.1": {c: 10.0 for c in cols}}
    q = {"PCKh@0.5": {c: 40.0 + 1.5 * i for i, c in enumerate(cols)}, "PCKh@0.1": {c: 9.0 for c in cols}}
    main_metric, scores, groups, joints = gate_mod._scores(None, "mpii", [], _fake_eval(f), _fake_eval(q))
    assert list(groups) == list(gate_mod.MPII_GROUPS) and joints == {}  # not the groups again
    md = format_markdown(_report(main_metric, scores, groups, joints), None)
    assert _group_rows(md, groups) == {g: 1 for g in groups}, md
    assert "| Head |" not in md and md.count("| joint group Head |") == 1


def test_coco_report_shows_each_joint_group_once_then_the_joints(coco_model):
    meta = read_meta(coco_model)
    rng = np.random.default_rng(0)
    people = [Person(image=Path(f"{i}.jpg"), center=np.array([40.0, 60.0]), scale=np.array([0.5, 0.6]),
                     joints=rng.uniform(10, 70, (17, 2)), joints_vis=np.ones(17), index=i, ann_id=100 + i,
                     bbox=(10.0, 10.0, 60.0, 100.0)) for i in range(3)]
    gt = np.stack([p.joints for p in people])
    fp, qp = gt + rng.normal(0, 3, gt.shape), gt + rng.normal(0, 9, gt.shape)
    pck = {j: 80.0 - i for i, j in enumerate(meta.joint_names)} | {"Mean": 70.0}
    metrics = {"AP": 0.5, "AP50": 0.6, "AP75": 0.4, "AR": 0.55, "PCK@0.2": pck}
    main_metric, scores, groups, joints = gate_mod._scores(meta, "coco", people, _fake_eval(metrics, fp),
                                                           _fake_eval(metrics, qp))
    md = format_markdown(_report(main_metric, scores, groups, joints), None)
    assert _group_rows(md, groups) == {g: 1 for g in groups}, md
    for g, d in groups.items():  # what a group pools is listed, without repeating its numbers
        assert f"| {g} | {d['joints']} |" in md
    assert all(f"| {j} |" in md for j in meta.joint_names)


def test_disagreement_picture_has_a_legend_and_a_label_per_row(coco_model, tmp_path):
    meta = read_meta(coco_model)
    people, float_preds, int8_preds = [], [], []
    rng = np.random.default_rng(1)
    for i in range(2):
        image = write_image(tmp_path / f"img{i}.jpg", i)
        joints = rng.uniform(30, 90, (17, 2))
        people.append(Person(image=image, center=np.array([80.0, 60.0]), scale=np.array([0.45, 0.6]),
                             joints=joints, joints_vis=np.ones(17), index=3 + i, ann_id=42 + i))
        float_preds.append(joints + 2)
        int8_preds.append(joints - 6)
    scores = [0.0512, 0.0123]
    labels = [row_label(i + 1, p, s) for i, (p, s) in enumerate(zip(people, scores))]
    assert labels[0] == "#1 img0.jpg, person 3 (annotation 42): drift 5.12% of person size"
    assert "img1.jpg" in labels[1] and "annotation 43" in labels[1]

    picture = draw_disagreements(meta, people, np.stack(float_preds), np.stack(int8_preds), scores)
    legend = picture[:BAND].reshape(-1, 3)
    colours = {tuple(int(v) for v in px) for px in legend}
    assert tuple(FLOAT_BGR) in colours and tuple(INT8_BGR) in colours  # the two swatches
    assert (legend.min(axis=1) > 200).sum() > 50  # the names, in white
    assert [name for name, _, _ in LEGEND] == ["float model", "INT8 model", "ground truth"]
    panel_w = (picture.shape[1] - 6) // 2
    row_h = BAND + 256
    for r in range(2):  # each row: a label band with text, over the two panels
        top = BAND + 6 + r * (row_h + 6)
        band = picture[top:top + BAND]
        assert (band.min(axis=2) > 200).sum() > 50, f"row {r} has no label"
        assert band.shape[1] == 2 * panel_w + 6
    assert picture.shape[0] == BAND + 6 + 2 * row_h + 6
