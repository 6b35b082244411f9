"""IQ4_NL and IQ4_XS: byte-exact with libggml's ggml_quantize_chunk, decode equal to gguf's."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant._formats import iq4

from . import _ggml_oracle

T = gguf.GGMLQuantizationType
FORMATS = {
    "IQ4_NL": (iq4.quantize_iq4_nl, iq4.dequantize_iq4_nl, iq4.FIELDS_IQ4_NL, 32),
    "IQ4_XS": (iq4.quantize_iq4_xs, iq4.dequantize_iq4_xs, iq4.FIELDS_IQ4_XS, 256),
}
# Jitted once per module: every test reuses the compiled kernels.
QUANT = {name: jax.jit(f[0]) for name, f in FORMATS.items()}
DEQUANT = {name: jax.jit(f[1]) for name, f in FORMATS.items()}
needs_ggml = pytest.mark.skipif(not _ggml_oracle.HAVE_GGML, reason="libggml not installed")


def block_bytes(fields_spec) -> int:
    return sum(np.dtype(dt).itemsize * int(np.prod(shape)) for _, dt, shape in fields_spec)


def to_bytes(fields: dict, fields_spec) -> np.ndarray:
    """Fields ``[..., n_blocks, *shape]`` → uint8 ``[..., n_blocks * block_bytes]``."""
    parts = []
    for name, dt, shape in fields_spec:
        a = np.asarray(fields[name])
        assert a.dtype == dt, (name, a.dtype)
        lead = a.shape[: a.ndim - len(shape)]
        parts.append(np.ascontiguousarray(a.astype(dt)).view(np.uint8).reshape(*lead, -1))
    out = np.concatenate(parts, axis=-1)
    return out.reshape(*out.shape[:-2], -1)


def from_bytes(raw: np.ndarray, fields_spec) -> dict[str, np.ndarray]:
    """uint8 ``[n_blocks, block_bytes]`` → fields (the inverse of :func:`to_bytes`)."""
    out, off = {}, 0
    for name, dt, shape in fields_spec:
        size = np.dtype(dt).itemsize * int(np.prod(shape))
        chunk = np.ascontiguousarray(raw[:, off : off + size])
        out[name] = chunk.view(dt).reshape(raw.shape[0], *shape)
        off += size
    return out


def quantize_bytes(fmt: str, x: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    return to_bytes(
        QUANT[fmt](jnp.asarray(x), None if qw is None else jnp.asarray(qw)), FORMATS[fmt][2]
    )


def mismatching_blocks(ours: np.ndarray, ref: np.ndarray, fmt: str) -> int:
    size = block_bytes(FORMATS[fmt][2])
    return int((ours.reshape(-1, size) != ref.reshape(-1, size)).any(-1).sum())


def c_best_index(x: float) -> int:
    """ggml's best_index_int8, line by line, in float32."""
    val = iq4.IQ4_GRID
    x = np.float32(x)
    if x <= val[0]:
        return 0
    if x >= val[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < val[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(x - np.float32(val[mu - 1])) < np.float32(val[mu] - x) else mu


def test_grid_and_layout():
    assert iq4.IQ4_GRID.tolist() == list(gguf.quants.IQ4_NL.kvalues)
    for fmt, (_, _, spec, block) in FORMATS.items():
        assert gguf.GGML_QUANT_SIZES[T[fmt]] == (block, block_bytes(spec))


def test_best_index_equals_c_binary_search():
    rng = np.random.default_rng(0)
    f32 = np.float32
    # ulp-by-ulp walks across every threshold and grid value, then random and special values
    walks = []
    for start in np.concatenate([iq4.THRESHOLDS, iq4.IQ4_GRID.astype(f32)]):
        v = f32(start)
        for _ in range(40):
            v = np.nextafter(v, f32(-np.inf))
        for _ in range(80):
            walks.append(v)
            v = np.nextafter(v, f32(np.inf))
    xs = np.concatenate(
        [
            np.array(walks, f32),
            rng.uniform(-140, 140, 3000).astype(f32),
            rng.standard_normal(1000).astype(f32) * f32(5),
            np.array([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, -np.inf, np.inf], f32),
        ]
    )
    expected = np.array([c_best_index(v) for v in xs])
    np.testing.assert_array_equal((xs[:, None] >= iq4.THRESHOLDS).sum(1), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(iq4.best_index)(xs)), expected)
    grid = np.asarray(jax.jit(lambda a: iq4.best_index(a, iq4.IQ4_GRID))(xs))
    np.testing.assert_array_equal(grid, iq4.IQ4_GRID[expected])


VECTORS = _ggml_oracle.vectors()
CASES = sorted(k.split("/", 1)[1] for k in VECTORS if k.startswith("x/"))


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_ggml_vectors(fmt, case, imatrix):
    x = VECTORS[f"x/{case}"]
    qw = VECTORS[f"imatrix/{case}"] if imatrix else None
    ref = VECTORS[f"{fmt}{'+imatrix' if imatrix else ''}/{case}"]
    np.testing.assert_array_equal(quantize_bytes(fmt, x, qw), ref)


def random_rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Mixed distributions and scales, with the blocks ggml treats specially."""
    f32 = np.float32
    kind = rng.integers(0, 6, (rows, 1))
    x = np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3, kind == 4],
        [
            rng.standard_normal((rows, n)),
            rng.laplace(size=(rows, n)),
            rng.uniform(0, 3, (rows, n)),  # all positive
            rng.integers(-16, 17, (rows, n)) * 0.5,  # ties at .5 on several scales
            rng.standard_normal((rows, n)) * np.where(rng.random(n) < 0.02, 25.0, 1.0),
        ],
        rng.standard_t(2, (rows, n)),
    )
    x = x * 10.0 ** rng.uniform(-5, 3, (rows, 1))
    blocks = x.reshape(rows, -1, 32)
    pick = rng.random(blocks.shape[:2])
    blocks[pick < 0.02] = 0.0
    blocks[(pick >= 0.02) & (pick < 0.04)] = rng.standard_normal()  # constant blocks
    neg = (pick >= 0.04) & (pick < 0.07)  # the largest magnitude is negative
    blocks[neg, 5] = -np.abs(blocks[neg]).max(-1) * 2
    tie = (pick >= 0.07) & (pick < 0.09)  # |max| == |min|, the negative one first
    blocks[tie, 3] = -np.abs(blocks[tie]).max(-1) - 1
    blocks[tie, 9] = -blocks[tie, 3]
    blocks[0, 0] = 0.0  # the very first block all zero
    blocks[1, :2] = 0.0
    return x.astype(f32)


def random_imatrix(rng: np.random.Generator, n: int) -> np.ndarray:
    qw = rng.exponential(1.0, n) * 10.0 ** rng.uniform(-3, 3)
    qw[rng.random(n) < 0.1] = 0.0
    qw[64:96] = 0.0  # a whole block without weight
    return qw.astype(np.float32)


@needs_ggml
@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_random_blocks_match_libggml(fmt, imatrix):
    rng = np.random.default_rng(20261201 + imatrix)
    bad = 0
    for _ in range(8):  # 4096 IQ4_NL / 512 IQ4_XS blocks, in the npz tests' shape (one compile)
        x = random_rows(rng, 16, 1024)
        qw = random_imatrix(rng, 1024) if imatrix else None
        ref = _ggml_oracle.ggml_quantize(x, T[fmt], qw)
        bad += mismatching_blocks(quantize_bytes(fmt, x, qw), ref, fmt)
    assert bad == 0


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dequantize_equals_gguf(fmt):
    _, _, spec, block = FORMATS[fmt]
    rng = np.random.default_rng(7)
    x = random_rows(rng, 16, 1024)
    raw = quantize_bytes(fmt, x).reshape(-1, block_bytes(spec))
    # plus random valid blocks: any bits, with a finite fp16 scale
    rand = rng.integers(0, 256, (512, raw.shape[1]), dtype=np.uint8)
    d = rng.standard_normal(512).astype(np.float16) * np.float16(rng.choice([1e-4, 1, 100]))
    rand[:, :2] = d.view(np.uint8).reshape(-1, 2)
    for raw_ in (raw, rand):
        ours = np.asarray(DEQUANT[fmt](from_bytes(raw_, spec)))
        ref = gguf.quants.dequantize(raw_, T[fmt]).reshape(ours.shape)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_shapes_and_vmap(fmt):
    quant, _, spec, block = FORMATS[fmt]
    rng = np.random.default_rng(3)
    x = random_rows(rng, 16, 1024).reshape(2, 8, 1024)
    qw = random_imatrix(rng, 1024)
    fields = QUANT[fmt](x, qw)
    for name, dt, shape in spec:
        assert fields[name].shape == (2, 8, 1024 // block, *shape) and fields[name].dtype == dt
    flat = quantize_bytes(fmt, x.reshape(16, -1), qw)  # the npz tests' shape: compiled already
    if _ggml_oracle.HAVE_GGML:
        np.testing.assert_array_equal(
            flat, _ggml_oracle.ggml_quantize(x.reshape(16, -1), T[fmt], qw)
        )
    np.testing.assert_array_equal(to_bytes(fields, spec).reshape(16, -1), flat)
    vm = jax.jit(jax.vmap(lambda r: quant(r, jnp.asarray(qw))))(jnp.asarray(x))
    np.testing.assert_array_equal(to_bytes(vm, spec).reshape(16, -1), flat)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_rejects_bad_input(fmt):
    quant, _, _, block = FORMATS[fmt]
    with pytest.raises(ValueError, match="multiple of"):
        quant(jnp.zeros((2, block + 16), jnp.float32))
    with pytest.raises(TypeError, match="float32"):
        quant(jnp.zeros((2, block), jnp.float16))
    with pytest.raises(ValueError, match="one weight per column"):
        quant(jnp.zeros((2, block), jnp.float32), jnp.ones(block // 2, jnp.float32))


def test_guards_matter(monkeypatch):
    """Each guard changes some blocks when left out; guarded, none differ from ggml.

    FMA contraction (no no_fma) and a tree-summed σ² show on N(0, 0.02) with weights;
    XLA's ``c / broadcast(max)`` -> ``c * (1 / max)`` rewrite on .5-tie blocks.
    """
    rng = np.random.default_rng(11)
    gauss = (rng.standard_normal((256, 4096)) * 0.02).astype(np.float32)
    qw = rng.random(4096).astype(np.float32)
    ties = random_rows(np.random.default_rng(20261201), 256, 512)

    def run(x, qw, **patch):
        with monkeypatch.context() as m:
            for name, fn in patch.items():
                m.setattr(iq4, name, fn)
            f = jax.jit(lambda a, w: iq4.quantize_iq4_nl(a, w))  # a fresh trace
            return to_bytes(f(jnp.asarray(x), qw), iq4.FIELDS_IQ4_NL)

    for x, w in ((gauss, qw), (ties, None)):
        guarded = quantize_bytes("IQ4_NL", x, w)
        if _ggml_oracle.HAVE_GGML:
            ref = _ggml_oracle.ggml_quantize(x, T.IQ4_NL, w)
            assert mismatching_blocks(guarded, ref, "IQ4_NL") == 0
        if w is not None:
            fused = run(x, w, no_fma=lambda p: p)
            assert mismatching_blocks(fused, guarded, "IQ4_NL") > 0
            tree = run(x, w, sequential_sum=lambda t, axis=-1: jnp.sum(t, axis=axis))
            assert mismatching_blocks(tree, guarded, "IQ4_NL") > 0
        else:
            plain = run(x, w, exact_div=lambda c, b: jnp.asarray(c, jnp.float32) / b)
            assert mismatching_blocks(plain, guarded, "IQ4_NL") > 0


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_slabs_with_padding(fmt, monkeypatch):
    """Inputs longer than one slab, in slabs that don't divide them, give the same bytes."""
    quant, _, spec, _ = FORMATS[fmt]
    rng = np.random.default_rng(5)
    x = random_rows(rng, 7, 512)
    qw = random_imatrix(rng, 512)
    whole = quantize_bytes(fmt, x, qw)
    monkeypatch.setattr(iq4, "_CHUNK", 48)  # 112 IQ4_NL blocks -> 3 slabs of 38; XS 14 -> 3 x 5
    sliced = jax.jit(lambda a, w: quant(a, w))(jnp.asarray(x), jnp.asarray(qw))
    np.testing.assert_array_equal(to_bytes(sliced, spec), whole)
