"""Where an INT8 model's time goes on this CPU: OpenVINO per-layer profile against the CPU's peak.

    .venv/bin/python scripts/profile_openvino.py MODEL.onnx [MODEL.onnx ...] [--input-size 256x256]
        [--threads 2] [--runs 30] [--ort] [--peak] [--top 10] [--json out.json]

For each model: OpenVINO's own per-node timings (``PERF_COUNT``) over --runs back-to-back runs at
batch 1, the multiply-adds of every convolution (from the reshaped graph), the rate each runs at,
the kernels used, and the time of the smallest convolutions (a per-node fixed cost: their
arithmetic takes a microsecond or two). ``--ort`` also times the model on ONNX Runtime (no
spinning, as ``bench``). ``--peak`` compiles a small C loop with the system C compiler and
measures the CPU's int8 and fp32 (FMA) multiply-add peaks with one process per thread, on the int8
path its kernels use (AVX-512 VNNI / AVX-VNNI ``vpdpbusd``; AVX2 / AVX-512BW ``vpmaddubsw`` +
``vpmaddwd``), so rates read as a fraction of what the silicon can do; ``--peak-isa avx2`` also
measures another path the CPU can run.

This explains ``scripts/bench_goals.py``'s figures; it is not a benchmark of its own (runs are
back to back, not interleaved). Models: ``bench_goals.py --keep DIR`` leaves its float and INT8
exports in DIR.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

CONVS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData")
SMALL_MACS = 3e6  # convolutions below this are all fixed cost at these rates

# The int8 dot product each CPU kind's kernels use, against FP32 FMA at the same vector width, as one C
# loop with 12 independent accumulators (started apart so the compiler cannot merge them). -D picks it.
PEAK_C = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#define X12(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
#if defined(W512)
typedef __m512i VI; typedef __m512 VF;
#define SETI(v) _mm512_set1_epi32(v)
#define SET8(v) _mm512_set1_epi8(v)
#define SETF(v) _mm512_set1_ps(v)
#define FMAF(x, y, f) _mm512_fmadd_ps(x, y, f)
#define SUMI(v) _mm512_reduce_add_epi32(v)
#define SUMF(v) _mm512_reduce_add_ps(v)
#define LANES 16
#else
typedef __m256i VI; typedef __m256 VF;
#define SETI(v) _mm256_set1_epi32(v)
#define SET8(v) _mm256_set1_epi8(v)
#define SETF(v) _mm256_set1_ps(v)
#define FMAF(x, y, f) _mm256_fmadd_ps(x, y, f)
static int SUMI(__m256i v){int o[8];_mm256_storeu_si256((__m256i*)o,v);int s=0;for(int i=0;i<8;i++)s+=o[i];return s;}
static float SUMF(__m256 v){float o[8];_mm256_storeu_ps(o,v);float s=0;for(int i=0;i<8;i++)s+=o[i];return s;}
#define LANES 8
#endif
#if defined(VNNI512)   /* AVX-512 VNNI: 4 u8*s8 products per 32-bit lane, summed in int32 */
#define DOT(c, a, b) _mm512_dpbusd_epi32(c, a, b)
#elif defined(VNNI256) /* AVX-VNNI */
#define DOT(c, a, b) _mm256_dpbusd_avx_epi32(c, a, b)
/* Without VNNI: VPMADDUBSW (u8*s8 pairs into saturating int16) + VPMADDWD (pairs into int32) + VPADDD, what
   ORT's and oneDNN's u8s8 kernels run. Each accumulator multiplies its own u8 operand, reloaded from memory
   every iteration (as the kernels load activations): constant operands would let the compiler hoist the
   multiplies out of the loop. */
#elif defined(W512)
#define PAIRS 1
#define DOT(c, a, b) _mm512_add_epi32(c, _mm512_madd_epi16(_mm512_maddubs_epi16(a, b), ones))
#define LOAD(k) _mm512_load_si512((const void*)(buf + 64 * k))
#else
#define PAIRS 1
#define DOT(c, a, b) _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones))
#define LOAD(k) _mm256_load_si256((const __m256i*)(buf + 64 * k))
#endif
#define DECL_I(k) VI c##k = SETI(k);
#define DECL_F(k) VF f##k = SETF((float)k);
#if defined(PAIRS)
static unsigned char buf[12 * 64] __attribute__((aligned(64)));
#define STEP_I(k) c##k = DOT(c##k, LOAD(k), b);
#else
#define STEP_I(k) c##k = DOT(c##k, a, b);
#endif
#define STEP_F(k) f##k = FMAF(x, y, f##k);
#define ADD_I(k) s += SUMI(c##k);
#define ADD_F(k) g += SUMF(f##k);
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(void){
  const long iters = 100000000L;
  VI a = SET8(1), b = SET8(2);
#if !defined(VNNI512) && !defined(VNNI256)
#if defined(W512)
  const __m512i ones = _mm512_set1_epi16(1);
#else
  const __m256i ones = _mm256_set1_epi16(1);
#endif
#endif
  VF x = SETF(1.0001f), y = SETF(0.9999f);
  X12(DECL_I) X12(DECL_F)
  double t = now();
#if defined(PAIRS)
  for (int i = 0; i < 12 * 64; i++) buf[i] = (unsigned char)(i * 7);
  for (long i = 0; i < iters; i++) { __asm__ volatile("" ::: "memory"); X12(STEP_I) }
#else
  for (long i = 0; i < iters; i++) { X12(STEP_I) }
#endif
  double int8 = iters * 12 * LANES * 4.0 / (now() - t);   /* 4 multiply-adds per 32-bit lane */
  t = now();
  for (long i = 0; i < iters; i++) { X12(STEP_F) }
  double fp32 = iters * 12 * LANES * 1.0 / (now() - t);
  int s = 0; float g = 0;
  X12(ADD_I) X12(ADD_F)
  printf("%f %f %d %f\n", int8 / 1e9, fp32 / 1e9, s, g);  /* the sums keep the loops alive */
  return 0;
}
"""
# int8 path -> (what it is, compiler flags); the fp32 side is FMA at the same width
PEAK_ISAS = {
    "vnni512": ("AVX-512 VNNI vpdpbusd vs AVX-512 FMA", ["-DW512", "-DVNNI512", "-mavx512f", "-mavx512bw", "-mavx512vnni"]),
    "vnni256": ("AVX-VNNI vpdpbusd vs AVX2 FMA", ["-DVNNI256", "-mavx2", "-mfma", "-mavxvnni"]),
    "avx512": ("AVX-512BW vpmaddubsw+vpmaddwd vs AVX-512 FMA", ["-DW512", "-mavx512f", "-mavx512bw"]),
    "avx2": ("AVX2 vpmaddubsw+vpmaddwd vs AVX2 FMA", ["-mavx2", "-mfma"]),
}


def peak_isa_for(flags: dict[str, bool]) -> str | None:
    """The int8 path this CPU's kernels use (ONNX Runtime's and oneDNN's choice order), or None off x86."""
    if flags.get("avx512_vnni"):
        return "vnni512"
    if flags.get("avx_vnni"):
        return "vnni256"
    if flags.get("avx512bw"):
        return "avx512"
    if flags.get("avx2"):
        return "avx2"
    return None


def cpu_peak(threads: int, isa: str | None = None) -> dict | None:
    """int8 and fp32 multiply-add peaks (GMAC/s) with ``threads`` processes at once on the int8 path ``isa``
    (default: the one this CPU's kernels use; AMX machines run ORT's convolutions on VNNI), or None."""
    from posequant.core.cpu import cpu_flags

    flags = cpu_flags()
    isa = isa or peak_isa_for(flags)
    needs = {"vnni512": "avx512_vnni", "vnni256": "avx_vnni", "avx512": "avx512bw", "avx2": "avx2"}
    if isa is None or not flags.get(needs[isa]):
        print(f"--peak: this CPU cannot run the {isa or 'x86 SIMD'} int8 path; skipped", file=sys.stderr)
        return None
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("--peak: no C compiler (cc/gcc) found; skipped", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp, "peak.c"), Path(tmp, "peak")
        src.write_text(PEAK_C)
        subprocess.run([cc, "-O2", *PEAK_ISAS[isa][1], "-o", str(exe), str(src)], check=True)
        procs = [subprocess.Popen([str(exe)], stdout=subprocess.PIPE, text=True) for _ in range(threads)]
        rates = [[float(v) for v in p.communicate()[0].split()[:2]] for p in procs]
    int8, fp32 = sum(r[0] for r in rates), sum(r[1] for r in rates)
    return {"isa": isa, "what": PEAK_ISAS[isa][0], "int8_gmacs": int8, "fp32_gmacs": fp32,
            "ratio": int8 / fp32, "threads": threads}


def conv_macs(model) -> dict[str, int]:
    """Multiply-adds of each convolution of a statically shaped OpenVINO model, by friendly name."""
    macs = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in CONVS:
            continue
        w = list(op.input(1).get_partial_shape().to_shape())
        if kind == "Convolution":  # [O, I, k...]: each output takes I * k taps
            taps, elems = int(np.prod(w[1:])), op.get_output_partial_shape(0).to_shape()
        elif kind == "GroupConvolution":  # [G, O/G, I/G, k...]
            taps, elems = int(np.prod(w[2:])), op.get_output_partial_shape(0).to_shape()
        elif kind == "ConvolutionBackpropData":  # [I, O, k...]: each input scatters O * k taps
            taps, elems = int(np.prod(w[1:])), op.input(0).get_partial_shape().to_shape()
        else:  # GroupConvolutionBackpropData [G, I/G, O/G, k...]
            taps, elems = int(np.prod(w[2:])), op.input(0).get_partial_shape().to_shape()
        macs[op.get_friendly_name()] = int(np.prod(list(elems))) * taps
    return macs


def profile(path: Path, size: tuple[int, int], threads: int, runs: int) -> dict:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    shape = [1, 3, *size]
    model.reshape({model.inputs[0]: shape})
    macs = conv_macs(model)
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)

    plain = core.compile_model(model, "CPU", config).create_infer_request()  # timing without PERF_COUNT
    p50 = median_ms(lambda: plain.infer({0: x}), runs)

    compiled = core.compile_model(model, "CPU", {**config, "PERF_COUNT": True})
    # an executed node's MACs: those of the original convolutions fused into it
    fused = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        names = op.get_rt_info()["originalLayersNames"].astype(str).split(",")
        fused[op.get_friendly_name()] = sum(macs.get(n, 0) for n in names)
    req = compiled.create_infer_request()
    for _ in range(5):
        req.infer({0: x})
    node_ms: dict[str, float] = defaultdict(float)
    kernel: dict[str, tuple[str, str]] = {}
    for _ in range(runs):
        req.infer({0: x})
        for p in req.profiling_info:
            if p.status == p.Status.EXECUTED:
                node_ms[p.node_name] += p.real_time.total_seconds() * 1e3 / runs
                kernel[p.node_name] = (p.node_type, p.exec_type)

    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    convs = []
    for name, ms in node_ms.items():
        node_type, exec_type = kernel[name]
        k = by_kernel[f"{node_type} {exec_type}"]
        k[0] += ms
        k[1] += 1
        if fused.get(name):
            k[2] += fused[name]
            convs.append({"node": name, "kernel": exec_type, "ms": ms, "mmac": fused[name] / 1e6,
                          "tmacs": fused[name] / ms / 1e9})
    conv_ms = sum(c["ms"] for c in convs)
    small = [c["ms"] * 1e3 for c in convs if c["mmac"] * 1e6 < SMALL_MACS]
    return {
        "model": str(path), "input": shape, "threads": threads, "runs": runs,
        "p50_ms": p50, "gmac": sum(macs.values()) / 1e9,
        "node_ms": sum(node_ms.values()), "conv_ms": conv_ms, "convs": len(convs),
        "conv_tmacs": sum(c["mmac"] for c in convs) / conv_ms / 1e3 if conv_ms else None,
        "small_convs": len(small), "small_conv_us_median": float(np.median(small)) if small else None,
        "kernels": {k: {"ms": v[0], "nodes": v[1], "tmacs": v[2] / v[0] / 1e9 if v[2] else None}
                    for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])},
        "slowest_convs": sorted(convs, key=lambda c: -c["ms"]),
    }


def median_ms(call, runs: int, warmup: int = 5) -> float:
    """Median wall time of ``call()`` over ``runs`` back-to-back calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def time_ort(path: Path, threads: int, size: tuple[int, int], runs: int) -> float:
    from posequant.benchmarks.runners import OrtRunner

    runner = OrtRunner(path, threads=threads)
    x = np.random.default_rng(0).standard_normal((1, 3, *size), dtype=np.float32)
    return median_ms(lambda: runner.infer(x), runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--input-size", default=None, help="HxW [default: the model's metadata]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--ort", action="store_true", help="also time each model on ONNX Runtime")
    ap.add_argument("--peak", action="store_true", help="measure the CPU's int8/fp32 multiply-add peaks")
    ap.add_argument("--peak-isa", choices=list(PEAK_ISAS), action="append",
                    help="measure this int8 path too (repeatable), e.g. avx2 on a VNNI machine [default: this CPU's]")
    ap.add_argument("--top", type=int, default=10, help="slowest convolutions listed per model")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from posequant.benchmarks.latency import onnx_precision
    from posequant.core.metadata import read_meta
    from posequant.core.table import format_table

    peak = cpu_peak(args.threads) if args.peak else None
    peaks = [peak] if peak else []
    peaks += [p for isa in args.peak_isa or [] if (p := cpu_peak(args.threads, isa)) and isa != (peak or {}).get("isa")]
    for p in peaks:
        print(f"CPU peak with {args.threads} processes, {p['what']}: int8 {p['int8_gmacs'] / 1e3:.2f} TMAC/s, "
              f"fp32 {p['fp32_gmacs'] / 1e3:.2f} TMAC/s ({p['ratio']:.2f}x)")
    results = []
    for path in args.models:
        size = (tuple(int(v) for v in args.input_size.split("x")) if args.input_size
                else read_meta(path).input_size)
        precision = onnx_precision(path)
        r = profile(path, size, args.threads, args.runs)
        r["precision"] = precision
        if args.ort:
            r["ort_p50_ms"] = time_ort(path, args.threads, size, args.runs)
        results.append(r)
        # rates as a fraction of the peak of the arithmetic the kernels use (int8 models: VNNI)
        ref = (peak or {}).get("int8_gmacs" if precision == "int8" else "fp32_gmacs")

        def rate(gmac, ms):
            tmacs = gmac / ms
            return f"{tmacs:.2f} TMAC/s" + (f" ({tmacs * 1e3 / ref:.0%} of peak)" if ref else "")

        print(f"\n{path.name} ({precision}, {r['gmac']:.2f} GMAC, input {size[0]}x{size[1]}, "
              f"{args.threads} threads)")
        print(f"  OpenVINO p50 {r['p50_ms']:.2f} ms: {rate(r['gmac'], r['p50_ms'])}; convolutions "
              f"{r['conv_ms']:.2f} of {r['node_ms']:.2f} ms node time, {rate(r['gmac'], r['conv_ms'])}")
        if r["small_convs"]:
            print(f"  {r['small_convs']} convolutions under {SMALL_MACS / 1e6:.0f} MMAC take "
                  f"{r['small_conv_us_median']:.1f} us each (median): a fixed cost per node")
        if "ort_p50_ms" in r:
            print(f"  ONNX Runtime p50 {r['ort_p50_ms']:.2f} ms: {rate(r['gmac'], r['ort_p50_ms'])}")
        print(format_table(["kernel", "nodes", "ms", "TMAC/s"],
                           [[k, v["nodes"], f"{v['ms']:.3f}", "-" if v["tmacs"] is None else f"{v['tmacs']:.2f}"]
                            for k, v in r["kernels"].items() if v["ms"] >= 0.01]))
        print(format_table(["slowest convolutions", "kernel", "ms", "MMAC", "TMAC/s"],
                           [[c["node"][-60:], c["kernel"], f"{c['ms']:.3f}", f"{c['mmac']:.1f}", f"{c['tmacs']:.2f}"]
                            for c in r["slowest_convs"][:args.top]]))
    if args.json:
        args.json.write_text(json.dumps({"peak": peak, "peaks": peaks, "models": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
