"""What both ways into ONNX share (a checkpoint exported, a third-party ONNX stamped): the result,
the normalisation options, and the real-data verification cases."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from posequant.core.errors import ExportError, PosequantError
from posequant.core.metadata import ModelMeta
from posequant.core.quiet import quiet

from .checkpoint import Checkpoint
from .model import PoseModel
from .verify import VerifyReport


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
