"""quantize_model / dequantize_model: bytes, structures, compile counts, bad input."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QuantizedTensor, QuantType
from jquant._model.model import _quantize_chunk

ALL_FORMATS = [t.name for t in QuantType]


def is_q(x):
    return isinstance(x, QuantizedTensor)


def mixed_params(seed=0, dtype=np.float32):
    """Leaves of many shapes: aligned, ragged (last axis not a multiple of 32), 3-D, tiny."""
    rng = np.random.default_rng(seed)

    def a(*shape):
        return jnp.asarray((rng.standard_normal(shape) * rng.uniform(0.01, 3)).astype(dtype))

    return {
        "embed": a(50, 64),
        "blocks": [{"w": a(64, 96), "b": a(96)}, {"w": a(33, 70), "b": a(70)}],
        "conv": a(3, 3, 8, 40),
        "odd": a(7, 5),
        "scalar": a(),
        "vec": a(100),
        "big": a(300, 256),
    }


class CompileCounter:
    """Counts XLA backend compiles while active (jax.monitoring events)."""

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **kw):
        if self.active and name == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        self.count, self.active = 0, True
        return self

    def __exit__(self, *exc):
        self.active = False


_COUNTER = CompileCounter()


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("chunk_blocks", [1024, 1 << 15])
def test_bytes_equal_quantize_tensor_per_leaf(fmt, chunk_blocks):
    # chunk_blocks=1024 makes 'big' (2400 blocks) span three chunks and share them
    # with its neighbours.
    params = mixed_params(1)
    qp = jquant.quantize_model(params, fmt, min_size=0, keep_1d=False, chunk_blocks=chunk_blocks)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    qflat = jax.tree_util.tree_leaves(qp, is_leaf=is_q)
    assert len(flat) == len(qflat)
    for (path, x), q in zip(flat, qflat, strict=True):
        assert is_q(q), path
        ref = jquant.quantize_tensor(x, fmt)
        assert (q.shape, q.dtype, q.qtype) == (ref.shape, ref.dtype, ref.qtype)
        for k, v in ref.leaves().items():
            got = q.leaves()[k]
            assert got.shape == v.shape and got.dtype == v.dtype, (path, k)
        np.testing.assert_array_equal(q.to_bytes(), ref.to_bytes(), err_msg=str(path))


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"])
def test_bytes_equal_gguf(fmt):
    rng = np.random.default_rng(2)
    params = {
        "a": rng.standard_normal((40, 64)).astype(np.float32),
        "b": (rng.standard_normal((16, 32, 96)) * 5).astype(np.float32),
    }
    qp = jquant.quantize_model(params, fmt, min_size=0)
    for k, x in params.items():
        expect = gguf.quants.quantize(x, gguf.GGMLQuantizationType[fmt])
        np.testing.assert_array_equal(
            qp[k].to_bytes(), expect.view(np.uint8).reshape(*x.shape[:-1], -1)
        )


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.float64])
def test_other_dtypes_byte_exact_and_restored(dtype):
    params = mixed_params(3, dtype=dtype)
    qp = jquant.quantize_model(params, "q4_1", min_size=0, keep_1d=False)
    for x, q in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(qp, is_leaf=is_q), strict=True
    ):
        np.testing.assert_array_equal(q.to_bytes(), jquant.quantize_tensor(x, "q4_1").to_bytes())
    back = jquant.dequantize_model(qp)
    for x, y in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back), strict=True
    ):
        assert x.shape == y.shape and x.dtype == y.dtype


def test_numpy_leaves():
    rng = np.random.default_rng(6)
    params = {
        "a": rng.standard_normal((40, 96)),
        "b": rng.standard_normal((3000, 64)).astype(np.float32),
    }
    qp = jquant.quantize_model(params, "q5_0", chunk_blocks=1024)
    for k, x in params.items():
        ref = jquant.quantize_tensor(x, "q5_0")
        assert qp[k].dtype == ref.dtype  # float64 is recorded as jax sees it (float32)
        np.testing.assert_array_equal(qp[k].to_bytes(), ref.to_bytes())


def test_packed_leaves_stay_on_the_leaf_device():
    dev = jax.devices()[-1]
    params = {"w": jax.device_put(jnp.ones((16, 64)), dev), "v": jnp.ones((16, 64))}
    qp = jquant.quantize_model(params, "q8_0", min_size=0)
    assert qp["w"].qs.devices() == {dev} and qp["w"].d.devices() == {dev}
    assert jquant.dequantize_model(qp)["w"].devices() == {dev}
    assert qp["v"].qs.devices() == params["v"].devices()


def test_empty_leaves():
    params = {"a": jnp.zeros((0, 64)), "b": jnp.zeros((4, 0)), "c": jnp.ones((2, 64))}
    qp = jquant.quantize_model(params, "q5_1", min_size=0)
    for k, x in params.items():
        ref = jquant.quantize_tensor(x, "q5_1")
        assert {n: v.shape for n, v in qp[k].leaves().items()} == {
            n: v.shape for n, v in ref.leaves().items()
        }
        assert jquant.dequantize_model(qp)[k].shape == x.shape


def test_single_format_defaults_keep_vectors_and_small():
    params = mixed_params(4)
    qp = jquant.quantize_model(params, "q8_0")
    assert is_q(qp["embed"]) and is_q(qp["big"]) and is_q(qp["conv"])
    # 1-D, scalar and small (35 values < 1024) leaves are the very same objects
    for k in ("vec", "scalar", "odd"):
        assert qp[k] is params[k]
    assert qp["blocks"][0]["b"] is params["blocks"][0]["b"]


def test_roundtrip_error_small_and_structure_restored():
    params = mixed_params(5)
    qp = jquant.quantize_model(params, "q8_0", min_size=0, keep_1d=False)
    back = jquant.dequantize_model(qp)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for x, y in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back), strict=True
    ):
        assert x.shape == y.shape and x.dtype == y.dtype
        amax = float(jnp.max(jnp.abs(x)))
        # half a step, plus the fp16 rounding of the scale (up to 127 * 2**-11 steps)
        assert float(jnp.max(jnp.abs(x - y))) <= amax / 127 * (0.5 + 127 * 2**-11) + 1e-6


def test_dequantize_model_dtype_casts_floats_only():
    params = {"w": jnp.ones((8, 64)), "b": jnp.ones(64), "step": jnp.array(3, jnp.int32)}
    out = jquant.dequantize_model(jquant.quantize_model(params, "q4_0", min_size=0), jnp.bfloat16)
    assert out["w"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.bfloat16
    assert out["step"].dtype == jnp.int32


# -- structures -------------------------------------------------------------------------


def _check_roundtrip(params, qp, n_quantized):
    qleaves = jax.tree_util.tree_leaves(qp, is_leaf=is_q)
    assert sum(map(is_q, qleaves)) == n_quantized
    back = jquant.dequantize_model(qp)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for x, y in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back), strict=True
    ):
        if hasattr(x, "shape"):
            assert x.shape == y.shape and x.dtype == y.dtype
        else:
            assert x is y


def test_flax_linen():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))

    model = MLP()
    variables = model.init(jax.random.key(0), jnp.ones((1, 64)))
    qp, rep = jquant.quantize_model(variables, "q8_0", min_size=0, report=True)
    _check_roundtrip(variables, qp, 2)
    assert rep["params/Dense_0/kernel"].format == "Q8_0"
    assert rep["params/Dense_0/bias"].format is None
    y = jax.jit(lambda qp, x: model.apply(jquant.dequantize_model(qp), x))(qp, jnp.ones((2, 64)))
    y0 = model.apply(variables, jnp.ones((2, 64)))
    np.testing.assert_allclose(y, y0, atol=0.05)


def test_flax_nnx_state_and_pure_dict():
    from flax import nnx

    model = nnx.Sequential(
        nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 32, rngs=nnx.Rngs(1))
    )
    state = nnx.state(model, nnx.Param)
    qs, rep = jquant.quantize_model(
        state, {"layers/0": "q4_0", ".*": "q8_0"}, min_size=0, report=True
    )
    assert type(qs) is type(state)
    assert {r.path: r.format for r in rep.rows if r.format} == {
        "layers/0/kernel": "Q4_0",
        "layers/1/kernel": "Q8_0",
    }
    _check_roundtrip(state, qs, 2)
    nnx.update(model, jquant.dequantize_model(qs))  # the State slots back into the model
    pure = nnx.to_pure_dict(state)
    qpure = jquant.quantize_model(pure, {"layers/0": "q4_0", ".*": "q8_0"}, min_size=0)
    assert qpure["layers"][0]["kernel"].qtype is QuantType.Q4_0
    _check_roundtrip(pure, qpure, 2)


def test_haiku():
    import haiku as hk

    f = hk.transform(lambda x: hk.nets.MLP([64, 10])(x))
    params = f.init(jax.random.key(0), jnp.ones((1, 32)))
    qp = jquant.quantize_model(params, {"linear_1": None, ".*": "q4_0"}, min_size=0)
    assert is_q(qp["mlp/~/linear_0"]["w"]) and not is_q(qp["mlp/~/linear_1"]["w"])
    _check_roundtrip(params, qp, 1)


def test_equinox_module_non_array_leaves_untouched():
    import equinox as eqx

    mlp = eqx.nn.MLP(64, 32, 64, 2, key=jax.random.key(0))
    qm, rep = jquant.quantize_model(mlp, "q8_0", min_size=0, report=True)
    assert is_q(qm.layers[0].weight) and qm.activation is mlp.activation
    assert rep["activation"].reason.startswith("not an array")
    _check_roundtrip(mlp, qm, 3)
    back = jquant.dequantize_model(qm)
    x = jnp.ones(64)
    np.testing.assert_allclose(back(x), mlp(x), atol=0.05)


def test_plain_list_and_named_pairs():
    rng = np.random.default_rng(0)
    lst = [jnp.asarray(rng.standard_normal((32, 64), dtype=np.float32)), jnp.ones(5)]
    qp = jquant.quantize_model(lst, {"^0$": "q8_0"}, min_size=0)
    assert isinstance(qp, list) and is_q(qp[0]) and qp[1] is lst[1]
    pairs = [("tok_embeddings.weight", lst[0]), ("norm.weight", lst[1])]
    qpairs, rep = jquant.quantize_model(pairs, {"embeddings": "q4_0"}, report=True)
    assert [n for n, _ in qpairs] == ["tok_embeddings.weight", "norm.weight"]
    assert is_q(qpairs[0][1]) and qpairs[0][1].qtype is QuantType.Q4_0
    assert rep.rows[0].path == "tok_embeddings.weight"
    back = jquant.dequantize_model(qpairs)
    assert back[0][0] == "tok_embeddings.weight" and back[0][1].shape == (32, 64)


def test_already_quantized_leaves_pass_through():
    params = {"w": jnp.ones((64, 64))}
    qp = jquant.quantize_model(params, "q8_0")
    qp2, rep = jquant.quantize_model(qp, "q4_0", report=True)
    assert qp2["w"] is qp["w"] and "already quantized" in rep["w"].reason


def test_under_jit():
    params = {"w": jax.random.normal(jax.random.key(0), (64, 128)), "b": jnp.zeros(128)}
    qp = jax.jit(lambda p: jquant.quantize_model(p, "q4_0"))(params)
    np.testing.assert_array_equal(
        qp["w"].to_bytes(), jquant.quantize_tensor(params["w"], "q4_0").to_bytes()
    )


# -- compiles -----------------------------------------------------------------------------


def test_compile_count_bounded_and_shared_between_models():
    rng = np.random.default_rng(7)
    # 30 distinct leaf shapes (3 blocks of 8x32 .. 37x226), 2 formats
    shapes = [(8 + i, 32 * (1 + i % 7) + (i % 3)) for i in range(30)]
    params = {
        f"l{i}": jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for i, s in enumerate(shapes)
    }
    rules = {r"l\d*[02468]$": "q4_0", ".*": "q5_1"}
    jax.clear_caches()  # other tests may have compiled these chunk programs already
    with _COUNTER as c:
        jquant.quantize_model(params, rules, min_size=0, chunk_blocks=1024)
    # at most two chunk sizes per format (full chunks and the rounded-up last one)
    assert 1 <= c.count <= 4
    with _COUNTER as c:
        jquant.quantize_model(params, rules, min_size=0, chunk_blocks=1024)
    assert c.count == 0
    # another model with other shapes but the same chunk sizes reuses the programs
    other = {
        f"m{i}": jnp.asarray(rng.standard_normal((5, 40 + i), dtype=np.float32)) for i in range(12)
    }
    with _COUNTER as c:
        jquant.quantize_model(other, "q4_0", min_size=0, chunk_blocks=1024)
    assert c.count == 0


def test_chunk_program_trace_count():
    before = _quantize_chunk._cache_size()
    rng = np.random.default_rng(8)
    params = {
        f"l{i}": jnp.asarray(rng.standard_normal((3 + i, 64 + i), dtype=np.float32))
        for i in range(20)
    }
    jquant.quantize_model(params, "q4_1", min_size=0)
    jquant.quantize_model(params, "q4_1", min_size=0)
    assert _quantize_chunk._cache_size() - before <= 1


# -- bad values and bad input -------------------------------------------------------------


def test_nan_error_names_path_and_block():
    params = mixed_params(9)
    x = np.array(params["blocks"][1]["w"])
    x[2, 40] = np.nan
    params["blocks"][1]["w"] = jnp.asarray(x)
    with pytest.raises(jquant.NonFiniteError, match=r"'blocks/1/w'.*block 7 \(element \(2, 40\)\)"):
        jquant.quantize_model(params, "q4_0", min_size=0, chunk_blocks=1024)
    # check=False: quantized anyway; every block but the NaN one (whose bytes are
    # undefined, as in ggml) as quantize_tensor makes it
    qp = jquant.quantize_model(params, "q4_0", min_size=0, check=False)
    got = qp["blocks"][1]["w"].to_bytes().reshape(33, 3, 18)
    ref = jquant.quantize_tensor(params["blocks"][1]["w"], "q4_0", check=False)
    ref = ref.to_bytes().reshape(33, 3, 18)
    got[2, 1] = ref[2, 1] = 0
    np.testing.assert_array_equal(got, ref)


def test_overflow_error_names_path():
    params = {"ok": jnp.ones((4, 64)), "params/Dense_0/kernel": jnp.full((4, 64), 1e7)}
    with pytest.raises(jquant.ScaleOverflowError, match="params/Dense_0/kernel"):
        jquant.quantize_model(params, "q4_0", min_size=0)
    with pytest.raises(jquant.ScaleOverflowError, match="params/Dense_0/kernel.*overflows F16"):
        jquant.quantize_model(params, "f16", min_size=0)
    # F32 stores anything
    jquant.quantize_model(params, "f32", min_size=0)


def test_bad_rules():
    params = {"w": jnp.ones((64, 64))}
    with pytest.raises(jquant.QuantError, match=r"'\(unclosed'.*not a valid regular expression"):
        jquant.quantize_model(params, {"(unclosed": "q4_0"})
    with pytest.raises(jquant.UnknownFormatError, match="rule 'w'.*iq2_xxs"):
        jquant.quantize_model(params, [("w", "iq2_xxs")])
    with pytest.raises(jquant.UnknownFormatError):
        jquant.quantize_model(params, "int3")
    with pytest.raises(jquant.QuantError, match="chunk_blocks"):
        jquant.quantize_model(params, "q4_0", chunk_blocks=1000)


# -- importance matrices ---------------------------------------------------------------


def _weighted_params():
    rng = np.random.default_rng(5)

    def a(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        x[..., rng.integers(0, shape[-1], 3)] *= 6  # outlier columns the weights favour
        return jnp.asarray(x)

    return {"attn": {"q": a(8, 256), "k": a(4, 256)}, "mlp": {"up": a(6, 512)}, "head": a(16, 96)}


@pytest.mark.parametrize(
    "rules", [{"head": "q8_0", ".*": "q4_k"}, {"attn": "q4_0", "mlp": "iq4_xs", ".*": "q5_1"}]
)
def test_imatrix_bytes_equal_quantize_tensor(rules):
    params = _weighted_params()
    rng = np.random.default_rng(6)
    w = {k: rng.gamma(1.0, 1.0, n).astype(np.float32) for k, n in [("q", 256), ("up", 512)]}
    w96 = rng.gamma(1.0, 1.0, 96).astype(np.float32)
    # an exact path, a regex, and a leaf without weights (attn/k)
    imatrix = {"attn/q": w["q"], r"mlp/u.$": w["up"], "head": w96}
    qp = jquant.quantize_model(params, rules, imatrix=imatrix)
    leaves = {"attn/q": qp["attn"]["q"], "attn/k": qp["attn"]["k"], "mlp/up": qp["mlp"]["up"]}
    fmt = {p: q.qtype for p, q in {**leaves, "head": qp["head"]}.items()}
    expect = {
        "attn/q": jquant.quantize_tensor(params["attn"]["q"], fmt["attn/q"], imatrix=w["q"]),
        "attn/k": jquant.quantize_tensor(params["attn"]["k"], fmt["attn/k"]),
        "mlp/up": jquant.quantize_tensor(params["mlp"]["up"], fmt["mlp/up"], imatrix=w["up"]),
    }
    for p, q in expect.items():
        assert np.array_equal(np.asarray(leaves[p].to_bytes()), np.asarray(q.to_bytes())), p
    # the weights changed something (the weighted encoders ran)
    plain = jquant.quantize_model(params, rules)
    assert not np.array_equal(
        np.asarray(plain["attn"]["q"].to_bytes()), np.asarray(qp["attn"]["q"].to_bytes())
    )
    # Q8_0 has no weighted encoder: its weights are ignored, as in llama.cpp
    head_w = w96 if fmt["head"].spec.supports_imatrix else None
    ref = jquant.quantize_tensor(params["head"], fmt["head"], imatrix=head_w)
    assert np.array_equal(np.asarray(qp["head"].to_bytes()), np.asarray(ref.to_bytes()))


def test_imatrix_as_importance_matrix_and_in_the_report():
    params = _weighted_params()
    sums = {"attn/q": np.linspace(0.1, 3.0, 256)[None] ** 2}
    im = jquant.ImportanceMatrix(sums=sums, counts={"attn/q": np.array([2], np.int64)})
    qp, rep = jquant.quantize_model(params, "q4_k", imatrix=im, report=True)
    ref = jquant.quantize_tensor(params["attn"]["q"], "q4_k", imatrix=im.weights()["attn/q"])
    assert np.array_equal(np.asarray(qp["attn"]["q"].to_bytes()), np.asarray(ref.to_bytes()))
    row = next(r for r in rep.rows if r.path == "attn/q")
    x = np.asarray(params["attn"]["q"], np.float64)
    err = x - np.asarray(jquant.dequantize_tensor(ref), np.float64)
    np.testing.assert_allclose(row.rmse, np.sqrt(np.mean(err**2)), rtol=1e-6)


def test_imatrix_shape_mismatch_names_the_leaf():
    params = _weighted_params()
    with pytest.raises(jquant.ShapeError, match="'mlp/up'.*shape \\(256,\\).*\\(512,\\)"):
        jquant.quantize_model(params, "q4_k", imatrix={"mlp": np.ones(256, np.float32)})
