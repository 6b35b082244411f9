"""Calibration: :func:`calibrate`, :class:`CalibrationData`, :func:`merge_calibration`.

jquant follows NVIDIA's histogram calibration (TensorRT's entropy calibrator as
pytorch-quantization / TensorRT Model Optimizer ship it). Other libraries' "entropy"
differs (MXNet smooths, ONNX Runtime floors Q to integers): don't compare against them.

Conventions, exactly:

* **Histogram** of ``|x|`` in ``num_bins = 2048`` equal bins over ``[0, max|x|]``; bin width
  ``w = float32(max|x| / 2048)`` and edges ``e[k] = float32(k) * w``, which equal
  ``np.linspace(0, max|x|, 2049, dtype=np.float32)``. Counts are int32 (exact; float32
  counts stop being exact past 2**24). Bins are closed on the right, ``(e[k], e[k+1]]``
  (bin 0 also holds 0), so a value never changes bin when the histogram grows. For data
  without values exactly on an interior edge this is ``np.histogram``'s result.
* **Streaming**: when a later batch has a larger ``max|x|``, the width and origin stay and
  bins are appended (``num_bins = ceil(new_max / w)``); old counts are added unchanged and
  nothing is dropped. Means and variances merge with Chan's parallel formula (float64
  arithmetic, float32 storage: equal to one pass over all the data to float32 rounding).
  Grown histograms are stored with ``num_bins * 2**k`` bins (``nbins`` says how many are
  in use; the rest are empty) so that growth recompiles the kernels only a few times.
* **MinMax**: ``amax = max|x|``; the range is ``(min x, max x)``.
* **Percentile(p)**, ``p`` in percent: ``idx`` = first bin with
  ``cumsum(h) / sum(h) >= p / 100``, decided exactly on the integer counts (int64
  ``cumsum(h) * den >= sum(h) * num`` with ``p / 100 = num / den``, ``p`` read as the
  decimal it prints as); ``amax = e[idx]`` (left edge, no interpolation).
* **Entropy** (KL) for ``nq = 2**(bits-1)`` levels (128 for int8): ``h[0]`` takes the count
  of ``h[1]``; for every candidate ``i = 128 .. num_bins`` (bins kept): ``P = h[:i]`` with the
  sum of ``h[i:]`` added to ``P[i-1]``; ``Q`` = ``h[:i]`` merged into ``nq`` groups (bin ``j``
  in group ``(j * nq) // i``), each group's total spread evenly over its non-empty bins,
  empty bins 0; ``KL(P || Q)`` with both normalised, no smoothing (``inf`` where ``P > 0``
  and ``Q = 0``); the **last** (largest ``i``) minimum wins; ``amax = e[i]``.
* **MSE**: bin centres ``c``; for ``i = 128 .. num_bins - 1``: ``amax = c[i]``, fake-quantize
  the centres in float32 with ``scale = (2**(bits-1) - 1) / amax``, round half to even,
  clamp to ``[-2**(bits-1), 2**(bits-1) - 1]``, divide by ``scale``; error
  ``mean((q - c)**2 * h)``; the **first** minimum wins; ``amax = c[i]``.
* **MeanStd(k)**, ``k`` in standard deviations: ``mean ± k * std`` with the population
  std (ddof 0), clamped to the data; ``amax = max(|lo|, |hi|)``. (The seed crate's integer
  spellings, ``Percentile(999)`` per mille and ``MeanStd(30)`` tenths, are read only where
  they can't be misread: see :class:`CalibrationMethod`.)
* The chosen range of the symmetric methods is ``(-amax, amax)`` with both ends clamped
  into ``[min x, max x]`` (so ``lo <= hi`` even when all the data is on one side).
* **Search arithmetic**: the percentile search is integer arithmetic. For the others,
  every candidate is evaluated at once (KL from prefix sums of the
  counts, ``O(candidates * nq)``; MSE in batches of 64 candidates), in float64 inside a
  scoped ``jax.enable_x64`` (float32 on TPU, which has no float64), so the chosen bin is
  the one a float64 NumPy loop picks. Bin centres are guarded against FMA contraction.
* **Scales**: symmetric ``amax / (2**(bits-1) - 1)``; asymmetric for ``[0, 2**bits - 1]``:
  the range is widened to include 0, ``scale = (hi - lo) / (2**bits - 1)``,
  ``zero_point = round(-lo / scale)`` (half to even) clamped to the range. A scale below
  float32 eps (e.g. an all-zero tensor) becomes 1 with zero point 0, as PyTorch observers do.

**Jit.** :func:`calibrate` is jittable: the histogram has ``num_bins`` bins, a static
shape. Growth changes the histogram's shape, so it is decided on the host:
:meth:`CalibrationData.update` and :func:`merge_calibration` read the new batch's
``max|x|`` (one small device-to-host transfer), pick the bin count, then run jitted
kernels with that static count. Calling them under ``jit`` raises CalibrationError.
``calibrate(..., bin_width=)`` also sizes the histogram from the data, so it is host-side.

**Bad input.** Empty arrays, NaN/Inf values (counted and reported when ``x`` is concrete;
under ``jit`` they are left out of every statistic), ``p`` outside ``(0, 100]``,
``k <= 0`` and too few bins raise :class:`CalibrationError`. A constant tensor is fine:
its range is that value (and 0 for the asymmetric range); an all-zero tensor has
``amax = 0`` and scale 1. Totals are int32: at most 2**31 - 1 values per calibration.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._core.quantize import check_dtype
from .._errors import CalibrationError
from .._formats.guards import exact_div
from .._formats.quant_type import QuantTypeLike
from . import histogram as H
from .methods import CalibrationMethod, as_method, bits_for, is_int

__all__ = ["CalibrationData", "CalibrationMethod", "calibrate", "merge_calibration"]

_EPS = float(np.finfo(np.float32).eps)
_MAX_COUNT = 2**31 - 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class CalibrationData:
    """Statistics of calibration data and the range a method chose from them (a pytree).

    Arrays have the shape of the statistic: ``()`` per tensor, or the calibrated tensor's
    shape with every non-channel axis set to 1 when :func:`calibrate` got ``axis=``, so
    they broadcast against the tensor. ``hist`` adds a last axis of bins.

    Attributes:
        min, max: smallest and largest finite value. mean: the mean; ``m2``: the sum of
          squared deviations (``std = sqrt(m2 / count)``, population).
        count: int32 number of finite values seen. absmax: ``max|x|``.
        hist: int32 counts of ``|x|``; bin ``k`` is ``(k*width, (k+1)*width]``. Grown
          histograms are stored with ``num_bins * 2**k`` bins (a few shapes, so a few
          compiles); bins past ``nbins`` are empty: :meth:`histogram` trims them.
        width: the bin width. nbins: bins in use per channel.
        amax: the method's symmetric threshold. lo, hi: its range, clamped to the data.
        method, bits, num_bins: static; ``bits`` sets the entropy/MSE grid (8: int8).

    Example:
        >>> import jax, jquant
        >>> x = jax.random.normal(jax.random.key(0), (4096,))
        >>> c = jquant.calibrate(x, jquant.CalibrationMethod.Percentile(99.9))
        >>> bool(c.amax < c.absmax), c.hist.shape, int(c.count)
        (True, (2048,), 4096)
        >>> c = c.update(2 * x)  # a wider batch appends bins of the same width
        >>> c.hist.shape, int(c.hist.sum())
        ((4096,), 8192)
    """

    min: jax.Array
    max: jax.Array
    mean: jax.Array
    m2: jax.Array
    count: jax.Array
    absmax: jax.Array
    hist: jax.Array
    width: jax.Array
    nbins: jax.Array
    amax: jax.Array
    lo: jax.Array
    hi: jax.Array
    method: CalibrationMethod = dataclasses.field(metadata={"static": True}, default=None)
    bits: int = dataclasses.field(metadata={"static": True}, default=8)
    num_bins: int = dataclasses.field(metadata={"static": True}, default=2048)
    axis: tuple[int, ...] | None = dataclasses.field(metadata={"static": True}, default=None)

    @property
    def std(self) -> jax.Array:
        """Population standard deviation (ddof 0)."""
        return jnp.sqrt(self.m2 / jnp.maximum(self.count, 1).astype(jnp.float32))

    @property
    def edges(self) -> jax.Array:
        """Bin edges ``float32(k) * width``, shape ``(*stat_shape, n + 1)``."""
        k = jnp.arange(self.hist.shape[-1] + 1, dtype=jnp.int32)
        return k.astype(jnp.float32) * self.width[..., None]

    def histogram(self) -> tuple[jax.Array, jax.Array]:
        """``(counts, edges)`` without the empty padding bins past ``max(nbins)`` (host-side).

        Example:
            >>> import jax.numpy as jnp, jquant
            >>> c = jquant.calibrate(jnp.array([0.5, -1.0, 2.0]), "minmax", num_bins=4)
            >>> counts, edges = c.histogram()
            >>> counts.tolist(), edges.tolist()
            ([1, 1, 0, 1], [0.0, 0.5, 1.0, 1.5, 2.0])
            >>> c.update(jnp.array([2.6])).histogram()[0].tolist()  # two bins appended
            [1, 1, 0, 1, 0, 1]
        """
        n = int(np.asarray(self.nbins).max())
        return self.hist[..., :n], self.edges[..., : n + 1]

    def clip_range(self) -> tuple[jax.Array, jax.Array]:
        """``(lo, hi)``, broadcastable to the calibrated tensor (``quantize_tensor(clip=)``)."""
        return self.lo, self.hi

    def dynamic_range(self) -> jax.Array:
        """``max - min`` of the observed data."""
        return self.max - self.min

    def symmetric_scale(self, qtype: QuantTypeLike | None = None, *, bits: int | None = None):
        """``amax / (2**(bits-1) - 1)`` with the bits of ``qtype`` (Q8_0: 127, Q4_*: 7).

        Raises:
            CalibrationError: for F16/BF16/F32, which have no integer grid.

        Example:
            >>> import jax.numpy as jnp, numpy as np, jquant
            >>> c = jquant.calibrate(jnp.array([-2.0, 0.5, 1.27]), jquant.CalibrationMethod.MinMax)
            >>> float(c.symmetric_scale("q8_0")) == float(np.float32(2.0) / np.float32(127))
            True
        """
        qmax = float((1 << (bits_for(qtype, bits) - 1)) - 1)
        scale = exact_div(self.amax, qmax)
        return jnp.where(scale < _EPS, jnp.float32(1.0), scale)

    def asymmetric_scale(
        self, qtype: QuantTypeLike | None = None, *, bits: int | None = None, signed: bool = False
    ):
        """``(scale, zero_point)`` mapping ``(lo, hi)`` (widened to hold 0) onto ``[0, 2**bits-1]``.

        ``zero_point`` is int32; with ``signed=True`` it is shifted by ``-2**(bits-1)`` for the
        signed grid (``quantize_affine(..., signed=True)``). Raises CalibrationError for
        F16/BF16/F32.

        Example:
            >>> import jax.numpy as jnp, numpy as np, jquant
            >>> c = jquant.calibrate(jnp.array([-1.0, 3.0]), jquant.CalibrationMethod.MinMax)
            >>> s, z = c.asymmetric_scale("q8_0")
            >>> float(s) == float(np.float32(4.0) / np.float32(255)), int(z)
            (True, 64)
        """
        nbits = bits_for(qtype, bits)
        qmax = float((1 << nbits) - 1)
        lo = jnp.minimum(self.lo, 0.0)
        hi = jnp.maximum(self.hi, 0.0)
        scale = exact_div(hi - lo, qmax)
        tiny = scale < _EPS
        scale = jnp.where(tiny, jnp.float32(1.0), scale)
        zp = jnp.clip(jnp.round(exact_div(-lo, scale)), 0.0, qmax)
        zp = jnp.where(tiny, 0, zp.astype(jnp.int32))
        return scale, zp - (1 << (nbits - 1)) if signed else zp

    def with_method(self, method: Any) -> CalibrationData:
        """The same statistics with another method's choice (no pass over the data).

        Example:
            >>> import jax, jquant
            >>> c = jquant.calibrate(jax.random.laplace(jax.random.key(1), (8192,)), "minmax")
            >>> e = c.with_method(jquant.CalibrationMethod.Entropy)
            >>> bool(e.amax < c.amax)
            True
        """
        method = as_method(method)
        _check_bins(method, self.hist.shape[-1])
        return _finish(dataclasses.replace(self, method=method))

    def update(self, x: jax.typing.ArrayLike, *, name: str | None = None) -> CalibrationData:
        """Add a batch: ``merge_calibration(self, <x on this histogram's bin width>)``.

        Runs on the host side of jit (the histogram may grow); ``x`` must have the same
        channel sizes as the first batch when ``axis=`` was used.
        """
        return update_data(self, x, name=name)

    def __repr__(self) -> str:
        shape = tuple(self.amax.shape)
        try:
            count = int(self.count) if not shape else "per channel"
        except (TypeError, jax.errors.ConcretizationTypeError):  # traced
            count = "traced"
        return (
            f"CalibrationData(method={self.method!r}, bits={self.bits}, shape={shape}, "
            f"bins={self.hist.shape[-1]}, count={count})"
        )


def _check_bins(method: CalibrationMethod, n: int) -> None:
    need = {"Entropy": H.START_BIN, "MSE": H.START_BIN + 1}.get(method.kind, 1)
    if n < need:
        raise CalibrationError(
            f"{method!r} searches thresholds from NVIDIA's start bin {H.START_BIN} but the "
            f"histogram has {n} bins; use num_bins >= {need} (2048 is the reference)"
        )


def norm_axis(axis, ndim: int) -> tuple[int, ...] | None:
    """Sorted non-negative channel axes, or None per tensor."""
    if axis is None:
        return None
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    ok = ndim > 0 and axes and all(is_int(a) and -ndim <= a < ndim for a in axes)
    if not ok:
        raise CalibrationError(
            f"axis={axis!r} is not a valid channel axis (or tuple of axes) of a {ndim}-d array"
        )
    return tuple(sorted({int(a) % ndim for a in axes}))


def _rows(x: jax.Array, axis) -> tuple[jax.Array, tuple[int, ...]]:
    """``x`` as ``[channels, values]`` and the keepdims statistic shape."""
    kept = norm_axis(axis, x.ndim)
    if kept is None:
        return x.reshape(1, -1), ()
    rest = [d for d in range(x.ndim) if d not in kept]
    c = math.prod(x.shape[d] for d in kept)
    rows = jnp.transpose(x, (*kept, *rest)).reshape(c, -1)
    return rows, tuple(x.shape[d] if d in kept else 1 for d in range(x.ndim))


_STATS = ("min", "max", "mean", "m2", "count", "absmax", "width", "nbins")


def _finish(c: CalibrationData) -> CalibrationData:
    """Recompute ``amax, lo, hi`` from the statistics with ``c.method``."""
    shape = c.min.shape
    flat = {k: getattr(c, k).reshape(-1) for k in _STATS}
    flat["hist"] = c.hist.reshape(-1, c.hist.shape[-1])
    amax, lo, hi = H.choose(flat, method=c.method, bits=c.bits)
    return dataclasses.replace(
        c, amax=amax.reshape(shape), lo=lo.reshape(shape), hi=hi.reshape(shape)
    )


def from_flat(flat: dict, shape, method, bits, num_bins, axis=None) -> CalibrationData:
    """Build (and choose) from flat ``[C]`` arrays."""
    n = flat["hist"].shape[-1]
    arrays = {k: flat[k].reshape(shape) for k in _STATS}
    z = jnp.zeros(shape, jnp.float32)
    c = CalibrationData(
        **arrays,
        hist=flat["hist"].reshape(*shape, n),
        amax=z,
        lo=z,
        hi=z,
        method=method,
        bits=bits,
        num_bins=num_bins,
        axis=axis,
    )
    return _finish(c)


def report_nonfinite(rows, count, name) -> None:
    """Raise CalibrationError if concrete ``rows`` hold NaN/Inf."""
    bad = int(np.asarray(rows.shape[-1] - count).sum())
    if bad:
        what = f"tensor {name!r}" if name else "the calibration data"
        allbad = int(np.asarray(count).min()) == 0
        raise CalibrationError(
            f"{what} holds {bad} NaN/Inf value(s)"
            + (" (a channel or the whole tensor has no finite value)" if allbad else "")
            + "; calibration statistics would be NaN. Clean the data first "
            "(jnp.nan_to_num, or mask the bad rows)."
        )


def prepare(x, name, axis):
    """Validate ``x`` and return ``(rows, stat_shape, traced)``."""
    check_dtype(x, name)
    x = jnp.asarray(x)
    if x.size == 0:
        what = f"tensor {name!r}" if name else "the calibration data"
        raise CalibrationError(
            f"{what} is empty (shape {x.shape}); calibrate on at least one value"
        )
    rows, shape = _rows(x.astype(jnp.float32), axis)
    return rows, shape, isinstance(x, jax.core.Tracer)


def calibrate(
    x: jax.typing.ArrayLike,
    method: Any,
    *,
    num_bins: int = 2048,
    axis: int | tuple[int, ...] | None = None,
    bits: int = 8,
    bin_width: Any = None,
    name: str | None = None,
) -> CalibrationData:
    """Collect statistics of ``x`` and pick a quantization range with ``method``.

    Args:
        x: floating-point calibration data (weights or activations), any shape.
        method: a :class:`CalibrationMethod` (or ``"minmax"``, ``"entropy"``, ``"mse"``).
        num_bins: histogram bins over ``[0, max|x|]`` (NVIDIA's 2048 by default).
        axis: channel axis (or axes) for per-channel calibration; every other axis is
          reduced. ``None`` calibrates the whole tensor.
        bits: the integer grid the Entropy and MSE searches target (8: int8, 128 levels).
        bin_width: use this bin width (per channel) instead of ``max|x| / num_bins``; the
          bin count then follows the data (not jittable). Workers that calibrate shards
          with the same ``bin_width`` can be merged exactly with :func:`merge_calibration`.
        name: the tensor's name for error messages.

    Returns:
        A :class:`CalibrationData`; ``clip_range()`` gives the chosen ``(lo, hi)``.

    Raises:
        CalibrationError: empty input, NaN/Inf in concrete input, too few bins, bad axis.
        UnsupportedDTypeError: integer, bool or complex input.

    Example:
        >>> import jax, jquant
        >>> w = jax.random.t(jax.random.key(0), 3.0, (256, 256))  # heavy tails
        >>> c = jquant.calibrate(w, jquant.CalibrationMethod.Entropy)
        >>> bool(c.amax < c.absmax)  # outliers are clipped
        True
        >>> q = jquant.quantize_tensor(w, "q4_0", clip=c)
        >>> jquant.calibrate(w, jquant.CalibrationMethod.MinMax, axis=0).clip_range()[0].shape
        (256, 1)
    """
    method = as_method(method)
    if not is_int(num_bins) or num_bins < 1:
        raise CalibrationError(f"num_bins must be a positive int, got {num_bins!r}")
    if not is_int(bits) or not 2 <= bits <= 16:
        raise CalibrationError(f"bits must be an int in [2, 16], got {bits!r}")
    rows, shape, traced = prepare(x, name, axis)
    if bin_width is None:
        _check_bins(method, num_bins)
        s = H.batch_stats(rows, None, n=num_bins, num_bins=num_bins)
    else:
        s = batch_on_width(rows, bin_width, num_bins=num_bins, traced=traced)
        _check_bins(method, int(np.asarray(s["nbins"]).min()))
    if not traced:
        report_nonfinite(rows, s["count"], name)
    axis = norm_axis(axis, np.ndim(x))
    return from_flat(s, shape, method, int(bits), int(num_bins), axis)


def merge_calibration(a: CalibrationData, b: CalibrationData) -> CalibrationData:
    """Combine two calibrations of the same kind of data, exactly.

    Histograms must share a bin width (per channel): a later batch added with
    :meth:`CalibrationData.update`, or workers using ``calibrate(..., bin_width=)``. An
    all-zero side adopts the other's width. The shorter histogram is padded with empty
    bins; mean and variance merge with Chan's parallel formula. Host-side (not jittable).

    Raises:
        CalibrationError: different methods, channel shapes or bin widths.

    Example:
        >>> import jax.numpy as jnp, jquant
        >>> a = jquant.calibrate(jnp.arange(1.0, 5.0), "minmax")
        >>> b = jquant.calibrate(jnp.arange(5.0, 9.0), "minmax", bin_width=a.width)
        >>> m = jquant.merge_calibration(a, b)
        >>> int(m.count), float(m.mean), float(m.max)
        (8, 4.5, 8.0)
    """
    return merge_data(a, b)


# -- streaming: growing histograms and exact merges (host side) ----------------------


def bins_needed(absmax: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Smallest ``n >= 1`` with ``float32(n) * width >= absmax`` (1 where width is 0)."""
    absmax = np.asarray(absmax, np.float32)
    width = np.asarray(width, np.float32)
    pos = width > 0
    w = np.where(pos, width, np.float32(1))
    n = np.ceil(absmax.astype(np.float64) / w.astype(np.float64))
    n = np.where(pos, np.maximum(n, 1), 1).astype(np.int64)
    for _ in range(4):  # settle float32 rounding of the top edge, either way
        n = np.where(pos & (n.astype(np.float32) * w < absmax), n + 1, n)
        n = np.where(pos & (n > 1) & ((n - 1).astype(np.float32) * w >= absmax), n - 1, n)
    return n


@jax.jit
def _absmax(rows):
    return jnp.max(jnp.where(jnp.isfinite(rows), jnp.abs(rows), 0.0), axis=-1)


def _concrete(*xs) -> None:
    if any(isinstance(v, jax.core.Tracer) for v in xs):
        raise CalibrationError(
            "growing a calibration histogram needs concrete data: update() and "
            "merge_calibration() decide the number of bins on the host, so call them "
            "outside jax.jit (calibrate() itself is jittable)"
        )


def capacity(n: int, num_bins: int) -> int:
    """Stored bins for ``n`` bins in use: ``num_bins * 2**k``, so that a growing histogram
    recompiles the kernels a logarithmic number of times, not once per new bin count."""
    cap = num_bins
    while cap < n:
        cap *= 2
    return cap


def batch_on_width(rows, bin_width, *, num_bins: int, traced: bool):
    """Batch statistics on edges ``k * bin_width`` with as many bins as the data needs."""
    if traced or isinstance(bin_width, jax.core.Tracer):
        _concrete(rows, bin_width)
    width = np.broadcast_to(np.asarray(bin_width, np.float32).reshape(-1), (rows.shape[0],))
    if not np.all(np.isfinite(width)) or np.any(width < 0):
        raise CalibrationError(f"bin_width must be finite and >= 0, got {bin_width!r}")
    absmax = np.asarray(_absmax(rows))
    zero = width == 0
    if zero.any():  # no width yet: take this batch's max|x| / num_bins
        fresh = np.asarray(exact_div(jnp.asarray(absmax), float(num_bins)))
        width = np.where(zero, fresh, width).astype(np.float32)
    need = bins_needed(absmax, width)
    n = capacity(int(need.max()), num_bins)
    s = H.batch_stats(rows, jnp.asarray(width), n=n, num_bins=num_bins)
    s["nbins"] = jnp.asarray(np.where(width > 0, need, num_bins), jnp.int32)
    return s


def _flat(c: CalibrationData) -> dict:
    flat = {k: getattr(c, k).reshape(-1) for k in _STATS}
    flat["hist"] = c.hist.reshape(-1, c.hist.shape[-1])
    return flat


def update_data(c: CalibrationData, x, *, name=None) -> CalibrationData:
    rows, shape, traced = prepare(x, name, c.axis)
    _concrete(x, c.hist)
    if shape != tuple(c.min.shape):
        raise CalibrationError(
            f"batch {name or ''} gives statistics of shape {shape} but this calibration has "
            f"{tuple(c.min.shape)}; keep the channel axes the same size in every batch"
        )
    s = batch_on_width(rows, c.width, num_bins=c.num_bins, traced=traced)
    report_nonfinite(rows, s["count"], name)
    return _merge_flat(c, _flat(c), s)


def merge_data(a: CalibrationData, b: CalibrationData) -> CalibrationData:
    for v in (a, b):
        if not isinstance(v, CalibrationData):
            raise TypeError(f"merge_calibration takes CalibrationData, got {type(v).__name__}")
    _concrete(a.hist, b.hist)
    if (a.method, a.bits) != (b.method, b.bits):
        raise CalibrationError(
            f"can't merge {a.method!r} (bits={a.bits}) with {b.method!r} (bits={b.bits}); "
            "calibrate both with the same method, or use b.with_method(a.method)"
        )
    if a.min.shape != b.min.shape or a.axis != b.axis:
        raise CalibrationError(
            f"can't merge calibrations of shapes {a.min.shape} and {b.min.shape}"
        )
    return _merge_flat(a, _flat(a), _flat(b))


def _merge_flat(c, fa: dict, fb: dict) -> CalibrationData:
    wa, wb = np.asarray(fa["width"]), np.asarray(fb["width"])
    ca, cb = np.asarray(fa["count"], np.int64), np.asarray(fb["count"], np.int64)
    if np.any(ca + cb > _MAX_COUNT):
        raise CalibrationError(
            f"more than {_MAX_COUNT} values in one calibration (int32 counts); "
            "calibrate on a sample of the data"
        )
    # A side with zero width holds only zeros, all in bin 0 under any width.
    width = np.where(wa > 0, wa, wb)
    clash = (wa > 0) & (wb > 0) & (wa != wb)
    if clash.any():
        raise CalibrationError(
            f"histogram bin widths differ ({wa[clash][:3]} vs {wb[clash][:3]}); merging would "
            "need rebinning. Add raw batches with a.update(x), or calibrate every part "
            "with calibrate(x, method, bin_width=a.width)"
        )
    n = max(fa["hist"].shape[-1], fb["hist"].shape[-1])
    na = np.asarray(fa["nbins"])
    nb = np.asarray(fb["nbins"])
    nbins = np.where(wa > 0, np.where(wb > 0, np.maximum(na, nb), na), nb)
    merged = _merge_jit(fa, fb, n=n)
    merged["width"] = jnp.asarray(width, jnp.float32)
    merged["nbins"] = jnp.asarray(nbins, jnp.int32)
    return from_flat(merged, tuple(c.min.shape), c.method, c.bits, c.num_bins, c.axis)


@functools.partial(jax.jit, static_argnames=("n",))
def _merge_jit(fa, fb, *, n: int):
    def pad(h):
        return jnp.pad(h, ((0, 0), (0, n - h.shape[-1])))

    with jax.enable_x64(True):
        wide = H.wide_dtype()
        na, nb = fa["count"].astype(wide), fb["count"].astype(wide)
        tot = jnp.maximum(na + nb, 1.0)
        delta = fb["mean"].astype(wide) - fa["mean"].astype(wide)
        mean = fa["mean"].astype(wide) + delta * nb / tot
        m2 = fa["m2"].astype(wide) + fb["m2"].astype(wide) + delta**2 * na * nb / tot
        mean, m2 = mean.astype(jnp.float32), m2.astype(jnp.float32)
    return dict(
        min=jnp.minimum(fa["min"], fb["min"]),
        max=jnp.maximum(fa["max"], fb["max"]),
        mean=mean,
        m2=m2,
        count=fa["count"] + fb["count"],
        absmax=jnp.maximum(fa["absmax"], fb["absmax"]),
        hist=pad(fa["hist"]) + pad(fb["hist"]),
    )
