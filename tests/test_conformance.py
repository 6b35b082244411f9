"""Every registered format against ggml's own bytes, through every engine.

``tests/data/ggml-vectors.npz`` holds what ggml's C quantizer wrote for 7 adversarial
inputs in 12 formats, with and without an importance matrix. Each format of the table
that has vectors is checked through the single-tensor, chunked-model and sharded
engines (and with the importance matrix, where the format has a weighted encoder);
formats not registered yet are skipped, so a new record is covered as soon as it lands.
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jquant
from jquant._formats.registry import formats

from . import _ggml_oracle

VECTORS = _ggml_oracle.vectors()
CASES = sorted(k.split("/", 1)[1] for k in VECTORS if k.startswith("x/"))
TYPES = sorted({k.split("/", 1)[0] for k in VECTORS if not k.startswith(("x/", "imatrix/"))})


def _spec(type_name: str):
    found = [s for s in formats() if s.name == type_name]
    if not found:
        pytest.skip(f"{type_name} is not registered yet")
    return found[0]


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    return jax.make_mesh((8,), ("rows",))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_name", [t for t in TYPES if not t.endswith("+imatrix")])
def test_engines_write_ggml_bytes(type_name, case, mesh):
    spec = _spec(type_name)
    x, want = VECTORS[f"x/{case}"], VECTORS[f"{type_name}/{case}"]
    got = {
        "tensor": jquant.quantize_tensor(x, spec).to_bytes(),
        "model": jquant.quantize_model({"w": x}, spec, min_size=0)["w"].to_bytes(),
        "sharded": jquant.quantize_model(
            {"w": jax.device_put(x, NamedSharding(mesh, P("rows")))}, spec, min_size=0
        )["w"].to_bytes(),
    }
    for engine, b in got.items():
        np.testing.assert_array_equal(b, want, err_msg=f"{type_name} {case} via {engine}")


# The ``tiny`` case's importances (~1e-13) make ggml's weighted sums subnormal, and XLA:CPU
# flushes subnormals to zero (no flag turns that off): a few of its blocks differ.
SUBNORMAL = {("Q2_K", "tiny"), ("Q5_K", "tiny")}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_name", [t[: -len("+imatrix")] for t in TYPES if "+imatrix" in t])
def test_importance_weighted_bytes(type_name, case, request):
    spec = _spec(type_name)
    if not spec.supports_imatrix:
        pytest.skip(f"{type_name} has no weighted encoder registered yet")
    if (type_name, case) in SUBNORMAL:
        request.applymarker(pytest.mark.xfail(strict=True, reason="XLA:CPU flushes subnormals"))
    x, w = VECTORS[f"x/{case}"], VECTORS[f"imatrix/{case}"]
    want = VECTORS[f"{type_name}+imatrix/{case}"]
    got = {
        "tensor": jquant.quantize_tensor(x, spec, imatrix=w).to_bytes(),
        "model": jquant.quantize_model({"w": x}, spec, min_size=0, imatrix={"w": w})[
            "w"
        ].to_bytes(),
    }
    for engine, b in got.items():
        np.testing.assert_array_equal(b, want, err_msg=f"{type_name}+imatrix {case} via {engine}")
