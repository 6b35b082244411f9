"""Hardening (issue 12): output paths, untrusted text on the terminal, crafted files,
signals, values out of range, cost bounded by file size, owned arrays, small ones."""

import errno
import io
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import tracemalloc
import uuid
import zlib

import gguf
import numpy as np
import pytest

import jquant
from jquant._cli import main as cli
from jquant._io.safetensors import read_sources, safetensors_sources

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _params():
    return {"w": np.ones((4, 32), np.float32)}


def _leftovers(folder):
    return [p for p in os.listdir(folder) if p.endswith(".tmp")]


def _st(tmp_path, tensors, name="m.safetensors", metadata=None):
    p = tmp_path / name
    safetensors_numpy.save_file(tensors, str(p), metadata=metadata)
    return p


# -- 1. output paths ---------------------------------------------------------------------


def test_symlink_output_replaces_its_target_and_stays_a_link(tmp_path):
    target = tmp_path / "real.gguf"
    target.write_bytes(b"old")
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    jquant.save_gguf(link, _params())
    assert link.is_symlink() and target.read_bytes()[:4] == b"GGUF"
    assert sorted(os.listdir(tmp_path)) == ["link.gguf", "real.gguf"]


@pytest.mark.parametrize("kind", ["fifo", "socket", "dir", "link-to-dev-null"])
def test_non_regular_outputs_are_refused(tmp_path, kind):
    p = tmp_path / "out.gguf"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
    elif kind == "dir":
        p.mkdir()
    else:
        p.symlink_to("/dev/null")
    before = os.lstat(p)
    with pytest.raises(jquant.FileWriteError, match="not a regular file|directory"):
        jquant.save_gguf(p, _params())
    after = os.lstat(p)
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert _leftovers(tmp_path) == []


def test_a_replaced_file_keeps_its_mode(tmp_path):
    p = tmp_path / "out.gguf"
    p.write_bytes(b"old")
    p.chmod(0o640)
    jquant.save_gguf(p, _params())
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_umask_mode(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        jquant.save_gguf(tmp_path / "new.gguf", _params())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.gguf").st_mode) == mode


# -- 2. output equal to the input ---------------------------------------------------------


@pytest.mark.parametrize("how", ["same", "hardlink", "symlink"])
def test_output_equal_to_input_is_refused(tmp_path, capsys, how):
    src = _st(tmp_path, {"w": np.ones((64, 64), np.float32)})
    before = src.read_bytes()
    out = src
    if how == "hardlink":
        out = tmp_path / "other.safetensors"
        os.link(src, out)
    elif how == "symlink":
        out = tmp_path / "other.gguf"
        out.symlink_to(src)
    assert cli.main(["quantize", str(src), "-t", "q8_0", "-o", str(out), "-q"]) == cli.EXIT_WRITE
    assert "is the input file" in capsys.readouterr().err
    assert src.read_bytes() == before
    with pytest.raises(jquant.FileWriteError, match="is the input file"):
        jquant.convert_safetensors(src, out)
    assert src.read_bytes() == before and _leftovers(tmp_path) == []


# -- 3. untrusted text on the terminal ----------------------------------------------------

NASTY = "w[/]\x1b]0;pwned\x07\x1b[2J[link=https://evil.example]x[/link]\x9b31m[bold]"


@pytest.fixture
def terminal(monkeypatch):
    """Every console the CLI makes writes to one buffer, as a colour terminal would."""
    from rich.console import Console

    buf = io.StringIO()

    def console(stderr=False):
        return Console(file=buf, force_terminal=True, width=300, highlight=False)

    monkeypatch.setattr(cli, "_console", console)
    return buf


def _assert_clean(text):
    for seq in ("\x1b]0;", "\x1b[2J", "\x1b]8;", "\x9b", "\x07"):
        assert seq not in text, f"{seq!r} from the data reached the terminal"


def test_untrusted_names_metadata_paths_and_rules_are_shown_not_interpreted(tmp_path, terminal):
    folder = tmp_path / "d[foo]"
    folder.mkdir()
    rng = np.random.default_rng(0)
    src = _st(
        folder,
        {NASTY: rng.standard_normal((64, 64)).astype(np.float32)},
        metadata={"k[/]": "[link=https://evil.example]click[/link]\x1b[2J"},
    )
    out = folder / "o[b].gguf"
    rule = "zz[/]=q4_0"
    assert cli.main(["quantize", str(src), "-t", "q8_0", "--rule", rule, "-o", str(out)]) == 0
    assert cli.main(["inspect", str(src)]) == 0
    assert cli.main(["inspect", str(out)]) == 0
    assert cli.main(["compare", str(src), str(out)]) == 0
    shown = terminal.getvalue()
    _assert_clean(shown)
    assert "d[foo]" in shown and "o[b].gguf" in shown and "zz[/]" in shown
    assert "w[/]\\x1b]0;pwned\\x07" in shown  # the name, with its controls made visible
    assert "[link=https://evil.example]click" in shown


def test_error_messages_have_no_control_characters(tmp_path, capsys):
    p = tmp_path / "m.safetensors"
    head = json.dumps({"\x1b[2Jbad": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}})
    p.write_bytes(struct.pack("<Q", len(head)) + head.encode() + b"\0")
    assert cli.main(["inspect", str(p)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[2Jbad" in err


def test_report_str_with_markup_in_paths():
    params = {NASTY: np.ones((64, 64), np.float32)}
    _, rep = jquant.quantize_model(params, {"zz[/]": "q4_0", ".*": "q8_0"}, report=True)
    text = str(rep)
    _assert_clean(text)
    assert "zz[/]" in text


# -- 4. signals ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_npz(tmp_path_factory):
    folder = tmp_path_factory.mktemp("signals")
    rng = np.random.default_rng(0)
    arrays = {
        f"t{i:02d}": rng.standard_normal((256, 32 * (i + 8))).astype(np.float32) for i in range(24)
    }
    p = folder / "big.npz"
    np.savez(p, **arrays)
    return p


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("delay", [0.0, 0.1, 0.4])
def test_signals_stop_the_work_keep_the_old_output_and_leave_no_temp_file(
    tmp_path, big_npz, sig, code, delay
):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"the old output")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jquant", "quantize", str(big_npz), "-t", "q5_1", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=os.getcwd(),
    )
    try:
        deadline = time.monotonic() + 120
        while not _leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # the temporary file exists once the work has started
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(delay)
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().decode()
    assert rc == code, err
    assert out.read_bytes() == b"the old output"
    assert _leftovers(tmp_path) == []


# -- 5. crafted files ---------------------------------------------------------------------


def _gguf_header(n_tensors=0, n_kv=0):
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _tensor_info(name, dims, ggml_type, offset):
    b = name.encode()
    dims_b = b"".join(struct.pack("<Q", d) for d in dims)
    return (
        struct.pack("<Q", len(b))
        + b
        + struct.pack("<I", len(dims))
        + dims_b
        + struct.pack("<IQ", ggml_type, offset)
    )


def _pad(b):
    return b + b"\0" * (-len(b) % 32)


def _jquant_file(path, tensors_json, tree_json):
    """A jquant-looking GGUF with one F32 tensor "a" of shape (1,) and the given JSON."""
    w = gguf.GGUFWriter(path, "jquant")
    w.add_uint32("jquant.format_version", 1)
    w.add_string("jquant.tensors", tensors_json)
    w.add_string("jquant.tree", tree_json)
    w.add_uint32("jquant.checksum", zlib.crc32((tensors_json + "\n" + tree_json).encode()))
    data = np.ones(1, np.float32)
    u32 = gguf.GGUFValueType.UINT32
    w.add_key_value("jquant.crc32", [zlib.crc32(data.tobytes())], gguf.GGUFValueType.ARRAY, u32)
    w.add_tensor("a", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GOOD_ENTRY = {"path": "a", "name": "a", "kind": "a", "dtype": "float32", "shape": [1], "type": 0}


def _entries(**change):
    return json.dumps([{**GOOD_ENTRY, **change}])


GOOD_TREE = '{"d":[["a",{"i":0}]]}'


DEEP = '{"d":[["a",' * 500 + '{"i":0}' + "]]}" * 500


@pytest.mark.parametrize(
    "tensors_json",
    [
        "[" * 500 + "]" * 500,
        "[" * 100_000 + "]" * 100_000,
        _entries(shape=[float("inf")]),
        _entries(shape=[1.0]),
        _entries(shape=[True]),
        _entries(shape=[2**70]),
        _entries(shape=[-1]),
        _entries(dtype=["float32"]),
        _entries(type="0"),
        '{"a": 1}',
        "[1]",
        '"x"',
    ],
)
def test_crafted_jquant_tensors_metadata_is_a_file_format_error(tmp_path, tensors_json):
    p = _jquant_file(tmp_path / "m.gguf", tensors_json, GOOD_TREE)
    with pytest.raises(jquant.FileFormatError):
        jquant.load_gguf(p)
    with pytest.raises(jquant.FileFormatError):
        read_sources(p)
    assert cli.main(["inspect", str(p)]) == cli.EXIT_BAD_INPUT


@pytest.mark.parametrize(
    "tree_json",
    [
        DEEP,
        '{"i": -1}',
        '{"i": 5}',
        '{"i": true}',
        '{"d": [["a"]]}',
        '{"d": [[["k"], {"i": 0}]]}',
        '{"l": 3}',
        '{"v": Infinity}',
    ],
)
def test_crafted_jquant_tree_metadata_is_a_file_format_error(tmp_path, tree_json):
    p = _jquant_file(tmp_path / "m.gguf", _entries(), tree_json)
    with pytest.raises(jquant.FileFormatError):
        jquant.load_gguf(p)
    try:  # with like= the keys come from like: some of these load, the rest must be clear
        jquant.load_gguf(p, like={"a": np.zeros(1, np.float32)})
    except jquant.FileFormatError:
        pass


def test_the_jquant_metadata_helper_makes_loadable_files(tmp_path):
    p = _jquant_file(tmp_path / "m.gguf", _entries(), GOOD_TREE)
    assert float(jquant.load_gguf(p)["a"][0]) == 1.0


def test_gguf_dims_whose_product_overflows(tmp_path, capsys):
    data = _pad(_gguf_header(n_tensors=1) + _tensor_info("t", [0, 2**64 - 1], 0, 0)) + b"\0" * 32
    p = tmp_path / "t.gguf"
    p.write_bytes(data)
    with pytest.raises(jquant.FileFormatError, match="overflows"):
        jquant.load_gguf(p)
    assert cli.main(["inspect", str(p)]) == cli.EXIT_BAD_INPUT


def _st_raw(tmp_path, header_text, data=b"\0" * 256):
    p = tmp_path / "c.safetensors"
    b = header_text.encode()
    p.write_bytes(struct.pack("<Q", len(b)) + b + data)
    return p


@pytest.mark.parametrize(
    "header",
    [
        '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"__metadata__": [1, 2]}',
        '{"__metadata__": {"k": 1}}',
        '{"a": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}',
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}',
        '{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}',
        '{"a": {"dtype": "F32", "shape": [' + str(2**70) + '], "data_offsets": [0, 4]}}',
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + str(2**70) + "]}}",
        '{"a": {"dtype": "F32", "shape": [64.9], "data_offsets": [0, 256]}}',
        '{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}',
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}',
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}',
        '{"a": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}}',
        '{"a": {"dtype": "F32", "shape": {"0": 1}, "data_offsets": [0, 4]}}',
        '{"a": [1, 2]}',
        '{"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},'
        ' "b": {"dtype": "F32", "shape": [16], "data_offsets": [32, 96]}}',
    ],
)
def test_crafted_safetensors_headers_are_a_file_format_error(tmp_path, header):
    p = _st_raw(tmp_path, header)
    with pytest.raises(jquant.FileFormatError):
        safetensors_sources(p)
    assert cli.main(["inspect", str(p), "--json"]) == cli.EXIT_BAD_INPUT


def test_adjacent_safetensors_tensors_are_fine(tmp_path):
    p = _st_raw(
        tmp_path,
        '{"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},'
        ' "b": {"dtype": "F32", "shape": [16], "data_offsets": [64, 128]},'
        ' "e": {"dtype": "F32", "shape": [0], "data_offsets": [64, 64]}}',
    )
    assert [s.name for s in safetensors_sources(p)[0]] == ["a", "b", "e"]


# -- 6. float64 beyond float32 ------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["f16", "bf16", "f32", "q8_0"])
def test_float64_out_of_float32_range_is_refused(tmp_path, capsys, fmt):
    src = tmp_path / "big.npz"
    x = np.full((64, 64), 1e39)
    x[3, 5] = -2e39
    np.savez(src, w=x)
    out = tmp_path / "out.gguf"
    assert cli.main(["quantize", str(src), "-t", fmt, "-o", str(out), "-q"]) == cli.EXIT_QUANT
    err = capsys.readouterr().err
    assert "out of range" in err and "non-finite" not in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_float64_range_check_in_the_library():
    x = np.zeros((4, 64))
    x[2, 7] = 1e300
    with pytest.raises(jquant.ScaleOverflowError, match=r"out of range.*\(2, 7\)|\(2, 7\).*out"):
        jquant.quantize_tensor(x, "f16")
    with pytest.raises(jquant.ScaleOverflowError, match="out of range"):
        jquant.quantize_model({"w": x}, "q4_0", min_size=0)
    x[2, 7] = 3e38  # inside float32's range: fine for f32
    assert jquant.quantize_tensor(x, "f32").shape == (4, 64)


# -- 7. cost bounded by the file ----------------------------------------------------------


def test_zero_size_tensors_cost_little_memory(tmp_path):
    """60,000 zero-size tensors (2.3 MB of header) load without a buffer per tensor."""
    n = 60_000
    head = [_gguf_header(n_tensors=n)] + [_tensor_info(f"t{i}", [0], 0, 0) for i in range(n)]
    p = tmp_path / "zeros.gguf"
    p.write_bytes(_pad(b"".join(head)))
    code = (
        "import resource, sys, jquant\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "x = jquant.load_gguf(sys.argv[1])\n"
        "assert len(x) == 60000\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run(
        [sys.executable, "-c", code, str(p)], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr
    grown_kib = int(r.stdout.split()[-1])
    assert grown_kib < 1024 * n / 1000, f"{grown_kib / n * 1024:.0f} bytes per zero-size tensor"


def test_zero_size_leaves_keep_their_shapes_dtypes_and_formats(tmp_path):
    import jax.numpy as jnp

    tree = {
        "f": jnp.zeros((0, 64), jnp.bfloat16),
        "q": jquant.quantize_tensor(np.zeros((0, 64), np.float32), "q4_0"),
        "i": np.zeros((0, 3), np.int64),
        "b": np.zeros(0, bool),
    }
    jquant.save_gguf(tmp_path / "z.gguf", tree)
    back = jquant.load_gguf(tmp_path / "z.gguf")
    assert (back["f"].shape, back["f"].dtype) == ((0, 64), jnp.bfloat16)
    assert isinstance(back["q"], jquant.QuantizedTensor) and back["q"].qtype.name == "Q4_0"
    assert back["q"].shape == (0, 64)
    assert (back["i"].shape, back["i"].dtype) == ((0, 3), np.int64)
    assert (back["b"].shape, back["b"].dtype) == ((0,), np.bool_)
    assert back["i"] is not jquant.load_gguf(tmp_path / "z.gguf")["i"]  # numpy: never shared


def test_a_foreign_format_decodes_in_bounded_memory(tmp_path):
    """IQ1_S (gguf-py decodes it) peaked at 4x its float32 output; now about 1x."""
    n_blocks = 8192  # 2M values: 8 MiB of float32 from 400 KB of IQ1_S
    raw = np.random.default_rng(0).integers(0, 255, (n_blocks, 50), dtype=np.uint8)
    raw[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # finite scales
    p = tmp_path / "iq1.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_tensor("q", raw.reshape(32, -1), raw_dtype=gguf.GGMLQuantizationType.IQ1_S)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out_bytes = n_blocks * 256 * 4
    tracemalloc.start()
    try:
        with pytest.warns(UserWarning, match="IQ1_S"):
            x = jquant.load_gguf(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x["q"].shape == (32, 65536)
    assert peak < 1.6 * out_bytes, f"peak {peak / out_bytes:.2f}x the float32 output"


# -- 8. owned arrays ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_foreign_64_bit_tensors_are_owned_copies(tmp_path, dtype):
    p = tmp_path / "f.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_tensor("x", np.arange(64, dtype=dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    x = jquant.load_gguf(p)["x"]
    offset = jquant.inspect_gguf(p).tensors[0].offset
    with open(p, "r+b") as f:  # rewrite the data in place
        f.seek(offset)
        f.write(np.full(64, 7, dtype).tobytes())
    np.testing.assert_array_equal(np.asarray(x), np.arange(64, dtype=dtype))
    os.truncate(p, offset)  # a view would now raise SIGBUS on access
    assert int(np.asarray(x)[63]) == 63


# -- 9. smaller ones ------------------------------------------------------------------------


def test_output_in_a_missing_folder_with_a_slash(tmp_path, capsys):
    src = _st(tmp_path, {"w": np.ones((64, 64), np.float32)})
    out = str(tmp_path / "newdir") + "/"
    assert cli.main(["quantize", str(src), "-o", out, "-q"]) == cli.EXIT_WRITE
    assert "names a folder" in capsys.readouterr().err
    assert not (tmp_path / "newdir").exists() and _leftovers(tmp_path) == []
    with pytest.raises(jquant.FileWriteError, match="names a folder"):
        jquant.save_gguf(out, _params())
    with pytest.raises(jquant.FileWriteError, match="does not exist"):
        jquant.save_gguf(tmp_path / "missing" / "x.gguf", _params())


def test_disk_full_says_no_space_left_on_device(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / f"full-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=False)
    if r.returncode != 0:
        pytest.skip("can't mount a tmpfs here")
    try:
        (mnt / "out.gguf").write_bytes(b"old")
        with pytest.raises(jquant.FileWriteError, match="no space left on device"):
            jquant.save_gguf(mnt / "out.gguf", {"w": np.ones((256, 256), np.float32)})
        assert os.listdir(mnt) == ["out.gguf"] and (mnt / "out.gguf").read_bytes() == b"old"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_enospc_on_fsync_is_reported_and_cleaned_up(tmp_path, monkeypatch):
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(jquant.FileWriteError, match="no space left on device"):
        jquant.save_gguf(tmp_path / "o.gguf", _params())
    assert os.listdir(tmp_path) == []


def test_inspect_json_is_json_with_nan_metadata(tmp_path, capsys):
    p = tmp_path / "m.gguf"
    meta = {"x.nan": float("nan"), "x.inf": float("inf"), "x.list": [1.0, float("-inf")]}
    jquant.save_gguf(p, _params(), metadata=meta)
    assert cli.main(["inspect", str(p), "--json"]) == 0

    def refuse(name):
        raise AssertionError(f"{name} in --json output")

    out = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert out["metadata"]["x.nan"] == "nan" and out["metadata"]["x.list"] == [1.0, "-inf"]


@pytest.mark.parametrize("shape", [(-1, 32), (1,) * 101, (2.5,), ("a",)])
def test_from_bytes_bad_shapes(shape):
    with pytest.raises(jquant.FileFormatError):
        jquant.QuantizedTensor.from_bytes(np.zeros(34, np.uint8), "q8_0", shape)


def test_chunk_blocks_out_of_range():
    with pytest.raises(jquant.QuantError, match="chunk_blocks"):
        jquant.quantize_model({"w": np.ones((64, 64), np.float32)}, "q8_0", chunk_blocks=2**40)


def test_metadata_ints_beyond_64_bits(tmp_path):
    with pytest.raises(jquant.QuantError, match="64 bits"):
        jquant.save_gguf(tmp_path / "m.gguf", _params(), metadata={"x.big": 2**70})
    assert _leftovers(tmp_path) == [] and not (tmp_path / "m.gguf").exists()
    jquant.save_gguf(tmp_path / "m.gguf", _params(), metadata={"x.u64": 2**64 - 1, "x.n": -(2**63)})
    md = jquant.inspect_gguf(tmp_path / "m.gguf").metadata
    assert md["x.u64"] == 2**64 - 1 and md["x.n"] == -(2**63)


def test_readme_lists_every_exit_code():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Errors") :]
    codes = {v for k, v in vars(cli).items() if k.startswith("EXIT_")}
    assert codes == {0, 1, 2, 3, 4, 5, 6, 130, 143}
    for code in codes:
        assert f"\n| {code} |" in section
