"""The Beam runner: the plan's shards, made by any worker of any Beam engine.

The launcher plans exactly as the local runner does (planner.plan), so each
shard's inputs are known before a pixel is read; a ShardTask is the unit of
work. A worker reads its inputs (from disk or a bucket, through FileSystems),
runs make_shard, the local runner's own shard routine, with a transform
built once in DoFn.setup, and leaves a receipt beside the shard. A retried
shard gives the same bytes. The launcher then writes the manifest from the
receipts, so nothing travels back through the launcher's own disk.

`decode` runs the same way: one unit of work per shard, each writing its
images through the same image outputs as the local runner.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import threading
import time

from . import fs
from . import manifest as manifest_mod
from .errors import LogitifyError, UsageError
from .outdir import RECEIPT, journal_split, owned_names, owns_others
from .report import Reporter, skipped_order
from .results import DecodeResult, EncodeResult


def _beam():
    try:
        if not fs.load_beam():
            raise ImportError
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise UsageError("--runner beam needs Apache Beam: pip install 'logitify[beam]'") from None
    return beam, PipelineOptions


def _options(beam_args):
    """Beam's pipeline options, also handed to FileSystems in this process (endpoints, credentials)."""
    from . import _tf

    _, PipelineOptions = _beam()
    args = list(beam_args or ["--runner=DirectRunner"])
    if not _tf.verbose and not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        args.append("--default_sdk_harness_log_level=ERROR")
    with fs.quiet_root_logger():
        options = PipelineOptions(args)
    fs.configure(options)
    return options


def _worker_filesystems(beam_args) -> None:
    """A worker's FileSystems get the run's options (endpoints, credentials) before it touches a bucket."""
    _, PipelineOptions = _beam()
    with fs.quiet_root_logger():
        options = PipelineOptions(list(beam_args))
    fs.configure(options)


def _launcher_quiet():
    """What a worker needs to import TensorFlow quietly (_tf.tf_quietly): None if the run is --verbose,
    else the launcher's process id, since a runner in the launcher's own process (in_memory) leaves
    the import to the launcher, a program's as its own would be."""
    from . import _tf

    return None if _tf.verbose else os.getpid()


def _worker_tf(quiet, marker: str) -> None:
    """A worker's TensorFlow, imported before anything else asks for it, quietly unless the run is verbose."""
    if _worker_quiet(quiet, marker):
        from . import _tf

        _tf.tf_quietly()


def _worker_quiet(quiet, marker: str) -> bool:
    """In a worker process of a run that is not --verbose: Beam's log held back; whether this is one.

    A failed shard is logged there with its traceback (twice, by the worker's
    own handlers), though the launcher says it as the command's one line.
    Beam's start-up lines before this runs are Beam's own.
    """
    if quiet is None or quiet == os.getpid():
        return False
    import logging
    import sys

    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    if not isinstance(sys.stderr, _WithoutCarried):
        sys.stderr = _WithoutCarried(sys.stderr, marker)
    return True


class _WithoutCarried:
    """A quiet worker's stderr, without the tracebacks of logitify's own errors (the launcher says each in one line).

    Beam's worker prints every failed instruction's traceback to stderr
    (sdk_worker's _execute), whatever its log level. Only a text that
    carries a LogitifyError's line (_error_carried, with the run's own
    marker, which no input can name) is dropped, with the newline print()
    ends it with: any other failure is printed as before.
    """

    def __init__(self, stream, marker: str):
        self._stream = stream
        self._marker = marker
        self._dropped = False

    def write(self, text):
        dropped, self._dropped = self._dropped, False
        if isinstance(text, str) and self._marker in text:
            self._dropped = True
            return len(text)
        if dropped and text == "\n":
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _run(pipeline_fn, options, receipts=()) -> None:
    """Run a pipeline; a failure inside a worker comes back as its one useful line.

    `receipts` are the files its workers leave for the launcher: a run that
    fails or is stopped removes those already written.
    """
    beam, _ = _beam()
    try:
        try:
            with _quiet_beam() as quiet, _workers_stopped_first(quiet.stopping), beam.Pipeline(options=options) as p:
                pipeline_fn(p)
        except BaseException:
            try:
                fs.delete(receipts)
            except Exception:  # the failure being raised says more than this one
                pass
            raise
    except Exception as e:
        stop = _stop_within(e)
        if stop is not None:  # Ctrl-C or SIGTERM landed in a runner in this process, which wrapped it
            raise stop from None
        ours = _raised_in_a_worker(e)
        if ours is not None:  # a runner in this process: the worker's own error, fields and all
            raise _uncarried(ours, _carry_marker()) from None
        carried = _carried_error(str(e), _carry_marker())
        if carried is not None:  # a worker process's error, rebuilt from the line it carried
            raise carried from None
        # Another process's error reaches here as text: its one line, without Beam's step name.
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        useful = [ln for ln in lines if _OUR_ERROR.search(ln)]
        line = (useful or lines or [type(e).__name__])[-1]
        line = _BEAM_STEP.sub("", _OUR_ERROR.split(line, maxsplit=1)[-1])
        raise LogitifyError(f"the Beam pipeline failed: {line}") from None


_OUR_ERROR = re.compile(r"\b(?:logitify_cli\.errors\.\w+|LogitifyError|UsageError|WriteError|ShardError): ")
_BEAM_STEP = re.compile(r" \[while running '[^']*'\]$")


_marker = None


def _carry_marker() -> str:
    """The start of the line a worker adds to its error for this launcher: random, so no input can forge one.

    An input's name is part of some errors' text (`cannot read NAME`), and
    Beam hands the launcher a worker process's failure as text: a name
    holding a line like the worker's would otherwise choose the error the
    command raises, and its exit code. The DoFns take this marker from the
    launcher that builds them.
    """
    global _marker
    if _marker is None:
        import secrets

        _marker = f"logitify-error-{secrets.token_hex(16)}: "
    return _marker


@contextlib.contextmanager
def _error_carried(marker: str):
    """A LogitifyError raised in a Beam worker, with its class and fields added to its traceback as one line.

    Beam hands the launcher a worker process's failure as text only, and
    its fields (a WriteError's errno, a ShardError's file) were lost on the
    way. The launcher rebuilds the error from that line (_carried_error).
    Any error is made one Beam can send (UTF-8 text), or the worker never
    reports it and the launcher waits for good.
    """
    try:
        yield
    except LogitifyError as e:
        line = _carry_line(e, marker)
        if line is not None and not any(str(n).startswith(marker) for n in getattr(e, "__notes__", ())):
            e.add_note(line)
        _reportable_or_line(e, marker)
        raise
    except Exception as e:
        _reportable_or_line(e, marker)
        raise


def _reportable_or_line(e: BaseException, marker: str) -> None:
    """`e` made reportable (_make_reportable), or else a RuntimeError of its own line, escaped, is raised.

    The RuntimeError keeps the carried line, so a LogitifyError still reaches the launcher as itself.
    """
    if _make_reportable(e):
        return
    import traceback

    said = "".join(traceback.format_exception_only(e)).strip()
    line = RuntimeError(_utf8_safe(said)).with_traceback(e.__traceback__)
    for note in getattr(e, "__notes__", None) or ():
        if isinstance(note, str) and note.startswith(marker):
            line.add_note(note)
    raise line from None


def _make_reportable(e: BaseException) -> bool:
    """Make `e` an error whose traceback UTF-8 can hold, as Beam sends it from a worker process; whether it is.

    A key from a file name that is not UTF-8 (a lone surrogate) in its args
    or notes, or in an error it was raised from or during, kept the worker
    from reporting at all, and the launcher waited for good. Args and notes
    are escaped (the originals kept for _uncarried, for a runner in this
    process; the carried line holds them as they were, JSON escapes them),
    and such an earlier error goes. An error whose args cannot be set, or
    whose text fails with escaped args, is given back as it was (False).
    """
    if _reportable(e):
        return True
    args = e.args
    try:
        safe = tuple(_utf8_safe(a) for a in args)
        if safe != args:
            e.args = safe
            e._carried_args = args
            str(e)  # its text may need the args as they were (a path object's .name)
        notes = getattr(e, "__notes__", None)
        if isinstance(notes, list) and any(_utf8_safe(n) is not n for n in notes):
            e._carried_notes, e.__notes__ = notes, [_utf8_safe(n) for n in notes]
    except Exception:
        try:
            e.args = args
        except Exception:
            pass
        return False
    if not _reportable(e):
        e.__cause__, e.__suppress_context__ = None, True
    return _reportable(e)


def _reportable(e: BaseException) -> bool:
    """Whether Beam can send this error's traceback from a worker process: it goes as UTF-8."""
    import traceback

    try:
        "".join(traceback.format_exception(e)).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _utf8_safe(value):
    """`value` as text UTF-8 can hold: a lone surrogate (a file name's stray byte) as its backslash escape.

    Anything else whose text UTF-8 cannot hold (a path object) becomes that text, escaped; the rest is kept.
    """
    text = value if isinstance(value, str) else None
    try:
        if text is None:
            text = str(value)
        text.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    except Exception:  # a value whose str() fails is not this function's to mend
        return value


def _carry_line(e: LogitifyError, marker: str) -> str | None:
    """`marker` and the error's class, args and fields as JSON.

    Left out: a field JSON cannot hold (a partial result), private attributes
    and those the launcher sets itself (_NOT_CARRIED).
    """
    fields = {}
    for name, value in vars(e).items():
        if name.startswith("_") or name in _NOT_CARRIED:
            continue
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        fields[name] = value
    try:
        return marker + json.dumps({"class": type(e).__name__, "args": list(e.args), "fields": fields},
                                   allow_nan=False)
    except (TypeError, ValueError):
        return None


_NOT_CARRIED = frozenset({"exit_code", "result"})  # the class says the exit code; a result is the launcher's


def _carried_error(text: str, marker: str):
    """The LogitifyError whose line (_carry_line, with this launcher's marker) the failure's text holds, or None.

    Only a class of errors.py, with a message and notes of the right kinds;
    `result` and `notes` start as a fresh error's, whatever the line holds.
    """
    from . import errors

    for line in reversed(text.splitlines()):
        line = _BEAM_STEP.sub("", line.strip())  # Beam may end the text, and so this line, with its step's name
        if not line.startswith(marker):
            continue
        try:
            d = json.loads(line[len(marker):])
        except ValueError:
            continue
        if not isinstance(d, dict):
            continue
        cls = getattr(errors, d["class"], None) if isinstance(d.get("class"), str) else None
        args, fields = d.get("args"), d.get("fields")
        if not (isinstance(cls, type) and issubclass(cls, LogitifyError) and isinstance(args, list)
                and isinstance(fields, dict)):
            continue
        notes = fields.get("notes", [])
        if not isinstance(fields.get("message"), str) or not (
                isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
            continue
        fields = {k: v for k, v in fields.items() if k not in _NOT_CARRIED}
        return errors._rebuilt(cls, tuple(args), {"result": None, **fields, "notes": list(notes)})
    return None


def _uncarried(e: LogitifyError, marker: str) -> LogitifyError:
    """The error without the line _error_carried added (it is for the launcher, not the user), its args as raised."""
    if "_carried_args" in vars(e):
        e.args = e.__dict__.pop("_carried_args")
    if "_carried_notes" in vars(e):
        e.__notes__ = e.__dict__.pop("_carried_notes")
    notes = getattr(e, "__notes__", None)
    if notes:
        kept = [n for n in notes if not str(n).startswith(marker)]
        if kept:
            e.__notes__ = kept
        else:
            del e.__notes__
    return e


def _chain(e: BaseException):
    """The error and what it was raised from or during, as Beam's runners chain them (at most 32 links)."""
    for _ in range(32):
        if e is None:
            return
        yield e
        e = e.__cause__ or e.__context__


def _stop_within(e: BaseException):
    """The KeyboardInterrupt (Ctrl-C, or the CLI's SIGTERM) a runner in this process wrapped in its own error."""
    return next((x for x in _chain(e) if isinstance(x, KeyboardInterrupt)), None)


def _raised_in_a_worker(e: BaseException):
    """The LogitifyError a worker raised, as Beam chains it under its own (the first raised), or None."""
    if isinstance(e, LogitifyError) and not _BEAM_STEP.search(str(e)):
        return e  # raised here, not by a worker
    ours = [x for x in _chain(e) if isinstance(x, LogitifyError)]
    return ours[-1] if ours else None


STRAGGLERS_SECONDS = 1.0  # how long a stopped run keeps ending the workers its runner still starts


def _children() -> set:
    """This process's descendants (Linux; elsewhere none are known): Beam starts its workers through a shell."""
    found, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            todo.extend(k for k in kids if k not in found)
            found.update(kids)
    return found


def _beam_workers(pids) -> set:
    """Those of `pids` that are Beam's SDK worker processes, or the shells Beam starts them through."""
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"apache_beam.runners.worker" in f.read():
                    found.add(pid)
        except OSError:
            pass
    return found


@contextlib.contextmanager
def _workers_stopped_first(stopping: threading.Event | None = None):
    """Ctrl-C or SIGTERM during a pipeline first ends the Beam worker processes the pipeline started.

    Beam's DirectRunner, stopped while its worker processes run, waits for
    them to end, and a stop sent to this process alone never reaches them:
    the run waited forever. Only a stop that stops the run acts so (an
    ignored one, or a caller's handler that returns, changes nothing), and
    only processes that are Beam workers and were not there before the run
    are ended, and `stopping` is set. The caller's handlers are put back after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = _children()
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in stops}
    done = threading.Event()
    ended = []

    def end_workers():
        for pid in _beam_workers(_children() - before):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass

    def keep_ending():  # a worker the runner starts while it winds down waits for it too
        while not done.wait(0.2):
            end_workers()

    def stop():
        if stopping is not None:
            stopping.set()
        end_workers()
        if not ended:
            ended.append(True)
            threading.Thread(target=keep_ending, name="end-beam-workers", daemon=True).start()

    def handler(signum, frame):
        then = previous[signum]
        if then == signal.SIG_IGN:
            return
        if callable(then):
            try:
                then(signum, frame)
            except BaseException:  # it stops the run: the workers first
                stop()
                raise
            return
        stop()  # the default action, once the workers are told
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for s in stops:
        signal.signal(s, handler)
    try:
        yield
    finally:
        try:
            if ended:
                time.sleep(STRAGGLERS_SECONDS)  # workers whose start was under way when the run stopped
        finally:
            done.set()
            for s in stops:
                signal.signal(s, previous[s])


class _quiet_beam:
    """For the console script, unless --verbose: Beam's own log held back while a pipeline runs.

    Beam logs at INFO, warns about optional clients, and logs a worker's
    failure with its traceback (in the launcher too), which the command
    then says as its one line. A program that runs a command keeps its
    logging as it set it, and its threads' error hook.
    """

    def __enter__(self):
        import logging

        from . import _tf

        self.logger = logging.getLogger("apache_beam")
        self.level = self.logger.level
        self.stopping = threading.Event()  # set by _workers_stopped_first as it ends the workers
        self.quiet = _tf.own_process and not _tf.verbose
        if self.quiet:
            self.logger.setLevel(logging.CRITICAL)
            self.hook = threading.excepthook
            threading.excepthook = self._worker_ended
        return self

    def _worker_ended(self, args) -> None:
        """The thread in which Beam waits on a worker process raises when that process ends with a failure's
        exit code (now and then 134: an abort while a failed run's worker shuts down): one line, no traceback,
        and nothing when the run is stopping (it ends its workers itself)."""
        tb = args.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
        said = _WORKER_ENDED.fullmatch(str(args.exc_value))
        if args.exc_type is RuntimeError and said and where.startswith("apache_beam."):
            import sys

            code = int(said.group(1))
            if sys.stderr is not None and not self.stopping.is_set():
                how = f"was ended by signal {_signal_name(-code)}" if code < 0 else f"ended with exit code {code}"
                sys.stderr.write(f"logitify: a Beam worker process {how}\n")
            return
        self.hook(args)

    def __exit__(self, *exc):
        if self.quiet:
            self.logger.setLevel(self.level)
            if threading.excepthook == self._worker_ended:
                threading.excepthook = self.hook


_WORKER_ENDED = re.compile(r"Worker subprocess exited with return code (-?\d+)")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _receipt_path(out: str, file: str) -> str:
    return fs.join(out, RECEIPT.format(file=file))


def _read_json(path: str):
    try:
        return json.loads(fs.read_bytes(path, 64 << 20))
    except (OSError, ValueError) as e:
        raise LogitifyError(f"cannot read {path}: {e}") from None


# -- encode ---------------------------------------------------------------------------------

def _make_shard_fn():
    beam, _ = _beam()

    class MakeShard(beam.DoFn):
        def __init__(self, options, shape, beam_args):
            self.options, self.shape, self.beam_args = options, tuple(shape), list(beam_args)
            self.transform = None
            self.quiet, self.marker = _launcher_quiet(), _carry_marker()

        def setup(self):
            from .shards import build_transform

            _worker_quiet(self.quiet, self.marker)
            with _error_carried(self.marker):
                _worker_filesystems(self.beam_args)
                _worker_tf(self.quiet, self.marker)
                self.transform = build_transform(self.options, self.shape)

        def process(self, task):
            from .pixels import read_in_process
            from .shards import make_shard

            with _error_carried(self.marker):
                result = make_shard(task, read_in_process(task.items, task.options, task.channels, task.expect,
                                                          task.guessed_grey), self.transform)
                fs.write_bytes(_receipt_path(task.options.out, result.file), result.to_json().encode())
            yield result.file

    return MakeShard


def _prepare_remote_output(out: str, overwrite: bool, made=()) -> None:
    """A bucket prefix: empty, or (with --overwrite) holding only what logitify owns there (outdir.owned_names).

    A dataset there with splits other than `made` (this run's) is refused:
    in a bucket a run replaces a whole dataset, and must not drop the splits
    a run in a folder would keep.
    """
    found = [p for p, _ in fs.listing(out)]
    if not found:
        return
    if not overwrite:
        raise LogitifyError(f"output {out} is not empty; pass --overwrite to replace what logitify wrote there")
    try:
        there = manifest_mod.parse(fs.read_bytes(fs.join(out, manifest_mod.MANIFEST), manifest_mod.MANIFEST_MAX_BYTES),
                                   out)
    except (OSError, LogitifyError):
        there = None
    if there is not None:
        others = sorted(set(there.splits) - set(made))
        if others:
            raise LogitifyError(f"output {out} holds a dataset with the split(s) {', '.join(others)}, which this run "
                                "does not make: in a bucket a run replaces the whole dataset, so add a split in a "
                                "local folder (then copy it up), or write to an empty prefix")
    prefix = out.rstrip("/") + "/"
    # A failed or stopped run's journals: the shards their headers name are logitify's.
    names = {p[len(prefix):]: p for p in found if p.startswith(prefix)}
    journals = {n: _journal_header(p) for n, p in names.items() if journal_split(n)}
    owned = {names[n] for n in owned_names(there, journals, names)}  # as in a folder
    foreign = sorted(p for p in found if p not in owned)
    if foreign:
        raise LogitifyError(f"output {out} holds {foreign[0]}, which logitify did not write; "
                            "--overwrite replaces only logitify's own files")
    fs.delete([p for p in found if not owns_others(p[len(prefix):])])  # a manifest and journals last, as in a folder
    fs.delete([p for p in found if owns_others(p[len(prefix):])])


def _journal_header(path: str):
    """A journal object's header, read as a folder's journal is (outdir.read_journal), or None."""
    from .outdir import read_journal

    try:
        with fs.open_read(path) as f:
            return read_journal(f, entries=False)[0]
    except Exception:  # unreadable: it owns nothing
        return None


def _start_remote_journals(out: str, parts) -> list:
    """Into a bucket: each part's journal header, as a local folder has it, so --overwrite can take back
    the shards of a run that failed or was stopped there; returns the objects, removed once the manifest is."""
    made = []
    for part in parts:
        path = fs.join(out, manifest_mod.journal_name(part.split))
        fs.write_bytes(path, (json.dumps({"header": part.header}) + "\n").encode())
        made.append(path)
    return made


def _restoring_filesystems(run):
    """The run's options go to Beam's FileSystems (process-wide), and the caller's are put back after."""
    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        with fs.options_kept():
            return run(*args, **kwargs)
    return wrapper


@_restoring_filesystems
def encode_beam(opts, report: Reporter, beam_args) -> EncodeResult:
    """`logitify encode --runner beam [-- BEAM_OPTIONS...]`."""
    from .formats import get as get_format
    from .outdir import OutputFolder
    from .planner import plan, split_runs

    runs = split_runs(opts)
    if len(runs) > 1 and fs.is_remote(opts.out):
        # Each split's run would find the one before it there (a bucket dataset is written whole).
        raise UsageError(f"{opts.out}: a TFDS folder's splits ({', '.join(o.split for o in runs)}) go into a "
                         "folder, one run adding each; into a bucket, choose one with --tfds-split per prefix")
    if len(runs) > 1:  # a TFDS folder's splits, one pipeline each, into one dataset
        from .encode_run import run_splits

        return run_splits(runs, lambda o: encode_beam(o, report, beam_args))
    opts = runs[0]
    t0 = time.time()
    if opts.resume:
        raise UsageError("--resume is for the local runner; a Beam run retries failed shards itself")
    from .encode_run import existing, prepare_locked, refuse_empty, replaced_shards, write_dataset

    fmt = get_format(opts.format)
    options = _options(beam_args)
    folder = None
    made = [opts.split] + ([opts.holdout[1]] if opts.holdout else [])
    if not fs.is_remote(opts.out):
        folder = OutputFolder(opts.out, opts.split)
        folder.check(opts.overwrite, False, splits=made, resumable=False)
    have, base = existing(opts)
    p = plan(opts, base=base)  # a failure's notes (skipped inputs) travel on the error
    for note in p.notes:
        report.warn(note)
    said = []  # what preparing the folder said
    done = False
    journals = []  # (journal, header) this run started
    try:
        if folder is not None:
            folder.create()
            folder.lock.acquire()
            said = prepare_locked(folder, opts, p, have, base, resume=False, warn=report.warn)
            for part in p.parts:  # names this run's shards, so --overwrite can clear a failed one
                journals.append((OutputFolder(opts.out, part.split).journal, part.header))
                journals[-1][0].start(part.header)
        else:
            _prepare_remote_output(opts.out, opts.overwrite, [part.split for part in p.parts])
            remote_journals = _start_remote_journals(opts.out, p.parts)
        tasks = [part.task(spec) for part in p.parts for spec in part.shards]
        make = _make_shard_fn()
        beam, _ = _beam()
        _run(lambda pl: (pl | "Shards" >> beam.Create(tasks, reshuffle=False)
                         | "Spread" >> beam.Reshuffle()
                         | "MakeShard" >> beam.ParDo(make(opts, p.shape, beam_args))), options,
             receipts=[_receipt_path(opts.out, t.spec.file) for t in tasks])
        from .fingerprint import DigestSet
        from .shards import made_grey_note, made_grey_of, packed_digests

        seconds = time.time() - t0
        m, receipts, total, counts, skipped_all = base, [], 0, {}, []
        greys = []  # each shard's colour images made grey
        for part in p.parts:
            shards, skipped = [], list(part.skipped)
            with DigestSet() as pixels:  # its temporary files go even if a receipt is refused
                for spec in part.shards:
                    receipt = _read_json(_receipt_path(opts.out, spec.file))
                    receipts.append(_receipt_path(opts.out, spec.file))
                    shards.append(manifest_mod.ShardEntry(receipt["file"], receipt["num_examples"], receipt["sha256"]))
                    packed = packed_digests(receipt)
                    if packed is None:
                        raise LogitifyError(f"the receipt of {spec.file} lacks its pixel digests (a worker of another "
                                            "logitify version?)")
                    pixels.add(packed)
                    for s in receipt["skipped"]:
                        report.warn(f"skipped {s['source']}: {s['reason']}")
                    skipped.extend(receipt["skipped"])
                    greys.append(made_grey_of(receipt))
                counts[part.split] = sum(s.num_examples for s in shards)
                total += counts[part.split]
                skipped_all += skipped
                m = manifest_mod.for_run(part, shards, skipped, {"seconds": round(seconds, 3), "runner": "beam"},
                                         pixels=pixels, base=m)
        refuse_empty(total, sum(len(x.items) for x in p.parts))
        rate = round(total / seconds, 1) if seconds else None
        for n in counts:
            m.splits[n].stats["images_per_second"] = rate
            m.splits[n].stats = {k: m.splits[n].stats[k] for k in ("seconds", "images_per_second", "runner",
                                                                    "fingerprint")}
        extra, closing = write_dataset(opts.out, fmt, m, counts, made_grey_note(greys), report)
        fs.delete(receipts)
        if folder is None:
            fs.delete(remote_journals)
        if folder is not None:
            folder.remove_stale(replaced_shards(have, base), m)
            for part in p.parts:
                OutputFolder(opts.out, part.split).journal.remove()
        done = True
    finally:
        if folder is not None:
            if not done:
                for journal, header in journals:
                    journal.drop_if_nothing_left(header)
            folder.lock.release()
            if not done:
                folder.drop_if_made()  # a folder this run made and left empty
    return EncodeResult(output=opts.out, format=opts.format, num_examples=total,
                        num_shards=sum(x.n_shards for x in p.parts),
                        shards=[s.file for n in counts for s in m.splits[n].shards], shape=list(p.shape),
                        classes=m.classes, skipped=sorted(skipped_all, key=skipped_order),
                        metadata_files=extra, seconds=round(seconds, 3), images_per_second=rate, runner="beam",
                        split=p.split, splits=counts, warnings=list(p.notes) + said + closing)


# -- decode ---------------------------------------------------------------------------------

def _decode_shard_fn():
    beam, _ = _beam()

    class DecodeShard(beam.DoFn):
        def __init__(self, dataset, out, fmt, batch_size, device, overwrite, beam_args, split, identity=None):
            self.dataset, self.out, self.fmt, self.split = dataset, out, fmt, split
            # (host, device and inode) of the folder the launcher locked: a worker on that host writes into no
            # other. Elsewhere (a folder shared over the network) the numbers are another mount's, and the
            # worker takes the folder as it finds it.
            self.identity = identity
            self.batch_size, self.device, self.overwrite = batch_size, device, overwrite
            self.beam_args = list(beam_args)
            self.quiet, self.marker = _launcher_quiet(), _carry_marker()

        def setup(self):
            from .dataset import LogitDataset
            from .device import resolve_device

            _worker_quiet(self.quiet, self.marker)
            with _error_carried(self.marker):
                _worker_filesystems(self.beam_args)
                self.ds = LogitDataset(self.dataset, self.split)
                if self.device == "gpu":
                    _worker_tf(self.quiet, self.marker)
                self.tf_device = resolve_device(self.device) if self.device == "gpu" else None

        def _identity(self):
            import socket

            if self.identity is None or self.identity[0] != socket.gethostname():
                return None
            return self.identity[1]

        def process(self, index, settled=None):
            import pickle

            from .decode_run import shard_jobs
            from .outputs import IMAGE_OUTPUTS

            settled = pickle.loads(settled) if settled is not None else None  # see _settle
            output = IMAGE_OUTPUTS[self.fmt](self.out, len(self.ds.shards), self.overwrite,
                                             classes=self.ds.classes, settled=settled, identity=self._identity())
            written, failed = 0, []
            with _error_carried(self.marker), contextlib.closing(output):  # a failed shard's half-made files go
                for job in shard_jobs(self.ds, output, index, self.ds.shards[index], self.batch_size,
                                      self.tf_device):
                    done = output.write(job)
                    failed += [p["reason"] for p in done["problems"] if not p["refused"]]
                    for p in done["problems"]:
                        if p["refused"]:
                            output.refuse(p["key"], p["reason"])
                    written += done["images"] - len(done["problems"])
            receipt = {"index": index, "written": written, "refused": output.refused,
                       "num_refused": output.num_refused, "failed": failed}
            with _error_carried(self.marker):
                fs.write_bytes(_receipt_path(self.out, f"restore-{index:05d}"), json.dumps(receipt).encode())
            yield index

    return DecodeShard


def _name_claims_fn():
    beam, _ = _beam()

    class NameClaims(beam.DoFn):
        """outputs.name_claims of each key of a shard, names and keys as bytes."""

        def __init__(self, dataset, beam_args, split):
            self.dataset, self.split, self.beam_args = dataset, split, list(beam_args)
            self.quiet, self.marker = _launcher_quiet(), _carry_marker()

        def setup(self):
            from .dataset import LogitDataset

            _worker_quiet(self.quiet, self.marker)
            with _error_carried(self.marker):
                _worker_filesystems(self.beam_args)
                self.ds = LogitDataset(self.dataset, self.split)

        def process(self, index):
            from .outputs import name_claims

            at = 0
            # Keys and labels alone (decode reads the logits, and checks the shard)
            with _error_carried(self.marker):
                for chunk in self.ds.iter_chunks(self.ds.shards[index], check=False, fields=("keys", "labels")):
                    keys, labels = chunk["keys"], chunk["labels"]
                    for name, (kind, (shard, position, key, label)) in name_claims(self.ds.classes, index, at,
                                                                                      keys, labels):
                        # As bytes: Beam's coders take text as UTF-8, which a key from a file name need not be.
                        yield os.fsencode(name), (kind, (shard, position, os.fsencode(key), label))
                    at += len(keys)

    return NameClaims


def _settle(clashing, classes) -> bytes:
    """outputs.settle_names of the keys that clash (their keys as bytes), pickled: names need not be UTF-8."""
    import pickle

    from .outputs import settle_names

    return pickle.dumps(settle_names([(s, p, os.fsdecode(k), label) for s, p, k, label in clashing], classes))


def _clashing(claim):
    """The claimants of a name, when more than one key competes for it (outputs.clashing)."""
    from .outputs import clashing

    _, claims = claim
    return clashing(list(claims))


@_restoring_filesystems
def decode_beam(dataset, out, fmt, batch_size=256, device="auto", overwrite=False, report: Reporter | None = None,
                beam_args=(), split=None) -> DecodeResult:
    """`logitify decode --runner beam`: a split (the only one, or the one named), or each into out/SPLIT/."""
    from .decode_run import each_split

    _options(beam_args)  # the run's endpoints and credentials, before the manifest is read from a bucket
    if fs.is_remote(out) and split is None and len(_names(dataset)) > 1:
        raise UsageError(f"{dataset} has several splits: name one with --split to decode into a bucket")
    return each_split(dataset, out, split, overwrite,
                      lambda name, where: _decode_split(dataset, where, fmt, batch_size, device, overwrite, report,
                                                        beam_args, name))


def _names(dataset):
    from .dataset import split_names

    return split_names(dataset)


def _decode_split(dataset, out, fmt, batch_size, device, overwrite, report, beam_args, split) -> DecodeResult:
    from .dataset import LogitDataset
    from .decode_run import finish, locked_folder, prepare_folder
    from .outdir import drop_made_folder
    import socket

    from .outputs import IMAGE_OUTPUTS, REFUSED_LISTED, folder_identity

    t0 = time.time()
    options = _options(beam_args)
    ds = LogitDataset(dataset, split)
    lock = made = None
    if fs.is_remote(out):
        if fs.listing(out) and not overwrite:
            raise LogitifyError(f"output {out} is not empty; pass --overwrite to write into it")
    else:
        made = prepare_folder(out, overwrite)
        try:
            lock = locked_folder(out, overwrite)
        except BaseException:
            drop_made_folder(made)
            raise
        dataset, out = (dataset if fs.is_remote(dataset) else os.path.abspath(dataset)), os.path.abspath(out)
    try:
        beam, _ = _beam()
        make = _decode_shard_fn()
        n = len(ds.shards)
        here = folder_identity(out)
        decode_shard = make(dataset, out, fmt, batch_size, device, overwrite, beam_args, ds.split,
                            None if here is None else (socket.gethostname(), here))

        def pipeline(pl):
            shards = pl | "Shards" >> beam.Create(list(range(n)), reshuffle=False) | "Spread" >> beam.Reshuffle()
            if not IMAGE_OUTPUTS[fmt].names_span_shards:
                return shards | "DecodeShard" >> beam.ParDo(decode_shard)
            # A key's file depends on the keys before it (a.jpg, then a.png): the few keys that
            # compete for a file are settled in key order first, as the local runner takes them.
            settled = (shards | "Names" >> beam.ParDo(_name_claims_fn()(dataset, beam_args, ds.split))
                       | "ByFile" >> beam.GroupByKey()
                       | "Clashing" >> beam.FlatMap(_clashing)
                       | "Together" >> beam.combiners.ToList()
                       | "Settle" >> beam.Map(_settle, ds.classes))
            return shards | "DecodeShard" >> beam.ParDo(decode_shard, beam.pvalue.AsSingleton(settled))

        receipts = [_receipt_path(out, f"restore-{i:05d}") for i in range(n)]
        _run(pipeline, options, receipts=receipts)
        results = [_read_json(r) for r in receipts]
        fs.delete(receipts)
        failed = [f for r in results for f in r["failed"]]
    except BaseException:
        failed = None
        raise
    finally:
        if lock is not None:
            lock.release()
        if failed is None or failed:
            drop_made_folder(made)  # the folder this run made, if it is left empty
    if failed:
        raise LogitifyError(failed[0])
    written = sum(r["written"] for r in results)
    seconds = time.time() - t0
    result = DecodeResult(dataset=dataset, output=out, format=fmt, num_images=written,
                          refused=[x for r in results for x in r["refused"]][:REFUSED_LISTED],
                          num_refused=sum(r["num_refused"] for r in results), seconds=round(seconds, 3),
                          images_per_second=round(written / seconds, 1) if seconds else None, runner="beam")
    return finish(result, out, report or Reporter(quiet=True))
