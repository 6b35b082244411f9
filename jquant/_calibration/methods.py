"""The calibration methods: :class:`CalibrationMethod`, and the bits of each format."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .._errors import CalibrationError
from .._formats.quant_type import QuantTypeLike
from .._formats.registry import DEFAULT_FORMAT, format_spec, formats

__all__ = ["CalibrationMethod", "as_method", "bits_for", "is_int"]


@dataclasses.dataclass(frozen=True)
class CalibrationMethod:
    """How :func:`calibrate` picks a range. Use the members, not the constructor.

    * ``CalibrationMethod.MinMax``: the full observed range.
    * ``CalibrationMethod.Percentile(p)``: the ``p``-th percentile of ``|x|``. An ``int`` is
      the seed crate's per-mille form (``Percentile(999)`` = 99.9 %); a ``float`` is a
      percentage (``Percentile(99.9)``).
    * ``CalibrationMethod.Entropy``: TensorRT's KL-divergence threshold.
    * ``CalibrationMethod.MeanStd(k)``: ``mean ± k * std``. An ``int`` is tenths of a sigma
      (``MeanStd(30)`` = 3.0 sigma); a ``float`` is sigmas.
    * ``CalibrationMethod.MSE``: the threshold minimising the histogram's quantization MSE.

    Example:
        >>> from jquant import CalibrationMethod
        >>> CalibrationMethod.Percentile(999) == CalibrationMethod.Percentile(99.9)
        True
        >>> CalibrationMethod.MeanStd(30)
        CalibrationMethod.MeanStd(3.0)
    """

    kind: str
    param: float | None = None

    @classmethod
    def Percentile(cls, p: float) -> CalibrationMethod:  # noqa: N802 - mirrors the crate
        """``p`` in ``(0, 100]`` percent; an ``int`` is per mille (999 = 99.9 %)."""
        pct = _number(p, "Percentile") / 10 if _is_int(p) else _number(p, "Percentile")
        if not 0 < pct <= 100:
            raise CalibrationError(
                f"Percentile({p!r}) is {pct} %, outside (0, 100]; pass e.g. Percentile(99.9) "
                "or the per-mille integer Percentile(999)"
            )
        return cls("Percentile", pct)

    @classmethod
    def MeanStd(cls, k: float) -> CalibrationMethod:  # noqa: N802
        """``k > 0`` standard deviations; an ``int`` is tenths (30 = 3.0 sigma)."""
        sig = _number(k, "MeanStd") / 10 if _is_int(k) else _number(k, "MeanStd")
        if not sig > 0 or not math.isfinite(sig):
            raise CalibrationError(
                f"MeanStd({k!r}) gives k = {sig}; k must be a positive number of standard "
                "deviations, e.g. MeanStd(3.0) or the crate form MeanStd(30)"
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


_is_int = is_int


def _number(v, what: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise CalibrationError(f"{what} takes a number, got {v!r}") from None


def as_method(method: Any) -> CalibrationMethod:
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
        if not _is_int(bits) or not 2 <= bits <= 16:
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
