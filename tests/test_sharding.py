"""Sharded parameters (NamedSharding over 8 fake CPU devices) quantize where they live."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jquant
from jquant import QuantizedTensor
from jquant._model.sharding import _sharded_fn, _sharded_out, _to_auto, quantize_sharded

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "model"))


def put(x, mesh, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def sharded_params(mesh):
    rng = np.random.default_rng(0)

    def w(*s):
        return rng.standard_normal(s).astype(np.float32)

    return {
        "col": put(w(64, 512), mesh, P("data", "model")),  # last axis 4 ways: 128 values/shard
        "row": put(w(512, 96), mesh, P("model", None)),  # ragged-free, rows split
        "ragged": put(w(16, 70), mesh, P(("data", "model"), None)),  # 70 values, rows split 8 ways
        "both": put(w(8, 16, 256), mesh, P("data", None, "model")),
        "replicated": put(w(32, 64), mesh, P()),
        "bias": put(w(512), mesh, P("model")),
        "local": jnp.asarray(w(40, 64)),  # on one device: the chunked path
    }


@pytest.mark.parametrize("fmt", ["q4_0", "q5_1", "bf16"])
def test_bytes_and_shardings(mesh, fmt):
    params = sharded_params(mesh)
    qp = jquant.quantize_model(params, fmt, min_size=0)
    for k, x in params.items():
        if k == "bias":
            assert qp[k] is x
            continue
        q = qp[k]
        assert isinstance(q, QuantizedTensor)
        np.testing.assert_array_equal(
            q.to_bytes(), jquant.quantize_tensor(np.asarray(x), fmt).to_bytes(), err_msg=k
        )
        if k == "local":
            continue
        spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        if q.qtype.is_block_quantized:
            # blocks along the last axis: its spec goes to the block axis
            assert q.qs.sharding.spec == P(*spec, None)
            assert q.d.sharding.spec == P(*spec)
        else:
            assert q.qs.sharding.spec == P(*spec)
        assert q.qs.sharding.mesh == mesh
        # each device holds only its shard of the packed data
        assert len(q.qs.addressable_shards) == 8
        shard_rows = x.addressable_shards[0].data.shape[:-1]
        assert q.qs.addressable_shards[0].data.shape[: len(shard_rows)] == shard_rows


def test_col_shard_is_a_quarter_of_the_blocks(mesh):
    x = sharded_params(mesh)["col"]
    q = jquant.quantize_model({"col": x}, "q4_0")["col"]
    # (64, 512) -> (64, 16, 16) packed; data splits rows 2 ways, model splits blocks 4 ways
    assert q.qs.shape == (64, 16, 16)
    assert {s.data.shape for s in q.qs.addressable_shards} == {(32, 4, 16)}
    assert {s.data.shape for s in q.d.addressable_shards} == {(32, 4)}


@pytest.mark.parametrize("fmt", ["q4_0", "f16"])
def test_no_gather_in_the_compiled_program(mesh, fmt):
    params = sharded_params(mesh)
    qtype = jquant.QuantType.parse(fmt)
    for k in ("col", "row", "both", "ragged"):
        x = _to_auto(params[k])
        sh = _sharded_out(x, qtype, k)
        fn = _sharded_fn(qtype, tuple(sorted(sh.items())), True)
        hlo = fn.lower(x).compile().as_text()
        for op in ("all-gather", "all-to-all", "collective-permute"):
            assert op not in hlo, (k, op)


def test_dequantize_restores_sharding(mesh):
    params = sharded_params(mesh)
    qp = jquant.quantize_model(params, "q5_0", min_size=0)
    back = jquant.dequantize_model(qp)
    for k, x in params.items():
        y = back[k]
        assert y.shape == x.shape and y.dtype == x.dtype
        if k != "local":
            assert y.sharding.is_equivalent_to(x.sharding, x.ndim), k
        if k == "bias":  # 1-D: kept as is
            assert y is x
            continue
        ref = jquant.dequantize_tensor(jquant.quantize_tensor(np.asarray(x), "q5_0"))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


def test_report_on_sharded_leaves(mesh):
    params = sharded_params(mesh)
    _, rep = jquant.quantize_model(params, "q8_0", min_size=0, report=True)
    for k in ("col", "ragged"):
        x = np.asarray(params[k])
        ref = jquant.compute_quantization_stats(
            x, jquant.dequantize_tensor(jquant.quantize_tensor(x, "q8_0")), "q8_0"
        )
        np.testing.assert_allclose(rep[k].rmse, ref.rmse, rtol=1e-5)
        assert rep[k].max_error == pytest.approx(ref.max_error, rel=1e-6)


def test_shard_splitting_a_block_raises(mesh):
    x = put(jnp.ones((8, 96)), mesh, P(None, "data"))  # 48 values per shard
    with pytest.raises(
        jquant.ShapeError, match=r"'w'.*48 values per shard.*PartitionSpec\('data', None\)"
    ):
        jquant.quantize_model({"w": x}, "q8_0", min_size=0)
    # float formats have no blocks: fine
    q = jquant.quantize_model({"w": x}, "f16", min_size=0)["w"]
    assert q.qs.sharding.spec == P(None, "data")
    # a rule keeping the leaf is the other way out
    assert jquant.quantize_model({"w": x}, {"w": None}, min_size=0)["w"] is x


def test_nan_in_sharded_leaf_names_path(mesh):
    x = np.ones((16, 256), np.float32)
    x[9, 200] = np.inf
    with pytest.raises(jquant.NonFiniteError, match=r"'layer/w'.*block 78"):
        jquant.quantize_model({"layer": {"w": put(x, mesh, P("data", "model"))}}, "q4_0")
    q, _ = quantize_sharded(
        put(x, mesh, P("data", "model")), jquant.QuantType.Q4_0, "w", check=False, stats=False
    )
    assert q.shape == (16, 256)


def test_auto_axis_mesh():
    from jax.sharding import AxisType, Mesh

    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = Mesh(devices, ("a", "b"), axis_types=(AxisType.Auto, AxisType.Auto))
    x = put(
        np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32), mesh, P("a", "b")
    )
    q = jquant.quantize_model({"w": x}, "q4_1")["w"]
    assert q.qs.sharding.spec == P("a", "b", None) and q.qs.sharding.mesh == mesh
    np.testing.assert_array_equal(
        q.to_bytes(), jquant.quantize_tensor(np.asarray(x), "q4_1").to_bytes()
    )
    y = jquant.dequantize_model({"w": q})["w"]
    assert y.sharding.is_equivalent_to(x.sharding, 2)
