"""End-to-end accuracy: a digits MLP trained here, evaluated at F32 and every format."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant

# the digits demo (flax + optax) lives with the benchmarks, outside the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from digits import FORMATS, accuracy, evaluate_formats, train_digits_mlp  # noqa: E402


@pytest.fixture(scope="module")
def trained():
    return train_digits_mlp()


@pytest.fixture(scope="module")
def table(trained):
    model, params, data = trained
    return {r.format: r for r in evaluate_formats(model, params, data, FORMATS)}


def test_training_is_deterministic_and_good(trained):
    model, params, data = trained
    assert len(data.x_test) == 359 and len(data.x_train) == 1438
    assert accuracy(model, params, data.x_test, data.y_test) > 95.0
    _, again, _ = train_digits_mlp(steps=300)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_q8_0_loses_under_half_a_point(table):
    assert table["Q8_0"].delta > -0.5, table["Q8_0"]
    assert table["Q8_0"].agreement >= 99.0
    # 8-bit weights barely move the loss
    assert abs(table["Q8_0"].loss - table["F32"].loss) < 0.01


def test_every_format_stays_useful(table):
    # Reported honestly in benchmarks/results/accuracy.md; here only a sanity floor.
    for row in table.values():
        assert row.accuracy > table["F32"].accuracy - 3.0, row
    for fmt in ("F16", "BF16"):
        assert table[fmt].delta > -0.5


def test_sizes_follow_bits_per_weight(table):
    order = ["F32", "F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]
    sizes = [table[f].nbytes for f in order]
    assert sizes == sorted(sizes, reverse=True)
    assert table["BF16"].nbytes == table["F16"].nbytes
    assert table["F32"].compression_ratio == 1.0
    assert table["Q4_0"].compression_ratio > 5.0  # the 10-wide head pads to 32 per row


def test_dense_forward_agrees_with_flax_apply(trained):
    model, params, data = trained
    qp = jquant.quantize_model(params, "q4_0", min_size=0)
    p = qp["params"]

    @jax.jit
    def forward(p, x):
        x = jax.nn.relu(jquant.dense(x, p["Dense_0"]))
        x = jax.nn.relu(jquant.dense(x, p["Dense_1"]))
        return jquant.dense(x, p["Dense_2"])

    x = jnp.asarray(data.x_test)
    logits = forward(p, x)
    ref = model.apply(jquant.dequantize_model(qp), x)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
    assert float(np.mean(np.argmax(logits, -1) == data.y_test)) * 100 == pytest.approx(
        accuracy(model, qp, data.x_test, data.y_test)
    )
