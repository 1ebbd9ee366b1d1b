"""Opening an ONNX model file: the one place a path becomes an ``onnx.ModelProto``.

Every stage that reads a model from disk comes through :func:`load_onnx`, so a damaged or wrong
file is one line naming the file and what is wrong with it, never a protobuf traceback (a
zero-byte file even parses as an empty model). :func:`check_graph` holds the graph to the metadata
it carries (what it computes is checked by the decoder's head, ``posequant.core.decoding``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import MetadataError, PosequantError
from .fileio import read_head

PROTOBUF_LIMIT = 2**31 - 1  # the most one serialized protobuf (a self-contained .onnx file) can hold


class ModelFileError(PosequantError):
    """The file given as an ONNX model is missing, empty, damaged or something else."""


def _kind_of(head: bytes) -> str | None:
    """What a file that fails to parse as ONNX probably is, from its first bytes."""
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "a PyTorch checkpoint (zip or pickle), not an ONNX model: export it with `posequant export-pose`"
    if head[:1] in (b"{", b"["):
        return "a JSON/text file, not an ONNX model"
    return None


def load_onnx(path: str | Path, *, what: str = "model", load_external_data: bool = False) -> Any:
    """``onnx.load`` with one-line errors: not found, a directory, empty, not ONNX, truncated, external data
    missing. ``load_external_data``: read external weights into the proto (a self-contained model in memory)."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    head = read_head(path, what, ".onnx file", ModelFileError)  # missing, a directory, unreadable, empty
    kind = _kind_of(head)
    if kind:
        raise ModelFileError(f"{what} {path} is {kind}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError:
        model = None
    except Exception as e:  # onnx raises many types
        raise _load_error(what, path, e) from None
    # random bytes can decode as a protobuf of unknown fields: a model has a graph with inputs and outputs
    if model is None or not model.graph.node or not model.graph.output or not _graph_inputs(model):
        raise ModelFileError(f"{what} {path} is truncated or not an ONNX protobuf: re-export or re-download it")
    from .modelfiles import external_files

    weights = external_files(path, model)
    missing = [p for p in weights if not p.is_file()]
    if missing:
        raise ModelFileError(f"{what} {path} keeps its weights in {missing[0]} (external data), which is not there: "
                             "copy it beside the model (its location is relative to the model's folder)")
    if load_external_data and weights:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:  # a location outside the folder, a file too short, ...
            raise _load_error(what, path, e) from None
    return model


def _load_error(what: str, path: Path, e: Exception) -> ModelFileError:
    return ModelFileError(f"{what} {path} cannot be loaded as ONNX ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120] if str(e) else ''}): check the file")


def _graph_inputs(model) -> list:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(value_info) -> list[int | str] | None:
    """Static dims as ints, symbolic ones as their names ('?' when unnamed); None when the rank is unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def _show(dims) -> str:
    return "x".join(str(d) for d in dims) if dims else "a scalar"


def check_graph(model, meta, where: str) -> None:
    """The graph takes one N x 3 x H x W input and returns what ``meta``'s head says: one N x joints x h x w
    heatmap output, or two SimCC outputs N x joints x Lx and N x joints x Ly (by the names the metadata gives).

    Only static dims are compared here; symbolic ones are checked on the first inference
    (``posequant.core.decoding``'s heads).
    """
    inputs, outputs = _graph_inputs(model), list(model.graph.output)
    hint = "re-export it with `posequant export-pose`"
    if len(inputs) != 1:
        raise MetadataError(f"{where} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); a pose model "
                            f"takes one N x 3 x H x W image batch: {hint}")
    h, w = meta.input_size
    want_in = ["N", 3, h, w]
    got = _dims(inputs[0])
    if got is not None and not _fits(got, want_in):
        raise MetadataError(f"{where}: input {inputs[0].name!r} is {_show(got)}, but its metadata expects "
                            f"{_show(want_in)} (N x 3 colour channels x input_size): {hint}")
    for value_info, want, what in expected_outputs(outputs, meta, where, hint):
        got = _dims(value_info)
        if got is not None and not _fits(got, want):
            raise MetadataError(f"{where}: output {value_info.name!r} is {_show(got)}, but its metadata expects "
                                f"{_show(want)} {what}: {hint}")


def _fits(got: list, want: list) -> bool:
    """Same rank, and every static dim (after the batch) equal to the expected one."""
    return len(got) == len(want) and not any(isinstance(g, int) and g and g != e for g, e in zip(got[1:], want[1:]))


def expected_outputs(outputs: list, meta, where: str, hint: str) -> list[tuple[Any, list, str]]:
    """(output, expected dims, what they are) for each output the head needs; the outputs are found by the
    metadata's names (``meta.outputs``), or taken in order. Anything else is one line."""
    names = [o.name for o in outputs]
    if meta.head == "simcc":
        ly, lx = meta.heatmap_size
        if len(outputs) != 2:
            raise MetadataError(f"{where} has {len(outputs)} outputs ({', '.join(names)}); its metadata says SimCC, "
                                f"two outputs N x joints x Lx and N x joints x Ly: {hint}")
        missing = [n for n in meta.outputs if n not in names]
        if missing:
            raise MetadataError(f"{where} has no output {missing[0]!r} (its outputs: {', '.join(names)}), which its "
                                f"metadata names as SimCC's: {hint}")
        by_name = {o.name: o for o in outputs}
        x, y = (by_name[n] for n in meta.outputs) if meta.outputs else outputs
        return [(x, ["N", meta.num_joints, lx], "(SimCC x: num_joints x input width x split ratio)"),
                (y, ["N", meta.num_joints, ly], "(SimCC y: num_joints x input height x split ratio)")]
    if len(outputs) != 1:
        raise MetadataError(f"{where} has {len(outputs)} outputs ({', '.join(names)}); a pose model returns one "
                            f"N x joints x h x w heatmap batch: {hint}")
    return [(outputs[0], ["N", meta.num_joints, *meta.heatmap_size], "heatmaps (num_joints x heatmap_size)")]


def opset_of(model) -> int:
    """The default (``ai.onnx``) domain's opset the graph is written in."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def convert_opset(model, target: int, where: str) -> Any:
    """``model`` rewritten in opset ``target`` by ``onnx.version_converter`` (metadata kept), checked by
    ``onnx.checker``; one line when the converter has no adapter for one of its ops. The caller checks
    that the converted graph computes what the original did."""
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001 - the converter raises RuntimeError with a C++ assertion
        why = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
        raise PosequantError(f"{where} (opset {opset_of(model)}) cannot be converted to opset {target} ({why}): "
                             f"re-export it at opset {target} or newer from its framework") from None
    del converted.metadata_props[:]
    converted.metadata_props.extend(model.metadata_props)
    return converted
