"""What kind of CPU this is, as far as INT8 convolutions care.

x86 CPUs multiply uint8 activations by int8 weights in one of three ways, and the first is not exact:

- **VPMADDUBSW** (SSE4.1/AVX2, and AVX-512BW without VNNI): each instruction adds *pairs* of adjacent
  u8 x s8 products into int16 **with saturation** (|a0*w0 + a1*w1| can reach 2*255*128 = 65280 > 32767).
  oneDNN's (OpenVINO's) u8s8 kernels use it on every such CPU, ONNX Runtime's MLAS on AVX2 and AVX-512BW
  (its SSE4.1 kernels widen to int16 first: exact, measured under ``qemu-x86_64 -cpu Nehalem-v1``).
- **VNNI** (AVX-512 VNNI, AVX-VNNI): VPDPBUSD sums four products straight into int32: exact.
- **AMX-INT8**: tile dot products into int32: exact.

The kernels pick their instructions from CPUID, so the kind must come from CPUID too: /proc/cpuinfo
describes the host, which is not what runs the code under an emulator (``qemu-x86_64 -cpu Haswell-v4``
on an AMX host) or a hypervisor that masks features. numpy's CPU dispatch reads CPUID (and what the OS
enables); :func:`cpu_flags` takes its answer for every feature numpy knows and /proc/cpuinfo only for
those it does not (AVX-VNNI, AMX), and only when /proc/cpuinfo claims nothing CPUID denies.
``POSEQUANT_CPU_KIND`` overrides it all (tests; building for another machine).

``cpu_kind()`` names the kind; :data:`KINDS` says what each kind does. Off x86 (or when nothing can be
read) the kind says what is known and never raises, except for a ``POSEQUANT_CPU_KIND`` it does not know.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

from .errors import PosequantError

# Flags that matter here: VNNI/AMX make INT8 convolutions exact and fast on x86;
# BF16/AMX-BF16 is what OpenVINO's default bf16 precision needs.
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16")
# numpy's CPUID feature names -> /proc/cpuinfo's, for the features both report. numpy checks the OS
# enables the registers (XCR0) too, as the kernels do.
CPUID_NAMES = {
    "SSSE3": "ssse3", "SSE41": "sse4_1", "SSE42": "sse4_2", "POPCNT": "popcnt", "AVX": "avx", "F16C": "f16c",
    "FMA3": "fma", "AVX2": "avx2", "BMI": "bmi1", "BMI2": "bmi2", "MOVBE": "movbe", "VAES": "vaes",
    "VPCLMULQDQ": "vpclmulqdq", "GFNI": "gfni", "AVX512F": "avx512f", "AVX512CD": "avx512cd",
    "AVX512BW": "avx512bw", "AVX512DQ": "avx512dq", "AVX512VL": "avx512vl", "AVX512VNNI": "avx512_vnni",
    "AVX512BF16": "avx512_bf16", "AVX512FP16": "avx512_fp16",
}
ENV = "POSEQUANT_CPU_KIND"
INT16_MAX = 32767
# The largest uint8 activation times the sum of two weight magnitudes must stay within int16:
# 255 * 128 = 32640 <= 32767 < 255 * 129. So a pair of same-sign int8 weights may sum to 128 in magnitude.
PAIR_WEIGHT_LIMIT = 128
BACKENDS = ("ort", "openvino")  # the CPU backends whose int8 kernels this models


@dataclass(frozen=True)
class CpuKind:
    name: str  # avx2 | avx512 | vnni | amx | x86 | arm64 | other
    title: str
    int8_dot: str  # the instruction INT8 convolutions use
    saturating: tuple[str, ...] | None  # backends whose u8 x s8 pair sums saturate to int16 (None: not known)
    fast_int8: bool  # INT8 convolutions beat FP32 clearly (more multiply-adds per instruction)

    @property
    def saturates(self) -> bool | None:
        """Some backend's u8s8 kernels saturate here (None: not known). Graphs for such a kind get the pair fit."""
        return None if self.saturating is None else bool(self.saturating)

    def saturates_on(self, backend: str) -> bool | None:
        """Whether ``backend``'s ("ort", "openvino") int8 convolutions saturate on this kind."""
        return None if self.saturating is None else backend in self.saturating

    def describe(self) -> str:
        if self.saturating is None:
            exact = "INT8 exactness unknown"
        elif not self.saturating:
            exact = "exact int32 dot products"
        elif set(self.saturating) == set(BACKENDS):
            exact = "saturating u8s8 pair sums"
        else:
            exact = f"saturating u8s8 pair sums on {', '.join(self.saturating)}"
        return f"{self.title} ({self.int8_dot}: {exact})"


KINDS: dict[str, CpuKind] = {k.name: k for k in (
    CpuKind("avx2", "x86-64 AVX2, no AVX-512, no VNNI", "VPMADDUBSW", BACKENDS, True),
    CpuKind("avx512", "x86-64 AVX-512 without VNNI", "VPMADDUBSW", BACKENDS, True),
    CpuKind("vnni", "x86-64 with VNNI (AVX-512 VNNI or AVX-VNNI)", "VPDPBUSD", (), True),
    CpuKind("amx", "x86-64 with AMX-INT8", "TDPBUSD", (), True),
    # SSE4.1 only: oneDNN's PMADDUBSW saturates like its AVX2 form; MLAS widens to int16 (PMADDWD): exact.
    # Barely faster than FP32 either way.
    CpuKind("x86", "x86-64 without AVX2", "PMADDUBSW (OpenVINO) / PMADDWD (ONNX Runtime)", ("openvino",), False),
    # ARM64: ONNX Runtime uses SDOT/UDOT (exact) where the CPU has them, else widening multiplies (exact)
    CpuKind("arm64", "ARM64", "SDOT/UDOT or widening multiply", (), True),
    CpuKind("other", "not x86-64 or ARM64", "unknown", None, False),
)}
# Kinds whose graphs must keep pair sums within int16; a graph made for one of them is exact on all kinds.
SATURATING = tuple(name for name, k in KINDS.items() if k.saturates)


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo ({} off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def _cpuid_features() -> dict[str, bool] | None:
    """numpy's CPUID answers under /proc/cpuinfo's names (None: not x86, or numpy does not say)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features  # numpy 1.x
        except ImportError:
            return None
    if "AVX2" not in features:
        return None
    return {name: bool(features.get(key)) for key, name in CPUID_NAMES.items()}


@dataclass(frozen=True)
class CpuFlags:
    """The flags that decide the kind, and where they came from."""

    flags: dict[str, bool]
    source: str  # "CPUID", "CPUID + /proc/cpuinfo", "/proc/cpuinfo", "none"
    note: str | None = None  # why /proc/cpuinfo was set aside, when it was


def read_cpu_flags(cpuid: dict[str, bool] | None, proc: set[str]) -> CpuFlags:
    """Combine CPUID (``cpuid``: /proc/cpuinfo names -> bool, None if unknown) and /proc/cpuinfo's flags.

    CPUID decides every feature it reports. /proc/cpuinfo adds the ones it does not (AVX-VNNI, AMX) unless
    it claims a feature CPUID denies: then it describes another CPU than the one running this process (an
    emulator passes the host's through) and only CPUID counts."""
    if cpuid is None:
        return CpuFlags({f: f in proc for f in CPU_FLAGS}, "/proc/cpuinfo" if proc else "none")
    denied = sorted(f for f, has in cpuid.items() if not has and f in proc)
    if denied or not proc:
        note = (f"/proc/cpuinfo lists {', '.join(denied[:4])} but CPUID denies {'them' if len(denied) > 1 else 'it'}"
                " (an emulator or a masking hypervisor): the kind is CPUID's") if denied else None
        return CpuFlags({f: cpuid.get(f, False) for f in CPU_FLAGS}, "CPUID", note)
    flags = {f: cpuid[f] if f in cpuid else f in proc for f in CPU_FLAGS}
    return CpuFlags(flags, "CPUID + /proc/cpuinfo")


@functools.lru_cache(maxsize=1)
def detected_flags() -> CpuFlags:
    return read_cpu_flags(_cpuid_features(), set(_cpuinfo().get("flags", "").split()))


def cpu_flags() -> dict[str, bool]:
    return dict(detected_flags().flags)


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def classify(machine: str, flags: dict[str, bool] | set[str]) -> CpuKind:
    """The kind of a CPU with this ``platform.machine()`` and these flags (/proc/cpuinfo names)."""
    has = (lambda f: f in flags) if isinstance(flags, set) else (lambda f: bool(flags.get(f)))
    arch = machine.lower()
    if arch in ("x86_64", "amd64", "i686", "i386", "x86"):
        if has("amx_int8"):
            return KINDS["amx"]
        if has("avx512_vnni") or has("avx_vnni"):
            return KINDS["vnni"]
        if has("avx512bw") or has("avx512f"):
            return KINDS["avx512"]
        if has("avx2"):
            return KINDS["avx2"]
        return KINDS["x86"]
    if arch in ("aarch64", "arm64"):
        return KINDS["arm64"]
    return KINDS["other"]


@functools.lru_cache(maxsize=1)
def detected_kind() -> CpuKind:
    """This machine's kind from its flags (without any, x86 counts as AVX2, the common floor)."""
    found = detected_flags()
    flags = found.flags
    if found.source == "none" and platform.machine().lower() in ("x86_64", "amd64"):
        flags = {"avx2": True}  # neither CPUID nor /proc/cpuinfo: assume the saturating common case
    return classify(platform.machine(), flags)


def kind_named(name: str, *, where: str = ENV) -> CpuKind:
    try:
        return KINDS[name.strip().lower()]
    except KeyError:
        raise PosequantError(f"{where}={name!r} is not a CPU kind: use one of {', '.join(KINDS)}") from None


def cpu_kind() -> CpuKind:
    """The kind INT8 graphs run on here: ``POSEQUANT_CPU_KIND`` when set, else the detected one."""
    forced = os.environ.get(ENV)
    return kind_named(forced) if forced else detected_kind()


def kind_source() -> str:
    """Where :func:`cpu_kind`'s answer comes from, in a few words."""
    if os.environ.get(ENV):
        return f"set by {ENV} (detected: {detected_kind().name})"
    found = detected_flags()
    return f"from {found.source}" + (f"; {found.note}" if found.note else "")
