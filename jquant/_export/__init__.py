"""Whole-model export to GGUF files llama.cpp runs (Llama, Gemma, Gemma 2, Gemma 3)."""

from .writer import export_gguf as export_gguf
from .writer import tensor_type as tensor_type

__all__ = ["export_gguf", "tensor_type"]
