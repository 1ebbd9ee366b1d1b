"""The metadata a posequant ONNX model carries (``metadata_props``), so later stages never ask again.

Written by ``exporter`` and read by ``calibration`` and ``benchmarks``. Values are plain strings:
sizes as ``HxW``, lists as JSON. ``mean``/``std`` are per input channel *in the model's colour
order* and in 0-1 units: the model input is ``(pixels[..., colour order] / 255 - mean) / std``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import MetadataError
from .keypoints import KeypointSet

SCHEMA_VERSION = "1"
# The normalisation most pose models were trained with (torchvision's ImageNet statistics, RGB order, 0-1 units).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def format_size(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def parse_size(text: str) -> tuple[int, int]:
    """``"256x192"`` -> ``(256, 192)``: height first, as in the config files of the pose repos."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise MetadataError(f"size {text!r} is not HxW (height x width), e.g. 256x192") from None
    if h <= 0 or w <= 0:
        raise MetadataError(f"size {text!r} must be positive, e.g. 256x192")
    return h, w


@dataclass(frozen=True)
class ModelMeta:
    family: str
    keypoints: str
    joint_names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]
    input_size: tuple[int, int]  # (H, W)
    heatmap_size: tuple[int, int]  # (H, W)
    color: str  # "rgb" or "bgr": channel order the model expects
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    arch_config: dict[str, Any] = field(default_factory=dict)
    source_checkpoint: str = ""
    source_sha256: str = ""
    posequant_version: str = ""
    precision: str = "fp32"
    # Model output channel c holds the joint ``joint_names[channel_joints[c]]`` (a third-party model's own
    # order, from export-pose --joints); empty: the channels are in the keypoint set's order already.
    channel_joints: tuple[int, ...] = ()

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    @property
    def keypoint_set(self) -> KeypointSet:
        return KeypointSet(self.keypoints, self.joint_names, self.flip_pairs, self.skeleton)

    def with_(self, **changes: Any) -> "ModelMeta":
        return replace(self, **changes)

    def to_props(self) -> dict[str, str]:
        d = asdict(self)
        props = {
            "posequant_schema": SCHEMA_VERSION,
            "num_joints": str(self.num_joints),
            "input_size": format_size(self.input_size),
            "heatmap_size": format_size(self.heatmap_size),
        }
        for key, value in d.items():
            if key in props:
                continue
            props[key] = value if isinstance(value, str) else json.dumps(value)
        return props

    @classmethod
    def from_props(cls, props: dict[str, str], where: str = "model") -> "ModelMeta":
        if "posequant_schema" not in props:
            raise MetadataError(f"{where} has no posequant metadata: export it with `posequant export-pose`")
        try:
            return cls(
                family=props["family"],
                keypoints=props["keypoints"],
                joint_names=tuple(json.loads(props["joint_names"])),
                flip_pairs=tuple(tuple(p) for p in json.loads(props["flip_pairs"])),
                skeleton=tuple(tuple(p) for p in json.loads(props["skeleton"])),
                input_size=parse_size(props["input_size"]),
                heatmap_size=parse_size(props["heatmap_size"]),
                color=props["color"],
                mean=tuple(json.loads(props["mean"])),
                std=tuple(json.loads(props["std"])),
                arch_config=json.loads(props.get("arch_config", "{}")),
                source_checkpoint=props.get("source_checkpoint", ""),
                source_sha256=props.get("source_sha256", ""),
                posequant_version=props.get("posequant_version", ""),
                precision=props.get("precision", "fp32"),
                channel_joints=tuple(int(c) for c in json.loads(props.get("channel_joints", "[]"))),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise MetadataError(f"{where} has damaged posequant metadata ({e}): re-export it") from None


def read_meta(model: Any) -> ModelMeta:
    """Metadata of an ONNX model given as a path or an ``onnx.ModelProto``."""
    import onnx

    if isinstance(model, (str, Path)):
        where = str(model)
        model = onnx.load(where, load_external_data=False)
    else:
        where = "model"  # not str(model): that prints every weight of the proto (seconds for large models)
    props = {p.key: p.value for p in model.metadata_props}
    if "posequant_schema" not in props and where != "model":
        raise MetadataError(f"{where} has no posequant metadata; stamp it first: {stamp_command(where, model)}")
    return ModelMeta.from_props(props, where)


def input_batch(model: Any) -> int | None:
    """The fixed batch size of the model's (first) input, or None when the batch is dynamic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    return dims[0].dim_value or None if dims else None


def stamp_command(path: str | Path, model: Any = None) -> str:
    """The ``posequant export-pose`` command that stamps a metadata-less ONNX file, ready to paste.

    What the graph cannot say (joint order, colour order) is given as the most common choice for its
    joint count; the user checks it against the model's documentation.
    """
    import shlex

    path = Path(path)
    words = ["posequant", "export-pose", str(path)]
    dims = []
    if model is not None and model.graph.output:
        dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    joints = dims[1] if len(dims) == 4 else 0
    if joints in (16, 17):
        words += ["--keypoints", "mpii" if joints == 16 else "coco"]
    words += ["--color", "rgb"]
    hw = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][2:] if model is not None and \
        model.graph.input else []
    if len(hw) != 2 or not all(hw):
        words += ["--input-size", "256x192"]
    words += ["-o", str(path.with_name(path.stem + ".posequant.onnx"))]
    return " ".join(shlex.quote(w) for w in words) + " (with --keypoints/--joints, --color, --mean/--std as the model was trained)"


def write_meta(model: Any, meta: ModelMeta) -> None:
    """Stamp ``meta`` into an ``onnx.ModelProto`` (replacing any earlier posequant keys)."""
    props = meta.to_props()
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for key, value in keep + sorted(props.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
