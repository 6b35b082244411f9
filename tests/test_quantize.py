"""The public single-tensor API: formats, the pytree, jit/vmap, errors."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jquant
from jquant import QuantType
from jquant._core.quantize import _dequantize_jit, _quantize_jit

FORMATS = list(QuantType)


# -- QuantType -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,bpw,bs,nbytes",
    [
        ("Q8_0", 8.5, 32, 34),
        ("Q4_0", 4.5, 32, 18),
        ("Q4_1", 5.0, 32, 20),
        ("Q5_0", 5.5, 32, 22),
        ("Q5_1", 6.0, 32, 24),
        ("F16", 16, 1, 2),
        ("BF16", 16, 1, 2),
        ("F32", 32, 1, 4),
    ],
)
def test_quant_type_table_matches_gguf(fmt, bpw, bs, nbytes):
    qt = QuantType.parse(fmt)
    assert (qt.bits_per_weight, qt.block_size, qt.bytes_per_block) == (bpw, bs, nbytes)
    ggml = gguf.GGMLQuantizationType[fmt]
    assert qt.ggml_type == ggml.value
    assert gguf.GGML_QUANT_SIZES[ggml] == (qt.block_size, qt.bytes_per_block)
    assert QuantType.parse(ggml) is qt and QuantType.parse(int(ggml)) is qt


@pytest.mark.parametrize(
    "name,expected",
    [
        ("q4_0", "Q4_0"),
        ("Q8_0", "Q8_0"),
        ("q5-1", "Q5_1"),
        ("int8", "Q8_0"),
        ("INT4", "Q4_0"),
        ("half", "F16"),
        ("bf16", "BF16"),
        ("f32", "F32"),
        (" Float32 ", "F32"),
    ],
)
def test_quant_type_parse_names_and_aliases(name, expected):
    assert QuantType.parse(name) is QuantType[expected]


@pytest.mark.parametrize("bad", ["q3_0", "", "int2", 99, None, 2.0, True])
def test_quant_type_parse_rejects_with_valid_names(bad):
    with pytest.raises(jquant.UnknownFormatError) as e:
        QuantType.parse(bad)
    assert "Q4_0" in str(e.value) and "int8" in str(e.value)
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)


def test_every_function_accepts_names_and_members():
    x = jnp.ones((2, 32))
    a = jquant.quantize_tensor(x, "q4_1").to_bytes()
    b = jquant.quantize_tensor(x, QuantType.Q4_1).to_bytes()
    c = jquant.quantize_tensor(x, gguf.GGMLQuantizationType.Q4_1).to_bytes()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


# -- QuantizedTensor -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_tensor_sizes(fmt):
    x = jax.random.normal(jax.random.key(0), (3, 5, 96))
    q = jquant.quantize_tensor(x, fmt)
    assert q.nbytes == 3 * 5 * fmt.row_bytes(96) == q.to_bytes().size
    assert sum(int(leaf.nbytes) for leaf in jax.tree.leaves(q)) == q.nbytes
    assert q.num_blocks == 15 * -(-96 // fmt.block_size)  # 96 values pad a 256-block
    assert q.compression_ratio() == pytest.approx(3 * 5 * 96 * 4 / q.nbytes)
    if 96 % fmt.block_size == 0:
        assert q.compression_ratio() == pytest.approx(32 / fmt.bits_per_weight)
    assert fmt.name in repr(q) and "(3, 5, 96)" in repr(q)


def test_quantized_tensor_is_a_pytree_with_static_metadata():
    q = jquant.quantize_tensor(jnp.ones((4, 64), jnp.bfloat16), "q5_1")
    leaves, treedef = jax.tree.flatten(q)
    assert [leaf.dtype for leaf in leaves] == [np.uint8, np.float16, np.float16, np.uint32]
    q2 = jax.tree.unflatten(treedef, leaves)
    assert (q2.shape, q2.dtype, q2.qtype) == ((4, 64), np.dtype(jnp.bfloat16), QuantType.Q5_1)
    doubled = jax.tree.map(lambda a: a, q)
    np.testing.assert_array_equal(doubled.to_bytes(), q.to_bytes())


def test_from_bytes_rejects_wrong_sizes():
    with pytest.raises(jquant.FileFormatError, match="needs 36 bytes"):
        jquant.QuantizedTensor.from_bytes(np.zeros(35, np.uint8), "q4_0", shape=(64,))
    with pytest.raises(jquant.FileFormatError, match="multiple"):
        jquant.QuantizedTensor.from_bytes(np.zeros(20, np.uint8), "q4_0")
    with pytest.raises(jquant.FileFormatError, match="uint8"):
        jquant.QuantizedTensor.from_bytes(np.zeros(18, np.int32), "q4_0")


def test_from_bytes_with_padded_logical_shape_round_trips():
    x = np.random.default_rng(0).standard_normal((3, 40)).astype(np.float32)
    q = jquant.quantize_tensor(x, "q8_0")
    q2 = jquant.QuantizedTensor.from_bytes(bytes(q.to_bytes()), "q8_0", shape=(3, 40))
    np.testing.assert_array_equal(jquant.dequantize_tensor(q2), jquant.dequantize_tensor(q))


# -- jit, vmap, recompilation ----------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_jit_and_eager_agree(fmt):
    x = jax.random.normal(jax.random.key(1), (8, 64)) * 3
    eager = jquant.quantize_tensor(x, fmt)
    jitted = jax.jit(jquant.quantize_tensor, static_argnums=1)(x, fmt)
    np.testing.assert_array_equal(eager.to_bytes(), jitted.to_bytes())
    y = jax.jit(jquant.dequantize_tensor)(jitted)
    np.testing.assert_array_equal(y, jquant.dequantize_tensor(eager))


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q5_1", "BF16"])
def test_vmap_over_leading_axis(fmt):
    x = jax.random.normal(jax.random.key(2), (5, 3, 70))
    batched = jax.vmap(lambda r: jquant.quantize_tensor(r, fmt))(x)
    whole = jquant.quantize_tensor(x, fmt)
    assert batched.shape == (3, 70)  # static metadata is per example
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(a, b)
    y = jax.vmap(jquant.dequantize_tensor)(batched)
    np.testing.assert_array_equal(y, jquant.dequantize_tensor(whole))


def test_second_call_with_same_shapes_does_not_recompile():
    x = jax.random.normal(jax.random.key(3), (16, 96))
    jquant.dequantize_tensor(jquant.quantize_tensor(x, "q4_0"))
    before = (_quantize_jit._cache_size(), _dequantize_jit._cache_size())
    for seed in range(3):
        x = jax.random.normal(jax.random.key(seed), (16, 96))
        jquant.dequantize_tensor(jquant.quantize_tensor(x, "q4_0"))
    assert (_quantize_jit._cache_size(), _dequantize_jit._cache_size()) == before


def test_user_jit_traces_once():
    traces = []

    @jax.jit
    def f(x):
        traces.append(1)
        return jquant.dequantize_tensor(jquant.quantize_tensor(x, "q8_0"))

    for seed in range(3):
        f(jax.random.normal(jax.random.key(seed), (4, 64)))
    assert len(traces) == 1


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x",
    [
        jnp.arange(64),
        jnp.ones(64, bool),
        jnp.ones(64, jnp.complex64),
        np.arange(64, dtype=np.uint8),
    ],
)
def test_non_float_dtypes_raise_type_error_naming_the_dtype(x):
    with pytest.raises(TypeError, match=str(np.dtype(x.dtype))) as e:
        jquant.quantize_tensor(x, "q4_0", name="layer/w")
    assert isinstance(e.value, jquant.UnsupportedDTypeError)
    assert "layer/w" in str(e.value)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_raise_with_block_index(fmt, bad):
    x = np.ones((4, 64), np.float32)
    x[2, 37] = bad
    with pytest.raises(jquant.NonFiniteError) as e:
        jquant.quantize_tensor(x, fmt, name="params/dense/kernel")
    msg = str(e.value)
    assert "params/dense/kernel" in msg and "block 5" in msg and "(2, 37)" in msg
    assert "F32" in msg  # the fix


@pytest.mark.parametrize(
    "fmt,value",
    [
        ("Q8_0", 65504 * 127 * 1.01),
        ("Q4_0", 65504 * 8 * 1.01),
        ("Q5_0", 65504 * 16 * 1.01),
        ("Q4_1", 1e6),
        ("F16", 7e4),
    ],
)
def test_scale_overflow_raises(fmt, value):
    x = np.ones((2, 64), np.float32)
    x[1, 40] = value
    with pytest.raises(jquant.ScaleOverflowError, match="float16|F16") as e:
        jquant.quantize_tensor(x, fmt, name="emb")
    assert "emb" in str(e.value) and "F32" in str(e.value)


@pytest.mark.parametrize(
    "fmt,value",
    [("Q8_0", 65504 * 127 * 0.99), ("Q4_0", 65504 * 8 * 0.99), ("Q5_0", 65504 * 16 * 0.99)],
)
def test_values_just_below_the_overflow_bound_pass(fmt, value):
    x = np.ones((2, 64), np.float32)
    x[1, 40] = value
    y = jquant.dequantize_tensor(jquant.quantize_tensor(x, fmt))
    assert np.isfinite(np.asarray(y)).all()


def test_f32_and_bf16_keep_non_finite_values_faithfully():
    x = jnp.array([1.0, jnp.nan, jnp.inf, -jnp.inf])
    for fmt in ("F32", "BF16", "F16"):
        y = np.asarray(jquant.dequantize_tensor(jquant.quantize_tensor(x, fmt)))
        assert np.isnan(y[1]) and y[2] == np.inf and y[3] == -np.inf


@pytest.mark.parametrize("fmt", ["F16", "BF16"])
def test_float_formats_flag_overflow_even_beside_kept_nans(fmt):
    x = np.ones((2, 40), np.float32)
    x[0, 1] = np.nan
    jquant.quantize_tensor(x, fmt)  # NaN alone is stored as NaN, no error
    x[1, 7] = np.finfo(np.float32).max  # rounds to Inf in F16 and in BF16
    with pytest.raises(jquant.ScaleOverflowError, match=r"\(1, 7\)"):
        jquant.quantize_tensor(x, fmt)


def test_unchecked_path_gives_nan_like_ggml():
    x = np.ones((1, 32), np.float32)
    x[0, 3] = np.nan
    y = jquant.dequantize_tensor(jquant.quantize_tensor(x, "q8_0", check=False))
    assert np.isnan(np.asarray(y)).any()


def test_checked_variant_under_jit_uses_checkify():
    f = checkify.checkify(
        jax.jit(lambda x: jquant.quantize_tensor(x, "q4_0", check=True, name="w"))
    )
    good = jnp.ones((2, 64))
    err, q = f(good)
    assert err.get() is None and q.shape == (2, 64)
    err, _ = f(good.at[1, 3].set(jnp.inf))
    assert "w" in err.get() and "67" in err.get()  # flat element 1*64+3


def test_unchecked_under_jit_by_default():
    # Inside jit the default check=None can't raise: values are abstract.
    q = jax.jit(lambda x: jquant.quantize_tensor(x, "q4_0"))(jnp.full((1, 32), jnp.nan))
    assert q.shape == (1, 32)


def test_python_lists_and_scalars():
    q = jquant.quantize_tensor([1.0, 2.0, 3.0], "q8_0")
    assert q.shape == (3,) and jquant.dequantize_tensor(q).shape == (3,)
    assert jquant.quantize_tensor(2.5, "q4_0").shape == ()
    with pytest.raises(jquant.UnsupportedDTypeError, match="int"):
        jquant.quantize_tensor([1, 2], "q8_0")
    with pytest.raises(jquant.UnsupportedDTypeError):
        jquant.quantize_tensor("abc", "q8_0")


def test_dequantize_rejects_non_quantized_input():
    with pytest.raises(TypeError, match="QuantizedTensor"):
        jquant.dequantize_tensor(jnp.ones(3))


def test_dequantize_to_another_dtype():
    q = jquant.quantize_tensor(jnp.ones((2, 32)), "q8_0")
    assert jquant.dequantize_tensor(q, jnp.bfloat16).dtype == jnp.bfloat16


def test_clip_bounds_values_before_quantizing():
    x = jnp.concatenate([jnp.linspace(-1, 1, 31), jnp.array([100.0])])
    plain = jquant.dequantize_tensor(jquant.quantize_tensor(x, "q4_0"))
    clipped = jquant.dequantize_tensor(jquant.quantize_tensor(x, "q4_0", clip=(-1.0, 1.0)))
    assert float(jnp.max(clipped)) <= 1.0 + 1e-6
    inliers = slice(0, 31)
    assert float(jnp.abs(clipped - x)[inliers].mean()) < float(jnp.abs(plain - x)[inliers].mean())


def test_stats():
    x = jax.random.normal(jax.random.key(0), (64, 64))
    for fmt in ("Q8_0", "Q4_0"):
        y = jquant.dequantize_tensor(jquant.quantize_tensor(x, fmt))
        s = jquant.compute_quantization_stats(x, y, fmt)
        err = np.asarray(x, np.float64) - np.asarray(y, np.float64)
        assert s.rmse == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-5)
        assert s.max_error == pytest.approx(np.abs(err).max(), rel=1e-6)
        assert s.mean_error == pytest.approx(np.abs(err).mean(), rel=1e-5)
        sqnr = 10 * np.log10(np.sum(np.asarray(x, np.float64) ** 2) / np.sum(err**2))
        assert s.sqnr_db == pytest.approx(sqnr, rel=1e-5)
    assert jquant.compute_quantization_stats(x, x, "f32").sqnr_db == float("inf")
    with pytest.raises(jquant.ShapeError):
        jquant.compute_quantization_stats(x, x[:3], "q8_0")
