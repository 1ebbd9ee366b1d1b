"""A pose model file opened once: its format, metadata, batch and head, for every stage that runs it.

The formats are told apart by the file name (``.xml``: an OpenVINO IR, ``.engine``/``.plan``: a TensorRT
engine, else ONNX); :func:`open_model` reads the file once (through :mod:`.onnxfile`, :mod:`.irfile` or
:mod:`.enginefile`, so a bad file is one line), checks its graph against its metadata, and returns a
:class:`ModelFile` that eval, gate and predict pass on instead of the path (which files make up a model is
:mod:`.modelfiles`'s).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .enginefile import engine_info
from .irfile import input_batch as ir_input_batch
from .irfile import load_ir
from .metadata import ModelMeta, input_batch, ir_meta, read_meta
from .modelfiles import is_engine, is_ir
from .onnxfile import load_onnx

FORMATS = ("onnx", "ir", "engine")


def model_format(path: Any) -> str:
    """``onnx``, ``ir`` (OpenVINO .xml) or ``engine`` (TensorRT), from the file name."""
    if is_ir(path):
        return "ir"
    if is_engine(path):
        return "engine"
    return "onnx"


@dataclass(frozen=True)
class ModelFile:
    """An exported pose model: where it is, what format, its metadata (checked against the graph), the batch
    its file fixes (None: dynamic)."""

    path: Path
    format: str
    meta: ModelMeta
    batch: int | None

    @property
    def head(self) -> str:
        """``heatmap`` or ``simcc``: what the outputs are (``posequant.core.decoding``)."""
        return self.meta.head

    @property
    def outputs(self) -> tuple[str, ...] | None:
        """The output names in the head's order (SimCC: x, y), or None: the graph's own order."""
        return self.meta.outputs or None

    def __str__(self) -> str:
        return str(self.path)


def open_model(path: str | Path | ModelFile, where: str | None = None) -> ModelFile:
    """Open ``path`` once (a :class:`ModelFile` is returned as it is)."""
    if isinstance(path, ModelFile):
        return path
    path = Path(path)
    where = where or str(path)
    fmt = model_format(path)
    if fmt == "ir":
        ir = load_ir(path)
        return ModelFile(path, fmt, ir_meta(ir, where), ir_input_batch(ir))
    if fmt == "engine":
        info = engine_info(path)
        return ModelFile(path, fmt, ModelMeta.from_props(info["props"], where), info.get("batch"))
    proto = load_onnx(path)
    return ModelFile(path, fmt, read_meta(proto, where), input_batch(proto))
