"""Structural fuzzing of jquant's GGUF and safetensors readers.

Mutates one structural field at a time (see ``tests/_fuzz.py``) of a jquant GGUF file,
a foreign (llama.cpp-style) GGUF file and a safetensors file, reads every result fully
and counts outcomes: each must load or raise ``FileFormatError``; any other exception
is a crash and is printed. Reports the slowest case and the process's peak memory.

    python benchmarks/fuzz_readers.py [--cases 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from tests._fuzz import check_case, mutate_gguf, mutate_safetensors, seed_files  # noqa: E402


def run(n_cases: int, seed: int, verbose: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    folder = Path(tempfile.mkdtemp(prefix="jquant-fuzz-"))
    base = seed_files(folder)
    names = list(base)
    counts = {n: {"ok": 0, "error": 0, "crash": 0} for n in names}
    slowest = (0.0, "")
    crashes = []
    t_all = time.perf_counter()
    for k in range(n_cases):
        name = names[k % len(names)]
        kind, seed_data = base[name]
        if kind == "gguf":
            data = mutate_gguf(seed_data, rng)
            path = folder / "case.gguf"
        else:
            data = mutate_safetensors(*seed_data, rng)
            path = folder / "case.safetensors"
        path.write_bytes(data)
        t0 = time.perf_counter()
        try:
            outcome = check_case(str(path), kind)
        except Exception as e:  # noqa: BLE001 - what the fuzzer is looking for
            outcome = "crash"
            crashes.append((name, k, f"{type(e).__name__}: {e}"[:300]))
            if verbose and len(crashes) <= 10:
                keep = folder / f"crash-{k}.{kind}"
                keep.write_bytes(data)
                print(f"crash #{k} ({name}, kept in {keep}):", file=sys.stderr)
                traceback.print_exc()
        dt = time.perf_counter() - t0
        if dt > slowest[0]:
            slowest = (dt, f"{name} #{k}")
        counts[name][outcome] += 1
    total = time.perf_counter() - t_all
    for p in folder.glob("case.*"):
        p.unlink()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "cases": n_cases,
        "counts": counts,
        "crashes": crashes,
        "seconds": total,
        "slowest_case_s": slowest,
        "peak_rss_mib": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    r = run(args.cases, args.seed)
    from _common import machine, md_table, write_result

    rows = [[name, c["ok"], c["error"], c["crash"]] for name, c in r["counts"].items()]
    text = (
        f"## Reader fuzzing: {r['cases']:,} structurally mutated files\n\n"
        f"Machine: {machine()}\n\n"
        "One field of each file's structure set to an edge value (header counts, string "
        "lengths, value and tensor types, dimensions, offsets, alignment, jquant's JSON "
        "metadata with its checksum fixed up, safetensors JSON fields, overlapping ranges, "
        "lying header lengths; see `tests/_fuzz.py`), then read fully. Each must load or "
        "raise `FileFormatError`; anything else is a crash.\n\n"
        + md_table(["seed file", "loaded", "FileFormatError", "crash"], rows)
        + f"\n\n{r['seconds']:.1f} s in all ({1e3 * r['seconds'] / r['cases']:.2f} ms per case); "
        f"slowest case {1e3 * r['slowest_case_s'][0]:.0f} ms ({r['slowest_case_s'][1]}); "
        f"peak RSS of the whole run {r['peak_rss_mib']:.0f} MiB.\n"
    )
    print(text)
    if args.cases >= 10_000:
        write_result("fuzz_readers", text)
    sys.exit(1 if r["crashes"] else 0)


if __name__ == "__main__":
    main()
