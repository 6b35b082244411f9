"""Adapters from JAX parameter trees to Hugging Face names and ``(out, in)`` layouts.

* ``"flax"``: HF-style Flax trees (``FlaxLlamaForCausalLM`` and friends): the path is the
  HF name, ``kernel`` (``(in, out)``) becomes a transposed ``weight``, ``embedding`` and
  ``scale`` become ``weight``.
* ``"gemma"``: the gemma library's trees (``embedder/input_embedding``,
  ``layer_{i}/attn/q_einsum`` ``(N, d, H)``, ``kv_einsum`` ``(2, K, d, H)`` or
  ``qkv_einsum`` ``(3, N, d, H)``, ``attn_vec_einsum`` ``(N, H, d)``, ``mlp/gating_einsum``
  ``(2, F, d)`` or ``(2, d, F)``, ``mlp/linear`` ``(F, d)``, ``*_norm/scale``). Its
  norms already hold the raw ``scale`` of ``x * (1 + scale)``, as HF's Gemma weights do.
* ``"maxtext"``: MaxText's decoder (``token_embedder``, ``decoder/layers/...`` scanned
  along axis 1, or ``decoder/layers_{i}`` unscanned; Gemma 2's ``*_local``/``*_global``
  pairs are layers ``2j`` and ``2j + 1``). MaxText's checkpoint converters
  (``utils/ckpt_conversion/strategies``) fold constants in, which are undone here: queries
  pre-scaled by ``head_dim ** -0.5`` (Llama, Gemma, Gemma 2; not Gemma 3), Gemma's
  embedding pre-multiplied by ``sqrt(d)`` (rounded to bfloat16 for Gemma 3), Gemma norms
  (QK-norms too) stored as ``1 + scale``; Llama's Q/K rotary dimensions are interleaved
  (Meta's layout) and are put back in HF's halves order.

Each adapter returns ``{hf_name: lazy tensor}``; nothing is read until written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .._errors import QuantError, ShapeError
from .arch import head_dim
from .layout import host_array

__all__ = ["SOURCES", "Lazy", "flatten", "to_hf"]

SOURCES = ("hf", "flax", "gemma", "maxtext")


class Lazy:
    """A tensor known by shape and dtype, computed from its source by ``load()``."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, load: Callable[[], np.ndarray]):
        self.shape, self.dtype, self.load = tuple(int(s) for s in shape), np.dtype(dtype), load

    def __repr__(self) -> str:
        return f"Lazy(shape={self.shape}, dtype={self.dtype.name})"


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten(tree: Any, sep: str = "/") -> dict[str, Any]:
    """``{'a/b/c': leaf}`` for a nested mapping / pytree (flax ``FrozenDict``, nnx state)."""
    if isinstance(tree, Mapping) and not any(isinstance(v, Mapping) for v in tree.values()):
        return {str(k): v for k, v in tree.items()}
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "load"))
    out = {}
    for path, leaf in flat:
        keys = [_key(k) for k in path]
        if keys and keys[-1] == "value":  # nnx.Variable / State leaves
            keys = keys[:-1]
        out[sep.join(keys)] = leaf
    return out


def _load(x: Any) -> np.ndarray:
    return host_array(x)


def _lazy(x: Any, shape: tuple[int, ...], f: Callable[[np.ndarray], np.ndarray]) -> Lazy:
    return Lazy(shape, getattr(x, "dtype", np.float32), lambda: f(_load(x)))


def _strip(flat: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for k, v in flat.items():
        for p in prefixes:
            if k.startswith(p + "/"):
                k = k[len(p) + 1 :]
        out[k] = v
    return out


# -- flax (HF-style) -------------------------------------------------------------------


def from_flax(tree: Any) -> dict[str, Any]:
    """HF names and ``(out, in)`` layouts for an HF-style Flax parameter tree."""
    flat = _strip(flatten(tree), ("params",))
    out: dict[str, Any] = {}
    for path, x in flat.items():
        parts = path.split("/")
        last = parts[-1]
        name = (
            ".".join(parts[:-1] + ["weight"])
            if last in ("kernel", "embedding", "scale")
            else (".".join(parts))
        )
        if last == "kernel" and len(x.shape) == 2:
            out[name] = _lazy(x, tuple(x.shape[::-1]), lambda a: np.ascontiguousarray(a.T))
        elif last == "kernel":
            raise ShapeError(f"flax kernel {path!r} has shape {tuple(x.shape)}; expected 2-D")
        else:
            out[name] = x
    return out


# -- gemma library ---------------------------------------------------------------------


def _gemma_norm_names(model_type: str) -> dict[str, str]:
    if model_type == "gemma":
        return {
            "pre_attention_norm": "input_layernorm",
            "pre_ffw_norm": "post_attention_layernorm",
        }
    return {
        "pre_attention_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "pre_ffw_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }


def _heads_to_rows(w: np.ndarray) -> np.ndarray:
    """``(N, d, H)`` -> HF ``(N*H, d)``."""
    n, d, h = w.shape
    return np.ascontiguousarray(w.transpose(0, 2, 1).reshape(n * h, d))


def from_gemma(tree: Any, config: Mapping[str, Any]) -> dict[str, Any]:
    """HF names for a gemma-library parameter tree (see the module docs)."""
    flat = _strip(flatten(tree), ("params", "transformer"))
    mt = config["model_type"]
    norms = _gemma_norm_names(mt)
    d, ff = int(config["hidden_size"]), int(config["intermediate_size"])
    out: dict[str, Any] = {}
    for path, x in flat.items():
        path = re.sub(r"/(w|scale|input_embedding)$", "", path)
        if path == "embedder":
            out["model.embed_tokens.weight"] = x
            continue
        if path == "final_norm":
            out["model.norm.weight"] = x
            continue
        m = re.fullmatch(r"layer_(\d+)/(.+)", path)
        if m is None:
            raise QuantError(f"gemma tree entry {path!r} is not a Gemma transformer parameter")
        p, rest = f"model.layers.{m.group(1)}.", m.group(2)
        s = tuple(int(v) for v in x.shape)
        if rest in norms:
            out[p + norms[rest] + ".weight"] = x
        elif rest in ("attn/_query_norm", "attn/query_norm"):
            out[p + "self_attn.q_norm.weight"] = x
        elif rest in ("attn/_key_norm", "attn/key_norm"):
            out[p + "self_attn.k_norm.weight"] = x
        elif rest == "attn/q_einsum":
            out[p + "self_attn.q_proj.weight"] = _lazy(x, (s[0] * s[2], s[1]), _heads_to_rows)
        elif rest in ("attn/kv_einsum", "attn/qkv_einsum"):
            names = ("k_proj", "v_proj") if s[0] == 2 else ("q_proj", "k_proj", "v_proj")
            for i, nm in enumerate(names):
                out[p + f"self_attn.{nm}.weight"] = _lazy(
                    x, (s[1] * s[3], s[2]), lambda a, i=i: _heads_to_rows(a[i])
                )
        elif rest == "attn/attn_vec_einsum":
            out[p + "self_attn.o_proj.weight"] = _lazy(
                x, (s[2], s[0] * s[1]), lambda a: np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
            )
        elif rest == "mlp/gating_einsum":
            if s[1:] == (ff, d):
                f = lambda a, i: a[i]  # noqa: E731
            elif s[1:] == (d, ff):
                f = lambda a, i: np.ascontiguousarray(a[i].T)  # noqa: E731
            else:
                raise ShapeError(f"{path} has shape {s}; expected (2, {ff}, {d}) or (2, {d}, {ff})")
            out[p + "mlp.gate_proj.weight"] = _lazy(x, (ff, d), lambda a, f=f: f(a, 0))
            out[p + "mlp.up_proj.weight"] = _lazy(x, (ff, d), lambda a, f=f: f(a, 1))
        elif rest == "mlp/linear":
            out[p + "mlp.down_proj.weight"] = _lazy(x, (d, ff), lambda a: np.ascontiguousarray(a.T))
        else:
            raise QuantError(f"gemma tree entry {path!r} is not a Gemma transformer parameter")
    return out


# -- MaxText ---------------------------------------------------------------------------

# MaxText layer parameter (``_local``/``_global`` suffixes of Gemma 2's paired layers
# removed) -> HF name inside the layer
_MT_LAYER = {
    "pre_self_attention_layer_norm": "input_layernorm",
    "post_self_attention_layer_norm": "post_attention_layernorm",
    "pre_self_attention_norm": "input_layernorm",
    "post_self_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "self_attention/query_norm": "self_attn.q_norm",
    "self_attention/key_norm": "self_attn.k_norm",
    "self_attention/query": "self_attn.q_proj",
    "self_attention/key": "self_attn.k_proj",
    "self_attention/value": "self_attn.v_proj",
    "self_attention/out": "self_attn.o_proj",
    "mlp/wi_0": "mlp.gate_proj",
    "mlp/wi_1": "mlp.up_proj",
    "mlp/wo": "mlp.down_proj",
}


def _interleaved_to_halves(w: np.ndarray) -> np.ndarray:
    """Rotary pairs ``(x0, y0, x1, y1, ...)`` on the last axis -> HF's ``(x0, x1, .., y0, ..)``."""
    return np.concatenate([w[..., 0::2], w[..., 1::2]], axis=-1)


def _embedding_normalizer(config: Mapping[str, Any]) -> np.float32:
    d = int(config["hidden_size"])
    if config["model_type"].startswith("gemma3"):
        import ml_dtypes  # MaxText's Gemma 3 converter rounds sqrt(d) to bfloat16

        return np.float32(ml_dtypes.bfloat16(d**0.5))
    return np.float32(d**0.5)


def _maxtext_tensor(kind: str, a: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
    mt = config["model_type"]
    gemma = mt.startswith("gemma")
    if a.dtype.kind == "f" and a.dtype.itemsize < 4:
        a = a.astype(np.float32)
    if kind.endswith("norm") and gemma:
        return a - np.float32(1)
    if kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        # kernel (d, N, H) -> HF (N*H, d)
        if kind == "self_attn.q_proj" and not mt.startswith("gemma3"):
            a = a * np.float32(math.sqrt(head_dim(config)))
        if not gemma and kind in ("self_attn.q_proj", "self_attn.k_proj"):
            a = _interleaved_to_halves(a)
        return np.ascontiguousarray(a.reshape(a.shape[0], -1).T)
    if kind == "self_attn.o_proj":  # (N, H, d) -> (d, N*H)
        return np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)
    if kind.startswith("mlp."):  # (in, out) -> (out, in)
        return np.ascontiguousarray(a.T)
    return a


def _mt_shape(kind: str, s: tuple[int, ...]) -> tuple[int, ...]:
    if kind in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return (s[1] * s[2], s[0])
    if kind == "self_attn.o_proj":
        return (s[2], s[0] * s[1])
    if kind.startswith("mlp."):
        return (s[1], s[0])
    return s


class _Layer:
    """Layer ``i`` of a scanned parameter; only that slice leaves the device."""

    def __init__(self, x: Any, axis: int, i: int, shape: tuple[int, ...]):
        self.x, self.axis, self.i, self.shape = x, axis, i, shape
        self.dtype = getattr(x, "dtype", np.float32)

    def load(self) -> np.ndarray:
        if hasattr(self.x, "load") or getattr(self.x, "is_fully_addressable", True) is False:
            return np.take(host_array(self.x), self.i, axis=self.axis)
        return np.asarray(self.x[(slice(None),) * self.axis + (self.i,)])


def _mt_layer_param(rest: str) -> tuple[str, int, int]:
    """(HF name in the layer, layers per MaxText layer, offset) of a layer parameter path."""
    head, sep, tail = rest.partition("/")
    stride, offset = 1, 0
    for suffix, off in (("_local", 0), ("_global", 1)):  # Gemma 2: (local, global) pairs
        if head.endswith(suffix):
            head, stride, offset = head[: -len(suffix)], 2, off
    key = head + sep + tail
    if key not in _MT_LAYER:
        raise QuantError(f"MaxText decoder parameter {rest!r} is not supported")
    return _MT_LAYER[key], stride, offset


def from_maxtext(tree: Any, config: Mapping[str, Any], scan_axis: int = 1) -> dict[str, Any]:
    """HF names for a MaxText decoder parameter tree (see the module docs)."""
    flat = _strip(flatten(tree), ("params",))
    n_layer = int(config["num_hidden_layers"])
    gemma = config["model_type"].startswith("gemma")
    out: dict[str, Any] = {}
    for path, x in flat.items():
        path = re.sub(r"/(kernel|scale|embedding)$", "", path)
        s = tuple(int(v) for v in x.shape)
        if path == "token_embedder":
            if gemma:
                norm = _embedding_normalizer(config)
                out["model.embed_tokens.weight"] = _lazy(
                    x, s, lambda a, n=norm: np.asarray(a, np.float32) / n
                )
            else:
                out["model.embed_tokens.weight"] = x
            continue
        if path == "decoder/decoder_norm":
            out["model.norm.weight"] = (
                _lazy(x, s, lambda a: _maxtext_tensor("norm", a, config)) if gemma else x
            )
            continue
        if path == "decoder/logits_dense":
            out["lm_head.weight"] = _lazy(x, s[::-1], lambda a: np.ascontiguousarray(a.T))
            continue
        m = re.fullmatch(r"decoder/layers(?:_(\d+))?/(.+)", path)
        if m is None:
            raise QuantError(f"MaxText tree entry {path!r} is not a supported decoder parameter")
        kind, stride, offset = _mt_layer_param(m.group(2))
        if m.group(1) is not None:
            i = int(m.group(1)) * stride + offset
            out[f"model.layers.{i}.{kind}.weight"] = _lazy(
                x, _mt_shape(kind, s), lambda a, k=kind: _maxtext_tensor(k, a, config)
            )
            continue
        n_scan = n_layer // stride
        if len(s) <= scan_axis or s[scan_axis] != n_scan:
            raise ShapeError(
                f"MaxText scanned {path!r} has shape {s}; expected {n_scan} layers on axis "
                f"{scan_axis} (param_scan_axis)"
            )
        one = s[:scan_axis] + s[scan_axis + 1 :]
        for j in range(n_scan):
            layer = _Layer(x, scan_axis, j, one)
            out[f"model.layers.{j * stride + offset}.{kind}.weight"] = _lazy(
                layer, _mt_shape(kind, one), lambda a, k=kind: _maxtext_tensor(k, a, config)
            )
    return out


def to_hf(weights: Any, config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``weights`` from ``source`` as ``{hf_name: tensor}`` in HF's ``(out, in)`` layout."""
    if source == "hf":
        return flatten(weights, sep=".")
    if source == "flax":
        return from_flax(weights)
    if source == "gemma":
        return from_gemma(weights, config)
    if source == "maxtext":
        return from_maxtext(weights, config)
    raise QuantError(f"source {source!r} is not one of {', '.join(SOURCES)}")
