"""Text from outside shown to people: control characters escaped.

Key names come from whoever can write the bucket, file names from whoever
can write the mount. A newline in one would forge log lines, an escape
sequence would drive the operator's terminal, a bidirectional override
would make a name read as another. Wherever dgfs shows such text to a
person, a log line or ``dgfs status``, it goes through ``printable``:
C0 and C1 control characters (tab and newline too) and DEL become
``\\xNN``; Unicode line and paragraph separators, bidirectional controls
and lone surrogates (undecodable bytes of a local name) become
``\\uNNNN``. Everything else, other scripts included, is left as it is.
"""

from __future__ import annotations

import logging
import re

_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with the characters above escaped (one line, inert in a terminal)."""
    return _UNPRINTABLE.sub(_escape, text)


class PrintableFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose lines are ``printable``: a message can never
    span lines or carry terminal controls. A traceback logged with it still
    follows on lines of its own."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return printable(super().formatMessage(record))
