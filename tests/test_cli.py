"""The ``jquant`` command line: a few real subprocesses, the rest through ``main(argv)``."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jquant
from jquant._cli.main import main

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _run(*args, cwd=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "jquant", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture
def checkpoint(tmp_path):
    tensors = {
        "embed.weight": _rand((128, 64), 0),
        "layers.0.attn.weight": _rand((64, 64), 1),
        "layers.0.mlp.weight": _rand((64, 256), 2),
        "layers.0.norm.weight": np.ones(64, np.float32),
    }
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(tensors, str(path))
    return path, tensors


# -- subprocess: what a user types ------------------------------------------------------


def test_no_arguments_runs_the_main_job():
    r = _run("demo", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["format"]: row for row in json.loads(r.stdout)["rows"]}
    assert list(rows) == [q.name for q in jquant.QuantType]
    for q in jquant.QuantType:
        # every example tensor has rows of whole blocks: bits/weight is the format's own
        assert rows[q.name]["bits_per_weight"] == pytest.approx(q.bits_per_weight)
        assert rows[q.name]["compression_ratio"] == pytest.approx(32 / q.bits_per_weight)
    assert rows["F32"]["rmse"] == 0 and rows["F32"]["max_error"] == 0
    assert rows["Q8_0"]["rmse"] < rows["Q5_1"]["rmse"] < rows["Q4_1"]["rmse"] < rows["Q4_0"]["rmse"]
    assert rows["F16"]["rmse"] < rows["Q8_0"]["rmse"]


def test_main_job_table(capsys):
    assert main([]) == 0  # the same job, as a table (in process: one subprocess is enough)
    out = capsys.readouterr().out
    for col in ("format", "bits/weight", "size", "ratio", "RMSE", "max error", "time"):
        assert col in out
    assert "Q4_0" in out and "7.11x" in out and "MiB" in out


def test_help_has_examples_and_exit_codes():
    r = _run("--help")
    assert r.returncode == 0
    assert "jquant quantize model.safetensors -t q4_0" in r.stdout and "exit codes" in r.stdout


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["quantize", "no/such/model.safetensors", "-o", "x.gguf"], 3, "No such file"),
        (["inspect", "corrupt.gguf"], 4, "not a valid GGUF file"),
    ],
)
def test_bad_input_gives_one_line_and_an_exit_code(tmp_path, args, code, needle):
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + b"\xff" * 100)
    r = _run(*args, cwd=tmp_path)
    assert r.returncode == code
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -- in process ------------------------------------------------------------------------


def test_quantize_inspect_compare(checkpoint, tmp_path, capsys):
    src, tensors = checkpoint
    out = tmp_path / "out.gguf"
    code = main(
        [
            "quantize", str(src), "-t", "q4_0", "-o", str(out),
            "--rule", "embed=q8_0", "--rule", "never_matches=q5_0", "--json",
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    formats = {t["path"]: t["format"] for t in summary["tensors"]}
    assert formats == {
        "embed.weight": "Q8_0",
        "layers.0.attn.weight": "Q4_0",
        "layers.0.mlp.weight": "Q4_0",
        "layers.0.norm.weight": None,
    }
    assert summary["unmatched_rules"] == ["never_matches"]
    assert summary["file_size"] == os.path.getsize(out)
    back = jquant.load_gguf(out)
    expected = jquant.quantize_tensor(tensors["layers.0.mlp.weight"], "q4_0")
    assert np.array_equal(back["layers.0.mlp.weight"].to_bytes(), expected.to_bytes())

    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["written_by_jquant"] and len(info["tensors"]) == 4
    row = next(t for t in info["tensors"] if t["name"] == "embed.weight")
    assert row["format"] == "Q8_0" and row["shape"] == [128, 64] and row["bits_per_weight"] == 8.5
    assert info["metadata"]["general.quantized_by"] == "jquant"

    assert main(["compare", str(src), str(out), "--json"]) == 0
    cmp = {t["name"]: t for t in json.loads(capsys.readouterr().out)["tensors"]}
    assert cmp["layers.0.norm.weight"]["rmse"] == 0
    x = tensors["layers.0.attn.weight"]
    y = np.asarray(jquant.dequantize_tensor(jquant.quantize_tensor(x, "q4_0")))
    assert cmp["layers.0.attn.weight"]["rmse"] == pytest.approx(
        float(np.sqrt(np.mean((x.astype(np.float64) - y) ** 2))), rel=1e-6
    )
    assert 0 < cmp["embed.weight"]["rmse"] < cmp["layers.0.attn.weight"]["rmse"]

    # human-readable output of the same commands
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Q8_0" in text and "KiB" in text and "general.quantized_by" in text
    assert main(["compare", str(src), str(out)]) == 0
    assert "SQNR" in capsys.readouterr().out


def test_quantize_npz_and_requantize_gguf(tmp_path, capsys):
    x = _rand((64, 128), 3)
    np.savez(tmp_path / "p.npz", **{"dense/kernel": x, "dense/bias": np.zeros(128, np.float32)})
    q8 = tmp_path / "q8.gguf"
    assert main(["quantize", str(tmp_path / "p.npz"), "-t", "q8_0", "-o", str(q8), "-q"]) == 0
    q4 = tmp_path / "q4.gguf"
    assert main(["quantize", str(q8), "-t", "q4_0", "-o", str(q4)]) == 0
    assert "already quantized" in capsys.readouterr().out
    back = jquant.load_gguf(q4)
    x8 = np.asarray(jquant.dequantize_tensor(jquant.quantize_tensor(x, "q8_0")))
    assert np.array_equal(
        back["dense/kernel"].to_bytes(), jquant.quantize_tensor(x8, "q4_0").to_bytes()
    )
    assert main(["inspect", str(tmp_path / "p.npz"), "--json"]) == 0
    assert {t["name"] for t in json.loads(capsys.readouterr().out)["tensors"]} == {
        "dense/kernel",
        "dense/bias",
    }


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["quantize", "{src}", "-o", "{out}", "-t", "q3_x"], 5, "unknown quantization format"),
        (["quantize", "{src}", "-o", "{out}", "--rule", "noequals"], 5, "REGEX=FORMAT"),
        (["quantize", "{src}", "-o", "{out}", "--rule", "([=q4_0"], 5, "not a valid regular"),
        (["quantize", "{src}", "-o", "{tmp}/missing/out.gguf"], 6, "does not exist"),
        (["quantize", "{tmp}/model.txt", "-o", "{out}"], 4, "unknown file type"),
        (["quantize", "{nan}", "-o", "{out}"], 5, "non-finite"),
        (["compare", "{src}", "{tmp}/other.gguf"], 4, "no tensor names in common"),
        (["quantize", "{src}"], 2, "required"),
    ],
)
def test_errors_map_to_exit_codes(checkpoint, tmp_path, capsys, args, code, needle):
    src, _ = checkpoint
    (tmp_path / "model.txt").write_text("hello")
    safetensors_numpy.save_file(
        {"w": np.full((32, 64), np.nan, np.float32)}, str(tmp_path / "nan.safetensors")
    )
    jquant.save_gguf(tmp_path / "other.gguf", {"unrelated": np.ones(3, np.float32)})
    subs = {
        "src": str(src),
        "out": str(tmp_path / "o.gguf"),
        "tmp": str(tmp_path),
        "nan": str(tmp_path / "nan.safetensors"),
    }
    assert main([a.format(**subs) for a in args]) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o.gguf").exists()
