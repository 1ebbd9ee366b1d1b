"""Reading checkpoints: every common way a pose model's weights are saved, to one state_dict.

Handles plain state_dicts, dicts wrapping one (``state_dict``, ``model``, ``best_state_dict``, ...),
DataParallel prefixes (``module.``, ``model.module.``), ``.pth``/``.pth.tar``/``.pt`` files and
TorchScript archives. ``torch.load`` runs with ``weights_only=True``; a pickled full model is
loaded only when the caller trusts the file (pickle runs code).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posequant.core.errors import CheckpointError
from posequant.core.fileio import read_head

# wrapper keys seen in the official repos and common trainers, most specific first
WRAPPER_KEYS = ("state_dict", "best_state_dict", "model_state_dict", "model", "net", "network",
                "weights", "params", "module", "ema", "model_ema")
PREFIXES = ("model.module.", "module.")


@dataclass
class Checkpoint:
    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor]
    module: torch.nn.Module | None  # set for TorchScript archives and trusted pickled models
    container: str  # how the weights were stored, for `posequant inspect`
    stripped_prefix: str = ""
    meta: dict | None = None  # the 'meta' entry beside the weights (mmpose/mmengine: config text, ...)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for k, t in self.state_dict.items()
                   if t.is_floating_point() and not k.endswith(("running_mean", "running_var")))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _looks_like_checkpoint(head: bytes) -> bool:
    # zip (torch >= 1.6) or a raw pickle stream (legacy torch.save / plain pickle)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def numpy_data_globals() -> list:
    """The numpy globals that rebuild scalars and arrays from a dtype and raw bytes, and nothing else.

    The official Simple Baselines / HRNet ``save_checkpoint`` stores ``perf`` as ``numpy.float64``;
    mmengine stores the dataset's metainfo (numpy arrays) in ``checkpoint['meta']``. Rebuilding them
    runs no user code (an object array's items would need their own globals, which stay refused).
    numpy 2 pickles ``numpy._core.multiarray.*``, numpy 1 ``numpy.core.multiarray.*``: both names are
    allowed; a dtype's state is set on its class (``numpy.dtypes.Float64DType``, ...).
    """
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    allowed: list = [np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(multiarray, name)
        allowed += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes else []
    return allowed


def _openmmlab_globals(path: Path) -> list[str]:
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []
    return [g for g in needed if g.split(".")[0] in ("mmengine", "mmcv", "mmpose")]


def _unsupported_global(e: Exception) -> str | None:
    """The global torch's weights-only unpickler refused, e.g. ``posix.system``."""
    # torch words it "Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y whose module x is blocked",
    # or (for state set on a class) "Can only build ... but got <class 'x.y'>"
    m = (re.search(r"(?i)unsupported global:?\s+(?:global\s+)?([\w.]+)", str(e))
         or re.search(r"Can only build .* but got <class '([\w.]+)'>", str(e)))
    return m.group(1) if m else None


def _read(path: Path, head: bytes, trust_pickle: bool) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are not the user's concern
            if _is_torchscript(path):
                return torch.jit.load(str(path), map_location="cpu")
            if trust_pickle:
                return torch.load(path, map_location="cpu", weights_only=False)
            # a context, not add_safe_globals: the allowance ends with this load, for the whole process
            with torch.serialization.safe_globals(numpy_data_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, zip and pickle errors for damage
        if not _looks_like_checkpoint(head):
            hint = (" (it is an ONNX model already: give it to eval, quantize or bench)"
                    if path.suffix.lower() == ".onnx" else "")
            raise CheckpointError(f"{path} is not a PyTorch checkpoint{hint}: expected a file saved with "
                                  "torch.save") from None
        refused = _unsupported_global(e) if isinstance(e, pickle.UnpicklingError) else None
        if refused:
            trainer = _openmmlab_globals(path)
            if trainer:  # an mmengine/mmcv training checkpoint: its training state is pickled objects
                raise CheckpointError(
                    f"{path} holds OpenMMLab training state beside the weights ({trainer[0]}, ...), which is "
                    "not loaded by default because unpickling runs code: keep only its 'meta' and "
                    "'state_dict' (as mmpose's tools/misc/publish_model.py does), or if you trust the file "
                    "and have that package installed, add --trust-pickle") from None
            raise CheckpointError(
                f"{path} holds pickled Python objects (global {refused}; e.g. a whole pickled model), which are "
                "not loaded by default because unpickling runs code; if you trust the file, add --trust-pickle") from None
        if isinstance(e, ModuleNotFoundError) and trust_pickle:
            raise CheckpointError(
                f"{path} pickles objects of the Python module {e.name!r}, which is not installed: install it, "
                "or re-save only the weights (model.state_dict())") from None
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e):
            reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("Unsupported")), reason)
        raise CheckpointError(f"{path} is truncated or corrupt ({reason[:120]}): re-download or re-save it") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any, path: Path, trail: str = "", depth: int = 0) -> tuple[Any, str]:
    """Find the weights inside what torch.load returned; returns (state_dict or module, trail)."""
    if isinstance(obj, torch.nn.Module) or _is_state_dict(obj):
        return obj, trail
    if isinstance(obj, dict) and depth < 3:
        for key in WRAPPER_KEYS:
            if key in obj:
                try:
                    return _unwrap(obj[key], path, f"{trail}[{key!r}]", depth + 1)
                except CheckpointError:
                    continue
        # a state_dict with a few non-tensor extras (e.g. a saved 'epoch' mixed in)
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if len(tensors) >= max(1, len(obj) // 2) and len(tensors) > 1:
            return tensors, trail
    if isinstance(obj, dict):
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(
            f"{path}{trail} is a dict without model weights (keys: {keys}); expected a state_dict or one "
            f"under one of: {', '.join(WRAPPER_KEYS)}")
    raise CheckpointError(
        f"{path}{trail} holds a {type(obj).__name__}, not model weights: save model.state_dict() instead")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    stripped = ""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                stripped += p
                changed = True
    return sd, stripped


def check_finite(sd: dict[str, torch.Tensor], where: Path) -> None:
    for key, t in sd.items():
        if t.is_floating_point():
            bad = (~torch.isfinite(t)).sum().item()
            if bad:
                kind = "NaN" if torch.isnan(t).any() else "Inf"
                raise CheckpointError(
                    f"{where}: tensor {key!r} has {bad} {kind} value(s) of {t.numel()}; the weights are "
                    "damaged (diverged training or a broken file): use another checkpoint")


def load_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Read ``path`` into a :class:`Checkpoint`, or raise CheckpointError with one clear line."""
    path = Path(path)
    head = read_head(path, "checkpoint", ".pth file", CheckpointError)  # missing, a directory, unreadable, empty
    obj = _read(path, head, trust_pickle)
    found, trail = _unwrap(obj, path)
    module = None
    if isinstance(found, torch.jit.ScriptModule):
        module, container = found.eval(), "TorchScript archive"
        sd = dict(found.state_dict())
    elif isinstance(found, torch.nn.Module):
        module, container = found.eval(), f"pickled {type(found).__name__} module{trail}"
        sd = dict(found.state_dict())
    else:
        sd, container = dict(found), f"state_dict{trail}" if trail else "plain state_dict"
    sd, stripped = _strip_prefixes(sd)
    if not sd:
        raise CheckpointError(f"{path} holds no weights")
    check_finite(sd, path)
    meta = obj.get("meta") if isinstance(obj, dict) and isinstance(obj.get("meta"), dict) else None
    return Checkpoint(path, sha256_of(path), sd, module, container, stripped, meta)


__all__ = ["Checkpoint", "load_checkpoint", "check_finite", "sha256_of"]
