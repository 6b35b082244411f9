"""``jquant export DIR -o model.gguf -t FTYPE``: a model folder to a GGUF file llama.cpp runs."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import FileFormatError, QuantError
from .._formats.registry import DEFAULT_FORMAT
from .._io.safetensors import safetensors_sources
from .._llama.mixes import DEFAULT_FTYPE
from .arch import ARCHS
from .writer import FTYPES, export_gguf, load_config

__all__ = ["add_export_command", "export_dir", "model_dir_for", "read_model_dir"]


def add_export_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Register the ``export`` subcommand through the CLI's ``command(name, help)``."""
    e = command("export", "export a model folder (HF config + weights + tokenizer) for llama.cpp")
    e.add_argument(
        "dir",
        help="folder with config.json, tokenizer files and weights (*.safetensors, "
        "flax_model.msgpack, or an Orbax checkpoint)",
    )
    e.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    e.add_argument(
        "-t",
        "--type",
        default="f16",
        help=f"llama.cpp ftype: {', '.join(FTYPES)} (default f16); the mixes "
        f"({DEFAULT_FTYPE.lower()}...)"
        "as llama-quantize makes them from the f16 export",
    )
    e.add_argument(
        "--imatrix",
        default=None,
        help="importance matrix for the mixes (llama.cpp's imatrix GGUF or .dat file)",
    )
    e.add_argument(
        "--source",
        choices=("auto", "hf", "flax", "gemma", "maxtext"),
        default="auto",
        help="layout of the weights (default: safetensors -> hf, msgpack -> flax, Orbax: "
        "guessed from the tree)",
    )
    e.add_argument("--tokenizer", default=None, help="tokenizer folder (default: DIR)")
    e.add_argument("--pre-tokenizer", default=None, help="llama.cpp BPE pre-tokenizer name")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _guess_source(tree: Any) -> str:
    keys = json.dumps(_key_names(tree))
    if "decoder" in keys and "token_embedder" in keys:
        return "maxtext"
    if "embedder" in keys and ("q_einsum" in keys or "qkv_einsum" in keys):
        return "gemma"
    return "flax"


def _key_names(tree: Any, depth: int = 0) -> list[str]:
    if not isinstance(tree, dict) or depth > 4:
        return []
    out = []
    for k, v in tree.items():
        out.append(str(k))
        out.extend(_key_names(v, depth + 1))
    return out


def read_model_dir(
    folder: str | os.PathLike, source: str = "auto", files: list[str] | None = None
) -> tuple[Any, str]:
    """``(weights, source)`` of a model folder, tensors lazily loaded where the format allows.

    ``*.safetensors`` (sharded too) are memory-mapped tensor by tensor; a Flax
    ``*.msgpack`` and an Orbax checkpoint (a sub-folder with ``_CHECKPOINT_METADATA`` or
    ``_METADATA``, or ``folder`` itself) are restored as host numpy trees. ``files``
    restricts the safetensors files read.
    """
    folder = Path(folder)
    shards = [Path(f) for f in files] if files else sorted(folder.glob("*.safetensors"))
    if shards:
        weights: dict[str, Any] = {}
        for s in shards:
            for src in safetensors_sources(s)[0]:
                weights[src.name] = src
        return weights, ("hf" if source == "auto" else source)
    msgpacks = sorted(folder.glob("*.msgpack"))
    if msgpacks:
        from flax.serialization import msgpack_restore

        tree = msgpack_restore(msgpacks[0].read_bytes())
        return tree, (_guess_source(tree) if source == "auto" else source)
    ckpt = next(
        (
            p
            for p in [folder, *sorted(q for q in folder.iterdir() if q.is_dir())]
            if (p / "_CHECKPOINT_METADATA").exists() or (p / "_METADATA").exists()
        ),
        None,
    )
    if ckpt is not None:
        import orbax.checkpoint as ocp

        tree = ocp.PyTreeCheckpointer().restore(ckpt.resolve())
        return tree, (_guess_source(tree) if source == "auto" else source)
    raise FileFormatError(
        f"{folder} holds no weights jquant can read (*.safetensors, *.msgpack or an Orbax "
        f"checkpoint)"
    )


def export_dir(
    folder: str | os.PathLike,
    output: str | os.PathLike,
    ftype: str,
    *,
    source: str = "auto",
    tokenizer: str | os.PathLike | None = None,
    pre_tokenizer: str | None = None,
    files: list[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    imatrix: str | os.PathLike | None = None,
) -> Path:
    """Export the model in ``folder`` (see :func:`read_model_dir`) to ``output``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(2, "No such model folder", str(folder))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(2, "No config.json (the HF model config) in", str(folder))
    weights, src = read_model_dir(folder, source, files)
    return export_gguf(
        output,
        weights,
        folder / "config.json",
        tokenizer=tokenizer or folder,
        ftype=ftype,
        source=src,
        pre_tokenizer=pre_tokenizer,
        progress=progress,
        imatrix=imatrix,
    )


def model_dir_for(safetensors: str | os.PathLike, ftype: str | None) -> Path | None:
    """The folder of ``safetensors`` when ``jquant quantize`` should export a llama.cpp model.

    That is: a ``config.json`` beside it with a supported ``model_type``, tokenizer files,
    and a file type :func:`export_gguf` writes. Otherwise ``None`` (a plain tensor file).
    """
    p = Path(safetensors)
    folder = p.parent
    if p.suffix != ".safetensors" or not (folder / "config.json").is_file():
        return None
    if (ftype or DEFAULT_FORMAT.name).lower() not in FTYPES:
        return None
    try:
        cfg = load_config(folder / "config.json")
    except (OSError, ValueError, QuantError):
        return None
    if cfg.get("model_type") not in ARCHS:
        return None
    if not any((folder / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        return None
    return folder
