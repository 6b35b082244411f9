"""The calibration methods: :class:`CalibrationMethod`, and the bits of each format."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

from .._errors import CalibrationError
from .._formats.quant_type import QuantTypeLike
from .._formats.registry import DEFAULT_FORMAT, format_spec, formats

__all__ = ["CalibrationMethod", "as_method", "bits_for", "is_int"]

PER_MILLE_MAX = 1000
"""Largest integer :meth:`CalibrationMethod.Percentile` reads as per mille (100 %)."""

TENTHS_FROM = 20
"""Integers from here up are the seed crate's tenths of a sigma in ``MeanStd``."""

SIGMAS_BELOW = 10
"""Integers below this are plain sigmas in ``MeanStd``; ``[10, 20)`` is refused."""


@dataclasses.dataclass(frozen=True)
class CalibrationMethod:
    """How :func:`calibrate` picks a range. Use the members, not the constructor.

    * ``CalibrationMethod.MinMax``: the full observed range.
    * ``CalibrationMethod.Percentile(p)``: the ``p``-th percentile of ``|x|``, ``p`` in
      percent: ``Percentile(99)`` is 99 %, ``Percentile(99.9)`` is 99.9 %.
    * ``CalibrationMethod.Entropy``: TensorRT's KL-divergence threshold.
    * ``CalibrationMethod.MeanStd(k)``: ``mean ± k * std``, ``k`` in standard deviations:
      ``MeanStd(3)`` and ``MeanStd(3.0)`` are both three sigmas.
    * ``CalibrationMethod.MSE``: the threshold minimising the histogram's quantization MSE.

    The seed crate wrote these parameters as integers in other units (``Percentile(999)``
    per mille, ``MeanStd(30)`` in tenths of a sigma). Those spellings are still accepted
    where they cannot be read any other way:

    * ``Percentile``: an ``int`` from 101 to 1000 can't be a percentage, so it is per
      mille (``Percentile(999)`` = 99.9 %). Every number up to 100 is a percentage.
    * ``MeanStd``: an ``int`` below 10 is sigmas; an ``int`` of 20 or more is tenths
      (``MeanStd(30)`` = 3.0 sigma: a clip 20+ sigmas out would reach past the data
      anyway, MinMax says that). ``MeanStd(10)`` to ``MeanStd(19)`` could be either
      (10 sigma or 1.0 sigma) and raise :class:`CalibrationError`; write a float
      (``MeanStd(12.0)`` or ``MeanStd(1.2)``). A float is always sigmas.

    Example:
        >>> from jquant import CalibrationMethod
        >>> CalibrationMethod.Percentile(99)
        CalibrationMethod.Percentile(99.0)
        >>> CalibrationMethod.Percentile(999) == CalibrationMethod.Percentile(99.9)
        True
        >>> CalibrationMethod.MeanStd(3) == CalibrationMethod.MeanStd(30)
        True
        >>> CalibrationMethod.MeanStd(12)
        Traceback (most recent call last):
        ...
        jquant._errors.CalibrationError: MeanStd(12) is ambiguous: 12 standard deviations, or ...
    """

    kind: str
    param: float | None = None

    @classmethod
    def Percentile(cls, p: float) -> CalibrationMethod:  # noqa: N802 - mirrors the crate
        """``p`` percent, in ``(0, 100]``; an ``int`` from 101 to 1000 is per mille."""
        pct = _number(p, "Percentile")
        if is_int(p) and 100 < p <= PER_MILLE_MAX:
            pct = pct / 10  # the seed crate's per mille: 999 -> 99.9
        if not 0 < pct <= 100:
            if is_int(p) and p > PER_MILLE_MAX:
                why = f" and above {PER_MILLE_MAX} per mille"
            elif pct > 100:
                why = " (the seed crate's per-mille form is an int, e.g. Percentile(999))"
            else:
                why = ""
            raise CalibrationError(
                f"Percentile({p!r}) is outside (0, 100] percent{why}; pass a percentage "
                "such as Percentile(99.9)"
            )
        return cls("Percentile", pct)

    @classmethod
    def MeanStd(cls, k: float) -> CalibrationMethod:  # noqa: N802
        """``k > 0`` standard deviations; an ``int >= 20`` is tenths (30 = 3.0 sigma)."""
        sig = _number(k, "MeanStd")
        if is_int(k) and SIGMAS_BELOW <= k < TENTHS_FROM:
            raise CalibrationError(
                f"MeanStd({k!r}) is ambiguous: {k} standard deviations, or the seed crate's "
                f"tenths ({k / 10:g} sigma)? Write MeanStd({k}.0) or MeanStd({k / 10:g})"
            )
        if is_int(k) and k >= TENTHS_FROM:
            sig = sig / 10  # the seed crate's tenths: 30 -> 3.0
        if not sig > 0 or not math.isfinite(sig):
            raise CalibrationError(
                f"MeanStd({k!r}) gives k = {sig}; k must be a positive number of standard "
                "deviations, e.g. MeanStd(3.0)"
            )
        return cls("MeanStd", sig)

    @property
    def uses_histogram(self) -> bool:
        """True for Percentile, Entropy and MSE."""
        return self.kind in ("Percentile", "Entropy", "MSE")

    def __repr__(self) -> str:
        p = "" if self.param is None else f"({self.param!r})"
        return f"CalibrationMethod.{self.kind}{p}"


CalibrationMethod.MinMax = CalibrationMethod("MinMax")
CalibrationMethod.Entropy = CalibrationMethod("Entropy")
CalibrationMethod.MSE = CalibrationMethod("MSE")


def is_int(v: Any) -> bool:
    """An ``int`` or NumPy integer, not a ``bool``."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise CalibrationError(f"{what} takes a number, got {v!r}")
    return float(v)


def as_method(method: Any) -> CalibrationMethod:
    """``method`` itself, or the member named by ``"minmax"``, ``"entropy"``, ``"mse"``."""
    if isinstance(method, CalibrationMethod):
        return method
    if isinstance(method, str) and method.lower() in ("minmax", "entropy", "mse"):
        return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}.get(
            method.lower(), CalibrationMethod.MSE
        )
    raise CalibrationError(
        f"unknown calibration method {method!r}; use CalibrationMethod.MinMax, .Entropy, "
        ".MSE, .Percentile(p) or .MeanStd(k)"
    )


def bits_for(qtype: QuantTypeLike | None, bits: int | None) -> int:
    """Integer bits of a format (Q8_0: 8, Q4_*: 4, Q5_*: 5) or ``bits`` itself."""
    if bits is not None:
        if not is_int(bits) or not 2 <= bits <= 16:
            raise CalibrationError(f"bits must be an int in [2, 16], got {bits!r}")
        return int(bits)
    if qtype is None:
        raise CalibrationError(
            f"pass a quantized format (e.g. {DEFAULT_FORMAT.name.lower()!r}) or bits="
        )
    spec = format_spec(qtype)
    if spec.bits is None:
        usable = ", ".join(s.name for s in formats() if s.bits is not None)
        raise CalibrationError(
            f"{spec.name} is a floating-point format with no integer grid, so it has no "
            f"calibration scale; use {usable} or pass bits= explicitly"
        )
    return spec.bits
