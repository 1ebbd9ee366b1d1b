"""Dataset readers: MPII, COCO and plain folders, on synthetic data and (tier 2) on ../shared."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from posequant.calibration import box_to_center_scale, load_mpii_gt, open_dataset
from posequant.core.errors import DataError
from posequant.core.keypoints import COCO, MPII

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
INPUT_SIZE = (256, 192)  # H, W: aspect ratio W/H = 0.75


def write_image(path: Path, height: int = 60, width: int = 80, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    cv2.circle(image, (width // 2, height // 2), 5, (255, 255, 255), -1)
    assert cv2.imwrite(str(path), image)


def mpii_record(image: str, center: list[float], scale: float, offset: float = 0.0) -> dict:
    joints = [[10.0 + j + offset, 20.0 + 2 * j] for j in range(MPII.num_joints)]  # 1-based
    vis = [1] * MPII.num_joints
    vis[0] = 0
    return {"image": image, "center": center, "scale": scale, "joints": joints, "joints_vis": vis}


@pytest.fixture
def mpii_root(tmp_path: Path) -> Path:
    root = tmp_path / "mpii"
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        write_image(root / "images" / name, seed=i)
    records = [
        mpii_record("a.jpg", [41.0, 31.0], 0.2),
        mpii_record("b.jpg", [30.0, 25.0], 0.1, offset=1.0),
        mpii_record("c.jpg", [-1.0, -1.0], 0.3),  # centre -1: the official code leaves it unadjusted
    ]
    write_json(root / "annot" / "valid.json", records)
    return root


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def coco_ann(ann_id: int, image_id: int, bbox: list[float], *, keypoints=None, iscrowd=0, category=1, area=100.0):
    if keypoints is None:
        keypoints = []
        for j in range(COCO.num_joints):
            keypoints += [bbox[0] + j, bbox[1] + j, 2 if j % 3 else 1]
        keypoints[2] = 0  # first joint unlabelled (v=0) but with coordinates
    return {
        "id": ann_id, "image_id": image_id, "bbox": bbox, "keypoints": keypoints, "area": area,
        "iscrowd": iscrowd, "category_id": category, "num_keypoints": sum(1 for v in keypoints[2::3] if v > 0),
    }


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    images = [
        {"id": 7, "file_name": "000000000007.jpg", "width": 80, "height": 60},
        {"id": 3, "file_name": "000000000003.jpg", "width": 80, "height": 60},
    ]
    for i, image in enumerate(images):
        write_image(root / "val2017" / image["file_name"], seed=i)
    anns = [
        coco_ann(100, 3, [10.0, 5.0, 20.0, 40.0]),  # kept (2nd: image 3 is listed after image 7)
        coco_ann(101, 7, [-4.0, 30.0, 30.0, 60.0]),  # kept: clipped to x>=0 and y2<=59
        coco_ann(102, 7, [5.0, 5.0, 10.0, 10.0], iscrowd=1),  # crowd
        coco_ann(103, 7, [5.0, 5.0, 10.0, 10.0], keypoints=[0] * 51),  # no keypoints
        coco_ann(104, 7, [5.0, 5.0, 10.0, 10.0], area=0.0),  # zero area
        coco_ann(105, 7, [90.0, 5.0, 10.0, 10.0]),  # box right of the image: x2 < x1
        coco_ann(106, 7, [5.0, 5.0, 10.0, 10.0], category=2),  # not a person
        coco_ann(107, 7, [40.0, 10.0, 30.0, 10.0]),  # kept, wide box
    ]
    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]
    write_json(root / "annotations" / "person_keypoints_val2017.json",
               {"images": images, "annotations": anns, "categories": categories})
    return root


# ---- MPII ---------------------------------------------------------------------------------------


def test_mpii_detected_with_official_centre_scale_and_0_based_joints(mpii_root: Path) -> None:
    ds = open_dataset(mpii_root, input_size=INPUT_SIZE)
    assert (ds.format, ds.split, ds.keypoints, len(ds)) == ("mpii", "valid", MPII, 3)
    a, b, c = ds
    # c[1] += 15 * s; s *= 1.25; c -= 1
    np.testing.assert_array_equal(a.center, [40.0, 30.0 + 15 * 0.2])
    np.testing.assert_array_equal(a.scale, [0.25, 0.25])
    np.testing.assert_array_equal(b.joints[3], [10.0 + 3 + 1 - 1, 20.0 + 6 - 1])
    np.testing.assert_array_equal(a.joints_vis[:2], [0, 1])
    # centre -1 is left alone except for the -1 shift
    np.testing.assert_array_equal(c.center, [-2.0, -2.0])
    np.testing.assert_array_equal(c.scale, [0.3, 0.3])
    assert [p.index for p in ds] == [0, 1, 2]
    assert a.image == mpii_root / "images" / "a.jpg" and ds.coco_json is None and ds.skipped == []


def test_person_arrays_are_read_only(mpii_root: Path) -> None:
    person = open_dataset(mpii_root, input_size=INPUT_SIZE)[0]
    with pytest.raises(ValueError):
        person.center[0] = 0.0


def test_mpii_default_splits_follow_purpose(mpii_root: Path) -> None:
    assert open_dataset(mpii_root, input_size=INPUT_SIZE, purpose="calib").split == "valid"  # no train
    write_json(mpii_root / "annot" / "train.json", [mpii_record("a.jpg", [41.0, 31.0], 0.2)])
    assert open_dataset(mpii_root, input_size=INPUT_SIZE, purpose="calib").split == "train"
    assert open_dataset(mpii_root, input_size=INPUT_SIZE, purpose="eval").split == "valid"
    assert len(open_dataset(mpii_root, input_size=INPUT_SIZE, split="train")) == 1


def test_single_unusual_split_is_used_and_test_split_has_no_joints(mpii_root: Path) -> None:
    (mpii_root / "annot" / "valid.json").unlink()
    write_json(mpii_root / "annot" / "test.json", [{"image": "a.jpg", "center": [41, 31], "scale": 0.2}])
    ds = open_dataset(mpii_root, input_size=INPUT_SIZE)
    assert ds.split == "test" and ds[0].joints is None and ds[0].joints_vis is None


def test_unknown_split_names_the_available_ones(mpii_root: Path) -> None:
    with pytest.raises(DataError, match=r"no split 'val' .*choose one of valid"):
        open_dataset(mpii_root, input_size=INPUT_SIZE, split="val")


def test_ambiguous_splits_ask_for_split(mpii_root: Path) -> None:
    (mpii_root / "annot" / "valid.json").rename(mpii_root / "annot" / "part1.json")
    write_json(mpii_root / "annot" / "part2.json", [])
    with pytest.raises(DataError, match=r"part1, part2.*--split"):
        open_dataset(mpii_root, input_size=INPUT_SIZE)


def test_format_override(mpii_root: Path) -> None:
    write_image(mpii_root / "cover.jpg")
    assert open_dataset(mpii_root, input_size=INPUT_SIZE).format == "mpii"
    folder = open_dataset(mpii_root, input_size=INPUT_SIZE, format="folder")
    assert folder.format == "folder" and folder.keypoints is None
    assert [p.image.name for p in folder] == ["cover.jpg"]  # top level only
    with pytest.raises(DataError, match=r"is not a COCO dataset.*person_keypoints"):
        open_dataset(mpii_root, input_size=INPUT_SIZE, format="coco")
    with pytest.raises(DataError, match=r"unknown dataset format 'mpi'"):
        open_dataset(mpii_root, input_size=INPUT_SIZE, format="mpi")


def test_mpii_gt_mat_read_and_checked(tmp_path: Path) -> None:
    names = np.array([[np.array([n]) for n in ("rank", "rkne")]], dtype=object)
    fields = {
        "dataset_joints": names,
        "jnt_missing": np.array([[0, 1, 0], [0, 0, 0]], dtype=np.uint8),
        "pos_gt_src": np.arange(12, dtype=np.float64).reshape(2, 2, 3),
        "headboxes_src": np.ones((2, 2, 3)),
    }
    scipy.io.savemat(tmp_path / "gt_valid.mat", fields)
    gt = load_mpii_gt(tmp_path / "gt_valid.mat")
    assert gt["joint_names"] == ["rank", "rkne"]
    np.testing.assert_array_equal(gt["pos_gt_src"], fields["pos_gt_src"])
    np.testing.assert_array_equal(gt["jnt_missing"], fields["jnt_missing"])

    scipy.io.savemat(tmp_path / "bad.mat", {k: v for k, v in fields.items() if k != "headboxes_src"})
    with pytest.raises(DataError, match=r"bad\.mat has no field 'headboxes_src'"):
        load_mpii_gt(tmp_path / "bad.mat")
    scipy.io.savemat(tmp_path / "bad.mat", {**fields, "headboxes_src": np.ones((2, 2, 4))})
    with pytest.raises(DataError, match=r"'headboxes_src' has shape \(2, 2, 4\), expected \(2, 2, 3\)"):
        load_mpii_gt(tmp_path / "bad.mat")
    with pytest.raises(DataError, match=r"does not exist"):
        load_mpii_gt(tmp_path / "nowhere")


# ---- COCO ---------------------------------------------------------------------------------------


def test_coco_people_order_and_filters(coco_root: Path) -> None:
    ds = open_dataset(coco_root, input_size=INPUT_SIZE)
    assert (ds.format, ds.split, ds.keypoints) == ("coco", "val", COCO)
    assert ds.coco_json == coco_root / "annotations" / "person_keypoints_val2017.json"
    # images in listed order (7 then 3), then annotations in listed order; crowd, empty, zero-area,
    # outside and non-person annotations dropped
    assert [p.ann_id for p in ds] == [101, 107, 100]
    assert [p.index for p in ds] == [1, 7, 0]
    assert [p.image_id for p in ds] == [7, 7, 3]
    assert ds[2].image == coco_root / "val2017" / "000000000003.jpg"


def test_coco_box_cleaning_and_centre_scale(coco_root: Path) -> None:
    clipped, wide, tall = open_dataset(coco_root, input_size=INPUT_SIZE)
    # [-4, 30, 30, 60] in an 80x60 image: x1=0, y1=30, x2=min(79, 0+29)=29, y2=min(59, 30+59)=59
    assert clipped.bbox == (0.0, 30.0, 29.0, 29.0)
    # tall box [10, 5, 20, 40] -> clean w=19, h=39; aspect 0.75: 19 < 0.75*39 so w = 29.25
    assert tall.bbox == (10.0, 5.0, 19.0, 39.0)
    np.testing.assert_allclose(tall.center, [19.5, 24.5])
    np.testing.assert_allclose(tall.scale, [29.25 / 200 * 1.25, 39 / 200 * 1.25], rtol=1e-6)
    # wide box [40, 10, 30, 10] -> w=29, h=9: h = 29 / 0.75
    np.testing.assert_allclose(wide.center, [54.5, 14.5])
    np.testing.assert_allclose(wide.scale, [29 / 200 * 1.25, 29 / 0.75 / 200 * 1.25], rtol=1e-6)
    assert tall.area == 100.0


def test_coco_joints_stay_0_based_and_visibility_is_v_gt_0(coco_root: Path) -> None:
    person = open_dataset(coco_root, input_size=INPUT_SIZE)[2]  # annotation 100, box at (10, 5)
    np.testing.assert_array_equal(person.joints[4], [14.0, 9.0])
    assert person.joints_vis[0] == 0 and person.joints_vis[1] == 1 and person.joints_vis[3] == 1
    assert person.joints.shape == (17, 2) and person.joints_vis.shape == (17,)


def test_box_to_center_scale_matches_hrnet_float32() -> None:
    center, scale = box_to_center_scale((388.66, 69.92, 108.41, 276.62), (256, 192))
    expected_w = np.float32(276.62 * 0.75 / 200)
    np.testing.assert_array_equal(center, np.float32([388.66 + 108.41 / 2, 69.92 + 276.62 / 2]))
    np.testing.assert_array_equal(scale, np.float32([expected_w, 276.62 / 200]) * np.float32(1.25))
    assert center.dtype == scale.dtype == np.float64


def test_coco_default_split_for_calibration(coco_root: Path) -> None:
    assert open_dataset(coco_root, input_size=INPUT_SIZE, purpose="calib").split == "val"
    write_image(coco_root / "train2017" / "000000000003.jpg")
    data = json.loads((coco_root / "annotations" / "person_keypoints_val2017.json").read_text())
    data["images"] = data["images"][1:]
    write_json(coco_root / "annotations" / "person_keypoints_train2017.json", data)
    train = open_dataset(coco_root, input_size=INPUT_SIZE, purpose="calib")
    assert (train.split, len(train)) == ("train", 1)
    assert open_dataset(coco_root, input_size=INPUT_SIZE, split="val2017").split == "val"


# ---- plain folders --------------------------------------------------------------------------------


def test_folder_whole_image_people(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "b_wide.png", height=60, width=200)
    write_image(tmp_path / "imgs" / "c_tall.jpg", height=100, width=30)
    (tmp_path / "imgs" / "a_notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path / "imgs", input_size=INPUT_SIZE, purpose="calib")
    assert (ds.format, ds.split, ds.keypoints, len(ds)) == ("folder", None, None, 2)
    wide, tall = ds  # sorted by name
    assert wide.joints is None and wide.joints_vis is None
    np.testing.assert_allclose(wide.center, [99.5, 29.5])
    # whole image, no 1.25 padding: 200 wide -> height 200 / 0.75
    np.testing.assert_allclose(wide.scale, [1.0, 200 / 0.75 / 200], rtol=1e-6)
    np.testing.assert_allclose(tall.center, [14.5, 49.5])
    np.testing.assert_allclose(tall.scale, [100 * 0.75 / 200, 0.5], rtol=1e-6)


def test_folder_with_split_is_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg")
    with pytest.raises(DataError, match=r"no splits"):
        open_dataset(tmp_path, input_size=INPUT_SIZE, split="train")


def test_folder_undecodable_image(tmp_path: Path) -> None:
    write_image(tmp_path / "good.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"1 of 2 images .*broken\.jpg.*--skip-missing"):
        open_dataset(tmp_path, input_size=INPUT_SIZE)
    ds = open_dataset(tmp_path, input_size=INPUT_SIZE, skip_missing=True)
    assert [p.image.name for p in ds] == ["good.jpg"] and ds.skipped == [tmp_path / "broken.jpg"]


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"is empty"):
        open_dataset(tmp_path, input_size=INPUT_SIZE)


def test_unknown_layout_names_root_and_layouts(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"cannot tell the dataset layout of .*MPII: .*COCO: .*FOLDER: ") as e:
        open_dataset(tmp_path, input_size=INPUT_SIZE)
    assert str(tmp_path) in str(e.value)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist"):
        open_dataset(tmp_path / "nope", input_size=INPUT_SIZE)


# ---- bad input ------------------------------------------------------------------------------------


def test_missing_images_error_then_skip(mpii_root: Path) -> None:
    (mpii_root / "images" / "a.jpg").unlink()
    (mpii_root / "images" / "c.jpg").unlink()
    with pytest.raises(DataError, match=r"2 of 3 images listed in .*valid\.json are missing .*a\.jpg.*c\.jpg.*--skip-missing"):
        open_dataset(mpii_root, input_size=INPUT_SIZE)
    ds = open_dataset(mpii_root, input_size=INPUT_SIZE, skip_missing=True)
    assert [p.image.name for p in ds] == ["b.jpg"] and [p.index for p in ds] == [1]
    assert ds.skipped == [mpii_root / "images" / "a.jpg", mpii_root / "images" / "c.jpg"]


def test_all_images_missing_is_an_error_even_when_skipping(coco_root: Path) -> None:
    for path in (coco_root / "val2017").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=r"none of the images"):
        open_dataset(coco_root, input_size=INPUT_SIZE, skip_missing=True)


def test_invalid_json_names_file_and_line(mpii_root: Path) -> None:
    (mpii_root / "annot" / "valid.json").write_text('[\n{"image": "a.jpg",\n}')
    with pytest.raises(DataError, match=r"valid\.json is not valid JSON \(line 3"):
        open_dataset(mpii_root, input_size=INPUT_SIZE)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["joints"].pop(), r"entry 1, field 'joints': expected 16 \[x, y\] pairs, got shape \(15, 2\)"),
        (lambda r: r.pop("scale"), r"entry 1, field 'scale': missing"),
        (lambda r: r.update(scale="big"), r"entry 1, field 'scale': expected a number, got 'big'"),
        (lambda r: r.update(center=[1, "x"]), r"entry 1, field 'center': expected \[x, y\] \(numbers\)"),
        (lambda r: r.update(image=5), r"entry 1, field 'image': expected a file name"),
        (lambda r: r["joints_vis"].append(1), r"entry 1, field 'joints_vis': expected 16 visibility flags"),
    ],
)
def test_malformed_mpii_record_names_file_entry_and_field(mpii_root: Path, change, message) -> None:
    path = mpii_root / "annot" / "valid.json"
    records = json.loads(path.read_text())
    change(records[1])
    write_json(path, records)
    with pytest.raises(DataError, match=message) as e:
        open_dataset(mpii_root, input_size=INPUT_SIZE)
    assert str(path) in str(e.value)


def test_malformed_mpii_top_level(mpii_root: Path) -> None:
    write_json(mpii_root / "annot" / "valid.json", {"people": []})
    with pytest.raises(DataError, match=r"expected a list of people, got dict"):
        open_dataset(mpii_root, input_size=INPUT_SIZE)
    write_json(mpii_root / "annot" / "valid.json", [])
    with pytest.raises(DataError, match=r"lists no usable people"):
        open_dataset(mpii_root, input_size=INPUT_SIZE)


def test_malformed_coco_annotation_names_index_and_field(coco_root: Path) -> None:
    path = coco_root / "annotations" / "person_keypoints_val2017.json"
    data = json.loads(path.read_text())
    data["annotations"][7]["keypoints"] = data["annotations"][7]["keypoints"][:-3]
    write_json(path, data)
    with pytest.raises(DataError, match=r"annotations\[7\], field 'keypoints': expected 17 x \[x, y, v\] numbers, got shape \(48,\)"):
        open_dataset(coco_root, input_size=INPUT_SIZE)
    del data["images"][0]["width"]
    write_json(path, data)
    with pytest.raises(DataError, match=r"images\[0\], field 'width': missing"):
        open_dataset(coco_root, input_size=INPUT_SIZE)
    write_json(path, {"images": [], "annotations": []})
    with pytest.raises(DataError, match=r"no 'categories' list"):
        open_dataset(coco_root, input_size=INPUT_SIZE)


def test_coco_split_without_images_is_not_offered(coco_root: Path) -> None:
    # the official annotation zip holds train and val; only the val images are downloaded
    train_json = coco_root / "annotations" / "person_keypoints_train2017.json"
    train_json.write_bytes((coco_root / "annotations" / "person_keypoints_val2017.json").read_bytes())
    assert open_dataset(coco_root, input_size=INPUT_SIZE, purpose="calib").split == "val"
    with pytest.raises(DataError, match=r"no split 'train' with both annotations and images: choose one of val"):
        open_dataset(coco_root, input_size=INPUT_SIZE, split="train")
    (coco_root / "val2017").rename(coco_root / "elsewhere")
    with pytest.raises(DataError, match=r"cannot tell the dataset layout"):
        open_dataset(coco_root, input_size=INPUT_SIZE)
    with pytest.raises(DataError, match=r"is not a COCO dataset: expected .*\{split\}2017/"):
        open_dataset(coco_root, input_size=INPUT_SIZE, format="coco")


def test_coco_hrnet_image_layout(coco_root: Path) -> None:
    (coco_root / "images").mkdir()
    (coco_root / "val2017").rename(coco_root / "images" / "val2017")
    ds = open_dataset(coco_root, input_size=INPUT_SIZE)
    assert ds[0].image == coco_root / "images" / "val2017" / "000000000007.jpg"


# ---- real data (../shared) ------------------------------------------------------------------------

shared = pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data is not present")


@pytest.mark.shared
@shared
def test_real_mpii_mini_matches_official_gt() -> None:
    root = SHARED / "data" / "mpii-mini"
    ds = open_dataset(root, input_size=(256, 256))
    gt = load_mpii_gt(root)
    assert (ds.format, ds.split, len(ds)) == ("mpii", "valid", 5)
    assert gt["pos_gt_src"].shape == (16, 2, 5) and gt["joint_names"][9] == "head"
    for i, person in enumerate(ds):
        labelled = gt["jnt_missing"][:, i] == 0
        gt_joints = gt["pos_gt_src"][:, :, i] - 1  # official gt is 1-based
        assert np.abs(person.joints[labelled] - gt_joints[labelled]).max() < 1.0
    # the first record: centre [966, 340], scale 4.718488 in valid.json
    np.testing.assert_allclose(ds[0].center, [965.0, 340 + 15 * 4.718488 - 1])
    np.testing.assert_allclose(ds[0].scale, [4.718488 * 1.25] * 2)


@pytest.mark.shared
@shared
def test_real_coco_mini_counts() -> None:
    root = SHARED / "data" / "coco-mini"
    val = open_dataset(root, input_size=(256, 192))
    train = open_dataset(root, input_size=(256, 192), purpose="calib")
    assert (val.split, len(val)) == ("val", 68)
    assert (train.split, len(train)) == ("train", 86)
    assert all(p.image.is_file() and p.joints_vis.sum() > 0 for p in val)
    assert val.coco_json.name == "person_keypoints_val2017.json"


@pytest.mark.shared
@shared
def test_real_calibration_folder() -> None:
    ds = open_dataset(SHARED / "data" / "mpii-calib-images", input_size=(256, 192), purpose="calib")
    assert (ds.format, len(ds)) == ("folder", 7)
    assert all(p.center[0] in (639.5, 959.5) for p in ds)  # 1280- or 1920-wide images
