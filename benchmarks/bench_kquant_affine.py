"""Q4_K / Q5_K / Q2_K (and weighted Q4_1/Q5_1) quantizer speed: jquant vs libggml, same run.

    python benchmarks/bench_kquant_affine.py                  # 1024 x 4096 N(0, 0.02)
    python benchmarks/bench_kquant_affine.py --rows 128       # smaller, quicker
    python benchmarks/bench_kquant_affine.py --formats Q4_K --no-imatrix

Times the jitted jquant kernel (median of ``--repeats`` runs after a warm-up call whose
time, mostly compilation, is reported apart) and libggml's single-threaded
``ggml_quantize_chunk`` (from llama-cpp-python) on the same matrix, with and without an
importance matrix, checks that the bytes are equal, and prints a markdown table of GiB/s
of float32 input (medians) and the jquant/ggml speed ratio, of the medians and of the best
runs (the latter is steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from _common import machine, md_table  # noqa: E402

from jquant._formats import kquant_affine as ka  # noqa: E402
from tests import _ggml_oracle  # noqa: E402

GIB = 1024**3
FORMATS = {
    "Q4_K": (ka.quantize_q4_k, ka.FIELDS_Q4_K, 12),
    "Q5_K": (ka.quantize_q5_k, ka.FIELDS_Q5_K, 13),
    "Q2_K": (ka.quantize_q2_k, ka.FIELDS_Q2_K, 10),
    "Q4_1": (ka.quantize_q4_1_weighted, ka.FIELDS_Q4_1, 3),
    "Q5_1": (ka.quantize_q5_1_weighted, ka.FIELDS_Q5_1, 7),
}
WEIGHTED_ONLY = {"Q4_1", "Q5_1"}


def to_bytes(fields, spec) -> np.ndarray:
    parts = []
    for name, dtype, shape in spec:
        a = np.ascontiguousarray(np.asarray(fields[name]).astype(dtype))
        parts.append(a.reshape(*a.shape[: a.ndim - len(shape)], -1).view(np.uint8))
    b = np.concatenate(parts, axis=-1)
    return b.reshape(*b.shape[:-2], -1)


def times(fn, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls (``fn`` blocks until done)."""
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", nargs="*", default=list(FORMATS))
    ap.add_argument("--no-imatrix", action="store_true", help="skip the importance-matrix runs")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x_np = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    qw_np = rng.exponential(1.0, args.cols).astype(np.float32)
    x, qw = jnp.asarray(x_np), jnp.asarray(qw_np)
    gib = x_np.nbytes / GIB
    have_ggml = _ggml_oracle.HAVE_GGML
    print(machine())
    print(f"{args.rows} x {args.cols} float32 N(0, 0.02); median of {args.repeats} runs\n")

    rows = []
    for name in args.formats:
        quantize, spec, ggml_type = FORMATS[name]
        fn = jax.jit(quantize)
        for use_qw in (False, True):
            if (use_qw and args.no_imatrix) or (not use_qw and name in WEIGHTED_ONLY):
                continue
            call_args = (x, qw) if use_qw else (x,)

            def run(fn=fn, call_args=call_args):
                return jax.block_until_ready(fn(*call_args))

            t0 = time.perf_counter()
            fields = run()
            t_first = time.perf_counter() - t0
            jq = times(run, args.repeats)
            t_jq = statistics.median(jq)
            ours = to_bytes(fields, spec)
            if have_ggml:
                im = qw_np if use_qw else None
                want = _ggml_oracle.ggml_quantize(x_np, ggml_type, im)
                c = times(
                    lambda im=im, ggml_type=ggml_type: _ggml_oracle.ggml_quantize(
                        x_np, ggml_type, im
                    ),
                    args.repeats,
                )
                t_c = statistics.median(c)
                same = "yes" if np.array_equal(ours, want) else "**NO**"
                c_speed, ratio = f"{gib / t_c:.3f}", f"{t_c / t_jq:.2f}x"
                best = f"{min(c) / min(jq):.2f}x"
            else:
                same, c_speed, ratio, best = "n/a", "n/a", "n/a", "n/a"
            rows.append(
                [
                    name,
                    "yes" if use_qw else "no",
                    f"{gib / t_jq:.3f}",
                    c_speed,
                    ratio,
                    best,
                    same,
                    f"{t_first - t_jq:.1f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    print()
    headers = ["format", "imatrix", "jquant GiB/s", "ggml GiB/s", "jquant/ggml"]
    headers += ["best-run ratio", "bytes equal"]
    print(md_table([*headers, "compile s"], rows))


if __name__ == "__main__":
    main()
