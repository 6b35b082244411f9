"""``jquant quantize`` for llama.cpp files: llama-quantize's options and its engine.

A GGUF that llama.cpp's converter wrote (any architecture but jquant's) goes through
:func:`jquant._llama.quantize.convert_gguf` with llama.cpp's ftype names; everything else
keeps jquant's own path, with an explanation where a llama.cpp option can't apply.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from .._errors import QuantError, UnknownFormatError
from .._formats.quant_type import QuantType
from .._formats.registry import DEFAULT_FORMAT
from .._io.gguf_file import read_header
from .mixes import DEFAULT_FTYPE, FTYPES, parse_ftype

__all__ = ["JQUANT_ARCH_NOTE", "add_arguments", "quantize_llama"]

JQUANT_ARCH_NOTE = (
    "this file's general.architecture is 'jquant': jquant.load_gguf and gguf-py read it, "
    "llama.cpp doesn't (unknown model architecture). For llama.cpp, convert the checkpoint "
    "with llama.cpp's convert_hf_to_gguf.py and quantize that GGUF with jquant quantize."
)

_LLAMA_ONLY = (
    "pure",
    "tensor_type",
    "output_tensor_type",
    "token_embedding_type",
    "leave_output_tensor",
    "imatrix",
    "include_weights",
    "exclude_weights",
    "allow_requantize",
)


def add_arguments(q: argparse.ArgumentParser) -> None:
    """llama-quantize's options, for llama.cpp GGUF inputs."""
    g = q.add_argument_group(
        "llama.cpp GGUF inputs (from convert_hf_to_gguf.py): -t takes llama-quantize's "
        f"types ({', '.join(FTYPES)}) and these options as llama-quantize "
        "names them"
    )
    g.add_argument("--pure", action="store_true", help="no k-quant mix: one type for all")
    g.add_argument(
        "--tensor-type",
        action="append",
        default=[],
        metavar="REGEX=TYPE",
        help=f"tensors matching REGEX get TYPE (e.g. attn_v={DEFAULT_FORMAT.name.lower()}); repeatable",
    )
    g.add_argument("--output-tensor-type", metavar="TYPE", help="type of output.weight")
    g.add_argument("--token-embedding-type", metavar="TYPE", help="type of token_embd.weight")
    g.add_argument(
        "--leave-output-tensor", action="store_true", help="leave output.weight as it is"
    )
    g.add_argument("--imatrix", metavar="FILE", help="importance matrix (GGUF or legacy .dat)")
    g.add_argument(
        "--include-weights",
        action="append",
        default=[],
        metavar="NAME",
        help="use the imatrix only for tensors whose name contains NAME; repeatable",
    )
    g.add_argument(
        "--exclude-weights",
        action="append",
        default=[],
        metavar="NAME",
        help="don't use the imatrix for tensors whose name contains NAME; repeatable",
    )
    g.add_argument("--allow-requantize", action="store_true", help="allow quantized inputs")
    g.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="don't keep compiled kernels in ~/.cache/jquant/xla (or $XDG_CACHE_HOME/jquant/xla; "
        "JQUANT_NO_COMPILE_CACHE=1 does the same)",
    )


def _llama_options_given(args: argparse.Namespace) -> list[str]:
    return [
        "--" + k.replace("_", "-")
        for k in _LLAMA_ONLY
        if getattr(args, k, None) not in (None, False, [])
    ]


def _gguf_meta(path: str) -> dict[str, Any] | None:
    if not path.lower().endswith(".gguf") or not os.path.isfile(path):
        return None
    return read_header(path)[0].metadata


def quantize_llama(
    args: argparse.Namespace,
    progress: Callable[..., Any],
    console: Callable[..., Any],
    print_json: Callable[[Any], None],
) -> int | None:
    """Run the llama.cpp path for ``args``; None when jquant's own path should run."""
    from .quantize import convert_gguf, enable_compilation_cache, is_llama_gguf

    meta = _gguf_meta(args.input)
    if meta is None or not is_llama_gguf(meta):
        _explain_non_llama(args)
        return None
    if not args.no_compile_cache:
        enable_compilation_cache()
    if args.quantize_1d:
        raise QuantError(
            f"{args.input} is a llama.cpp model ({meta.get('general.architecture')}); llama.cpp "
            f"needs its 1-D tensors (norms, biases) in F32 and aborts on quantized ones, so "
            f"--quantize-1d is refused here"
        )
    if args.rule:
        if _llama_options_given(args):
            raise QuantError("--rule can't be combined with llama-quantize's options")
        return None
    ftype = parse_ftype(args.type or DEFAULT_FORMAT.name)
    prog, callback = progress(args.quiet or args.json)
    t0 = time.perf_counter()
    with prog if prog is not None else contextlib.nullcontext():
        report = convert_gguf(
            args.input,
            args.output,
            ftype,
            imatrix=args.imatrix,
            pure=args.pure,
            tensor_types=_pairs(args.tensor_type),
            output_tensor_type=args.output_tensor_type,
            token_embedding_type=args.token_embedding_type,
            leave_output_tensor=args.leave_output_tensor,
            include_weights=args.include_weights,
            exclude_weights=args.exclude_weights,
            allow_requantize=args.allow_requantize,
            progress=callback,
        )
    elapsed = time.perf_counter() - t0
    size = os.path.getsize(args.output)
    if args.json:
        print_json(
            {
                "input": args.input,
                "output": args.output,
                "ftype": args.type or DEFAULT_FORMAT.name,
                "file_size": size,
                "seconds": elapsed,
                "tensors": [
                    {"name": r.path, "shape": list(r.shape), "from": r.dtype, "type": r.format}
                    for r in report.rows
                ],
            }
        )
        return 0
    if not args.quiet:
        c = console()
        if len(report.rows) <= 200:
            c.print(report.table(f"{args.input} -> {args.output}", errors=False))
        c.print(
            f"wrote {args.output} ({size / 2**20:.1f} MiB, llama.cpp file type "
            f"{(args.type or DEFAULT_FORMAT.name).upper()}, {report.bits_per_weight:.2f} bits/weight) "
            f"in {elapsed:.1f} s"
        )
    return 0


def _pairs(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for s in specs:
        pattern, sep, typ = s.partition("=")
        if not sep or not pattern or not typ:
            raise QuantError(
                f"--tensor-type {s!r} is not REGEX=TYPE (e.g. attn_v={DEFAULT_FORMAT.name.lower()})"
            )
        out.append((pattern, typ))
    return out


def _explain_non_llama(args: argparse.Namespace) -> None:
    llama_type = False
    if args.type:
        try:
            QuantType.parse(args.type)
        except UnknownFormatError:
            try:
                parse_ftype(args.type)
                llama_type = True
            except UnknownFormatError:
                pass
    given = _llama_options_given(args)
    if llama_type or given:
        what = (
            f"unknown quantization format {args.type!r} for this input: it is a llama.cpp file type"
            if llama_type
            else ", ".join(given) + " are llama-quantize options"
        )
        raise QuantError(
            f"{what}, for llama.cpp models, and {args.input} is not one: llama.cpp needs "
            f"the architecture metadata (general.architecture, hyper-parameters, tokenizer) "
            f"that its convert_hf_to_gguf.py writes. Convert the Hugging Face checkpoint with "
            f"it first (python convert_hf_to_gguf.py MODEL_DIR --outtype f16), then run "
            f"'jquant quantize model-f16.gguf -t {args.type or DEFAULT_FTYPE} -o out.gguf'"
        )
