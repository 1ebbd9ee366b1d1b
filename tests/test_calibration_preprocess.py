"""Test-time preprocessing and decoding: transforms, crops, normalisation, batches, flip test, decode."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from posequant.calibration import (
    Person,
    affine_transform,
    crop_person,
    get_affine_transform,
    iter_batches,
    normalize,
    open_dataset,
    read_image,
    transform_preds,
)
from posequant.core.decoding import average_flip, decode_heatmaps, flip_back, shift_heatmaps
from posequant.core.errors import DataError
from posequant.core.keypoints import COCO, MPII
from posequant.core.metadata import ModelMeta

from conftest import COCO_MINI, needs_shared

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_meta(input_size=(64, 48), color="rgb", mean=MEAN, std=STD) -> ModelMeta:
    return ModelMeta(
        family="test", keypoints=COCO.name, joint_names=COCO.joint_names, flip_pairs=COCO.flip_pairs,
        skeleton=COCO.skeleton, input_size=input_size, heatmap_size=(input_size[0] // 4, input_size[1] // 4),
        color=color, mean=mean, std=std,
    )


def box_to_output(point, center, scale, output_wh):
    """The official crop by hand: uniform zoom output_w / (scale_w * 200) about the box centre."""
    zoom = output_wh[0] / (scale[0] * 200)
    return np.array([(point[0] - center[0]) * zoom + output_wh[0] / 2, (point[1] - center[1]) * zoom + output_wh[1] / 2])


# ---- transforms -----------------------------------------------------------------------------------


def test_affine_transform_is_the_official_uniform_zoom() -> None:
    center, scale, output_wh = np.array([300.0, 200.0]), np.array([1.5, 2.0]), (192, 256)
    trans = get_affine_transform(center, scale, 0, output_wh)
    for point in ([300.0, 200.0], [150.0, 50.0], [450.0, 400.0]):
        np.testing.assert_allclose(affine_transform(point, trans), box_to_output(point, center, scale, output_wh), atol=1e-3)


def test_rotation_turns_about_the_centre() -> None:
    center, scale = np.array([100.0, 100.0]), np.array([1.0, 1.0])
    trans = get_affine_transform(center, scale, 90, (200, 200))
    # a point above the centre ends up beside it, at the same distance
    moved = affine_transform([100.0, 50.0], trans)
    assert math.isclose(np.linalg.norm(moved - [100.0, 100.0]), 50.0, rel_tol=1e-4)
    assert abs(moved[1] - 100.0) < 1e-3


@pytest.mark.parametrize("output_wh", [(192, 256), (48, 64), (256, 256)])
def test_forward_then_transform_preds_returns_the_joints(output_wh) -> None:
    rng = np.random.default_rng(1)
    joints = rng.uniform(0, 1000, (17, 2))
    center, scale = np.array([512.3, 401.7]), np.array([3.1, 4.13])
    trans = get_affine_transform(center, scale, 0, output_wh)
    warped = np.array([affine_transform(j, trans) for j in joints])
    np.testing.assert_allclose(transform_preds(warped, center, scale, output_wh), joints, rtol=0, atol=1e-6)


def test_scalar_scale_means_square_box() -> None:
    a = get_affine_transform([50.0, 60.0], 1.2, 0, (64, 64))
    b = get_affine_transform([50.0, 60.0], np.array([1.2, 1.2]), 0, (64, 64))
    np.testing.assert_array_equal(a, b)


# ---- images, crops, normalisation ------------------------------------------------------------------


def test_crop_person_puts_pixels_where_the_transform_says(tmp_path: Path) -> None:
    image = np.zeros((300, 400, 3), np.uint8)
    image[120:123, 250:253] = (10, 200, 30)  # 3x3 marker centred on (251, 121)
    center, scale, input_size = np.array([200.0, 150.0]), np.array([1.0, 4 / 3]), (64, 48)
    crop, trans = crop_person(image, center, scale, input_size)
    assert crop.shape == (64, 48, 3) and crop.dtype == np.uint8
    x, y = box_to_output([251, 121], center, scale, (48, 64))
    green = np.unravel_index(np.argmax(crop[..., 1]), crop.shape[:2])
    assert abs(green[1] - x) <= 1 and abs(green[0] - y) <= 1
    np.testing.assert_allclose(trans, get_affine_transform(center, scale, 0, (48, 64)))
    # outside the image: constant 0 border
    corner, _ = crop_person(image + 50, np.array([0.0, 0.0]), np.array([1.0, 4 / 3]), input_size)
    assert corner[0, 0].tolist() == [0, 0, 0] and corner[-1, -1].tolist() == [50, 50, 50]


def test_crop_person_interpolates_bilinearly() -> None:
    ramp = np.tile((2 * np.arange(100)).astype(np.uint8)[None, :, None], (50, 1, 3))  # value = 2 x
    center, scale, input_size = np.array([49.5, 24.5]), np.array([0.1, 0.1]), (40, 40)  # 20 px -> 40 px
    crop, trans = crop_person(ramp, center, scale, input_size)
    inverse = cv2.invertAffineTransform(trans)
    for u in (3, 10, 17, 30):
        x = affine_transform([u, 20], inverse)[0]
        assert abs(int(crop[20, u, 0]) - 2 * x) <= 0.5 + 1e-6  # linear in x, not the nearest pixel's value
    assert np.any(crop % 2 == 1)


def test_read_image_is_bgr_and_fails_clearly(tmp_path: Path) -> None:
    image = np.zeros((10, 12, 3), np.uint8)
    image[..., 0] = 255  # blue in BGR
    cv2.imwrite(str(tmp_path / "blue.png"), image)
    assert read_image(tmp_path / "blue.png")[0, 0].tolist() == [255, 0, 0]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DataError, match=r"cannot decode image .*bad\.jpg"):
        read_image(tmp_path / "bad.jpg")


def test_normalize_colour_order_mean_and_std() -> None:
    pixel = np.array([10, 20, 30], np.uint8).reshape(1, 1, 1, 3)  # B=10, G=20, R=30
    rgb = normalize(pixel, make_meta(color="rgb"))
    bgr = normalize(pixel, make_meta(color="bgr", mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0)))
    assert rgb.shape == (1, 3, 1, 1) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb.ravel(), [(30 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (10 / 255 - 0.406) / 0.225], rtol=1e-6)
    np.testing.assert_allclose(bgr.ravel(), [(10 / 255 - 0.1) / 0.5, (20 / 255 - 0.2) / 0.25, (30 / 255 - 0.3) / 2.0], rtol=1e-6)


def test_normalize_is_bit_identical_to_totensor_normalize() -> None:
    crops = np.random.default_rng(0).integers(0, 256, (3, 16, 12, 3), dtype=np.uint8)
    ours = normalize(crops, make_meta(color="rgb"))
    # torchvision ToTensor + Normalize on the RGB image, as the official loader does
    t = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).permute(0, 3, 1, 2).float().div(255)
    t = t.sub_(torch.tensor(MEAN).view(1, 3, 1, 1)).div_(torch.tensor(STD).view(1, 3, 1, 1))
    assert ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, t.numpy())


def test_normalize_rejects_unknown_colour_order() -> None:
    from posequant.core.errors import MetadataError

    with pytest.raises(MetadataError, match=r"'gray'"):
        normalize(np.zeros((1, 2, 2, 3), np.uint8), make_meta(color="gray"))


# ---- batches --------------------------------------------------------------------------------------


@pytest.fixture
def people(tmp_path: Path) -> list[Person]:
    """Seven people over five images; images 1 and 3 hold two people each (as COCO does)."""
    result = []
    for i in range(5):
        image = np.random.default_rng(i).integers(0, 255, (90, 120, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"{i}.png"), image)
        for k in range(2 if i in (1, 3) else 1):
            center = np.array([40.0 + 10 * k, 45.0])
            result.append(Person(tmp_path / f"{i}.png", center, np.array([0.3, 0.4]), None, None, len(result)))
    return result


def reference_inputs(people: list[Person], meta: ModelMeta) -> np.ndarray:
    crops = [crop_person(read_image(p.image), p.center, p.scale, meta.input_size)[0] for p in people]
    return normalize(np.stack(crops), meta)


def test_batches_keep_order_sizes_and_values(people: list[Person]) -> None:
    meta = make_meta()
    batches = list(iter_batches(people, meta, batch_size=3, workers=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [p.index for b in batches for p in b.people] == list(range(7))
    inputs = np.concatenate([b.inputs for b in batches])
    np.testing.assert_array_equal(inputs, reference_inputs(people, meta))
    assert inputs.shape == (7, 3, 64, 48) and inputs.dtype == np.float32
    np.testing.assert_array_equal(batches[1].centers, np.stack([p.center for p in people[3:6]]))
    np.testing.assert_array_equal(batches[1].scales, np.stack([p.scale for p in people[3:6]]))
    assert batches[0].inputs_flipped is None


def test_batches_flip_and_limit(people: list[Person]) -> None:
    batches = list(iter_batches(people, make_meta(), batch_size=4, limit=5, workers=2, flip=True))
    assert [len(b) for b in batches] == [4, 1]
    for b in batches:
        assert b.inputs_flipped.flags.c_contiguous
        np.testing.assert_array_equal(b.inputs_flipped, b.inputs[..., ::-1])


def test_bad_image_raises_or_is_skipped(people: list[Person]) -> None:
    people[2].image.write_bytes(b"broken")  # image 1: people 1 and 2
    with pytest.raises(DataError, match=r"cannot decode image .*1\.png"):
        list(iter_batches(people, make_meta(), batch_size=2, workers=2))
    batches = iter_batches(people, make_meta(), batch_size=2, workers=2, skip_bad=True)
    kept = [p.index for b in batches for p in b.people]
    # people 1 and 2 fall in different batches; the image is listed once
    assert kept == [0, 3, 4, 5, 6] and batches.skipped == [people[1].image]
    assert batches.skipped_people == 2 and len(batches) == 4


# ---- flip test ------------------------------------------------------------------------------------


def test_flip_back_mirrors_swaps_and_is_an_involution() -> None:
    heatmaps = np.random.default_rng(0).random((2, 16, 8, 6)).astype(np.float32)
    back = flip_back(heatmaps, MPII.flip_pairs)
    np.testing.assert_array_equal(back[:, 5], heatmaps[:, 0, :, ::-1])  # r_ankle -> l_ankle
    np.testing.assert_array_equal(back[:, 6], heatmaps[:, 6, :, ::-1])  # pelvis stays
    np.testing.assert_array_equal(flip_back(back, MPII.flip_pairs), heatmaps)
    assert not np.shares_memory(back, heatmaps)


def test_shift_heatmaps_moves_one_pixel_right_and_keeps_column_0() -> None:
    heatmaps = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)
    shifted = shift_heatmaps(heatmaps)
    np.testing.assert_array_equal(shifted[..., 1:], heatmaps[..., :-1])
    np.testing.assert_array_equal(shifted[..., 0], heatmaps[..., 0])


def test_average_flip_of_a_consistent_pair_is_the_original() -> None:
    heatmaps = np.random.default_rng(2).random((1, 17, 8, 6)).astype(np.float32)
    mirrored = flip_back(heatmaps, COCO.flip_pairs)  # what a perfect model sees on the mirrored input
    np.testing.assert_allclose(average_flip(heatmaps, mirrored, COCO.flip_pairs, shift=False), heatmaps)
    shifted = average_flip(heatmaps, mirrored, COCO.flip_pairs)
    np.testing.assert_allclose(shifted[..., 1:], (heatmaps[..., 1:] + heatmaps[..., :-1]) / 2, rtol=1e-6)


# ---- decoding -------------------------------------------------------------------------------------


def gaussian_heatmap(height: int, width: int, x: float, y: float, sigma: float = 2.0) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    return np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_gaussian_peak_decodes_to_the_image_point() -> None:
    center, scale, heatmap_wh = np.array([320.0, 240.0]), np.array([1.5, 2.0]), (48, 64)
    # peak between pixels 20 and 21 (closer to 20), and between 30 and 29 (closer to 30)
    heatmaps = gaussian_heatmap(64, 48, 20.3, 29.8)[None, None]
    coords, maxvals = decode_heatmaps(heatmaps, center[None], scale[None])
    # argmax (20, 30), then a quarter pixel toward the higher neighbour: (20.25, 29.75)
    zoom = scale[0] * 200 / heatmap_wh[0]
    expected = [(20.25 - 24) * zoom + 320.0, (29.75 - 32) * zoom + 240.0]
    np.testing.assert_allclose(coords[0, 0], expected, atol=1e-3)
    assert coords.dtype == np.float32 and coords.shape == (1, 1, 2) and maxvals.shape == (1, 1, 1)
    assert maxvals[0, 0, 0] == heatmaps.max()


def test_no_shift_at_the_border_and_masked_when_max_not_positive() -> None:
    center, scale = np.array([[100.0, 100.0]]), np.array([[1.0, 1.0]])
    negative = -np.ones((16, 16), np.float32)
    negative[7, 5] = -0.5  # a maximum, but not above 0: masked to (0, 0)
    heatmaps = np.stack([gaussian_heatmap(16, 16, 1.2, 8.0), negative])[None]
    coords, maxvals = decode_heatmaps(heatmaps, center, scale)
    zoom = 200 / 16
    np.testing.assert_allclose(coords[0, 0], [(1 - 8) * zoom + 100, 100.0], atol=1e-3)  # px = 1: no quarter shift
    np.testing.assert_allclose(coords[0, 1], [(0 - 8) * zoom + 100, (0 - 8) * zoom + 100], atol=1e-3)  # (0, 0)
    assert maxvals[0, 1, 0] == -0.5


def official_get_final_preds(batch_heatmaps, center, scale):
    """lib/core/inference.py (get_max_preds + get_final_preds, POST_PROCESS on), loops as written there."""
    n, j, h, w = batch_heatmaps.shape
    reshaped = batch_heatmaps.reshape((n, j, -1))
    idx = np.argmax(reshaped, 2).reshape((n, j, 1))
    maxvals = np.amax(reshaped, 2).reshape((n, j, 1))
    coords = np.tile(idx, (1, 1, 2)).astype(np.float32)
    coords[:, :, 0] = coords[:, :, 0] % w
    coords[:, :, 1] = np.floor(coords[:, :, 1] / w)
    coords *= np.tile(np.greater(maxvals, 0.0), (1, 1, 2)).astype(np.float32)
    for b in range(n):
        for p in range(j):
            hm = batch_heatmaps[b][p]
            px, py = int(math.floor(coords[b][p][0] + 0.5)), int(math.floor(coords[b][p][1] + 0.5))
            if 1 < px < w - 1 and 1 < py < h - 1:
                diff = np.array([hm[py][px + 1] - hm[py][px - 1], hm[py + 1][px] - hm[py - 1][px]])
                coords[b][p] += np.sign(diff) * 0.25
    preds = coords.copy()
    for b in range(n):
        trans = get_affine_transform(center[b], scale[b], 0, [w, h], inv=True)
        for p in range(j):
            preds[b, p] = np.dot(trans, np.array([coords[b, p, 0], coords[b, p, 1], 1.0]))[:2]
    return preds, maxvals


def test_decode_matches_the_official_loops() -> None:
    rng = np.random.default_rng(3)
    heatmaps = rng.normal(0, 1, (4, 17, 64, 48)).astype(np.float32)
    heatmaps[0, 0] -= 10  # all negative: masked
    heatmaps[1, 2, 0, 5] = 99  # peak on the border: no shift
    centers, scales = rng.uniform(100, 500, (4, 2)), rng.uniform(0.5, 3, (4, 2))
    coords, maxvals = decode_heatmaps(heatmaps, centers, scales)
    ref_coords, ref_maxvals = official_get_final_preds(heatmaps, centers, scales)
    np.testing.assert_array_equal(maxvals, ref_maxvals)
    np.testing.assert_array_equal(coords, ref_coords)  # bit for bit


# ---- real data (../shared) ------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data is not present")
def test_real_crops_keep_the_joints_and_batches_match_single_crops() -> None:
    meta = make_meta(input_size=(256, 256))
    ds = open_dataset(SHARED / "data" / "mpii-mini", input_size=meta.input_size)
    batches = list(iter_batches(ds, meta, batch_size=2, workers=2))
    np.testing.assert_array_equal(np.concatenate([b.inputs for b in batches]), reference_inputs(list(ds), meta))
    for person in ds:
        _, trans = crop_person(read_image(person.image), person.center, person.scale, meta.input_size)
        labelled = person.joints_vis > 0
        inside = np.array([affine_transform(j, trans) for j in person.joints[labelled]])
        # the official box (1.25 x the person, centre moved down) keeps the labelled joints in the crop
        assert inside.min() >= 0 and inside.max() < 256
        back = transform_preds(inside, person.center, person.scale, (256, 256))
        np.testing.assert_allclose(back, person.joints[labelled], atol=1e-6)


def test_opencv_runs_one_thread_per_call_once_posequant_crops():
    """OpenCV's own striping of warpAffine depends on whether its pool is free; posequant's parallelism is
    per image (posequant.core.opencv)."""
    import posequant.calibration  # noqa: F401

    assert cv2.getNumThreads() == 1


BORDER_PERSON_IMAGE = COCO_MINI / "train2017" / "000000538113.jpg"


@pytest.mark.shared
@needs_shared(BORDER_PERSON_IMAGE)
def test_concurrent_crops_are_the_same_bytes():
    """A coco-mini train person whose crop, made in two threads at once under OpenCV's default threading,
    differed from the first in 2 border pixels a third of the time (calibration ranges then moved between runs
    of one command); one OpenCV thread per call makes every crop the same."""
    from concurrent.futures import ThreadPoolExecutor

    image = read_image(BORDER_PERSON_IMAGE)
    center, scale = np.array([475.91500854, 235.07000732]), np.array([0.45862499, 0.61150002])
    first = crop_person(image, center, scale, (256, 192))[0]
    with ThreadPoolExecutor(2) as pool:
        crops = list(pool.map(lambda _: crop_person(image, center, scale, (256, 192))[0], range(1500)))
    assert sum(not np.array_equal(c, first) for c in crops) == 0
