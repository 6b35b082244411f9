"""jquant: GGML block quantization (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, F32) in JAX.

Byte-exact with ggml's reference quantizer, pure and jittable, on CPU, GPU and TPU.
"""

from ._calibration.activations import calibrate_activations as calibrate_activations
from ._calibration.affine import dequantize_affine as dequantize_affine
from ._calibration.affine import quantize_affine as quantize_affine
from ._calibration.calibration import CalibrationData as CalibrationData
from ._calibration.calibration import CalibrationMethod as CalibrationMethod
from ._calibration.calibration import calibrate as calibrate
from ._calibration.calibration import merge_calibration as merge_calibration
from ._core.dot import dense as dense
from ._core.dot import dot as dot
from ._core.quantize import dequantize_tensor as dequantize_tensor
from ._core.quantize import quantize_tensor as quantize_tensor
from ._core.stats import QuantizationStats as QuantizationStats
from ._core.stats import compute_quantization_stats as compute_quantization_stats
from ._core.tensor import QuantizedTensor as QuantizedTensor
from ._errors import CalibrationError as CalibrationError
from ._errors import FileFormatError as FileFormatError
from ._errors import FileWriteError as FileWriteError
from ._errors import NonFiniteError as NonFiniteError
from ._errors import QuantError as QuantError
from ._errors import ScaleOverflowError as ScaleOverflowError
from ._errors import ShapeError as ShapeError
from ._errors import UnknownFormatError as UnknownFormatError
from ._errors import UnsupportedDTypeError as UnsupportedDTypeError
from ._export import export_gguf as export_gguf
from ._formats.quant_type import QuantType as QuantType
from ._io.gguf import GGUFInfo as GGUFInfo
from ._io.gguf import GGUFTensorInfo as GGUFTensorInfo
from ._io.gguf import inspect_gguf as inspect_gguf
from ._io.gguf import load_gguf as load_gguf
from ._io.gguf import save_gguf as save_gguf
from ._io.safetensors import convert_safetensors as convert_safetensors
from ._llama import ImportanceMatrix as ImportanceMatrix
from ._llama import collect_imatrix as collect_imatrix
from ._llama import convert_gguf as convert_gguf
from ._llama import llama_tensor_types as llama_tensor_types
from ._llama import load_imatrix as load_imatrix
from ._llama import save_imatrix as save_imatrix
from ._model.model import dequantize_model as dequantize_model
from ._model.model import quantize_model as quantize_model
from ._model.report import LeafReport as LeafReport
from ._model.report import ModelReport as ModelReport

__version__ = "0.1.0"

__all__ = [
    "CalibrationData",
    "CalibrationError",
    "CalibrationMethod",
    "FileFormatError",
    "FileWriteError",
    "GGUFInfo",
    "GGUFTensorInfo",
    "ImportanceMatrix",
    "LeafReport",
    "ModelReport",
    "NonFiniteError",
    "QuantError",
    "QuantType",
    "QuantizationStats",
    "QuantizedTensor",
    "ScaleOverflowError",
    "ShapeError",
    "UnknownFormatError",
    "UnsupportedDTypeError",
    "calibrate",
    "calibrate_activations",
    "collect_imatrix",
    "compute_quantization_stats",
    "convert_gguf",
    "convert_safetensors",
    "dense",
    "dequantize_affine",
    "dequantize_model",
    "dequantize_tensor",
    "dot",
    "export_gguf",
    "inspect_gguf",
    "llama_tensor_types",
    "load_gguf",
    "load_imatrix",
    "merge_calibration",
    "quantize_affine",
    "quantize_model",
    "quantize_tensor",
    "save_gguf",
    "save_imatrix",
]
