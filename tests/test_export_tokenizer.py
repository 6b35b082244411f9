"""Tokenizer export: llama.cpp tokenizes like the reference tokenizer (SentencePiece, BPE)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jquant
from jquant._export.tokenizer import detect_pre_tokenizer, read_sentencepiece, tokenizer_size

from . import _export_ref as R

TEXTS = [
    "the quick brown fox",
    "jax llama gemma export",
    "Hello World, this is new text!",
    "  leading spaces and trailing  ",
    "numbers 12345 and 3.14",
    "unicode: héllo wörld ✓ 日本",
    "tensor\nnew line\ttab",
]


def _vocab_only(path):
    return R.llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _export(folder, cfg, tmp_path, **kw):
    w = R.random_weights(cfg)
    return jquant.export_gguf(tmp_path / "m.gguf", w, cfg, tokenizer=folder, ftype="f32", **kw)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    if not R.HAVE_SENTENCEPIECE:
        pytest.skip("needs sentencepiece")
    folder = R.sentencepiece_folder(tmp_path_factory.mktemp("sp"), R.llama_config(320))
    proc = R.sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return folder, proc


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    folder = R.bpe_folder(tmp_path_factory.mktemp("bpe"), R.llama_config(300))
    return folder, tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_protobuf_reader_matches_sentencepiece(sp):
    folder, proc = sp
    pieces = read_sentencepiece(folder / "tokenizer.model")
    assert len(pieces) == proc.vocab_size()
    for i, (piece, score, typ) in enumerate(pieces):
        assert piece.decode() == proc.IdToPiece(i)
        assert score == pytest.approx(proc.GetScore(i))
        flags = {2: proc.IsUnknown(i), 3: proc.IsControl(i), 5: proc.IsUnused(i), 6: proc.IsByte(i)}
        assert all(v == (k == typ) for k, v in flags.items())


@pytest.mark.skipif(not R.HAVE_LLAMA_CPP, reason="needs llama-cpp-python")
def test_sentencepiece_token_ids_match(sp, tmp_path):
    folder, proc = sp
    cfg = R.llama_config(tokenizer_size(folder))
    llm = _vocab_only(_export(folder, cfg, tmp_path))
    try:
        for text in TEXTS:
            want = [proc.bos_id(), *proc.encode(text)]
            assert llm.tokenize(text.encode(), add_bos=True) == want, text
        assert llm.token_bos() == 1 and llm.token_eos() == 2
    finally:
        llm.close()


@pytest.mark.skipif(not R.HAVE_LLAMA_CPP, reason="needs llama-cpp-python")
def test_bpe_token_ids_match(bpe, tmp_path):
    folder, tok = bpe
    cfg = R.llama_config(tokenizer_size(folder))
    path = _export(folder, cfg, tmp_path, pre_tokenizer="gpt-2")
    llm = _vocab_only(path)
    try:
        for text in TEXTS:
            want = tok.encode(text).ids  # the post-processor adds <|begin|>
            assert want[0] == 0
            assert llm.tokenize(text.encode(), add_bos=True) == want, text
        assert llm.token_bos() == 0 and llm.token_eos() == 1
    finally:
        llm.close()
    import gguf

    r = gguf.GGUFReader(str(path))
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert len(r.fields["tokenizer.ggml.merges"].contents()) == len(merges)


def test_unknown_pre_tokenizer_asks_for_a_name(bpe):
    folder, _ = bpe
    with pytest.raises(jquant.QuantError, match="pre_tokenizer="):
        detect_pre_tokenizer(folder)


def test_gemma_needs_sentencepiece(bpe, tmp_path):
    folder, _ = bpe
    cfg = R.gemma_config(tokenizer_size(folder))
    with pytest.raises(jquant.QuantError, match="SentencePiece"):
        _export(folder, cfg, tmp_path, pre_tokenizer="gpt-2")


def test_added_tokens_are_control_or_user_defined(sp, tmp_path):
    folder, _ = sp
    extra = tmp_path / "tok"
    extra.mkdir()
    for f in folder.iterdir():
        (extra / f.name).write_bytes(f.read_bytes())
    n = tokenizer_size(folder)
    cfg_json = json.loads((folder / "tokenizer_config.json").read_text())
    cfg_json["added_tokens_decoder"] = {
        str(n): {"content": "<|im_start|>", "special": False},
        str(n + 1): {"content": "my\u2581word", "special": False},
    }
    (extra / "tokenizer_config.json").write_text(json.dumps(cfg_json))
    cfg = R.llama_config(n + 2)
    path = _export(extra, cfg, tmp_path)
    import gguf

    r = gguf.GGUFReader(str(path))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = np.asarray(r.fields["tokenizer.ggml.token_type"].contents())
    assert tokens[n : n + 2] == ["<|im_start|>", "my word"]
    assert types[n : n + 2].tolist() == [3, 4]  # CONTROL (looks special), USER_DEFINED
