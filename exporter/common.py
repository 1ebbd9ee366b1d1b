"""What both ways into ONNX share (a checkpoint exported, a third-party ONNX stamped): the result,
the normalisation options, and the real-data verification cases."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from posequant.core.errors import ExportError, PosequantError
from posequant.core.metadata import ModelMeta, format_size
from posequant.core.quiet import quiet

from .checkpoint import Checkpoint
from .model import PoseModel
from .verify import VerifyReport


MIN_OPSET = 17  # what posequant exports and stamps into when asked (--opset); the default of export-pose


@dataclass
class ExportResult:
    output: Path
    meta: ModelMeta
    verification: VerifyReport | None
    num_parameters: int
    onnx_bytes: int
    timings: dict[str, float] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None
    model: PoseModel | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "family": self.meta.family,
            "num_parameters": self.num_parameters,
            "onnx_bytes": self.onnx_bytes,
            "metadata": self.meta.to_props(),
            "verification": self.verification.to_dict() if self.verification else None,
            "timings_s": self.timings,
        }


def _data_cases(data: str | Path, meta: ModelMeta, samples: int):
    """Real person crops, preprocessed exactly as evaluation will do it."""
    from posequant.calibration import iter_batches, open_dataset

    ds = open_dataset(data, input_size=meta.input_size)
    crops = [b.inputs for b in iter_batches(ds, meta, batch_size=samples, limit=samples)]
    if not crops:
        raise PosequantError(f"--data {data}: no people found to verify on")
    inputs = np.concatenate(crops)
    split = f" {ds.split}" if ds.split else ""
    return f"{ds.format}{split} crops from {Path(data).name}", inputs


def stride_of(size: tuple[int, int], heatmap: tuple[int, int]) -> int | None:
    """The whole number the input is divided by to give the heatmaps, the same for height and width, or None."""
    (h, w), (hh, hw) = size, heatmap
    if hh <= 0 or hw <= 0 or h % hh or w % hw or h // hh != w // hw:
        return None
    return h // hh


def sizes_that_fit(heatmap_at: Callable[[tuple[int, int]], tuple[int, int] | None], size: tuple[int, int]
                   ) -> tuple[int, int, list[tuple[int, int]]] | None:
    """(multiple, stride, [sizes]): the nearest sizes below and above ``size`` the network fits, as the
    smallest multiple (4, 8, ... 128) of which rounding both sides down and up gives exact heatmaps.
    ``heatmap_at(size)`` runs the network (PyTorch, or ONNX Runtime for a stamp): its heatmap size, None
    when it cannot run there.

    One multiple more is probed too: a size too small for the backbone can look exact by accident
    (8x8 heatmaps from an 8x8 input, stride 1, when the network's stride is 4)."""
    h, w = size
    seen: dict[tuple[int, int], int | None] = {}

    def stride_at(c: tuple[int, int]) -> int | None:
        if c not in seen:
            heatmap = heatmap_at(c)
            seen[c] = stride_of(c, heatmap) if heatmap else None
        return seen[c]

    for m in (4, 8, 16, 32, 64, 128):
        down = (max(m, h // m * m), max(m, w // m * m))
        up = (-(-h // m) * m, -(-w // m) * m)
        cands = list(dict.fromkeys([down, up]))
        strides = set()
        for c in cands + [(up[0] + m, up[1] + m)]:  # stops at the first size that does not fit
            strides.add(stride_at(c))
            if None in strides or len(strides) > 1:
                break
        else:
            return m, strides.pop(), cands
    return None


def size_advice(heatmap_at: Callable[[tuple[int, int]], tuple[int, int] | None], size: tuple[int, int]) -> str:
    """What to give instead of an input size the network's stride does not divide."""
    fit = sizes_that_fit(heatmap_at, size)
    if not fit:
        return "no nearby multiple of 4 to 128 fits either: check the architecture"
    m, stride, sizes = fit
    return f"the network has stride {stride} and takes multiples of {m}: use " + " or ".join(map(format_size, sizes))


def check_opset(opset: int | None) -> int | None:
    """``--opset``: None (each input's default), or a whole number from :data:`MIN_OPSET` to the newest opset
    the installed onnx package knows."""
    if opset is None:
        return None
    latest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise PosequantError(f"--opset {opset!r} is not a whole number: give e.g. {MIN_OPSET}")
    if opset < MIN_OPSET:
        raise PosequantError(f"--opset {opset} is too old: posequant exports opset {MIN_OPSET} or newer")
    if opset > latest:
        raise PosequantError(f"--opset {opset} is newer than the installed onnx package knows ({latest}): give "
                             f"{MIN_OPSET} to {latest}")
    return opset


def default_output(checkpoint: Path) -> Path:
    """``pose_resnet_50_256x256.pth.tar`` -> ``pose_resnet_50_256x256.onnx`` beside it; a third-party
    ``model.onnx`` -> ``model.posequant.onnx`` (never the input itself)."""
    checkpoint = Path(checkpoint)
    if checkpoint.suffix.lower() == ".onnx":
        return checkpoint.with_name(checkpoint.stem + ".posequant.onnx")
    name = checkpoint.name
    for suffix in (".pth.tar", ".pth", ".pt", ".tar", ".ckpt", ".bin"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return checkpoint.with_name(name + ".onnx")


def simplify_onnx(model: onnx.ModelProto, where: str = "the model") -> onnx.ModelProto:
    """onnxsim, quietly, keeping metadata_props to the model's own keys and ours."""
    import onnxsim

    before = {p.key for p in model.metadata_props}
    try:
        with quiet():  # onnxsim's prints and ORT's logs from its checks
            simplified, ok = onnxsim.simplify(model)
    except Exception as e:
        raise ExportError(f"onnxsim failed on {where} ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
                          "retry with --no-simplify") from None
    if not ok:
        raise ExportError(f"onnxsim could not validate the simplified {where}; retry with --no-simplify")
    # onnxsim stamps ~18 onnxsim.* keys (its version, its options) into metadata_props: not ours, and
    # not the model's; any key the model had before stays
    keep = [(p.key, p.value) for p in simplified.metadata_props if p.key in before or not p.key.startswith("onnxsim")]
    del simplified.metadata_props[:]
    for key, value in keep:
        entry = simplified.metadata_props.add()
        entry.key, entry.value = key, value
    return simplified
