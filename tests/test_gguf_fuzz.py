"""Corrupt GGUF input: a clear FileFormatError, never a crash, a hang or a wrong tensor."""

import struct

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant

N_FLIPS = 300
N_TRUNCATIONS = 80


def _tree():
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    return {
        "w": jquant.quantize_tensor(x, "q4_1"),
        "v": jquant.quantize_tensor(x, "q8_0"),
        "b": jnp.arange(4, dtype=jnp.float32),
        "ids": np.arange(3, dtype=np.int32),
        "cfg": {"step": 3, "name": "m"},
    }


def _same(a, b):
    is_q = lambda x: isinstance(x, jquant.QuantizedTensor)  # noqa: E731
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    for x, y in zip(
        jax.tree.leaves(a, is_leaf=is_q), jax.tree.leaves(b, is_leaf=is_q), strict=True
    ):
        if is_q(x):
            if not (
                is_q(y)
                and (x.shape, x.qtype, x.dtype) == (y.shape, y.qtype, y.dtype)
                and np.array_equal(x.to_bytes(), y.to_bytes())
            ):
                return False
        elif isinstance(x, (int, str)):
            if x != y:
                return False
        elif not (np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)):
            return False
    return True


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "good.gguf"
    tree = _tree()
    jquant.save_gguf(path, tree, metadata={"general.name": "fuzz", "x.list": [1, 2, 3]})
    return tree, path.read_bytes()


def _write(tmp_path, data, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return p


def test_random_byte_flips_never_give_a_wrong_tensor(good, tmp_path):
    tree, data = good
    rng = np.random.default_rng(1)
    header_end = jquant.inspect_gguf(_write(tmp_path, data)).tensors[0].offset
    outcomes = {"error": 0, "same": 0}
    for i in range(N_FLIPS):
        buf = bytearray(data)
        # half the flips hit the header, where parsing happens
        hi = header_end if i % 2 else len(buf)
        pos = int(rng.integers(0, hi))
        buf[pos] ^= 1 << int(rng.integers(0, 8))
        p = _write(tmp_path, buf)
        try:
            back = jquant.load_gguf(p)
        except jquant.FileFormatError:
            outcomes["error"] += 1
            continue
        # a flip the checks can't see (e.g. in padding or in general.name) must be harmless
        assert _same(back, tree), f"flip at byte {pos} loaded a different pytree"
        outcomes["same"] += 1
    assert outcomes["error"] > N_FLIPS // 2


def test_random_truncations_raise_file_format_error(good, tmp_path):
    _, data = good
    rng = np.random.default_rng(2)
    cuts = {0, 1, 4, 8, 23, 24, len(data) - 1, *rng.integers(0, len(data), N_TRUNCATIONS).tolist()}
    for n in sorted(cuts):
        p = _write(tmp_path, data[:n])
        with pytest.raises(jquant.FileFormatError):
            jquant.load_gguf(p)
        if n < len(data) - 64:
            with pytest.raises(jquant.FileFormatError):
                jquant.inspect_gguf(p)


def test_flips_in_foreign_files_never_crash(tmp_path):
    """Files without jquant's checksums: every flip either loads or raises FileFormatError."""
    path = tmp_path / "foreign.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    w.add_tensor(
        "q",
        gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q5_0),
        raw_dtype=gguf.GGMLQuantizationType.Q5_0,
    )
    w.add_tensor("f", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    rng = np.random.default_rng(4)
    header_end = jquant.inspect_gguf(path).tensors[0].offset
    for _ in range(150):
        buf = bytearray(data)
        pos = int(rng.integers(0, header_end))
        buf[pos] ^= 1 << int(rng.integers(0, 8))
        p = _write(tmp_path, buf)
        try:
            back = jquant.load_gguf(p)
        except jquant.FileFormatError:
            continue
        assert isinstance(back, dict)


def _header(n_tensors=0, n_kv=0, version=3):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _tensor_info(name, dims, ggml_type, offset):
    b = name.encode()
    return (
        struct.pack("<Q", len(b))
        + b
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def _pad(b, align=32):
    return b + b"\0" * (-len(b) % align)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "shorter than a GGUF header"),
        (b"GGUF", "shorter than a GGUF header"),
        (b"GGML" + b"\0" * 40, "bad magic"),
        (_header(version=1) + b"\0" * 8, "version 1"),
        (_header(version=7) + b"\0" * 8, "unsupported GGUF version 7"),
        (_header(n_tensors=2**40) + b"\0" * 8, "can't fit"),
        (_header(n_kv=1) + struct.pack("<Q", 2**60) + b"\0" * 8, "truncated or corrupt"),
        (
            _header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99) + b"\0" * 8,
            "unknown value type 99",
        ),
        (
            _header(n_kv=1)
            + struct.pack("<Q", 1)
            + b"k"
            + struct.pack("<IIQ", 9, 4, 2**50)
            + b"\0" * 8,
            "truncated or corrupt",
        ),
        (
            _pad(_header(n_tensors=1) + _tensor_info("t", [32], 99, 0)) + b"\0" * 64,
            "unknown GGML type id 99",
        ),
        (_pad(_header(n_tensors=1) + _tensor_info("t", [33], 2, 0)) + b"\0" * 64, "not a multiple"),
        (_pad(_header(n_tensors=1) + _tensor_info("t", [64], 2, 0)) + b"\0" * 20, "past the end"),
        (
            _pad(_header(n_tensors=1) + _tensor_info("t", [32], 2, 2**40)) + b"\0" * 20,
            "past the end",
        ),
        (
            _pad(_header(n_tensors=1) + _tensor_info("t", [32], 2, 3)) + b"\0" * 64,
            "not a multiple of 32",
        ),
        (
            _pad(_header(n_tensors=1) + _tensor_info("t", [1] * 5, 0, 0)) + b"\0" * 64,
            "5 dimensions",
        ),
        (
            _pad(
                _header(n_tensors=2) + _tensor_info("t", [8], 0, 0) + _tensor_info("t", [8], 0, 32)
            )
            + b"\0" * 64,
            "duplicate tensor name",
        ),
        (
            _pad(
                _header(n_tensors=2) + _tensor_info("a", [16], 0, 0) + _tensor_info("b", [8], 0, 32)
            )
            + b"\0" * 128,
            "overlaps",
        ),
    ],
)
def test_crafted_corruptions(tmp_path, data, match):
    p = _write(tmp_path, data)
    with pytest.raises(jquant.FileFormatError, match=match):
        jquant.load_gguf(p)


def test_crafted_valid_file_loads(tmp_path):
    """The crafting helpers above make valid files when nothing is wrong."""
    vals = np.arange(8, dtype=np.float32)
    p = _write(tmp_path, _pad(_header(n_tensors=1) + _tensor_info("t", [8], 0, 0)) + vals.tobytes())
    back = jquant.load_gguf(p)
    np.testing.assert_array_equal(jquant.dequantize_tensor(back["t"]), vals)


N_STRUCTURAL = 300


def test_structural_mutations_load_or_raise_file_format_error(tmp_path):
    """Header fields and JSON metadata set to edge values (benchmarks/fuzz_readers.py runs
    10,000): each file loads or raises FileFormatError, never another exception."""
    from tests._fuzz import check_case, mutate_gguf, mutate_safetensors, seed_files

    base = seed_files(tmp_path)
    rng = np.random.default_rng(5)
    names = sorted(base)
    outcomes = {"ok": 0, "error": 0}
    for k in range(N_STRUCTURAL):
        kind, seed = base[names[k % len(names)]]
        if kind == "gguf":
            p = _write(tmp_path, mutate_gguf(seed, rng), "case.gguf")
        else:
            p = _write(tmp_path, mutate_safetensors(*seed, rng), "case.safetensors")
        outcomes[check_case(str(p), kind)] += 1
    assert outcomes["error"] > N_STRUCTURAL // 2
