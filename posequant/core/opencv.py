"""OpenCV, set up once so that its pixels are the same on every run.

posequant decodes and crops one image per worker thread (``calibration.images.default_workers``). OpenCV
splits a ``warpAffine`` into stripes over its own thread pool when the pool is free and runs it whole when
another call holds it, and the two give different pixels next to the image border (one level; measured on a
coco-mini train person: a third of 6,000 concurrent crops differed from the first in 2 pixels). Calibration
crops then differed between runs of one command, and with them the activation ranges (LightPosNet's
agreement with float 0.931 in one run, 0.945 in another). One OpenCV thread per call makes every crop the same
bytes whatever runs beside it; the parallelism is ours, per image.
"""

from __future__ import annotations

import cv2

cv2.setNumThreads(1)

__all__ = ["cv2"]
