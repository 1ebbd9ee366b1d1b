"""Running a model whose file fixes its batch size on any number of inputs."""

from __future__ import annotations

from typing import Callable, TypeVar

import numpy as np


Outputs = TypeVar("Outputs", np.ndarray, tuple)


def infer_at_batch(infer: Callable[[np.ndarray], Outputs], inputs: np.ndarray, batch: int | None) -> Outputs:
    """``infer`` on chunks of exactly ``batch`` inputs (the last one padded with copies of its last
    input, their outputs dropped), or on all of them at once when ``batch`` is None (dynamic).
    ``infer`` returns one array, or a tuple of them (every output of the model): so does this."""
    if not batch or len(inputs) == batch:
        return infer(inputs)
    outs = []
    for i in range(0, len(inputs), batch):
        chunk = inputs[i:i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        out = infer(chunk)
        outs.append(tuple(o[: batch - pad] for o in out) if isinstance(out, tuple) else out[: batch - pad])
    if isinstance(outs[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*outs))
    return np.concatenate(outs)
