"""export_gguf: llama.cpp runs exported Llama / Gemma / Gemma 2 / Gemma 3 models.

Each family is a tiny random model; its logits in llama.cpp (llama-cpp-python) are
compared to a JAX reference forward pass written from the HF modelling code
(tests/_export_ref.py). Skipped where llama-cpp-python or sentencepiece is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

import jquant
from jquant._export.tokenizer import tokenizer_size

from . import _export_ref as R

needs_sp = pytest.mark.skipif(not R.HAVE_SENTENCEPIECE, reason="needs sentencepiece")
needs_llama = pytest.mark.skipif(not R.HAVE_LLAMA_CPP, reason="needs llama-cpp-python")

CONFIGS = {
    "llama": R.llama_config,
    "gemma": R.gemma_config,
    "gemma2": R.gemma2_config,
    "gemma3": R.gemma3_config,
}
# max |logit difference| at F32. Llama's only differences are float rounding; ggml's
# CPU GELU (Gemma's activation) goes through an fp16 lookup table, hence the looser bound.
F32_ATOL = {"llama": 1e-4, "gemma": 4e-3, "gemma2": 4e-3, "gemma3": 4e-3}
# mean KL(reference || llama.cpp) per position
KL_BOUND = {"f16": 1e-5, "bf16": 2e-4, "q8_0": 2e-3}


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    if not R.HAVE_SENTENCEPIECE:
        pytest.skip("needs sentencepiece")
    return R.sentencepiece_folder(tmp_path_factory.mktemp("sp"), R.llama_config(320))


@pytest.fixture(scope="module")
def models(sp_folder):
    n = tokenizer_size(sp_folder)
    out = {}
    for fam, make in CONFIGS.items():
        cfg = make(n)
        out[fam] = (cfg, R.random_weights(cfg, seed=len(out)))
    return out


def _ids(n_vocab: int, n: int = 16) -> list[int]:
    rng = np.random.default_rng(7)
    return [1] + [int(i) for i in rng.integers(3, n_vocab, n - 1)]


@needs_sp
@needs_llama
@pytest.mark.parametrize("family", list(CONFIGS))
def test_f32_logits_match_jax_reference(family, models, sp_folder, tmp_path):
    cfg, w = models[family]
    path = jquant.export_gguf(tmp_path / "m.gguf", w, cfg, tokenizer=sp_folder, ftype="f32")
    ids = _ids(cfg["vocab_size"])
    ref = R.forward(cfg, w, ids)
    got = R.llama_cpp_logits(path, ids)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=F32_ATOL[family], rtol=0)


@needs_sp
@needs_llama
@pytest.mark.parametrize(
    "family,ftype",
    [("llama", "f16"), ("llama", "bf16"), ("llama", "q8_0"), ("gemma3", "f16"), ("gemma2", "q8_0")],
)
def test_quantized_logits_within_kl_bound(family, ftype, models, sp_folder, tmp_path):
    cfg, w = models[family]
    path = jquant.export_gguf(tmp_path / "m.gguf", w, cfg, tokenizer=sp_folder, ftype=ftype)
    ids = _ids(cfg["vocab_size"])
    kl = R.kl(R.forward(cfg, w, ids), R.llama_cpp_logits(path, ids))
    assert -1e-9 < kl < KL_BOUND[ftype]


@needs_sp
@pytest.mark.parametrize("family", list(CONFIGS))
def test_tensor_types_and_names(family, models, sp_folder, tmp_path):
    cfg, w = models[family]
    path = jquant.export_gguf(tmp_path / "m.gguf", w, cfg, tokenizer=sp_folder, ftype="q8_0")
    info = jquant.inspect_gguf(path)
    types = {t.name: t.type_name for t in info.tensors}
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["output_norm.weight"] == "F32"
    # tied embeddings (all Gemma here) write no output.weight; the untied Llama does
    assert ("output.weight" in types) == (family == "llama")
    n_layer = cfg["num_hidden_layers"]
    per_layer = {n.split(".", 2)[2] for n in types if n.startswith("blk.")}
    assert all(f"blk.{i}.{s}" in types for i in range(n_layer) for s in per_layer)


def _meta(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items()}


@needs_sp
@pytest.mark.parametrize("family", list(CONFIGS))
def test_required_metadata_keys(family, models, sp_folder, tmp_path):
    cfg, w = models[family]
    path = jquant.export_gguf(tmp_path / "m.gguf", w, cfg, tokenizer=sp_folder)
    m = _meta(path)
    a = m["general.architecture"]
    assert a == {"gemma3": "gemma3"}.get(family, family)
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert m[f"{a}.context_length"] == cfg["max_position_embeddings"]
    assert m[f"{a}.embedding_length"] == cfg["hidden_size"]
    assert m[f"{a}.block_count"] == cfg["num_hidden_layers"]
    assert m[f"{a}.feed_forward_length"] == cfg["intermediate_size"]
    assert m[f"{a}.attention.head_count"] == cfg["num_attention_heads"]
    assert m[f"{a}.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert m[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert m[f"{a}.rope.freq_base"] == pytest.approx(cfg["rope_theta"])
    assert m["general.file_type"] == 1
    assert m[f"{a}.attention.key_length"] == hd == m[f"{a}.attention.value_length"]
    if family == "gemma2":
        assert m["gemma2.attn_logit_softcapping"] == pytest.approx(5.0)
        assert m["gemma2.final_logit_softcapping"] == pytest.approx(3.0)
        assert m["gemma2.attention.sliding_window"] == 4
    if family == "gemma3":
        assert m["gemma3.attention.sliding_window"] == 4
        assert m["gemma3.attention.sliding_window_pattern"] == [True, False, True, False]
        assert m["gemma3.rope.freq_base_swa"] == pytest.approx(10000.0)
        assert m["gemma3.rope.scaling.type"] == "linear"
        assert m["gemma3.rope.scaling.factor"] == pytest.approx(2.0)
    assert m["tokenizer.ggml.model"] == "llama"
    assert len(m["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    assert m["tokenizer.ggml.bos_token_id"] == 1
    assert m["tokenizer.ggml.add_bos_token"] is True
    assert "{% for m in messages %}" in m["tokenizer.chat_template"]


@needs_sp
def test_gemma3_trims_embedding_to_tokenizer(models, sp_folder, tmp_path):
    cfg, w = models["gemma3"]
    n = cfg["vocab_size"]
    big = dict(w)
    pad = np.zeros((64, cfg["hidden_size"]), np.float32)
    big["model.embed_tokens.weight"] = np.concatenate([w["model.embed_tokens.weight"], pad])
    path = jquant.export_gguf(
        tmp_path / "m.gguf", big, {**cfg, "vocab_size": n + 64}, tokenizer=sp_folder, ftype="f32"
    )
    emb = jquant.load_gguf(path)["token_embd.weight"]
    np.testing.assert_array_equal(
        np.asarray(jquant.dequantize_tensor(emb)), w["model.embed_tokens.weight"]
    )


@needs_sp
def test_llama_pads_vocab_to_config_size(models, sp_folder, tmp_path):
    cfg, w = models["llama"]
    n = cfg["vocab_size"]
    big = {k: v for k, v in w.items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        big[k] = np.concatenate([w[k], np.zeros((32, cfg["hidden_size"]), np.float32)])
    path = jquant.export_gguf(
        tmp_path / "m.gguf", big, {**cfg, "vocab_size": n + 32}, tokenizer=sp_folder
    )
    m = _meta(path)
    assert len(m["tokenizer.ggml.tokens"]) == n + 32
    assert m["tokenizer.ggml.tokens"][n] == f"[PAD{n}]"


@needs_sp
def test_errors_name_the_problem(models, sp_folder, tmp_path):
    cfg, w = models["llama"]
    with pytest.raises(jquant.QuantError, match="model_type 'gpt2' is not supported"):
        jquant.export_gguf(
            tmp_path / "m.gguf", w, {**cfg, "model_type": "gpt2"}, tokenizer=sp_folder
        )
    with pytest.raises(jquant.QuantError, match="iq2_xxs"):
        jquant.export_gguf(tmp_path / "m.gguf", w, cfg, tokenizer=sp_folder, ftype="iq2_xxs")
    flax_like = {
        **w,
        "model.layers.0.mlp.down_proj.weight": w["model.layers.0.mlp.down_proj.weight"].T,
    }
    with pytest.raises(jquant.ShapeError, match="source='flax'"):
        jquant.export_gguf(tmp_path / "m.gguf", flax_like, cfg, tokenizer=sp_folder)
    with pytest.raises(jquant.QuantError, match="no llama.cpp name"):
        jquant.export_gguf(
            tmp_path / "m.gguf",
            {**w, "model.extra.weight": w["model.norm.weight"]},
            cfg,
            tokenizer=sp_folder,
        )
    partial = {k: v for k, v in w.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(jquant.QuantError, match="layer 1 lacks ffn_up.weight"):
        jquant.export_gguf(tmp_path / "m.gguf", partial, cfg, tokenizer=sp_folder)
    assert not (tmp_path / "m.gguf").exists()


@needs_sp
def test_config_json_path_and_sharded_jax_arrays(models, sp_folder, tmp_path):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    cfg, w = models["gemma"]
    mesh = Mesh(np.array(jax.devices()), ("x",))

    def put(a):
        rows = a.ndim == 2 and a.shape[0] % len(jax.devices()) == 0
        return jax.device_put(a, NamedSharding(mesh, PartitionSpec("x" if rows else None)))

    sharded = {k: put(v) for k, v in w.items()}
    assert any(len(v.sharding.device_set) > 1 for v in sharded.values())
    (tmp_path / "config.json").write_text(__import__("json").dumps(cfg))
    a = jquant.export_gguf(tmp_path / "a.gguf", w, cfg, tokenizer=sp_folder, ftype="q8_0")
    b = jquant.export_gguf(
        tmp_path / "b.gguf",
        sharded,
        tmp_path / "config.json",
        tokenizer=sp_folder,
        ftype="q8_0",
    )
    assert a.read_bytes() == b.read_bytes()


@needs_sp
def test_gemma3_multimodal_checkpoint_exports_its_text_model(models, sp_folder, tmp_path):
    cfg, w = models["gemma3"]
    mm = {k.replace("model.", "model.language_model.", 1): v for k, v in w.items()}
    mm["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((4, 4))
    mm_cfg = {"model_type": "gemma3", "text_config": {**cfg, "model_type": "gemma3_text"}}
    a = jquant.export_gguf(tmp_path / "a.gguf", w, cfg, tokenizer=sp_folder, ftype="f32")
    with pytest.warns(UserWarning, match="1 vision tensor"):
        b = jquant.export_gguf(tmp_path / "b.gguf", mm, mm_cfg, tokenizer=sp_folder, ftype="f32")
    ta, tb = jquant.load_gguf(a), jquant.load_gguf(b)
    assert set(ta) == set(tb)
    assert all(np.array_equal(ta[k].to_bytes(), tb[k].to_bytes()) for k in ta)


def _permute(w, n):
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, written out
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@needs_sp
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_layout_rules_in_the_file(family, models, sp_folder, tmp_path):
    cfg, w = models[family]
    path = jquant.export_gguf(tmp_path / "m.gguf", w, cfg, tokenizer=sp_folder, ftype="f32")
    t = {k: np.asarray(jquant.dequantize_tensor(v)) for k, v in jquant.load_gguf(path).items()}
    q, k = w["model.layers.1.self_attn.q_proj.weight"], w["model.layers.1.self_attn.k_proj.weight"]
    norm = w["model.layers.1.input_layernorm.weight"]
    np.testing.assert_array_equal(t["token_embd.weight"], w["model.embed_tokens.weight"])
    if family == "llama":  # rotary permutation, K with the KV head count; norms as they are
        np.testing.assert_array_equal(t["blk.1.attn_q.weight"], _permute(q, 4))
        np.testing.assert_array_equal(t["blk.1.attn_k.weight"], _permute(k, 2))
        assert not np.array_equal(_permute(k, 2), _permute(k, 4))
        np.testing.assert_array_equal(t["blk.1.attn_norm.weight"], norm)
        np.testing.assert_array_equal(t["output.weight"], w["lm_head.weight"])
    else:  # no permutation; every norm, QK-norms included, stored as 1 + scale
        np.testing.assert_array_equal(t["blk.1.attn_q.weight"], q)
        np.testing.assert_array_equal(t["blk.1.attn_k.weight"], k)
        np.testing.assert_array_equal(t["blk.1.attn_norm.weight"], norm + np.float32(1))
        qn = w["model.layers.1.self_attn.q_norm.weight"]
        np.testing.assert_array_equal(t["blk.1.attn_q_norm.weight"], qn + np.float32(1))
        post = w["model.layers.1.post_feedforward_layernorm.weight"]
        np.testing.assert_array_equal(t["blk.1.post_ffw_norm.weight"], post + np.float32(1))


@needs_sp
def test_nested_hf_dict(models, sp_folder, tmp_path):
    cfg, w = models["llama"]
    nested: dict = {}
    for name, a in w.items():
        head, _, leaf = name.rpartition(".")
        nested.setdefault(head, {})[leaf] = a
    a = jquant.export_gguf(tmp_path / "a.gguf", w, cfg, tokenizer=sp_folder, ftype="f16")
    b = jquant.export_gguf(tmp_path / "b.gguf", nested, cfg, tokenizer=sp_folder, ftype="f16")
    ta, tb = jquant.load_gguf(a), jquant.load_gguf(b)  # same tensors (in jax's key order)
    assert set(ta) == set(tb)
    assert all(np.array_equal(ta[k].to_bytes(), tb[k].to_bytes()) for k in ta)
