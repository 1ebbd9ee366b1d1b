"""Opening an OpenVINO IR model (``.xml`` + ``.bin``): the one place such a path becomes an ``ov.Model``.

``posequant convert --to openvino`` copies every ONNX ``metadata_props`` entry into the IR's
``rt_info`` under :data:`RT_SECTION`, so an IR reads back the same :class:`ModelMeta` as the ONNX
file it was made from. Like :mod:`.onnxfile`, a missing ``.bin``, a file that is not IR, or a
graph that disagrees with its metadata is one line naming the file, never an OpenVINO traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import MetadataError
from .modelfiles import IR_SUFFIX, bin_path, is_ir  # noqa: F401  (named here too: an IR's files)
from .onnxfile import ModelFileError

RT_SECTION = "posequant"  # rt_info key holding the ONNX metadata_props, one entry per key
# what OpenVINO makes of a QDQ graph: activations as FakeQuantize, weights as int8/uint8 constants
QUANT_OPS = ("FakeQuantize",)
INT8_TYPES = ("i8", "u8")


def load_ir(path: str | Path, *, what: str = "model") -> Any:
    """``ov.Core().read_model`` with one-line errors: not found, no .bin beside it, not an IR."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} {path} not found: check the path" if not path.exists() else
                             f"{what} {path} is not a regular file: give the IR's .xml file")
    if not bin_path(path).is_file():
        raise ModelFileError(f"{what} {path} has no weights file {bin_path(path).name} beside it: an OpenVINO IR is "
                             "an .xml and .bin pair; copy both, or convert again with `posequant convert`")
    with path.open("rb") as f:
        head = f.read(512).lstrip()
    if not head.startswith(b"<?xml") and not head.startswith(b"<net"):
        raise ModelFileError(f"{what} {path} is not an OpenVINO IR (.xml): make one with "
                             "`posequant convert MODEL.onnx --to openvino`")
    try:
        import openvino as ov
    except ImportError:
        raise ModelFileError(f"{what} {path} is an OpenVINO IR: reading it needs the openvino package "
                             "(pip install openvino)") from None
    from .quiet import quiet

    try:
        with quiet():
            return ov.Core().read_model(str(path))
    except Exception as e:  # OpenVINO raises RuntimeError with a C++ stack for any bad file
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{what} {path} cannot be read as an OpenVINO IR ({first}): convert it again with "
                             "`posequant convert`") from None


def ir_props(model: Any) -> dict[str, str]:
    """The posequant metadata an IR carries (``{}`` when it has none)."""
    if not model.has_rt_info([RT_SECTION]):
        return {}
    section = model.get_rt_info()[RT_SECTION]
    if not isinstance(section, dict):
        return {}
    return {str(k): v.astype(str) for k, v in section.items()}


def write_ir_props(model: Any, props: dict[str, str]) -> None:
    for key, value in props.items():
        model.set_rt_info(value, [RT_SECTION, key])


def _dims(port) -> list[int | str] | None:
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic:
        return None
    return [d.get_length() if d.is_static else "?" for d in shape]


def input_batch(model: Any) -> int | None:
    dims = _dims(model.inputs[0]) if model.inputs else None
    return dims[0] if dims and isinstance(dims[0], int) else None


def ir_precision(model: Any) -> str:
    """``int8`` when OpenVINO kept quantization (FakeQuantize or int8 weight constants), else fp16/fp32."""
    ops = model.get_ops()
    if any(op.get_type_name() in QUANT_OPS for op in ops) or any(
            op.get_type_name() == "Constant" and op.get_element_type().get_type_name() in INT8_TYPES for op in ops):
        return "int8"
    if model.inputs and model.inputs[0].get_element_type().get_type_name() == "f16":
        return "fp16"
    return "fp32"


def check_ir_graph(model: Any, meta, where: str) -> None:
    """One N x 3 x H x W input and the outputs ``meta``'s head says (static dims only): one N x joints x h x w
    heatmap output, or two SimCC outputs found by their names."""
    hint = "convert it again from the posequant ONNX file with `posequant convert`"
    n_out = 2 if meta.head == "simcc" else 1
    if len(model.inputs) != 1 or len(model.outputs) != n_out:
        kind = "two SimCC outputs" if n_out == 2 else "one heatmap batch"
        raise MetadataError(f"{where} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; a pose model "
                            f"takes one N x 3 x H x W image batch and returns {kind}: {hint}")
    checks = [(model.inputs[0], [3, *meta.input_size], "input")]
    if meta.head == "simcc":
        ly, lx = meta.heatmap_size
        ports = {name: port for port in model.outputs for name in port.get_names()}
        missing = [n for n in meta.outputs if n not in ports]
        if missing:
            raise MetadataError(f"{where} has no output {missing[0]!r}, which its metadata names as SimCC's: {hint}")
        x, y = (ports[n] for n in meta.outputs) if meta.outputs else model.outputs
        checks += [(x, [meta.num_joints, lx], "output (SimCC x)"), (y, [meta.num_joints, ly], "output (SimCC y)")]
    else:
        checks.append((model.outputs[0], [meta.num_joints, *meta.heatmap_size], "output"))
    for port, want, what in checks:
        got = _dims(port)
        if got is not None and (len(got) != len(want) + 1
                                or any(isinstance(g, int) and g != e for g, e in zip(got[1:], want))):
            shown = "x".join(str(d) for d in got)
            raise MetadataError(f"{where}: {what} is {shown}, but its metadata expects N x "
                                f"{'x'.join(str(w) for w in want)}: {hint}")
