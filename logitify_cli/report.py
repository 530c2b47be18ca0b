"""How a run talks to its user: warnings and a progress bar on stderr, or nothing.

Everything printed from data (file names, keys, manifest fields) goes through
printable(): a newline in a file name must not forge a `logitify: error:`
line, and a manifest must not send escape codes to the user's terminal.
"""
from __future__ import annotations

import re
import sys

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def printable(text) -> str:
    """`text` with control, format and unpaired surrogate characters escaped.

    Backslashes are doubled only where some other character was escaped, so
    ordinary names read as they are and an escaped one is unambiguous.
    """
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF:
            out.append(ch)
        elif ord(ch) <= 0xFF:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "".join(out)


_RECORD_KEY = re.compile(r"(.*):(\d{1,18})", re.S)


def skipped_order(entry) -> tuple:
    """Where a skipped input is listed: by key, a record's by its file and then its number (:2 before :10).

    The order inputs themselves take; no image key ends in ':digits' (it
    ends in its extension), so the pattern names records only.
    """
    m = _RECORD_KEY.fullmatch(entry["source"])
    return (m.group(1), int(m.group(2))) if m else (entry["source"], -1)


def short(value, limit: int = 80) -> str:
    """repr(value), cut to about `limit` characters: a line about a stranger's data stays one readable line."""
    if isinstance(value, (str, bytes)) and len(value) > 4 * limit:
        value = value[:4 * limit]  # repr() of a 100 MB string would cost 100 MB first
    elif isinstance(value, (list, tuple, dict)) and len(value) > limit:
        value = type(value)(list(value.items())[:limit]) if isinstance(value, dict) else type(value)(value[:limit])
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return _cut(text, limit)


def listing(values, most: int = 20, limit: int = 80) -> str:
    """Names joined by commas, each cut to `limit`, at most `most` of them: a stranger's list stays one line."""
    values = list(values)
    text = ", ".join(_cut(str(v), limit) for v in values[:most])
    return text + (f" and {len(values) - most} more" if len(values) > most else "")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Reporter:
    """Warnings and a progress bar on stderr, or nothing with `quiet`."""

    def __init__(self, quiet: bool = False, progress: bool | None = None, stream=None):
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.show_progress = (not quiet) and (progress if progress is not None else isatty())

    def warn(self, msg: str) -> None:
        if not self.quiet:
            self.stream.write(f"logitify: {printable(msg)}\n")
            self.stream.flush()

    def bar(self, total, desc, unit="img"):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not self.show_progress,
                    file=self.stream, dynamic_ncols=True, mininterval=0.5)


QUIET = Reporter(quiet=True)
