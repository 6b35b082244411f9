"""Layout transforms from Hugging Face tensors to llama.cpp's, and the GGUF tensor names.

Every transform is a pure function of a numpy array in HF's ``(out, in)`` layout; GGUF's
first (innermost) dimension is the row, so an HF ``(out, in)`` matrix is already what
llama.cpp reads as ``{in, out}`` and is written as is.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .._errors import QuantError, ShapeError
from .arch import Arch, head_dim, llama3_rope_factors

__all__ = [
    "ExportTensor",
    "host_array",
    "permute_rotary",
    "plan_tensors",
    "shift_norm",
    "trim_vocab",
]


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary permutation of a Q or K projection (HF ``(out, in)`` or bias).

    HF stores each head's rotary dimensions as two halves ``[x0..x_{h/2}, y0..y_{h/2}]``;
    llama.cpp's "normal" rope rotates adjacent pairs ``(x0, y0), (x1, y1), ...``. The rows
    of each head are interleaved: ``reshape(n_head, 2, h/2, ...).swapaxes(1, 2)``. Give
    K's ``n_head_kv`` for K.

    Example:
        >>> import numpy as np
        >>> permute_rotary(np.arange(8.0), 2).tolist()
        [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ShapeError(
            f"can't apply the rotary permutation: {rows} rows don't split into {n_head} heads "
            f"of an even size; check num_attention_heads / num_key_value_heads"
        )
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def shift_norm(w: np.ndarray, shift: float) -> np.ndarray:
    """``w + shift`` in float32 (Gemma's norms are stored as ``1 + scale``)."""
    return np.asarray(w, np.float32) + np.float32(shift)


def trim_vocab(w: np.ndarray, n_vocab: int, name: str) -> np.ndarray:
    """The first ``n_vocab`` rows of an embedding or output matrix."""
    if w.shape[0] < n_vocab:
        raise ShapeError(
            f"{name} has {w.shape[0]} rows but the tokenizer has {n_vocab} tokens; the "
            f"embedding must cover every token id"
        )
    return w[:n_vocab]


@dataclasses.dataclass
class ExportTensor:
    """One GGUF tensor to write: its llama.cpp name, numpy-order shape and loader."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    source: str


_DROP = re.compile(r"(\.rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)$")
_VISION = re.compile(r"(^|\.)(vision_tower|vision_model|multi_modal_projector)\.")


def host_array(x: Any) -> np.ndarray:
    """``x`` as a host numpy array; a JAX array other hosts hold shards of is gathered."""
    if hasattr(x, "load") and callable(x.load):
        return np.asarray(x.load())
    if getattr(x, "is_fully_addressable", True) is False:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _loader(x: Any) -> Callable[[], np.ndarray]:
    return lambda: host_array(x)


def plan_tensors(
    weights: Mapping[str, Any],
    config: Mapping[str, Any],
    arch: Arch,
    n_vocab: int,
) -> list[ExportTensor]:
    """Map HF-named tensors to llama.cpp's names with the layout transforms as loaders.

    Nothing is read here: each :class:`ExportTensor` loads and transforms its tensor when
    written. ``n_vocab`` is the number of token ids written (embedding rows beyond it are
    dropped).
    """
    import gguf

    n_layer = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    # HF's defaults: Llama unties, Gemma ties
    tied = bool(config.get("tie_word_embeddings", arch.gguf_arch.startswith("gemma")))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch.upper()], n_layer)
    hd = head_dim(config)
    out: list[ExportTensor] = []
    seen: dict[str, str] = {}
    vision = []
    for src, x in weights.items():
        if _DROP.search(src):
            continue
        if _VISION.search(src):
            vision.append(src)
            continue
        if src == "lm_head.weight" and (arch.tied_only or tied):
            continue
        # multimodal checkpoints (Gemma 3) nest the text model under language_model
        new = names.get_name(src.replace("language_model.", ""), try_suffixes=(".weight", ".bias"))
        if new is None:
            raise QuantError(
                f"tensor {src!r} has no llama.cpp name for architecture {arch.gguf_arch!r}; "
                f"weights must use Hugging Face parameter names (or pass source='flax', "
                f"'gemma' or 'maxtext')"
            )
        if new in seen:
            raise QuantError(f"tensors {seen[new]!r} and {src!r} both map to {new!r}")
        seen[new] = src
        shape = tuple(int(s) for s in x.shape)
        steps: list[Callable[[np.ndarray], np.ndarray]] = []
        if arch.permute_qk and new.endswith(("attn_q.weight", "attn_q.bias")):
            steps.append(lambda a: permute_rotary(a, n_head))
        if arch.permute_qk and new.endswith(("attn_k.weight", "attn_k.bias")):
            steps.append(lambda a: permute_rotary(a, n_kv))
        if arch.norm_shift and src.endswith("norm.weight"):
            steps.append(lambda a: shift_norm(a, arch.norm_shift))
        if new in ("token_embd.weight", "output.weight"):
            if shape[0] < n_vocab:
                raise ShapeError(
                    f"{src} has {shape[0]} rows but {n_vocab} token ids are written; the "
                    f"embedding must cover every token id"
                )
            shape = (n_vocab, *shape[1:])
            steps.append(lambda a, s=src: trim_vocab(a, n_vocab, s))
        _check_shape(new, src, shape, config, hd, n_head, n_kv)
        out.append(ExportTensor(new, shape, _chain(_loader(x), steps), src))
    if vision:
        warnings.warn(
            f"skipped {len(vision)} vision tensor(s) ({vision[0]}, ...): llama.cpp reads a "
            f"vision tower from a separate mmproj file, which jquant does not write",
            UserWarning,
            stacklevel=3,
        )
    _check_complete(seen, n_layer)
    factors = llama3_rope_factors(config) if arch.gguf_arch == "llama" else None
    if factors is not None:
        out.append(ExportTensor("rope_freqs.weight", factors.shape, lambda: factors, "(config)"))
    return out


def _check_complete(seen: Mapping[str, str], n_layer: int) -> None:
    """Every layer has the same tensors, and the embedding and final norm are there."""
    for name, hf in (("token_embd.weight", "embed_tokens"), ("output_norm.weight", "norm")):
        if name not in seen:
            raise QuantError(f"weights have no {name} (HF model.{hf}.weight)")
    layers: dict[int, set[str]] = {i: set() for i in range(n_layer)}
    for name in seen:
        if name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            if int(i) >= n_layer:
                raise QuantError(f"{seen[name]!r} is beyond the config's {n_layer} layers")
            layers[int(i)].add(rest)
    every = set().union(*layers.values())
    for i, have in layers.items():
        if have != every:
            missing = sorted(every - have)
            raise QuantError(
                f"layer {i} lacks {', '.join(missing)} (llama.cpp names) that other layers have; "
                f"is the checkpoint complete?"
            )


def _chain(load: Callable[[], Any], steps: list[Callable[[np.ndarray], np.ndarray]]):
    def run() -> np.ndarray:
        a = np.asarray(load())
        for f in steps:
            a = f(a)
        return a

    return run


def _check_shape(new, src, shape, config, hd, n_head, n_kv) -> None:
    d = int(config["hidden_size"])
    ff = int(config["intermediate_size"])
    want = {
        "attn_q.weight": (n_head * hd, d),
        "attn_k.weight": (n_kv * hd, d),
        "attn_v.weight": (n_kv * hd, d),
        "attn_output.weight": (d, n_head * hd),
        "ffn_gate.weight": (ff, d),
        "ffn_up.weight": (ff, d),
        "ffn_down.weight": (d, ff),
        "attn_q_norm.weight": (hd,),
        "attn_k_norm.weight": (hd,),
    }.get(new.split(".", 2)[-1] if new.startswith("blk.") else new)
    if want is not None and shape != want:
        raise ShapeError(
            f"tensor {src!r} has shape {shape}, expected {want} (HF's (out, in) layout) from "
            f"the config; Flax kernels are (in, out): pass source='flax'"
        )
