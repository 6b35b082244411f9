"""ggml's own quantizer, ``ggml_quantize_chunk``, from llama-cpp-python's bundled libggml.

The oracle for every format (importance weights included). Tests that use it skip when
llama-cpp-python isn't installed (CI builds it when it can); the committed
``tests/data/ggml-vectors.npz`` (ggml's bytes on adversarial data) needs no library.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache
from pathlib import Path

import gguf
import numpy as np

DATA = Path(__file__).parent / "data"

# Only the shared libraries are needed: find the package without importing it.
_SPEC = importlib.util.find_spec("llama_cpp")
HAVE_GGML = _SPEC is not None


@cache
def libggml() -> ctypes.CDLL | None:
    """The shared library exporting ``ggml_quantize_chunk``, or None."""
    if _SPEC is None:
        return None
    libdir = Path(_SPEC.origin).resolve().parent / "lib"
    for name in ("libggml-base.so", "libggml.so", "libllama.so"):
        for path in sorted(libdir.glob(name + "*")):
            lib = ctypes.CDLL(str(path))
            if hasattr(lib, "ggml_quantize_chunk"):
                lib.ggml_quantize_chunk.restype = ctypes.c_size_t
                lib.ggml_quantize_chunk.argtypes = [
                    ctypes.c_int,
                    ctypes.c_void_p,
                    ctypes.c_void_p,
                    ctypes.c_int64,
                    ctypes.c_int64,
                    ctypes.c_int64,
                    ctypes.c_void_p,
                ]
                return lib
    return None


def ggml_quantize(x: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml's bytes for float32 rows ``x`` ``[n_rows, n_per_row]``: uint8 ``[n_rows, row_bytes]``.

    ``imatrix`` is one float32 per column (llama.cpp's ``quant_weights``) or None.
    """
    lib = libggml()
    assert lib is not None, "llama-cpp-python is not installed"
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    n_rows, n = x.shape
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    assert n % block == 0, f"row length {n} is not a multiple of {block}"
    out = np.zeros((n_rows, n // block * type_size), np.uint8)
    qw = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imatrix.shape == (n,)
        qw = imatrix.ctypes.data
    written = lib.ggml_quantize_chunk(
        int(ggml_type), x.ctypes.data, out.ctypes.data, 0, n_rows, n, qw
    )
    assert written == out.size
    return out


def vectors() -> dict[str, np.ndarray]:
    """ggml's bytes on 7 adversarial inputs x 12 types (see ``data/ggml-vectors.md``)."""
    with np.load(DATA / "ggml-vectors.npz") as z:
        return {k: z[k] for k in z.files}
