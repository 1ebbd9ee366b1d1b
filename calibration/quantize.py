"""``quantize``: a float pose ONNX model to a static INT8 (QDQ) model calibrated on real person crops.

Steps: prepare the float graph (fold BatchNorm into ConvTranspose; optionally rewrite stride-2
deconvolutions into phase convolutions, checked exact), calibrate and quantize (NNCF by default,
ONNX Runtime's quantize_static on request), shape the QDQ graph for the target runtime, and with a
validation set keep the most harmful nodes in float until the accuracy budget holds.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnx

from posequant.core.args import Names, Runtime, Size, Whole, checked
from posequant.core.cpu import KINDS, CpuKind, cpu_kind
from posequant.core.errors import DataError, MetadataError, MissingMetadataError, PosequantError, VerificationError
from posequant.core.fileio import check_outputs, temp_dir, write_bytes_atomic
from posequant.core.metadata import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelMeta,
    input_batch,
    read_meta,
    stamp_command,
    write_meta,
)
from posequant.core.modelfiles import model_bytes
from posequant.core.numbers import check_number
from posequant.core.onnxfile import check_graph, convert_opset, load_onnx, opset_of
from posequant.core.quiet import quiet
from posequant.core.version import __version__

from .deconv import fold_deconv_batchnorm, max_relative_diff, rewrite_deconvs
from .equalize import equalize_relu_ranges
from .images import skipped_image_warnings
from .qdq import (
    int8_deconvolutions,
    is_quantized,
    make_openvino_friendly,
    make_ort_friendly,
    make_tensorrt_friendly,
    sink_depth_to_space,
)
from .ranges import refine_ranges
from .reader import CalibrationSet, OrtCalibrationReader, calibration_set
from .saturation import fit_pair_scales, input_means

ENGINES = ("nncf", "ort")
METHODS = ("auto", "minmax", "percentile", "entropy")
TARGETS = ("ort", "openvino", "tensorrt")
ACTIVATIONS = ("asymmetric", "symmetric")
# uint8 with a zero point is ORT's native activation type (asymmetric costs nothing there) and measured
# better on the trained model, AP and PCK on both coco-mini splits (docs/quantize.md, "How the
# defaults were chosen"); OpenVINO's int8 kernels prefer symmetric activations (NNCF's default)
ACTIVATIONS_BY_TARGET = {"ort": "asymmetric", "openvino": "symmetric", "tensorrt": "symmetric"}
# The deconvolution rewrite (scripts/bench_quantize.py, docs/quantize.md): on ORT it turns pose_resnet_50's
# float deconvolutions into QLinearConv (INT8 1.44x -> 2.86x ORT FP32). OpenVINO runs dense ones in
# int8 natively, 3% faster than the rewrite (pose_resnet_50, static shapes), so its target rewrites
# only grouped (depthwise) ones: they get per-channel weight scales instead of one per tensor, the
# largest accuracy gain on the trained model. True: all; "grouped": grouped only; False: none.
REWRITE_BY_TARGET: dict[str, bool | str] = {"ort": True, "openvino": "grouped", "tensorrt": True}
REWRITE_RTOL = 1e-5
# DequantizeLinear's axis (one scale per output channel) came with opset 13: older graphs are converted first
QDQ_MIN_OPSET = 13
EQUALIZE_CROPS = 64  # calibration crops for the channel ranges of the equalization
QUANTIZABLE = ("Conv", "ConvTranspose", "Add", "MatMul", "Gemm")
# --cpu: a kind from posequant.core.cpu, this machine's ("auto") or "portable" (exact on every kind)
CPUS = ("auto", "portable", *KINDS)
RANGE_CROPS = 64  # calibration crops for the activation ranges that ranges.refine_ranges sets
CHECK_CROPS = 16  # and for judging whether each of its changes helps
PAIR_FIT_CROPS = 32  # calibration crops for the mean inputs that the pair fit's bias change uses


class QuantizeError(PosequantError):
    """The model cannot be quantized as asked."""


class BudgetError(PosequantError):
    """The accuracy budget could not be met: exit 1, like a failed verification."""

    exit_code = 1

    def __init__(self, message: str, result: "QuantizeResult"):
        super().__init__(message)
        self.result = result


@dataclass
class Evaluation:
    metric: str  # "AP" (COCO) or "PCKh@0.5" (MPII): the dataset's main metric
    float_value: float  # points: AP x 100, PCKh in percent
    int8_value: float
    float_metrics: dict[str, Any]
    int8_metrics: dict[str, Any]
    people: int
    agreement: dict[str, float] | None = None  # INT8 keypoints against float's (metrics.keypoint_agreement)

    @property
    def drop(self) -> float:
        return self.float_value - self.int8_value


@dataclass
class QuantizeResult:
    input: Path
    output: Path | None
    meta: ModelMeta
    settings: dict[str, Any]
    calibration: dict[str, Any]
    rewritten_deconvs: list[str]
    folded_batchnorms: list[str]
    rewrite_max_rel_diff: float | None  # the prepared float graph (fold, rewrite, equalization) vs the input
    equalized: list[str]
    kept_float: list[str]
    deconvs: dict[str, str]  # backend -> how deconvolutions run
    float_bytes: int
    int8_bytes: int
    evaluation: Evaluation | None = None
    budget_steps: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    model: onnx.ModelProto | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("settings", "calibration", "rewritten_deconvs", "folded_batchnorms",
                                              "equalized", "rewrite_max_rel_diff", "kept_float", "deconvs", "float_bytes",
                                              "int8_bytes", "budget_steps", "seconds")}
        out.update(input=str(self.input), output=str(self.output) if self.output else None,
                   keypoints=self.meta.keypoints, input_size=list(self.meta.input_size))
        if self.evaluation:
            e = self.evaluation
            out["evaluation"] = {"metric": e.metric, "float": e.float_value, "int8": e.int8_value, "drop": e.drop,
                                 "people": e.people, "agreement": e.agreement, "float_metrics": e.float_metrics,
                                 "int8_metrics": e.int8_metrics}
        return out


def _load(model_path: Path) -> onnx.ModelProto:
    model = load_onnx(model_path, load_external_data=True)  # one line for a missing, empty or damaged file
    if is_quantized(model):
        raise QuantizeError(f"{model_path} is already quantized (it has QuantizeLinear/DequantizeLinear nodes): "
                            "give the float model")
    return model


def upgrade_opset(model: onnx.ModelProto, meta: ModelMeta, where: str, say: Callable[[str], None]) -> onnx.ModelProto:
    """A graph older than opset 13, converted to 13 (``onnx.version_converter``) and checked to compute the same:
    per-channel weight scales need DequantizeLinear's ``axis``, which opset 13 brought (an older graph's INT8
    file would be invalid)."""
    old = opset_of(model)
    if old >= QDQ_MIN_OPSET:
        return model
    upgraded = convert_opset(model, QDQ_MIN_OPSET, where)
    diff = max_relative_diff(model, upgraded, (input_batch(model) or 1, 3, *meta.input_size))
    if not diff <= REWRITE_RTOL:
        raise QuantizeError(f"{where} converted from opset {old} to {QDQ_MIN_OPSET} computes other heatmaps (relative "
                            f"difference {diff:.2e}): re-export it at opset {QDQ_MIN_OPSET} or newer")
    same = "identical" if diff == 0 else f"within {diff:.1e}"
    say(f"note: {Path(where).name} is opset {old}; INT8 (QDQ) needs opset {QDQ_MIN_OPSET}: quantizing it converted to "
        f"opset {QDQ_MIN_OPSET} (onnx.version_converter; heatmaps {same})")
    return upgraded


def model_meta(model: onnx.ModelProto, where: str, *, input_size=None, keypoints=None, color=None) -> ModelMeta:
    """The model's posequant metadata, or one built from the options for a model without it."""
    try:
        meta = read_meta(model, where)
    except MissingMetadataError:
        if not (input_size and keypoints and color):
            raise MetadataError(f"{where} has no posequant metadata; stamp it first: {stamp_command(where, model)} "
                                "(or give quantize --input-size, --keypoints and --color)") from None
        return _meta_from_options(model, input_size, keypoints, color, where)
    given = [f"--{k.replace('_', '-')}" for k, v in (("input_size", input_size), ("keypoints", keypoints),
                                                     ("color", color)) if v]
    if given:  # overriding one stage's preprocessing would quantize for inputs the float model never sees
        raise MetadataError(f"{', '.join(given)} are for a model without posequant metadata; {where} has it and "
                            "its metadata decides: to change them, stamp it again with `posequant export-pose`")
    return meta


def _meta_from_options(model: onnx.ModelProto, input_size, keypoints: str, color: str, where: str) -> ModelMeta:
    from posequant.core.keypoints import keypoint_set_for

    if len(model.graph.output) == 2:  # which output is x and the split ratio are the stamp's to read
        raise MetadataError(f"{where} has two outputs (a SimCC model?) and no posequant metadata; stamp it first: "
                            f"{stamp_command(where, model)}")
    dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not dims[1]:
        raise MetadataError(f"{where}: the model's output is not N x joints x H x W heatmaps: export it with "
                            "`posequant export-pose`")
    kps = keypoint_set_for(dims[1], keypoints, custom=False)  # --keypoints is required here
    heatmap = (dims[2], dims[3]) if dims[2] and dims[3] else _probe_heatmap_size(model, input_size)
    meta = ModelMeta(family="custom", keypoints=kps.name, joint_names=kps.joint_names, flip_pairs=kps.flip_pairs,
                     skeleton=kps.skeleton, input_size=tuple(input_size), heatmap_size=heatmap, color=color.lower(),
                     mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD), posequant_version=__version__)
    check_graph(model, meta, where)  # e.g. an input that is not N x 3 x H x W
    return meta


def _probe_heatmap_size(model: onnx.ModelProto, input_size) -> tuple[int, int]:
    """The real heatmap size (never an assumed input / 4): one run on zeros."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.zeros((input_batch(model) or 1, 3, *input_size), np.float32)
    shape = sess.run(None, {sess.get_inputs()[0].name: x})[0].shape
    return int(shape[2]), int(shape[3])


@dataclass
class Prepared:
    model: onnx.ModelProto
    folded: list[str]  # ConvTranspose nodes that absorbed a BatchNorm
    rewritten: list[str]  # ConvTranspose nodes turned into convolutions + DepthToSpace
    equalized: list[str]  # ReLU tensors whose channel ranges were equalized
    max_rel_diff: float | None  # prepared vs original float output (None: nothing changed)


def prepare_float(model: onnx.ModelProto, *, rewrite: bool | str, input_size: tuple[int, int],
                  equalize_with: Iterable[dict[str, np.ndarray]] | None = None) -> Prepared:
    """The float graph INT8 is made from: BatchNorm folded into ConvTranspose, deconvolutions turned
    into convolutions + DepthToSpace (``rewrite``: True, "grouped" or False), ReLU channel ranges
    equalized on the feeds ``equalize_with``; every change exact, checked on random inputs."""
    prepared = copy.deepcopy(model)
    folded = fold_deconv_batchnorm(prepared)
    rewritten = rewrite_deconvs(prepared, grouped_only=rewrite == "grouped")[0] if rewrite else []
    equalized = equalize_relu_ranges(prepared, equalize_with) if equalize_with is not None else []
    diff = None
    if folded or rewritten or equalized:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        # a fixed-batch graph (third-party, export-pose --batch N) runs only at its own batch
        diff = max_relative_diff(model, prepared, (dims[0].dim_value or 1, dims[1].dim_value or 3, *input_size))
        if diff > REWRITE_RTOL:
            raise VerificationError(f"the prepared float graph differs from the original by {diff:.2e} (relative), "
                                    f"more than {REWRITE_RTOL:g}: report this model; --no-rewrite-deconv and "
                                    "--no-equalize avoid it")
    return Prepared(prepared, folded, rewritten, equalized, diff)


def _quantize_once(model: onnx.ModelProto, calib: CalibrationSet, *, engine: str, method: str, per_channel: bool,
                   target: str, activations: str, ignored: Iterable[str], tmp: Path, pair_fit: bool) -> onnx.ModelProto:
    ignored = sorted(ignored)
    symmetric = activations == "symmetric"
    if engine == "nncf":
        q, bias_correction = _nncf(model, calib, method=method, per_channel=per_channel, target=target,
                                   symmetric=symmetric, ignored=ignored)
    else:
        q = _ort(model, calib, method=method, per_channel=per_channel, symmetric=symmetric, ignored=ignored, tmp=tmp)
        bias_correction = "none"
    if target == "ort":
        make_ort_friendly(q, sink=False)
    elif target == "openvino":
        make_openvino_friendly(q)
    elif target == "tensorrt":
        make_tensorrt_friendly(q)
    q, ranges = _refine_ranges(q, model, calib, depthwise=target == "ort", symmetric=symmetric)
    fit = _fit_pairs(q, model, calib) if pair_fit else None
    if target == "ort":  # after the pair fit: the sunk heatmap layer keeps its weight codes at one scale
        sink_depth_to_space(q)
    for key, value in (("_bias_correction", bias_correction), ("_pair_fit", json.dumps(fit)),
                       ("_ranges", json.dumps(ranges))):
        entry = q.metadata_props.add()  # read back (and removed) by quantize()
        entry.key, entry.value = key, value
    return q


def _refine_ranges(q: onnx.ModelProto, prepared: onnx.ModelProto, calib: CalibrationSet, *, depthwise: bool,
                   symmetric: bool) -> tuple[onnx.ModelProto, dict]:
    """Borrowed activation ranges and depthwise inputs (``ranges.refine_ranges``), each kept where it cuts the
    output error on calibration crops: crops past the first :data:`RANGE_CROPS` judge when there are enough."""
    feeds = list(itertools.islice(calib.crops.feeds(), RANGE_CROPS + CHECK_CROPS))
    ranges, check = feeds[:RANGE_CROPS], feeds[RANGE_CROPS:] or feeds[:CHECK_CROPS]
    q, report = refine_ranges(q, prepared, ranges, check=check, depthwise=depthwise, symmetric=symmetric)
    return q, report


def _fit_pairs(q: onnx.ModelProto, prepared: onnx.ModelProto, calib: CalibrationSet) -> dict:
    """Weight scales under which no int16 pair sum can saturate (``saturation.fit_pair_scales``), from the
    float weights NNCF quantized (convolutions', MatMuls' and Gemms'), with the mean change moved into the biases."""
    from onnx import numpy_helper

    inits = {i.name: i for i in prepared.graph.initializer}
    weights = {n.name or n.output[0]: numpy_helper.to_array(inits[n.input[1]]) for n in prepared.graph.node
               if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and len(n.input) > 1
               and n.input[1] in inits}
    means = input_means(q, itertools.islice(calib.crops.feeds(), PAIR_FIT_CROPS))
    return fit_pair_scales(q, weights, input_means=means).to_dict()


def _nncf(model, calib: CalibrationSet, *, method, per_channel, target, symmetric, ignored) -> onnx.ModelProto:
    import logging

    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    logging.getLogger("nncf").setLevel(logging.ERROR)
    if method == "entropy":
        raise QuantizeError("--method entropy is ONNX Runtime's calibrator: add --engine ort, or use minmax/percentile")
    advanced: dict[str, Any] = {}
    # PERFORMANCE: symmetric activations (NNCF's default, OpenVINO's fast path); MIXED: asymmetric
    preset = nncf.QuantizationPreset.PERFORMANCE if symmetric else nncf.QuantizationPreset.MIXED
    if target in ("ort", "tensorrt"):
        # ORT's QLinearConv and TensorRT take one activation scale per tensor
        advanced["activations_quantization_params"] = QuantizationParameters(per_channel=False)
    if not per_channel:
        advanced["weights_quantization_params"] = QuantizationParameters(per_channel=False)
    if method == "minmax":
        advanced["activations_range_estimator_params"] = RangeEstimatorParametersSet.MINMAX
    elif method == "percentile":
        advanced["activations_range_estimator_params"] = RangeEstimatorParametersSet.MEAN_QUANTILE
    dataset = nncf.Dataset(calib.crops, lambda x: {calib.crops.input_name: x})
    # Full bias correction measured better than NNCF's fast variant on the trained model (docs/quantize.md).
    # NNCF cannot cut its sub-graphs in some graphs (phase convolutions' Concat, ResNet's stem):
    # there it fails at once, and the fast variant is used.
    def run(fast: bool) -> onnx.ModelProto:
        return nncf.quantize(model, dataset, subset_size=len(calib.crops), fast_bias_correction=fast, preset=preset,
                             ignored_scope=nncf.IgnoredScope(names=list(ignored), validate=False),
                             advanced_parameters=AdvancedQuantizationParameters(**advanced))

    # NNCF's progress bars (frozen part-way when full bias correction gives up) and ORT's logs: --verbose
    try:
        with quiet():
            return run(fast=False), "full"
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors on the sub-graphs NNCF's bias correction cuts
        if not _raised_in_bias_correction(e):
            raise
        with quiet():
            return run(fast=True), "fast"


def _raised_in_bias_correction(error: BaseException) -> bool:
    """Whether ``error`` came from inside NNCF's full bias correction (its sub-graph extraction fails
    on some graphs: "Duplicate definition-site", "Failed to find node output ...")."""
    import traceback

    return any("bias_correction" in frame.filename for frame in traceback.extract_tb(error.__traceback__))


def _ort(model, calib: CalibrationSet, *, method, per_channel, symmetric, ignored, tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, dst = tmp / "prepared.onnx", tmp / "quantized.onnx"
    onnx.save(model, str(src))
    methods = {"auto": CalibrationMethod.MinMax, "minmax": CalibrationMethod.MinMax,
               "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    # quantize_static logs advice ("consider pre-processing") on the root logger; with no handler there,
    # logging would install a stderr one for the rest of the process. A null handler keeps it quiet.
    import logging

    null = logging.NullHandler()
    logging.getLogger().addHandler(null)
    try:
        with quiet():
            quantize_static(str(src), str(dst), OrtCalibrationReader(calib.crops), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], nodes_to_exclude=list(ignored),
                            extra_options={"ActivationSymmetric": symmetric})
    finally:
        logging.getLogger().removeHandler(null)
    return onnx.load(str(dst))


@checked(num_samples=Whole(1), seed=Whole(0), target=Runtime(), keep_float=Names(optional=False), input_size=Size())
def quantize(
    model: str | Path,
    calib: str | Path,
    *,
    output: str | Path | None = None,
    format: str | None = None,
    split: str | None = None,
    num_samples: int = 300,
    method: str = "auto",
    per_channel: bool = True,
    seed: int = 0,
    target: str = "ort",
    rewrite_deconv: bool | None = None,
    equalize: bool = True,
    activations: str | None = None,
    engine: str = "nncf",
    val: str | Path | None = None,
    val_split: str | None = None,
    max_drop: float = 0.5,
    val_flip: bool = False,
    min_agreement: float | None = None,
    agreement_on: str | Path | None = None,
    keep_float: Iterable[str] = (),
    cpu: str = "auto",
    input_size: tuple[int, int] | None = None,
    keypoints: str | None = None,
    color: str | None = None,
    progress: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize a float pose ONNX model to INT8 QDQ, calibrated on person crops from ``calib``.

    ``target`` picks the graph shape for the runtime ("ort": per-tensor asymmetric uint8 activations,
    int32 biases, fused by ORT CPU, also runs on OpenVINO; "openvino": NNCF's CPU placement with
    per-channel activations for depthwise convolutions; "tensorrt": per-tensor symmetric int8
    activations with zero point 0, the form TensorRT's explicit quantization takes). With ``val``,
    nodes are kept in float until the main metric drops by at most ``max_drop`` points; with ``min_agreement``
    also (or, with ``agreement_on`` and no ``val``, only) until the INT8 keypoints agree with the float ones
    at least that well (OKS with the float model as ground truth) on ``val``'s people or on ``agreement_on``'s
    (any people: MPII, COCO or a plain image folder; labels unused).
    ``cpu`` is the CPU kind the model will run on (``posequant.core.cpu``: "auto" is this machine's,
    "portable" any): for kinds whose u8s8 kernels add products in saturating int16 pairs (AVX2, AVX-512
    without VNNI) the weight scales are fitted so that no pair can saturate, which makes the graph exact
    on every kind.
    Writes ``output`` (default: ``MODEL.int8.onnx``) unless it is None and ``model`` was given as a proto.
    """
    started = time.perf_counter()
    say = progress or (lambda _m: None)
    if engine not in ENGINES or method not in METHODS or target not in TARGETS or cpu not in CPUS:
        raise QuantizeError(f"engine/method/target/cpu must be one of {ENGINES} / {METHODS} / {TARGETS} / {CPUS}")
    max_drop = check_number("max_drop", max_drop, minimum=None)  # negative: INT8 must beat float. NaN: every "drop > budget" false, a budget that cannot fail
    made_for = _made_for(cpu)
    model_path = Path(model)
    output = Path(output) if output else default_output(model_path)
    check_outputs({"-o": output}, {"MODEL": model_path, "--calib": calib, "--val": val})
    float_model = _load(model_path)
    meta = model_meta(float_model, str(model_path), input_size=input_size, keypoints=keypoints, color=color)
    keep_float = check_node_names(keep_float, float_model, str(model_path))
    val_ds = _open_val(val, meta, val_split, warn) if val else None
    if min_agreement is not None:
        min_agreement = check_number("min_agreement", min_agreement, maximum=1.0)
    if agreement_on is not None and min_agreement is None:
        raise QuantizeError("--agreement-on gives the people for --min-agreement: add --min-agreement OKS")
    if min_agreement is not None and val is None and agreement_on is None:
        raise QuantizeError("--min-agreement needs people to compare on: --val ROOT or --agreement-on FOLDER")
    agree_ds = _open_agreement(agreement_on, meta) if agreement_on is not None and val is None else None
    opset = opset_of(float_model)
    float_model = upgrade_opset(float_model, meta, str(model_path), say)
    rewrite = REWRITE_BY_TARGET[target] if rewrite_deconv is None else rewrite_deconv
    activations = activations or ACTIVATIONS_BY_TARGET[target]
    if activations not in ACTIVATIONS:
        raise QuantizeError(f"activations must be one of {ACTIVATIONS}")
    if target == "tensorrt" and activations != "symmetric":
        raise QuantizeError("--target tensorrt needs --activations symmetric (TensorRT takes int8 with zero point 0)")

    input_name = float_model.graph.input[0].name
    calib_set = calibration_set(calib, meta, num_samples=num_samples, seed=seed, format=format, split=split,
                                input_name=input_name, batch=input_batch(float_model) or 1, warn=warn)
    overlap = eval_split_overlap(calib_set.root, calib_set.format, calib_set.split, val_ds)
    if overlap and warn:
        warn(overlap)
    say("preparing the float graph")
    feeds = itertools.islice(calib_set.crops.feeds(), EQUALIZE_CROPS) if equalize else None
    prep = prepare_float(float_model, rewrite=rewrite, input_size=meta.input_size, equalize_with=feeds)
    prepared = prep.model
    rewritten = sorted(set(keep_float) - {n.name for n in prepared.graph.node})
    if rewritten:
        raise QuantizeError(f"--keep-float {rewritten[0]} is not in the graph that is quantized (a folded BatchNorm, "
                            "or a ConvTranspose the deconvolution rewrite replaced): keep the nodes that replace it, "
                            "or add --no-rewrite-deconv")
    settings = {"engine": engine, "method": method, "per_channel": per_channel, "target": target,
                "rewrite_deconv": rewrite, "equalize": equalize, "weights": "int8 symmetric",
                "activations": activations + (", per tensor" if target != "openvino" or engine == "ort"
                                              else ", per channel into depthwise convolutions (NNCF)"),
                "cpu": made_for.name if made_for else "portable", "cpu_title": made_for.describe() if made_for else
                "any CPU (pair sums kept within int16: exact on every kind)", "quantized_on": cpu_kind().name,
                "seed": seed, "num_samples": num_samples, "max_drop": max_drop if val else None,
                "min_agreement": min_agreement, "agreement_on": str(agreement_on) if agreement_on else None,
                "val": str(val) if val else None, "val_flip": val_flip,
                "opset": {"input": opset, "quantized": opset_of(float_model)}}
    ignored = set(keep_float)
    with temp_dir() as tmp:
        say(f"calibrating on {len(calib_set.crops)} people ({engine})")
        run = dict(engine=engine, method=method, per_channel=per_channel, target=target, activations=activations,
                   tmp=tmp, pair_fit=made_for is None or bool(made_for.saturates))
        q = _quantize_once(prepared, calib_set, ignored=ignored, **run)
        evaluation, steps = None, []
        budget = Budget(max_drop if val_ds is not None else None, min_agreement)
        if val_ds is not None or agree_ds is not None:
            q, ignored, evaluation, steps = _meet_budget(
                prepared, q, calib_set, val_ds or agree_ds, meta, tmp, budget=budget, flip=val_flip,
                ignored=ignored,
                say=say, warn=warn)
    calibration = {**calib_set.to_dict(), "eval_split_overlap": overlap}
    if calib_set.skipped_images and warn:
        for line in skipped_image_warnings(calib_set.skipped_images, "calibration image"):
            warn(line)
    settings["bias_correction"] = _pop_prop(q, "_bias_correction")
    settings["pair_fit"] = json.loads(_pop_prop(q, "_pair_fit") or "null")
    settings["ranges"] = json.loads(_pop_prop(q, "_ranges") or "null")
    settings["exact_on"] = "every CPU kind" if settings["pair_fit"] is not None else \
        ", ".join(k for k, kind in KINDS.items() if kind.saturates is False)
    _stamp(q, meta, settings, sorted(ignored))
    data = q.SerializeToString()
    result = QuantizeResult(
        input=model_path, output=output, meta=meta, settings=settings, calibration=calibration,
        rewritten_deconvs=prep.rewritten, folded_batchnorms=prep.folded, equalized=prep.equalized,
        rewrite_max_rel_diff=prep.max_rel_diff, kept_float=sorted(ignored),
        deconvs=int8_deconvolutions(q), float_bytes=model_bytes(model_path), int8_bytes=len(data),
        evaluation=evaluation, budget_steps=steps, seconds=time.perf_counter() - started, model=q)
    if evaluation is not None and not budget.met(evaluation):  # a NaN drop fails too
        raise BudgetError(f"INT8 {budget.miss(evaluation)} even with {len(ignored)} nodes in float: nothing "
                          "written; try more calibration data, or a looser budget", result)
    write_bytes_atomic(output, data)
    return result


def default_output(model: str | Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` beside it."""
    model = Path(model)
    return model.with_name(model.stem + ".int8.onnx")


def _made_for(cpu: str) -> CpuKind | None:
    """The CPU kind ``--cpu`` names (None: portable). This machine's kind when it is "auto"."""
    if cpu == "portable":
        return None
    return cpu_kind() if cpu == "auto" else KINDS[cpu]


def _pop_prop(q: onnx.ModelProto, key: str) -> str | None:
    props = list(q.metadata_props)
    value = next((p.value for p in props if p.key == key), None)
    del q.metadata_props[:]
    q.metadata_props.extend(p for p in props if p.key != key)
    return value


def _stamp(q: onnx.ModelProto, meta: ModelMeta, settings: dict, kept_float: list[str]) -> None:
    write_meta(q, meta.with_(precision="int8", posequant_version=__version__))
    entry = next((p for p in q.metadata_props if p.key == "quantization"), None) or q.metadata_props.add()
    entry.key = "quantization"
    entry.value = json.dumps({**settings, "kept_float": kept_float}, sort_keys=True)


def check_node_names(names: Iterable[str], model: onnx.ModelProto, where: str) -> tuple[str, ...]:
    """``names`` (--keep-float) when every one is a node of ``model``; else one line with the closest real names."""
    import difflib

    names = tuple(names)
    known = [n.name for n in model.graph.node if n.name]
    unknown = [n for n in names if n not in set(known)]
    if not unknown:
        return names
    close = difflib.get_close_matches(unknown[0], known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"its nodes are named like {', '.join(known[:3])}"
    more = f" (and {len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""
    raise QuantizeError(f"--keep-float {unknown[0]}{more}: {where} has no node of that name; {hint}")


# The splits eval and gate score on by default (calibration.datasets.DEFAULT_SPLITS for "eval").
EVAL_SPLITS = {"mpii": "valid", "coco": "val"}


def eval_split_overlap(root: Path, fmt: str, split: str | None, val_ds=None) -> str | None:
    """A warning when the calibration people come from the split that will score the INT8 model: the
    ``--val`` split, or the split eval/gate default to (MPII valid, COCO val when there is no train)."""
    if val_ds is not None:
        if (Path(val_ds.root).resolve(), val_ds.split) == (Path(root).resolve(), split):
            return (f"calibrating on {fmt.upper()} {split!r} of {root}, the split --val scores: the budget is then "
                    "measured on the calibration people (optimistic); calibrate on another split")
        return None
    if fmt in EVAL_SPLITS and split == EVAL_SPLITS[fmt]:
        return (f"calibrating on {fmt.upper()} {split!r} of {root}, the split eval and gate score by default: their "
                "scores will be optimistic; calibrate on a train split, or evaluate on another split")
    return None


def heldout_hint(result: "QuantizeResult") -> tuple[str, str]:
    """For the printed ``next:`` commands when calibration used the split they would score on: the
    ``--split`` to evaluate on instead ("" when there is no other) and a note saying so ("" when fine)."""
    from posequant.calibration.datasets import available_splits

    c = result.calibration
    if not c.get("eval_split_overlap") or result.settings.get("val"):
        return "", ""
    others = [s for s in available_splits(c["root"], c["format"]) if s != c["split"] and s != "test"]
    if others:
        return (f" --split {others[0]}",
                f"      (calibrated on {c['split']!r}: these score the held-out split {others[0]!r} instead)")
    return "", (f"      (note: these score {c['split']!r}, the split calibration used: optimistic; "
                "use held-out data for a real verdict)")


def _open_val(val, meta: ModelMeta, split, warn=None):
    from posequant.calibration.datasets import open_dataset

    ds = open_dataset(val, input_size=meta.input_size, split=split)
    if ds.invalid_warning() and warn:
        warn(f"--val: {ds.invalid_warning()}")
    if ds.keypoints is None:
        raise DataError(f"--val {val} is a plain image folder: the accuracy budget needs MPII or COCO ground truth")
    if ds.keypoints.num_joints != meta.num_joints:
        raise DataError(f"the model predicts {meta.num_joints} joints but --val {val} has {ds.keypoints.num_joints}")
    if ds.format == "mpii" and not (ds.root / "annot" / f"gt_{ds.split}.mat").is_file():
        raise DataError(f"--val {val} has no annot/gt_{ds.split}.mat: PCKh needs the official head boxes")
    return ds


# ---- accuracy budget ---------------------------------------------------------------------------

AGREEMENT = "agreement"  # Evaluation.metric when only the agreement is measured (--agreement-on, no --val)


@dataclass(frozen=True)
class Budget:
    """What the INT8 model must hold: the main metric's drop in points, and/or the agreement (OKS)."""

    max_drop: float | None
    min_agreement: float | None

    def met(self, e: "Evaluation") -> bool:
        drop_ok = self.max_drop is None or e.metric == AGREEMENT or e.drop <= self.max_drop
        agree_ok = self.min_agreement is None or (e.agreement is not None and e.agreement["OKS"] >= self.min_agreement)
        return bool(drop_ok and agree_ok)

    def miss(self, e: "Evaluation") -> str:
        parts = []
        if self.max_drop is not None and e.metric != AGREEMENT and not e.drop <= self.max_drop:
            parts.append(f"drops {e.metric} by {e.drop:.2f} points (budget {self.max_drop})")
        if self.min_agreement is not None and not (e.agreement and e.agreement["OKS"] >= self.min_agreement):
            oks = e.agreement["OKS"] if e.agreement else float("nan")
            parts.append(f"agrees with the float keypoints at OKS {oks:.3f} (needs {self.min_agreement:g})")
        return " and ".join(parts) or "meets the budget"

    def describe(self) -> str:
        parts = [f"{self.max_drop} points" if self.max_drop is not None else None,
                 f"agreement >= {self.min_agreement:g}" if self.min_agreement is not None else None]
        return ", ".join(p for p in parts if p)


def _open_agreement(root, meta: ModelMeta):
    from posequant.calibration.datasets import open_dataset

    ds = open_dataset(root, input_size=meta.input_size)
    if not ds.people:
        raise DataError(f"--agreement-on {root} has no people or images to compare on")
    return ds


def _evaluate(model: onnx.ModelProto, path: Path, val_ds, flip: bool):
    from posequant.benchmarks.evaluate import evaluate

    onnx.save(model, str(path))
    # degenerate records were named once, when --val was opened
    return evaluate(path, val_ds.root, split=val_ds.split, format=val_ds.format, flip=flip, warn=lambda m: None)


def _meet_budget(prepared, q, calib_set, ds, meta, tmp: Path, *, budget: Budget, flip, ignored, say,
                 warn=None):
    """Keep the most harmful nodes in float until ``budget`` holds on ``ds`` (labelled: the main metric and
    the agreement; a plain set: the agreement alone)."""
    from posequant.benchmarks.metrics import (
        FLOAT_FLOOR,
        agreement_of,
        agreement_sigmas,
        keypoint_agreement,
        main_metric,
        person_size,
    )

    say(f"evaluating float and INT8 on {len(ds.people)} people")
    labelled = budget.max_drop is not None
    if labelled:
        float_result = _evaluate(prepared, tmp / "float.onnx", ds, flip)
        float_metrics = float_result.metrics
        name, float_value = main_metric(float_metrics)
        if float_value < FLOAT_FLOOR and warn:
            warn(f"the float model scores {name} {float_value:.2f} on --val {ds.root} (below {FLOAT_FLOOR:g}): it "
                 "is not being scored, so the budget measures nothing; check its preprocessing and joint order")
    else:
        from posequant.benchmarks.agreement import keypoints_on

        onnx.save(prepared, str(tmp / "float.onnx"))
        reference, reference_scores = keypoints_on(tmp / "float.onnx", ds.people, backend="ort", flip=flip)
        sizes = person_size(np.array([p.scale for p in ds.people]))
        sigmas = agreement_sigmas(meta.keypoints, meta.num_joints)

    def measure(model):
        if labelled:
            result = _evaluate(model, tmp / "int8.onnx", ds, flip)
            return Evaluation(name, float_value, main_metric(result.metrics)[1], float_metrics, result.metrics,
                              len(ds.people), agreement_of(float_result, result, meta.keypoints))
        onnx.save(model, str(tmp / "int8.onnx"))
        got, _ = keypoints_on(tmp / "int8.onnx", ds.people, backend="ort", flip=flip)
        a = keypoint_agreement(reference, got, sizes, sigmas=sigmas, reference_scores=reference_scores)
        return Evaluation(AGREEMENT, 100.0, 100 * a["OKS"], {}, {}, len(ds.people), a)

    def line(e: Evaluation) -> str:
        oks = f"agreement OKS {e.agreement['OKS']:.3f}" if e.agreement else ""
        if e.metric == AGREEMENT:
            return oks
        return f"{e.metric}: float {e.float_value:.2f}, INT8 {e.int8_value:.2f} (drop {e.drop:.2f}); {oks}"

    evaluation = measure(q)
    steps = [_step(ignored, evaluation)]
    say(f"{line(evaluation)}; budget {budget.describe()}")
    if budget.met(evaluation):
        return q, ignored, evaluation, steps
    say("ranking the quantized nodes by harm (each one alone back in float, on 16 calibration crops)")
    ranking = [n for n in rank_harm(prepared, q, calib_set, limit=16) if n not in ignored]
    first, keep = q, frozenset(ignored)  # --keep-float nodes: NNCF left them out already
    # keeping most of the model in float is not an INT8 model any more: give up past a quarter
    cap = max(1, len(ranking) // 4)
    best = (q, ignored, evaluation)

    def attempt(count: int):
        chosen = keep | set(ranking[:count])
        # spliced into the graph already quantized: seconds, where re-quantizing takes a minute or more
        candidate = splice_float(prepared, first, ranking[:count])
        e = measure(candidate)
        steps.append(_step(chosen, e))
        say(f"{len(chosen)} nodes in float: {line(e)}")
        return candidate, chosen, e

    # the most harmful 1, 2, 4, ... nodes until the budget holds, then the fewest between the last two sizes
    low, count = 0, 1
    while count <= cap:
        q, ignored, evaluation = attempt(count)
        if _closer(evaluation, best[2], budget):
            best = (q, ignored, evaluation)
        if budget.met(evaluation):
            break
        low, count = count, (count * 2 if count < cap else cap + 1)
        count = min(count, cap) if low < cap else count
    else:
        return (*best, steps)  # never met: the closest step, never a worse one than a step with fewer nodes
    high = count
    while high - low > 1:
        mid = (low + high) // 2
        candidate = attempt(mid)
        if budget.met(candidate[2]):
            high, (q, ignored, evaluation) = mid, candidate
        else:
            low = mid
    return q, ignored, evaluation, steps


def _step(ignored, e: "Evaluation") -> dict:
    return {"kept_float": sorted(ignored), "int8": e.int8_value, "drop": e.drop,
            "agreement": e.agreement["OKS"] if e.agreement else None}


def _closer(e: "Evaluation", than: "Evaluation", budget: Budget) -> bool:
    """``e`` misses ``budget`` by less than ``than`` does (the sum of its shortfalls)."""
    def shortfall(x):
        miss = 0.0
        if budget.max_drop is not None and x.metric != AGREEMENT:
            miss += max(0.0, x.drop - budget.max_drop) if np.isfinite(x.drop) else np.inf
        if budget.min_agreement is not None:
            miss += 100 * max(0.0, budget.min_agreement - (x.agreement["OKS"] if x.agreement else 0.0))
        return miss
    return shortfall(e) < shortfall(than)


def quantized_nodes(prepared: onnx.ModelProto, q: onnx.ModelProto) -> list[str]:
    """Nodes of ``prepared`` that run quantized in ``q`` (an input read through a DequantizeLinear)."""
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    q_nodes = {n.name: n for n in q.graph.node}
    return [n.name for n in prepared.graph.node if n.op_type in QUANTIZABLE and n.name in q_nodes
            and any(producers.get(t) == "DequantizeLinear" for t in q_nodes[n.name].input)]


def splice_float(prepared: onnx.ModelProto, q: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """``q`` with the nodes ``names`` back in float: each reads its float inputs, weights and bias (from
    ``prepared``), nothing re-calibrated; what it feeds is quantized as before."""
    variant = copy.deepcopy(q)
    producers = {o for n in q.graph.node for o in n.output}
    # float activations the INT8 graph still computes (the input of each quantizer); those that
    # make_ort_friendly moved past (a dropped ReLU's output) are not there, and their uint8 stand-in stays
    in_q = producers | {i.name for i in q.graph.input}
    float_nodes = {n.name: n for n in prepared.graph.node}
    float_inits = {i.name: i for i in prepared.graph.initializer}
    nodes = {n.name: n for n in variant.graph.node}
    added: set[str] = set()
    for name in names:
        n, node = float_nodes[name], nodes[name]
        quantized_inputs = list(node.input)
        del node.input[:]
        for slot, t in enumerate(n.input):
            if t in float_inits:  # under a fresh name: ORT's quantizer gives a weight's DequantizeLinear output its name
                if f"{t}__float" not in added:
                    w = copy.deepcopy(float_inits[t])
                    w.name = f"{t}__float"
                    variant.graph.initializer.append(w)
                    added.add(w.name)
                t = f"{t}__float"
            elif t not in in_q and slot < len(quantized_inputs):
                t = quantized_inputs[slot]
            node.input.append(t)
    return variant


def rank_harm(prepared: onnx.ModelProto, q: onnx.ModelProto, calib_set: CalibrationSet, *, limit: int = 16) -> list[str]:
    """Quantized nodes of ``prepared``, most harmful first.

    A node's harm is how much of the INT8 model's output error goes away when that node alone runs
    in float (its float inputs, weights and bias spliced into the INT8 graph, nothing re-calibrated):
    the drop in relative squared error of every output (the heatmaps, or SimCC's x and y vectors, pooled)
    against float, on ``limit`` calibration crops. Ranking on the outputs rather than on the validation
    metric keeps it free of the metric's noise (on 68 COCO people a single keypoint decides about one AP
    point).
    """
    import onnxruntime as ort

    feeds = [f for _, f in zip(range(limit), calib_set.crops.feeds())]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3

    names = [o.name for o in prepared.graph.output]  # by name: every output, in one order for every graph

    def outputs(model: onnx.ModelProto) -> list[np.ndarray]:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return [o.astype(np.float64) for f in feeds for o in sess.run(names, f)]

    reference = outputs(prepared)
    norm = sum(float(np.sum(r ** 2)) for r in reference) or 1.0

    def error(model: onnx.ModelProto) -> float:
        return sum(float(np.sum((o - r) ** 2)) for o, r in zip(outputs(model), reference)) / norm

    base = error(q)
    harm = {name: base - error(splice_float(prepared, q, [name])) for name in quantized_nodes(prepared, q)}
    return sorted(harm, key=lambda k: -harm[k])
