"""``jquant export DIR`` and ``jquant quantize`` on an HF model's .safetensors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jquant
from jquant._cli.main import main
from jquant._export.tokenizer import tokenizer_size

from . import _export_ref as R
from .test_export_adapters import flax_tree, gemma_tree

pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    if not R.HAVE_SENTENCEPIECE:
        pytest.skip("needs sentencepiece")
    return R.sentencepiece_folder(tmp_path_factory.mktemp("sp"), R.llama_config(320))


def _model_dir(tmp_path, sp_folder, family="llama"):
    make = {"llama": R.llama_config, "gemma2": R.gemma2_config}[family]
    cfg = make(tokenizer_size(sp_folder))
    d = tmp_path / "model"
    d.mkdir()
    for f in sp_folder.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "config.json").write_text(json.dumps(cfg))
    return d, cfg, R.random_weights(cfg, seed=4)


def _arch(path):
    return jquant.inspect_gguf(path).metadata["general.architecture"]


def test_export_safetensors_dir_equals_export_gguf(sp_folder, tmp_path):
    from safetensors.numpy import save_file

    d, cfg, w = _model_dir(tmp_path, sp_folder)
    half = len(w) // 2
    names = sorted(w)
    save_file({k: w[k] for k in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({k: w[k] for k in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
    out = tmp_path / "cli.gguf"
    assert main(["export", str(d), "-o", str(out), "-t", "q8_0", "-q"]) == 0
    ref = jquant.export_gguf(tmp_path / "api.gguf", w, cfg, tokenizer=d, ftype="q8_0")
    a, b = jquant.load_gguf(out), jquant.load_gguf(ref)
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k].to_bytes(), b[k].to_bytes()), k


@pytest.mark.parametrize("kind", ["msgpack", "orbax"])
def test_export_flax_msgpack_and_orbax_gemma(kind, sp_folder, tmp_path):
    d, cfg, w = _model_dir(tmp_path, sp_folder, "llama" if kind == "msgpack" else "gemma2")
    if kind == "msgpack":
        from flax.serialization import msgpack_serialize

        (d / "flax_model.msgpack").write_bytes(msgpack_serialize(flax_tree(w)))
    else:
        ocp = pytest.importorskip("orbax.checkpoint")
        ocp.PyTreeCheckpointer().save((d / "ckpt").resolve(), gemma_tree(w, cfg))
    out = tmp_path / "m.gguf"
    assert main(["export", str(d), "-o", str(out), "-t", "f32", "-q"]) == 0
    ref = jquant.export_gguf(tmp_path / "api.gguf", w, cfg, tokenizer=d, ftype="f32")
    a, b = jquant.load_gguf(out), jquant.load_gguf(ref)
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k].to_bytes(), b[k].to_bytes()), k


def test_quantize_safetensors_with_config_writes_a_model(sp_folder, tmp_path):
    from safetensors.numpy import save_file

    d, cfg, w = _model_dir(tmp_path, sp_folder)
    save_file(w, str(d / "model.safetensors"))
    out = tmp_path / "m.gguf"
    assert main(["quantize", str(d / "model.safetensors"), "-o", str(out), "-q"]) == 0
    assert _arch(out) == "llama"
    assert jquant.inspect_gguf(out).metadata["general.file_type"] == 7  # q8_0 default
    # llama-quantize's mixes too
    assert main(["quantize", str(d / "model.safetensors"), "-o", str(out), "-t", "q4_0", "-q"]) == 0
    assert _arch(out) == "llama"
    assert jquant.inspect_gguf(out).metadata["general.file_type"] == 2
    # a format name that is no llama.cpp ftype (q4_k, not q4_k_m): the plain tensor file
    assert main(["quantize", str(d / "model.safetensors"), "-o", str(out), "-t", "q4_k", "-q"]) == 0
    assert _arch(out) == "jquant"
    (d / "tokenizer.model").unlink()
    assert main(["quantize", str(d / "model.safetensors"), "-o", str(out), "-q"]) == 0
    assert _arch(out) == "jquant"


def test_export_errors_exit_codes(sp_folder, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "x.gguf"), "-q"]) == 3
    d, cfg, w = _model_dir(tmp_path, sp_folder)
    assert main(["export", str(d), "-o", str(tmp_path / "x.gguf"), "-q"]) == 4  # no weights
    assert "holds no weights" in capsys.readouterr().err
    from safetensors.numpy import save_file

    save_file(w, str(d / "model.safetensors"))
    assert main(["export", str(d), "-o", str(tmp_path / "x.gguf"), "-t", "iq2_xxs", "-q"]) == 5
    assert "iq2_xxs" in capsys.readouterr().err


def test_export_a_llama_quantize_mix_with_an_imatrix(sp_folder, tmp_path):
    from safetensors.numpy import save_file

    d, cfg, w = _model_dir(tmp_path, sp_folder)
    save_file(w, str(d / "model.safetensors"))
    name = "blk.0.attn_q.weight"  # Q4_K_M: Q4_K, rows of 64 fall back to weighted Q5_0
    im = jquant.ImportanceMatrix(
        sums={name: np.linspace(0.1, 8.0, 64)[None] ** 2},
        counts={name: np.array([4], np.int64)},
        chunk_count=1,
    )
    jquant.save_imatrix(tmp_path / "im.gguf", im)
    out = tmp_path / "cli.gguf"
    args = [
        "export",
        str(d),
        "-o",
        str(out),
        "-t",
        "q4_k_m",
        "--imatrix",
        str(tmp_path / "im.gguf"),
    ]
    assert main([*args, "-q"]) == 0
    ref = jquant.export_gguf(
        tmp_path / "api.gguf", w, cfg, tokenizer=d, ftype="Q4_K_M", imatrix=tmp_path / "im.gguf"
    )
    a, b = jquant.load_gguf(out), jquant.load_gguf(ref)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(np.asarray(a[k].to_bytes()), np.asarray(b[k].to_bytes())), k
    assert jquant.inspect_gguf(out).metadata["general.file_type"] == 15
