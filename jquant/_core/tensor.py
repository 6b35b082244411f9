"""The quantized-tensor pytree: :class:`QuantizedTensor`."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from .._errors import FileFormatError, ShapeError
from .._formats.quant_type import QuantType, QuantTypeLike
from .blocks import num_blocks

__all__ = ["QuantizedTensor", "human_bytes", "num_blocks_for"]


def num_blocks_for(n: int, qtype: QuantType) -> int:
    """Blocks that a row of ``n`` values needs in ``qtype`` (0 for an empty row)."""
    return num_blocks(n, qtype.block_size)


def _row_len(shape: tuple[int, ...]) -> int:
    return shape[-1] if shape else 1


def _lead(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:-1] if shape else ()


class QuantizedTensor:
    """A tensor stored in a GGML format, as a pytree.

    The packed arrays are the pytree leaves, so a ``QuantizedTensor`` passes through
    ``jax.jit``, ``jax.vmap``, ``jax.device_put`` (with shardings) and checkpointing; the
    logical ``shape``, the original ``dtype`` and the format ``qtype`` are static.

    Blocks run along the last axis. The leaves are the fields of the format's record
    (``jquant._formats.registry``), each shaped
    ``(*lead, nb, *per_block_shape)`` for a tensor of shape ``(*lead, n)`` with
    ``nb = ceil(n / block_size)`` blocks per row; ``q.fields`` (or :meth:`leaves`) gives
    them by name and ``q.<name>`` one of them. For the built-in formats:

    ========  ======================  =========  =================================
    leaf      shape                   dtype      formats
    ========  ======================  =========  =================================
    ``qs``    ``(*lead, nb, 32)``     int8       Q8_0: ``x ≈ qs * d``
    ``qs``    ``(*lead, nb, 16)``     uint8      Q4/Q5: low nibble = element j,
                                                 high nibble = element j + 16
    ``d``     ``(*lead, nb)``         float16    every Qx format: the block scale
    ``m``     ``(*lead, nb)``         float16    Q4_1, Q5_1: ``x ≈ q * d + m``
    ``qh``    ``(*lead, nb)``         uint32     Q5_0, Q5_1: bit j = bit 4 of element j
    ``qs``    ``(*lead, n)``           f16/bf16/  F16, BF16, F32: the values themselves
                                      f32
    ========  ======================  =========  =================================

    Q4_0 dequantizes as ``(q - 8) * d``, Q5_0 as ``(q - 16) * d``. A row whose length is
    not a multiple of 32 is padded inside its last block by repeating its last value
    (which leaves that block's scale unchanged); the padding is dropped on dequantize.
    A scalar is stored as a row of one value.

    Example:
        >>> import jax.numpy as jnp, jquant
        >>> q = jquant.quantize_tensor(jnp.linspace(-1, 1, 64), "q4_0")
        >>> q.qs.shape, q.d.shape, q.nbytes, q.num_blocks
        ((2, 16), (2,), 36, 2)
        >>> q.to_bytes().shape  # the bytes gguf.quants.quantize would produce
        (36,)
    """

    __slots__ = ("_fields", "shape", "dtype", "qtype")

    def __init__(
        self,
        fields: Mapping[str, Any] | None = None,
        *,
        shape: tuple[int, ...] = (),
        dtype: Any = np.float32,
        qtype: QuantTypeLike = QuantType.F32,
        **named: Any,
    ):
        qtype = QuantType.parse(qtype)
        given = {**(fields or {}), **named}
        order = qtype.spec.leaf_names
        if set(given) != set(order):
            raise ShapeError(
                f"a {qtype.name} QuantizedTensor holds the fields {list(order)}, got {sorted(given)}"
            )
        set_ = object.__setattr__
        set_(self, "_fields", {k: given[k] for k in order})
        set_(self, "shape", tuple(int(s) for s in shape))
        set_(self, "dtype", np.dtype(dtype))
        set_(self, "qtype", qtype)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"QuantizedTensor is immutable (can't set {name!r})")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_fields":
            raise AttributeError(name)
        fields = self._fields
        if name in fields:
            return fields[name]
        if name in _LEGACY_NAMES:  # q.m / q.qh of a format without them
            return None
        raise AttributeError(f"{self.qtype.name} QuantizedTensor has no field {name!r}")

    def __getstate__(self):
        return (self._fields, self.shape, self.dtype, self.qtype)

    def __setstate__(self, state) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            object.__setattr__(self, name, value)

    @property
    def fields(self) -> dict[str, jax.Array]:
        """The packed arrays by name (``qs`` first, then the format's byte order)."""
        return dict(self._fields)

    @property
    def spec(self) -> Any:
        """The format's record (``jquant._formats.registry.FormatSpec``)."""
        return self.qtype.spec

    # -- sizes ---------------------------------------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of logical values."""
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        """Number of blocks (values, for F16/BF16/F32) stored, padding included."""
        return math.prod(_lead(self.shape)) * num_blocks_for(_row_len(self.shape), self.qtype)

    @property
    def nbytes(self) -> int:
        """True packed size in bytes: exactly what the GGML/GGUF encoding takes."""
        return self.num_blocks * self.qtype.bytes_per_block

    @property
    def original_nbytes(self) -> int:
        """Size of the tensor in its original dtype."""
        return self.size * self.dtype.itemsize

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per logical value (padding and scales included)."""
        return 8 * self.nbytes / self.size if self.size else self.qtype.bits_per_weight

    def compression_ratio(self) -> float:
        """Original size over packed size (e.g. 7.11 for f32 -> Q4_0)."""
        return self.original_nbytes / self.nbytes if self.nbytes else 1.0

    def leaves(self) -> dict[str, jax.Array]:
        """The packed arrays by name (as :attr:`fields`)."""
        return dict(self._fields)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.shape)) or "scalar"
        return (
            f"QuantizedTensor({self.qtype.name}, shape={self.shape}, dtype={self.dtype.name}, "
            f"{human_bytes(self.nbytes)} packed [{shape}: {self.bits_per_weight:.2f} bits/weight, "
            f"{self.compression_ratio():.2f}x smaller than {self.dtype.name}])"
        )

    # -- GGML bytes ----------------------------------------------------------------

    def to_bytes(self) -> np.ndarray:
        """The GGML encoding: uint8 of shape ``(*shape[:-1], row_bytes)``.

        Identical to ``gguf.quants.quantize(x, type)`` (viewed as uint8 for F16/F32) for
        rows whose length is a multiple of the block size. A scalar gives ``(bytes,)``.
        """
        spec = self.qtype.spec
        lead = _lead(self.shape)
        nb = num_blocks(_row_len(self.shape), spec.block_size)
        parts = []
        for f in spec.fields:
            a = np.ascontiguousarray(np.asarray(self._fields[f.name]).astype(f.dtype))
            parts.append(a.view(np.uint8).reshape(*lead, nb, f.nbytes))
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        return out.reshape(*lead, nb * spec.bytes_per_block)

    @classmethod
    def from_bytes(
        cls,
        data: Any,
        qtype: QuantTypeLike,
        shape: tuple[int, ...] | None = None,
        dtype: Any = np.float32,
    ) -> QuantizedTensor:
        """Build a QuantizedTensor from GGML bytes (e.g. what ``gguf.quants.quantize`` made).

        Args:
            data: uint8 array-like (or ``bytes``), ``(*lead, row_bytes)`` or flat.
            qtype: the format of ``data``.
            shape: logical shape; defaults to ``(*lead, row_bytes / bytes_per_block * 32)``.
              It may have a last axis shorter than the stored rows (padded rows).
            dtype: the dtype ``dequantize_tensor`` restores by default.

        Raises:
            FileFormatError: if the byte count doesn't match ``shape`` and ``qtype``.
        """
        qtype = QuantType.parse(qtype)
        raw = (
            np.frombuffer(data, np.uint8)
            if isinstance(data, (bytes, bytearray, memoryview))
            else np.asarray(data)
        )
        if raw.dtype != np.uint8:
            raise FileFormatError(
                f"from_bytes expects uint8 data, got {raw.dtype}; pass arr.view(np.uint8)"
            )
        if shape is None:
            if raw.ndim == 0 or raw.shape[-1] % qtype.bytes_per_block:
                raise FileFormatError(
                    f"{raw.shape[-1] if raw.ndim else 0} bytes per row is not a multiple of the "
                    f"{qtype.name} block size ({qtype.bytes_per_block} bytes)"
                )
            shape = (*raw.shape[:-1], raw.shape[-1] // qtype.bytes_per_block * qtype.block_size)
        try:
            shape = tuple(operator.index(s) for s in shape)
        except TypeError:
            raise FileFormatError(f"shape {shape!r} is not a tuple of integers") from None
        if len(shape) > 64 or any(s < 0 for s in shape):
            raise FileFormatError(
                f"shape {shape if len(shape) <= 8 else f'of {len(shape)} dimensions'} is not "
                f"valid: at most 64 non-negative dimensions"
            )
        lead, n = _lead(shape), _row_len(shape)
        nb = num_blocks_for(n, qtype)
        expected = math.prod(lead) * nb * qtype.bytes_per_block
        if raw.size != expected:
            raise FileFormatError(
                f"{raw.size} bytes can't hold a {qtype.name} tensor of shape {shape}: it needs "
                f"{expected} bytes ({math.prod(lead)} rows x {nb} blocks x {qtype.bytes_per_block} bytes)"
            )
        blocks = np.ascontiguousarray(raw).reshape(*lead, nb, qtype.bytes_per_block)
        o = 0
        fields: dict[str, Any] = {}
        for f in qtype.spec.fields:
            chunk = np.ascontiguousarray(blocks[..., o : o + f.nbytes])
            vals = chunk.view(f.dtype).reshape(*lead, nb, *f.shape).astype(_native(f.dtype))
            fields[f.name] = jax.numpy.asarray(vals)
            o += f.nbytes
        return cls(fields, shape=shape, dtype=np.dtype(dtype), qtype=qtype)


def _flatten_with_keys(q: QuantizedTensor):
    names = tuple(q._fields)
    children = [(jax.tree_util.GetAttrKey(k), q._fields[k]) for k in names]
    return children, (names, q.shape, q.dtype, q.qtype)


def _flatten(q: QuantizedTensor):
    return tuple(q._fields.values()), (tuple(q._fields), q.shape, q.dtype, q.qtype)


def _unflatten(aux, children) -> QuantizedTensor:
    names, shape, dtype, qtype = aux
    q = object.__new__(QuantizedTensor)
    set_ = object.__setattr__
    set_(q, "_fields", dict(zip(names, children, strict=True)))
    set_(q, "shape", shape)
    set_(q, "dtype", dtype)
    set_(q, "qtype", qtype)
    return q


jax.tree_util.register_pytree_with_keys(
    QuantizedTensor, _flatten_with_keys, _unflatten, flatten_func=_flatten
)

_LEGACY_NAMES = ("qs", "d", "m", "qh")


def _native(dt: np.dtype) -> np.dtype:
    return dt if dt.isnative else dt.newbyteorder("=")


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: the sizes jquant prints."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
