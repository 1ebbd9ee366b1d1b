"""Does the ONNX model compute what the PyTorch model computes? Compared on the same inputs, output by output
(a SimCC model's x and y vectors each, as a heatmap model's heatmaps)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from posequant.core.batching import infer_at_batch


@dataclass(frozen=True)
class CaseResult:
    name: str  # what the inputs were
    samples: int
    max_abs_diff: float
    max_abs_ref: float
    joint_agreement: tuple[float, ...]  # per joint: share of samples whose argmax agrees
    argmax_mismatches: int  # disagreements that are not ties within tolerance

    @property
    def rel_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_ref, 1e-12)

    @property
    def argmax_agreement(self) -> float:
        return float(np.mean(self.joint_agreement))


@dataclass(frozen=True)
class VerifyReport:
    cases: list[CaseResult] = field(default_factory=list)
    rtol: float = 1e-4
    reference: str = "PyTorch"  # what the ONNX model was compared with

    @property
    def max_rel_diff(self) -> float:
        return max((c.rel_diff for c in self.cases), default=0.0)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.cases), default=0.0)

    @property
    def passed(self) -> bool:
        return all(c.rel_diff <= self.rtol and c.argmax_mismatches == 0 for c in self.cases)

    def failure(self) -> str:
        """Why the check failed, on the first case that failed ("" when it passed): NaN/inf, the relative
        difference over the tolerance, or argmax mismatches (whose difference may be inside it)."""
        for c in self.cases:
            if not np.isfinite(c.rel_diff):
                return f"NaN or inf in the output on {c.name}"
            if c.rel_diff > self.rtol:
                return f"max abs diff {c.max_abs_diff:.3g}, relative {c.rel_diff:.3g} > {self.rtol:g} on {c.name}"
            if c.argmax_mismatches:
                return (f"{c.argmax_mismatches} joint(s) peak elsewhere on {c.name}, with a relative difference of "
                        f"{c.rel_diff:.3g} (within {self.rtol:g})")
        return ""

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "rtol": self.rtol,
            "reference": self.reference,
            "cases": [
                {"name": c.name, "samples": c.samples, "max_abs_diff": c.max_abs_diff,
                 "rel_diff": c.rel_diff, "argmax_agreement": c.argmax_agreement,
                 "argmax_mismatches": c.argmax_mismatches, "joint_agreement": list(c.joint_agreement)}
                for c in self.cases
            ],
        }


def compare_heatmaps(name: str, ref: np.ndarray, out: np.ndarray, atol: float) -> CaseResult:
    """Max differences and per-joint argmax agreement of two N x J x h x w heatmap batches (or N x J x L SimCC
    vectors: the argmax of each joint's vector).

    An argmax disagreement counts as a mismatch only when it is not a tie: the reference value
    at the other model's peak is more than ``atol`` below the reference peak.
    """
    n, j = ref.shape[:2]
    r, o = ref.reshape(n, j, -1), out.reshape(n, j, -1)
    ref_idx, out_idx = r.argmax(-1), o.argmax(-1)
    agree = ref_idx == out_idx
    ref_peak = np.take_along_axis(r, ref_idx[..., None], -1)[..., 0]
    ref_at_out = np.take_along_axis(r, out_idx[..., None], -1)[..., 0]
    mismatches = int(np.sum(~agree & (ref_peak - ref_at_out > atol)))
    return CaseResult(
        name=name,
        samples=n,
        max_abs_diff=float(np.abs(ref - out).max()),
        max_abs_ref=float(np.abs(ref).max()),
        joint_agreement=tuple(float(a) for a in agree.mean(0)),
        argmax_mismatches=mismatches,
    )


def run_torch(module: torch.nn.Module, inputs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every output of the module (a tensor, or a tuple: SimCC's x and y)."""
    with torch.inference_mode():
        out = module(torch.from_numpy(np.ascontiguousarray(inputs)))
    return tuple(o.float().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,)))


def run_onnx(session, inputs: np.ndarray, batch: int | None, *, every: bool = False):
    """Run in chunks of the model's fixed batch size (padding the last one), or all at once: the first
    output, or with ``every`` a tuple of all of them (the graph's order)."""
    name = session.get_inputs()[0].name
    if every:
        return infer_at_batch(lambda x: tuple(session.run(None, {name: x})), inputs, batch)
    return infer_at_batch(lambda x: session.run(None, {name: x})[0], inputs, batch)


def output_labels(session) -> list[str]:
    """What each output adds to a case's name: nothing for one output, its name for several."""
    outputs = session.get_outputs()
    return [""] if len(outputs) == 1 else [f", {o.name}" for o in outputs]


def random_inputs(input_size: tuple[int, int], samples: int = 2, seed: int = 0) -> np.ndarray:
    """Standard-normal inputs: the range of ImageNet-normalised pixels, fixed by the seed."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((samples, 3, *input_size), dtype=np.float32)


def verify(module: torch.nn.Module, session, cases: Iterable[tuple[str, np.ndarray]], *,
           batch: int | None = None, rtol: float = 1e-4) -> VerifyReport:
    results = []
    for name, inputs in cases:
        refs = run_torch(module, inputs)
        outs = run_onnx(session, inputs, batch, every=True)
        for label, ref, out in zip(output_labels(session), refs, outs, strict=True):
            atol = rtol * max(float(np.abs(ref).max()), 1e-12)
            results.append(compare_heatmaps(name + label, ref, out, atol))
    return VerifyReport(results, rtol)
