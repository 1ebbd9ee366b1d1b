"""A pose model's output to joints in image pixels: the one decoder, for every head, flip test included.

Two heads, named by the metadata's ``head``:

- ``heatmap``: one N x J x h x w output, decoded as the official Simple Baselines / HRNet test code does
  (``lib/core/inference.py`` ``get_final_preds`` with POST_PROCESS; the flip test of
  ``function.validate``: flip back, swap the pairs, shift, average);
- ``simcc``: two outputs N x J x Lx and N x J x Ly (RTMPose's coordinate classification, ``Lx = W * r``,
  ``Ly = H * r`` for the split ratio r), decoded as mmpose does: ``SimCCLabel.decode`` (``get_simcc_maximum``:
  the argmax of each vector, the joint's score the smaller of the two maxima, a joint whose score is <= 0 at
  -1; then divided by r into crop pixels) and ``RTMCCHead.predict``'s flip test (``flip_vectors``: the
  mirrored input's ``simcc_x`` reversed, both vectors' joint pairs swapped, then averaged with the plain
  ones, with no shift).

Both end the same way: the model's channel order (``channel_joints``) is put into the keypoint set's order
first, and crop (or heatmap) points go back to the image through the crop's inverse affine transform.
Everything is a pure function of arrays; :func:`head_of` binds them to one model's metadata, and eval,
gate, predict and quantize's accuracy budget all decode through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .errors import MetadataError
from .metadata import HEADS, ModelMeta  # noqa: F401 (HEADS: the kinds this module decodes)
from .transforms import transform_preds

Outputs = Sequence[np.ndarray]  # a model's outputs, in the metadata's order (SimCC: x, then y)


def dataset_order(output: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """The model's joint channels (axis 1) rearranged into the keypoint set's order (``meta.channel_joints``)."""
    if not meta.channel_joints:
        return output
    assert output.shape[1] == len(meta.channel_joints), "channel_joints must name every output channel"
    return output[:, np.argsort(meta.channel_joints)]


def flip_permutation(num_joints: int, flip_pairs: Iterable[Sequence[int]]) -> list[int]:
    """Each joint's mirror joint (itself when it has none): mmpose's ``flip_indices``."""
    perm = list(range(num_joints))
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    return perm


# ---- heatmaps: flip test (function.validate with FLIP_TEST and SHIFT_HEATMAP) ---------------------


def flip_back(heatmaps: np.ndarray, flip_pairs: Iterable[Sequence[int]]) -> np.ndarray:
    """Heatmaps of a mirrored input, mirrored back with left/right joints swapped (a new array)."""
    assert heatmaps.ndim == 4, "heatmaps must be N x J x h x w"
    flipped = heatmaps[..., ::-1].copy()
    for a, b in flip_pairs:
        flipped[:, [a, b]] = flipped[:, [b, a]]
    return flipped


def shift_heatmaps(heatmaps: np.ndarray, pixels: int = 1) -> np.ndarray:
    """Shift ``pixels`` right (official SHIFT_HEATMAP: one): flipped features are off; the left columns are kept."""
    shifted = heatmaps.copy()
    if pixels:
        shifted[..., pixels:] = heatmaps[..., :-pixels]
    return shifted


def flip_shift(input_width: int, heatmap_width: int) -> int:
    """Heatmap pixels the flipped-back heatmaps lag behind: (s - 1) / s at stride s, rounded.

    Mirroring an input of W pixels maps x to W - 1 - x, and mirroring a heatmap of w = W / s pixels maps
    u to w - 1 - u; with u = x / s the flipped-back peak sits (s - 1) / s heatmap pixels left of the
    true one. The official code shifts by one pixel, right for its stride 4 (0.75, rounded); at stride 1
    (full-resolution heatmaps) the right shift is none, and a shift of one would move every joint.
    """
    stride = input_width / heatmap_width
    return int(math.floor((stride - 1) / stride + 0.5))


def average_flip(
    heatmaps: np.ndarray, heatmaps_flipped: np.ndarray, flip_pairs: Iterable[Sequence[int]], *,
    shift: bool | int = True,
) -> np.ndarray:
    """Official flip test: mean of the heatmaps and the flipped-back (and shifted) flipped ones.

    ``shift``: True for the official one pixel, or the number of pixels (:func:`flip_shift`).
    """
    back = flip_back(heatmaps_flipped, flip_pairs)
    pixels = int(shift)
    if pixels:
        back = shift_heatmaps(back, pixels)
    return (heatmaps + back) * 0.5


def heatmaps_to_joints(meta: ModelMeta, heatmaps: np.ndarray, centers: np.ndarray, scales: np.ndarray,
                       heatmaps_flipped: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps to joints in image pixels, in the dataset's joint order: channels reordered, the flip test
    averaged (its shift set by the model's real stride), decoded. ``heatmaps_flipped``: the output for the
    mirrored inputs, or None (no flip test)."""
    heatmaps = dataset_order(heatmaps, meta)
    if heatmaps_flipped is not None:
        shift = flip_shift(meta.input_size[1], heatmaps.shape[3])
        heatmaps = average_flip(heatmaps, dataset_order(heatmaps_flipped, meta), meta.flip_pairs, shift=shift)
    return decode_heatmaps(heatmaps, centers, scales)


# ---- heatmaps: decoding (lib/core/inference.py, POST_PROCESS on) ----------------------------------


def get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per joint: the first maximum's (x, y) in heatmap pixels (float32, 0 where max <= 0) and its value."""
    assert heatmaps.ndim == 4, "heatmaps must be N x J x h x w"
    n, j, _, width = heatmaps.shape
    flat = heatmaps.reshape(n, j, -1)
    idx = np.argmax(flat, axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2)
    coords = np.stack([idx % width, idx // width], axis=2).astype(np.float32)
    coords *= (maxvals > 0.0).astype(np.float32)
    return coords, maxvals


def refine_quarter_pixel(heatmaps: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Move each peak a quarter pixel toward its higher neighbour (away from the borders), in place."""
    n, j, height, width = heatmaps.shape
    px = np.floor(coords[..., 0] + 0.5).astype(np.int64)
    py = np.floor(coords[..., 1] + 0.5).astype(np.int64)
    inside = (px > 1) & (px < width - 1) & (py > 1) & (py < height - 1)
    b, k = np.nonzero(inside)
    x, y = px[b, k], py[b, k]
    dx = heatmaps[b, k, y, x + 1] - heatmaps[b, k, y, x - 1]
    dy = heatmaps[b, k, y + 1, x] - heatmaps[b, k, y - 1, x]
    coords[b, k] += np.stack([np.sign(dx), np.sign(dy)], axis=1) * 0.25
    return coords


def decode_heatmaps(heatmaps: np.ndarray, centers: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Official ``get_final_preds``: joints in image pixels (float32 N x J x 2) and scores (N x J x 1)."""
    heatmaps = np.asarray(heatmaps)
    coords, maxvals = get_max_preds(heatmaps)
    refine_quarter_pixel(heatmaps, coords)
    heatmap_wh = (heatmaps.shape[3], heatmaps.shape[2])
    return _to_image(coords, centers, scales, heatmap_wh), maxvals


def _to_image(coords: np.ndarray, centers: np.ndarray, scales: np.ndarray, output_wh) -> np.ndarray:
    """(N, J, 2) points of an ``output_wh`` crop or heatmap back to image pixels (float32, as the official
    all_preds)."""
    preds = np.empty(coords.shape, np.float32)
    for i in range(coords.shape[0]):
        preds[i] = transform_preds(coords[i], centers[i], scales[i], output_wh)
    return preds


# ---- SimCC (mmpose: codecs/simcc_label.py, codecs/utils/post_processing.py, models/utils/tta.py) ---


def simcc_maximum(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mmpose's ``get_simcc_maximum``: per joint the (x, y) bins of each vector's first maximum (float32
    N x J x 2) and the score, the smaller of the two maxima (N x J); where the score is <= 0 both bins are
    -1."""
    assert simcc_x.ndim == simcc_y.ndim == 3, "SimCC outputs must be N x J x L"
    locs = np.stack([np.argmax(simcc_x, axis=2), np.argmax(simcc_y, axis=2)], axis=-1).astype(np.float32)
    vals = np.minimum(np.amax(simcc_x, axis=2), np.amax(simcc_y, axis=2))
    locs[vals <= 0.0] = -1
    return locs, vals


def flip_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, flip_pairs: Iterable[Sequence[int]]
               ) -> tuple[np.ndarray, np.ndarray]:
    """mmpose's ``flip_vectors``: the outputs of a mirrored input, mirrored back: each joint takes its mirror
    joint's vectors, and x is reversed. No shift (mmpose has none: with split ratio r, a pixel's bin comes
    back r - 1 bins to the right, half a pixel at r = 2)."""
    perm = flip_permutation(simcc_x.shape[1], flip_pairs)
    return simcc_x[:, perm, ::-1], simcc_y[:, perm]


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float, centers: np.ndarray,
                 scales: np.ndarray, input_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """mmpose's ``SimCCLabel.decode`` (bins / split ratio: crop pixels), then back to image pixels through the
    crop of ``input_size`` (H, W): joints (float32 N x J x 2) and scores (N x J x 1)."""
    locs, vals = simcc_maximum(np.asarray(simcc_x), np.asarray(simcc_y))
    locs /= np.float32(split_ratio)
    return _to_image(locs, centers, scales, (input_size[1], input_size[0])), vals[..., None]


def simcc_to_joints(meta: ModelMeta, simcc_x: np.ndarray, simcc_y: np.ndarray, centers: np.ndarray,
                    scales: np.ndarray, flipped: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """SimCC outputs to joints in image pixels, in the dataset's order: channels reordered, the flip test
    averaged as ``RTMCCHead.predict`` does (``flipped``: the outputs for the mirrored inputs), decoded."""
    x, y = dataset_order(simcc_x, meta), dataset_order(simcc_y, meta)
    if flipped is not None:
        fx, fy = flip_simcc(dataset_order(flipped[0], meta), dataset_order(flipped[1], meta), meta.flip_pairs)
        x, y = (x + fx) * np.float32(0.5), (y + fy) * np.float32(0.5)
    return decode_simcc(x, y, meta.simcc_split_ratio, centers, scales, meta.input_size)


# ---- heads: the functions above bound to one model's metadata ----------------------------------------


def _shape(a) -> str:
    shape = tuple(getattr(a, "shape", ()))
    return "x".join(map(str, shape)) if shape else "a scalar"


@dataclass(frozen=True)
class HeatmapHead:
    """One N x J x h x w heatmap output."""

    meta: ModelMeta
    name = "heatmap"

    def check(self, outputs: Outputs, where: str) -> None:
        """What the model returned on a real batch is N x joints x h x w, as many joints as its metadata names
        (the dims the graph left symbolic). The heatmap's h x w is the decoder's to read from the output."""
        m = self.meta
        if len(outputs) < 1 or outputs[0].ndim != 4 or outputs[0].shape[1] != m.num_joints:
            raise MetadataError(f"{where} returned {_shape(outputs[0]) if outputs else 'nothing'} for a "
                                f"{m.input_size[0]}x{m.input_size[1]} input, but its metadata expects N x "
                                f"{m.num_joints} x h x w heatmaps ({m.keypoints}): re-export it with "
                                "`posequant export-pose`")

    def decode(self, outputs: Outputs, centers: np.ndarray, scales: np.ndarray, flipped: Outputs | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        return heatmaps_to_joints(self.meta, outputs[0], centers, scales, flipped[0] if flipped else None)


@dataclass(frozen=True)
class SimCCHead:
    """Two outputs, N x J x Lx and N x J x Ly, in the metadata's order (x first)."""

    meta: ModelMeta
    name = "simcc"

    def check(self, outputs: Outputs, where: str) -> None:
        m = self.meta
        ly, lx = m.heatmap_size
        want = [(m.num_joints, lx), (m.num_joints, ly)]
        got = [tuple(o.shape[1:]) if getattr(o, "ndim", 0) == 3 else None for o in outputs]
        if len(outputs) != 2 or got != want:
            shown = " and ".join(_shape(o) for o in outputs) or "nothing"
            raise MetadataError(f"{where} returned {shown} for a {m.input_size[0]}x{m.input_size[1]} input, but its "
                                f"metadata expects SimCC vectors N x {m.num_joints} x {lx} (x) and N x "
                                f"{m.num_joints} x {ly} (y): re-export it with `posequant export-pose`")

    def decode(self, outputs: Outputs, centers: np.ndarray, scales: np.ndarray, flipped: Outputs | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        return simcc_to_joints(self.meta, outputs[0], outputs[1], centers, scales,
                               (flipped[0], flipped[1]) if flipped else None)


def head_of(meta: ModelMeta) -> HeatmapHead | SimCCHead:
    """The decoder of a model with this metadata."""
    return SimCCHead(meta) if meta.head == "simcc" else HeatmapHead(meta)


def decode(meta: ModelMeta, outputs: Outputs, centers: np.ndarray, scales: np.ndarray,
           flipped: Outputs | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Joints in image pixels (float32 N x J x 2, the dataset's order) and their scores (N x J x 1) from a
    model's outputs for N crops (``centers``/``scales``: the crops' boxes); ``flipped``: its outputs for the
    mirrored crops (the flip test), or None."""
    return head_of(meta).decode(outputs, centers, scales, flipped)
