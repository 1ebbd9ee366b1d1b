"""``export_pose``: checkpoint -> simplified, verified, self-describing ONNX file."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Callable

import onnx
import torch

from posequant.core.errors import ExportError, PosequantError, VerificationError
from posequant.core.fileio import arch_file, atomic_path, check_outputs
from posequant.core.keypoints import keypoint_set_for
from posequant.core.metadata import ModelMeta, write_meta
from posequant.core.numbers import check_number, normalisation
from posequant.core.quiet import ort_session, quiet
from posequant.core.version import __version__

from .checkpoint import load_checkpoint
from .common import ExportResult, _data_cases, default_output
from .model import resolve_model
from .verify import random_inputs, verify

MIN_OPSET = 17
DEFAULT_INPUT_SIZE = {16: (256, 256), 17: (256, 192)}  # MPII and COCO configs of the official repos
PROTOBUF_LIMIT = 2**31 - 1


def probe_output(module: torch.nn.Module, input_size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """Joint count and heatmap size, by running the model once."""
    with torch.inference_mode():
        try:
            out = module(torch.zeros(1, 3, *input_size))
        except Exception as e:
            raise ExportError(
                f"the model failed on a 1x3x{input_size[0]}x{input_size[1]} input ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); check --input-size") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExportError(f"the model returns {shape}, not N x joints x H x W heatmaps")
    return out.shape[1], (out.shape[2], out.shape[3])


def _to_onnx(module: torch.nn.Module, input_size: tuple[int, int], opset: int, batch: int | None) -> onnx.ModelProto:
    dummy = torch.randn(batch or 1, 3, *input_size)
    buf = io.BytesIO()
    dynamic = None if batch else {"input": {0: "batch"}, "heatmaps": {0: "batch"}}
    with quiet():  # the TorchScript exporter's deprecation notes and prints are not for users (--verbose)
        try:
            torch.onnx.export(module, (dummy,), buf, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["heatmaps"],
                              dynamic_axes=dynamic, do_constant_folding=True)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return onnx.load_from_string(buf.getvalue())


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    try:
        with quiet():  # onnxsim's prints and ORT's logs from its checks
            simplified, ok = onnxsim.simplify(model)
    except Exception as e:
        raise ExportError(f"onnxsim failed ({type(e).__name__}: {e}); retry with --no-simplify") from None
    if not ok:
        raise ExportError("onnxsim could not validate the simplified model; retry with --no-simplify")
    return simplified


def _ort_session(model_bytes: bytes):
    return ort_session(model_bytes)


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
    opset: int = MIN_OPSET,
    batch: int | None = None,
    simplify: bool = True,
    trust_pickle: bool = False,
    verify_model: bool = True,
    data: str | Path | None = None,
    data_samples: int = 8,
    rtol: float = 1e-4,
    joints: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a pose checkpoint to one self-contained ONNX file with posequant metadata.

    ``batch=None`` exports a dynamic batch dimension. Input normalisation defaults to what the
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
                          mean=mean, std=std, simplify=simplify, verify_model=verify_model, data=data,
                          data_samples=data_samples, rtol=rtol, progress=progress)
    if joints:
        raise PosequantError("--joints names a third-party ONNX model's channels; a checkpoint of our families "
                             "outputs its keypoint set's order: leave --joints out")
    if opset < MIN_OPSET:
        raise PosequantError(f"--opset {opset} is too old: posequant exports opset {MIN_OPSET} or newer")
    if batch is not None and batch < 1:
        raise PosequantError(f"--batch must be 'dynamic' or a positive number, got {batch}")
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
    if joints is None:
        joints, _ = probe_output(pose.module, input_size or (256, 192))
    size = tuple(input_size or pose.input_size or DEFAULT_INPUT_SIZE.get(joints, (256, 256)))
    out_joints, heatmap_size = probe_output(pose.module, size)
    kps = keypoint_set_for(out_joints, keypoints)
    meta = ModelMeta(
        family=pose.family, keypoints=kps.name, joint_names=kps.joint_names,
        flip_pairs=kps.flip_pairs, skeleton=kps.skeleton, input_size=size,
        heatmap_size=heatmap_size, color=(color or pose.color).lower(),
        mean=mean or pose.mean, std=std or pose.std,
        arch_config=json.loads(json.dumps(pose.arch_config)),  # as it will read back from the file
        source_checkpoint=checkpoint.name, source_sha256=ckpt.sha256,
        posequant_version=__version__,
    )

    say(f"exporting {pose.name} ({pose.num_parameters:,} parameters) at {size[0]}x{size[1]}, opset {opset}")
    t = time.perf_counter()
    model = _to_onnx(pose.module, size, opset, batch)
    timings["export_s"] = time.perf_counter() - t
    if simplify:
        say("simplifying with onnxsim")
        t = time.perf_counter()
        model = _simplify(model)
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
            worst = max(report.cases, key=lambda c: c.rel_diff)
            raise VerificationError(
                f"ONNX output differs from PyTorch beyond tolerance (max abs diff {worst.max_abs_diff:.3g}, "
                f"relative {worst.rel_diff:.3g} > {rtol:g}, {worst.argmax_mismatches} argmax mismatches on "
                f"{worst.name}); nothing was written. Try --no-simplify, another --opset, or report a bug")

    with atomic_path(output) as tmp:
        tmp.write_bytes(data_bytes)
    timings["total_s"] = time.perf_counter() - t0
    return ExportResult(output, meta, report, pose.num_parameters, len(data_bytes), timings, ckpt, pose)
