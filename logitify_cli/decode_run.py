"""The local runner of `decode`: shards -> inverse -> image files, in a worker pool.

Shards are read a slice at a time and the inverse runs in NumPy (TensorFlow
only when a GPU is asked for); the output's jobs (PNG files, npz per shard)
are written by the workers while the next slice is read.
"""
from __future__ import annotations

import os
import time

import numpy as np

from . import fs
from .dataset import LogitDataset, split_names
from .device import resolve_device
from .errors import LogitifyError, UsageError
from .outdir import (FolderLock, drop_made_folder, in_use, make_checked_folder, not_a_folder, protected_folder,
                     refuse_foreign_own)
from .outputs import IMAGE_OUTPUTS
from .pool import OrderedPool, default_workers
from .report import QUIET, Reporter
from .results import DecodeResult


def prepare_folder(out: str, overwrite: bool):
    """Check the output folder and make it; what this made, for drop_made_folder after a failure.

    A path such as `new/..` names no folder until `new` is made, and then
    names one that may be the home folder: it is checked again once there.
    """
    absent = not os.path.isdir(out)
    _check_folder(out, overwrite)
    return make_checked_folder(out, (lambda: _check_folder(out, overwrite)) if absent else None)


def _check_folder(out: str, overwrite: bool) -> None:
    if os.path.lexists(out) and not os.path.isdir(out):
        raise LogitifyError(f"output {out} {not_a_folder(out)}")
    if not os.path.isdir(out):
        return
    pid = FolderLock(out).holder()
    if pid is not None:
        raise in_use(out, pid)
    refuse_foreign_own(FolderLock(out).path, "lock file")
    if overwrite and protected_folder(out):
        raise LogitifyError(f"output folder {out} is {protected_folder(out)}; decode does not write there with "
                            "--overwrite: choose a folder of its own")
    try:
        busy = os.listdir(out)
    except OSError as e:
        raise LogitifyError(f"cannot read output folder {out}: {e.strerror or e}") from None
    if busy and not overwrite:
        raise LogitifyError(f"output folder {out} is not empty; pass --overwrite to write into it")


def locked_folder(out: str, overwrite: bool) -> FolderLock:
    """The output folder's lock, taken; then, without overwrite, the folder must still be empty.

    prepare_folder looked before the lock: two runs into one new folder
    could both find it empty, and the second wrote beside the first's files.
    """
    from .manifest import LOCK

    lock = FolderLock(out).acquire()
    try:
        if not overwrite and [n for n in os.listdir(out) if n != LOCK]:
            raise LogitifyError(f"output folder {out} is not empty; pass --overwrite to write into it")
    except OSError as e:
        lock.release()
        raise LogitifyError(f"cannot read output folder {out}: {e.strerror or e}") from None
    except BaseException:
        lock.release()
        raise
    return lock


def dataset_files(ds: LogitDataset) -> frozenset:
    """(device, inode) of the dataset's own files here: decode never replaces them, whatever the keys."""
    if ds.remote:
        return frozenset()
    found = set()
    for name in ds.manifest.owned_files():  # every split's shards, the metadata, the manifest
        try:
            st = os.stat(os.path.join(ds.root, name))
        except (OSError, ValueError):
            continue
        found.add((st.st_dev, st.st_ino))
    return frozenset(found)


def shard_jobs(ds: LogitDataset, output, index: int, shard, batch_size: int, device=None):
    """The output's jobs for one shard, read a slice at a time."""
    if output.protect is None:
        output.protect = dataset_files(ds)
    output.begin_shard(index, shard.num_examples, ds.shape)
    for chunk in ds.iter_chunks(shard):
        refuse_non_finite(shard.file, chunk)
        images = ds.inverse(chunk["logits"], device, batch_size)
        keys, labels = chunk["keys"], chunk["labels"]
        del chunk  # the logits: before the next slice is read
        yield from output.add(index, keys, labels, images)
        del images, keys, labels
    yield from output.end_shard(index)


def refuse_non_finite(file: str, chunk) -> None:
    """A NaN or infinite logit has no level: the image would come back with made-up pixels, so decode stops."""
    logits = chunk["logits"]
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN: the answer sought, not a warning
        if np.isfinite(np.sum(logits, dtype=np.float64)):  # one pass, no copy; float64 cannot overflow here
            return
    bad = [i for i in range(len(logits)) if not np.isfinite(logits[i]).all()]
    if bad:
        keys = ", ".join(repr(str(chunk["keys"][i])) for i in bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise LogitifyError(f"{file}: the logits of {keys} are not finite numbers, so no pixels can be given "
                            "back for them; the dataset is damaged (logitify verify lists every such image)")


WINDOW_BYTES = 64 << 20  # pixels in flight to the workers, at the most (but a job per worker)


def window(workers: int, shape) -> int:
    """Jobs in flight: four per worker, fewer when each carries many megabytes of pixels."""
    from .outputs import PNG_JOB, PNG_JOB_BYTES

    image = max(1, int(np.prod(shape)))
    job = image * max(1, min(PNG_JOB, PNG_JOB_BYTES // image))
    return max(workers, min(workers * 4, WINDOW_BYTES // job))


def record(done: dict, output) -> int:
    """Images a job wrote; its refused keys kept on the output, a failed write raised."""
    failed = [p for p in done["problems"] if not p["refused"]]
    if failed:
        raise LogitifyError(failed[0]["reason"])
    for p in done["problems"]:
        output.refuse(p["key"], p["reason"])
    return done["images"] - len(done["problems"])


def finish(result: DecodeResult, out: str, report: Reporter) -> DecodeResult:
    """Refused keys are reported, then the run fails naming how many; a failed write fails at once."""
    for x in result.refused:
        report.warn(f"refused key {x['key']!r}: {x['reason']}")
    count = max(result.num_refused, len(result.refused))
    if count > len(result.refused):
        report.warn(f"... and {count - len(result.refused)} more refused key(s), not listed")
    if count:
        raise LogitifyError(f"{count} key(s) could not be written inside {out} and were refused",
                            result=result)
    return result


def each_split(dataset: str, out: str, split, overwrite: bool, decode_one) -> DecodeResult:
    """Decode one split into `out`, or, when the dataset has several and none is named, each into out/SPLIT/."""
    names = split_names(dataset) if split is None else [split]
    if len(names) == 1:
        return decode_one(names[0], out)
    made = prepare_folder(out, overwrite)
    results = []
    try:
        for n in names:  # out is the user's choice, its split folders are ours: never a link out of it
            where = os.path.join(out, n)
            if not fs.is_remote(out) and os.path.islink(where):
                raise LogitifyError(f"{where} is a link: decode does not write through it (remove it, or name "
                                    "another output folder)")
            results.append(decode_one(n, where))
    except BaseException:
        drop_made_folder(made)
        raise
    first = results[0]
    n = sum(r.num_images for r in results)
    seconds = sum(r.seconds for r in results)
    return DecodeResult(dataset=dataset, output=out, format=first.format, num_images=n,
                        refused=[x for r in results for x in r.refused], seconds=round(seconds, 3),
                        images_per_second=round(n / seconds, 1) if seconds else None, runner=first.runner,
                        num_refused=sum(r.num_refused for r in results))


def run_decode(dataset: str, out: str, fmt: str = "png", batch_size: int = 256, workers=None,
               device: str = "auto", overwrite: bool = False, report: Reporter = QUIET,
               split: str | None = None) -> DecodeResult:
    """Decode a dataset's split (the only one, or the one named); several splits go to out/SPLIT/ each."""
    if "://" in str(out):  # the local runner's folder checks, lock and overwrite rules are for local folders
        raise UsageError("an output folder in a bucket needs --runner beam (it checks the folder is empty there)")
    return each_split(dataset, out, split, overwrite,
                      lambda name, where: _decode_split(dataset, where, fmt, batch_size, workers, device, overwrite,
                                                        report, name))


def _decode_split(dataset, out, fmt, batch_size, workers, device, overwrite, report, split) -> DecodeResult:
    t0 = time.time()
    ds = LogitDataset(dataset, split)
    made = prepare_folder(out, overwrite)
    try:
        return _decode_into(ds, dataset, out, fmt, batch_size, workers, device, overwrite, report, t0)
    except BaseException:
        drop_made_folder(made)
        raise


def _decode_into(ds, dataset, out, fmt, batch_size, workers, device, overwrite, report, t0) -> DecodeResult:
    tf_device = resolve_device(device) if device == "gpu" else None
    output = IMAGE_OUTPUTS[fmt](out, len(ds.shards), overwrite, classes=ds.classes)
    written = 0
    failure = None
    # The pool first: its workers fork before the progress bar starts a thread, and
    # before the lock is taken, so none of them holds it should this process be killed.
    pool = OrderedPool(workers or default_workers())
    try:
        lock = locked_folder(out, overwrite)
    except BaseException:
        pool.close()  # idle workers: they end at once
        raise
    try:
        with pool, report.bar(ds.num_examples, "decode") as bar:
            def jobs():
                for i, shard in enumerate(ds.shards):
                    for job in shard_jobs(ds, output, i, shard, batch_size, tf_device):
                        yield job, job

            try:
                for _, done in pool.imap(output.write, jobs(), window=window(pool.workers, ds.shape)):
                    written += record(done, output)
                    bar.update(done["images"])
            except LogitifyError as e:
                # An unreadable shard or a failed write ends the run, but the workers end as
                # usual: the jobs in flight finish, and nothing is torn down mid-write.
                failure = e
    finally:
        try:
            output.close()  # once the workers are done: what no job placed is dropped
        finally:
            lock.release()
    if failure is not None:
        raise failure
    seconds = time.time() - t0
    result = DecodeResult(dataset=dataset, output=out, format=fmt, num_images=written, refused=output.refused,
                          num_refused=output.num_refused,
                          seconds=round(seconds, 3), images_per_second=round(written / seconds, 1) if seconds else None)
    return finish(result, out, report)
