"""ggml's symmetric scale searches, ``make_qx_quants`` and ``make_q3_quants``, vectorised.

Both work on groups laid out element-major: ``x`` is ``[n, G]`` (element ``i`` of group
``g`` at ``x[i, g]``), so each step of ggml's per-element C loop is one vector operation
over all ``G`` groups, and a C loop over the ``n`` elements is ``n`` unrolled adds in
source order (:func:`~jquant._formats.guards.sequential_sum`). Every product that is
added to something passes through :func:`~jquant._formats.guards.no_fma` (ggml's
reference build rounds it before the add), and every division stays a division
(:func:`~jquant._formats.guards.exact_div`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .guards import exact_div, nearest_int, no_fma, opaque, sequential_sum

__all__ = ["GROUP_MAX_EPS", "first_absmax", "make_q3_quants", "make_qx_quants"]

GROUP_MAX_EPS = np.float32(1e-15)
"""ggml's all-zero threshold: a group whose largest magnitude is below it is all zero."""


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
    wx = w * x
    iscale = exact_div(jnp.float32(-nmax), mx)
    sumlx, suml2 = _sums(x, w, wx, iscale, nmax)
    scale = jnp.where(suml2 != 0, exact_div(sumlx, jnp.where(suml2 != 0, suml2, 1.0)), 0.0)
    best = scale * sumlx
    # -(nmax + 0.1f*is) for is = -9..9, is != 0, rounded as the C does.
    steps = np.array([i for i in range(-9, 10) if i != 0], np.float32)
    numerators = jnp.asarray(-(np.float32(nmax) + np.float32(0.1) * steps))

    def candidate(k, carry):
        best_iscale, scale, best = carry
        iscale = exact_div(numerators[k], mx)
        sumlx, suml2 = _sums(x, w, wx, iscale, nmax)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = exact_div(sumlx, jnp.where(better, suml2, 1.0))
        return (
            jnp.where(better, iscale, best_iscale),
            jnp.where(better, new_scale, scale),
            jnp.where(better, new_scale * sumlx, best),
        )

    best_iscale, scale, _ = lax.fori_loop(0, len(steps), candidate, (iscale, scale, best))
    levels = _levels(best_iscale, x, nmax) + nmax
    return jnp.where(zero, 0.0, scale), jnp.where(zero[None], 0, levels)


def make_q3_quants(x: jax.Array, nmax: int) -> tuple[jax.Array, jax.Array]:
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on ``[n, G]`` groups.

    The coordinate descent visits the elements in order and updates the running sums
    after each accepted change, as the C does. ggml stops after a pass that changes
    nothing; such a pass leaves the state as it was, so the passes after it would
    change nothing either, and running all five gives the same result.

    Returns:
      ``(scale, L)`` as :func:`make_qx_quants`.
    """
    n = x.shape[0]
    amax, mx = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    iscale = exact_div(jnp.float32(-nmax), mx)
    w = x * x
    wx = w * x
    levels = _levels(iscale, x, nmax).astype(jnp.float32)
    sumlx = sequential_sum(no_fma(wx * levels), axis=0)
    suml2 = sequential_sum(no_fma((w * levels) * levels), axis=0)

    def one_pass(_, carry):
        levels, sumlx, suml2 = carry
        rows = [levels[i] for i in range(n)]
        for i in range(n):
            li = rows[i]
            slx = sumlx - no_fma(wx[i] * li)
            sl2 = suml2 - no_fma((w[i] * li) * li)
            positive = slx > 0
            ratio = exact_div(x[i] * sl2, jnp.where(positive, slx, 1.0))
            new_l = jnp.clip(nearest_int(ratio), -nmax, nmax - 1).astype(jnp.float32)
            slx = slx + no_fma(wx[i] * new_l)
            sl2 = sl2 + no_fma((w[i] * new_l) * new_l)
            take = (
                positive & (new_l != li) & (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            )
            rows[i] = jnp.where(take, new_l, li)
            sumlx = jnp.where(take, slx, sumlx)
            suml2 = jnp.where(take, sl2, suml2)
        return jnp.stack(rows), sumlx, suml2

    levels, sumlx, suml2 = lax.fori_loop(0, 5, one_pass, (levels, sumlx, suml2))
    scale = jnp.where(suml2 > 0, exact_div(sumlx, jnp.where(suml2 > 0, suml2, 1.0)), 0.0)
    levels = levels.astype(jnp.int32) + nmax
    return jnp.where(zero, 0.0, scale), jnp.where(zero[None], 0, levels)
