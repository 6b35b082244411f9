"""Matrix products on quantized weights: :func:`dot` and :func:`dense`.

``dot(x, w)`` computes ``x @ dequantize_tensor(w)`` without ever holding the whole float
weight: it walks the weight's *input* axis (axis 0) in chunks of rows, dequantizes one
chunk of packed rows at a time and accumulates ``x[..., rows] @ w_chunk`` in float32.

Why chunks of rows, not the block-scaled integer dot ggml uses: Flax ``Dense`` and Haiku
``Linear`` store kernels as ``(in, out)`` and jquant's blocks run along the last axis,
so a block's scale ``d[k, b]`` belongs to one input row ``k`` and 32 outputs. The scale
varies along the contracted axis and cannot be pulled out of the sum; dequantizing a
slab of rows and feeding it to a float matmul keeps the arithmetic exact (an fp16 scale
times a small integer is exact in float32) and bounds the temporaries to one slab.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._errors import ShapeError, UnsupportedDTypeError
from .blocks import num_blocks
from .quantize import dequantize_tensor
from .tensor import QuantizedTensor

__all__ = ["dense", "dot"]

_CHUNK_BYTES = 1 << 20
"""Default size of one dequantized slab of weight rows (float32 bytes)."""


def _float_dtype(x: jax.Array, what: str) -> np.dtype:
    dtype = np.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise UnsupportedDTypeError(
            f"{what} has dtype {dtype.name}; jquant.dot multiplies floating-point inputs. "
            f"Cast it first, e.g. x.astype(jnp.float32)."
        )
    return dtype


def _contract(a: jax.Array, b: jax.Array, precision: Any) -> jax.Array:
    """``a @ b`` for 2-D float32 operands, accumulated in float32."""
    return lax.dot_general(
        a,
        b,
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _rows(leaves: dict[str, jax.Array], start: Any, size: int, dynamic: bool):
    if dynamic:
        return {k: lax.dynamic_slice_in_dim(v, start, size, axis=0) for k, v in leaves.items()}
    return {k: lax.slice_in_dim(v, start, start + size, axis=0) for k, v in leaves.items()}


def _chunk_rows(row_floats: int, k: int, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        chunk_rows = _CHUNK_BYTES // max(4 * row_floats, 1)
    return int(min(max(int(chunk_rows), 1), max(k, 1)))


def dot(
    x: jax.typing.ArrayLike,
    w: QuantizedTensor | jax.typing.ArrayLike,
    *,
    precision: Any = None,
    preferred_element_type: Any = None,
    chunk_rows: int | None = None,
) -> jax.Array:
    """``x @ W`` for a quantized ``W``, dequantizing a few rows of ``W`` at a time.

    ``w`` has the layout of a Flax ``Dense`` / Haiku ``Linear`` kernel: ``(in, *out)``,
    contracted over its first axis against ``x``'s last (``jnp.tensordot(x, w, 1)``).
    Its blocks of 32 run along the last axis (``out``), whatever its length: a ragged last
    axis (e.g. 10 classes) is padded inside its last block and the padding never reaches
    the result. The loop (``lax.fori_loop``) dequantizes ``chunk_rows`` rows of packed
    data per step, so XLA's temporaries are one slab of about 1 MiB plus the output, not
    the float weight. Values match ``x @ dequantize_tensor(w)`` up to float32 summation
    order; with ``x`` the identity they match bit for bit (at full float32 matmul
    precision: CPU, or ``precision=lax.Precision.HIGHEST`` on GPU/TPU).

    A weight stored ``(out, in)`` (GGUF, PyTorch) has its blocks along ``in``; quantize
    its transpose ``w.T`` for ``dot``, or dequantize it and use ``x @ w.T``.

    Everything is computed in float32 (the dequantized weights are exact there) and the
    result is cast to ``preferred_element_type``, by default ``x``'s dtype. A plain array
    ``w`` (a leaf a rule kept in F32) is accepted and multiplied the same way.

    Args:
        x: float array ``(..., in)``.
        w: a :class:`QuantizedTensor` (or array) of shape ``(in, *out)``, ``ndim >= 2``;
          a 1-D ``w`` gives ``x · w`` over the last axis.
        precision: passed to ``lax.dot_general`` (e.g. ``lax.Precision.HIGHEST`` on TPU).
        preferred_element_type: dtype of the result (default ``x.dtype``).
        chunk_rows: rows of ``w`` dequantized per step (default: about 1 MiB of float32).

    Returns:
        An array of shape ``(*x.shape[:-1], *w.shape[1:])``.

    Raises:
        ShapeError: if ``x.shape[-1] != w.shape[0]``.
        UnsupportedDTypeError: if ``x`` is not floating point.

    Example:
        >>> import jax, jax.numpy as jnp, jquant
        >>> w = jax.random.normal(jax.random.key(0), (256, 100))  # Dense kernel (in, out)
        >>> qw = jquant.quantize_tensor(w, "q8_0")
        >>> x = jax.random.normal(jax.random.key(1), (4, 256))
        >>> y = jquant.dot(x, qw)
        >>> y.shape, y.dtype
        ((4, 100), dtype('float32'))
        >>> ref = x @ jquant.dequantize_tensor(qw)
        >>> bool(jnp.allclose(y, ref, rtol=1e-4, atol=1e-4))
        True
    """
    x = jnp.asarray(x)
    _float_dtype(x, "x")
    out_dtype = np.dtype(x.dtype if preferred_element_type is None else preferred_element_type)
    w_shape = tuple(w.shape) if isinstance(w, QuantizedTensor) else tuple(jnp.shape(w))
    if len(w_shape) == 0 or x.ndim == 0 or x.shape[-1] != w_shape[0]:
        raise ShapeError(
            f"jquant.dot contracts x's last axis with the weight's first axis, but x has shape "
            f"{tuple(x.shape)} and the weight has shape {w_shape}. Weights are stored "
            f"(in, out) as in Flax Dense and Haiku Linear; transpose x or reshape it to "
            f"(..., {w_shape[0] if w_shape else '?'})."
        )
    k = w_shape[0]
    batch = x.shape[:-1]
    x2 = x.reshape(math.prod(batch), k).astype(jnp.float32)

    if not isinstance(w, QuantizedTensor) or len(w_shape) == 1:
        wf = dequantize_tensor(w, np.float32) if isinstance(w, QuantizedTensor) else jnp.asarray(w)
        _float_dtype(wf, "the weight")
        wf = wf.astype(jnp.float32).reshape(k, -1)
        y = _contract(x2, wf, precision)
        return y.reshape(*batch, *w_shape[1:]).astype(out_dtype)

    spec = w.spec
    leaves = w.leaves()
    # Width of one dequantized row: the padded blocks (the values, for float formats).
    out_lead, n = w_shape[1:-1], w_shape[-1]
    nb = num_blocks(n, spec.block_size)
    first = spec.fields[0]
    expect = (k, *out_lead, nb, *first.shape)
    got = tuple(leaves[first.name].shape)
    if got != expect:
        raise ShapeError(
            f"jquant.dot got a QuantizedTensor of shape {w_shape} whose packed data has shape "
            f"{got} (expected {expect}); batched (vmapped) quantized weights "
            f"are not supported: call jquant.dot inside jax.vmap instead."
        )
    padded = nb * spec.block_size
    row_floats = math.prod(out_lead) * padded
    rows = _chunk_rows(row_floats, k, chunk_rows)
    # the format's parts (e.g. the two nibble halves): multiplied separately, interleaved once
    one_row = {k: jax.ShapeDtypeStruct((1, *v.shape[1:]), v.dtype) for k, v in leaves.items()}
    n_parts = len(jax.eval_shape(spec.parts, one_row))

    def accumulate(acc, leaf_rows, x_cols):
        parts = spec.parts(leaf_rows)
        return tuple(
            a + _contract(x_cols, p.reshape(p.shape[0], -1), precision)
            for a, p in zip(acc, parts, strict=True)
        )

    def step(i, acc):
        start = i * rows
        x_cols = lax.dynamic_slice_in_dim(x2, start, rows, axis=1)
        return accumulate(acc, _rows(leaves, start, rows, dynamic=True), x_cols)

    n_full, tail = divmod(k, rows)
    acc = tuple(
        jnp.zeros((x2.shape[0], row_floats // n_parts), jnp.float32) for _ in range(n_parts)
    )
    if n_full == 1:
        acc = step(0, acc)
    elif n_full > 1:
        acc = lax.fori_loop(0, n_full, step, acc)
    if tail:
        start = n_full * rows
        x_cols = lax.slice_in_dim(x2, start, k, axis=1)
        acc = accumulate(acc, _rows(leaves, start, tail, dynamic=False), x_cols)
    m = x2.shape[0]
    if n_parts == 1:
        y = acc[0]
    else:  # interleave the parts back into blocks: [m, ..., nb, n_parts, block / n_parts]
        width = spec.block_size // n_parts
        y = jnp.stack([a.reshape(m, -1, nb, width) for a in acc], axis=-2)
    y = y.reshape(*batch, *out_lead, padded)[..., :n]
    return y.astype(out_dtype)


def _unpack_layer(kernel: Any, bias: Any) -> tuple[Any, Any]:
    if not isinstance(kernel, Mapping):
        return kernel, bias
    for k_name, b_name in (("kernel", "bias"), ("w", "b")):
        if k_name in kernel:
            extra = set(kernel) - {k_name, b_name}
            if extra:
                break
            if bias is not None and b_name in kernel:
                raise ValueError(f"bias given twice: as an argument and as {b_name!r}")
            return kernel[k_name], kernel.get(b_name, bias)
    raise ValueError(
        f"jquant.dense got a dict with keys {sorted(kernel)}; pass a Flax Dense layer's "
        f"params ({{'kernel', 'bias'}}), a Haiku Linear's ({{'w', 'b'}}), or the kernel itself"
    )


def dense(
    x: jax.typing.ArrayLike,
    kernel: QuantizedTensor | jax.typing.ArrayLike | Mapping[str, Any],
    bias: QuantizedTensor | jax.typing.ArrayLike | None = None,
    *,
    precision: Any = None,
    preferred_element_type: Any = None,
    chunk_rows: int | None = None,
) -> jax.Array:
    """A dense layer ``x @ kernel + bias`` on quantized (or plain) parameters.

    Drop-in for the forward pass of a Flax ``Dense`` or a Haiku ``Linear`` whose params
    went through :func:`jquant.quantize_model`: pass the layer's params dict
    (``{'kernel', 'bias'}`` in Flax, ``{'w', 'b'}`` in Haiku) or the kernel and bias. The
    kernel goes through :func:`dot` (no float copy of it is ever made); a bias, quantized
    or not, is dequantized (it is small) and added in float32.

    Args:
        x: float array ``(..., in)``.
        kernel: ``(in, *out)`` kernel, or a layer's params dict.
        bias: optional ``(*out,)`` bias (taken from the dict when ``kernel`` is one).
        precision: see :func:`dot`.
        preferred_element_type: dtype of the result (default ``x.dtype``).
        chunk_rows: see :func:`dot`.

    Returns:
        ``x @ kernel + bias`` of shape ``(*x.shape[:-1], *kernel.shape[1:])``.

    Example:
        >>> import jax, jax.numpy as jnp, jquant
        >>> layer = {"kernel": jax.random.normal(jax.random.key(0), (64, 10)),
        ...          "bias": jnp.arange(10, dtype=jnp.float32)}
        >>> qlayer = {"kernel": jquant.quantize_tensor(layer["kernel"], "q8_0"),
        ...           "bias": layer["bias"]}
        >>> x = jnp.ones((2, 64))
        >>> y = jax.jit(jquant.dense)(x, qlayer)
        >>> ref = jquant.dense(x, layer)  # the float layer, for comparison
        >>> y.shape, bool(jnp.allclose(y, ref, atol=0.2))
        ((2, 10), True)
    """
    kernel, bias = _unpack_layer(kernel, bias)
    x = jnp.asarray(x)
    out_dtype = np.dtype(x.dtype if preferred_element_type is None else preferred_element_type)
    y = dot(
        x,
        kernel,
        precision=precision,
        preferred_element_type=jnp.float32,
        chunk_rows=chunk_rows,
    )
    if bias is not None:
        b = dequantize_tensor(bias, np.float32) if isinstance(bias, QuantizedTensor) else bias
        b = jnp.asarray(b)
        _float_dtype(b, "the bias")
        b = b.astype(jnp.float32)
        y = y + b.reshape((1,) * (y.ndim - b.ndim) + b.shape)
    return y.astype(out_dtype)
