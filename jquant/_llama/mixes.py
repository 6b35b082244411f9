"""llama.cpp's quantization mixes: which GGML type each tensor of a model gets.

A port of ``llama_tensor_get_type`` (``src/llama-quant.cpp``, the llama.cpp version that
llama-cpp-python 0.3.36 vendors) for the ftypes jquant offers. :func:`tensor_type` is the
pure rule for one tensor; :func:`choose_types` walks a whole model in llama.cpp's tensor
order, keeping the per-category layer counters that the rules read (llama.cpp counts
``attn_v`` and ``ffn_down`` tensors in that order rather than parsing the layer number).

Shapes are numpy-order (outermost first); a row is the last axis (ggml's ``ne[0]``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gguf import GGMLQuantizationType as T

from .._errors import UnknownFormatError

__all__ = [
    "CONVERTER_FTYPES",
    "DEFAULT_FTYPE",
    "FTYPES",
    "LlamaModelFacts",
    "MixOptions",
    "allows_quantization",
    "choose_types",
    "ftype_base_type",
    "parse_ftype",
    "parse_ggml_type",
    "sort_tensor_names",
    "tensor_category",
    "tensor_type",
]

DEFAULT_FTYPE = "Q4_K_M"
"""The ftype ``convert_gguf`` and ``jquant quantize`` use for llama.cpp files by default."""

# convert_hf_to_gguf.py's --outtype names -> (llama_ftype id, the format of the matrices)
CONVERTER_FTYPES: dict[str, tuple[int, T]] = {
    "f32": (0, T.F32),
    "f16": (1, T.F16),
    "bf16": (32, T.BF16),
    "q8_0": (7, T.Q8_0),
}


# llama.cpp's ftype names (tools/quantize QUANT_OPTIONS) -> llama_ftype ids (llama.h),
# for the ftypes whose tensor types jquant can write.
FTYPES: dict[str, int] = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K_S": 11,
    "Q3_K_M": 12,
    "Q3_K_L": 13,
    "Q4_K_S": 14,
    "Q4_K_M": 15,
    "Q5_K_S": 16,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "Q2_K_S": 21,
    "IQ4_NL": 25,
    "IQ4_XS": 30,
    "BF16": 32,
}
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
_NAMES = {v: k for k, v in FTYPES.items()}

# llama_ftype_get_default_type
_BASE: dict[int, T] = {
    0: T.F32,
    1: T.F16,
    32: T.BF16,
    2: T.Q4_0,
    3: T.Q4_1,
    8: T.Q5_0,
    9: T.Q5_1,
    7: T.Q8_0,
    10: T.Q2_K,
    21: T.Q2_K,
    11: T.Q3_K,
    12: T.Q3_K,
    13: T.Q3_K,
    14: T.Q4_K,
    15: T.Q4_K,
    16: T.Q5_K,
    17: T.Q5_K,
    18: T.Q6_K,
    25: T.IQ4_NL,
    30: T.IQ4_XS,
}
Q2_K, Q2_K_S, Q3_K_S, Q3_K_M, Q3_K_L = 10, 21, 11, 12, 13
Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K = 14, 15, 16, 17, 18
Q4_0, Q5_0, IQ4_NL, IQ4_XS = 2, 8, 25, 30

# tensor_type_fallback: a type whose block doesn't divide the row -> the 32-block type
_FALLBACK: dict[T, T] = {
    T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}
_FLOATS = (T.F32, T.F16, T.BF16)
# substrings of names that are never quantized (tensor_allows_quantization)
_NEVER = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    *(
        f"time_mix_{s}.weight"
        for s in ("first w0 w1 w2 v0 v1 v2 a0 a1 a2 g1 g2 decay_w1 decay_w2 lerp_fused".split())
    ),
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_GLM5_NEXT = tuple(
    "hc_ indexer.attn_q_b indexer.attn_k indexer.proj indexer_compressor_gate "
    "indexer_compressor_ape ssm_f_a.weight ssm_f_b.weight ssm_g_a.weight ssm_g_b.weight "
    "ssm_beta.weight attn_kv_a_mqa.weight attn_k_b.weight attn_v_b.weight".split()
)
# tensor_get_category: (category, substring), first match wins after the exact names
_CATEGORIES = (
    ("attn_qkv", "attn_qkv.weight"),
    ("attn_kv_b", "attn_kv_b.weight"),
    ("attn_v", "attn_v.weight"),
    ("attn_k", "attn_k.weight"),
    ("attn_q", "attn_q.weight"),
    ("attn_output", "attn_output.weight"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)
_ATTN_V = ("attn_v", "attn_qkv", "attn_kv_b")
# architectures and layer counts llama.cpp calls "70B" (models/*.cpp load_hparams)
_70B_LAYERS = {"qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


def parse_ftype(name: str | int) -> int:
    """A llama-quantize ftype name (``"Q4_K_M"``, ``"q4_0"``, ``"Q4_K"``) or id -> its id.

    Raises:
        UnknownFormatError: naming the ftypes jquant writes.
    """
    if isinstance(name, int) and not isinstance(name, bool):
        if name in _NAMES:
            return name
    elif isinstance(name, str):
        key = name.strip().upper().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key in FTYPES:
            return FTYPES[key]
        if key.isdigit() and int(key) in _NAMES:
            return int(key)
    raise UnknownFormatError(
        f"unknown llama.cpp file type {name!r}; jquant writes {', '.join(FTYPES)} "
        f"(and the aliases Q3_K, Q4_K, Q5_K for the _M mixes)"
    )


def ftype_name(ftype: int) -> str:
    """The llama-quantize name of an ftype id (``15`` -> ``"Q4_K_M"``)."""
    return _NAMES[ftype]


def ftype_base_type(ftype: int) -> T:
    """The type most tensors of an ftype get (``llama_ftype_get_default_type``)."""
    return _BASE[ftype]


def parse_ggml_type(name: str | int | T) -> T:
    """A GGML type name as llama-quantize takes it (``"q8_0"``, ``"Q6_K"``) -> the type."""
    if isinstance(name, T):
        return name
    if isinstance(name, int) and not isinstance(name, bool):
        return T(name)
    key = str(name).strip().upper()
    if key in T.__members__:
        return T[key]
    raise UnknownFormatError(
        f"unknown GGML type {name!r}; expected one of {', '.join(T.__members__)}"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaModelFacts:
    """What the mixes read from a model's metadata (llama.cpp's ``hparams``).

    Attributes:
        arch: ``general.architecture`` (``"llama"``, ``"bert"``, ``"falcon"``...).
        n_layer: ``{arch}.block_count``.
        n_head, n_head_kv: attention heads and key/value heads of layer 0.
        n_expert: ``{arch}.expert_count`` (0 without experts).
        is_70b: llama.cpp's ``LLM_TYPE_70B`` (80-layer llama with GQA, and a few others).
    """

    arch: str
    n_layer: int
    n_head: int = 0
    n_head_kv: int = 0
    n_expert: int = 0
    is_70b: bool = False

    @property
    def n_gqa(self) -> int:
        """Query heads per key/value head (0 when unknown)."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> LlamaModelFacts:
        """Read the facts from a llama.cpp GGUF's metadata (``{arch}.*`` keys)."""
        arch = str(meta.get("general.architecture", ""))

        def first(v: Any, default: int = 0) -> int:
            if isinstance(v, (list, tuple)):
                v = v[0] if v else default
            return int(v) if v is not None else default

        n_layer = first(meta.get(f"{arch}.block_count"), 0)
        n_head = first(meta.get(f"{arch}.attention.head_count"), 0)
        n_head_kv = first(meta.get(f"{arch}.attention.head_count_kv"), n_head)
        n_layer_main = n_layer - first(meta.get(f"{arch}.nextn_predict_layers"), 0)
        if arch == "llama":
            is_70b = n_layer_main == 80 and n_head != n_head_kv
        else:
            is_70b = _70B_LAYERS.get(arch) == n_layer_main
        return cls(
            arch=arch,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_expert=first(meta.get(f"{arch}.expert_count"), 0),
            is_70b=is_70b,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixOptions:
    """llama-quantize's options that change the mix.

    Attributes:
        pure: ``--pure``: every quantized tensor gets the ftype's base type.
        tensor_types: ``--tensor-type REGEX=TYPE`` pairs, first match (``re.search``) wins.
        output_tensor_type: ``--output-tensor-type``.
        token_embedding_type: ``--token-embedding-type``.
        quantize_output_tensor: False for ``--leave-output-tensor``.
        has_imatrix: an importance matrix is given (a few rules depend on it).
    """

    pure: bool = False
    tensor_types: tuple[tuple[str, T], ...] = ()
    output_tensor_type: T | None = None
    token_embedding_type: T | None = None
    quantize_output_tensor: bool = True
    has_imatrix: bool = False


def tensor_category(name: str) -> str:
    """llama.cpp's broad category of a tensor name (``tensor_get_category``)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for cat, sub in _CATEGORIES:
        if sub in name:
            return cat
    return "other"


def _ndims(shape: Sequence[int]) -> int:
    """ggml_n_dims: dimensions up to the last one above 1 (numpy order: leading 1s drop)."""
    ne = list(reversed(shape)) or [1]
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def allows_quantization(
    name: str, shape: Sequence[int], arch: str, *, quantize_output_tensor: bool = True
) -> bool:
    """Whether llama.cpp may change this tensor's type at all (``tensor_allows_quantization``).

    Only tensors of two or more dimensions named ``*weight`` qualify, minus norms,
    position and token-type embeddings, MoE routers and a list of small tensors.

    Example:
        >>> from jquant._llama.mixes import allows_quantization
        >>> allows_quantization("blk.0.attn_q.weight", (64, 64), "llama")
        True
        >>> allows_quantization("position_embd.weight", (512, 64), "bert")
        False
    """
    if _ndims(shape) < 2 or not name.endswith("weight"):
        return False
    if not quantize_output_tensor and name == "output.weight":
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    if any(s in name for s in _NEVER):
        return False
    return not (arch == "glm5-next" and any(s in name for s in _NEVER_GLM5_NEXT))


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or _cmod(i - n // 8, 3) == 2


def _cmod(a: int, b: int) -> int:
    """C's ``%`` (truncates toward zero)."""
    r = abs(a) % b
    return -r if a < 0 else r


def _blck(t: T) -> int:
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[t][0]


def _fallback(t: T, row: int) -> T:
    """tensor_type_fallback: a 32-block type, or F16, when the row doesn't fit the block."""
    if row % _blck(t) == 0:
        return t
    if t in _FALLBACK:
        out = _FALLBACK[t]
    elif _blck(t) <= 32:
        out = t
    else:
        raise UnknownFormatError(f"no tensor type fallback is defined for type {t.name}")
    return out if row % _blck(out) == 0 else T.F16


def _mix(  # llama_tensor_get_type_impl for the supported ftypes
    ftype: int,
    new: T,
    name: str,
    shape: Sequence[int],
    cat: str,
    *,
    layer: int,
    n_attn_v: int,
    facts: LlamaModelFacts,
    options: MixOptions,
    tied: bool,
) -> T:
    arch = facts.arch
    falcon = arch == "falcon"
    if arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if new not in _FLOATS:
            return T.Q8_0
    n_layer = facts.n_layer
    if facts.n_expert > 1 and cat in ("ffn_down", "ffn_gate", "ffn_up"):
        m = re.match(r"blk\.(-?\d+)\.", name)  # sscanf("blk.%d.")
        if m is None:
            raise ValueError(f"Failed to determine layer for tensor {name}")
        layer = int(m.group(1))
        if not 0 <= layer < n_layer:
            raise ValueError(f"Bad layer {layer} for tensor {name}. Must be in [0, {n_layer})")
    if cat == "output" or (tied and cat == "token_embd"):
        if options.output_tensor_type is not None:
            return options.output_tensor_type
        if falcon or shape[-1] % _blck(new):
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if cat == "token_embd":
        return options.token_embedding_type or new
    gqa4 = facts.n_gqa >= 4
    if cat in _ATTN_V:
        if ftype == Q2_K:
            new = T.Q4_K if gqa4 else T.Q3_K
        elif ftype == Q2_K_S and gqa4:
            new = T.Q4_K
        elif ftype == Q3_K_M:
            new = T.Q5_K if layer < 2 else T.Q4_K
        elif ftype == Q3_K_L:
            new = T.Q5_K
        elif ftype in (IQ4_NL, IQ4_XS) and gqa4:
            new = T.Q5_K
        elif ftype in (Q4_K_M, Q5_K_M) and _use_more_bits(layer, n_attn_v):
            new = T.Q6_K
        elif ftype == Q4_K_S and layer < 4:
            new = T.Q5_K
        if facts.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if facts.n_expert == 8:
            new = T.Q8_0
        return new
    if cat == "attn_k":
        return T.Q8_0 if facts.n_expert == 8 else new
    if cat == "ffn_down":
        i, n = layer, n_layer
        if ftype == Q2_K:
            new = T.Q3_K
        elif ftype == Q2_K_S:
            if i < n // 8:
                new = T.Q4_K
        elif ftype == Q3_K_M:
            new = (
                T.Q5_K if i < n // 16 else T.Q4_K if not falcon or _use_more_bits(i, n) else T.Q3_K
            )
        elif ftype == Q3_K_L:
            new = T.Q4_K if falcon else T.Q5_K
        elif ftype == Q4_K_M:
            if falcon:
                new = T.Q6_K if i < n // 16 else T.Q5_K if _use_more_bits(i, n) else T.Q4_K
            elif _use_more_bits(i, n):
                new = T.Q6_K
        elif i < n // 8 and ftype in (IQ4_NL, IQ4_XS) and not options.has_imatrix:
            new = T.Q5_K
        elif ftype == Q5_K_M and _use_more_bits(i, n):
            new = T.Q6_K
        elif ftype == Q4_K_S and not falcon and i < n // 8:
            new = T.Q5_K
        elif ftype in (Q4_0, Q5_0) and options.has_imatrix and i < n // 8:
            new = T.Q4_1 if ftype == Q4_0 else T.Q5_1
        return new
    if cat == "attn_output":
        if not falcon:
            if facts.n_expert == 8:
                if ftype in (Q2_K, Q3_K_S, Q3_K_M, IQ4_NL, Q4_K_S, Q4_K_M, IQ4_XS):
                    new = T.Q5_K
            else:
                new = {Q2_K: T.Q3_K, Q3_K_M: T.Q4_K, Q3_K_L: T.Q5_K}.get(ftype, new)
        elif ftype == Q3_K_L:
            new = T.Q4_K
        return new
    return new


def tensor_type(
    ftype: int,
    name: str,
    shape: Sequence[int],
    current: T,
    *,
    facts: LlamaModelFacts,
    layer: int = 0,
    n_attn_v: int = 0,
    tied: bool = False,
    options: MixOptions = MixOptions(),
) -> T:
    """The GGML type llama.cpp gives one tensor (``llama_tensor_get_type``): a pure function.

    Args:
        ftype: a llama_ftype id (see :func:`parse_ftype`).
        name: the GGUF tensor name (``"blk.3.attn_v.weight"``).
        shape: numpy-order shape; the row (``ne[0]``) is the last axis.
        current: the tensor's type in the input file (kept when it may not be quantized).
        facts: the model's architecture facts.
        layer: how many tensors of this category (``attn_v``-like, ``ffn_down``, ...) came
          before it in llama.cpp's order (normally the layer number).
        n_attn_v: how many ``attn_v``-like tensors the model has.
        tied: the model has no ``output.weight`` (``token_embd`` is then the output).
        options: llama-quantize's options.

    Returns:
        A ``gguf.GGMLQuantizationType``.

    Example:
        >>> from jquant._llama.mixes import LlamaModelFacts, parse_ftype, tensor_type
        >>> facts = LlamaModelFacts(arch="llama", n_layer=8, n_head=8, n_head_kv=2)
        >>> q4km = parse_ftype("Q4_K_M")
        >>> tensor_type(q4km, "blk.0.ffn_down.weight", (256, 768), "F16", facts=facts).name
        'Q6_K'
        >>> tensor_type(q4km, "blk.2.ffn_down.weight", (256, 768), "F16", facts=facts,
        ...             layer=2).name
        'Q4_K'
        >>> tensor_type(q4km, "blk.2.ffn_down.weight", (256, 96), "F16", facts=facts,
        ...             layer=2).name
        'Q5_0'
    """
    current = parse_ggml_type(current)
    if not allows_quantization(
        name, shape, facts.arch, quantize_output_tensor=options.quantize_output_tensor
    ):
        return current
    cat = tensor_category(name)
    if options.token_embedding_type is not None and cat == "token_embd":
        named = name == "per_layer_token_embd.weight" and any(
            re.search(p, name) for p, _ in options.tensor_types
        )
        if not named:
            return options.token_embedding_type
    if options.output_tensor_type is not None and cat == "output":
        return options.output_tensor_type
    new = _BASE[ftype]
    if new in _FLOATS:
        return new
    manual = False
    for pattern, qtype in options.tensor_types:
        if re.search(pattern, name):
            new, manual = qtype, True
            break
    if not manual and not options.pure:
        new = _mix(
            ftype,
            new,
            name,
            shape,
            cat,
            layer=layer,
            n_attn_v=n_attn_v,
            facts=facts,
            options=options,
            tied=tied,
        )
    return _fallback(new, shape[-1] if shape else 1)


def _layer_key(name: str) -> tuple[int, str]:
    m = re.match(r"blk\.(-?\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def sort_tensor_names(names: Sequence[str]) -> list[str]:
    """llama.cpp's tensor order (``weight_name_comparer``): by ``blk.N``, then by name.

    Tensors outside the blocks (``token_embd``, ``output``...) come first. This is the
    order llama-quantize writes, and the order its layer counters run in.
    """
    return sorted(names, key=_layer_key)


def choose_types(
    ftype: int | str,
    tensors: Sequence[tuple[str, Sequence[int], Any]],
    facts: LlamaModelFacts,
    options: MixOptions = MixOptions(),
) -> dict[str, T]:
    """The type of every tensor of a model, as llama-quantize picks them.

    Args:
        ftype: an ftype id or name (``"Q4_K_M"``).
        tensors: ``(name, numpy shape, current type)`` for every tensor of the model.
        facts: the model's architecture facts (:meth:`LlamaModelFacts.from_metadata`).
        options: llama-quantize's options.

    Returns:
        ``{name: gguf.GGMLQuantizationType}``.

    Example:
        >>> from jquant._llama.mixes import LlamaModelFacts, choose_types
        >>> facts = LlamaModelFacts(arch="llama", n_layer=1, n_head=4, n_head_kv=4)
        >>> types = choose_types("Q4_0", [("token_embd.weight", (100, 64), "F16"),
        ...                               ("blk.0.attn_v.weight", (64, 64), "F16"),
        ...                               ("blk.0.attn_norm.weight", (64,), "F32")], facts)
        >>> {k: v.name for k, v in types.items()}
        {'token_embd.weight': 'Q8_0', 'blk.0.attn_norm.weight': 'F32', 'blk.0.attn_v.weight': 'Q4_0'}
    """
    ftype = parse_ftype(ftype)
    by_name = {n: (tuple(s), t) for n, s, t in tensors}
    order = sort_tensor_names(list(by_name))
    cats = {n: tensor_category(n) for n in order}
    n_attn_v = sum(c in _ATTN_V for c in cats.values())
    tied = "output.weight" not in by_name
    counters = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}
    out: dict[str, T] = {}
    for n in order:
        shape, cur = by_name[n]
        cat = cats[n]
        key = "attn_v" if cat in _ATTN_V else cat
        out[n] = tensor_type(
            ftype,
            n,
            shape,
            cur,
            facts=facts,
            layer=counters.get(key, 0),
            n_attn_v=n_attn_v,
            tied=tied,
            options=options,
        )
        # llama.cpp advances a counter only where its rule ran (not for manual/pure tensors)
        if key in counters and _counts(ftype, n, shape, cur, facts, options):
            counters[key] += 1
    return out


def _counts(ftype, name, shape, cur, facts, options) -> bool:
    if not allows_quantization(
        name, shape, facts.arch, quantize_output_tensor=options.quantize_output_tensor
    ):
        return False
    if _BASE[ftype] in _FLOATS or options.pure:
        return False
    cat = tensor_category(name)
    if cat == "token_embd" and options.token_embedding_type is not None:
        return False
    return not any(re.search(p, name) for p, _ in options.tensor_types)
