"""Adversarial model files and checkpoints (issue 13): every command that opens a model says one line.

Broken ONNX files and checkpoints (empty, truncated, random bytes, the other kind renamed, a
directory, ...) through every command that opens them; graphs whose input/output disagree with
their metadata; input sizes the network's stride does not divide; official training checkpoints
with numpy scalars (loaded weights-only) beside malicious pickles (still refused); each metadata
key damaged in turn; onnxsim's keys kept out of ``metadata_props``.

Tiny graphs built here (one strided convolution, a few KB) stand in for pose models wherever the
test is about the file or the graph, not the network.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from test_calibration_datasets import coco_ann, write_image, write_json

from posequant.cli import main
from posequant.core.errors import CheckpointError, ExportError, MetadataError, PosequantError
from posequant.core.keypoints import keypoint_set_for
from posequant.core.metadata import ModelMeta, read_meta, write_meta
from posequant.exporter import export_pose
from posequant.exporter.checkpoint import load_checkpoint
from posequant.exporter.common import simplify_onnx
from posequant.exporter.export import fit_input_size
from posequant.exporter.model import LastHeatmaps

from conftest import TRAINED_ONNX, needs_shared, small_model

COCO17 = keypoint_set_for(17, "coco")
META = ModelMeta(family="custom", keypoints=COCO17.name, joint_names=COCO17.joint_names,
                 flip_pairs=COCO17.flip_pairs, skeleton=COCO17.skeleton, input_size=(64, 48),
                 heatmap_size=(16, 12), color="rgb", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def tiny_graph(*, in_channels=3, out_channels=17, stride=4, in_dims=None, out_dims=None, extra=None,
               meta: ModelMeta | None = META) -> onnx.ModelProto:
    """input -> one strided Conv -> heatmaps, with the declared shapes given (to disagree with ``meta``)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((out_channels, in_channels, stride, stride)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["heatmaps"], strides=[stride, stride])]
    h, wd = 64, 48
    out_dims = out_dims or ["N", out_channels, h // stride, wd // stride]
    outputs = [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, out_dims)]
    if extra == "rank2":  # heatmaps averaged to N x joints
        nodes[0].output[0] = "maps"
        nodes.append(helper.make_node("ReduceMean", ["maps"], ["heatmaps"], axes=[2, 3], keepdims=0))
        outputs = [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, ["N", out_channels])]
    if extra == "two_outputs":
        nodes.append(helper.make_node("Identity", ["heatmaps"], ["copy"]))
        outputs.append(helper.make_tensor_value_info("copy", TensorProto.FLOAT, out_dims))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_dims or ["N", in_channels, h, wd])]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is not None:
        write_meta(model, meta)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line(res, *expect: str) -> str:
    """Exit 2, exactly one ``error:`` line holding every expected piece, no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    for piece in expect:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


# ---- fixtures: a tiny COCO set, good files, and broken ones --------------------------------------


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adv_models")


@pytest.fixture(scope="module")
def coco(d) -> Path:
    """Two images, three people: enough for eval, gate and quantize to get past their first checks."""
    root = d / "coco"
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 80, "height": 60} for i in (1, 2)]
    for i, image in enumerate(images):
        write_image(root / "val2017" / image["file_name"], seed=i)
    anns = [coco_ann(10, 1, [10.0, 5.0, 20.0, 40.0]), coco_ann(11, 2, [40.0, 10.0, 30.0, 40.0]),
            coco_ann(12, 2, [5.0, 5.0, 30.0, 50.0])]
    write_json(root / "annotations" / "person_keypoints_val2017.json",
               {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]})
    return root


@pytest.fixture(scope="module")
def good(d) -> Path:
    return save(tiny_graph(), d / "good.onnx")


@pytest.fixture(scope="module")
def weights(d) -> Path:
    path = d / "weights.pth"
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3), "conv.bias": torch.zeros(4)}, path)
    return path


BROKEN_ONNX = {
    # name: (make(d, good_bytes, checkpoint_bytes) -> bytes, what the line must say)
    "empty": (lambda g, c: b"", "is empty (0 bytes)"),
    "truncated": (lambda g, c: g[: len(g) // 2], "truncated or not an ONNX protobuf"),
    "cut_short": (lambda g, c: g[:40], "truncated or not an ONNX protobuf"),
    "random": (lambda g, c: bytes([0x12]) + np.random.default_rng(1).bytes(4096), "truncated or not an ONNX protobuf"),
    "text": (lambda g, c: b"hello, this is not a model\n", "truncated or not an ONNX protobuf"),
    "json": (lambda g, c: b'{"model": "pose"}', "JSON/text file"),
    "checkpoint": (lambda g, c: c, "PyTorch checkpoint"),
}


@pytest.fixture(scope="module")
def broken_onnx(d, good, weights) -> dict[str, Path]:
    out = {}
    for name, (make, _) in BROKEN_ONNX.items():
        path = d / "broken" / f"{name}.onnx"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(make(good.read_bytes(), weights.read_bytes()))
        out[name] = path
    return out


def onnx_commands(model: Path, good: Path, coco: Path, out: Path) -> dict[str, list]:
    return {
        "eval": ["eval", model, "--data", coco, "--no-flip"],
        "gate_float": ["gate", "--float", model, "--int8", good, "--data", coco],
        "gate_int8": ["gate", "--float", good, "--int8", model, "--data", coco],
        "bench": ["bench", model, "--backend", "ort", "--batch", "1", "--warmup", "0", "--runs", "1"],
        "quantize": ["quantize", model, "--calib", coco, "-o", out / "q.onnx"],
    }


@pytest.mark.parametrize("command", ["eval", "gate_float", "gate_int8", "bench", "quantize"])
@pytest.mark.parametrize("broken", list(BROKEN_ONNX))
def test_broken_onnx_files_give_one_line_naming_file_and_fault(broken_onnx, good, coco, tmp_path, command, broken):
    path = broken_onnx[broken]
    res = invoke(*onnx_commands(path, good, coco, tmp_path)[command])
    one_line(res, str(path), BROKEN_ONNX[broken][1])
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("broken", list(BROKEN_ONNX))
def test_broken_onnx_through_the_library(broken_onnx, broken):
    from posequant.benchmarks.latency import load_bench_model
    from posequant.calibration.quantize import _load

    path = broken_onnx[broken]
    for opener in (read_meta, lambda p: load_bench_model(p, p.parent), _load):
        with pytest.raises(PosequantError, match=BROKEN_ONNX[broken][1].replace("(", r"\(").replace(")", r"\)")):
            opener(path)


def test_directory_given_as_a_model(d, good, coco, tmp_path):
    folder = d / "folder.onnx"
    folder.mkdir(exist_ok=True)
    with pytest.raises(PosequantError, match=r"folder\.onnx is a directory"):
        read_meta(folder)
    for command, args in onnx_commands(folder, good, coco, tmp_path).items():
        res = invoke(*args)  # click's own check for dir_okay=False paths: a usage error, exit 2
        assert res.exit_code == 2 and "Traceback" not in res.output, (command, res.output)
        assert "folder.onnx" in res.output and "is a directory" in res.output, (command, res.output)


# ---- checkpoints -----------------------------------------------------------------------------


def _pickle_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


BROKEN_CKPT = {
    "empty.pth": (lambda good: b"", "is empty (0 bytes)"),
    "truncated.pth": (lambda good: good[: len(good) // 2], "truncated or corrupt"),
    "text.pth": (lambda good: b"epoch 3, loss 0.1\n", "is not a PyTorch checkpoint"),
    "random.pth": (lambda good: bytes([0x13]) + np.random.default_rng(2).bytes(2048), "is not a PyTorch checkpoint"),
    "a_list.pth": (lambda good: _pickle_bytes([1, 2, 3]), "holds a list, not model weights"),
    "no_weights.pth": (lambda good: _pickle_bytes({"epoch": 3, "arch": "resnet"}), "a dict without model weights"),
    "model.onnx": (lambda good: None, "is an ONNX model already"),
}


@pytest.fixture(scope="module")
def broken_ckpt(d, small_checkpoints, good) -> dict[str, Path]:
    real = small_checkpoints["pose_resnet"].read_bytes()
    out = {}
    for name, (make, _) in BROKEN_CKPT.items():
        path = d / "ckpt" / name
        path.parent.mkdir(exist_ok=True)
        data = make(real)
        path.write_bytes(good.read_bytes() if data is None else data)
        out[name] = path
    return out


def ckpt_commands(ckpt: Path, coco: Path, out: Path) -> dict[str, list]:
    return {
        "inspect": ["inspect", ckpt],
        "export-pose": ["export-pose", ckpt, "-o", out / "m.onnx"],
        "eval": ["eval", ckpt, "--data", coco, "--no-flip"],
        "bench": ["bench", ckpt, "--backend", "ort", "--batch", "1", "--warmup", "0", "--runs", "1"],
        "pipeline": ["pipeline", ckpt, "--calib", coco, "--val", coco, "-o", out / "run"],
    }


@pytest.mark.parametrize("command", ["inspect", "export-pose", "eval", "bench", "pipeline"])
@pytest.mark.parametrize("broken", list(BROKEN_CKPT))
def test_broken_checkpoints_give_one_line(broken_ckpt, coco, tmp_path, command, broken):
    path = broken_ckpt[broken]
    args = ckpt_commands(path, coco, tmp_path)[command]
    if broken == "model.onnx" and command in ("eval", "bench", "export-pose", "pipeline"):
        pytest.skip("an .onnx MODEL is opened as ONNX by eval and bench, stamped by export-pose and pipeline")
    one_line(invoke(*args), str(path), BROKEN_CKPT[broken][1])
    assert not (tmp_path / "m.onnx").exists()


def test_directory_given_as_a_checkpoint(d):
    folder = d / "folder.pth"
    folder.mkdir(exist_ok=True)
    with pytest.raises(CheckpointError, match=r"folder\.pth is a directory"):
        load_checkpoint(folder)


# ---- numpy scalars in official training checkpoints --------------------------------------------


def _official(sd, perf) -> dict:
    """What Simple Baselines / HRNet ``save_checkpoint`` writes (``perf`` is a numpy scalar there)."""
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    return {"epoch": 3, "model": "pose_resnet", "state_dict": sd, "best_state_dict": sd, "perf": perf,
            "optimizer": opt.state_dict()}


@pytest.mark.parametrize("perf", [np.float64(0.7), np.float32(0.7), np.int64(3)], ids=["float64", "float32", "int64"])
def test_official_checkpoint_with_numpy_scalar_loads_weights_only(tmp_path, perf):
    torch.manual_seed(0)
    sd = {"conv1.weight": torch.randn(8, 3, 3, 3), "bn1.weight": torch.rand(8), "bn1.running_mean": torch.randn(8),
          "bn1.num_batches_tracked": torch.tensor(7)}
    path = tmp_path / "checkpoint.pth"
    torch.save(_official(sd, perf), path)
    ckpt = load_checkpoint(path)  # weights_only: no --trust-pickle needed
    assert ckpt.container == "state_dict['state_dict']" and set(ckpt.state_dict) == set(sd)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in sd.items())
    # a context, not a process-wide allowance: plain weights-only loads still refuse numpy scalars
    assert not any("scalar" in str(g) for g in torch.serialization.get_safe_globals())
    with pytest.raises(Exception, match="scalar"):
        torch.load(path, weights_only=True)


def test_numpy1_checkpoint_loads_weights_only(tmp_path):
    """numpy 1 pickled the scalar as ``numpy.core.multiarray.scalar`` (numpy 2: ``numpy._core``)."""
    sd = {"a.weight": torch.ones(2, 2), "a.bias": torch.zeros(2)}
    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": sd, "perf": np.float64(0.5)}, legacy, _use_new_zipfile_serialization=False)
    raw = legacy.read_bytes()
    if b"numpy._core.multiarray" in raw:  # written by numpy 2: rename it as numpy 1 had it
        legacy.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray\nscalar" in legacy.read_bytes()
    assert set(load_checkpoint(legacy).state_dict) == set(sd)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_other_globals_are_still_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"a.weight": torch.ones(2)}, "perf": np.float64(0.7), "x": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match=r"global \S*system.*--trust-pickle"):  # posix.system / nt.system
        load_checkpoint(path)
    assert not marker.exists()
    res = invoke("inspect", path)
    one_line(res, str(path), "system", "--trust-pickle")
    assert not marker.exists()


def test_numpy_arrays_load_but_object_arrays_do_not(tmp_path):
    """mmengine saves numpy arrays in 'meta': plain arrays rebuild from bytes; an object array's items
    would need their own globals, which stay refused."""
    sd = {"a.weight": torch.ones(2)}
    plain = tmp_path / "arrays.pth"
    torch.save({"state_dict": sd, "meta": {"sigmas": np.arange(3.0)}}, plain)
    assert load_checkpoint(plain).state_dict.keys() == sd.keys()
    marker = tmp_path / "pwned"
    objects = tmp_path / "objects.pth"
    torch.save({"state_dict": sd, "meta": np.array([_Evil(marker)], dtype=object)}, objects)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(objects)
    assert not marker.exists()


# ---- graphs that disagree with their metadata ----------------------------------------------------


WRONG_GRAPHS = {
    "rank2_output": (dict(extra="rank2"), "output 'heatmaps' is Nx17, but its metadata expects Nx17x16x12"),
    "10_channels": (dict(out_channels=10), "output 'heatmaps' is Nx10x16x12, but its metadata expects Nx17x16x12"),
    "two_outputs": (dict(extra="two_outputs"), "has 2 outputs (heatmaps, copy)"),
    "1_channel_input": (dict(in_channels=1), "input 'input' is Nx1x64x48, but its metadata expects Nx3x64x48"),
    "nhwc_input": (dict(in_dims=["N", 64, 48, 3]), "input 'input' is Nx64x48x3"),
    "heatmap_size": (dict(stride=2), "output 'heatmaps' is Nx17x32x24, but its metadata expects Nx17x16x12"),
}


@pytest.fixture(scope="module")
def wrong_graphs(d) -> dict[str, Path]:
    out = {}
    for name, (kwargs, _) in WRONG_GRAPHS.items():
        model = tiny_graph(**kwargs)
        out[name] = save(model, d / f"{name}.onnx")
    return out


@pytest.mark.parametrize("command", ["eval", "gate_float", "bench", "quantize"])
@pytest.mark.parametrize("wrong", list(WRONG_GRAPHS))
def test_graph_that_disagrees_with_metadata_is_refused(wrong_graphs, good, coco, tmp_path, command, wrong):
    path = wrong_graphs[wrong]
    res = invoke(*onnx_commands(path, good, coco, tmp_path)[command])
    one_line(res, str(path), WRONG_GRAPHS[wrong][1])
    assert not (tmp_path / "q.onnx").exists()


def test_symbolic_output_checked_on_first_inference(d, coco):
    """Dims the graph leaves symbolic cannot be checked at open: eval checks what comes back."""
    path = save(tiny_graph(out_channels=10, out_dims=["N", "C", "h", "w"]), d / "symbolic.onnx")
    read_meta(path)  # nothing static to disagree with
    res = invoke("eval", path, "--data", coco, "--no-flip")
    one_line(res, str(path), "returned 3x10x16x12", "expects N x 17 x h x w heatmaps")


def test_good_tiny_graph_evaluates(good, coco):
    """The control: the same tiny graph with matching shapes gets through eval."""
    res = invoke("eval", good, "--data", coco, "--no-flip")
    assert res.exit_code == 0, res.output


def test_quantize_without_metadata_checks_the_input_too(d, coco, tmp_path):
    path = save(tiny_graph(in_channels=1, meta=None), d / "nometa_1ch.onnx")
    res = invoke("quantize", path, "--calib", coco, "--input-size", "64x48", "--keypoints", "coco",
                 "--color", "rgb", "-o", tmp_path / "q.onnx")
    one_line(res, str(path), "Nx1x64x48", "Nx3x64x48")
    assert not (tmp_path / "q.onnx").exists()


# ---- damaged metadata, key by key ------------------------------------------------------------------


DAMAGED = [
    ("input_size", "banana"), ("input_size", "0x48"), ("heatmap_size", "16"), ("joint_names", "not json"),
    ("joint_names", "[]"), ("joint_names", "[1, 2]"), ("num_joints", "15"), ("num_joints", "many"),
    ("flip_pairs", "[[1, 99]]"), ("flip_pairs", "[[1]]"), ("flip_pairs", "[[1, 2], [2, 3]]"),
    ("flip_pairs", "[[4, 4]]"), ("skeleton", '[["a", "b"]]'), ("mean", "[0.5, 0.5]"),
    ("mean", "[NaN, 0.5, 0.5]"), ("std", "[0.2, 0, 0.2]"), ("std", '"wide"'), ("color", "gray"),
    ("keypoints", ""), ("family", " "), ("arch_config", "[1, 2]"), ("color", None), ("mean", None),
]


@pytest.mark.parametrize("key,value", DAMAGED, ids=[f"{k}={v}" for k, v in DAMAGED])
def test_damaged_metadata_names_file_and_key(d, key, value):
    model = tiny_graph()
    props = {p.key: p.value for p in model.metadata_props}
    if value is None:
        del props[key]
    else:
        props[key] = value
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    path = save(model, d / f"damaged_{key}_{abs(hash(value)) % 1000}.onnx")
    with pytest.raises(MetadataError) as err:
        read_meta(path)
    line = str(err.value)
    assert "\n" not in line and str(path) in line and f"key {key!r}" in line, line
    assert ("is missing" if value is None else "is damaged") in line
    assert "posequant export-pose" in line


def test_damaged_metadata_through_the_cli(d, coco):
    model = tiny_graph()
    for p in model.metadata_props:
        if p.key == "input_size":
            p.value = "banana"
    path = save(model, d / "banana.onnx")
    one_line(invoke("eval", path, "--data", coco), str(path), "key 'input_size'", "'banana'", "HxW")


# ---- input sizes the stride does not divide ------------------------------------------------------


@pytest.fixture(scope="module")
def nets() -> dict[str, torch.nn.Module]:
    return {f: LastHeatmaps(small_model(f)).eval() for f in ("pose_resnet", "hourglass", "pose_hrnet")}


@pytest.mark.parametrize("family,size,expect", [
    ("pose_resnet", (66, 64), r"--input-size 66x64 does not fit the network: its heatmaps come out 24x16.*"
                              r"stride 4 and takes multiples of 32: use 64x64 or 96x64$"),
    ("pose_resnet", (1, 1), r"--input-size 1x1 .*stride 4 and takes multiples of 32: use 32x32$"),
    ("hourglass", (96, 96), r"--input-size 96x96: the model cannot run at this size \(RuntimeError: .*\); "
                            r"the network has stride 4 and takes multiples of 64: use 64x64 or 128x128$"),
    ("pose_hrnet", (64, 40), r"--input-size 64x40: the model cannot run.*multiples of 32: use 64x32 or 64x64$"),
])
def test_input_size_the_stride_does_not_divide(nets, family, size, expect):
    with pytest.raises(ExportError, match=expect) as err:
        fit_input_size(nets[family], size)
    if family == "pose_hrnet":
        return  # the slowest of the three to probe (seconds on a busy CI machine): the others check the advice
    # every size it suggests does fit, at the stride it names
    suggested = str(err.value).rsplit("use ", 1)[1].split(" or ")
    for text in suggested:
        h, w = (int(v) for v in text.split("x"))
        joints, heatmap = fit_input_size(nets[family], (h, w))
        assert heatmap == (h // 4, w // 4)


def test_export_refuses_a_size_the_stride_does_not_divide(small_checkpoints, tmp_path):
    out = tmp_path / "m.onnx"
    res = invoke("export-pose", small_checkpoints["pose_resnet"], "-o", out, "--input-size", "66x64")
    one_line(res, "--input-size 66x64 does not fit", "use 64x64 or 96x64")
    assert not out.exists()


@pytest.mark.parametrize("size,expect", [("0x0", "must be positive"), ("-4x8", "must be positive"),
                                         ("100000x100000", "too large"), ("banana", "HxW")])
@pytest.mark.parametrize("command", ["export-pose", "eval", "bench", "pipeline"])
def test_absurd_input_sizes_refused_before_any_work(small_checkpoints, coco, tmp_path, command, size, expect):
    args = ckpt_commands(small_checkpoints["pose_resnet"], coco, tmp_path)[command]
    res = invoke(*args, f"--input-size={size}")
    assert res.exit_code == 2 and "Traceback" not in res.output and expect in res.output, res.output
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "run").exists()


def test_absurd_input_size_through_the_library(small_checkpoints, tmp_path):
    with pytest.raises(PosequantError, match="input_size: size 100000x100000 is too large"):
        export_pose(small_checkpoints["pose_resnet"], tmp_path / "m.onnx", input_size=(100000, 100000))


# ---- onnxsim's keys ------------------------------------------------------------------------------


def test_onnxsim_keys_dropped_and_earlier_keys_kept():
    import onnxsim

    model = tiny_graph(meta=None)
    model.metadata_props.add(key="author", value="someone")
    raw, _ = onnxsim.simplify(model)
    assert sum(p.key.startswith("onnxsim.") for p in raw.metadata_props) > 5  # what we clean up
    model.metadata_props.add(key="onnxsim.note", value="the user's own")
    simplified = simplify_onnx(model)
    assert [(p.key, p.value) for p in simplified.metadata_props] == [("author", "someone"),
                                                                     ("onnxsim.note", "the user's own")]


def test_exported_model_carries_only_our_keys(small_checkpoints, tmp_path):
    res = export_pose(small_checkpoints["hourglass"], tmp_path / "h.onnx", input_size=(64, 64), verify_model=False)
    keys = {p.key for p in onnx.load(str(res.output), load_external_data=False).metadata_props}
    assert keys == set(res.meta.to_props())


def test_graph_onnx_runtime_cannot_load_is_one_line(d, coco):
    """Parses, has the right shapes and metadata, but holds an op no runtime knows."""
    model = tiny_graph()
    model.graph.node[0].op_type = "NoSuchOp"
    path = save(model, d / "unknown_op.onnx")
    one_line(invoke("eval", path, "--data", coco, "--no-flip"), str(path), "ONNX Runtime cannot load this graph")


# ---- a model is all of its files (issue 22): external data, an IR's .bin, an engine's .json --------------


@pytest.fixture(scope="module")
def external(d) -> Path:
    """The tiny model keeping its weights in w.bin beside it, as ``save_as_external_data`` (and every model over
    2 GiB) does."""
    folder = d / "external"
    folder.mkdir()
    onnx.save(tiny_graph(), str(folder / "w.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    return folder / "w.onnx"


def digest(path: Path) -> bytes:
    import hashlib

    return hashlib.sha256(path.read_bytes()).digest()


# every output option that can land on the weights file, with the command's other arguments
ONTO_WEIGHTS = {
    "convert (default -o)": ["convert", "{m}", "--to", "openvino"],
    "convert fp16": ["convert", "{m}", "--to", "openvino", "--compress-weights", "fp16"],
    "convert -o": ["convert", "{m}", "--to", "openvino", "-o", "{w:.xml}"],
    "export-pose -o": ["export-pose", "{m}", "-o", "{w}"],
    "export-pose --json": ["export-pose", "{m}", "-o", "{t}/s.onnx", "--json", "{w}"],
    "quantize -o": ["quantize", "{m}", "--calib", "{coco}", "-o", "{w}"],
    "quantize --json": ["quantize", "{m}", "--calib", "{coco}", "-o", "{t}/q.onnx", "--json", "{w}"],
    "quantize --report": ["quantize", "{m}", "--calib", "{coco}", "-o", "{t}/q.onnx", "--report", "{w}"],
    "eval --json": ["eval", "{m}", "--data", "{coco}", "--json", "{w}"],
    "bench --json": ["bench", "{m}", "--json", "{w}"],
    "gate --json": ["gate", "--float", "{m}", "--int8", "{m}", "--data", "{coco}", "--json", "{w}"],
}


@pytest.mark.parametrize("case", list(ONTO_WEIGHTS))
def test_outputs_onto_a_models_external_weights_are_refused(external, coco, tmp_path, case):
    weights, before = external.with_name("w.bin"), digest(external.with_name("w.bin"))
    args = [a.format(m=external, w=weights, t=tmp_path, coco=coco) if a != "{w:.xml}" else weights.with_suffix(".xml")
            for a in ONTO_WEIGHTS[case]]
    one_line(invoke(*args), "w.bin", "is the input", "(external data)", "destroy the input")
    assert digest(weights) == before and sorted(p.name for p in external.parent.iterdir()) == ["w.bin", "w.onnx"]


def test_a_model_is_all_of_its_files_for_the_library_too(external, coco, tmp_path):
    from posequant.calibration.quantize import quantize
    from posequant.core.fileio import check_outputs

    weights, before = external.with_name("w.bin"), digest(external.with_name("w.bin"))
    for call in (lambda: quantize(external, coco, output=weights), lambda: export_pose(external, weights)):
        with pytest.raises(PosequantError, match="external data"):
            call()
    assert digest(weights) == before
    # the siblings: an IR's weights, an engine's metadata
    for model, side in (("m.xml", "m.bin"), ("m.engine", "m.engine.json")):
        for name in (model, side):
            (tmp_path / name).write_bytes(b"x")
        with pytest.raises(PosequantError, match=rf"is the input MODEL \(\.(bin|json)\)"):
            check_outputs({"--json": tmp_path / side}, {"MODEL": tmp_path / model})


def test_external_weights_are_found_from_any_folder_and_stamps_hold_them(external, coco, tmp_path, monkeypatch):
    """Paths resolve against the model's folder, not the current one; a stamp is one self-contained file."""
    from posequant.core.modelfiles import external_files

    monkeypatch.chdir(tmp_path)
    ref = onnx.load(str(external))  # the weights read in by onnx itself
    for extra in ([], ["--no-simplify"]):
        out = tmp_path / f"stamped{len(extra)}.onnx"
        res = invoke("export-pose", external, "--keypoints", "coco", "--color", "rgb", "-o", out, *extra)
        assert res.exit_code == 0, res.output
        stamped = onnx.load(str(out), load_external_data=False)
        assert external_files(out) == []
        assert all(t.data_location == TensorProto.DEFAULT for t in stamped.graph.initializer)
        x = np.random.default_rng(0).standard_normal((1, 3, 64, 48)).astype(np.float32)
        import onnxruntime as ort

        a, b = (ort.InferenceSession(m.SerializeToString()).run(None, {"input": x})[0] for m in (ref, stamped))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for args in (["eval", external, "--data", coco, "--no-flip"], ["convert", external, "--to", "openvino", "-o",
                                                                    tmp_path / "ir"]):
        assert invoke(*args).exit_code == 0


def test_missing_external_weights_are_one_line(external, coco, tmp_path):
    alone = tmp_path / "w.onnx"
    alone.write_bytes(external.read_bytes())  # the weights stayed behind
    for args in (["eval", alone, "--data", coco], ["bench", alone], ["quantize", alone, "--calib", coco],
                 ["convert", alone, "--to", "openvino"],
                 ["export-pose", alone, "--keypoints", "coco", "--color", "rgb"]):
        one_line(invoke(*args), str(alone), "w.bin (external data), which is not there")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.onnx"]


def test_the_source_hash_covers_external_weights(d, tmp_path):
    """Two models with the same graph file and other weights are other sources (the gate pairs models by it)."""
    hashes = set()
    for seed in (0, 1):
        model = tiny_graph(meta=None)
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(
            np.random.default_rng(seed).standard_normal((17, 3, 4, 4)).astype(np.float32), "w"))
        folder = tmp_path / str(seed)
        folder.mkdir()
        onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, location="m.bin", size_threshold=0)
        hashes.add(export_pose(folder / "m.onnx", tmp_path / f"s{seed}.onnx", keypoints="coco", color="rgb",
                               verify_model=False).meta.source_sha256)
    assert len(hashes) == 2


# ---- old opsets (issue 22) ----------------------------------------------------------------------------------


def at_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The same graph declared at another opset (one Conv: valid from opset 1 to the newest)."""
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", opset))
    return model


@pytest.mark.parametrize("engine", ["nncf", "ort"])
def test_quantize_converts_an_old_opset_and_says_so(d, coco, tmp_path, engine):
    """Per-channel DequantizeLinear (``axis``) is opset 13's: an opset-11 graph is converted first, never written
    as an INT8 file that opset 11 does not allow."""
    from posequant.core.onnxfile import opset_of

    src = save(at_opset(tiny_graph(), 11), d / f"op11_{engine}.onnx")
    out = tmp_path / "q.onnx"
    res = invoke("quantize", src, "--calib", coco, "-o", out, "--engine", engine, "--cpu", "vnni",
                 "--num-samples", 3, "--json", tmp_path / "q.json")
    assert res.exit_code == 0, res.output
    assert "is opset 11; INT8 (QDQ) needs opset 13" in res.output and "heatmaps identical" in res.output
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    assert opset_of(q) == 13 and opset_of(onnx.load(str(src))) == 11
    import json

    assert json.loads((tmp_path / "q.json").read_text())["settings"]["opset"] == {"input": 11, "quantized": 13}
    assert invoke("eval", out, "--data", coco, "--no-flip").exit_code == 0


def test_stamp_opset_converts_or_is_refused_never_ignored(d, tmp_path):
    from posequant.core.onnxfile import opset_of

    old = save(at_opset(tiny_graph(meta=None), 11), d / "third_party_op11.onnx")
    stamp = ["export-pose", old, "--keypoints", "coco", "--color", "rgb"]
    assert invoke(*stamp, "-o", tmp_path / "kept.onnx").exit_code == 0  # no --opset: the file's own
    assert opset_of(onnx.load(str(tmp_path / "kept.onnx"))) == 11
    res = invoke(*stamp, "-o", tmp_path / "17.onnx", "--opset", 17)
    assert res.exit_code == 0 and "from opset 11 to 17" in res.output and "PASS" in res.output, res.output
    assert opset_of(onnx.load(str(tmp_path / "17.onnx"))) == 17
    new = save(at_opset(tiny_graph(meta=None), 18), d / "third_party_op18.onnx")
    one_line(invoke("export-pose", new, "--keypoints", "coco", "--color", "rgb", "--opset", 17, "-o",
                    tmp_path / "down.onnx"), "--opset 17", "is opset 18 already", "not converted down")
    one_line(invoke(*stamp, "--opset", 12, "-o", tmp_path / "12.onnx"), "--opset 12 is too old")
    one_line(invoke(*stamp, "--opset", 999, "-o", tmp_path / "999.onnx"), "--opset 999 is newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["17.onnx", "kept.onnx"]


# ---- stamps get the stride check checkpoints get (issue 22) ------------------------------------------------


def rounding_graph(dims=("N", 3, "H", "W")) -> onnx.ModelProto:
    """A stride-8 convolution then a 2x deconvolution: stride 4 where 8 divides the input, other sizes round up
    (68x48 gives 18x12 heatmaps), as backbones with stride 32 do."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 17, 4, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["input", "w1"], ["f"], strides=[8, 8], pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["f", "w2"], ["heatmaps"], strides=[2, 2], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "rounding", [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, ["N", 17, "h", "w"])],
                              [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_stamp_at_a_size_the_stride_does_not_divide_is_refused(d, tmp_path):
    src = save(rounding_graph(), d / "rounding.onnx")
    stamp = ["export-pose", src, "--keypoints", "coco", "--color", "rgb", "-o", tmp_path / "s.onnx"]
    line = one_line(invoke(*stamp, "--input-size", "68x48"), "--input-size 68x48 does not fit", "come out 18x12")
    assert line.endswith("stride 4 and takes multiples of 8: use 64x48 or 72x48"), line
    assert not (tmp_path / "s.onnx").exists()
    for size in ("64x48", "72x48"):  # what it suggests does fit
        assert invoke(*stamp, "--input-size", size).exit_code == 0
    fixed = save(rounding_graph((1, 3, 68, 48)), d / "rounding_fixed.onnx")
    one_line(invoke("export-pose", fixed, "--keypoints", "coco", "--color", "rgb", "-o", tmp_path / "f.onnx"),
             "takes 68x48 inputs (fixed in the graph) but its heatmaps come out 18x12")


@needs_shared(TRAINED_ONNX)
def test_the_trained_model_with_dynamic_sizes_refuses_264x200(tmp_path):
    """The issue's case: stamped at 264x200 it gave 72x56 heatmaps and AP 0.029 instead of 0.519."""
    model = onnx.load(str(TRAINED_ONNX))
    for value in (model.graph.input[0], model.graph.output[0]):
        for i in (0, 2, 3):  # N x C x H x W: all but the channels dynamic
            value.type.tensor_type.shape.dim[i].dim_param = "NCHW"[i]
    src = save(model, tmp_path / "dynamic.onnx")
    line = one_line(invoke("export-pose", src, "--keypoints", "coco", "--color", "rgb", "--input-size", "264x200",
                           "-o", tmp_path / "s.onnx"), "come out 72x56")
    assert line.endswith("stride 4 and takes multiples of 32: use 256x192 or 288x224"), line


# ---- messages (issue 22): each says what is wrong, once, and what to do -------------------------------------


def test_overlapping_flip_pairs_are_refused_where_metadata_is_written():
    """Read back they are refused (DAMAGED above); a stage never writes them either (was: AP 0.281 -> 0.173)."""
    for pairs, why in ((((1, 2), (2, 3)), "joint 2 is in two pairs"), (((4, 4),), "joint 4 is paired with itself")):
        model = tiny_graph(meta=None)
        with pytest.raises(MetadataError, match=rf"key 'flip_pairs' is damaged .*{why}.*check the export's options"):
            write_meta(model, META.with_(flip_pairs=pairs))
        assert not model.metadata_props


def test_a_zero_std_in_an_mmpose_data_preprocessor_is_refused_at_export(tmp_path):
    """Was: exported, then called "damaged metadata - re-export" by every stage (and re-exporting repeats it)."""
    from test_mmpose import SMALL_RES, small

    sd = dict(small(SMALL_RES).state_dict())
    sd["data_preprocessor.mean"] = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    sd["data_preprocessor.std"] = torch.tensor([58.395, 0.0, 57.375]).view(3, 1, 1)
    ckpt = tmp_path / "td-hm_res18.pth"
    torch.save({"state_dict": sd}, ckpt)
    one_line(invoke("export-pose", ckpt, "-o", tmp_path / "m.onnx", "--input-size", "64x64"),
             "data_preprocessor.std holds [58.395, 0, 57.375], a std that is not positive", "--mean/--std")
    assert not (tmp_path / "m.onnx").exists()


def test_a_failed_verification_names_what_failed():
    """Was: the case with the largest relative difference, even when that was inside the tolerance and another
    case failed on its argmax."""
    from posequant.exporter.verify import CaseResult, VerifyReport

    close = CaseResult("random inputs (seed 0)", 2, 1e-6, 1.0, (1.0,), 0)
    peaks = CaseResult("coco val crops", 8, 5e-5, 1.0, (0.9,), 1)
    far = CaseResult("coco val crops", 8, 0.5, 1.0, (1.0,), 0)
    assert VerifyReport([close, peaks], 1e-4).failure() == ("1 joint(s) peak elsewhere on coco val crops, with a "
                                                            "relative difference of 5e-05 (within 0.0001)")
    assert VerifyReport([far, close], 1e-4).failure().endswith("relative 0.5 > 0.0001 on coco val crops")
    nan = CaseResult("random inputs (seed 0)", 2, float("nan"), 1.0, (1.0,), 0)
    assert VerifyReport([nan], 1e-4).failure() == "NaN or inf in the output on random inputs (seed 0)"
    assert VerifyReport([close], 1e-4).failure() == ""


def nan_graph() -> onnx.ModelProto:
    """Finite weights, NaN heatmaps: 0 / 0 after the convolution."""
    model = tiny_graph(meta=None)
    model.graph.node[0].output[0] = "maps"
    model.graph.node.extend([helper.make_node("Sub", ["maps", "maps"], ["zero"]),
                             helper.make_node("Div", ["zero", "zero"], ["heatmaps"])])
    return model


@pytest.mark.parametrize("how", ["nan weights", "nan output"])
def test_a_broken_model_is_refused_once_without_retry_advice(d, tmp_path, how):
    """Was: "retry with --no-simplify", and with --no-simplify the same advice again."""
    if how == "nan weights":
        model = tiny_graph(meta=None)
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full((17, 3, 4, 4), np.nan, np.float32), "w"))
        expect = "tensor 'w' holds 816 NaN or inf value(s) of 816"
    else:
        model, expect = nan_graph(), "returns NaN or inf heatmaps for an input of zeros"
    src = save(model, d / f"{how.replace(' ', '_')}.onnx")
    for extra in ([], ["--no-simplify"]):
        line = one_line(invoke("export-pose", src, "--keypoints", "coco", "--color", "rgb", "-o", tmp_path / "s.onnx",
                               *extra), expect)
        assert "--no-simplify" not in line
    assert not (tmp_path / "s.onnx").exists()


def test_keypoints_advice_does_not_contradict_itself(d, tmp_path):
    """A stamp needs --keypoints or --joints: a 14-channel model is told the sets there are, not to leave
    --keypoints out (which the stamp then asks for)."""
    src = save(tiny_graph(out_channels=14, meta=None), d / "fourteen.onnx")
    line = one_line(invoke("export-pose", src, "--keypoints", "coco", "--color", "rgb", "-o", tmp_path / "s.onnx"),
                    "--keypoints coco has 17 joints but the model outputs 14 heatmaps", "not supported yet")
    assert "leave --keypoints out" not in line


def run_cli(*args, stdout=None, preexec=None) -> subprocess.CompletedProcess:
    code = "import sys; from posequant.cli import main; main(sys.argv[1:], prog_name='posequant')"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, preexec_fn=preexec, timeout=300)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["inspect", "{ckpt}"], ["inspect", "{ckpt}", "--json", "-"], ["--help"]],
                         ids=["summary", "json", "help"])
def test_standard_output_on_a_full_device_is_one_line(small_checkpoints, args):
    with open("/dev/full", "w") as full:
        res = run_cli(*[a.format(ckpt=small_checkpoints["hourglass"]) for a in args], stdout=full)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1] == ("error: cannot write to standard output: No space left on device; "
                                           "redirect it elsewhere"), res.stderr


def test_convert_on_a_full_disk_names_the_reason(good, tmp_path):
    """OpenVINO's writer says "basic_ios::clear: iostream error"; the OS's reason is what the user needs. A file
    size limit (RLIMIT_FSIZE) makes its real writes fail, as a full disk does, without mocking anything."""
    import resource
    import signal

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    out = tmp_path / "out"
    out.mkdir()
    res = run_cli("convert", good, "--to", "openvino", "-o", out / "m.xml", preexec=small_files)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip() == (f"error: cannot write -o {out / 'm.xml'}: {os.strerror(errno.EFBIG)}; nothing was "
                                  "written there (free space or choose another -o)"), res.stderr
    assert list(out.iterdir()) == []
