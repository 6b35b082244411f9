"""Structural fuzzing of the GGUF and safetensors readers (shared by the tests and
``benchmarks/fuzz_readers.py``).

Bit flips mostly hit tensor data or string bytes; these mutations rewrite one field of
the file's structure instead: a GGUF header count, a string length, a value type, an
array count, a tensor's dimension count, dimensions, type or offset, the alignment, or
one value inside jquant's JSON metadata (with the checksum recomputed, so the mutation
reaches the checks behind it); for safetensors, the header length or one JSON field
(dtype, shape, offsets, ``__metadata__``) set to an edge value (``Infinity``, ``2**70``,
``64.9``, ``true``, a list for an object, deep nesting, an overlapping range).

:func:`check_case` runs a reader on one mutated file: it either loads or raises
``FileFormatError``; anything else is a bug.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

import jquant
from jquant._io.safetensors import safetensors_sources

EDGE_INTS = [0, 1, 2, 3, 31, 32, 33, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63]
EDGE_INTS += [2**64 - 1, 2**64 - 2, 2**40, 2**20]
EDGE_JSON = [
    "Infinity",
    "-Infinity",
    "NaN",
    "-1",
    "1e300",
    str(2**70),
    str(2**64 - 1),
    "64.9",
    "true",
    "null",
    '"x"',
    "[]",
    "{}",
    "[[1]]",
    "[" * 2000 + "]" * 2000,
]

_U = {"u8": "<B", "u32": "<I", "u64": "<Q", "i32": "<i", "f32": "<f", "f64": "<d"}
_SCALAR = {0: "u8", 1: "u8", 2: "<H", 3: "<h", 4: "u32", 5: "i32", 6: "f32", 7: "u8"}
_SCALAR.update({10: "u64", 11: "<q", 12: "f64"})


# -- GGUF ------------------------------------------------------------------------------


class _Tokens:
    """A GGUF header as (tag, struct format, value) tokens plus raw byte tokens."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.toks = data, 0, []

    def take(self, tag: str, fmt: str) -> int:
        fmt = _U.get(fmt, fmt)
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.toks.append([tag, fmt, v])
        self.pos += struct.calcsize(fmt)
        return v

    def string(self, tag: str) -> str:
        n = self.take(tag + ".len", "u64")
        b = self.data[self.pos : self.pos + n]
        self.toks.append([tag, "bytes", b])
        self.pos += n
        return b.decode("utf-8", "replace")

    def value(self, vtype: int, tag: str) -> None:
        if vtype == 8:
            self.string(tag + ".str")
        elif vtype == 9:
            sub = self.take(tag + ".subtype", "u32")
            n = self.take(tag + ".count", "u64")
            for _ in range(n):
                self.value(sub, tag + ".item")
        else:
            self.take(tag + ".scalar", _SCALAR[vtype])


def tokenize_gguf(data: bytes) -> tuple[list, bytes]:
    """(header tokens, the rest of the file: padding and tensor data) of a valid GGUF."""
    t = _Tokens(data)
    t.toks.append(["magic", "bytes", data[:4]])
    t.pos = 4
    t.take("version", "u32")
    n_tensors = t.take("n_tensors", "u64")
    n_kv = t.take("n_kv", "u64")
    for _ in range(n_kv):
        key = t.string("key")
        vtype = t.take("kv.type", "u32")
        t.value(vtype, f"kv:{key}")
    for _ in range(n_tensors):
        t.string("tensor.name")
        n_dims = t.take("tensor.n_dims", "u32")
        for _ in range(n_dims):
            t.take("tensor.dim", "u64")
        t.take("tensor.type", "u32")
        t.take("tensor.offset", "u64")
    return t.toks, data[t.pos :]


def serialize(toks: list, rest: bytes) -> bytes:
    out = []
    for _, fmt, v in toks:
        out.append(v if fmt == "bytes" else struct.pack(fmt, v))
    return b"".join(out) + rest


def _fit(fmt: str, v: int) -> int:
    bits = 8 * struct.calcsize(fmt)
    v %= 2**bits
    if fmt.lstrip("<").islower():  # signed
        v = v - 2**bits if v >= 2 ** (bits - 1) else v
    return v


def _set_string(toks: list, i: int, text: str) -> None:
    """Replace string token ``i`` (its length token is ``i - 1``)."""
    b = text.encode()
    toks[i][2] = b
    toks[i - 1][2] = len(b)


def _fix_checksum(toks: list) -> None:
    strs = {tag: i for i, (tag, fmt, _) in enumerate(toks) if fmt == "bytes"}
    ti = strs.get("kv:jquant.tensors.str")
    tr = strs.get("kv:jquant.tree.str")
    if ti is None or tr is None:
        return
    crc = zlib.crc32(toks[ti][2] + b"\n" + toks[tr][2])
    for tok in toks:
        if tok[0] == "kv:jquant.checksum.scalar":
            tok[2] = crc


def _mutate_json(text: str, rng: np.random.Generator) -> str:
    """One JSON value (a number, or a whole list/object) replaced by an edge value."""
    spots = [i for i, c in enumerate(text) if c in '0123456789[{"tfn' and text[i - 1 : i] in ":,[ "]
    if not spots:
        return text
    i = int(rng.choice(spots))
    j = i
    if text[i] in "[{":
        depth = 0
        for j in range(i, len(text)):
            depth += text[j] in "[{"
            depth -= text[j] in "]}"
            if depth == 0:
                break
        j += 1
    elif text[i] == '"':
        j = text.index('"', i + 1) + 1
    else:
        while j < len(text) and text[j] not in ",]}":
            j += 1
    return text[:i] + str(rng.choice(EDGE_JSON)) + text[j:]


def mutate_gguf(data: bytes, rng: np.random.Generator) -> bytes:
    """One structural mutation of a valid GGUF file (see the module docstring)."""
    toks, rest = tokenize_gguf(data)
    ints = [i for i, t in enumerate(toks) if t[1] != "bytes"]
    jsons = [
        i
        for i, t in enumerate(toks)
        if t[1] == "bytes" and t[0] in ("kv:jquant.tensors.str", "kv:jquant.tree.str")
    ]
    r = rng.random()
    if jsons and r < 0.35:
        i = int(rng.choice(jsons))
        _set_string(toks, i, _mutate_json(toks[i][2].decode(), rng))
        _fix_checksum(toks)
    elif r < 0.45:  # a duplicated or dropped tensor-info / kv record: shift a count
        tag = str(rng.choice(["n_tensors", "n_kv"]))
        for t in toks:
            if t[0] == tag:
                t[2] = max(0, t[2] + int(rng.choice([-1, 1])))
    elif r < 0.55:  # a string length that lies
        lens = [i for i in ints if toks[i][0].endswith(".len")]
        i = int(rng.choice(lens))
        toks[i][2] = _fit("<Q", toks[i][2] + int(rng.choice([-1, 1, 8, 2**32, 2**63])))
    else:
        i = int(rng.choice(ints))
        tag, fmt, v = toks[i]
        choice = rng.random()
        if fmt in ("<f", "<d"):
            toks[i][2] = float(rng.choice([np.inf, -np.inf, np.nan, 1e38, -0.0]))
        elif choice < 0.6:
            toks[i][2] = _fit(fmt, int(rng.choice(EDGE_INTS)))
        elif choice < 0.8:
            toks[i][2] = _fit(fmt, v + int(rng.integers(-40, 41)))
        else:
            toks[i][2] = _fit(fmt, v ^ (1 << int(rng.integers(0, 8 * struct.calcsize(fmt)))))
    out = serialize(toks, rest)
    if rng.random() < 0.1:
        out = out[: int(rng.integers(0, len(out)))]
    return out


# -- safetensors ---------------------------------------------------------------------


def safetensors_bytes(header: Any, data: bytes, *, raw: str | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header)
    b = text.encode()
    return struct.pack("<Q", len(b)) + b + data


def mutate_safetensors(header: dict, data: bytes, rng: np.random.Generator) -> bytes:
    """One structural mutation of a safetensors file given as (header dict, data)."""
    text = json.dumps(header)
    r = rng.random()
    if r < 0.6:
        text = _mutate_json(text, rng)
    elif r < 0.7:  # two tensors overlapping
        h = json.loads(text)
        names = [k for k in h if k != "__metadata__"]
        if len(names) >= 2:
            a, b = rng.choice(names, 2, replace=False)
            start = h[a]["data_offsets"][0]
            span = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
            h[b]["data_offsets"] = [start, start + span]
        text = json.dumps(h)
    elif r < 0.8:
        h = json.loads(text)
        h["__metadata__"] = [[1]] if rng.random() < 0.5 else {"k": 1}
        text = json.dumps(h)
    elif r < 0.9:  # a field dropped
        h = json.loads(text)
        names = [k for k in h if k != "__metadata__"]
        spec = h[str(rng.choice(names))]
        spec.pop(str(rng.choice(sorted(spec))))
        text = json.dumps(h)
    else:  # the header length lies
        b = text.encode()
        n = _fit("<Q", len(b) + int(rng.choice([-1, 1, -8, 2**31, 2**63, 2**64 - 1])))
        return struct.pack("<Q", n) + b + data
    return safetensors_bytes(None, data, raw=text)


# -- seeds ---------------------------------------------------------------------------


def seed_files(folder: Path) -> dict[str, tuple]:
    """The valid files the mutations start from."""
    import gguf
    import jax.numpy as jnp

    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    tree = {
        "w": jquant.quantize_tensor(x, "q4_1"),
        "v": jquant.quantize_tensor(x, "q8_0"),
        "b": jnp.arange(4, dtype=jnp.float32),
        "ids": np.arange(3, dtype=np.int32),
        "cfg": {"step": 3, "name": "m", "layers": [1, (2, 3)]},
    }
    jq = folder / "jquant.gguf"
    jquant.save_gguf(jq, tree, metadata={"general.name": "fuzz", "x.list": [1, 2, 3]})
    foreign = folder / "foreign.gguf"
    w = gguf.GGUFWriter(foreign, "llama")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
    w.add_uint32("llama.block_count", 2)
    w.add_tensor(
        "q",
        gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q5_0),
        raw_dtype=gguf.GGMLQuantizationType.Q5_0,
    )
    k_bytes = np.random.default_rng(2).integers(0, 255, (4, 210), dtype=np.uint8)
    k_bytes[:, 208:] = 0  # Q6_K's float16 scale last: keep it finite
    w.add_tensor("k", k_bytes, raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    w.add_tensor("f", x)
    w.add_tensor("i", np.arange(6, dtype=np.int64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]},
        "b": {"dtype": "F16", "shape": [8], "data_offsets": [128, 144]},
        "c": {"dtype": "I64", "shape": [2], "data_offsets": [144, 160]},
    }
    data = np.random.default_rng(1).integers(0, 255, 160, dtype=np.uint8).tobytes()
    return {
        "gguf-jquant": ("gguf", jq.read_bytes()),
        "gguf-foreign": ("gguf", foreign.read_bytes()),
        "safetensors": ("safetensors", (header, data)),
    }


# -- running ---------------------------------------------------------------------------


def check_case(path: str, kind: str) -> str:
    """Read one file fully; returns "ok" or "error" (a FileFormatError); raises otherwise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if kind == "gguf":
                jquant.inspect_gguf(path)
                jquant.load_gguf(path)
            else:
                sources, _ = safetensors_sources(path)
                for s in sources:
                    np.asarray(s.load())
        except jquant.FileFormatError:
            return "error"
    return "ok"
