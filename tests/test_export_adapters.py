"""source="flax" / "gemma" / "maxtext": JAX trees export to the same GGUF as HF weights.

Each tree is built here from HF weights with the layout of its library (HF Flax
``kernel`` (in, out); the gemma library's einsum shapes; MaxText's scanned layers,
pre-scaled queries and embeddings, ``1 + scale`` Gemma norms and interleaved Llama
rotary dimensions), then exported; the file must hold the tensors of the HF export.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import jquant
from jquant._export.adapters import from_gemma, from_maxtext, to_hf
from jquant._export.tokenizer import tokenizer_size

from . import _export_ref as R


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    if not R.HAVE_SENTENCEPIECE:
        pytest.skip("needs sentencepiece")
    return R.sentencepiece_folder(tmp_path_factory.mktemp("sp"), R.llama_config(320))


def _model(family, folder):
    make = {"llama": R.llama_config, "gemma2": R.gemma2_config, "gemma3": R.gemma3_config}
    cfg = make[family](tokenizer_size(folder))
    return cfg, R.random_weights(cfg, seed=3)


def _tensors(path):
    return {k: np.asarray(jquant.dequantize_tensor(v)) for k, v in jquant.load_gguf(path).items()}


def _same_export(hf, tree, source, cfg, folder, tmp_path, exact=True):
    a = jquant.export_gguf(tmp_path / "hf.gguf", hf, cfg, tokenizer=folder, ftype="f32")
    b = jquant.export_gguf(
        tmp_path / "src.gguf", tree, cfg, tokenizer=folder, ftype="f32", source=source
    )
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        if exact:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
        else:
            np.testing.assert_allclose(ta[k], tb[k], rtol=1e-6, atol=1e-6, err_msg=k)


# -- HF Flax ---------------------------------------------------------------------------


def flax_tree(hf):
    tree: dict = {}
    for name, a in hf.items():
        parts = name.split(".")
        node = tree
        for p in parts[:-2]:
            node = node.setdefault(p, {})
        leaf = node.setdefault(parts[-2], {})
        if parts[-2] == "embed_tokens":
            leaf["embedding"] = a
        elif a.ndim == 2:
            leaf["kernel"] = a.T.copy()
        else:
            leaf["weight"] = a
    return {"params": tree}


def test_flax_tree_exports_like_hf(sp_folder, tmp_path):
    cfg, hf = _model("llama", sp_folder)
    _same_export(hf, flax_tree(hf), "flax", cfg, sp_folder, tmp_path)


# -- gemma library ---------------------------------------------------------------------


def gemma_tree(hf, cfg, *, fused_qkv=False, gating_d_first=False):
    n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, hd = cfg["hidden_size"], cfg["head_dim"]

    def heads(w, nh):  # HF (nh*hd, d) -> (nh, d, hd)
        return w.reshape(nh, hd, d).transpose(0, 2, 1)

    t = {"embedder": {"input_embedding": hf["model.embed_tokens.weight"]}}
    t["final_norm"] = {"scale": hf["model.norm.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q = heads(hf[p + "self_attn.q_proj.weight"], n)
        kk = heads(hf[p + "self_attn.k_proj.weight"], k)
        v = heads(hf[p + "self_attn.v_proj.weight"], k)
        attn = {"attn_vec_einsum": {"w": hf[p + "self_attn.o_proj.weight"].T.reshape(n, hd, d)}}
        if fused_qkv:
            attn["qkv_einsum"] = {"w": np.stack([q, kk, v])}
        else:
            attn["q_einsum"] = {"w": q}
            attn["kv_einsum"] = {"w": np.stack([kk, v])}
        if p + "self_attn.q_norm.weight" in hf:
            attn["_query_norm"] = {"scale": hf[p + "self_attn.q_norm.weight"]}
            attn["_key_norm"] = {"scale": hf[p + "self_attn.k_norm.weight"]}
        gating = np.stack([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        if gating_d_first:
            gating = gating.transpose(0, 2, 1)
        t[f"layer_{i}"] = {
            "attn": attn,
            "mlp": {
                "gating_einsum": {"w": gating},
                "linear": {"w": hf[p + "mlp.down_proj.weight"].T},
            },
            "pre_attention_norm": {"scale": hf[p + "input_layernorm.weight"]},
            "post_attention_norm": {"scale": hf[p + "post_attention_layernorm.weight"]},
            "pre_ffw_norm": {"scale": hf[p + "pre_feedforward_layernorm.weight"]},
            "post_ffw_norm": {"scale": hf[p + "post_feedforward_layernorm.weight"]},
        }
    return {"transformer": t}


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_library_tree_exports_like_hf(family, sp_folder, tmp_path):
    cfg, hf = _model(family, sp_folder)
    _same_export(hf, gemma_tree(hf, cfg), "gemma", cfg, sp_folder, tmp_path)


def test_gemma_fused_qkv_and_gating_orientation():
    cfg = R.gemma2_config(64)
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    hf = R.random_weights(cfg, seed=5)
    out = from_gemma(gemma_tree(hf, cfg, fused_qkv=True, gating_d_first=True), cfg)
    assert set(out) == set(hf)
    for k, v in out.items():
        np.testing.assert_array_equal(v.load() if hasattr(v, "load") else v, hf[k], err_msg=k)


# -- MaxText ---------------------------------------------------------------------------


def _interleave(w):  # HF halves (.., hd) -> Meta/MaxText pairs
    h = w.shape[-1] // 2
    out = np.empty_like(w)
    out[..., 0::2], out[..., 1::2] = w[..., :h], w[..., h:]
    return out


def maxtext_tree(hf, cfg, scanned=True):
    """MaxText's layout, as its ckpt_conversion strategies (llama.py, gemma.py) write it."""
    mt = cfg["model_type"]
    gemma, g2, g3 = mt.startswith("gemma"), mt == "gemma2", mt.startswith("gemma3")
    n, k, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd = cfg.get("head_dim") or d // n
    L = cfg["num_hidden_layers"]
    qscale = np.float32(1.0 if g3 else hd**-0.5)
    rope = (lambda w: w) if gemma else _interleave

    def kernel(w, nh):  # HF (nh*hd, d) -> MaxText (d, nh, hd)
        return w.T.reshape(d, nh, hd)

    def norm(w):
        return w + np.float32(1) if gemma else w

    def params(p):  # one HF layer -> MaxText's names for it
        attn = {
            "query": {"kernel": rope(kernel(hf[p + "self_attn.q_proj.weight"], n)) * qscale},
            "key": {"kernel": rope(kernel(hf[p + "self_attn.k_proj.weight"], k))},
            "value": {"kernel": kernel(hf[p + "self_attn.v_proj.weight"], k)},
            "out": {"kernel": hf[p + "self_attn.o_proj.weight"].T.reshape(n, hd, d)},
        }
        if g3:
            attn["query_norm"] = {"scale": norm(hf[p + "self_attn.q_norm.weight"])}
            attn["key_norm"] = {"scale": norm(hf[p + "self_attn.k_norm.weight"])}
        mlp = {
            "wi_0": {"kernel": hf[p + "mlp.gate_proj.weight"].T},
            "wi_1": {"kernel": hf[p + "mlp.up_proj.weight"].T},
            "wo": {"kernel": hf[p + "mlp.down_proj.weight"].T},
        }
        out = {"self_attention": attn, "mlp": mlp}
        if gemma:
            out["pre_self_attention_norm"] = {"scale": norm(hf[p + "input_layernorm.weight"])}
            out["post_self_attention_norm"] = {
                "scale": norm(hf[p + "post_attention_layernorm.weight"])
            }
            out["pre_ffw_norm"] = {"scale": norm(hf[p + "pre_feedforward_layernorm.weight"])}
            out["post_ffw_norm"] = {"scale": norm(hf[p + "post_feedforward_layernorm.weight"])}
        else:
            out["pre_self_attention_layer_norm"] = {"scale": hf[p + "input_layernorm.weight"]}
            out["post_self_attention_layer_norm"] = {
                "scale": hf[p + "post_attention_layernorm.weight"]
            }
        return out

    def layer(j):  # one MaxText layer: Gemma 2 pairs (local 2j, global 2j + 1)
        if not g2:
            return params(f"model.layers.{j}.")
        out = {}
        for suffix, i in (("_local", 2 * j), ("_global", 2 * j + 1)):
            for name, v in params(f"model.layers.{i}.").items():
                out[name + suffix] = v
        return out

    n_mt = L // 2 if g2 else L
    layers = [layer(j) for j in range(n_mt)]
    decoder = {"decoder_norm": {"scale": norm(hf["model.norm.weight"])}}
    if scanned:  # stacked on param_scan_axis=1
        decoder["layers"] = jax.tree.map(lambda *a: np.stack(a, axis=1), *layers)
    else:
        decoder.update({f"layers_{j}": t for j, t in enumerate(layers)})
    if "lm_head.weight" in hf:
        decoder["logits_dense"] = {"kernel": hf["lm_head.weight"].T}
    emb = hf["model.embed_tokens.weight"]
    emb = emb * np.float32(math.sqrt(d)) if gemma else emb
    return {"params": {"token_embedder": {"embedding": emb}, "decoder": decoder}}


@pytest.mark.parametrize(
    "family,scanned", [("llama", True), ("llama", False), ("gemma2", True), ("gemma3", False)]
)
def test_maxtext_tree_exports_like_hf(family, scanned, sp_folder, tmp_path):
    cfg, hf = _model(family, sp_folder)
    tree = maxtext_tree(hf, cfg, scanned)
    # Llama's query scale (1/4) and Gemma's sqrt(d) = 8 are powers of two: exact; the
    # Gemma norms' (w + 1) - 1 round in float32
    _same_export(hf, tree, "maxtext", cfg, sp_folder, tmp_path, exact=family == "llama")


def test_maxtext_unstacks_jax_arrays_lazily():
    import jax.numpy as jnp

    cfg = R.llama_config(64)
    hf = R.random_weights(cfg, seed=2)
    tree = {
        "params": {
            "token_embedder": {"embedding": hf["model.embed_tokens.weight"]},
            "decoder": {
                "layers": {
                    "mlp": {
                        "wo": {
                            "kernel": jnp.stack(
                                [hf[f"model.layers.{i}.mlp.down_proj.weight"].T for i in range(2)],
                                axis=1,
                            )
                        }
                    }
                }
            },
        }
    }
    out = from_maxtext(tree, cfg)
    assert out["model.layers.1.mlp.down_proj.weight"].shape == (64, 128)
    np.testing.assert_array_equal(
        out["model.layers.1.mlp.down_proj.weight"].load(), hf["model.layers.1.mlp.down_proj.weight"]
    )


def test_unknown_source_and_entries_are_named():
    cfg = R.gemma2_config(64)
    with pytest.raises(jquant.QuantError, match="source 'keras'"):
        to_hf({}, cfg, "keras")
    with pytest.raises(jquant.QuantError, match="'layer_0/attn/foo'"):
        from_gemma({"layer_0": {"attn": {"foo": {"w": np.zeros((2, 2))}}}}, cfg)
    with pytest.raises(jquant.ShapeError, match="param_scan_axis"):
        from_maxtext(
            {"decoder": {"layers": {"mlp": {"wo": {"kernel": np.zeros((128, 3, 64))}}}}}, cfg
        )
