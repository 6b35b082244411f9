"""Byte-exactness against gguf.quants (and ggml's C reference) on adversarial data."""

from __future__ import annotations

import functools

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jquant
from jquant import QuantType

from . import _ggml_ref

T = gguf.GGMLQuantizationType
BLOCK_FORMATS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
ALL_FORMATS = [*BLOCK_FORMATS, "F16", "BF16", "F32"]


def gguf_quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        out = gguf.quants.quantize(np.asarray(x, np.float32), T[fmt])
    return out.view(np.uint8).reshape(*x.shape[:-1], -1)


@functools.partial(jax.jit, static_argnames="fmt")
def _quantize_jit(x: jax.Array, fmt: str) -> jquant.QuantizedTensor:
    return jquant.quantize_tensor(x, fmt, check=False)


def ours(x, fmt: str) -> np.ndarray:
    """jquant's bytes under ``jax.jit``: one compile per (shape, dtype, format), reused by
    every test that quantizes an array of that shape (a fresh ``jax.jit`` per call
    recompiled every time)."""
    return _quantize_jit(jnp.asarray(x), fmt).to_bytes()


def _ties(rng, scale: float, grid: float, lo: int, hi: int, rows: int = 64) -> np.ndarray:
    """Values on a grid of `grid` steps (every .5 offset), each row forced to hit `hi`."""
    x = rng.integers(lo, hi + 1, size=(rows, 32)).astype(np.float32) * grid
    x[:, rng.integers(0, 32)] = hi * grid
    return (x * scale).astype(np.float32)


def adversarial_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261128)
    f = np.float32
    cases: dict[str, np.ndarray] = {
        "gaussian": rng.standard_normal((512, 64)).astype(f),
        "uniform": rng.uniform(-3, 7, (256, 64)).astype(f),
        "heavy_tails": (rng.standard_cauchy((256, 64)) * 0.1).astype(f),
        "student_t": (rng.standard_t(2, (256, 64)) * 0.02).astype(f),
        "zero": np.zeros((8, 64), f),
        "constant_pos": np.full((4, 64), 1.7, f),
        "constant_neg": np.full((4, 64), -3.25, f),
        "tiny_fp16_subnormal_d": (rng.standard_normal((256, 64)) * 1e-6).astype(f),
        "small": (rng.standard_normal((256, 64)) * 1e-20).astype(f),
        "huge_but_fitting": (rng.uniform(-1, 1, (256, 64)) * 5e5).astype(f),
        "mixed_magnitudes": (
            rng.standard_normal((256, 64)) * 10.0 ** rng.integers(-8, 4, (256, 1))
        ).astype(f),
        "f32_subnormal_inside_normal_blocks": np.where(
            rng.random((128, 64)) < 0.5, rng.standard_normal((128, 64)), 3e-40
        ).astype(f),
    }
    # .5 ties for every offset of every format: scales that make id exactly 1, 2, 0.5 ...
    for s in (1.0, 0.5, 2.0, 3.0, 1 / 3):
        cases[f"ties_q8_{s:.3g}"] = _ties(rng, s, 0.5, -254, 254) / f(2.0)
        cases[f"ties_q4_{s:.3g}"] = _ties(rng, s, 0.5, -16, 16)
        cases[f"ties_q5_{s:.3g}"] = _ties(rng, s, 0.5, -32, 32)
    for s in (1.0, 1 / 3, 0.1):
        cases[f"ties_affine_{s:.3g}"] = (rng.integers(0, 63, (256, 64)) * 0.5 * s - 7 * s).astype(f)
    cases["ties_quarter"] = (rng.integers(-16, 17, (256, 64)) * 0.25).astype(f)
    # the extreme is negative vs positive, and |min| == |max| ties in either order
    b = rng.uniform(-1, 1, (64, 32)).astype(f)
    b[:32, 3], b[:32, 20] = -2.0, 2.0
    b[32:, 3], b[32:, 20] = 2.0, -2.0
    cases["absmax_ties"] = b
    neg = rng.uniform(-1, 0.5, (64, 32)).astype(f)
    neg[:, 7] = -4.0
    cases["extreme_negative"] = neg
    cases["extreme_positive"] = -neg
    cases["negative_extremes_f32"] = np.where(
        rng.random((16, 32)) < 0.5, -np.finfo(f).max / 1e6, 1.0
    ).astype(f)
    # the fast path (no ties) with zero blocks mixed in, some starting with -0
    g = rng.standard_normal((128, 64)).astype(f)
    g[::7, :32] = 0.0
    g[::14, 0] = -0.0
    g[3::11, 32:] = -0.0
    cases["gaussian_with_signed_zero_blocks"] = g
    # one tie among many ordinary blocks sends the whole batch down the exact path
    one_tie = rng.standard_normal((128, 64)).astype(f)
    one_tie[77, 40], one_tie[77, 50] = -9.0, 9.0
    cases["one_tie_in_many"] = one_tie
    return cases


CASES = adversarial_cases()


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_quantize_is_byte_exact_with_gguf(fmt, case):
    x = CASES[case]
    if fmt == "F16" and np.abs(x).max() > 65504:
        pytest.skip("overflows F16 by design (tested in test_errors)")
    got, want = ours(x, fmt), gguf_quantize(x, fmt)
    if fmt in BLOCK_FORMATS and np.signbit(x[x == 0]).any():
        # gguf and ggml disagree on the sign of zero scales/minima made from -0 values;
        # see test_matches_ggml_c_reference_on_signed_zeros. ggml's C loop is the oracle.
        want = _ggml_ref.quantize(x, fmt)
    bad = np.nonzero((got != want).reshape(-1, got.shape[-1] // max(1, x.shape[-1] // 32)).any(-1))
    assert got.shape == want.shape
    assert not bad[0].size, f"{len(bad[0])} blocks differ, first {bad[0][:5]}"


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_many_random_blocks(fmt):
    """A million values of mixed scales; a single FMA or reciprocal rewrite shows up here."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((1024, 1024)) * 10.0 ** rng.integers(-3, 3, (1024, 1))).astype(
        np.float32
    )
    np.testing.assert_array_equal(ours(x, fmt), gguf_quantize(x, fmt))


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_input_dtypes(fmt, dtype):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((32, 96)), dtype)
    want = gguf_quantize(np.asarray(x.astype(jnp.float32)), fmt)
    np.testing.assert_array_equal(ours(x, fmt), want)
    q = jquant.quantize_tensor(x, fmt)
    assert q.dtype == np.dtype(dtype)
    assert jquant.dequantize_tensor(q).dtype == np.dtype(dtype)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_1", "BF16"])
def test_float64_input_with_x64(fmt):
    rng = np.random.default_rng(4)
    x64 = rng.standard_normal((8, 64)) * 3
    with jax.enable_x64(True):
        q = jquant.quantize_tensor(jnp.asarray(x64), fmt)
        assert q.dtype == np.float64
        y = jquant.dequantize_tensor(q)
        assert y.dtype == jnp.float64
    np.testing.assert_array_equal(q.to_bytes(), gguf_quantize(x64.astype(np.float32), fmt))


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(), (1,), (5,), (31,), (33,), (3, 70), (2, 3, 100), (4, 32)])
def test_ragged_and_small_shapes(fmt, shape):
    """Rows are padded with their last value: bytes equal gguf on the edge-padded array."""
    rng = np.random.default_rng(sum(shape) + 1)
    x = rng.standard_normal(shape).astype(np.float32)
    q = jquant.quantize_tensor(x, fmt)
    rows = x.reshape(-1, shape[-1] if shape else 1)
    qt = QuantType.parse(fmt)
    n = rows.shape[-1]
    padded_n = -(-n // qt.block_size) * qt.block_size
    padded = np.pad(rows, [(0, 0), (0, padded_n - n)], mode="edge")
    want = gguf_quantize(padded, fmt).reshape(*(shape[:-1] if shape else ()), -1)
    np.testing.assert_array_equal(q.to_bytes().reshape(want.shape), want)
    y = jquant.dequantize_tensor(q)
    assert y.shape == shape and y.dtype == np.float32
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(gguf_quantize(padded, fmt), T[fmt])[:, :n]
    np.testing.assert_array_equal(np.asarray(y).reshape(ref.shape), ref)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(0,), (0, 64), (3, 0), (2, 0, 5)])
def test_empty_arrays(fmt, shape):
    q = jquant.quantize_tensor(jnp.zeros(shape, jnp.float32), fmt)
    assert q.nbytes == 0 and q.num_blocks == 0 and q.shape == shape
    assert jquant.dequantize_tensor(q).shape == shape
    raw = q.to_bytes()
    assert raw.size == 0 and raw.shape[:-1] == shape[:-1]
    back = jquant.QuantizedTensor.from_bytes(raw, fmt, shape=shape)
    assert jquant.dequantize_tensor(back).shape == shape


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_dequantize_matches_gguf_on_gguf_bytes(fmt):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((64, 128)) * rng.uniform(1e-3, 1e3, (64, 1))).astype(np.float32)
    raw = gguf_quantize(x, fmt)
    q = jquant.QuantizedTensor.from_bytes(raw, fmt)
    assert q.shape == x.shape
    np.testing.assert_array_equal(
        np.asarray(jquant.dequantize_tensor(q)), gguf.quants.dequantize(raw, T[fmt])
    )
    np.testing.assert_array_equal(q.to_bytes(), raw)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_dequantize_matches_gguf_on_random_bytes(fmt):
    """Any byte pattern with finite fp16 scales decodes exactly as gguf decodes it."""
    qt = QuantType.parse(fmt)
    rng = np.random.default_rng(12)
    raw = rng.integers(0, 256, (128, 4 * qt.bytes_per_block), dtype=np.uint8)
    if fmt == "F32":
        raw = rng.standard_normal((128, 128)).astype(np.float32).view(np.uint8)
    elif fmt == "F16":
        raw = rng.standard_normal((128, 128)).astype(np.float16).view(np.uint8)
    elif qt.is_block_quantized:
        blocks = raw.reshape(-1, qt.bytes_per_block)
        n_scales = 2 if fmt in ("Q4_1", "Q5_1") else 1
        for s in range(n_scales):  # finite fp16: exponent bits not all ones
            blocks[:, 2 * s + 1] &= 0x7B
    q = jquant.QuantizedTensor.from_bytes(raw, fmt)
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(raw, T[fmt])
    np.testing.assert_array_equal(np.asarray(jquant.dequantize_tensor(q)), want)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_matches_ggml_c_reference_on_signed_zeros(fmt):
    """Blocks made of +0/-0 (and zero minima): jquant follows ggml's C loop.

    The two references disagree here. gguf's numpy reduces min/max with SIMD lanes, so the
    sign of a zero min in Q4_1/Q5_1 depends on lane order, and for Q4_0/Q5_0 it takes the
    sign of an all-zero block's first element where ggml's loop starts from +0. ggml's C
    code is the reference gguf stands in for, so jquant follows it (checked against the
    compiled C itself in tests/test_llama_cpp.py where llama-cpp-python is installed).
    Zero blocks of +0 only, the common case, are identical in all three.
    """
    rng = np.random.default_rng(5)
    x = np.zeros((48, 32), np.float32)
    for i in range(48):
        x[i, rng.random(32) < rng.random()] = -0.0
    x[40:, 10:] = rng.uniform(0, 1, (8, 22))  # zero minima beside positive values
    np.testing.assert_array_equal(ours(x, fmt), _ggml_ref.quantize(x, fmt))
    plus_zero = np.zeros((4, 32), np.float32)
    np.testing.assert_array_equal(ours(plus_zero, fmt), gguf_quantize(plus_zero, fmt))


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_c_reference_port_agrees_with_gguf(fmt):
    """The second oracle agrees with the first on ordinary data (so both are trustworthy)."""
    parts = [
        CASES[c].reshape(-1, 32)[:24]
        for c in ("gaussian", "ties_q4_0.333", "ties_affine_0.333", "absmax_ties")
    ]
    x = np.concatenate(parts)
    np.testing.assert_array_equal(_ggml_ref.quantize(x, fmt), gguf_quantize(x, fmt))


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_blocks_of_f32_subnormals_dequantize_identically(fmt):
    """All-subnormal blocks: ggml's 1/d overflows (undefined float->int casts follow);
    jquant encodes them as zero-scale blocks. The decoded values are identical."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((64, 32)) * 1e-40).astype(np.float32)
    got = jquant.dequantize_tensor(jquant.quantize_tensor(x, fmt))
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(gguf_quantize(x, fmt), T[fmt])
    np.testing.assert_array_equal(np.asarray(got), want)  # +0 == -0
    assert not np.any(np.asarray(got))


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_scale_overflow_unchecked_matches_gguf(fmt):
    """With check=False, even blocks whose fp16 scale overflows keep gguf's exact bytes."""
    rng = np.random.default_rng(8)
    x = (rng.uniform(-1, 1, (32, 64)) * 1e30).astype(np.float32)
    np.testing.assert_array_equal(ours(x, fmt), gguf_quantize(x, fmt))


@pytest.mark.parametrize(
    "fmt,golden",
    [
        ("Q4_0", 0.001121),
        ("Q4_1", 0.001144),
        ("Q5_0", 0.000591),
        ("Q5_1", 0.000556),
        ("Q8_0", 0.000074),
    ],
)
def test_ggml_golden_total_error(fmt, golden):
    """ggml tests/test-quantize-fns.cpp: x[i] = 0.1 + 2 cos(i), n = 4096."""
    n = 4096
    x = (0.1 + 2 * np.cos(np.arange(n))).astype(np.float32)
    y = np.asarray(jquant.dequantize_tensor(jquant.quantize_tensor(x, fmt)), np.float64)
    total = np.sqrt(np.sum((x.astype(np.float64) - y) ** 2)) / n
    assert f"{total:.6f}" == f"{golden:.6f}"


def test_bf16_nan_and_rounding_bits():
    x = np.array(
        [np.nan, -np.nan, np.inf, -np.inf, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3e38, -0.0] * 4, np.float32
    )
    x[1] = np.frombuffer(np.uint32(0xFF800001).tobytes(), np.float32)[0]  # signalling NaN
    got = ours(x, "BF16")
    np.testing.assert_array_equal(got, gguf_quantize(x, "BF16"))
    y = jquant.dequantize_tensor(jquant.QuantizedTensor.from_bytes(got, "BF16"))
    assert y.dtype == np.float32 and np.isnan(np.asarray(y)[:2]).all()
    assert np.asarray(jquant.quantize_tensor(x, "BF16").qs).dtype == ml_dtypes.bfloat16


def test_the_adversarial_data_catches_a_naive_port():
    """Without the guards in _kernels.py, XLA:CPU fuses x*id + 8.5 into an FMA and the
    1/3-scaled ties differ from ggml: proof that the data above can see the bug."""
    if jax.default_backend() != "cpu":
        pytest.skip("the contraction shown here is XLA:CPU's")
    x = jnp.asarray(CASES["ties_q4_0.333"].reshape(-1, 32))

    @jax.jit
    def naive_q4_0(b):
        idx = jnp.argmax(jnp.abs(b), axis=-1, keepdims=True)
        d = jnp.take_along_axis(b, idx, axis=-1) / -8.0
        id_ = jnp.where(d == 0, 0.0, 1.0 / d)
        return jnp.minimum(jnp.trunc(b * id_ + 8.5), 15.0).astype(jnp.uint8)

    q = np.asarray(jquant.quantize_tensor(x, "q4_0").qs)
    guarded = np.concatenate([q & 15, q >> 4], axis=-1).reshape(-1, 32)
    naive = np.asarray(naive_q4_0(x))
    assert (naive != guarded).any(-1).sum() > 0
    ref = gguf_quantize(np.asarray(x), "Q4_0")[:, 2:]
    np.testing.assert_array_equal(guarded, np.concatenate([ref & 15, ref >> 4], axis=-1))
