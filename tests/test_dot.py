"""jquant.dot and jquant.dense: x @ W on quantized weights without the float weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jquant
from jquant._core.dot import dense, dot

FORMATS = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f16", "bf16", "f32"]
# (in, out) Flax kernels: aligned, ragged last axis, out < 32, 3-D (DenseGeneral), one row
SHAPES = [(96, 64), (70, 100), (33, 10), (40, 3, 48), (1, 37)]
HIGHEST = lax.Precision.HIGHEST


def _weight(shape, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_identity_reproduces_dequantize_bit_for_bit(fmt, shape):
    # e_k @ W is row k of W: every dequantized chunk must be exactly dequantize_tensor's.
    qw = jquant.quantize_tensor(_weight(shape), fmt)
    eye = jnp.eye(shape[0], dtype=jnp.float32)
    got = jax.jit(lambda x, w: dot(x, w, chunk_rows=16, precision=HIGHEST))(eye, qw)
    want = jquant.dequantize_tensor(qw, jnp.float32)
    assert got.shape == want.shape == shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q5_1", "bf16"])
@pytest.mark.parametrize("chunk_rows", [None, 1, 7])  # None: the whole K in one slab
def test_matches_dequantize_then_matmul(fmt, chunk_rows):
    shape = (96, 70)
    qw = jquant.quantize_tensor(_weight(shape), fmt)
    x = _weight((2, 3, 96), seed=1)
    got = jax.jit(lambda x, w: dot(x, w, chunk_rows=chunk_rows, precision=HIGHEST))(x, qw)
    w = np.asarray(jquant.dequantize_tensor(qw, jnp.float32), np.float64)
    want = np.asarray(x, np.float64) @ w
    assert got.shape == (2, 3, 70) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_close_to_float_weight():
    w = _weight((256, 128))
    x = _weight((8, 256), seed=1)
    y = dot(x, jquant.quantize_tensor(w, "q8_0"))
    ref = x @ w
    rel = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    assert rel < 0.01  # Q8_0 keeps ~45 dB SQNR on Gaussian weights


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_are_explicit(x_dtype):
    qw = jquant.quantize_tensor(_weight((64, 32), dtype=jnp.bfloat16), "q4_0")
    x = _weight((4, 64), seed=1, dtype=x_dtype)
    y = dot(x, qw)
    assert y.dtype == x_dtype
    assert dot(x, qw, preferred_element_type=jnp.float32).dtype == jnp.float32
    ref = x.astype(jnp.float32) @ jquant.dequantize_tensor(qw, jnp.float32)
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(ref.astype(x_dtype), np.float32), rtol=2e-2, atol=0.1
    )


def test_plain_and_one_dimensional_weights():
    w = _weight((64, 48))
    x = _weight((5, 64), seed=1)
    np.testing.assert_allclose(dot(x, w, precision=HIGHEST), x @ w, rtol=1e-5, atol=1e-5)
    v = _weight((64,), seed=2)
    qv = jquant.quantize_tensor(v, "q8_0")
    got = dot(x, qv, precision=HIGHEST)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, x @ jquant.dequantize_tensor(qv), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_with_the_fix():
    qw = jquant.quantize_tensor(_weight((64, 32)), "q8_0")
    with pytest.raises(jquant.ShapeError, match=r"\(3, 32\).*\(64, 32\).*\(in, out\)"):
        dot(jnp.ones((3, 32)), qw)
    with pytest.raises(jquant.UnsupportedDTypeError, match="astype"):
        dot(jnp.ones((3, 64), jnp.int32), qw)
    batched = jax.vmap(lambda a: jquant.quantize_tensor(a, "q8_0"))(_weight((2, 64, 32)))
    with pytest.raises(jquant.ShapeError, match="vmap"):
        dot(jnp.ones((3, 64)), batched)


def test_no_recompile_for_new_weights_of_same_shape():
    f = jax.jit(dot)
    x = _weight((2, 64), seed=3)
    for seed in range(3):
        f(x, jquant.quantize_tensor(_weight((64, 100), seed), "q4_1")).block_until_ready()
    assert f._cache_size() == 1


def test_grad_and_vmap_through_dot():
    qw = jquant.quantize_tensor(_weight((64, 40)), "q5_0")
    w = jquant.dequantize_tensor(qw)
    x = _weight((3, 64), seed=1)
    g = jax.grad(lambda x: jnp.sum(dot(x, qw, chunk_rows=10) ** 2))(x)
    g_ref = jax.grad(lambda x: jnp.sum((x @ w) ** 2))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
    v = jax.vmap(lambda r: dot(r, qw))(x)
    np.testing.assert_allclose(v, x @ w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_temporaries_far_smaller_than_float_weight(fmt):
    # XLA's own accounting: the compiled jquant.dot never holds the float weight.
    shape = (2048, 1024)
    float_bytes = 4 * shape[0] * shape[1]  # 8 MiB
    qw = jquant.quantize_tensor(_weight(shape), fmt)
    x = jnp.ones((8, shape[0]), jnp.float32)
    mem = jax.jit(dot).lower(x, qw).compile().memory_analysis()
    naive = (
        jax.jit(lambda x, w: x @ jquant.dequantize_tensor(w)).lower(x, qw).compile()
    ).memory_analysis()
    assert mem.temp_size_in_bytes < float_bytes / 4, mem.temp_size_in_bytes
    assert naive.temp_size_in_bytes >= float_bytes  # the baseline does materialise it
    assert mem.argument_size_in_bytes < 0.3 * float_bytes  # only packed bytes go in


def test_dense_takes_flax_and_haiku_layer_dicts():
    w, b = _weight((64, 20)), _weight((20,), seed=4)
    x = _weight((3, 64), seed=1)
    qw = jquant.quantize_tensor(w, "q8_0")
    ref = x @ jquant.dequantize_tensor(qw) + b[None]
    for layer in ({"kernel": qw, "bias": b}, {"w": qw, "b": b}):
        np.testing.assert_allclose(jax.jit(dense)(x, layer), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense(x, qw, b), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense(x, {"kernel": qw}), ref - b[None], rtol=1e-5, atol=1e-5)
    qb = jquant.quantize_tensor(b, "f16")
    np.testing.assert_allclose(
        dense(x, qw, qb),
        x @ jquant.dequantize_tensor(qw) + b.astype(jnp.float16).astype(jnp.float32)[None],
        rtol=1e-5,
        atol=1e-5,
    )
    assert dense(x.astype(jnp.bfloat16), qw, b).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="kernel"):
        dense(x, {"weight": qw})
    with pytest.raises(ValueError, match="twice"):
        dense(x, {"kernel": qw, "bias": b}, b)


def test_public_names():
    assert jquant.dot is dot and jquant.dense is dense
