"""Streaming conversion: a >= 1 GiB .safetensors checkpoint -> quantized GGUF, peak memory.

The script writes a float32 checkpoint (8 matrices of 4096x8192, 128 MiB each, plus an
embedding and norm scales: 1.06 GiB) into a temporary folder, tensor by tensor, then
runs ``jquant.convert_safetensors`` (Q4_0, embedding Q8_0, 1-D tensors kept) in a
fresh child process and reports, from that process:

* its RSS after importing jax/jquant and a warm-up conversion (the baseline), and its
  peak RSS over the whole run (``ru_maxrss``), next to the largest tensor's size;
* the conversion's wall time and throughput (input bytes per second);
* a byte-exact spot check of one converted tensor against ``quantize_tensor``.

The checkpoint and the output are deleted at the end. One conversion only (it takes
about a minute on 2 cores). ``--quick`` uses a 4 MiB checkpoint (seconds) and writes
``results/convert_quick.md``; the full run writes ``results/convert.md``.

Usage: ``python benchmarks/bench_convert.py [--quick] [--format q4_0]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, md_table, write_result  # noqa: E402

MiB = 2**20


def layout(quick: bool) -> dict[str, tuple[int, ...]]:
    if quick:
        mats, (r, c), embed, d = 4, (256, 1024), (1024, 256), 256
    else:
        mats, (r, c), embed, d = 8, (4096, 8192), (8192, 1024), 8192
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": embed}
    for i in range(mats):
        shapes[f"model.layers.{i // 2}.mlp.{('up', 'down')[i % 2]}_proj.weight"] = (r, c)
        shapes[f"model.layers.{i // 2}.norm.weight"] = (d,)
    return shapes


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """A float32 .safetensors file written one tensor at a time (never all in memory)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            x.tofile(f)
            del x
    return offset


CHILD = r"""
import json, resource, sys, time
import numpy as np, psutil, jquant
src, dst, fmt, warm_src, warm_dst = sys.argv[1:6]
rules = {"embed": "q8_0", ".*": fmt}
jquant.convert_safetensors(warm_src, warm_dst, rules)  # compile the chunk programs
base = psutil.Process().memory_info().rss
t = time.perf_counter()
report = jquant.convert_safetensors(src, dst, rules)
elapsed = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak, "seconds": elapsed,
                  "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
                  "bpw": report.bits_per_weight}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 4 MiB checkpoint, for smoke tests")
    ap.add_argument("--format", default="q4_0")
    args = ap.parse_args()
    shapes = layout(args.quick)
    need = sum(int(np.prod(s)) * 4 for s in shapes.values()) * 1.3
    tmp = Path(tempfile.mkdtemp(prefix="jquant-bench-convert-"))
    try:
        free = shutil.disk_usage(tmp).free
        if free < need + 512 * MiB:
            sys.exit(
                f"bench_convert: needs {need / 2**30:.1f} GiB free in {tmp}, has {free / 2**30:.1f}"
            )
        src, dst = tmp / "model.safetensors", tmp / "model.gguf"
        warm_src, warm_dst = tmp / "warm.safetensors", tmp / "warm.gguf"
        t = time.perf_counter()
        data_bytes = write_checkpoint(src, shapes)
        write_checkpoint(warm_src, layout(True))
        gen = time.perf_counter() - t
        print(f"wrote {src} ({data_bytes / MiB:.0f} MiB of tensors) in {gen:.1f} s", flush=True)
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(src),
                str(dst),
                args.format,
                str(warm_src),
                str(warm_dst),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode:
            sys.exit(f"conversion failed:\n{out.stderr}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        # spot check: the smallest matrix, byte-exact against quantize_tensor
        import jquant
        from jquant._io.safetensors import safetensors_sources

        name = min((n for n, s in shapes.items() if len(s) == 2 and "embed" not in n), default=None)
        src_arr = next(s for s in safetensors_sources(src)[0] if s.name == name).load()
        back = jquant.load_gguf(dst)[name]
        exact = np.array_equal(
            back.to_bytes(), jquant.quantize_tensor(np.asarray(src_arr), args.format).to_bytes()
        )
        del src_arr, back
        out_size = dst.stat().st_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    largest = max(int(np.prod(s)) * 4 for s in shapes.values())
    rows = [
        ["checkpoint (float32 tensors)", f"{data_bytes / MiB:,.0f} MiB ({len(shapes)} tensors)"],
        ["largest tensor", f"{largest / MiB:,.0f} MiB"],
        [
            f"output GGUF ({args.format.upper()}, embed Q8_0)",
            f"{out_size / MiB:,.1f} MiB ({res['bpw']:.2f} bits/weight)",
        ],
        [
            "conversion time",
            f"{res['seconds']:.1f} s ({data_bytes / MiB / res['seconds']:,.0f} MiB/s of input)",
        ],
        ["RSS after imports + warm-up (baseline)", f"{res['base'] / MiB:,.0f} MiB"],
        ["peak RSS (ru_maxrss, whole process)", f"{res['peak'] / MiB:,.0f} MiB"],
        [
            "peak - baseline",
            f"{(res['peak'] - res['base']) / MiB:,.0f} MiB = {(res['peak'] - res['base']) / largest:.2f}x the largest tensor",
        ],
        [
            "peak - baseline vs checkpoint",
            f"{(res['peak'] - res['base']) / data_bytes:.1%} of the checkpoint",
        ],
        [f"spot check {name}", "byte-exact" if exact else "MISMATCH"],
    ]
    title = "Streaming safetensors -> GGUF conversion" + (" (--quick)" if args.quick else "")
    table = md_table(["", "value"], rows)
    print(f"\n{title}\n{machine()}\n\n{table}")
    md = (
        f"## {title}\n\n{machine()}\n\n"
        f"`jquant.convert_safetensors` on a generated float32 checkpoint, in a fresh process, "
        f"one run (the checkpoint is memory-mapped one tensor at a time; see "
        f"`jquant/_safetensors.py`).\n\n{table}\n"
    )
    path = write_result("convert_quick" if args.quick else "convert", md)
    print(f"\nwrote {path}")
    if not exact:
        sys.exit(1)


if __name__ == "__main__":
    main()
