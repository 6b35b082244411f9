"""Quantization error statistics: :func:`compute_quantization_stats`."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ShapeError
from .._formats.quant_type import QuantType, QuantTypeLike
from .blocks import error_stats, error_sums

__all__ = ["QuantizationStats", "compute_quantization_stats"]


@dataclasses.dataclass(frozen=True)
class QuantizationStats:
    """What quantizing one tensor cost.

    Attributes:
        rmse: root mean squared error ``sqrt(mean((x - y)^2))``.
        max_error: largest absolute error.
        mean_error: mean absolute error.
        compression_ratio: original bits per value over the format's bits per weight.
        sqnr_db: signal-to-quantization-noise ratio, ``10 log10(sum x^2 / sum (x-y)^2)``
          (``inf`` for a lossless result).
        bits_per_weight: the format's storage bits per value, scales included.
        count: number of values compared.

    Example:
        >>> import jax.numpy as jnp, jquant
        >>> x = jnp.linspace(-1, 1, 64)
        >>> s = jquant.compute_quantization_stats(x, x, "f16")
        >>> s.rmse, s.sqnr_db, s.to_dict()["bits_per_weight"]
        (0.0, inf, 16.0)
    """

    rmse: float
    max_error: float
    mean_error: float
    compression_ratio: float
    sqnr_db: float
    bits_per_weight: float
    count: int

    def to_dict(self) -> dict[str, float]:
        """The fields as a plain dict (for JSON or a DataFrame)."""
        return dataclasses.asdict(self)


_error_sums = jax.jit(error_sums)


def compute_quantization_stats(
    original: jax.typing.ArrayLike,
    dequantized: jax.typing.ArrayLike,
    qtype: QuantTypeLike,
    *,
    source_bits: int | None = None,
) -> QuantizationStats:
    """Compare a tensor with its quantize-dequantize round trip, as the seed crate does.

    Args:
        original: the tensor before quantization.
        dequantized: ``dequantize_tensor(quantize_tensor(original, qtype))``.
        qtype: the format used, for the compression ratio and bits per weight.
        source_bits: bits per value of the original (defaults to its dtype's width).

    Raises:
        ShapeError: if the two shapes differ.

    Example:
        >>> import jax, jquant
        >>> x = jax.random.normal(jax.random.key(0), (256, 256))
        >>> y = jquant.dequantize_tensor(jquant.quantize_tensor(x, "q8_0"))
        >>> s = jquant.compute_quantization_stats(x, y, "q8_0")
        >>> round(s.compression_ratio, 2), s.rmse < 0.01, s.sqnr_db > 35
        (3.76, True, True)
    """
    qtype = QuantType.parse(qtype)
    x, y = jnp.asarray(original), jnp.asarray(dequantized)
    if x.shape != y.shape:
        raise ShapeError(
            f"original has shape {x.shape} but dequantized has shape {y.shape}; compare a "
            f"tensor with its own round trip"
        )
    if source_bits is None:
        source_bits = 8 * np.dtype(x.dtype).itemsize
    n = int(np.prod(x.shape))
    if n == 0:
        return QuantizationStats(
            0.0, 0.0, 0.0, source_bits / qtype.bits_per_weight, math.inf, qtype.bits_per_weight, 0
        )
    rmse, mx, mean, sqnr = error_stats(*(float(v) for v in _error_sums(x, y)), n)
    return QuantizationStats(
        rmse=rmse,
        max_error=mx,
        mean_error=mean,
        compression_ratio=source_bits / qtype.bits_per_weight,
        sqnr_db=sqnr,
        bits_per_weight=qtype.bits_per_weight,
        count=n,
    )
