"""posequant: trained PyTorch pose models to fast, verified INT8 deployments.

One function per job, each with its result type::

    import posequant

    exported = posequant.export_pose("pose_resnet_50_256x192.pth", "model.onnx", data="data/coco")
    quantized = posequant.quantize(exported.output, "data/coco", output="model.int8.onnx")
    scores = posequant.evaluate(quantized.output, "data/coco")
    timings = posequant.bench([exported.output, quantized.output])
    verdict = posequant.gate(exported.output, quantized.output, "data/coco")
    everything = posequant.run_pipeline("pose_resnet_50_256x192.pth", "data/coco", "data/coco", "out")

Layout, imports running one way (front end -> stages -> core):

- front end: this module (the API), ``posequant.cli`` (the ``posequant`` command, also
  ``python -m posequant``), ``posequant.pipeline`` (all stages in one call), ``posequant.demo``;
- stages: ``posequant.exporter`` (checkpoints, model zoo, ONNX export), ``posequant.calibration``
  (datasets, preprocessing, quantization), ``posequant.benchmarks`` (metrics, evaluation, latency,
  gate);
- core: ``posequant.core`` (errors, keypoint sets, model metadata, file writing, tables, version).

The names below load on first use, so ``import posequant`` stays cheap (no torch, no ONNX Runtime)
and the stages can import ``posequant.core`` without importing each other.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.version import __version__

# name -> module that defines it
_API = {
    "export_pose": "posequant.exporter.export",
    "ExportResult": "posequant.exporter.export",
    "inspect_checkpoint": "posequant.exporter.inspect",
    "CheckpointInfo": "posequant.exporter.inspect",
    "convert": "posequant.exporter.convert",
    "ConvertResult": "posequant.exporter.convert",
    "quantize": "posequant.calibration.quantize",
    "QuantizeResult": "posequant.calibration.quantize",
    "evaluate": "posequant.benchmarks.evaluate",
    "EvalResult": "posequant.benchmarks.evaluate",
    "eval_mpii_preds": "posequant.benchmarks.predictions",
    "bench": "posequant.benchmarks.latency",
    "BenchResult": "posequant.benchmarks.latency",
    "gate": "posequant.benchmarks.gate",
    "GateResult": "posequant.benchmarks.gate",
    "predict": "posequant.benchmarks.predict",
    "PredictResult": "posequant.benchmarks.predict",
    "run_pipeline": "posequant.pipeline",
    "PipelineResult": "posequant.pipeline",
    "GateBudget": "posequant.pipeline",
    "PosequantError": "posequant.core.errors",
}

__all__ = ["__version__", *_API]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .benchmarks.evaluate import EvalResult, evaluate
    from .benchmarks.gate import GateResult, gate
    from .benchmarks.latency import BenchResult, bench
    from .benchmarks.predict import PredictResult, predict
    from .benchmarks.predictions import eval_mpii_preds
    from .calibration.quantize import QuantizeResult, quantize
    from .core.errors import PosequantError
    from .exporter.convert import ConvertResult, convert
    from .exporter.export import ExportResult, export_pose
    from .exporter.inspect import CheckpointInfo, inspect_checkpoint
    from .pipeline import GateBudget, PipelineResult, run_pipeline


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'posequant' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
