"""The local runner: sources -> decode workers -> transform -> shard sinks.

The shard layout is fixed before any pixel is read (shard i holds inputs
i*N .. i*N+N-1, less the skipped ones), so a shard's bytes depend only on
its inputs and the options, and a killed run can be resumed shard by shard.
"""
from __future__ import annotations

import collections
import errno
import fnmatch
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from . import images as images_mod
from . import manifest as manifest_mod
from .errors import LogitifyError, UsageError
from .sinks import SHARD_SINKS, NpzImageSink, PngImageSink, file_sha256
from .sources import Item, TfrecordFile, discover
from .transform import TransformParams, image_seeds

SHARD_BYTES = 256 << 20
# Decoded pixels the workers may run ahead while TensorFlow starts. More buys
# nothing on a busy machine (the import and the decoders share the cores) and
# raises the peak: 96 MB cost ~20 MB of peak over 40 MB on 50k images, same speed.
STARTUP_AHEAD = 40 << 20
RUN_AHEAD = 32 << 20  # and afterwards
TEMP_PATTERN = ".*.tmp-*"
METADATA_FILES = ("dataset_info.json", "features.json", "label.labels.txt")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass
class EncodeOptions:
    sources: list
    out: str
    format: str = "npz"
    params: TransformParams = field(default_factory=TransformParams)
    batch_size: int = 256
    shard_size: int | None = None
    size: tuple | None = None
    channels: int | None = None
    device: str = "auto"
    workers: int | None = None
    compress: bool = False
    compression: str | None = None
    image_key: str = "image"
    label_key: str = "label"
    name: str = "logitify"
    split: str = "train"
    on_error: str = "skip"
    resume: bool = False
    overwrite: bool = False
    max_pixels: int = images_mod.DEFAULT_MAX_PIXELS


class Reporter:
    """How a run talks: warnings and a progress bar on stderr, or nothing."""

    def __init__(self, quiet=False, progress=None):
        import sys

        self.quiet = quiet
        self.stream = sys.stderr
        self.show_progress = (not quiet) and (progress if progress is not None else self.stream.isatty())

    def warn(self, msg: str) -> None:
        if not self.quiet:
            self.stream.write(f"logitify: {msg}\n")
            self.stream.flush()

    def bar(self, total, desc, unit="img"):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not self.show_progress,
                    file=self.stream, dynamic_ncols=True, mininterval=0.5)


def resolve_device(device: str):
    """The TF device string for --device, or a clear error."""
    from ._tf import tf as _tf

    tf = _tf()
    gpus = tf.config.list_physical_devices("GPU")
    if device == "gpu":
        if not gpus:
            raise LogitifyError("--device gpu: TensorFlow sees no GPU on this machine (try --device auto)")
        return "/GPU:0"
    if device == "cpu":
        return "/CPU:0"
    return "/GPU:0" if gpus else "/CPU:0"


# -- ordered, bounded parallel map ----------------------------------------------------

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
        self.workers = workers
        self.pool = None
        if workers > 1:
            fork = can_fork()
            ctx = multiprocessing.get_context("fork" if fork else "spawn")
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                            initargs=(os.getpid() if fork else None,))
            if fork:
                self.pool.submit(int)  # forks every worker now, before this process starts a thread

    def imap(self, fn, jobs, window=None, describe=lambda meta: ""):
        """(meta, fn(args)) for each (meta, args) in jobs, in order.

        `window` is how many jobs may be in flight; a callable is asked
        again each time, so a run can decode far ahead while it starts up.
        """
        if self.pool is None:
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
                pending.append((meta, self.pool.submit(fn, args)))
            if not pending:
                return
            meta, fut = pending.popleft()
            try:
                result = fut.result()
            except BrokenProcessPool:
                raise LogitifyError(f"a worker process died while working on {describe(meta)}") from None
            yield meta, result

    def close(self, cancel=False):
        """Wait for the workers; with `cancel`, drop queued work and stop them now."""
        if self.pool is not None:
            procs = dict(getattr(self.pool, "_processes", None) or {}) if cancel else {}
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)
            for proc in procs.values():  # a decode in progress is of no use to anyone now
                try:
                    proc.terminate()
                except (OSError, ValueError):
                    pass
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(cancel=exc_type is not None)


def _worker_init(forked_from=None):
    """Ctrl-C and SIGTERM are the main process's to handle: workers stop with it.

    A forked worker inherits the CLI's SIGTERM handler, and both ends of the
    pool's pipes, so it would neither die on SIGTERM nor ever read EOF once
    the main process is gone. It gets SIGTERM's default back and, on Linux,
    asks to be killed when its parent dies (PR_SET_PDEATHSIG).
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if forked_from is not None:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != forked_from:  # the parent died before prctl took effect
            os._exit(1)


class _DecodeTask:
    """A picklable chunk task: payloads in, (array or None, reason) out."""

    def __init__(self, channels, size, max_pixels):
        self.channels, self.size, self.max_pixels = channels, size, max_pixels

    def __call__(self, payloads):
        return images_mod.decode_many(payloads, self.channels, self.size, self.max_pixels)


def _payloads(items, opts: EncodeOptions):
    """(item, path-or-bytes-or-error, label) for each item, in order."""
    reader = None
    for it in items:
        if it.index < 0:
            yield it, it.path, it.label
            continue
        if reader is None:
            from .records import RecordReader

            reader = RecordReader(lambda p: TfrecordFile(p, opts.compression).compression_type())
        from .records import parse_example

        try:
            data, label = parse_example(reader.read(it.path, it.index), opts.image_key, opts.label_key)
            yield it, data, label
        except (ValueError, StopIteration) as e:
            yield it, ValueError(str(e) or "record missing"), -1


def _chunks(iterable, n):
    chunk = []
    for x in iterable:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class DecodeStream:
    """(item, label, uint8 array or None, reason or None), in item order.

    Decoding runs ahead in the workers, up to `ahead_bytes` of pixels, so a
    run can import TensorFlow while the first images are being decoded.
    """

    CHUNK_BYTES = 4 << 20  # pixels per job: big enough that workers never wait on this process's GIL

    def __init__(self, items, opts: EncodeOptions, channels, size, pool: OrderedPool, image_bytes: int,
                 ahead_bytes: int = 64 << 20):
        self.task = _DecodeTask(channels, size, opts.max_pixels)
        self.chunk = max(1, min(256, self.CHUNK_BYTES // max(1, image_bytes)))
        self.pool_workers = pool.workers
        self.image_bytes = max(1, image_bytes)
        self.ahead(ahead_bytes)
        jobs = ((ch, [p for _, p, _ in ch]) for ch in _chunks(_payloads(items, opts), self.chunk))
        self._results = pool.imap(self.task, jobs, window=lambda: self.window, describe=self._describe)
        self._buffer = collections.deque()

    # What an image in flight costs besides its pixels: its item, path and
    # result entry, on both ends of the pipe. It matters for small images
    # (784 bytes of pixels for MNIST), where counting pixels alone let
    # hundreds of thousands of images be in flight.
    IN_FLIGHT_OVERHEAD = 512

    def ahead(self, nbytes: int) -> None:
        """Let the workers decode up to about nbytes ahead of use."""
        per_job = (self.image_bytes + self.IN_FLIGHT_OVERHEAD) * self.chunk
        self.window = max(self.pool_workers * 3, nbytes // per_job)

    @staticmethod
    def _describe(chunk):
        return ", ".join(it.key for it, _, _ in chunk[:3]) + (" ..." if len(chunk) > 3 else "")

    def start(self):
        """Submit a window of work now and wait for the first result.

        The wait is what gives the plan its head start over TensorFlow's
        import: the decoders are busy by the time the import begins.
        """
        if not self._buffer:
            self._buffer.extend(self._take())
        return self

    def _take(self):
        chunk, results = next(self._results)
        return [(it, label, arr, reason)
                for (it, _, label), (arr, reason) in zip(chunk, images_mod.unpack_many(results))]

    def __iter__(self):
        return self

    def __next__(self):
        if not self._buffer:
            self._buffer.extend(self._take())
        return self._buffer.popleft()


# -- the output folder ----------------------------------------------------------------

def _ours(name: str) -> bool:
    pats = ["*-?????-of-?????.npz", "*.tfrecord-?????-of-?????", TEMP_PATTERN, manifest_mod.MANIFEST,
            manifest_mod.JOURNAL, *METADATA_FILES]
    return any(fnmatch.fnmatchcase(name, p) for p in pats)


def refuse_existing_output(out: str, overwrite: bool, resume: bool) -> None:
    """Fail at once, before any work, on an output we may not touch."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise LogitifyError(f"output {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not (overwrite or resume):
        raise LogitifyError(f"output folder {out} is not empty; pass --overwrite to replace it or --resume to finish it")


def prepare_output(out: str, overwrite: bool, resume: bool) -> None:
    refuse_existing_output(out, overwrite, resume)
    if os.path.isdir(out):
        names = os.listdir(out)
        if overwrite:
            for n in names:
                if _ours(n) and os.path.isfile(os.path.join(out, n)):
                    os.unlink(os.path.join(out, n))
        else:
            for n in names:
                if fnmatch.fnmatchcase(n, TEMP_PATTERN):
                    os.unlink(os.path.join(out, n))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise LogitifyError(f"cannot create output folder {out}: {e.strerror or e}") from None


class Journal:
    """Append-only record of whole shards, so a killed run can resume."""

    def __init__(self, out: str):
        self.path = os.path.join(out, manifest_mod.JOURNAL)

    def start(self, header: dict) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"header": header}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"shard": entry}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def load(self):
        header, shards = None, {}
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a line cut by the kill: everything after it is unknown
                    if "header" in rec:
                        header = rec["header"]
                    elif "shard" in rec:
                        shards[rec["shard"]["index"]] = rec["shard"]
        except FileNotFoundError:
            return None, {}
        return header, shards

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _describe_difference(old: dict, new: dict) -> str:
    diffs = []
    for k in sorted(set(old) | set(new)):
        if k == "inputs":
            continue
        if old.get(k) != new.get(k):
            diffs.append(f"{k}: was {old.get(k)!r}, now {new.get(k)!r}")
    if old.get("inputs") != new.get("inputs"):
        diffs.append("the input files differ")
    return "; ".join(diffs) or "unknown difference"


# -- encode -----------------------------------------------------------------------------

def _probe(items, opts: EncodeOptions):
    """(shape, channels) from the first readable input in order."""
    for it, payload, _ in _payloads(items, opts):
        if isinstance(payload, BaseException):
            continue
        try:
            channels = opts.channels
            if channels is None:
                mode = images_mod.peek_mode(payload, opts.max_pixels)
                channels = 1 if images_mod.is_grayscale_mode(mode) else 3
            arr = images_mod.decode(payload, channels, opts.size, opts.max_pixels)
            return arr.shape, channels, it
        except images_mod.ImageReadError:
            continue
    return None, None, None


def _run_header(opts: EncodeOptions, shape, channels, shard_size, n_shards, items):
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\0{it.label}\0".encode("utf-8", "surrogatepass"))
    return {
        "format": opts.format,
        "name": opts.name,
        "split": opts.split,
        "transform": opts.params.to_dict(),
        "shape": list(shape),
        "size": list(opts.size) if opts.size else None,
        "channels": channels,
        "shard_size": shard_size,
        "num_shards": n_shards,
        "compress": opts.compress,
        "image_key": opts.image_key,
        "label_key": opts.label_key,
        "max_pixels": opts.max_pixels,
        "inputs": h.hexdigest(),
    }


@dataclass
class _Plan:
    """What an encode run does, settled before the first pixel is transformed."""

    inv: object
    shape: tuple
    channels: int
    first: Item
    shard_size: int
    n_shards: int
    header: dict
    journal: "Journal"
    done: dict
    todo: list
    todo_items: Sequence[Item]
    notes: list
    pool: "OrderedPool | None" = None
    stream: "DecodeStream | None" = None


def _plan(opts: EncodeOptions, pool: OrderedPool | None = None) -> _Plan:
    """Discover, probe, check the output folder, and start decoding ahead.

    `pool`, if given, is used whatever the number of inputs.
    """
    inv = discover(opts.sources, opts.compression)
    if not inv.items:
        raise LogitifyError("no images found in " + ", ".join(map(str, opts.sources)))
    notes = [f"skipped {s['source']}: {s['reason']}" for s in inv.skipped]
    shape, channels, first = _probe(inv.items, opts)
    if shape is None:
        # Every input is bad: record why, one by one, then fail.
        with OrderedPool(1) as pool:
            for it, _, _, reason in DecodeStream(inv.items, opts, opts.channels or 3, opts.size, pool, 1):
                notes.append(f"skipped {it.key}: {reason}")
        raise LogitifyError(f"none of the {len(inv.items)} inputs could be read as an image", None, notes)
    dims = int(np.prod(shape))
    shard_size = opts.shard_size or max(1, SHARD_BYTES // (4 * dims))
    n_shards = max(1, -(-len(inv.items) // shard_size))
    header = _run_header(opts, shape, channels, shard_size, n_shards, inv.items)
    if opts.params.noise == "gaussian" or opts.params.corruption_level > 1:
        notes.append("this transform is lossy: decode gives the nearest level, not always the original "
                     f"(noise {opts.params.noise}, corruption level {opts.params.corruption_level})")
    prepare_output(opts.out, opts.overwrite, opts.resume)
    journal = Journal(opts.out)
    done = {}
    if opts.resume:
        done = _resumable(opts, journal, header, {it.key: j // shard_size for j, it in enumerate(inv.items)})
    if not done:
        journal.start(header)
    todo = [i for i in range(n_shards) if i not in done]
    todo_items = inv.items
    if len(todo) < n_shards:  # a resumed run: only the shards still to make
        positions = [np.arange(i * shard_size, min((i + 1) * shard_size, len(inv.items))) for i in todo]
        todo_items = inv.items.select(np.concatenate(positions) if positions else np.zeros(0, np.int64))
    plan = _Plan(inv, shape, channels, first, shard_size, n_shards, header, journal, done, todo, todo_items, notes)
    workers = opts.workers or default_workers()
    plan.pool = pool or OrderedPool(min(workers, max(1, len(todo_items) // 64)))
    plan.stream = DecodeStream(todo_items, opts, channels, opts.size, plan.pool, dims, ahead_bytes=STARTUP_AHEAD)
    if todo_items:
        plan.stream.start()  # the workers decode while TensorFlow starts up
    return plan


PLAN_HEAD_START = 1.0  # seconds the plan may run alone before TensorFlow's import joins it


def _plan_while_tf_starts(opts: EncodeOptions) -> _Plan:
    """Plan in a thread while this one imports TensorFlow (seconds of CPU).

    Both hold the GIL most of the time, so running them side by side only
    delays the plan, and with it the first work handed to the decoders. The
    plan gets a head start: TensorFlow's import begins once the decoders have
    work, or after PLAN_HEAD_START if discovery is slow (a huge or remote
    folder, where overlapping the two still pays).
    """

    from ._tf import tf as _load_tf

    box = {}
    workers = opts.workers or default_workers()
    # Fork the decoders first, while this process still has one thread.
    pool = OrderedPool(workers) if workers > 1 and can_fork() else None

    def run():
        try:
            box["plan"] = _plan(opts, pool)
        except BaseException as e:  # re-raised below, in the main thread
            box["error"] = e
            if pool is not None:
                pool.close(cancel=True)

    thread = threading.Thread(target=run, name="plan", daemon=True)
    thread.start()
    thread.join(PLAN_HEAD_START)
    try:
        _load_tf()
    except BaseException:
        thread.join()
        if "plan" in box:
            box["plan"].pool.close(cancel=True)
        raise
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["plan"]


def encode(opts: EncodeOptions, report: Reporter) -> dict:
    t0 = time.time()
    if opts.format not in SHARD_SINKS:
        raise UsageError(f"unknown format {opts.format!r}")
    sink_cls = SHARD_SINKS[opts.format]
    refuse_existing_output(opts.out, opts.overwrite, opts.resume)
    try:
        plan = _plan_while_tf_starts(opts)
    except LogitifyError as e:
        for note in (e.args[2] if len(e.args) > 2 else []):
            report.warn(note)
        raise LogitifyError(e.args[0]) if len(e.args) > 1 else e
    for note in plan.notes:
        report.warn(note)
    inv, shape, first, shard_size, n_shards = plan.inv, plan.shape, plan.first, plan.shard_size, plan.n_shards
    journal, done, todo = plan.journal, plan.done, plan.todo
    skipped = list(inv.skipped)
    shards = [None] * n_shards
    for i, entry in done.items():
        shards[i] = {k: entry[k] for k in ("file", "num_examples", "sha256")}
        skipped.extend(entry.get("skipped", []))
    stream_ok = 0

    def finish(i, shard_skipped, future):
        nonlocal stream_ok
        info = future.result()
        stream_ok += info["num_examples"]
        shards[i] = info
        skipped.extend(shard_skipped)
        try:
            journal.append({"index": i, **info, "skipped": shard_skipped})
        except OSError as e:
            raise _io_error(e, manifest_mod.JOURNAL) from None

    # One thread compiles the transform, then transforms and writes shard i
    # while this one gathers shard i+1 from the decoders: the cores never
    # wait for a shard boundary. Shard i+1 starts as soon as it is gathered,
    # beside the end of shard i (in the run's tail the decoders are idle),
    # and shard i+2 is gathered only once shard i is done: at most two
    # shards' pixels are held, as with one thread.
    cancel = threading.Event()
    with report.bar(len(plan.todo_items), "encode") as bar, plan.pool, \
            ThreadPoolExecutor(2, thread_name_prefix="transform") as ex:
        stream = plan.stream
        transform = ex.submit(_start_transform, opts, shape)
        stream.ahead(RUN_AHEAD)
        pending = None
        try:
            for i in todo:
                part = inv.items[i * shard_size:(i + 1) * shard_size]
                decoded = (next(stream) for _ in part)
                good, shard_skipped = collect_shard(decoded, opts, shape, first.key, report.warn, bar.update)
                started = (i, shard_skipped, ex.submit(
                    lambda i, good: _write_shard(sink_cls, opts, i, n_shards, shape, good, transform.result(), cancel),
                    i, good))
                del good
                if pending is not None:
                    finish(*pending)
                pending = started
            if pending is not None:
                finish(*pending)
        except BaseException:
            cancel.set()  # the shard in flight is abandoned and its temp file removed
            raise

    seconds = time.time() - t0
    total = sum(s["num_examples"] for s in shards)
    if total == 0:
        raise LogitifyError(f"none of the {len(inv.items)} inputs could be read as an image")
    skipped.sort(key=lambda s: s["source"])
    m = build_manifest(opts, shape, plan.channels, shard_size, inv.classes, shards, skipped, plan.header,
                       {"seconds": round(seconds, 3),
                        "images_per_second": round(stream_ok / seconds, 1) if seconds else None})
    try:
        extra = sink_cls.write_metadata(opts.out, m)
        manifest_mod.write(opts.out, m)
    except OSError as e:
        raise _io_error(e, manifest_mod.MANIFEST) from None
    journal.remove()
    return {
        "command": "encode",
        "output": opts.out,
        "format": opts.format,
        "num_examples": total,
        "num_shards": n_shards,
        "shards": [s["file"] for s in shards],
        "resumed_shards": len(done),
        "shape": list(shape),
        "classes": inv.classes,
        "skipped": skipped,
        "metadata_files": extra,
        "seconds": round(seconds, 3),
        "images_per_second": round(stream_ok / seconds, 1) if seconds else None,
    }


def fingerprint(header: dict) -> str:
    """What a resume compares: the run's inputs and byte-relevant options."""
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def build_manifest(opts, shape, channels, shard_size, classes, shards, skipped, header, stats) -> dict:
    """The manifest of a finished run, the same for every runner."""
    return manifest_mod.build(
        fmt=opts.format, name=opts.name, split=opts.split, shape=shape, params=opts.params,
        classes=classes, shards=shards, skipped=skipped, compress=opts.compress,
        source={"size": list(opts.size) if opts.size else None, "channels": channels, "max_pixels": opts.max_pixels,
                "image_key": opts.image_key, "label_key": opts.label_key, "shard_size": shard_size},
        stats={**stats, "fingerprint": fingerprint(header)},
    )


def collect_shard(decoded, opts, shape, first_key, warn, tick=lambda n: None):
    """(good (key, label, array) list, skipped list) from one shard's decode results.

    Shared by the local and the Beam runner, so both skip, fail and refuse
    odd sizes in the same way.
    """
    good, skipped = [], []
    for it, label, arr, reason in decoded:
        tick(1)
        if arr is None:
            if opts.on_error == "fail":
                raise LogitifyError(f"cannot read {it.key}: {reason} (--on-error fail)")
            skipped.append({"source": it.key, "reason": reason})
            warn(f"skipped {it.key}: {reason}")
            continue
        if arr.shape != tuple(shape):
            raise LogitifyError(
                f"{it.key} is {arr.shape[1]}x{arr.shape[0]} (channels {arr.shape[2]}) but the dataset is "
                f"{shape[1]}x{shape[0]} (set by {first_key}); pass --size HxW to resize all images"
            )
        good.append((it.key, label, arr))
    return good, skipped


def _start_transform(opts: EncodeOptions, shape):
    """Import TensorFlow, place and compile the transform (the slow start)."""
    from .transform import LogitTransform

    transform = LogitTransform(opts.params, shape, resolve_device(opts.device), batch_size=opts.batch_size)
    transform.warm_up()
    return transform


def _write_shard(sink_cls, opts, index, n_shards, shape, good, transform, cancel=None) -> dict:
    """Transform a shard's images batch by batch straight into its sink; empties `good`.

    A writer thread takes each batch's logits (CRC, sha256 and the write
    release the GIL) while the next batch is being transformed. Setting
    `cancel` abandons the shard (its temp file is removed).
    """
    import queue

    sink = None
    todo: queue.Queue = queue.Queue(maxsize=2)
    failure = []

    def writer():
        while True:
            job = todo.get()
            if job is None:
                return
            if not failure:
                try:
                    sink.add(*job)
                except BaseException as e:  # handed to the main thread below
                    failure.append(e)

    thread = None

    def stop_writer():
        nonlocal thread
        if thread is not None:
            failure.append(None)  # the writer drops what is left
            while thread.is_alive():
                try:
                    todo.put(None, timeout=0.1)
                except queue.Full:
                    pass
                thread.join(0.1)
            thread = None

    try:
        sink = sink_cls(opts.out, index, n_shards, shape, name=opts.name, split=opts.split,
                        compress=opts.compress, count=len(good))
        thread = threading.Thread(target=writer, name=f"shard-{index}", daemon=True)
        thread.start()
        bs = opts.batch_size
        for start in range(0, len(good), bs):
            if failure:
                break
            if cancel is not None and cancel.is_set():
                raise LogitifyError(f"shard {index} abandoned")
            batch = good[start:start + bs]
            good[start:start + bs] = [None] * len(batch)  # pixels are freed as they are transformed
            keys = [k for k, _, _ in batch]
            images = np.stack([a for _, _, a in batch])
            y, logdet = transform.forward(images, image_seeds(opts.params.seed, keys))
            todo.put((keys, [lab for _, lab, _ in batch], y, logdet))
        todo.put(None)
        thread.join()
        thread = None
        if failure:
            raise failure[0]
        return sink.close()
    except OSError as e:
        stop_writer()
        if sink is not None:
            sink.abort()
        raise _io_error(e, sink.file if sink is not None else f"shard {index}") from None
    except BaseException:
        stop_writer()
        if sink is not None:
            sink.abort()
        raise


def _io_error(e: OSError, what: str) -> LogitifyError:
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason = "no space left on device"
    return LogitifyError(f"cannot write {what}: {reason}")


def _resumable(opts, journal: Journal, header, shard_of: dict) -> dict:
    """Shards a previous run finished and that are still whole."""
    old, entries = journal.load()
    if old is None:
        mpath = os.path.join(opts.out, manifest_mod.MANIFEST)
        if os.path.exists(mpath):
            m = manifest_mod.read(opts.out)
            if m.get("stats", {}).get("fingerprint") != fingerprint(header):
                raise LogitifyError(f"--resume: {opts.out} holds a finished dataset made from other inputs or options")
            old = header
            entries = {i: {**s, "index": i, "skipped": [x for x in m["skipped"] if shard_of.get(x["source"]) == i]}
                       for i, s in enumerate(m["shards"])}
            journal.start(header)
            for e in entries.values():
                journal.append(e)
        else:
            return {}
    if old != header:
        raise LogitifyError(f"--resume: the earlier run used other inputs or options ({_describe_difference(old, header)})")
    keep = {}
    for i, e in entries.items():
        path = os.path.join(opts.out, e["file"])
        if os.path.isfile(path) and file_sha256(path) == e["sha256"]:
            keep[i] = e
    journal.start(header)
    for e in keep.values():
        journal.append(e)
    return keep


# -- decode -------------------------------------------------------------------------------

def _inverse_in_batches(ds, logits, batch_size, tf_device):
    parts = [ds.inverse(logits[a:a + batch_size], tf_device) for a in range(0, len(logits), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0,) + ds.shape, np.uint8)


def decode(dataset_path: str, out: str, fmt: str = "png", batch_size: int = 256, workers=None,
           device: str = "auto", overwrite: bool = False, report: Reporter | None = None) -> dict:
    from .dataset import LogitDataset

    report = report or Reporter(quiet=True)
    t0 = time.time()
    ds = LogitDataset(dataset_path)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise LogitifyError(f"output folder {out} is not empty; pass --overwrite to write into it")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise LogitifyError(f"cannot create output folder {out}: {e.strerror or e}") from None
    # The inverse is light: NumPy on the CPU, TensorFlow only when a GPU is asked for.
    tf_device = resolve_device(device) if device == "gpu" else None
    workers = workers or default_workers()
    written, refused = 0, []
    shards = ds.manifest["shards"]
    # The pool first: its workers fork before the progress bar starts a thread.
    with OrderedPool(workers if fmt == "png" else 1) as pool, report.bar(ds.num_examples, "decode") as bar:
        if fmt == "npz":
            npz = NpzImageSink(out)
            for si, (shard, arrays) in enumerate(ds.iter_shards()):
                keys = arrays["keys"]
                images = _inverse_in_batches(ds, arrays["logits"], batch_size, tf_device)
                try:
                    npz.write_shard(si, len(shards), images, [str(k) for k in keys], arrays["labels"])
                except OSError as e:
                    raise _io_error(e, f"images for {shard['file']}") from None
                written += len(keys)
                bar.update(len(keys))
        else:
            png = PngImageSink(out)

            def jobs():
                """PNG jobs of every shard, read lazily so reading overlaps writing."""
                for _, arrays in ds.iter_shards():
                    keys, logits = arrays["keys"], arrays["logits"]
                    for a in range(0, len(keys), batch_size):
                        images = ds.inverse(logits[a:a + batch_size], tf_device)
                        batch = []
                        for key, img in zip(keys[a:a + batch_size], images):
                            try:
                                batch.append((png.target(str(key)), img))
                            except ValueError as e:
                                refused.append({"key": str(key), "reason": str(e)})
                                report.warn(f"refused key {str(key)!r}: {e}")
                                bar.update(1)
                            except OSError as e:
                                raise _io_error(e, f"a folder for {key}") from None
                        for c in _chunks(batch, 64):
                            yield c, c

            for chunk, errors in pool.imap(images_mod.encode_pngs, jobs(), window=pool.workers * 4):
                if errors:
                    path, reason, _ = errors[0]
                    raise LogitifyError(f"cannot write {path}: {reason}")
                written += len(chunk)
                bar.update(len(chunk))
    seconds = time.time() - t0
    summary = {
        "command": "decode",
        "dataset": dataset_path,
        "output": out,
        "format": fmt,
        "num_images": written,
        "refused": refused,
        "seconds": round(seconds, 3),
        "images_per_second": round(written / seconds, 1) if seconds else None,
    }
    if refused:
        raise LogitifyError(f"{len(refused)} key(s) would have written outside {out} and were refused", summary)
    return summary
