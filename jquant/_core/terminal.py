"""Untrusted text on the terminal: tensor names, metadata, paths, rules, error messages.

Anything read from a file or typed by a user is shown through these helpers, never as
rich markup and never with its control characters: ``[/]`` in a tensor name must not
crash rich (``MarkupError``), ``[link=...]`` in metadata must not become a hyperlink,
``[foo]`` in a path must not vanish, and an ESC byte must not set the window title or
clear the screen.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["markup_escape", "printable", "plain_text"]

# C0 controls, DEL, C1 controls, and the bidirectional overrides that reorder what is shown
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape_char(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: Any) -> str:
    """``str(text)`` with every control character shown as ``\\xNN`` (``\\uNNNN``).

    Example:
        >>> from jquant._core.terminal import printable
        >>> printable("a\\x1b]0;title\\x07b")
        'a\\\\x1b]0;title\\\\x07b'
    """
    return _UNSAFE.sub(_escape_char, str(text))


def markup_escape(text: Any) -> str:
    """:func:`printable` text, escaped for a rich markup string (``[`` can't open a tag).

    Example:
        >>> from jquant._core.terminal import markup_escape
        >>> markup_escape("w[/]x")
        'w\\\\[/]x'
    """
    from rich.markup import escape

    return escape(printable(text))


def plain_text(text: Any, style: str = ""):
    """A ``rich.text.Text`` of :func:`printable` text: shown as is, never parsed as markup."""
    from rich.text import Text

    return Text(printable(text), style=style)
