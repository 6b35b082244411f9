"""Bad values are refused for every format, whether or not its scales carry them.

The K-quant and IQ4 scale searches route around a NaN/Inf (ggml's own output there is an
Inf or garbage scale), so their records set ``max_abs`` and the checks read the input.
"""

from __future__ import annotations

import numpy as np
import pytest

import jquant
from jquant._formats.registry import formats

BLOCK_FORMATS = [s.name for s in formats() if s.is_block_quantized and s.qtype is not None]


def _rows(bad: float) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)
    x[2, 300] = bad
    return x


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(fmt, bad):
    with pytest.raises(jquant.NonFiniteError, match=r"element \(2, 300\)"):
        jquant.quantize_tensor(_rows(bad), fmt, name="w")
    with pytest.raises(jquant.NonFiniteError, match="w"):
        jquant.quantize_model({"w": _rows(bad)}, fmt)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_values_beyond_the_fp16_scale_are_refused(fmt):
    with pytest.raises(jquant.ScaleOverflowError, match=fmt):
        jquant.quantize_tensor(_rows(1e30), fmt)


@pytest.mark.parametrize("fmt", [s.name for s in formats() if s.max_abs is not None])
def test_the_bound_is_where_the_scale_overflows(fmt):
    """Just inside ``max_abs`` a block quantizes to finite values; 2x beyond is refused."""
    spec = jquant.QuantType.parse(fmt).spec
    x = np.zeros((1, spec.block_size), np.float32)
    x[0, 0] = spec.max_abs * 0.9
    q = jquant.quantize_tensor(x, fmt)
    assert np.isfinite(np.asarray(jquant.dequantize_tensor(q))).all()
    x[0, 0] = spec.max_abs * 2
    with pytest.raises(jquant.ScaleOverflowError):
        jquant.quantize_tensor(x, fmt)
