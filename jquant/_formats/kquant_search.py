"""ggml's scale searches for the asymmetric K-quants, in C evaluation order.

Ports of ``make_qkx2_quants`` / ``make_qkx3_quants`` (one routine: with weights given they
are the same code) and ``make_qp_quants`` from ggml-quants.c. Every function works on
*element-major* arrays ``[n, G]``: the ``n`` values of a group along axis 0 and the ``G``
groups along axis 1, so that a sequential C loop over a group becomes ``n`` vector adds
over contiguous rows of ``G`` lanes.

Exactness rules followed throughout (see :mod:`.guards`): every product that feeds an add
or subtract is passed through :func:`no_fma`; every sum is added in C's loop order; the
divisions the C writes stay divisions (:func:`div`); comparisons are the C's strict
ones, applied candidate after candidate.

Speed: XLA duplicates cheap producers into their consumers, so a per-group value
broadcast over its group is recomputed per element (and stages multiply); every
per-group value that feeds an ``[n, G]`` computation goes through :func:`materialize`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .guards import exact_div, nearest_int, no_fma, opaque, sequential_sum

__all__ = [
    "CHUNK",
    "GROUP_MAX_EPS",
    "chain_max",
    "chain_min",
    "first_zero_signed_min",
    "long_sum_from_zero",
    "make_qkx_quants",
    "make_qp_quants",
    "materialize",
    "sum_from_zero",
]

GROUP_MAX_EPS = np.float32(1e-15)
"""ggml's all-zero threshold for a group's largest value."""

_F32 = jnp.float32


def materialize(*values: jax.Array) -> tuple[jax.Array, ...]:
    """``values`` unchanged, computed once into memory.

    XLA fuses cheap elementwise producers into their consumers by duplicating them: a
    per-group value (a 32-term sum, a min) broadcast over the group's 32 elements is
    recomputed 32 times, and chains of such stages multiply. Optimization barriers are
    expanded away before fusion on CPU; a while loop's operands are always buffers, so the
    values go through a loop whose trip count (1) the compiler can't see, and whose body
    xors them with a loop-variant zero (an identity body would be simplified away).
    """
    probe = values[0].reshape(-1)[0].astype(_F32)
    one = opaque(jnp.int32(1), dep=probe)

    def body(c):
        i = c[0]
        flip = i > 2**30  # always false, unknown to the compiler
        return (i + 1, *(_xor_flag(v, flip) for v in c[1:]))

    return lax.while_loop(lambda c: c[0] < one, body, (jnp.int32(0), *values))[1:]


def _xor_flag(v: jax.Array, flag: jax.Array) -> jax.Array:
    if v.dtype == jnp.bool_:
        return v ^ flag
    uint = jnp.dtype(f"uint{8 * v.dtype.itemsize}")
    bits = lax.bitcast_convert_type(v, uint) ^ flag.astype(uint)
    return lax.bitcast_convert_type(bits, v.dtype)


def _sum0(terms: list[jax.Array]) -> jax.Array:
    """:func:`sum_from_zero` of a list of rows."""
    s = _chain(jnp.add, terms)
    return jnp.where(s == 0, _F32(0), s)


def _chain(op, t) -> jax.Array:
    acc = t[0]
    for i in range(1, len(t)):
        acc = op(acc, t[i])
    return acc


def chain_max(t: jax.Array) -> jax.Array:
    """Max over axis 0 as an unrolled elementwise chain.

    XLA:CPU's reduce over a leading axis of ``[32, G]`` runs ~50x slower than these
    31 vector ``maximum`` ops, which fuse into one loop.
    """
    return _chain(jnp.maximum, t)


def chain_min(t: jax.Array) -> jax.Array:
    """Min over axis 0 as an unrolled elementwise chain (see :func:`chain_max`)."""
    return _chain(jnp.minimum, t)


def long_sum_from_zero(terms: jax.Array, unroll: int = 32) -> jax.Array:
    """:func:`sum_from_zero` over a long axis 0 (a multiple of ``unroll``), in C order.

    A loop of ``len / unroll`` iterations of ``unroll`` unrolled adds: a loop step per
    element costs more in dispatch than the add itself.
    """
    n = terms.shape[0]
    blocks = terms.reshape(n // unroll, unroll, *terms.shape[1:])

    def body(k, acc):
        blk = blocks[k]
        for i in range(unroll):
            acc = acc + blk[i]
        return acc

    s = lax.fori_loop(0, n // unroll, body, jnp.zeros(terms.shape[1:], terms.dtype))
    return jnp.where(s == 0, _F32(0), s)


def sum_from_zero(terms: jax.Array) -> jax.Array:
    """C's ``float s = 0; for (...) s += t[i];`` over axis 0.

    Seeding with ``t[0]`` instead of ``0`` differs only when every term is ``-0``: C's
    ``0 + -0`` is ``+0``, and an exact cancellation is ``+0`` too, so the C sum is never
    ``-0``; the ``where`` restores that.
    """
    s = sequential_sum(terms, axis=0)
    return jnp.where(s == 0, _F32(0), s)


def first_zero_signed_min(x: jax.Array, mn: jax.Array) -> jax.Array:
    """``mn`` (the min of ``x`` over axis 0), with the sign of the first zero when it is 0.

    C's ``min = x[0]; if (x[i] < min) min = x[i];`` keeps the first zero it meets (``-0 < 0``
    is false); XLA's min may return either zero.
    """
    n = x.shape[0]
    iota = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    key = jnp.min(jnp.where(x == 0, 2 * iota + jnp.signbit(x).astype(jnp.int32), 2 * n), axis=0)
    signed = jnp.where((key & 1) == 1, _F32(-0.0), _F32(0.0))
    return jnp.where(mn == 0, signed, mn)


def _candidate_numerators(nmax: int, rmin: float, rdelta: float, nstep: int) -> np.ndarray:
    """``rmin + rdelta*is + nmax`` for ``is = 0..nstep``, rounded as the C does (no FMA)."""
    f = np.float32
    return np.array(
        [(f(rmin) + f(rdelta) * f(i)) + f(nmax) for i in range(nstep + 1)], dtype=np.float32
    )


CHUNK = 4096
"""Groups per step of :func:`make_qkx_quants`'s outer loop (bounds the intermediates)."""


def make_qkx_quants(
    x: jax.Array,
    w: jax.Array,
    *,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    signed_zero_min: bool = False,
    chunk: int = CHUNK,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ggml's ``make_qkx2_quants`` / ``make_qkx3_quants`` (with weights) on ``[n, G]`` groups.

    Fits ``x ≈ scale * L + min`` (``min <= 0``, ``0 <= L <= nmax``) by weighted least squares
    over ``nstep + 1`` candidate inverse scales ``(rmin + rdelta*is + nmax) / (max - min)``.
    As in the C, a candidate that wins replaces ``min``, and later candidates are measured
    from the new ``min``; a candidate must be strictly better to win.

    Args:
        x: float32 ``[n, G]``, one group per column.
        w: float32 ``[n, G]`` weights, already rounded (no pending product).
        nmax: largest quant.
        rmin, rdelta, nstep: the candidate grid.
        use_mad: error is ``sum w*|diff|`` (True) or ``sum w*diff**2``.
        signed_zero_min: give a zero ``min`` the sign of the group's first zero (only
            visible where ``-min`` is stored, as in Q4_1/Q5_1).
        chunk: at most this many groups at a time (a loop over slices of ``G``).

    Returns:
        ``(scale [G], the_min [G], L [n, G] int32)`` with ``the_min = -min >= 0``.
    """
    kw = dict(nmax=nmax, rmin=rmin, rdelta=rdelta, nstep=nstep, use_mad=use_mad)
    kw["signed_zero_min"] = signed_zero_min
    n, g = x.shape
    if g <= chunk:
        return _qkx(x, w, **kw)
    n_chunks = -(-g // chunk)
    size = -(-g // n_chunks)
    pad = n_chunks * size - g  # zero groups are flat: harmless, sliced off below
    if pad:
        x, w = (jnp.pad(a, ((0, 0), (0, pad))) for a in (x, w))

    def body(k, out):
        start = k * size
        part = _qkx(
            lax.dynamic_slice_in_dim(x, start, size, axis=1),
            lax.dynamic_slice_in_dim(w, start, size, axis=1),
            **kw,
        )
        return tuple(
            lax.dynamic_update_slice_in_dim(o, p, start, axis=p.ndim - 1)
            for o, p in zip(out, part, strict=True)
        )

    g_pad = n_chunks * size
    out = (jnp.zeros(g_pad, _F32), jnp.zeros(g_pad, _F32), jnp.zeros((n, g_pad), jnp.int32))
    scale, the_min, levels = lax.fori_loop(0, n_chunks, body, out)
    return scale[:g], the_min[:g], levels[:, :g]


def _qkx(x, w, *, nmax, rmin, rdelta, nstep, use_mad, signed_zero_min):
    x, w = materialize(x, w)
    mx = chain_max(x)
    mn = chain_min(x)
    if signed_zero_min:
        mn = first_zero_signed_min(x, mn)
    mn = jnp.where(mn > 0, _F32(0), mn)
    sum_w = sequential_sum(w, axis=0)
    sum_x = sequential_sum(no_fma(w * x), axis=0)
    mx, mn, sum_w, sum_x = materialize(mx, mn, sum_w, sum_x)
    flat = mx == mn

    def quants(iscale: jax.Array, m: jax.Array) -> jax.Array:
        return jnp.clip(nearest_int(iscale[None] * (x - m[None])), 0, nmax)

    def error(scale: jax.Array, m: jax.Array, lf: jax.Array) -> jax.Array:
        diff = (no_fma(scale[None] * lf) + m[None]) - x
        diff = jnp.abs(diff) if use_mad else diff * diff
        return sum_from_zero(no_fma(w * diff))

    def inv_scale(num: jax.Array, m: jax.Array) -> jax.Array:
        return exact_div(num, jnp.where(flat, _F32(1), mx - m))

    iscale0 = inv_scale(_F32(nmax), mn)
    scale0 = exact_div(_F32(1), iscale0)
    best0 = error(scale0, mn, quants(iscale0, mn).astype(_F32))
    nums = jnp.asarray(_candidate_numerators(nmax, rmin, rdelta, nstep))

    def step(c, carry):
        best, scale, m, isc_w, m_w = carry
        iscale = inv_scale(nums[c], m)
        lf = quants(iscale, m).astype(_F32)
        wl = no_fma(w * lf)
        sum_l = sum_from_zero(wl)
        sum_l2 = sum_from_zero(no_fma(wl * lf))
        sum_xl = sum_from_zero(no_fma(wl * x))
        sum_l, sum_l2, sum_xl = materialize(sum_l, sum_l2, sum_xl)
        det = no_fma(sum_w * sum_l2) - no_fma(sum_l * sum_l)
        ok = det > 0
        det = jnp.where(ok, det, _F32(1))
        this_scale = exact_div(no_fma(sum_w * sum_xl) - no_fma(sum_x * sum_l), det)
        this_min = exact_div(no_fma(sum_l2 * sum_x) - no_fma(sum_l * sum_xl), det)
        pos = this_min > 0
        this_scale = jnp.where(pos, exact_div(sum_xl, jnp.where(ok, sum_l2, _F32(1))), this_scale)
        this_min = jnp.where(pos, _F32(0), this_min)
        this_scale, this_min = materialize(this_scale, this_min)
        (cur,) = materialize(error(this_scale, this_min, lf))
        win = ok & (cur < best)
        return (
            jnp.where(win, cur, best),
            jnp.where(win, this_scale, scale),
            jnp.where(win, this_min, m),
            jnp.where(win, iscale, isc_w),
            jnp.where(win, m, m_w),
        )

    carry = (best0, scale0, mn, iscale0, mn)
    carry = lax.fori_loop(0, nstep + 1, step, carry)
    _, scale, m, isc_w, m_w = carry
    levels = jnp.where(flat[None], 0, quants(isc_w, m_w))
    scale = jnp.where(flat, _F32(0), scale)
    return scale, -m, levels


def make_qp_quants(x: jax.Array, w: jax.Array, *, nmax: int) -> tuple[jax.Array, jax.Array]:
    """ggml's ``make_qp_quants`` on ``[n, B]``: non-negative ``x ≈ scale * L``, ``L <= nmax``.

    Used for the super-block scale of the sub-block scales and mins (imatrix path).
    Nine candidate scales, then five passes of element-wise coordinate descent (a pass that
    changes nothing leaves the state as it was, so running all five is the C's early exit).

    Args:
        x: float32 ``[n, B]`` values (sub-block scales or mins).
        w: float32 ``[n, B]`` weights.
        nmax: largest quant.

    Returns:
        ``(scale [B], L [n, B] int32)``; ``L`` holds what the C's ``uint8_t L[]`` holds.
    """
    x, w = materialize(x, w)  # read many times below: computed once, contiguous
    mx = chain_max(x)
    mx = jnp.where(mx > 0, mx, _F32(0))
    zero = mx < GROUP_MAX_EPS
    (mx_safe,) = materialize(jnp.where(zero, _F32(1), mx))

    def candidate_mse(iscale: jax.Array, clamp: bool) -> jax.Array:
        scale = exact_div(_F32(1), iscale)
        q = nearest_int(iscale[None] * x)
        # First pass stores into uint8 L (no clamp); the candidates use the int, clamped.
        q = jnp.minimum(q, nmax) if clamp else q & 255
        diff = x - no_fma(scale[None] * q.astype(_F32))
        return sum_from_zero(no_fma(no_fma(w * diff) * diff))

    (iscale,) = materialize(exact_div(_F32(nmax), mx_safe))
    (best,) = materialize(candidate_mse(iscale, clamp=False))
    for i in (-4, -3, -2, -1, 1, 2, 3, 4):
        num = np.float32(np.float32(0.1) * np.float32(i)) + np.float32(nmax)
        (iscale_i,) = materialize(exact_div(num, mx_safe))
        mse = candidate_mse(iscale_i, clamp=True)
        better = mse < best
        best, iscale = materialize(
            jnp.where(better, mse, best), jnp.where(better, iscale_i, iscale)
        )

    q = jnp.minimum(nearest_int(iscale[None] * x), nmax)
    qf = q.astype(_F32)
    wx = no_fma(w * x)
    sumlx = sum_from_zero(no_fma(wx * qf))
    suml2 = sum_from_zero(no_fma(no_fma(w * qf) * qf))
    sumlx, suml2 = materialize(sumlx, suml2)
    n = x.shape[0]

    def descend(_, carry):
        levels, sumlx, suml2 = carry
        levels = list(levels)
        for i in range(n):
            wi, xi, li = w[i], x[i], levels[i]
            lif = li.astype(_F32)
            slx = sumlx - no_fma(no_fma(wi * xi) * lif)
            sl2 = suml2 - no_fma(no_fma(wi * lif) * lif)
            ok = (slx > 0) & (sl2 > 0)
            ratio = exact_div(no_fma(xi * sl2), jnp.where(ok, slx, _F32(1)))
            new_l = jnp.minimum(nearest_int(ratio), nmax)
            nlf = new_l.astype(_F32)
            slx = slx + no_fma(no_fma(wi * xi) * nlf)
            sl2 = sl2 + no_fma(no_fma(wi * nlf) * nlf)
            better = no_fma(no_fma(slx * slx) * suml2) > no_fma(no_fma(sumlx * sumlx) * sl2)
            accept = ok & (new_l != li) & better
            levels[i] = jnp.where(accept, new_l & 255, li)
            sumlx = jnp.where(accept, slx, sumlx)
            suml2 = jnp.where(accept, sl2, suml2)
        return jnp.stack(levels), sumlx, suml2

    # One pass per iteration, the n element steps of a pass unrolled.
    levels, sumlx, suml2 = lax.fori_loop(0, 5, descend, (q & 255, sumlx, suml2))
    scale = jnp.where(suml2 > 0, exact_div(sumlx, jnp.where(suml2 > 0, suml2, _F32(1))), 0)
    scale = jnp.where(zero, _F32(0), scale.astype(_F32))
    levels = jnp.where(zero[None], 0, levels)
    return scale, levels
