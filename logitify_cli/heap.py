"""Giving memory that nothing holds any more back to the system.

A run frees a batch's pixels and logits every few milliseconds, in several
threads, among long-lived scraps (a shard's keys, labels and log-dets) that
pin the pages around them. glibc keeps the freed pages in its arenas: a run
of a million 8x8 images grew by about 100 MB it no longer used. Its
malloc_trim(0) gives back every whole free page, and only those, so calling
it changes nothing a caller can see. Elsewhere (macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import sys
import threading
import time

_trim = None


def _load():
    global _trim
    if _trim is None:
        _trim = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                fn = ctypes.CDLL(None).malloc_trim
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                _trim = fn
            except Exception:  # musl and others have no malloc_trim: nothing to give back this way
                pass
    return _trim


EVERY = 1.0  # seconds
_last = time.monotonic()
_lock = threading.Lock()


def release() -> None:
    """Return free memory to the system now (a few milliseconds on a large heap)."""
    global _last
    trim = _load()
    if trim:
        trim(0)
    _last = time.monotonic()


def now_and_then() -> None:
    """release() if the process has not for EVERY seconds: cheap to ask after every batch, from any thread."""
    if time.monotonic() - _last < EVERY or not _lock.acquire(blocking=False):
        return
    try:
        if time.monotonic() - _last >= EVERY:
            release()
    finally:
        _lock.release()
