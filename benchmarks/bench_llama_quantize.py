"""Whole-process time: ``jquant quantize`` vs llama.cpp's quantizer, same file, same threads.

Generates two llama-architecture F16 GGUFs (a ~100M-parameter one and a small one),
then times, as separate processes (start-up, imports and compilation included):

* ``python -m jquant quantize IN -o OUT -t FTYPE -q`` (second run: the persistent
  compilation cache in ~/.cache/jquant/xla is warm; the first run is shown too), and
* ``llama_cpp.llama_model_quantize`` in a fresh Python process with ``nthread=2``
  (what ``llama-quantize IN OUT FTYPE 2`` runs).

Medians of 3. The ftype defaults to Q4_K_M and falls back to Q4_0 when this jquant has no
K-quant kernels. Usage::

    python benchmarks/bench_llama_quantize.py [--ftype Q4_K_M] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine, write_result  # noqa: E402
from tests._llama_models import write_llama  # noqa: E402

SIZES = {
    # ~100M parameters: 12 layers of 768 (GQA 12/4 heads), ffn 3072, vocab 32000
    "llama-100M": dict(
        n_embd=768, n_head=12, n_head_kv=4, n_layer=12, n_ff=3072, vocab=32000, tied=False
    ),
    "llama-small": dict(
        n_embd=256, n_head=8, n_head_kv=2, n_layer=4, n_ff=512, vocab=1000, tied=False
    ),
}

LLAMA_CODE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.nthread = 2
p.ftype = int(sys.argv[3])
if len(sys.argv) > 4:
    p.output_tensor_type = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


_CPU: list[float] = []


def _time(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one process; its CPU seconds (user + sys) go to _CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    _CPU.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall


def _pick_ftype(requested: str) -> tuple[str, bool]:
    """(ftype, whether output.weight must be forced to Q8_0 for lack of a Q6_K kernel)."""
    from jquant._llama.mixes import FTYPES, parse_ftype
    from jquant._llama.quantize import can_encode

    name = next(k for k, v in FTYPES.items() if v == parse_ftype(requested))
    if not can_encode("Q6_K"):
        if "_K" in name or name.startswith("IQ"):
            print(f"{name}: this jquant has no K-quant kernels; timing Q4_0 instead")
            name = "Q4_0"
        print("no Q6_K kernel: output.weight is forced to Q8_0 on both sides")
        return name, True
    return name, False


def _load(avg: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.1f}" for x in avg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ftype", default="Q4_K_M")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the small model only, one run")
    args = ap.parse_args()
    sizes = {"llama-small": SIZES["llama-small"]} if args.quick else SIZES
    if args.quick:
        args.repeats = 1
    from jquant._llama.mixes import FTYPES

    ftype, force_output = _pick_ftype(args.ftype)
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cache = tempfile.mkdtemp(prefix="jquant-xla-")
    env["JQUANT_CACHE_DIR"] = cache  # a fresh cache: the first run compiles, later ones reuse
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        for label, cfg in sizes.items():
            src = Path(d) / f"{label}-f16.gguf"
            write_llama(src, **cfg)
            n_params = (src.stat().st_size) // 2
            out = str(Path(d) / "out.gguf")
            jq = [
                sys.executable,
                "-m",
                "jquant",
                "quantize",
                str(src),
                "-o",
                out,
                "-t",
                ftype,
                "-q",
            ]
            jq += ["--output-tensor-type", "q8_0"] if force_output else []
            first = _time(jq, env)
            _CPU.clear()
            jq_times = [_time(jq, env) for _ in range(args.repeats)]
            jq_cpu = statistics.median(_CPU)
            ll = [sys.executable, "-c", LLAMA_CODE, str(src), out, str(FTYPES[ftype])]
            ll += ["8"] if force_output else []
            _CPU.clear()
            ll_times = [_time(ll, env) for _ in range(args.repeats)]
            ll_cpu = statistics.median(_CPU)
            j, ll_med = statistics.median(jq_times), statistics.median(ll_times)
            rows.append((label, n_params, first, j, ll_med, ll_med / j, jq_cpu, ll_cpu))
            print(
                f"{label}: ~{n_params / 1e6:.0f}M params, jquant first {first:.2f} s, "
                f"jquant {j:.2f} s ({jq_cpu:.2f} s CPU), llama.cpp {ll_med:.2f} s "
                f"({ll_cpu:.2f} s CPU), speed-up {ll_med / j:.2f}x"
            )
    md = [
        f"## jquant quantize vs llama.cpp ({ftype}{', output Q8_0' if force_output else ''}, "
        "whole process)",
        "",
        machine(),
        "",
        f"Load average (1/5/15 min) at the start: {_load(load_before)}; at the end: "
        f"{_load(os.getloadavg())} (the machine is shared: wall times are noisy, the "
        "same-run ratios and CPU times less so).",
        "",
        "Wall time of the whole process (median of the runs after the first), and its CPU "
        "time (user + sys), which a busy machine inflates less.",
        "",
        "| model | params | jquant 1st run | jquant | llama.cpp nthread=2 | llama.cpp / jquant "
        "| jquant CPU | llama.cpp CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, n, first, j, ll, r, jc, lc in rows:
        md.append(
            f"| {label} | {n / 1e6:.0f}M | {first:.2f} s | {j:.2f} s | {ll:.2f} s | {r:.2f}x "
            f"| {jc:.2f} s | {lc:.2f} s |"
        )
    path = write_result("llama_quantize" + ("_quick" if args.quick else ""), "\n".join(md))
    print("\n".join(md))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
