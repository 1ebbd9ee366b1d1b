"""A model is all of its files: the one place that says which files a model path stands for.

An ONNX model may keep its weights in other files (external data: ``onnx.save(...,
save_as_external_data=True)``, every model over 2 GiB), an OpenVINO IR is an ``.xml`` and its ``.bin``,
and a TensorRT engine carries its metadata in ``.engine.json``. Those files are inputs as much as the
path the user typed: :func:`posequant.core.fileio.check_outputs` refuses an output onto any of them,
and :func:`sha256_of_model` hashes them all.

External-data locations are resolved as ONNX and ONNX Runtime resolve them: relative to the folder of
the model path (not the current directory).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
from pathlib import Path
from typing import Any, Iterator

ONNX_SUFFIX = ".onnx"
IR_SUFFIX = ".xml"  # an OpenVINO IR: the .xml and its .bin
ENGINE_SUFFIXES = (".engine", ".plan")  # a TensorRT engine: its metadata in ENGINE.json


def is_ir(path: Any) -> bool:
    return isinstance(path, (str, Path)) and Path(path).suffix.lower() == IR_SUFFIX


def bin_path(xml: str | Path) -> Path:
    return Path(xml).with_suffix(".bin")


def is_engine(path: Any) -> bool:
    return isinstance(path, (str, Path)) and Path(path).suffix.lower() in ENGINE_SUFFIXES


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def _node_tensors(nodes) -> Iterator[Any]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def _tensors(graph) -> Iterator[Any]:
    """Every TensorProto of a graph and its sub-graphs (If/Loop bodies) that can hold external data."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _node_tensors(graph.node)


def external_locations(model) -> list[str]:
    """The external-data ``location`` of every tensor of ``model`` (an ``onnx.ModelProto``), each once, in order."""
    from onnx import TensorProto

    seen: dict[str, None] = {}
    for t in itertools.chain(_tensors(model.graph), *(_node_tensors(f.node) for f in model.functions)):
        if t.data_location == TensorProto.EXTERNAL:
            where = next((e.value for e in t.external_data if e.key == "location"), None)
            if where:
                seen.setdefault(where)
    return list(seen)


def external_files(path: str | Path, model=None) -> list[Path]:
    """The files an ONNX model at ``path`` keeps its weights in (``[]`` when it is self-contained), resolved
    against the model's folder. ``model``: the proto, when it was loaded already."""
    path = Path(path)
    if model is None:
        return list(_external_files_cached(*_key(path)))
    return [Path(os.path.normpath(path.parent / loc)) for loc in external_locations(model)]


def _key(path: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=64)
def _external_files_cached(path: str, _mtime: int, _size: int) -> tuple[Path, ...]:
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX, truncated: the stage that opens it says so in one line
        return ()
    return tuple(external_files(path, model))


def companion_files(path: str | Path) -> list[tuple[str, Path]]:
    """The other files the model at ``path`` is made of, each with what it is: an IR's ``.bin``, an engine's
    ``.json``, an ONNX model's external-data files. ``[]`` for anything else (a checkpoint, a folder)."""
    path = Path(path)
    if is_ir(path):
        return [(".bin", bin_path(path))]
    if is_engine(path):
        return [(".json", sidecar_path(path))]
    if path.suffix.lower() == ONNX_SUFFIX and path.is_file():
        return [("external data", p) for p in external_files(path)]
    return []


def model_bytes(path: str | Path) -> int:
    """The size of the model on disk: the file and its external-data files."""
    path = Path(path)
    return path.stat().st_size + sum(p.stat().st_size for p in external_files(path) if p.is_file()) \
        if path.suffix.lower() == ONNX_SUFFIX else path.stat().st_size


def sha256_of_model(path: str | Path) -> str:
    """SHA-256 of the model file, then of each external-data file in order (the file alone when it has none)."""
    path = Path(path)
    h = hashlib.sha256()
    for p in [path, *(external_files(path) if path.suffix.lower() == ONNX_SUFFIX else [])]:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
