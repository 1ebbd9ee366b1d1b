"""The trained model's INT8 files on real AVX2 kernels, whatever CPU runs the suite: inference runs under
``qemu-x86_64 -cpu Haswell-v4`` (ONNX Runtime's MLAS and OpenVINO's oneDNN pick their AVX2 code from the
emulated CPUID), everything else natively (torch under emulation takes minutes to import).

Run by ``make test-avx2`` (``pytest --qemu -m qemu``); skipped by a plain ``pytest``. Correctness only:
nothing is timed under emulation.
- the ``--cpu avx2`` and ``--cpu portable`` files give heatmaps bit-identical to the file's exact integer
  semantics (its :func:`exact_twin` on ONNX Runtime, exact on every CPU), the ``--cpu vnni`` file does not;
- OpenVINO under qemu equals OpenVINO capped natively with ``ONEDNN_MAX_CPU_ISA=AVX2``;
- ``bench`` and ``gate`` (``python -m posequant``, under qemu) name the emulated kind from CPUID and say
  when a file was made for another kind, with the gate's measured cost of saturation.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from posequant.calibration.saturation import exact_twin

from conftest import COCO_MINI, TRAINED_ARCH, TRAINED_CKPT, needs_shared

pytestmark = [pytest.mark.qemu, pytest.mark.shared, needs_shared(TRAINED_CKPT, COCO_MINI)]

CPU = "Haswell-v4,-pcid,-x2apic,-tsc-deadline,-invpcid,-spec-ctrl"  # AVX2; what TCG lacks switched off (no warnings)
WORKER = Path(__file__).with_name("qemu_worker.py")
FILES = ("avx2", "portable", "vnni")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "POSEQUANT_CPU_KIND"}  # the kind must be detected
    return {**env, **extra}


def under_qemu(args: list[str], *, timeout: int = 900) -> subprocess.CompletedProcess:
    qemu = shutil.which("qemu-x86_64")
    if platform.machine() != "x86_64":
        pytest.skip("qemu-x86_64 emulates x86-64 user code on x86-64 hosts here")
    if qemu is None:
        pytest.fail("qemu-x86_64 not found: `make test-avx2` installs it (Debian's qemu-user)")
    res = subprocess.run([qemu, "-cpu", CPU, sys.executable, *args], capture_output=True, text=True,
                         timeout=timeout, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The float export, its INT8 files for three --cpu kinds, and 4 coco-mini val crops (all made natively)."""
    from posequant.calibration import iter_batches, open_dataset
    from posequant.calibration.quantize import quantize
    from posequant.core.metadata import read_meta
    from posequant.exporter import export_pose

    d = tmp_path_factory.mktemp("avx2")
    out = {"float": d / "model.onnx", "crops": d / "crops.npz"}
    export_pose(TRAINED_CKPT, out["float"], arch=TRAINED_ARCH, input_size=(256, 192), keypoints="coco",
                color="rgb", verify_model=False)
    for cpu in FILES:
        out[cpu] = quantize(out["float"], COCO_MINI, split="train", num_samples=32, cpu=cpu,
                            output=d / f"{cpu}.onnx").output
    meta = read_meta(out["float"])
    batch = next(iter(iter_batches(open_dataset(COCO_MINI, input_size=meta.input_size, split="val"), meta,
                                   batch_size=4, limit=4)))
    np.savez(out["crops"], x=batch.inputs)
    return out


def _outputs(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"out{i}"] for i in range(len(FILES))]


def test_avx2_and_portable_files_are_exact_on_avx2_kernels(files, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "ort.npz"
    under_qemu([str(WORKER), "ort", str(files["crops"]), str(out), *(str(files[c]) for c in FILES)])
    assert str(np.load(out)["kind"]) == "avx2"
    x = np.load(files["crops"])["x"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for cpu, emulated in zip(FILES, _outputs(out)):
        twin = ort.InferenceSession(exact_twin(onnx.load(str(files[cpu]))).SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        exact = np.concatenate([twin.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
        differs = float((emulated != exact).mean())
        if cpu == "vnni":  # measured: 55% of heatmap values differ, by up to 0.16 (peaks are about 1)
            assert differs > 0.05 and np.abs(emulated - exact).max() > 0.01, (differs, cpu)
        else:
            assert differs == 0.0, f"--cpu {cpu}: {differs:.4f} of heatmap values differ from the exact run"


def test_openvino_avx2_kernels_equal_the_native_isa_cap(files, tmp_path):
    emulated, capped = tmp_path / "qemu.npz", tmp_path / "capped.npz"
    args = [str(WORKER), "openvino", str(files["crops"])]
    models = [str(files[c]) for c in FILES]
    under_qemu([*args, str(emulated), *models])
    res = subprocess.run([sys.executable, *args, str(capped), *models], capture_output=True, text=True,
                         timeout=600, env=_env(ONEDNN_MAX_CPU_ISA="AVX2"))
    assert res.returncode == 0, res.stderr[-3000:]
    for cpu, a, b in zip(FILES, _outputs(emulated), _outputs(capped)):
        assert np.array_equal(a, b), f"--cpu {cpu}: OpenVINO under qemu differs from ONEDNN_MAX_CPU_ISA=AVX2"


def test_bench_under_emulation_names_the_kind_and_the_file_made_for_another(files, tmp_path):
    js = tmp_path / "bench.json"
    under_qemu(["-m", "posequant", "bench", str(files["vnni"]), str(files["avx2"]), "--backend", "ort",
                "--runs", "1", "--warmup", "0", "--batch", "1", "--json", str(js)])
    data = json.loads(js.read_text())
    m = data["machine"]
    assert m["cpu_kind"] == "avx2" and m["cpu_kind_source"].startswith("from CPUID"), m
    notes = [w for w in data["warnings"] if "saturating int16 pairs" in w]
    assert len(notes) == 1 and notes[0].startswith("vnni.onnx was quantized for vnni") and "--cpu avx2" in notes[0]


def test_gate_under_emulation_measures_what_saturation_costs(files, tmp_path):
    js = tmp_path / "gate.json"
    res = under_qemu(["-m", "posequant", "gate", "--float", str(files["float"]), "--int8", str(files["vnni"]),
                      "--data", str(COCO_MINI), "--limit", "8", "--runs", "1", "--min-speedup", "0", "--no-flip",
                      "--backend", "ort", "--max-drop", "100", "--max-joint-drop", "100", "--json", str(js)])
    cpu = json.loads(js.read_text())["cpu"]
    assert cpu["here"] == "avx2" and cpu["made_for"] == "vnni" and cpu["source"].startswith("from CPUID")
    assert "--cpu avx2" in cpu["note"] and "measured here" in cpu["note"]
    assert isinstance(cpu["saturation_cost_points"], float)
    assert "cpu: this machine is avx2 (from CPUID" in res.stdout + res.stderr
