"""GGUF files: :func:`save_gguf`, :func:`load_gguf` and :func:`inspect_gguf`.

What a jquant GGUF file holds
-----------------------------
* One GGUF tensor per array leaf of the pytree, in ``jax.tree_util`` leaf order.
  Quantized leaves (:class:`QuantizedTensor`) are written as their GGML bytes
  (``QuantizedTensor.to_bytes()``) with their GGML type id, through
  ``gguf.GGUFWriter``, so ``gguf.GGUFReader`` and llama.cpp read them. Dimensions are
  stored innermost-first, as GGUF requires (a numpy ``(rows, cols)`` tensor has GGUF
  dims ``[cols, rows]``). Unquantized leaves are stored as F32, F16, BF16, F64 or
  I8/I16/I32/I64 by dtype (unsigned and bool arrays as the signed type of the same
  width, their dtype restored on load).
* Metadata under the ``jquant.`` key namespace: ``jquant.format_version``;
  ``jquant.tensors``, JSON with each tensor's pytree path, GGUF name, kind, original
  dtype and logical shape; ``jquant.tree``, JSON of the pytree skeleton (dicts, lists,
  tuples, ``None``, Python scalars and strings inline); ``jquant.checksum``, the CRC32
  of those two strings; ``jquant.crc32``, the CRC32 of every tensor's bytes. So a
  corrupted file is reported, never loaded as a silently different tensor. Files with
  block-quantized tensors also get ``general.quantization_version = 2`` (ggml's
  current block layouts), as llama.cpp's converters write.

Tensor names
------------
A leaf's GGUF name is its '/'-joined pytree path with ``/`` replaced by ``.``
(``params/Dense_0/kernel`` -> ``params.Dense_0.kernel``; a lone array is ``tensor``).
GGUF names are at most 63 bytes (ggml's ``GGML_MAX_NAME`` is 64 with the NUL), so a
longer name, or one that collides with an earlier one, becomes
``<8 hex digits of sha1(path)>~<the last 54 bytes of the name>``. The exact path is
kept in ``jquant.tensors``, so the mapping always round-trips: :func:`load_gguf`
returns the original structure and paths whatever the names are.

Shapes GGML can't hold
----------------------
* Rows whose length is not a multiple of 32 (padded in memory by jquant): GGML has no
  way to say "this Q4_0 row holds 40 values", and a padded 64-wide tensor would be
  read by llama.cpp as 64 columns. Such a tensor is written **dequantized**, as F32
  (F16 or BF16 when that was its original dtype), with a ``UserWarning`` naming it; it
  loads back as a ``QuantizedTensor`` of that float format whose values are exactly
  ``dequantize_tensor`` of the original. Pick a block-aligned shape (or a rule keeping
  the tensor unquantized) to avoid it.
* Scalars are stored with GGUF shape ``[1]``; tensors of more than 4 dimensions (the
  GGML limit) with their leading axes merged. The logical shape comes back on load.

Files not written by jquant
---------------------------
Any GGUF v2/v3 file loads, as a flat ``{gguf_name: leaf}`` dict. Tensors in a format
jquant has (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, F32) stay quantized as
``QuantizedTensor``; integer and F64 tensors come back as arrays; other formats
(k-quants, i-quants, ...) that ``gguf.quants`` can decode come back dequantized to
float32 with one warning listing them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from .._core.quantize import dequantize_tensor, quantize_tensor
from .._core.tensor import QuantizedTensor
from .._errors import FileFormatError, QuantError, ShapeError
from .._formats.quant_type import QuantType
from .._formats.registry import float_format, restored_dtype
from .._model.rules import is_array, path_to_str
from .gguf_file import (
    ARRAY_TYPES,
    FORMAT_VERSION,
    K_CHECKSUM,
    K_CRC,
    K_TENSORS,
    K_TREE,
    K_VERSION,
    MAX_NAME_BYTES,
    RAW_TYPES,
    Entry,
    GGUFInfo,
    GGUFTensorInfo,
    ggml_sizes,
    gguf_name,
    read_header,
    stored_dtype,
    stored_shape,
    write_gguf,
)

__all__ = [
    "MAX_NAME_BYTES",
    "Entry",
    "GGUFInfo",
    "GGUFTensorInfo",
    "decode_tensor",
    "gguf_name",
    "inspect_gguf",
    "jquant_entries",
    "load_gguf",
    "save_gguf",
    "write_gguf",
]


# -- writing ---------------------------------------------------------------------------


def array_entry(path: str, x: Any) -> Entry:
    """An :class:`Entry` storing the array ``x`` unquantized."""
    dtype = np.dtype(x.dtype)
    if dtype.name not in ARRAY_TYPES:
        raise QuantError(
            f"tensor {path!r} has dtype {dtype.name}, which GGUF can't store; cast it to a "
            f"float or integer dtype first"
        )
    ggml, store = ARRAY_TYPES[dtype.name]

    def produce():
        a = np.asarray(x)
        if dtype == np.bool_:
            a = a.astype(np.uint8)
        a = np.ascontiguousarray(a).reshape(-1).view(np.dtype(store).newbyteorder("="))
        return a.astype(np.dtype(store), copy=False).view(np.uint8)

    return Entry(path, "a", dtype.name, tuple(int(s) for s in x.shape), ggml, produce)


def storage_format(qtype: QuantType, row: int, dtype: Any) -> QuantType:
    """The format a row of ``row`` values of ``qtype`` is written in to a GGUF file.

    GGML can't say "this row holds 40 values of a padded block": rows that aren't a
    multiple of the block go in the record's llama.cpp fallback when its blocks fit,
    else in the float format of ``dtype`` (F16, BF16, else F32).
    """
    spec = qtype.spec
    if row % spec.block_size == 0:
        return qtype
    fallback = spec.fallback
    if fallback is not None and row % fallback.block_size == 0:
        return fallback
    return float_format(dtype)


def quantized_entry(path: str, q: QuantizedTensor) -> tuple[Entry, bool]:
    """An :class:`Entry` for a QuantizedTensor and whether it had to be re-encoded."""
    row = q.shape[-1] if q.shape else 1
    store = storage_format(q.qtype, row, q.dtype)
    if store is not q.qtype:
        # the values as dequantized, re-encoded in ``store`` (exactly, for a float format)
        def produce():
            vals = dequantize_tensor(q, np.float32)
            return quantize_tensor(vals, store, check=False).to_bytes().reshape(-1)

        return Entry(path, "q", q.dtype.name, q.shape, store.ggml_type, produce), True
    produce = q.to_bytes if q.nbytes else (lambda: np.zeros(0, np.uint8))
    return Entry(path, "q", q.dtype.name, q.shape, q.qtype.ggml_type, produce), False


def _flatten(tree: Any):
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, QuantizedTensor)
    )
    paths = [path_to_str(p) for p, _ in flat]
    leaves = [v for _, v in flat]
    index_tree = jax.tree_util.tree_unflatten(treedef, list(range(len(leaves))))
    return paths, leaves, treedef, index_tree


def _skeleton(node: Any, leaf: Callable[[int], Any]) -> Any:
    """JSON for the structure of ``node``, a pytree whose leaves are leaf indices."""
    if type(node) is int:
        return leaf(node)
    if node is None:
        return None
    if type(node) is dict:
        out = []
        for k, v in node.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise QuantError(
                    f"dict key {k!r} ({type(k).__name__}) can't be stored in GGUF metadata; "
                    f"use str or int keys"
                )
            out.append([k, _skeleton(v, leaf)])
        return {"d": out}
    if type(node) in (list, tuple):
        return {"l" if type(node) is list else "t": [_skeleton(v, leaf) for v in node]}
    flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda y: y is not node)
    return {
        "c": type(node).__qualname__,
        "k": [[path_to_str(p), _skeleton(v, leaf)] for p, v in flat],
    }


MAX_TREE_DEPTH = 100  # nesting of a saved pytree; deeper jquant.tree metadata is refused


def _rebuild(skel: Any, leaf: Callable[[Any], Any], depth: int = 0) -> Any:
    if skel is None:
        return None
    if not isinstance(skel, dict) or len(skel) not in (1, 2):
        raise FileFormatError(f"bad jquant.tree node {str(skel)[:80]!r}")
    if "i" in skel or "v" in skel:
        return leaf(skel)
    if depth >= MAX_TREE_DEPTH:
        raise FileFormatError(f"jquant.tree is nested more than {MAX_TREE_DEPTH} levels deep")
    if "d" in skel:
        return {k: _rebuild(v, leaf, depth + 1) for k, v in skel["d"]}
    if "l" in skel:
        return [_rebuild(v, leaf, depth + 1) for v in skel["l"]]
    if "t" in skel:
        return tuple(_rebuild(v, leaf, depth + 1) for v in skel["t"])
    if "c" in skel:
        return {k: _rebuild(v, leaf, depth + 1) for k, v in skel["k"]}
    raise FileFormatError(f"bad jquant.tree node {str(skel)[:80]!r}")


def save_gguf(
    path: str | os.PathLike,
    params: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write a pytree (quantized or not) to a GGUF file that llama.cpp and gguf-py read.

    Quantized leaves are written as their GGML bytes, other array leaves as F32/F16/
    BF16/F64/I8..I64 by dtype; Python scalars and strings are kept in the metadata.
    The write is atomic (temporary file in the same folder, fsync, rename): on any
    failure no partial file is left and an existing file is untouched. See the module
    documentation for the tensor-name mapping, the ``jquant.`` metadata keys and what
    happens to rows whose length is not a multiple of 32.

    Args:
        path: the file to write (conventionally ``*.gguf``); replaced if it exists.
        params: any pytree of :class:`QuantizedTensor`, arrays and Python scalars
          (e.g. the output of :func:`quantize_model`).
        metadata: extra GGUF key/values, e.g. ``{"general.name": "my-model"}``. Python
          ints are stored as UINT32 (INT64 when out of range), floats as FLOAT32, numpy
          scalars with their own type, lists as arrays; ``(value, gguf.GGUFValueType)``
          pairs choose the type. ``general.architecture`` defaults to ``"jquant"``.
        progress: called as ``progress(bytes_done, bytes_total, path)`` after each tensor.

    Returns:
        The path written.

    Raises:
        FileWriteError: the file can't be written (disk full, permission denied, missing
          folder); nothing is left behind.
        QuantError: a leaf or metadata value GGUF can't hold.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, jquant
        >>> params = {"dense": {"kernel": jnp.ones((64, 128)), "bias": jnp.zeros(128)}}
        >>> qp = jquant.quantize_model(params, "q4_0")
        >>> path = os.path.join(tempfile.mkdtemp(), "model.gguf")
        >>> _ = jquant.save_gguf(path, qp, metadata={"general.name": "demo"})
        >>> back = jquant.load_gguf(path)
        >>> back["dense"]["kernel"].qtype.name, back["dense"]["bias"].shape
        ('Q4_0', (128,))
        >>> import gguf
        >>> [(t.name, t.tensor_type.name, t.shape.tolist()) for t in gguf.GGUFReader(path).tensors]
        [('dense.bias', 'F32', [128]), ('dense.kernel', 'Q4_0', [128, 64])]
    """
    paths, leaves, _, index_tree = _flatten(params)
    entries: list[Entry] = []
    refs: dict[int, Any] = {}
    ragged = []
    for i, (p, x) in enumerate(zip(paths, leaves, strict=True)):
        if isinstance(x, QuantizedTensor):
            e, was_ragged = quantized_entry(p, x)
            if was_ragged:
                ragged.append(f"{p} {x.shape} {x.qtype.name}")
        elif is_array(x):
            e = array_entry(p, x)
        elif isinstance(x, (bool, int, float, str)):
            refs[i] = {"v": x}
            continue
        else:
            raise QuantError(
                f"leaf {p!r} is a {type(x).__name__}, which GGUF can't store; give arrays, "
                f"QuantizedTensors, Python numbers or strings (or drop it from the pytree)"
            )
        refs[i] = {"i": len(entries)}
        entries.append(e)
    if ragged:
        warnings.warn(
            f"{len(ragged)} tensor(s) have rows that are not a multiple of 32 values, which "
            f"GGML block formats can't describe; they are written dequantized (F32, or "
            f"F16/BF16 for tensors of that dtype) so llama.cpp reads them correctly: "
            f"{'; '.join(ragged[:10])}{' ...' if len(ragged) > 10 else ''}",
            UserWarning,
            stacklevel=2,
        )
    tree = _skeleton(index_tree, lambda i: refs[i])
    return write_gguf(path, entries, tree=tree, metadata=metadata, progress=progress)


# -- reading ---------------------------------------------------------------------------


def inspect_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Read a GGUF file's header: version, metadata and tensor table, without the data.

    Raises:
        FileFormatError: not a GGUF file, or a corrupt or truncated one.
        OSError: the file can't be opened (missing, a directory, permissions).

    Example:
        >>> import os, tempfile, jax.numpy as jnp, jquant
        >>> path = os.path.join(tempfile.mkdtemp(), "m.gguf")
        >>> _ = jquant.save_gguf(path, {"w": jquant.quantize_tensor(jnp.ones((8, 64)), "q8_0")})
        >>> info = jquant.inspect_gguf(path)
        >>> [(t.name, t.type_name, t.shape, t.nbytes) for t in info.tensors]
        [('w', 'Q8_0', (8, 64), 544)]
        >>> info.metadata["general.architecture"], info.is_jquant
        ('jquant', True)
    """
    info, _ = read_header(path)
    return info


def jquant_entries(info: GGUFInfo) -> tuple[list[dict[str, Any]], Any] | None:
    """Validated (tensor entries, tree) of a jquant file; ``None`` for other files."""
    if not info.is_jquant:
        return None
    md = info.metadata
    bad = f"{info.path}: corrupt jquant metadata"
    version = md.get(K_VERSION)
    if not isinstance(version, int):
        raise FileFormatError(f"{bad}: {K_VERSION} is missing")
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{info.path} was written by a newer jquant (format {version}); upgrade jquant"
        )
    tj, trj, checksum = md.get(K_TENSORS), md.get(K_TREE), md.get(K_CHECKSUM)
    if not (isinstance(tj, str) and isinstance(trj, str) and isinstance(checksum, int)):
        raise FileFormatError(f"{bad}: {K_TENSORS}, {K_TREE} or {K_CHECKSUM} is missing")
    if zlib.crc32((tj + "\n" + trj).encode()) != checksum:
        raise FileFormatError(f"{bad}: checksum mismatch (the file was modified or damaged)")
    try:
        entries, tree = strict_json(tj), strict_json(trj)
    except (ValueError, RecursionError) as e:
        raise FileFormatError(f"{bad}: {e}") from None
    if not isinstance(entries, list) or len(entries) != len(info.tensors):
        raise FileFormatError(
            f"{bad}: {K_TENSORS} doesn't list the file's {len(info.tensors)} tensors"
        )
    crcs = md.get(K_CRC, [])
    if entries and (not isinstance(crcs, list) or len(crcs) != len(entries)):
        raise FileFormatError(f"{bad}: {K_CRC} doesn't match the tensor count")
    for e, t in zip(entries, info.tensors, strict=True):
        if not _entry_matches(e, t):
            raise FileFormatError(
                f"{bad}: the entry for tensor {t.name!r} doesn't match its header"
            )
        stored_dtype(e["dtype"])
        if e["kind"] == "q" and t.qtype is None:
            raise FileFormatError(
                f"{bad}: tensor {t.name!r} is marked quantized but is {t.type_name}"
            )
    return entries, tree


def strict_json(text: str) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity`` and (as ValueError) deep nesting."""

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, parse_constant=constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _is_int(v: Any) -> bool:
    return type(v) is int


def _entry_matches(e: Any, t: GGUFTensorInfo) -> bool:
    """True if a ``jquant.tensors`` record is well-formed and agrees with the header."""
    if not isinstance(e, dict):
        return False
    shape = e.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) <= 64
        and all(_is_int(s) and 0 <= s < 2**63 for s in shape)
    ):
        return False
    shape = tuple(shape)
    return (
        e.get("name") == t.name
        and _is_int(e.get("type"))
        and e["type"] == t.ggml_type
        and e.get("kind") in ("q", "a")
        and isinstance(e.get("path"), str)
        and isinstance(e.get("dtype"), str)
        and e["dtype"] in ARRAY_TYPES
        and math.prod(shape) == t.size
        and stored_shape(shape) == t.shape
    )


def _place(x: Any, device: Any, path: str, shape: tuple[int, ...]) -> Any:
    if device is None:
        return x
    target = device(path, shape) if callable(device) else device
    if target is None:
        return x
    return jax.device_put(x, target)


def _to_jax(a: np.ndarray) -> Any:
    if a.dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        return a  # keep 64-bit arrays exact rather than truncating them to 32 bits
    return jnp.asarray(a)


def load_gguf(
    path: str | os.PathLike,
    *,
    like: Any = None,
    device: Any = None,
    verify: bool = True,
) -> Any:
    """Load a GGUF file, keeping quantized tensors quantized.

    A file written by :func:`save_gguf` comes back as the pytree that was saved: same
    structure (dicts, lists, tuples; other node types come back as dicts unless
    ``like`` is given), paths, shapes and dtypes, with :class:`QuantizedTensor` leaves
    built straight from the stored bytes (no dequantize). Any other GGUF file (e.g. from
    llama.cpp) comes back as a flat ``{gguf_name: leaf}`` dict: Q8_0/Q4_0/Q4_1/Q5_0/
    Q5_1/F16/BF16/F32 tensors as QuantizedTensor, integer and F64 tensors as arrays,
    other formats that ``gguf.quants`` can decode dequantized to float32 with a warning
    listing them.

    Args:
        path: the file.
        like: a pytree with the structure saved (e.g. the model's params or an Equinox
          module); the loaded leaves are put into its structure, after checking that
          the paths match.
        device: where to put the tensors: a ``jax.Device``, a ``jax.sharding.Sharding``
          (e.g. ``NamedSharding(mesh, P(None, "x"))``, applied to every leaf), or a
          function ``(path, shape) -> Device | Sharding | None``. A sharding of a
          QuantizedTensor shards its packed arrays like the logical tensor (a split last
          axis splits the blocks). ``None``: JAX's default device.
        verify: check the CRC32 of every tensor of a jquant file (on by default).

    Raises:
        FileFormatError: not a GGUF file, or a corrupt, truncated or inconsistent one.
        OSError: the file can't be opened.
        ShapeError: ``like`` has a different structure than the file.

    Example:
        >>> import os, tempfile, jax.numpy as jnp, jquant
        >>> qp = {"layers": [jquant.quantize_tensor(jnp.ones((4, 64)), "q5_1")], "step": 3}
        >>> path = os.path.join(tempfile.mkdtemp(), "m.gguf")
        >>> _ = jquant.save_gguf(path, qp)
        >>> back = jquant.load_gguf(path, device=jax.devices()[0])
        >>> back["step"], back["layers"][0].qtype.name, back["layers"][0].shape
        (3, 'Q5_1', (4, 64))
    """
    info, mm = read_header(path)
    parsed = jquant_entries(info)  # validates every field it reads
    if parsed is None:
        return _load_foreign(info, mm, device)
    entries, tree = parsed
    crcs = info.metadata.get(K_CRC, [])
    tensors = []
    for k, (e, t) in enumerate(zip(entries, info.tensors, strict=True)):
        data = mm[t.offset : t.offset + t.nbytes]
        if verify and zlib.crc32(data) != crcs[k]:
            raise FileFormatError(
                f"{info.path}: tensor {e['path']!r} is corrupt (CRC32 mismatch); the file was "
                f"damaged after writing"
            )
        x = decode_tensor(info, mm, t, e)
        tensors.append(_place(x, device, e["path"], tuple(x.shape)))

    def leaf(ref):
        if "v" in ref:
            return ref["v"]
        i = ref["i"]
        if not (_is_int(i) and 0 <= i < len(tensors)):
            raise FileFormatError(f"{info.path}: corrupt {K_TREE} (leaf index {i!r})")
        return tensors[i]

    if like is not None:
        paths, leaves, treedef, _ = _flatten(like)
        flat = []
        try:
            _collect(tree, flat, leaf)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise FileFormatError(f"{info.path}: corrupt {K_TREE} ({e})") from None
        diff = None
        if len(flat) != len(paths):
            diff = f"{len(flat)} leaves in the file vs {len(paths)} in like="
        else:
            for (ref, _), p in zip(flat, paths, strict=True):
                if "i" in ref and entries[ref["i"]]["path"] != p:
                    diff = f"file has {entries[ref['i']]['path']!r} where like= has {p!r}"
                    break
        if diff is not None:
            raise ShapeError(
                f"like= has a different structure than {info.path} ({diff}); pass a pytree "
                f"with the saved structure, or leave like=None to get dicts and lists"
            )
        return jax.tree_util.tree_unflatten(treedef, [v for _, v in flat])
    try:
        return _rebuild(tree, leaf)
    except QuantError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise FileFormatError(f"{info.path}: corrupt {K_TREE} ({e})") from None


def _collect(tree: Any, out: list, leaf: Callable, depth: int = 0) -> None:
    """(ref, leaf) pairs of a skeleton in ``jax.tree_util`` order (dict keys sorted)."""
    if tree is None:
        return
    if depth >= MAX_TREE_DEPTH:
        raise FileFormatError(f"jquant.tree is nested more than {MAX_TREE_DEPTH} levels deep")
    if "i" in tree or "v" in tree:
        out.append((tree, leaf(tree)))
    elif "d" in tree:
        for _, v in sorted(tree["d"], key=lambda kv: kv[0]):
            _collect(v, out, leaf, depth + 1)
    elif "l" in tree or "t" in tree:
        for v in tree.get("l", tree.get("t")):
            _collect(v, out, leaf, depth + 1)
    else:
        for _, v in tree["k"]:
            _collect(v, out, leaf, depth + 1)


def decode_tensor(
    info: GGUFInfo, mm: np.ndarray, t: GGUFTensorInfo, entry: dict[str, Any] | None = None
) -> Any:
    """One tensor of an open file: a QuantizedTensor, an array, or float32 decoded by gguf.

    ``entry`` is the tensor's ``jquant.tensors`` record (jquant files), else ``None``.
    """
    if t.size == 0:
        key = None if entry is None else _entry_key(entry)
        x = _empty(t.ggml_type, t.shape, key, bool(jax.config.jax_enable_x64))
        return x.copy() if isinstance(x, np.ndarray) else x  # numpy arrays are mutable
    data = np.asarray(mm[t.offset : t.offset + t.nbytes])
    if entry is not None:
        shape = tuple(int(s) for s in entry["shape"])
        dtype = stored_dtype(entry["dtype"])
        if entry["kind"] == "q":
            return QuantizedTensor.from_bytes(data, t.qtype, shape, dtype)
        store = np.dtype(ARRAY_TYPES[dtype.name][1])
        a = data.view(store).astype(store.newbyteorder("="))
        a = a.astype(bool) if dtype == np.bool_ else a.view(dtype)
        return _to_jax(a.reshape(shape))
    qt = t.qtype
    if qt is not None:
        return QuantizedTensor.from_bytes(data, qt, t.shape, restored_dtype(qt))
    if t.ggml_type in RAW_TYPES:
        # an owned copy: a view would change when the file does (and SIGBUS if it shrinks)
        a = np.array(data.view(np.dtype(RAW_TYPES[t.ggml_type])).reshape(t.shape))
        return _to_jax(a)
    return jnp.asarray(_decode_foreign(info, data, t).reshape(t.shape))


DECODE_CHUNK_VALUES = 1 << 16  # values per gguf.quants call: bounds its temporaries


def _decode_foreign(info: GGUFInfo, data: np.ndarray, t: GGUFTensorInfo) -> np.ndarray:
    """float32 values of a tensor in a format only gguf-py decodes, a few blocks at a time.

    gguf-py's decoders make several float temporaries of the whole input (an IQ1_S
    tensor peaked at 4x its float32 size); blocks are independent, so decoding slabs of
    blocks into one output array keeps the peak near the output itself.
    """
    block, type_size = ggml_sizes()[t.ggml_type]
    blocks = data.reshape(-1, type_size)
    out = np.empty(blocks.shape[0] * block, np.float32)
    step = max(1, DECODE_CHUNK_VALUES // block)
    qtype = gguf.GGMLQuantizationType(t.ggml_type)
    for i in range(0, blocks.shape[0], step):
        chunk = blocks[i : i + step].reshape(1, -1)
        try:
            vals = gguf.quants.dequantize(chunk, qtype)
        except NotImplementedError:
            raise FileFormatError(
                f"{info.path}: tensor {t.name!r} is stored as {t.type_name}, which neither "
                f"jquant nor gguf-py can decode"
            ) from None
        out[i * block : i * block + vals.size] = vals.reshape(-1)
    return out


def _entry_key(entry: dict[str, Any]) -> tuple[str, str, tuple[int, ...]]:
    return entry["kind"], entry["dtype"], tuple(entry["shape"])


@functools.lru_cache(maxsize=256)
def _empty(ggml_type: int, shape: tuple[int, ...], key: tuple | None, x64: bool) -> Any:
    """The leaf of a zero-size tensor, shared: files with many of them load in O(1) each."""
    qt = QuantType(ggml_type) if ggml_type in {q.value for q in QuantType} else None
    if key is not None:
        kind, dtype_name, logical = key
        dtype = stored_dtype(dtype_name)
        if kind == "q" and qt is not None:
            return QuantizedTensor.from_bytes(np.zeros(0, np.uint8), qt, logical, dtype)
        return _to_jax(np.zeros(logical, dtype))
    if qt is not None:
        return QuantizedTensor.from_bytes(np.zeros(0, np.uint8), qt, shape, restored_dtype(qt))
    if ggml_type in RAW_TYPES:
        return _to_jax(np.zeros(shape, np.dtype(RAW_TYPES[ggml_type])))
    return jnp.zeros(shape, jnp.float32)


def is_decoded(t: GGUFTensorInfo) -> bool:
    """True if jquant can only read ``t`` by dequantizing it (k-quants, i-quants, ...)."""
    return t.qtype is None and t.ggml_type not in RAW_TYPES


def _load_foreign(info: GGUFInfo, mm: np.ndarray, device: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    decoded = []
    for t in info.tensors:
        out[t.name] = _place(decode_tensor(info, mm, t), device, t.name, t.shape)
        if is_decoded(t):
            decoded.append(f"{t.name} ({t.type_name})")
    if decoded:
        warnings.warn(
            f"{info.path}: {len(decoded)} tensor(s) use formats jquant doesn't support "
            f"natively and were dequantized to float32: {', '.join(decoded[:20])}"
            f"{' ...' if len(decoded) > 20 else ''}",
            UserWarning,
            stacklevel=3,
        )
    return out
