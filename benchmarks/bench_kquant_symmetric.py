"""Q6_K, Q3_K and weighted Q4_0/Q5_0: jquant's jitted quantizers vs libggml, same run.

    python benchmarks/bench_kquant_symmetric.py               # 1024 x 4096 N(0, 0.02)
    python benchmarks/bench_kquant_symmetric.py --rows 256    # quicker

libggml's ``ggml_quantize_chunk`` (single thread, from llama-cpp-python) quantizes the same
matrix, without and with an importance matrix; every jquant result is compared byte for
byte with it. Throughput is float32 input bytes per second of wall time, median of
``--repeats`` runs after a warm-up whose time (mostly compilation) is reported apart; the
speed ratio is given for wall time and for process CPU time (XLA may use every core, the C
uses one). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _common import machine, md_table, timed, wall_and_cpu  # noqa: E402

from jquant._formats import kquant_symmetric as ks  # noqa: E402
from tests import _ggml_oracle as oracle  # noqa: E402
from tests.test_kquant_symmetric import to_bytes  # noqa: E402

GIB = 1024**3
LEGACY_Q4_0 = (("d", np.dtype("<f2"), ()), ("qs", np.dtype("u1"), (16,)))
LEGACY_Q5_0 = (
    ("d", np.dtype("<f2"), ()),
    ("qh", np.dtype("<u4"), ()),
    ("qs", np.dtype("u1"), (16,)),
)

# name, ggml type id, fields, quantizer, whether it runs without weights
FORMATS = [
    ("Q6_K", 14, ks.FIELDS_Q6_K, ks.quantize_q6_k, True),
    ("Q3_K", 11, ks.FIELDS_Q3_K, ks.quantize_q3_k, True),
    ("Q4_0", 2, LEGACY_Q4_0, ks.quantize_q4_0_weighted, False),
    ("Q5_0", 6, LEGACY_Q5_0, ks.quantize_q5_0_weighted, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", default="Q6_K,Q3_K,Q4_0,Q5_0")
    args = parser.parse_args()
    if not oracle.HAVE_GGML:
        sys.exit("libggml (llama-cpp-python) is needed for the comparison")

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    # An importance matrix like llama-imatrix's: mean squared activations per column.
    qw = (rng.standard_normal((64, args.cols)) ** 2).mean(0).astype(np.float32)
    gib = x.nbytes / GIB
    wanted = set(args.formats.split(","))
    rows = []
    for name, ggml_type, spec, fn, plain in FORMATS:
        if name not in wanted:
            continue
        jitted = jax.jit(fn)
        for weights in [None, qw] if plain else [qw]:
            call_args = (x,) if weights is None else (x, weights)
            want = oracle.ggml_quantize(x, ggml_type, weights)
            c_wall, c_cpu = wall_and_cpu(
                lambda: oracle.ggml_quantize(x, ggml_type, weights),  # noqa: B023
                args.repeats,
            )
            t_compile, out = timed(lambda: jax.block_until_ready(jitted(*call_args)))  # noqa: B023
            exact = np.array_equal(to_bytes(out, spec), want)
            j_wall, j_cpu = wall_and_cpu(
                lambda: jax.block_until_ready(jitted(*call_args)),  # noqa: B023
                args.repeats,
            )
            rows.append(
                [
                    name,
                    "yes" if weights is not None else "no",
                    f"{gib / c_wall:.3f}",
                    f"{gib / j_wall:.3f}",
                    f"{c_wall / j_wall:.2f}x",
                    f"{c_cpu / j_cpu:.2f}x",
                    f"{t_compile:.1f}",
                    "yes" if exact else "**NO**",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(f"{args.rows} x {args.cols} float32 N(0, 0.02); {machine()}")
    print()
    headers = [
        "type",
        "imatrix",
        "ggml C GiB/s",
        "jquant GiB/s",
        "jquant / C (wall)",
        "jquant / C (CPU time)",
        "warm-up s",
        "bytes equal",
    ]
    print(md_table(headers, rows))


if __name__ == "__main__":
    main()
