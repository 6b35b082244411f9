"""export_gguf with llama-quantize's mixes: the same file as export(f16) + llama-quantize.

For a Llama and a Gemma model (rows of 256 so that the K-quant kernels run), the
Q4_K_M export must equal, tensor for tensor (types and bytes), jquant's
``convert_gguf`` of the f16 export and llama.cpp's own ``llama_model_quantize`` of it;
llama.cpp must run the result. Skipped where sentencepiece / llama-cpp-python is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

import jquant
from jquant._export.tokenizer import tokenizer_size
from jquant._export.writer import FTYPES
from jquant._io.gguf_file import read_header

from . import _export_ref as R
from ._llama_models import HAVE_LLAMA, llama_quantize

needs_llama = pytest.mark.skipif(not R.HAVE_LLAMA_CPP, reason="needs llama-cpp-python")

# rows of 256 and 512: Q4_K_M's K-quant types apply (narrower rows fall back to Q5_0/Q8_0)
WIDE = {"hidden_size": 256, "intermediate_size": 512}
CONFIGS = {
    "llama": lambda n: {**R.llama_config(n), **WIDE, "num_hidden_layers": 4},
    "gemma": lambda n: {**R.gemma_config(n), **WIDE, "head_dim": 64, "num_hidden_layers": 4},
}


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    if not R.HAVE_SENTENCEPIECE:
        pytest.skip("needs sentencepiece")
    return R.sentencepiece_folder(tmp_path_factory.mktemp("sp"), R.llama_config(320))


@pytest.fixture(scope="module")
def exports(sp_folder, tmp_path_factory):
    """family -> (config, weights, f16 export, Q4_K_M export)."""
    n = tokenizer_size(sp_folder)
    d = tmp_path_factory.mktemp("mix")
    out = {}
    for i, (fam, make) in enumerate(CONFIGS.items()):
        cfg = make(n)
        w = R.random_weights(cfg, seed=i)
        f16 = jquant.export_gguf(d / f"{fam}-f16.gguf", w, cfg, tokenizer=sp_folder, ftype="f16")
        q = jquant.export_gguf(d / f"{fam}-q4km.gguf", w, cfg, tokenizer=sp_folder, ftype="Q4_K_M")
        out[fam] = (cfg, w, f16, q)
    return out


def tensors(path) -> dict[str, tuple[str, bytes]]:
    info, mm = read_header(path)
    return {t.name: (t.type_name, bytes(mm[t.offset : t.offset + t.nbytes])) for t in info.tensors}


def assert_same_tensors(ours, ref) -> None:
    a, b = tensors(ours), tensors(ref)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name][0] == b[name][0], f"{name}: {a[name][0]} != {b[name][0]}"
        assert a[name][1] == b[name][1], f"{name} ({b[name][0]}): bytes differ"


@pytest.mark.parametrize("family", list(CONFIGS))
def test_q4_k_m_export_equals_convert_gguf_of_f16_export(family, exports, tmp_path):
    _, _, f16, q = exports[family]
    ref = tmp_path / "ref.gguf"
    jquant.convert_gguf(f16, ref, "Q4_K_M")
    assert_same_tensors(q, ref)
    types = {t for t, _ in tensors(q).values()}
    assert {"Q4_K", "Q6_K"} <= types  # the K-quant kernels ran
    meta = read_header(q)[0].metadata
    assert meta["general.file_type"] == FTYPES["q4_k_m"] == 15


@needs_llama
@pytest.mark.parametrize("family", list(CONFIGS))
def test_q4_k_m_export_equals_llama_quantize(family, exports, tmp_path):
    _, _, f16, q = exports[family]
    ref = tmp_path / "ref.gguf"
    llama_quantize(f16, ref, 15)
    assert_same_tensors(q, ref)
    assert read_header(ref)[0].metadata["general.file_type"] == 15


@needs_llama
@pytest.mark.parametrize("family", list(CONFIGS))
def test_llama_cpp_runs_the_q4_k_m_export(family, exports):
    cfg, w, _, q = exports[family]
    ids = [1] + [int(i) for i in np.random.default_rng(7).integers(3, cfg["vocab_size"], 15)]
    ref = R.forward(cfg, w, ids)
    got = R.llama_cpp_logits(q, ids)
    assert np.all(np.isfinite(got))
    # 4-6 bit random weights: loosely close to the float model's logits
    corr = np.corrcoef(ref.ravel(), got.ravel())[0, 1]
    kl = R.kl(ref, got)
    assert corr > 0.96, corr  # seen: 0.980 (llama), 0.986 (gemma)
    assert kl < 0.05, kl  # seen: 0.019, 0.005


@pytest.mark.skipif(not HAVE_LLAMA, reason="needs llama-cpp-python")
def test_imatrix_export_equals_llama_quantize(exports, sp_folder, tmp_path):
    cfg, w, f16, _ = exports["llama"]
    info, _ = read_header(f16)
    rng = np.random.default_rng(3)
    im = {
        t.name: rng.gamma(1.0, 1.0, t.shape[-1]).astype(np.float32)
        for t in info.tensors
        if len(t.shape) == 2 and t.name != "token_embd.weight"
    }
    ours = jquant.export_gguf(
        tmp_path / "q.gguf", w, cfg, tokenizer=sp_folder, ftype="Q4_K_S", imatrix=im
    )
    ref = tmp_path / "ref.gguf"
    llama_quantize(f16, ref, FTYPES["q4_k_s"], imatrix=im)
    assert_same_tensors(ours, ref)
    assert read_header(ours)[0].metadata["quantize.imatrix.entries_count"] == len(im)
    # the same weights under the HF names of the source tensors
    gguf_to_hf = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    hf_im = {}
    for name, v in im.items():
        if name == "output.weight":
            hf_im["lm_head.weight"] = v
        else:
            _, i, kind, _ = name.split(".")
            hf_im[f"model.layers.{i}.{gguf_to_hf[kind]}.weight"] = v
    by_hf = jquant.export_gguf(
        tmp_path / "hf.gguf", w, cfg, tokenizer=sp_folder, ftype="Q4_K_S", imatrix=hf_im
    )
    assert_same_tensors(by_hf, ref)


def test_imatrix_of_the_wrong_size_names_the_tensor(exports, sp_folder, tmp_path):
    cfg, w, _, _ = exports["llama"]
    im = {"blk.0.attn_q.weight": np.ones(100, np.float32)}
    with pytest.raises(jquant.QuantError, match="blk.0.attn_q.weight"):
        jquant.export_gguf(
            tmp_path / "q.gguf", w, cfg, tokenizer=sp_folder, ftype="q4_0", imatrix=im
        )
    with pytest.raises(jquant.QuantError, match="imatrix only changes"):
        jquant.export_gguf(
            tmp_path / "q.gguf", w, cfg, tokenizer=sp_folder, ftype="q8_0", imatrix=im
        )
    with pytest.raises(jquant.QuantError, match="iq2_xxs"):
        jquant.export_gguf(tmp_path / "q.gguf", w, cfg, tokenizer=sp_folder, ftype="iq2_xxs")
    assert not (tmp_path / "q.gguf").exists()
