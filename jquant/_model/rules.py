"""Which format each leaf of a model gets: rules on '/'-joined pytree paths, and defaults.

A rule set is an ordered list of ``(regex, format)`` pairs; the first pattern that
``re.search``-es a leaf's path decides its format. Before the rules, the defaults
users expect keep some leaves as they are:

* leaves that are not arrays (an Equinox activation, a Python float) and arrays that
  are not floating point (step counters, token ids) are never quantized;
* 1-D leaves (biases, norm scales) and scalars stay unquantized while ``keep_1d`` is
  on;
* tensors with fewer than ``min_size`` values stay unquantized.

So a catch-all ``".*" -> Q4_0`` quantizes only the matrices. A format of ``None``
(or ``"keep"``) in a rule leaves the matching leaves unquantized, which is how an
embedding or an output layer is kept in full precision.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from .._errors import QuantError, UnknownFormatError
from .._formats.quant_type import QuantType, QuantTypeLike
from .._formats.registry import FLOAT_DTYPES, FormatSpec

__all__ = ["Rule", "Decision", "parse_rules", "decide", "path_to_str", "DEFAULT_MIN_SIZE"]

DEFAULT_MIN_SIZE = 1024
"""Tensors with fewer values than this stay unquantized by default."""

_KEEP_NAMES = ("keep", "none", "skip", "original")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One ``pattern -> format`` rule; ``qtype`` is ``None`` for "leave unquantized"."""

    pattern: str
    regex: re.Pattern[str]
    qtype: QuantType | None

    def matches(self, path: str) -> bool:
        return self.regex.search(path) is not None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What happens to one leaf: its format (``None``: kept) and, if kept, why."""

    qtype: QuantType | None
    reason: str | None = None
    rule: int | None = None  # index of the rule that decided, if one did


def _parse_format(fmt: Any, pattern: str | None) -> QuantType | None:
    if fmt is None or (isinstance(fmt, str) and fmt.strip().lower() in _KEEP_NAMES):
        return None
    try:
        return QuantType.parse(fmt)
    except UnknownFormatError as e:
        if pattern is None:
            raise
        raise UnknownFormatError(
            f"rule {pattern!r}: {e} (or None/'keep' to leave matching leaves unquantized)"
        ) from None


def _compile(pattern: Any) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise QuantError(
            f"rule pattern {pattern!r} is a {type(pattern).__name__}; patterns are regular "
            f"expressions (str) matched with re.search against '/'-joined paths such as "
            f"'params/Dense_0/kernel'"
        )
    try:
        return re.compile(pattern)
    except re.error as e:
        raise QuantError(
            f"rule pattern {pattern!r} is not a valid regular expression ({e}); escape "
            f"special characters with re.escape or a backslash (e.g. r'layers\\.0')"
        ) from None


def parse_rules(
    spec: QuantTypeLike | Mapping[str, Any] | Iterable[tuple[str, Any]],
) -> tuple[Rule, ...]:
    """Turn a single format, an ordered ``{pattern: format}`` dict or ``(pattern, format)`` pairs into rules.

    Raises:
        QuantError: a pattern that is not a valid regular expression (named in the message).
        UnknownFormatError: a format jquant doesn't know (with the rule's pattern).

    Example:
        >>> from jquant._model.rules import parse_rules
        >>> [(r.pattern, r.qtype) for r in parse_rules({"embed": None, ".*": "q4_0"})]
        [('embed', None), ('.*', <QuantType.Q4_0: 2>)]
    """
    if isinstance(spec, (str, int, QuantType, FormatSpec)) or spec is None:
        return (Rule(".*", re.compile(".*"), _parse_format(spec, None)),)
    items = spec.items() if isinstance(spec, Mapping) else spec
    rules = []
    for item in items:
        if isinstance(item, Rule):
            rules.append(item)
            continue
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise QuantError(
                f"rules must be a format, an ordered dict {{pattern: format}} or a list of "
                f"(pattern, format) pairs; got the item {item!r}"
            )
        pattern, fmt = item
        regex = _compile(pattern)
        rules.append(Rule(regex.pattern, regex, _parse_format(fmt, regex.pattern)))
    return tuple(rules)


def path_to_str(path: tuple[Any, ...]) -> str:
    """'/'-join a jax key path: ``('params', 'Dense_0', 'kernel')`` -> ``'params/Dense_0/kernel'``.

    A trailing ``.value`` (Flax nnx ``Variable``) is dropped so that an nnx ``State`` and
    its ``nnx.to_pure_dict`` have the same paths.
    """
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    if len(parts) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def is_array(x: Any) -> bool:
    """True for jax/numpy arrays (and anything with shape, dtype and ``__array__``)."""
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return True
    return hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__array__")


def decide(
    path: str,
    leaf: Any,
    rules: tuple[Rule, ...],
    *,
    keep_1d: bool = True,
    min_size: int = DEFAULT_MIN_SIZE,
) -> Decision:
    """The format of one leaf: defaults first, then the first matching rule."""
    if not is_array(leaf):
        return Decision(None, f"not an array ({type(leaf).__name__})")
    dtype = np.dtype(leaf.dtype)
    if dtype.name not in FLOAT_DTYPES:
        return Decision(None, f"{dtype.name} is not a floating-point dtype")
    shape = tuple(leaf.shape)
    size = int(np.prod(shape))
    if keep_1d and len(shape) <= 1:
        return Decision(None, f"{len(shape)}-D (bias/norm/scale) kept by keep_1d=True")
    if size < min_size:
        return Decision(None, f"{size} values < min_size={min_size}")
    for i, rule in enumerate(rules):
        if rule.matches(path):
            if rule.qtype is None:
                return Decision(None, f"rule {rule.pattern!r} keeps it", i)
            return Decision(rule.qtype, None, i)
    return Decision(None, "no rule matched")
