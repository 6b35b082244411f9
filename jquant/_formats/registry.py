"""The format table: one :class:`FormatSpec` record per GGML format, as ggml's ``type_traits``.

A record says everything the engines need to know about a format: its GGML id and
name, the values per block (1 for the float formats, 32 or 256 for block formats), the
stored fields in ggml's byte order (name, dtype, per-block shape), the encode and
decode kernels, which fields carry the scales (the NaN/Inf/overflow checks read only
those), the overflow bound quoted in errors, an optional lookup table, the parts
``jquant.dot`` multiplies separately, the integer bit width calibration uses, and the
format llama.cpp falls back to for rows that aren't a multiple of the block.

The engines (single tensor, chunked model, sharded, ``dot``, GGUF, safetensors, stats,
the CLI) only walk these records: adding a format is one record here, its kernel
module, and its tests. :func:`register` adds a record at run time (tests use it for a
throw-away format); a record whose ``qtype`` is ``None`` then stands for its format
wherever a :class:`~jquant.QuantType` is accepted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

from .._errors import QuantError, UnsupportedDTypeError
from . import floats, iq4, kquant_affine, kquant_symmetric, legacy, refine, refine_kquant
from .quant_type import FORMATS, QuantType, QuantTypeLike

__all__ = [
    "DEFAULT_FORMAT",
    "FLOAT_DTYPES",
    "Field",
    "FormatSpec",
    "float_format",
    "format_spec",
    "formats",
    "numpy_dtype",
    "register",
    "restored_dtype",
    "unregister",
]

Fields = dict[str, jax.Array]

F16_MAX = 65504.0
"""Largest finite float16: the bound of every fp16 scale."""


class Field(NamedTuple):
    """One stored field of a block: ``name``, little-endian ``dtype``, per-block ``shape``."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the field takes in one block."""
        return np.dtype(self.dtype).itemsize * math.prod(self.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class FormatSpec:
    """Everything jquant knows about one format.

    A record acts like its :class:`~jquant.QuantType` (``name``, ``ggml_type``,
    ``block_size``, ``bytes_per_block``, ``bits_per_weight``, ``is_block_quantized``,
    ``row_bytes``), so a registered format without a ``QuantType`` member goes wherever
    a format is accepted. Records compare by identity and are hashable (static under jit).

    Attributes:
        name: the format's name (``"Q4_0"``), as ggml spells it.
        ggml_type: the GGML type id written in GGUF files.
        block_size: values per block along the last axis (1 for float formats).
        fields: the stored fields in ggml's byte order; each is packed as
          ``[*lead, n_blocks, *shape]`` in a :class:`~jquant.QuantizedTensor`.
        quantize: ``quantize(x) -> fields`` for rows ``x: f32[..., n]``, ``n`` a multiple
          of ``block_size``.
        dequantize: ``dequantize(fields) -> f32[..., n_blocks, block_size]``.
        description: one line saying how a value is stored.
        quantize_weighted: ``quantize_weighted(x, qw) -> fields`` with llama.cpp's
          per-column importance ``qw: f32[n]`` (``None``: no imatrix path).
        scales: the fields holding scales; a NaN/Inf input or an overflowing scale makes
          one of them non-finite, so the checks read only these. For a float format,
          the stored values themselves.
        overflow: the bound quoted when a scale overflows (``"|x| <= 8.31901e+06"``).
        table: an optional lookup table of the format (IQ4's ``kvalues``).
        dequantize_parts: for ``jquant.dot``: the block's values as ``p`` parts
          ``[..., n_blocks, block_size // p]`` (part ``i`` holding elements
          ``i * block_size // p ...``), multiplied separately and interleaved once on
          the small result. ``None``: one part, ``dequantize``.
        bits: integer bits per quantized value, for calibration scales (``None``: none).
        max_abs: the largest ``|x|`` a block can hold, for formats whose scale search
          doesn't carry a NaN/Inf or an overflow into a scale field (the K-quants and
          IQ4 search around non-finite sums): their checks read the input itself and
          refuse a block beyond it. ``None``: the scale fields tell.
        fallback: what llama.cpp writes for rows that aren't a multiple of the block
          (``None``: the tensor's float dtype, F16/BF16/F32).
        qtype: the :class:`~jquant.QuantType` member, ``None`` for a run-time format.
        refine: the format's extra search steps for ``optimize=True`` (a
          :class:`refine.Levels` or :class:`refine_kquant.AffineK`); ``None``: the
          generic steps only.
    """

    name: str
    ggml_type: int
    block_size: int
    fields: tuple[Field, ...]
    quantize: Callable[[jax.Array], Fields]
    dequantize: Callable[[Fields], jax.Array]
    description: str
    quantize_weighted: Callable[[jax.Array, jax.Array], Fields] | None = None
    scales: tuple[str, ...] = ()
    overflow: str = ""
    table: np.ndarray | None = None
    dequantize_parts: Callable[[Fields], list[jax.Array]] | None = None
    bits: int | None = None
    max_abs: float | None = None
    fallback: QuantType | None = None
    qtype: QuantType | None = None
    refine: Any = None

    def __post_init__(self):
        fields = tuple(Field(n, np.dtype(d), tuple(s)) for n, d, s in self.fields)
        object.__setattr__(self, "fields", fields)
        names = [f.name for f in fields]
        if len(set(names)) != len(names) or not set(self.scales) <= set(names):
            raise QuantError(f"format {self.name}: bad fields {names} / scales {self.scales}")

    # -- what QuantType offers --------------------------------------------------------

    @property
    def spec(self) -> FormatSpec:
        """The record itself (``QuantType.spec`` gives a member's record)."""
        return self

    @property
    def key(self) -> Any:
        """What a :class:`~jquant.QuantizedTensor` stores as its ``qtype``."""
        return self.qtype if self.qtype is not None else self

    @property
    def value(self) -> int:
        """The GGML type id (as ``QuantType.value``)."""
        return self.ggml_type

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes, scales included."""
        return sum(f.nbytes for f in self.fields)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per value including scales."""
        return self.bytes_per_block * 8 / self.block_size

    @property
    def is_block_quantized(self) -> bool:
        """True for block formats, False for F16/BF16/F32."""
        return self.block_size > 1

    @property
    def supports_imatrix(self) -> bool:
        """Whether the format has an importance-weighted encoder."""
        return self.quantize_weighted is not None

    def row_bytes(self, n: int) -> int:
        """Bytes that a row of ``n`` values takes (``n`` rounded up to whole blocks)."""
        return -(-n // self.block_size) * self.bytes_per_block

    def compression_ratio(self, source_bits: int = 32) -> float:
        """Ratio of ``source_bits`` per value to this format's bits per weight."""
        return source_bits / self.bits_per_weight

    @property
    def leaf_names(self) -> tuple[str, ...]:
        """The fields in pytree-leaf order: the quants ``qs`` first, then byte order."""
        return tuple(sorted((f.name for f in self.fields), key=lambda n: n != "qs"))

    def field(self, name: str) -> Field:
        """The field called ``name``."""
        return next(f for f in self.fields if f.name == name)

    # -- kernels ------------------------------------------------------------------------

    def require_imatrix(self) -> None:
        """Raise unless the format has an importance-weighted encoder.

        Raises:
            QuantError: naming the formats that have one.
        """
        if self.quantize_weighted is None:
            raise QuantError(
                f"{self.name} has no importance-weighted (imatrix) encoder; formats with one: "
                f"{', '.join(s.name for s in formats() if s.supports_imatrix) or 'none yet'}"
            )

    def encode(
        self, x: jax.Array, qw: jax.Array | None = None, *, optimize: bool = False
    ) -> Fields:
        """Rows ``f32[..., n]`` -> the packed fields, importance-weighted when ``qw`` is given.

        ``optimize=True``: the error-optimised bytes of :func:`refine.optimize_fields`
        (block formats; float formats ignore it).
        """
        if qw is not None:
            self.require_imatrix()
        if optimize and self.is_block_quantized:
            return refine.optimize_fields(self, x, qw)
        if qw is None:
            return self.quantize(x)
        return self.quantize_weighted(x, qw)

    def decode(self, fields: Fields) -> jax.Array:
        """The packed fields -> float32 ``[..., n_blocks, block_size]``."""
        return self.dequantize(fields)

    def parts(self, fields: Fields) -> list[jax.Array]:
        """The decoded values as :attr:`dequantize_parts` gives them (``jquant.dot``)."""
        if self.dequantize_parts is None:
            return [self.dequantize(fields)]
        return self.dequantize_parts(fields)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"FormatSpec({self.name}, ggml_type={self.ggml_type}, block_size={self.block_size})"


# -- the table --------------------------------------------------------------------------


def register(spec: FormatSpec) -> FormatSpec:
    """Add a record to the table (its GGML id and name must be new, or its own member's).

    Raises:
        QuantError: the id or the name is already taken by another record.
    """
    old = FORMATS.get(spec.ggml_type)
    if old is not None and old is not spec:
        raise QuantError(f"GGML type {spec.ggml_type} is already registered as {old.name}")
    clash = [s for s in FORMATS.values() if s.name.lower() == spec.name.lower() and s is not spec]
    if clash or (spec.qtype is None and spec.name.upper() in QuantType.__members__):
        raise QuantError(f"a format named {spec.name} is already registered")
    if spec.qtype is not None and spec.qtype.value != spec.ggml_type:
        raise QuantError(f"record {spec.name} has id {spec.ggml_type}, its member {spec.qtype!r}")
    FORMATS[spec.ggml_type] = spec
    return spec


def unregister(spec: FormatSpec) -> None:
    """Remove a run-time record added by :func:`register` (built-in formats stay)."""
    if spec.qtype is not None:
        raise QuantError(f"{spec.name} is a built-in format and can't be unregistered")
    if FORMATS.get(spec.ggml_type) is spec:
        del FORMATS[spec.ggml_type]


def format_spec(fmt: QuantTypeLike) -> FormatSpec:
    """The record of a format given as a QuantType, a name or alias, an id, or a record.

    Raises:
        UnknownFormatError: listing the valid names.
    """
    return QuantType.parse(fmt).spec


def formats() -> list[FormatSpec]:
    """Every registered record, built-in formats first."""
    return list(FORMATS.values())


# -- dtypes -----------------------------------------------------------------------------

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
"""The dtypes jquant quantizes."""

_ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def numpy_dtype(name: str | np.dtype | Any) -> np.dtype:
    """The numpy dtype called ``name``, ``bfloat16`` and float8 included (via ml_dtypes).

    Raises:
        UnsupportedDTypeError: not a dtype name numpy or ml_dtypes knows.
    """
    if isinstance(name, str) and name in _ML_DTYPES:
        return np.dtype(getattr(ml_dtypes, name))
    try:
        return np.dtype(name)
    except TypeError:
        raise UnsupportedDTypeError(f"unknown dtype {name!r}") from None


def float_format(dtype: Any) -> QuantType:
    """The float format that stores ``dtype`` exactly enough: F16, BF16, else F32."""
    name = np.dtype(dtype).name
    return next(
        (s.qtype for s in _FLOATS if s.fields[0].dtype.name == name and s.qtype), QuantType.F32
    )


def restored_dtype(qtype: QuantTypeLike) -> np.dtype:
    """The dtype a tensor stored in ``qtype`` is read back as when nothing else says.

    A float format's own dtype (float16, bfloat16, float32); float32 for block formats.
    """
    spec = format_spec(qtype)
    if spec.is_block_quantized:
        return np.dtype(np.float32)
    dt = spec.fields[0].dtype
    return dt if dt.isnative else dt.newbyteorder("=")


# -- the built-in records ---------------------------------------------------------------


def _symmetric_bound(divisor: int) -> str:
    return f"|x| <= {F16_MAX * divisor:.6g}"


def _affine_bound(qmax: int) -> str:
    return f"max - min <= {F16_MAX * qmax:.6g} and |min| <= {F16_MAX:.6g}"


def _halves(offset: float) -> Callable[[Fields], list[jax.Array]]:
    return lambda fields: legacy.dequantize_halves(fields, offset)


_BLOCKS: Sequence[FormatSpec] = (
    FormatSpec(
        "Q8_0", 8, 32, legacy.FIELDS_Q8_0, legacy.quantize_q8_0, legacy.dequantize_q8_0,
        "8-bit symmetric, fp16 scale: x = q*d",
        scales=("d",), overflow=_symmetric_bound(127), bits=8, qtype=QuantType.Q8_0,
    ),
    FormatSpec(
        "Q4_0", 2, 32, legacy.FIELDS_Q4_0, legacy.quantize_q4_0, legacy.dequantize_q4_0,
        "4-bit symmetric, fp16 scale: x = (q-8)*d",
        scales=("d",), overflow=_symmetric_bound(8), dequantize_parts=_halves(8.0), bits=4,
        qtype=QuantType.Q4_0,
    ),
    FormatSpec(
        "Q4_1", 3, 32, legacy.FIELDS_Q4_1, legacy.quantize_q4_1, legacy.dequantize_q4_1,
        "4-bit affine, fp16 scale and min: x = q*d + m",
        scales=("d", "m"), overflow=_affine_bound(15), dequantize_parts=_halves(0.0), bits=4,
        qtype=QuantType.Q4_1,
    ),
    FormatSpec(
        "Q5_0", 6, 32, legacy.FIELDS_Q5_0, legacy.quantize_q5_0, legacy.dequantize_q5_0,
        "5-bit symmetric, fp16 scale: x = (q-16)*d",
        scales=("d",), overflow=_symmetric_bound(16), dequantize_parts=_halves(16.0), bits=5,
        qtype=QuantType.Q5_0,
    ),
    FormatSpec(
        "Q5_1", 7, 32, legacy.FIELDS_Q5_1, legacy.quantize_q5_1, legacy.dequantize_q5_1,
        "5-bit affine, fp16 scale and min: x = q*d + m",
        scales=("d", "m"), overflow=_affine_bound(31), dequantize_parts=_halves(0.0), bits=5,
        qtype=QuantType.Q5_1,
    ),
)  # fmt: skip

_FLOATS: Sequence[FormatSpec] = (
    FormatSpec(
        "F16", 1, 1, floats.FIELDS_F16, floats.quantize_f16, floats.dequantize_float,
        "IEEE half precision", scales=("qs",), overflow=f"max {F16_MAX:g}", qtype=QuantType.F16,
    ),
    FormatSpec(
        "BF16", 30, 1, floats.FIELDS_BF16, floats.quantize_bf16, floats.dequantize_float,
        "bfloat16 (round to nearest even)", scales=("qs",),
        overflow=f"max {float(ml_dtypes.finfo(ml_dtypes.bfloat16).max):g}", qtype=QuantType.BF16,
    ),
    FormatSpec(
        "F32", 0, 1, floats.FIELDS_F32, floats.quantize_f32, floats.dequantize_float,
        "IEEE single precision (lossless for f32 input)", qtype=QuantType.F32,
    ),
)  # fmt: skip


def _kquant_bound(levels: int) -> dict[str, Any]:
    """The K-quant/IQ4 overflow fields: ``|x|`` beyond ``65504 * levels`` overflows the
    fp16 super-block scale (ggml writes an Inf scale there; jquant refuses the block)."""
    return {
        "overflow": f"|x| <= {F16_MAX * levels:.4g} (the fp16 super-block scale)",
        "max_abs": F16_MAX * levels,
    }


_KQUANTS: Sequence[FormatSpec] = (
    FormatSpec(
        "Q2_K", 10, 256, kquant_affine.FIELDS_Q2_K, kquant_affine.quantize_q2_k,
        kquant_affine.dequantize_q2_k,
        "2-bit affine super-blocks of 256: 16 groups of 16 with 4-bit scales and mins",
        quantize_weighted=kquant_affine.quantize_q2_k, scales=("d", "dmin"),
        **_kquant_bound(3 * 15), bits=2, fallback=QuantType.Q4_0, qtype=QuantType.Q2_K,
    ),
    FormatSpec(
        "Q3_K", 11, 256, kquant_symmetric.FIELDS_Q3_K, kquant_symmetric.quantize_q3_k,
        kquant_symmetric.dequantize_q3_k,
        "3-bit symmetric super-blocks of 256: 16 groups of 16 with 6-bit scales",
        quantize_weighted=kquant_symmetric.quantize_q3_k, scales=("d",),
        **_kquant_bound(4 * 32), bits=3, fallback=QuantType.Q4_0, qtype=QuantType.Q3_K,
    ),
    FormatSpec(
        "Q4_K", 12, 256, kquant_affine.FIELDS_Q4_K, kquant_affine.quantize_q4_k,
        kquant_affine.dequantize_q4_k,
        "4-bit affine super-blocks of 256: 8 groups of 32 with 6-bit scales and mins",
        quantize_weighted=kquant_affine.quantize_q4_k, scales=("d", "dmin"),
        **_kquant_bound(15 * 63), bits=4, fallback=QuantType.Q5_0, qtype=QuantType.Q4_K,
    ),
    FormatSpec(
        "Q5_K", 13, 256, kquant_affine.FIELDS_Q5_K, kquant_affine.quantize_q5_k,
        kquant_affine.dequantize_q5_k,
        "5-bit affine super-blocks of 256: 8 groups of 32 with 6-bit scales and mins",
        quantize_weighted=kquant_affine.quantize_q5_k, scales=("d", "dmin"),
        **_kquant_bound(31 * 63), bits=5, fallback=QuantType.Q5_1, qtype=QuantType.Q5_K,
    ),
    FormatSpec(
        "Q6_K", 14, 256, kquant_symmetric.FIELDS_Q6_K, kquant_symmetric.quantize_q6_k,
        kquant_symmetric.dequantize_q6_k,
        "6-bit symmetric super-blocks of 256: 16 groups of 16 with int8 scales",
        quantize_weighted=kquant_symmetric.quantize_q6_k, scales=("d",),
        **_kquant_bound(32 * 128), bits=6, fallback=QuantType.Q8_0, qtype=QuantType.Q6_K,
    ),
    FormatSpec(
        "IQ4_NL", 20, 32, iq4.FIELDS_IQ4_NL, iq4.quantize_iq4_nl, iq4.dequantize_iq4_nl,
        "4-bit non-linear grid (16 fixed int8 levels), fp16 scale per 32",
        quantize_weighted=iq4.quantize_iq4_nl, scales=("d",), **_kquant_bound(113),
        table=np.asarray(iq4.IQ4_GRID, np.int8), bits=4, qtype=QuantType.IQ4_NL,
    ),
    FormatSpec(
        "IQ4_XS", 23, 256, iq4.FIELDS_IQ4_XS, iq4.quantize_iq4_xs, iq4.dequantize_iq4_xs,
        "4-bit non-linear grid, super-blocks of 256 with 6-bit group scales",
        quantize_weighted=iq4.quantize_iq4_xs, scales=("d",),
        **_kquant_bound(113 * 32), table=np.asarray(iq4.IQ4_GRID, np.int8), bits=4,
        fallback=QuantType.IQ4_NL, qtype=QuantType.IQ4_XS,
    ),
)  # fmt: skip

_WEIGHTED_LEGACY = {
    "Q4_0": kquant_symmetric.quantize_q4_0_weighted,
    "Q4_1": kquant_affine.quantize_q4_1_weighted,
    "Q5_0": kquant_symmetric.quantize_q5_0_weighted,
    "Q5_1": kquant_affine.quantize_q5_1_weighted,
}
_BLOCKS = tuple(
    dataclasses.replace(s, quantize_weighted=_WEIGHTED_LEGACY[s.name])
    if s.name in _WEIGHTED_LEGACY
    else s
    for s in _BLOCKS
)

_REFINE = {
    "Q8_0": refine.INT8_LEVELS,
    "Q4_0": refine.nibble_levels(4, 8),
    "Q5_0": refine.nibble_levels(5, 16),
    "Q4_1": refine.nibble_levels(4, 0, affine=True),
    "Q5_1": refine.nibble_levels(5, 0, affine=True),
    "IQ4_NL": refine.grid_levels(iq4.IQ4_GRID),
    "Q2_K": refine_kquant.AFFINE_K2,
    "Q4_K": refine_kquant.AFFINE_K4,
    "Q5_K": refine_kquant.AFFINE_K5,
    "Q6_K": refine_kquant.SYMMETRIC_K6,
}
_BLOCKS, _KQUANTS = (
    tuple(dataclasses.replace(s, refine=_REFINE.get(s.name)) for s in group)
    for group in (_BLOCKS, _KQUANTS)
)

for _spec in (*_BLOCKS, *_FLOATS, *_KQUANTS):
    register(_spec)

DEFAULT_FORMAT = _BLOCKS[0].qtype
"""The format the CLI and ``convert_safetensors`` use when nothing else decides."""
SMALL_FORMAT = _BLOCKS[1].qtype
"""The 4-bit format the CLI's examples use."""
