"""The symmetric K-quants Q6_K and Q3_K, byte-exact with ggml's C quantizer.

A 256-value super-block is 16 groups of 16. Each group gets a scale from ggml's symmetric
search (:func:`~jquant._formats.symmetric_search.make_qx_quants` for Q6_K,
:func:`~jquant._formats.symmetric_search.make_q3_quants` for Q3_K, ``make_qx_quants`` with
weights ``qw * sqrt(sigma2 + x*x)`` for Q3_K with importance weights); the 16 group scales
are quantized against one fp16 super-scale ``d`` (int8 for Q6_K, 6-bit for Q3_K) and the
values are re-quantized with the rounded scales. These are ``quantize_row_q6_K_ref`` /
``quantize_row_q3_K_ref`` (no weights) and ``quantize_row_q6_K_impl`` /
``quantize_row_q3_K_impl`` (with ``quant_weights``), the two paths ``quantize_q6_K`` and
``quantize_q3_K`` dispatch between.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .decode import store_once
from .guards import exact_div, nearest_int, no_fma, sequential_sum
from .symmetric_search import (
    first_absmax,
    fusion_barrier,
    make_q3_quants,
    make_qx_quants,
)

__all__ = [
    "FIELDS_Q3_K",
    "FIELDS_Q6_K",
    "QK_K",
    "dequantize_q3_k",
    "dequantize_q6_k",
    "quantize_q3_k",
    "quantize_q4_0_weighted",
    "quantize_q5_0_weighted",
    "quantize_q6_k",
]

QK_K = 256
_GROUP = 16
_N_GROUPS = QK_K // _GROUP

FIELDS_Q6_K: tuple[tuple[str, np.dtype, tuple[int, ...]], ...] = (
    ("ql", np.dtype("u1"), (128,)),
    ("qh", np.dtype("u1"), (64,)),
    ("scales", np.dtype("i1"), (16,)),
    ("d", np.dtype("<f2"), ()),
)
"""``block_q6_K``: low 4 bits, high 2 bits, int8 group scales, fp16 super-scale (210 bytes)."""

FIELDS_Q3_K: tuple[tuple[str, np.dtype, tuple[int, ...]], ...] = (
    ("hmask", np.dtype("u1"), (32,)),
    ("qs", np.dtype("u1"), (64,)),
    ("scales", np.dtype("u1"), (12,)),
    ("d", np.dtype("<f2"), ()),
)
"""``block_q3_K``: high bits, low 2 bits, 6-bit group scales, fp16 super-scale (110 bytes)."""


def _check(x: jax.Array, qw: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 1 or x.shape[-1] % QK_K:
        raise ValueError(
            f"K-quants need rows whose length is a multiple of {QK_K}; got shape {x.shape}. "
            "Pad the rows or pick a format with 32-value blocks."
        )
    if qw is not None:
        qw = jnp.asarray(qw, jnp.float32)
        if qw.shape != x.shape[-1:]:
            raise ValueError(
                f"qw must hold one importance weight per column, shape {x.shape[-1:]}; "
                f"got {qw.shape}."
            )
    return x, qw


CHUNK_BLOCKS = 1024
"""Super-blocks quantized together (``lax.map`` over chunks): enough to amortize the
per-step dispatch of the search loops, few enough to keep their operands in cache and the
intermediates bounded. 1024 ran faster than 256 or 4096 on a 2-core EPYC."""


def chunked(fn, *arrays: jax.Array | None, chunk: int) -> dict[str, jax.Array]:
    """``fn(*arrays)`` on ``[b, ...]`` arrays, ``chunk`` rows at a time (zero-padded)."""
    b = arrays[0].shape[0]
    if b <= chunk:
        return fn(*arrays)
    n = -(-b // chunk)

    def split(a):
        if a is None:
            return None
        a = jnp.pad(a, [(0, n * chunk - b)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape(n, chunk, *a.shape[1:])

    out = jax.lax.map(lambda args: fn(*args), tuple(split(a) for a in arrays))
    return {k: v.reshape(n * chunk, *v.shape[2:])[:b] for k, v in out.items()}


def _groups(xb: jax.Array) -> jax.Array:
    """``[b, 256]`` super-blocks to element-major groups ``[16, b * 16]``."""
    return xb.reshape(-1, _GROUP).T


def _rows_of_blocks(x: jax.Array, qw: jax.Array | None, block: int):
    """``x`` ``[..., n]`` as ``[b, block]`` blocks and ``qw`` broadcast to match (or None)."""
    xb = x.reshape(-1, block)
    if qw is None:
        return xb, None
    return xb, jnp.broadcast_to(qw, x.shape).reshape(-1, block)


def _requantize(
    xg: jax.Array, levels: jax.Array, d: jax.Array, sc: jax.Array, nmax: int
) -> jax.Array:
    """``L = clamp(nearest_int(x / (d * sc)))`` where ``d * sc != 0``; else the search's L.

    ``xg``/``levels``: ``[16, G]``; ``d``: fp16 ``[B]``; ``sc``: int ``[B, 16]``.
    """
    dd = (d.astype(jnp.float32)[:, None] * sc.astype(jnp.float32)).reshape(-1)
    live = dd != 0
    q = nearest_int(exact_div(xg, jnp.where(live, dd, 1.0)[None]))
    q = jnp.clip(q, -nmax, nmax - 1) + nmax
    return jnp.where(live[None], q, levels)


def _blocks_of(levels: jax.Array, batch: tuple[int, ...]) -> jax.Array:
    """Element-major ``[16, G]`` levels back to ``[..., n_blocks, 256]`` uint8."""
    return levels.T.reshape(*batch, QK_K).astype(jnp.uint8)


def quantize_q6_k(x: jax.Array, qw: jax.Array | None = None) -> dict[str, jax.Array]:
    """Q6_K blocks of float32 rows ``[..., n]``, byte-identical to ``ggml_quantize_chunk``.

    Args:
      x: float32 ``[..., n]`` with ``n`` a multiple of 256.
      qw: optional float32 ``[n]`` importance weights, one per column (llama.cpp's
        ``quant_weights``).

    Returns:
      The fields of :data:`FIELDS_Q6_K`, each ``[..., n // 256, *shape]``.
    """
    x, qw = _check(x, qw)
    batch = (*x.shape[:-1], x.shape[-1] // QK_K)
    out = chunked(_q6_k_blocks, *_rows_of_blocks(x, qw, QK_K), chunk=CHUNK_BLOCKS)
    return {name: out[name].reshape(*batch, *shape) for name, _, shape in FIELDS_Q6_K}


def _q6_k_blocks(xb: jax.Array, wb: jax.Array | None) -> dict[str, jax.Array]:
    xg = _groups(xb)
    w = xg * xg if wb is None else _groups(wb)
    scales, levels = make_qx_quants(xg, w, 32)
    scales = scales.reshape(-1, _N_GROUPS)
    max_abs, max_scale = first_absmax(scales.T)
    zero = max_abs < np.float32(1e-15)
    iscale = exact_div(-128.0, jnp.where(zero, 1.0, max_scale))
    d = exact_div(1.0, iscale).astype(jnp.float16)
    sc = jnp.minimum(127, nearest_int(iscale[:, None] * scales))
    sc = jnp.where(zero[:, None], 0, sc)
    d = jnp.where(zero, jnp.float16(0), d)
    q = _blocks_of(_requantize(xg, levels, d, sc, 32), (-1,))
    q = fusion_barrier(jnp.where(zero[:, None], jnp.uint8(0), q), xb)
    # ql byte p of each 128-half: low nibble value p, high nibble value p + 64;
    # qh byte l: bits 2k..2k+1 are the top two bits of value l + 32k.
    q = q.reshape(-1, 2, 4, 32)
    lo = q & 0x0F
    ql = jnp.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], -1)
    hi = q >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return {
        "ql": ql.reshape(-1, 128),
        "qh": qh.reshape(-1, 64),
        "scales": sc.astype(jnp.int8),
        "d": d,
    }


def dequantize_q6_k(fields: dict[str, jax.Array]) -> jax.Array:
    """float32 ``[..., n_blocks, 256]`` from Q6_K fields, as ``gguf.quants.dequantize``.

    Two passes: the bits are unpacked in int32 (XLA:CPU vectorises uint8 shifts of a
    broadcast shift amount poorly) into stored int8 quants, then scaled. One fused pass
    is about 4x slower on CPU (the unpacking's odd layout keeps the float multiply from
    vectorising); the 16 group scales are stored once, not again per value.
    """
    ql, qh = fields["ql"], fields["qh"]
    batch = ql.shape[:-1]
    # ql: [half of the block, shift 0/4, 32-byte half, 32]; qh: [half, shift 0/2/4/6, 32]
    ql = ql.astype(jnp.int32).reshape(*batch, 2, 1, 2, 32)
    lo = (ql >> _int_shifts((0, 4), ql.ndim, 2)) & 0x0F
    qh = qh.astype(jnp.int32).reshape(*batch, 2, 1, 32)
    hi = (qh >> _int_shifts((0, 2, 4, 6), qh.ndim, 1)) & 0x03
    q = ((lo.reshape(*batch, 2, 4, 32) | (hi << 4)) - 32).astype(jnp.int8)
    d = fields["d"].astype(jnp.float32)[..., None] * fields["scales"].astype(jnp.float32)
    d, q = store_once(d, q)
    y = d.reshape(*batch, 2, 4, 2, 1) * q.astype(jnp.float32).reshape(*batch, 2, 4, 2, _GROUP)
    return y.reshape(*batch, QK_K)


def _int_shifts(shifts: tuple[int, ...], ndim: int, trailing: int) -> jax.Array:
    """int32 ``shifts`` on axis ``-1 - trailing`` of an ``ndim``-axis array, size 1 elsewhere."""
    shape = (1,) * (ndim - 1 - trailing) + (len(shifts),) + (1,) * trailing
    return jnp.array(shifts, jnp.int32).reshape(shape)


def _planes(a: jax.Array, shifts: tuple[int, ...]) -> jax.Array:
    """``a >> s`` for each shift ``s``: ``[..., m]`` bytes to ``[..., len(shifts), m]``."""
    s = jnp.array(shifts, jnp.uint8).reshape((1,) * (a.ndim - 1) + (len(shifts), 1))
    return a[..., None, :] >> s


def _pack_q3_scales(ls: jax.Array) -> jax.Array:
    """6-bit ``ls`` ``[B, 16]`` (0..63) into ggml's 12 bytes: low nibbles, then top bits."""
    low = ls & 0xF
    top = ls >> 4
    nibbles = low[:, :8] | (low[:, 8:] << 4)
    tops = top[:, 0:4] | (top[:, 4:8] << 2) | (top[:, 8:12] << 4) | (top[:, 12:16] << 6)
    return jnp.concatenate([nibbles, tops], -1).astype(jnp.uint8)


def quantize_q3_k(x: jax.Array, qw: jax.Array | None = None) -> dict[str, jax.Array]:
    """Q3_K blocks of float32 rows ``[..., n]``, byte-identical to ``ggml_quantize_chunk``.

    Args:
      x: float32 ``[..., n]`` with ``n`` a multiple of 256.
      qw: optional float32 ``[n]`` importance weights, one per column.

    Returns:
      The fields of :data:`FIELDS_Q3_K`, each ``[..., n // 256, *shape]``.
    """
    x, qw = _check(x, qw)
    batch = (*x.shape[:-1], x.shape[-1] // QK_K)
    out = chunked(_q3_k_blocks, *_rows_of_blocks(x, qw, QK_K), chunk=CHUNK_BLOCKS)
    return {name: out[name].reshape(*batch, *shape) for name, _, shape in FIELDS_Q3_K}


def _q3_k_blocks(xb: jax.Array, qwb: jax.Array | None) -> dict[str, jax.Array]:
    xg = _groups(xb)
    if qwb is None:
        scales, levels = make_q3_quants(xg, 4)
        scales = scales.reshape(-1, _N_GROUPS)
        _, max_scale = first_absmax(scales.T)
        live = max_scale != 0
        iscale = exact_div(-32.0, jnp.where(live, max_scale, 1.0))
        ls = jnp.clip(nearest_int(iscale[:, None] * scales), -32, 31) + 32
        ls = jnp.where(live[:, None], ls, 0)
        d = jnp.where(live, exact_div(1.0, iscale), 0.0).astype(jnp.float16)
    else:
        xx = no_fma(xb * xb)
        sigma2 = exact_div(2 * sequential_sum(xx, axis=-1), float(QK_K))
        wg = _groups(qwb * jnp.sqrt(sigma2[:, None] + xx))
        scales, levels = make_qx_quants(xg, wg, 4)
        sw = sequential_sum(wg, axis=0)
        d_block, ls = make_qx_quants(
            scales.reshape(-1, _N_GROUPS).T, sw.reshape(-1, _N_GROUPS).T, 32
        )
        ls = ls.T
        d = d_block.astype(jnp.float16)
    q = fusion_barrier(_blocks_of(_requantize(xg, levels, d, ls - 32, 4), (-1,)), xb)
    # hmask byte m, bit k: the high bit of value 32k + m; qs byte 32h + l, bits 2s..2s+1:
    # the low two bits of value 128h + 32s + l.
    hbits = (q >> 2).reshape(-1, 8, 32)
    hmask = _or_planes(hbits << jnp.arange(8, dtype=jnp.uint8).reshape(1, 8, 1))
    low = (q & 3).reshape(-1, 2, 4, 32)
    qs = low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)
    return {
        "hmask": hmask,
        "qs": qs.reshape(-1, 64),
        "scales": _pack_q3_scales(ls),
        "d": d,
    }


def _or_planes(bits: jax.Array) -> jax.Array:
    """Bitwise or over axis -2 (the bit planes are disjoint, so any order is the same)."""
    out = bits[..., 0, :]
    for k in range(1, bits.shape[-2]):
        out = out | bits[..., k, :]
    return out


def dequantize_q3_k(fields: dict[str, jax.Array]) -> jax.Array:
    """float32 ``[..., n_blocks, 256]`` from Q3_K fields, as ``gguf.quants.dequantize``."""
    hmask, qs, scales = fields["hmask"], fields["qs"], fields["scales"]
    batch = qs.shape[:-1]
    lo = _planes(scales[..., :8], (0, 4)).reshape(*batch, 16) & 0x0F
    hi = _planes(scales[..., 8:], (0, 2, 4, 6)).reshape(*batch, 16) & 0x03
    sc = ((lo | (hi << 4)).astype(jnp.int32) - 32).astype(jnp.float32)
    dl = fields["d"].astype(jnp.float32)[..., None] * sc
    # the quants unpacked in int32 (uint8 shifts by a broadcast amount vectorise poorly)
    qs = qs.astype(jnp.int32).reshape(*batch, 2, 1, 32)
    ql = ((qs >> _int_shifts((0, 2, 4, 6), qs.ndim, 1)) & 3).reshape(*batch, 16, 16)
    hm = hmask.astype(jnp.int32)[..., None, :]
    qh = (((hm >> _int_shifts(tuple(range(8)), hm.ndim, 1)) & 1) ^ 1).reshape(*batch, 16, 16)
    q = (ql - (qh << 2)).astype(jnp.int8)
    dl, q = store_once(dl, q)  # then scaled in a second, simple pass
    return (dl[..., None] * q.astype(jnp.float32)).reshape(*batch, QK_K)


def _weighted_legacy(x: jax.Array, qw: jax.Array, nmax: int):
    """``quantize_row_q{4,5}_0_impl`` with quant weights: ``(d fp16 [...], L [..., 32])``.

    ``sigma2`` is the mean of ``x*x`` over the whole row, summed in column order.
    """
    x = jnp.asarray(x, jnp.float32)
    qw = jnp.asarray(qw, jnp.float32)
    n = x.shape[-1] if x.ndim else 0
    if x.ndim < 1 or n % 32:
        raise ValueError(
            f"Q4_0/Q5_0 need rows whose length is a multiple of 32; got shape {x.shape}."
        )
    if qw.shape != (n,):
        raise ValueError(
            f"qw must hold one importance weight per column, shape {(n,)}; got {qw.shape}."
        )
    batch = (*x.shape[:-1], n // 32)
    rows = x.reshape(-1, n)
    sigma2 = exact_div(sequential_sum(no_fma(rows * rows), axis=-1), float(n))
    sigma2 = jnp.broadcast_to(sigma2[:, None], (rows.shape[0], n // 32)).reshape(-1)
    xb, qwb = _rows_of_blocks(x, qw, 32)

    def blocks(xb, qwb, sigma2):
        w = qwb * jnp.sqrt(sigma2[:, None] + no_fma(xb * xb))
        d, levels = make_qx_quants(xb.T, w.T, nmax)
        return {"d": d.astype(jnp.float16), "levels": fusion_barrier(levels.T, xb)}

    out = chunked(blocks, xb, qwb, sigma2, chunk=CHUNK_BLOCKS * 8)
    return out["d"].reshape(batch), out["levels"].reshape(*batch, 32)


def quantize_q4_0_weighted(x: jax.Array, qw: jax.Array) -> dict[str, jax.Array]:
    """Q4_0 with importance weights (``quantize_row_q4_0_impl``), byte-identical to ggml.

    Without weights ggml takes the plain ``quantize_row_q4_0_ref`` path, which jquant's
    legacy kernel already matches.

    Args:
      x: float32 ``[..., n]`` with ``n`` a multiple of 32.
      qw: float32 ``[n]`` importance weights, one per column.

    Returns:
      ``{"d": fp16 [..., n // 32], "qs": uint8 [..., n // 32, 16]}``; element ``j`` in the
      low nibble of byte ``j``, element ``j + 16`` in its high nibble.
    """
    d, levels = _weighted_legacy(x, qw, 8)
    q = levels.astype(jnp.uint8)
    return {"d": d, "qs": q[..., :16] | (q[..., 16:] << 4)}


def quantize_q5_0_weighted(x: jax.Array, qw: jax.Array) -> dict[str, jax.Array]:
    """Q5_0 with importance weights (``quantize_row_q5_0_impl``), byte-identical to ggml.

    Args:
      x: float32 ``[..., n]`` with ``n`` a multiple of 32.
      qw: float32 ``[n]`` importance weights, one per column.

    Returns:
      ``{"d": fp16 [..., n // 32], "qh": uint32 [..., n // 32], "qs": uint8
      [..., n // 32, 16]}``; bit ``j`` of ``qh`` is bit 4 of element ``j``.
    """
    d, levels = _weighted_legacy(x, qw, 16)
    q = levels.astype(jnp.uint32)
    shifts = jnp.arange(32, dtype=jnp.uint32).reshape((1,) * (q.ndim - 1) + (32,))
    qh = jnp.sum(((q >> 4) & 1) << shifts, axis=-1, dtype=jnp.uint32)
    q8 = (q & 0x0F).astype(jnp.uint8)
    return {"d": d, "qh": qh, "qs": q8[..., :16] | (q8[..., 16:] << 4)}
