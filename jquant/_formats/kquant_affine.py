"""Q4_K, Q5_K and Q2_K (and the importance-weighted Q4_1/Q5_1), byte-exact with ggml.

ggml's ``ggml_quantize_chunk`` writes these through ``quantize_row_qX_K_ref`` without
importance weights and ``quantize_row_qX_K_impl`` with them; each is ported here in C
evaluation order (see :mod:`.kquant_search` for the searches and :mod:`.guards` for the
float rules). Kernels take float32 rows ``[..., n]`` (``n`` a multiple of 256, or of 32
for the legacy formats) and return the stored fields ``[..., n // block, *shape]`` in the
order of ``FIELDS_*`` (ggml's byte order, little-endian).

Known difference: XLA:CPU flushes subnormal floats to zero, ggml's C keeps them. Only
weighted sums below 2**-126 are affected, i.e. importance weights ~1e-13 on values
~1e-7 (ggml-vectors.npz's "tiny" case with its own x**2 as imatrix: 4 of 64 Q5_K and 10 of
64 Q2_K blocks differ); realistic imatrix values are many orders of magnitude larger.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .decode import store_once
from .guards import exact_div, nearest_int, no_fma
from .kquant_search import (
    long_sum_from_zero,
    make_qkx_quants,
    make_qp_quants,
    materialize,
    sum_from_zero,
)

__all__ = [
    "FIELDS_Q2_K",
    "FIELDS_Q4_1",
    "FIELDS_Q4_K",
    "FIELDS_Q5_1",
    "FIELDS_Q5_K",
    "dequantize_q2_k",
    "dequantize_q4_k",
    "dequantize_q5_k",
    "pack_scale_min_k4",
    "quantize_q2_k",
    "quantize_q4_1_weighted",
    "quantize_q4_k",
    "quantize_q5_1_weighted",
    "quantize_q5_k",
    "unpack_scale_min_k4",
]

QK_K = 256
_F16 = np.dtype("<f2")
_U8 = np.dtype("u1")
_U32 = np.dtype("<u4")
_F32 = jnp.float32

FIELDS_Q4_K = (("d", _F16, ()), ("dmin", _F16, ()), ("scales", _U8, (12,)), ("qs", _U8, (128,)))
FIELDS_Q5_K = (
    ("d", _F16, ()),
    ("dmin", _F16, ()),
    ("scales", _U8, (12,)),
    ("qh", _U8, (32,)),
    ("qs", _U8, (128,)),
)
FIELDS_Q2_K = (("scales", _U8, (16,)), ("qs", _U8, (64,)), ("d", _F16, ()), ("dmin", _F16, ()))
FIELDS_Q4_1 = (("d", _F16, ()), ("m", _F16, ()), ("qs", _U8, (16,)))
FIELDS_Q5_1 = (("d", _F16, ()), ("m", _F16, ()), ("qh", _U32, ()), ("qs", _U8, (16,)))


# ---------------------------------------------------------------- layout helpers


def _blocks(x: jax.Array, block: int) -> tuple[jax.Array, tuple[int, ...]]:
    """float32 ``[..., n]`` -> ``[n_blocks_total, block]`` and the output lead shape."""
    x = jnp.asarray(x, _F32)
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"row length {n} (shape {x.shape}) is not a multiple of {block}")
    return x.reshape(-1, block), (*x.shape[:-1], n // block)


def _row_weights(qw: jax.Array, x_shape: tuple[int, ...], block: int) -> jax.Array:
    """Per-column importance ``[n]`` broadcast to every row, as ``[n_blocks_total, block]``."""
    qw = jnp.asarray(qw, _F32)
    if qw.shape != x_shape[-1:]:
        raise ValueError(f"qw has shape {qw.shape}; expected ({x_shape[-1]},), one per column")
    return jnp.broadcast_to(qw, x_shape).reshape(-1, block)


def _groups(xb: jax.Array, size: int) -> jax.Array:
    """``[B, 256]`` -> element-major ``[size, B * 256 // size]``."""
    return xb.reshape(-1, size).T


def _ungroup(lt: jax.Array, n_blocks: int) -> jax.Array:
    """Inverse of :func:`_groups` for the quants: ``[B, 256]``."""
    return materialize(lt.astype(jnp.uint8))[0].T.reshape(n_blocks, QK_K)


def _shifts(values: list[int], dtype, ndim: int, trailing: int = 1) -> jax.Array:
    """``values`` shaped ``(1, ..., len(values), 1 * trailing)`` with ``ndim`` axes."""
    shape = (1,) * (ndim - 1 - trailing) + (len(values),) + (1,) * trailing
    return jnp.array(values, dtype).reshape(shape)


def _positive_max(v: jax.Array) -> jax.Array:
    """C's ``float m = 0; if (v > m) m = v;`` over the last axis."""
    m = jnp.max(v, axis=-1)
    return jnp.where(m > 0, m, _F32(0))


def _u8(q: jax.Array) -> jax.Array:
    """C's store of an int into ``uint8_t``: modulo 256."""
    return (q & 255).astype(jnp.uint8)


def pack_scale_min_k4(ls: jax.Array, lm: jax.Array) -> jax.Array:
    """The 12-byte 6-bit packing of quantize_row_q4_K (``[..., 8]`` uint8 each)."""
    lo_s, hi_s = ls[..., :4], ls[..., 4:]
    lo_m, hi_m = lm[..., :4], lm[..., 4:]
    return jnp.concatenate(
        [
            lo_s | ((hi_s >> 4) << 6),
            lo_m | ((hi_m >> 4) << 6),
            (hi_s & 0xF) | ((hi_m & 0xF) << 4),
        ],
        axis=-1,
    )


def unpack_scale_min_k4(q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """ggml's ``get_scale_min_k4`` for j = 0..7: ``(sc, m)`` uint8 ``[..., 8]``."""
    a, b, c = q[..., 0:4], q[..., 4:8], q[..., 8:12]
    sc = jnp.concatenate([a & 63, (c & 0xF) | ((a >> 6) << 4)], axis=-1)
    m = jnp.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, m


def _requantize(xt, levels, d, dmin, sc, m, nmax):
    """Re-quantise each group with the fp16-rounded scales; groups with ``d*sc == 0`` keep
    the search's quants (the C's ``if (!d) continue;``)."""
    dg = (d.astype(_F32)[:, None] * sc.astype(_F32)).reshape(-1)
    dm = no_fma((dmin.astype(_F32)[:, None] * m.astype(_F32)).reshape(-1))
    dg, dm = materialize(dg, dm)
    q = nearest_int(exact_div(xt + dm[None], jnp.where(dg == 0, _F32(1), dg)[None]))
    return jnp.where(dg[None] != 0, jnp.clip(q, 0, nmax), levels)


def _sum_x2(xb: jax.Array) -> jax.Array:
    """``float s = 0; for (l < 256) s += x[l]*x[l];`` per super-block ``[B]``."""
    xt = xb.T
    return long_sum_from_zero(no_fma(xt * xt))


def _imatrix_weights(xt, qwt, sigma2_g):
    """``qw[l] * sqrtf(sigma2 + x*x)`` on ``[n, G]`` groups."""
    (sigma2_g,) = materialize(sigma2_g)
    return materialize(no_fma(qwt * jnp.sqrt(sigma2_g[None] + no_fma(xt * xt))))[0]


# ---------------------------------------------------------------- Q4_K / Q5_K


def _q45_k(x, qw, nmax, rmin, nstep):
    xb, lead = _blocks(x, QK_K)
    nb = xb.shape[0]
    (xt,) = materialize(_groups(xb, 32))
    if qw is None:
        (av_x,) = materialize(jnp.sqrt(sum_from_zero(no_fma(xt * xt)) / 32))
        (w,) = materialize(av_x[None] + jnp.abs(xt))
        scale, the_min, levels = make_qkx_quants(
            xt, w, nmax=nmax, rmin=rmin, rdelta=0.1, nstep=nstep, use_mad=False
        )
        scales, mins = scale.reshape(nb, 8), the_min.reshape(nb, 8)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        inv_scale = jnp.where(max_scale > 0, exact_div(_F32(63), max_scale), _F32(0))
        inv_min = jnp.where(max_min > 0, exact_div(_F32(63), max_min), _F32(0))
        ls = jnp.minimum(_u8(nearest_int(inv_scale[:, None] * scales)), 63)
        lm = jnp.minimum(_u8(nearest_int(inv_min[:, None] * mins)), 63)
        d = exact_div(max_scale, _F32(63)).astype(jnp.float16)
        dmin = exact_div(max_min, _F32(63)).astype(jnp.float16)
    else:
        qwt = _groups(_row_weights(qw, x.shape, QK_K), 32)
        sigma2 = (2 * _sum_x2(xb)) / QK_K
        w = _imatrix_weights(xt, qwt, jnp.repeat(sigma2, 8))
        sw = sum_from_zero(w).reshape(nb, 8).T
        scale, the_min, levels = make_qkx_quants(
            xt, w, nmax=nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False
        )
        d_block, ls = make_qp_quants(scale.reshape(nb, 8).T, sw, nmax=63)
        m_block, lm = make_qp_quants(the_min.reshape(nb, 8).T, sw, nmax=63)
        ls, lm = _u8(ls.T), _u8(lm.T)
        if nmax == 31:  # quantize_row_q5_K_impl clamps, q4_K's doesn't
            ls, lm = jnp.minimum(ls, 63), jnp.minimum(lm, 63)
        d, dmin = d_block.astype(jnp.float16), m_block.astype(jnp.float16)
    packed = pack_scale_min_k4(ls, lm)
    sc, m = unpack_scale_min_k4(packed)
    levels = _requantize(xt, levels, d, dmin, sc, m, nmax)
    q = _ungroup(levels, nb).astype(jnp.uint8).reshape(nb, 4, 2, 32)
    fields = {"d": d, "dmin": dmin, "scales": packed}
    if nmax == 31:
        bits = (q >> 4).reshape(nb, 8, 32) << _shifts(list(range(8)), jnp.uint8, 3)
        fields["qh"] = jnp.bitwise_or.reduce(bits, axis=1)
        q = q & 0xF
    fields["qs"] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    return {k: v.reshape(*lead, *v.shape[1:]) for k, v in fields.items()}


def quantize_q4_k(x: jax.Array, qw: jax.Array | None = None) -> dict[str, jax.Array]:
    """ggml's Q4_K: ``quantize_row_q4_K_ref``, or ``quantize_row_q4_K_impl`` with ``qw``.

    Args:
        x: float32 ``[..., n]``, ``n`` a multiple of 256.
        qw: None, or float32 ``[n]`` importance weights (llama.cpp's ``quant_weights``).

    Returns:
        The fields of :data:`FIELDS_Q4_K`, each ``[..., n // 256, *shape]``.
    """
    return _q45_k(x, qw, 15, -1.0, 20)


def quantize_q5_k(x: jax.Array, qw: jax.Array | None = None) -> dict[str, jax.Array]:
    """ggml's Q5_K: ``quantize_row_q5_K_ref``, or ``quantize_row_q5_K_impl`` with ``qw``.

    Args:
        x: float32 ``[..., n]``, ``n`` a multiple of 256.
        qw: None, or float32 ``[n]`` importance weights.

    Returns:
        The fields of :data:`FIELDS_Q5_K`, each ``[..., n // 256, *shape]``.
    """
    return _q45_k(x, qw, 31, -0.5, 15)


def _dequantize_k_affine(d, dmin, sc, m, q):
    """``d*sc * q - dmin*m`` per sub-block, as gguf's numpy rounds it.

    Every product is exact in float32 (an fp16 scale has 11 significant bits, ``sc`` and
    ``m`` at most 6, ``q`` at most 5), so only the subtraction rounds and a fused
    multiply-add gives the same bits: no :func:`no_fma` guard is needed here. The
    per-sub-block scales are stored once (:func:`store_once`); fused into the
    256-wide output loop, XLA would unpack them again for every value.
    """
    dl = d.astype(_F32)[..., None] * sc.astype(_F32)
    ml = dmin.astype(_F32)[..., None] * m.astype(_F32)
    # stored, with the quants: the scaling pass is then simple and vectorises
    dl, ml, q = store_once(dl, ml, q.astype(jnp.uint8))
    y = dl[..., None] * q.astype(_F32) - ml[..., None]
    return y.reshape(*y.shape[:-2], QK_K)


def _nibbles_k(qs: jax.Array) -> jax.Array:
    """``qs [..., 128]`` -> quants ``[..., 8, 32]`` (low nibbles then high, per 32 bytes)."""
    qs = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    q = qs >> _shifts([0, 4], jnp.uint8, qs.ndim)
    return (q & 0xF).reshape(*qs.shape[:-3], 8, 32)


def dequantize_q4_k(fields: dict[str, jax.Array]) -> jax.Array:
    """float32 ``[..., n_blocks, 256]``, bit for bit ``gguf.quants.dequantize``."""
    sc, m = unpack_scale_min_k4(fields["scales"])
    return _dequantize_k_affine(fields["d"], fields["dmin"], sc, m, _nibbles_k(fields["qs"]))


def dequantize_q5_k(fields: dict[str, jax.Array]) -> jax.Array:
    """float32 ``[..., n_blocks, 256]``, bit for bit ``gguf.quants.dequantize``."""
    sc, m = unpack_scale_min_k4(fields["scales"])
    qh = fields["qh"][..., None, :]
    qh = qh >> _shifts(list(range(8)), jnp.uint8, qh.ndim)
    q = _nibbles_k(fields["qs"]) | ((qh & 1) << 4)
    return _dequantize_k_affine(fields["d"], fields["dmin"], sc, m, q)


# ---------------------------------------------------------------- Q2_K


def quantize_q2_k(x: jax.Array, qw: jax.Array | None = None) -> dict[str, jax.Array]:
    """ggml's Q2_K: ``quantize_row_q2_K_ref``, or ``quantize_row_q2_K_impl`` with ``qw``.

    Args:
        x: float32 ``[..., n]``, ``n`` a multiple of 256.
        qw: None, or float32 ``[n]`` importance weights.

    Returns:
        The fields of :data:`FIELDS_Q2_K`, each ``[..., n // 256, *shape]``.
    """
    xb, lead = _blocks(x, QK_K)
    nb = xb.shape[0]
    (xt,) = materialize(_groups(xb, 16))
    if qw is None:
        scale, the_min, levels = make_qkx_quants(
            xt, jnp.abs(xt), nmax=3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True
        )
        scales, mins = scale.reshape(nb, 16), the_min.reshape(nb, 16)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        pos_s, pos_m = max_scale > 0, max_min > 0
        one = _F32(1)
        iscale = exact_div(_F32(15), jnp.where(pos_s, max_scale, one))
        imin = exact_div(_F32(15), jnp.where(pos_m, max_min, one))
        ls = jnp.where(pos_s[:, None], nearest_int(iscale[:, None] * scales), 0)
        lm = jnp.where(pos_m[:, None], nearest_int(imin[:, None] * mins), 0)
        d = jnp.where(pos_s, exact_div(max_scale, _F32(15)), _F32(0)).astype(jnp.float16)
        dmin = jnp.where(pos_m, exact_div(max_min, _F32(15)), _F32(0)).astype(jnp.float16)
        packed = _u8(ls) | _u8(lm << 4)
    else:
        qwt = _groups(_row_weights(qw, x.shape, QK_K), 16)
        sigma2 = _sum_x2(xb) / QK_K
        w = _imatrix_weights(xt, qwt, jnp.repeat(sigma2, 16))
        sw = sum_from_zero(w).reshape(nb, 16).T
        scale, the_min, levels = make_qkx_quants(
            xt, w, nmax=3, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False
        )
        dm, ls = make_qp_quants(scale.reshape(nb, 16).T, sw, nmax=15)
        mm, lm = make_qp_quants(the_min.reshape(nb, 16).T, sw, nmax=15)
        d, dmin = dm.astype(jnp.float16), mm.astype(jnp.float16)
        packed = _u8(ls.T) | _u8(lm.T << 4)
    levels = _requantize(xt, levels, d, dmin, packed & 0xF, packed >> 4, 3)
    q = _ungroup(levels, nb).astype(jnp.uint8).reshape(nb, 2, 4, 32)
    q = q << _shifts([0, 2, 4, 6], jnp.uint8, 4)
    qs = jnp.bitwise_or.reduce(q, axis=2).reshape(nb, 64)
    fields = {"scales": packed, "qs": qs, "d": d, "dmin": dmin}
    return {k: v.reshape(*lead, *v.shape[1:]) for k, v in fields.items()}


def dequantize_q2_k(fields: dict[str, jax.Array]) -> jax.Array:
    """float32 ``[..., n_blocks, 256]``, bit for bit ``gguf.quants.dequantize``."""
    # unpacked in int32: XLA:CPU vectorises uint8 shifts by a broadcast amount poorly
    qs = fields["qs"].astype(jnp.int32).reshape(*fields["qs"].shape[:-1], 2, 1, 32)
    q = (qs >> _shifts([0, 2, 4, 6], jnp.int32, qs.ndim)) & 3
    q = q.reshape(*q.shape[:-3], 16, 16)
    sc = fields["scales"]
    return _dequantize_k_affine(fields["d"], fields["dmin"], sc & 0xF, sc >> 4, q)


# ---------------------------------------------------------------- Q4_1 / Q5_1 with qw


def _legacy_weighted(x, qw, nmax):
    x = jnp.asarray(x, _F32)
    n = x.shape[-1]
    xb, lead = _blocks(x, 32)
    rows = x.reshape(-1, n)
    # sigma2 is per row here (per super-block in the K-quants).
    sum_x2 = long_sum_from_zero(no_fma(rows.T * rows.T))
    sigma2 = exact_div(sum_x2, _F32(n))
    (xt,) = materialize(xb.T)
    qwt = _row_weights(qw, x.shape, 32).T
    w = _imatrix_weights(xt, qwt, jnp.repeat(sigma2, n // 32))
    scale, the_min, levels = make_qkx_quants(
        xt, w, nmax=nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False, signed_zero_min=True
    )
    q = levels.T.astype(jnp.uint8)
    fields = {"d": scale.astype(jnp.float16), "m": (-the_min).astype(jnp.float16)}
    if nmax == 31:
        bits = (q >> 4).astype(jnp.uint32) << _shifts(list(range(32)), jnp.uint32, 2, 0)
        fields["qh"] = jnp.bitwise_or.reduce(bits, axis=-1)
        q = q & 0xF
    fields["qs"] = q[:, :16] | (q[:, 16:] << 4)
    return {k: v.reshape(*lead, *v.shape[1:]) for k, v in fields.items()}


def quantize_q4_1_weighted(x: jax.Array, qw: jax.Array) -> dict[str, jax.Array]:
    """ggml's ``quantize_row_q4_1_impl`` with importance weights ``qw`` ``[n]``.

    Without weights ggml uses ``quantize_row_q4_1_ref``, which jquant's Q4_1 kernel
    already matches. Returns jquant's Q4_1 leaves (:data:`FIELDS_Q4_1`), each
    ``[..., n // 32, *shape]``.
    """
    return _legacy_weighted(x, qw, 15)


def quantize_q5_1_weighted(x: jax.Array, qw: jax.Array) -> dict[str, jax.Array]:
    """ggml's ``quantize_row_q5_1_impl`` with importance weights ``qw`` ``[n]``.

    Returns jquant's Q5_1 leaves (:data:`FIELDS_Q5_1`): ``qh`` bit j is bit 4 of element j.
    """
    return _legacy_weighted(x, qw, 31)
