"""What every engine shares: row padding, the bad-block check and error sums.

The single-tensor, chunked-model and sharded engines and ``jquant.dot`` all go through
these, for any format of the table (:mod:`jquant._formats.registry`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from .._formats.registry import FormatSpec

__all__ = [
    "bad_blocks",
    "check_fields",
    "error_stats",
    "error_sums",
    "nonfinite",
    "num_blocks",
    "pad_rows",
]


def num_blocks(n: int, block: int) -> int:
    """Blocks that a row of ``n`` values needs (0 for an empty row)."""
    return -(-n // block)


def pad_rows(x: Any, block: int) -> Any:
    """Rows ``[..., n]`` padded to ``[..., ceil(n / block) * block]``.

    The row's last value is repeated, so a padded block keeps its max, min and scale
    (the padding never changes a stored byte of the real values); an empty row becomes
    zeros. Works on numpy arrays (host engines) and JAX arrays (traced engines) alike.
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    n = x.shape[-1]
    width = num_blocks(n, block) * block
    if width == n:
        return x
    if x.size == 0:
        return xp.zeros((*x.shape[:-1], width), x.dtype)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, width - n)]
    return xp.pad(x, pad, mode="edge")


def check_fields(fields: dict[str, jax.Array], spec: FormatSpec, blocks_shape) -> None:
    """Assert (at trace time) that a kernel returned the record's fields, shapes and dtypes.

    ``blocks_shape`` is ``(*lead, n_blocks)``; field ``f`` must be
    ``(*lead, n_blocks, *f.shape)`` of ``f.dtype``.
    """
    chex.assert_equal(sorted(fields), sorted(f.name for f in spec.fields))
    for f in spec.fields:
        chex.assert_shape(fields[f.name], (*blocks_shape, *f.shape))
        chex.assert_type(fields[f.name], f.dtype.newbyteorder("="))


def nonfinite(a: jax.Array) -> jax.Array:
    """``~isfinite(a)`` elementwise; for 16-bit floats read as integer bits (much faster)."""
    dtype = jnp.dtype(a.dtype)
    if dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating):
        info = jnp.finfo(dtype)
        exp_mask = ((1 << info.nexp) - 1) << info.nmant
        bits = jax.lax.bitcast_convert_type(a, jnp.uint16)
        return (bits & 0x7FFF) >= exp_mask
    if not jnp.issubdtype(dtype, jnp.inexact):
        return jnp.zeros(a.shape, bool)
    return ~jnp.isfinite(a)


def bad_blocks(
    blocks: jax.Array, fields: dict[str, jax.Array], spec: FormatSpec, *, read_input: bool = True
) -> jax.Array:
    """Per block: True where the input is non-finite or the format overflows.

    ``blocks`` is the input ``[..., n_blocks, block_size]``. A scale that overflows its
    dtype is non-finite; so is, usually, the scale of a block holding a NaN or Inf (max
    and min propagate them), but XLA's vectorised max may drop a NaN, so the input is
    read too unless ``read_input=False`` (the single-tensor path, which only locates a
    block once a scale says something is wrong). A float format's "scale" is the stored
    value itself, which keeps NaN/Inf inputs: there only a finite value stored as Inf
    counts (with ``read_input=False`` every non-finite stored value is flagged: suspects,
    for the caller to confirm). A format without scales (F32) has no bad blocks. A
    format with a ``max_abs`` bound always reads the input (NaN fails ``|x| <= max_abs``).
    """
    lead = blocks.shape[:-1]
    flags = []
    if spec.max_abs is not None:  # the scales don't tell: read the input
        mags = jnp.abs(blocks)
        flags.append(~(mags <= jnp.asarray(spec.max_abs, mags.dtype)).all(axis=-1))
    elif spec.scales and spec.is_block_quantized and read_input:
        flags.append(~jnp.isfinite(blocks).all(axis=-1))
    for name in spec.scales:
        f = nonfinite(fields[name])
        per_block = math.prod(f.shape[len(lead) :])
        flags.append(f.reshape(lead) if per_block == 1 else f.reshape(*lead, per_block).any(-1))
    if not flags:
        return jnp.zeros(lead, bool)
    bad = functools.reduce(jnp.logical_or, flags)
    if not spec.is_block_quantized and read_input:
        bad = bad & jnp.isfinite(blocks[..., 0])
    return bad


def error_sums(x: Any, y: Any, mask: Any = None, axis: Any = None):
    """``(sum err^2, max |err|, sum |err|, sum x^2)`` of ``err = x - y`` over ``axis``.

    ``mask`` (broadcast against ``x``) leaves padding out. JAX arrays are compared in
    float32 (inside the engines' programs), numpy arrays in float64 (the CLI's
    ``compare``). The statistics of every engine (``compute_quantization_stats``,
    ``quantize_model(report=True)``, the CLI) come from these four sums and
    :func:`error_stats`.
    """
    xp, dt = (np, np.float64) if isinstance(x, np.ndarray) else (jnp, jnp.float32)
    x = x.astype(dt)
    err = x - y.astype(dt)
    sig = x * x
    if mask is not None:
        err = xp.where(mask, err, dt(0))
        sig = xp.where(mask, sig, dt(0))
    return (
        xp.sum(err * err, axis=axis),
        xp.max(xp.abs(err), axis=axis, initial=0.0),
        xp.sum(xp.abs(err), axis=axis),
        xp.sum(sig, axis=axis),
    )


def error_stats(sq: float, max_error: float, abs_sum: float, sig: float, count: int):
    """``(rmse, max_error, mean_error, sqnr_db)`` from :func:`error_sums` of ``count`` values.

    SQNR is ``10 log10(sum x^2 / sum err^2)``: ``inf`` when lossless, ``-inf`` for a zero
    signal with an error. An empty comparison is lossless.
    """
    if not count:
        return 0.0, 0.0, 0.0, math.inf
    sqnr = math.inf if sq == 0 else (10 * math.log10(sig / sq) if sig > 0 else -math.inf)
    return math.sqrt(sq / count), float(max_error), abs_sum / count, sqnr
