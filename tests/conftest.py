"""Test configuration: strict JAX, eight fake CPU devices, hypothesis profiles."""

import os

# Must happen before jax is imported anywhere: fake devices for the sharding tests.
os.environ.setdefault("XLA_FLAGS", "")
# The CLI's persistent compilation cache is process-wide jax config: tests that call the
# CLI in-process must not switch it on for every test after them (the one test of the
# cache runs the CLI in a subprocess and clears this variable there).
os.environ.setdefault("JQUANT_NO_COMPILE_CACHE", "1")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    The suite compiles thousands of XLA programs; kept all in one process, XLA:CPU's
    compiler crashed (SIGSEGV in backend_compile, at a different test each run, never
    when a file runs alone). Freeing them per module keeps every worker's state small.
    """
    yield
    jax.clear_caches()
