"""ggml's legacy block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): byte-exact kernels.

Blocks hold 32 values. The encoders take whole rows ``x: f32[..., n]`` (``n`` a multiple
of 32) and return the packed fields, each ``[..., n // 32, *per_block_shape]``, in the
byte order of ggml's ``block_q*`` structs (``FIELDS_*``); the decoders take those fields
and return float32 ``[..., n_blocks, 32]``. Leading axes (and their shardings) pass
through untouched.

XLA rewrites float arithmetic in ways C compilers don't by default, and each rewrite
changes a few blocks per million. The guards of :mod:`jquant._formats.guards` keep the
arithmetic exactly as ggml writes it: ``exact_div`` and ``safe_recip`` hide the divisor
from the compiler so that ``x / 127`` is not turned into ``x * (1/127)``, and ``no_fma``
keeps a multiply and the add that follows from being contracted into one fused
multiply-add (an FMA rounds once, ggml rounds twice).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .guards import exact_div, no_fma, safe_recip

__all__ = [
    "BLOCK",
    "FIELDS_Q4_0",
    "FIELDS_Q4_1",
    "FIELDS_Q5_0",
    "FIELDS_Q5_1",
    "FIELDS_Q8_0",
    "dequantize_halves",
    "dequantize_q4_0",
    "dequantize_q4_1",
    "dequantize_q5_0",
    "dequantize_q5_1",
    "dequantize_q8_0",
    "pack_high_bits",
    "pack_nibbles",
    "quantize_q4_0",
    "quantize_q4_1",
    "quantize_q5_0",
    "quantize_q5_1",
    "quantize_q8_0",
]

BLOCK = 32
_HALF = 16

_F16, _U32 = np.dtype("<f2"), np.dtype("<u4")
_NIBBLES = ("qs", np.dtype(np.uint8), (_HALF,))
FIELDS_Q8_0 = (("d", _F16, ()), ("qs", np.dtype(np.int8), (BLOCK,)))
FIELDS_Q4_0 = (("d", _F16, ()), _NIBBLES)
FIELDS_Q4_1 = (("d", _F16, ()), ("m", _F16, ()), _NIBBLES)
FIELDS_Q5_0 = (("d", _F16, ()), ("qh", _U32, ()), _NIBBLES)
FIELDS_Q5_1 = (("d", _F16, ()), ("m", _F16, ()), ("qh", _U32, ()), _NIBBLES)


def _first_sign_key(blocks: jax.Array, hit: jax.Array) -> jax.Array:
    """``2 * j + signbit(x_j)`` for the first ``j`` where ``hit`` is true (64 if none).

    One integer min-reduction instead of an argmax (a variadic reduce XLA:CPU doesn't
    vectorise) followed by a gather.
    """
    iota = lax.broadcasted_iota(jnp.int32, blocks.shape, blocks.ndim - 1)
    key = 2 * iota + jnp.signbit(blocks).astype(jnp.int32)
    return jnp.min(jnp.where(hit, key, 2 * BLOCK), axis=-1)


def _first_absmax_exact(blocks: jax.Array) -> jax.Array:
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    key = _first_sign_key(blocks, jnp.abs(blocks) == amax[..., None])
    return jnp.where(((key & 1) == 1) & (amax > 0), -amax, amax)


def _first_absmax(blocks: jax.Array) -> jax.Array:
    """ggml's ``max``: the signed value of the first element with the largest magnitude.

    An all-zero block gives +0, whatever the signs of its zeros: ggml's loop starts from
    ``max = 0.0f`` and only replaces it on a strictly larger magnitude. (gguf's numpy takes
    the first element instead, so for a block of zeros starting with -0 it writes a +0
    scale where ggml writes -0; jquant follows ggml.)

    Fast path from max and min alone: the answer is whichever has the larger magnitude.
    Only ``max == -min != 0`` needs positions; when any block in the batch has such a tie
    the whole batch takes the exact (several times slower) path.
    """
    mx = jnp.max(blocks, axis=-1)
    mn = jnp.min(blocks, axis=-1)
    zero = (mx == 0) & (mn == 0)
    fast = jnp.where(zero, jnp.float32(0.0), jnp.where(mx > -mn, mx, mn))
    tie = (mx == -mn) & ~zero
    return lax.cond(jnp.any(tie), _first_absmax_exact, lambda _: fast, blocks)


def _first_extreme(blocks: jax.Array, value: jax.Array) -> jax.Array:
    """``value`` (a min or max of ``blocks``) with the sign of the first element equal to it.

    Only a zero can differ: ggml's loop keeps the first zero it meets, XLA's min returns
    -0 whenever one is present. Batches without a zero extreme skip the position search.
    """

    def exact(blocks):
        key = _first_sign_key(blocks, blocks == value[..., None])
        signed_zero = jnp.where((key & 1) == 1, jnp.float32(-0.0), jnp.float32(0.0))
        return jnp.where(value == 0, signed_zero, value)

    return lax.cond(jnp.any(value == 0), exact, lambda _: value, blocks)


def pack_nibbles(q: jax.Array) -> jax.Array:
    """Element j goes to the low nibble of byte j, element j+16 to its high nibble."""
    q = q.astype(jnp.uint8)
    lo, hi = q[..., :_HALF], q[..., _HALF:]
    return (lo & 0x0F) | (hi << 4)


def pack_high_bits(q: jax.Array) -> jax.Array:
    """Bit j of the uint32 ``qh`` is bit 4 of element j."""
    bits = (q.astype(jnp.uint32) >> 4) & 1
    return jnp.sum(bits << _bit_positions(bits.ndim), axis=-1, dtype=jnp.uint32)


def _bit_positions(ndim: int) -> jax.Array:
    return jnp.arange(BLOCK, dtype=jnp.uint32).reshape((1,) * (ndim - 1) + (BLOCK,))


def _symmetric(blocks: jax.Array, levels: int, qmax: int):
    """Q4_0 (levels=8) and Q5_0 (levels=16): d = max / -levels, q = trunc(x/d + levels + .5)."""
    mx = _first_absmax(blocks)
    d = mx / jnp.float32(-levels)  # division by a power of two: exact either way
    id_ = safe_recip(d)
    p = no_fma(blocks * id_[..., None])
    v = p + jnp.float32(levels + 0.5)
    # (int8)v truncates toward zero; v >= 0 for every finite block, so floor == trunc.
    q = jnp.minimum(jnp.trunc(v), jnp.float32(qmax)).astype(jnp.int32)
    return d.astype(jnp.float16), q


def _affine(blocks: jax.Array, qmax: int):
    """Q4_1 (qmax=15) and Q5_1 (qmax=31): d = (max-min)/qmax, q = trunc((x-min)/d + .5)."""
    # ggml's loop keeps the first element attaining the min (max); that only shows in
    # the sign of a zero min, which gguf's numpy leaves to SIMD lane order.
    mx = _first_extreme(blocks, jnp.max(blocks, axis=-1))
    mn = _first_extreme(blocks, jnp.min(blocks, axis=-1))
    d = exact_div(mx - mn, float(qmax))
    id_ = safe_recip(d)
    p = no_fma((blocks - mn[..., None]) * id_[..., None])
    v = p + jnp.float32(0.5)
    q = jnp.minimum(jnp.trunc(v), jnp.float32(qmax)).astype(jnp.int32)
    return d.astype(jnp.float16), mn.astype(jnp.float16), q


def _blocks(x: jax.Array) -> jax.Array:
    """Rows ``[..., n]`` as float32 blocks ``[..., n // 32, 32]``."""
    x = jnp.asarray(x, jnp.float32)
    return x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def quantize_q8_0(x: jax.Array) -> dict[str, jax.Array]:
    """Q8_0: ``d = amax / 127``, ``qs = round(x / d)`` (half away from zero)."""
    blocks = _blocks(x)
    amax = jnp.max(jnp.abs(blocks), axis=-1)
    d = exact_div(amax, 127.0)
    id_ = safe_recip(d)
    q = lax.round(blocks * id_[..., None], lax.RoundingMethod.AWAY_FROM_ZERO)
    return {"d": d.astype(jnp.float16), "qs": q.astype(jnp.int8)}


def quantize_q4_0(x: jax.Array) -> dict[str, jax.Array]:
    """Q4_0: 4-bit symmetric, ``x = (q - 8) * d``."""
    d, q = _symmetric(_blocks(x), 8, 15)
    return {"d": d, "qs": pack_nibbles(q)}


def quantize_q5_0(x: jax.Array) -> dict[str, jax.Array]:
    """Q5_0: 5-bit symmetric, ``x = (q - 16) * d``; bit 4 of every value in ``qh``."""
    d, q = _symmetric(_blocks(x), 16, 31)
    return {"d": d, "qh": pack_high_bits(q), "qs": pack_nibbles(q)}


def quantize_q4_1(x: jax.Array) -> dict[str, jax.Array]:
    """Q4_1: 4-bit affine, ``x = q * d + m``."""
    d, m, q = _affine(_blocks(x), 15)
    return {"d": d, "m": m, "qs": pack_nibbles(q)}


def quantize_q5_1(x: jax.Array) -> dict[str, jax.Array]:
    """Q5_1: 5-bit affine, ``x = q * d + m``; bit 4 of every value in ``qh``."""
    d, m, q = _affine(_blocks(x), 31)
    return {"d": d, "m": m, "qh": pack_high_bits(q), "qs": pack_nibbles(q)}


# Dequantizing is exact: an fp16 scale times a small integer is representable in
# float32, so the results don't depend on fused multiply-adds.


def dequantize_q8_0(fields: dict[str, jax.Array]) -> jax.Array:
    """Q8_0 fields -> float32 ``[..., nb, 32]``."""
    return fields["qs"].astype(jnp.float32) * fields["d"].astype(jnp.float32)[..., None]


def _quants(fields: dict[str, jax.Array]) -> jax.Array:
    """The unsigned quants of a nibble format, ``[..., nb, 32]`` uint8 (bit 4 from ``qh``)."""
    qs = fields["qs"]
    q = jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    if "qh" in fields:
        q = q | (_unpack_high_bits(fields["qh"]) << 4)
    return q


def _unpack_high_bits(qh: jax.Array) -> jax.Array:
    return ((qh[..., None] >> _bit_positions(qh.ndim + 1)) & 1).astype(jnp.uint8)


def dequantize_q4_0(fields: dict[str, jax.Array]) -> jax.Array:
    """Q4_0 fields -> float32 ``[..., nb, 32]``."""
    d = fields["d"].astype(jnp.float32)[..., None]
    return (_quants(fields).astype(jnp.float32) - 8.0) * d


def dequantize_q5_0(fields: dict[str, jax.Array]) -> jax.Array:
    """Q5_0 fields -> float32 ``[..., nb, 32]``."""
    d = fields["d"].astype(jnp.float32)[..., None]
    return (_quants(fields).astype(jnp.float32) - 16.0) * d


def _dequantize_affine(fields: dict[str, jax.Array]) -> jax.Array:
    d = fields["d"].astype(jnp.float32)[..., None]
    return _quants(fields).astype(jnp.float32) * d + fields["m"].astype(jnp.float32)[..., None]


def dequantize_q4_1(fields: dict[str, jax.Array]) -> jax.Array:
    """Q4_1 fields -> float32 ``[..., nb, 32]``."""
    return _dequantize_affine(fields)


def dequantize_q5_1(fields: dict[str, jax.Array]) -> jax.Array:
    """Q5_1 fields -> float32 ``[..., nb, 32]``."""
    return _dequantize_affine(fields)


def dequantize_halves(fields: dict[str, jax.Array], offset: float = 0.0) -> list[jax.Array]:
    """A nibble format's values as two halves, elements 0-15 and 16-31 of every block.

    Each half is ``[..., nb, 16]``: ``(q - offset) * d`` for the symmetric formats
    (``offset`` 8 or 16), ``q * d + m`` for the affine ones (``m`` present). ``jquant.dot``
    multiplies the halves separately (concatenating them per block costs more on CPU
    than the matmul) and interleaves the small result.
    """
    qs = fields["qs"]
    d = fields["d"].astype(jnp.float32)[..., None]
    halves = [qs & 0x0F, qs >> 4]
    if "qh" in fields:
        halves = [
            h | _high_bits(fields["qh"], first) for h, first in zip(halves, (0, _HALF), strict=True)
        ]
    out = []
    for q in halves:
        q = q.astype(jnp.float32)
        if "m" in fields:
            out.append(q * d + fields["m"].astype(jnp.float32)[..., None])
        else:
            out.append((q - offset) * d)
    return out


def _high_bits(qh: jax.Array, first: int) -> jax.Array:
    """Bits ``first .. first+15`` of each uint32 ``qh``, as bit 4 of a uint8."""
    shifts = jnp.arange(first, first + _HALF, dtype=jnp.uint32)
    shifts = shifts.reshape((1,) * qh.ndim + shifts.shape)
    return (((qh[..., None] >> shifts) & 1) << 4).astype(jnp.uint8)
