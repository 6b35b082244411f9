"""Checkpoint conversion: :func:`convert_safetensors` (and .npz / .gguf sources).

A ``.safetensors`` file is an 8-byte header length, a JSON header giving each tensor's
dtype, shape and byte range, then the raw data. The converter reads the header, then
memory-maps one tensor at a time (``np.memmap`` over just its byte range), quantizes it
with :func:`quantize_model` (fixed-size chunks: a few XLA compiles per format for the
whole checkpoint), writes its GGML bytes and unmaps it before the next one. Mapping
each tensor separately matters: one mapping of the whole file (what
``safetensors.safe_open`` keeps) leaves every page it touched counted in the
process's resident memory, so a 10 GB checkpoint would show 10 GB of RSS; this way the
peak stays near the largest tensor plus the packed output and the chunk buffers
(``benchmarks/bench_convert.py`` measures it). The output is written atomically.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from .._core.quantize import dequantize_tensor
from .._core.tensor import QuantizedTensor
from .._errors import FileFormatError
from .._formats.quant_type import QuantType, QuantTypeLike
from .._formats.registry import DEFAULT_FORMAT, numpy_dtype, restored_dtype
from .._model.model import quantize_model
from .._model.report import LeafReport, ModelReport
from .._model.rules import DEFAULT_MIN_SIZE, decide, parse_rules
from .gguf import (
    Entry,
    array_entry,
    decode_tensor,
    is_decoded,
    jquant_entries,
    storage_format,
    strict_json,
    write_gguf,
)
from .gguf_file import read_header

__all__ = [
    "Source",
    "convert_safetensors",
    "convert_sources",
    "gguf_sources",
    "npz_sources",
    "read_sources",
    "safetensors_sources",
]

_ST_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "bfloat16",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


@dataclasses.dataclass
class Source:
    """One tensor of an input checkpoint: name, shape and dtype now, data on demand.

    ``load()`` returns the array (e.g. a memory-mapped view); it is called once, when
    the tensor is written, and the result dropped right after.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], Any]
    note: str | None = None  # e.g. "dequantized from Q4_K"

    # so that the rule defaults (jquant._rules.decide) see it as an array
    def __array__(self, *args, **kwargs):  # pragma: no cover - never materialized here
        raise TypeError("a Source is not loaded")


def safetensors_sources(path: str | os.PathLike) -> tuple[list[Source], dict[str, str]]:
    """The tensors of a ``.safetensors`` file (memory-mapped on load) and its metadata.

    Raises:
        FileFormatError: a truncated or corrupt file, or a dtype jquant can't read.
    """
    spath = os.fspath(path)
    size = os.path.getsize(spath)
    with open(spath, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(f"{spath}: not a safetensors file: only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise FileFormatError(
                f"{spath}: not a safetensors file: its header claims {n} bytes but the file has {size}"
            )
        raw = f.read(n)
    try:
        header = strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FileFormatError(f"{spath}: not a safetensors file: bad JSON header ({e})") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{spath}: not a safetensors file: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError(
            f"{spath}: not a safetensors file: __metadata__ must map strings to strings"
        )
    base = 8 + n
    sources = []
    spans = []
    for name, spec in header.items():
        try:
            st_dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
            if not (
                isinstance(st_dtype, str)
                and isinstance(shape, list)
                and len(shape) <= 64
                and all(_is_uint(s) for s in shape)
                and isinstance(offsets, list)
                and len(offsets) == 2
                and all(_is_uint(o) for o in offsets)
            ):
                raise TypeError
            shape = tuple(shape)
            start, end = offsets
        except (KeyError, TypeError):
            raise FileFormatError(
                f"{spath}: tensor {name!r} has a malformed header entry (dtype, shape and "
                f"data_offsets must be a string, a list of integers and two integers)"
            ) from None
        if st_dtype not in _ST_DTYPES:
            raise FileFormatError(
                f"{spath}: tensor {name!r} has dtype {st_dtype}, which jquant can't read "
                f"(supported: {', '.join(_ST_DTYPES)})"
            )
        dtype = numpy_dtype(_ST_DTYPES[st_dtype])
        if any(s < 0 for s in shape) or end - start != math.prod(shape) * dtype.itemsize:
            raise FileFormatError(
                f"{spath}: tensor {name!r}: {end - start} bytes don't hold a {st_dtype} tensor "
                f"of shape {shape}"
            )
        if base + end > size:
            raise FileFormatError(
                f"{spath}: tensor {name!r} runs past the end of the file (truncated download?)"
            )
        if end > start:
            spans.append((start, end, name))
        sources.append(_mapped_source(spath, name, shape, dtype, base + start))
    spans.sort()
    for (_, end0, a), (start1, _, b) in zip(spans, spans[1:], strict=False):
        if start1 < end0:
            raise FileFormatError(f"{spath}: tensors {a!r} and {b!r} overlap in the file")
    sources.sort(key=lambda s: s.name)
    return sources, {str(k): str(v) for k, v in metadata.items()}


def _is_uint(v: Any) -> bool:
    # bools and floats (64.9 read as 64) are not sizes; 2**63 and up don't fit an offset
    return type(v) is int and 0 <= v < 2**63


def _mapped_source(path: str, name: str, shape, dtype: np.dtype, offset: int) -> Source:
    def load():
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        a = np.memmap(path, dtype, mode="r", offset=offset, shape=shape)
        if dtype.name.startswith("float8"):
            return a.astype(np.float16)  # exact: every float8 value is a float16
        return a

    shown = np.dtype(np.float16) if dtype.name.startswith("float8") else dtype
    return Source(name, shape, shown, load)


def npz_sources(path: str | os.PathLike) -> tuple[list[Source], dict[str, str]]:
    """The arrays of an ``.npz`` file; each is read (decompressed) only when loaded.

    Raises:
        FileFormatError: not a valid ``.npz``, or an object array (pickles are refused).
    """
    spath = os.fspath(path)
    try:
        zf = zipfile.ZipFile(spath)
        members = [m for m in zf.namelist() if m.endswith(".npy")]
        sources = []
        for m in members:
            with zf.open(m) as f:
                version = np.lib.format.read_magic(f)
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read(f)
            if dtype.hasobject:
                raise FileFormatError(
                    f"{spath}: array {m[:-4]!r} holds Python objects; jquant refuses pickled "
                    f"data (save plain numeric arrays)"
                )
            sources.append(Source(m[:-4], tuple(shape), dtype, _npz_loader(spath, m[:-4])))
        zf.close()
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError) as e:
        if isinstance(e, FileFormatError):
            raise
        raise FileFormatError(f"{spath}: not a valid .npz file ({e})") from None
    return sources, {}


def _npz_loader(path: str, key: str) -> Callable[[], Any]:
    def load():
        try:
            with np.load(path, allow_pickle=False) as z:
                return z[key]
        except (ValueError, EOFError, OSError) as e:
            raise FileFormatError(f"{path}: array {key!r} can't be read ({e})") from None

    return load


def gguf_sources(path: str | os.PathLike) -> tuple[list[Source], dict[str, Any]]:
    """The tensors of a GGUF file as float arrays (quantized ones dequantized on load).

    Names are the saved pytree paths for jquant files, the GGUF names otherwise.
    """
    info, mm = read_header(path)
    parsed = jquant_entries(info)
    entries = parsed[0] if parsed else [None] * len(info.tensors)
    sources = []
    for t, e in zip(info.tensors, entries, strict=True):
        name = e["path"] if e else t.name
        if e:
            dtype = numpy_dtype(e["dtype"])
            shape = tuple(e["shape"])
        elif t.qtype is not None:
            dtype = restored_dtype(t.qtype)
            shape = t.shape
        else:
            dtype = np.dtype(
                np.float32
                if is_decoded(t)
                else {24: "i1", 25: "i2", 26: "i4", 27: "i8", 28: "f8"}[t.ggml_type]
            )
            shape = t.shape
        lossy = t.qtype is not None and t.qtype.is_block_quantized or is_decoded(t)
        note = f"was {t.type_name}" if lossy else None

        def load(t=t, e=e):
            x = decode_tensor(info, mm, t, e)
            if isinstance(x, QuantizedTensor):
                x = dequantize_tensor(x)
            return np.asarray(x)

        sources.append(Source(name, shape, dtype, load, note))
    meta = info.typed_metadata()
    meta.pop("general.architecture", None)
    if "general.architecture" in info.metadata:
        meta["general.architecture"] = str(info.metadata["general.architecture"])
    return sources, meta


def read_sources(path: str | os.PathLike) -> tuple[list[Source], dict[str, Any]]:
    """Tensors and metadata of a ``.safetensors``, ``.npz`` or ``.gguf`` file, by suffix."""
    suffix = os.fspath(path).lower().rsplit(".", 1)[-1]
    readers = {"safetensors": safetensors_sources, "npz": npz_sources, "gguf": gguf_sources}
    if suffix not in readers:
        raise FileFormatError(
            f"{os.fspath(path)}: unknown file type .{suffix}; jquant reads .safetensors, "
            f".npz and .gguf files"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file or directory", os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(21, "Is a directory", os.fspath(path))
    return readers[suffix](path)


def convert_sources(
    sources: Iterable[Source],
    dst: str | os.PathLike,
    qtype_or_rules: QuantTypeLike | Mapping[str, Any] | list[tuple[str, Any]],
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    keep_1d: bool = True,
    metadata: Mapping[str, Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    optimize: bool = False,
) -> ModelReport:
    """Quantize tensors one at a time into a GGUF file (see :func:`convert_safetensors`).

    ``inputs`` are the files the sources come from: ``dst`` may not be one of them.
    """
    rules = parse_rules(qtype_or_rules)
    entries: list[Entry] = []
    rows: list[LeafReport] = []
    ragged = []
    used: set[int] = set()
    for src in sources:
        dec = decide(src.name, src, rules, keep_1d=keep_1d, min_size=min_size)
        if dec.rule is not None:
            used.add(dec.rule)
        size = math.prod(src.shape)
        qt = dec.qtype
        if qt is not None:
            store = storage_format(qt, src.shape[-1] if src.shape else 1, src.dtype)
            if store is not qt:
                ragged.append(f"{src.name} {src.shape}: {qt.name} -> {store.name}")
                qt = store
        if qt is None:
            e = array_entry(src.name, _Lazy(src))
            reason = dec.reason
        else:
            e = Entry(
                src.name,
                "q",
                src.dtype.name,
                src.shape,
                qt.ggml_type,
                _quantizer(src, qt, optimize),
            )
            reason = None
        entries.append(e)
        rows.append(
            LeafReport(
                path=src.name,
                shape=src.shape,
                dtype=src.dtype.name,
                format=None if qt is None else qt.name,
                bytes_before=size * src.dtype.itemsize,
                bytes_after=e.nbytes,
                bits_per_weight=8 * e.nbytes / size if size else 0.0,
                reason=reason or src.note,
            )
        )
    if ragged:
        warnings.warn(
            f"{len(ragged)} tensor(s) have rows that are not a multiple of their format's "
            f"block, which GGML can't describe; like llama.cpp they are written in the "
            f"format llama.cpp falls back to or, when even that doesn't fit, unquantized "
            f"(F16/BF16/F32): {'; '.join(ragged[:10])}"
            f"{' ...' if len(ragged) > 10 else ''}",
            UserWarning,
            stacklevel=3,
        )
    tree = {"d": [[e.path, {"i": i}] for i, e in enumerate(entries)]}
    write_gguf(dst, entries, tree=tree, metadata=metadata, progress=progress, inputs=inputs)
    unmatched = tuple(r.pattern for i, r in enumerate(rules) if i not in used)
    return ModelReport(tuple(rows), unmatched)


class _Lazy:
    """Array-like stand-in whose data is loaded when the entry is written."""

    def __init__(self, src: Source):
        self.src, self.shape, self.dtype = src, src.shape, src.dtype

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.src.load())
        return a if dtype is None else a.astype(dtype)


def _quantizer(src: Source, qt: QuantType, optimize: bool = False) -> Callable[[], np.ndarray]:
    def produce():
        x = src.load()
        q = quantize_model({src.name: x}, qt, min_size=0, keep_1d=False, optimize=optimize)
        q = q[src.name]
        del x
        assert isinstance(q, QuantizedTensor)
        return q.to_bytes()

    return produce


def convert_safetensors(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    qtype_or_rules: QuantTypeLike | Mapping[str, Any] | list[tuple[str, Any]] = DEFAULT_FORMAT,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    keep_1d: bool = True,
    metadata: Mapping[str, Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    optimize: bool = False,
) -> ModelReport:
    """Convert a ``.safetensors`` checkpoint to a quantized GGUF file, tensor by tensor.

    The checkpoint is never loaded whole: each tensor is memory-mapped, quantized,
    written and released before the next, so peak memory stays near the largest tensor
    plus buffers. Formats follow the same rules and defaults as :func:`quantize_model`
    (applied to the safetensors tensor names); tensors with ragged rows (not a multiple
    of 32) are stored unquantized with a warning. The safetensors ``__metadata__`` is
    copied under ``safetensors.`` keys. The result loads with :func:`load_gguf` as a
    flat ``{tensor_name: leaf}`` dict.

    Args:
        src: the ``.safetensors`` file.
        dst: the GGUF file to write (atomically).
        qtype_or_rules: a format, or ordered ``{regex: format}`` rules (see
          :func:`quantize_model`).
        min_size, keep_1d: the defaults of :func:`quantize_model`.
        metadata: extra GGUF metadata (see :func:`save_gguf`).
        progress: ``progress(bytes_done, bytes_total, name)`` after each tensor.
        optimize: error-optimised bytes (see :func:`quantize_tensor`).

    Returns:
        A :class:`ModelReport` with each tensor's format and sizes (no error columns).

    Raises:
        FileFormatError: a corrupt or truncated checkpoint.
        FileWriteError: ``dst`` can't be written (or is ``src`` itself); no partial file
          is left.

    Example:
        >>> import os, tempfile, numpy as np, jquant
        >>> from safetensors.numpy import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file({"w": np.ones((64, 64), np.float32), "b": np.ones(64, np.float32)},
        ...           os.path.join(d, "m.safetensors"))
        >>> rep = jquant.convert_safetensors(os.path.join(d, "m.safetensors"),
        ...                                  os.path.join(d, "m.gguf"), "q4_0")
        >>> [(r.path, r.format) for r in rep.rows]
        [('b', None), ('w', 'Q4_0')]
        >>> jquant.load_gguf(os.path.join(d, "m.gguf"))["w"].qtype.name
        'Q4_0'
    """
    sources, st_meta = safetensors_sources(src)
    meta = {f"safetensors.{k}": v for k, v in st_meta.items() if v}
    meta.update(metadata or {})
    return convert_sources(
        sources,
        dst,
        qtype_or_rules,
        min_size=min_size,
        keep_1d=keep_1d,
        metadata=meta,
        progress=progress,
        inputs=[src],
        optimize=optimize,
    )
