"""Running a model whose file fixes its batch size on any number of inputs."""

from __future__ import annotations

from typing import Callable

import numpy as np


def infer_at_batch(infer: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch: int | None) -> np.ndarray:
    """``infer`` on chunks of exactly ``batch`` inputs (the last one padded with copies of its last
    input, their outputs dropped), or on all of them at once when ``batch`` is None (dynamic)."""
    if not batch or len(inputs) == batch:
        return infer(inputs)
    outs = []
    for i in range(0, len(inputs), batch):
        chunk = inputs[i:i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        outs.append(infer(chunk)[: batch - pad])
    return np.concatenate(outs)
