"""What kind of CPU this is, as far as INT8 convolutions care.

x86 CPUs multiply uint8 activations by int8 weights in one of three ways, and the first is not exact:

- **VPMADDUBSW** (AVX2, and AVX-512BW without VNNI): each instruction adds *pairs* of adjacent u8 x s8
  products into int16 **with saturation** (|a0*w0 + a1*w1| can reach 2*255*128 = 65280 > 32767). ONNX
  Runtime's u8s8 kernels and oneDNN's use it on such CPUs, so a QDQ model can compute something else
  than its own semantics there (ONNX Runtime's quantization docs: use ``reduce_range`` or U8U8 on them).
- **VNNI** (AVX-512 VNNI, AVX-VNNI): VPDPBUSD sums four products straight into int32: exact.
- **AMX-INT8**: tile dot products into int32: exact.

``cpu_kind()`` names this machine's kind; :data:`KINDS` says what each kind does. Off x86 (or when
/proc/cpuinfo cannot be read) the kind says what is known and never raises.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

# /proc/cpuinfo flags that matter here: VNNI/AMX make INT8 convolutions exact and fast on x86;
# BF16/AMX-BF16 is what OpenVINO's default bf16 precision needs.
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16")
INT16_MAX = 32767
# The largest uint8 activation times the sum of two weight magnitudes must stay within int16:
# 255 * 128 = 32640 <= 32767 < 255 * 129. So a pair of same-sign int8 weights may sum to 128 in magnitude.
PAIR_WEIGHT_LIMIT = 128


@dataclass(frozen=True)
class CpuKind:
    name: str  # avx2 | avx512 | vnni | amx | x86 | arm64 | other
    title: str
    int8_dot: str  # the instruction INT8 convolutions use
    saturates: bool | None  # u8 x s8 pair sums saturate to int16 (None: not known)
    fast_int8: bool  # INT8 convolutions beat FP32 clearly (more multiply-adds per instruction)

    def describe(self) -> str:
        exact = {True: "saturating u8s8 pair sums", False: "exact int32 dot products", None: "INT8 exactness unknown"}
        return f"{self.title} ({self.int8_dot}: {exact[self.saturates]})"


KINDS: dict[str, CpuKind] = {k.name: k for k in (
    CpuKind("avx2", "x86-64 AVX2, no AVX-512, no VNNI", "VPMADDUBSW", True, True),
    CpuKind("avx512", "x86-64 AVX-512 without VNNI", "VPMADDUBSW", True, True),
    CpuKind("vnni", "x86-64 with VNNI (AVX-512 VNNI or AVX-VNNI)", "VPDPBUSD", False, True),
    CpuKind("amx", "x86-64 with AMX-INT8", "TDPBUSD", False, True),
    # SSE4.1 only: PMADDUBSW saturates like its AVX2 form, and is barely faster than FP32
    CpuKind("x86", "x86-64 without AVX2", "PMADDUBSW", True, False),
    # ARM64: ONNX Runtime uses SDOT/UDOT (exact) where the CPU has them, else widening multiplies (exact)
    CpuKind("arm64", "ARM64", "SDOT/UDOT or widening multiply", False, True),
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


@functools.lru_cache(maxsize=1)
def cpu_flags() -> dict[str, bool]:
    flags = set(_cpuinfo().get("flags", "").split())
    return {f: f in flags for f in CPU_FLAGS}


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def classify(machine: str, flags: dict[str, bool] | set[str]) -> CpuKind:
    """The kind of a CPU with this ``platform.machine()`` and these /proc/cpuinfo flags."""
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
def cpu_kind() -> CpuKind:
    """This machine's kind (from /proc/cpuinfo; without it, x86 counts as AVX2, the common floor)."""
    flags = cpu_flags()
    if not any(flags.values()) and platform.machine().lower() in ("x86_64", "amd64"):
        flags = {"avx2": True}  # no /proc/cpuinfo (not Linux): assume the saturating common case
    return classify(platform.machine(), flags)
