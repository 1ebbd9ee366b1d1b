"""Checks for the numbers users give: finite, in range, and mean/std in one unit.

One place for every numeric option: the CLI's parameter types call these, and so do the
library's option dataclasses and functions, so ``nan``, ``inf`` or a negative budget never
reaches a comparison (where NaN quietly makes every ``drop > budget`` false).
"""

from __future__ import annotations

import math
from typing import Sequence

from .errors import PosequantError


class OptionError(PosequantError):
    """A numeric option is not a finite number in its range."""


def check_number(name: str, value: float, *, minimum: float | None = 0.0, above: bool = False,
                 maximum: float | None = None) -> float:
    """``value`` as a float when it is finite and ``>= minimum`` (``> minimum`` with ``above``),
    ``<= maximum``; else :class:`OptionError` naming ``name`` (e.g. ``"--max-drop"``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise OptionError(f"{name} {value!r} is not a finite number: give a plain number such as 0.5")
    if minimum is not None and (number <= minimum if above else number < minimum):
        bound = f"greater than {minimum:g}" if above else f"at least {minimum:g}"
        raise OptionError(f"{name} {value!r} must be {bound}")
    if maximum is not None and number > maximum:
        raise OptionError(f"{name} {value!r} must be at most {maximum:g}")
    return number


def normalisation(values: Sequence[float] | None, name: str) -> tuple[float, float, float] | None:
    """``--mean``/``--std`` (three numbers) in 0-1 units, the model input being ``(pixels / 255 - mean) / std``.

    All three in 0-1 units, or all three in 0-255 units (mmpose's 123.675,116.28,103.53), which are
    divided by 255. A mix (``0.485,116,0.406``) is ambiguous and refused, as are NaN/inf, negative
    values, values above 255 and a zero std. Zero itself is the same in both units.
    """
    if values is None:
        return None
    option = f"--{name}"
    vals = tuple(check_number(option, v) for v in values)
    if len(vals) != 3:
        raise OptionError(f"{option} needs 3 values (one per channel), got {len(vals)}")
    if name == "std" and min(vals) <= 0:
        raise OptionError(f"{option} {_show(vals)}: every std must be positive")
    if max(vals) > 255:
        raise OptionError(f"{option} {_show(vals)}: values above 255 are neither 0-1 nor 0-255 units")
    large = [v > 1.0 for v in vals if v != 0]
    if any(large) and not all(large):
        raise OptionError(f"{option} {_show(vals)} mixes 0-1 and 0-255 units: give all three in one unit "
                          "(e.g. 0.485,0.456,0.406 or 123.675,116.28,103.53)")
    return tuple(v / 255 for v in vals) if any(large) else vals


def _show(vals: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in vals)
