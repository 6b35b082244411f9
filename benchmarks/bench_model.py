"""Whole-model quantization: jquant.quantize_model vs a per-leaf gguf.quants loop.

A GPT-2-small-shaped random pytree (124M parameters, 148 leaves: wte 50257x768,
wpe 1024x768, 12 blocks of ln_1/attn.c_attn/attn.c_proj/ln_2/mlp.c_fc/mlp.c_proj
weights and biases, ln_f) is quantized to Q4_0 and Q8_0 end to end: matrices
quantized, 1-D leaves kept (jquant's defaults; the gguf loop quantizes the same
matrices). Reported:

* first call, compile included (``jax.clear_caches()`` before each repetition), and
  second call, compiled: medians in one process, beside the gguf loop's median;
* the first call of a fresh process, without and with jax's persistent compilation
  cache (``jax_compilation_cache_dir``, filled by an earlier process);
* peak RSS growth during one compiled call in a fresh process (jquant and the gguf
  loop), beside the packed output's size.

Usage: ``python benchmarks/bench_model.py [--quick] [--reps N]``. Writes only
``benchmarks/results/model.md`` (``model_quick.md`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


def gpt2_params(n_layer: int, d: int, vocab: int, ctx: int, seed: int = 0) -> dict:
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def w(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02)

    def b(n):
        return jnp.asarray(rng.standard_normal(n, dtype=np.float32) * 0.01)

    h = {}
    for i in range(n_layer):
        h[str(i)] = {
            "ln_1": {"g": b(d), "b": b(d)},
            "attn": {
                "c_attn": {"w": w(d, 3 * d), "b": b(3 * d)},
                "c_proj": {"w": w(d, d), "b": b(d)},
            },
            "ln_2": {"g": b(d), "b": b(d)},
            "mlp": {
                "c_fc": {"w": w(d, 4 * d), "b": b(4 * d)},
                "c_proj": {"w": w(4 * d, d), "b": b(d)},
            },
        }
    return {"wte": w(vocab, d), "wpe": w(ctx, d), "h": h, "ln_f": {"g": b(d), "b": b(d)}}


class PeakRSS:
    """Peak resident set size above the level at start, sampled in a thread."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval

    def __enter__(self):
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.base


def timed(fn, reps: int, before=None):
    import jax

    ts = []
    for _ in range(reps):
        if before is not None:
            before()
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t0)
        del out
    return ts


def mib(n: float) -> str:
    v = n / 2**20
    return f"{v:,.0f} MiB" if abs(v) >= 100 else f"{v:.1f} MiB"


def child(args) -> int:
    """Measurements that need a fresh process; prints one JSON line."""
    import json

    import gguf
    import jax
    import jax.numpy as jnp

    import jquant

    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jnp.zeros(1).block_until_ready()
    params = gpt2_params(**SHAPES[args.quick])
    mats = [np.asarray(x) for x in jax.tree_util.tree_leaves(params) if x.ndim >= 2]
    out: dict = {}
    if args.child == "first":  # first call in a new process, compile included
        for fmt in FORMATS:
            t0 = time.perf_counter()
            jax.block_until_ready(jquant.quantize_model(params, fmt))
            out[fmt] = time.perf_counter() - t0
    elif args.child in FORMATS:  # peak RSS of one call, compiled beforehand
        fmt = args.child
        warm = jnp.ones((jquant._model.model.CHUNK_BLOCKS, 32))  # compiles the same programs
        jax.block_until_ready(jquant.quantize_model({"w": warm, "v": warm[:3]}, fmt))
        gc.collect()
        with PeakRSS() as mem:
            qp = jquant.quantize_model(params, fmt)
            jax.block_until_ready(qp)
        out["jquant"] = mem.extra
        del qp
        gc.collect()
        gtype = gguf.GGMLQuantizationType[fmt]
        with PeakRSS() as mem:
            ref = [gguf.quants.quantize(m, gtype) for m in mats]
        out["gguf"] = mem.extra
        del ref
    print(json.dumps(out))
    return 0


def run_child(mode: str, quick: bool, cache: str | None = None) -> dict:
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--child", mode] + (["--quick"] if quick else [])
    if cache:
        cmd += ["--cache", cache]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


FORMATS = ("Q4_0", "Q8_0")
SHAPES = {
    True: dict(n_layer=2, d=64, vocab=500, ctx=64),
    False: dict(n_layer=12, d=768, vocab=50257, ctx=1024),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model, for smoke tests")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per measurement")
    ap.add_argument("--cache", default=None, help="persistent compilation cache directory")
    ap.add_argument("--out", default=None, help="default: results/model.md (model_quick.md)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    import jax

    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import gguf
    import jax.numpy as jnp

    import jquant

    jnp.zeros(1).block_until_ready()  # backend start-up is not the library's cost
    reps = args.reps or (2 if args.quick else 5)
    params = gpt2_params(**SHAPES[args.quick])
    leaves = jax.tree_util.tree_leaves(params)
    n_params = sum(x.size for x in leaves)
    params_bytes = sum(x.nbytes for x in leaves)
    mats = [np.asarray(x) for x in leaves if x.ndim >= 2]
    print(
        f"model: {n_params:,} params, {len(leaves)} leaves ({len(mats)} matrices), {mib(params_bytes)}"
    )

    rows = {}
    for fmt in FORMATS:
        gtype = gguf.GGMLQuantizationType[fmt]
        qfn = lambda fmt=fmt: jquant.quantize_model(params, fmt)  # noqa: E731
        first = timed(qfn, reps, before=jax.clear_caches)
        second = timed(qfn, reps)
        ref = timed(lambda gtype=gtype: [gguf.quants.quantize(m, gtype) for m in mats], reps)
        qp = qfn()
        packed = sum(
            x.nbytes
            for x in jax.tree_util.tree_leaves(
                qp, is_leaf=lambda x: isinstance(x, jquant.QuantizedTensor)
            )
        )
        del qp
        rows[fmt] = dict(
            first=statistics.median(first),
            second=statistics.median(second),
            gguf=statistics.median(ref),
            packed=packed,
        )
    n_leaves, n_mats = len(leaves), len(mats)
    params = leaves = mats = qfn = None  # free them before the child processes run
    gc.collect()
    # fresh processes: first call of a new process, with and without the persistent
    # compilation cache, and peak RSS
    fresh = run_child("first", args.quick)
    with tempfile.TemporaryDirectory() as cache:
        run_child("first", args.quick, cache)  # fills the cache
        cached = run_child("first", args.quick, cache)
    for fmt, r in rows.items():
        r["fresh"], r["cached"] = fresh[fmt], cached[fmt]
        rss = run_child(fmt, args.quick)
        r["rss"], r["rss_gguf"] = rss["jquant"], rss["gguf"]
        r["x1"], r["x2"] = r["gguf"] / r["first"], r["gguf"] / r["second"]
        print(
            f"{fmt}: first {r['first']:.3f}s (new process {r['fresh']:.3f}s, with cache "
            f"{r['cached']:.3f}s)  second {r['second']:.3f}s  gguf {r['gguf']:.3f}s  -> "
            f"{r['x1']:.1f}x / {r['x2']:.1f}x; peak RSS +{mib(r['rss'])} "
            f"(gguf +{mib(r['rss_gguf'])}, packed {mib(r['packed'])})"
        )

    name = "tiny GPT-2-shaped (`--quick`)" if args.quick else "GPT-2-small-shaped"
    lines = [
        "## quantize_model: a whole model vs a per-leaf gguf.quants loop",
        "",
        f"Machine: {machine()}.",
        "",
        f"Model: {name} random pytree, {n_params:,} float32 parameters in {n_leaves} "
        f"leaves, {mib(params_bytes)}; the {n_mats} matrices are quantized and the "
        "1-D leaves kept (jquant's defaults); the gguf loop runs `gguf.quants.quantize` "
        "over the same matrices. Medians of "
        f"{reps} repetitions in one process: *first call* after `jax.clear_caches()`, so "
        "each repetition compiles again; *second call* compiled. *New process* is one "
        "first call in a fresh process, without and with jax's persistent compilation "
        "cache (filled by an earlier process). *Peak RSS* is how far the process grew "
        "above its size with the params resident, during one compiled call, in a fresh "
        "process (sampled every 5 ms); the packed output is part of it.",
        "",
        "| format | first call (compile incl.) | new process | new process, cache | second call | gguf.quants loop | speed-up first | speed-up second | peak RSS growth (gguf loop) | packed output |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fmt, r in rows.items():
        lines.append(
            f"| {fmt} | {r['first']:.3f} s | {r['fresh']:.3f} s | {r['cached']:.3f} s | "
            f"{r['second']:.3f} s | {r['gguf']:.3f} s | **{r['x1']:.1f}x** | **{r['x2']:.1f}x** | "
            f"{mib(r['rss'])} ({mib(r['rss_gguf'])}) | {mib(r['packed'])} |"
        )
    lines += [
        "",
        "How: leaves are grouped by format and their 32-value blocks streamed through "
        f"chunks of {jquant._model.model.CHUNK_BLOCKS:,} blocks (4 MiB of float32, cache-sized), "
        "one jitted program per format and chunk size for any model; a big leaf's "
        "chunks are read in place (no copy) and packed results are written straight "
        "into the output arrays, so memory stays near params + packed output. "
        "Compilation is a fixed cost of roughly 0.1 s per format per process; "
        "`jax.config.update('jax_compilation_cache_dir', DIR)` (with "
        "`jax_persistent_cache_min_compile_time_secs=0`) removes most of it in later "
        "processes.",
    ]
    results = Path(__file__).resolve().parent / "results"
    out = Path(args.out or results / ("model_quick.md" if args.quick else "model.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
