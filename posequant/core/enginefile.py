"""A TensorRT engine file (``.engine``) and the posequant metadata beside it.

A serialized engine has no place for user metadata, so ``posequant convert --to tensorrt`` writes
the ONNX file's ``metadata_props`` (plus the engine's precision and batch) to ``MODEL.engine.json``;
:func:`engine_props` reads them back, so an engine reads the same ``ModelMeta`` as its ONNX file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .modelfiles import ENGINE_SUFFIXES, is_engine, sidecar_path  # noqa: F401  (named here too: an engine's files)
from .onnxfile import ModelFileError


def engine_info(path: str | Path) -> dict[str, Any]:
    """``{"props": {...}, "precision": ..., "batch": ...}`` from the engine's sidecar, checked."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model {path} not found: check the path")
    side = sidecar_path(path)
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"model {path} has no {side.name} beside it (its posequant metadata): build engines "
                             "with `posequant convert MODEL.onnx --to tensorrt`") from None
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{side} cannot be read ({type(e).__name__}): build the engine again with "
                             "`posequant convert`") from None
    if not isinstance(info, dict) or not isinstance(info.get("props"), dict):
        raise ModelFileError(f"{side} is not a posequant engine sidecar: build the engine again with "
                             "`posequant convert`")
    return info


def tensorrt_problem() -> str | None:
    """Why a TensorRT engine cannot be built or run here (no package, no GPU), or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'posequant[gpu]' on a machine with an NVIDIA GPU)"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible here"
    except ImportError:
        return "running an engine needs torch with CUDA for its GPU buffers"
    return None
