"""IQ4_NL and IQ4_XS: 4-bit indices into ggml's non-linear grid, byte-exact with ggml.

A port of ``quantize_row_iq4_nl_impl`` (ggml-quants.c) as ``ggml_quantize_chunk`` calls it
for files: ``quantize_iq4_nl`` and ``quantize_iq4_xs``, both with ``ntry = 7`` (not the
search-free ``quantize_row_iq4_nl_ref``), with or without importance weights.

Per group of 32 values the weights are ``x²`` (or ``qw · sqrt(σ² + x²)`` with
``σ² = 2 Σx² / super_block``); the scale starts at ``max / 127`` (``max`` the signed value
of largest magnitude), is refitted by weighted least squares, and 15 more candidate scales
``max / (127 - itry)`` (``itry = -7..7``) are tried, keeping one when
``sumqx² > best · sumq2``. IQ4_NL stores that float scale as fp16 and re-quantizes with the
unrounded float; IQ4_XS puts the 8 group scales on 6-bit integers under one fp16 super-scale
``d = -max_scale / 32`` and re-quantizes each group with ``d · l``, again unrounded.

Exactness: products are rounded before they are added (:func:`~.guards.no_fma`), sums run
in the C loop order (the 32 values of a group lie on the leading axis, so a sequential sum
is 31 vectorized adds across groups), divisions stay divisions. ``best_index_int8``'s
binary search with its ``x - lo < hi - x`` tie rule is monotone in ``x``, so it is replaced
by 15 exact float32 thresholds computed from the C comparison itself (:data:`THRESHOLDS`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .guards import exact_div, nearest_int, no_fma, sequential_sum

__all__ = [
    "FIELDS_IQ4_NL",
    "FIELDS_IQ4_XS",
    "IQ4_GRID",
    "THRESHOLDS",
    "best_index",
    "dequantize_iq4_nl",
    "dequantize_iq4_xs",
    "quantize_iq4_nl",
    "quantize_iq4_xs",
]

IQ4_GRID = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8
)
"""ggml's ``kvalues_iq4nl``: the 16 values a 4-bit index stands for (times the scale)."""

FIELDS_IQ4_NL = (("d", np.dtype("<f2"), ()), ("qs", np.dtype("u1"), (16,)))
"""One IQ4_NL block (32 values, 18 bytes) in ggml's byte order."""

FIELDS_IQ4_XS = (
    ("d", np.dtype("<f2"), ()),
    ("scales_h", np.dtype("<u2"), ()),
    ("scales_l", np.dtype("u1"), (4,)),
    ("qs", np.dtype("u1"), (128,)),
)
"""One IQ4_XS block (256 values, 136 bytes) in ggml's byte order."""

_GROUP = 32
_SUPER = 256
_NTRY = 7
_GROUP_MAX_EPS = np.float32(1e-15)


def _c_takes_upper(x: np.float32, lo: np.float32, hi: np.float32) -> bool:
    """The last line of ``best_index_int8`` for ``lo <= x < hi``: False picks ``lo``."""
    return not bool(np.float32(x - lo) < np.float32(hi - x))


def _thresholds() -> np.ndarray:
    """For each pair of neighbours, the smallest float32 for which ggml picks the upper one.

    ``fl(x - lo) < fl(hi - x)`` is monotone in ``x`` (rounding is), so ``best_index_int8(x)``
    equals the number of thresholds ``<= x`` for every non-NaN float32.
    """
    grid = IQ4_GRID.astype(np.float32)
    out = []
    with np.errstate(all="ignore"):
        for lo, hi in zip(grid[:-1], grid[1:], strict=True):
            t = np.float32((lo + hi) / 2)
            down, up = np.float32(-np.inf), np.float32(np.inf)
            if _c_takes_upper(t, lo, hi):
                while _c_takes_upper(np.nextafter(t, down), lo, hi):
                    t = np.nextafter(t, down)
            else:
                while not _c_takes_upper(t, lo, hi):
                    t = np.nextafter(t, up)
            out.append(t)
    return np.array(out, np.float32)


THRESHOLDS = _thresholds()
"""``best_index_int8(x) == sum(x >= THRESHOLDS)`` for every non-NaN float32 ``x``."""


def best_index(al: jax.Array, values: np.ndarray | None = None) -> jax.Array:
    """ggml's ``best_index_int8(16, kvalues_iq4nl, al)``, elementwise, as ``values[index]``.

    Args:
      al: float32 values (scaled inputs).
      values: what to return for each of the 16 indices; the indices themselves (int32)
        when None, else e.g. :data:`IQ4_GRID` as float32 to get the grid value directly.

    Returns:
      ``values[best_index_int8(al)]``, the dtype of ``values``.
    """
    values = np.arange(16, dtype=np.int32) if values is None else np.asarray(values)
    # A chain of selects, not a count-and-gather: XLA:CPU vectorizes selects, not gathers.
    out = jnp.full(al.shape, values[0], values.dtype)
    for k in range(15):
        out = jnp.where(al >= THRESHOLDS[k], values[k + 1], out)
    return out


def _first_absmax(x: jax.Array, axis: int = 0) -> jax.Array:
    """ggml's ``max``: the signed value of the first element of largest magnitude (0 if none)."""
    ax = jnp.abs(x)
    amax = jnp.max(ax, axis=axis, keepdims=True)
    n = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = n
    pos = jnp.arange(n, dtype=jnp.int32).reshape(shape)
    first = jnp.min(jnp.where(ax == amax, pos, n), axis=axis, keepdims=True)
    picked = jnp.sum(jnp.where(pos == first, x, 0.0), axis=axis)  # one nonzero term
    return jnp.where(jnp.squeeze(amax, axis) > 0, picked, jnp.float32(0.0))


def _sums(xg: jax.Array, w: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``sumqx = Σ w·q·x``, ``sumq2 = Σ w·q·q`` over axis 0, in C's order and rounding."""
    wq = w * q
    return sequential_sum(no_fma(wq * xg), axis=0), sequential_sum(no_fma(wq * q), axis=0)


_GRID_F32 = IQ4_GRID.astype(np.float32)


def _group_scales(xg: jax.Array, w: jax.Array) -> jax.Array:
    """The float scale of each group: ``xg``, ``w`` are ``[32, n_groups]``; returns ``[n_groups]``.

    Groups whose largest magnitude is under ``GROUP_MAX_EPS`` get 0, as in ggml.
    """
    mx = _first_absmax(xg)
    skip = jnp.abs(mx) < _GROUP_MAX_EPS
    mx = jnp.where(skip, jnp.float32(1.0), mx)  # keep skipped groups' arithmetic finite
    d = exact_div(-mx, _GRID_F32[0])
    id_ = exact_div(jnp.float32(1.0), d)
    sumqx, sumq2 = _sums(xg, w, best_index(id_[None] * xg, _GRID_F32))
    pos = sumq2 > 0
    d = jnp.where(pos, exact_div(sumqx, jnp.where(pos, sumq2, 1.0)), jnp.float32(0.0))
    best = d * sumqx

    def body(i, carry):
        d, best = carry
        id_ = exact_div(i.astype(jnp.float32) + _GRID_F32[0], mx)
        sumqx, sumq2 = _sums(xg, w, best_index(id_[None] * xg, _GRID_F32))
        take = (sumq2 > 0) & (no_fma(sumqx * sumqx) > no_fma(best * sumq2))
        d_new = exact_div(sumqx, jnp.where(take, sumq2, 1.0))
        return jnp.where(take, d_new, d), jnp.where(take, d_new * sumqx, best)

    d, _ = lax.fori_loop(-_NTRY, _NTRY + 1, body, (d, best))
    return jnp.where(skip, jnp.float32(0.0), d)


def _weights(xg: jax.Array, qw: jax.Array | None, sigma2: jax.Array | None) -> jax.Array:
    """``x²``, or ``qw · sqrt(σ² + x²)`` with importance weights."""
    x2 = no_fma(xg * xg)
    if qw is None:
        return x2
    return qw * jnp.sqrt(sigma2 + x2)


def _sigma2(x2: jax.Array) -> jax.Array:
    """``2/n · Σ x²`` over axis 0 in C's order (``x2`` already rounded products)."""
    n = x2.shape[0]
    return sequential_sum(x2, axis=0) * jnp.float32(2.0 / n)  # a power of two: exact


def _recip_or_zero(d: jax.Array) -> jax.Array:
    """``d ? 1/d : 0`` with a true division."""
    nz = d != 0
    return jnp.where(nz, exact_div(jnp.float32(1.0), jnp.where(nz, d, 1.0)), jnp.float32(0.0))


def _pack_nibbles(idx: jax.Array) -> jax.Array:
    """``[..., 32]`` indices → ``[..., 16]`` bytes: element j low nibble, j + 16 high nibble."""
    idx = idx.astype(jnp.uint8)
    return idx[..., :16] | (idx[..., 16:] << 4)


def _check(x: jax.Array, qw: jax.Array | None, block: int, name: str) -> tuple[jax.Array, ...]:
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        raise TypeError(f"{name}: x must be float32, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] % block:
        raise ValueError(
            f"{name}: the last axis of x (shape {x.shape}) must be a multiple of {block}; "
            "pad the rows first"
        )
    if qw is None:
        return x, None
    qw = jnp.asarray(qw)
    if qw.dtype != jnp.float32 or qw.shape != x.shape[-1:]:
        raise ValueError(
            f"{name}: qw must be float32 of shape {x.shape[-1:]} (one weight per column), "
            f"got {qw.dtype} {qw.shape}"
        )
    return x, jnp.broadcast_to(qw, x.shape)


def quantize_iq4_nl(x: jax.Array, qw: jax.Array | None = None) -> dict[str, jax.Array]:
    """IQ4_NL blocks of float32 rows, byte-identical to ``ggml_quantize_chunk``.

    Args:
      x: float32 ``[..., n]``, ``n`` a multiple of 32.
      qw: None, or float32 ``[n]`` importance weights (llama.cpp's ``quant_weights``).

    Returns:
      ``{"d": float16 [..., n // 32], "qs": uint8 [..., n // 32, 16]}``.

    Example:
      >>> import jax.numpy as jnp
      >>> f = quantize_iq4_nl(jnp.linspace(-1.0, 1.0, 32, dtype=jnp.float32))
      >>> f["d"].shape, f["qs"].shape
      ((1,), (1, 16))
    """
    x, qw = _check(x, qw, _GROUP, "quantize_iq4_nl")
    lead = x.shape[:-1] + (x.shape[-1] // _GROUP,)
    xg = x.reshape(-1, _GROUP).T  # [32, n_groups]: sums over the 32 run across lanes
    x2 = no_fma(xg * xg)
    wg = None if qw is None else qw.reshape(-1, _GROUP).T
    w = _weights(xg, wg, None if qw is None else _sigma2(x2)[None])
    d = _group_scales(xg, w)
    idx = best_index(_recip_or_zero(d)[None] * xg)
    return {
        "d": d.astype(jnp.float16).reshape(lead),
        "qs": _pack_nibbles(idx.T).reshape(*lead, 16),
    }


def quantize_iq4_xs(x: jax.Array, qw: jax.Array | None = None) -> dict[str, jax.Array]:
    """IQ4_XS super-blocks of float32 rows, byte-identical to ``ggml_quantize_chunk``.

    Args:
      x: float32 ``[..., n]``, ``n`` a multiple of 256.
      qw: None, or float32 ``[n]`` importance weights (llama.cpp's ``quant_weights``).

    Returns:
      ``{"d": float16 [..., n // 256], "scales_h": uint16 [..., n // 256],
      "scales_l": uint8 [..., n // 256, 4], "qs": uint8 [..., n // 256, 128]}``.
    """
    x, qw = _check(x, qw, _SUPER, "quantize_iq4_xs")
    lead = x.shape[:-1] + (x.shape[-1] // _SUPER,)
    n_groups = _SUPER // _GROUP
    xs = x.reshape(-1, n_groups, _GROUP).transpose(2, 1, 0)  # [32, 8, n_super]
    x2 = no_fma(xs * xs)
    sigma2 = None
    if qw is not None:
        # σ² runs over all 256 values in memory order: group by group, value by value.
        sigma2 = _sigma2(x2.transpose(1, 0, 2).reshape(_SUPER, -1))
        qs_ = qw.reshape(-1, n_groups, _GROUP).transpose(2, 1, 0)
        w = qs_ * jnp.sqrt(sigma2[None, None] + x2)
    else:
        w = x2
    n_super = xs.shape[-1]
    scales = _group_scales(xs.reshape(_GROUP, -1), w.reshape(_GROUP, -1))
    scales = scales.reshape(n_groups, n_super)

    max_scale = _first_absmax(scales)
    d = -max_scale / jnp.float32(32.0)  # a power of two: exact
    ls = jnp.clip(nearest_int(_recip_or_zero(d)[None] * scales), -32, 31)
    dl = d[None] * ls.astype(jnp.float32)
    idl = _recip_or_zero(dl)  # [8, n_super]
    idx = best_index(idl[None] * xs)  # [32, 8, n_super]

    lu = (ls + 32).astype(jnp.uint16)  # [8, n_super]
    scales_l = ((lu[0::2] & 0xF) | ((lu[1::2] & 0xF) << 4)).astype(jnp.uint8)  # [4, n_super]
    shifts = (2 * jnp.arange(n_groups, dtype=jnp.uint16))[:, None]
    scales_h = jnp.sum((lu >> 4) << shifts, axis=0, dtype=jnp.uint16)
    qs = _pack_nibbles(idx.transpose(2, 1, 0))  # [n_super, 8, 16]
    return {
        "d": d.astype(jnp.float16).reshape(lead),
        "scales_h": scales_h.reshape(lead),
        "scales_l": scales_l.T.reshape(*lead, 4),
        "qs": qs.reshape(*lead, 128),
    }


def _grid_values(idx: jax.Array) -> jax.Array:
    """``IQ4_GRID[idx]`` as float32."""
    return jnp.asarray(_GRID_F32)[idx.astype(jnp.int32)]


def _unpack_nibbles(qs: jax.Array) -> jax.Array:
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def dequantize_iq4_nl(fields: dict[str, jax.Array]) -> jax.Array:
    """float32 ``[..., n_blocks, 32]`` from IQ4_NL fields: ``d · grid[q]`` (exact in float32)."""
    d = fields["d"].astype(jnp.float32)[..., None]
    return d * _grid_values(_unpack_nibbles(fields["qs"]))


def dequantize_iq4_xs(fields: dict[str, jax.Array]) -> jax.Array:
    """float32 ``[..., n_blocks, 256]`` from IQ4_XS fields: ``d · (l - 32) · grid[q]``."""
    d = fields["d"].astype(jnp.float32)
    sl = fields["scales_l"]
    lo = jnp.stack([sl & 0xF, sl >> 4], axis=-1).reshape(*sl.shape[:-1], 8)
    sh = fields["scales_h"][..., None]
    shifts = (2 * jnp.arange(8, dtype=jnp.uint16)).reshape((1,) * (sh.ndim - 1) + (8,))
    hi = (sh >> shifts) & 3
    ls = lo.astype(jnp.int32) | (hi.astype(jnp.int32) << 4)
    dl = d[..., None] * (ls - 32).astype(jnp.float32)  # [..., 8]
    qs = fields["qs"].reshape(*fields["qs"].shape[:-1], 8, 16)
    q = _grid_values(_unpack_nibbles(qs))  # [..., 8, 32]
    y = dl[..., None] * q
    return y.reshape(*y.shape[:-2], _SUPER)
