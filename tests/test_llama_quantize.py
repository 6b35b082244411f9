"""``convert_gguf`` / ``jquant quantize`` against llama.cpp's own quantizer, file for file.

Oracle: ``llama_cpp.llama_model_quantize`` (llama-quantize's library) on two models built
here (a GQA decoder with an untied output and rows of 256/512; a tied-output model with
rows of 160/320). Tests skip where llama-cpp-python is absent, and skip with "needs
K-quant kernels" / "needs weighted kernels" where this jquant can't encode a type yet.
"""

from __future__ import annotations

import json
import os
import stat

import gguf
import numpy as np
import pytest

import jquant
from jquant._cli.main import main
from jquant._io.gguf_file import read_header
from jquant._llama.mixes import FTYPES, LlamaModelFacts, MixOptions, choose_types
from jquant._llama.quantize import KernelUnavailableError

from ._llama_models import HAVE_LLAMA, MODELS, llama_quantize, write_llama

T = gguf.GGMLQuantizationType
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="needs llama-cpp-python")
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16"]
KQUANT = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
ALL = LEGACY + KQUANT + ["IQ4_NL", "IQ4_XS"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_models")
    return {name: write_llama(d / f"{name}-f16.gguf", **cfg) for name, cfg in MODELS.items()}


_REFS: dict = {}


def reference(models, tmp_path_factory, model: str, ftype: str, **options):
    """llama.cpp's output for (model, ftype, options), computed once per session."""
    key = (model, ftype, repr(sorted(options.items())))
    if key not in _REFS:
        d = tmp_path_factory.mktemp("ref")
        out = d / f"{model}-{ftype}.gguf"
        llama_quantize(models[model], out, FTYPES[ftype], **options)
        _REFS[key] = out
    return _REFS[key]


def jquant_or_skip(src, dst, ftype, **kw):
    try:
        return jquant.convert_gguf(src, dst, ftype, **kw)
    except KernelUnavailableError as e:
        weighted = "importance-weighted" in str(e)
        pytest.skip(
            ("needs weighted kernels: " if weighted else "needs K-quant kernels: ") + str(e)
        )


def assert_same_file(ours, ref):
    a, b = read_header(ours), read_header(ref)
    (ia, ma), (ib, mb) = a, b
    assert [(t.name, t.type_name, t.shape) for t in ia.tensors] == [
        (t.name, t.type_name, t.shape) for t in ib.tensors
    ]
    for ta, tb in zip(ia.tensors, ib.tensors, strict=True):
        da = bytes(ma[ta.offset : ta.offset + ta.nbytes])
        db = bytes(mb[tb.offset : tb.offset + tb.nbytes])
        assert da == db, f"{ta.name} ({ta.type_name}): bytes differ"
    assert ia.metadata == ib.metadata
    assert list(ia.metadata) == list(ib.metadata)
    assert open(ours, "rb").read() == open(ref, "rb").read()


def types_of(path):
    info, _ = read_header(path)
    return {t.name: T(t.ggml_type) for t in info.tensors}


@needs_llama
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("ftype", ALL)
def test_mix_types_match_llama_cpp(models, tmp_path_factory, model, ftype):
    ref = reference(models, tmp_path_factory, model, ftype)
    info, _ = read_header(models[model])
    ours = choose_types(
        ftype,
        [(t.name, t.shape, T(t.ggml_type)) for t in info.tensors],
        LlamaModelFacts.from_metadata(info.metadata),
    )
    assert ours == types_of(ref)
    assert read_header(ref)[0].metadata["general.file_type"] == FTYPES[ftype]


@needs_llama
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("ftype", ALL)
def test_file_matches_llama_cpp(models, tmp_path_factory, tmp_path, model, ftype):
    ref = reference(models, tmp_path_factory, model, ftype)
    out = tmp_path / "out.gguf"
    report = jquant_or_skip(models[model], out, ftype)
    assert_same_file(out, ref)
    assert [r.format for r in report.rows] == [t.name for t in types_of(ref).values()]


@needs_llama
@pytest.mark.parametrize("ftype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_bytes_on_the_gqa_model(models, tmp_path_factory, tmp_path, ftype):
    # the default mix gives output.weight Q6_K; Q8_0 there proves every other tensor now
    ref = reference(models, tmp_path_factory, "gqa", ftype, output_tensor_type=int(T.Q8_0))
    out = tmp_path / "out.gguf"
    jquant.convert_gguf(models["gqa"], out, ftype, output_tensor_type="q8_0")
    assert_same_file(out, ref)


OPTION_CASES = {
    "pure": ("Q4_0", dict(pure=True), dict(pure=True)),
    "tensor-type": (
        "Q4_0",
        dict(
            tensor_types=[("attn_v", int(T.Q8_0)), ("ffn_down", int(T.Q5_1))], output_tensor_type=8
        ),
        dict(tensor_types=[("attn_v", "q8_0"), ("FFN_DOWN", "Q5_1")], output_tensor_type="Q8_0"),
    ),
    "token-embd+leave-output": (
        "Q4_1",
        dict(token_embedding_type=int(T.Q5_0), leave_output_tensor=True),
        dict(token_embedding_type="q5_0", leave_output_tensor=True),
    ),
    "k-mix with overrides": (
        "Q4_K_M",
        dict(tensor_types=[("ffn", int(T.Q4_0)), ("attn", int(T.Q5_0))], output_tensor_type=8),
        dict(tensor_types={"ffn": "q4_0", "attn": "q5_0"}, output_tensor_type="q8_0"),
    ),
}


@needs_llama
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_match_llama_cpp(models, tmp_path_factory, tmp_path, case):
    ftype, theirs, ours = OPTION_CASES[case]
    ref = reference(models, tmp_path_factory, "gqa", ftype, **theirs)
    out = tmp_path / "out.gguf"
    jquant_or_skip(models["gqa"], out, ftype, **ours)
    assert_same_file(out, ref)


@needs_llama
@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0"])
def test_cli_is_a_drop_in(models, tmp_path_factory, tmp_path, ftype):
    ref = reference(models, tmp_path_factory, "row160", ftype)
    out = tmp_path / "out.gguf"
    old = os.umask(0o022)
    try:
        args = ["quantize", str(models["row160"]), "-o", str(out), "-t", ftype.lower(), "-q"]
        rc = main([*args, "--no-compile-cache"])  # keep this test process's JAX config as is
    finally:
        os.umask(old)
    assert rc == 0
    assert open(out, "rb").read() == open(ref, "rb").read()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644


@needs_llama
def test_llama_cpp_runs_the_result(models, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "q8.gguf"
    jquant.convert_gguf(models["gqa"], out, "Q8_0")
    tokens = [1, 300, 301, 302, 303, 304, 305]

    def logits(path):
        m = llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, verbose=False)
        m.eval(tokens)
        x = np.array(m.scores[: len(tokens)], np.float64)
        m.close()
        return x

    ref, got = logits(models["gqa"]), logits(out)
    assert np.all(np.isfinite(got))
    corr = np.corrcoef(ref.ravel(), got.ravel())[0, 1]
    assert corr > 0.99, corr


def test_refuses_what_llama_cpp_cannot_use(models, tmp_path):
    src = models["row160"]
    # quantized 1-D tensors in a llama.cpp file: llama.cpp aborts on them
    rc = main(["quantize", str(src), "-o", str(tmp_path / "x.gguf"), "-t", "q8_0", "--quantize-1d"])
    assert rc == 5 and not (tmp_path / "x.gguf").exists()
    # a llama.cpp ftype for a safetensors input: the architecture must come first
    from safetensors.numpy import save_file

    st = tmp_path / "m.safetensors"
    save_file({"w": np.ones((64, 256), np.float32)}, str(st))
    rc = main(["quantize", str(st), "-o", str(tmp_path / "y.gguf"), "-t", "Q4_K_M"])
    assert rc == 5 and not (tmp_path / "y.gguf").exists()


def test_error_names_the_problem(models, tmp_path, capsys):
    with pytest.raises(jquant.UnknownFormatError, match="Q4_K_M"):
        jquant.convert_gguf(models["row160"], tmp_path / "x.gguf", "Q4_K_X")
    jq = tmp_path / "jq.gguf"
    jquant.save_gguf(jq, {"w": np.ones((4, 64), np.float32)})
    with pytest.raises(jquant.FileFormatError, match="convert_hf_to_gguf"):
        jquant.convert_gguf(jq, tmp_path / "x.gguf", "Q8_0")
    with pytest.raises(jquant.QuantError, match="same file"):
        jquant.convert_gguf(models["row160"], models["row160"], "Q8_0")
    q8 = tmp_path / "q8.gguf"
    jquant.convert_gguf(models["row160"], q8, "Q8_0")
    with pytest.raises(jquant.QuantError, match="requantiz"):
        jquant.convert_gguf(q8, tmp_path / "x.gguf", "Q4_0")


def test_types_are_independent_of_tensor_order():
    facts = LlamaModelFacts(arch="llama", n_layer=8, n_head=8, n_head_kv=2)
    names = [
        (f"blk.{i}.{k}.weight", (256, 256), T.F16) for i in range(8) for k in ("attn_v", "ffn_down")
    ]
    a = choose_types("Q4_K_M", names, facts, MixOptions())
    b = choose_types("Q4_K_M", names[::-1], facts, MixOptions())
    assert a == b


@needs_llama
@pytest.mark.parametrize("ftype", ["Q4_0", "Q5_1", "F16", "BF16"])
def test_float32_input_matches_llama_cpp(tmp_path, ftype):
    src = write_llama(tmp_path / "f32.gguf", dtype=np.float32, **MODELS["row160"])
    ref = tmp_path / "ref.gguf"
    llama_quantize(src, ref, FTYPES[ftype])
    out = tmp_path / "out.gguf"
    jquant.convert_gguf(src, out, ftype)
    assert_same_file(out, ref)


def test_a_second_conversion_compiles_nothing(models, tmp_path):
    from jquant._core.quantize import _quantize_jit

    jquant.convert_gguf(models["row160"], tmp_path / "a.gguf", "Q5_0")
    before = _quantize_jit._cache_size()
    jquant.convert_gguf(models["row160"], tmp_path / "b.gguf", "Q5_0")
    assert _quantize_jit._cache_size() == before
    # tensors are cut into chunks of a few fixed sizes: another model reuses most kernels
    jquant.convert_gguf(models["gqa"], tmp_path / "c.gguf", "Q5_0", output_tensor_type="q5_0")
    assert _quantize_jit._cache_size() - before <= 3


def test_llama_tensor_types_is_the_dry_run(models, tmp_path):
    types = jquant.llama_tensor_types(models["gqa"], "Q4_K_M")
    report = jquant.convert_gguf(models["row160"], tmp_path / "x.gguf", "Q4_0")
    assert [r.format for r in report.rows] == list(
        jquant.llama_tensor_types(models["row160"], "Q4_0").values()
    )
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_v.weight"] == "Q6_K"
    assert types["blk.2.attn_v.weight"] == "Q4_K" and types["output_norm.weight"] == "F32"


@needs_llama
def test_requantize_matches_llama_cpp(models, tmp_path_factory, tmp_path):
    q8 = reference(models, tmp_path_factory, "row160", "Q8_0")
    ref = tmp_path / "ref.gguf"
    llama_quantize(q8, ref, FTYPES["Q4_1"], allow_requantize=True)
    out = tmp_path / "out.gguf"
    jquant.convert_gguf(q8, out, "Q4_1", allow_requantize=True)
    assert_same_file(out, ref)


# -- the engine with ggml's own kernels --------------------------------------------------


@pytest.fixture
def ggml_kernels(monkeypatch):
    """Swap jquant's kernels for libggml's ``ggml_quantize_chunk`` (every type, weighted too).

    What remains is jquant's engine: the mix, chunking and padding, expert slices of the
    importance weights, the file layout. With these kernels it must write llama.cpp's file
    for every ftype; with jquant's own kernels the tests above check the same.
    """
    import types

    from jquant._llama import quantize as engine

    from . import _ggml_oracle as oracle

    if not oracle.HAVE_GGML:
        pytest.skip("needs libggml")

    def kernel(t, weighted):
        def run(rows, w):
            data = oracle.ggml_quantize(np.asarray(rows, np.float32), int(t), w)
            return types.SimpleNamespace(to_bytes=lambda: data)

        return run

    monkeypatch.setattr(engine, "_kernel", kernel)


@needs_llama
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("ftype", ALL)
def test_engine_writes_llama_cpps_file(
    models, tmp_path_factory, tmp_path, model, ftype, ggml_kernels
):
    ref = reference(models, tmp_path_factory, model, ftype)
    out = tmp_path / "out.gguf"
    jquant.convert_gguf(models[model], out, ftype)
    assert_same_file(out, ref)


def test_the_command_line_keeps_compiled_kernels(models, tmp_path):
    import subprocess
    import sys

    cache = tmp_path / "xla"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JQUANT_CACHE_DIR": str(cache)}
    env.pop("XLA_FLAGS", None)
    env.pop("JQUANT_NO_COMPILE_CACHE", None)  # conftest turns it off for in-process runs
    cmd = [sys.executable, "-m", "jquant", "quantize", str(models["row160"]), "-t", "q5_1"]
    off = subprocess.run(
        [*cmd, "-o", str(tmp_path / "a.gguf"), "--json"],
        env={**env, "JQUANT_NO_COMPILE_CACHE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert off.returncode == 0, off.stderr
    assert not cache.exists() or not any(cache.iterdir())
    summary = json.loads(off.stdout)
    assert summary["ftype"] == "q5_1" and summary["tensors"][0]["name"] == "output_norm.weight"
    on = subprocess.run(
        [*cmd, "-o", str(tmp_path / "b.gguf"), "-q"], env=env, capture_output=True, timeout=300
    )
    assert on.returncode == 0, on.stderr
    assert any(cache.iterdir())
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
