"""Make docs/img/detect-then-pose.jpg: one MPII photo with several people, before and after ``--detector``.

Left, ``posequant predict`` without boxes (the whole photo is one person: one skeleton joins them);
right, with YOLOX-Nano's person boxes (one skeleton per person). Needs ../shared (the trained
ultralight-simplepose model, YOLOX-Nano and mpii-calib-images).

    .venv/bin/python scripts/detection_picture.py [--photo NAME.jpg] [-o docs/img/detect-then-pose.jpg]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

from posequant.benchmarks.drawing import text_band
from posequant.benchmarks.predict import predict
from posequant.core.fileio import write_bytes_atomic
from posequant.exporter import export_pose

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
POSE = SHARED / "models" / "ultralight-simplepose"
DETECTOR = SHARED / "models" / "yolox-nano" / "yolox_nano_coco_416.onnx"
PHOTOS = SHARED / "data" / "mpii-calib-images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", default="083600304.jpg", help="a file of mpii-calib-images")
    parser.add_argument("-o", "--output", type=Path, default=REPO / "docs" / "img" / "detect-then-pose.jpg")
    parser.add_argument("--width", type=int, default=480, help="width of each half, px")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = export_pose(POSE / "ultralight_simplepose_coco_256x192.pth", tmp / "pose.onnx",
                            arch=f"{POSE / 'ultralight_simplepose.py'}:build_model", input_size=(256, 192),
                            keypoints="coco", color="rgb").output
        photo = PHOTOS / args.photo
        halves = []
        for name, options, title in (("whole", {}, "before: the whole photo as one person"),
                                     ("detected", {"detector": DETECTOR}, "after: --detector (YOLOX-Nano boxes)")):
            result = predict(model, [photo], tmp / name, **options)
            picture = cv2.imread(str(tmp / name / f"{photo.stem}.pose.jpg"))
            h, w = picture.shape[:2]
            small = cv2.resize(picture, (args.width, round(h * args.width / w)), interpolation=cv2.INTER_AREA)
            halves.append(np.vstack([text_band(args.width, f"{title}: {result.people} skeleton(s)"), small]))
    gap = np.full((halves[0].shape[0], 4, 3), 255, np.uint8)
    ok, data = cv2.imencode(".jpg", np.hstack([halves[0], gap, halves[1]]), [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.output, data.tobytes())
    print(f"wrote {args.output} ({len(data) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
