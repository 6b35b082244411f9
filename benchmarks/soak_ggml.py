"""Soak test: millions of random blocks per format, jquant's bytes vs libggml's ggml_quantize_chunk.

    python benchmarks/soak_ggml.py                      # 10**6 blocks per format and mode
    python benchmarks/soak_ggml.py --blocks 100000 --formats IQ4_NL Q4_0

Each format in ``KERNELS`` runs on chunks of random rows (mixed distributions, per-row
scales 1e-5..1e3, outlier columns, .5 ties, zero and constant blocks, negative extremes), with
a fresh random importance matrix (non-negative, with zeros) per chunk for the weighted mode,
and counts the blocks whose bytes differ from libggml's. Prints a markdown table.

Every block format of the format table is soaked through the public ``quantize_tensor``
(``imatrix=`` for the weighted mode), so a new format's record is all it takes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from _common import machine, md_table  # noqa: E402
from _ggml_oracle import HAVE_GGML, ggml_quantize  # noqa: E402

import jquant  # noqa: E402
from jquant._formats.registry import formats  # noqa: E402

Quantize = Callable[[jax.Array, jax.Array | None], np.ndarray]
"""``(x [rows, n] float32, qw [n] | None) -> uint8 [rows, row_bytes]`` in ggml's layout."""


def tensor_kernel(fmt: str) -> Quantize:
    """A :data:`Quantize` through the public ``jquant.quantize_tensor`` (``imatrix=`` when given)."""
    plain = jax.jit(lambda x: jquant.quantize_tensor(x, fmt, check=False))
    weighted = jax.jit(lambda x, qw: jquant.quantize_tensor(x, fmt, check=False, imatrix=qw))

    def run(x, qw):
        return (plain(x) if qw is None else weighted(x, qw)).to_bytes()

    return run


@dataclass(frozen=True)
class Kernel:
    name: str
    ggml_type: int
    block: int
    quantize: Quantize
    imatrix: bool = True  # whether the kernel takes importance weights


KERNELS = [  # every block format of the format table, through the public API
    Kernel(spec.name, spec.ggml_type, spec.block_size, tensor_kernel(spec.name),
           imatrix=spec.supports_imatrix)
    for spec in formats()
    if spec.is_block_quantized
]  # fmt: skip


def random_rows(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Mixed distributions and scales, with the blocks ggml treats specially (32-value groups)."""
    kind = rng.integers(0, 6, (rows, 1))
    x = np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3, kind == 4],
        [
            rng.standard_normal((rows, n)),
            rng.laplace(size=(rows, n)),
            rng.uniform(0, 3, (rows, n)),
            rng.integers(-16, 17, (rows, n)) * 0.5,
            rng.standard_normal((rows, n)) * np.where(rng.random(n) < 0.02, 25.0, 1.0),
        ],
        rng.standard_t(2, (rows, n)),
    )
    x = x * 10.0 ** rng.uniform(-5, 3, (rows, 1))
    groups = x.reshape(rows, -1, 32)
    pick = rng.random(groups.shape[:2])
    groups[pick < 0.01] = 0.0
    const = (pick >= 0.01) & (pick < 0.02)
    groups[const] = rng.standard_normal((int(const.sum()), 1))
    neg = (pick >= 0.02) & (pick < 0.04)
    groups[neg, 5] = -np.abs(groups[neg]).max(-1) * 2
    tie = (pick >= 0.04) & (pick < 0.05)
    groups[tie, 3] = -np.abs(groups[tie]).max(-1) - 1
    groups[tie, 9] = -groups[tie, 3]
    return x.astype(np.float32)


def random_imatrix(rng: np.random.Generator, n: int) -> np.ndarray:
    qw = rng.exponential(1.0, n) * 10.0 ** rng.uniform(-3, 3)
    qw[rng.random(n) < 0.05] = 0.0
    return qw.astype(np.float32)


def soak(kernel: Kernel, weighted: bool, blocks: int, n: int, chunk_values: int, seed: int):
    """(mismatching blocks, blocks run, first-call seconds, jquant seconds, ggml seconds).

    The first chunk's call (which compiles) is timed apart; it is checked like the others.
    """
    rng = np.random.default_rng([seed, kernel.ggml_type, weighted])
    rows = max(1, chunk_values // n)
    per_chunk = rows * n // kernel.block
    bad = done = 0
    t_first = t_ours = t_ggml = 0.0
    while done < blocks:
        x = random_rows(rng, rows, n)
        qw = random_imatrix(rng, n) if weighted else None
        xj, qwj = jnp.asarray(x), None if qw is None else jnp.asarray(qw)
        t = time.perf_counter()
        ours = kernel.quantize(xj, qwj)
        if done == 0:
            t_first = time.perf_counter() - t
        else:
            t_ours += time.perf_counter() - t
        t = time.perf_counter()
        ref = ggml_quantize(x, kernel.ggml_type, qw)
        t_ggml += time.perf_counter() - t
        size = ref.shape[1] * kernel.block // n
        bad += int((ours.reshape(-1, size) != ref.reshape(-1, size)).any(-1).sum())
        done += per_chunk
    return bad, done, t_first, t_ours, t_ggml


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=10**6, help="blocks per format and mode")
    p.add_argument("--formats", nargs="*", help="names from KERNELS (default: all)")
    p.add_argument("--cols", type=int, default=4096, help="row length (a multiple of 256)")
    p.add_argument("--chunk-values", type=int, default=1 << 22, help="values per chunk")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not HAVE_GGML:
        sys.exit("libggml (llama-cpp-python) is needed: it is the oracle")
    kernels = [k for k in KERNELS if not args.formats or k.name in args.formats]
    rows = []
    for k in kernels:
        for weighted in (False, True) if k.imatrix else (False,):
            bad, done, t_first, t_ours, t_ggml = soak(
                k, weighted, args.blocks, args.cols, args.chunk_values, args.seed
            )
            rows.append(
                [
                    k.name,
                    "yes" if weighted else "no",
                    f"{bad} / {done}",
                    f"{t_first:.1f}",
                    f"{t_ours:.1f}",
                    f"{t_ggml:.1f}",
                ]
            )
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    headers = ["format", "imatrix", "mismatching blocks / total"]
    headers += ["first call s", "jquant s (rest)", "ggml s (all)"]
    text = (
        f"## Soak: random blocks vs libggml's ggml_quantize_chunk\n\n"
        f"`python benchmarks/soak_ggml.py --blocks {args.blocks}` (seed {args.seed}, rows of "
        f"{args.cols}); {machine()}. Mixed distributions, row scales 1e-5..1e3, outlier "
        f"columns, .5 ties, zero and constant blocks; a fresh random importance matrix (with "
        f"zeros) per chunk in the weighted mode.\n\n{md_table(headers, rows)}\n"
    )
    print(text)
    if not args.formats:  # a full run replaces the results section
        (Path(__file__).parent / "results" / "soak.md").write_text(text)


if __name__ == "__main__":
    main()
