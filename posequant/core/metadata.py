"""The metadata a posequant ONNX model carries (``metadata_props``), so later stages never ask again.

Written by ``exporter`` and read by ``calibration`` and ``benchmarks``. Values are plain strings:
sizes as ``HxW``, lists as JSON. ``mean``/``std`` are per input channel *in the model's colour
order* and in 0-1 units: the model input is ``(pixels[..., colour order] / 255 - mean) / std``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .enginefile import engine_info, is_engine
from .errors import MetadataError, MissingMetadataError
from .irfile import check_ir_graph, ir_props, is_ir, load_ir
from .keypoints import KeypointSet
from .onnxfile import check_graph, load_onnx

SCHEMA_VERSION = "1"
HEADS = ("heatmap", "simcc")  # kinds of output (posequant.core.decoding)
# The normalisation most pose models were trained with (torchvision's ImageNet statistics, RGB order, 0-1 units).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


REEXPORT = "re-export the model with `posequant export-pose`"  # what to do about damaged metadata

# Far beyond any pose model's input (384x288 is typical); a bigger side is a typo, and would
# allocate tens of GB before anything could say so.
MAX_INPUT_SIDE = 4096


def format_size(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def parse_size(text: str) -> tuple[int, int]:
    """``"256x192"`` -> ``(256, 192)``: height first, as in the config files of the pose repos."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise MetadataError(f"size {text!r} is not HxW (height x width), e.g. 256x192") from None
    check_size((h, w), str(text))
    return h, w


def check_size(hw: tuple[int, int], text: str | None = None) -> None:
    """A positive height and width, neither absurdly large."""
    h, w = hw
    shown = repr(text) if text is not None else f"{h}x{w}"
    if h <= 0 or w <= 0:
        raise MetadataError(f"size {shown} must be positive, e.g. 256x192")
    if h > MAX_INPUT_SIDE or w > MAX_INPUT_SIDE:
        raise MetadataError(f"size {shown} is too large: at most {MAX_INPUT_SIDE} per side (pose models take "
                            "e.g. 256x192 or 384x288)")


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
    # What the outputs are (posequant.core.decoding): "heatmap" (one N x J x h x w output; heatmap_size is
    # h x w) or "simcc" (two outputs N x J x Lx and N x J x Ly; heatmap_size is Ly x Lx, input x split ratio)
    head: str = "heatmap"
    simcc_split_ratio: float | None = None  # SimCC: bins per input pixel (RTMPose 2.0)
    outputs: tuple[str, ...] = ()  # the graph's output names, in the head's order (SimCC: x, y); () = as the graph has

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    @property
    def keypoint_set(self) -> KeypointSet:
        return KeypointSet(self.keypoints, self.joint_names, self.flip_pairs, self.skeleton)

    def output_text(self) -> str:
        """What the model outputs, for reports: ``heatmaps 64x48`` or ``SimCC x 384, y 512 (split ratio 2)``."""
        if self.head == "simcc":
            return f"SimCC x {self.heatmap_size[1]}, y {self.heatmap_size[0]} (split ratio {self.simcc_split_ratio:g})"
        return f"heatmaps {format_size(self.heatmap_size)}"

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
    def from_props(cls, props: dict[str, str], where: str = "model", fix: str = REEXPORT) -> "ModelMeta":
        """``fix``: what the one-line error for a damaged key tells the user to do."""
        if "posequant_schema" not in props:
            raise MissingMetadataError(f"{where} has no posequant metadata: export it with `posequant export-pose`")
        read = _PropReader(props, where, fix)
        head = read.value("head", _head, "heatmap")  # files written before SimCC have no head: heatmaps
        joint_names = read.json("joint_names", _names)
        num = len(joint_names)
        if "num_joints" in props:
            read.value("num_joints", lambda v: _equal(int(v), num, "the number of joint_names"))
        return cls(
            family=read.value("family", _text),
            keypoints=read.value("keypoints", _text),
            joint_names=joint_names,
            flip_pairs=read.json("flip_pairs", lambda v: _flip_pairs(_pairs(v, num))),
            skeleton=read.json("skeleton", lambda v: _pairs(v, num)),
            input_size=read.value("input_size", parse_size),
            heatmap_size=read.value("heatmap_size", parse_size),
            color=read.value("color", _color),
            mean=read.json("mean", lambda v: _triple(v, positive=False)),
            std=read.json("std", lambda v: _triple(v, positive=True)),
            arch_config=read.json("arch_config", _object, "{}"),
            source_checkpoint=props.get("source_checkpoint", ""),
            source_sha256=props.get("source_sha256", ""),
            posequant_version=props.get("posequant_version", ""),
            precision=props.get("precision", "fp32"),
            channel_joints=read.json("channel_joints", lambda v: _channel_order(v, num), "[]"),
            head=head,
            simcc_split_ratio=read.json("simcc_split_ratio", lambda v: _split_ratio(v, head), "null"),
            outputs=read.json("outputs", lambda v: _output_names(v, head), "[]"),
        )


class _PropReader:
    """Reads one metadata key at a time, so a bad value is reported with the file and the key."""

    def __init__(self, props: dict[str, str], where: str, fix: str = REEXPORT):
        self.props, self.where, self.fix = props, where, fix

    def value(self, key: str, parse, default: str | None = None):
        if key not in self.props and default is None:
            raise MetadataError(f"{self.where}: posequant metadata key {key!r} is missing: {self.fix}")
        raw = self.props.get(key, default)
        try:
            return parse(raw)
        except (MetadataError, ValueError, TypeError) as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MetadataError(f"{self.where}: posequant metadata key {key!r} is damaged ({raw[:60]!r}: "
                                f"{problem}): {self.fix}") from None

    def json(self, key: str, parse, default: str | None = None):
        def load(raw: str):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                raise ValueError("not valid JSON") from None
            return parse(value)

        return self.value(key, load, default)


def _text(v: Any) -> str:
    if not str(v).strip():
        raise ValueError("empty")
    return str(v)


def _color(v: str) -> str:
    if v.lower() not in ("rgb", "bgr"):
        raise ValueError("expected rgb or bgr")
    return v.lower()


def _head(v: str) -> str:
    if v not in HEADS:
        raise ValueError(f"expected one of {', '.join(HEADS)}")
    return v


def _split_ratio(v: Any, head: str) -> float | None:
    if head != "simcc":
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError("a SimCC model needs a positive split ratio (bins per input pixel)")
    return float(v)


def _output_names(v: Any, head: str) -> tuple[str, ...]:
    want = {"simcc": 2, "heatmap": 1}[head]
    ok = isinstance(v, list) and all(isinstance(n, str) and n for n in v) and len(set(v)) == len(v)
    if not ok or len(v) not in ((want,) if head == "simcc" else (0, want)):
        raise ValueError(f"expected {want} distinct output name{'s' if want > 1 else ''} for a {head} model")
    return tuple(v)


def _equal(got: int, want: int, what: str) -> int:
    if got != want:
        raise ValueError(f"{got} is not {what} ({want})")
    return got


def _names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(n, str) for n in v):
        raise ValueError("expected a non-empty list of joint names")
    return tuple(v)


def _pairs(v: Any, num_joints: int) -> tuple[tuple[int, int], ...]:
    ok = isinstance(v, list) and all(
        isinstance(p, list) and len(p) == 2 and all(type(i) is int and 0 <= i < num_joints for i in p) for p in v)
    if not ok:
        raise ValueError(f"expected a list of [i, j] joint index pairs, each in 0..{num_joints - 1}")
    return tuple(tuple(p) for p in v)


def _flip_pairs(pairs: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """Left/right pairs swap each joint with one other: a joint in two pairs, or paired with itself, would be
    averaged with the wrong heatmap by the flip test (measured: AP 0.281 -> 0.173)."""
    seen: dict[int, tuple[int, int]] = {}
    for pair in pairs:
        if pair[0] == pair[1]:
            raise ValueError(f"joint {pair[0]} is paired with itself")
        for j in pair:
            if j in seen:
                raise ValueError(f"joint {j} is in two pairs ({list(seen[j])} and {list(pair)})")
            seen[j] = pair
    return pairs


def _channel_order(v: Any, num_joints: int) -> tuple[int, ...]:
    """A third-party model's channel -> joint map: empty (the set's order) or a permutation."""
    if v == []:
        return ()
    if not (isinstance(v, list) and sorted(v) == list(range(num_joints)) and all(type(i) is int for i in v)):
        raise ValueError(f"expected [] or an order of the joint indices 0..{num_joints - 1}, each once")
    return tuple(v)


def _triple(v: Any, positive: bool) -> tuple[float, float, float]:
    ok = isinstance(v, list) and len(v) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    if not ok or (positive and any(x <= 0 for x in v)):
        raise ValueError(f"expected 3 finite{' positive' if positive else ''} numbers, one per channel")
    return tuple(float(x) for x in v)


def _object(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError("expected a JSON object")
    return v


def read_meta(model: Any, where: str | None = None) -> ModelMeta:
    """Metadata of a model given as a path (ONNX, OpenVINO IR ``.xml``, TensorRT ``.engine``) or an
    ``onnx.ModelProto``, checked against its graph.

    ``where`` names the model in messages (default: the path, or "model" for a proto).
    """
    if is_ir(model):  # an OpenVINO IR: the metadata travel in its rt_info
        return ir_meta(load_ir(model), where or str(model))
    if is_engine(model):  # a TensorRT engine: the metadata travel beside it
        return ModelMeta.from_props(engine_info(model)["props"], where or str(model))
    if isinstance(model, (str, Path)):
        where = where or str(model)
        model = load_onnx(model)
    # not str(model) for a proto: that prints every weight (seconds for large models)
    where = where or "model"
    props = {p.key: p.value for p in model.metadata_props}
    if "posequant_schema" not in props and where != "model":
        raise MissingMetadataError(f"{where} has no posequant metadata; stamp it first: {stamp_command(where, model)}")
    meta = ModelMeta.from_props(props, where)
    check_graph(model, meta, where)
    return meta


def ir_meta(ir: Any, where: str) -> ModelMeta:
    """The metadata of a loaded OpenVINO IR (``ov.Model``), checked against its graph."""
    props = ir_props(ir)
    if "posequant_schema" not in props:
        raise MissingMetadataError(f"{where} has no posequant metadata: convert a posequant ONNX file with "
                                   "`posequant convert MODEL.onnx --to openvino`")
    meta = ModelMeta.from_props(props, where)
    check_ir_graph(ir, meta, where)
    return meta


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
    joints = dims[1] if len(dims) in (3, 4) else 0  # heatmaps N x J x h x w, SimCC N x J x L
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
    """Stamp ``meta`` into an ``onnx.ModelProto`` (replacing any earlier posequant keys). Checked as every stage
    will read it back (a zero std, overlapping flip pairs): nothing is written that would then be refused."""
    props = meta.to_props()
    ModelMeta.from_props(props, "the metadata to write", "check the export's options (--mean/--std, --joints)")
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for key, value in keep + sorted(props.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
