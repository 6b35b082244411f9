"""Importance matrices: llama.cpp's files, llama-quantize's weights, collection from JAX."""

from __future__ import annotations

import os
import shutil
import subprocess

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant._io.gguf_file import read_header
from jquant._llama.mixes import FTYPES

from . import _ggml_oracle as oracle
from ._llama_models import HAVE_LLAMA, MODELS, llama_quantize, write_llama
from .test_llama_quantize import ggml_kernels  # noqa: F401 (a fixture)

T = gguf.GGMLQuantizationType
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="needs llama-cpp-python")


def _bin() -> str | None:
    """The llama-quantize binary, a test aid only: $LLAMA_QUANTIZE or on PATH."""
    path = os.environ.get("LLAMA_QUANTIZE") or shutil.which("llama-quantize")
    return path if path and os.access(path, os.X_OK) else None


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("imatrix_model")
    return write_llama(d / "row160-f16.gguf", **MODELS["row160"])


def random_imatrix(src, seed=0, zero_count_for=None) -> jquant.ImportanceMatrix:
    """Σx² and counts for every blk.* matrix of a GGUF model, from random activations."""
    rng = np.random.default_rng(seed)
    info, _ = read_header(src)
    sums, counts = {}, {}
    for t in info.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            n = int(rng.integers(16, 400))
            x = rng.standard_normal((n, t.shape[-1])).astype(np.float32)
            x[:, rng.integers(0, t.shape[-1], 3)] *= 10
            sums[t.name] = (x.astype(np.float64) ** 2).sum(0)[None]
            counts[t.name] = np.array([0 if t.name == zero_count_for else n], np.int64)
    return jquant.ImportanceMatrix(sums, counts, ("calib.txt",), 7, 512)


def test_gguf_file_round_trip(tmp_path, model):
    m = random_imatrix(model, zero_count_for="blk.1.ffn_up.weight")
    p = tmp_path / "imatrix.gguf"
    jquant.save_imatrix(p, m)
    info, _ = read_header(p)
    assert info.metadata["general.type"] == "imatrix"
    assert info.metadata["imatrix.datasets"] == ["calib.txt"]
    assert (info.metadata["imatrix.chunk_count"], info.metadata["imatrix.chunk_size"]) == (7, 512)
    names = [t.name for t in info.tensors]
    # llama-imatrix's layout: entries sorted by name, each as in_sum2 then counts
    entries = sorted(m.sums)
    assert names == [f"{e}.{s}" for e in entries for s in ("in_sum2", "counts")]
    assert all(t.ggml_type == 0 for t in info.tensors)
    back = jquant.load_imatrix(p)
    assert set(back.sums) == set(m.sums) and back.datasets == m.datasets
    for k in m.sums:
        np.testing.assert_array_equal(back.sums[k], m.sums[k].astype(np.float32))
        np.testing.assert_array_equal(back.counts[k], m.counts[k])


def test_weights_are_llama_quantizes(model):
    """float32(in_sum2) / float32(count), and 1 for a matrix never seen."""
    m = random_imatrix(model, zero_count_for="blk.1.ffn_up.weight")
    w = m.weights()
    for k, s in m.sums.items():
        c = m.counts[k][0]
        expect = (
            np.ones(s.shape[-1], np.float32)
            if c == 0
            else np.float32(s[0].astype(np.float32)) / np.float32(c)
        )
        np.testing.assert_array_equal(w[k], expect)
        assert w[k].dtype == np.float32


def test_legacy_dat_round_trip(tmp_path, model):
    m = random_imatrix(model)
    p = tmp_path / "imatrix.dat"
    jquant.save_imatrix(p, m, legacy=True)
    back = jquant.load_imatrix(p)
    assert back.legacy and back.datasets == ("calib.txt",) and back.chunk_count == 7
    for k, w in m.weights().items():
        # the .dat stores in_sum2 / count * ncall; the loader divides by ncall again
        np.testing.assert_allclose(back.weights()[k], w, rtol=1e-6)
    with pytest.raises(jquant.QuantError):
        back.merge(back)


def test_bad_files(tmp_path):
    p = tmp_path / "bad.dat"
    p.write_bytes(b"\x02\x00\x00\x00\x05\x00\x00\x00ab")
    with pytest.raises(jquant.FileFormatError, match="truncated"):
        jquant.load_imatrix(p)


# -- from JAX --------------------------------------------------------------------------


def mlp(params, x):
    h = jax.nn.gelu(x @ params["up"]["kernel"])
    h = h * (x @ params["gate"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32))
    return jnp.einsum("...f,fd->...d", h, params["down"]["kernel"])


NAMES = {
    "up/kernel": "blk.0.ffn_up.weight",
    "gate/kernel": "blk.0.ffn_gate.weight",
    "down/kernel": "blk.0.ffn_down.weight",
}


def _params(d=32, f=64):
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "up": {"kernel": jax.random.normal(k[0], (d, f)) * 0.2},
        "gate": {"kernel": jax.random.normal(k[1], (d, f)) * 0.2},
        "down": {"kernel": jax.random.normal(k[2], (f, d)) * 0.2},
    }


def test_collect_is_the_sum_of_squared_inputs():
    params = _params()
    batches = [jax.random.normal(jax.random.key(i), (2, 5, 32)) for i in range(3)]
    m = jquant.collect_imatrix(mlp, params, batches, names=NAMES, dataset="toy")
    xs = np.concatenate([np.asarray(b).reshape(-1, 32) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(m.sums["blk.0.ffn_up.weight"][0], (xs**2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(m.sums["blk.0.ffn_gate.weight"][0], (xs**2).sum(0), rtol=1e-5)
    hs = np.concatenate(
        [
            np.asarray(
                jax.nn.gelu(b @ params["up"]["kernel"])
                * (b @ params["gate"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32))
            ).reshape(-1, 64)
            for b in batches
        ]
    ).astype(np.float64)
    np.testing.assert_allclose(m.sums["blk.0.ffn_down.weight"][0], (hs**2).sum(0), rtol=1e-4)
    assert {k: int(c[0]) for k, c in m.counts.items()} == dict.fromkeys(NAMES.values(), 30)
    assert m.chunk_count == 3 and m.datasets == ("toy",)


def test_collect_merges_across_batches():
    params = _params()
    batches = [jax.random.normal(jax.random.key(i), (4, 32)) for i in range(4)]
    whole = jquant.collect_imatrix(mlp, params, batches, names=NAMES)
    halves = jquant.collect_imatrix(mlp, params, batches[:2], names=NAMES).merge(
        jquant.collect_imatrix(mlp, params, batches[2:], names=NAMES)
    )
    for k in whole.sums:
        np.testing.assert_allclose(whole.sums[k], halves.sums[k], rtol=1e-12)
        np.testing.assert_array_equal(whole.counts[k], halves.counts[k])
    assert halves.chunk_count == whole.chunk_count == 4


def test_collect_from_flax_dense():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))

    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    x = jax.random.normal(jax.random.key(1), (20, 4))
    m = jquant.collect_imatrix(lambda p, b: model.apply({"params": p}, b), params, [x])
    assert sorted(m.sums) == ["hidden/kernel", "out/kernel"]
    np.testing.assert_allclose(
        m.sums["hidden/kernel"][0], (np.asarray(x, np.float64) ** 2).sum(0), rtol=1e-5
    )
    assert int(m.counts["out/kernel"][0]) == 20


# -- with llama.cpp --------------------------------------------------------------------


def _kv_overrides(path, m: jquant.ImportanceMatrix):
    return [
        ("quantize.imatrix.file", str(path)),
        ("quantize.imatrix.dataset", m.datasets[0]),
        ("quantize.imatrix.entries_count", len(m.sums)),
        ("quantize.imatrix.chunks_count", m.chunk_count),
    ]


@needs_llama
@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q5_1"])
def test_quantize_with_imatrix_equals_llama_cpp(tmp_path, model, ftype):
    m = random_imatrix(model)
    p = tmp_path / "imatrix.gguf"
    jquant.save_imatrix(p, m)
    ref = tmp_path / "ref.gguf"
    loaded = jquant.load_imatrix(p)
    llama_quantize(
        model, ref, FTYPES[ftype], imatrix=loaded.weights(), kv_overrides=_kv_overrides(p, loaded)
    )
    out = tmp_path / "out.gguf"
    try:
        jquant.convert_gguf(model, out, ftype, imatrix=p)
    except jquant.QuantError as e:
        if "importance-weighted" in str(e):
            pytest.skip(f"needs weighted kernels: {e}")
        raise
    assert open(out, "rb").read() == open(ref, "rb").read()
    meta = read_header(out)[0].metadata
    assert meta["quantize.imatrix.entries_count"] == len(m.sums)


@needs_llama
@pytest.mark.skipif(not oracle.HAVE_GGML, reason="needs libggml")
@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_weights_reproduce_llama_quantize_tensor_by_tensor(tmp_path, model, fmt):
    """ggml_quantize_chunk with our in_sum2/count gives llama.cpp's bytes for every tensor.

    With the llama-quantize binary (set $LLAMA_QUANTIZE), llama.cpp reads the file itself;
    without it, llama_model_quantize gets the weights that llama-quantize would pass.
    """
    m = random_imatrix(model)
    p = tmp_path / f"imatrix.{fmt}"
    jquant.save_imatrix(p, m, legacy=fmt == "dat")
    ref = tmp_path / "ref.gguf"
    exe = _bin()
    if exe:
        subprocess.run(
            [exe, "--imatrix", str(p), str(model), str(ref), "Q4_0", "1"],
            check=True,
            capture_output=True,
        )
    else:
        llama_quantize(model, ref, FTYPES["Q4_0"], imatrix=jquant.load_imatrix(p).weights())
    weights = jquant.load_imatrix(p).weights()
    info, mm = read_header(ref)
    src, smm = read_header(model)
    by_name = {t.name: t for t in src.tensors}
    checked = 0
    for t in info.tensors:
        s = by_name[t.name]
        if t.ggml_type == s.ggml_type or t.name not in weights:
            continue
        x = np.asarray(smm[s.offset : s.offset + s.nbytes]).view("<f2").astype(np.float32)
        got = oracle.ggml_quantize(x.reshape(s.shape), t.ggml_type, weights[t.name])
        assert got.tobytes() == bytes(mm[t.offset : t.offset + t.nbytes]), t.name
        checked += 1
    assert checked == len(weights)
    if exe:
        meta = info.metadata
        assert meta["quantize.imatrix.file"] == str(p)
        assert meta["quantize.imatrix.chunks_count"] == 7


@needs_llama
@pytest.mark.usefixtures("ggml_kernels")
@pytest.mark.parametrize("ftype", ["Q4_0", "Q4_K_M", "Q2_K", "IQ4_XS"])
@pytest.mark.parametrize("arch", ["row160", "moe8"])
def test_engine_with_imatrix_writes_llama_cpps_file(tmp_path, model, ftype, arch):
    """With ggml's kernels in place of jquant's: the weights reach every tensor (and every
    expert slice of a 3-D MoE tensor) as llama-quantize passes them."""
    if arch == "moe8":
        from .test_llama_mixes import ARCHS, _write

        src = tmp_path / "moe8.gguf"
        _write(src, *ARCHS["moe8"])
    else:
        src = model
    info, _ = read_header(src)
    rng = np.random.default_rng(3)
    sums, counts = {}, {}
    for t in info.tensors:
        if t.name.startswith("blk.") and len(t.shape) >= 2 and "gate_inp" not in t.name:
            n_mat = t.shape[0] if len(t.shape) == 3 else 1
            sums[t.name] = rng.gamma(1.0, 50.0, (n_mat, t.shape[-1]))
            counts[t.name] = rng.integers(0, 300, n_mat)  # an expert may have seen nothing
    m = jquant.ImportanceMatrix(sums, counts, ("calib.txt",), 5, 512)
    p = tmp_path / "imatrix.gguf"
    jquant.save_imatrix(p, m)
    loaded = jquant.load_imatrix(p)
    ref = tmp_path / "ref.gguf"
    llama_quantize(
        src, ref, FTYPES[ftype], imatrix=loaded.weights(), kv_overrides=_kv_overrides(p, loaded)
    )
    out = tmp_path / "out.gguf"
    jquant.convert_gguf(src, out, ftype, imatrix=p)
    assert out.read_bytes() == ref.read_bytes()


@needs_llama
@pytest.mark.usefixtures("ggml_kernels")
@pytest.mark.parametrize("which", ["include", "exclude"])
def test_include_and_exclude_weights(tmp_path, model, which):
    m = random_imatrix(model)
    p = tmp_path / "imatrix.gguf"
    jquant.save_imatrix(p, m)
    loaded = jquant.load_imatrix(p)
    keep = {  # llama-quantize matches substrings of the names
        k: v for k, v in loaded.weights().items() if ("ffn_down" in k) == (which == "include")
    }
    ref = tmp_path / "ref.gguf"
    overrides = _kv_overrides(p, loaded)
    overrides[2] = ("quantize.imatrix.entries_count", len(keep))
    llama_quantize(model, ref, FTYPES["Q4_0"], imatrix=keep, kv_overrides=overrides)
    out = tmp_path / "out.gguf"
    jquant.convert_gguf(model, out, "Q4_0", imatrix=p, **{f"{which}_weights": ["ffn_down"]})
    assert out.read_bytes() == ref.read_bytes()
