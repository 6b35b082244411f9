"""Tiny llama.cpp models written with gguf-py, and llama.cpp's own quantizer as the oracle.

``write_llama`` makes a GGUF that llama.cpp loads and runs: llama architecture, GQA or not,
tied or untied output, a small SentencePiece-style vocabulary (3 specials, 256 byte
tokens, a few pieces). ``llama_quantize`` calls ``llama_cpp.llama_model_quantize`` (the
library behind ``llama-quantize``) in-process.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import gguf
import numpy as np

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None

# the two test models: (name, settings)
MODELS = {
    # a decoder with GQA (8 query heads, 2 KV heads), untied output, rows of 256 and 512
    "gqa": dict(n_embd=256, n_head=8, n_head_kv=2, n_layer=8, n_ff=512, vocab=320, tied=False),
    # rows of 160 and 320 (not multiples of 256), tied output (token_embd is the output)
    "row160": dict(n_embd=160, n_head=5, n_head_kv=5, n_layer=4, n_ff=320, vocab=300, tied=True),
}


def _vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    k = 0
    while len(tokens) < n:
        a, b = divmod(k, 26)
        tokens.append("\u2581" + letters[b] + (letters[a % 26] if a else ""))
        types.append(1)
        k += 1
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(n - 259)]
    return tokens, scores, types


def write_llama(
    path: str | Path,
    *,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    n_layer: int,
    n_ff: int,
    vocab: int,
    tied: bool,
    seed: int = 0,
    dtype=np.float16,
) -> Path:
    """Write a random llama-architecture GGUF (weights ``dtype``, norms F32)."""
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("jquant-test-llama")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1 if dtype == np.float16 else 0)
    tokens, scores, types = _vocab(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        x = rng.standard_normal((rows, cols)).astype(np.float32) * scale
        # a few outlier columns, as real activations and weights have
        x[:, rng.integers(0, cols, 2)] *= 8
        return x.astype(dtype)

    w.add_tensor("token_embd.weight", mat(vocab, n_embd, 0.5))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    if not tied:
        w.add_tensor("output.weight", mat(vocab, n_embd, 0.1))
    kv = head_dim * n_head_kv
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(
            p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)
        )
        w.add_tensor(p + "attn_q.weight", mat(n_embd, n_embd, 0.06))
        w.add_tensor(p + "attn_k.weight", mat(kv, n_embd, 0.06))
        w.add_tensor(p + "attn_v.weight", mat(kv, n_embd, 0.06))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_embd, 0.06))
        w.add_tensor(
            p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)
        )
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd, 0.06))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd, 0.06))
        w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff, 0.04))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _quiet_logs() -> None:
    import llama_cpp

    @llama_cpp.llama_log_callback
    def nothing(level, text, user_data):  # noqa: ARG001
        return None

    _quiet_logs.cb = nothing  # keep a reference
    llama_cpp.llama_log_set(nothing, ctypes.c_void_p())


def llama_quantize(
    src: str | Path,
    dst: str | Path,
    ftype: int,
    *,
    output_tensor_type: int | None = None,
    token_embedding_type: int | None = None,
    pure: bool = False,
    leave_output_tensor: bool = False,
    tensor_types: list[tuple[str, int]] | None = None,
    imatrix: dict[str, np.ndarray] | None = None,
    kv_overrides: list[tuple[str, object]] | None = None,
    nthread: int = 1,
    allow_requantize: bool = False,
) -> None:
    """``llama_model_quantize`` with llama-quantize's options (imatrix as weights)."""
    import llama_cpp

    _quiet_logs()
    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = nthread
    p.ftype = ftype
    if output_tensor_type is not None:
        p.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        p.token_embedding_type = token_embedding_type
    p.pure = pure
    p.allow_requantize = allow_requantize
    p.quantize_output_tensor = not leave_output_tensor
    keep = []
    if tensor_types:
        arr = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pat, t) in enumerate(tensor_types):
            b = pat.encode()
            keep.append(b)
            arr[i].pattern = b
            arr[i].type = t
        arr[len(tensor_types)].pattern = None
        p.tt_overrides = arr
        keep.append(arr)
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, vals) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(vals, np.float32)
            b = name.encode()
            keep += [v, b]
            arr[i].name = b
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        p.imatrix = arr
        keep.append(arr)
    if kv_overrides:
        arr = (llama_cpp.llama_model_kv_override * (len(kv_overrides) + 1))()
        for i, (key, val) in enumerate(kv_overrides):
            arr[i].key = key.encode()
            if isinstance(val, str):
                arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                arr[i].value.val_str = val.encode()[:127]
            else:
                arr[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                arr[i].value.val_i64 = int(val)
        arr[len(kv_overrides)].key = b""
        p.kv_overrides = arr
        keep.append(arr)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
