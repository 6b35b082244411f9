"""The GGUF container: a checked reader and an atomic, streaming writer.

The reader (:func:`read_header`) parses a GGUF v2/v3 header itself, checking every
count, length, type id, shape and offset against the file, so corrupt input raises
:class:`FileFormatError` (never an ``IndexError``, a hang on a huge count, or a tensor
read from past the end); tensor data stays in a read-only memory map. The writer
(:func:`write_gguf`) goes through ``gguf.GGUFWriter`` one tensor at a time and
replaces the target only once the file is complete and fsynced. The pytree layer on
top is :mod:`jquant._io.gguf`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .._errors import FileFormatError, QuantError, UnknownFormatError
from .._formats.quant_type import QuantType
from .._formats.registry import formats, numpy_dtype
from .safe_write import atomic_output

__all__ = [
    "Entry",
    "GGUFInfo",
    "GGUFTensorInfo",
    "gguf_name",
    "read_header",
    "stored_shape",
    "write_gguf",
]

FORMAT_VERSION = 1
MAX_NAME_BYTES = 63
MAX_DIMS = 4
_ALIGNMENT = 32
_GGUF_MAGIC = b"GGUF"

K_VERSION = "jquant.format_version"
K_TENSORS = "jquant.tensors"
K_TREE = "jquant.tree"
K_CHECKSUM = "jquant.checksum"
K_CRC = "jquant.crc32"

# GGUF metadata value types (gguf.GGUFValueType)
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(8, 13)
_SCALAR_FMT = {
    _UINT8: "<B",
    _INT8: "<b",
    _UINT16: "<H",
    _INT16: "<h",
    _UINT32: "<I",
    _INT32: "<i",
    _FLOAT32: "<f",
    _BOOL: "<?",
    _UINT64: "<Q",
    _INT64: "<q",
    _FLOAT64: "<d",
}
_SCALAR_NP = {k: np.dtype(v.replace("?", "u1")) for k, v in _SCALAR_FMT.items()}

# GGML tensor types jquant stores plain arrays in: dtype name -> (ggml id, storage dtype)
_I8, _I16, _I32, _I64, _F64 = 24, 25, 26, 27, 28
ARRAY_TYPES: dict[str, tuple[int, str]] = {
    "float32": (0, "<f4"),
    "float16": (1, "<f2"),
    "bfloat16": (30, "<u2"),
    "float64": (_F64, "<f8"),
    "int8": (_I8, "i1"),
    "int16": (_I16, "<i2"),
    "int32": (_I32, "<i4"),
    "int64": (_I64, "<i8"),
    "uint8": (_I8, "u1"),
    "uint16": (_I16, "<u2"),
    "uint32": (_I32, "<u4"),
    "uint64": (_I64, "<u8"),
    "bool": (_I8, "u1"),
}
RAW_TYPES = {_I8: "i1", _I16: "<i2", _I32: "<i4", _I64: "<i8", _F64: "<f8"}


def stored_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name in jquant metadata (``bfloat16`` included).

    Raises:
        FileFormatError: a dtype jquant never writes.
    """
    if name not in ARRAY_TYPES:
        raise FileFormatError(f"unknown dtype {name!r} in jquant metadata")
    return numpy_dtype(name)


def ggml_sizes() -> dict[int, tuple[int, int]]:
    """GGML type id -> (values per block, bytes per block), for every type gguf-py knows."""
    return {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}


def _ggml_type_name(t: int) -> str:
    try:
        return gguf.GGMLQuantizationType(t).name
    except ValueError:
        return f"type {t}"


# -- names -------------------------------------------------------------------------


def gguf_name(path: str, taken: Mapping[str, Any] | set[str] = frozenset()) -> str:
    """The GGUF tensor name jquant gives the leaf at ``path`` ('/'-joined).

    ``/`` becomes ``.``; a name over 63 bytes, or one already in ``taken``, becomes
    ``<sha1 prefix>~<name tail>``. The exact path is stored in the file's metadata,
    so loading restores it whatever the name.

    Example:
        >>> from jquant._io.gguf import gguf_name
        >>> gguf_name("params/Dense_0/kernel")
        'params.Dense_0.kernel'
        >>> n = gguf_name("encoder/" * 10 + "kernel")
        >>> len(n.encode()) <= 63, n.endswith("encoder.encoder.kernel")
        (True, True)
    """
    name = path.replace("/", ".") or "tensor"
    if len(name.encode()) <= MAX_NAME_BYTES and name not in taken:
        return name
    digest = hashlib.sha1(path.encode()).hexdigest()
    tail = name.encode()[-(MAX_NAME_BYTES - 9) :].decode("utf-8", errors="ignore")
    for i in range(0, len(digest) - 7):
        cand = f"{digest[i : i + 8]}~{tail}"
        if cand not in taken:
            return cand
    raise QuantError(f"could not find a unique GGUF name for {path!r}")  # pragma: no cover


# -- writing -----------------------------------------------------------------------


def stored_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The (numpy-order) shape a tensor of logical ``shape`` has in a GGUF file."""
    if not shape:
        return (1,)
    if len(shape) > MAX_DIMS:
        return (math.prod(shape[: -MAX_DIMS + 1]), *shape[-MAX_DIMS + 1 :])
    return tuple(shape)


@dataclasses.dataclass
class Entry:
    """One tensor on its way into a GGUF file; ``produce()`` gives its bytes when written."""

    path: str
    kind: str  # "q": QuantizedTensor, "a": plain array
    dtype: str  # original dtype name
    shape: tuple[int, ...]  # logical shape
    ggml_type: int
    produce: Callable[[], np.ndarray]
    name: str = ""

    @property
    def byte_shape(self) -> tuple[int, ...]:
        block, size = ggml_sizes()[self.ggml_type]
        s = stored_shape(self.shape)
        return (*s[:-1], -(-s[-1] // block) * size)

    @property
    def nbytes(self) -> int:
        return math.prod(self.byte_shape)

    def meta(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "name": self.name,
            "kind": self.kind,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "type": self.ggml_type,
        }


def _kv_item(key: str, value: Any) -> tuple[Any, int, int | None]:
    """(value, GGUF value type, array sub type) for a user metadata value."""
    if isinstance(value, tuple) and len(value) in (2, 3) and hasattr(value[1], "value"):
        # (value, gguf.GGUFValueType[, array item type])
        sub = int(value[2].value) if len(value) == 3 and value[2] is not None else None
        return value[0], int(value[1].value), sub
    if isinstance(value, (bool, np.bool_)):
        return bool(value), _BOOL, None
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
        kinds = {np.dtype(v): k for k, v in _SCALAR_NP.items() if k != _BOOL}
        t = kinds.get(value.dtype.newbyteorder("<"))
        if t is not None:
            return value.item(), t, None
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise QuantError(
                f"metadata {key!r}: {value} doesn't fit in 64 bits (GGUF's widest integer); "
                f"store it as a string"
            )
        return (
            value,
            (_UINT32 if 0 <= value < 2**32 else _INT64 if value < 2**63 else _UINT64),
            None,
        )
    if isinstance(value, float):
        return value, _FLOAT32, None
    if isinstance(value, str):
        return value, _STRING, None
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0:
        items = [_kv_item(key, v) for v in list(value)]
        types = {t for _, t, _ in items}
        if types == {_UINT32, _INT64}:
            types = {_INT64}
        if types == {_UINT32, _UINT64}:
            types = {_UINT64}
        if len(types) == 1 and _ARRAY not in types:
            return [v for v, _, _ in items], _ARRAY, types.pop()
    raise QuantError(
        f"metadata {key!r}: can't store {type(value).__name__} {value!r} in GGUF; use "
        f"str, int, float, bool, a numpy scalar or a non-empty list of one of those"
    )


def write_gguf(
    path: str | os.PathLike,
    entries: list[Entry],
    *,
    tree: Any,
    metadata: Mapping[str, Any] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``entries`` atomically: a temporary file in the same folder, fsync, rename.

    Each entry's bytes are produced, written and dropped one at a time, so memory stays
    near the largest tensor. ``tree`` is the JSON-able skeleton (see module docs). The
    output path follows :func:`jquant._io.safe_write.check_output` (symlinks followed,
    FIFOs, devices and folders refused, never one of ``inputs``); an exception raised by
    ``progress`` (e.g. on a signal) aborts the write and leaves no temporary file.
    """
    metadata = dict(metadata or {})
    arch = str(metadata.pop("general.architecture", "jquant"))
    kv = []
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise QuantError(f"metadata keys are non-empty strings, got {key!r}")
        if key.startswith("jquant.") or key == "general.alignment":
            raise QuantError(
                f"metadata key {key!r} is reserved (jquant writes the 'jquant.' keys and "
                f"general.alignment itself); use another name"
            )
        kv.append((key, *_kv_item(key, value)))
    taken: set[str] = set()
    for e in entries:
        e.name = gguf_name(e.path, taken)
        taken.add(e.name)
    tensors_json = json.dumps([e.meta() for e in entries], separators=(",", ":"))
    tree_json = json.dumps(tree, separators=(",", ":"))
    checksum = zlib.crc32((tensors_json + "\n" + tree_json).encode())

    with atomic_output(path, inputs=inputs) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _write_file(
                writer, tmp, kv, metadata, entries, tensors_json, tree_json, checksum, progress
            )
        finally:
            writer.close()
    return Path(path)


def _write_file(writer, tmp, kv, metadata, entries, tensors_json, tree_json, checksum, progress):
    for key, value, vtype, sub in kv:
        writer.add_key_value(
            key,
            value,
            gguf.GGUFValueType(vtype),
            None if sub is None else gguf.GGUFValueType(sub),
        )
    block_types = {s.ggml_type for s in formats() if s.is_block_quantized}
    if "general.quantization_version" not in metadata and any(
        e.ggml_type in block_types for e in entries
    ):
        # ggml's GGML_QNT_VERSION: the current Q4_0/Q4_1/Q5_x/Q8_0 block layouts
        writer.add_quantization_version(2)
    writer.add_uint32(K_VERSION, FORMAT_VERSION)
    writer.add_key_value(K_TENSORS, tensors_json, gguf.GGUFValueType.STRING)
    writer.add_key_value(K_TREE, tree_json, gguf.GGUFValueType.STRING)
    writer.add_uint32(K_CHECKSUM, checksum)
    if entries:  # last key: its values end the KV section, patched once data is written
        writer.add_key_value(
            K_CRC, [0] * len(entries), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32
        )
    for e in entries:
        writer.add_tensor_info(
            e.name,
            e.byte_shape,
            np.dtype(np.uint8),
            e.nbytes,
            raw_dtype=gguf.GGMLQuantizationType(e.ggml_type),
        )
    writer.write_header_to_file(Path(tmp))
    writer.write_kv_data_to_file()
    fout = writer.fout[0]
    kv_end = fout.tell()
    writer.write_ti_data_to_file()
    writer.write_padding(fout, fout.tell())
    crcs = []
    total = sum(e.nbytes for e in entries)
    done = 0
    for e in entries:
        data = np.ascontiguousarray(e.produce()).reshape(-1).view(np.uint8)
        if data.size != e.nbytes:
            raise QuantError(  # pragma: no cover - a bug, not a user error
                f"internal error: tensor {e.path!r} produced {data.size} bytes, expected {e.nbytes}"
            )
        crcs.append(zlib.crc32(data))
        # file.write, not ndarray.tofile: a full disk then raises ENOSPC, not a byte count
        fout.write(memoryview(data))
        writer.write_padding(fout, data.size)
        del data
        done += e.nbytes
        if progress is not None:
            progress(done, total, e.path)
    if entries:
        fout.seek(kv_end - 4 * len(entries))
        fout.write(np.asarray(crcs, "<u4").tobytes())
        fout.seek(0, os.SEEK_END)
    fout.flush()


# -- reading -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file, as its header describes it.

    Attributes:
        name: the GGUF tensor name.
        ggml_type: the GGML type id.
        shape: numpy-order shape (outermost first: GGUF's dims reversed).
        offset: absolute byte offset of its data in the file.
        nbytes: size of its data.

    Example:
        >>> import os, tempfile, jax.numpy as jnp, jquant
        >>> path = os.path.join(tempfile.mkdtemp(), "m.gguf")
        >>> _ = jquant.save_gguf(path, {"w": jquant.quantize_tensor(jnp.ones((4, 64)), "q4_0")})
        >>> t = jquant.inspect_gguf(path).tensors[0]
        >>> t.name, t.type_name, t.qtype, t.shape, t.bits_per_weight
        ('w', 'Q4_0', <QuantType.Q4_0: 2>, (4, 64), 4.5)
    """

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        """The GGML type name (``"Q4_0"``, ``"Q6_K"``, ...)."""
        return _ggml_type_name(self.ggml_type)

    @property
    def qtype(self) -> QuantType | None:
        """The :class:`QuantType`, or ``None`` for a format jquant doesn't have."""
        try:
            return QuantType.parse(self.ggml_type)
        except UnknownFormatError:
            return None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.size if self.size else 0.0


@dataclasses.dataclass(frozen=True)
class GGUFInfo:
    """The header of a GGUF file: version, metadata and tensor table (no tensor data).

    Attributes:
        path: the file.
        version: GGUF version (2 or 3).
        alignment: data alignment in bytes.
        metadata: every key/value; arrays as lists.
        tensors: a :class:`GGUFTensorInfo` per tensor, in file order.
        file_size: bytes.
        types: each metadata key's GGUF value type (and array item type).

    Example:
        >>> import os, tempfile, jax.numpy as jnp, jquant
        >>> path = os.path.join(tempfile.mkdtemp(), "m.gguf")
        >>> _ = jquant.save_gguf(path, {"b": jnp.zeros(8)}, metadata={"general.name": "m"})
        >>> info = jquant.inspect_gguf(path)
        >>> info.version, info.is_jquant, info.user_metadata()["general.name"]
        (3, True, 'm')
    """

    path: str
    version: int
    alignment: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]
    file_size: int
    types: dict[str, tuple[int, int | None]] = dataclasses.field(default_factory=dict, repr=False)

    def typed_metadata(self) -> dict[str, Any]:
        """User metadata as ``(value, GGUFValueType[, item type])``, for :func:`save_gguf`.

        Copying these keeps llama.cpp's value types (e.g. INT32 token types) exact.
        Nested arrays are left out (gguf-py's writer can't write them).
        """
        out = {}
        for k, v in self.user_metadata().items():
            t, sub = self.types.get(k, (None, None))
            if t is None or sub == _ARRAY:
                continue
            if t == _ARRAY:
                if not v:
                    continue
                out[k] = (v, gguf.GGUFValueType(t), gguf.GGUFValueType(sub))
            else:
                out[k] = (v, gguf.GGUFValueType(t))
        return out

    @property
    def is_jquant(self) -> bool:
        """True if jquant wrote the file (it has ``jquant.`` metadata)."""
        return any(k.startswith("jquant.") for k in self.metadata)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def user_metadata(self) -> dict[str, Any]:
        """The metadata without jquant's own ``jquant.`` keys."""
        return {k: v for k, v in self.metadata.items() if not k.startswith("jquant.")}


class _Cursor:
    def __init__(self, buf: memoryview, size: int, path: str):
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def fail(self, what: str) -> FileFormatError:
        return FileFormatError(f"{self.path}: not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte "
                f"{self.size} (truncated or corrupt)"
            )
        p = self.pos
        self.pos += n
        return p

    def scalar(self, vtype: int, what: str) -> Any:
        fmt = _SCALAR_FMT[vtype]
        p = self.need(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buf, p)[0]

    def string(self, what: str) -> str:
        n = self.scalar(_UINT64, what)
        p = self.need(n, what)
        try:
            return bytes(self.buf[p : p + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {p} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_FMT:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            sub = self.scalar(_UINT32, what)
            n = self.scalar(_UINT64, what)
            if sub in _SCALAR_NP:
                dt = _SCALAR_NP[sub]
                p = self.need(n * dt.itemsize, f"{what} ({n} values)")
                arr = np.frombuffer(self.buf, dt, n, p)
                return arr.astype(bool).tolist() if sub == _BOOL else arr.tolist()
            if sub == _STRING:
                if n * 8 > self.size - self.pos:
                    raise self.fail(f"{what}: {n} strings can't fit in the rest of the file")
                return [self.string(what) for _ in range(n)]
            if sub == _ARRAY and depth < 4:
                if n * 12 > self.size - self.pos:
                    raise self.fail(f"{what}: {n} arrays can't fit in the rest of the file")
                out = []
                for _ in range(n):
                    out.append(self.value(_ARRAY, what, depth + 1))
                return out
            raise self.fail(f"{what} has an array of unknown value type {sub}")
        raise self.fail(f"{what} has unknown value type {vtype}")


def _open(path: str | os.PathLike) -> tuple[GGUFInfo, np.ndarray]:
    """Parse a GGUF header, checking every size and offset; returns the info and a memmap."""
    spath = os.fspath(path)
    size = os.path.getsize(spath)  # FileNotFoundError etc. propagate as OSError
    if os.path.isdir(spath):
        raise IsADirectoryError(errno.EISDIR, "is a directory", spath)
    if size < 24:
        raise FileFormatError(
            f"{spath}: not a GGUF file: {size} bytes is shorter than a GGUF header (24 bytes)"
        )
    mm = np.memmap(spath, np.uint8, mode="r")
    buf = memoryview(mm)
    cur = _Cursor(buf, size, spath)
    if bytes(buf[:4]) != _GGUF_MAGIC:
        raise cur.fail(f"bad magic {bytes(buf[:4])!r} (expected b'GGUF')")
    cur.pos = 4
    version = cur.scalar(_UINT32, "version")
    if version not in (2, 3):
        hint = (
            " (a big-endian file?)"
            if version & 0xFFFF == 0
            else " (GGUF v1 is not supported; convert it with llama.cpp)"
            if version == 1
            else ""
        )
        raise cur.fail(f"unsupported GGUF version {version}{hint}")
    n_tensors = cur.scalar(_UINT64, "tensor count")
    n_kv = cur.scalar(_UINT64, "metadata count")
    if n_kv * 13 > size or n_tensors * 24 > size:
        raise cur.fail(f"{n_tensors} tensors and {n_kv} metadata entries can't fit in {size} bytes")
    metadata: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.scalar(_UINT32, f"type of metadata {key!r}")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        sub = None
        if vtype == _ARRAY:
            sub = cur.scalar(_UINT32, f"type of metadata {key!r}")
            cur.pos -= 4
        metadata[key] = cur.value(vtype, f"metadata {key!r}")
        types[key] = (vtype, sub)
    sizes = ggml_sizes()
    raw = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        if name in names:
            raise cur.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = cur.scalar(_UINT32, f"dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise cur.fail(
                f"tensor {name!r} has {n_dims} dimensions (GGML allows at most {MAX_DIMS})"
            )
        dims = [cur.scalar(_UINT64, f"dimensions of tensor {name!r}") for _ in range(n_dims)]
        ggml_type = cur.scalar(_UINT32, f"type of tensor {name!r}")
        offset = cur.scalar(_UINT64, f"offset of tensor {name!r}")
        if ggml_type not in sizes:
            raise cur.fail(f"tensor {name!r} has unknown GGML type id {ggml_type}")
        block, type_size = sizes[ggml_type]
        first = dims[0] if dims else 1
        if first % block:
            raise cur.fail(
                f"tensor {name!r}: its first GGUF dimension ({first}) is not a multiple of "
                f"the {_ggml_type_name(ggml_type)} block size ({block})"
            )
        if any(d >= 2**63 for d in dims) or math.prod(d for d in dims if d) >= 2**63:
            raise cur.fail(f"tensor {name!r} has dimensions {dims} whose product overflows 64 bits")
        count = math.prod(dims)
        nbytes = count // block * type_size
        if nbytes > size:
            raise cur.fail(
                f"tensor {name!r} of shape {dims[::-1]} needs {nbytes} bytes, more than the file holds"
            )
        raw.append((name, ggml_type, tuple(reversed(dims)), offset, nbytes))
    alignment = metadata.get("general.alignment", _ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    end = data_start
    for name, _t, _s, offset, nbytes in sorted(raw, key=lambda r: r[3]):
        if offset % alignment:
            raise cur.fail(
                f"tensor {name!r} starts at offset {offset}, not a multiple of {alignment}"
            )
        start = data_start + offset
        if start < end:
            raise cur.fail(f"tensor {name!r} overlaps the tensor before it")
        if start + nbytes > size:
            raise cur.fail(
                f"tensor {name!r} ({nbytes} bytes at byte {start}) runs past the end of the "
                f"file ({size} bytes): truncated or corrupt"
            )
        end = start + nbytes
    for name, ggml_type, shape, offset, nbytes in raw:
        tensors.append(GGUFTensorInfo(name, ggml_type, shape, data_start + offset, nbytes))
    buf.release()
    info = GGUFInfo(spath, int(version), int(alignment), metadata, tuple(tensors), size, types)
    return info, mm


def read_header(path: str | os.PathLike) -> tuple[GGUFInfo, np.ndarray]:
    """Parse and check a GGUF file's header: its :class:`GGUFInfo` and a uint8 memmap.

    Raises:
        FileFormatError: anything wrong with the file, whatever the low-level cause.
        OSError: the file can't be opened.
    """
    try:
        return _open(path)
    except (struct.error, OverflowError) as e:
        # the cursor checks every size before reading; these are its last line of defence
        # (any other exception is a bug in the reader and propagates as one)
        raise FileFormatError(f"{os.fspath(path)}: not a valid GGUF file ({e})") from None
