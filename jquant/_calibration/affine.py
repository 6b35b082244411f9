"""Per-tensor (or per-channel) affine integer quantization: ``quantize_affine`` and back.

``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`` and
``x ≈ (q - zero_point) * scale``, the convention of PyTorch's quantized tensors and of
ONNX ``QuantizeLinear``. Use it for activations with the ``(scale, zero_point)`` from
:meth:`jquant.CalibrationData.asymmetric_scale`; weights use the GGML block formats.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import CalibrationError
from .._formats.guards import exact_div

__all__ = ["affine_range", "dequantize_affine", "quantize_affine"]


def affine_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)``: ``[0, 2**bits - 1]`` unsigned, ``[-2**(bits-1), 2**(bits-1) - 1]`` signed."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise CalibrationError(
            f"bits={bits!r}: quantize_affine stores 2..8-bit integers (int8, uint8, int4, ...)"
        )
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _check_scale(scale) -> None:
    if isinstance(scale, jax.core.Tracer):
        return
    s = np.asarray(scale, np.float32)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise CalibrationError(
            f"affine scale must be finite and > 0, got {s.ravel()[:4]}; take it from "
            "calibrate(...).asymmetric_scale(qtype), which never returns a zero scale"
        )


def quantize_affine(
    x: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike,
    zero_point: jax.typing.ArrayLike,
    bits: int = 8,
    *,
    signed: bool = False,
) -> jax.Array:
    """Quantize to ``bits``-bit integers: ``clamp(round(x / scale) + zero_point)``.

    Rounding is half to even (``jnp.round``); ``x / scale`` is a true division. NaN maps
    to the zero point (the value 0); infinities saturate.

    Args:
        x: floating-point array.
        scale: positive scale, a scalar or an array broadcastable to ``x`` (per channel).
        zero_point: integer zero point in the target range, broadcastable like ``scale``.
        bits: 8 for int8/uint8, 4 for int4/uint4 (any of 2..8).
        signed: ``False`` (default): ``[0, 2**bits - 1]`` stored as uint8, the range
          :meth:`~jquant.CalibrationData.asymmetric_scale` targets. ``True``:
          ``[-2**(bits-1), 2**(bits-1) - 1]`` stored as int8 (int4 values live in int8).

    Returns:
        uint8 (or int8 when ``signed``) array shaped like ``x``.

    Raises:
        CalibrationError: ``bits`` outside 2..8, or a concrete scale that is not > 0.

    Example:
        >>> import jax.numpy as jnp, jquant
        >>> x = jnp.array([-1.0, 0.0, 0.5, 0.75, 9.0])
        >>> q = jquant.quantize_affine(x, 0.25, 4, bits=4)
        >>> q.tolist(), q.dtype
        ([0, 4, 6, 7, 15], dtype('uint8'))
        >>> jquant.dequantize_affine(q, 0.25, 4).tolist()
        [-1.0, 0.0, 0.5, 0.75, 2.75]
    """
    qmin, qmax = affine_range(bits, signed)
    _check_scale(scale)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise CalibrationError(f"quantize_affine takes floating-point input, got {x.dtype}")
    x = x.astype(jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    zp = jnp.asarray(zero_point).astype(jnp.float32)
    q = jnp.round(exact_div(x, scale)) + zp
    q = jnp.where(jnp.isnan(q), zp, q)
    return jnp.clip(q, qmin, qmax).astype(jnp.int8 if signed else jnp.uint8)


def dequantize_affine(
    q: jax.typing.ArrayLike,
    scale: jax.typing.ArrayLike,
    zero_point: jax.typing.ArrayLike,
    dtype=jnp.float32,
) -> jax.Array:
    """``(q - zero_point) * scale`` in ``dtype`` (float32 by default).

    Example:
        >>> import jax.numpy as jnp, jquant
        >>> jquant.dequantize_affine(jnp.array([0, 128, 255], jnp.uint8), 0.5, 128).tolist()
        [-64.0, 0.0, 63.5]
    """
    q = jnp.asarray(q)
    diff = q.astype(jnp.int32) - jnp.asarray(zero_point).astype(jnp.int32)
    return (diff.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(dtype)
