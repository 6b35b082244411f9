"""A small real task for end-to-end accuracy: an MLP on scikit-learn's bundled digits.

scikit-learn ships the 1,797 8x8 handwritten digits inside the package (no download).
:func:`train_digits_mlp` trains a Flax linen MLP (64 -> 256 -> 256 -> 10) on a fixed
80/20 split with full-batch Adam: deterministic for a given seed and a few seconds on a
laptop CPU. :func:`evaluate_formats` then measures test accuracy and parameter bytes
at F32 and at each GGML format, running the forward pass on the quantized params.

Needs the ``flax`` extra, ``optax`` and ``scikit-learn`` (the ``test`` extra).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jquant import QuantizedTensor, QuantType, dequantize_model, quantize_model

__all__ = [
    "DigitsData",
    "DigitsMLP",
    "FormatAccuracy",
    "accuracy",
    "evaluate_formats",
    "load_digits_data",
    "train_digits_mlp",
]

FORMATS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """The digits split: pixels scaled to [0, 1] (float32) and integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_data(seed: int = 0, test_fraction: float = 0.2) -> DigitsData:
    """scikit-learn's digits, shuffled with ``seed`` and split train/test."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = (ds.data / 16.0).astype(np.float32)
    y = ds.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return DigitsData(x[train], y[train], x[test], y[test])


class DigitsMLP(nn.Module):
    """Two hidden ReLU layers and a 10-way linear head (kernels ``(in, out)``)."""

    hidden: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


def train_digits_mlp(
    *, hidden: int = 256, steps: int = 300, learning_rate: float = 3e-3, seed: int = 0
) -> tuple[DigitsMLP, dict[str, Any], DigitsData]:
    """Train :class:`DigitsMLP` (full-batch Adam, fixed seeds); returns model, params, data.

    Example:
        >>> model, params, data = train_digits_mlp(steps=30)
        >>> params["params"]["Dense_0"]["kernel"].shape, data.x_test.shape
        ((64, 256), (359, 64))
    """
    data = load_digits_data(seed)
    model = DigitsMLP(hidden)
    params = model.init(jax.random.key(seed), jnp.zeros((1, 64), jnp.float32))
    tx = optax.adam(learning_rate)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    def loss_fn(p):
        logits = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train(p):
        def step(carry, _):
            p, opt = carry
            grads = jax.grad(loss_fn)(p)
            updates, opt = tx.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), None

        (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
        return p

    # optax's Adam raises its int step count to float powers, which strict dtype
    # promotion (jquant's own tests run with it) rejects; the model itself is strict-clean.
    with jax.numpy_dtype_promotion("standard"):
        params = train(params)
    return model, params, data


@functools.partial(jax.jit, static_argnames="model")
def _logits(model: nn.Module, qparams: Any, x: jax.Array) -> jax.Array:
    # Only the packed weights are inputs; they are dequantized inside the program.
    return model.apply(dequantize_model(qparams), x)


def accuracy(model: nn.Module, params: Any, x: Any, y: Any) -> float:
    """Test accuracy in percent; ``params`` may hold :class:`QuantizedTensor` leaves."""
    pred = np.argmax(np.asarray(_logits(model, params, jnp.asarray(x))), axis=-1)
    return float(100.0 * np.mean(pred == np.asarray(y)))


@dataclasses.dataclass(frozen=True)
class FormatAccuracy:
    """Accuracy and size of the digits model stored in one format."""

    format: str
    accuracy: float
    delta: float
    """Accuracy minus the F32 model's, in percentage points."""
    nbytes: int
    """Bytes of all parameters: packed kernels plus the F32 biases."""
    compression_ratio: float
    loss: float
    """Test cross-entropy (more sensitive than accuracy to small weight errors)."""
    agreement: float
    """Percent of test predictions identical to the F32 model's."""


def _param_bytes(qparams: Any) -> int:
    leaves = jax.tree.leaves(qparams, is_leaf=lambda a: isinstance(a, QuantizedTensor))
    return sum(int(a.nbytes) for a in leaves)


def evaluate_formats(
    model: nn.Module,
    params: Any,
    data: DigitsData,
    formats: Sequence[QuantType | str] = FORMATS,
) -> list[FormatAccuracy]:
    """Quantize every kernel (biases stay F32) to each format and measure test accuracy.

    Example:
        >>> model, params, data = train_digits_mlp(steps=30)
        >>> rows = evaluate_formats(model, params, data, ["f32", "q8_0"])
        >>> [r.format for r in rows], rows[0].delta, rows[1].compression_ratio > 3
        (['F32', 'Q8_0'], 0.0, True)
    """
    x, y = jnp.asarray(data.x_test), np.asarray(data.y_test)

    def measure(p):
        logits = _logits(model, p, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()
        pred = np.argmax(np.asarray(logits), axis=-1)
        return pred, float(100.0 * np.mean(pred == y)), float(loss)

    base_pred, base_acc, _ = measure(params)
    base_bytes = _param_bytes(params)
    rows = []
    for fmt in formats:
        qtype = QuantType.parse(fmt)
        qparams = quantize_model(params, qtype, min_size=0)
        pred, acc, loss = measure(qparams)
        nbytes = _param_bytes(qparams)
        agree = float(100.0 * np.mean(pred == base_pred))
        rows.append(
            FormatAccuracy(
                qtype.name, acc, acc - base_acc, nbytes, base_bytes / nbytes, loss, agree
            )
        )
    return rows
