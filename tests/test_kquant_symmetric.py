"""Q6_K, Q3_K and the weighted Q4_0/Q5_0 kernels against ggml's own bytes.

Oracles: ``tests/data/ggml-vectors.npz`` (no library needed) and libggml's
``ggml_quantize_chunk`` through ``_ggml_oracle`` on thousands of random blocks (skipped
when llama-cpp-python is missing); ``gguf.quants.dequantize`` for decoding.
"""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant._formats import guards, symmetric_search
from jquant._formats import kquant_symmetric as ks

from . import _ggml_oracle as oracle

QT = gguf.GGMLQuantizationType
LEGACY_Q4_0 = (("d", np.dtype("<f2"), ()), ("qs", np.dtype("u1"), (16,)))
LEGACY_Q5_0 = (
    ("d", np.dtype("<f2"), ()),
    ("qh", np.dtype("<u4"), ()),
    ("qs", np.dtype("u1"), (16,)),
)

# name -> (ggml type, fields, quantizer without weights or None, quantizer with weights)
FORMATS = {
    "Q6_K": (QT.Q6_K, ks.FIELDS_Q6_K, jax.jit(ks.quantize_q6_k), jax.jit(ks.quantize_q6_k)),
    "Q3_K": (QT.Q3_K, ks.FIELDS_Q3_K, jax.jit(ks.quantize_q3_k), jax.jit(ks.quantize_q3_k)),
    "Q4_0": (QT.Q4_0, LEGACY_Q4_0, None, jax.jit(ks.quantize_q4_0_weighted)),
    "Q5_0": (QT.Q5_0, LEGACY_Q5_0, None, jax.jit(ks.quantize_q5_0_weighted)),
}
DEQUANTIZE = {"Q6_K": jax.jit(ks.dequantize_q6_k), "Q3_K": jax.jit(ks.dequantize_q3_k)}
BLOCK_BYTES = {"Q6_K": 210, "Q3_K": 110, "Q4_0": 18, "Q5_0": 22}


def to_bytes(fields: dict[str, jax.Array], spec) -> np.ndarray:
    """Fields ``[rows, n_blocks, *shape]`` to ggml's byte rows ``[rows, row_bytes]``."""
    parts = []
    for name, dtype, shape in spec:
        a = np.asarray(fields[name])
        assert a.dtype == dtype.newbyteorder("=") or a.dtype == dtype, (name, a.dtype)
        assert a.shape[2:] == shape, (name, a.shape)
        a = np.ascontiguousarray(a.astype(dtype))
        parts.append(a.reshape(*a.shape[:2], -1).view(np.uint8))
    out = np.concatenate(parts, axis=-1)
    return out.reshape(out.shape[0], -1)


def from_bytes(rows: np.ndarray, spec) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_bytes` for one block size."""
    size = sum(np.dtype(dt).itemsize * int(np.prod(shape)) for _, dt, shape in spec)
    blocks = rows.reshape(rows.shape[0], -1, size)
    fields, at = {}, 0
    for name, dtype, shape in spec:
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape))
        raw = np.ascontiguousarray(blocks[..., at : at + nbytes])
        fields[name] = raw.view(dtype).reshape(*blocks.shape[:2], *shape)
        at += nbytes
    return fields


def random_rows(seed: int, n_rows: int, n: int) -> np.ndarray:
    """Adversarial float32 rows: each 256-value block drawn from a different recipe.

    Normal and Laplace blocks, outlier columns, non-negative blocks, values on a coarse
    grid (exact .5 ties after scaling), all-zero and constant blocks, blocks whose largest
    magnitude is negative or tied between signs, blocks with zero or one-value groups;
    each row scaled by 10**U(-5, 3).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, n // 256, 256)).astype(np.float32)
    kind = rng.integers(0, 12, size=(n_rows, n // 256))
    lap = rng.laplace(size=x.shape).astype(np.float32)
    x = np.where((kind == 1)[..., None], lap, x)
    outlier_cols = rng.random(256) < 0.03
    x = np.where((kind == 2)[..., None] & outlier_cols, x * 25, x)
    x = np.where((kind == 3)[..., None], np.abs(x), x)
    grid = rng.integers(-16, 17, size=x.shape).astype(np.float32) / 8
    x = np.where((kind == 4)[..., None], grid, x)
    x = np.where((kind == 5)[..., None], 0.0, x)
    x = np.where((kind == 6)[..., None], rng.standard_normal(x.shape[:2] + (1,)), x)
    x = np.where((kind == 7)[..., None], -np.abs(x), x)
    tied = x.copy()
    tied[..., 1] = -np.max(np.abs(tied), axis=-1)
    tied[..., 200] = -tied[..., 1]
    x = np.where((kind == 8)[..., None], tied, x)
    sparse = np.where(rng.random(x.shape) < 0.9, 0.0, x)
    x = np.where((kind == 9)[..., None], sparse, x)
    zero_groups = np.repeat(rng.random(x.shape[:2] + (16,)) < 0.5, 16, axis=-1)
    x = np.where((kind == 10)[..., None] & zero_groups, 0.0, x)
    x = np.where((kind == 11)[..., None], rng.uniform(0, 3, x.shape), x)
    scale = 10.0 ** rng.uniform(-5, 3, size=(n_rows, 1, 1))
    return (x * scale).astype(np.float32).reshape(n_rows, n)


def random_imatrix(seed: int, n: int) -> np.ndarray:
    """Non-negative importance per column: exponential, a fifth zeros, a few huge."""
    rng = np.random.default_rng(seed)
    qw = rng.exponential(size=n) * 10.0 ** rng.uniform(-3, 3)
    qw[rng.random(n) < 0.2] = 0.0
    qw[rng.random(n) < 0.02] *= 1e4
    return qw.astype(np.float32)


def _quantize(name: str, x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    _, spec, plain, weighted = FORMATS[name]
    fields = plain(x) if qw is None else weighted(x, qw)
    return to_bytes(fields, spec)


def _assert_rows_equal(name: str, got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    bad = (got != want).reshape(got.shape[0], -1, BLOCK_BYTES[name]).any(-1)
    assert not bad.any(), f"{name}: {bad.sum()} of {bad.size} blocks differ, first {np.argwhere(bad)[:5]}"


VECTORS = oracle.vectors()
CASES = sorted(k.split("/", 1)[1] for k in VECTORS if k.startswith("x/"))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    ("name", "imatrix"),
    [("Q6_K", False), ("Q6_K", True), ("Q3_K", False), ("Q3_K", True), ("Q4_0", True),
     ("Q5_0", True)],
)
def test_npz_vectors(name: str, imatrix: bool, case: str) -> None:
    qw = VECTORS[f"imatrix/{case}"] if imatrix else None
    got = _quantize(name, VECTORS[f"x/{case}"], qw)
    _assert_rows_equal(name, got, VECTORS[f"{name}{'+imatrix' if imatrix else ''}/{case}"])


needs_ggml = pytest.mark.skipif(not oracle.HAVE_GGML, reason="libggml not installed")
N_ROWS, N_COLS = 256, 2048  # 2048 K-quant blocks, 16384 legacy blocks per call


@needs_ggml
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("name", "imatrix"),
    [("Q6_K", False), ("Q6_K", True), ("Q3_K", False), ("Q3_K", True), ("Q4_0", True),
     ("Q5_0", True)],
)
def test_random_blocks_match_libggml(name: str, imatrix: bool, seed: int) -> None:
    x = random_rows(seed, N_ROWS, N_COLS)
    qw = random_imatrix(seed + 100, N_COLS) if imatrix else None
    want = oracle.ggml_quantize(x, FORMATS[name][0], qw)
    _assert_rows_equal(name, _quantize(name, x, qw), want)
