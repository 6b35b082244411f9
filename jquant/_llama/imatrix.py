"""Importance matrices: llama.cpp's files, the weights llama-quantize derives, and JAX.

An importance matrix holds, for every matrix multiply ``y = x @ W`` of a model, the sum
of ``x_j**2`` over every token row seen for each input column ``j`` (``in_sum2``) and
the number of rows (``counts``); one slice per expert for MoE weights. llama-quantize
turns it into per-column weights ``in_sum2 / count`` (float32; count 0 gives 1) and
ggml's quantizers minimise the error weighted by them.

Files: llama.cpp's GGUF imatrix (``general.type = "imatrix"``, ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size``; tensors ``<weight>.in_sum2`` F32
``[n_mat, ne0]`` and ``<weight>.counts`` F32 ``[n_mat, 1]``, sorted by name) and the
legacy ``.dat`` (int32 count; per entry int32 name length, name, int32 ncall, int32
nval, float32 values already scaled to ``in_sum2 / count * ncall``; trailer int32 chunk
count, int32 length, dataset name).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import FileFormatError, QuantError
from .._io.gguf_file import read_header

__all__ = ["ImportanceMatrix", "collect_imatrix", "load_imatrix", "save_imatrix"]


@dataclasses.dataclass(frozen=True)
class ImportanceMatrix:
    """Per-column sums of squared activations for each weight, with row counts.

    The state of a mergeable reduction: :meth:`merge` adds two of them (the sums and
    counts of disjoint calibration batches), so batches can be collected on different
    hosts or at different times.

    Attributes:
        sums: ``{weight name: float64 [n_mat, ne0]}``, Σ x_j² over rows (``in_sum2``).
        counts: ``{weight name: int64 [n_mat]}``, rows seen per matrix (expert).
        datasets: names of the calibration data.
        chunk_count: calibration chunks (batches) seen.
        chunk_size: tokens per chunk (0 when unknown).
        legacy: read from a legacy ``.dat`` (``sums`` are then ``in_sum2 / count * ncall``
          and ``counts`` the ncall, as llama.cpp's loader keeps them).

    Example:
        >>> import numpy as np
        >>> from jquant import ImportanceMatrix
        >>> a = ImportanceMatrix({"blk.0.ffn_up.weight": np.array([[4.0, 9.0]])},
        ...                      {"blk.0.ffn_up.weight": np.array([2])}, chunk_count=1)
        >>> m = a.merge(a)
        >>> m.counts["blk.0.ffn_up.weight"], m.weights()["blk.0.ffn_up.weight"]
        (array([4]), array([2. , 4.5], dtype=float32))
    """

    sums: Mapping[str, np.ndarray]
    counts: Mapping[str, np.ndarray]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def merge(self, other: ImportanceMatrix) -> ImportanceMatrix:
        """The importance matrix of both calibrations together (sums and counts add)."""
        if self.legacy or other.legacy:
            raise QuantError("legacy .dat imatrices hold averages, not sums; they can't merge")
        sums = dict(self.sums)
        counts = dict(self.counts)
        for k, v in other.sums.items():
            if k in sums:
                if sums[k].shape != v.shape:
                    raise QuantError(f"imatrix {k!r}: shapes {sums[k].shape} and {v.shape}")
                sums[k] = sums[k] + v
                counts[k] = counts[k] + other.counts[k]
            else:
                sums[k], counts[k] = v, other.counts[k]
        return ImportanceMatrix(
            sums,
            counts,
            tuple(dict.fromkeys(self.datasets + other.datasets)),
            self.chunk_count + other.chunk_count,
            self.chunk_size or other.chunk_size,
        )

    def weights(self) -> dict[str, np.ndarray]:
        """``{name: float32 [n_mat * ne0]}`` exactly as llama-quantize computes them.

        GGUF: ``float32(in_sum2) / float32(count)`` per matrix, 1 where the count is 0.
        Legacy: ``values / ncall`` (values as they are when ncall is 0).
        """
        out = {}
        for k, s in self.sums.items():
            s32 = np.asarray(s, np.float32).reshape(len(self.counts[k]), -1)
            c = np.asarray(self.counts[k], np.int64)
            if self.legacy:
                w = s32 / np.float32(c[0]) if c[0] > 0 else s32
            else:
                c32 = c.astype(np.float32)[:, None]
                with np.errstate(divide="ignore", invalid="ignore"):
                    w = np.where(c32 > 0, s32 / np.where(c32 > 0, c32, 1), np.float32(1))
            out[k] = np.asarray(w, np.float32).reshape(-1)
        return out


# -- files -----------------------------------------------------------------------------


def load_imatrix(path: str | os.PathLike) -> ImportanceMatrix:
    """Read llama.cpp's importance-matrix file: GGUF (``.gguf``) or the legacy ``.dat``.

    Raises:
        FileFormatError: neither format, or mismatched sums and counts.

    Example:
        >>> import os, tempfile, numpy as np, jquant
        >>> p = os.path.join(tempfile.mkdtemp(), "imatrix.gguf")
        >>> m = jquant.ImportanceMatrix({"blk.0.attn_q.weight": np.ones((1, 64))},
        ...                             {"blk.0.attn_q.weight": np.array([32])}, ("wiki",), 2, 16)
        >>> jquant.save_imatrix(p, m)
        >>> back = jquant.load_imatrix(p)
        >>> back.datasets, back.chunk_count, back.counts["blk.0.attn_q.weight"]
        (('wiki',), 2, array([32]))
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_gguf(path)
    return _load_dat(path)


def _load_gguf(path) -> ImportanceMatrix:
    info, mm = read_header(path)
    sums, counts = {}, {}
    for t in info.tensors:
        if t.ggml_type != 0:
            raise FileFormatError(f"{path}: imatrix tensor {t.name!r} must be F32")
        a = np.asarray(mm[t.offset : t.offset + t.nbytes]).view("<f4")
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = a.reshape(-1, t.shape[-1]).astype(np.float64)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.rint(a).astype(np.int64)  # std::lround
    if not sums:
        raise FileFormatError(f"{path}: no imatrix data (no '<name>.in_sum2' tensors)")
    if set(sums) != set(counts):
        bad = sorted(set(sums) ^ set(counts))[0]
        raise FileFormatError(f"{path}: mismatched sums and counts for {bad}")
    meta = info.metadata
    ds = meta.get("imatrix.datasets", [])
    return ImportanceMatrix(
        sums,
        counts,
        tuple(str(d) for d in (ds if isinstance(ds, list) else [ds])),
        int(meta.get("imatrix.chunk_count", 0)),
        int(meta.get("imatrix.chunk_size", 0)),
    )


def _load_dat(path) -> ImportanceMatrix:
    data = open(path, "rb").read()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(data):
            raise FileFormatError(f"{os.fspath(path)}: truncated legacy imatrix (.dat) file")
        v = struct.unpack_from(fmt, data, pos)
        pos += n
        return v

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise FileFormatError(f"{os.fspath(path)}: not an imatrix file (GGUF or legacy .dat)")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (n,) = take("<i")
        (name,) = take(f"<{n}s")
        ncall, nval = take("<ii")
        if nval < 1:
            raise FileFormatError(f"{os.fspath(path)}: entry {name!r} has no values")
        vals = np.asarray(take(f"<{nval}f"), np.float32)
        key = name.decode(errors="replace")
        sums[key] = vals.reshape(1, -1).astype(np.float64)
        counts[key] = np.array([ncall], np.int64)
    chunks, datasets = 0, ()
    if pos < len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (n,) = take("<i")
            if n > 0:
                datasets = (take(f"<{n}s")[0].decode(errors="replace"),)
    return ImportanceMatrix(sums, counts, datasets, chunks, 0, legacy=True)


def save_imatrix(
    path: str | os.PathLike, imatrix: ImportanceMatrix, *, legacy: bool = False
) -> None:
    """Write ``imatrix`` in llama.cpp's GGUF imatrix format (or the legacy ``.dat``).

    llama-quantize and llama-imatrix read the result (``--imatrix FILE``,
    ``--in-file FILE``). Entries are sorted by name, as llama-imatrix writes them.

    Example:
        >>> import os, tempfile, numpy as np, jquant
        >>> p = os.path.join(tempfile.mkdtemp(), "imatrix.dat")
        >>> m = jquant.ImportanceMatrix({"blk.0.attn_q.weight": np.full((1, 32), 8.0)},
        ...                             {"blk.0.attn_q.weight": np.array([4])}, ("wiki",), 1, 4)
        >>> jquant.save_imatrix(p, m, legacy=True)
        >>> jquant.load_imatrix(p).weights()["blk.0.attn_q.weight"][:2]
        array([2., 2.], dtype=float32)
    """
    names = sorted(imatrix.sums)
    if legacy:
        _save_dat(path, imatrix, names)
        return
    import gguf

    w = gguf.GGUFWriter(os.fspath(path), arch="", endianess=gguf.GGUFEndian.LITTLE)
    w.kv_data[0].pop("general.architecture", None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(imatrix.datasets))
    w.add_uint32("imatrix.chunk_count", int(imatrix.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(imatrix.chunk_size))
    for k in names:
        s = np.asarray(imatrix.sums[k], np.float32)
        c = np.asarray(imatrix.counts[k], np.float32).reshape(-1, 1)
        w.add_tensor(f"{k}.in_sum2", s.reshape(len(c), -1))
        w.add_tensor(f"{k}.counts", c)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _save_dat(path, imatrix: ImportanceMatrix, names) -> None:
    out = [struct.pack("<i", len(names))]
    chunk = imatrix.chunk_size or 1
    for k in names:
        s = np.asarray(imatrix.sums[k], np.float32).reshape(len(imatrix.counts[k]), -1)
        c = np.asarray(imatrix.counts[k], np.int64)
        if imatrix.legacy:
            ncall, vals = int(c[0]), s.reshape(-1)
        else:
            ncall = int((c.max() + chunk - 1) // chunk)  # llama-imatrix's ceiling division
            cf = c.astype(np.float32)[:, None]
            v = np.where(cf == 0, np.float32(1), s) / np.where(cf == 0, np.float32(1), cf)
            vals = (v.astype(np.float32) * np.float32(ncall)).reshape(-1)
        b = k.encode()
        out.append(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, vals.size))
        out.append(np.asarray(vals, "<f4").tobytes())
    ds = (imatrix.datasets[-1] if imatrix.datasets else "").encode()
    out.append(struct.pack("<ii", imatrix.chunk_count, len(ds)) + ds)
    with open(path, "wb") as f:
        f.write(b"".join(out))


# -- collecting from JAX ---------------------------------------------------------------


def _path_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _dot_stats(eqn, tags, env_read):
    """(param index, Σx² per contracted column, rows) for a dot_general with one param side."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars
    out = []
    for w_var, w_c, x_var, x_c, x_b in ((rhs, rc, lhs, lc, lb), (lhs, lc, rhs, rc, rb)):
        k = tags.get(w_var) if not hasattr(w_var, "val") else None
        if k is None or len(w_c) != 1 or x_b:
            continue
        x = env_read(x_var).astype(jnp.float32)
        x = jnp.moveaxis(x, x_c[0], -1)
        x = x.reshape(-1, x.shape[-1])
        out.append((k, jnp.sum(x * x, axis=0), x.shape[0]))
        break
    return out


_PASS = {"convert_element_type", "copy", "copy_p", "transpose"}


def _interpret(jaxpr, consts, args, tags, acc):
    """Evaluate ``jaxpr``, adding Σx² of the activations of every parameter matmul."""
    env: dict = {}

    def read(v):
        return v.val if hasattr(v, "val") else env[v]

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
        if name == "dot_general":
            for k, s, n in _dot_stats(eqn, tags, read):
                acc.setdefault(k, []).append((s, n))
        calls = ("pjit", "jit", "closed_call", "custom_jvp_call", "custom_vjp_call", "remat")
        if name in (*calls, "checkpoint") and (sub is not None):
            inner = sub.jaxpr if hasattr(sub, "jaxpr") else sub
            inner_consts = sub.consts if hasattr(sub, "consts") else []
            inner_tags = {
                iv: tags[ov]
                for ov, iv in zip(eqn.invars, inner.invars, strict=True)
                if not hasattr(ov, "val") and ov in tags
            }
            outs = _interpret(inner, inner_consts, invals, inner_tags, acc)
        else:
            outs = eqn.primitive.bind(*invals, **eqn.params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        if name in _PASS and not hasattr(eqn.invars[0], "val") and eqn.invars[0] in tags:
            tags = {**tags, eqn.outvars[0]: tags[eqn.invars[0]]}
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def collect_imatrix(
    fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Iterable[Any],
    *,
    names: Mapping[str, str] | Callable[[str], str | None] | None = None,
    dataset: str = "",
) -> ImportanceMatrix:
    """Compute an importance matrix from a JAX model: Σx² per input column of each matmul.

    Runs ``fn(params, batch)`` for every batch, intercepting every ``dot_general`` (Flax
    ``Dense``, ``x @ w``, ``jnp.einsum`` with one contracted axis) whose one operand is
    a leaf of ``params`` (possibly cast): the other operand's values are squared and
    summed over all rows for each contracted column, and the rows counted, as
    llama-imatrix does for ``blk.*`` weights. Each batch is one chunk; the results
    merge with :meth:`ImportanceMatrix.merge`. Calls (``jit``, custom derivatives,
    ``remat``) are followed; matmuls inside ``lax.scan``/``while_loop`` bodies (e.g.
    ``nn.scan`` over layers) are not seen: unroll them for calibration. Unlike llama-imatrix,
    batches of fewer than 16 rows are counted too.

    Args:
        fn: ``fn(params, batch)``, e.g. ``lambda p, x: model.apply({"params": p}, x)``.
        params: the parameter pytree.
        batches: calibration inputs, each passed to ``fn`` as ``batch``.
        names: the weight name for a leaf's ``/``-joined pytree path: a mapping or a
          function (``None`` from it skips the leaf). Default: the path itself. Give the
          GGUF names (``blk.0.attn_q.weight``) to use the result with llama.cpp files.
        dataset: recorded in ``imatrix.datasets``.

    Returns:
        An :class:`ImportanceMatrix` with one matrix per weight (``n_mat = 1``).

    Example:
        >>> import jax, jax.numpy as jnp, jquant
        >>> params = {"w": jnp.ones((4, 3))}
        >>> fn = lambda p, x: jnp.tanh(x @ p["w"])
        >>> batches = [jnp.arange(8.0).reshape(2, 4)]
        >>> m = jquant.collect_imatrix(fn, params, batches, names={"w": "blk.0.ffn_up.weight"})
        >>> m.sums["blk.0.ffn_up.weight"], m.counts["blk.0.ffn_up.weight"]
        (array([[16., 26., 40., 58.]]), array([2]))
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [_path_name(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]

    def rename(p: str) -> str | None:
        if names is None:
            return p
        if callable(names):
            return names(p)
        return names.get(p)

    targets = [rename(p) for p in paths]

    @jax.jit
    def stats(leaves, batch):
        def body(*leaves):
            return fn(jax.tree_util.tree_unflatten(treedef, leaves), batch)

        closed = jax.make_jaxpr(body)(*leaves)
        tags = {v: i for i, v in enumerate(closed.jaxpr.invars) if targets[i] is not None}
        acc: dict = {}
        _interpret(closed.jaxpr, closed.consts, list(leaves), tags, acc)
        return {
            i: (sum(s for s, _ in v), jnp.asarray(sum(n for _, n in v), jnp.int32))
            for i, v in acc.items()
        }

    treedef = jax.tree_util.tree_structure(params)
    total: ImportanceMatrix | None = None
    chunk_size = 0
    for batch in batches:
        got = jax.device_get(stats(leaves, batch))
        sums = {targets[i]: np.asarray(s, np.float64)[None, :] for i, (s, _) in got.items()}
        counts = {targets[i]: np.array([int(n)], np.int64) for i, (_, n) in got.items()}
        chunk_size = chunk_size or max((int(c[0]) for c in counts.values()), default=0)
        one = ImportanceMatrix(sums, counts, (dataset,) if dataset else (), 1, chunk_size)
        total = one if total is None else total.merge(one)
    if total is None:
        raise QuantError("collect_imatrix got no batches")
    return total
