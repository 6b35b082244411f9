"""The |x| histogram and the threshold searches behind :func:`jquant.calibrate`.

Conventions (NVIDIA's, as TensorRT / pytorch-quantization ship them; see
``jquant._calibration.calibration`` for the full list):

* Bin ``k`` of a histogram with bin width ``w`` covers ``(e[k], e[k+1]]`` where
  ``e[k] = float32(k) * w`` (bin 0 also holds 0). For the first batch ``w = amax / 2048``,
  so the edges equal ``np.linspace(0, amax, 2049, dtype=float32)``. Bins are closed on the
  right so that a value keeps its bin when the histogram later grows (with left-closed
  bins the old maximum, sitting on the old top edge, would move up one bin).
* Counts are int32 (float32 counts stop being exact past 2**24 per bin).
* The searches are vectorised over every candidate at once and evaluate their sums in
  float64 (``jax.enable_x64`` scoped to the search; float32 on TPU), so they pick the same
  bin as a float64 NumPy implementation of the reference loops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .._formats.guards import exact_div

__all__ = [
    "START_BIN",
    "batch_stats",
    "bin_index",
    "choose",
    "entropy_index",
    "histogram",
    "mse_index",
]

START_BIN = 128
"""First candidate of the entropy and MSE searches (NVIDIA's ``start_bin``)."""

_I32 = jnp.int32
_F32 = jnp.float32


def wide_dtype():
    """float64 where the backend has it (CPU, GPU); TPU has no float64."""
    return jnp.float64 if jax.default_backend() != "tpu" else jnp.float32


def edges(k: jax.Array, width: jax.Array) -> jax.Array:
    """Edge ``k`` of a histogram of bin width ``width``: ``float32(k) * width``."""
    return k.astype(_F32) * width


def centre(k: jax.Array, width: jax.Array) -> jax.Array:
    """Centre of bin ``k``, ``(e[k] + e[k+1]) / 2``, with both edges rounded first.

    Each edge passes through a data-dependent select (NaN-preserving, so it can't be
    folded away) that keeps LLVM from fusing ``k * w + (k+1) * w`` into a fused
    multiply-add, which rounds once and moves the centre by an ulp. (XLA:CPU drops an
    ``optimization_barrier`` here once the index is data-dependent.)
    """
    lo, hi = edges(k, width), edges(k + 1, width)
    lo, hi = jnp.where(lo == lo, lo, hi), jnp.where(hi == hi, hi, lo)
    return (lo + hi) / 2


def bin_index(a: jax.Array, width: jax.Array, n: int) -> jax.Array:
    """Bin of each ``a >= 0``: the ``k`` with ``e[k] < a <= e[k+1]``, clamped to ``[0, n)``.

    ``a`` is ``[C, M]`` float32, ``width`` is ``[C]``. A zero width (all-zero data) puts
    everything in bin 0.
    """
    w = jnp.where(width > 0, width, 1.0)[:, None]
    k = jnp.clip(jnp.floor(a / w), 0, n - 1).astype(_I32)
    w = width[:, None]
    # a / w is within an ulp of the truth; two steps either way make it exact.
    for _ in range(2):
        k = jnp.where((k > 0) & (a <= edges(k, w)), k - 1, k)
    for _ in range(2):
        k = jnp.where((k < n - 1) & (a > edges(k + 1, w)), k + 1, k)
    return k


def histogram(a: jax.Array, width: jax.Array, n: int, valid: jax.Array) -> jax.Array:
    """int32 ``[C, n]`` counts of ``a`` (``[C, M]``, ``>= 0``) where ``valid``."""
    c, _ = a.shape
    k = bin_index(a, width, n)
    k = jnp.where(valid, k, n)  # invalid values land in a dropped extra bin
    flat = (jnp.arange(c, dtype=_I32)[:, None] * (n + 1) + k).reshape(-1)
    counts = jnp.zeros(c * (n + 1), _I32).at[flat].add(1, mode="drop")
    return counts.reshape(c, n + 1)[:, :n]


def percentile_index(hist: jax.Array, frac: float) -> jax.Array:
    """First bin whose cdf ``cumsum(h) / sum(h)`` reaches ``frac``; ``hist`` is ``[C, n]``."""
    with jax.enable_x64(True):
        wide = wide_dtype()
        cum = jnp.cumsum(hist.astype(wide), axis=-1)
        total = cum[:, -1:]
        cdf = exact_div(cum, jnp.where(total > 0, total, 1.0))  # not cum * (1 / total)
        hit = cdf >= jnp.asarray(frac, wide)
        pos = jnp.arange(hist.shape[-1], dtype=_I32)
        return jnp.min(jnp.where(hit, pos, hist.shape[-1] - 1), axis=-1)


def _xlogx(v):
    return jnp.where(v > 0, v * jnp.log(jnp.where(v > 0, v, 1.0)), 0.0)


def _entropy_one(hist: jax.Array, nvalid: jax.Array, bits: int) -> jax.Array:
    """Kept-bin count ``i`` minimising KL(P||Q) for one histogram (last minimum)."""
    n = hist.shape[-1]
    nq = 1 << (bits - 1)
    wide = wide_dtype()
    b = hist.at[0].set(hist[1]).astype(wide)
    zero = jnp.zeros(1, wide)
    csum = jnp.concatenate([zero, jnp.cumsum(b)])  # exact: integers below 2**53
    nonempty = jnp.concatenate([jnp.zeros(1, _I32), jnp.cumsum((b > 0).astype(_I32))])
    plogp = jnp.concatenate([zero, jnp.cumsum(_xlogx(b))])

    i = jnp.arange(START_BIN, n + 1, dtype=_I32)[:, None]  # [K, 1] candidates
    g = jnp.arange(nq, dtype=_I32)[None, :]  # [1, nq] groups
    # group of bin j is (j * nq) // i, so group g is the bins [ceil(g i / nq), ceil((g+1) i / nq))
    start = (g * i + nq - 1) // nq
    stop = ((g + 1) * i + nq - 1) // nq
    gsum = csum[stop] - csum[start]
    gcnt = (nonempty[stop] - nonempty[start]).astype(wide)
    total = csum[n]
    kept = csum[i[:, 0]]
    tail = total - kept
    last = b[i[:, 0] - 1]
    plast = last + tail
    # Q_j = gsum / gcnt on non-empty bins; P equals the bins except P[i-1] += tail.
    last_group = ((i - 1) * nq) // i
    tsum = gsum + jnp.where(g == last_group, tail[:, None], 0.0)
    logq = jnp.log(jnp.where(gsum > 0, gsum, 1.0) / jnp.where(gcnt > 0, gcnt, 1.0))
    cross = jnp.sum(jnp.where(gsum > 0, tsum * logq, 0.0), axis=-1)
    self_ = plogp[i[:, 0] - 1] + _xlogx(plast)
    safe_total = jnp.where(total > 0, total, 1.0)
    kl = (self_ - cross) / safe_total + jnp.log(jnp.where(kept > 0, kept, 1.0) / safe_total)
    kl = jnp.where((last == 0) & (tail > 0), jnp.inf, kl)  # P > 0 where Q = 0
    kl = jnp.where(i[:, 0] > nvalid, jnp.inf, kl)
    kl = jnp.where(total > 0, kl, 0.0)
    # argmin/argmax are avoided in this float64 scope (their cached lowering clashes with
    # an enclosing float32 jit); an equality mask does the same.
    pos = i[:, 0]
    return jnp.max(jnp.where(kl == jnp.min(kl), pos, START_BIN))


def entropy_index(hist: jax.Array, nvalid: jax.Array, bits: int = 8) -> jax.Array:
    """TensorRT entropy calibration: the edge index ``i`` (amax = ``e[i]``) per channel."""
    with jax.enable_x64(True):
        return lax.map(lambda hn: _entropy_one(hn[0], hn[1], bits), (hist, nvalid))


def _mse_one(hist: jax.Array, nvalid: jax.Array, width: jax.Array, bits: int) -> jax.Array:
    n = hist.shape[-1]
    wide = wide_dtype()
    qmax = float((1 << (bits - 1)) - 1)
    qmin = float(-(1 << (bits - 1)))
    centres = centre(jnp.arange(n, dtype=_I32), width)
    counts = hist.astype(wide)
    c_wide = centres.astype(wide)

    def err(amax):
        scale = exact_div(jnp.full((), qmax, _F32), amax)
        q = jnp.clip(jnp.round(centres * scale), qmin, qmax)
        deq = exact_div(q, scale).astype(wide)
        # NVIDIA's mean over its bins (``nvalid``; padding bins past it are empty)
        return jnp.sum((deq - c_wide) ** 2 * counts) / nvalid.astype(wide)

    cand = jnp.arange(START_BIN, n, dtype=_I32)
    errs = lax.map(err, centres[cand], batch_size=64)
    errs = jnp.where((cand < nvalid) & ~jnp.isnan(errs), errs, jnp.inf)  # i < nvalid only
    return jnp.min(jnp.where(errs == jnp.min(errs), cand, n - 1))


def mse_index(hist: jax.Array, nvalid: jax.Array, width: jax.Array, bits: int = 8) -> jax.Array:
    """NVIDIA's MSE calibration: the bin ``i`` whose centre is amax (first minimum)."""
    with jax.enable_x64(True):
        return lax.map(lambda a: _mse_one(a[0], a[1], a[2], bits), (hist, nvalid, width))


@functools.partial(jax.jit, static_argnames=("n", "num_bins"))
def batch_stats(rows, width, *, n: int, num_bins: int):
    """Statistics and histogram of ``[C, M]`` rows; ``width=None``: ``max|x| / num_bins``."""
    finite = jnp.isfinite(rows)
    a = jnp.where(finite, jnp.abs(rows), 0.0)
    absmax = jnp.max(a, axis=-1)
    if width is None:
        width = exact_div(absmax, float(num_bins))
    count = jnp.sum(finite, axis=-1, dtype=jnp.int32)
    with jax.enable_x64(True):
        wide = wide_dtype()
        xw = jnp.where(finite, rows, 0.0).astype(wide)
        cnt = jnp.maximum(count, 1).astype(wide)
        mean = jnp.sum(xw, axis=-1) / cnt
        m2 = jnp.sum(jnp.where(finite, (xw - mean[:, None]) ** 2, 0.0), axis=-1)
        mean, m2 = mean.astype(jnp.float32), m2.astype(jnp.float32)
    return dict(
        min=jnp.min(jnp.where(finite, rows, jnp.inf), axis=-1),
        max=jnp.max(jnp.where(finite, rows, -jnp.inf), axis=-1),
        mean=mean,
        m2=m2,
        count=count,
        absmax=absmax,
        hist=histogram(a, width, n, finite),
        width=width,
        nbins=jnp.full(absmax.shape, n, jnp.int32),
    )


@functools.partial(jax.jit, static_argnames=("method", "bits"))
def choose(s: dict, *, method, bits: int):
    """``(amax, lo, hi)`` per channel for a ``CalibrationMethod``; ``s`` holds flat ``[C]`` /
    ``[C, n]`` arrays."""
    mn, mx, width = s["min"], s["max"], s["width"]
    if method.kind == "MinMax":
        return s["absmax"], mn, mx
    if method.kind == "MeanStd":
        std = jnp.sqrt(s["m2"] / jnp.maximum(s["count"], 1).astype(jnp.float32))
        lo = jnp.maximum(s["mean"] - method.param * std, mn)
        hi = jnp.minimum(s["mean"] + method.param * std, mx)
        return jnp.maximum(jnp.abs(lo), jnp.abs(hi)), lo, hi
    if method.kind == "Percentile":
        amax = edges(percentile_index(s["hist"], method.param / 100.0), width)
    elif method.kind == "Entropy":
        amax = edges(entropy_index(s["hist"], s["nbins"], bits), width)
    else:  # MSE: the centre of the chosen bin
        i = mse_index(s["hist"], s["nbins"], width, bits)
        amax = centre(i, width)
    # clamp both ends into [min, max]: keeps lo <= hi when all data sits on one side
    return amax, jnp.clip(-amax, mn, mx), jnp.clip(amax, mn, mx)
