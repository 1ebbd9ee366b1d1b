"""Run ONNX models on one backend over saved inputs, one sample at a time: what the emulated-CPU tests run
under qemu-x86_64 (numpy, ONNX Runtime and OpenVINO only: torch takes minutes to import there).

    python tests/qemu_worker.py ort|openvino INPUTS.npz OUT.npz MODEL.onnx...

INPUTS.npz holds ``x`` (N, 3, H, W); OUT.npz gets ``out0``, ``out1``, ... (one per model, N stacked outputs)
and ``kind`` (the CPU kind posequant detects here)."""

from __future__ import annotations

import sys

import numpy as np


def run(backend: str, model: str, x: np.ndarray) -> np.ndarray:
    if backend == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.concatenate([compiled({0: x[i:i + 1]})[0] for i in range(len(x))])


def main(argv: list[str]) -> None:
    from posequant.core.cpu import cpu_kind

    backend, inputs, out, *models = argv
    x = np.load(inputs)["x"]
    results = {f"out{i}": run(backend, m, x) for i, m in enumerate(models)}
    np.savez(out, kind=np.array(cpu_kind().name), **results)


if __name__ == "__main__":
    main(sys.argv[1:])
