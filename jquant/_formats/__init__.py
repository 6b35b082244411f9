"""GGML formats: the :class:`QuantType` names, the format table and the kernels.

``quant_type`` names the formats, ``registry`` holds one record per format (fields,
kernels, checks), ``legacy`` and ``floats`` are the kernels, ``guards`` keeps XLA's
arithmetic exactly as ggml's C writes it.
"""

from . import registry  # noqa: F401  (fills the format table on first import)
