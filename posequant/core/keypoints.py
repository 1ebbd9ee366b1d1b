"""Keypoint sets: joint names, flip pairs and skeletons, in one place.

Indices are 0-based and follow the datasets' own orders (MPII as in the Simple Baselines /
HRNet code, COCO as in person_keypoints_*.json).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeypointSet:
    name: str
    joint_names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    def flip_permutation(self) -> list[int]:
        """Index map that swaps left and right joints (used by the flip test)."""
        perm = list(range(self.num_joints))
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm


MPII = KeypointSet(
    name="mpii",
    joint_names=(
        "r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax",
        "upper_neck", "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder",
        "l_elbow", "l_wrist",
    ),
    flip_pairs=((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)),
    skeleton=(
        (0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9),
        (7, 12), (12, 11), (11, 10), (7, 13), (13, 14), (14, 15),
    ),
)

COCO = KeypointSet(
    name="coco",
    joint_names=(
        "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
        "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
        "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
    ),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    # person_keypoints_*.json "skeleton", converted to 0-based
    skeleton=(
        (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
        (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4),
        (3, 5), (4, 6),
    ),
)

KEYPOINT_SETS = {s.name: s for s in (MPII, COCO)}
DEFAULT_FOR_JOINTS = {16: MPII, 17: COCO}

# COCO OKS per-keypoint sigmas (pycocotools' defaults).
COCO_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062,
    0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)


def generic(num_joints: int) -> KeypointSet:
    """A nameless set for models whose joints match neither MPII nor COCO (no flip test)."""
    return KeypointSet(
        name="custom",
        joint_names=tuple(f"joint_{i}" for i in range(num_joints)),
        flip_pairs=(),
        skeleton=(),
    )


def keypoint_set_for(num_joints: int, name: str | None = None, *, custom: bool = True) -> KeypointSet:
    """The set called ``name`` (checked against ``num_joints``), else the default for the count: MPII for 16, COCO
    for 17, a nameless set otherwise (``custom``; where the input must name a set, e.g. a stamped ONNX model, a
    count that is neither is refused)."""
    from .errors import PosequantError

    if name is None:
        return DEFAULT_FOR_JOINTS.get(num_joints) or generic(num_joints)
    key = name.lower()
    if key not in KEYPOINT_SETS:
        raise PosequantError(f"unknown keypoint set {name!r}: choose one of {', '.join(KEYPOINT_SETS)}")
    kps = KEYPOINT_SETS[key]
    if kps.num_joints != num_joints:
        mismatch = f"--keypoints {key} has {kps.num_joints} joints but the model outputs {num_joints} heatmaps"
        if num_joints in DEFAULT_FOR_JOINTS:
            raise PosequantError(f"{mismatch}; use --keypoints {DEFAULT_FOR_JOINTS[num_joints].name}")
        sets = ", ".join(f"{s.name} ({s.num_joints})" for s in KEYPOINT_SETS.values())
        if custom:
            raise PosequantError(f"{mismatch}; without --keypoints it is exported with nameless joints (no flip "
                                 f"test, and no dataset posequant scores: those are {sets})")
        raise PosequantError(f"{mismatch}; posequant's keypoint sets are {sets}, and models of other joint "
                             "sets are not supported yet")
    return kps
