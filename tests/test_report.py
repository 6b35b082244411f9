"""ModelReport: per-leaf rows, statistics, totals, table and plain rows."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QuantizedTensor


def params():
    rng = np.random.default_rng(0)

    def w(*s, scale=1.0):
        return jnp.asarray((rng.standard_normal(s) * scale).astype(np.float32))

    return {
        "dense": {"kernel": w(64, 256), "bias": w(256)},
        "ragged": w(10, 70, scale=3.0),
        "head": w(256, 100, scale=0.1),
        "bf": jnp.asarray(rng.standard_normal((32, 64)), jnp.bfloat16),
        "zeros": jnp.zeros((16, 64)),
        "ids": jnp.arange(10),
        "eps": 1e-5,
    }


@pytest.mark.parametrize("fmt", ["q4_0", "q5_1", "q8_0", "f16", "bf16"])
@pytest.mark.parametrize("chunk_blocks", [1024, 1 << 15])
def test_stats_match_compute_quantization_stats(fmt, chunk_blocks):
    p = params()
    qp, rep = jquant.quantize_model(p, fmt, min_size=0, report=True, chunk_blocks=chunk_blocks)
    for path, x in [
        ("dense/kernel", p["dense"]["kernel"]),
        ("ragged", p["ragged"]),
        ("head", p["head"]),
    ]:
        q = qp
        for k in path.split("/"):
            q = q[k]
        ref = jquant.compute_quantization_stats(x, jquant.dequantize_tensor(q), fmt)
        row = rep[path]
        assert row.format == q.qtype.name
        np.testing.assert_allclose(row.rmse, ref.rmse, rtol=1e-5)
        np.testing.assert_allclose(row.mean_error, ref.mean_error, rtol=1e-5)
        assert row.max_error == pytest.approx(ref.max_error, rel=1e-6)
        if math.isfinite(ref.sqnr_db):
            np.testing.assert_allclose(row.sqnr_db, ref.sqnr_db, rtol=1e-4)
        assert row.bytes_before == x.size * 4 and row.bytes_after == q.nbytes
        assert row.bits_per_weight == pytest.approx(8 * q.nbytes / x.size)
    # an all-zero tensor is stored exactly
    assert rep["zeros"].rmse == 0 and rep["zeros"].sqnr_db == math.inf


def test_every_leaf_has_a_row_and_kept_leaves_a_reason():
    p = params()
    qp, rep = jquant.quantize_model(p, {"head": None, ".*": "q4_0"}, report=True)
    flat = jax.tree_util.tree_flatten_with_path(p)[0]
    assert [r.path for r in rep.rows] == ["/".join(k.key for k in path) for path, _ in flat]
    assert {r.path: r.reason for r in rep.kept} == {
        "dense/bias": "1-D (bias/norm/scale) kept by keep_1d=True",
        "eps": "not an array (float)",
        "head": "rule 'head' keeps it",
        "ids": "int32 is not a floating-point dtype",
        "ragged": "700 values < min_size=1024",
    }
    qleaves = jax.tree_util.tree_leaves(qp, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    for r, q in zip(rep.rows, qleaves, strict=True):
        assert (r.format is None) == (r.reason is not None) == (not isinstance(q, QuantizedTensor))
        if r.format is None:
            assert r.rmse is None and r.bytes_before == r.bytes_after


def test_totals():
    p = params()
    _, rep = jquant.quantize_model(p, "q8_0", min_size=0, report=True)
    arrays = [x for x in jax.tree_util.tree_leaves(p) if hasattr(x, "nbytes")]
    assert rep.bytes_before == sum(x.nbytes for x in arrays)
    assert rep.bytes_after == sum(r.bytes_after for r in rep.rows)
    assert rep.bytes_after < rep.bytes_before
    assert rep.compression_ratio == pytest.approx(rep.bytes_before / rep.bytes_after)
    assert rep.num_params == sum(x.size for x in arrays)
    assert rep.bits_per_weight == pytest.approx(8 * rep.bytes_after / rep.num_params)
    assert rep.num_quantized == 5  # dense/kernel, ragged, head, bf, zeros
    # model SQNR lies between the best and the worst finite leaf SQNR
    finite = [r.sqnr_db for r in rep.rows if r.sqnr_db is not None and math.isfinite(r.sqnr_db)]
    assert min(finite) <= rep.sqnr_db <= max(finite)


def test_table_and_rows():
    p = params()
    _, rep = jquant.quantize_model(p, {"dense": "q4_0", "nothing_here": "q8_0"}, report=True)
    text = str(rep)
    for r in rep.rows:
        assert r.path in text
    assert "Q4_0" in text and "total (8 leaves, 1 quantized)" in text
    assert "rules that matched no leaf: 'nothing_here'" in text
    rows = rep.to_rows()
    assert len(rows) == 8 and rows[0]["path"] == "bf"
    assert set(rows[0]) >= {
        "path", "shape", "format", "bytes_before", "bytes_after", "bits_per_weight",
        "rmse", "max_error", "sqnr_db", "reason",
    }  # fmt: skip
    assert "ModelReport(8 leaves, 1 quantized" in repr(rep)
    with pytest.raises(KeyError, match="no leaf 'nope'"):
        rep["nope"]
