"""Tokenizer metadata for llama.cpp: SentencePiece (``tokenizer.model``) and BPE (``tokenizer.json``).

The token lists, scores and types follow llama.cpp's converter
(``_create_vocab_sentencepiece`` and ``get_vocab_base``); special tokens, ``add_bos``,
``add_eos`` and the chat template come from gguf-py's ``SpecialVocab``, as there. The
SentencePiece model is read by a small protobuf reader here, so no ``sentencepiece``
package is needed; the BPE pre-tokenizer name (``tokenizer.ggml.pre``) is found by
hashing the tokenization of llama.cpp's check text (needs the ``tokenizers`` package)
or given explicitly.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path
from typing import Any

from .._errors import FileFormatError, QuantError
from .pretok import CHECK_TEXT, PRE_TOKENIZERS

__all__ = ["read_sentencepiece", "write_tokenizer", "detect_pre_tokenizer"]

# sentencepiece_model.proto: SentencePiece.Type, also gguf.TokenType's values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise FileFormatError("truncated varint in tokenizer.model")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message, in order."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 1:
            val, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            val, i = buf[i : i + n], i + n
        elif wire == 5:
            val, i = buf[i : i + 4], i + 4
        else:
            raise FileFormatError(f"unsupported protobuf wire type {wire} in tokenizer.model")
        if i > len(buf):
            raise FileFormatError("truncated tokenizer.model")
        yield field, wire, val


def read_sentencepiece(path: str | Path) -> list[tuple[bytes, float, int]]:
    """``(piece, score, type)`` of every piece of a SentencePiece ``tokenizer.model``.

    ``type`` is SentencePiece's (1 normal, 2 unknown, 3 control, 4 user-defined,
    5 unused, 6 byte), as ``SentencePieceProcessor`` reports it.
    """
    buf = Path(path).read_bytes()
    pieces = []
    for field, wire, val in _fields(buf):
        if field != 1 or wire != 2:
            continue
        piece, score, typ = b"", 0.0, NORMAL
        for f, w, v in _fields(val):
            if f == 1 and w == 2:
                piece = bytes(v)
            elif f == 2 and w == 5:
                score = struct.unpack("<f", v)[0]
            elif f == 3 and w == 0:
                typ = int(v)
        pieces.append((piece, score, typ))
    if not pieces:
        raise FileFormatError(f"{path}: no SentencePiece pieces found; is it a tokenizer.model?")
    return pieces


def sentencepiece_normalizer(path: str | Path) -> dict[str, bool]:
    """``add_dummy_prefix`` and ``remove_extra_whitespaces`` of a ``tokenizer.model``."""
    spec = {"add_dummy_prefix": True, "remove_extra_whitespaces": True}  # proto defaults
    for field, wire, val in _fields(Path(path).read_bytes()):
        if field == 3 and wire == 2:
            for f, w, v in _fields(val):
                if f == 3 and w == 0:
                    spec["add_dummy_prefix"] = bool(v)
                elif f == 4 and w == 0:
                    spec["remove_extra_whitespaces"] = bool(v)
    return spec


def _looks_special(tok: str) -> bool:
    # convert_hf_to_gguf's does_token_look_special
    return (
        tok in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (tok.startswith("<|") and tok.endswith("|>"))
        or (tok.startswith("<｜") and tok.endswith("｜>"))
        or (tok.startswith("<unused") and tok.endswith(">"))
    )


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sentencepiece_vocab(folder: Path, vocab_size: int | None):
    pieces = read_sentencepiece(folder / "tokenizer.model")
    n = vocab_size or len(pieces)
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [UNUSED] * n
    for i, (piece, score, typ) in enumerate(pieces[:n]):
        tokens[i], scores[i] = piece, score
        # the converter asks SentencePieceProcessor Is{Unknown,Control,Unused,Byte}:
        # user-defined pieces stay NORMAL
        types[i] = typ if typ in (UNKNOWN, CONTROL, UNUSED, BYTE) else NORMAL
    for key, tid in _json(folder / "added_tokens.json").items():
        if tid < n:
            tokens[tid], scores[tid], types[tid] = key.encode(), -1000.0, USER_DEFINED
    decoder = _json(folder / "tokenizer_config.json").get("added_tokens_decoder", {})
    for tid_s, data in decoder.items():
        tid, tok = int(tid_s), data["content"]
        if tid >= n:
            continue
        if data.get("special") or _looks_special(tok):
            types[tid] = CONTROL
        else:
            tok = tok.replace("\u2581", " ")
            types[tid] = USER_DEFINED
        scores[tid], tokens[tid] = -1000.0, tok.encode()
    return tokens, scores, types, len(pieces)


def detect_pre_tokenizer(folder: str | Path) -> str:
    """llama.cpp's name for the BPE pre-tokenizer of ``folder/tokenizer.json``.

    Hashes the token ids of llama.cpp's check text as ``convert_hf_to_gguf.py`` does.

    Raises:
        QuantError: ``tokenizers`` is missing or the hash is not one llama.cpp knows.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise QuantError(
            "detecting the BPE pre-tokenizer needs the 'tokenizers' package (pip install "
            "tokenizers), or pass pre_tokenizer='llama-bpe' (or another llama.cpp name)"
        ) from e
    tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    ids = tok.encode(CHECK_TEXT).ids
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise QuantError(
            f"llama.cpp does not know this BPE pre-tokenizer (check hash {digest}); pass "
            f"pre_tokenizer= with the llama.cpp name of a pre-tokenizer that splits text "
            f"the same way (e.g. 'gpt-2', 'llama-bpe', 'qwen2')"
        )
    return PRE_TOKENIZERS[digest]


def _bpe_vocab(folder: Path, vocab_size: int | None):
    tj = _json(folder / "tokenizer.json")
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise QuantError(
            f"{folder}/tokenizer.json holds a {model.get('type')!r} model; GGUF export reads "
            f"BPE tokenizer.json files or SentencePiece tokenizer.model files"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    real = max(vocab.values()) + 1
    n = vocab_size or real
    if real > n:
        raise QuantError(f"tokenizer has token id {real - 1} but vocab_size is {n}")
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tok = reverse[i]
        if i in added:
            if added[i].get("special") or _looks_special(tok):
                types.append(CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(tok)
    return tokens, types, len(model["vocab"]) + len(tj.get("added_tokens", []))


def tokenizer_size(folder: str | Path) -> int:
    """How many tokens the tokenizer in ``folder`` really has (no padding)."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        return len(read_sentencepiece(folder / "tokenizer.model"))
    return _bpe_vocab(folder, None)[2]


def write_tokenizer(
    w: Any,
    folder: str | Path,
    *,
    n_vocab: int,
    model_type: str,
    sentencepiece_only: bool,
    pre_tokenizer: str | None = None,
) -> None:
    """Add the ``tokenizer.ggml.*`` keys for the tokenizer in ``folder`` to ``w``.

    A ``tokenizer.model`` is preferred (SentencePiece, ``tokenizer.ggml.model = llama``),
    as llama.cpp's converter does; otherwise ``tokenizer.json`` (BPE, ``gpt2``). The
    token list is ``n_vocab`` long (padded with ``[PAD{i}]`` tokens).
    """
    import gguf

    folder = Path(folder)
    if not folder.is_dir():
        raise QuantError(f"tokenizer {str(folder)!r} is not a folder with tokenizer files")
    cfg = _json(folder / "tokenizer_config.json")
    gemma = model_type.startswith("gemma")
    if not gemma and cfg.get("add_prefix_space") is not None:
        w.add_add_space_prefix(bool(cfg["add_prefix_space"]))
    if (folder / "tokenizer.model").is_file():
        tokens, scores, types, _ = _sentencepiece_vocab(folder, n_vocab)
        spec = sentencepiece_normalizer(folder / "tokenizer.model")
        if spec["remove_extra_whitespaces"]:
            warnings.warn(
                f"{folder}/tokenizer.model collapses runs of whitespace "
                f"(remove_extra_whitespaces), which llama.cpp's SentencePiece tokenizer does "
                f"not do: texts with repeated spaces will tokenize differently in llama.cpp",
                UserWarning,
                stacklevel=3,
            )
        if not spec["add_dummy_prefix"] and cfg.get("add_prefix_space") is None and not gemma:
            w.add_add_space_prefix(False)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre(pre_tokenizer or "default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    elif sentencepiece_only:
        raise QuantError(f"{model_type} needs a SentencePiece tokenizer.model in {folder}")
    elif (folder / "tokenizer.json").is_file():
        btokens, btypes, _ = _bpe_vocab(folder, n_vocab)
        pre = pre_tokenizer or detect_pre_tokenizer(folder)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(btokens)
        w.add_token_types(btypes)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(btokens))
    else:
        raise QuantError(f"{folder} has neither tokenizer.model nor tokenizer.json")
    special.add_to_gguf(w, quiet=True)
    if gemma and (folder / "tokenizer.model").is_file():
        w.add_add_space_prefix(False)
