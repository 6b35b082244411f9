"""A quantized pytree saves and restores with orbax-checkpoint, packed sizes intact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant

ocp = pytest.importorskip("orbax.checkpoint")


def test_orbax_round_trip_keeps_packed_leaves(tmp_path):
    x = jax.random.normal(jax.random.key(0), (64, 128))
    qp = {
        "layers": [{"w": jquant.quantize_tensor(x, fmt)} for fmt in ("q8_0", "q4_1", "q5_0")],
        "bias": jnp.ones(128),
    }
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", qp)
    ckpt.wait_until_finished()
    # shape, dtype and format are static pytree metadata: the abstract target carries them
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, qp)
    back = ckpt.restore(tmp_path / "ckpt", abstract)
    ckpt.close()
    for q, b in zip(qp["layers"], back["layers"], strict=True):
        q, b = q["w"], b["w"]
        assert isinstance(b, jquant.QuantizedTensor)
        assert (b.qtype, b.shape, b.dtype, b.nbytes) == (q.qtype, q.shape, q.dtype, q.nbytes)
        for name, leaf in q.leaves().items():
            restored = b.leaves()[name]
            assert restored.dtype == leaf.dtype and restored.shape == leaf.shape
        assert np.array_equal(b.to_bytes(), q.to_bytes())
    np.testing.assert_array_equal(back["bias"], qp["bias"])
