"""Streaming calibration: growing histograms and exact merges (host-side, see ``_calibration``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import CalibrationError
from .._formats.guards import exact_div
from . import calibration as C
from . import histogram as H

__all__ = ["batch_on_width", "bins_needed", "merge", "update"]


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


def _flat(c: C.CalibrationData) -> dict:
    flat = {k: getattr(c, k).reshape(-1) for k in C._STATS}
    flat["hist"] = c.hist.reshape(-1, c.hist.shape[-1])
    return flat


def update(c: C.CalibrationData, x, *, name=None) -> C.CalibrationData:
    rows, shape, traced = C.prepare(x, name, c.axis)
    _concrete(x, c.hist)
    if shape != tuple(c.min.shape):
        raise CalibrationError(
            f"batch {name or ''} gives statistics of shape {shape} but this calibration has "
            f"{tuple(c.min.shape)}; keep the channel axes the same size in every batch"
        )
    s = batch_on_width(rows, c.width, num_bins=c.num_bins, traced=traced)
    C.report_nonfinite(rows, s["count"], name)
    return _merge_flat(c, _flat(c), s)


def merge(a: C.CalibrationData, b: C.CalibrationData) -> C.CalibrationData:
    for v in (a, b):
        if not isinstance(v, C.CalibrationData):
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


def _merge_flat(c, fa: dict, fb: dict) -> C.CalibrationData:
    wa, wb = np.asarray(fa["width"]), np.asarray(fb["width"])
    ca, cb = np.asarray(fa["count"], np.int64), np.asarray(fb["count"], np.int64)
    if np.any(ca + cb > C._MAX_COUNT):
        raise CalibrationError(
            f"more than {C._MAX_COUNT} values in one calibration (int32 counts); "
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
    return C.from_flat(merged, tuple(c.min.shape), c.method, c.bits, c.num_bins, c.axis)


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
