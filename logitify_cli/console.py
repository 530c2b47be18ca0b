"""The console script's entry: a stop is a quiet exit from its first line on.

Importing the command line (click, then logitify's own modules) takes tens
of milliseconds, during which a Ctrl-C printed a KeyboardInterrupt
traceback and a SIGTERM ended the process by the signal. Until cli.entry
takes over, a stop ends the process at once as a later stop does: one line
on stderr, --json's object if the command line asked for it, and status
128 + the signal (130, 143). Only the standard library is imported here.
"""
from __future__ import annotations

import os  # loaded by Python's start-up already, as sys is; signal is built in
import signal
import sys

_TRUE = {"1", "true", "t", "yes", "y", "on"}  # the values click reads as true
# Each command's name and alias, with the command whose variables it reads (cli.main's commands; a test holds
# them together): only the standard library may be imported before the first line can be stopped quietly.
COMMANDS = {"encode": "encode", "decode": "decode", "invert": "decode", "info": "info", "verify": "verify"}


def asked_for_json(args: list, commands: dict = COMMANDS) -> bool:
    """Whether a command line asked for --json: the flag before any '--', or LOGITIFY_JSON /
    LOGITIFY_<COMMAND>_JSON set true (the command's own first; an alias reads its command's)."""
    ours = args[:args.index("--")] if "--" in args else list(args)
    if "--json" in ours:
        return True
    names = ["LOGITIFY_JSON"] + [f"LOGITIFY_{commands[a].upper()}_JSON" for a in ours if a in commands]
    for name in reversed(names):
        value = os.environ.get(name, "").strip()
        if value:
            return value.lower() in _TRUE
    return False


def _stopped_early(signum, frame):
    try:
        os.write(2, b"logitify: interrupted\n")
        if asked_for_json(sys.argv[1:]):
            name = signal.Signals(signum).name
            os.write(1, f'{{"ok": false, "error": "interrupted", "signal": "{name}"}}\n'.encode())
    except OSError:  # a closed stream changes nothing about the stop
        pass
    os._exit(128 + signum)


def entry():
    for stop in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(stop) != signal.SIG_IGN:  # a stop the caller ignores (`cmd &` in a script) stays ignored
            signal.signal(stop, _stopped_early)
    from .cli import entry as run

    run()


def is_early(handler) -> bool:
    """Whether a signal's handler is the one entry() installed (cli.entry replaces it with its own)."""
    return handler is _stopped_early
