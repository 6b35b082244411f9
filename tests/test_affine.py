"""quantize_affine / dequantize_affine against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jquant
from jquant import CalibrationError, dequantize_affine, quantize_affine

GRIDS = [  # bits, signed, qmin, qmax, dtype
    (8, False, 0, 255, np.uint8),
    (8, True, -128, 127, np.int8),
    (4, True, -8, 7, np.int8),
    (4, False, 0, 15, np.uint8),
]


def np_quantize(x, scale, zp, qmin, qmax):
    q = np.round(x.astype(np.float32) / np.float32(scale)) + zp  # np.round: half to even
    return np.clip(q, qmin, qmax)


@pytest.mark.parametrize("bits,signed,qmin,qmax,dtype", GRIDS)
def test_matches_numpy(bits, signed, qmin, qmax, dtype):
    rng = np.random.default_rng(bits + signed)
    x = (rng.normal(size=(64, 33)) * 3).astype(np.float32)
    scale = np.float32(0.037)
    zp = (qmin + qmax + 1) // 2
    q = jax.jit(lambda v: quantize_affine(v, scale, zp, bits, signed=signed))(x)
    assert q.dtype == dtype and q.shape == x.shape
    want = np_quantize(x, scale, zp, qmin, qmax)
    np.testing.assert_array_equal(np.asarray(q).astype(np.int64), want.astype(np.int64))
    y = dequantize_affine(q, scale, zp)
    np.testing.assert_array_equal(
        np.asarray(y), ((want - zp).astype(np.float32) * scale).astype(np.float32)
    )
    # inside the grid the error is at most half a step
    inside = (want > qmin) & (want < qmax)
    assert np.all(np.abs(np.asarray(y) - x)[inside] <= scale / 2 * (1 + 1e-6))


def test_ties_round_half_to_even_and_clamp():
    scale = 0.5
    x = jnp.array([0.25, 0.75, 1.25, -0.25, -0.75, 1000.0, -1000.0, jnp.inf, -jnp.inf])
    q = quantize_affine(x, scale, 0, 8, signed=True)
    # x/scale = .5 1.5 2.5 -.5 -1.5 -> 0 2 2 -0 -2; saturate at the grid's ends
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128, 127, -128]
    q = quantize_affine(x, scale, 10, 4)
    assert q.tolist() == [10, 12, 12, 10, 8, 15, 0, 15, 0]


def test_nan_maps_to_the_zero_point():
    q = quantize_affine(jnp.array([jnp.nan, 1.0]), 1.0, 3, 8)
    assert q.tolist() == [3, 4]
    assert float(dequantize_affine(q, 1.0, 3)[0]) == 0.0


def test_per_channel_scales_broadcast():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 16)).astype(np.float32) * np.arange(1, 5, dtype=np.float32)[:, None]
    c = jquant.calibrate(x, jquant.CalibrationMethod.MinMax, axis=0)
    s, z = c.asymmetric_scale("q8_0")
    assert s.shape == z.shape == (4, 1)
    q = quantize_affine(x, s, z)
    for r in range(4):
        want = np_quantize(x[r], float(s[r, 0]), int(z[r, 0]), 0, 255)
        np.testing.assert_array_equal(np.asarray(q[r]).astype(np.int64), want.astype(np.int64))
    y = dequantize_affine(q, s, z)
    assert float(jnp.max(jnp.abs(y - x) - s / 2)) <= 1e-6


@given(
    st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=50),
    st.floats(0.0009765625, 10, width=32),
    st.sampled_from(GRIDS),
)
def test_property_round_trip_within_half_step(values, scale, grid):
    bits, signed, qmin, qmax, _ = grid
    x = np.array(values, np.float32)
    zp = (qmin + qmax + 1) // 2
    q = quantize_affine(x, scale, zp, bits, signed=signed)
    np.testing.assert_array_equal(
        np.asarray(q).astype(np.int64), np_quantize(x, scale, zp, qmin, qmax).astype(np.int64)
    )
    # quantize(dequantize(q)) == q: the grid points are fixed points
    y = dequantize_affine(q, scale, zp)
    q2 = quantize_affine(y, scale, zp, bits, signed=signed)
    np.testing.assert_array_equal(np.asarray(q2), np.asarray(q))


def test_bad_arguments():
    for scale in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(CalibrationError, match="finite and > 0"):
            quantize_affine(jnp.ones(3), scale, 0)
    for bits in (1, 9, 16, True, 8.0):
        with pytest.raises(CalibrationError, match="bits"):
            quantize_affine(jnp.ones(3), 1.0, 0, bits)
    with pytest.raises(CalibrationError, match="floating-point"):
        quantize_affine(jnp.arange(3), 1.0, 0)


def test_signed_zero_point_from_calibration():
    x = jnp.linspace(-1.0, 3.0, 101)
    c = jquant.calibrate(x, "minmax")
    s, zu = c.asymmetric_scale("q8_0")
    s2, zs = c.asymmetric_scale("q8_0", signed=True)
    assert float(s) == float(s2) and int(zs) == int(zu) - 128
    yu = dequantize_affine(quantize_affine(x, s, zu), s, zu)
    ys = dequantize_affine(quantize_affine(x, s, zs, signed=True), s, zs)
    np.testing.assert_array_equal(np.asarray(yu), np.asarray(ys))
