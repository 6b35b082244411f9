"""The mix rules (:mod:`jquant._llama.mixes`): a pure function, checked two ways.

1. Properties the rules state (KQUANTS.md §8): what is never quantized, the row-length
   fallbacks, ``use_more_bits`` layers, output/token_embd handling, option precedence.
2. llama.cpp's own choices (``llama_model_quantize``) on small synthetic models of other
   architectures and shapes: falcon, an 8-expert MoE, an 80-layer GQA llama ("70B"), a
   BERT with position and token-type embeddings, for every ftype jquant offers.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from jquant import UnknownFormatError
from jquant._io.gguf_file import read_header
from jquant._llama.mixes import (
    FTYPES,
    LlamaModelFacts,
    MixOptions,
    allows_quantization,
    choose_types,
    parse_ftype,
    sort_tensor_names,
    tensor_type,
)

from ._llama_models import HAVE_LLAMA, llama_quantize

T = gguf.GGMLQuantizationType
LLAMA = LlamaModelFacts(arch="llama", n_layer=16, n_head=8, n_head_kv=2)
KMIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]


def test_ftype_names_and_aliases():
    assert parse_ftype("q4_k") == parse_ftype("Q4_K_M") == FTYPES["Q4_K_M"] == 15
    assert parse_ftype("Q4-0") == 2 and parse_ftype(7) == 7 and parse_ftype("18") == 18
    with pytest.raises(UnknownFormatError, match="Q4_K_M"):
        parse_ftype("Q4_K_L")


@pytest.mark.parametrize(
    "name,shape,ok",
    [
        ("blk.0.attn_q.weight", (64, 64), True),
        ("blk.0.attn_q.bias", (64, 64), False),
        ("blk.0.attn_norm.weight", (64,), False),
        ("blk.0.attn_q_norm.weight", (64, 64), False),
        ("position_embd.weight", (512, 64), False),
        ("token_types.weight", (2, 64), False),
        ("blk.0.ffn_gate_inp.weight", (8, 64), False),
        ("blk.0.ssm_conv1d.weight", (4, 64), False),
        ("v.position_embd.weight", (8, 64), False),
        ("blk.0.attn_q.weight", (1, 64), False),  # a row vector is 1-D to ggml
        ("blk.0.ffn_up_exps.weight", (8, 64, 64), True),
    ],
)
def test_which_tensors_are_quantized(name, shape, ok):
    assert allows_quantization(name, shape, "llama") is ok


@pytest.mark.parametrize(
    "base,row,expect",
    [
        ("Q4_K_S", 4096, T.Q4_K),
        ("Q4_K_S", 4064, T.Q5_0),  # 4064 % 256 != 0, % 32 == 0
        ("Q5_K_S", 160, T.Q5_1),
        ("Q6_K", 96, T.Q8_0),
        ("Q2_K", 320, T.Q4_0),
        ("Q3_K_S", 320, T.Q4_0),
        ("IQ4_XS", 320, T.IQ4_NL),
        ("Q4_K_S", 100, T.F16),  # not even a multiple of 32
        ("Q4_0", 100, T.F16),
    ],
)
def test_row_length_fallbacks(base, row, expect):
    # attn_q keeps the base type in every mix, so only the fallback acts
    got = tensor_type(FTYPES[base], "blk.5.attn_q.weight", (64, row), T.F16, facts=LLAMA)
    assert got == expect


def _use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q5_K_M"])
def test_use_more_bits_layers(ftype):
    n = LLAMA.n_layer
    tensors = [
        (f"blk.{i}.{k}.weight", (256, 256), T.F16)
        for i in range(n)
        for k in ("attn_v", "ffn_down", "attn_q")
    ]
    types = choose_types(ftype, tensors, LLAMA)
    base = T.Q4_K if ftype == "Q4_K_M" else T.Q5_K
    for i in range(n):
        more = T.Q6_K if _use_more_bits(i, n) else base
        assert types[f"blk.{i}.attn_v.weight"] == more
        assert types[f"blk.{i}.ffn_down.weight"] == more
        assert types[f"blk.{i}.attn_q.weight"] == base


def test_output_and_token_embd():
    f = FTYPES["Q4_0"]
    # the output gets Q6_K (Q8_0 when the row doesn't fit a 256 block) in every mix
    assert tensor_type(f, "output.weight", (100, 256), T.F16, facts=LLAMA) == T.Q6_K
    assert tensor_type(f, "output.weight", (100, 96), T.F16, facts=LLAMA) == T.Q8_0
    assert tensor_type(FTYPES["Q8_0"], "output.weight", (100, 256), T.F16, facts=LLAMA) == T.Q8_0
    # token_embd is the output only when the model has no output.weight
    embd = [("token_embd.weight", (100, 256), T.F16)]
    assert choose_types("Q4_0", embd, LLAMA)["token_embd.weight"] == T.Q6_K
    both = embd + [("output.weight", (100, 256), T.F16)]
    assert choose_types("Q4_0", both, LLAMA)["token_embd.weight"] == T.Q4_0
    falcon = LlamaModelFacts(arch="falcon", n_layer=2, n_head=4, n_head_kv=4)
    assert choose_types("Q4_K_M", both, falcon)["output.weight"] == T.Q8_0


def test_option_precedence():
    f = FTYPES["Q4_K_M"]
    name = "blk.0.attn_v.weight"
    opts = MixOptions(tensor_types=(("attn_v", T.Q8_0),))
    assert tensor_type(f, name, (64, 256), T.F16, facts=LLAMA, options=opts) == T.Q8_0
    opts = MixOptions(tensor_types=(("attn_v", T.Q4_K),))  # a forced K type still falls back
    assert tensor_type(f, name, (64, 96), T.F16, facts=LLAMA, options=opts) == T.Q5_0
    opts = MixOptions(pure=True)
    assert tensor_type(f, name, (64, 256), T.F16, facts=LLAMA, options=opts) == T.Q4_K
    opts = MixOptions(output_tensor_type=T.F16, token_embedding_type=T.Q8_0)
    out = choose_types("Q4_K_M", [("token_embd.weight", (10, 256), T.F16)], LLAMA, opts)
    assert out["token_embd.weight"] == T.Q8_0  # --token-embedding-type wins over the tie
    opts = MixOptions(quantize_output_tensor=False)
    assert tensor_type(f, "output.weight", (10, 256), T.F16, facts=LLAMA, options=opts) == T.F16
    # float ftypes: every quantizable tensor takes the float type, nothing else changes
    assert tensor_type(FTYPES["BF16"], name, (64, 96), T.F32, facts=LLAMA) == T.BF16
    assert tensor_type(FTYPES["BF16"], "output_norm.weight", (96,), T.F32, facts=LLAMA) == T.F32


def test_llama_order():
    names = ["blk.10.attn_q.weight", "output.weight", "blk.2.ffn_up.weight", "blk.2.attn_k.weight"]
    assert sort_tensor_names(names) == [
        "output.weight",
        "blk.2.attn_k.weight",
        "blk.2.ffn_up.weight",
        "blk.10.attn_q.weight",
    ]


# -- against llama.cpp on other architectures ------------------------------------------


def _write(path, arch, kv, tensors):
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in kv.items():
        if isinstance(v, float):
            w.add_float32(k.format(arch=arch), v)
        else:
            w.add_uint32(k.format(arch=arch), v)
    for name, shape in tensors:
        dt = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(dt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _decoder(n_layer, n_embd, n_ff, n_kv, n_expert=0, qkv=False, bias=False, rows=None):
    """Tensor names and shapes; ``rows`` caps every matrix's row count (types don't read it)."""
    r = (lambda n: min(n, rows)) if rows else (lambda n: n)
    t = [("token_embd.weight", (64, n_embd)), ("output_norm.weight", (n_embd,))]
    t.append(("output.weight", (64, n_embd)))
    for i in range(n_layer):
        p = f"blk.{i}."
        t.append((p + "attn_norm.weight", (n_embd,)))
        if qkv:
            t.append((p + "attn_qkv.weight", (r(n_embd + 2 * n_kv), n_embd)))
        else:
            t += [
                (p + "attn_q.weight", (r(n_embd), n_embd)),
                (p + "attn_k.weight", (r(n_kv), n_embd)),
                (p + "attn_v.weight", (r(n_kv), n_embd)),
            ]
        t.append((p + "attn_output.weight", (r(n_embd), n_embd)))
        if bias:
            t.append((p + "attn_output.bias", (n_embd,)))
        if n_expert:
            t += [
                (p + "ffn_gate_inp.weight", (n_expert, n_embd)),
                (p + "ffn_gate_exps.weight", (n_expert, r(n_ff), n_embd)),
                (p + "ffn_up_exps.weight", (n_expert, r(n_ff), n_embd)),
                (p + "ffn_down_exps.weight", (n_expert, r(n_embd), n_ff)),
            ]
        else:
            t += [
                (p + "ffn_up.weight", (r(n_ff), n_embd)),
                (p + "ffn_down.weight", (r(n_embd), n_ff)),
            ]
            if not qkv:
                t.append((p + "ffn_gate.weight", (r(n_ff), n_embd)))
    return t


ARCHS = {
    "falcon": (
        "falcon",
        {
            "{arch}.context_length": 64,
            "{arch}.embedding_length": 256,
            "{arch}.block_count": 8,
            "{arch}.feed_forward_length": 512,
            "{arch}.attention.head_count": 8,
            "{arch}.attention.head_count_kv": 1,
            "{arch}.attention.layer_norm_epsilon": 1e-5,
        },
        _decoder(8, 256, 512, 32, qkv=True),
    ),
    "moe8": (
        "llama",
        {
            "{arch}.context_length": 64,
            "{arch}.embedding_length": 256,
            "{arch}.block_count": 4,
            "{arch}.feed_forward_length": 256,
            "{arch}.attention.head_count": 8,
            "{arch}.attention.head_count_kv": 8,
            "{arch}.expert_count": 8,
            "{arch}.expert_used_count": 2,
            "{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        },
        _decoder(4, 256, 256, 256, n_expert=8, rows=32),
    ),
    "llama70b": (
        "llama",
        {
            "{arch}.context_length": 64,
            "{arch}.embedding_length": 256,
            "{arch}.block_count": 80,
            "{arch}.feed_forward_length": 256,
            "{arch}.attention.head_count": 8,
            "{arch}.attention.head_count_kv": 1,
            "{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        },
        _decoder(80, 256, 256, 32, rows=8),
    ),
    "bert": (
        "bert",
        {
            "{arch}.context_length": 64,
            "{arch}.embedding_length": 256,
            "{arch}.block_count": 3,
            "{arch}.feed_forward_length": 768,
            "{arch}.attention.head_count": 4,
            "{arch}.attention.layer_norm_epsilon": 1e-12,
        },
        [
            ("token_embd.weight", (64, 256)),
            ("position_embd.weight", (64, 256)),
            ("token_types.weight", (2, 256)),
            ("token_embd_norm.weight", (256,)),
        ]
        + [
            (f"blk.{i}.{n}", s)
            for i in range(3)
            for n, s in [
                ("attn_q.weight", (256, 256)),
                ("attn_k.weight", (256, 256)),
                ("attn_v.weight", (256, 256)),
                ("attn_output.weight", (256, 256)),
                ("attn_output_norm.weight", (256,)),
                ("ffn_up.weight", (768, 256)),
                ("ffn_down.weight", (256, 768)),
                ("layer_output_norm.weight", (256,)),
            ]
        ],
    ),
}


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("archs")
    out = {}
    for key, (arch, kv, tensors) in ARCHS.items():
        _write(d / f"{key}.gguf", arch, kv, tensors)
        out[key] = d / f"{key}.gguf"
    return out


@pytest.mark.skipif(not HAVE_LLAMA, reason="needs llama-cpp-python")
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("ftype", ["Q4_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS", *KMIXES])
def test_types_match_llama_cpp_on_other_architectures(arch_models, tmp_path, arch, ftype):
    src = arch_models[arch]
    ref = tmp_path / "ref.gguf"
    llama_quantize(src, ref, FTYPES[ftype])
    info, _ = read_header(src)
    ours = choose_types(
        ftype,
        [(t.name, t.shape, T(t.ggml_type)) for t in info.tensors],
        LlamaModelFacts.from_metadata(info.metadata),
    )
    theirs = {t.name: T(t.ggml_type) for t in read_header(ref)[0].tensors}
    assert ours == theirs


@pytest.mark.skipif(not HAVE_LLAMA, reason="needs llama-cpp-python")
@pytest.mark.parametrize("arch", ["moe8", "bert", "falcon"])
def test_files_match_llama_cpp_on_other_architectures(arch_models, tmp_path, arch):
    # expert tensors (3-D), tensors llama.cpp keeps, a fused qkv: byte for byte
    import jquant

    ref = tmp_path / "ref.gguf"
    llama_quantize(arch_models[arch], ref, FTYPES["Q4_0"], output_tensor_type=int(T.Q8_0))
    out = tmp_path / "out.gguf"
    jquant.convert_gguf(arch_models[arch], out, "Q4_0", output_tensor_type="q8_0")
    assert out.read_bytes() == ref.read_bytes()
