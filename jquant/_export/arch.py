"""Per-architecture facts for GGUF export: names, layout rules and llama.cpp's metadata keys.

One :class:`Arch` record per supported Hugging Face ``model_type``. The keys each record
writes mirror llama.cpp's ``convert_hf_to_gguf.py`` (``TextModel.set_gguf_parameters`` and
the Llama/Gemma model classes), and are the ones llama.cpp's loader reads
(``src/models/{llama,gemma,gemma2,gemma3}.cpp``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._errors import QuantError

__all__ = ["ARCHS", "Arch", "arch_for", "head_dim", "write_hparams"]


@dataclasses.dataclass(frozen=True)
class Arch:
    """How one model family goes into GGUF.

    Attributes:
        model_type: the Hugging Face ``config.json`` ``model_type``.
        gguf_arch: ``general.architecture`` (gguf-py's ``MODEL_ARCH`` name).
        permute_qk: Q and K get llama.cpp's rotary permutation (HF keeps rotary halves
          apart, llama.cpp's "normal" rope wants the pairs interleaved); Gemma uses
          NeoX-style rope and needs none.
        norm_shift: added to every ``*norm.weight`` (Gemma's RMSNorm computes
          ``x * (1 + w)``, llama.cpp's ``x * w``).
        trim_vocab: keep only as many token ids (and embedding rows) as the tokenizer
          has (Gemma 3, as llama.cpp's converter does); otherwise the vocabulary is padded
          with ``[PAD{i}]`` tokens up to ``config["vocab_size"]``.
        tied_only: the architecture has no ``output.weight`` (a ``lm_head.weight`` in
          the checkpoint is dropped).
        sentencepiece_only: the tokenizer must be a SentencePiece ``tokenizer.model``.
    """

    model_type: str
    gguf_arch: str
    permute_qk: bool
    norm_shift: float
    trim_vocab: bool
    tied_only: bool
    sentencepiece_only: bool


ARCHS: dict[str, Arch] = {
    a.model_type: a
    for a in (
        Arch("llama", "llama", True, 0.0, False, False, False),
        Arch("mistral", "llama", True, 0.0, False, False, False),
        Arch("gemma", "gemma", False, 1.0, False, True, True),
        Arch("gemma2", "gemma2", False, 1.0, False, True, True),
        Arch("gemma3", "gemma3", False, 1.0, True, False, False),
        Arch("gemma3_text", "gemma3", False, 1.0, True, False, False),
    )
}


def arch_for(config: Mapping[str, Any]) -> Arch:
    """The :class:`Arch` for a HF config (``model_type`` picks it)."""
    mt = config.get("model_type")
    if mt not in ARCHS:
        raise QuantError(
            f"config model_type {mt!r} is not supported for GGUF export; supported: "
            f"{', '.join(sorted(ARCHS))} (Mistral-style checkpoints: use model_type 'llama')"
        )
    return ARCHS[mt]


def _get(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return default


def _need(config: Mapping[str, Any], name: str) -> Any:
    if config.get(name) is None:
        raise QuantError(f"config has no {name!r}, which GGUF export needs")
    return config[name]


def head_dim(config: Mapping[str, Any]) -> int:
    """The attention head size: ``head_dim`` or ``hidden_size // num_attention_heads``."""
    hd = config.get("head_dim")
    if hd is None:
        hd = _need(config, "hidden_size") // _need(config, "num_attention_heads")
    return int(hd)


def _rope(config: Mapping[str, Any]) -> dict[str, Any]:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in rope:
        rope = dict(rope["full_attention"])
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    if "rope_theta" not in rope and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    return rope


def llama3_rope_factors(config: Mapping[str, Any]) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs.weight`` for ``rope_type: llama3`` configs, else ``None``.

    Computed as ``LlamaModel.generate_extra_tensors`` in llama.cpp's converter does.
    """
    rope = _rope(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    dim = head_dim(config)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low = rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def swa_layers(config: Mapping[str, Any], n_layer: int) -> list[bool] | None:
    """Which layers use sliding-window attention (Gemma 2/3), or ``None``."""
    mt = config.get("model_type")
    if config.get("layer_types"):
        return [t == "sliding_attention" for t in config["layer_types"]]
    if mt == "gemma2":
        return [i % 2 == 0 for i in range(n_layer)]
    if mt in ("gemma3", "gemma3_text"):
        p = int(config.get("sliding_window_pattern") or 6)
        return [p == 0 or i % p < p - 1 for i in range(n_layer)]
    return None


def write_hparams(w: Any, arch: Arch, config: Mapping[str, Any], ftype: int) -> None:
    """Add the model's hyper-parameter keys to ``w`` (a ``gguf.GGUFWriter``).

    The keys and their GGUF types are the ones llama.cpp's converter writes for the
    architecture, plus ``{arch}.attention.sliding_window_pattern`` for Gemma 3 (so a
    config's own pattern or ``layer_types`` survives; llama.cpp's default is 6).
    """
    import gguf

    n_layer = int(_need(config, "num_hidden_layers"))
    n_head = int(_need(config, "num_attention_heads"))
    n_kv = int(_get(config, "num_key_value_heads", default=n_head))
    d = int(_need(config, "hidden_size"))
    hd = head_dim(config)
    rope = _rope(config)
    w.add_block_count(n_layer)
    w.add_context_length(int(_get(config, "max_position_embeddings", default=131072)))
    w.add_embedding_length(d)
    w.add_feed_forward_length(int(_need(config, "intermediate_size")))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    rtype = rope.get("rope_type")
    if rtype == "linear" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rtype == "yarn" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rtype not in (None, "default", "llama3"):
        raise QuantError(f"rope_type {rtype!r} is not supported for GGUF export")
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    local_theta = _get(config, "rope_local_base_freq", "local_rope_theta")
    if local_theta is not None and arch.gguf_arch in ("gemma2", "gemma3"):
        w.add_rope_freq_base_swa(float(local_theta))
    w.add_layer_norm_rms_eps(float(_get(config, "rms_norm_eps", default=1e-6)))
    # the converter's transformers config always has head_dim, so it always writes these
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_file_type(ftype)
    if arch.gguf_arch == "llama":
        w.add_vocab_size(int(_need(config, "vocab_size")))
        w.add_rope_dimension_count(hd)
    if arch.gguf_arch == "gemma2":
        w.add_attn_logit_softcapping(float(_get(config, "attn_logit_softcapping", default=50.0)))
        w.add_final_logit_softcapping(float(_get(config, "final_logit_softcapping", default=30.0)))
    if arch.gguf_arch == "gemma3":
        if config.get("attn_logit_softcapping") is not None:
            raise QuantError("Gemma 3 has no attention softcap; llama.cpp can't run one")
        if config.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if arch.gguf_arch in ("gemma2", "gemma3"):
        swa = swa_layers(config, n_layer)
        window = config.get("sliding_window")
        if window is not None and swa is not None and any(swa):
            w.add_sliding_window(int(window))
            if arch.gguf_arch == "gemma3":
                w.add_sliding_window_pattern(swa)
            elif swa != [i % 2 == 0 for i in range(n_layer)]:
                w.add_sliding_window_pattern(swa)
        _check_query_scale(config, n_layer, d, n_head, hd)


def _check_query_scale(config: Mapping[str, Any], n_layer: int, d: int, n_head: int, hd: int):
    # llama.cpp fixes Gemma 2/3's attention scale: 1/sqrt(d / n_head) for the 27B
    # layer counts, else 1/sqrt(head_dim); HF configs say it with query_pre_attn_scalar.
    q = config.get("query_pre_attn_scalar")
    if q is None:
        return
    big = {"gemma2": 46, "gemma3": 62, "gemma3_text": 62}.get(config.get("model_type"))
    used = d // n_head if n_layer == big else hd
    if float(q) != float(used):
        warnings.warn(
            f"config query_pre_attn_scalar={q} but llama.cpp scales Gemma queries by "
            f"1/sqrt({used}) for this shape; the exported model's attention will differ. "
            f"Fold sqrt({used}/{q}) into the q_proj weights to keep the model's outputs.",
            UserWarning,
            stacklevel=3,
        )
