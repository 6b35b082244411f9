"""llama.cpp interoperability: llama-quantize's mixes, its GGUF engine, importance matrices."""

from .imatrix import ImportanceMatrix as ImportanceMatrix
from .imatrix import collect_imatrix as collect_imatrix
from .imatrix import load_imatrix as load_imatrix
from .imatrix import save_imatrix as save_imatrix
from .quantize import convert_gguf as convert_gguf
from .quantize import llama_tensor_types as llama_tensor_types
