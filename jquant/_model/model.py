"""Whole-model quantization: :func:`quantize_model` and :func:`dequantize_model`.

How it stays fast and frugal: leaves are grouped by format and their 32-value blocks
streamed through chunks of ``chunk_blocks`` blocks (4 MiB of float32 by default, so a
chunk stays in cache), each quantized by one call of one jitted program. A model costs
one XLA compile per format (plus one per power-of-two size for models smaller than a
chunk), shared by every later model, never one per leaf shape. A leaf of at least a
chunk gets chunks of its own that XLA reads in place (on CPU, aligned host memory is
aliased, not copied); its remainder and the small leaves are copied into shared
chunks, which are filled while the previous chunk is being quantized. Packed results
go straight into each leaf's output arrays, so the host holds the parameters, the
packed output and a few chunks: never a second copy of the model.

Leaves sharded over several devices (``NamedSharding``) are quantized one by one
under ``jax.jit`` with output shardings derived from the input's, so they are never
gathered onto one device.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._core.blocks import (
    bad_blocks,
    check_fields,
    error_stats,
    error_sums,
    num_blocks,
    pad_rows,
)
from .._core.quantize import (
    check_float32_range,
    check_imatrix,
    check_out,
    dequantize_tensor,
    quantize_tensor,
)
from .._core.tensor import QuantizedTensor
from .._errors import NonFiniteError, QuantError, ShapeError
from .._formats.quant_type import QuantType, QuantTypeLike
from .._formats.registry import FormatSpec
from .report import LeafReport, ModelReport
from .rules import DEFAULT_MIN_SIZE, Decision, decide, parse_rules, path_to_str
from .sharding import dequantize_leaf, is_multi_device, quantize_sharded

__all__ = ["dequantize_model", "quantize_model"]

CHUNK_BLOCKS = 1 << 15
"""Blocks per chunk: 1M values, 4 MiB of float32, small enough to stay in cache."""
MAX_CHUNK_BLOCKS = 1 << 24  # 2 GiB of float32 per chunk
_MIN_BUCKET = 1 << 10
_UNIT = 32
"""Values per chunk unit of a float format (whose blocks are single values); a format
with bigger blocks streams the same number of values per chunk in fewer units."""


def quantize_model(
    params: Any,
    qtype_or_rules: QuantTypeLike | Mapping[str, Any] | list[tuple[str, Any]],
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    keep_1d: bool = True,
    report: bool = False,
    check: bool = True,
    chunk_blocks: int = CHUNK_BLOCKS,
    imatrix: Any = None,
    optimize: bool = False,
) -> Any:
    """Quantize every weight of a parameter pytree, returning the same structure.

    Works on any pytree: Flax linen ``{'params': ...}`` dicts, Flax nnx ``State`` (and
    ``nnx.to_pure_dict``), Haiku dicts, Equinox modules, plain dicts and lists, and a list
    of ``(name, array)`` pairs (the seed crate's layout, where the name is the path).
    Quantized leaves become :class:`QuantizedTensor`; every other leaf is returned as is.

    Formats are chosen per leaf from its '/'-joined path (``'params/Dense_0/kernel'``;
    an nnx ``Variable``'s ``.value`` is left out). Defaults come first: leaves that are
    not floating-point arrays, 1-D leaves (``keep_1d``) and tensors with fewer than
    ``min_size`` values stay unquantized. Then the first rule whose regex
    ``re.search``-es the path decides; a rule format of ``None`` or ``'keep'`` leaves
    the leaf unquantized, and a leaf no rule matches stays unquantized. Every leaf left
    unquantized appears in the report with its reason.

    Leaves are grouped by format and quantized in fixed-size chunks of blocks: one XLA
    program per format (and chunk size) however many leaf shapes the model has, reused
    by later models; the bytes are those of :func:`quantize_tensor` on each leaf. Leaves
    on one device are read on the host (a copy from an accelerator) and the packed
    leaves put back on the default device. Leaves sharded over several devices
    (``NamedSharding``) are quantized in place on their devices: the packed arrays are
    sharded like the input (a split last axis splits the block axis) and
    :func:`dequantize_model` gives back the input's sharding. For multi-host models,
    run ``jax.distributed.initialize()`` on every host and call ``quantize_model`` on
    the globally sharded parameters on all of them (it is SPMD: each host quantizes
    its own shards; nothing is gathered). Under ``jax.jit`` each leaf is quantized by
    ``quantize_tensor`` inside the traced program, unchecked.

    Args:
        params: the parameter pytree.
        qtype_or_rules: one format for every leaf (``"q4_0"``, ``QuantType.Q8_0``), or
          ordered rules: a dict ``{regex: format}`` or a list of ``(regex, format)``
          pairs, first match wins; ``None``/``'keep'`` means leave unquantized.
        min_size: tensors with fewer values stay unquantized (0 turns this off).
        keep_1d: keep 1-D leaves and scalars (biases, norm scales) unquantized.
        report: also return a :class:`ModelReport` (with error statistics per leaf).
        check: raise :class:`NonFiniteError` / :class:`ScaleOverflowError` naming the
          leaf's path and block when a leaf holds NaN/Inf or overflows its format.
        chunk_blocks: blocks per chunk (a power of two); bounds the extra memory.
        imatrix: importance weights for the formats with a weighted encoder (K-quants,
          IQ4, Q4_0...Q5_1): a mapping from a leaf's path (exact, else the first key
          that ``re.search``-es the path) to one non-negative weight per column of the
          leaf's last axis, or an ``ImportanceMatrix`` whose names are the paths. Each
          weighted leaf gets the bytes of ``quantize_tensor(leaf, fmt, imatrix=w)``
          (whole, outside the chunk stream: the weighted legacy formats use per-row
          statistics); leaves in formats without a weighted encoder (Q8_0, floats)
          ignore their weights, as llama.cpp does.
        optimize: error-optimised bytes, as ``quantize_tensor(..., optimize=True)`` gives
          for each leaf (valid bytes of the same format, lower error, slower encode).

    Returns:
        The quantized pytree, or ``(qparams, report)`` when ``report=True``.

    Raises:
        QuantError: a rule pattern that is not a valid regex.
        UnknownFormatError: an unknown format name (with the rule it came from).
        NonFiniteError, ScaleOverflowError: bad values (``check=True``), naming the path.
        ShapeError: a sharded leaf whose shards would split a 32-value block, or
          importance weights that are not one per column of their leaf (naming it).

    Example:
        >>> import jax, jax.numpy as jnp, jquant
        >>> params = {"dense": {"kernel": jnp.ones((64, 128)), "bias": jnp.zeros(128)},
        ...           "embed": jnp.ones((100, 64)), "step": jnp.array(3)}
        >>> qp, rep = jquant.quantize_model(params, {"embed": "q8_0", ".*": "q4_0"}, report=True)
        >>> qp["dense"]["kernel"].qtype.name, qp["embed"].qtype.name, type(qp["dense"]["bias"]).__name__
        ('Q4_0', 'Q8_0', 'ArrayImpl')
        >>> [r.reason for r in rep.rows if r.format is None]
        ['1-D (bias/norm/scale) kept by keep_1d=True', 'int32 is not a floating-point dtype']
        >>> rep.bytes_after < rep.bytes_before / 4
        True
        >>> jquant.dequantize_model(qp)["dense"]["kernel"].shape
        (64, 128)
    """
    rules = parse_rules(qtype_or_rules)
    if (
        not isinstance(chunk_blocks, int)
        or chunk_blocks < _MIN_BUCKET
        or chunk_blocks > MAX_CHUNK_BLOCKS
        or chunk_blocks & (chunk_blocks - 1)
    ):
        raise QuantError(
            f"chunk_blocks must be a power of two from {_MIN_BUCKET} to {MAX_CHUNK_BLOCKS}, "
            f"got {chunk_blocks}"
        )
    paths, leaves, rebuild = _flatten(params)
    decisions: list[Decision] = []
    for path, leaf in zip(paths, leaves, strict=True):
        if isinstance(leaf, QuantizedTensor):
            decisions.append(Decision(None, f"already quantized ({leaf.qtype.name})"))
        else:
            decisions.append(decide(path, leaf, rules, keep_1d=keep_1d, min_size=min_size))

    weights = _importance(imatrix, paths, leaves, decisions)
    out: list[Any] = list(leaves)
    stats: dict[int, tuple[float, float, float, float, int]] = {}
    traced = any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)
    if traced:
        if report:
            raise QuantError(
                "quantize_model(..., report=True) needs concrete arrays; call it outside jax.jit"
            )
        for i, dec in enumerate(decisions):
            if dec.qtype is not None:
                out[i] = quantize_tensor(
                    leaves[i],
                    dec.qtype,
                    check=False,
                    name=paths[i],
                    imatrix=weights.get(i),
                    optimize=optimize,
                )
        return rebuild(out)

    groups: dict[QuantType, list[_Job]] = {}
    for i, dec in enumerate(decisions):
        if dec.qtype is None:
            continue
        x = leaves[i]
        if check:
            check_float32_range(x, dec.qtype, paths[i])
        if i in weights:
            out[i] = quantize_tensor(
                x, dec.qtype, imatrix=weights[i], check=check, name=paths[i], optimize=optimize
            )
            if report:
                xs = np.asarray(x, np.float64)
                ys = np.asarray(dequantize_tensor(out[i]), np.float64)
                sq, mx, ab, sig = error_sums(xs, ys)
                stats[i] = (float(sq), float(mx), float(ab), float(sig), xs.size)
        elif is_multi_device(x):
            out[i], st = quantize_sharded(
                x, dec.qtype, paths[i], check=check, stats=report, optimize=optimize
            )
            if st is not None:
                stats[i] = st
        else:
            groups.setdefault(dec.qtype, []).append(_Job(i, paths[i], x, dec.qtype))
    for qtype, jobs in groups.items():
        units = max(_MIN_BUCKET, chunk_blocks * _UNIT // jobs[0].unit)
        _run_group(jobs, qtype, units, check=check, stats=report, optimize=optimize)
        for job in jobs:
            out[job.index] = job.result
            if report:
                stats[job.index] = job.sums_tuple()
    qparams = rebuild(out)
    if not report:
        return qparams
    return qparams, _make_report(paths, leaves, out, decisions, rules, stats)


def dequantize_model(qparams: Any, dtype: Any = None, *, out: Any = None) -> Any:
    """Turn every :class:`QuantizedTensor` of a pytree back into an array.

    Structure, shapes and dtypes are restored (a leaf sharded over several devices gets
    back the sharding of the tensor it was quantized from); other leaves pass through.
    Jittable: ``jax.jit(lambda qp, x: model.apply(jquant.dequantize_model(qp), x))``
    keeps only the packed weights resident and dequantizes inside the program.

    Args:
        qparams: a pytree from :func:`quantize_model` (or any pytree holding
          ``QuantizedTensor`` leaves).
        dtype: cast dequantized tensors and the unquantized floating-point leaves to
          this dtype (e.g. ``jnp.bfloat16`` for inference); ``None`` restores each
          tensor's original dtype.
        out: optional: an earlier result of ``dequantize_model`` for a model of the same
          structure, shapes and dtypes, no longer needed. Each tensor is then written
          into its counterpart's memory (donated, see ``dequantize_tensor(out=)``)
          instead of freshly allocated memory, which on CPU is several times faster
          (e.g. re-dequantizing updated weights in a loop). Its arrays must not be used
          afterwards. Ignored under ``jit`` and for tensors sharded over several devices.

    Raises:
        ShapeError: ``out`` has another structure, or a tensor another shape or dtype.

    Example:
        >>> import jax.numpy as jnp, jquant
        >>> qp = jquant.quantize_model({"w": jnp.ones((32, 64)), "b": jnp.ones(64)}, "q8_0")
        >>> p = jquant.dequantize_model(qp, dtype=jnp.bfloat16)
        >>> p["w"].shape, p["w"].dtype, p["b"].dtype
        ((32, 64), dtype(bfloat16), dtype(bfloat16))
        >>> p = jquant.dequantize_model(qp, dtype=jnp.bfloat16, out=p)  # reuses p's memory
    """
    paths, leaves, rebuild = _flatten(qparams)
    bufs = _out_buffers(out, paths)
    out_dtype = None if dtype is None else np.dtype(dtype)
    out = []
    for leaf, buf, path in zip(leaves, bufs, paths, strict=True):
        if isinstance(leaf, QuantizedTensor):
            qs = leaf.fields[leaf.spec.fields[0].name]
            if buf is None or is_multi_device(qs):
                out.append(dequantize_leaf(leaf, out_dtype))
            else:
                want = out_dtype if out_dtype is not None else leaf.dtype
                check_out(buf, leaf.shape, want, name=f"out[{path!r}]")
                out.append(dequantize_tensor(leaf, want, out=buf))
        elif (
            out_dtype is not None
            and hasattr(leaf, "dtype")
            and hasattr(leaf, "astype")
            and np.issubdtype(np.dtype(leaf.dtype), np.floating)
        ):
            out.append(leaf.astype(out_dtype))
        else:
            out.append(leaf)
    return rebuild(out)


# -- pytree plumbing -------------------------------------------------------------------


def _importance(imatrix: Any, paths, leaves, decisions) -> dict[int, jax.Array]:
    """Leaf index -> its checked importance weights (weighted formats only)."""
    if imatrix is None:
        return {}
    table = imatrix if isinstance(imatrix, Mapping) else imatrix.weights()
    patterns = []
    for key in table:
        try:
            patterns.append((key, re.compile(key)))
        except re.error:
            patterns.append((key, None))  # a plain path with regex metacharacters
    out = {}
    for i, (path, dec) in enumerate(zip(paths, decisions, strict=True)):
        if dec.qtype is None or not dec.qtype.spec.supports_imatrix:
            continue
        if path in table:
            w = table[path]
        else:
            key = next((k for k, p in patterns if p is not None and p.search(path)), None)
            if key is None:
                continue
            w = table[key]
        out[i] = check_imatrix(w, tuple(int(s) for s in leaves[i].shape), path)
    return out


def _out_buffers(out: Any, paths: list[str]) -> list[Any]:
    """``out``'s leaves, one per leaf of the model (``None`` each when ``out`` is None)."""
    if out is None:
        return [None] * len(paths)
    out_paths, bufs, _ = _flatten(out)
    if out_paths != paths:
        diff = next(
            (f"{a!r} vs {b!r}" for a, b in zip(out_paths, paths, strict=False) if a != b),
            f"{len(out_paths)} leaves vs {len(paths)}",
        )
        raise ShapeError(
            f"out= has another structure than the quantized model ({diff}); pass an "
            f"earlier dequantize_model result of the same model, or out=None"
        )
    return bufs


def _is_named_pairs(params: Any) -> bool:
    return (
        isinstance(params, (list, tuple))
        and len(params) > 0
        and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) for p in params
        )
    )


def _flatten(params: Any):
    """(paths, leaves, rebuild) with QuantizedTensor kept whole as a leaf."""
    if _is_named_pairs(params):
        names = [p[0] for p in params]
        kind = type(params)
        return (
            names,
            [p[1] for p in params],
            lambda vals: kind([(n, v) for n, v in zip(names, vals, strict=True)]),
        )
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, QuantizedTensor)
    )
    paths = [path_to_str(p) for p, _ in flat]
    return paths, [v for _, v in flat], lambda vals: jax.tree_util.tree_unflatten(treedef, vals)


# -- the chunked engine ----------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Job:
    """One leaf on its way through the chunk stream."""

    index: int
    path: str
    x: Any
    qtype: QuantType
    result: Any = None
    _units: np.ndarray | None = None
    out: dict[str, np.ndarray] | None = None
    filled: int = 0  # units copied into chunks so far
    stored: int = 0  # units of packed output received so far
    sums: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(4))
    max_err: float = 0.0

    def __post_init__(self):
        self.spec: FormatSpec = self.qtype.spec
        self.shape = tuple(int(s) for s in self.x.shape)
        # as quantize_tensor records it: float64 is float32 unless jax_enable_x64 is on
        self.dtype = np.dtype(jax.dtypes.canonicalize_dtype(self.x.dtype))
        self.size = math.prod(self.shape)
        self.row = self.shape[-1] if self.shape else 1
        self.rows = math.prod(self.shape[:-1]) if self.shape else 1
        self.nb = num_blocks(self.row, self.spec.block_size)  # blocks per row
        # A unit is one block of a block format, or _UNIT values of a float format
        # (which quantizes the flattened tensor: no value depends on its neighbours).
        self.blocked = self.spec.is_block_quantized
        self.unit = self.spec.block_size if self.blocked else _UNIT
        self.n_units = self.rows * self.nb if self.blocked else num_blocks(self.size, _UNIT)

    def units(self) -> np.ndarray:
        """This leaf as ``[n_units, unit]`` (a view when no padding is needed)."""
        if self._units is None:
            a = np.asarray(self.x)
            a = a.reshape(self.rows, self.row) if self.blocked else a.reshape(1, -1)
            self._units = pad_rows(a, self.unit).reshape(self.n_units, self.unit)
        return self._units

    def valid(self, u0: int, u1: int) -> np.ndarray:
        """Number of real (not padding) values in units ``[u0, u1)``."""
        unit = self.unit
        v = np.full(u1 - u0, unit, np.int32)
        if self.blocked:
            tail = self.row - (self.nb - 1) * unit if self.nb else unit
            if tail != unit:
                u = np.arange(u0, u1)
                v[u % self.nb == self.nb - 1] = tail
        elif self.size % unit and u1 == self.n_units:
            v[-1] = self.size % unit
        return v

    def store(self, host: dict[str, np.ndarray], u0: int, u1: int, src: slice) -> None:
        """Copy units ``[u0, u1)`` of the packed result from a chunk's output."""
        if self.out is None:
            # aligned, so that device_put hands the memory to XLA without a copy
            self.out = {
                k: _aligned((self.n_units, *f.shape[1:]), f.dtype)
                for k, f in _fields(self.qtype, self.unit).items()
            }
        for k, v in host.items():
            self.out[k][u0:u1] = v[src]

    def finish(self) -> None:
        self._units = None
        if self.out is None:  # no units: an empty tensor
            self.store({}, 0, 0, slice(0, 0))
        out, self.out = self.out, None
        lead = self.shape[:-1] if self.shape else ()
        total = self.rows * self.nb  # blocks of the leaf; the rest of the last unit is padding
        leaves = {}
        for f in self.spec.fields:
            v = out[f.name].reshape(-1, *f.shape)[:total]
            leaves[f.name] = v.reshape(*lead, self.nb, *f.shape)
        # back on the leaf's device; device_put (not jnp.asarray, which compiles a program
        # per shape) aliases the aligned host arrays on CPU
        device = next(iter(self.x.devices())) if isinstance(self.x, jax.Array) else None
        leaves = {k: jax.device_put(v, device, may_alias=True) for k, v in leaves.items()}
        self.result = QuantizedTensor(leaves, shape=self.shape, dtype=self.dtype, qtype=self.qtype)

    def sums_tuple(self):
        sq, ab, sig, count = self.sums
        return float(sq), float(self.max_err), float(ab), float(sig), int(count)


@functools.cache
def _fields(qt: QuantType, unit: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The packed fields of one unit of ``qt`` (traced abstractly: nothing compiles)."""
    return jax.eval_shape(qt.spec.encode, jax.ShapeDtypeStruct((1, unit), jnp.float32))


@functools.partial(jax.jit, static_argnames=("qtype", "stats", "optimize"))
def _quantize_chunk(units, valid, *, qtype: QuantType, stats: bool, optimize: bool = False):
    """Quantize ``[size, unit]`` units; per unit: the fields, bad flags and error sums."""
    spec = qtype.spec
    size, unit = units.shape
    fields = spec.encode(units, optimize=optimize)
    blocks = units.reshape(size, unit // spec.block_size, spec.block_size)
    check_fields(fields, spec, blocks.shape[:-1])
    bad = bad_blocks(blocks, fields, spec).any(axis=-1)
    first = jnp.argmax(bad).astype(jnp.int32)
    problem = (bad[first], first)
    sums = None
    if stats:
        y = spec.decode(fields).reshape(size, unit)
        mask = jnp.arange(unit, dtype=jnp.int32)[None, :] < valid[:, None]
        sums = error_sums(units, y, mask, axis=-1)
    return fields, problem, sums


def _bucket(n: int, chunk: int) -> int:
    return min(chunk, max(_MIN_BUCKET, 1 << max(0, (n - 1).bit_length())))


def _schedule(jobs: list[_Job], chunk: int):
    """Yield ``(size, [(job, u0, u1, dst), ...])`` chunks covering every job's units.

    A leaf of at least ``chunk`` blocks gets whole chunks of its own, starting at its
    first block (so they can be read in place); its remainder and the small leaves are
    packed together, in model order, into shared chunks.
    """
    shared: list[tuple[_Job, int, int]] = []
    for job in jobs:
        own = job.n_units - job.n_units % chunk
        for u in range(0, own, chunk):
            yield chunk, [(job, u, u + chunk, 0)]
        if job.n_units > own or job.n_units == 0:
            shared.append((job, own, job.n_units))
    total = sum(u1 - u0 for _, u0, u1 in shared)
    # A model with a full chunk already uses the chunk-sized program: padding its last
    # chunk with zero blocks costs less than compiling a second, smaller program.
    big = sum(j.n_units for j in jobs) >= chunk
    done, it = 0, iter(shared)
    seg = next(it, None)
    while seg is not None:
        size = 0 if total == done else (chunk if big else _bucket(total - done, chunk))
        parts, dst = [], 0
        while seg is not None and (dst < size or seg[1] == seg[2]):
            job, u0, u1 = seg
            take = min(u1 - u0, size - dst)
            parts.append((job, u0, u0 + take, dst))
            dst += take
            seg = (job, u0 + take, u1) if u0 + take < u1 else next(it, None)
        done += dst
        yield size, parts


def _aligned(shape: tuple[int, ...], dtype=np.float32, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data is ``align``-byte aligned.

    XLA's CPU client aliases (doesn't copy) such host arrays in ``jax.device_put``.
    """
    n = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + n].view(dtype).reshape(shape)


def _direct(parts, size: int) -> np.ndarray | None:
    """A leaf's own memory when it fills the whole chunk as aligned float32 (no copy)."""
    if len(parts) != 1:
        return None
    job, u0, u1, _ = parts[0]
    if u1 - u0 != size:
        return None
    units = job.units()
    if units.dtype != np.float32 or not units.flags.c_contiguous:
        return None
    view = units[u0:u1]
    return view if view.ctypes.data % 64 == 0 else None


_DEPTH = 2  # chunks in flight: filling the next overlaps quantizing the previous


def _run_group(
    jobs: list[_Job], qtype: QuantType, chunk: int, *, check: bool, stats: bool, optimize: bool
):
    free: list[np.ndarray] = []  # host buffers of collected chunks, for reuse
    pending: collections.deque = collections.deque()
    for size, parts in _schedule(jobs, chunk):
        launched, buf = None, None
        if size:
            src = _direct(parts, size)
            if src is None:
                buf = free.pop() if free else _aligned((chunk, jobs[0].unit))
                src = buf[:size]
                end = 0
                for job, u0, u1, dst in parts:
                    src[dst : dst + u1 - u0] = job.units()[u0:u1]
                    end = dst + u1 - u0
                src[end:] = 0
            valid = np.zeros(size, np.int32)
            if stats:
                for job, u0, u1, dst in parts:
                    valid[dst : dst + u1 - u0] = job.valid(u0, u1)
            for job, u0, u1, _ in parts:
                job.filled += u1 - u0
                if job.filled == job.n_units:
                    job._units = None  # drop a padded copy as soon as it's been used
            launched = _quantize_chunk(
                jax.device_put(src, may_alias=True),
                valid,
                qtype=qtype,
                stats=stats,
                optimize=optimize,
            )
        pending.append((parts, launched, buf))
        if len(pending) > _DEPTH:
            _collect(*pending.popleft(), free, check=check, stats=stats)
    while pending:
        _collect(*pending.popleft(), free, check=check, stats=stats)


def _collect(parts, launched, buf, free, *, check: bool, stats: bool):
    if launched is not None:
        leaves, (bad, first), sums = launched
        if check and bool(bad):
            first = int(first)
            for job, u0, u1, dst in parts:
                if dst <= first < dst + u1 - u0:
                    _raise_for(job)
        host = {k: np.asarray(v) for k, v in leaves.items()}
        host_sums = [np.asarray(s) for s in sums] if stats else None
    if buf is not None:
        free.append(buf)  # the chunk's computation is done with it
    for job, u0, u1, dst in parts:
        if u1 > u0:
            sl = slice(dst, dst + u1 - u0)
            job.store(host, u0, u1, sl)
            if stats:
                sq, mx, ab, sig = (s[sl] for s in host_sums)
                count = job.valid(u0, u1).sum()
                job.sums += np.array(
                    [
                        sq.sum(dtype=np.float64),
                        ab.sum(dtype=np.float64),
                        sig.sum(dtype=np.float64),
                        count,
                    ]
                )
                job.max_err = max(job.max_err, float(mx.max()))
        job.stored += u1 - u0
        if job.stored == job.n_units:
            job.finish()


def _raise_for(job: _Job):
    """Re-run the one bad leaf through quantize_tensor for its exact message, then raise."""
    quantize_tensor(job.x, job.qtype, check=True, name=job.path)
    raise NonFiniteError(  # not reached unless the two checks disagree
        f"tensor {job.path!r} holds a non-finite value or overflows {job.qtype.name}; keep it in "
        f"F32 or clean it (jnp.nan_to_num)"
    )


# -- report ----------------------------------------------------------------------------


def _make_report(paths, leaves, out, decisions, rules, stats) -> ModelReport:
    rows = []
    used = set()
    for i, (path, leaf, res, dec) in enumerate(zip(paths, leaves, out, decisions, strict=True)):
        if dec.rule is not None:
            used.add(dec.rule)
        rule = rules[dec.rule].pattern if dec.rule is not None else None
        if isinstance(leaf, QuantizedTensor):
            shape, dtype = leaf.shape, leaf.dtype.name
            before = after = leaf.nbytes
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            shape, dtype = tuple(int(s) for s in leaf.shape), np.dtype(leaf.dtype).name
            before = math.prod(shape) * np.dtype(leaf.dtype).itemsize
            after = res.nbytes if isinstance(res, QuantizedTensor) else before
        else:
            shape, dtype, before, after = (), type(leaf).__name__, 0, 0
        size = math.prod(shape) if shape is not None else 0
        rmse = max_error = mean_error = sqnr = None
        if i in stats:
            rmse, max_error, mean_error, sqnr = error_stats(*stats[i])
        bpw = 8 * after / size if size and after else 0.0
        rows.append(
            LeafReport(
                path=path,
                shape=tuple(shape),
                dtype=dtype,
                format=res.qtype.name if isinstance(res, QuantizedTensor) and dec.qtype else None,
                bytes_before=before,
                bytes_after=after,
                bits_per_weight=bpw,
                rmse=rmse,
                max_error=max_error,
                mean_error=mean_error,
                sqnr_db=sqnr,
                reason=dec.reason,
                rule=rule,
            )
        )
    unmatched = tuple(r.pattern for j, r in enumerate(rules) if j not in used)
    return ModelReport(rows=tuple(rows), unmatched_rules=unmatched)
