"""The worker pool: an ordered, bounded parallel map over processes.

Readers (files -> pixels) and image writers run here. Workers are forked
where that is safe (fast start, NumPy and Pillow already imported) and
spawned otherwise; they die with the run, and a dead worker is a clear error.
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from .errors import LogitifyError


PER_CORE = 4  # the most workers a pool starts per core, whatever was asked


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def can_fork() -> bool:
    """Whether workers may be forked from this process right now.

    A forked worker starts in milliseconds with NumPy and Pillow already
    imported; a spawned one spends about 0.3 s of CPU importing them. Forking
    is safe only from a process that runs one thread and has not loaded
    TensorFlow (its thread pools and locks do not survive a fork), and only
    on Linux (macOS system frameworks are not fork-safe).
    """
    return (sys.platform.startswith("linux") and "tensorflow" not in sys.modules
            and threading.active_count() == 1)


class OrderedPool:
    """Map chunks over worker processes, in order, with a bounded window.

    Workers are forked where can_fork() says it is safe, all at once, when
    the pool is made; otherwise they are spawned. They only use NumPy and
    Pillow. A dead worker is a clear error.
    """

    def __init__(self, workers: int):
        # Readers and writers are busy on a core each: more than a few per core only costs forks
        # and memory (--workers 1000 forked a thousand processes for 450 images).
        workers = min(workers, PER_CORE * default_workers())
        self.workers = workers
        self.pool = None
        self._spawning = False  # spawned workers start as they are first needed, in submit()
        self._closing = threading.Lock()
        if workers > 1:
            fork = can_fork()
            self._spawning = not fork
            ctx = multiprocessing.get_context("fork" if fork else "spawn")
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                            initargs=(os.getpid(), fork))
            if fork:
                # Workers start with SIGINT and SIGTERM held until _worker_init has set them: one
                # stopped while starting would run the CLI's handler, whose KeyboardInterrupt Python
                # may just print and go on from, and then wait forever on the queue's lock. The
                # executor's thread, started here too, keeps them held: they go to this thread.
                with _stops_held():
                    self.pool.submit(int)  # forks every worker now, before this process starts a thread

    def imap(self, fn, jobs, window=None, describe=lambda meta: ""):
        """(meta, fn(args)) for each (meta, args) in jobs, in order.

        `window` is how many jobs may be in flight; a callable is asked
        again each time, so a run can read far ahead while it starts up.
        """
        pool = self.pool
        if pool is None:
            for meta, args in jobs:
                yield meta, fn(args)
            return
        pending = collections.deque()
        it = iter(jobs)
        exhausted = False
        limit = window if callable(window) else (lambda: window or self.workers * 3)
        while True:
            while not exhausted and len(pending) < max(1, limit()):
                try:
                    meta, args = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((meta, self._submit(pool, fn, args)))
            if not pending:
                return
            meta, fut = pending.popleft()
            try:
                result = fut.result()
            except BrokenProcessPool:
                raise LogitifyError(f"a worker process died while working on {describe(meta)}") from None
            yield meta, result

    def _submit(self, pool, fn, args):
        """pool.submit, with Ctrl-C and SIGTERM held where it may spawn a worker.

        A spawned worker inherits the mask through its exec and keeps both held
        while its interpreter starts, until _worker_init: a Ctrl-C meanwhile
        would print each one's KeyboardInterrupt traceback. Here it waits for
        the mask to be put back, and is raised then.
        """
        if not self._spawning or not _CAN_HOLD:
            return pool.submit(fn, args)
        with _stops_held():
            return pool.submit(fn, args)

    def close(self, cancel=False):
        """Wait for the workers; with `cancel`, drop queued work and stop them now."""
        with self._closing:  # the plan's thread and the main one may both stop a run
            pool, self.pool = self.pool, None
        if pool is not None:
            procs = dict(getattr(pool, "_processes", None) or {}) if cancel else {}
            thread = getattr(pool, "_executor_manager_thread", None) if cancel else None
            results = getattr(pool, "_result_queue", None) if cancel else None
            pool.shutdown(wait=not cancel, cancel_futures=cancel)
            for proc in procs.values():  # work in progress is of no use to anyone now
                try:
                    proc.terminate()
                except (OSError, ValueError):
                    pass
            if thread is not None:
                _unblock_results(procs.values(), results)
                # Its workers are dead: it ends now, not while the interpreter exits, whose hook
                # writes to the wakeup pipe this thread closes ("Exception ignored ... Bad file descriptor").
                thread.join()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(cancel=exc_type is not None)


def _unblock_results(procs, results) -> None:
    """Let the executor's thread see the end of the result pipe once every worker is dead.

    A worker stopped halfway through sending a result (one of several MB,
    which does not fit in the pipe at once) leaves that thread waiting for
    the rest forever: this process holds the pipe's write end too, so the
    read never ends. With the workers gone, closing that end turns the wait
    into end-of-file; the executor then counts itself broken and stops.
    """
    procs = list(procs)
    for proc in procs:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    writer = getattr(results, "_writer", None)
    if writer is not None and not any(proc.is_alive() for proc in procs):
        try:
            writer.close()
        except OSError:
            pass


_IN_WORKER = False  # set by _worker_init in the pool's processes
_undo = None  # what this worker undoes if the run stops it now (see undoable)
_STOPS = {signal.SIGINT, signal.SIGTERM}
_CAN_HOLD = hasattr(signal, "pthread_sigmask")
# The C function itself, not signal.py's wrapper: a Ctrl-C can land as the wrapper's Python code
# starts, before the mask is changed; the C call always changes it before anything is raised.
_mask = getattr(__import__("_signal"), "pthread_sigmask", None)


@contextlib.contextmanager
def _stops_held():
    """Ctrl-C and SIGTERM held for the block; the mask as it was after, where a stop that came meanwhile acts.

    Through the C call (_mask): signal.py's wrapper may run a pending
    handler first, and a KeyboardInterrupt there, as the mask is put back,
    would leave both signals held for good.
    """
    held = _mask(signal.SIG_BLOCK, ())  # the mask as it is (a Ctrl-C here changes nothing)
    try:
        _mask(signal.SIG_BLOCK, _STOPS)
        yield
    finally:
        _mask(signal.SIG_SETMASK, held)


def undoable(start, undo):
    """start(), with what it made undone by undo(made) should the run be stopped before settled().

    A writer stopped halfway through a file would leave it half written
    under its final name. Ctrl-C and SIGTERM are held while start() runs:
    in a pool worker, its undo is set before a stop can act (the stop then
    runs it, see _stopped); in the caller's own process, a Ctrl-C that came
    meanwhile surfaces as the signals are let through, and undoes it here.
    The handlers themselves are never changed outside a worker.
    """
    global _undo
    if not _CAN_HOLD:  # no signal masks here (Windows): as it always was
        return start()
    if _IN_WORKER and signal.getsignal(signal.SIGTERM) is not _stopped:
        signal.signal(signal.SIGTERM, _stopped)
    held = _mask(signal.SIG_BLOCK, ())  # the mask as it is (a Ctrl-C here changes nothing)
    try:
        _mask(signal.SIG_BLOCK, _STOPS)
        made = start()
    except BaseException:
        _mask(signal.SIG_SETMASK, held)
        raise
    if _IN_WORKER:
        _undo = lambda: undo(made)  # noqa: E731
    try:
        _mask(signal.SIG_SETMASK, held)  # a pending stop acts here, its handler run at once
    except BaseException:
        _undo = None
        undo(made)
        raise
    return made


def settled(finish=None):
    """What undoable() made is whole: a stop from now on leaves it.

    `finish` (a rename, say) runs with the stops held, so a stop comes
    before it, and is undone, or after it, and leaves its result; the
    caller learns of a Ctrl-C that came meanwhile once `finish` is done.
    """
    global _undo
    if finish is None or not _CAN_HOLD:
        _undo = None
        return None if finish is None else finish()
    with _stops_held():
        try:
            return finish()
        finally:
            _undo = None


def _stopped(signum, frame):
    """SIGTERM in a writer: undo the half-made file, then die of the signal as before."""
    undo = _undo
    if undo is not None:
        try:
            undo()
        except BaseException:
            pass
    signal.signal(signum, signal.SIG_DFL)
    # It may have come just as undoable() held the stops, before anything was made: let it through.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)


def _worker_init(parent: int, forked: bool):
    """Ctrl-C and SIGTERM are the main process's to handle: workers stop with it.

    A forked worker inherits the CLI's SIGTERM handler, and both ends of the
    pool's pipes, so it would neither die on SIGTERM nor ever read EOF once
    the main process is gone. It gets SIGTERM's default back and, on Linux,
    asks to be killed when its parent dies (PR_SET_PDEATHSIG). OrderedPool
    forks it with both signals blocked; they are unblocked only here.

    A spawned worker may be started from any thread of the main process,
    and PR_SET_PDEATHSIG fires when that thread ends, not the process: it
    watches its parent instead, and ends within a quarter second of it. A
    stopped run whose pool missed one (spawned as the pool was closed) then
    leaves nothing waiting on its queue, or holding its pipes.
    """
    global _IN_WORKER
    _IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # one sent meanwhile acts now
    if forked:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    elif os.getppid() == parent:
        threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the watch began
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.25)
    os._exit(1)
