"""calibrate_activations over a Flax model and over a plain function."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import CalibrationError, CalibrationMethod, calibrate_activations


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(32, name="up")(x)
        self.sow("intermediates", "pre_relu", h)
        return nn.Dense(8, name="down")(nn.relu(h))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Block(name="block")(x)
        return nn.Dense(3, name="head")(nn.gelu(x))


@pytest.fixture(scope="module")
def setup():
    model = Net()
    params = model.init(jax.random.key(0), jnp.ones((1, 16), jnp.float32))["params"]
    batches = [
        jax.random.normal(jax.random.key(i), (64, 16), jnp.float32) * (1 + i) for i in range(4)
    ]
    return model, params, batches


def test_flax_module_every_layer(setup):
    model, params, batches = setup
    calib = calibrate_activations(model, params, batches, CalibrationMethod.Entropy)
    assert set(calib) == {
        "block/up",
        "block/down",
        "block/pre_relu",
        "block",
        "head",
        "output",
    }

    # the up projection's activations, computed by hand, give the same statistics
    def up(b):
        p = params["block"]["up"]
        return b @ p["kernel"] + p["bias"][None, :]

    acts = [np.asarray(up(b)) for b in batches]
    ref = jquant.calibrate(acts[0], CalibrationMethod.Entropy)
    for a in acts[1:]:
        ref = ref.update(a)
    got = calib["block/up"]
    assert int(got.count) == sum(a.size for a in acts)
    np.testing.assert_array_equal(np.asarray(got.hist), np.asarray(ref.hist))
    assert float(got.amax) == float(ref.amax)
    np.testing.assert_array_equal(np.asarray(calib["block/pre_relu"].hist), np.asarray(got.hist))
    out = np.concatenate([np.asarray(model.apply({"params": params}, b)) for b in batches])
    assert float(calib["output"].max) == out.max() and float(calib["output"].min) == out.min()


def test_capture_filter_and_per_channel(setup):
    model, params, batches = setup
    calib = calibrate_activations(
        model,
        {"params": params},
        batches[:2],
        CalibrationMethod.MinMax,
        axis=-1,
        capture_filter=lambda mdl, method: isinstance(mdl, nn.Dense),
    )
    assert set(calib) == {"block/up", "block/down", "head", "block/pre_relu"}
    assert calib["head"].amax.shape == (1, 3)
    lo, hi = calib["block/up"].clip_range()
    assert lo.shape == (1, 32) and bool(jnp.all(lo <= hi))


def test_plain_function_returning_a_dict():
    w = jax.random.normal(jax.random.key(1), (8, 8), jnp.float32)

    def fn(p, x):
        h = x @ p
        return {"h": h, "act": {"relu": jax.nn.relu(h)}, "argmax": jnp.argmax(h, axis=-1)}

    batches = [jnp.ones((4, 8), jnp.float32) * i for i in range(1, 4)]
    calib = calibrate_activations(fn, w, batches, CalibrationMethod.Percentile(99.0))
    assert set(calib) == {"h", "act/relu"}
    assert float(calib["act/relu"].min) == 0.0 or float(calib["act/relu"].min) > 0
    allh = np.concatenate([np.asarray(b @ w) for b in batches])
    assert float(calib["h"].max) == allh.max() and int(calib["h"].count) == allh.size


def test_errors():
    with pytest.raises(CalibrationError, match="at least one batch"):
        calibrate_activations(lambda p, x: x, None, [], CalibrationMethod.MinMax)
    with pytest.raises(CalibrationError, match="Module or a function"):
        calibrate_activations(42, None, [jnp.ones(3)], CalibrationMethod.MinMax)
    with pytest.raises(CalibrationError, match="'x' holds 1 NaN"):
        calibrate_activations(
            lambda p, x: {"x": x}, None, [jnp.array([1.0, jnp.nan])], CalibrationMethod.MinMax
        )
