"""The quantized-tensor pytree: :class:`QuantizedTensor`."""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import jax
import numpy as np

from .._errors import FileFormatError
from .._formats.quant_type import QuantType, QuantTypeLike

__all__ = ["QuantizedTensor", "human_bytes", "num_blocks_for"]


def num_blocks_for(n: int, qtype: QuantType) -> int:
    """Blocks that a row of ``n`` values needs in ``qtype`` (0 for an empty row)."""
    return -(-n // qtype.block_size)


def _row_len(shape: tuple[int, ...]) -> int:
    return shape[-1] if shape else 1


def _lead(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:-1] if shape else ()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class QuantizedTensor:
    """A tensor stored in a GGML format, as a pytree.

    The packed arrays are the pytree leaves, so a ``QuantizedTensor`` passes through
    ``jax.jit``, ``jax.vmap``, ``jax.device_put`` (with shardings) and checkpointing; the
    logical ``shape``, the original ``dtype`` and the format ``qtype`` are static.

    Blocks of 32 run along the last axis. For a tensor of shape ``(*lead, n)`` with
    ``nb = ceil(n / 32)`` blocks per row the leaves are:

    ========  ======================  =========  =================================
    leaf      shape                   dtype      formats
    ========  ======================  =========  =================================
    ``qs``    ``(*lead, nb, 32)``     int8       Q8_0: ``x ≈ qs * d``
    ``qs``    ``(*lead, nb, 16)``     uint8      Q4/Q5: low nibble = element j,
                                                 high nibble = element j + 16
    ``d``     ``(*lead, nb)``         float16    every Qx format: the block scale
    ``m``     ``(*lead, nb)``         float16    Q4_1, Q5_1: ``x ≈ q * d + m``
    ``qh``    ``(*lead, nb)``         uint32     Q5_0, Q5_1: bit j = bit 4 of element j
    ``qs``    ``shape``               f16/bf16/  F16, BF16, F32: the values themselves
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

    qs: jax.Array
    d: jax.Array | None = None
    m: jax.Array | None = None
    qh: jax.Array | None = None
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})
    dtype: np.dtype = dataclasses.field(default=np.dtype(np.float32), metadata={"static": True})
    qtype: QuantType = dataclasses.field(default=QuantType.F32, metadata={"static": True})

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
        """The packed arrays by name (``qs`` and whichever of ``d``/``m``/``qh`` exist)."""
        return {k: v for k in ("qs", "d", "m", "qh") if (v := getattr(self, k)) is not None}

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
        lead = _lead(self.shape)
        if not self.qtype.is_block_quantized:
            arr = np.asarray(self.qs)
            if arr.dtype != np.float32 and arr.dtype != np.float16:
                arr = arr.view(np.uint16)  # bfloat16 -> its bits
            arr = np.ascontiguousarray(arr).reshape(*lead, self.shape[-1] if self.shape else 1)
            return arr.view(np.uint8).reshape(*lead, self.qtype.row_bytes(arr.shape[-1]))
        nb = num_blocks_for(_row_len(self.shape), self.qtype)
        parts = [_as_bytes(self.d, np.float16)]
        if self.m is not None:
            parts.append(_as_bytes(self.m, np.float16))
        if self.qh is not None:
            parts.append(_as_bytes(self.qh, np.dtype("<u4")))
        qs = np.asarray(self.qs)
        parts.append(qs.view(np.uint8).reshape(*qs.shape[:-2], nb, qs.shape[-1]))
        return np.concatenate(parts, axis=-1).reshape(*lead, nb * self.qtype.bytes_per_block)

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
        raw = np.ascontiguousarray(raw).reshape(*lead, nb * qtype.bytes_per_block)
        dtype = np.dtype(dtype)
        if not qtype.is_block_quantized:
            store = {QuantType.F16: np.float16, QuantType.F32: np.float32}.get(qtype)
            if store is None:  # BF16
                import ml_dtypes

                store = ml_dtypes.bfloat16
            vals = raw.view(np.dtype(store).newbyteorder("<")).astype(store).reshape(shape or (1,))
            return cls(
                qs=jax.numpy.asarray(vals.reshape(shape)), shape=shape, dtype=dtype, qtype=qtype
            )
        blocks = raw.reshape(*lead, nb, qtype.bytes_per_block)
        o = 0
        leaves: dict[str, Any] = {}
        for name, width, dt in _block_fields(qtype):
            chunk = np.ascontiguousarray(blocks[..., o : o + width])
            leaves[name] = (
                chunk.view(dt).astype(dt.newbyteorder("=")) if name != "qs" else chunk.view(dt)
            )
            if name != "qs":
                leaves[name] = leaves[name][..., 0]
            o += width
        return cls(
            **{k: jax.numpy.asarray(v) for k, v in leaves.items()},
            shape=shape,
            dtype=dtype,
            qtype=qtype,
        )


def _block_fields(qtype: QuantType) -> list[tuple[str, int, np.dtype]]:
    """(leaf, byte width, dtype) in on-disk order for a block format."""
    f16, u32 = np.dtype("<f2"), np.dtype("<u4")
    fields = [("d", 2, f16)]
    if qtype in (QuantType.Q4_1, QuantType.Q5_1):
        fields.append(("m", 2, f16))
    if qtype in (QuantType.Q5_0, QuantType.Q5_1):
        fields.append(("qh", 4, u32))
    if qtype is QuantType.Q8_0:
        fields.append(("qs", 32, np.dtype(np.int8)))
    else:
        fields.append(("qs", 16, np.dtype(np.uint8)))
    return fields


def _as_bytes(a: Any, dt: np.dtype | type) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(a).astype(np.dtype(dt)))
    return arr.view(np.uint8).reshape(*arr.shape, arr.dtype.itemsize)


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: the sizes jquant prints."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
