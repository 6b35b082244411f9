"""The GGUF -> GGUF engine: llama-quantize's output from a llama.cpp GGUF, in JAX.

:func:`convert_gguf` reads a model that llama.cpp's ``convert_hf_to_gguf.py`` wrote,
gives every tensor the type llama.cpp's mix gives it (:mod:`jquant._llama.mixes`),
encodes each tensor through ONE function, :func:`encode_tensor`, and writes the file the
way ``llama_model_quantize`` lays it out: the input's metadata in its order, then
``general.quantization_version`` and ``general.file_type`` (and llama-quantize's
``quantize.imatrix.*`` keys with an importance matrix), tensors in llama.cpp's order,
32-byte aligned.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from .._core.quantize import dequantize_tensor, quantize_tensor
from .._errors import FileFormatError, FileWriteError, QuantError, UnknownFormatError
from .._formats.registry import format_spec
from .._io.gguf import decode_tensor
from .._io.gguf_file import read_header
from .._model.report import LeafReport, ModelReport
from .imatrix import ImportanceMatrix, load_imatrix
from .mixes import (
    DEFAULT_FTYPE,
    LlamaModelFacts,
    MixOptions,
    choose_types,
    parse_ftype,
    parse_ggml_type,
    sort_tensor_names,
)

__all__ = [
    "KernelUnavailableError",
    "llama_tensor_types",
    "can_encode",
    "convert_gguf",
    "encode_tensor",
    "is_llama_gguf",
    "enable_compilation_cache",
    "encode_model_tensor",
    "imatrix_metadata",
    "prepare_imatrix",
]

_ALIGN = 32  # GGUF_DEFAULT_ALIGNMENT: llama-quantize's output ignores the input's alignment
_QNT_VERSION = 2  # GGML_QNT_VERSION
_FLOATS = (T.F32, T.F16, T.BF16)


class KernelUnavailableError(QuantError):
    """This jquant build has no kernel for a GGML type (or no importance-weighted one)."""


def _kernel(t: T, weighted: bool) -> Callable[[np.ndarray, np.ndarray | None], Any]:
    """jquant's kernel for ``t``: ``run(rows, weights)`` -> an object with ``to_bytes()``.

    The one place that picks a kernel (``jquant.quantize_tensor``); raises
    KernelUnavailableError up front when there is none.
    """
    try:
        spec = format_spec(t)
    except UnknownFormatError:
        raise KernelUnavailableError(
            f"jquant has no {t.name} kernel; choose another ftype or force types with "
            f"--tensor-type / --output-tensor-type"
        ) from None
    if weighted and not spec.supports_imatrix:
        raise KernelUnavailableError(
            f"jquant has no importance-weighted {t.name} kernel; quantize without "
            f"--imatrix, or exclude this tensor with --exclude-weights"
        )
    qtype = spec.key

    def run(rows: np.ndarray, w: np.ndarray | None) -> Any:
        if w is None:
            return quantize_tensor(rows, qtype, check=False)
        return quantize_tensor(rows, qtype, imatrix=w, check=False)

    return run


def takes_weights(ggml_type: Any) -> bool:
    """Whether llama.cpp passes importance weights to ``ggml_type``'s quantizer.

    The float types and the formats without a weighted search (Q8_0) ignore them, in
    ggml as in jquant's format table.
    """
    t = parse_ggml_type(ggml_type)
    try:
        return format_spec(t).supports_imatrix
    except UnknownFormatError:
        return False


def can_encode(ggml_type: Any, weighted: bool = False) -> bool:
    """Whether :func:`encode_tensor` can write ``ggml_type`` (with importance weights)."""
    t = parse_ggml_type(ggml_type)
    try:
        _kernel(t, weighted and takes_weights(t))
    except KernelUnavailableError:
        return False
    return True


def encode_tensor(x: Any, ggml_type: Any, importance: np.ndarray | None = None) -> bytes:
    """GGML bytes of ``x`` in ``ggml_type``: rows along the last axis, as ggml_quantize_chunk.

    Every tensor :func:`convert_gguf` writes goes through here.

    Args:
        x: a float array, numpy order (its last axis is the row).
        ggml_type: a ``gguf.GGMLQuantizationType`` or its name.
        importance: float32 weights, one per column of the row (``in_sum2 / count``);
          ``None`` for ggml's unweighted path. Ignored for the float types and Q8_0, which
          have no weighted path in ggml either.

    Raises:
        KernelUnavailableError: this jquant has no (weighted) kernel for ``ggml_type``.
    """
    t = parse_ggml_type(ggml_type)
    weighted = importance is not None and takes_weights(t)
    kernel = _kernel(t, weighted)
    x = np.asarray(x)
    if x.dtype.name not in ("float16", "bfloat16", "float32"):
        x = x.astype(np.float32)  # F16/BF16 go to the kernel as they are (exactly widened there)
    if weighted:
        # the weights follow the columns: whole rows, in buckets of rows
        w = np.asarray(importance, np.float32)
        rows = x.reshape(-1, x.shape[-1] if x.ndim else 1)
        return _chunked(
            rows,
            lambda part: kernel(part, w),
            rows_per_chunk=max(1, _CHUNK_VALUES // rows.shape[1]),
        )
    # Blocks don't depend on where they sit in a row, so every tensor is cut into chunks
    # of whole blocks of a few fixed sizes: a handful of compiled kernels serve any model
    # (and the persistent compilation cache serves the next run).
    block = 256 if t in _FLOATS else GGML_QUANT_SIZES[t][0]
    flat = x.reshape(-1)
    n = flat.size
    if n % block:
        if t not in _FLOATS:  # pragma: no cover - the mix's fallbacks prevent this
            raise QuantError(f"{n} values are not whole {t.name} blocks")
        flat = np.concatenate([flat, np.zeros(-n % block, flat.dtype)])
    data = _chunked(
        flat.reshape(-1, block),
        lambda part: kernel(part, None),
        rows_per_chunk=_CHUNK_VALUES // block,
    )
    return data[: n * GGML_QUANT_SIZES[t][1] // GGML_QUANT_SIZES[t][0]]


_CHUNK_VALUES = 1 << 21  # values per kernel call: 8 MiB of float32
_MIN_ROWS = 256


def _chunked(rows: np.ndarray, quantize: Callable[[np.ndarray], Any], rows_per_chunk: int) -> bytes:
    """Quantize ``rows`` in chunks of ``rows_per_chunk`` (the last padded to a power of 2)."""
    pending = []
    for start in range(0, rows.shape[0], rows_per_chunk):
        part = rows[start : start + rows_per_chunk]
        n = part.shape[0]
        size = rows_per_chunk if n == rows_per_chunk else max(_MIN_ROWS, 1 << (n - 1).bit_length())
        size = min(size, rows_per_chunk)
        if size != n:
            part = np.concatenate([part, np.zeros((size - n, part.shape[1]), part.dtype)])
        pending.append((quantize(part), n))  # dispatched asynchronously: chunks overlap
    return b"".join(np.asarray(q.to_bytes())[:n].tobytes() for q, n in pending)


# -- reading ---------------------------------------------------------------------------


def is_llama_gguf(meta: Mapping[str, Any]) -> bool:
    """A GGUF that llama.cpp wrote (or converted): an architecture other than jquant's.

    ``jquant.export_gguf``'s files count (they carry llama.cpp's ``{arch}.block_count``);
    a jquant tensor file that merely names an architecture doesn't.
    """
    arch = meta.get("general.architecture")
    if not arch or str(arch) == "jquant":
        return False
    return f"{arch}.block_count" in meta or not any(k.startswith("jquant.") for k in meta)


def _raw_kvs(mm: np.ndarray) -> list[tuple[str, bytes]]:
    """The metadata section as (key, raw bytes of the whole entry), in file order."""
    buf = memoryview(mm)
    pos = 8
    _n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos)
    pos += 16
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip(vtype: int, p: int) -> int:
        if vtype in sizes:
            return p + sizes[vtype]
        if vtype == 8:
            (n,) = struct.unpack_from("<Q", buf, p)
            return p + 8 + n
        if vtype == 9:
            sub, n = struct.unpack_from("<IQ", buf, p)
            p += 12
            if sub in sizes:
                return p + n * sizes[sub]
            for _ in range(n):
                p = skip(sub, p)
            return p
        raise FileFormatError(f"unknown GGUF value type {vtype}")

    out = []
    for _ in range(n_kv):
        start = pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        key = bytes(buf[pos + 8 : pos + 8 + n]).decode()
        pos += 8 + n
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos = skip(vtype, pos + 4)
        out.append((key, bytes(buf[start:pos])))
    return out


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


def _kv_u32(key: str, v: int) -> bytes:
    return _kv(key, 4, struct.pack("<I", v))


def _kv_str(key: str, s: str) -> bytes:
    b = s.encode()
    return _kv(key, 8, struct.pack("<Q", len(b)) + b)


def _values(info, mm, t) -> np.ndarray:
    """A tensor's values: F32/F16/BF16 as stored (exact in float32), others dequantized."""
    raw = np.asarray(mm[t.offset : t.offset + t.nbytes])
    if t.ggml_type == T.F32:
        return raw.view("<f4").reshape(t.shape)
    if t.ggml_type == T.F16:
        return raw.view("<f2").reshape(t.shape)
    if t.ggml_type == T.BF16:
        import ml_dtypes

        return raw.view(ml_dtypes.bfloat16).reshape(t.shape)

    q = decode_tensor(info, mm, t, None)
    return np.asarray(dequantize_tensor(q) if hasattr(q, "qtype") else q, np.float32)


# -- the engine ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    name: str
    shape: tuple[int, ...]
    src_type: T
    dst_type: T
    offset: int
    nbytes_in: int
    nbytes_out: int


def _row_bytes(t: T, shape: Sequence[int]) -> int:
    block, size = GGML_QUANT_SIZES[t]
    n = int(np.prod(shape)) if shape else 1
    return n // block * size


def prepare_imatrix(
    imatrix: ImportanceMatrix | Mapping[str, np.ndarray] | str | os.PathLike | None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> tuple[dict[str, np.ndarray] | None, ImportanceMatrix | None, str | None]:
    """An importance matrix as llama-quantize prepares it: ``(weights, matrix, path)``.

    Args:
        imatrix: a file (GGUF imatrix or legacy ``.dat``), an :class:`ImportanceMatrix`,
          ``{tensor name: float32 weights}``, or ``None``.
        include, exclude: ``--include-weights`` / ``--exclude-weights`` substrings.

    Returns:
        ``{tensor name: float32 weights}`` (``None`` when empty), the
        :class:`ImportanceMatrix` it came from (if any) and the file path (if any).

    Raises:
        QuantError: both ``include`` and ``exclude``, or non-finite weights.
    """
    if imatrix is None:
        return None, None, None
    path = None
    if isinstance(imatrix, (str, os.PathLike)):
        path = os.fspath(imatrix)
        imatrix = load_imatrix(path)
    if isinstance(imatrix, ImportanceMatrix):
        im = imatrix
        weights = im.weights()
    else:
        im = None
        weights = {k: np.asarray(v, np.float32).reshape(-1) for k, v in imatrix.items()}
    if include and exclude:
        raise QuantError("--include-weights and --exclude-weights can't be used together")
    for sub in exclude:  # prepare_imatrix: substring matches
        weights = {k: v for k, v in weights.items() if sub not in k}
    if include:
        weights = {k: v for k, v in weights.items() if any(s in k for s in include)}
    for k, v in weights.items():
        if not np.all(np.isfinite(v)):
            raise QuantError(f"imatrix contains non-finite values (in {k!r})")
    return (weights or None), im, path


def imatrix_metadata(
    weights: Mapping[str, np.ndarray], im: ImportanceMatrix | None, path: str | None
) -> list[tuple[str, str | int]]:
    """The ``quantize.imatrix.*`` keys llama-quantize writes, in its order (str or uint32)."""
    out: list[tuple[str, str | int]] = [("quantize.imatrix.file", (path or "")[:127])]
    if im is not None and im.datasets:
        out.append(("quantize.imatrix.dataset", im.datasets[0][:127]))
    out.append(("quantize.imatrix.entries_count", len(weights)))
    if im is not None and im.chunk_count > 0:
        out.append(("quantize.imatrix.chunks_count", int(im.chunk_count)))
    return out


def convert_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    ftype: str | int = DEFAULT_FTYPE,
    *,
    imatrix: ImportanceMatrix | Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    pure: bool = False,
    tensor_types: Sequence[tuple[str, Any]] | Mapping[str, Any] = (),
    output_tensor_type: Any = None,
    token_embedding_type: Any = None,
    leave_output_tensor: bool = False,
    include_weights: Sequence[str] = (),
    exclude_weights: Sequence[str] = (),
    allow_requantize: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> ModelReport:
    """Quantize a llama.cpp GGUF like ``llama-quantize src dst FTYPE``, tensor for tensor.

    Every tensor gets the type llama.cpp's mix gives it, with the same bytes; the file
    keeps every metadata key of the input and sets ``general.file_type``.

    Args:
        src: a GGUF file from llama.cpp's ``convert_hf_to_gguf.py`` (F32/F16/BF16 weights).
        dst: the GGUF file to write (atomically, mode 0644 under the usual umask).
        ftype: a llama-quantize type name (``"Q4_K_M"``, ``"Q4_0"``, ``"F16"``...) or id.
        imatrix: an importance matrix: a file (llama.cpp's GGUF imatrix or legacy
          ``.dat``), an :class:`ImportanceMatrix`, or ``{tensor name: float32 weights}``.
        pure, tensor_types, output_tensor_type, token_embedding_type, leave_output_tensor,
          include_weights, exclude_weights, allow_requantize: llama-quantize's
          ``--pure``, ``--tensor-type REGEX=TYPE`` (pairs or a dict), ``--output-tensor-type``,
          ``--token-embedding-type``, ``--leave-output-tensor``, ``--include-weights``,
          ``--exclude-weights``, ``--allow-requantize``.
        progress: ``progress(bytes_done, bytes_total, name)`` after each tensor.

    Returns:
        A :class:`ModelReport`, one row per tensor in file order (``format`` is the GGML
        type written; ``reason`` says why a tensor was copied as it was).

    Raises:
        FileFormatError: ``src`` is not a llama.cpp GGUF.
        KernelUnavailableError: the mix needs a type jquant can't encode yet.
        QuantError: a bad option or an already-quantized input without ``allow_requantize``.
        FileWriteError: ``dst`` can't be written; no partial file is left.

    Example:
        >>> import os, tempfile, numpy as np, gguf, jquant
        >>> d = tempfile.mkdtemp(); src = os.path.join(d, "m.gguf")
        >>> w = gguf.GGUFWriter(src, "llama")
        >>> w.add_block_count(1); w.add_head_count(2); w.add_head_count_kv(2)
        >>> w.add_tensor("blk.0.attn_q.weight", np.ones((64, 64), np.float16))
        >>> w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
        >>> w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file()
        >>> w.close()
        >>> rep = jquant.convert_gguf(src, os.path.join(d, "q.gguf"), "Q4_0")
        >>> [(r.path, r.format) for r in rep.rows]
        [('blk.0.attn_norm.weight', 'F32'), ('blk.0.attn_q.weight', 'Q4_0')]
        >>> jquant.inspect_gguf(os.path.join(d, "q.gguf")).metadata["general.file_type"]
        2
    """
    ft = parse_ftype(ftype)
    info, mm = read_header(src)
    meta = info.metadata
    if not is_llama_gguf(meta):
        raise FileFormatError(
            f"{os.fspath(src)} is not a llama.cpp GGUF (its general.architecture is "
            f"{meta.get('general.architecture')!r}); llama.cpp's file types need the "
            f"architecture metadata that llama.cpp's convert_hf_to_gguf.py writes"
        )
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise QuantError(f"input and output are the same file: {os.fspath(dst)!r}")
    weights, im, im_path = prepare_imatrix(imatrix, include_weights, exclude_weights)
    options = _options(
        pure,
        tensor_types,
        output_tensor_type,
        token_embedding_type,
        leave_output_tensor,
        weights is not None,
    )
    facts = LlamaModelFacts.from_metadata(meta)
    by_name = {t.name: t for t in info.tensors}
    types = choose_types(
        ft, [(t.name, t.shape, T(t.ggml_type)) for t in info.tensors], facts, options
    )
    plans = []
    for name in sort_tensor_names(list(by_name)):
        t = by_name[name]
        dst_t = types[name]
        plans.append(
            _Plan(
                name,
                t.shape,
                T(t.ggml_type),
                dst_t,
                t.offset,
                t.nbytes,
                t.nbytes if dst_t == t.ggml_type else _row_bytes(dst_t, t.shape),
            )
        )
    for p in plans:
        if p.dst_type != p.src_type:
            if p.src_type not in _FLOATS and not allow_requantize:
                raise QuantError(
                    f"tensor {p.name!r} is already {p.src_type.name}; requantizing from a "
                    f"quantized type adds error (llama-quantize refuses it too). Start from "
                    f"the F16/BF16/F32 file, or pass allow_requantize=True "
                    f"(--allow-requantize)"
                )
            w = None if weights is None else weights.get(p.name)
            _kernel(p.dst_type, w is not None and takes_weights(p.dst_type))

    # llama.cpp sets these last (gguf_set_val_* removes a key and appends it), in this order
    extra = [
        ("general.quantization_version", _kv_u32("general.quantization_version", _QNT_VERSION)),
        ("general.file_type", _kv_u32("general.file_type", ft)),
    ]
    if weights is not None:  # llama-quantize's tool adds these with an imatrix
        for k, v in imatrix_metadata(weights, im, im_path):
            extra.append((k, _kv_str(k, v) if isinstance(v, str) else _kv_u32(k, v)))
    replaced = {k for k, _ in extra} | set(_REMOVED)
    # an export_gguf file's jquant.* keys describe its old tensors: they go
    kv_bytes = [b for k, b in _raw_kvs(mm) if k not in replaced and not k.startswith("jquant.")] + [
        b for _, b in extra
    ]

    header = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(plans), len(kv_bytes)))
    for b in kv_bytes:
        header += b
    offset = 0
    for p in plans:
        nb = p.name.encode()
        ne = list(reversed(p.shape)) or [1]
        n_dims = max([i + 1 for i, d in enumerate(ne) if d > 1] or [1])
        header += struct.pack("<Q", len(nb)) + nb + struct.pack("<I", n_dims)
        header += struct.pack(f"<{n_dims}Q", *ne[:n_dims])
        header += struct.pack("<IQ", int(p.dst_type), offset)
        offset += -(-p.nbytes_out // _ALIGN) * _ALIGN
    header += b"\0" * (-len(header) % _ALIGN)

    rows = []
    total = sum(p.nbytes_out for p in plans)
    done = 0
    dst = Path(dst)
    folder = dst.parent if str(dst.parent) else Path(".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for p in plans:
                if p.dst_type == p.src_type:
                    data = np.asarray(mm[p.offset : p.offset + p.nbytes_in]).tobytes()
                    reason = _why_kept(p, facts, options)
                else:
                    x = _values(info, mm, by_name[p.name])
                    w = None if weights is None else weights.get(p.name)
                    data = encode_model_tensor(x, p.name, p.dst_type, w)
                    reason = None
                if len(data) != p.nbytes_out:  # pragma: no cover - a bug, not a user error
                    raise QuantError(f"internal error: {p.name} gave {len(data)} bytes")
                f.write(data)
                f.write(b"\0" * (-len(data) % _ALIGN))
                n = int(np.prod(p.shape)) if p.shape else 1
                before = _row_bytes(p.src_type, p.shape)
                rows.append(
                    LeafReport(
                        path=p.name,
                        shape=p.shape,
                        dtype=p.src_type.name,
                        format=p.dst_type.name,
                        bytes_before=before,
                        bytes_after=p.nbytes_out,
                        bits_per_weight=8 * p.nbytes_out / n if n else 0.0,
                        reason=reason,
                    )
                )
                done += p.nbytes_out
                if progress is not None:
                    progress(done, total, p.name)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dst)
        tmp = None
    except OSError as e:
        raise FileWriteError(f"can't write {str(dst)!r}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return ModelReport(tuple(rows), ())


def _options(
    pure, tensor_types, output_tensor_type, token_embedding_type, leave_output_tensor, has_imatrix
) -> MixOptions:
    if isinstance(tensor_types, Mapping):
        tensor_types = list(tensor_types.items())
    return MixOptions(
        pure=pure,
        tensor_types=tuple((p.lower(), parse_ggml_type(t)) for p, t in tensor_types),
        output_tensor_type=None
        if output_tensor_type is None
        else parse_ggml_type(output_tensor_type),
        token_embedding_type=None
        if token_embedding_type is None
        else parse_ggml_type(token_embedding_type),
        quantize_output_tensor=not leave_output_tensor,
        has_imatrix=has_imatrix,
    )


def llama_tensor_types(
    src: str | os.PathLike,
    ftype: str | int = DEFAULT_FTYPE,
    *,
    imatrix: bool = False,
    pure: bool = False,
    tensor_types: Sequence[tuple[str, Any]] | Mapping[str, Any] = (),
    output_tensor_type: Any = None,
    token_embedding_type: Any = None,
    leave_output_tensor: bool = False,
) -> dict[str, str]:
    """The GGML type llama-quantize gives each tensor of a llama.cpp GGUF (no quantizing).

    The mix that :func:`convert_gguf` writes, for a look before the work (like
    ``llama-quantize --dry-run``). Options as in :func:`convert_gguf`; ``imatrix`` says
    whether an importance matrix will be given (a few rules depend on it).

    Returns:
        ``{tensor name: GGML type name}`` in llama.cpp's tensor order.

    Example:
        >>> import os, tempfile, numpy as np, gguf, jquant
        >>> src = os.path.join(tempfile.mkdtemp(), "m.gguf")
        >>> w = gguf.GGUFWriter(src, "llama")
        >>> w.add_block_count(1); w.add_head_count(8); w.add_head_count_kv(2)
        >>> w.add_tensor("token_embd.weight", np.ones((10, 256), np.float16))
        >>> w.add_tensor("output.weight", np.ones((10, 256), np.float16))
        >>> w.add_tensor("blk.0.attn_v.weight", np.ones((64, 256), np.float16))
        >>> w.add_tensor("blk.0.ffn_down.weight", np.ones((256, 96), np.float16))
        >>> w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file()
        >>> w.close()
        >>> jquant.llama_tensor_types(src, "Q4_K_M")
        {'output.weight': 'Q6_K', 'token_embd.weight': 'Q4_K', 'blk.0.attn_v.weight': 'Q6_K', 'blk.0.ffn_down.weight': 'Q8_0'}
    """
    info, _ = read_header(src)
    if not is_llama_gguf(info.metadata):
        raise FileFormatError(f"{os.fspath(src)} is not a llama.cpp GGUF")
    options = _options(
        pure, tensor_types, output_tensor_type, token_embedding_type, leave_output_tensor, imatrix
    )
    types = choose_types(
        parse_ftype(ftype),
        [(t.name, t.shape, T(t.ggml_type)) for t in info.tensors],
        LlamaModelFacts.from_metadata(info.metadata),
        options,
    )
    return {n: types[n].name for n in sort_tensor_names(list(types))}


_REMOVED = ("split.no", "split.count", "split.tensors.count")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _why_kept(p: _Plan, facts: LlamaModelFacts, options: MixOptions) -> str | None:
    from .mixes import allows_quantization

    if not allows_quantization(
        p.name, p.shape, facts.arch, quantize_output_tensor=options.quantize_output_tensor
    ):
        return "llama.cpp keeps this tensor as it is"
    return None


def encode_model_tensor(
    x: np.ndarray, name: str, ggml_type: Any, importance: np.ndarray | None = None
) -> bytes:
    """GGML bytes of model tensor ``name`` as llama-quantize writes it, importance included.

    :func:`encode_tensor` with llama-quantize's handling of the importance weights: a
    3-D expert tensor takes one slice per expert; weights of the wrong size are ignored
    for the token embeddings (as llama.cpp does) and an error elsewhere.

    Raises:
        QuantError: ``importance`` doesn't match the tensor's rows.
        KernelUnavailableError: no (weighted) kernel for ``ggml_type``.
    """
    shape = tuple(np.shape(x))
    t = parse_ggml_type(ggml_type)
    w = importance
    row = shape[-1] if shape else 1
    n_exp = shape[-3] if len(shape) >= 3 else 1
    if w is not None and w.size != row * n_exp:
        if name in ("token_embd.weight", "per_layer_token_embd.weight"):
            w = None  # llama.cpp ignores a mismatched imatrix for the token embeddings
        else:
            raise QuantError(
                f"imatrix size {w.size} is different from tensor size {row * n_exp} for {name}"
            )
    if w is None or len(shape) < 3:
        return encode_tensor(x, t, w)
    xs = np.asarray(x).reshape(-1, n_exp, *shape[-2:])
    if xs.shape[0] != 1:
        raise QuantError(f"{name}: 4-D expert tensors with an imatrix are not supported")
    return b"".join(encode_tensor(xs[:, e], t, w[e * row : (e + 1) * row]) for e in range(n_exp))


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache for jquant's command line.

    The cache lives in ``$JQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/jquant/xla``, else
    ``~/.cache/jquant/xla``; ``JQUANT_NO_COMPILE_CACHE=1`` (or ``--no-compile-cache``)
    turns it off. Returns the folder, or None when off.
    """
    if os.environ.get("JQUANT_NO_COMPILE_CACHE"):
        return None
    if path is None:
        path = os.environ.get("JQUANT_CACHE_DIR")
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "jquant", "xla")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", os.fspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return os.fspath(path)
