"""The ``jquant`` command line (``python -m jquant``) and its built-in example model."""
