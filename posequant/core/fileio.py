"""Atomic file writes: an output file is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import PosequantError


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before hours of work) if ``path`` cannot be created."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise PosequantError(f"output {path} is a directory: give a file name, e.g. {path / 'model.onnx'}")
    if not parent.is_dir():
        raise PosequantError(f"output folder {parent} does not exist: create it or choose another -o path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PosequantError(f"cannot write to {parent}: permission denied; choose another -o path")
    if path.exists() and not os.access(path, os.W_OK):
        raise PosequantError(f"cannot overwrite {path}: permission denied; choose another -o path")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))
