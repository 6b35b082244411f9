"""The float formats F16, BF16 and F32: one value per "block", stored as itself.

Same interface as the block kernels (``FIELDS_*``, ``quantize_*(x)``, ``dequantize_*``)
with a block of one value: the single field ``qs`` is ``[..., n]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

__all__ = [
    "FIELDS_BF16",
    "FIELDS_F16",
    "FIELDS_F32",
    "dequantize_float",
    "quantize_bf16",
    "quantize_f16",
    "quantize_f32",
]

FIELDS_F16 = (("qs", np.dtype("<f2"), ()),)
FIELDS_BF16 = (("qs", np.dtype(ml_dtypes.bfloat16), ()),)
FIELDS_F32 = (("qs", np.dtype("<f4"), ()),)


def quantize_f16(x: jax.Array) -> dict[str, jax.Array]:
    """IEEE half precision, round to nearest even."""
    return {"qs": jnp.asarray(x, jnp.float32).astype(jnp.float16)}


def quantize_bf16(x: jax.Array) -> dict[str, jax.Array]:
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN forced quiet."""
    n = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    is_nan = (n & 0x7FFFFFFF) > 0x7F800000
    rounded = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    nan = (n >> 16) | 64
    bits = jnp.where(is_nan, nan, rounded).astype(jnp.uint16)
    return {"qs": lax.bitcast_convert_type(bits, jnp.bfloat16)}


def quantize_f32(x: jax.Array) -> dict[str, jax.Array]:
    """float32 as is."""
    return {"qs": jnp.asarray(x, jnp.float32)}


def dequantize_float(fields: dict[str, jax.Array]) -> jax.Array:
    """The stored values as float32 ``[..., n, 1]`` (blocks of one value)."""
    return fields["qs"].astype(jnp.float32)[..., None]
