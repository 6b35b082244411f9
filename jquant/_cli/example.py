"""A built-in, deterministic example model: :func:`example_params`.

The parameters of a small decoder-only transformer (a nested dict in the Flax/Haiku
layout, about 1.6M float32 values, 6.3 MB), drawn with numpy's PCG64 generator so
every machine gets the same bytes. Weights are scaled like a trained model
(``N(0, 1/fan_in)``) with a few heavy-tailed rows and outlier columns, the features
that make quantization formats differ. ``jquant`` with no arguments quantizes it
into every format; tests and notebooks use it as a stand-in for a real checkpoint.
"""

from __future__ import annotations

import numpy as np

__all__ = ["example_params"]


def _dense(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    w = rng.standard_normal((fan_in, fan_out), dtype=np.float32) / np.float32(np.sqrt(fan_in))
    # heavy tails: a few rows drawn from a Student-t, a couple of outlier columns
    rows = rng.choice(fan_in, size=max(1, fan_in // 64), replace=False)
    w[rows] = rng.standard_t(3, (rows.size, fan_out)).astype(np.float32) / np.float32(
        np.sqrt(fan_in)
    )
    cols = rng.choice(fan_out, size=2, replace=False)
    w[:, cols] *= np.float32(6.0)
    return w


def example_params(
    *, vocab: int = 1024, d_model: int = 256, n_layers: int = 2, d_ff: int = 768, seed: int = 0
) -> dict:
    """Deterministic, model-shaped float32 parameters of a small transformer.

    Args:
        vocab: vocabulary size (the embedding's rows).
        d_model: model width.
        n_layers: number of decoder blocks.
        d_ff: MLP hidden width.
        seed: seed of the numpy generator.

    Returns:
        ``{"embed": {"embedding"}, "layers_0": {"attn": {"query", "key", "value", "out"},
        "mlp": {"up", "down"}, "ln_attn": {"scale"}, "ln_mlp": {"scale"}}, ...,
        "ln_final": {"scale"}}`` of numpy float32 arrays (kernels ``(in, out)``).

    Example:
        >>> from jquant._cli.example import example_params
        >>> p = example_params()
        >>> p["layers_0"]["attn"]["query"]["kernel"].shape, p["embed"]["embedding"].dtype
        ((256, 256), dtype('float32'))
        >>> sum(x.size for x in __import__("jax").tree.leaves(p))
        1574144
    """
    rng = np.random.default_rng(seed)
    params: dict = {"embed": {"embedding": rng.standard_normal((vocab, d_model), dtype=np.float32)}}
    for i in range(n_layers):
        attn = {
            name: {"kernel": _dense(rng, d_model, d_model)}
            for name in ("query", "key", "value", "out")
        }
        params[f"layers_{i}"] = {
            "attn": attn,
            "ln_attn": {"scale": (1 + 0.1 * rng.standard_normal(d_model)).astype(np.float32)},
            "mlp": {
                "up": {"kernel": _dense(rng, d_model, d_ff)},
                "down": {"kernel": _dense(rng, d_ff, d_model)},
            },
            "ln_mlp": {"scale": (1 + 0.1 * rng.standard_normal(d_model)).astype(np.float32)},
        }
    params["ln_final"] = {"scale": np.ones(d_model, np.float32)}
    return params
