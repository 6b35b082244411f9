"""Per-format block kernels, byte-exact with ggml's reference quantizer.

Every kernel takes float32 blocks shaped ``[..., n_blocks, 32]`` and reduces over the
last axis, so leading axes (and their shardings) pass through untouched.

XLA rewrites float arithmetic in ways C compilers don't by default, and each rewrite
changes a few blocks per million. The guards below keep the arithmetic exactly as
ggml writes it:

* ``_exact_div`` and ``_safe_recip`` hide the divisor from the compiler (``_opaque``) so
  that ``x / 127`` is not turned into ``x * (1/127)`` and ``1 / (a / c)`` is not
  simplified to ``c / a``.
* ``_no_fma`` passes a product through an integer identity LLVM can't see through, so
  the multiply and the add that follows are never contracted into one fused
  multiply-add (an FMA rounds once, ggml rounds twice).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .guards import TINY, exact_div, no_fma, opaque, safe_recip
from .quant_type import QuantType

__all__ = ["dequantize_blocks", "quantize_blocks", "BLOCK"]

BLOCK = 32
_HALF = 16


_opaque = opaque
_exact_div = exact_div
_safe_recip = safe_recip
_no_fma = no_fma
_TINY = TINY


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


def _pack_nibbles(q: jax.Array) -> jax.Array:
    """Element j goes to the low nibble of byte j, element j+16 to its high nibble."""
    q = q.astype(jnp.uint8)
    lo, hi = q[..., :_HALF], q[..., _HALF:]
    return (lo & 0x0F) | (hi << 4)


def _unpack_nibbles(qs: jax.Array) -> jax.Array:
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _pack_high_bits(q: jax.Array) -> jax.Array:
    """Bit j of the uint32 ``qh`` is bit 4 of element j."""
    bits = (q.astype(jnp.uint32) >> 4) & 1
    return jnp.sum(bits << _bit_positions(bits.ndim), axis=-1, dtype=jnp.uint32)


def _unpack_high_bits(qh: jax.Array) -> jax.Array:
    return ((qh[..., None] >> _bit_positions(qh.ndim + 1)) & 1).astype(jnp.uint8)


def _bit_positions(ndim: int) -> jax.Array:
    return jnp.arange(BLOCK, dtype=jnp.uint32).reshape((1,) * (ndim - 1) + (BLOCK,))


def _symmetric(blocks: jax.Array, levels: int, qmax: int):
    """Q4_0 (levels=8) and Q5_0 (levels=16): d = max / -levels, q = trunc(x/d + levels + .5)."""
    mx = _first_absmax(blocks)
    d = mx / jnp.float32(-levels)  # division by a power of two: exact either way
    id_ = _safe_recip(d)
    p = _no_fma(blocks * id_[..., None])
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
    d = _exact_div(mx - mn, float(qmax))
    id_ = _safe_recip(d)
    p = _no_fma((blocks - mn[..., None]) * id_[..., None])
    v = p + jnp.float32(0.5)
    q = jnp.minimum(jnp.trunc(v), jnp.float32(qmax)).astype(jnp.int32)
    return d.astype(jnp.float16), mn.astype(jnp.float16), q


def _bf16_bits(x: jax.Array) -> jax.Array:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN forced quiet."""
    n = lax.bitcast_convert_type(x, jnp.uint32)
    is_nan = (n & 0x7FFFFFFF) > 0x7F800000
    rounded = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    nan = (n >> 16) | 64
    return jnp.where(is_nan, nan, rounded).astype(jnp.uint16)


def quantize_blocks(blocks: jax.Array, qtype: QuantType) -> dict[str, jax.Array]:
    """Quantize float32 ``[..., n_blocks, 32]`` blocks (or any shape for float formats).

    Returns the leaves of a :class:`~jquant.QuantizedTensor`: ``qs`` and, as the format
    needs them, ``d`` (fp16 scale), ``m`` (fp16 min) and ``qh`` (uint32 high bits).
    """
    if qtype is QuantType.Q8_0:
        amax = jnp.max(jnp.abs(blocks), axis=-1)
        d = _exact_div(amax, 127.0)
        id_ = _safe_recip(d)
        q = lax.round(blocks * id_[..., None], lax.RoundingMethod.AWAY_FROM_ZERO)
        return {"qs": q.astype(jnp.int8), "d": d.astype(jnp.float16)}
    if qtype is QuantType.Q4_0:
        d, q = _symmetric(blocks, 8, 15)
        return {"qs": _pack_nibbles(q), "d": d}
    if qtype is QuantType.Q5_0:
        d, q = _symmetric(blocks, 16, 31)
        return {"qs": _pack_nibbles(q), "d": d, "qh": _pack_high_bits(q)}
    if qtype is QuantType.Q4_1:
        d, m, q = _affine(blocks, 15)
        return {"qs": _pack_nibbles(q), "d": d, "m": m}
    if qtype is QuantType.Q5_1:
        d, m, q = _affine(blocks, 31)
        return {"qs": _pack_nibbles(q), "d": d, "m": m, "qh": _pack_high_bits(q)}
    if qtype is QuantType.F16:
        return {"qs": blocks.astype(jnp.float16)}
    if qtype is QuantType.BF16:
        return {"qs": lax.bitcast_convert_type(_bf16_bits(blocks), jnp.bfloat16)}
    if qtype is QuantType.F32:
        return {"qs": blocks.astype(jnp.float32)}
    raise AssertionError(qtype)  # QuantType.parse guarantees a known member


def dequantize_blocks(leaves: dict[str, jax.Array], qtype: QuantType) -> jax.Array:
    """Inverse of :func:`quantize_blocks`: float32 ``[..., n_blocks, 32]``.

    Exact: an fp16 scale times a small integer is representable in float32, so the
    result doesn't depend on fused multiply-adds.
    """
    qs = leaves["qs"]
    if not qtype.is_block_quantized:
        return qs.astype(jnp.float32)
    d = leaves["d"].astype(jnp.float32)[..., None]
    if qtype is QuantType.Q8_0:
        return qs.astype(jnp.float32) * d
    q = _unpack_nibbles(qs)
    if qtype in (QuantType.Q5_0, QuantType.Q5_1):
        q = q | (_unpack_high_bits(leaves["qh"]) << 4)
    if qtype is QuantType.Q4_0:
        return (q.astype(jnp.float32) - 8.0) * d
    if qtype is QuantType.Q5_0:
        return (q.astype(jnp.float32) - 16.0) * d
    return q.astype(jnp.float32) * d + leaves["m"].astype(jnp.float32)[..., None]
