"""Helpers shared by the benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU, cores, accelerator, jax version, date."""
    import jax

    dev = jax.devices()[0]
    accel = "" if dev.platform == "cpu" else f", {dev.platform.upper()} {dev.device_kind}"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores{accel}; jax {jax.__version__} "
        f"({jax.default_backend()}); {_dt.date.today().isoformat()}"
    )


def median_time(fn: Callable[[], object], *, repeats: int = 5, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (fn must block until done)."""
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def wall_and_cpu(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall seconds and median process CPU seconds (all threads) of ``fn()``.

    The C references run on one thread and XLA may use several: the CPU-time ratio
    compares work, the wall ratio what a user waits (both noisy on a shared machine).
    """
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def write_result(name: str, markdown: str) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(markdown.rstrip() + "\n")
    return path


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
