"""Inference backends behind one small interface: ``runner.run(inputs) -> outputs`` (every output, in the
order of the names it was made with: a SimCC model's x then y), ``runner.infer(inputs)`` the first one.

Backends are imported lazily (OpenVINO and CUDA builds are large and optional at run time);
a backend that is not installed, or a device that is not there, is one clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from posequant.core.enginefile import is_engine, tensorrt_problem
from posequant.core.errors import PosequantError
from posequant.core.opened import model_format
from posequant.core.onnxfile import ModelFileError
from posequant.core.quiet import ort_session, quiet


class BackendError(PosequantError):
    """A backend or device that cannot be used here."""


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


class Runner(Protocol):
    backend: str
    device: str
    precision: str

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, ...]: ...

    def infer(self, inputs: np.ndarray) -> np.ndarray: ...


class _FirstOutput:
    def infer(self, inputs: np.ndarray) -> np.ndarray:
        """The first output (a heatmap model's only one): what bench times and the detector reads."""
        return self.run(inputs)[0]


@dataclass
class OrtRunner(_FirstOutput):
    path: Path
    device: str = "cpu"
    threads: int | None = None
    backend: str = "ort"
    precision: str = "fp32"
    outputs: tuple[str, ...] | None = None  # output names to return, in this order (None: all, the graph's)

    def __post_init__(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.backend == "ort-reference":
            # DequantizeLinear -> float op -> QuantizeLinear, unfused: a QDQ graph's own semantics, exact on
            # every CPU (no int8 kernels, so no int16 pair saturation), slow
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        # spinning threads steal the cores from whatever runs next in this process
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # a provider that fails to start (ORT prints "*** EP Error ***" and falls back) is refused: the
        # results would be labelled with a device they did not run on
        try:
            self.session = ort_session(str(self.path), opts, self._providers(ort), fallback="error")
        except PosequantError:
            raise
        except Exception as e:  # a graph that parses but does not load (unknown op, bad shapes): one line
            raise ModelFileError(f"{self.path}: ONNX Runtime cannot load this graph ({_first_line(e)}): "
                                 "re-export it with `posequant export-pose`") from None
        self.input_name = self.session.get_inputs()[0].name

    def _providers(self, ort) -> list:
        if self.device != "cuda":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError("--device cuda with --backend ort needs onnxruntime-gpu and a CUDA GPU: "
                               "pip install 'posequant[gpu]', or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(self.session.run(list(self.outputs) if self.outputs else None, {self.input_name: inputs}))


@dataclass
class TensorRTRunner(OrtRunner):
    """ONNX Runtime's TensorRT execution provider: FP16 for float models, INT8 from a QDQ model's scales."""

    backend: str = "tensorrt"

    def _providers(self, ort) -> list:
        if self.device != "cuda":
            raise BackendError("--backend tensorrt runs on --device cuda only")
        if "TensorrtExecutionProvider" not in ort.get_available_providers():
            raise BackendError("--backend tensorrt needs onnxruntime-gpu built with TensorRT and the TensorRT "
                               "libraries: pip install 'posequant[gpu]' tensorrt")
        options = {"trt_fp16_enable": True, "trt_int8_enable": self.precision == "int8"}
        return [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]


@dataclass
class OpenVINORunner(_FirstOutput):
    """OpenVINO CPU. With ``static_shapes`` the model is compiled once per input shape it is given,
    reshaped to that shape: OpenVINO's CPU plugin picks faster kernels and fuses more for static
    shapes (HRNet-W32 INT8 here: 14% faster at batch 1), which is how a deployment at a fixed batch
    would run it. Evaluation, with a short last batch, keeps the one dynamic-batch compilation."""

    path: Path
    device: str = "cpu"
    threads: int | None = None
    precision: str = "fp32"
    backend: str = "openvino"
    static_shapes: bool = False
    outputs: tuple[str, ...] | None = None

    def __post_init__(self):
        try:
            import openvino as ov
        except ImportError:
            raise BackendError("--backend openvino needs the openvino package: pip install openvino") from None
        if self.device != "cpu":
            raise BackendError("--backend openvino runs on --device cpu here; use ort or torch for cuda")
        hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}.get(self.precision, "f32")
        self.config = {"INFERENCE_PRECISION_HINT": hint}
        if self.threads:
            self.config["INFERENCE_NUM_THREADS"] = self.threads
        self.core = ov.Core()
        try:
            with quiet():
                self.model = self.core.read_model(str(self.path))  # an unreadable graph fails here, at load
        except Exception as e:
            raise ModelFileError(f"{self.path}: OpenVINO cannot read this graph ({_first_line(e)}): "
                                 "re-export it with `posequant export-pose`") from None
        # (an .xml IR is opened through posequant.core.irfile first, by read_meta: a missing .bin is named there)
        self.compiled_by_shape: dict[tuple, object] = {}
        self.compiled = None if self.static_shapes else self._compile(self.model)

    def _compile(self, model):
        with quiet():  # OpenVINO's own warnings (--verbose shows them)
            return self.core.compile_model(model, "CPU", self.config)

    def _compiled_for(self, shape: tuple):
        if shape not in self.compiled_by_shape:
            model = self.model.clone()
            model.reshape({model.inputs[0]: list(shape)})
            self.compiled_by_shape[shape] = self._compile(model)
        return self.compiled_by_shape[shape]

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        compiled = self._compiled_for(inputs.shape) if self.static_shapes else self.compiled
        result = compiled(inputs)
        return tuple(result[n] for n in self.outputs) if self.outputs else tuple(result.to_tuple())


@dataclass
class TorchRunner(_FirstOutput):
    module: object  # torch.nn.Module returning heatmaps, or a tuple of outputs in the head's order
    device: str = "cpu"
    threads: int | None = None
    precision: str = "fp32"
    backend: str = "torch"

    def __post_init__(self):
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu")
        if self.threads:
            torch.set_num_threads(self.threads)
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self.dtype = dtype
        self.module = self.module.to(self.device, dtype).eval()

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(inputs).to(self.device, self.dtype)
            out = self.module(x)
            return tuple(o.float().cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,)))


@dataclass
class OrtReferenceRunner(OrtRunner):
    """ONNX Runtime with graph optimizations off: what an INT8 graph computes by its own definition."""

    backend: str = "ort-reference"


@dataclass
class TensorRTEngineRunner(_FirstOutput):
    """A serialized TensorRT engine (``posequant convert --to tensorrt``), its buffers on the GPU through torch.
    Written against TensorRT 10's tensor API; not run where TensorRT is absent."""

    path: Path
    device: str = "cuda"
    threads: int | None = None
    precision: str = "fp32"
    backend: str = "tensorrt"
    outputs: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.device != "cuda":
            raise BackendError(f"{self.path} is a TensorRT engine: it runs with --device cuda only")
        problem = tensorrt_problem()
        if problem:
            raise BackendError(f"{self.path} is a TensorRT engine and cannot run here: {problem}")
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(self.path).read_bytes())
        if self.engine is None:
            raise ModelFileError(f"{self.path}: TensorRT cannot load this engine (built by another TensorRT "
                                 "version or GPU?): build it again here with `posequant convert --to tensorrt`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.input_name = inputs[0]
        self.output_names = list(self.outputs) if self.outputs else [n for n in names if n not in inputs]

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(inputs)).cuda()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        ys = []
        for name in self.output_names:
            ys.append(torch.empty(tuple(self.context.get_tensor_shape(name)), device="cuda", dtype=torch.float32))
            self.context.set_tensor_address(name, ys[-1].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.path}: TensorRT failed to run a batch of {len(inputs)}")
        stream.synchronize()
        return tuple(y.cpu().numpy() for y in ys)


# the only backend each non-ONNX format runs on
FORMAT_BACKEND = {"ir": "openvino", "engine": "tensorrt"}


def resolve_backend(path, backend: str | None, option: str = "--backend") -> str:
    """The backend ``path`` runs on: ``backend`` when given (refused, in one line, where the format cannot
    run on it), else ``ort`` for ONNX, ``openvino`` for an IR, ``tensorrt`` for an engine."""
    fmt = model_format(path) if path is not None else "onnx"
    own = FORMAT_BACKEND.get(fmt)
    if backend is None:
        return own or "ort"
    if own and backend != own:
        kind = "an OpenVINO IR" if fmt == "ir" else "a TensorRT engine"
        raise BackendError(f"{option} {backend}: {path} is {kind} and runs on {own} only; drop {option} or "
                           f"give the .onnx file")
    return backend


ONNX_RUNNERS: dict[str, Callable[..., Runner]] = {"ort": OrtRunner, "openvino": OpenVINORunner,
                                                  "tensorrt": TensorRTRunner, "ort-reference": OrtReferenceRunner}
BACKENDS = ("torch", "ort", "openvino", "tensorrt")


def make_runner(backend: str, *, onnx_path: Path | None = None, module=None, device: str = "cpu",
                threads: int | None = None, precision: str = "fp32", static_shapes: bool = False,
                outputs: tuple[str, ...] | None = None) -> Runner:
    """``static_shapes``: compile for each input shape seen (OpenVINO; ORT measured no difference).
    ``outputs``: the output names ``run`` returns, in that order (a ``ModelFile``'s ``outputs``); None: all."""
    if backend == "torch":
        if module is None:
            raise BackendError("--backend torch needs a PyTorch checkpoint as MODEL, not an .onnx file")
        return TorchRunner(module, device, threads, precision)
    if backend is not None and backend not in ONNX_RUNNERS:
        raise BackendError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    backend = resolve_backend(onnx_path, backend)  # None: the model file's own (ort for ONNX)
    outputs = tuple(outputs) if outputs else None
    if is_engine(onnx_path):
        return TensorRTEngineRunner(Path(onnx_path), device, threads, precision=precision, outputs=outputs)
    if backend == "openvino":
        return OpenVINORunner(Path(onnx_path), device, threads, precision=precision, static_shapes=static_shapes,
                              outputs=outputs)
    return ONNX_RUNNERS[backend](Path(onnx_path), device, threads, precision=precision, outputs=outputs)
