"""One process of the two-process ``jax.distributed`` run in tests/test_multihost.py.

Not a test: ``python tests/_multihost_worker.py --process-id I --port P --out DIR``. Both
processes join one global mesh of 8 CPU devices (4 each), build the same globally
sharded parameters with ``jax.make_array_from_callback`` (each process materialises only
its own shards), quantize and dequantize them with jquant's public API, check that every
result is still a global array of which this process holds only the shards on its own
devices, and save those local shards (with their global indices) to ``DIR/proc{I}.npz``
for the test to compare against single-process bytes.
"""

from __future__ import annotations

import argparse
import os
import sys

# the parameters both processes build, and the test rebuilds on one process
SEED = 20261201
FORMATS = ("q5_1", "bf16")  # q5_1 has every packed field (qs, d, m, qh)
LEAVES = {  # name: (shape, PartitionSpec entries)
    "col": ((64, 512), ("data", "model")),  # last axis 4 ways: 128 values per shard
    "row": ((256, 96), ("model", None)),
    "both": ((8, 16, 256), ("data", None, "model")),
    "ragged": ((16, 70), (("data", "model"), None)),  # 70-value rows, rows split 8 ways
}
TENSOR = ("col", "q8_0")  # also through quantize_tensor / dequantize_tensor


def full_params() -> dict:
    """The global parameters as NumPy arrays (identical in every process)."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in LEAVES.items()}


def _index(idx: tuple, shape: tuple) -> list[list[int]]:
    return [list(s.indices(n)[:2]) for s, n in zip(idx, shape, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=2,
        process_id=args.process_id,
        initialization_timeout=60,
    )
    import jquant

    assert jax.process_count() == 2 and jax.process_index() == args.process_id
    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    local = set(jax.local_devices())
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    assert set(mesh.devices.flat) == set(jax.devices())

    full = full_params()
    params = {}
    for k, (shape, spec) in LEAVES.items():
        sharding = NamedSharding(mesh, PartitionSpec(*spec))
        params[k] = jax.make_array_from_callback(shape, sharding, lambda i, a=full[k]: a[i])

    out: dict[str, np.ndarray] = {}

    def keep(key: str, arr: jax.Array) -> None:
        """Check ``arr`` is global with only this process's shards here; save those."""
        assert not arr.is_fully_addressable, key  # spans both processes' devices
        assert len(arr.sharding.device_set) == 8, key
        shards = arr.addressable_shards
        assert len(shards) == 4 and {s.device for s in shards} == local, key
        for j, s in enumerate(shards):
            out[f"{key}/{j}"] = np.asarray(s.data)
            out[f"{key}/{j}/index"] = np.asarray(_index(s.index, arr.shape), np.int64)

    for fmt in FORMATS:
        qp = jquant.quantize_model(params, fmt, min_size=0)
        back = jquant.dequantize_model(qp)
        for k in LEAVES:
            q = qp[k]
            assert isinstance(q, jquant.QuantizedTensor), (fmt, k)
            for field, leaf in q.leaves().items():
                keep(f"model/{fmt}/{k}/{field}", leaf)
            assert back[k].sharding.is_equivalent_to(params[k].sharding, len(q.shape)), k
            keep(f"model/{fmt}/{k}/dequantized", back[k])

    # quantize_tensor: checked on a mesh with Auto axes; on jax.make_mesh's default
    # Explicit axes only unchecked (its checked path raises ShardingTypeError there, in
    # one process too: see the report of the branch that added this test)
    k, fmt = TENSOR
    auto = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    x_auto = jax.make_array_from_callback(
        full[k].shape, NamedSharding(auto, params[k].sharding.spec), lambda i: full[k][i]
    )
    for name, x, check in (("auto", x_auto, None), ("explicit", params[k], False)):
        q = jquant.quantize_tensor(x, fmt, check=check)
        for field, leaf in q.leaves().items():
            keep(f"tensor-{name}/{fmt}/{k}/{field}", leaf)
        keep(f"tensor-{name}/{fmt}/{k}/dequantized", jquant.dequantize_tensor(q))

    np.savez(os.path.join(args.out, f"proc{args.process_id}.npz"), **out)
    jax.distributed.shutdown()
    print(f"process {args.process_id}: {len(out) // 2} local shards saved", file=sys.stderr)


if __name__ == "__main__":
    main()
