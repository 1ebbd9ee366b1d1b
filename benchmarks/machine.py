"""Facts about the machine a benchmark ran on: CPU model and the flags that decide INT8/BF16 speed,
threads, GPU, library versions. Read without importing the big libraries where possible."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any

from posequant.core.cpu import cpu_flags, cpu_kind, cpu_model, kind_source

LIBRARIES = ("numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino")


def has_bf16() -> bool:
    f = cpu_flags()
    return f["avx512_bf16"] or f["amx_bf16"]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def gpu_name() -> str | None:
    """The first CUDA GPU's name, or None when there is none: torch's when something imported it already,
    else nvidia-smi's (importing torch only to name the GPU costs seconds, minutes under an emulator)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
            if out.returncode == 0 and names:
                return names[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def openvino_default_precision() -> str | None:
    """What OpenVINO's CPU plugin runs float models in when no precision hint is given."""
    try:
        import openvino as ov

        return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    except Exception:  # not installed, or an older API: a missing fact, not a failure
        return None


def machine_facts(threads: int | None = None) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_kind": cpu_kind().name,
        "cpu_kind_title": cpu_kind().describe(),
        "cpu_kind_source": kind_source(),
        "cpu_flags": cpu_flags(),
        "cores": usable_cores(),
        "threads": threads or usable_cores(),
        "gpu": gpu_name(),
        "os": f"{platform.system()} {platform.release()}",
        "versions": library_versions(),
    }
    try:
        import onnxruntime as ort

        facts["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    facts["openvino_default_precision"] = openvino_default_precision()
    return facts
