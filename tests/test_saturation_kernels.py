"""The CPU kind and the INT8 convolution kernels as they run on this CPU, against the numpy model of their
arithmetic (``calibration/saturation.py``): ONNX Runtime and OpenVINO, on convolutions built to saturate.

Torch-free and conftest-free: ``make test-avx2`` runs this very file under ``qemu-x86_64 -cpu Haswell-v4``
(AVX2: both backends saturate) and ``-cpu Nehalem-v1`` (SSE4.2: OpenVINO saturates, ONNX Runtime's SSE
kernels are exact), where the kernels choose their code from the emulated CPUID, as does the kind. Natively it
checks whatever CPU runs the suite. Nothing here assumes an instruction set: each expectation follows the
kind detected from CPUID (``POSEQUANT_CPU_KIND`` names the kind graphs are made for, not what kernels do).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from posequant.calibration import saturation as S
from posequant.core.cpu import ENV, KINDS, classify, cpu_kind, detected_kind, kind_source, read_cpu_flags
from posequant.core.errors import PosequantError

from qdq_cases import MATMULS, PATHS, conv_model, run_openvino, run_ort, saturating_matmul, saturating_model

HERE = detected_kind()
# `make test-avx2` says which kind the emulated CPU must be detected as
EXPECTED_KIND = os.environ.get("POSEQUANT_TEST_EXPECT_KIND")


# ---- the kind ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("machine, flags, kind", [
    ("x86_64", {"avx2"}, "avx2"),
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, "avx512"),
    ("x86_64", {"avx2", "avx512f", "avx512bw", "avx512_vnni"}, "vnni"),
    ("x86_64", {"avx2", "avx_vnni"}, "vnni"),
    ("x86_64", {"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}, "amx"),
    ("x86_64", {"sse4_1"}, "x86"),
    ("x86_64", set(), "x86"),
    ("aarch64", {"asimddp"}, "arm64"),
    ("riscv64", set(), "other"),
    ("", set(), "other"),
])
def test_cpu_kinds(machine, flags, kind):
    k = classify(machine, flags)
    assert k.name == kind
    assert k.saturates is {"avx2": True, "avx512": True, "x86": True, "vnni": False, "amx": False,
                           "arm64": False, "other": None}[kind]
    # measured under qemu: on SSE4.1 CPUs MLAS widens to int16 (exact), oneDNN saturates
    assert k.saturates_on("ort") is {"x86": False}.get(kind, k.saturates)
    assert k.saturates_on("openvino") is k.saturates
    assert k.describe()
    assert classify(machine, {f: True for f in flags}) == k  # the dict form of the flags too


def _cpuid(*present: str) -> dict[str, bool]:
    from posequant.core.cpu import CPUID_NAMES

    return {name: name in present for name in CPUID_NAMES.values()}


@pytest.mark.parametrize("cpuid, proc, kind, source, denied", [
    # a real Alder Lake: CPUID (numpy) knows no AVX-VNNI bit; /proc/cpuinfo adds it, denying nothing
    (_cpuid("avx", "avx2", "vaes"), {"avx", "avx2", "vaes", "avx_vnni"}, "vnni", "CPUID + /proc/cpuinfo", None),
    # a real AMX Xeon
    (_cpuid("avx2", "avx512f", "avx512bw", "avx512_vnni"),
     {"avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8"}, "amx", "CPUID + /proc/cpuinfo", None),
    # qemu -cpu Haswell-v4 on that Xeon: the host's /proc/cpuinfo, Haswell's CPUID
    (_cpuid("avx2", "avx"), {"avx", "avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_int8"}, "avx2", "CPUID",
     "avx512bw"),
    # qemu -cpu Nehalem-v1 on an AVX2 host
    (_cpuid("sse4_2"), {"sse4_2", "avx", "avx2"}, "x86", "CPUID", "avx2"),
    # no /proc/cpuinfo (macOS, Windows): CPUID alone
    (_cpuid("avx2"), set(), "avx2", "CPUID", None),
    # numpy gives no CPUID (not x86, or an old numpy): /proc/cpuinfo alone
    (None, {"avx2", "avx512_vnni"}, "vnni", "/proc/cpuinfo", None),
])
def test_flags_come_from_cpuid_and_cpuinfo_only_where_it_agrees(cpuid, proc, kind, source, denied):
    found = read_cpu_flags(cpuid, proc)
    assert classify("x86_64", found.flags).name == kind
    assert found.source == source
    assert (found.note is None) == (denied is None)
    if denied:
        assert denied in found.note and "CPUID" in found.note


def test_this_machine_has_a_kind():
    assert HERE.name in KINDS
    assert kind_source().startswith("from ")


def test_the_environment_names_the_kind_graphs_are_made_for(monkeypatch):
    monkeypatch.setenv(ENV, "AMX")
    assert cpu_kind().name == "amx" and detected_kind() == HERE
    assert f"set by {ENV}" in kind_source() and HERE.name in kind_source()
    monkeypatch.setenv(ENV, "zen5")
    with pytest.raises(PosequantError, match=f"{ENV}='zen5' is not a CPU kind: use one of avx2, "):
        cpu_kind()


@pytest.mark.skipif(not EXPECTED_KIND, reason="run by make test-avx2 under qemu, which names the emulated kind")
def test_the_emulated_cpu_is_seen_through_cpuid():
    """Under qemu-user /proc/cpuinfo is the host's; the kind must be the emulated CPU's."""
    assert HERE.name == EXPECTED_KIND, kind_source()
    assert kind_source().startswith("from CPUID")


# ---- one convolution per kernel path, against the numpy model -----------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("path", list(PATHS))
def test_onnxruntime_kernels_match_the_model(path, seed):
    """ORT's fused int8 kernel equals the numpy model bit for bit: saturating (ORT's pairs) on a kind whose
    ORT kernels saturate, exact elsewhere; and the two models differ on this data, so the check can tell."""
    model, conv, w, b, x, sy, zy = saturating_model(path, seed)
    exact = S.conv_output_codes(conv, w, b, x, sy, zy, saturate=False)
    saturated = S.conv_output_codes(conv, w, b, x, sy, zy, saturate=True, layout="flat")
    assert (exact != saturated).mean() > 0.05  # this case does saturate, visibly
    got = run_ort(model, x)
    expected = saturated if HERE.saturates_on("ort") else exact
    assert np.array_equal(got, expected), f"{(got != expected).mean():.4f} of outputs differ on a {HERE.name} CPU"
    # with optimizations off ORT runs DequantizeLinear -> float Conv -> QuantizeLinear: the graph's own semantics
    assert np.abs(run_ort(model, x, fused=False).astype(int) - exact).max() <= 1


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("path", list(PATHS))
def test_openvino_kernels_match_the_model(path, seed):
    """OpenVINO (oneDNN) pairs channels within each kernel tap ("tap"): on a saturating kind its output is
    the saturating model's bit for bit (measured on AVX2, natively and under qemu, and on SSE4.2 under qemu);
    on an exact kind it is the exact model's, give or take the last code of its own requantization."""
    model, conv, w, b, x, sy, zy = saturating_model(path, seed)
    exact = S.conv_output_codes(conv, w, b, x, sy, zy, saturate=False).astype(int)
    saturated = S.conv_output_codes(conv, w, b, x, sy, zy, saturate=True, layout="tap").astype(int)
    got = run_openvino(model, x).astype(int)
    if HERE.saturates_on("openvino"):
        assert np.array_equal(got, saturated), f"{(got != saturated).mean():.4f} differ from the saturating model"
    else:
        assert np.abs(got - exact).max() <= 1 and np.abs(got - saturated).max() > 10


@pytest.mark.parametrize("path", list(PATHS))
def test_exact_twin_computes_the_exact_model_on_any_cpu(path):
    """The uint8-weight twin runs ORT's u8u8 kernels, exact on every kind: the integer semantics of the file."""
    model, conv, w, b, x, sy, zy = saturating_model(path)
    twin = S.exact_twin(model)
    assert np.array_equal(run_ort(twin, x), S.conv_output_codes(conv, w, b, x, sy, zy, saturate=False))


def test_exact_twin_of_a_per_tensor_weight_without_zero_point():
    rng = np.random.default_rng(4)
    w = rng.integers(-127, 128, (16, 8, 3, 3)).astype(np.int8)
    model = conv_model(w, None, 0.05, 7, np.array([0.01], np.float32), 0.5, 100, pads=(1, 1, 1, 1))
    dw = next(n for n in model.graph.node if n.input[0] == "w")
    del dw.input[2:]  # DequantizeLinear's zero point is optional (0)
    x = rng.integers(0, 256, (1, 8, 6, 5)).astype(np.uint8)
    (conv,) = S.quantized_convs(model)
    expected = S.conv_output_codes(conv, w, None, x, 0.5, 100, saturate=False)
    assert np.array_equal(run_ort(S.exact_twin(model), x), expected)
    assert np.array_equal(run_ort(S.exact_twin(model), x, fused=False), run_ort(model, x, fused=False))


# ---- MatMul and Gemm with int8 weights (RTMPose's head: Linear layers), against the numpy model ----------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("path", list(MATMULS))
def test_onnxruntime_matmul_kernels_match_the_model(path, seed):
    """QLinearMatMul / QGemm (fused from QDQ) pair (k, k+1) along K, as a 1x1 convolution with K channels: bit for
    bit the saturating model on a kind whose ORT kernels saturate, the exact one elsewhere."""
    model, op, w, b, x, sy, zy = saturating_matmul(path, seed)
    exact = S.matmul_output_codes(op, w, b, x, sy, zy, saturate=False)
    saturated = S.matmul_output_codes(op, w, b, x, sy, zy, saturate=True)
    assert (exact != saturated).mean() > 0.05
    got = run_ort(model, x)
    expected = saturated if HERE.saturates_on("ort") else exact
    assert np.array_equal(got, expected), f"{(got != expected).mean():.4f} of outputs differ on a {HERE.name} CPU"
    assert np.abs(run_ort(model, x, fused=False).astype(int) - exact).max() <= 1  # the graph's own semantics


@pytest.mark.parametrize("path", [p for p in MATMULS if MATMULS[p][2] == "matmul"])
def test_onnxruntime_matmul_with_a_float_output_matches_the_model(path):
    """A quantized MatMul whose output stays float (a last layer: MatMulIntegerToFloat) runs the same kernel."""
    model, op, w, b, x, sy, zy = saturating_matmul(path, float_output=True)
    scale = np.float32(op.x_scale) * op.w_scale
    exact = S.matmul_accumulators(op, w, x, saturate=False).astype(np.float32) * scale
    saturated = S.matmul_accumulators(op, w, x, saturate=True).astype(np.float32) * scale
    got = run_ort(model, x)
    expected = saturated if HERE.saturates_on("ort") else exact
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * float(np.abs(expected).max()))
    assert np.abs(exact - saturated).max() > 100 * 1e-6 * float(np.abs(expected).max())  # the check can tell


@pytest.mark.parametrize("path", list(MATMULS))
def test_openvino_matmul_kernels_match_the_model(path):
    """oneDNN's int8 inner product pairs along K as ORT does: the saturating model bit for bit where it saturates."""
    model, op, w, b, x, sy, zy = saturating_matmul(path)
    exact = S.matmul_output_codes(op, w, b, x, sy, zy, saturate=False).astype(int)
    saturated = S.matmul_output_codes(op, w, b, x, sy, zy, saturate=True).astype(int)
    got = run_openvino(model, x).astype(int)
    if HERE.saturates_on("openvino"):
        assert np.array_equal(got, saturated), f"{(got != saturated).mean():.4f} differ from the saturating model"
    else:
        assert np.abs(got - exact).max() <= 1 and np.abs(got - saturated).max() > 10


@pytest.mark.parametrize("path", list(MATMULS))
def test_exact_twin_of_a_matmul_computes_the_exact_model(path):
    model, op, w, b, x, sy, zy = saturating_matmul(path)
    assert np.array_equal(run_ort(S.exact_twin(model), x), S.matmul_output_codes(op, w, b, x, sy, zy, saturate=False))
