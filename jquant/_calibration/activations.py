"""Calibrating a model's activations over a few batches: :func:`calibrate_activations`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from .._errors import CalibrationError
from .calibration import CalibrationData, calibrate

__all__ = ["calibrate_activations"]


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _named_leaves(tree) -> dict[str, jax.Array]:
    """``{"Dense_0": y, "block/Dense_1": y, "Dense_2/1": second call}``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [_key_name(k) for k in path]
        parts = [p for p in parts if p != "__call__"]
        if parts and parts[-1] == "0":  # the first (usually only) call
            parts = parts[:-1]
        out["/".join(parts) or "output"] = leaf
    return out


def _capture_fn(model, params, capture_filter):
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover - flax is an optional extra
        nn = None
    if nn is not None and isinstance(model, nn.Module):
        variables = params if "params" in params else {"params": params}
        flt = capture_filter if capture_filter is not None else True

        def run(batch):
            _, state = model.apply(
                variables, batch, capture_intermediates=flt, mutable=["intermediates"]
            )
            return state["intermediates"]

        return jax.jit(run)
    if callable(model):
        return jax.jit(lambda batch: model(params, batch))
    raise CalibrationError(
        f"calibrate_activations takes a flax.linen Module or a function "
        f"fn(params, batch) -> pytree of activations, got {type(model).__name__}"
    )


def calibrate_activations(
    model: Any,
    params: Any,
    batches: Iterable[Any],
    method: Any,
    *,
    num_bins: int = 2048,
    bits: int = 8,
    axis: int | tuple[int, ...] | None = None,
    capture_filter: Callable[[Any, str], bool] | None = None,
) -> dict[str, CalibrationData]:
    """Calibrate every intermediate activation of a model over a few batches.

    A ``flax.linen`` Module is run with ``capture_intermediates`` (every submodule's
    ``__call__`` output, or those ``capture_filter(module, method_name)`` selects); any other
    callable ``model(params, batch)`` returns the activations itself, as a pytree (a dict of
    named arrays, or whatever ``sow`` collected). The forward pass is jitted; the histograms
    grow across batches on the host (see :class:`CalibrationData`). Non-floating leaves
    (indices, masks) are skipped.

    Args:
        model: a ``flax.linen.Module`` or a function ``fn(params, batch) -> pytree``.
        params: the module's ``params`` (or full variables dict), passed through.
        batches: an iterable of model inputs; at least one.
        method: a :class:`CalibrationMethod` applied to every activation.
        num_bins, bits, axis: as for :func:`calibrate` (``axis`` per channel, e.g. ``-1``).
        capture_filter: Flax's ``capture_intermediates`` filter.

    Returns:
        ``{name: CalibrationData}``, names are the module paths (``"Dense_0"``,
        ``"block/Dense_1"``; a module called twice adds ``"/1"``), the model's output
        under its own name (Flax: ``""`` becomes ``"output"``).

    Raises:
        CalibrationError: no batches, or a model that isn't a Module or callable.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn, jquant
        >>> class MLP(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         h = nn.relu(nn.Dense(16)(x))
        ...         return nn.Dense(4)(h)
        >>> model = MLP()
        >>> params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.float32))["params"]
        >>> batches = [jax.random.normal(jax.random.key(i), (32, 8), jnp.float32) for i in range(3)]
        >>> calib = jquant.calibrate_activations(model, params, batches, "minmax")
        >>> sorted(calib), int(calib["Dense_0"].count)
        (['Dense_0', 'Dense_1', 'output'], 1536)
        >>> scale, zero_point = calib["Dense_0"].asymmetric_scale("q8_0")
    """
    run = _capture_fn(model, params, capture_filter)
    result: dict[str, CalibrationData] = {}
    seen = False
    for batch in batches:
        seen = True
        acts = _named_leaves(run(batch))
        if not isinstance(acts, Mapping):  # pragma: no cover - _named_leaves returns a dict
            raise CalibrationError("activations must form a pytree")
        for name, a in acts.items():
            if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
                continue  # integer indices, masks: nothing to calibrate
            if name in result:
                result[name] = result[name].update(a, name=name)
            else:
                result[name] = calibrate(
                    a, method, num_bins=num_bins, bits=bits, axis=axis, name=name
                )
    if not seen:
        raise CalibrationError("calibrate_activations needs at least one batch")
    return result
