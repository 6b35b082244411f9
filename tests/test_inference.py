"""Jitted forward passes on quantized params for Flax linen, Flax nnx and Haiku models.

The pattern under test is ``jax.jit(lambda qp, x: apply(jquant.dequantize_model(qp), x))``:
the program's inputs are the packed arrays, dequantized inside XLA.
"""

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant

PACKED_KINDS = {np.dtype(t) for t in (np.int8, np.uint8, np.uint32, np.float16)}


def _x(n=16, d=64):
    return jax.random.normal(jax.random.key(7), (n, d), jnp.float32)


def _assert_only_packed_inputs(fn, qp, x, float_params):
    """The jit's inputs are the packed leaves, biases and x: never a float kernel."""
    lowered = jax.jit(fn).lower(qp, x)
    args = jax.tree.leaves(lowered.args_info)
    # the float kernels' signatures, which must not appear among the inputs
    kernel_sigs = {
        (tuple(k.shape), np.dtype(k.dtype)) for k in jax.tree.leaves(float_params) if k.ndim >= 2
    }
    arg_sigs = [(tuple(a.shape), np.dtype(a.dtype)) for a in args]
    assert not kernel_sigs & set(arg_sigs), arg_sigs
    # every >=2-D input other than x is packed data
    assert all(dt in PACKED_KINDS for shape, dt in arg_sigs[:-1] if len(shape) >= 2), arg_sigs
    mem = lowered.compile().memory_analysis()
    float_bytes = sum(int(a.nbytes) for a in jax.tree.leaves(float_params))
    packed_bytes = sum(
        int(a.nbytes)
        for a in jax.tree.leaves(qp, is_leaf=lambda a: isinstance(a, jquant.QuantizedTensor))
    )
    assert mem.argument_size_in_bytes == packed_bytes + x.nbytes
    return float_bytes, packed_bytes


def _assert_close(y, ref, fmt):
    # Relative error of the outputs. Per layer, Q8_0 weights carry ~0.6% noise (step
    # absmax/127 on Gaussian blocks) and Q4_0 ~9% (absmax/8); three layers add up.
    rel = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
    assert rel < {"q8_0": 0.03, "q4_0": 0.25}[fmt], rel


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(128)(x))
        x = nn.gelu(nn.Dense(96)(x))
        return nn.Dense(10)(x)  # ragged head: 10 outputs in one padded block


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_flax_linen(fmt):
    model, x = LinenMLP(), _x()
    params = model.init(jax.random.key(0), x)
    qp = jquant.quantize_model(params, fmt, min_size=0)
    assert isinstance(qp["params"]["Dense_2"]["kernel"], jquant.QuantizedTensor)

    def forward(qp, x):
        return model.apply(jquant.dequantize_model(qp), x)

    y = jax.jit(forward)(qp, x)
    _assert_close(y, model.apply(params, x), fmt)
    float_bytes, packed_bytes = _assert_only_packed_inputs(forward, qp, x, params)
    assert packed_bytes < float_bytes / (3 if fmt == "q8_0" else 5)

    # The same model written with jquant.dense never materialises a float kernel and
    # computes the same function.
    def forward_dense(qp, x):
        p = qp["params"]
        x = nn.gelu(jquant.dense(x, p["Dense_0"]))
        x = nn.gelu(jquant.dense(x, p["Dense_1"]))
        return jquant.dense(x, p["Dense_2"])

    np.testing.assert_allclose(jax.jit(forward_dense)(qp, x), y, rtol=1e-4, atol=1e-4)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 128, rngs=rngs)
        self.l2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_flax_nnx(fmt):
    model, x = NnxMLP(nnx.Rngs(0)), _x()
    graphdef, state = nnx.split(model)
    qstate = jquant.quantize_model(state, fmt, min_size=0)

    def forward(qstate, x):
        return nnx.merge(graphdef, jquant.dequantize_model(qstate))(x)

    y = jax.jit(forward)(qstate, x)
    _assert_close(y, model(x), fmt)
    _assert_only_packed_inputs(forward, qstate, x, state)

    # nnx.to_pure_dict params work with jquant.dense too
    pure = jquant.quantize_model(nnx.to_pure_dict(state), fmt, min_size=0)

    def forward_dense(p, x):
        return jquant.dense(nnx.relu(jquant.dense(x, p["l1"])), p["l2"])

    np.testing.assert_allclose(jax.jit(forward_dense)(pure, x), y, rtol=1e-4, atol=1e-4)


def _haiku_mlp(x, linear=hk.Linear):
    x = jax.nn.relu(linear(128, name="l0")(x))
    x = jax.nn.relu(linear(96, name="l1")(x))
    return linear(10, name="l2")(x)


class QuantLinear(hk.Module):
    """A Haiku Linear whose ``w`` may be a QuantizedTensor (hk.get_parameter checks
    the logical shape, which a QuantizedTensor reports)."""

    def __init__(self, output_size, name=None):
        super().__init__(name=name)
        self.output_size = output_size

    def __call__(self, x):
        w = hk.get_parameter("w", (x.shape[-1], self.output_size), init=jnp.zeros)
        b = hk.get_parameter("b", (self.output_size,), init=jnp.zeros)
        return jquant.dense(x, w, b)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_haiku(fmt):
    f, x = hk.without_apply_rng(hk.transform(_haiku_mlp)), _x()
    params = f.init(jax.random.key(0), x)
    qp = jquant.quantize_model(params, fmt, min_size=0)

    def forward(qp, x):
        return f.apply(jquant.dequantize_model(qp), x)

    y = jax.jit(forward)(qp, x)
    _assert_close(y, f.apply(params, x), fmt)
    _assert_only_packed_inputs(forward, qp, x, params)

    # The same network built from a Linear that calls jquant.dense on the packed w.
    q = hk.without_apply_rng(hk.transform(lambda x: _haiku_mlp(x, linear=QuantLinear)))
    np.testing.assert_allclose(jax.jit(q.apply)(qp, x), y, rtol=1e-4, atol=1e-4)


def test_dequantize_inside_jit_matches_eager():
    model, x = LinenMLP(), _x()
    qp = jquant.quantize_model(model.init(jax.random.key(1), x), "q5_1", min_size=0)
    eager = model.apply(jquant.dequantize_model(qp), x)
    jitted = jax.jit(lambda qp, x: model.apply(jquant.dequantize_model(qp), x))(qp, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
