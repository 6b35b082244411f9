"""``quantize_tensor`` and ``dequantize_tensor``: the public entry points for one array."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from .._errors import (
    NonFiniteError,
    QuantError,
    ScaleOverflowError,
    ShapeError,
    UnsupportedDTypeError,
)
from .._formats.quant_type import QuantType, QuantTypeLike
from .._formats.registry import FLOAT_DTYPES, FormatSpec
from .blocks import bad_blocks, check_fields, num_blocks, pad_rows
from .tensor import QuantizedTensor

__all__ = [
    "as_blocks",
    "as_rows",
    "check_dtype",
    "check_float32_range",
    "check_imatrix",
    "check_out",
    "dequantize_leaves",
    "dequantize_tensor",
    "quantize_tensor",
]

# Problem codes returned by the fused check.
_OK, _NONFINITE, _OVERFLOW = 0, 1, 2


def check_dtype(x: Any, name: str | None = None) -> np.dtype:
    """Return ``x``'s dtype if jquant can quantize it, else raise UnsupportedDTypeError."""
    dtype = getattr(x, "dtype", None)
    dtype = np.dtype(dtype if dtype is not None else np.asarray(x).dtype)  # lists, scalars
    if dtype.name not in FLOAT_DTYPES:
        what = f"tensor {name!r}" if name else "input"
        raise UnsupportedDTypeError(
            f"{what} has dtype {dtype.name}; jquant quantizes floating-point arrays "
            f"({', '.join(FLOAT_DTYPES)}). Leave integer, bool and complex arrays "
            f"unquantized, or cast them with .astype(jnp.float32) if they are weights."
        )
    return dtype


_F32_MAX = float(np.finfo(np.float32).max)


def check_float32_range(x: Any, qtype: QuantType, name: str | None = None) -> None:
    """Refuse a concrete float64 array holding finite values beyond float32's range.

    Every format is computed from float32, so such a value would silently become Inf
    (F16/BF16/F32) or be reported as non-finite (block formats). Arrays of other dtypes
    and traced values pass unchecked.

    Raises:
        ScaleOverflowError: the first out-of-range value, with its index.
    """
    if isinstance(x, jax.core.Tracer) or np.dtype(getattr(x, "dtype", np.float32)) != np.float64:
        return
    flat = np.asarray(x).reshape(-1)
    step = 1 << 20  # bounded temporaries on big tensors
    for lo in range(0, flat.size, step):
        part = flat[lo : lo + step]
        bad = np.isfinite(part) & (np.abs(part) > _F32_MAX)
        if bad.any():
            k = lo + int(np.argmax(bad))
            index = tuple(int(i) for i in np.unravel_index(k, np.shape(x))) if np.ndim(x) else ()
            what = f"tensor {name!r}" if name else "the input"
            raise ScaleOverflowError(
                f"{what}: value {float(flat[k]):.6g} at element {index} is out of range for "
                f"{qtype.name} (jquant computes every format from float32, whose largest value "
                f"is {_F32_MAX:.6g}); scale or clip the tensor, or keep it unquantized"
            )


def as_rows(x: jax.Array, spec: FormatSpec) -> jax.Array:
    """float32 rows ``[*lead, nb * block]`` of ``x`` (a scalar is a row of one value)."""
    x = x.astype(jnp.float32)
    if x.ndim == 0:
        x = x.reshape(1)
    return pad_rows(x, spec.block_size)


def as_blocks(rows: jax.Array, spec: FormatSpec) -> jax.Array:
    """Padded rows ``[*lead, nb * block]`` as blocks ``[*lead, nb, block]``."""
    return rows.reshape(*rows.shape[:-1], rows.shape[-1] // spec.block_size, spec.block_size)


def _diagnose(blocks: jax.Array, fields: dict[str, jax.Array], spec: FormatSpec):
    """(code, flat element index, offending value) of the first bad block, code 0 if none.

    Cheap in the common case: :func:`bad_blocks` reads only the scales (block formats)
    or the stored values (F16/BF16); which problem it was is worked out on the bad
    block alone, so the argmax (a slow variadic reduce on CPU) runs only when something
    is wrong.
    """
    z = jnp.zeros((), jnp.int32)
    none = (z, z, jnp.zeros((), jnp.float32))
    if not spec.scales or blocks.size == 0:
        return none
    block = spec.is_block_quantized
    flat = blocks.reshape(-1, blocks.shape[-1])
    # flattened first: XLA fuses the check into one pass over the stored bits
    flat_fields = {f.name: fields[f.name].reshape(-1, *f.shape) for f in spec.fields}
    suspect = bad_blocks(flat, flat_fields, spec, read_input=False)

    def locate(_):
        # a float format stores NaN/Inf inputs as they are: only a finite input stored as
        # Inf (an overflow) is bad
        bad = suspect if block else suspect & jnp.isfinite(flat[:, 0])
        idx = jnp.argmax(bad).astype(jnp.int32)
        row = flat[idx]
        nonfinite = block & ~jnp.isfinite(row).all()
        code = jnp.where(bad[idx], jnp.where(nonfinite, _NONFINITE, _OVERFLOW), _OK)
        # the offending value: the first non-finite one, else the largest magnitude
        nf_pos = jnp.argmax(~jnp.isfinite(row))
        big_pos = jnp.argmax(jnp.abs(row))
        val = jnp.where(code == _NONFINITE, row[nf_pos], row[big_pos])
        pos = jnp.where(code == _NONFINITE, nf_pos, big_pos).astype(jnp.int32)
        return code.astype(jnp.int32), idx * flat.shape[-1] + pos, val

    return jax.lax.cond(suspect.any(), locate, lambda _: none, None)


@functools.partial(jax.jit, static_argnames=("qtype", "diagnose", "optimize"))
def _quantize_jit(x, lo, hi, qw=None, *, qtype: QuantType, diagnose: bool, optimize: bool = False):
    spec = qtype.spec
    if lo is not None:
        x = jnp.clip(x.astype(jnp.float32), lo, hi)
    rows = as_rows(x, spec)
    if qw is not None:
        qw = pad_rows(qw.astype(jnp.float32), spec.block_size)
    fields = spec.encode(rows, qw, optimize=optimize)
    blocks = as_blocks(rows, spec)
    check_fields(fields, spec, blocks.shape[:-1])
    diag = _diagnose(blocks, fields, spec) if diagnose else None
    return fields, diag


def _clip_bounds(clip: Any):
    if clip is None:
        return None, None
    if hasattr(clip, "clip_range"):
        lo, hi = clip.clip_range()
    else:
        lo, hi = clip
    return jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)


def _raise_problem(code: int, element: int, value: float, x_shape, qtype: QuantType, name):
    spec = qtype.spec
    what = f"tensor {name!r}" if name else "the input"
    n = x_shape[-1] if x_shape else 1
    n_padded = num_blocks(n, spec.block_size) * spec.block_size
    row, col = divmod(element, n_padded)
    col = min(col, n - 1)
    lead = tuple(int(i) for i in np.unravel_index(row, x_shape[:-1])) if len(x_shape) > 1 else ()
    index = (*lead, col) if x_shape else ()
    block = element // spec.block_size
    where = f"block {block} (element {index})" if spec.is_block_quantized else f"element {index}"
    fix = (
        "Keep this tensor in F32/BF16 (e.g. a rule mapping it to 'f32'), or clip it first "
        "(quantize_tensor(..., clip=(lo, hi)))."
    )
    if code == _NONFINITE:
        raise NonFiniteError(
            f"{what} holds a non-finite value ({value}) at {where}; a NaN/Inf would make every "
            f"weight of its {spec.name} block NaN. Replace or mask non-finite values before "
            f"quantizing (jnp.nan_to_num), or keep this tensor in F32."
        )
    if spec.is_block_quantized:
        scale = spec.field(spec.scales[0]).dtype.name
        raise ScaleOverflowError(
            f"{what}: the {spec.name} scale of {where} overflows {scale} (largest value "
            f"{value:.6g}; {spec.name} needs {spec.overflow}). {fix}"
        )
    raise ScaleOverflowError(
        f"{what}: value {value:.6g} at {where} overflows {spec.name} ({spec.overflow}). {fix}"
    )


def check_imatrix(imatrix: Any, x_shape: tuple[int, ...], name: str | None) -> jax.Array:
    """``imatrix`` as float32 ``[n]``: one non-negative, finite weight per column of ``x``.

    Raises:
        ShapeError: not one weight per column of the last axis.
        QuantError: negative or non-finite weights (checked when concrete).
    """
    what = f"tensor {name!r}" if name else "the input"
    n = x_shape[-1] if x_shape else 1
    w = jnp.asarray(imatrix)
    if w.shape != (n,):
        raise ShapeError(
            f"the importance weights (imatrix) of {what} have shape {tuple(w.shape)}; they "
            f"need one weight per column of the last axis: shape ({n},)"
        )
    w = w.astype(jnp.float32)
    if not isinstance(w, jax.core.Tracer):
        host = np.asarray(w)
        if not np.isfinite(host).all() or (host < 0).any():
            bad = int(np.argmax(~np.isfinite(host) | (host < 0)))
            raise QuantError(
                f"the importance weights (imatrix) of {what} must be finite and non-negative; "
                f"column {bad} holds {host[bad]}"
            )
    return w


def quantize_tensor(
    x: jax.typing.ArrayLike,
    qtype: QuantTypeLike,
    *,
    clip: Any = None,
    check: bool | None = None,
    name: str | None = None,
    imatrix: jax.typing.ArrayLike | None = None,
    optimize: bool = False,
) -> QuantizedTensor:
    """Quantize an array into a GGML format, byte-exact with ggml's reference quantizer.

    Blocks of 32 run along the last axis; a last axis that isn't a multiple of 32 is
    padded inside its last block and restored on dequantize. Pure and jittable (the
    format is static); vmap works over leading axes.

    Args:
        x: a float16, bfloat16, float32 or float64 array of any shape, scalars included.
        qtype: a :class:`QuantType` or its name (``"q4_0"``, ``"int8"``, ...).
        clip: optional ``(lo, hi)`` or a :class:`CalibrationData`; values are clipped to
          that range first (outlier clipping).
        check: raise on NaN/Inf input or a block scale that overflows float16. ``None``
          (default) checks when ``x`` is concrete and skips the check under ``jit``;
          ``True`` under ``jit`` uses ``jax.experimental.checkify`` (wrap the caller in
          ``checkify.checkify``); ``False`` never checks (non-finite blocks then
          dequantize to NaN, as in ggml).
        name: the tensor's name (e.g. its pytree path) used in error messages.
        imatrix: optional importance weights, one non-negative float per column of the
          last axis (llama.cpp's imatrix), for the formats with a weighted encoder.
        optimize: search for bytes with a lower squared error (imatrix-weighted when
          ``imatrix`` is given) than ggml's, still valid bytes of the same format that any
          GGUF reader loads; never worse than ggml's bytes in any block, and several
          times slower to encode. ``False`` (default): byte-exact with ggml.

    Returns:
        A :class:`QuantizedTensor` remembering ``x``'s shape and dtype.

    Raises:
        UnsupportedDTypeError: integer, bool or complex input.
        NonFiniteError: NaN or Inf in ``x`` (when checked).
        ScaleOverflowError: a block whose scale overflows float16 (when checked).
        ShapeError: ``imatrix`` is not one weight per column.
        QuantError: ``imatrix`` has negative or non-finite weights, or the format has no
          weighted encoder.

    Example:
        >>> import jax, jax.numpy as jnp, jquant
        >>> x = jax.random.normal(jax.random.key(0), (4, 64))
        >>> q = jquant.quantize_tensor(x, "q8_0")
        >>> q.shape, q.qtype.name, q.nbytes
        ((4, 64), 'Q8_0', 272)
        >>> y = jquant.dequantize_tensor(q)
        >>> bool(jnp.max(jnp.abs(y - x)) < 0.03)
        True
        >>> jquant.quantize_tensor(jnp.array([1.0, jnp.nan]), "q4_0")
        Traceback (most recent call last):
        ...
        jquant._errors.NonFiniteError: the input holds a non-finite value (nan) at block 0 (element (1,)); ...
    """
    qtype = QuantType.parse(qtype)
    check_dtype(x, name)
    if check is not False:
        check_float32_range(x, qtype, name)
    x = jnp.asarray(x)
    dtype = np.dtype(x.dtype)  # float64 becomes float32 unless jax_enable_x64 is on
    lo, hi = _clip_bounds(clip)
    qw = None
    if imatrix is not None:
        qw = check_imatrix(imatrix, tuple(x.shape), name)
        qtype.spec.require_imatrix()
    traced = isinstance(x, jax.core.Tracer) or any(
        isinstance(b, jax.core.Tracer) for b in (lo, hi) if b is not None
    )
    if check is None:
        check = not traced
    diagnose = bool(check)
    fields, diag = _quantize_jit(
        x, lo, hi, qw, qtype=qtype, diagnose=diagnose, optimize=bool(optimize)
    )
    if diagnose:
        code, element, value = diag
        if traced:
            checkify.check(
                code == _OK,
                f"{name or 'input'}: non-finite value or {qtype.name} scale overflow at flat "
                "element {element} (value {value}); keep this tensor in F32 or clip it",
                element=element,
                value=value,
            )
        elif int(code) != _OK:
            _raise_problem(int(code), int(element), float(value), tuple(x.shape), qtype, name)
    return QuantizedTensor(fields, shape=tuple(x.shape), dtype=dtype, qtype=qtype)


@functools.partial(jax.jit, static_argnames=("qtype", "shape", "dtype"))
def _dequantize_jit(leaves, *, qtype: QuantType, shape, dtype):
    return dequantize_leaves(leaves, qtype, shape, dtype)


def dequantize_leaves(leaves, qtype: QuantType, shape, dtype) -> jax.Array:
    """The packed leaves of a QuantizedTensor -> its logical array (traceable, unjitted)."""
    vals = qtype.spec.decode(leaves)
    n = shape[-1] if shape else 1
    vals = vals.reshape(*vals.shape[:-2], vals.shape[-2] * vals.shape[-1])[..., :n]
    # leading axes beyond the logical shape come from vmap-style batching
    extra = vals.shape[: vals.ndim - max(len(shape), 1)]
    return vals.reshape(*extra, *shape).astype(dtype)


@functools.partial(
    jax.jit,
    static_argnames=("qtype", "shape", "dtype"),
    donate_argnames=("out",),
    keep_unused=True,  # an unused argument is pruned, and its donation with it
)
def _dequantize_into_jit(leaves, out, *, qtype: QuantType, shape, dtype):
    # ``out`` is only donated: XLA writes the result into its memory (same shape and
    # dtype), so no fresh buffer is allocated (and page-faulted) for the output.
    del out
    return dequantize_leaves(leaves, qtype, shape, dtype)


def check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype, name: str = "out") -> None:
    """Raise unless ``out`` is a ``jax.Array`` of ``shape`` and ``dtype`` (a reusable buffer)."""
    if not isinstance(out, jax.Array):
        raise TypeError(f"{name} must be a jax.Array to write into, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or np.dtype(out.dtype) != dtype:
        raise ShapeError(
            f"{name} has shape {tuple(out.shape)} and dtype {np.dtype(out.dtype).name}; the "
            f"dequantized tensor is {tuple(shape)} {dtype.name}. Pass a buffer of that shape "
            f"and dtype (e.g. an earlier result you no longer need), or out=None"
        )


def dequantize_tensor(q: QuantizedTensor, dtype: Any = None, *, out: Any = None) -> jax.Array:
    """Turn a :class:`QuantizedTensor` back into an array of its original shape.

    Byte-exact with ``gguf.quants.dequantize`` (float32), then cast to ``dtype``,
    which defaults to the dtype the tensor was quantized from (or ``out``'s dtype).

    On CPU the cost of writing the result into a freshly allocated array is mostly the
    operating system mapping new pages; passing ``out``, an array you no longer need
    with the result's shape and dtype (e.g. the previous result in a loop over layers),
    makes XLA write the result into that memory instead, several times faster.
    ``out`` is donated: don't use it afterwards, use the returned array. While a numpy
    view of ``out`` (``np.asarray(out)``) is alive, XLA can't reuse its memory and
    allocates afresh. Under ``jit`` ``out`` is ignored (XLA places intermediates itself).

    Example:
        >>> import jax.numpy as jnp, jquant
        >>> q = jquant.quantize_tensor(jnp.ones((3, 40), jnp.bfloat16), "q4_1")
        >>> y = jquant.dequantize_tensor(q)
        >>> y.shape, y.dtype
        ((3, 40), dtype(bfloat16))
        >>> y = jquant.dequantize_tensor(q, out=y)  # reuses y's memory; the old y is gone
        >>> y.shape, y.dtype
        ((3, 40), dtype(bfloat16))

    Raises:
        TypeError: ``q`` is not a QuantizedTensor, or ``out`` not a ``jax.Array``.
        ShapeError: ``out`` has another shape or dtype than the result.
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize_tensor expects a QuantizedTensor, got {type(q).__name__}")
    if dtype is None and out is not None and hasattr(out, "dtype"):
        dtype = out.dtype
    out_dtype = np.dtype(dtype) if dtype is not None else q.dtype
    leaves = q.leaves()
    traced = any(isinstance(v, jax.core.Tracer) for v in leaves.values())
    if out is None or traced or isinstance(out, jax.core.Tracer):
        return _dequantize_jit(leaves, qtype=q.qtype, shape=q.shape, dtype=out_dtype)
    check_out(out, q.shape, out_dtype)
    return _dequantize_into_jit(leaves, out, qtype=q.qtype, shape=q.shape, dtype=out_dtype)
