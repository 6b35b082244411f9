"""ggml's symmetric scale searches, ``make_qx_quants`` and ``make_q3_quants``, vectorised.

Both work on groups laid out element-major: ``x`` is ``[n, G]`` (element ``i`` of group
``g`` at ``x[i, g]``), so each step of ggml's per-element C loop is one vector operation
over all ``G`` groups, and a C loop over the ``n`` elements is ``n`` unrolled adds in
source order (:func:`~jquant._formats.guards.sequential_sum`). Every product that is
added to something passes through :func:`~jquant._formats.guards.no_fma` (ggml's
reference build rounds it before the add), and every division stays a division
(:func:`~jquant._formats.guards.exact_div`). The strict comparisons that pick a scale are
redone with C's subnormal arithmetic when XLA:CPU's flush-to-zero could have changed them
(blocks of magnitude ~1e-5 and below), see :func:`_greater_products`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .guards import exact_div, nearest_int, no_fma, opaque, sequential_sum

__all__ = [
    "GROUP_MAX_EPS",
    "first_absmax",
    "fusion_barrier",
    "make_q3_quants",
    "make_qx_quants",
]

GROUP_MAX_EPS = np.float32(1e-15)
"""ggml's all-zero threshold: a group whose largest magnitude is below it is all zero."""


def fusion_barrier(tree, dep: jax.Array):
    """``tree`` unchanged, but computed once and stored before its consumers run.

    XLA fuses an elementwise producer into each consumer and recomputes it there; packing
    two or four levels per byte then redoes the re-quantization (a division) per byte,
    reading the inputs with a stride. A conditional on a run-time predicate (``dep``'s
    first element is NaN) is a boundary fusion can't cross; both branches return ``tree``
    (one as ``t + 0``: XLA folds a conditional whose branches are the same computation).
    ``lax.optimization_barrier`` doesn't stop this fusion on XLA:CPU.
    """

    def same(t):
        return jax.tree.map(lambda a: a + 0, t)

    return lax.cond(jnp.isnan(dep.reshape(-1)[0]), same, lambda t: t, tree)


def first_absmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(amax, max)`` over axis 0: ggml's ``if (ax > amax) { amax = ax; max = x[i]; }`` loop.

    ``max`` is the signed value of the first element of largest magnitude, +0 when all
    are zero.
    """
    amax = jnp.zeros(x.shape[1:], jnp.float32)
    mx = jnp.zeros(x.shape[1:], jnp.float32)
    for i in range(x.shape[0]):
        ax = jnp.abs(x[i])
        take = ax > amax
        amax = jnp.where(take, ax, amax)
        mx = jnp.where(take, x[i], mx)
    return amax, mx


def _levels(iscale: jax.Array, x: jax.Array, nmax: int) -> jax.Array:
    """``MAX(-nmax, MIN(nmax-1, nearest_int(iscale * x)))`` as int32 ``[n, G]``."""
    return jnp.clip(nearest_int(opaque(iscale)[None] * x), -nmax, nmax - 1)


def _sums(x: jax.Array, w: jax.Array, wx: jax.Array, iscale: jax.Array, nmax: int):
    """``sumlx = Σ w*x[i]*l`` and ``suml2 = Σ w*l*l`` in C order, for one candidate scale."""
    lf = _levels(iscale, x, nmax).astype(jnp.float32)
    sumlx = sequential_sum(no_fma(wx * lf), axis=0)
    suml2 = sequential_sum(no_fma((w * lf) * lf), axis=0)
    return sumlx, suml2


# XLA:CPU runs with subnormals flushed to zero; ggml's C keeps them. Where a product in a
# comparison can fall below 2**-126 the C result is rebuilt at a 2**96 scale (see
# :func:`_gradual_product`).
_SCALE = np.float32(2.0**96)
_SCALED_MIN_NORMAL = np.float32(2.0 ** (-126 + 96))
_SCALED_GRID = np.float32(2.0 ** (149 - 96))  # one over the scaled subnormal spacing
_SPLIT = np.float32(4097.0)  # Veltkamp: 2**12 + 1 splits 24 bits into two halves


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    g = opaque(no_fma(_SPLIT * a))
    hi = g - opaque(g - a)
    return hi, a - hi


def _gradual_mul(a_scaled: jax.Array, b: jax.Array) -> jax.Array:
    """``2**96 * fl(a * b)`` with C's gradual underflow, given ``a_scaled = 2**96 * a``.

    The scaled product is normal; when it lies in the scaled subnormal range it is rounded
    again to the subnormal grid, half to even. A first rounding that lands exactly on a
    half-way point of that grid is resolved by the sign of the exact rounding error
    (Dekker's two-product), so the result is the single rounding the C performs.
    """
    r = no_fma(a_scaled * b)
    ah, al = _split(a_scaled)
    bh, bl = _split(b)
    err = no_fma(ah * bh) - r
    err = err + no_fma(ah * bl)
    err = err + no_fma(al * bh)
    err = err + no_fma(al * bl)
    t = r * _SCALED_GRID
    floor = jnp.floor(t)
    half = (t - floor) == 0.5
    q = jnp.round(t)
    q = jnp.where(half & (err > 0), floor + 1, jnp.where(half & (err < 0), floor, q))
    return jnp.where(jnp.abs(r) < _SCALED_MIN_NORMAL, q / _SCALED_GRID, r)


def _gradual_product(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """``2**96 * fl(fl(a * b) * c)`` with C's gradual underflow (valid for ``|a*b*c| < 8``)."""
    return _gradual_mul(_gradual_mul(a * _SCALE, b), c)


_RISKY = np.float32(2.0**-100)


def _greater_products(a, b, c, d, e, f, gradual: bool) -> tuple[jax.Array, jax.Array]:
    """C's ``a*b*c > d*e*f`` (products left to right) and whether it may be wrong.

    Plain float32 agrees with the C unless a product falls below 2**-126, which XLA:CPU
    flushes to zero; then one side comes out under 2**-100 and the second result flags
    the lane. With ``gradual`` the lanes whose products are small are compared at the
    2**96 scale with C's subnormal rounding (the others can't be subnormal).
    """
    plain_l = (a * b) * c
    plain_r = (d * e) * f
    plain = plain_l > plain_r
    risky = jnp.minimum(jnp.abs(plain_l), jnp.abs(plain_r)) < _RISKY
    if not gradual:
        return plain, risky
    small = (
        (jnp.abs(a * b) < 4)
        & (jnp.abs(d * e) < 4)
        & (jnp.abs(plain_l) < 4)
        & (jnp.abs(plain_r) < 4)
    )
    one = jnp.float32(1.0)
    zero = jnp.float32(0.0)

    def safe(v, fill):
        return jnp.where(small, v, fill)

    left = _gradual_product(safe(a, zero), safe(b, zero), safe(c, one))
    right = _gradual_product(safe(d, zero), safe(e, zero), safe(f, one))
    return jnp.where(small, left > right, plain), risky


def _plain_then_gradual(search, *args, nmax: int):
    """``search(*args, gradual=False)``, redone with ``gradual=True`` if any lane was risky.

    ``search`` returns ``(results, risky)``; the rerun (a whole-batch ``lax.cond``) only
    happens for data whose sums are tiny enough for ggml's arithmetic to go subnormal.
    """
    results, risky = search(*args, nmax=nmax, gradual=False)
    return lax.cond(
        jnp.any(risky),
        lambda args: search(*args, nmax=nmax, gradual=True)[0],
        lambda _: results,
        args,
    )


def make_qx_quants(x: jax.Array, w: jax.Array, nmax: int) -> tuple[jax.Array, jax.Array]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` on ``[n, G]`` groups.

    Args:
      x: float32 ``[n, G]``, element-major groups.
      w: float32 ``[n, G]`` weights: ``qw`` when ggml gets quant weights, else ``x * x``.
      nmax: levels run over ``[-nmax, nmax - 1]``.

    Returns:
      ``(scale, L)``: float32 ``[G]`` and int32 ``[n, G]`` levels in ``[0, 2 * nmax)``
      (``L = l + nmax``; all 0 for an all-zero group, whose scale is 0).
    """
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    best_iscale, scale = _plain_then_gradual(_qx_search, x, w, mx, nmax=nmax)
    levels = _levels(best_iscale, x, nmax) + nmax
    return jnp.where(zero, 0.0, scale), jnp.where(zero[None], 0, levels)


def _qx_search(x, w, mx, nmax: int, gradual: bool):
    wx = w * x
    iscale = exact_div(-nmax, mx)
    sumlx, suml2 = fusion_barrier(_sums(x, w, wx, iscale, nmax), x)
    scale = jnp.where(suml2 != 0, exact_div(sumlx, jnp.where(suml2 != 0, suml2, 1.0)), 0.0)
    # -(nmax + 0.1f*is) for is = -9..9, is != 0, rounded as the C does.
    steps = np.array([i for i in range(-9, 10) if i != 0], np.float32)
    numerators = jnp.asarray(-(np.float32(nmax) + np.float32(0.1) * steps))

    def candidate(k, carry):
        # best = scale * best_sumlx is rebuilt at each comparison, as C's stored product.
        best_iscale, scale, best_sumlx, risky = carry
        iscale = exact_div(numerators[k], mx)
        sumlx, suml2 = fusion_barrier(_sums(x, w, wx, iscale, nmax), x)
        one = jnp.ones_like(sumlx)
        wins, unsure = _greater_products(sumlx, sumlx, one, scale, best_sumlx, suml2, gradual)
        better = (suml2 > 0) & wins
        new_scale = exact_div(sumlx, jnp.where(better, suml2, 1.0))
        return (
            jnp.where(better, iscale, best_iscale),
            jnp.where(better, new_scale, scale),
            jnp.where(better, sumlx, best_sumlx),
            risky | ((suml2 > 0) & unsure),
        )

    carry = (iscale, scale, sumlx, jnp.zeros(sumlx.shape, bool))
    best_iscale, scale, _, risky = lax.fori_loop(0, len(steps), candidate, carry)
    return (best_iscale, scale), risky


def make_q3_quants(x: jax.Array, nmax: int) -> tuple[jax.Array, jax.Array]:
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on ``[n, G]`` groups.

    The coordinate descent visits the elements in order and updates the running sums
    after each accepted change, as the C does. ggml stops a group after a pass that
    changes nothing; such a pass leaves the group as it was, so further passes would
    change nothing either: here all groups run until none changed or five passes ran.

    Returns:
      ``(scale, L)`` as :func:`make_qx_quants`.
    """
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    levels, sumlx, suml2 = _plain_then_gradual(_q3_search, x, mx, nmax=nmax)
    scale = jnp.where(suml2 > 0, exact_div(sumlx, jnp.where(suml2 > 0, suml2, 1.0)), 0.0)
    levels = levels.astype(jnp.int32) + nmax
    return jnp.where(zero, 0.0, scale), jnp.where(zero[None], 0, levels)


def _q3_search(x, mx, nmax: int, gradual: bool):
    n = x.shape[0]
    iscale = exact_div(-nmax, mx)
    w = x * x
    wx = w * x
    levels = _levels(iscale, x, nmax).astype(jnp.float32)
    sumlx = sequential_sum(no_fma(wx * levels), axis=0)
    suml2 = sequential_sum(no_fma((w * levels) * levels), axis=0)

    def step(i, carry):
        # One element of one pass; a loop rather than unrolled code keeps compiles short.
        levels, sumlx, suml2, risky = carry
        xi, wi, wxi, li = (
            lax.dynamic_index_in_dim(a, i, keepdims=False) for a in (x, w, wx, levels)
        )
        slx = sumlx - no_fma(wxi * li)
        sl2 = suml2 - no_fma((wi * li) * li)
        positive = slx > 0
        ratio = exact_div(xi * sl2, jnp.where(positive, slx, 1.0))
        new_l = jnp.clip(nearest_int(ratio), -nmax, nmax - 1).astype(jnp.float32)
        slx = slx + no_fma(wxi * new_l)
        sl2 = sl2 + no_fma((wi * new_l) * new_l)
        asked = positive & (new_l != li) & (sl2 > 0)
        wins, unsure = _greater_products(slx, slx, suml2, sumlx, sumlx, sl2, gradual)
        take = asked & wins
        levels = lax.dynamic_update_index_in_dim(levels, jnp.where(take, new_l, li), i, 0)
        return (
            levels,
            jnp.where(take, slx, sumlx),
            jnp.where(take, sl2, suml2),
            risky | (asked & unsure),
        )

    # ggml stops a group after a pass that changes nothing (the passes after it would
    # change nothing either); the chunk stops when all its groups have.
    def run(state):
        done, before, risky, _ = state
        after = lax.fori_loop(0, n, step, (*before, risky), unroll=4)
        moved = jnp.any(after[0] != before[0])
        return done + 1, after[:3], after[3], moved

    state = (
        jnp.int32(0),
        (levels, sumlx, suml2),
        jnp.zeros(sumlx.shape, bool),
        jnp.bool_(True),
    )
    _, (levels, sumlx, suml2), risky, _ = lax.while_loop(lambda st: (st[0] < 5) & st[3], run, state)
    return (levels, sumlx, suml2), risky
