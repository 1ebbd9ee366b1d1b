"""Third-party ONNX in: check that a graph is a top-down heatmap or SimCC pose model, read what the graph
says (input size, batch, joint count, heatmap size or SimCC lengths and split ratio), take the rest from the
options, and write a simplified copy stamped with posequant metadata, verified against the original.

What does not fit (several inputs, a non-image input, coordinate regression, bottom-up heads with extra
outputs, SimCC vectors whose lengths give no one split ratio) is refused in one line that says what was found.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from posequant.core.args import Size, Whole, checked
from posequant.core.errors import ExportError, MissingMetadataError, PosequantError, VerificationError
from posequant.core.fileio import atomic_path, check_outputs
from posequant.core.keypoints import KEYPOINT_SETS, KeypointSet, keypoint_set_for
from posequant.core.metadata import IMAGENET_MEAN, IMAGENET_STD, ModelMeta, format_size, read_meta, write_meta
from posequant.core.modelfiles import sha256_of_model
from posequant.core.numbers import check_number, normalisation
from posequant.core.onnxfile import PROTOBUF_LIMIT, convert_opset, load_onnx, opset_of
from posequant.core.version import __version__

from .common import ExportResult, _data_cases, check_opset, default_output, simplify_onnx, size_advice, stride_of
from .verify import VerifyReport, compare_heatmaps, output_labels, random_inputs, run_onnx

FAMILY = "onnx"  # metadata family of a stamped third-party model
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


class UnsupportedModelError(ExportError):
    """The graph is not a one-image-in, one-heatmap-out pose model."""


@dataclass(frozen=True)
class GraphFacts:
    """What the graph itself says. ``None`` where a dimension is dynamic."""

    input_name: str
    output_name: str
    batch: int | None
    input_hw: tuple[int | None, int | None]
    channels: int | None  # output channels (joints), when static
    head: str = "heatmap"  # or "simcc": two N x joints x L outputs
    outputs: tuple[str, ...] = ()  # every output's name, in the graph's order


def _dims(value_info) -> list[int | None]:
    return [d.dim_value or None for d in value_info.type.tensor_type.shape.dim]


def _shape_text(value_info) -> str:
    dims = [str(d.dim_value) if d.dim_value else (d.dim_param or "?") for d in value_info.type.tensor_type.shape.dim]
    return f"{value_info.name!r} [{', '.join(dims)}]"


def _not_supported(where: Path, found: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{where}: {found}; posequant takes top-down heatmap or SimCC models (one N x 3 x "
                                 "H x W image in; one N x joints x h x w heatmap out, or two SimCC vectors N x joints "
                                 "x W*r and N x joints x H*r): this kind is not supported yet")


def check_graph(model: onnx.ModelProto, where: Path) -> GraphFacts:
    """The graph's input and outputs, refused in one line when they are not a heatmap or SimCC pose model's."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = list(model.graph.output)
    if len(inputs) != 1:
        names = ", ".join(_shape_text(i) for i in inputs) or "none"
        raise _not_supported(where, f"the graph has {len(inputs)} inputs ({names})")
    image = inputs[0]
    elem = image.type.tensor_type.elem_type
    dims = _dims(image)
    if elem != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(elem).lower() if elem else "not a tensor"
        raise _not_supported(where, f"input {_shape_text(image)} is {kind}, not a float32 image")
    if len(dims) != 4:
        raise _not_supported(where, f"input {_shape_text(image)} has rank {len(dims)}, not an N x 3 x H x W image")
    if dims[1] != 3:
        layout = " (channels last: NHWC)" if dims[3] == 3 else ""
        raise _not_supported(where, f"input {_shape_text(image)} does not have 3 colour channels at axis 1{layout}")
    ranks = [len(o.type.tensor_type.shape.dim) for o in outputs]
    shapes = ", ".join(_shape_text(o) for o in outputs)
    if len(outputs) == 2 and ranks == [3, 3]:  # SimCC (RTMPose): which is x and which y, stamp_onnx reads at run time
        return GraphFacts(image.name, outputs[0].name, dims[0], (dims[2], dims[3]), _dims(outputs[0])[1], "simcc",
                          tuple(o.name for o in outputs))
    if len(outputs) != 1:
        if 4 in ranks:
            found = f"{len(outputs)} outputs ({shapes}): heatmaps with extra outputs, as bottom-up models " \
                    "(associative embedding tags, part affinity fields) or multi-stage heads have"
        else:
            found = f"{len(outputs)} outputs ({shapes})"
        raise _not_supported(where, found)
    out = outputs[0]
    if ranks[0] in (2, 3):
        raise _not_supported(where, f"output {_shape_text(out)} has rank {ranks[0]}: coordinates (a regression "
                             "head, or one SimCC vector without its pair), not heatmaps")
    if ranks[0] != 4:
        raise _not_supported(where, f"output {_shape_text(out)} has rank {ranks[0]}, not N x joints x h x w heatmaps")
    return GraphFacts(image.name, out.name, dims[0], (dims[2], dims[3]), _dims(out)[1])


def _session(model_bytes: bytes, where: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - an op or opset this ONNX Runtime does not know, bad shapes, ...
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ExportError(f"{where}: ONNX Runtime cannot load this graph ({why}): check the model") from None


def _probe(session, where: Path, batch: int, size: tuple[int, int]) -> tuple[int, ...]:
    """The output shape for one batch of zeros: the real joint count and heatmap size."""
    try:
        out = session.run(None, {session.get_inputs()[0].name: np.zeros((batch, 3, *size), np.float32)})[0]
    except Exception as e:
        raise ExportError(f"{where} failed on a {batch}x3x{size[0]}x{size[1]} input ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200]}); check --input-size") from None
    if out.ndim != 4:
        raise _not_supported(where, f"the output is {list(out.shape)} at run time, not N x joints x h x w heatmaps")
    if not np.isfinite(out).all():
        raise ExportError(f"{where} returns NaN or inf heatmaps for an input of zeros: the model is broken (check "
                          "its export)")
    if out.shape[2] > size[0] or out.shape[3] > size[1]:
        raise _not_supported(where, f"heatmaps of {out.shape[2]}x{out.shape[3]} are larger than the "
                             f"{size[0]}x{size[1]} input")
    return tuple(int(d) for d in out.shape)


@dataclass(frozen=True)
class SimCCLayout:
    """Which output is x and which y, their lengths, and the split ratio they agree on."""

    x: str
    y: str
    joints: int
    lx: int
    ly: int
    ratio: float  # bins per input pixel: lx / width = ly / height


def simcc_layout(session, where: Path, batch: int, size: tuple[int, int], given: str | None) -> SimCCLayout:
    """From one run on zeros: the two outputs' joints and lengths; x is the output whose length is the input
    width times the split ratio r, y the one of the height times the same r (``given``: ``--simcc-outputs
    X,Y`` names them, needed when both orders fit, a square input)."""
    names = [o.name for o in session.get_outputs()]
    try:
        outs = session.run(None, {session.get_inputs()[0].name: np.zeros((batch, 3, *size), np.float32)})
    except Exception as e:
        raise ExportError(f"{where} failed on a {batch}x3x{size[0]}x{size[1]} input ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:200]}); check --input-size") from None
    shapes = {n: tuple(int(d) for d in o.shape) for n, o in zip(names, outs)}
    shown = ", ".join(f"{n!r} {list(shape)}" for n, shape in shapes.items())
    if any(len(shape) != 3 for shape in shapes.values()) or len({shape[1] for shape in shapes.values()}) != 1:
        raise _not_supported(where, f"the outputs are {shown} at run time, not two SimCC vectors N x joints x L of "
                             "the same joints")
    h, w = size
    length = {n: shape[2] for n, shape in shapes.items()}
    if given:
        order = [n.strip() for n in given.split(",")]
        unknown = [n for n in order if n not in names]
        if len(order) != 2 or len(set(order)) != 2 or unknown:
            raise PosequantError(f"--simcc-outputs {given!r}: name the x output, then the y output, of {where} "
                                 f"(its outputs: {', '.join(names)})")
        fits = [tuple(order)] if length[order[0]] * h == length[order[1]] * w else []
    else:  # x: width x r, y: height x r, for one r (cross-multiplied: exact)
        fits = [(a, b) for a, b in (names, names[::-1]) if length[a] * h == length[b] * w]
    if not fits:
        x, y = order if given else names
        raise _not_supported(where, f"SimCC outputs {shown} give no one split ratio for the {h}x{w} input "
                             f"(x {length[x]}/{w} = {length[x] / w:g}, y {length[y]}/{h} = {length[y] / h:g}: the "
                             "split ratios must agree)")
    if len(fits) > 1:
        raise PosequantError(f"{where}: SimCC outputs {shown} both fit the square {h}x{w} input, so their lengths "
                             f"cannot say which is x: add --simcc-outputs X_NAME,Y_NAME (e.g. --simcc-outputs "
                             f"{names[0]},{names[1]})")
    x, y = fits[0]
    return SimCCLayout(x, y, shapes[x][1], length[x], length[y], length[x] / w)


def _check_finite_weights(model: onnx.ModelProto, where: Path) -> None:
    """NaN or inf in a float initializer or constant: the weights are damaged, whatever simplifying would do."""
    from onnx import numpy_helper

    consts = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t")]
    for t in [*model.graph.initializer, *consts]:
        if t.data_type in FLOAT_TYPES:
            values = numpy_helper.to_array(t)
            bad = int(values.size - np.isfinite(values).sum())
            if bad:
                raise ExportError(f"{where}: tensor {t.name!r} holds {bad} NaN or inf value(s) of {values.size}; the "
                                  "weights are damaged (diverged training or a broken file): use another model")


def _check_stride(session, where: Path, facts: GraphFacts, size: tuple[int, int], heatmap: tuple[int, int]) -> None:
    """Refuse heatmaps that are not the input divided by a whole stride (e.g. 72x56 for 264x200 on a backbone that
    rounds up): every decoded joint would be misplaced, as for a checkpoint exported at such a size."""
    if stride_of(size, heatmap):
        return
    found = f"its heatmaps come out {format_size(heatmap)}, not the input divided by a whole stride (decoded joints " \
            "would be misplaced)"
    if all(facts.input_hw):
        raise UnsupportedModelError(f"{where} takes {format_size(size)} inputs (fixed in the graph) but {found}: "
                                    "re-export it at a size its stride divides")

    def heatmap_at(candidate: tuple[int, int]) -> tuple[int, int] | None:
        try:
            return _probe(session, where, facts.batch or 1, candidate)[2:]
        except PosequantError:
            return None

    raise PosequantError(f"--input-size {format_size(size)} does not fit {where}: {found}; "
                         f"{size_advice(heatmap_at, size)}")


def _input_size(facts: GraphFacts, given: tuple[int, int] | None, where: Path) -> tuple[int, int] | None:
    h, w = facts.input_hw
    if h and w:
        if given and tuple(given) != (h, w):
            raise PosequantError(f"{where} takes {h}x{w} inputs (fixed in the graph), not --input-size "
                                 f"{format_size(given)}: leave --input-size out")
        return h, w
    return tuple(given) if given else None


def _named_set(names: list[str], keypoints: str | None) -> KeypointSet:
    """The keypoint set ``--joints`` speaks of: ``keypoints``, or the one that knows the most names."""
    if keypoints:
        return KEYPOINT_SETS[keypoints.lower()]
    return max(KEYPOINT_SETS.values(), key=lambda s: sum(n in s.joint_names for n in names))


def channel_joints(joints: str, kps: KeypointSet, channels: int) -> tuple[int, ...]:
    """``--joints a,b,...`` (the model's channel order) -> index of each channel's joint in ``kps``.

    Every joint of the set must be named exactly once: a model that covers part of the set cannot be
    scored honestly by the set's metrics (MPII's PCKh Mean, COCO's OKS), so that is not supported yet.
    """
    names = [n.strip() for n in joints.split(",") if n.strip()]
    unknown = [n for n in names if n not in kps.joint_names]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, kps.joint_names, n=1)
            hints.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise PosequantError(f"--joints: {', '.join(hints)} not in the {kps.name} joint names "
                             f"({', '.join(kps.joint_names)})")
    dups = sorted({n for n in names if names.count(n) > 1}, key=names.index)
    if dups:
        raise PosequantError(f"--joints names {', '.join(dups)} more than once: name each channel's joint once")
    if len(names) != channels:
        raise PosequantError(f"--joints names {len(names)} joints but the model outputs {channels} heatmap channels: "
                             "name one joint per channel, in channel order")
    missing = [n for n in kps.joint_names if n not in names]
    if missing:
        raise PosequantError(f"--joints leaves out {', '.join(missing)} of the {kps.name} set: a model must cover "
                             "every joint of its set (partial sets are not supported yet)")
    return tuple(kps.joint_names.index(n) for n in names)


def _previous_meta(model: onnx.ModelProto, source: Path) -> ModelMeta | None:
    """The posequant metadata of a model stamped or exported before; None for a third-party file."""
    try:
        return read_meta(model, str(source))
    except MissingMetadataError:
        return None


@checked(input_size=Size(), data_samples=Whole(1), opset=Whole(1, optional=True))
def stamp_onnx(
    source: str | Path,
    output: str | Path | None = None,
    *,
    input_size: tuple[int, int] | None = None,
    keypoints: str | None = None,
    joints: str | None = None,
    color: str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    opset: int | None = None,
    simplify: bool = True,
    verify_model: bool = True,
    data: str | Path | None = None,
    data_samples: int = 8,
    rtol: float = 1e-4,
    simcc_outputs: str | None = None,
    progress: Callable[[str], None] | None = None,
):
    """Stamp a third-party heatmap or SimCC pose ONNX model with posequant metadata (``export-pose MODEL.onnx``).

    The batch stays what the file has (a fixed batch is run at that size by every later stage).
    ``joints`` names the model's channels, in order, in the keypoint set's names; ``mean``/``std``
    default to ImageNet's. A SimCC model's x and y outputs are told apart by their lengths, or named by
    ``simcc_outputs`` ("X_NAME,Y_NAME"). The graph keeps its opset unless ``opset`` names a newer one: it is
    then converted (``onnx.version_converter``) and the verification compares it with the original.
    Returns an :class:`~posequant.exporter.export.ExportResult`.
    """
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    source = Path(source)
    if not source.is_file():
        raise PosequantError(f"model {source} not found: check the path")
    output = Path(output) if output else default_output(source)
    # never onto the source model or the data; bad numbers before any work
    check_outputs({"-o": output}, {"MODEL": source, "--data": data})
    mean, std = normalisation(mean, "mean"), normalisation(std, "std")
    rtol = check_number("--rtol", rtol, above=True)
    opset = check_opset(opset)
    # one line for a missing, empty, truncated or non-ONNX file; external weights read in (resolved against the
    # model's folder), so the stamp is one self-contained file whatever the current directory
    model = load_onnx(source, load_external_data=True)
    if model.ByteSize() > PROTOBUF_LIMIT:
        raise ExportError(f"{source} holds over 2 GiB of weights, which cannot be one self-contained .onnx file: "
                          "models this large are not supported yet")
    facts = check_graph(model, source)
    if simcc_outputs and facts.head != "simcc":
        raise PosequantError(f"--simcc-outputs names a SimCC model's x and y outputs; {source} has one heatmap "
                             "output: leave it out")
    _check_finite_weights(model, source)
    if opset is not None and opset < opset_of(model):
        raise PosequantError(f"--opset {opset}: {source} is opset {opset_of(model)} already, and graphs are not "
                             "converted down: leave --opset out")
    previous = _previous_meta(model, source)
    if previous is not None:  # stamped again (to change what the options say): the rest stays as it was
        if previous.precision != "fp32":
            raise PosequantError(f"{source} is a {previous.precision} model: stamp its float model, then quantize "
                                 "that again")
        if not (keypoints or joints):
            keypoints = previous.keypoints
            if previous.channel_joints:
                joints = ",".join(previous.joint_names[j] for j in previous.channel_joints)
        color, mean, std = color or previous.color, mean or previous.mean, std or previous.std
        input_size = input_size or (None if all(facts.input_hw) else previous.input_size)
        simcc_outputs = simcc_outputs or (",".join(previous.outputs) if previous.head == "simcc" else None)
    size = _input_size(facts, input_size, source)

    missing = []
    if size is None:
        missing.append("--input-size HxW (the graph's input size is dynamic)")
    if not (keypoints or joints):
        missing.append("--keypoints mpii|coco (channels in the set's order) or --joints NAME,... (the model's order)")
    if not color:
        missing.append("--color rgb|bgr (the channel order it was trained on)")
    if missing:
        raise PosequantError(f"{source}: the graph does not say what the stamp needs; add " + "; ".join(missing))
    if color.lower() not in ("rgb", "bgr"):
        raise PosequantError(f"--color must be rgb or bgr, got {color!r}")

    original = model.SerializeToString()
    ref = _session(original, str(source))
    batch = facts.batch
    simcc = None
    if facts.head == "simcc":  # no stride to check: the vectors' lengths are the input's times the split ratio
        simcc = simcc_layout(ref, source, batch or 1, size, simcc_outputs)
        channels, heatmap_size = simcc.joints, (simcc.ly, simcc.lx)
    else:
        shape = _probe(ref, source, batch or 1, size)
        channels, heatmap_size = shape[1], (shape[2], shape[3])
        _check_stride(ref, source, facts, size, heatmap_size)
    if joints:
        kps = _named_set([n.strip() for n in joints.split(",")], keypoints)
        order = channel_joints(joints, kps, channels)
        order = () if order == tuple(range(channels)) else order
    else:
        kps, order = keypoint_set_for(channels, keypoints, custom=False), ()

    meta = ModelMeta(
        family=FAMILY, keypoints=kps.name, joint_names=kps.joint_names, flip_pairs=kps.flip_pairs,
        skeleton=kps.skeleton, input_size=size, heatmap_size=heatmap_size, color=color.lower(),
        mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD,
        arch_config={"input": facts.input_name, **({"outputs": [simcc.x, simcc.y]} if simcc else
                                                    {"output": facts.output_name}), "batch": batch or "dynamic"},
        # a model stamped again keeps its origin, so the gate still pairs it with INT8 models made before
        source_checkpoint=previous.source_checkpoint if previous else source.name,
        source_sha256=previous.source_sha256 if previous else sha256_of_model(source),
        posequant_version=__version__, channel_joints=order, head=facts.head,
        simcc_split_ratio=simcc.ratio if simcc else None, outputs=(simcc.x, simcc.y) if simcc else (),
    )
    timings = {"load_s": time.perf_counter() - t0}
    converted = opset is not None and opset != opset_of(model)
    if converted:
        say(f"converting {source.name} from opset {opset_of(model)} to {opset}")
        model = convert_opset(model, opset, str(source))
    if simplify:
        say(f"simplifying {source.name} with onnxsim")
        t = time.perf_counter()
        model = simplify_onnx(model, str(source))
        timings["simplify_s"] = time.perf_counter() - t
    write_meta(model, meta)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the stamped copy of {source}: {str(e).splitlines()[0]}") from None
    stamped = model.SerializeToString()

    report = None
    if verify_model:
        say("verifying the stamped copy against the original with ONNX Runtime")
        t = time.perf_counter()
        copy = _session(stamped, f"the stamped copy of {source}")
        report = verify_copy(ref, copy, meta, batch, data=data, data_samples=data_samples, rtol=rtol)
        timings["verify_s"] = time.perf_counter() - t
        if not report.passed:
            hint = "retry with --no-simplify" if simplify else "leave --opset out" if converted else "report it"
            raise VerificationError(f"the stamped copy differs from {source} ({report.failure()}); nothing was "
                                    f"written: {hint}")
    with atomic_path(output) as tmp:
        tmp.write_bytes(stamped)
    timings["total_s"] = time.perf_counter() - t0
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return ExportResult(output, meta, report, params, len(stamped), timings)


def verify_copy(ref, copy, meta: ModelMeta, batch: int | None, *, data=None, data_samples: int = 8,
                rtol: float = 1e-4) -> VerifyReport:
    """The stamped copy vs the original, both on ONNX Runtime: fixed-seed inputs and ``data`` crops."""
    cases = [("random inputs (seed 0)", random_inputs(meta.input_size, samples=batch or 2))]
    if data is not None:
        cases.append(_data_cases(data, meta, data_samples))
    results = []
    for name, inputs in cases:
        outs = zip(run_onnx(ref, inputs, batch, every=True), run_onnx(copy, inputs, batch, every=True))
        for label, (a, b) in zip(output_labels(ref), outs):
            results.append(compare_heatmaps(name + label, a, b, rtol * max(float(np.abs(a).max()), 1e-12)))
    return VerifyReport(results, rtol, reference="the original ONNX")
