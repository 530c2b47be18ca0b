"""The local runner of `encode`: plan, read in a pool, make shards, write the manifest.

TensorFlow's import (seconds of CPU) overlaps the plan: the plan runs in a
thread with a head start, and the workers read the first images while the
import runs. Then one thread makes shard i while this one gathers the pixels
of shard i+1, so the cores never wait at a shard boundary.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import manifest as manifest_mod
from .errors import LogitifyError, UsageError, write_error
from .formats import get as get_format
from .outdir import OutputFolder
from .pixels import PixelStream
from .planner import EncodeOptions, RunPlan, plan
from .pool import OrderedPool, can_fork, default_workers
from .report import Reporter
from .results import EncodeResult
from .shards import Collector, ShardResult, build_transform, make_shard, packed_digests

# Pixels the workers may read ahead while TensorFlow starts. More buys
# nothing on a busy machine (the import and the readers share the cores) and
# raises the peak: 96 MB cost ~20 MB of peak over 40 MB on 50k images, same speed.
STARTUP_AHEAD = 40 << 20
RUN_AHEAD = 32 << 20  # and afterwards
PLAN_HEAD_START = 1.0  # seconds the plan may run alone before TensorFlow's import joins it


@dataclass
class _Started:
    """A plan with its output folder prepared and its pixels already flowing."""

    plan: RunPlan
    folder: OutputFolder
    done: dict  # index -> journal entry of shards a resumed run keeps
    todo: list  # ShardSpecs still to make
    pool: OrderedPool
    stream: PixelStream
    count: int  # inputs still to read
    fingerprint: dict | None = None  # a finished dataset's, when a resume keeps every shard of it


def _start(opts: EncodeOptions, pool: OrderedPool | None) -> _Started:
    """Plan, take the output folder, pick the shards to make, and start reading ahead."""
    p = plan(opts)
    folder = OutputFolder(opts.out)
    folder.create()
    folder.lock.acquire()
    try:
        folder.prepare(opts.overwrite, opts.resume, inputs=p.inputs_among)
        done = {}
        fingerprint = None
        if opts.resume:
            done = folder.resumable(p.header, p.fingerprint, p.shards_of)
            done, fingerprint = _with_digests(done, p)
        if not done:
            folder.journal.start(p.header)
    except BaseException:
        folder.lock.release()
        raise
    todo = [s for s in p.shards if s.index not in done]
    if len(todo) < p.n_shards:  # a resumed run: only the shards still to make
        positions = [np.arange(s.start, s.stop) for s in todo]
        items = p.items.select(np.concatenate(positions) if positions else np.zeros(0, np.int64))
    else:
        items = p.items
    workers = opts.workers or default_workers()
    pool = pool or OrderedPool(min(workers, max(1, len(items) // 64)))
    dims = int(np.prod(p.shape))
    stream = PixelStream(items, opts, p.channels, pool, dims, ahead_bytes=STARTUP_AHEAD,
                         expect=opts.expect_size(p.shape))
    if len(items):
        stream.start()  # the workers read while TensorFlow starts up
    return _Started(p, folder, done, todo, pool, stream, len(items), fingerprint)


def _with_digests(done: dict, p: RunPlan):
    """(shards to keep, fingerprint to keep): kept shards must bring their pixel digests.

    A journal's entries carry them. A finished dataset resumed whole keeps
    its manifest's fingerprint; otherwise a kept shard without digests (from
    a manifest, or a journal written before digests were kept) is made again.
    """
    if all(packed_digests(e) is not None for e in done.values()):
        return done, None
    if len(done) == p.n_shards:
        try:
            m = manifest_mod.read(os.path.join(p.options.out, manifest_mod.MANIFEST))
            if m.fingerprint is not None:
                return done, m.fingerprint
        except LogitifyError:
            pass
    return {i: e for i, e in done.items() if packed_digests(e) is not None}, None


def _start_while_tf_imports(opts: EncodeOptions) -> _Started:
    """Plan in a thread while this one imports TensorFlow (seconds of CPU).

    Both hold the GIL most of the time, so running them side by side only
    delays the plan, and with it the first work handed to the readers. The
    plan gets a head start: TensorFlow's import begins once the readers have
    work, or after PLAN_HEAD_START if discovery is slow (a huge or remote
    folder, where overlapping the two still pays).
    """
    from ._tf import tf as _load_tf

    box = {}
    workers = opts.workers or default_workers()
    # Fork the readers first, while this process still has one thread.
    pool = OrderedPool(workers) if workers > 1 and can_fork() else None

    def run():
        try:
            box["started"] = _start(opts, pool)
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
        if "started" in box:
            box["started"].pool.close(cancel=True)
            box["started"].folder.lock.release()
        raise
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["started"]


def run_encode(opts: EncodeOptions, report: Reporter) -> EncodeResult:
    t0 = time.time()
    fmt = get_format(opts.format)
    if opts.resume and opts.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    folder = OutputFolder(opts.out)
    folder.check(opts.overwrite, opts.resume)
    started = _start_while_tf_imports(opts)  # a failure's notes (skipped inputs) travel on the error
    try:
        return _run(started, opts, fmt, report, t0)
    finally:
        started.folder.lock.release()


def _run(started: _Started, opts, fmt, report, t0) -> EncodeResult:
    p = started.plan
    for note in p.notes:
        report.warn(note)
    journal = started.folder.journal
    skipped = list(p.skipped)
    shards = [None] * p.n_shards
    digests = [b""] * p.n_shards  # each shard's pixel digests, packed
    for i, entry in started.done.items():
        shards[i] = manifest_mod.ShardEntry(entry["file"], entry["num_examples"], entry["sha256"])
        skipped.extend(entry.get("skipped", []))
        digests[i] = packed_digests(entry) or b""
    made = 0

    def finish(future):
        nonlocal made
        result: ShardResult = future.result()
        made += result.num_examples
        shards[result.index] = result.entry()
        digests[result.index] = result.pixels
        skipped.extend(result.skipped)
        try:
            journal.append(result.to_json())
        except OSError as e:
            raise write_error(e, manifest_mod.JOURNAL) from None

    # One thread compiles the transform, then makes shard i while this one
    # gathers shard i+1 from the readers. Shard i+1 starts as soon as it is
    # gathered, beside the end of shard i (in the run's tail the readers are
    # idle), and shard i+2 is gathered only once shard i is done: at most
    # two shards' pixels are held.
    cancel = threading.Event()
    with report.bar(started.count, "encode") as bar, started.pool, \
            ThreadPoolExecutor(2, thread_name_prefix="transform") as ex:
        stream = started.stream
        transform = ex.submit(build_transform, opts, p.shape)
        stream.ahead(RUN_AHEAD)
        pending = None
        try:
            for spec in started.todo:
                task = p.task(spec)
                pixels = Collector(task, report.warn)  # packed as they arrive: no objects per image
                n = spec.stop - spec.start
                for j in range(n):
                    pixels.add(*next(stream))
                    if j % 256 == 255:  # the bar moves as images arrive, not a shard at a time
                        bar.update(256)
                bar.update(n % 256)
                started_shard = ex.submit(
                    lambda task, pixels: make_shard(task, pixels, transform.result(), report.warn, cancel=cancel),
                    task, pixels)
                del pixels
                if pending is not None:
                    finish(pending)
                pending = started_shard
            if pending is not None:
                finish(pending)
        except BaseException:
            cancel.set()  # the shard in flight is abandoned and its temp file removed
            raise

    seconds = time.time() - t0
    total = sum(s.num_examples for s in shards)
    if total == 0:
        raise LogitifyError(f"none of the {len(p.items)} inputs could be read as an image")
    rate = round(made / seconds, 1) if seconds else None
    m = manifest_mod.for_run(p, shards, skipped, {"seconds": round(seconds, 3), "images_per_second": rate},
                             pixels=None if started.fingerprint else digests)
    if started.fingerprint:
        m.fingerprint = started.fingerprint
    try:
        extra = fmt.write_metadata(opts.out, m)
        manifest_mod.write(opts.out, m)
    except OSError as e:
        raise write_error(e, manifest_mod.MANIFEST) from None
    journal.remove()
    return EncodeResult(output=opts.out, format=opts.format, num_examples=total, num_shards=p.n_shards,
                        shards=[s.file for s in shards], shape=list(p.shape), classes=p.classes,
                        skipped=m.skipped, metadata_files=extra, seconds=round(seconds, 3), images_per_second=rate,
                        resumed_shards=len(started.done))
