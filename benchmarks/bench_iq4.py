"""IQ4_NL / IQ4_XS quantize throughput: jquant (jitted) vs libggml's ggml_quantize_chunk, same run.

    python benchmarks/bench_iq4.py              # 1024 x 4096 N(0, 0.02) float32 (16 MiB)
    python benchmarks/bench_iq4.py --rows 256   # smaller

Medians of several runs (wall and process CPU time); compile time reported apart. GiB/s of
float32 input (wall). libggml runs single-threaded (ggml_quantize_chunk on all rows in one
call), jquant on every core XLA uses. The bytes are compared in the same run. Prints a
markdown table (no results file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from _common import machine, md_table, timed, wall_and_cpu  # noqa: E402
from _ggml_oracle import HAVE_GGML, ggml_quantize  # noqa: E402

from jquant._formats import iq4  # noqa: E402

GIB = 1024**3
FORMATS = [
    ("IQ4_NL", 20, iq4.quantize_iq4_nl, iq4.FIELDS_IQ4_NL),
    ("IQ4_XS", 23, iq4.quantize_iq4_xs, iq4.FIELDS_IQ4_XS),
]


def to_bytes(fields: dict, spec) -> np.ndarray:
    """Fields ``[rows, n_blocks, *shape]`` → ggml's uint8 rows."""
    parts = []
    for name, dt, shape in spec:
        a = np.ascontiguousarray(np.asarray(fields[name]).astype(dt))
        parts.append(a.view(np.uint8).reshape(*a.shape[: a.ndim - len(shape)], -1))
    out = np.concatenate(parts, axis=-1)
    return out.reshape(out.shape[0], -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ggml-repeats", type=int, default=3)
    args = p.parse_args()
    if not HAVE_GGML:
        sys.exit("libggml (llama-cpp-python) is needed for the comparison")

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    imatrix = (rng.standard_normal(args.cols) ** 2).astype(np.float32)
    xj = jnp.asarray(x)
    gib = x.nbytes / GIB
    rows = []
    for name, type_id, fn, spec in FORMATS:
        f = jax.jit(fn)
        for qw in (None, imatrix):
            qwj = None if qw is None else jnp.asarray(qw)

            def ours(f=f, qwj=qwj):
                return jax.block_until_ready(f(xj, qwj))

            t_compile, fields = timed(ours)
            t_ours, c_ours = wall_and_cpu(ours, args.repeats)
            t_ggml, c_ggml = wall_and_cpu(
                lambda qw=qw, t=type_id: ggml_quantize(x, t, qw), args.ggml_repeats
            )
            same = np.array_equal(to_bytes(fields, spec), ggml_quantize(x, type_id, qw))
            rows.append(
                [
                    name,
                    "yes" if qw is not None else "no",
                    f"{gib / t_ours:.3f}",
                    f"{gib / t_ggml:.4f}",
                    f"{t_ggml / t_ours:.1f}x",
                    f"{c_ours:.3f} / {c_ggml:.3f}",
                    f"{c_ggml / c_ours:.1f}x",
                    f"{t_compile:.1f}",
                    "yes" if same else "**NO**",
                ]
            )
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"IQ4 quantize, {args.rows}x{args.cols} N(0, 0.02) float32; {machine()}\n")
    print(
        md_table(
            [
                "format",
                "imatrix",
                "jquant GiB/s",
                "ggml GiB/s",
                "ratio",
                "CPU s jquant / ggml",
                "CPU ratio",
                "compile s",
                "bytes equal",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
