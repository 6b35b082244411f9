"""export_gguf against llama.cpp's own converter, convert_hf_to_gguf.py, on a tiny Llama.

The same HF folder (config.json, model.safetensors, tokenizer files) goes through both;
the files must hold the same tensors (names, types, shapes, bytes) and the same metadata
keys and values, apart from documented differences: ``general.name`` (the converter
derives it from the folder name), ``general.size_label`` (not written by jquant) and
jquant's own ``jquant.*`` keys.

Needs the converter (set ``LLAMA_CPP_SRC`` to a llama.cpp source tree, e.g. the one in
the llama-cpp-python sdist's ``vendor/llama.cpp``), torch and transformers; skipped
otherwise (CI installs neither).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jquant
from jquant._export.tokenizer import tokenizer_size

from . import _export_ref as R

SRC = Path(os.environ.get("LLAMA_CPP_SRC", "/nonexistent"))
CONVERTER = SRC / "convert_hf_to_gguf.py"
MISSING = [
    m
    for m in ("torch", "transformers", "sentencepiece", "safetensors")
    if importlib.util.find_spec(m) is None
]
needs_converter = pytest.mark.skipif(
    not CONVERTER.is_file() or MISSING,
    reason=f"needs LLAMA_CPP_SRC/convert_hf_to_gguf.py and {MISSING or 'its deps'}",
)
DOCUMENTED = {"general.name", "general.size_label", "GGUF.kv_count"}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from safetensors.numpy import save_file

    d = R.sentencepiece_folder(tmp_path_factory.mktemp("hf_llama"), R.llama_config(320))
    cfg = R.llama_config(tokenizer_size(d))
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(R.random_weights(cfg), str(d / "model.safetensors"))
    return d


@needs_converter
@pytest.mark.parametrize("ftype", ["f32", "f16", "bf16", "q8_0"])
def test_same_file_as_convert_hf_to_gguf(hf_folder, ftype, tmp_path):
    import gguf
    from safetensors.numpy import load_file

    theirs = tmp_path / "theirs.gguf"
    subprocess.run(
        [
            sys.executable,
            str(CONVERTER),
            str(hf_folder),
            "--outfile",
            str(theirs),
            "--outtype",
            ftype,
        ],
        check=True,
        capture_output=True,
        env=dict(os.environ),
    )
    cfg = json.loads((hf_folder / "config.json").read_text())
    ours = jquant.export_gguf(
        tmp_path / "ours.gguf",
        load_file(str(hf_folder / "model.safetensors")),
        cfg,
        tokenizer=hf_folder,
        ftype=ftype,
    )
    a, b = gguf.GGUFReader(str(theirs)), gguf.GGUFReader(str(ours))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name, t in ta.items():
        u = tb[name]
        assert (t.tensor_type, list(t.shape)) == (u.tensor_type, list(u.shape)), name
        assert np.array_equal(
            np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)
        ), name
    fa = {k: f for k, f in a.fields.items() if k not in DOCUMENTED}
    fb = {k: f for k, f in b.fields.items() if k not in DOCUMENTED and not k.startswith("jquant.")}
    assert set(fa) == set(fb)
    for k, f in fa.items():
        assert f.types == fb[k].types, k
        assert f.contents() == fb[k].contents(), k


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("tokenizers") is None,
    reason="needs transformers and tokenizers",
)
def test_pre_tokenizer_hash_is_the_converters(tmp_path, monkeypatch):
    # convert_hf_to_gguf hashes AutoTokenizer(...).encode(chktxt); jquant uses tokenizers
    # directly: the ids, and so the name found, must be the same
    import hashlib

    from transformers import AutoTokenizer

    from jquant._export import tokenizer as tok_mod
    from jquant._export.pretok import CHECK_TEXT

    folder = R.bpe_folder(tmp_path / "bpe", R.llama_config(300))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|begin|>",
                "eos_token": "<|end|>",
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    ids = AutoTokenizer.from_pretrained(str(folder)).encode(CHECK_TEXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    monkeypatch.setitem(tok_mod.PRE_TOKENIZERS, digest, "test-name")
    assert tok_mod.detect_pre_tokenizer(folder) == "test-name"
