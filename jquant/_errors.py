"""The jquant exception hierarchy.

Every error jquant raises on purpose derives from :class:`QuantError`, itself a
``ValueError``, so ``except ValueError`` keeps working for callers that don't know
jquant. Messages name the tensor (its pytree path or the ``name=`` given), the
problem and the fix.

.. code-block:: text

    QuantError(ValueError)
    ├── UnsupportedDTypeError(QuantError, TypeError)  integer/bool/complex input
    ├── UnknownFormatError(QuantError, KeyError)      a format name jquant doesn't know
    ├── ShapeError(QuantError)                        shapes or shardings that don't fit
    ├── NonFiniteError(QuantError)                    NaN/Inf in a tensor being quantized
    ├── ScaleOverflowError(QuantError)                a block scale that overflows float16
    ├── CalibrationError(QuantError)                  bad calibration input or parameters
    ├── FileFormatError(QuantError)                   corrupt, truncated or unknown files
    └── FileWriteError(QuantError, OSError)           a file that can't be written (disk
                                                      full, permission denied, bad path)
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "FileFormatError",
    "FileWriteError",
    "NonFiniteError",
    "QuantError",
    "ScaleOverflowError",
    "ShapeError",
    "UnknownFormatError",
    "UnsupportedDTypeError",
]


class QuantError(ValueError):
    """Base class of every error jquant raises on purpose.

    Example:
        >>> import jquant
        >>> issubclass(jquant.NonFiniteError, jquant.QuantError)
        True
    """


class UnsupportedDTypeError(QuantError, TypeError):
    """An array of a dtype jquant can't quantize (integer, bool, complex, ...)."""


class UnknownFormatError(QuantError, KeyError):
    """A quantization format name or id that jquant doesn't know."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class ShapeError(QuantError):
    """A shape (or sharding) that the requested operation can't handle."""


class NonFiniteError(QuantError):
    """A NaN or infinite value in a tensor that is being quantized."""


class ScaleOverflowError(QuantError):
    """A block whose scale does not fit in float16 (the block's values are too large)."""


class CalibrationError(QuantError):
    """Invalid calibration input or parameters."""


class FileFormatError(QuantError):
    """A file that is corrupt, truncated, or not in the format expected."""


class FileWriteError(QuantError, OSError):
    """A file that could not be written: disk full, permission denied, a bad path.

    Writes are atomic, so when this is raised no partial file is left behind.
    """
