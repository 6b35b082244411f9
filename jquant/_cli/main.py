"""The ``jquant`` command line.

With no arguments it runs the main job: the built-in example model
(:func:`jquant._example.example_params`) quantized into every format, with a table of
bits/weight, size, compression ratio, RMSE, max error and time.

Exit codes: 0 success; 1 unexpected internal error (set ``JQUANT_DEBUG=1`` for the
traceback); 2 bad command line; 3 input file missing or unreadable; 4 input file
corrupt or not in a format jquant reads; 5 quantization problem (NaN/Inf, a value out
of range, scale overflow, unknown format, bad rule); 6 output refused or can't be
written (the input itself, a folder, FIFO or device, a missing folder, disk full,
permissions); 130 interrupted (SIGINT); 143 terminated (SIGTERM). On 130/143 the
existing output is untouched and no temporary file is left.

Everything printed that comes from a file or the command line (tensor names,
metadata, paths, rules, error messages) goes through :mod:`jquant._core.terminal`:
never rich markup, control characters shown as ``\\xNN``.
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

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .. import __version__
from .._core.blocks import error_stats, error_sums
from .._core.tensor import human_bytes
from .._core.terminal import markup_escape, plain_text, printable
from .._errors import FileFormatError, FileWriteError, QuantError
from .._export.cli import add_export_command, export_dir, model_dir_for
from .._formats.quant_type import QuantType
from .._formats.registry import DEFAULT_FORMAT, SMALL_FORMAT, formats
from .._io.gguf import gguf_name, inspect_gguf, jquant_entries
from .._io.safetensors import convert_sources, read_sources
from .._llama.cli import JQUANT_ARCH_NOTE, quantize_llama
from .._llama.cli import add_arguments as add_llama_arguments
from .._llama.mixes import DEFAULT_FTYPE
from .._model.model import quantize_model
from .._model.report import format_number
from .example import example_params
from .signals import check_interrupted, interruptible

__all__ = ["main"]

_FORMAT_NAMES = [s.name for s in formats() if s.bits_per_weight < 32]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_NO_INPUT, EXIT_BAD_INPUT = 0, 1, 2, 3, 4
EXIT_QUANT, EXIT_WRITE, EXIT_INTERRUPTED, EXIT_TERMINATED = 5, 6, 130, 143

_DEFAULT, _SMALL = DEFAULT_FORMAT.name.lower(), SMALL_FORMAT.name.lower()
_EPILOG = f"""\
examples:
  jquant                                   quantize the built-in example model into every format
  jquant quantize model.safetensors -t {_SMALL} -o model-{_SMALL}.gguf
  jquant quantize model.safetensors -t {_SMALL} --rule 'embed|lm_head={_DEFAULT}' --rule 'norm=keep' -o out.gguf
  jquant quantize params.npz -t {_DEFAULT} -o params.gguf --json
  jquant quantize model-f16.gguf -t {DEFAULT_FTYPE} -o model-{DEFAULT_FTYPE}.gguf   (llama-quantize's drop-in)
  jquant inspect model-{_SMALL}.gguf
  jquant export hf_model/ -t {_DEFAULT} -o model-{_DEFAULT}.gguf      a model llama.cpp runs (Llama, Gemma 1-3)
  jquant compare model.safetensors model-{_SMALL}.gguf

exit codes:
  0 ok, 1 internal error (JQUANT_DEBUG=1 shows the traceback), 2 bad command line,
  3 input missing or unreadable, 4 input corrupt or of an unknown type,
  5 quantization problem (NaN/Inf, value out of range, scale overflow, unknown format,
  bad rule), 6 output refused or can't be written (it is the input, a folder, FIFO or
  device; missing folder, disk full, permissions), 130 interrupted (SIGINT),
  143 terminated (SIGTERM); on 130/143 the old output is kept and no temporary file left
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
    add_llama_arguments(q)

    i = command("inspect", "list a file's tensors, formats, shapes, sizes and metadata")
    i.add_argument("file", help="a .gguf, .safetensors or .npz file")
    i.add_argument("--json", action="store_true", help="print JSON")

    c = command("compare", "per-tensor error of a quantized file against the original")
    c.add_argument("original", help="the original .safetensors, .npz or .gguf file")
    c.add_argument("quantized", help="the quantized file (usually .gguf)")
    c.add_argument("--json", action="store_true", help="print JSON")

    add_export_command(command)
    return p


# -- commands --------------------------------------------------------------------------


def _console(stderr: bool = False):
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:  # pipes and files: wide enough for the tables
        console = Console(stderr=stderr, highlight=False, width=140)
    return console


def _print_json(obj: Any) -> None:
    # allow_nan=False: NaN/Infinity are not JSON; _json_safe already made them strings
    sys.stdout.write(json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")


def _json_safe(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else str(o)
    if isinstance(o, (str, int, bool)) or o is None:
        return o
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if hasattr(o, "tolist"):
        return _json_safe(o.tolist())
    return str(o)


def _finite(v: float | None) -> float | str | None:
    if v is None or math.isfinite(v):
        return v
    return str(v)


def cmd_demo(args: argparse.Namespace) -> int:
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
    """(rich Progress or None, callback); no bar when quiet or not on a terminal.

    The callback is always given: it is where a signal whose exception was lost (see
    :mod:`jquant._cli.signals`) stops the work between tensors.
    """
    console = _console(stderr=True)
    if quiet or not console.is_terminal:

        def check(done: int, total: int, name: str) -> None:
            check_interrupted()

        return None, check
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
        check_interrupted()
        prog.update(
            task, completed=done, total=total, description=f"{verb} {markup_escape(name[:40])}"
        )

    return prog, callback


def cmd_quantize(args: argparse.Namespace) -> int:

    rc = quantize_llama(args, _progress, _console, _print_json)  # llama.cpp GGUF inputs
    if rc is not None:
        return rc

    # a .safetensors with an HF config.json and tokenizer beside it: a llama.cpp model
    folder = None if args.rule else model_dir_for(args.input, args.type)
    if folder is not None:
        return _export_model(args, folder, args.type or _DEFAULT, files=[args.input])
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
            inputs=[args.input],
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
        out = markup_escape(args.output)
        if requant:
            console.print(
                f"[yellow]note:[/] {len(requant)} tensor(s) were already quantized in the input "
                f"and were dequantized first; quantizing them again adds error"
            )
        unmatched = [p for p in report.unmatched_rules if p != ".*"]
        if unmatched:
            console.print(
                f"[yellow]note:[/] rules that matched no tensor: "
                f"{markup_escape(', '.join(unmatched))}"
            )
        console.print(
            f"wrote {out}: {human_bytes(file_size)} ({report.bits_per_weight:.2f} bits/weight, "
            f"{report.compression_ratio:.2f}x smaller than the input tensors) in {elapsed:.1f} s"
        )
        if "general.architecture" not in meta:  # safetensors / npz / jquant inputs
            console.print(f"[yellow]note:[/] {JQUANT_ARCH_NOTE}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    return _export_model(args, args.dir, args.type)


def _export_model(args: argparse.Namespace, folder: Any, ftype: str, files=None) -> int:
    as_json = getattr(args, "json", False)
    prog, callback = _progress(args.quiet or as_json, "exporting")
    t0 = time.perf_counter()
    with prog if prog is not None else contextlib.nullcontext():
        export_dir(
            folder,
            args.output,
            ftype,
            source=getattr(args, "source", "auto"),
            tokenizer=getattr(args, "tokenizer", None),
            pre_tokenizer=getattr(args, "pre_tokenizer", None),
            files=files,
            progress=callback,
            imatrix=getattr(args, "imatrix", None),
        )
    elapsed = time.perf_counter() - t0
    size = os.path.getsize(args.output)
    if as_json:
        _print_json(
            {
                "input": str(files[0] if files else folder),
                "output": args.output,
                "ftype": ftype,
                "file_size": size,
                "seconds": elapsed,
                "llama_cpp_model": True,
            }
        )
    elif not args.quiet:
        _console().print(
            f"wrote {args.output}: a llama.cpp model ({ftype}, {human_bytes(size)}) from "
            f"{files[0] if files else folder} in {elapsed:.1f} s"
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
        parsed = jquant_entries(info)
        entries = parsed[0] if parsed else None
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
    console = _console()
    total_bits = 8 * summary["tensor_bytes"] / summary["values"] if summary["values"] else 0.0
    console.print(
        f"[bold]{markup_escape(path)}[/]: {markup_escape(summary['kind'])}"
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
            mt.add_row(plain_text(k), plain_text(_short(v)))
        console.print(mt)
    tt = Table(title="tensors")
    for col in ("name", "format", "shape", "size", "bits/w"):
        tt.add_column(col, justify="right" if col in ("size", "bits/w") else "left")
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t["format"]] = counts.get(t["format"], 0) + 1
        tt.add_row(
            plain_text(t.get("path") or t["name"]),
            plain_text(
                t["format"]
                + (f" ({t['dtype']})" if t.get("dtype") and t["dtype"] != t["format"] else "")
            ),
            "x".join(map(str, t["shape"])) or "()",
            human_bytes(t["bytes"]),
            f"{t['bits_per_weight']:.2f}",
        )
    console.print(tt)
    console.print(
        plain_text("formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    )
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
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
    assert callback is not None
    total = sum(math.prod(o.shape) * o.dtype.itemsize for o in orig)
    done = 0
    with prog if prog is not None else contextlib.nullcontext():
        for o in orig:
            done += math.prod(o.shape) * o.dtype.itemsize
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
            sums = (float(s) for s in error_sums(x, y))  # numpy: float64
            row["rmse"], row["max_error"], _, row["sqnr_db"] = error_stats(*sums, n)
            rows.append(row)
            del x, y
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
    t = Table(title=plain_text(f"{args.original} vs {args.quantized}"))
    for col in ("tensor", "format", "shape", "bits/w", "RMSE", "max error", "SQNR dB", "note"):
        t.add_column(
            col, justify="left" if col in ("tensor", "format", "shape", "note") else "right"
        )
    for r in rows:
        t.add_row(
            plain_text(r["name"]),
            plain_text(r["format"]),
            "x".join(map(str, r["shape"])) or "()",
            f"{r['bits_per_weight']:.2f}",
            format_number(r.get("rmse")),
            format_number(r.get("max_error")),
            format_number(r.get("sqnr_db"), ".1f"),
            plain_text(r.get("note", "")),
        )
    console = _console()
    console.print(t)
    if missing:
        console.print(
            f"[yellow]only in {markup_escape(args.original)}:[/] "
            f"{markup_escape(', '.join(missing[:20]))}"
        )
    return EXIT_OK


# -- entry point -----------------------------------------------------------------------


def _fail(msg: str, code: int) -> int:
    sys.stderr.write(f"jquant: error: {printable(msg)}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jquant`` command line; returns the exit code (see the module docstring).

    Example:
        >>> from jquant._cli.main import main
        >>> main(["quantize", "/no/such/file.safetensors", "-o", "/tmp/x.gguf"])
        3
    """
    argv_given = argv is not None
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
        "export": cmd_export,
        None: cmd_demo,
    }
    if args.command is None:
        args.json = False
    debug = bool(os.environ.get("JQUANT_DEBUG"))
    try:
        with interruptible():
            code = commands[args.command](args)
            check_interrupted()
            return code
    except KeyboardInterrupt as e:
        if getattr(e, "exit_code", EXIT_INTERRUPTED) == EXIT_TERMINATED:
            code = _fail("terminated (SIGTERM)", EXIT_TERMINATED)
        else:
            code = _fail("interrupted (SIGINT)", EXIT_INTERRUPTED)
        if argv_given:
            return code
        # As a program: cleanup is done (no temporary file, old output kept). Skip the
        # interpreter's teardown, which can crash (SIGSEGV) while an XLA compilation
        # that the signal cut short is still running on another thread.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
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
