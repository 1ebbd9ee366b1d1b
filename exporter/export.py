"""``export_pose``: checkpoint -> simplified, verified, self-describing ONNX file."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Callable

import onnx
import torch

from posequant.core.args import Size, Whole, checked
from posequant.core.errors import ExportError, PosequantError, VerificationError
from posequant.core.fileio import arch_file, atomic_path, check_outputs
from posequant.core.keypoints import keypoint_set_for
from posequant.core.metadata import ModelMeta, format_size, write_meta
from posequant.core.numbers import check_number, normalisation
from posequant.core.onnxfile import PROTOBUF_LIMIT
from posequant.core.quiet import ort_session, quiet
from posequant.core.version import __version__

from .checkpoint import load_checkpoint
from .common import (
    MIN_OPSET,
    ExportResult,
    _data_cases,
    check_opset,
    default_output,
    simplify_onnx,
    size_advice,
    stride_of,
)
from .model import resolve_model
from .verify import random_inputs, verify

SIMCC_OUTPUTS = ("simcc_x", "simcc_y")  # a SimCC checkpoint's output names, x first
DEFAULT_INPUT_SIZE = {16: (256, 256), 17: (256, 192)}  # MPII and COCO configs of the official repos


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _forward(module: torch.nn.Module, input_size: tuple[int, int]):
    with torch.inference_mode():
        return module(torch.zeros(1, 3, *input_size))


def probe_output(module: torch.nn.Module, input_size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """Joint count and heatmap size, by running the model once."""
    try:
        out = _forward(module, input_size)
    except Exception as e:
        raise ExportError(f"the model failed on a 1x3x{input_size[0]}x{input_size[1]} input ({_why(e)}); "
                          "check --input-size") from None
    return _heatmap_shape(out)


def _heatmap_shape(out) -> tuple[int, tuple[int, int]]:
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExportError(f"the model returns {shape}, not N x joints x H x W heatmaps")
    return out.shape[1], (out.shape[2], out.shape[3])


def _try_size(module: torch.nn.Module, size: tuple[int, int]) -> tuple[int, tuple[int, int]] | None:
    try:
        out = _forward(module, size)
    except Exception:  # any failure of the network at this size: not a size it fits
        return None
    return _heatmap_shape(out)


def fit_input_size(module: torch.nn.Module, size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """Joint count and heatmap size at ``size``, refusing a size the network's stride does not divide.

    At such a size the heatmaps are not input/stride (e.g. 72x56 for 260x200 at stride 4, as the
    backbone rounds up), so every decoded joint is misplaced and the model scores near zero.
    """
    h, w = size
    joints, heatmap, failure = 0, (0, 0), None
    try:
        out = _forward(module, size)
    except Exception as e:
        failure = _why(e)
    else:
        joints, heatmap = _heatmap_shape(out)  # the wrong kind of output is refused whatever the size
    if failure is None and stride_of(size, heatmap):
        return joints, heatmap
    advice = size_advice(lambda c: (_try_size(module, c) or (0, None))[1], size)
    if failure is not None:
        raise ExportError(f"--input-size {h}x{w}: the model cannot run at this size ({failure}); {advice}")
    raise ExportError(f"--input-size {h}x{w} does not fit the network: its heatmaps come out {format_size(heatmap)}, "
                      f"not the input divided by a whole stride (decoded joints would be misplaced); {advice}")


def simcc_shape(pose, input_size: tuple[int, int] | None) -> tuple[tuple[int, int], int, tuple[int, int]]:
    """(input size, joints, (Ly, Lx)) of a SimCC model: its head's Linear layers fix the input size."""
    size = tuple(pose.input_size)
    if input_size is not None and tuple(input_size) != size:
        raise PosequantError(f"--input-size {format_size(tuple(input_size))}: this {pose.name} model's head is built "
                             f"for {format_size(size)} inputs (its Linear layers fix the size): leave --input-size out")
    try:
        x, y = _forward(pose.module, size)
    except Exception as e:
        raise ExportError(f"the model failed on a 1x3x{size[0]}x{size[1]} input ({_why(e)})") from None
    return size, x.shape[1], (y.shape[2], x.shape[2])


def _to_onnx(module: torch.nn.Module, input_size: tuple[int, int], opset: int, batch: int | None,
             outputs: tuple[str, ...] = ("heatmaps",)) -> onnx.ModelProto:
    dummy = torch.randn(batch or 1, 3, *input_size)
    buf = io.BytesIO()
    dynamic = None if batch else {name: {0: "batch"} for name in ("input", *outputs)}
    with quiet():  # the TorchScript exporter's deprecation notes and prints are not for users (--verbose)
        try:
            torch.onnx.export(module, (dummy,), buf, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=list(outputs),
                              dynamic_axes=dynamic, do_constant_folding=True)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return onnx.load_from_string(buf.getvalue())


def _ort_session(model_bytes: bytes):
    return ort_session(model_bytes)


@checked(input_size=Size(), batch=Whole(1, optional=True), data_samples=Whole(1), opset=Whole(1, optional=True))
def export_pose(
    checkpoint: str | Path,
    output: str | Path | None = None,
    *,
    arch: str | None = None,
    input_size: tuple[int, int] | None = None,
    keypoints: str | None = None,
    color: str | None = None,
    mean=None,
    std=None,
    opset: int | None = None,
    batch: int | None = None,
    simplify: bool = True,
    trust_pickle: bool = False,
    verify_model: bool = True,
    data: str | Path | None = None,
    data_samples: int = 8,
    rtol: float = 1e-4,
    joints: str | None = None,
    simcc_outputs: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a pose checkpoint to one self-contained ONNX file with posequant metadata.

    ``batch=None`` exports a dynamic batch dimension; ``opset=None`` exports opset 17 (an ONNX input keeps its own
    opset unless ``opset`` is given, and is then converted). Input normalisation defaults to what the
    family's own training code did; ``color``/``mean``/``std`` override it. A ``.onnx`` file is a
    third-party model: it is stamped instead (:func:`posequant.exporter.onnx_in.stamp_onnx`). Raises
    :class:`VerificationError` (and writes nothing) when ONNX Runtime disagrees with PyTorch.
    """
    say = progress or (lambda msg: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    checkpoint = Path(checkpoint)
    if checkpoint.suffix.lower() == ".onnx":  # a third-party model: stamp it (exporter/onnx_in.py)
        from .onnx_in import stamp_onnx

        given = [flag for flag, value in (("--arch", arch), ("--batch", batch), ("--trust-pickle", trust_pickle))
                 if value]
        if given:
            raise PosequantError(f"{', '.join(given)} apply to checkpoints; {checkpoint} is ONNX, which keeps its own "
                                 "graph and batch: leave them out")
        return stamp_onnx(checkpoint, output, input_size=input_size, keypoints=keypoints, joints=joints, color=color,
                          mean=mean, std=std, opset=opset, simplify=simplify, verify_model=verify_model, data=data,
                          data_samples=data_samples, rtol=rtol, simcc_outputs=simcc_outputs, progress=progress)
    if joints:
        raise PosequantError("--joints names a third-party ONNX model's channels; a checkpoint of our families "
                             "outputs its keypoint set's order: leave --joints out")
    if simcc_outputs:
        raise PosequantError("--simcc-outputs names a third-party SimCC ONNX model's outputs; a checkpoint is "
                             "exported with outputs simcc_x and simcc_y: leave --simcc-outputs out")
    opset = check_opset(opset) or MIN_OPSET
    if color is not None and color.lower() not in ("rgb", "bgr"):
        raise PosequantError(f"--color must be rgb or bgr, got {color!r}")
    output = Path(output) if output else default_output(checkpoint)
    # before minutes of work, not after; never onto the checkpoint, the --arch file or the data
    check_outputs({"-o": output}, {"CHECKPOINT": checkpoint, "--arch": arch_file(arch), "--data": data})
    mean, std = normalisation(mean, "mean"), normalisation(std, "std")
    rtol = check_number("--rtol", rtol, above=True)  # NaN would pass every comparison

    say(f"loading {checkpoint}")
    ckpt = load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    pose = resolve_model(ckpt, arch)
    timings["load_s"] = time.perf_counter() - t0

    joints = pose.num_joints
    outputs: tuple[str, ...] = ()
    if pose.head == "simcc":  # RTMPose: outputs simcc_x, simcc_y (posequant.core.decoding)
        size, out_joints, heatmap_size = simcc_shape(pose, input_size)
        outputs = SIMCC_OUTPUTS
    else:
        if joints is None and not (input_size or pose.input_size):
            joints, _ = probe_output(pose.module, (256, 192))  # only to pick the default size
        size = tuple(input_size or pose.input_size or DEFAULT_INPUT_SIZE.get(joints, (256, 256)))
        out_joints, heatmap_size = fit_input_size(pose.module, size)
    kps = keypoint_set_for(out_joints, keypoints)
    meta = ModelMeta(
        family=pose.family, keypoints=kps.name, joint_names=kps.joint_names,
        flip_pairs=kps.flip_pairs, skeleton=kps.skeleton, input_size=size,
        heatmap_size=heatmap_size, color=(color or pose.color).lower(),
        mean=mean or pose.mean, std=std or pose.std,
        arch_config=json.loads(json.dumps(pose.arch_config)),  # as it will read back from the file
        source_checkpoint=checkpoint.name, source_sha256=ckpt.sha256,
        posequant_version=__version__, head=pose.head, simcc_split_ratio=pose.simcc_split_ratio, outputs=outputs,
    )

    say(f"exporting {pose.name} ({pose.num_parameters:,} parameters) at {size[0]}x{size[1]}, opset {opset}")
    t = time.perf_counter()
    model = _to_onnx(pose.module, size, opset, batch, outputs or ("heatmaps",))
    timings["export_s"] = time.perf_counter() - t
    if simplify:
        say("simplifying with onnxsim")
        t = time.perf_counter()
        model = simplify_onnx(model)
        timings["simplify_s"] = time.perf_counter() - t
    write_meta(model, meta)
    model.producer_name, model.producer_version = "posequant", __version__
    model.doc_string = f"{pose.name} pose model exported by posequant from {checkpoint.name}"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported model: {str(e).splitlines()[0]}") from None
    data_bytes = model.SerializeToString()
    if len(data_bytes) > PROTOBUF_LIMIT:
        raise ExportError("the model is over 2 GiB, which cannot be one self-contained .onnx file")

    report = None
    if verify_model:
        say("verifying against PyTorch with ONNX Runtime")
        t = time.perf_counter()
        cases = [("random inputs (seed 0)", random_inputs(size, samples=2 if batch is None else batch))]
        if data is not None:
            cases.append(_data_cases(data, meta, data_samples))
        report = verify(pose.module, _ort_session(data_bytes), cases, batch=batch, rtol=rtol)
        timings["verify_s"] = time.perf_counter() - t
        if not report.passed:
            tries = ("--no-simplify, " if simplify else "") + "another --opset"
            raise VerificationError(f"the ONNX model disagrees with PyTorch ({report.failure()}); nothing was "
                                    f"written. Try {tries}, or report a bug")

    with atomic_path(output) as tmp:
        tmp.write_bytes(data_bytes)
    timings["total_s"] = time.perf_counter() - t0
    return ExportResult(output, meta, report, pose.num_parameters, len(data_bytes), timings, ckpt, pose)
