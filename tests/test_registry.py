"""The format table: every engine runs a format it has never heard of, from one record.

A throw-away 256-value format (int8 quants, a float32 scale and int16 sums of 16 quants,
the layout of ggml's Q8_K, id 15) is registered for these tests only, runs through
every engine (single tensor, bytes, chunked model, sharded model, dot/dense, GGUF) and
is unregistered again.
"""

import pickle
import warnings

import chex
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jquant
from jquant._formats import registry
from jquant._formats.guards import exact_div, safe_recip
from jquant._formats.registry import FormatSpec

BLOCK = 256
FIELDS = (
    ("d", np.dtype("<f4"), ()),
    ("qs", np.dtype(np.int8), (BLOCK,)),
    ("bsums", np.dtype("<i2"), (16,)),
)


def _quantize(x):
    b = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    d = exact_div(jnp.max(jnp.abs(b), axis=-1), 127.0)  # as numpy divides
    inv = safe_recip(d)
    q = jnp.round(b * inv[..., None]).astype(jnp.int8)
    bsums = jnp.sum(q.astype(jnp.int16).reshape(*q.shape[:-1], 16, 16), axis=-1, dtype=jnp.int16)
    return {"d": d, "qs": q, "bsums": bsums}


def _quantize_weighted(x, qw):
    # columns without importance are zeroed: shows that the weights reach the encoder
    return _quantize(jnp.where(qw > 0, x, 0.0))


def _dequantize(fields):
    return fields["qs"].astype(jnp.float32) * fields["d"][..., None]


def _numpy_bytes(x):
    """The format's bytes computed independently in numpy (rows a multiple of 256)."""
    b = x.astype(np.float32).reshape(*x.shape[:-1], -1, BLOCK)
    d = (np.abs(b).max(-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.round(b * inv[..., None]).astype(np.int8)
    bsums = q.astype(np.int16).reshape(*q.shape[:-1], 16, 16).sum(-1, dtype=np.int16)
    parts = [d.astype("<f4")[..., None].view(np.uint8), q.view(np.uint8), bsums.astype("<i2")]
    parts[2] = parts[2].view(np.uint8)
    return np.concatenate(parts, axis=-1).reshape(*x.shape[:-1], -1)


SPEC = FormatSpec(
    "TEST_Q8_256",
    15,
    BLOCK,
    FIELDS,
    _quantize,
    _dequantize,
    "test-only: int8 quants over 256 values, f32 scale, int16 sums of 16",
    quantize_weighted=_quantize_weighted,
    scales=("d",),
    overflow="a finite input",
    bits=8,
)


@pytest.fixture(scope="module", autouse=True)
def test_format():
    registry.register(SPEC)
    yield SPEC
    registry.unregister(SPEC)


def _x(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_record_sizes_and_lookup():
    assert (
        SPEC.bytes_per_block
        == 4 + 256 + 32
        == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K][1]
    )
    for name in ("test_q8_256", "TEST-Q8-256", 15, SPEC):
        assert jquant.QuantType.parse(name) is SPEC
    with pytest.raises(jquant.UnknownFormatError, match="TEST_Q8_256"):
        jquant.QuantType.parse("q9_9")
    with pytest.raises(jquant.QuantError, match="already registered"):
        registry.register(FormatSpec("OTHER", 15, 32, FIELDS, _quantize, _dequantize, "x"))


def test_builtin_records_match_ggml_sizes():
    for spec in registry.formats():
        if spec is SPEC:
            continue
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(spec.ggml_type)]
        assert (spec.block_size, spec.bytes_per_block) == (block, size), spec.name
        assert spec.qtype.spec is spec and spec.name == spec.qtype.name


def test_tensor_bytes_and_round_trip():
    x = _x(4, 512)
    q = jquant.quantize_tensor(x, SPEC)
    assert q.qtype is SPEC and q.nbytes == 4 * 2 * 292
    chex.assert_shape([q.d, q.qs, q.bsums], [(4, 2), (4, 2, 256), (4, 2, 16)])
    chex.assert_type([q.d, q.qs, q.bsums], [jnp.float32, jnp.int8, jnp.int16])
    np.testing.assert_array_equal(q.to_bytes(), _numpy_bytes(x))
    back = jquant.QuantizedTensor.from_bytes(q.to_bytes(), SPEC, x.shape)
    chex.assert_trees_all_equal(back, q)
    y = jquant.dequantize_tensor(q)
    d = np.repeat(np.asarray(q.d), BLOCK, axis=-1)
    assert np.all(np.abs(np.asarray(y) - x) <= d / 2 + 1e-6)


def test_ragged_rows_pad_inside_the_last_block():
    x = _x(3, 600)  # 2 blocks and 88 values
    q = jquant.quantize_tensor(x, SPEC)
    chex.assert_shape(q.qs, (3, 3, 256))
    padded = np.concatenate([x, np.repeat(x[:, -1:], 168, axis=1)], axis=1)
    np.testing.assert_array_equal(q.to_bytes(), _numpy_bytes(padded))
    assert jquant.dequantize_tensor(q).shape == (3, 600)


def test_checks_name_the_block():
    x = _x(2, 512)
    x[1, 300] = np.nan
    with pytest.raises(jquant.NonFiniteError, match=r"block 3 \(element \(1, 300\)\)"):
        jquant.quantize_tensor(x, SPEC)
    with pytest.raises(jquant.NonFiniteError, match="'w'"):
        jquant.quantize_model({"w": x}, SPEC, min_size=0)


def test_model_chunked_engine_matches_quantize_tensor():
    params = {
        "big": _x(1100, 256, seed=1),  # more than one chunk of 1024 blocks
        "ragged": _x(5, 300, seed=2),
        "tiny": _x(7, seed=3),
        "empty": np.zeros((3, 0), np.float32),
    }
    qp, rep = jquant.quantize_model(
        params, SPEC, min_size=0, keep_1d=False, report=True, chunk_blocks=1024
    )
    for k, x in params.items():
        ref = jquant.quantize_tensor(x, SPEC)
        chex.assert_trees_all_equal(qp[k], jax.device_put(ref), custom_message=k)
    row = {r.path: r for r in rep.rows}["ragged"]
    x = params["ragged"]
    st = jquant.compute_quantization_stats(x, jquant.dequantize_tensor(qp["ragged"]), SPEC)
    assert row.format == "TEST_Q8_256"
    np.testing.assert_allclose(row.rmse, st.rmse, rtol=1e-5)
    np.testing.assert_allclose(row.max_error, st.max_error, rtol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sharded_engine_keeps_shardings_and_bytes():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    x = _x(16, 2048, seed=4)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))  # 512 values per shard
    q = jquant.quantize_model({"w": xs}, SPEC, min_size=0)["w"]
    np.testing.assert_array_equal(q.to_bytes(), jquant.quantize_tensor(x, SPEC).to_bytes())
    assert q.qs.sharding.spec == P("data", "model", None)
    assert q.bsums.sharding.spec == P("data", "model", None)
    assert q.d.sharding.spec == P("data", "model")
    back = jquant.dequantize_model({"w": q})["w"]
    assert back.sharding.spec == P("data", "model")
    np.testing.assert_array_equal(np.asarray(back), np.asarray(jquant.dequantize_tensor(q)))
    straddling = jax.device_put(_x(16, 1536), NamedSharding(mesh, P("data", "model")))
    with pytest.raises(jquant.ShapeError, match="256-value TEST_Q8_256 block"):
        jquant.quantize_model({"w": straddling}, SPEC, min_size=0)


def test_dot_and_dense():
    w = _x(64, 600, seed=5)
    qw = jquant.quantize_tensor(w, SPEC)
    x = _x(3, 64, seed=6)
    ref = x @ np.asarray(jquant.dequantize_tensor(qw))
    np.testing.assert_allclose(
        np.asarray(jquant.dot(x, qw, chunk_rows=16)), ref, rtol=1e-5, atol=1e-4
    )
    y = jquant.dense(x, {"kernel": qw, "bias": jnp.ones(600)})
    np.testing.assert_allclose(np.asarray(y), ref + 1, rtol=1e-5, atol=1e-4)


def test_gguf_save_load(tmp_path):
    q = jquant.quantize_tensor(_x(8, 512, seed=7), SPEC)
    ragged = jquant.quantize_tensor(_x(2, 300, seed=8), SPEC)
    path = tmp_path / "t.gguf"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jquant.save_gguf(path, {"w": q, "r": ragged})
    assert any("'r'" in str(w.message) or "r " in str(w.message) for w in caught)
    back = jquant.load_gguf(path)
    chex.assert_trees_all_equal(back["w"], q)
    assert back["r"].qtype is jquant.QuantType.F32  # no fallback: the dequantized values
    np.testing.assert_array_equal(
        np.asarray(jquant.dequantize_tensor(back["r"])),
        np.asarray(jquant.dequantize_tensor(ragged)),
    )
    reader = gguf.GGUFReader(path)
    t = {t.name: t for t in reader.tensors}["w"]
    assert int(t.tensor_type) == 15
    np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), q.to_bytes().reshape(-1))


def test_imatrix_routes_to_the_weighted_encoder():
    x = _x(2, 512, seed=9)
    w = np.ones(512, np.float32)
    w[:10] = 0
    q = jquant.quantize_tensor(x, SPEC, imatrix=w)
    y = np.asarray(jquant.dequantize_tensor(q))
    assert np.all(y[:, :10] == 0) and np.any(y[:, 10:] != 0)
    with pytest.raises(jquant.ShapeError, match="'emb'.*shape \\(512,\\)"):
        jquant.quantize_tensor(x, SPEC, imatrix=w[:100], name="emb")
    w[3] = -1
    with pytest.raises(jquant.QuantError, match="'emb'.*column 3"):
        jquant.quantize_tensor(x, SPEC, imatrix=w, name="emb")
    with pytest.raises(jquant.QuantError, match="Q8_0 has no importance-weighted"):
        jquant.quantize_tensor(x, "q8_0", imatrix=np.ones(512, np.float32))


def test_quantized_tensor_fields_come_from_the_record():
    q = jquant.quantize_tensor(_x(2, 64), "q5_1")
    assert list(q.fields) == ["qs", "d", "m", "qh"] and q.spec is jquant.QuantType.Q5_1.spec
    assert jquant.quantize_tensor(_x(2, 64), "q4_0").m is None  # absent legacy fields read None
    with pytest.raises(jquant.ShapeError, match="holds the fields"):
        jquant.QuantizedTensor({"qs": q.qs}, shape=(2, 64), qtype="q5_1")
    with pytest.raises(AttributeError, match="immutable"):
        q.shape = (1,)
    chex.assert_trees_all_equal(pickle.loads(pickle.dumps(q)), q)
