"""Regenerate benchmarks/RESULTS.md: run every benchmark, then assemble their sections.

    python benchmarks/run_all.py              # full sizes (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick      # smoke run, seconds per script
    python benchmarks/run_all.py --assemble   # only rebuild RESULTS.md from results/*.md
    python benchmarks/run_all.py --only kernels model

Each script writes its own section to benchmarks/results/<name>.md; RESULTS.md is those
sections in a fixed order. Sections from a GPU run (kernels_gpu.md) are kept beside the
CPU ones, with their date and card, until a new GPU run replaces them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ORDER = [
    "kernels_cpu",
    "kernels_gpu",
    "kquant_speed",
    "soak",
    "dequant",
    "model",
    "convert",
    "calibration",
    "dot",
    "accuracy",
    "quality",
]


def scripts() -> list[Path]:
    return sorted(HERE.glob("bench_*.py"))


def assemble() -> Path:
    sections = {p.stem: p.read_text().strip() for p in RESULTS.glob("*.md")}
    names = [n for n in ORDER if n in sections]
    names += sorted(n for n in sections if n not in ORDER and not n.endswith("_quick"))
    body = "\n\n".join(sections[n] for n in names)
    out = HERE / "RESULTS.md"
    out.write_text(
        "# Benchmark results\n\n"
        "Regenerate with `python benchmarks/run_all.py` (one script per section; "
        "`--assemble` rebuilds this file from `benchmarks/results/`). The machines are "
        "shared and noisy: read medians and same-run ratios, not absolute times.\n\n" + body + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script")
    ap.add_argument("--assemble", action="store_true", help="don't run, only assemble")
    ap.add_argument("--only", nargs="*", help="names like kernels, model, dot")
    args = ap.parse_args(argv)
    failed = []
    if not args.assemble:
        for script in scripts():
            name = script.stem.removeprefix("bench_")
            if args.only and name not in args.only:
                continue
            cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
            print(f"== {' '.join(cmd)}", flush=True)
            if subprocess.run(cmd).returncode:
                failed.append(name)
    print(f"wrote {assemble()}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
