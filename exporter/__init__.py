"""Checkpoints in, verified ONNX out.

Public entry points: :func:`export_pose` (the stage), :func:`inspect_checkpoint` (what is in a file),
:func:`load_checkpoint` and :func:`resolve_model` (the steps, for library users).
"""

from .checkpoint import Checkpoint, load_checkpoint
from .export import ExportResult, export_pose
from .inspect import CheckpointInfo, inspect_checkpoint
from .model import PoseModel, resolve_model
from .verify import VerifyReport

__all__ = [
    "export_pose", "ExportResult", "inspect_checkpoint", "CheckpointInfo", "load_checkpoint",
    "Checkpoint", "resolve_model", "PoseModel", "VerifyReport",
]
