"""GGUF export and import: round trips, gguf-py interop, names, ragged rows, atomic writes."""

import errno
import os

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jquant
from jquant._io.gguf import MAX_NAME_BYTES, Entry, gguf_name, write_gguf

BLOCK_FORMATS = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
ALL_FORMATS = [*BLOCK_FORMATS, "f16", "bf16", "f32"]


def _rand(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _bytes_equal(a, b):
    if a.nbytes == 0:  # QuantizedTensor.to_bytes can't reshape an empty tensor's leaves
        return b.nbytes == 0 and all(
            np.shape(x) == np.shape(y)
            for x, y in zip(a.leaves().values(), b.leaves().values(), strict=True)
        )
    return np.array_equal(np.asarray(a.to_bytes()), np.asarray(b.to_bytes()))


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "model.gguf")


def test_round_trip_every_format_and_dtype(path):
    x = _rand((16, 256))
    qp = {fmt: {"float32": jquant.quantize_tensor(x, fmt)} for fmt in ALL_FORMATS}
    for fmt, dt in [("q4_1", np.float16), ("q8_0", ml_dtypes.bfloat16), ("bf16", np.float16)]:
        qp[fmt][np.dtype(dt).name] = jquant.quantize_tensor(x.astype(dt), fmt)
    jquant.save_gguf(path, qp)
    back = jquant.load_gguf(path)
    for fmt in ALL_FORMATS:
        for name, q in qp[fmt].items():
            b = back[fmt][name]
            assert isinstance(b, jquant.QuantizedTensor)
            assert (b.qtype, b.shape, b.dtype) == (q.qtype, q.shape, q.dtype)
            assert _bytes_equal(b, q)
            np.testing.assert_array_equal(
                np.asarray(jquant.dequantize_tensor(b)), np.asarray(jquant.dequantize_tensor(q))
            )


def test_structure_scalars_and_plain_arrays_round_trip(path):
    tree = {
        "layers": [
            {"w": jquant.quantize_tensor(_rand((4, 64)), "q4_1"), "b": jnp.arange(4.0)},
            {"w": jquant.quantize_tensor(_rand((4, 64), 1), "q8_0"), "b": None},
        ],
        "pair": (np.arange(6, dtype=np.int64).reshape(2, 3), np.array([True, False, True])),
        "meta": {"step": 7, "lr": 0.5, "name": "demo"},
        "by_int": {3: np.uint8(9), 1: np.float16(0.5)},
        "u16": np.array([1, 65535], np.uint16),
        "u32": np.array([0, 2**32 - 1], np.uint32),
        "i8": np.array([-128, 127], np.int8),
        "f64": np.array([1e-300, 2.5]),
        "bf": jnp.ones((3,), jnp.bfloat16) / 3,
        "scalar": jnp.float32(2.5),
        "five_d": jnp.arange(2 * 3 * 4 * 5 * 6, dtype=jnp.float32).reshape(2, 3, 4, 5, 6),
        "q5d": jquant.quantize_tensor(_rand((2, 2, 2, 2, 64)), "q5_0"),
        "empty": jquant.quantize_tensor(jnp.zeros((0, 64)), "q4_0"),
    }
    jquant.save_gguf(path, tree)
    back = jquant.load_gguf(path)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    is_q = lambda x: isinstance(x, jquant.QuantizedTensor)  # noqa: E731
    for a, b in zip(
        jax.tree.leaves(tree, is_leaf=is_q), jax.tree.leaves(back, is_leaf=is_q), strict=True
    ):
        if is_q(a):
            assert (a.shape, a.qtype, a.dtype) == (b.shape, b.qtype, b.dtype) and _bytes_equal(a, b)
        elif isinstance(a, (int, float, str)):
            assert a == b and type(a) is type(b)
        else:
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    # >4-D tensors are stored as 4-D (GGML's limit), scalars as [1]
    shapes = {t.name: t.shape.tolist() for t in gguf.GGUFReader(path).tensors}
    assert shapes["five_d"] == [6, 5, 4, 6] and shapes["scalar"] == [1]


def test_gguf_reader_reads_jquant_files(path):
    x = _rand((16, 256))
    qp = {fmt: jquant.quantize_tensor(x, fmt) for fmt in ALL_FORMATS}
    jquant.save_gguf(path, qp, metadata={"general.name": "t", "t.count": np.int32(-3)})
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.name"].contents() == "t"
    assert reader.fields["t.count"].contents() == -3
    tensors = {t.name: t for t in reader.tensors}
    for fmt, q in qp.items():
        t = tensors[fmt]
        assert t.tensor_type == q.qtype.ggml_type
        assert t.shape.tolist() == [256, 16]  # GGUF dims run innermost-first
        raw = np.asarray(t.data).reshape(16, -1).view(np.uint8)
        assert np.array_equal(raw, q.to_bytes())
        ours = np.asarray(jquant.dequantize_tensor(q), np.float32)
        if fmt in ("f16", "f32"):
            theirs = np.asarray(t.data, np.float32)
        else:
            theirs = gguf.quants.dequantize(raw, t.tensor_type)
        np.testing.assert_array_equal(ours, theirs.reshape(16, 256))


def test_foreign_gguf_files_load(path):
    """Files written by gguf-py directly: jquant's formats (K-quants included) stay
    quantized, formats jquant doesn't have decode to float32 with a warning."""
    x = _rand((16, 256))
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 1)
    q4 = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("blk.0.attn_q.weight", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("token_embd.weight", x.astype(np.float16))
    w.add_tensor("ids", np.arange(5, dtype=np.int32))
    rng = np.random.default_rng(0)
    q6 = rng.integers(0, 256, (16, 210), dtype=np.uint8)  # one Q6_K block per row
    q6[:, -2:] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # a sane scale
    w.add_tensor("blk.0.ffn_down.weight", q6, raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    iq2 = rng.integers(0, 256, (16, 66), dtype=np.uint8)  # one IQ2_XXS block per row
    iq2[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    w.add_tensor("blk.0.ffn_up.weight", iq2, raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    with pytest.warns(UserWarning, match=r"blk\.0\.ffn_up\.weight \(IQ2_XXS\)"):
        back = jquant.load_gguf(path)
    q = back["blk.0.attn_q.weight"]
    assert isinstance(q, jquant.QuantizedTensor) and q.qtype is jquant.QuantType.Q4_0
    assert q.shape == (16, 256) and np.array_equal(q.to_bytes(), q4)
    assert back["token_embd.weight"].qtype is jquant.QuantType.F16
    np.testing.assert_array_equal(np.asarray(back["ids"]), np.arange(5))
    k = back["blk.0.ffn_down.weight"]  # a K-quant stays packed, bytes untouched
    assert isinstance(k, jquant.QuantizedTensor) and k.qtype is jquant.QuantType.Q6_K
    assert k.shape == (16, 256) and np.array_equal(k.to_bytes(), q6)
    expected = gguf.quants.dequantize(q6, gguf.GGMLQuantizationType.Q6_K)
    np.testing.assert_array_equal(np.asarray(jquant.dequantize_tensor(k)), expected)
    f = back["blk.0.ffn_up.weight"]
    assert f.shape == (16, 256) and f.dtype == jnp.float32
    expected = gguf.quants.dequantize(iq2, gguf.GGMLQuantizationType.IQ2_XXS)
    np.testing.assert_array_equal(np.asarray(f), expected)
    info = jquant.inspect_gguf(path)
    assert not info.is_jquant and info.metadata["llama.block_count"] == 1
    assert info.metadata["general.architecture"] == "llama"


def test_names_fit_gguf_and_round_trip(path):
    long = "encoder/" + "block_with_a_very_long_name/" * 4 + "kernel"
    tree = {
        "a/b": jnp.ones(3),  # a key containing the separator...
        "a": {"b": jnp.zeros(3)},  # ...collides with a nested path
        long: jnp.full((2,), 2.0),
        "ünïcödé" * 8: jnp.full((2,), 3.0),
    }
    jquant.save_gguf(path, tree)
    names = [t.name for t in gguf.GGUFReader(path).tensors]
    assert len(set(names)) == 4
    assert all(len(n.encode()) <= MAX_NAME_BYTES for n in names)
    back = jquant.load_gguf(path)
    assert set(back) == set(tree)
    np.testing.assert_array_equal(back["a/b"], np.ones(3))
    np.testing.assert_array_equal(back["a"]["b"], np.zeros(3))
    np.testing.assert_array_equal(back[long], [2.0, 2.0])
    assert gguf_name("x/y", {"x.y"}) != "x.y"


def test_ragged_rows_are_stored_dequantized_with_a_warning(path):
    x = _rand((6, 40), 7)
    qp = {
        "ragged": jquant.quantize_tensor(x, "q4_0"),
        "ragged16": jquant.quantize_tensor(x.astype(np.float16), "q8_0"),
        "ok": jquant.quantize_tensor(_rand((6, 64)), "q4_0"),
    }
    with pytest.warns(UserWarning, match=r"ragged \(6, 40\) Q4_0"):
        jquant.save_gguf(path, qp)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert tensors["ragged"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["ragged"].shape.tolist() == [40, 6]  # what llama.cpp sees is the truth
    assert tensors["ragged16"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["ok"].tensor_type == gguf.GGMLQuantizationType.Q4_0
    back = jquant.load_gguf(path)
    for k in ("ragged", "ragged16"):
        assert back[k].shape == (6, 40) and back[k].dtype == qp[k].dtype
        np.testing.assert_array_equal(
            np.asarray(jquant.dequantize_tensor(back[k])),
            np.asarray(jquant.dequantize_tensor(qp[k])),
        )


def test_like_restores_custom_pytrees_and_checks_structure(path):
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.Linear(64, 32, key=jax.random.key(0))
    qmodel = eqx.tree_at(lambda m: m.weight, model, jquant.quantize_tensor(model.weight, "q8_0"))
    jquant.save_gguf(path, qmodel)
    as_dict = jquant.load_gguf(path)  # without like=: the attributes as a dict
    assert set(as_dict) == {"weight", "bias"}
    back = jquant.load_gguf(path, like=qmodel)
    assert isinstance(back, eqx.nn.Linear) and _bytes_equal(back.weight, qmodel.weight)
    np.testing.assert_array_equal(back.bias, model.bias)
    with pytest.raises(jquant.ShapeError, match="different structure"):
        jquant.load_gguf(path, like={"weight": 0, "other": 1})


def test_device_and_sharding_placement(path):
    x = _rand((64, 256), 9)
    jquant.save_gguf(path, {"w": jquant.quantize_tensor(x, "q4_0"), "b": jnp.ones(64)})
    dev = jax.devices()[1]
    back = jquant.load_gguf(path, device=dev)
    assert back["w"].qs.devices() == {dev} and back["b"].devices() == {dev}
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
    sharding = NamedSharding(mesh, PartitionSpec("x", "y"))
    back = jquant.load_gguf(
        path, device=lambda p, shape: sharding if len(shape) == 2 else jax.devices()[0]
    )
    w = back["w"]
    assert w.qs.sharding.is_equivalent_to(sharding, w.qs.ndim)
    assert len(w.d.sharding.device_set) == 8 and back["b"].devices() == {jax.devices()[0]}
    np.testing.assert_array_equal(
        np.asarray(jquant.dequantize_tensor(w)),
        np.asarray(jquant.dequantize_tensor(jquant.quantize_tensor(x, "q4_0"))),
    )


def test_metadata_values_and_reserved_keys(path):
    jquant.save_gguf(
        path,
        {"w": jnp.ones(2)},
        metadata={
            "general.architecture": "llama",
            "general.name": "m",
            "x.int": 5,
            "x.neg": -5,
            "x.float": 0.25,
            "x.bool": True,
            "x.list": ["a", "b"],
            "x.ints": [1, 2, 3],
            "x.typed": (7, gguf.GGUFValueType.UINT64),
        },
    )
    info = jquant.inspect_gguf(path)
    md = info.user_metadata()
    assert md["general.architecture"] == "llama" and md["x.int"] == 5 and md["x.neg"] == -5
    assert md["x.float"] == 0.25 and md["x.bool"] is True and md["x.list"] == ["a", "b"]
    assert info.types["x.typed"][0] == gguf.GGUFValueType.UINT64
    assert info.types["x.int"][0] == gguf.GGUFValueType.UINT32
    with pytest.raises(jquant.QuantError, match="reserved"):
        jquant.save_gguf(path, {"w": jnp.ones(2)}, metadata={"jquant.x": 1})
    with pytest.raises(jquant.QuantError, match="can't store"):
        jquant.save_gguf(path, {"w": jnp.ones(2)}, metadata={"x.bad": object()})
    with pytest.raises(jquant.QuantError, match="can't store"):
        jquant.save_gguf(path, {"w": object()})


def test_write_is_atomic_when_a_tensor_fails(tmp_path):
    path = tmp_path / "m.gguf"
    jquant.save_gguf(path, {"w": jnp.ones(4)})
    before = path.read_bytes()

    def boom():
        raise RuntimeError("simulated failure while producing tensor data")

    good = Entry("a", "a", "float32", (4,), 0, lambda: np.zeros(4, np.float32).view(np.uint8))
    bad = Entry("b", "a", "float32", (4,), 0, boom)
    with pytest.raises(RuntimeError, match="simulated"):
        write_gguf(path, [good, bad], tree={"d": []})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temporary file left


def test_disk_full_and_bad_folder_surface_as_file_write_error(tmp_path, monkeypatch):
    with pytest.raises(jquant.FileWriteError, match="does not exist"):
        jquant.save_gguf(tmp_path / "missing" / "m.gguf", {"w": jnp.ones(4)})
    with pytest.raises(jquant.FileWriteError, match="is a directory"):
        jquant.save_gguf(tmp_path, {"w": jnp.ones(4)})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(jquant.FileWriteError, match="no space left") as exc:
        jquant.save_gguf(tmp_path / "m.gguf", {"w": jnp.ones(4)})
    assert isinstance(exc.value, OSError) and isinstance(exc.value, jquant.QuantError)
    assert os.listdir(tmp_path) == []


def test_crc_catches_flipped_data_bytes(path):
    jquant.save_gguf(path, {"w": jquant.quantize_tensor(_rand((4, 64)), "q8_0")})
    info = jquant.inspect_gguf(path)
    with open(path, "r+b") as f:
        f.seek(info.tensors[0].offset + 5)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(jquant.FileFormatError, match="CRC32 mismatch"):
        jquant.load_gguf(path)
    assert jquant.load_gguf(path, verify=False)["w"].shape == (4, 64)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        jquant.load_gguf(tmp_path / "nope.gguf")
