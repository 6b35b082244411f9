"""Dequantizing into a reused buffer: ``dequantize_tensor(q, out=)``, ``dequantize_model(out=)``.

The result must be bit for bit ``gguf.quants.dequantize`` (as without ``out``), and XLA
must really write into ``out``'s memory (that is the point: no freshly mapped pages).
"""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

import jquant
from jquant import QuantType, ShapeError
from jquant._formats.registry import formats

BLOCK_FORMATS = [s.qtype for s in formats() if s.is_block_quantized and s.qtype is not None]


def random_bytes(qt: QuantType, rows: int, cols: int, seed: int) -> np.ndarray:
    """Any quant bits, finite fp16 fields (subnormals, zeros and both signs included)."""
    rng = np.random.default_rng(seed)
    spec = qt.spec
    layout = np.dtype([(f.name, f.dtype, f.shape) for f in spec.fields])
    assert layout.itemsize == spec.bytes_per_block
    raw = rng.integers(0, 256, rows * cols // spec.block_size * layout.itemsize, dtype=np.uint8)
    blocks = raw.view(layout)
    for f in spec.fields:
        if f.dtype.kind == "f":
            bits = rng.integers(0, 0x7C00, blocks[f.name].shape).astype(np.uint16)
            bits |= rng.integers(0, 2, bits.shape).astype(np.uint16) << 15
            blocks[f.name] = bits.view(np.float16)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qt", BLOCK_FORMATS, ids=lambda q: q.name)
def test_out_is_bit_exact_and_reuses_the_buffer(qt):
    rows, cols = 8, 512
    data = random_bytes(qt, rows, cols, seed=qt.ggml_type)
    q = jquant.QuantizedTensor.from_bytes(data, qt, (rows, cols))
    want = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(qt.ggml_type))
    buf = jnp.full((rows, cols), 7.0, jnp.float32)
    where = buf.unsafe_buffer_pointer()
    got = jquant.dequantize_tensor(q, out=buf)
    assert buf.is_deleted()  # donated
    assert got.unsafe_buffer_pointer() == where  # written in place
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), want.view(np.uint32))
    fresh = jquant.dequantize_tensor(q)
    np.testing.assert_array_equal(np.asarray(fresh).view(np.uint32), want.view(np.uint32))


def test_out_keeps_padded_rows_and_dtypes():
    x = jax.random.normal(jax.random.key(0), (3, 40), jnp.bfloat16)
    q = jquant.quantize_tensor(x, "q4_k")
    want = jquant.dequantize_tensor(q)
    got = jquant.dequantize_tensor(q, out=jnp.zeros((3, 40), jnp.bfloat16))
    assert got.dtype == jnp.bfloat16 and got.shape == (3, 40)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # out's dtype is the default target dtype; an explicit dtype must agree with it
    as_f32 = jquant.dequantize_tensor(q, out=jnp.zeros((3, 40), jnp.float32))
    assert as_f32.dtype == jnp.float32
    with pytest.raises(ShapeError, match="dtype"):
        jquant.dequantize_tensor(q, jnp.float32, out=jnp.zeros((3, 40), jnp.bfloat16))


def test_out_rejects_wrong_buffers():
    q = jquant.quantize_tensor(jnp.ones((4, 64)), "q8_0")
    with pytest.raises(ShapeError, match=r"\(4, 64\)"):
        jquant.dequantize_tensor(q, out=jnp.zeros((4, 32), jnp.float32))
    with pytest.raises(TypeError, match="jax.Array"):
        jquant.dequantize_tensor(q, out=np.zeros((4, 64), np.float32))


def test_out_is_ignored_under_jit():
    q = jquant.quantize_tensor(jax.random.normal(jax.random.key(1), (4, 256)), "q6_k")
    f = jax.jit(lambda q, o: jquant.dequantize_tensor(q, out=o))
    got = f(q, jnp.zeros((4, 256), jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jquant.dequantize_tensor(q)))


def test_dequantize_model_into_an_earlier_result():
    k = jax.random.split(jax.random.key(2), 3)
    params = {
        "a": jax.random.normal(k[0], (64, 256)),
        "b": [jax.random.normal(k[1], (32, 512)), jnp.ones(7)],
    }
    qp = jquant.quantize_model(params, "q4_k", min_size=1)
    first = jquant.dequantize_model(qp)
    # copies: a live numpy view (np.asarray) of a buffer keeps XLA from reusing it
    want = jax.tree.map(lambda a: np.array(a, copy=True), first)
    where = first["a"].unsafe_buffer_pointer()
    again = jquant.dequantize_model(qp, out=first)
    assert again["a"].unsafe_buffer_pointer() == where
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again), want)
    with pytest.raises(ShapeError, match="structure"):
        jquant.dequantize_model(qp, out={"a": again["a"]})


def test_reusing_out_in_a_loop_compiles_once():
    from jquant._core.quantize import _dequantize_into_jit

    q = jquant.quantize_tensor(jax.random.normal(jax.random.key(3), (16, 96)), "q5_1")
    y = jquant.dequantize_tensor(q, out=jnp.zeros((16, 96), jnp.float32))
    before = _dequantize_into_jit._cache_size()
    for _ in range(3):
        y = jquant.dequantize_tensor(q, out=y)
    assert _dequantize_into_jit._cache_size() == before


@pytest.mark.parametrize("qt", ["q4_k", "q6_k", "q3_k", "iq4_xs"])
def test_sharded_decode_gathers_nothing(qt):
    # the decoders store their scales once (decode.store_once); that must stay shard-local
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jquant._core.quantize import dequantize_leaves

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    # Auto axes, as the sharded engine (jquant._model.sharding) runs the decoders
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    q = jquant.quantize_tensor(jax.random.normal(jax.random.key(4), (16, 1024)), qt)
    leaves = {
        k: jax.device_put(v, NamedSharding(mesh, P("data", "model"))) for k, v in q.leaves().items()
    }
    fn = jax.jit(lambda lv: dequantize_leaves(lv, q.qtype, q.shape, np.dtype(np.float32)))
    hlo = fn.lower(leaves).compile().as_text()
    for op in ("all-gather", "all-to-all", "collective-permute"):
        assert op not in hlo, op
    np.testing.assert_array_equal(np.asarray(fn(leaves)), np.asarray(jquant.dequantize_tensor(q)))
