"""The arguments every job takes, checked in one place for the CLI and the library alike.

The CLI's option types call these checks on what was typed; the library functions declare theirs with
:func:`checked`, so ``evaluate(limit=-1)``, ``bench("m.onnx")`` or ``export_pose(input_size="256x192")``
meet the same rules as ``--limit -1``, ``bench m.onnx`` and ``--input-size 256x192``: a wrong value is
one :class:`ArgumentError` line naming the argument, before any work; a value the CLI accepts is
accepted (a numeric string, a single path where a list is expected, a backend alias).

Numbers with a fraction (budgets, tolerances) are :mod:`posequant.core.numbers`'s.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import MetadataError
from .metadata import check_size, parse_size
from .numbers import OptionError

# Runtime names every job takes (backends, devices, quantize's --target), with the other spellings people use.
DEVICES = ("cpu", "cuda")
ONNX_BACKENDS = ("ort", "openvino", "tensorrt")  # what an .onnx model runs on; quantize's --target
BACKENDS = ("torch", *ONNX_BACKENDS)
ALIASES = {"onnxruntime": "ort", "ov": "openvino", "trt": "tensorrt", "pytorch": "torch", "gpu": "cuda"}


class ArgumentError(OptionError):
    """An argument of the wrong kind or out of range (a count below 1, a string where a list of paths goes)."""


def canonical(name: str) -> str:
    """A backend or device name in its one spelling: any case, aliases resolved."""
    name = str(name).strip().lower()
    return ALIASES.get(name, name)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Whole:
    """A whole number ``>= minimum`` (``None`` allowed when ``optional``). Integers and their decimal strings
    (what the CLI reads) are accepted; a bool, a fraction, NaN or any other object is refused."""

    minimum: int = 1
    optional: bool = False

    def __call__(self, name: str, value: Any) -> int | None:
        if value is None and self.optional:
            return None
        number = None
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            number = int(value)
        elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            number = int(value)
        if number is None:
            raise ArgumentError(f"{name} {_shown(value)} is not a whole number: give e.g. {max(self.minimum, 1)}")
        if number < self.minimum:
            raise ArgumentError(f"{name} {_shown(value)} must be at least {self.minimum}")
        return number


@dataclass(frozen=True)
class Wholes:
    """One or more whole numbers (``8`` or ``"1,8"`` or ``[1, 8]``), each as :class:`Whole` says."""

    minimum: int = 1

    def __call__(self, name: str, value: Any) -> tuple[int, ...]:
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        elif isinstance(value, (numbers.Integral, float)):
            value = [value]
        items = _items(name, value, "whole numbers")
        if not items:
            raise ArgumentError(f"{name} is empty: give at least one number, e.g. 1")
        return tuple(Whole(self.minimum)(name, v) for v in items)


@dataclass(frozen=True)
class Paths:
    """One path or several: a single ``str``/``Path`` is one item, never its characters."""

    what: str = "path"

    def __call__(self, name: str, value: Any) -> list[Path]:
        if isinstance(value, (str, os.PathLike)):
            value = [value]
        items = _items(name, value, f"{self.what}s")
        bad = [v for v in items if not isinstance(v, (str, os.PathLike))]
        if bad:
            raise ArgumentError(f"{name}: {_shown(bad[0])} is not {_a(self.what)}: give a path or a list of paths")
        if not items:
            raise ArgumentError(f"{name} is empty: give at least one {self.what}")
        return [Path(v) for v in items]


@dataclass(frozen=True)
class Names:
    """Names (``--keep-float``, ``--backend``): a single string is one name. ``runtime`` spells backend and device
    names as the CLI does (any case, aliases). ``optional``: None stays None."""

    runtime: bool = False
    optional: bool = True

    def __call__(self, name: str, value: Any) -> tuple[str, ...] | None:
        if value is None and self.optional:
            return None
        if isinstance(value, str):
            value = [value]
        items = _items(name, value, "names")
        bad = [v for v in items if not isinstance(v, str)]
        if bad:
            raise ArgumentError(f"{name}: {_shown(bad[0])} is not a name (a string)")
        return tuple(canonical(v) for v in items) if self.runtime else tuple(items)


@dataclass(frozen=True)
class Runtime:
    """One backend or device name, spelled as the CLI spells it (``None`` stays: the model's own)."""

    def __call__(self, name: str, value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ArgumentError(f"{name} {_shown(value)} is not a name: give e.g. 'ort' or 'cpu'")
        return canonical(value)


@dataclass(frozen=True)
class Size:
    """An input size: ``(H, W)`` or ``"HxW"`` (height first, as ``--input-size``); None stays None."""

    def __call__(self, name: str, value: Any) -> tuple[int, int] | None:
        if value is None:
            return None
        try:
            if isinstance(value, str):
                return parse_size(value)
            items = _items(name, value, "sizes")
            if len(items) != 2:
                raise ArgumentError(f"{name} {_shown(value)} is not a size: give (height, width) or 'HxW', e.g. "
                                    "'256x192'")
            hw = (Whole(minimum=-2**31)(name, items[0]), Whole(minimum=-2**31)(name, items[1]))
            check_size(hw)
        except MetadataError as e:
            raise ArgumentError(f"{name}: {e}") from None
        return hw


def _a(what: str) -> str:
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def _items(name: str, value: Any, what: str) -> list:
    if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise ArgumentError(f"{name} {_shown(value)} is not a list of {what}")
    return list(value)


Check = Callable[[str, Any], Any]


def checked(**checks: Check) -> Callable[[Callable], Callable]:
    """Check (and normalise) the named arguments of a library function before it runs, as the CLI does."""

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        unknown = set(checks) - set(signature.parameters)
        assert not unknown, f"{fn.__name__} has no argument {unknown}"

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            for name, check in checks.items():
                if name in bound.arguments:
                    bound.arguments[name] = check(name, bound.arguments[name])
            return fn(*bound.args, **bound.kwargs)

        call.posequant_checks = checks
        return call

    return wrap
