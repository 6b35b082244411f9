"""Leaves sharded over several devices: quantized and dequantized where they live.

A leaf whose ``NamedSharding`` spans several devices is quantized under ``jax.jit`` with
output shardings derived from its own: a split last axis splits the block axis of the
packed arrays, the leading axes keep their specs, so nothing is gathered onto one device.
``dequantize_model`` gives back the input's sharding the same way.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .._core.blocks import bad_blocks, error_sums
from .._core.quantize import (
    as_blocks,
    as_rows,
    check_dtype,
    dequantize_leaves,
    dequantize_tensor,
    quantize_tensor,
)
from .._core.tensor import QuantizedTensor
from .._errors import NonFiniteError, ShapeError
from .._formats.quant_type import QuantType

__all__ = ["dequantize_leaf", "is_multi_device", "quantize_sharded"]


def is_multi_device(x: Any) -> bool:
    """True for a concrete array whose sharding spans several devices."""
    return (
        isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and len(x.sharding.device_set) > 1
    )


# -- sharded leaves --------------------------------------------------------------------


def _axis_ways(mesh, entry) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names)


def _sharded_out(x: jax.Array, qtype: QuantType, path: str):
    """Output shardings for the packed leaves of a sharded ``x`` (None: let XLA choose)."""
    s = x.sharding
    if not isinstance(s, NamedSharding) or x.ndim == 0:
        return None
    fmt = qtype.spec
    block = fmt.block_size
    spec = tuple(s.spec) + (None,) * (x.ndim - len(s.spec))
    ways = _axis_ways(s.mesh, spec[-1])
    if block > 1 and ways > 1 and x.shape[-1] % (block * ways):
        per = x.shape[-1] / ways
        alt = (spec[-1], *spec[:-1]) if x.ndim > 1 and spec[0] is None else None
        instead = f" (e.g. PartitionSpec{alt})" if alt else ""
        raise ShapeError(
            f"tensor {path!r} of shape {tuple(x.shape)} is split {ways} ways along its last "
            f"axis (PartitionSpec{spec}), {per:g} values per shard, so a {block}-value "
            f"{qtype.name} block would straddle two devices. Shard the last axis so each "
            f"shard holds a multiple of {block} values (last axis a multiple of "
            f"{block * ways}), shard another axis instead{instead}, "
            f"or keep this leaf unquantized with a rule ({path!r}: None)."
        )
    # every field is [*lead, nb, *per_block]: the blocks split like the last axis
    return {
        f.name: NamedSharding(s.mesh, PartitionSpec(*spec, *(None,) * len(f.shape)))
        for f in fmt.fields
    }


@functools.lru_cache(maxsize=256)
def _sharded_fn(qtype: QuantType, shardings, stats: bool, optimize: bool = False):
    spec = qtype.spec

    def f(x):
        rows = as_rows(x, spec)
        leaves = spec.encode(rows, optimize=optimize)
        blocks = as_blocks(rows, spec)
        bad = bad_blocks(blocks, leaves, spec).any()
        sums = None
        if stats:
            y = spec.decode(leaves)
            n = x.shape[-1] if x.ndim else 1
            col = jax.lax.broadcasted_iota(jnp.int32, blocks.shape, blocks.ndim - 2)
            col = col * spec.block_size
            col = col + jax.lax.broadcasted_iota(jnp.int32, blocks.shape, blocks.ndim - 1)
            sums = error_sums(blocks, y, col < n)
        return leaves, bad, sums

    if shardings is None:
        return jax.jit(f)
    leaf_sh = dict(shardings)
    return jax.jit(f, out_shardings=(leaf_sh, None, None))


@functools.lru_cache(maxsize=64)
def _auto_mesh(mesh: Mesh) -> Mesh:
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _to_auto(x: jax.Array) -> jax.Array:
    """``x`` on the same devices and layout, its mesh axes ``Auto`` (not ``Explicit``).

    The kernels index and pad along sharded axes, which explicit-sharding type rules
    reject; XLA's propagation handles them, and the output shardings are given anyway.
    """
    s = x.sharding
    if not isinstance(s, NamedSharding) or all(t == AxisType.Auto for t in s.mesh.axis_types):
        return x
    return jax.device_put(x, NamedSharding(_auto_mesh(s.mesh), s.spec))


def _to_mesh(x: jax.Array, mesh) -> jax.Array:
    if isinstance(x.sharding, NamedSharding) and x.sharding.mesh != mesh:
        return jax.device_put(x, NamedSharding(mesh, x.sharding.spec))
    return x


def quantize_sharded(
    x: jax.Array, qtype: QuantType, path: str, *, check: bool, stats: bool, optimize: bool = False
):
    """Quantize a multi-device leaf where it lives: ``(QuantizedTensor, error sums | None)``."""
    check_dtype(x, path)
    xa = _to_auto(x)
    shardings = _sharded_out(xa, qtype, path)
    key = tuple(sorted(shardings.items())) if shardings is not None else None
    leaves, bad, sums = _sharded_fn(qtype, key, stats, optimize)(xa)
    if isinstance(x.sharding, NamedSharding):
        leaves = {k: _to_mesh(v, x.sharding.mesh) for k, v in leaves.items()}
    if check and bool(bad):
        # the error path only: gather it for quantize_tensor's exact message
        quantize_tensor(np.asarray(x), qtype, check=True, name=path)
        raise NonFiniteError(f"tensor {path!r} holds a non-finite value or overflows {qtype.name}")
    q = QuantizedTensor(leaves, shape=tuple(x.shape), dtype=np.dtype(x.dtype), qtype=qtype)
    st = None
    if stats:
        sq, mx, ab, sig = (float(v) for v in sums)
        st = (sq, mx, ab, sig, math.prod(x.shape))
    return q, st


# -- dequantize ------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _dequantize_sharded_fn(qtype: QuantType, shape, dtype, sharding):
    def f(leaves):
        return dequantize_leaves(leaves, qtype, shape, dtype)

    return jax.jit(f, out_shardings=sharding)


def dequantize_leaf(q: QuantizedTensor, dtype):
    """``dequantize_tensor(q, dtype)``, keeping a multi-device sharding of ``q``."""
    first = q.spec.fields[0]
    qs = q.fields[first.name]
    if is_multi_device(qs) and isinstance(qs.sharding, NamedSharding) and q.shape:
        spec = tuple(qs.sharding.spec) + (None,) * (qs.ndim - len(qs.sharding.spec))
        spec = spec[: qs.ndim - len(first.shape)]  # (*lead, nb, *per_block) -> (*lead, n)
        mesh = qs.sharding.mesh
        sharding = NamedSharding(_auto_mesh(mesh), PartitionSpec(*spec))
        out_dtype = np.dtype(dtype) if dtype is not None else q.dtype
        leaves = {k: _to_auto(v) for k, v in q.leaves().items()}
        out = _dequantize_sharded_fn(q.qtype, q.shape, out_dtype, sharding)(leaves)
        return _to_mesh(out, mesh)
    return dequantize_tensor(q, dtype)
