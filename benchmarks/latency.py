"""``bench``: latency, throughput and memory of pose models on every backend of a device.

Every (model, backend, precision, batch) is one configuration. Repetitions are interleaved: each
round runs every configuration once (starting one further along each round), so drift on a shared
machine -- another process, thermal throttling -- hits all configurations alike. Percentiles are
over the rounds; p50 is the median that speedups are computed from.

All runners live in one process; ONNX Runtime's spinning threads are switched off in the runner
(they would otherwise steal the cores from whatever runs next and skew the comparison up to 2x).
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from posequant.core.args import Names, Paths, Runtime, Whole, Wholes, checked
from posequant.core.cpu import cpu_kind
from posequant.core.errors import MissingMetadataError, PosequantError
from posequant.core.fileio import temp_dir
from posequant.core.modelfiles import model_bytes
from posequant.core.onnxfile import load_onnx

from .machine import gpu_name, has_bf16, machine_facts, usable_cores
from .runners import BACKENDS, FORMAT_BACKEND, BackendError, Runner, make_runner, model_format

DEVICE_BACKENDS = {"cpu": ("torch", "ort", "openvino"), "cuda": ("torch", "ort", "tensorrt")}
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
Progress = Callable[[str], None]


# ---- what a model file is ----------------------------------------------------------------------


@dataclass
class BenchModel:
    """One model to time: its ONNX file (a checkpoint is exported first) and what the graph says."""

    label: str  # as the user gave it
    onnx: Path
    precision: str  # fp32, fp16 or int8, from the graph
    input_size: tuple[int, int]
    fixed_batch: int | None  # None: dynamic batch
    group: str  # models of one group share a float baseline
    size_mb: float  # the file the user gave (checkpoint or ONNX)
    conv_transpose: int = 0
    conv_transpose_unquantized: int = 0  # ConvTranspose without a DequantizeLinear in front
    module: Any = None  # torch.nn.Module when a checkpoint was given
    format: str = "onnx"  # onnx, ir (OpenVINO .xml: openvino only) or engine (TensorRT: tensorrt only)
    cpu_note: str | None = None  # an INT8 graph made for another CPU kind than this one (saturation.cpu_mismatch)


def onnx_precision(model) -> str:
    """``int8`` when the graph holds quantization ops (QDQ or QOperator), else ``fp16``/``fp32`` by its input.

    The graph decides, not the metadata: a model quantized by other tools keeps ``precision=fp32``.
    """
    import onnx

    if isinstance(model, (str, Path)):
        fmt = model_format(model)
        if fmt == "ir":  # what OpenVINO kept of the QDQ graph: FakeQuantize, int8 weights
            from posequant.core.irfile import ir_precision, load_ir

            return ir_precision(load_ir(model))
        if fmt == "engine":
            from posequant.core.enginefile import engine_info

            return str(engine_info(model).get("precision", "fp32"))
        model = load_onnx(model)
    if any(n.op_type in QUANT_OPS for n in model.graph.node):
        return "int8"
    inputs = model.graph.input
    if inputs and inputs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
        return "fp16"
    return "fp32"


def _graph_facts(proto) -> dict[str, Any]:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    producers = {out: n.op_type for n in proto.graph.node for out in n.output}
    deconvs = [n for n in proto.graph.node if n.op_type == "ConvTranspose"]
    return {
        "fixed_batch": static[0] if static else None,
        "hw": tuple(static[2:4]) if len(static) == 4 and None not in static[2:4] else None,
        "conv_transpose": len(deconvs),
        "conv_transpose_unquantized": sum(producers.get(n.input[0]) != "DequantizeLinear" for n in deconvs),
    }


def load_bench_model(path: Path, tmp: Path, export_options: dict | None = None) -> BenchModel:
    from posequant.core.metadata import read_meta

    path = Path(path)
    if not path.is_file():
        raise PosequantError(f"model {path} not found: check the path")
    module = None
    onnx_path = path
    fmt = model_format(path)
    if fmt != "onnx":
        return _load_deployed(path, fmt)
    if path.suffix.lower() != ".onnx":
        from posequant.exporter import export_pose

        res = export_pose(path, tmp / f"{path.stem}.onnx", verify_model=False, **(export_options or {}))
        onnx_path, module = res.output, res.model.module
    proto = load_onnx(onnx_path)
    facts = _graph_facts(proto)
    try:
        meta = read_meta(proto, str(path))
        size = meta.input_size
        group = f"{meta.source_sha256[:12] or path.stem} {size[0]}x{size[1]}"
    except MissingMetadataError:
        if facts["hw"] is None:
            from posequant.core.metadata import stamp_command

            raise PosequantError(f"{path} has no posequant metadata and no fixed input size; stamp it first: "
                                 f"{stamp_command(path, proto)}") from None
        size, group = facts["hw"], path.stem
    precision = onnx_precision(proto)
    note = None
    if precision == "int8":
        from posequant.calibration.saturation import cpu_mismatch

        note = cpu_mismatch(proto, path.name, cpu_kind())
    return BenchModel(str(path), onnx_path, precision, tuple(size), facts["fixed_batch"], group,
                      model_bytes(path) / 2**20, facts["conv_transpose"], facts["conv_transpose_unquantized"],
                      module, cpu_note=note)


def _load_deployed(path: Path, fmt: str) -> BenchModel:
    """An OpenVINO IR or a TensorRT engine: its metadata (required: nothing else gives the input size)."""
    from posequant.core.metadata import read_meta

    meta = read_meta(path)
    if fmt == "ir":
        from posequant.core import irfile

        ir = irfile.load_ir(path)
        batch, precision = irfile.input_batch(ir), irfile.ir_precision(ir)
        size_mb = (path.stat().st_size + irfile.bin_path(path).stat().st_size) / 2**20
    else:
        from posequant.core.enginefile import engine_info

        info = engine_info(path)
        batch, precision, size_mb = info.get("batch"), str(info.get("precision", "fp32")), path.stat().st_size / 2**20
    h, w = meta.input_size
    group = f"{meta.source_sha256[:12] or path.stem} {h}x{w}"
    return BenchModel(str(path), path, precision, (h, w), batch, group, size_mb, format=fmt)


# ---- which backends can run here ---------------------------------------------------------------


def backend_problem(backend: str, device: str, engines: bool = False) -> str | None:
    """Why ``backend`` cannot run on ``device`` here (not installed, no provider, no GPU), or None.

    ``engines``: the models are TensorRT engine files, which TensorRT runs itself (no ONNX Runtime provider)."""
    if engines and backend == "tensorrt" and device == "cuda":
        from posequant.core.enginefile import tensorrt_problem

        return tensorrt_problem()
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}"
    if backend not in DEVICE_BACKENDS[device]:
        return f"{backend} does not run on {device} here (on {device}: {', '.join(DEVICE_BACKENDS[device])})"
    if backend == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "openvino is not installed: pip install openvino"
    if backend == "torch" and device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return f"torch {torch.__version__} cannot use the GPU (a CPU build?): install a CUDA build of torch"
    if device == "cuda" and backend in ("ort", "tensorrt"):
        import onnxruntime as ort

        provider = {"ort": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[backend]
        if provider not in ort.get_available_providers():
            return f"onnxruntime has no {provider}: pip install 'posequant[gpu]' (onnxruntime-gpu)" + (
                " and TensorRT" if backend == "tensorrt" else "")
    return None


def check_device(device: str) -> None:
    if device not in DEVICE_BACKENDS:
        raise BackendError(f"unknown device {device!r}: use cpu or cuda")
    if device == "cuda" and gpu_name() is None:
        raise BackendError("--device cuda: no CUDA GPU found on this machine; use --device cpu")


def check_backend(backend: str, device: str, engines: bool = False) -> None:
    """Raise a one-line :class:`BackendError` when ``backend`` cannot run on ``device`` here."""
    check_device(device)
    problem = backend_problem(backend, device, engines)
    if problem:
        raise BackendError(f"--backend {backend}: {problem}")


def _openvino_bf16() -> bool:
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:
        return has_bf16()


def _precisions(model: BenchModel, backend: str, device: str) -> tuple[list[str], list[str]]:
    """(precisions to run, reasons for those skipped) of one model on one backend."""
    own = FORMAT_BACKEND.get(model.format)
    if own and backend != own:
        kind = "an OpenVINO IR" if model.format == "ir" else "a TensorRT engine"
        return [], [f"{kind} runs on {own} only"]
    if model.format == "engine":  # built at its precision
        return [model.precision], []
    if backend == "torch":
        if model.module is None:
            return [], ["torch eager needs a checkpoint; this MODEL is an ONNX file"]
        return (["fp32", "fp16"] if device == "cuda" else ["fp32"]), []
    if backend == "tensorrt":
        return (["int8"] if model.precision == "int8" else ["fp16"]), []
    if backend == "openvino" and model.precision == "fp32":
        if _openvino_bf16():
            return ["fp32", "bf16"], []
        return ["fp32"], ["bf16: this CPU has no BF16 instructions (AVX-512 BF16 or AMX)"]
    return [model.precision], []


# ---- timing ------------------------------------------------------------------------------------


def rss_mb() -> float | None:
    """Resident memory of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class _Config:
    model: BenchModel
    backend: str
    precision: str
    device: str
    batch: int
    runner: Runner
    inputs: np.ndarray
    memory_mb: float | None = None
    times_ms: list[float] = field(default_factory=list)


@dataclass
class BenchRow:
    model: str
    backend: str
    precision: str
    device: str
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float  # images per second at the median latency
    memory_mb: float | None  # host RSS growth from creating the runner through warm-up at this batch
    model_mb: float
    speedup: float | None  # float ORT (fp32) p50 of the same model group, device and batch / this p50
    speedup_vs_fp16: float | None  # GPU: the fastest fp16 row of the group / this p50
    runs: int
    group: str


@dataclass
class BenchResult:
    rows: list[BenchRow]
    machine: dict[str, Any]
    skipped: list[dict[str, Any]]
    warnings: list[str]
    settings: dict[str, Any]

    def row(self, model: str, backend: str, precision: str, batch: int = 1) -> BenchRow | None:
        for r in self.rows:
            if (r.model, r.backend, r.precision, r.batch) == (str(model), backend, precision, batch):
                return r
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"results": [asdict(r) for r in self.rows], "machine": self.machine, "skipped": self.skipped,
                "warnings": self.warnings, "settings": self.settings}


def _make_runner(model: BenchModel, backend: str, precision: str, device: str, threads: int | None) -> Runner:
    module = copy.deepcopy(model.module) if backend == "torch" else None  # torch converts modules in place
    # fixed shapes as a deployment at one batch size would run them (each batch compiles its own)
    return make_runner(backend, onnx_path=model.onnx, module=module, device=device, threads=threads,
                       precision=precision, static_shapes=True)


def _time_once(cfg: _Config) -> None:
    t = time.perf_counter()
    cfg.runner.infer(cfg.inputs)
    cfg.times_ms.append((time.perf_counter() - t) * 1e3)


def _rows(configs: list[_Config]) -> list[BenchRow]:
    rows = []
    for c in configs:
        p50, p90, p99 = (float(v) for v in np.percentile(c.times_ms, [50, 90, 99]))
        rows.append(BenchRow(c.model.label, c.backend, c.precision, c.device, c.batch, p50, p90, p99,
                             c.batch * 1e3 / p50, c.memory_mb, c.model.size_mb, None, None, len(c.times_ms),
                             c.model.group))
    for r in rows:
        peers = [p for p in rows if (p.group, p.device, p.batch) == (r.group, r.device, r.batch)]
        bases = [p for p in peers if p.backend == "ort" and p.precision == "fp32"]
        base = next((p for p in bases if p.model == r.model), bases[0] if bases else None)  # own export first
        r.speedup = base.p50_ms / r.p50_ms if base else None
        fp16 = [p.p50_ms for p in peers if p.precision == "fp16"]
        r.speedup_vs_fp16 = min(fp16) / r.p50_ms if (fp16 and r.device == "cuda") else None
    return rows


def _warnings(models: list[BenchModel], configs: list[_Config], device: str, threads: int | None) -> list[str]:
    out = []
    int8 = [c for c in configs if c.precision == "int8"]
    here = cpu_kind()
    if device == "cpu" and int8 and not here.fast_int8:
        out.append(f"this CPU ({here.describe()}) has no fast int8 dot product: INT8 convolutions run at about "
                   "FP32 speed here, so INT8 timings do not show what an AVX2, VNNI or AMX machine would")
    for m in models:
        if device == "cpu" and m.precision == "int8" and m.cpu_note:
            out.append(m.cpu_note)
        if m.precision != "int8" or not m.conv_transpose:
            continue
        if m.conv_transpose_unquantized:
            out.append(f"{m.label}: {m.conv_transpose_unquantized} of {m.conv_transpose} ConvTranspose "
                       "(deconvolution) nodes are not quantized (no DequantizeLinear in front): they run in "
                       "float on every backend")
        if any(c.model is m and c.backend == "ort" and c.device == "cpu" for c in int8):
            out.append(f"{m.label}: {m.conv_transpose} ConvTranspose (deconvolution) nodes run in float on "
                       "ONNX Runtime CPU, which has no INT8 ConvTranspose kernel; this caps the ORT INT8 speedup")
    if threads and threads > usable_cores():
        out.append(f"--threads {threads} is more than the {usable_cores()} cores this process may use")
    return out


@checked(models=Paths("model"), device=Runtime(), backends=Names(runtime=True), batches=Wholes(1),
         threads=Whole(1, optional=True), warmup=Whole(0), runs=Whole(1))
def bench(
    models: Sequence[str | Path],
    *,
    device: str = "cpu",
    backends: Sequence[str] | None = None,
    batches: Sequence[int] = (1, 8),
    threads: int | None = None,
    warmup: int = 5,
    runs: int = 50,
    export_options: dict | None = None,
    progress: Progress | None = None,
) -> BenchResult:
    """Time every model on every backend (default: all of ``device``'s) at every batch size.

    MODELs are .onnx files (the graph decides fp32/int8) or checkpoints (exported first, and also
    run in PyTorch eager). Backends named in ``backends`` must be usable here (else
    :class:`BackendError`); by default those that are not are listed in ``skipped`` with the reason.
    """
    say = progress or (lambda msg: None)
    check_device(device)
    explicit = backends is not None
    backends = list(dict.fromkeys(backends or DEVICE_BACKENDS[device]))
    skipped: list[dict[str, Any]] = []
    usable = []
    engines = any(model_format(m) == "engine" for m in models)
    for be in backends:
        problem = backend_problem(be, device, engines)
        if problem and explicit:
            raise BackendError(f"--backend {be}: {problem}")
        if problem:
            skipped.append({"model": "*", "backend": be, "precision": "*", "device": device, "reason": problem})
        else:
            usable.append(be)

    with temp_dir() as tmp:
        loaded = [load_bench_model(Path(m), Path(tmp), export_options) for m in models]
        configs = _prepare(loaded, usable, device, sorted(set(batches)), threads, warmup, explicit, skipped, say)
        if not configs:
            raise PosequantError("nothing could be benchmarked here: " +
                                 "; ".join(f"{s['backend']}: {s['reason']}" for s in skipped))
        gc.collect()
        for r in range(runs):
            if r % max(1, runs // 5) == 0:
                say(f"round {r + 1}/{runs} of {len(configs)} configurations")
            for i in range(len(configs)):
                _time_once(configs[(i + r) % len(configs)])
    settings = {"device": device, "backends": usable, "batches": sorted(set(batches)), "threads": threads,
                "warmup": warmup, "runs": runs}
    timed = list({id(c.model): c.model for c in configs}.values())
    return BenchResult(_rows(configs), machine_facts(threads), skipped,
                       _warnings(timed, configs, device, threads), settings)


def _prepare(models: list[BenchModel], backends: list[str], device: str, batches: list[int], threads: int | None,
             warmup: int, explicit: bool, skipped: list[dict], say: Progress) -> list[_Config]:
    """Create each runner and warm it up at each batch size, recording memory growth; skip what cannot run."""
    configs: list[_Config] = []
    rng = np.random.default_rng(0)
    inputs: dict[tuple, np.ndarray] = {}
    for model in models:
        for be in backends:
            precisions, reasons = _precisions(model, be, device)
            if explicit or be != "torch":  # torch on an .onnx MODEL is only news when asked for
                skipped.extend({"model": model.label, "backend": be, "precision": "*", "device": device,
                                "reason": why} for why in reasons)
            for prec in precisions:
                say(f"loading {Path(model.label).name} on {be} {prec} ({device})")
                gc.collect()
                before = rss_mb()
                try:
                    runner = _make_runner(model, be, prec, device, threads)
                except BackendError:
                    raise
                except Exception as e:  # a backend that cannot compile this graph: report, go on
                    skipped.append({"model": model.label, "backend": be, "precision": prec, "device": device,
                                    "reason": f"failed to load: {str(e).strip().splitlines()[0][:200]}"})
                    continue
                for b in batches:
                    if model.fixed_batch not in (None, b):
                        skipped.append({"model": model.label, "backend": be, "precision": prec, "device": device,
                                        "reason": f"batch {b}: the model has a fixed batch of {model.fixed_batch}"})
                        continue
                    key = (b, *model.input_size)
                    if key not in inputs:
                        inputs[key] = rng.standard_normal((b, 3, *model.input_size), dtype=np.float32)
                    cfg = _Config(model, be, prec, device, b, runner, inputs[key])
                    try:
                        for _ in range(max(1, warmup)):
                            runner.infer(cfg.inputs)
                    except Exception as e:
                        skipped.append({"model": model.label, "backend": be, "precision": prec, "device": device,
                                        "reason": f"batch {b} failed: {str(e).strip().splitlines()[0][:200]}"})
                        continue
                    after = rss_mb()
                    cfg.memory_mb = None if before is None or after is None else max(0.0, after - before)
                    configs.append(cfg)
    return configs


# ---- output ------------------------------------------------------------------------------------


def format_bench(result: BenchResult) -> str:
    from posequant.core.table import format_table

    m = result.machine
    flags = ", ".join(k for k, v in m["cpu_flags"].items() if v) or "none of AVX2/AVX-512/VNNI/BF16/AMX"
    lines = [f"{m['cpu']}: {m.get('cpu_kind_title', '?')} ({m.get('cpu_kind_source', '?')}); flags {flags}; "
             f"{m['threads']} threads of {m['cores']} cores"
             + (f"; GPU {m['gpu']}" if m.get("gpu") else "")]
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    s = result.settings
    lines.append(f"{s['runs']} interleaved rounds after {s['warmup']} warm-up runs; p50 is the median")

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [[Path(r.model).name, r.backend, r.precision, r.device, r.batch, f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}",
             f"{r.p99_ms:.2f}", f"{r.throughput:.1f}", num(r.memory_mb, ".0f"), f"{r.model_mb:.1f}",
             num(r.speedup, ".2f") + ("x" if r.speedup else "")] for r in result.rows]
    lines.append(format_table(["model", "backend", "precision", "device", "batch", "p50 ms", "p90 ms", "p99 ms",
                               "img/s", "mem MB", "size MB", "vs ORT fp32"], rows))
    if any(r.speedup_vs_fp16 for r in result.rows):
        lines.append("vs fp16: " + ", ".join(f"{Path(r.model).name} {r.backend} {r.precision} b{r.batch} "
                                            f"{r.speedup_vs_fp16:.2f}x" for r in result.rows if r.speedup_vs_fp16))
    for s in result.skipped:
        where = "" if s["model"] == "*" else f"{Path(s['model']).name} "
        prec = "" if s["precision"] == "*" else f" {s['precision']}"
        lines.append(f"skipped: {where}{s['backend']}{prec}: {s['reason']}")
    lines.extend(f"warning: {w}" for w in result.warnings)
    return "\n".join(lines)
