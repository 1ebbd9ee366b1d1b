"""``pipeline``: checkpoint to a gated INT8 model in one call, all files in one folder.

Steps: export (with simplification and the PyTorch parity check) -> quantize (calibrated on
``calib``) -> gate on ``val``, which evaluates both models on the same people and times both in one
interleaved benchmark. The folder then holds::

    model.onnx            the float export
    model.int8.onnx       the INT8 (QDQ) model
    quantize.md/.json     the quantization report
    gate/                 the gate's report.md, report.json, disagreements.png
    summary.json          every stage's result, the verdict and the timings

A run's folder never mixes runs: once the inputs are checked, the files a previous run left there
under these names are removed (the summary first), and the summary is written last, so a run that
fails part-way leaves no verdict behind. Other files in the folder are left alone; no output may be
one of the run's inputs (or a file inside the --calib/--val folders).

Each stage is the same library function its own command calls, so the pipeline equals
``export-pose``, ``quantize`` and ``gate`` run one after another.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from posequant.benchmarks.gate import GateResult, gate
from posequant.benchmarks.gate_report import format_gate
from posequant.calibration import open_dataset
from posequant.calibration.qreport import quantize_report_markdown
from posequant.calibration.quantize import QuantizeResult, quantize
from posequant.core.args import Runtime, Size, Whole, checked
from posequant.core.errors import CheckpointError, DataError
from posequant.core.fileio import arch_file, check_outputs, output_dir, write_text_atomic
from posequant.core.numbers import check_number
from posequant.core.table import format_table
from posequant.exporter import ExportResult, export_pose

FLOAT_NAME, INT8_NAME = "model.onnx", "model.int8.onnx"
SUMMARY = "summary.json"
# Everything a run writes, the summary first: the order stale files are removed in.
RUN_FILES = (SUMMARY, "gate/report.md", "gate/report.json", "gate/disagreements.png", "quantize.md",
             "quantize.json", INT8_NAME, FLOAT_NAME)


@dataclass(frozen=True)
class GateBudget:
    """What the INT8 model must hold to pass (the gate command's options, same defaults)."""

    max_drop: float = 0.5  # main metric, points (COCO AP x 100, MPII PCKh@0.5)
    max_joint_drop: float = 2.0  # per joint group, points of PCK@0.2 / PCKh@0.5
    min_speedup: float = 1.5  # float p50 / INT8 p50, batch 1, on the target backend

    def __post_init__(self) -> None:
        # NaN would make every "drop > budget" false: a gate that cannot fail
        # a negative drop budget is allowed: it demands that INT8 beat float (it can only fail more)
        for name, minimum in (("max_drop", None), ("max_joint_drop", None), ("min_speedup", 0.0)):
            object.__setattr__(self, name, check_number(name, getattr(self, name), minimum=minimum))


@dataclass
class PipelineResult:
    out_dir: Path
    export: ExportResult
    quantize: QuantizeResult
    gate: GateResult
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    files: dict[str, str] = field(default_factory=dict)  # what -> path

    @property
    def passed(self) -> bool:
        return self.gate.passed

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.gate.reasons, "out_dir": str(self.out_dir),
                "files": self.files, "seconds": self.seconds, "export": self.export.to_dict(),
                "quantize": self.quantize.to_dict(), "gate": self.gate.to_dict()}


def _check_inputs(checkpoint: Path, calib: Path, val: Path, val_split: str | None) -> None:
    """The cheap checks of every input, before the folder is touched and before minutes of export."""
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} {'is not a file' if checkpoint.exists() else 'not found'}: "
                              "check the path")
    if not calib.exists():
        raise DataError(f"--calib {calib} does not exist: give an MPII or COCO dataset, or a folder of images")
    if not val.exists():
        raise DataError(f"--val {val} does not exist: give an MPII or COCO dataset with ground truth")
    ds = open_dataset(val, input_size=(256, 256), split=val_split)  # the size only scales COCO boxes
    if ds.keypoints is None:
        raise DataError(f"--val {val} is a plain image folder: the gate needs MPII or COCO ground truth")


def _clear_previous_run(out: Path) -> None:
    """Remove what an earlier run wrote under this run's names (the verdict first)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


@checked(input_size=Size(), num_samples=Whole(1), runs=Whole(1), threads=Whole(1, optional=True), target=Runtime())
def run_pipeline(
    checkpoint: str | Path,
    calib: str | Path,
    val: str | Path,
    out_dir: str | Path = "pipeline-out",
    *,
    arch: str | None = None,
    input_size: tuple[int, int] | None = None,
    keypoints: str | None = None,
    color: str | None = None,
    trust_pickle: bool = False,
    calib_split: str | None = None,
    val_split: str | None = None,
    num_samples: int = 300,
    target: str = "ort",
    budget: GateBudget = GateBudget(),
    flip: bool = True,
    runs: int = 30,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> PipelineResult:
    """Export ``checkpoint``, quantize it calibrated on ``calib``, and gate INT8 against float on ``val``.

    ``target`` is the runtime the INT8 graph is shaped for and the backend the gate evaluates and
    times both models on. Bad input raises :class:`PosequantError`; a failed gate does not raise:
    read ``result.passed`` (the CLI turns it into exit 1).
    """
    checkpoint, calib, val, out = Path(checkpoint), Path(calib), Path(val), Path(out_dir)
    check_outputs({"-o/": (out, RUN_FILES)},
                  {"CHECKPOINT": checkpoint, "--arch": arch_file(arch), "--calib": calib, "--val": val})
    _check_inputs(checkpoint, calib, val, val_split)
    with output_dir(out, "-o"):
        _clear_previous_run(out)
        return _run(checkpoint, calib, val, out, arch=arch, input_size=input_size, keypoints=keypoints, color=color,
                    trust_pickle=trust_pickle, calib_split=calib_split, val_split=val_split,
                    num_samples=num_samples, target=target, budget=budget, flip=flip, runs=runs, threads=threads,
                    progress=progress)


def _run(checkpoint: Path, calib: Path, val: Path, out: Path, *, arch, input_size, keypoints, color, trust_pickle,
         calib_split, val_split, num_samples, target, budget, flip, runs, threads, progress) -> PipelineResult:
    say = progress or (lambda _m: None)
    seconds: dict[str, float] = {}

    def stage(n: int, name: str) -> float:
        say(f"[{n}/3] {name}")
        return time.perf_counter()

    t = stage(1, f"export and simplify {Path(checkpoint).name} -> {out / FLOAT_NAME}")
    exported = export_pose(checkpoint, out / FLOAT_NAME, arch=arch, input_size=input_size, keypoints=keypoints,
                           color=color, trust_pickle=trust_pickle, progress=progress)
    seconds["export"] = time.perf_counter() - t

    t = stage(2, f"quantize for {target}, calibrated on {calib}")
    quantized = quantize(exported.output, calib, output=out / INT8_NAME, split=calib_split, num_samples=num_samples,
                         target=target, progress=progress, warn=lambda m: say(f"warning: {m}"))
    write_text_atomic(out / "quantize.md", quantize_report_markdown(quantized), "-o")
    write_text_atomic(out / "quantize.json", json.dumps(quantized.to_dict(), indent=2, default=str) + "\n", "-o")
    seconds["quantize"] = time.perf_counter() - t

    t = stage(3, f"gate on {val}: evaluate float and INT8, time both on {target}")
    verdict = gate(exported.output, quantized.output, val, max_drop=budget.max_drop,
                   max_joint_drop=budget.max_joint_drop, min_speedup=budget.min_speedup, backend=target, flip=flip,
                   split=val_split, threads=threads, runs=runs, report_dir=out / "gate", progress=progress)
    seconds["gate"] = time.perf_counter() - t
    seconds["total"] = sum(seconds.values())

    files = {"float": str(exported.output), "int8": str(quantized.output), "quantize_report": str(out / "quantize.md"),
             "quantize_json": str(out / "quantize.json"), "gate_report": str(out / "gate" / "report.md"),
             "summary": str(out / SUMMARY)}
    result = PipelineResult(out, exported, quantized, verdict, seconds, files)
    write_text_atomic(out / SUMMARY, json.dumps(result.to_dict(), indent=2, default=str) + "\n", "-o")  # last
    return result


def format_pipeline(result: PipelineResult) -> str:
    """The gate's checks, then one row per stage: what it made and how long it took."""
    e, q, g = result.export, result.quantize, result.gate
    verify = f"verified vs {e.verification.reference}" if e.verification else "not verified"  # a stamp: its original
    main = g.scores[g.main_metric]
    speed = f"{g.speedup:.2f}x on {g.backend}" if g.speedup is not None else "speedup not measured"
    rows = [
        ["export", f"{Path(e.output).name}, {e.onnx_bytes / 2**20:.2f} MiB, {verify}", f"{result.seconds['export']:.1f}"],
        ["quantize", f"{Path(q.output).name}, {q.int8_bytes / 2**20:.2f} MiB, {q.calibration.get('people', '?')} "
                     f"calibration people, {len(q.kept_float)} nodes in float", f"{result.seconds['quantize']:.1f}"],
        ["gate", f"{g.main_metric} {main['float']:.2f} -> {main['int8']:.2f} ({main['delta']:+.2f}), {speed}: "
                 f"{'PASS' if g.passed else 'FAIL'}", f"{result.seconds['gate']:.1f}"],
    ]
    return "\n".join([
        format_gate(g), "",
        f"pipeline: {'PASS' if result.passed else 'FAIL'}  ({result.out_dir})",
        format_table(["stage", "result", "seconds"], rows),
        f"summary: {result.files['summary']}",
    ])
