"""jquant: GGML block quantization (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, F32) in JAX.

Byte-exact with ggml's reference quantizer, pure and jittable, on CPU, GPU and TPU.
"""

from ._errors import CalibrationError as CalibrationError
from ._errors import FileFormatError as FileFormatError
from ._errors import NonFiniteError as NonFiniteError
from ._errors import QuantError as QuantError
from ._errors import ScaleOverflowError as ScaleOverflowError
from ._errors import ShapeError as ShapeError
from ._errors import UnknownFormatError as UnknownFormatError
from ._errors import UnsupportedDTypeError as UnsupportedDTypeError
from ._quantize import dequantize_tensor as dequantize_tensor
from ._quantize import quantize_tensor as quantize_tensor
from ._stats import QuantizationStats as QuantizationStats
from ._stats import compute_quantization_stats as compute_quantization_stats
from ._tensor import QuantizedTensor as QuantizedTensor
from ._types import QuantType as QuantType

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "FileFormatError",
    "NonFiniteError",
    "QuantError",
    "QuantType",
    "QuantizationStats",
    "QuantizedTensor",
    "ScaleOverflowError",
    "ShapeError",
    "UnknownFormatError",
    "UnsupportedDTypeError",
    "compute_quantization_stats",
    "dequantize_tensor",
    "quantize_tensor",
]
