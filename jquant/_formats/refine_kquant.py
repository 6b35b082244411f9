"""Group-wise refinement of the affine K-quants (Q2_K, Q4_K, Q5_K) for ``optimize=True``.

A K-quant super-block stores, per group, integer sub-scales ``sc`` and mins ``m``
(6-bit in Q4_K/Q5_K, 4-bit in Q2_K) under fp16 super-scales ``d`` and ``dmin``:
``x ≈ d * sc * q - dmin * m``. ggml picks ``sc`` and ``m`` by rounding the groups' float
scales onto the super-scale grid, and the levels ``q`` from those. With ``d`` and
``dmin`` fixed the groups are independent, so each group here tries the neighbouring
integer ``(sc, m)`` pairs, re-quantises its levels for each and keeps the pair with the
lowest (weighted) squared error; the caller then re-fits ``d`` and ``dmin`` by least
squares and repeats. A super-block takes the new bytes only where its error drops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import kquant_affine

__all__ = ["AFFINE_K2", "AFFINE_K4", "AFFINE_K5", "SYMMETRIC_K6", "AffineK", "refine_groups"]

Fields = dict[str, jax.Array]


class AffineK(NamedTuple):
    """How a K-quant stores its groups: ``x = d * sc * q - dmin * m`` (``m`` 0: symmetric)."""

    group: int  # values per group
    smax: int  # largest integer sub-scale / min
    nmax: int  # largest level
    unpack: Callable[[Fields], tuple[jax.Array, jax.Array]]  # (sc, m) [..., nb, G]
    pack: Callable[[jax.Array, jax.Array, jax.Array], Fields]  # (sc, m, q [..., nb, G, g])
    smin: int = 0  # smallest sub-scale
    qmin: int = 0  # smallest level
    affine: bool = True


def _pack_k_nibbles(nmax: int):
    def pack(sc, m, q):
        lead = q.shape[:-2]
        out = {"scales": kquant_affine.pack_scale_min_k4(sc.astype(jnp.uint8), m.astype(jnp.uint8))}
        q = q.astype(jnp.uint8)
        if nmax == 31:
            shifts = jnp.arange(8, dtype=jnp.uint8).reshape((1,) * len(lead) + (8, 1))
            out["qh"] = jnp.bitwise_or.reduce((q >> 4) << shifts, axis=-2)
            q = q & 0xF
        q = q.reshape(*lead, 4, 2, 32)
        out["qs"] = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*lead, 128)
        return out

    return pack


def _unpack_k_6bit(fields):
    sc, m = kquant_affine.unpack_scale_min_k4(fields["scales"])
    return sc.astype(jnp.int32), m.astype(jnp.int32)


def _pack_k_crumbs(sc, m, q):
    lead = q.shape[:-2]
    q = q.astype(jnp.uint8).reshape(*lead, 2, 4, 32)
    shifts = jnp.asarray([0, 2, 4, 6], jnp.uint8).reshape((1,) * len(lead) + (1, 4, 1))
    qs = jnp.bitwise_or.reduce(q << shifts, axis=-2).reshape(*lead, 64)
    return {"scales": sc.astype(jnp.uint8) | (m.astype(jnp.uint8) << 4), "qs": qs}


def _unpack_k_4bit(fields):
    s = fields["scales"].astype(jnp.int32)
    return s & 0xF, s >> 4


def _unpack_k6(fields):
    sc = fields["scales"].astype(jnp.int32)
    return sc, jnp.zeros_like(sc)


def _pack_k6(sc, m, q):
    lead = q.shape[:-2]
    q = (q + 32).astype(jnp.uint8).reshape(*lead, 2, 4, 32)
    lo, hi = q & 0x0F, q >> 4
    ql = jnp.concatenate(
        [lo[..., 0, :] | (lo[..., 2, :] << 4), lo[..., 1, :] | (lo[..., 3, :] << 4)], -1
    )
    qh = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
    return {
        "ql": ql.reshape(*lead, 128),
        "qh": qh.reshape(*lead, 64),
        "scales": sc.astype(jnp.int8),
    }


SYMMETRIC_K6 = AffineK(16, 127, 31, _unpack_k6, _pack_k6, smin=-128, qmin=-32, affine=False)
"""6-bit signed levels (``ql``/``qh``), int8 sub-scales, groups of 16, no mins."""

AFFINE_K2 = AffineK(16, 15, 3, _unpack_k_4bit, _pack_k_crumbs)
"""2-bit levels, 4-bit sub-scales and mins in one byte, groups of 16."""
AFFINE_K4 = AffineK(32, 63, 15, _unpack_k_6bit, _pack_k_nibbles(15))
"""4-bit levels, 6-bit sub-scales and mins in 12 bytes, groups of 32."""
AFFINE_K5 = AffineK(32, 63, 31, _unpack_k_6bit, _pack_k_nibbles(31))
"""5-bit levels (high bits in ``qh``), 6-bit sub-scales and mins, groups of 32."""

_OFFSETS = np.asarray([(a, b) for a in range(-2, 3) for b in range(-2, 3)], np.int32)
_OFFSETS_SYMMETRIC = np.asarray([(a, 0) for a in range(-4, 5)], np.int32)


def refine_groups(fmt: AffineK, xb: jax.Array, w: jax.Array, fields: Fields) -> Fields:
    """Per group, the best ``(sc, m)`` within ±2 of the current ones and its levels.

    Args:
        fmt: the format's :class:`AffineK`.
        xb: blocks ``[..., nb, 256]``; ``w`` their weights (same shape).
        fields: the current fields (their ``d`` and ``dmin`` are kept).

    Returns:
        Candidate fields (the caller keeps them per block where the error drops).
    """
    g = fmt.group
    xg = xb.reshape(*xb.shape[:-1], -1, g)
    wg = w.reshape(xg.shape)
    d = fields["d"].astype(jnp.float32)[..., None]
    dmin = fields["dmin"].astype(jnp.float32)[..., None] if fmt.affine else jnp.zeros_like(d)
    sc0, m0 = fmt.unpack(fields)

    def levels(off):
        sc = jnp.clip(sc0 + off[0], fmt.smin, fmt.smax)
        m = jnp.clip(m0 + off[1], 0, fmt.smax)
        dg = (d * sc.astype(jnp.float32))[..., None]
        dm = (dmin * m.astype(jnp.float32))[..., None]
        ok = dg != 0
        q = jnp.clip(jnp.round((xg + dm) / jnp.where(ok, dg, 1.0)), fmt.qmin, fmt.nmax)
        q = jnp.where(ok, q, 0.0)
        err = jnp.sum(wg * jnp.square(xg - (dg * q - dm)), axis=-1)
        return sc, m, q, err

    def step(best, off):
        cand = levels(off)
        take = cand[3] < best[3]
        return tuple(
            jnp.where(take.reshape(take.shape + (1,) * (b.ndim - take.ndim)), c, b)
            for b, c in zip(best, cand, strict=True)
        ), None

    offsets = _OFFSETS if fmt.affine else _OFFSETS_SYMMETRIC
    best, _ = jax.lax.scan(step, levels(jnp.zeros(2, jnp.int32)), jnp.asarray(offsets))
    sc, m, q, _ = best
    return {**fields, **fmt.pack(sc, m, q.astype(jnp.int32))}
