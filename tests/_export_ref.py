"""Tiny random Llama / Gemma models, their JAX reference forward passes and tokenizers.

Written from the Hugging Face modelling code (transformers' ``modeling_llama``,
``modeling_gemma{,2,3}``), in JAX, for the export tests: the GGUF file llama.cpp runs must
give the same logits as these.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

try:
    import llama_cpp

    HAVE_LLAMA_CPP = True
except Exception:  # noqa: BLE001 - missing or broken native library alike
    llama_cpp = None
    HAVE_LLAMA_CPP = False

try:
    import sentencepiece

    HAVE_SENTENCEPIECE = True
except ImportError:
    sentencepiece = None
    HAVE_SENTENCEPIECE = False


# -- configs ---------------------------------------------------------------------------


def llama_config(vocab: int) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 50000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def gemma_config(vocab: int) -> dict:
    return {
        "model_type": "gemma",
        "architectures": ["GemmaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_activation": "gelu_pytorch_tanh",
    }


def gemma2_config(vocab: int) -> dict:
    return {
        **gemma_config(vocab),
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 3.0,
        "query_pre_attn_scalar": 16,
        "sliding_window": 4,
    }


def gemma3_config(vocab: int) -> dict:
    return {
        **gemma_config(vocab),
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,  # != hidden_size / heads = 16
        "query_pre_attn_scalar": 32,
        "sliding_window": 4,
        "sliding_window_pattern": 2,  # layers 0, 2 local; 1, 3 global
        "rope_theta": 100000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


# -- weights ---------------------------------------------------------------------------


def random_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights, ``(out, in)`` layout, scaled for well-spread logits."""
    rng = np.random.default_rng(seed)
    d, ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n, k = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or d // n
    gemma = config["model_type"].startswith("gemma")

    def mat(o, i):
        return (rng.standard_normal((o, i)) / math.sqrt(i)).astype(np.float32)

    def norm(size):
        base = 0.0 if gemma else 1.0
        return (base + 0.1 * rng.standard_normal(size)).astype(np.float32)

    emb_scale = 1.0 / math.sqrt(d) if gemma else 1.0
    w = {"model.embed_tokens.weight": (emb_scale * rng.standard_normal((v, d))).astype(np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(d)
        w[p + "self_attn.q_proj.weight"] = mat(n * hd, d)
        w[p + "self_attn.k_proj.weight"] = mat(k * hd, d)
        w[p + "self_attn.v_proj.weight"] = mat(k * hd, d)
        w[p + "self_attn.o_proj.weight"] = mat(d, n * hd)
        w[p + "post_attention_layernorm.weight"] = norm(d)
        if config["model_type"] in ("gemma2", "gemma3", "gemma3_text"):
            w[p + "pre_feedforward_layernorm.weight"] = norm(d)
            w[p + "post_feedforward_layernorm.weight"] = norm(d)
        if config["model_type"] in ("gemma3", "gemma3_text"):
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        w[p + "mlp.gate_proj.weight"] = mat(ff, d)
        w[p + "mlp.up_proj.weight"] = mat(ff, d)
        w[p + "mlp.down_proj.weight"] = mat(d, ff)
    w["model.norm.weight"] = norm(d)
    if not config.get("tie_word_embeddings", gemma):
        w["lm_head.weight"] = mat(v, d)
    return w


# -- reference forward -----------------------------------------------------------------


def _rms(x, w, eps, gemma):
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * (1.0 + w) if gemma else x * w


def _rope(x, pos, theta, scale):
    # HF rotate_half: the head's first and second halves are the rotated pairs
    h = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    ang = (pos.astype(jnp.float32) / scale)[:, None] * inv[None, :]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, axis=-1)[:, None, :]
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    rot = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rot * sin


def swa_layer(config: dict, i: int) -> bool:
    mt = config["model_type"]
    if mt == "gemma2":
        return i % 2 == 0
    if mt in ("gemma3", "gemma3_text"):
        p = config.get("sliding_window_pattern", 6)
        return (i + 1) % p != 0
    return False


def forward(config: dict, w: dict, ids) -> np.ndarray:
    """Logits ``(len(ids), vocab)`` of the HF model ``config`` with weights ``w``."""
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        return _forward(config, w, ids)


def _forward(config: dict, w: dict, ids) -> np.ndarray:
    mt = config["model_type"]
    gemma = mt.startswith("gemma")
    g23 = mt in ("gemma2", "gemma3", "gemma3_text")
    g3 = mt in ("gemma3", "gemma3_text")
    d = config["hidden_size"]
    n, k = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or d // n
    eps = config["rms_norm_eps"]
    w = {name: jnp.asarray(a, jnp.float32) for name, a in w.items()}
    ids = jnp.asarray(ids)
    t = ids.shape[0]
    pos = jnp.arange(t)
    x = w["model.embed_tokens.weight"][ids]
    if gemma:
        x = x * jnp.float32(math.sqrt(d))
    scale = float(config.get("query_pre_attn_scalar") or hd) ** -0.5 if gemma else hd**-0.5
    causal = pos[:, None] >= pos[None, :]
    rs = config.get("rope_scaling") or {}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps, gemma)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, n, hd)
        kk = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, k, hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, k, hd)
        if g3:
            q = _rms(q, w[p + "self_attn.q_norm.weight"], eps, True)
            kk = _rms(kk, w[p + "self_attn.k_norm.weight"], eps, True)
        local = swa_layer(config, i)
        theta, rscale = config.get("rope_theta", 10000.0), 1.0
        if g3 and local:
            theta = config.get("rope_local_base_freq", 10000.0)
        elif rs.get("rope_type") == "linear":
            rscale = rs["factor"]
        q, kk = _rope(q, pos, theta, rscale), _rope(kk, pos, theta, rscale)
        kk = jnp.repeat(kk, n // k, axis=1)
        v = jnp.repeat(v, n // k, axis=1)
        s = jnp.einsum("qnh,knh->nqk", q, kk) * jnp.float32(scale)
        if config.get("attn_logit_softcapping"):
            c = jnp.float32(config["attn_logit_softcapping"])
            s = jnp.tanh(s / c) * c
        mask = causal
        if local:
            mask = mask & (pos[:, None] - pos[None, :] < config["sliding_window"])
        s = jnp.where(mask[None], s, -jnp.inf)
        a = jnp.einsum("nqk,knh->qnh", jax.nn.softmax(s, axis=-1), v).reshape(t, n * hd)
        a = a @ w[p + "self_attn.o_proj.weight"].T
        if g23:
            a = _rms(a, w[p + "post_attention_layernorm.weight"], eps, True)
            x = x + a
            h = _rms(x, w[p + "pre_feedforward_layernorm.weight"], eps, True)
        else:
            x = x + a
            h = _rms(x, w[p + "post_attention_layernorm.weight"], eps, gemma)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        act = jax.nn.gelu(gate, approximate=True) if gemma else jax.nn.silu(gate)
        m = (act * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        if g23:
            m = _rms(m, w[p + "post_feedforward_layernorm.weight"], eps, True)
        x = x + m
    x = _rms(x, w["model.norm.weight"], eps, gemma)
    out = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    logits = x @ out.T
    if config.get("final_logit_softcapping"):
        c = jnp.float32(config["final_logit_softcapping"])
        logits = jnp.tanh(logits / c) * c
    return np.asarray(logits)


# -- tokenizers ------------------------------------------------------------------------

_WORDS = (
    "the a quick brown fox jumps over lazy dog jax llama gemma model weight tensor block "
    "quantize export file token vocab layer head rope norm scale sample text small tiny "
    "train run test check byte float half eight four zero one two three"
).split()


def sentences(n: int = 400, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(_WORDS) for _ in range(r.randint(3, 12))) for _ in range(n)]


def sentencepiece_folder(folder: Path, config: dict, vocab: int = 320) -> Path:
    """A trained SentencePiece BPE ``tokenizer.model`` + HF tokenizer files in ``folder``."""
    import io

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences()),
        model_writer=buf,
        vocab_size=vocab,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        remove_extra_whitespaces=False,  # as Llama's and Gemma's tokenizers
        normalization_rule_name="identity",
    )
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    gemma = config["model_type"].startswith("gemma")
    tok_cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    if not gemma:
        tok_cfg["add_prefix_space"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def bpe_folder(folder: Path, config: dict, vocab: int = 300) -> Path:
    """A byte-level (GPT-2 style) BPE ``tokenizer.json`` trained with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|begin|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", 0)]
    )
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "bos_token": "<|begin|>", "eos_token": "<|end|>"})
    )
    cfg = {**config, "bos_token_id": 0, "eos_token_id": 1}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# -- llama.cpp -------------------------------------------------------------------------


def llama_cpp_logits(path: os.PathLike, ids: list[int], n_ctx: int = 64) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (F32 KV cache)."""
    llm = llama_cpp.Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=1,
        type_k=0,
        type_v=0,
        verbose=False,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean KL(softmax(ref) || softmax(got)) over positions."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    lp = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    lq = got - np.logaddexp.reduce(got, axis=-1, keepdims=True)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
