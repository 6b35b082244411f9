"""What the dequantize kernels share: :func:`store_once`.

A decoder that broadcasts per-group values (scales unpacked from 6-bit fields, int8
quants unpacked from bit planes) over a 256-value block is fused by XLA into one loop
that recomputes the producers for every output value, and whose odd layout keeps the
float multiply from vectorising on CPU. Storing those values first and scaling in a
second, simple pass is several times faster (``benchmarks/results/dequant.md``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .guards import opaque

__all__ = ["store_once"]


def store_once(*values: jax.Array) -> tuple[jax.Array, ...]:
    """``values`` unchanged, computed once into memory before their consumers run.

    A while loop's operands are always buffers, so the values go through an identity
    loop whose trip count (1) the compiler can't see (it depends on the maximum of
    ``values[0]``, a float array: the per-group scales, small next to the output; the
    body passes the values through :func:`opaque`, or it would be simplified away).
    A reduction, not the first element: on a sharded array, ``reshape(-1)[0]`` makes the
    SPMD partitioner all-gather the whole operand, and with explicit sharding indexing a
    sharded axis is an error; a reduction all-reduces one scalar. Empty arrays pass
    through.
    """
    v0 = values[0]
    if v0.size == 0:
        return values
    one = opaque(jnp.int32(1), dep=jnp.max(v0.astype(jnp.float32)))

    def body(c):
        return (c[0] + 1, *(opaque(v) for v in c[1:]))

    return lax.while_loop(lambda c: c[0] < one, body, (jnp.int32(0), *values))[1:]
