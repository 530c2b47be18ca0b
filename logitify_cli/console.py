"""The console script's entry: a stop is a quiet exit from its first line on.

Importing the command line (click, then logitify's own modules) takes tens
of milliseconds, during which a Ctrl-C printed a KeyboardInterrupt
traceback and a SIGTERM ended the process by the signal. Until cli.entry
takes over, a stop ends the process at once as a later stop does: one line
on stderr, --json's object if the command line asked for it, and status
128 + the signal (130, 143). Only the standard library is imported here.
"""
from __future__ import annotations

import json
import os
import signal
import sys

_TRUE = {"1", "true", "t", "yes", "y", "on"}  # the values click reads as true


def _asked_for_json(args: list) -> bool:
    """--json before any '--', or LOGITIFY_JSON / LOGITIFY_<COMMAND>_JSON set true (the command's own first)."""
    ours = args[:args.index("--")] if "--" in args else args
    if "--json" in ours:
        return True
    names = ["LOGITIFY_JSON"] + [f"LOGITIFY_{a.upper()}_JSON" for a in ours if a.isalpha()]
    for name in reversed(names):
        value = os.environ.get(name, "").strip()
        if value:
            return value.lower() in _TRUE
    return False


def _stopped_early(signum, frame):
    try:
        os.write(2, b"logitify: interrupted\n")
        if _asked_for_json(sys.argv[1:]):
            answer = {"ok": False, "error": "interrupted", "signal": signal.Signals(signum).name}
            os.write(1, (json.dumps(answer) + "\n").encode())
    except OSError:  # a closed stream changes nothing about the stop
        pass
    os._exit(128 + signum)


def entry():
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, _stopped_early)
    from .cli import entry as run

    run()
