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

from jquant._formats import kquant_symmetric as ks
from jquant._formats import symmetric_search

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
    assert not bad.any(), (
        f"{name}: {bad.sum()} of {bad.size} blocks differ, first {np.argwhere(bad)[:5]}"
    )


VECTORS = oracle.vectors()
CASES = sorted(k.split("/", 1)[1] for k in VECTORS if k.startswith("x/"))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    ("name", "imatrix"),
    [
        ("Q6_K", False),
        ("Q6_K", True),
        ("Q3_K", False),
        ("Q3_K", True),
        ("Q4_0", True),
        ("Q5_0", True),
    ],
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
    [
        ("Q6_K", False),
        ("Q6_K", True),
        ("Q3_K", False),
        ("Q3_K", True),
        ("Q4_0", True),
        ("Q5_0", True),
    ],
)
def test_random_blocks_match_libggml(name: str, imatrix: bool, seed: int) -> None:
    x = random_rows(seed, N_ROWS, N_COLS)
    qw = random_imatrix(seed + 100, N_COLS) if imatrix else None
    want = oracle.ggml_quantize(x, FORMATS[name][0], qw)
    _assert_rows_equal(name, _quantize(name, x, qw), want)


@pytest.mark.parametrize("name", ["Q6_K", "Q3_K"])
def test_dequantize_matches_gguf_on_quantized_bytes(name: str) -> None:
    x = random_rows(7, 64, 1024)
    _, spec, plain, _ = FORMATS[name]
    fields = plain(x)
    got = np.asarray(DEQUANTIZE[name](fields)).reshape(x.shape)
    want = gguf.quants.dequantize(to_bytes(fields, spec), FORMATS[name][0])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", ["Q6_K", "Q3_K"])
def test_dequantize_matches_gguf_on_random_bytes(name: str) -> None:
    rng = np.random.default_rng(3)
    _, spec, _, _ = FORMATS[name]
    raw = rng.integers(0, 256, size=(32, 4 * BLOCK_BYTES[name]), dtype=np.uint8)
    fields = from_bytes(raw, spec)
    # Any finite fp16 scale, subnormals and signed zeros included.
    d = rng.integers(0, 0x7C00, size=fields["d"].shape).astype(np.uint16)
    d |= rng.integers(0, 2, size=d.shape).astype(np.uint16) << 15
    fields["d"] = d.view(np.float16)
    raw = to_bytes(fields, spec)
    got = np.asarray(DEQUANTIZE[name]({k: jnp.asarray(v) for k, v in fields.items()}))
    want = gguf.quants.dequantize(raw, FORMATS[name][0])
    np.testing.assert_array_equal(got.reshape(want.shape).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", ["Q6_K", "Q3_K", "Q4_0", "Q5_0"])
def test_leading_axes_and_vmap(name: str) -> None:
    x = random_rows(11, 8, 512)
    qw = random_imatrix(12, 512)
    _, spec, plain, weighted = FORMATS[name]
    flat = weighted(x, qw)
    nested = weighted(x.reshape(2, 4, 512), qw)
    mapped = jax.vmap(weighted, in_axes=(0, None))(x.reshape(2, 4, 512), qw)
    for leaf, _, shape in spec:
        assert nested[leaf].shape == (2, 4, flat[leaf].shape[1], *shape)
        np.testing.assert_array_equal(
            np.asarray(nested[leaf]).reshape(flat[leaf].shape), flat[leaf]
        )
        np.testing.assert_array_equal(
            np.asarray(mapped[leaf]).reshape(flat[leaf].shape), flat[leaf]
        )


@pytest.mark.parametrize(
    ("fn", "x", "qw", "match"),
    [
        (ks.quantize_q6_k, np.zeros((2, 100), np.float32), None, "multiple of 256"),
        (ks.quantize_q3_k, np.zeros((2, 256), np.float32), np.ones(128, np.float32), "per column"),
        (ks.quantize_q4_0_weighted, np.zeros((2, 40), np.float32), np.ones(40, np.float32), "32"),
        (
            ks.quantize_q5_0_weighted,
            np.zeros((64,), np.float32),
            np.ones(32, np.float32),
            "per column",
        ),
    ],
)
def test_bad_shapes_are_rejected(fn, x, qw, match) -> None:
    with pytest.raises(ValueError, match=match):
        fn(x) if qw is None else fn(x, qw)


def _fp16_tie_block() -> np.ndarray:
    x = (np.random.default_rng(0).standard_normal((1024, 4096)) * 0.02).astype(np.float32)
    return x[974:975, 15 * 256 : 16 * 256]


# Each guard, removed, and data on which that breaks the bytes while the guarded kernel
# matches: C-order sums (jnp.sum is a tree), unfused products (XLA contracts the
# ``sigma2 + x*x`` under the square root into an FMA), subnormal-faithful comparisons
# (XLA:CPU flushes the tiny products of Q3_K's descent to zero on blocks of ~1e-5), and a
# guarded division (a plain ``1.0 / iscale`` lets XLA rewrite ``1 / (-128 / m)`` as
# ``m / -128``).
NAIVE = {
    "sequential_sum": ("Q4_0", 0, lambda t, axis=-1: jnp.sum(t, axis=axis), None),
    "no_fma": ("Q5_0", 0, lambda p: p, None),
    "_plain_then_gradual": ("Q3_K", None, None, None),
    "exact_div": ("Q6_K", None, lambda a, b: jnp.float32(a) / b, _fp16_tie_block),
}


@needs_ggml
@pytest.mark.parametrize("guard", sorted(NAIVE))
def test_naive_port_fails_where_guarded_passes(guard: str, monkeypatch) -> None:
    name, imatrix_seed, replacement, data = NAIVE[guard]
    x = random_rows(1, N_ROWS, N_COLS) if data is None else data()
    qw = None if imatrix_seed is None else random_imatrix(imatrix_seed, x.shape[1])
    want = oracle.ggml_quantize(x, FORMATS[name][0], qw)
    _assert_rows_equal(name, _quantize(name, x, qw), want)
    if guard == "_plain_then_gradual":
        monkeypatch.setattr(
            symmetric_search,
            guard,
            lambda search, *args, nmax: search(*args, nmax=nmax, gradual=False)[0],
        )
    else:
        for module in (symmetric_search, ks):
            if hasattr(module, guard):
                monkeypatch.setattr(module, guard, replacement)
    fn = FORMATS[name][3].__wrapped__
    naive = jax.jit(lambda x, qw: fn(x) if qw is None else fn(x, qw), static_argnums=())
    got = to_bytes(naive(x, qw), FORMATS[name][1])
    assert not np.array_equal(got, want), f"{guard} made no difference on this data"


@needs_ggml
def test_q6_k_super_scale_rounds_like_c() -> None:
    """``d = fp16(1 / (-128 / max_scale))`` two roundings as in C, not ``max_scale / -128``.

    In this N(0, 0.02) block ``1 / iscale`` is 227.49998 fp16 subnormal steps: the C's
    value rounds down, the algebraically simplified one up (found by the benchmark).
    """
    x = (np.random.default_rng(0).standard_normal((1024, 4096)) * 0.02).astype(np.float32)
    block = x[974:975, 15 * 256 : 16 * 256]
    want = oracle.ggml_quantize(block, QT.Q6_K)
    _assert_rows_equal("Q6_K", _quantize("Q6_K", block, None), want)


@needs_ggml
@pytest.mark.parametrize("name", ["Q6_K", "Q5_0"])
def test_block_count_not_a_multiple_of_the_chunk(name: str) -> None:
    """One chunk and a bit: the last chunk is zero-padded and cut off again."""
    rows = ks.CHUNK_BLOCKS + 76  # super-blocks of 256; 8x as many legacy blocks of 32
    x = random_rows(5, rows, 256)
    qw = random_imatrix(6, 256)
    want = oracle.ggml_quantize(x, FORMATS[name][0], qw)
    _assert_rows_equal(name, _quantize(name, x, qw), want)
