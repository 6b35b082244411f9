"""Reader cost against file size: many tiny tensors, many empty ones, one foreign-format one.

Each case runs in a fresh process (so peak RSS is its own): ``load_gguf`` of a GGUF file
with N zero-size tensors, N tensors of 8 float32 values, and one IQ1_S tensor (a format
only gguf-py decodes) of about 8 MB. Reports time per tensor, the header parse alone
(``inspect_gguf``), RSS growth over an idle ``import jquant``, and, as the same-run floor,
the cost of making one small JAX array (``jnp.asarray``), which every loaded leaf needs.

    python benchmarks/bench_readers.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import md_table, write_result  # noqa: E402

_CHILD = r"""
import json, resource, sys, time, warnings
import numpy as np, jax.numpy as jnp, jquant
path, n = sys.argv[1], int(sys.argv[2])
jnp.asarray(np.ones(8, np.float32)).block_until_ready()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); jquant.inspect_gguf(path); header = time.perf_counter() - t
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    t = time.perf_counter(); x = jquant.load_gguf(path); load = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
xs = [np.full(8, i, np.float32) for i in range(2000)]
t = time.perf_counter(); ys = [jnp.asarray(a) for a in xs]; floor = (time.perf_counter() - t) / 2000
print(json.dumps({"n": len(x), "header": header, "load": load, "rss_kib": rss, "floor": floor}))
"""


def _header(n_tensors: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, 0)


def _info(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    b = name.encode()
    d = b"".join(struct.pack("<Q", x) for x in dims)
    return (
        struct.pack("<Q", len(b))
        + b
        + struct.pack("<I", len(dims))
        + d
        + struct.pack("<IQ", ggml_type, offset)
    )


def _pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 32)


def make_files(folder: Path, n_zero: int, n_tiny: int, iq1_bytes: int) -> dict[str, Path]:
    zero = folder / "zero.gguf"
    zero.write_bytes(
        _pad(_header(n_zero) + b"".join(_info(f"t{i}", [0], 0, 0) for i in range(n_zero)))
    )
    tiny = folder / "tiny.gguf"
    head = _header(n_tiny) + b"".join(_info(f"t{i}", [8], 0, 32 * i) for i in range(n_tiny))
    tiny.write_bytes(_pad(head) + b"\0" * (32 * n_tiny))
    n_blocks = iq1_bytes // 50
    rows = 64
    n_blocks -= n_blocks % rows
    iq1 = folder / "iq1.gguf"
    raw = bytearray(os.urandom(n_blocks * 50))
    scale = struct.pack("<e", 0.01)
    for b in range(n_blocks):  # finite float16 scales
        raw[50 * b : 50 * b + 2] = scale
    iq1.write_bytes(_pad(_header(1) + _info("q", [n_blocks // rows * 256, rows], 19, 0)) + raw)
    return {"zero": zero, "tiny": tiny, "iq1_s": iq1}


def run_case(path: Path) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), "0"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(r.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_zero, n_tiny, iq1 = (20_000, 10_000, 1 << 20) if args.quick else (400_000, 100_000, 8 << 20)
    folder = Path(tempfile.mkdtemp(prefix="jquant-readers-"))
    files = make_files(folder, n_zero, n_tiny, iq1)
    rows = []
    for name, path in files.items():
        r = run_case(path)
        n = r["n"]
        size = path.stat().st_size
        out_bytes = (size // 50) * 256 * 4 if name == "iq1_s" else 0
        rows.append(
            [
                name,
                f"{n:,}",
                f"{size / 2**20:.1f} MiB",
                f"{r['load']:.2f} s",
                f"{1e6 * r['load'] / n:.1f}" if n > 1 else "",
                f"{1e6 * r['header'] / n:.1f}" if n > 1 else "",
                f"{1e6 * r['floor']:.1f}",
                f"{r['rss_kib'] / 1024:.0f} MiB",
                f"{r['rss_kib'] * 1024 / n:.0f}"
                if n > 1
                else f"{r['rss_kib'] * 1024 / out_bytes:.2f}x output",
            ]
        )
        print(rows[-1], flush=True)
    for p in files.values():
        p.unlink()
    table = md_table(
        [
            "file",
            "tensors",
            "file size",
            "load_gguf",
            "µs/tensor",
            "header µs/tensor",
            "jnp.asarray µs (floor)",
            "RSS growth",
            "bytes/tensor",
        ],
        rows,
    )
    from _common import machine

    text = (
        f"## Reader cost against file size{' (quick)' if args.quick else ''}\n\n"
        f"Machine: {machine()}\n\n"
        "One fresh process per file; RSS growth is over an idle `import jquant`. Zero-size "
        "leaves are shared, so they cost only the header parse; every other leaf is one JAX "
        "array, whose creation (`jnp.asarray` of 8 floats, same run) is the floor. The IQ1_S "
        "row's last column is peak RSS growth over the float32 output it decodes to.\n\n" + table
    )
    print(text)
    write_result("readers_quick" if args.quick else "readers", text)


if __name__ == "__main__":
    main()
