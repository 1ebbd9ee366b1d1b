"""Preprocessing throughput (decode + crop + normalise) on the real images in ../shared/data.

    python scripts/bench_preprocess.py                 # workers=1 and the default
    python scripts/bench_preprocess.py --workers 1 2 4 --size 256x192

People from mpii-mini, coco-mini (val + train) and mpii-calib-images are repeated until there
are --crops of them; the figure is crops per second through ``iter_batches``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posequant.calibration import default_workers, iter_batches, open_dataset  # noqa: E402
from posequant.core.keypoints import COCO  # noqa: E402
from posequant.core.metadata import ModelMeta, parse_size  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def bench_meta(input_size: tuple[int, int]) -> ModelMeta:
    return ModelMeta(
        family="bench", keypoints=COCO.name, joint_names=COCO.joint_names, flip_pairs=COCO.flip_pairs,
        skeleton=COCO.skeleton, input_size=input_size, heatmap_size=(input_size[0] // 4, input_size[1] // 4),
        color="rgb", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )


def real_people(data: Path, input_size: tuple[int, int], count: int) -> list:
    datasets = [
        open_dataset(data / "mpii-mini", input_size=input_size),
        open_dataset(data / "coco-mini", input_size=input_size, split="val"),
        open_dataset(data / "coco-mini", input_size=input_size, split="train"),
        open_dataset(data / "mpii-calib-images", input_size=input_size),
    ]
    people = [p for d in datasets for p in d]
    return list(itertools.islice(itertools.cycle(people), count))


def crops_per_second(people: list, meta: ModelMeta, workers: int, batch_size: int, flip: bool) -> float:
    start = time.perf_counter()
    done = sum(len(b) for b in iter_batches(people, meta, batch_size=batch_size, workers=workers, flip=flip))
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256x256", help="model input HxW (default 256x256)")
    parser.add_argument("--crops", type=int, default=400, help="people to preprocess per run (default 400)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1 and default_workers()")
    parser.add_argument("--flip", action="store_true", help="also build the mirrored inputs")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    size = parse_size(args.size)
    meta = bench_meta(size)
    people = real_people(args.data, size, args.crops)
    crops_per_second(people[:16], meta, 1, args.batch_size, args.flip)  # warm-up (imports, page cache)
    print(f"{len(people)} crops at {args.size}, batch {args.batch_size}, {os.cpu_count()} CPU cores")
    for workers in args.workers or sorted({1, default_workers()}):
        rate = crops_per_second(people, meta, workers, args.batch_size, args.flip)
        print(f"workers={workers:<2d} {rate:7.1f} crops/s")


if __name__ == "__main__":
    main()
