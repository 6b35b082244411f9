"""A line-by-line Python port of ggml's C reference quantizers (ggml-quants.c, *_ref).

A second, independent oracle beside gguf.quants, scalar float32 arithmetic with
numpy scalars (no FMA, no vectorisation). Slow: use on small inputs. It exists for the
cases where gguf's vectorised numpy and ggml's C loop disagree (the sign of a zero
min/max in Q4_1/Q5_1 blocks, where numpy's answer depends on SIMD lane order).
"""

from __future__ import annotations

import numpy as np

f32 = np.float32
_FLT_MAX = np.finfo(np.float32).max


def _f16_bytes(v: np.float32) -> list[int]:
    return list(np.array([v], np.float16).view(np.uint8))


def _int8_trunc(v: np.float32) -> int:
    return int(np.trunc(v))  # (int8_t)v for the in-range values these formats produce


def _roundf(v: np.float32) -> int:
    a = abs(float(v))
    r = np.floor(a + 0.5) if (a - np.floor(a)) != 0.5 else np.floor(a) + 1
    return int(np.copysign(r, float(v)))


def _pack(q: list[int]) -> list[int]:
    return [(q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4) for j in range(16)]


def _qh(q: list[int]) -> list[int]:
    h = 0
    for j in range(32):
        h |= ((q[j] >> 4) & 1) << j
    return list(np.array([h], "<u4").view(np.uint8))


def quantize_block(x: np.ndarray, qtype: str) -> np.ndarray:
    """One block of 32 float32 values -> its GGML bytes, as ggml's C code computes them."""
    x = [f32(v) for v in np.asarray(x, np.float32)]
    if qtype in ("Q4_0", "Q5_0"):
        levels, qmax = (8, 15) if qtype == "Q4_0" else (16, 31)
        amax, mx = f32(0.0), f32(0.0)
        for v in x:
            if amax < abs(v):
                amax, mx = abs(v), v
        d = f32(mx / f32(-levels))
        id_ = f32(f32(1.0) / d) if d != 0 else f32(0.0)
        q = [min(qmax, _int8_trunc(f32(f32(v * id_) + f32(levels + 0.5)))) for v in x]
        out = _f16_bytes(d) + (_qh(q) if qtype == "Q5_0" else []) + _pack(q)
    elif qtype in ("Q4_1", "Q5_1"):
        qmax = 15 if qtype == "Q4_1" else 31
        mn, mx = f32(_FLT_MAX), f32(-_FLT_MAX)
        for v in x:
            if v < mn:
                mn = v
            if v > mx:
                mx = v
        d = f32(f32(mx - mn) / f32(qmax))
        id_ = f32(f32(1.0) / d) if d != 0 else f32(0.0)
        q = [min(qmax, _int8_trunc(f32(f32(f32(v - mn) * id_) + f32(0.5)))) for v in x]
        out = _f16_bytes(d) + _f16_bytes(mn) + (_qh(q) if qtype == "Q5_1" else []) + _pack(q)
    elif qtype == "Q8_0":
        amax = f32(0.0)
        for v in x:
            amax = max(amax, abs(v))
        d = f32(amax / f32(127))
        id_ = f32(f32(1.0) / d) if d != 0 else f32(0.0)
        q = [_roundf(f32(v * id_)) & 0xFF for v in x]
        out = _f16_bytes(d) + q
    else:
        raise ValueError(qtype)
    return np.array(out, np.uint8)


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """Rows of float32 (last axis a multiple of 32) -> GGML bytes, like gguf.quants.quantize."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(-1, 32)
    out = np.stack([quantize_block(b, qtype) for b in blocks])
    return out.reshape(*x.shape[:-1], -1)
