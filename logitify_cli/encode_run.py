"""The local runner of `encode`: plan, read in a pool, make shards, write the manifest.

TensorFlow's import (seconds of CPU) overlaps the plan: the plan runs in a
thread with a head start, and the workers read the first images while the
import runs. Then this thread hands each batch of pixels, as the readers
deliver it, to the thread making the shard, so the readers, the transform
and the writer work side by side and no shard waits for its last image.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import fs
from . import heap
from . import manifest as manifest_mod
from .errors import LogitifyError, SplitFailed, UsageError, write_error
from .fingerprint import DigestSet
from .formats import get as get_format
from .outdir import OutputFolder, header_files
from .pixels import PixelStream
from .planner import EncodeOptions, RunPlan, guessed_grey, plan, split_runs
from .pool import OrderedPool, can_fork, default_workers
from .presets import count_notes
from .report import Reporter, printable, skipped_order
from .results import EncodeResult
from .shards import (ShardFeed, ShardGone, ShardResult, build_transform, made_grey_note, made_grey_of,
                     make_shard, packed_digests)
from .splits import refuse_mismatch

# Pixels the workers may read ahead while TensorFlow starts (seconds in which
# this process delivers nothing): enough that the readers rarely stop before
# the first batch is taken. 40 MB left them idle half of the import on 64x64
# photos (3,000 images); 128 MB took 10,000 JPEGs from 15.1 to 13.8 s and
# 50,000 32x32 PNGs from 11.5 to 11.1 s, for 90-120 MB more peak.
# Tiny images are capped by count instead: at 8x8 each image in flight costs
# several times its pixels, and a million of them must stay in flat memory.
STARTUP_AHEAD = 128 << 20
STARTUP_IMAGES = 60_000
RUN_AHEAD = 32 << 20  # and afterwards
PLAN_HEAD_START = 1.0  # seconds the plan may run alone before TensorFlow's import joins it


@dataclass
class _Part:
    """One split the run makes: its plan, its journal, the shards a resume keeps and those still to make."""

    plan: RunPlan
    folder: OutputFolder  # this split's view of the output folder (its own journal)
    done: dict  # index -> journal entry of shards a resumed run keeps
    todo: list  # ShardSpecs still to make
    fingerprint: dict | None = None  # a finished split's, when a resume keeps every shard of it


@dataclass
class _Started:
    """A plan with its output folder prepared and its pixels already flowing."""

    plan: RunPlan
    folder: OutputFolder
    parts: list  # of _Part: the main split, then --holdout's
    base: object  # the finished dataset's other splits (a Manifest) the run keeps, or None
    replaced: list  # shard files of the splits this run replaces, removed once the manifest is written
    pool: OrderedPool
    stream: PixelStream
    count: int  # inputs still to read
    said: list  # warnings given while the folder was prepared (the result's --json warnings carry them)


def existing(opts: EncodeOptions):
    """(the finished dataset here, its splits this run does not make, as a Manifest or None)."""
    if fs.is_remote(opts.out) or not os.path.isdir(opts.out):
        return None, None
    have = OutputFolder(opts.out).dataset()
    if have is None:
        return None, None
    made = {opts.split} | ({opts.holdout[1]} if opts.holdout else set())
    if opts.overwrite:  # splits this command remakes next are replaced too, not kept to be matched
        made |= set(opts.later_splits)
    keep = {n: r for n, r in have.splits.items() if n not in made}
    if not keep:
        return have, None
    for n in keep:  # a dataset of one split written before split names were checked
        if not manifest_mod.SPLIT_NAME.match(n):
            raise LogitifyError(f"{opts.out} holds the split {printable(n)}, which a dataset of several splits "
                                "cannot name (letters, digits and _, at most 64): write this split to another "
                                "folder, or make that dataset again under another split name")
    return have, dataclasses.replace(have, splits=keep, split=None)


def replaced_shards(have, base) -> list:
    """The shard files of the dataset here (`have`) whose splits the run's manifest does not keep (`base`).

    Both runners remove them once the new manifest is written: this run's
    splits, and with --overwrite those the same command makes next.
    """
    if have is None:
        return []
    kept = set(base.splits) if base is not None else set()
    return [s.file for n, split in have.splits.items() if n not in kept for s in split.shards]


def prepare_locked(folder: OutputFolder, opts: EncodeOptions, p: RunPlan, have, base, resume: bool,
                   warn=lambda message: None) -> list:
    """With the folder's lock held: the dataset is still the one planned against, its splits match, and the folder is made ready.

    Both runners call this between taking the lock and writing anything, so
    a refusal (another run changed the manifest, a split that does not
    match) leaves the folder as it was. What must be said before the folder
    is touched (old shards removed now, see _unlist_replaced) goes to `warn`
    at once, and is returned for the result's warnings.
    """
    now, _ = existing(opts)
    if (now and now.to_dict()) != (have and have.to_dict()):
        raise LogitifyError(f"{opts.out}: its manifest changed while this run planned; run again")
    if base is not None:
        for part in p.parts:
            refuse_mismatch(base, part, opts.out)
    writes = [f for part in p.parts for f in header_files(part.header)]
    folder.prepare(opts.overwrite, resume, inputs=p.inputs_among, keep_dataset=base is not None, writes=writes)
    if opts.overwrite and have is not None and base is not None:  # (--resume keeps what it can of the split)
        return _unlist_replaced(opts, p, have, base, writes, warn)
    return []


def _unlist_replaced(opts: EncodeOptions, p: RunPlan, have, base, writes: list, warn) -> list:
    """A split remade under its old shards' names: the manifest stops listing it before one is replaced.

    Otherwise a run stopped halfway would leave a manifest that lists the
    split as whole while some of its files are already the new run's. Its
    other old shards go too: the run's journals, started first, own their
    names meanwhile, so a run stopped here leaves nothing no run may touch.
    A split remade under other names keeps its old shards until the new
    manifest is written (remove_stale). Never an input of this run.
    """
    old = replaced_shards(have, base)
    if not set(old) & set(writes):
        return []
    paths = [os.path.join(opts.out, n) for n in old]
    used = p.inputs_among([x for x in paths if os.path.isfile(x)])
    if used:
        raise LogitifyError(f"--overwrite would remove {printable(used[0])}, an input of this run; "
                            "write the output to another folder")
    remade = sorted(part.split for part in p.parts
                    if set(header_files(part.header)) & set(old))
    note = (f"{', '.join(remade)}: the new shards take the old shards' names, so the old ones are removed "
            "now, before the new ones are made")
    warn(note)
    for part in p.parts:
        OutputFolder(opts.out, part.split).journal.start(part.header)
    try:
        get_format(opts.format).write_metadata(opts.out, base)
        manifest_mod.write(opts.out, base)
    except OSError as e:
        raise write_error(e, manifest_mod.MANIFEST) from None
    for path in paths:
        try:
            if os.path.islink(path) or os.path.isfile(path):
                os.unlink(path)
        except OSError as e:
            raise LogitifyError(f"cannot remove {printable(path)}, a shard of the split this run replaces: "
                                f"{e.strerror or e}") from None
    return [note]


def _start(opts: EncodeOptions, folder: OutputFolder, pool: OrderedPool | None, warn=lambda message: None,
           stopping: threading.Event | None = None) -> _Started:
    """Plan, take the output folder, pick the shards to make, and start reading ahead.

    `stopping` is set when the run was stopped while this plans (in another
    thread): once the plan is made, nothing more is made or taken.
    """
    have, base = existing(opts)
    p = plan(opts, base=base)
    heap.release()  # what discovery sorted and merged in passing
    if stopping is not None and stopping.is_set():
        raise KeyboardInterrupt
    folder.create()
    folder.lock.acquire()
    parts = []
    try:
        said = prepare_locked(folder, opts, p, have, base, opts.resume, warn)
        for part in p.parts:
            pf = OutputFolder(opts.out, part.split)
            done, fingerprint = {}, None
            if opts.resume:
                done = pf.resumable(part.header, part.fingerprint, part.shards_of)
                done, fingerprint = _with_digests(done, part)
            if not done:
                pf.journal.start(part.header)
            parts.append(_Part(part, pf, done, [s for s in part.shards if s.index not in done], fingerprint))
        replaced = replaced_shards(have, base)
        chosen = [_inputs_to_read(x) for x in parts]
        items = chosen[0].concat(chosen[1:]) if len(chosen) > 1 else chosen[0]
        workers = opts.workers or default_workers()
        own = pool is None
        pool = pool or OrderedPool(min(workers, max(1, len(items) // 64)))
    except BaseException:
        _drop_journals_left_empty(folder, parts)
        folder.lock.release()
        raise
    try:
        dims = int(np.prod(p.shape))
        stream = PixelStream(items, p.options, p.channels, pool, dims, ahead_bytes=STARTUP_AHEAD,
                             ahead_images=STARTUP_IMAGES, expect=opts.expect_size(p.shape),
                             note_colour=guessed_grey(p.options, p.channels))
        if len(items):
            stream.start()  # the workers read while TensorFlow starts up
    except BaseException:  # a reader that died at once, say: the folder is free again
        if own:
            pool.close(cancel=True)
        _drop_journals_left_empty(folder, parts)
        folder.lock.release()
        raise
    return _Started(p, folder, parts, base, replaced, pool, stream, len(items), said)


def _make_shard_when_built(task, feed, transform, warn, cancel):
    """make_shard once the transform is built; if building it failed, the feed is stopped too.

    Otherwise the main thread would wait forever to hand the shard's pixels
    to a consumer that never started (--device gpu without a GPU).
    """
    try:
        built = transform.result()
    except BaseException:
        feed.stop()
        raise
    return make_shard(task, feed, built, warn, cancel=cancel)


def _inputs_to_read(part: "_Part"):
    """The plan's inputs of the shards still to make: the plan's own list when that is all of it (no copy)."""
    items = part.plan.items
    spans = [(s.start, s.stop) for s in part.todo]
    if not spans:
        return items.select(np.zeros(0, np.int64))
    if spans[0][0] == 0 and spans[-1][1] == len(items) and all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
        return items
    return items.select(np.concatenate([np.arange(a, b) for a, b in spans]))


def _with_digests(done: dict, p: RunPlan):
    """(shards to keep, fingerprint to keep): kept shards must bring their pixel digests.

    A journal's entries carry them. A finished split resumed whole keeps
    its manifest's fingerprint; otherwise a kept shard without digests (from
    a manifest, or a journal written before digests were kept) is made again.
    """
    if all(packed_digests(e) is not None for e in done.values()):
        return done, None
    if len(done) == p.n_shards:
        try:
            m = manifest_mod.read(os.path.join(p.options.out, manifest_mod.MANIFEST)).select(p.split)
            if m.fingerprint is not None:
                return done, m.fingerprint
        except LogitifyError:
            pass
    return {i: e for i, e in done.items() if packed_digests(e) is not None}, None


def _start_while_tf_imports(opts: EncodeOptions, folder: OutputFolder, warn=lambda message: None) -> _Started:
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

    ended, stopping = threading.Event(), threading.Event()

    def run():
        try:
            box["started"] = _start(opts, folder, pool, warn, stopping)
        except BaseException as e:  # re-raised below, in the main thread
            box["error"] = e
            if pool is not None:
                pool.close(cancel=True)
        finally:
            ended.set()

    thread = threading.Thread(target=run, name="plan", daemon=True)
    thread.start()
    try:
        thread.join(PLAN_HEAD_START)
        _load_tf()
        thread.join()
    except BaseException:  # Ctrl-C at any of the three: the readers stop now, then the plan ends
        stopping.set()  # what it has not made yet, it does not make
        if pool is not None:
            pool.close(cancel=True)
        # Not thread.join(): one a Ctrl-C interrupted counts the thread as ended while it still runs
        # (Python 3.11 and later), and the plan went on to make the folder and take its lock after this
        # returned. A second stop during this wait ends it, and the run, at once.
        ended.wait()
        if "started" in box:
            started = box["started"]
            started.pool.close(cancel=True)
            _drop_journals_left_empty(started.folder, started.parts)
            started.folder.lock.release()
        raise
    if "error" in box:
        raise box["error"]
    heap.release()  # what the import freed, and the buffers the pixels read meanwhile came through
    return box["started"]


def run_splits(runs: list, run_one) -> EncodeResult:
    """A TFDS folder's splits, one run each into one dataset (either runner); a failure names its split.

    The splits before it are written and stay: the error says which, and
    how to make the rest.
    """
    results = []
    for o in runs:
        try:
            results.append(run_one(o))
        except LogitifyError as e:
            if len(runs) == 1:
                raise
            raise SplitFailed(e, split=o.split, kept=[r.split for r in results],
                              rest=[o.split, *o.later_splits]) from e
    return EncodeResult.of_splits(results)


def run_encode(opts: EncodeOptions, report: Reporter) -> EncodeResult:
    runs = split_runs(opts)
    if len(runs) > 1:  # a TFDS folder's splits, one run each, into one dataset
        return run_splits(runs, lambda o: run_encode(o, report))
    opts = runs[0]
    t0 = time.time()
    fmt = get_format(opts.format)
    if "://" in str(opts.out):  # a bucket (or a URL): the local runner writes local folders only
        raise UsageError("an output folder in a bucket needs --runner beam (its workers write the shards there)")
    if opts.resume and opts.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    folder = OutputFolder(opts.out, opts.split)
    folder.check(opts.overwrite, opts.resume, splits=[opts.split] + ([opts.holdout[1]] if opts.holdout else []))
    try:
        started = _start_while_tf_imports(opts, folder, report.warn)  # a failure's notes travel on the error
        try:
            return _run(started, opts, fmt, report, t0)
        except BaseException:  # failed or stopped before its first shard: no journal in the next run's way
            _drop_journals_left_empty(started.folder, started.parts)
            raise
        finally:
            started.folder.lock.release()
    except BaseException:
        folder.drop_if_made()  # nor the folder it made, if that is all it left
        raise


def _drop_journals_left_empty(folder: OutputFolder, parts: list) -> None:
    """Each part's journal that names no file in the folder, unless the manifest still lists its split.

    A split the manifest lists (one being replaced under other shard names)
    is finished by --resume only through its journal: without it, --resume
    meets the old split and refuses. Never in the way of the error being raised.
    """
    try:
        have = folder.dataset()
    except Exception:  # unread, the journals stay: --overwrite takes them back
        return
    for part in parts:
        if have is not None and part.plan.split in have.splits:
            continue
        try:
            part.folder.journal.drop_if_nothing_left(part.plan.header)
        except OSError:
            pass


def _run(started: _Started, opts, fmt, report, t0) -> EncodeResult:
    p = started.plan
    for note in p.notes:
        report.warn(note)
    # Per part: its shards, its pixel digests (for the fingerprint; past a bound on
    # disk, so a million images do not hold 32 MB of them to the end) and its skipped inputs.
    book = [([None] * part.plan.n_shards, DigestSet(), list(part.plan.skipped)) for part in started.parts]
    try:
        for part, (shards, digests, skipped) in zip(started.parts, book):
            for i, entry in part.done.items():
                shards[i] = manifest_mod.ShardEntry(entry["file"], entry["num_examples"], entry["sha256"])
                skipped.extend(entry.get("skipped", []))
                digests.add(packed_digests(entry) or b"")
                entry.pop("pixels", None)  # 130 bytes of hex an image, not needed again
        return _make(started, opts, fmt, report, t0, book)
    finally:
        for _, digests, _ in book:
            digests.close()


def refuse_empty(made: int, inputs: int) -> None:
    """A run whose every input was skipped fails (each was named with its reason as it was met)."""
    if made == 0:
        raise LogitifyError(f"none of the {inputs} inputs gave an image (every one was skipped, each with its reason)")


def write_dataset(out: str, fmt, m, counts: dict, grey_note: str | None, report) -> tuple:
    """Write the format's metadata, then the manifest, last (it never names a shard that is not whole),
    and say what the whole run showed; (metadata files, warnings the result carries). Both runners end here.

    A run stopped or failed between the two takes its metadata back where no
    manifest owns those names: a journal never owns metadata (a planted one
    could claim a user's), so the next --resume or --overwrite would refuse
    it as someone else's file.
    """
    manifest_path = fs.join(out, manifest_mod.MANIFEST)
    fresh = not fs.exists(manifest_path)
    try:
        extra = fmt.write_metadata(out, m)
        manifest_mod.write(out, m)
    except BaseException as e:
        try:
            if fresh and not fs.exists(manifest_path):
                fs.delete(fs.join(out, n) for n in fmt.metadata_files(m))
        except Exception:  # the failure being raised says more than this one
            pass
        if isinstance(e, OSError):
            raise write_error(e, manifest_mod.MANIFEST) from None
        raise
    closing = ([grey_note] if grey_note else []) + count_notes(m, counts)
    for note in closing:
        report.warn(note)
    return extra, closing


def _journal_whole(unjournaled: list, finish) -> None:
    """On a failure: the shards that were whole before it are journaled, for --resume to keep.

    A shard renamed into place and in no journal would be a file no run
    owns: the next run (--overwrite too) would refuse the folder for it.
    """
    futures.wait([f for f, _ in unjournaled])
    for future, k in unjournaled:
        if future.cancelled() or future.exception() is not None:
            continue  # abandoned or failed: its temporary file is gone, and a resume makes it
        try:
            finish(future, k)
        except BaseException:  # the journal cannot be written: the failure already being raised says enough
            return


def _make(started: _Started, opts, fmt, report, t0, book) -> EncodeResult:
    """Make the shards still to make, then write the manifest."""
    p = started.plan
    made = 0
    # Colour images made grey (see planner.guessed_grey), those of the shards a resume keeps included.
    greys = [made_grey_of(e) for part in started.parts for e in part.done.values()]

    def finish(future, k):
        nonlocal made
        result: ShardResult = future.result()
        made += result.num_examples
        greys.append((result.made_grey, result.num_made_grey))
        shards, digests, skipped = book[k]
        shards[result.index] = result.entry()
        skipped.extend(result.skipped)
        try:
            started.parts[k].folder.journal.append(result.json_pieces())
        except OSError as e:
            raise write_error(e, manifest_mod.journal_name(started.parts[k].plan.split)) from None
        digests.add(result.pixels)  # after the journal: the shard is kept even if this fails

    # One thread compiles the transform, then makes shard i from a feed this
    # one fills as the readers deliver: each batch is transformed and
    # written while the next is read, so the readers, the transform and the
    # writer work side by side, and a shard's pixels are never all held.
    # Shard i+1 starts as soon as shard i's last image is handed over,
    # beside its tail. The main split's shards come first, then --holdout's,
    # from one stream of pixels.
    cancel = threading.Event()
    unjournaled = []  # (future, part) of the shards being made, in order, not yet in their journal
    with report.bar(started.count, "encode") as bar, started.pool, \
            ThreadPoolExecutor(3, thread_name_prefix="transform") as ex:
        stream = started.stream
        transform = ex.submit(build_transform, opts, p.shape)
        stream.ahead(RUN_AHEAD)
        try:
            for k, part in enumerate(started.parts):
                for spec in part.todo:
                    task = part.plan.task(spec)
                    feed = ShardFeed(task, report.warn)
                    making = ex.submit(_make_shard_when_built, task, feed, transform, report.warn, cancel)
                    unjournaled.append((making, k))
                    n = spec.stop - spec.start
                    try:
                        j = shown = 0
                        while j < n:
                            run = stream.take_clean(n - j)  # images read cleanly go over a run at a time
                            if run is None:
                                feed.add(*next(stream))
                                j += 1
                            else:
                                feed.add_many(*run)
                                j += len(run[0])
                            if j - shown >= 256:  # the bar moves as images arrive, not a shard at a time
                                bar.update(j - shown)
                                shown = j
                        feed.close()
                    except ShardGone:
                        making.result()  # raises what stopped it
                        raise
                    bar.update(n - shown)
                    del feed
                    while len(unjournaled) > 1:  # all but the shard just handed over, which ends beside the next
                        finish(*unjournaled.pop(0))
            while unjournaled:
                finish(*unjournaled.pop(0))
        except BaseException:
            cancel.set()  # the shards in flight are abandoned and their temp files removed
            _journal_whole(unjournaled, finish)
            raise

    seconds = time.time() - t0
    refuse_empty(sum(s.num_examples for shards, _, _ in book for s in shards),
                 sum(len(x.plan.items) for x in started.parts))
    rate = round(made / seconds, 1) if seconds else None
    m = started.base
    for part, (shards, digests, skipped) in zip(started.parts, book):
        m = manifest_mod.for_run(part.plan, shards, skipped, {"seconds": round(seconds, 3), "images_per_second": rate},
                                 pixels=None if part.fingerprint else digests, base=m)
        if part.fingerprint:
            m.fingerprint = part.fingerprint
    counts = {x.plan.split: m.splits[x.plan.split].num_examples for x in started.parts}
    extra, closing = write_dataset(opts.out, fmt, m, counts, made_grey_note(greys), report)
    try:
        started.folder.remove_stale(started.replaced, m)
    except OSError as e:
        raise write_error(e, manifest_mod.MANIFEST) from None
    for part in started.parts:
        part.folder.journal.remove()
    return EncodeResult(output=opts.out, format=opts.format, num_examples=sum(counts.values()),
                        num_shards=sum(x.plan.n_shards for x in started.parts),
                        shards=[s.file for shards, _, _ in book for s in shards], shape=list(p.shape),
                        classes=m.classes, skipped=sorted((x for _, _, sk in book for x in sk), key=skipped_order),
                        metadata_files=extra, seconds=round(seconds, 3), images_per_second=rate,
                        resumed_shards=sum(len(x.done) for x in started.parts),
                        split=p.split, splits=counts, warnings=list(p.notes) + started.said + closing)
