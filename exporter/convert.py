"""A posequant ONNX model to a deployment format: OpenVINO IR (``.xml`` + ``.bin``) or a TensorRT engine.

Both carry the ONNX file's posequant metadata (IR: ``rt_info``; engine: a ``.engine.json`` beside it),
so ``eval``/``bench``/``gate`` read the same :class:`ModelMeta` from them. Outputs follow the project's
rules: checked before the work, never onto the input, written complete or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from posequant.core.enginefile import sidecar_path, tensorrt_problem
from posequant.core.errors import ExportError, PosequantError
from posequant.core.fileio import atomic_path, check_outputs, output_dir, temp_dir, write_error, write_problem
from posequant.core.irfile import bin_path, ir_precision, write_ir_props
from posequant.core.metadata import read_meta
from posequant.core.modelfiles import model_bytes
from posequant.core.onnxfile import load_onnx

FORMATS = ("openvino", "tensorrt")
COMPRESSIONS = ("fp16",)


class ConvertError(PosequantError):
    """A conversion that cannot be done here (TensorRT missing, a graph the converter refuses)."""


@dataclass(frozen=True)
class ConvertResult:
    input: Path
    output: Path  # the .xml or the .engine
    companion: Path  # the .bin or the .engine.json
    to: str
    precision: str  # of what was written: fp32/fp16/int8
    input_mb: float
    output_mb: float  # both files

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items()}


def default_output(model: Path, to: str) -> Path:
    return model.with_suffix(".xml" if to == "openvino" else ".engine")


def _resolve_output(model: Path, to: str, output: str | Path | None) -> tuple[Path, Path | None]:
    """(the output file, the folder -o named for it or None)."""
    if output is None:
        return default_output(model, to), None
    out = Path(output)
    want, kind = (".xml", "an OpenVINO IR") if to == "openvino" else (".engine", "a TensorRT engine")
    if out.is_dir() or (not out.suffix and to == "openvino"):  # a folder: the model's name inside it
        return out / default_output(model, to).name, out
    if out.suffix.lower() != want:
        raise PosequantError(f"-o {out}: {kind} is written as a {want} file; e.g. -o {out.with_suffix(want)}")
    return out, None


def convert(model: str | Path, to: str, *, output: str | Path | None = None, compress_weights: str | None = None,
            fp16: bool = False) -> ConvertResult:
    """Convert the posequant ONNX ``model`` to ``to`` (``openvino`` or ``tensorrt``).

    ``compress_weights="fp16"`` stores an IR's float weights as fp16 (halves the float .bin; INT8
    weights stay int8); ``fp16`` lets TensorRT pick fp16 kernels. An INT8 (QDQ) model stays INT8.
    """
    model = Path(model)
    if to not in FORMATS:
        raise PosequantError(f"--to {to!r}: choose one of {', '.join(FORMATS)}")
    if model.suffix.lower() != ".onnx":
        raise PosequantError(f"MODEL {model} is not an .onnx file: convert the posequant ONNX export "
                             "(`posequant export-pose`, `posequant quantize`)")
    if compress_weights not in (None, *COMPRESSIONS):
        raise PosequantError(f"--compress-weights {compress_weights!r}: only fp16 is supported")
    if to == "tensorrt" and compress_weights:
        raise PosequantError("--compress-weights is for --to openvino; TensorRT takes --fp16")
    if to == "openvino" and fp16:
        raise PosequantError("--fp16 is for --to tensorrt; an OpenVINO IR takes --compress-weights fp16")
    out, folder = _resolve_output(model, to, output)
    companion = bin_path(out) if to == "openvino" else sidecar_path(out)
    if folder is not None:
        check_outputs({"-o/": (folder, [out.name, companion.name])}, {"MODEL": model})
    else:
        check_outputs({"-o": out, f"-o ({companion.suffix})": companion}, {"MODEL": model})
    proto = load_onnx(model)
    read_meta(proto, str(model))  # a posequant model, its graph matching its metadata
    props = {p.key: p.value for p in proto.metadata_props}
    # a new -o folder: made, or removed again when the conversion fails
    with output_dir(folder) if folder is not None else contextlib.nullcontext():
        if to == "openvino":
            precision = _to_openvino(model, out, props, compress_weights == "fp16")
        else:
            precision = _to_tensorrt(model, proto, out, props, fp16)
    size = (out.stat().st_size + companion.stat().st_size) / 2**20
    return ConvertResult(model, out, companion, to, precision, model_bytes(model) / 2**20, size)


def _to_openvino(model: Path, out: Path, props: dict[str, str], compress: bool) -> str:
    import openvino as ov

    from posequant.core.quiet import quiet

    try:
        with quiet():
            # read_model, not convert_model: the IR is then the graph OpenVINO runs for the .onnx itself (convert_model
            # reads a QDQ graph otherwise: up to 0.08 off on the trained model's --target ort INT8 heatmaps)
            ir = ov.Core().read_model(str(model))
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ConvertError(f"OpenVINO cannot convert {model} ({first}): re-export it with `posequant export-pose`") \
            from None
    # every metadata key, verbatim: the IR reads back the same ModelMeta
    write_ir_props(ir, props)
    precision = ir_precision(ir)
    if compress and precision != "int8":
        precision = "fp16"
    _save_pair(ir, out, compress, model_bytes(model) + 2**16)
    return precision


def _save_pair(ir, out: Path, compress: bool, nbytes: int) -> None:
    """Write the .xml and .bin in a temporary folder beside ``out`` and move both into place: the pair
    appears together (the .bin first, so a reader never finds an .xml without its weights) or not at all.
    ``nbytes``: about what the pair takes, to find the reason when OpenVINO's writer fails without one."""
    import openvino as ov

    target = Path(os.path.realpath(out))
    with atomic_path(out) as xml_tmp, atomic_path(bin_path(out), "-o (.bin)") as bin_tmp:
        with temp_dir(prefix=f".{target.stem}.", dir=target.parent) as d:
            try:
                ov.save_model(ir, str(Path(d) / "m.xml"), compress_to_fp16=compress)
            except Exception as e:  # a C++ stream error ("basic_ios::clear: iostream error"): ask the OS why
                problem = write_problem(target.parent, nbytes)
                if problem is not None:
                    raise write_error("-o", out, problem) from None
                raise ExportError(f"OpenVINO could not write {out} ({str(e).strip().splitlines()[0][:160]}): "
                                  "check the folder, or choose another -o") from None
            # atomic_path renames xml_tmp/bin_tmp into place when both blocks end (the .bin's block first)
            os.replace(Path(d) / "m.bin", bin_tmp)
            os.replace(Path(d) / "m.xml", xml_tmp)


# ---- TensorRT ----------------------------------------------------------------------------------


# a dynamic-batch ONNX model gets one optimization profile: batches 1..MAX_ENGINE_BATCH, tuned for 1
MAX_ENGINE_BATCH = 32
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _to_tensorrt(model: Path, proto, out: Path, props: dict[str, str], fp16: bool) -> str:
    """Builder -> network from the ONNX parser -> config (FP16 flag; INT8 from the QDQ scales: explicit
    quantization, no calibrator) -> serialized engine. Written but not run where TensorRT is absent."""
    problem = tensorrt_problem()
    if problem:
        raise ConvertError(f"--to tensorrt: {problem}; build the engine on the GPU machine that will run it")
    import tensorrt as trt

    int8 = any(n.op_type in QDQ_OPS for n in proto.graph.node)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # explicit batch: the default (and only) mode from TensorRT 10, a flag before
    network = builder.create_network(0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))[:200]
        raise ConvertError(f"TensorRT's ONNX parser refuses {model} ({errors or 'no reason given'})")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:  # the Q/DQ nodes carry the scales: TensorRT's explicit quantization
        config.set_flag(trt.BuilderFlag.INT8)
    inp = network.get_input(0)
    dims = list(inp.shape)
    batch = dims[0] if dims[0] > 0 else None
    if batch is None:
        profile = builder.create_optimization_profile()
        rest = tuple(dims[1:])
        profile.set_shape(inp.name, (1, *rest), (1, *rest), (MAX_ENGINE_BATCH, *rest))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConvertError(f"TensorRT could not build an engine from {model} (see its log with --verbose)")
    precision = "int8" if int8 else ("fp16" if fp16 else "fp32")
    info = {"props": props, "precision": precision, "batch": batch, "max_batch": batch or MAX_ENGINE_BATCH,
            "tensorrt": trt.__version__, "source": str(model)}
    with atomic_path(out) as engine_tmp, atomic_path(sidecar_path(out), "-o (.json)") as side_tmp:
        engine_tmp.write_bytes(bytes(serialized))
        side_tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
    return precision
