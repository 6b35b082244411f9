"""llama.cpp's own C GGUF reader (libggml's gguf_*) accepts jquant's files.

Runs where llama-cpp-python is installed (it bundles libggml; building it takes minutes, so
it isn't in the test extra): ``pip install llama-cpp-python``. Skipped otherwise.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant

# Only the shared libraries are needed: find the package without importing it.
_SPEC = importlib.util.find_spec("llama_cpp")
pytestmark = pytest.mark.skipif(_SPEC is None, reason="llama-cpp-python is not installed")


def _libggml() -> ctypes.CDLL:
    libdir = Path(_SPEC.origin).resolve().parent / "lib"
    for name in ("libggml-base.so", "libggml.so", "libllama.so"):
        for path in libdir.glob(name + "*"):
            lib = ctypes.CDLL(str(path))
            if hasattr(lib, "gguf_init_from_file"):
                return lib
    pytest.skip(f"no library exporting gguf_init_from_file under {libdir}")


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _read_with_ggml(path: Path) -> dict[str, tuple[int, bytes]]:
    lib = _libggml()
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    for fn, res in [
        ("gguf_get_n_tensors", ctypes.c_int64),
        ("gguf_get_data_offset", ctypes.c_size_t),
    ]:
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
    for fn, res in [
        ("gguf_get_tensor_name", ctypes.c_char_p),
        ("gguf_get_tensor_type", ctypes.c_int),
        ("gguf_get_tensor_offset", ctypes.c_size_t),
        ("gguf_get_tensor_size", ctypes.c_size_t),
    ]:
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]

    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    assert ctx, f"libggml's gguf reader rejected {path}"
    try:
        raw = path.read_bytes()
        base = lib.gguf_get_data_offset(ctx)
        out = {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            off, size = lib.gguf_get_tensor_offset(ctx, i), lib.gguf_get_tensor_size(ctx, i)
            name = lib.gguf_get_tensor_name(ctx, i).decode()
            out[name] = (lib.gguf_get_tensor_type(ctx, i), raw[base + off : base + off + size])
        return out
    finally:
        lib.gguf_free(ctx)


def test_ggml_reads_every_tensor_of_a_jquant_file(tmp_path):
    k = jax.random.split(jax.random.key(0), 6)
    params = {
        "tok_embeddings": jax.random.normal(k[0], (256, 128)),
        "layers": [
            {"attn": jax.random.normal(k[1], (128, 128)), "norm": jnp.ones(128)},
            {"attn": jax.random.normal(k[2], (128, 128)), "norm": jnp.ones(128)},
        ],
        "ffn": jax.random.normal(k[3], (128, 512)),
        "out": jax.random.normal(k[4], (128, 96)).astype(jnp.bfloat16),
    }
    rules = [
        ("tok_", "q8_0"),
        ("layers/0", "q5_1"),
        ("layers/1", "q4_1"),
        ("ffn", "q5_0"),
        (".*", "q4_0"),
    ]
    qparams = jquant.quantize_model(params, rules)
    path = tmp_path / "model.gguf"
    jquant.save_gguf(path, qparams)

    seen = _read_with_ggml(path)
    info = jquant.inspect_gguf(path)
    assert set(seen) == {t.name for t in info.tensors}
    flat = dict(
        jax.tree_util.tree_flatten_with_path(
            qparams, is_leaf=lambda x: isinstance(x, jquant.QuantizedTensor)
        )[0]
    )
    checked = 0
    for t in info.tensors:
        ggml_type, data = seen[t.name]
        assert ggml_type == t.ggml_type
        assert len(data) == t.nbytes
        if t.qtype is not None and t.qtype.is_block_quantized:
            checked += 1
    assert checked == 5
    # the bytes ggml reads for a tensor are the GGML encoding of the quantized leaf
    q = next(
        v for v in flat.values() if isinstance(v, jquant.QuantizedTensor) and v.qtype.name == "Q8_0"
    )
    name = next(t.name for t in info.tensors if t.ggml_type == 8)
    assert seen[name][1] == q.to_bytes().tobytes()
    assert np.frombuffer(seen[name][1], np.uint8).size == q.nbytes


def _ggml_quantize(x: np.ndarray, ggml_type: int, row_bytes: int) -> np.ndarray:
    """ggml's own C quantizer (ggml_quantize_chunk, no importance matrix)."""
    lib = _libggml()
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), np.float32)
    out = np.zeros((rows.shape[0], row_bytes), np.uint8)
    written = fn(
        ggml_type, rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None
    )
    assert written == out.size
    return out


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_byte_exact_with_ggml_c_itself(fmt):
    """The third oracle: ggml's compiled C, on every adversarial case (signed zeros too)."""
    from .test_exact import CASES

    qt = jquant.QuantType.parse(fmt)
    mismatched = {}
    for case, x in CASES.items():
        ours = (
            jquant.quantize_tensor(x, fmt, check=False)
            .to_bytes()
            .reshape(-1, qt.row_bytes(x.shape[-1]))
        )
        ref = _ggml_quantize(x, qt.ggml_type, qt.row_bytes(x.shape[-1]))
        bad = (ours.reshape(-1, qt.bytes_per_block) != ref.reshape(-1, qt.bytes_per_block)).any(-1)
        if bad.any():
            mismatched[case] = int(bad.sum())
    assert not mismatched, mismatched
