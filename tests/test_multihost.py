"""Multi-host for real: two ``jax.distributed`` processes on localhost, one global mesh.

Each process (tests/_multihost_worker.py) gets 4 fake CPU devices; gloo carries the
cross-process collectives, so the 8 devices form one global ``(2, 4)`` mesh as two hosts'
accelerators would. The processes quantize and dequantize globally sharded parameters
with ``quantize_model`` / ``dequantize_model`` / ``quantize_tensor``, check that each
holds only the shards on its own devices, and save them; here, in a plain single
process, every saved shard must equal the same slice of the single-process result.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jquant

from . import _multihost_worker as W

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax
    except ImportError:
        return False
    return hasattr(_jax, "make_gloo_tcp_collectives")


pytestmark = pytest.mark.skipif(
    not _gloo_available(), reason="this jaxlib has no gloo CPU collectives for jax.distributed"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[dict[str, np.ndarray]]:
    """Run the two processes once; their saved local shards, per process."""
    out = tmp_path_factory.mktemp("multihost")
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    port = _free_port()
    cmd = [sys.executable, str(ROOT / "tests" / "_multihost_worker.py"), "--port", str(port)]
    procs = [
        subprocess.Popen(
            [*cmd, "--process-id", str(i), "--out", str(out)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    logs, timed_out = [], False
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            timed_out = True
            for q in procs:
                q.kill()
            logs.append(p.communicate()[0])
    tails = [
        "\n".join(line for line in log.splitlines() if "[Gloo]" not in line)[-3000:] for log in logs
    ]
    if timed_out:
        pytest.fail(f"the two processes did not finish in {TIMEOUT_S} s:\n" + "\n".join(tails))
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{tails[i]}"
    return [dict(np.load(out / f"proc{i}.npz")) for i in range(2)]


def _expected() -> dict[str, np.ndarray]:
    """Single-process results for every key the workers save."""
    full = W.full_params()
    want = {}

    def add(prefix: str, x: np.ndarray, fmt: str) -> None:
        q = jquant.quantize_tensor(x, fmt)
        for field, leaf in q.leaves().items():
            want[f"{prefix}/{field}"] = np.asarray(leaf)
        want[f"{prefix}/dequantized"] = np.asarray(jquant.dequantize_tensor(q))

    for fmt in W.FORMATS:
        for k in W.LEAVES:
            add(f"model/{fmt}/{k}", full[k], fmt)
    k, fmt = W.TENSOR
    for name in ("auto", "explicit"):
        add(f"tensor-{name}/{fmt}/{k}", full[k], fmt)
    return want


def _by_array(saved: dict[str, np.ndarray]) -> dict[str, list[tuple[tuple, np.ndarray]]]:
    """``{array key: [(global index as slices, shard data), ...]}``."""
    arrays: dict[str, list] = {}
    for key, data in saved.items():
        if key.endswith("/index"):
            continue
        base, _ = key.rsplit("/", 1)
        idx = tuple(slice(int(a), int(b)) for a, b in saved[f"{key}/index"])
        arrays.setdefault(base, []).append((idx, data))
    return arrays


def test_each_process_holds_only_its_shards_and_they_equal_one_process(shards):
    want = _expected()
    per_proc = [_by_array(s) for s in shards]
    for arrays in per_proc:
        assert set(arrays) == set(want)
    # leaves whose spec uses both mesh axes have 8 distinct shards: 4 in each process
    split = {k for k, (_, spec) in W.LEAVES.items() if _uses_both_axes(spec)}
    assert split == {"col", "both", "ragged"}
    for key, ref in want.items():
        covered = np.zeros(ref.shape, np.int32)
        for i, arrays in enumerate(per_proc):
            mine = np.zeros(ref.shape, bool)
            for idx, data in arrays[key]:
                # npz keeps bfloat16 as raw 2-byte void: compare the bytes of this
                # process's shard with the single-process bytes at its global index
                assert data.dtype.itemsize == ref.dtype.itemsize, (key, i)
                np.testing.assert_array_equal(
                    np.ascontiguousarray(data).view(np.uint8),
                    np.ascontiguousarray(ref[idx]).view(np.uint8),
                    err_msg=f"{key} process {i}",
                )
                mine[idx] = True
            covered += mine
            if key.split("/")[2] in split:  # this process holds exactly half, not all
                assert 2 * int(mine.sum()) == ref.size, (key, i, int(mine.sum()), ref.size)
        # together the two processes hold every element of every array
        assert covered.min() >= 1, key


def _uses_both_axes(spec) -> bool:
    names = set()
    for entry in spec:
        names |= set(entry) if isinstance(entry, tuple) else {entry}
    return {"data", "model"} <= names
