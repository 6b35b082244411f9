"""The ``jquant`` command line.

With no arguments it runs the main job: the built-in example model
(:func:`jquant._example.example_params`) quantized into every format, with a table of
bits/weight, size, compression ratio, RMSE, max error and time.

Exit codes: 0 success; 1 unexpected internal error (set ``JQUANT_DEBUG=1`` for the
traceback); 2 bad command line; 3 input file missing or unreadable; 4 input file
corrupt or not in a format jquant reads; 5 quantization problem (NaN/Inf, scale
overflow, unknown format, bad rule); 6 output can't be written (disk full,
permissions); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .. import __version__
from .._core.tensor import human_bytes
from .._errors import FileFormatError, FileWriteError, QuantError
from .._formats.quant_type import QuantType
from .._formats.registry import DEFAULT_FORMAT, SMALL_FORMAT, formats
from .._io.gguf import K_TENSORS, gguf_name, inspect_gguf
from .._io.safetensors import convert_sources, read_sources
from .._model.model import quantize_model
from .._model.report import format_number
from .example import example_params

__all__ = ["main"]

_FORMAT_NAMES = [s.name for s in formats() if s.bits_per_weight < 32]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_NO_INPUT, EXIT_BAD_INPUT = 0, 1, 2, 3, 4
EXIT_QUANT, EXIT_WRITE, EXIT_INTERRUPTED = 5, 6, 130

_DEFAULT, _SMALL = DEFAULT_FORMAT.name.lower(), SMALL_FORMAT.name.lower()
_EPILOG = f"""\
examples:
  jquant                                   quantize the built-in example model into every format
  jquant quantize model.safetensors -t {_SMALL} -o model-{_SMALL}.gguf
  jquant quantize model.safetensors -t {_SMALL} --rule 'embed|lm_head={_DEFAULT}' --rule 'norm=keep' -o out.gguf
  jquant quantize params.npz -t {_DEFAULT} -o params.gguf --json
  jquant inspect model-{_SMALL}.gguf
  jquant compare model.safetensors model-{_SMALL}.gguf

exit codes:
  0 ok, 1 internal error (JQUANT_DEBUG=1 shows the traceback), 2 bad command line,
  3 input missing or unreadable, 4 input corrupt or of an unknown type,
  5 quantization problem (NaN/Inf, scale overflow, unknown format, bad rule),
  6 output can't be written (disk full, permissions), 130 interrupted
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jquant",
        description=f"Byte-exact GGML quantization ({', '.join(_FORMAT_NAMES)}) "
        "of JAX checkpoints, with GGUF export. Run without arguments for a demo.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"jquant {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )

    demo = command("demo", "quantize the built-in example model into every format (the default)")
    demo.add_argument("--json", action="store_true", help="print JSON instead of a table")

    q = command("quantize", "quantize a .safetensors, .npz or .gguf checkpoint into a GGUF file")
    q.add_argument("input", help="a .safetensors, .npz or .gguf file")
    q.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    q.add_argument(
        "-t",
        "--type",
        default=None,
        help="format for every tensor the rules don't decide: "
        f"{', '.join(s.name.lower() for s in formats())} (default {_DEFAULT})",
    )
    q.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="REGEX=FORMAT",
        help="tensors whose name matches REGEX (re.search) get FORMAT ('keep' leaves them "
        "unquantized); first match wins; repeatable",
    )
    q.add_argument(
        "--min-size",
        type=int,
        default=1024,
        help="tensors with fewer values stay unquantized (default 1024)",
    )
    q.add_argument(
        "--quantize-1d",
        action="store_true",
        help="also quantize 1-D tensors (biases, norm scales); kept by default",
    )
    q.add_argument(
        "--optimize",
        action="store_true",
        help="search for lower-error bytes than ggml's (still valid GGML bytes of the same "
        "formats; several times slower to encode)",
    )
    q.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")

    i = command("inspect", "list a file's tensors, formats, shapes, sizes and metadata")
    i.add_argument("file", help="a .gguf, .safetensors or .npz file")
    i.add_argument("--json", action="store_true", help="print JSON")

    c = command("compare", "per-tensor error of a quantized file against the original")
    c.add_argument("original", help="the original .safetensors, .npz or .gguf file")
    c.add_argument("quantized", help="the quantized file (usually .gguf)")
    c.add_argument("--json", action="store_true", help="print JSON")
    return p


# -- commands --------------------------------------------------------------------------


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # pipes and files: wide enough for the tables
        console = Console(stderr=stderr, highlight=False, width=140)
    return console


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _finite(v: float | None) -> float | str | None:
    if v is None or math.isfinite(v):
        return v
    return str(v)


def cmd_demo(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    params = example_params()
    leaves = jax.tree.leaves(params)
    n = sum(x.size for x in leaves)
    before = sum(x.nbytes for x in leaves)
    rows = []
    for qt in QuantType:

        def run(qt=qt):
            out = quantize_model(params, qt, min_size=0, keep_1d=False)
            return jax.block_until_ready(out)

        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        # errors from the fused statistics of quantize_model(report=True)
        _, report = quantize_model(params, qt, min_size=0, keep_1d=False, report=True)
        sq = sum((r.rmse or 0.0) ** 2 * r.size for r in report.rows)
        rows.append(
            {
                "format": qt.name,
                "bits_per_weight": report.bits_per_weight,
                "size_bytes": report.bytes_after,
                "compression_ratio": before / report.bytes_after,
                "rmse": math.sqrt(sq / n),
                "max_error": max((r.max_error or 0.0) for r in report.rows),
                "time_s": float(np.median(times)),
                "first_call_s": first,
            }
        )
    if args.json:
        _print_json({"model": "jquant example (2-layer transformer)", "values": n, "rows": rows})
        return EXIT_OK
    from rich.table import Table

    t = Table(
        title=f"jquant: built-in example model ({n:,} float32 values, {human_bytes(before)}), "
        f"every format",
        caption="time: median of 3 runs after a first call that includes XLA compilation "
        "(shown as 'first call')",
    )
    for col in (
        "format",
        "bits/weight",
        "size",
        "ratio",
        "RMSE",
        "max error",
        "time",
        "first call",
    ):
        t.add_column(col, justify="left" if col == "format" else "right")
    for r in rows:
        t.add_row(
            r["format"],
            f"{r['bits_per_weight']:.2f}",
            human_bytes(r["size_bytes"]),
            f"{r['compression_ratio']:.2f}x",
            f"{r['rmse']:.3g}",
            f"{r['max_error']:.3g}",
            f"{1e3 * r['time_s']:.1f} ms",
            f"{1e3 * r['first_call_s']:.0f} ms",
        )
    _console().print(t)
    return EXIT_OK


def _rules(args: argparse.Namespace) -> list[tuple[str, Any]]:

    rules: list[tuple[str, Any]] = []
    for r in args.rule:
        pattern, sep, fmt = r.rpartition("=")
        if not sep or not pattern or not fmt:
            raise QuantError(f"--rule {r!r} is not REGEX=FORMAT (e.g. --rule 'embed={_DEFAULT}')")
        rules.append((pattern, fmt))
    rules.append((".*", args.type or _DEFAULT))
    return rules


def _progress(quiet: bool, verb: str = "quantizing"):
    """(rich Progress or None, callback); no bar when quiet or not on a terminal."""
    console = _console(stderr=True)
    if quiet or not console.is_terminal:
        return None, None
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    task = prog.add_task(verb, total=None)

    def callback(done: int, total: int, name: str) -> None:
        prog.update(task, completed=done, total=total, description=f"{verb} {name[:40]}")

    return prog, callback


def cmd_quantize(args: argparse.Namespace) -> int:

    rules = _rules(args)
    sources, meta = read_sources(args.input)
    meta = dict(meta)
    meta.setdefault("general.quantized_by", "jquant")
    prog, callback = _progress(args.quiet or args.json)
    t0 = time.perf_counter()
    with prog if prog is not None else contextlib.nullcontext():
        report = convert_sources(
            sources,
            args.output,
            rules,
            min_size=args.min_size,
            keep_1d=not args.quantize_1d,
            metadata=meta,
            progress=callback,
            optimize=args.optimize,
        )
    elapsed = time.perf_counter() - t0
    file_size = os.path.getsize(args.output)
    requant = [r.path for r in report.rows if r.reason and r.reason.startswith("was ")]
    if args.json:
        _print_json(
            {
                "input": args.input,
                "output": args.output,
                "file_size": file_size,
                "bytes_before": report.bytes_before,
                "bytes_after": report.bytes_after,
                "compression_ratio": report.compression_ratio,
                "bits_per_weight": report.bits_per_weight,
                "seconds": elapsed,
                "tensors": [
                    {k: v for k, v in r.items() if k in _ROW_KEYS} for r in report.to_rows()
                ],
                "unmatched_rules": list(report.unmatched_rules),
            }
        )
        return EXIT_OK
    if not args.quiet:
        console = _console()
        if len(report.rows) <= 200:
            console.print(report.table(f"{args.input} -> {args.output}", errors=False))
        if requant:
            console.print(
                f"[yellow]note:[/] {len(requant)} tensor(s) were already quantized in the input "
                f"and were dequantized first; quantizing them again adds error"
            )
        unmatched = [p for p in report.unmatched_rules if p != ".*"]
        if unmatched:
            console.print(f"[yellow]note:[/] rules that matched no tensor: {', '.join(unmatched)}")
        console.print(
            f"wrote {args.output}: {human_bytes(file_size)} ({report.bits_per_weight:.2f} bits/weight, "
            f"{report.compression_ratio:.2f}x smaller than the input tensors) in {elapsed:.1f} s"
        )
    return EXIT_OK


_ROW_KEYS = (
    "path",
    "shape",
    "dtype",
    "format",
    "bytes_before",
    "bytes_after",
    "bits_per_weight",
    "reason",
)


def _short(v: Any, width: int = 60) -> str:
    if isinstance(v, list):
        head = ", ".join(repr(x) for x in v[:5])
        s = f"[{head}{', ...' if len(v) > 5 else ''}] ({len(v)} items)"
    else:
        s = repr(v) if isinstance(v, str) else str(v)
    return s if len(s) <= width else s[: width - 3] + "..."


def cmd_inspect(args: argparse.Namespace) -> int:

    path = args.file
    if path.lower().endswith(".gguf"):
        if not os.path.exists(path):
            raise FileNotFoundError(2, "No such file or directory", path)

        info = inspect_gguf(path)
        entries = None
        if info.is_jquant:
            try:
                entries = json.loads(info.metadata[K_TENSORS])
            except (KeyError, ValueError):
                raise FileFormatError(f"{path}: corrupt jquant metadata") from None
        tensors = []
        for k, t in enumerate(info.tensors):
            e = entries[k] if entries and k < len(entries) else None
            shape = tuple(e["shape"]) if e else t.shape
            n = math.prod(shape)
            tensors.append(
                {
                    "name": t.name,
                    "path": e["path"] if e else None,
                    "format": t.type_name,
                    "shape": list(shape),
                    "dtype": e["dtype"] if e else None,
                    "bytes": t.nbytes,
                    "bits_per_weight": 8 * t.nbytes / n if n else 0.0,
                }
            )
        meta = info.user_metadata()
        summary = {
            "file": path,
            "kind": "gguf",
            "gguf_version": info.version,
            "written_by_jquant": info.is_jquant,
            "file_size": info.file_size,
            "tensor_bytes": info.tensor_bytes,
            "values": sum(math.prod(t["shape"]) for t in tensors),
            "metadata": meta,
            "tensors": tensors,
        }
    else:
        sources, meta = read_sources(path)
        tensors = [
            {
                "name": s.name,
                "format": s.dtype.name,
                "shape": list(s.shape),
                "dtype": s.dtype.name,
                "bytes": math.prod(s.shape) * s.dtype.itemsize,
                "bits_per_weight": 8.0 * s.dtype.itemsize,
            }
            for s in sources
        ]
        summary = {
            "file": path,
            "kind": path.rsplit(".", 1)[-1].lower(),
            "file_size": os.path.getsize(path),
            "tensor_bytes": sum(t["bytes"] for t in tensors),
            "values": sum(math.prod(t["shape"]) for t in tensors),
            "metadata": meta,
            "tensors": tensors,
        }
    if args.json:
        _print_json(summary)
        return EXIT_OK
    from rich.table import Table

    console = _console()
    total_bits = 8 * summary["tensor_bytes"] / summary["values"] if summary["values"] else 0.0
    console.print(
        f"[bold]{path}[/]: {summary['kind']}"
        + (f" v{summary['gguf_version']}" if "gguf_version" in summary else "")
        + (", written by jquant" if summary.get("written_by_jquant") else "")
        + f", {human_bytes(summary['file_size'])}, {len(tensors)} tensors, "
        f"{summary['values']:,} values, {total_bits:.2f} bits/weight"
    )
    if meta:
        mt = Table(title="metadata", show_header=True)
        mt.add_column("key")
        mt.add_column("value")
        for k, v in meta.items():
            mt.add_row(k, _short(v))
        console.print(mt)
    tt = Table(title="tensors")
    for col in ("name", "format", "shape", "size", "bits/w"):
        tt.add_column(col, justify="right" if col in ("size", "bits/w") else "left")
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t["format"]] = counts.get(t["format"], 0) + 1
        tt.add_row(
            t.get("path") or t["name"],
            t["format"]
            + (f" ({t['dtype']})" if t.get("dtype") and t["dtype"] != t["format"] else ""),
            "x".join(map(str, t["shape"])) or "()",
            human_bytes(t["bytes"]),
            f"{t['bits_per_weight']:.2f}",
        )
    console.print(tt)
    console.print("formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    import numpy as np

    orig, _ = read_sources(args.original)
    quant, _ = read_sources(args.quantized)
    qfmt: dict[str, str] = {}
    if args.quantized.lower().endswith(".gguf"):
        info = inspect_gguf(args.quantized)
        names = [s.name for s in quant]
        qfmt = {n: t.type_name for n, t in zip(names, info.tensors, strict=True)}
        qbytes = {n: t.nbytes for n, t in zip(names, info.tensors, strict=True)}
    else:
        qbytes = {s.name: math.prod(s.shape) * s.dtype.itemsize for s in quant}
    by_name = {s.name: s for s in quant}
    by_gguf = {gguf_name(s.name): s for s in quant}
    rows = []
    missing = []
    prog, callback = _progress(args.json, "comparing")
    total = sum(math.prod(o.shape) * o.dtype.itemsize for o in orig)
    done = 0
    with prog if prog is not None else contextlib.nullcontext():
        for o in orig:
            done += math.prod(o.shape) * o.dtype.itemsize
            if callback is not None:
                callback(done, total, o.name)
            q = by_name.get(o.name) or by_gguf.get(gguf_name(o.name))
            if q is None:
                missing.append(o.name)
                continue
            row: dict[str, Any] = {
                "name": o.name,
                "format": qfmt.get(q.name, q.dtype.name),
                "shape": list(o.shape),
            }
            n = math.prod(o.shape)
            row["bits_per_weight"] = 8 * qbytes[q.name] / n if n else 0.0
            if tuple(q.shape) != tuple(o.shape):
                row["note"] = f"shape differs: {tuple(q.shape)}"
                rows.append(row)
                continue
            x = np.asarray(o.load())
            y = np.asarray(q.load())
            if not (np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"):
                row["note"] = "identical" if np.array_equal(x, y) else "values differ"
                rows.append(row)
                continue
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            err = x64 - y64
            sq = float(np.sum(err * err))
            sig = float(np.sum(x64 * x64))
            row["rmse"] = math.sqrt(sq / n) if n else 0.0
            row["max_error"] = float(np.max(np.abs(err))) if n else 0.0
            row["sqnr_db"] = (
                math.inf if sq == 0 else (10 * math.log10(sig / sq) if sig > 0 else -math.inf)
            )
            rows.append(row)
            del x, y, x64, y64, err
    extra = sorted(set(by_name) - {r["name"] for r in rows} - set(missing))
    if not rows:
        raise FileFormatError(
            f"{args.original} and {args.quantized} have no tensor names in common; compare a "
            f"checkpoint with its own quantized version"
        )
    if args.json:
        _print_json(
            {
                "original": args.original,
                "quantized": args.quantized,
                "tensors": [
                    {k: _finite(v) if isinstance(v, float) else v for k, v in r.items()}
                    for r in rows
                ],
                "only_in_original": missing,
                "only_in_quantized": [e for e in extra if e not in {r["name"] for r in rows}],
            }
        )
        return EXIT_OK
    from rich.table import Table

    t = Table(title=f"{args.original} vs {args.quantized}")
    for col in ("tensor", "format", "shape", "bits/w", "RMSE", "max error", "SQNR dB", "note"):
        t.add_column(
            col, justify="left" if col in ("tensor", "format", "shape", "note") else "right"
        )
    for r in rows:
        t.add_row(
            r["name"],
            r["format"],
            "x".join(map(str, r["shape"])) or "()",
            f"{r['bits_per_weight']:.2f}",
            format_number(r.get("rmse")),
            format_number(r.get("max_error")),
            format_number(r.get("sqnr_db"), ".1f"),
            r.get("note", ""),
        )
    console = _console()
    console.print(t)
    if missing:
        console.print(f"[yellow]only in {args.original}:[/] {', '.join(missing[:20])}")
    return EXIT_OK


# -- entry point -----------------------------------------------------------------------


def _fail(msg: str, code: int) -> int:
    sys.stderr.write(f"jquant: error: {msg}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jquant`` command line; returns the exit code (see the module docstring).

    Example:
        >>> from jquant._cli.main import main
        >>> main(["quantize", "/no/such/file.safetensors", "-o", "/tmp/x.gguf"])
        3
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv or ["demo"])
    except SystemExit as e:  # --help, --version, or a usage error (argparse printed it)
        return int(e.code or 0)

    commands = {
        "demo": cmd_demo,
        "quantize": cmd_quantize,
        "inspect": cmd_inspect,
        "compare": cmd_compare,
        None: cmd_demo,
    }
    if args.command is None:
        args.json = False
    debug = bool(os.environ.get("JQUANT_DEBUG"))
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except FileWriteError as e:
        return _fail(str(e), EXIT_WRITE)
    except FileFormatError as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    except QuantError as e:
        return _fail(str(e), EXIT_QUANT)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}", EXIT_NO_INPUT)
    except Exception as e:  # one line, never a traceback, unless asked for
        if debug:
            raise
        return _fail(
            f"internal error: {type(e).__name__}: {e} (run with JQUANT_DEBUG=1 for the "
            f"traceback and please report it)",
            EXIT_INTERNAL,
        )
