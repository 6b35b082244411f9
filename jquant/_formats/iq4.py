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

Limit: ggml computes with float32 subnormals, XLA:CPU flushes them to zero. The search's
sums are of degree up to 6 in the data (``(Σ x²·q·x)²`` without weights), so a group whose
values are all smaller than about 1e-7 (1e-10 with unit importance weights) can reach the
subnormal range in ggml and come out differently (N(0, 3e-8) groups: most differ; N(0, 1e-7)
and larger: none seen).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .decode import store_once
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


def _first_absmax(x: jax.Array) -> jax.Array:
    """ggml's ``max`` over axis 0: the signed value of the first element of largest magnitude.

    C's loop over the (short) leading axis, elementwise across groups, so it vectorizes (an
    argmax-style reduction over the leading axis costs far more). A ``fori_loop`` rather
    than unrolled: its result is materialized once instead of being fused (recomputed) into
    each consumer. A group of zeros gives +0.
    """

    def body(j, carry):
        amax, mx = carry
        xj = lax.dynamic_index_in_dim(x, j, 0, keepdims=False)
        take = jnp.abs(xj) > amax
        return jnp.where(take, jnp.abs(xj), amax), jnp.where(take, xj, mx)

    zero = jnp.zeros(x.shape[1:], x.dtype)
    return lax.fori_loop(0, x.shape[0], body, (zero, zero))[1]


_GRID_F32 = IQ4_GRID.astype(np.float32)
_CHUNK = 65536
"""Groups of 32 per ``lax.map`` step (bounds the [16, chunk] candidate temporaries)."""


def _candidate_sums(ids: jax.Array, xg: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``sumqx = Σ_j w·q·x`` and ``sumq2 = Σ_j w·q·q`` for every candidate reciprocal scale.

    ``ids`` is ``[n_cand, n]``, ``xg`` and ``w`` are ``[32, n]``. The loop runs over the 32
    values of a group in C's order, each step one fused pass over ``[n_cand, n]``; products
    are rounded before they are added. The two sums travel as one complex64 (real: sumqx,
    imaginary: sumq2; complex addition adds the parts separately, exactly as two float adds):
    with two float outputs XLA:CPU makes two loops and evaluates the grid search twice.
    """

    def step(xj, wj):
        q = best_index(ids * xj, _GRID_F32)
        wq = wj * q
        return lax.complex(no_fma(wq * xj), no_fma(wq * q))

    def body(j, sums):
        xj = lax.dynamic_index_in_dim(xg, j, 0)
        wj = lax.dynamic_index_in_dim(w, j, 0)
        return sums + step(xj, wj)

    sums = lax.fori_loop(1, _GROUP, body, step(xg[:1], w[:1]))
    return jnp.real(sums), jnp.imag(sums)


def _group_scales(xg: jax.Array, w: jax.Array) -> jax.Array:
    """The float scale of each group: ``xg``, ``w`` are ``[32, n_groups]``; returns ``[n_groups]``.

    Groups whose largest magnitude is under ``GROUP_MAX_EPS`` get 0, as in ggml.
    """
    mx = _first_absmax(xg)
    skip = jnp.abs(mx) < _GROUP_MAX_EPS
    mx = jnp.where(skip, jnp.float32(1.0), mx)[None]  # keep skipped groups' arithmetic finite
    # Candidate 0 is 1/(max/127); then (itry - 127)/max for itry = -7..7. All 16 are
    # evaluated in one pass over the data (selecting among them is cheap, in C's order).
    id0 = exact_div(jnp.float32(1.0), exact_div(-mx, _GRID_F32[0]))
    tries = np.arange(-_NTRY, _NTRY + 1, dtype=np.float32)[:, None] + _GRID_F32[0]
    idk = exact_div(tries, mx)
    sumqx, sumq2 = _candidate_sums(jnp.concatenate([id0, idk]), xg, w)

    pos = sumq2[0] > 0
    d = jnp.where(pos, exact_div(sumqx[0], jnp.where(pos, sumq2[0], 1.0)), jnp.float32(0.0))
    best = d * sumqx[0]
    for k in range(1, 2 * _NTRY + 2):
        sx, s2 = sumqx[k], sumq2[k]
        take = (s2 > 0) & (no_fma(sx * sx) > no_fma(best * s2))
        d_new = exact_div(sx, jnp.where(take, s2, 1.0))
        d, best = jnp.where(take, d_new, d), jnp.where(take, d_new * sx, best)
    return jnp.where(skip, jnp.float32(0.0), d)


def _sigma2(x2: jax.Array) -> jax.Array:
    """``2/n · Σ x²`` over axis 0 in C's order (``x2`` already rounded products)."""
    n = x2.shape[0]
    return sequential_sum(x2, axis=0) * jnp.float32(2.0 / n)  # a power of two: exact


def _recip_or_zero(d: jax.Array) -> jax.Array:
    """``d ? 1/d : 0`` with a true division."""
    nz = d != 0
    return jnp.where(nz, exact_div(jnp.float32(1.0), jnp.where(nz, d, 1.0)), jnp.float32(0.0))


def _pack_nibbles(idx: jax.Array, axis: int) -> jax.Array:
    """32 indices along ``axis`` → 16 bytes: element j low nibble, j + 16 high nibble."""
    idx = idx.astype(jnp.uint8)
    lo = lax.slice_in_dim(idx, 0, 16, axis=axis)
    hi = lax.slice_in_dim(idx, 16, 32, axis=axis)
    return lo | (hi << 4)


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


def _map_blocks(core, x: jax.Array, qw: jax.Array | None, block: int, chunk: int):
    """Run ``core`` on ``[32, block // 32, c]`` slabs of ``x``'s blocks (value axis first).

    Blocks are padded with zeros to a whole number of slabs of at most ``chunk`` blocks, and
    the slabs run one after another (``lax.map``), which bounds the search's temporaries.
    ``core(xs, qws)`` returns arrays whose last axis is the block axis.
    """
    n = x.size // block
    n_slabs = -(-n // chunk)
    c = -(-n // n_slabs)
    args = [x] if qw is None else [x, qw]
    slabs = []
    for a in args:
        a = a.reshape(n, block // _GROUP, _GROUP)
        a = jnp.pad(a, ((0, n_slabs * c - n), (0, 0), (0, 0)))
        slabs.append(a.reshape(n_slabs, c, block // _GROUP, _GROUP).transpose(0, 3, 2, 1))
    if qw is None:
        out = lax.map(lambda xs: core(xs, None), slabs[0])
    else:
        out = lax.map(lambda a: core(*a), tuple(slabs))
    # [n_slabs, ..., c] → [n, ...]
    return [jnp.moveaxis(o, -1, 1).reshape(n_slabs * c, *o.shape[1:-1])[:n] for o in out]


def _nl_core(xs: jax.Array, qws: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    xg = xs[:, 0]  # [32, c]
    x2 = no_fma(xg * xg)
    w = x2 if qws is None else qws[:, 0] * jnp.sqrt(_sigma2(x2)[None] + x2)
    d = _group_scales(xg, w)
    idx = best_index(_recip_or_zero(d)[None] * xg)
    return d.astype(jnp.float16), _pack_nibbles(idx, axis=0)


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
    d, qs = _map_blocks(_nl_core, x, qw, _GROUP, _CHUNK)
    return {"d": d.reshape(lead), "qs": qs.reshape(*lead, 16)}


def _xs_core(xs: jax.Array, qws: jax.Array | None) -> tuple[jax.Array, ...]:
    n_groups, c = xs.shape[1], xs.shape[2]
    x2 = no_fma(xs * xs)  # [32, 8, c]
    if qws is None:
        w = x2
    else:
        # σ² runs over all 256 values in memory order: group by group, value by value.
        sigma2 = _sigma2(x2.transpose(1, 0, 2).reshape(_SUPER, c))
        w = qws * jnp.sqrt(sigma2[None, None] + x2)
    scales = _group_scales(xs.reshape(_GROUP, -1), w.reshape(_GROUP, -1)).reshape(n_groups, c)

    max_scale = _first_absmax(scales)
    d = -max_scale / jnp.float32(32.0)  # a power of two: exact
    ls = jnp.clip(nearest_int(_recip_or_zero(d)[None] * scales), -32, 31)
    dl = d[None] * ls.astype(jnp.float32)
    idx = best_index(_recip_or_zero(dl)[None] * xs)  # [32, 8, c]

    lu = (ls + 32).astype(jnp.uint16)  # [8, c]
    scales_l = ((lu[0::2] & 0xF) | ((lu[1::2] & 0xF) << 4)).astype(jnp.uint8)  # [4, c]
    shifts = (2 * jnp.arange(n_groups, dtype=jnp.uint16))[:, None]
    scales_h = jnp.sum((lu >> 4) << shifts, axis=0, dtype=jnp.uint16)
    qs = _pack_nibbles(idx, axis=0).transpose(1, 0, 2).reshape(n_groups * 16, c)
    return d.astype(jnp.float16), scales_h, scales_l, qs


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
    chunk = _CHUNK // (_SUPER // _GROUP)
    d, scales_h, scales_l, qs = _map_blocks(_xs_core, x, qw, _SUPER, chunk)
    return {
        "d": d.reshape(lead),
        "scales_h": scales_h.reshape(lead),
        "scales_l": scales_l.reshape(*lead, 4),
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
    (dl,) = store_once(dl)  # the 8 group scales once, not again for each of their 32 values
    qs = fields["qs"].reshape(*fields["qs"].shape[:-1], 8, 16)
    q = _grid_values(_unpack_nibbles(qs))  # [..., 8, 32]
    y = dl[..., None] * q
    return y.reshape(*y.shape[:-2], _SUPER)
