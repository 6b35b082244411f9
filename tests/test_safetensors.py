"""Streaming safetensors -> GGUF conversion."""

import struct

import gguf
import ml_dtypes
import numpy as np
import pytest

import jquant
from jquant._io.safetensors import convert_sources, npz_sources, safetensors_sources

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _rand(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture
def checkpoint(tmp_path):
    tensors = {
        "model.embed_tokens.weight": _rand((64, 128), 0),
        "model.layers.0.self_attn.q_proj.weight": _rand((128, 128), 1, ml_dtypes.bfloat16),
        "model.layers.0.mlp.up_proj.weight": _rand((96, 128), 2, np.float16),
        "model.layers.0.input_layernorm.weight": _rand((128,), 3),
        "model.ragged.weight": _rand((64, 40), 4),
        "model.position_ids": np.arange(16, dtype=np.int64),
        "model.mask": np.array([True, False]),
        "model.fp8": _rand((32, 64), 5).astype(ml_dtypes.float8_e4m3fn),
    }
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(tensors, str(path), metadata={"format": "pt", "empty": ""})
    return path, tensors


def test_convert_matches_quantize_tensor(checkpoint, tmp_path):
    src, tensors = checkpoint
    dst = tmp_path / "model.gguf"
    with pytest.warns(UserWarning, match=r"model\.ragged\.weight \(64, 40\)"):
        report = jquant.convert_safetensors(
            src, dst, {r"embed": "q8_0", r"q_proj": "q5_1", ".*": "q4_0"}
        )
    formats = {r.path: r.format for r in report.rows}
    assert formats == {
        "model.embed_tokens.weight": "Q8_0",
        "model.layers.0.self_attn.q_proj.weight": "Q5_1",
        "model.layers.0.mlp.up_proj.weight": "Q4_0",
        "model.layers.0.input_layernorm.weight": None,  # 1-D: kept
        "model.ragged.weight": "F32",  # 40 columns: stored unquantized
        "model.position_ids": None,
        "model.mask": None,
        "model.fp8": "Q4_0",
    }
    back = jquant.load_gguf(dst)
    assert set(back) == set(tensors)
    for name, fmt in formats.items():
        if fmt is None:
            np.testing.assert_array_equal(np.asarray(back[name]), tensors[name])
            assert np.asarray(back[name]).dtype == tensors[name].dtype
            continue
        x = tensors[name]
        if x.dtype == ml_dtypes.float8_e4m3fn:
            x = x.astype(np.float16)
        q = jquant.quantize_tensor(x, fmt)
        assert back[name].qtype.name == fmt and back[name].dtype == x.dtype
        assert np.array_equal(back[name].to_bytes(), q.to_bytes()), name
    assert report.bytes_after == sum(r.bytes_after for r in report.rows)
    info = jquant.inspect_gguf(dst)
    assert info.metadata["safetensors.format"] == "pt"
    # gguf-py sees the llama.cpp-style names and GGML types
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(dst).tensors}
    assert types["model.embed_tokens.weight"] == "Q8_0" and types["model.mask"] == "I8"


def test_progress_reports_every_tensor(checkpoint, tmp_path):
    src, tensors = checkpoint
    seen = []
    jquant.convert_safetensors(
        src, tmp_path / "o.gguf", "f16", min_size=0, progress=lambda d, t, n: seen.append((d, t, n))
    )
    assert [n for _, _, n in seen] == sorted(tensors)
    assert seen[-1][0] == seen[-1][1] and all(
        a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False)
    )


def test_sources_are_memory_mapped_one_at_a_time(checkpoint):
    src, tensors = checkpoint
    sources, meta = safetensors_sources(src)
    assert meta == {"format": "pt", "empty": ""}
    s = next(s for s in sources if s.name == "model.embed_tokens.weight")
    a = s.load()
    assert isinstance(a, np.memmap) and np.array_equal(a, tensors[s.name])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b[:5], "only 5 bytes"),
        (lambda b: struct.pack("<Q", 10**9) + b[8:], "header claims"),
        (lambda b: b[:8] + b"{" * (len(b) - 8), "bad JSON header"),
        (lambda b: b[: len(b) - 100], "runs past the end"),
    ],
)
def test_corrupt_safetensors(checkpoint, tmp_path, mutate, match):
    src, _ = checkpoint
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mutate(src.read_bytes()))
    with pytest.raises(jquant.FileFormatError, match=match):
        jquant.convert_safetensors(bad, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_npz_sources_convert(tmp_path):
    x = _rand((32, 64), 9)
    np.savez(tmp_path / "p.npz", **{"dense/kernel": x, "step": np.array(3)})
    sources, _ = npz_sources(tmp_path / "p.npz")
    assert {s.name: s.shape for s in sources} == {"dense/kernel": (32, 64), "step": ()}
    convert_sources(sources, tmp_path / "p.gguf", "q5_0")
    back = jquant.load_gguf(tmp_path / "p.gguf")
    assert np.array_equal(
        back["dense/kernel"].to_bytes(), jquant.quantize_tensor(x, "q5_0").to_bytes()
    )
    assert int(back["step"]) == 3
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(jquant.FileFormatError, match="not a valid .npz"):
        npz_sources(tmp_path / "bad.npz")
