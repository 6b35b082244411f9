"""The table of formats: :class:`QuantType`."""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

from .._errors import UnknownFormatError

__all__ = ["FORMATS", "QuantType", "QuantTypeLike", "as_quant_type"]


FORMATS: dict[int, Any] = {}
"""GGML type id -> its :class:`~jquant._formats.registry.FormatSpec`, filled by the registry.

The enum holds names and ids; sizes, fields and kernels live in the records.
"""


class QuantType(enum.Enum):
    """A GGML storage format. The value is the GGML type id used in GGUF files.

    Every function taking a format accepts a ``QuantType`` or a name that
    :meth:`QuantType.parse` understands (``"q4_0"``, ``"Q8_0"``, ``"int8"``, ``"half"``...).

    Example:
        >>> from jquant import QuantType
        >>> QuantType.parse("q4_0").bits_per_weight
        4.5
        >>> QuantType.Q8_0.block_size, QuantType.Q8_0.bytes_per_block, QuantType.Q8_0.ggml_type
        (32, 34, 8)
    """

    Q8_0 = 8
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    F16 = 1
    BF16 = 30
    F32 = 0
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    IQ4_NL = 20
    IQ4_XS = 23

    @property
    def spec(self) -> Any:
        """This format's record in the format table (``jquant._formats.registry``)."""
        return FORMATS[self.value]

    @property
    def ggml_type(self) -> int:
        """The GGML type id (``gguf.GGMLQuantizationType`` value)."""
        return self.value

    @property
    def block_size(self) -> int:
        """Number of values per block (32 for the Qx formats, 1 for floats)."""
        return self.spec.block_size

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes, scales included."""
        return self.spec.bytes_per_block

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per value including scales (Q4_0: 18*8/32 = 4.5)."""
        return self.bytes_per_block * 8 / self.block_size

    @property
    def is_block_quantized(self) -> bool:
        """True for the Qx_y formats, False for F16/BF16/F32."""
        return self.spec.is_block_quantized

    @property
    def description(self) -> str:
        """One line saying how a value is stored."""
        return self.spec.description

    def row_bytes(self, n: int) -> int:
        """Bytes that a row of ``n`` values takes (``n`` rounded up to whole blocks)."""
        return -(-n // self.block_size) * self.bytes_per_block

    def compression_ratio(self, source_bits: int = 32) -> float:
        """Ratio of ``source_bits`` per value to this format's bits per weight."""
        return source_bits / self.bits_per_weight

    @classmethod
    def parse(cls, value: QuantTypeLike) -> QuantType:
        """Turn a name, alias, GGML id or ``gguf.GGMLQuantizationType`` into a QuantType.

        Names are case-insensitive; ``-`` and ``_`` are interchangeable. A format
        registered at run time without a member (a ``FormatSpec``) is returned as its
        record, by name, id or the record itself.

        Raises:
            UnknownFormatError: listing the valid names.
        """
        if isinstance(value, cls):
            return value
        # gguf.GGMLQuantizationType is an IntEnum: match it by id.
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            spec = FORMATS.get(int(value))
            if spec is not None:
                return spec.key
        elif isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            if key in _ALIASES:
                return _ALIASES[key]
            for spec in FORMATS.values():
                if spec.name.lower() == key:
                    return spec.key
        elif any(value is spec for spec in FORMATS.values()):
            return value
        names = [s.name for s in FORMATS.values()]
        raise UnknownFormatError(
            f"unknown quantization format {value!r}; valid names are "
            f"{', '.join(names)} (case-insensitive) and the aliases "
            f"{', '.join(sorted(a for a in _ALIASES if a.upper() not in cls.__members__))}"
        )

    def __str__(self) -> str:
        return self.name


QuantTypeLike = QuantType | str | int | Any
"""A :class:`QuantType`, its name or alias, or its GGML type id."""

_ALIASES: dict[str, QuantType] = {m.name.lower(): m for m in QuantType}
_ALIASES.update(
    {
        # the crate's and common spellings
        "int8": QuantType.Q8_0,
        "q8": QuantType.Q8_0,
        "int4": QuantType.Q4_0,
        "q4": QuantType.Q4_0,
        "q5": QuantType.Q5_0,
        "half": QuantType.F16,
        "fp16": QuantType.F16,
        "float16": QuantType.F16,
        "bfloat16": QuantType.BF16,
        "float": QuantType.F32,
        "float32": QuantType.F32,
        "fp32": QuantType.F32,
        "full": QuantType.F32,
    }
)


def as_quant_type(value: QuantTypeLike) -> QuantType:
    """Shorthand for :meth:`QuantType.parse`."""
    return QuantType.parse(value)
