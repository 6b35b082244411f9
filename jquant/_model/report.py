"""What quantizing a model cost: :class:`ModelReport`, one row per leaf plus totals."""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

from rich.console import Console
from rich.table import Table

from .._core.tensor import human_bytes
from .._core.terminal import plain_text

__all__ = ["LeafReport", "ModelReport"]


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """One leaf of a quantized model.

    Attributes:
        path: the leaf's '/'-joined pytree path.
        shape: its shape (``()`` for non-array leaves).
        dtype: its original dtype name (the type name for non-array leaves).
        format: the :class:`QuantType` name it was stored in, ``None`` if left as is.
        bytes_before: size in its original dtype.
        bytes_after: size as stored (packed bytes, scales included).
        bits_per_weight: ``8 * bytes_after / size``.
        rmse, max_error, mean_error, sqnr_db: error of the dequantized values against the
          original (float32), ``None`` for leaves left as they were.
        reason: why the leaf was left unquantized (``None`` when it was quantized).
        rule: the rule pattern that decided its format, if one did.

    Example:
        >>> import jax.numpy as jnp, jquant
        >>> params = {"w": jnp.ones((64, 64)), "b": jnp.zeros(64)}
        >>> _, report = jquant.quantize_model(params, "q8_0", report=True)
        >>> [(r.path, r.format, r.bytes_after, r.reason is None) for r in report.rows]
        [('b', None, 256, False), ('w', 'Q8_0', 4352, True)]
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    format: str | None
    bytes_before: int
    bytes_after: int
    bits_per_weight: float
    rmse: float | None = None
    max_error: float | None = None
    mean_error: float | None = None
    sqnr_db: float | None = None
    reason: str | None = None
    rule: str | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class ModelReport:
    """Per-leaf sizes and errors of a :func:`quantize_model` call, with totals.

    ``print(report)`` shows a table (``rich`` renders it; in a notebook ``report`` alone
    does); :meth:`to_rows` gives plain dicts for a DataFrame or JSON.

    Attributes:
        rows: one :class:`LeafReport` per leaf, in pytree order.
        unmatched_rules: rule patterns that decided no leaf: a typo, a rule shadowed by
          an earlier one, or one whose every leaf the defaults kept.

    Example:
        >>> import jax, jax.numpy as jnp, jquant
        >>> params = {"w": jax.random.normal(jax.random.key(0), (64, 256)), "b": jnp.zeros(256)}
        >>> _, rep = jquant.quantize_model(params, {"w": "q8_0", "head": "q4_0"}, report=True)
        >>> rep.num_quantized, rep.unmatched_rules
        (1, ('head',))
        >>> rep["w"].format, rep["w"].sqnr_db > 35, rep["b"].reason
        ('Q8_0', True, '1-D (bias/norm/scale) kept by keep_1d=True')
        >>> sorted(rep.to_rows()[0])[:4]
        ['bits_per_weight', 'bytes_after', 'bytes_before', 'dtype']
    """

    rows: tuple[LeafReport, ...]
    unmatched_rules: tuple[str, ...] = ()

    # -- totals --------------------------------------------------------------------

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows)

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else 1.0

    @property
    def num_params(self) -> int:
        """Values in array leaves."""
        return sum(r.size for r in self.rows if r.bytes_before)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per value over the whole model (unquantized leaves included)."""
        n = self.num_params
        return 8 * self.bytes_after / n if n else 0.0

    @property
    def num_quantized(self) -> int:
        return sum(r.format is not None for r in self.rows)

    @property
    def kept(self) -> tuple[LeafReport, ...]:
        """The leaves left as they were, each with its ``reason``."""
        return tuple(r for r in self.rows if r.format is None)

    @property
    def sqnr_db(self) -> float:
        """SQNR over all quantized values together (``inf`` if lossless)."""
        noise = signal = 0.0
        for r in self.rows:
            if r.rmse is None or r.sqnr_db is None:
                continue
            err = r.rmse**2 * r.size
            noise += err
            if math.isfinite(r.sqnr_db):
                signal += err * 10 ** (r.sqnr_db / 10)
        if noise == 0:
            return math.inf
        return 10 * math.log10(signal / noise) if signal > 0 else -math.inf

    def __getitem__(self, path: str) -> LeafReport:
        """The row of one path."""
        for r in self.rows:
            if r.path == path:
                return r
        raise KeyError(f"no leaf {path!r} in the report; paths are e.g. {self.rows[0].path!r}")

    # -- output --------------------------------------------------------------------

    def to_rows(self) -> list[dict[str, Any]]:
        """One plain dict per leaf (the :class:`LeafReport` fields)."""
        return [dataclasses.asdict(r) for r in self.rows]

    def table(self, title: str | None = "jquant model report", *, errors: bool = True):
        """A ``rich.table.Table`` with a row per leaf and a total row.

        ``errors=False`` leaves out the RMSE, max error and SQNR columns (for reports made
        without statistics, such as a file conversion's).
        """
        err_cols = [("RMSE", "right"), ("max err", "right"), ("SQNR dB", "right")] if errors else []
        t = Table(title=None if title is None else plain_text(title), show_footer=False)
        for col, just in [
            ("path", "left"),
            ("shape", "left"),
            ("format", "left"),
            ("before", "right"),
            ("after", "right"),
            ("bits/w", "right"),
            *err_cols,
            ("note", "left"),
        ]:
            t.add_column(col, justify=just)
        for r in self.rows:
            err = (
                [format_number(r.rmse), format_number(r.max_error), format_number(r.sqnr_db, ".1f")]
                if errors
                else []
            )
            t.add_row(
                plain_text(r.path),  # names come from files: never markup
                "x".join(map(str, r.shape)) or "()",
                plain_text(r.format or f"({r.dtype})"),
                human_bytes(r.bytes_before),
                human_bytes(r.bytes_after),
                f"{r.bits_per_weight:.2f}" if r.bytes_after else "",
                *err,
                plain_text(r.reason or ""),
            )
        t.add_section()
        total_err = ["", "", format_number(self.sqnr_db if self.num_quantized else None, ".1f")]
        t.add_row(
            f"total ({len(self.rows)} leaves, {self.num_quantized} quantized)",
            f"{self.num_params:,}",
            "",
            human_bytes(self.bytes_before),
            human_bytes(self.bytes_after),
            f"{self.bits_per_weight:.2f}",
            *(total_err if errors else []),
            f"{self.compression_ratio:.2f}x smaller",
        )
        return t

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        buf = io.StringIO()
        console = Console(file=buf, width=160, force_terminal=False, color_system=None)
        console.print(self.table())
        if self.unmatched_rules:
            console.print(
                plain_text(
                    f"rules that matched no leaf: {', '.join(map(repr, self.unmatched_rules))}"
                )
            )
        return buf.getvalue().rstrip("\n")

    def __repr__(self) -> str:
        return (
            f"ModelReport({len(self.rows)} leaves, {self.num_quantized} quantized, "
            f"{human_bytes(self.bytes_before)} -> {human_bytes(self.bytes_after)}, "
            f"{self.compression_ratio:.2f}x)"
        )


def format_number(v: float | None, fmt: str = ".3g") -> str:
    if v is None:
        return ""
    return format(v, fmt)
