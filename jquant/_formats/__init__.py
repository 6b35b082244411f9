"""The format table and the per-format kernels (private: users import ``jquant``)."""
