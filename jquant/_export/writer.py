"""Whole-model GGUF export: :func:`export_gguf`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._core.quantize import quantize_tensor
from .._errors import QuantError
from .._formats.quant_type import QuantType
from .._io.gguf_file import Entry, write_gguf
from .._llama.imatrix import ImportanceMatrix
from .._llama.mixes import CONVERTER_FTYPES, LlamaModelFacts, MixOptions, choose_types
from .._llama.mixes import FTYPES as LLAMA_FTYPES
from .._llama.quantize import encode_model_tensor, imatrix_metadata, prepare_imatrix
from .adapters import SOURCES, to_hf
from .arch import arch_for, write_hparams
from .layout import plan_tensors
from .tokenizer import tokenizer_size, write_tokenizer

__all__ = ["CONVERTER_FTYPES", "FTYPES", "export_gguf", "tensor_type"]

# every ftype export_gguf writes -> its llama_ftype id: the converter's, then the
# llama-quantize mixes (written as llama-quantize makes them from the f16 file)
FTYPES: dict[str, int] = {
    **{k: v[0] for k, v in CONVERTER_FTYPES.items()},
    **{k.lower(): v for k, v in LLAMA_FTYPES.items() if k.lower() not in CONVERTER_FTYPES},
}


def tensor_type(name: str, shape: tuple[int, ...], ftype: str) -> QuantType:
    """The GGML format llama.cpp's converter gives tensor ``name`` in a file of ``ftype``.

    For the converter's ftypes (``f32``, ``f16``, ``bf16``, ``q8_0``), as
    ``convert_hf_to_gguf.py``: 1-D tensors, norms and non-``.weight`` tensors are F32; the
    rest take the ftype's format, falling back to F16 where rows are not a multiple of
    the block size. llama-quantize's mixes (``q4_k_m``...) depend on the whole model;
    :func:`export_gguf` picks them with :func:`jquant._llama.mixes.choose_types`.

    Example:
        >>> tensor_type("blk.0.attn_norm.weight", (64,), "q8_0").name
        'F32'
        >>> tensor_type("blk.0.attn_q.weight", (64, 64), "q8_0").name
        'Q8_0'
        >>> tensor_type("blk.0.attn_q.weight", (64, 40), "q8_0").name
        'F16'
    """
    key = ftype.lower()
    if key not in CONVERTER_FTYPES:
        raise QuantError(
            f"ftype {ftype!r} is not one of the converter's ({', '.join(CONVERTER_FTYPES)}); "
            f"llama-quantize's mixes depend on the whole model (export_gguf picks them)"
        )
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return QuantType.F32
    qt = QuantType.parse(CONVERTER_FTYPES[key][1])
    if qt.is_block_quantized and shape[-1] % qt.block_size:
        return QuantType.F16
    return qt


def load_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A HF config as a dict (a ``config.json`` path or a dict; ``text_config`` merged)."""
    if not isinstance(config, Mapping):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), Mapping):  # Gemma 3 multimodal configs
        text = dict(cfg["text_config"])
        text.setdefault("model_type", "gemma3")
        if text["model_type"] == "gemma3_text":
            text["model_type"] = "gemma3"
        cfg = {**cfg, **text}
    return cfg


def _produce(load: Callable[[], np.ndarray], qt: QuantType, name: str):
    def produce() -> np.ndarray:
        x = load()
        return quantize_tensor(np.asarray(x), qt, name=name).to_bytes()

    return produce


def _produce_mixed(
    load: Callable[[], np.ndarray],
    src: QuantType,
    dst: QuantType,
    name: str,
    shape: tuple[int, ...],
    importance: np.ndarray | None,
):
    """llama-quantize's bytes for one tensor of the ``src`` (f16 export) file."""

    def produce() -> np.ndarray:
        data = np.asarray(quantize_tensor(np.asarray(load()), src, name=name).to_bytes())
        if dst == src:
            return data
        x = data.view("<f2" if src == QuantType.F16 else "<f4").reshape(shape)
        return np.frombuffer(encode_model_tensor(x, name, dst.ggml_type, importance), np.uint8)

    return produce


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def export_gguf(
    path: str | os.PathLike,
    weights: Mapping[str, Any],
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    tokenizer: str | os.PathLike,
    ftype: str = "f16",
    source: str = "hf",
    pre_tokenizer: str | None = None,
    name: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    imatrix: ImportanceMatrix | Mapping[str, np.ndarray] | str | os.PathLike | None = None,
) -> Path:
    """Write a model as a GGUF file that llama.cpp (and Ollama) load and run.

    Supported ``config["model_type"]``: ``llama`` (and Mistral-style checkpoints),
    ``gemma``, ``gemma2``, ``gemma3``. Tensors get llama.cpp's names and layouts (Llama's
    Q/K rotary permutation, Gemma's ``1 + scale`` norms, the embedding trimmed to the
    written vocabulary) and the file llama.cpp's metadata keys, as its
    ``convert_hf_to_gguf.py`` writes them. Tensors are read, transformed, quantized and
    written one at a time (the file is replaced atomically once complete).

    Args:
        path: the ``.gguf`` file to write.
        weights: tensor name -> array. With ``source="hf"``, Hugging Face parameter names
          and HF's ``(out, in)`` layout (a transformers state dict, a safetensors file's
          tensors); ``"flax"`` (HF Flax trees, ``kernel`` in ``(in, out)``), ``"gemma"``
          (the gemma library's trees) and ``"maxtext"`` (MaxText's scanned decoder) are
          converted first. Nested dicts are fine for those. Values may be numpy or JAX
          arrays (sharded too), or objects with ``shape``, ``dtype`` and ``load()``.
        config: the HF ``config.json`` (a path or a dict).
        tokenizer: a folder with ``tokenizer.model`` (SentencePiece) and/or
          ``tokenizer.json`` (BPE), plus ``tokenizer_config.json``.
        ftype: ``"f32"``, ``"f16"``, ``"bf16"`` or ``"q8_0"`` as llama.cpp's converter
          writes them (see :func:`tensor_type`), or one of llama-quantize's mixes
          (``"q4_k_m"``, ``"q4_0"``, ``"q5_k_s"``, ``"q6_k"``, ``"iq4_xs"``...; see
          ``FTYPES``): each tensor gets the type and bytes ``llama-quantize`` gives it when
          it quantizes the ``"f16"`` export of the same model.
        source: ``"hf"``, ``"flax"``, ``"gemma"`` or ``"maxtext"``.
        pre_tokenizer: llama.cpp's BPE pre-tokenizer name; detected like llama.cpp's
          converter does when ``None`` (needs ``tokenizers``).
        name: ``general.name`` (default: the config's ``_name_or_path`` or the family).
        progress: ``progress(bytes_done, bytes_total, tensor_name)`` after each tensor.
        imatrix: importance weights for the mixes, as llama-quantize's ``--imatrix``: a
          file (llama.cpp's GGUF imatrix or legacy ``.dat``), an ``ImportanceMatrix`` or
          ``{tensor name: float32 weights, one per column}``, named as in the GGUF file
          (``blk.0.attn_q.weight``) or as in the HF weights (``model.layers.0...``).

    Returns:
        The path written.

    Raises:
        QuantError: an unsupported architecture, ftype or tokenizer, a tensor with no
          llama.cpp name, or importance weights that don't fit a tensor's rows.
        ShapeError: a tensor whose shape does not match the config.
        FileWriteError: ``path`` can't be written (no partial file is left).

    Example:
        >>> import json, os, tempfile, numpy as np, jquant
        >>> d = tempfile.mkdtemp()
        >>> tok = {"model": {"type": "BPE", "vocab": {c: i for i, c in enumerate("abcdefgh")},
        ...        "merges": []}, "added_tokens": []}
        >>> _ = open(os.path.join(d, "tokenizer.json"), "w").write(json.dumps(tok))
        >>> cfg = {"model_type": "llama", "vocab_size": 8, "hidden_size": 32,
        ...        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        >>> shapes = {"model.embed_tokens.weight": (8, 32), "model.norm.weight": (32,),
        ...           "lm_head.weight": (8, 32)}
        >>> for n, s in [("input_layernorm", (32,)), ("post_attention_layernorm", (32,)),
        ...              ("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (32, 32)),
        ...              ("self_attn.v_proj", (32, 32)), ("self_attn.o_proj", (32, 32)),
        ...              ("mlp.gate_proj", (64, 32)), ("mlp.up_proj", (64, 32)),
        ...              ("mlp.down_proj", (32, 64))]:
        ...     shapes[f"model.layers.0.{n}.weight"] = s
        >>> rng = np.random.default_rng(0)
        >>> weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        >>> path = jquant.export_gguf(os.path.join(d, "m.gguf"), weights, cfg, tokenizer=d,
        ...                           ftype="q8_0", pre_tokenizer="gpt-2")
        >>> info = jquant.inspect_gguf(path)
        >>> types = {t.name: t.type_name for t in info.tensors}
        >>> info.metadata["general.architecture"], types["blk.0.attn_q.weight"]
        ('llama', 'Q8_0')
        >>> types["blk.0.attn_norm.weight"], "output.weight" in types
        ('F32', True)
    """
    cfg = load_config(config)
    arch = arch_for(cfg)
    key = ftype.lower()
    if key not in FTYPES:
        raise QuantError(
            f"ftype {ftype!r} is not supported; use one of {', '.join(FTYPES)} (llama.cpp's "
            f"other ftypes need kernels jquant doesn't have)"
        )
    mixed = key not in CONVERTER_FTYPES
    im_weights, im, im_path = prepare_imatrix(imatrix)
    if im_weights is not None and not mixed:
        raise QuantError(
            f"an imatrix only changes llama-quantize's mixes; ftype {ftype!r} doesn't use it"
        )
    if source not in SOURCES:
        raise QuantError(f"source {source!r} is not one of {', '.join(SOURCES)}")
    hf = to_hf(weights, cfg, source)

    import gguf

    w = gguf.GGUFWriter(None, arch.gguf_arch)
    default_name = str(cfg.get("_name_or_path") or arch.model_type).rstrip("/").split("/")[-1]
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or default_name)
    write_hparams(w, arch, cfg, FTYPES[key])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_real = tokenizer_size(tokenizer)
    n_vocab = n_real if arch.trim_vocab else int(cfg.get("vocab_size") or n_real)
    write_tokenizer(
        w,
        tokenizer,
        n_vocab=n_vocab,
        model_type=arch.model_type,
        sentencepiece_only=arch.sentencepiece_only,
        pre_tokenizer=pre_tokenizer,
    )
    if im_weights is not None:
        for k, v in imatrix_metadata(im_weights, im, im_path):
            (w.add_string if isinstance(v, str) else w.add_uint32)(k, v)
    metadata: dict[str, Any] = {"general.architecture": arch.gguf_arch}
    for k, v in w.kv_data[0].items():
        if k != "general.architecture":
            metadata[k] = (v.value, v.type, v.sub_type)

    planned = plan_tensors(hf, cfg, arch, n_vocab)
    entries = []
    if not mixed:
        for t in planned:
            qt = tensor_type(t.name, t.shape, key)
            produce = _produce(t.load, qt, t.name)
            entries.append(Entry(t.name, "q", "float32", t.shape, qt.ggml_type, produce))
    else:
        # the types llama-quantize gives each tensor of the f16 export
        base = {t.name: tensor_type(t.name, t.shape, "f16") for t in planned}
        facts = LlamaModelFacts.from_metadata({k: _plain(v.value) for k, v in w.kv_data[0].items()})
        types = choose_types(
            FTYPES[key],
            [(t.name, t.shape, base[t.name].ggml_type) for t in planned],
            facts,
            MixOptions(has_imatrix=im_weights is not None),
        )
        for t in planned:
            src, dst = base[t.name], QuantType(int(types[t.name]))
            iw = None
            if im_weights is not None and dst != src:  # by GGUF name, else by source name
                iw = im_weights.get(t.name, im_weights.get(t.source))
            produce = _produce_mixed(t.load, src, dst, t.name, tuple(t.shape), iw)
            entries.append(Entry(t.name, "q", "float32", t.shape, dst.ggml_type, produce))
    tree = {"d": [[e.path, {"i": i}] for i, e in enumerate(entries)]}
    return write_gguf(path, entries, tree=tree, metadata=metadata, progress=progress)
