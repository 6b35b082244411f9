"""Guards that keep XLA's float arithmetic exactly as ggml's C writes it.

XLA rewrites float arithmetic in ways C compilers don't by default (x86-64 ggml is built
without FMA and evaluates in source order), and each rewrite changes a few blocks per
million, or for the K-quant scale searches up to a third of them:

* :func:`exact_div` and :func:`safe_recip` hide the divisor from the compiler
  (:func:`opaque`) so that ``x / 127`` is not turned into ``x * (1/127)`` and
  ``1 / (a / c)`` is not simplified to ``c / a``.
* :func:`no_fma` passes a product through an integer identity LLVM can't see through, so
  the multiply and the add that follows are never contracted into one fused
  multiply-add (an FMA rounds once, ggml rounds twice).
* :func:`nearest_int` is ggml's magic-constant rounding (round half to even).
* :func:`sequential_sum` adds in C's loop order (``jnp.sum`` reduces as a tree).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "TINY",
    "exact_div",
    "nearest_int",
    "no_fma",
    "opaque",
    "safe_recip",
    "sequential_sum",
]

TINY = float(jnp.finfo(jnp.float32).tiny)
"""2**-126, the smallest normal float32."""


def opaque(x: jax.Array, dep: jax.Array | None = None) -> jax.Array:
    """``x`` unchanged, in a form neither XLA nor LLVM can reason about.

    The bits of ``x`` are xor-ed with ``dep != dep`` (0 unless ``dep`` is NaN, and then
    the result is NaN anyway). No compiler can prove that zero, so the value that comes
    out is a run-time unknown: it isn't constant-folded, a division by it can't become
    a multiply by a reciprocal, ``1 / (a / c)`` can't be simplified, and a product
    passed through it must be rounded before the add that follows (no FMA contraction).
    Optimization barriers, selects and ``reduce_precision`` don't survive XLA's fusion
    passes for this (tests/test_exact.py's 1/3-scaled ties catch them).
    """
    dep = x if dep is None else dep
    uint = jnp.dtype(f"uint{8 * jnp.dtype(x.dtype).itemsize}")
    bits = lax.bitcast_convert_type(x, uint)
    bits = bits ^ (dep != dep).astype(uint)
    return lax.bitcast_convert_type(bits, x.dtype)


def exact_div(a: jax.Array | float, b: jax.Array | float) -> jax.Array:
    """``a / b`` computed as an IEEE division, never as a multiply by ``1/b``.

    Each operand is made opaque on the other at full (broadcast) shape, so the guard
    holds for a constant numerator too: ``c / x`` can't become ``c * (1/x)``,
    ``A / broadcast(B)`` can't become ``A * broadcast(1/B)``, and ``1 / (c / x)`` can't
    be simplified to ``x / c``. Integer operands divide in float32.
    """
    dtype = jnp.result_type(a, b)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    a = jnp.asarray(a, dtype)
    b = jnp.asarray(b, dtype)
    shape = jnp.broadcast_shapes(a.shape, b.shape)
    a = opaque(jnp.broadcast_to(a, shape), dep=jnp.broadcast_to(b, shape))
    return a / opaque(jnp.broadcast_to(b, shape), dep=a)


def safe_recip(d: jax.Array) -> jax.Array:
    """ggml's ``id = d ? 1.0f/d : 0.0f``, with ``d`` opaque to the simplifier.

    A scale that is an f32 subnormal counts as zero. XLA:CPU flushes subnormals to zero
    anyway; doing it explicitly keeps every backend identical. Such a block's fp16 scale
    is 0 in ggml too, so it dequantizes to the same values; only its (meaningless)
    quants differ from ggml's, whose ``1/d`` there is huge or infinite.
    """
    d = opaque(d)
    normal = jnp.abs(d) >= TINY
    return jnp.where(normal, 1.0 / jnp.where(normal, d, 1.0), 0.0)


def no_fma(product: jax.Array) -> jax.Array:
    """``product``, rounded: the add that follows can't be fused into an FMA with it."""
    return opaque(product)


def nearest_int(x: jax.Array) -> jax.Array:
    """ggml's ``nearest_int``: ``x + 1.5 * 2**23``, low 23 mantissa bits, minus ``2**22``.

    Round half to even for ``|x| < 2**22``, and bit for bit what the C returns outside
    that range. ``x`` is passed through :func:`opaque` first, so a product feeding it is
    rounded before the add (no FMA). Returns int32.
    """
    v = opaque(jnp.asarray(x, jnp.float32)) + jnp.float32(12582912.0)
    bits = lax.bitcast_convert_type(v, jnp.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def sequential_sum(terms: jax.Array, axis: int = -1) -> jax.Array:
    """``sum`` over ``axis`` added strictly left to right in float32, as a C loop does.

    ``terms`` should already be rounded (pass products through :func:`no_fma`), or the
    compiler may fuse a product into the running sum. For short axes (<= 64) the adds
    are unrolled; longer ones run as a ``fori_loop``.
    """
    terms = jnp.moveaxis(jnp.asarray(terms), axis, 0)
    n = terms.shape[0]
    if n == 0:
        return jnp.zeros(terms.shape[1:], terms.dtype)
    if n <= 64:
        acc = terms[0]
        for i in range(1, n):
            acc = acc + terms[i]
        return acc
    return lax.fori_loop(1, n, lambda i, acc: acc + terms[i], terms[0])
