"""Giving memory that nothing holds any more back to the system.

A run frees a batch's pixels and logits every few milliseconds, in several
threads, among long-lived scraps (a shard's keys, labels and log-dets) that
pin the pages around them. glibc keeps the freed pages in its arenas: a run
of a million 8x8 images grew by about 100 MB it no longer used. Its
malloc_trim(0) gives back every whole free page, and only those, so calling
it changes nothing a caller can see. Where there is no glibc it does nothing.
"""
from __future__ import annotations

import time

_trim = None


def _load():
    global _trim
    if _trim is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None).malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            _trim = fn
        except (OSError, AttributeError):
            _trim = False
    return _trim


def release() -> None:
    """Return free memory to the system now (a few milliseconds on a large heap)."""
    trim = _load()
    if trim:
        trim(0)


class Releaser:
    """release() at most every `every` seconds, however often it is asked."""

    def __init__(self, every: float = 1.0):
        self.every, self._last = every, time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            release()
            self._last = time.monotonic()
