"""SIGINT and SIGTERM in the command line: stop the work, clean up, exit 130 / 143.

Python's own SIGINT handling raises ``KeyboardInterrupt`` wherever the main thread is,
and JAX sometimes runs Python callbacks (during XLA compilation) that swallow it; the
conversion then finished and replaced the output as if nothing happened. SIGTERM, left
alone, kills the process before ``finally`` blocks run, leaving temporary files.

:func:`interruptible` installs one handler for both signals that records the signal
and raises :class:`Interrupted` (a ``KeyboardInterrupt``) the first time, and
:func:`check_interrupted` raises it again at the next safe point (the CLI calls it
between tensors), so a swallowed signal still stops the work before the output is
replaced. Cleanup (``finally`` blocks, the atomic writer removing its temporary file)
runs as for any exception.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Interrupted", "check_interrupted", "interruptible"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_pending: list[int] = []


class Interrupted(KeyboardInterrupt):
    """The process got SIGINT or SIGTERM; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def _handler(signum: int, frame) -> None:
    first = not _pending
    _pending.append(signum)
    if first:  # later signals only set the flag: cleanup already under way is not cut short
        raise Interrupted(signum)


def check_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal arrived (even one whose exception was lost)."""
    if _pending:
        raise Interrupted(_pending[0])


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Handle SIGINT/SIGTERM as described above while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending.clear()
    # a signal the parent set to be ignored (nohup, `cmd &` in a script) stays ignored
    old = {s: signal.signal(s, _handler) for s in _SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _pending.clear()
