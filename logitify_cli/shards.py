"""make_shard: one output shard from its inputs' pixels, the same for every runner.

The local runner and the Beam runner both call make_shard with a ShardTask
from the plan and the task's pixels (read in a pool, or in the Beam worker
itself). It skips or fails on unreadable inputs, refuses odd sizes,
transforms batch by batch and streams into the format's writer, so a shard's
bytes are the same whoever makes it.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass, field

import numpy as np

from . import fingerprint as fingerprint_mod
from . import fs
from . import heap
from .errors import LogitifyError, write_error
from .formats import get as get_format
from .images import MADE_GREY, ImageSizeMismatch
from .manifest import ShardEntry
from .splits import outside_classes
from .transform import image_seeds


MADE_GREY_LISTED = 100  # keys of colour images made grey a shard names; more are counted


@dataclass
class ShardResult:
    """A finished shard: what the journal and the manifest record of it.

    `pixels` holds each image's pixel digest (fingerprint.image_digest, in
    shard order), packed 32 bytes each, so the run's fingerprint is made
    without reading a pixel again, even for shards a resumed run keeps.
    The journal and receipts write them as hex strings.
    """

    index: int
    file: str
    num_examples: int
    sha256: str
    skipped: list = field(default_factory=list)
    pixels: bytes = b""
    made_grey: list = field(default_factory=list)  # the first MADE_GREY_LISTED keys of colour images made grey
    num_made_grey: int = 0

    def entry(self) -> ShardEntry:
        return ShardEntry(self.file, self.num_examples, self.sha256)

    def to_dict(self) -> dict:
        return {**self._head(), "pixels": fingerprint_mod.to_hex(self._digests())}

    def to_json(self) -> str:
        """json.dumps(self.to_dict()), made without a string per image (a shard can hold 350,000)."""
        return "".join(self.json_pieces())

    def json_pieces(self):
        """to_json() in pieces, for writing it without holding it whole."""
        yield json.dumps(self._head())[:-1] + ', "pixels": '
        yield from fingerprint_mod.hex_json_pieces(self.pixels)
        yield "}"

    def _head(self) -> dict:
        return {"index": self.index, "file": self.file, "num_examples": self.num_examples,
                "sha256": self.sha256, "skipped": self.skipped, "made_grey": self.made_grey,
                "num_made_grey": self.num_made_grey}

    def _digests(self) -> list:
        return [self.pixels[a:a + 32] for a in range(0, len(self.pixels), 32)]


def made_grey_of(entry: dict) -> tuple:
    """(first keys, count) of the colour images made grey that a journal entry or receipt records."""
    keys, count = entry.get("made_grey"), entry.get("num_made_grey")
    keys = [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []
    return keys, count if type(count) is int and count > 0 else 0


def made_grey_note(shards) -> str | None:
    """The warning that names the colour images a run made grey, from each shard's (first keys, count)."""
    keys = [k for first, _ in shards for k in first[:3]]
    count = sum(n for _, n in shards)
    if not count:
        return None
    from .report import printable

    shown = ", ".join(printable(k) for k in keys[:3]) + (", ..." if count > 3 else "")
    return (f"{count} colour image(s) were made grey ({shown}): without --channels the run took the channels of "
            "its first image and a sample of the inputs, all grey; pass --channels 3 to keep their colour")


def packed_digests(entry: dict) -> bytes | None:
    """A journal entry's or receipt's pixel digests, packed (32 bytes each), or None if it has none to trust."""
    pixels = entry.get("pixels")
    if not isinstance(pixels, list) or len(pixels) != entry.get("num_examples"):
        return None
    try:
        return fingerprint_mod.from_hex(pixels)
    except ValueError:
        return None


class Block:
    """Up to a batch of a shard's readable images, packed: one pixel array, one key string, one label array.

    A shard of small images holds hundreds of thousands of them (350,000 of
    8x8 at the default shard size); a tuple, an array object and a key
    string each cost several times their pixels.
    """

    __slots__ = ("keys", "ends", "labels", "images")

    def __init__(self, keys: list, labels: list, arrays: list):
        """`arrays`: the images as [n, H, W, C] pieces (one image, or a run of them), in order."""
        self.ends = np.cumsum(np.fromiter(map(len, keys), np.int64, len(keys)))
        self.keys = "".join(keys)
        self.labels = np.array(labels, np.int64)
        self.images = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]

    def __len__(self) -> int:
        return len(self.ends)

    def key_list(self) -> list:
        starts = [0] + self.ends[:-1].tolist()
        return [self.keys[a:b] for a, b in zip(starts, self.ends.tolist())]


class Collector:
    """One shard's pixels as they arrive: checked, skipped or failed on, and packed into Blocks.

    Each Block is handed to `emit` as soon as it is full (a batch), so a
    shard is transformed and written while its later images are still
    being read.
    """

    def __init__(self, task, warn=lambda msg: None, tick=lambda n: None, emit=None):
        self.task, self.warn, self.tick = task, warn, tick
        self.shape = tuple(task.shape)
        self.block = max(1, task.options.batch_size)
        self.skipped = []
        self.made_grey, self.num_made_grey = [], 0  # see images.MADE_GREY
        self.emit = emit
        self._keys, self._labels, self._arrays = [], [], []

    def add(self, it, label, arr, reason) -> None:
        self.tick(1)
        # A size refused from the header (its pixels never read) is the same error as one seen after.
        got = tuple(reason.shape) if isinstance(reason, ImageSizeMismatch) else (arr.shape if arr is not None else None)
        if got is not None and got != self.shape:
            shape = self.shape
            raise LogitifyError(
                f"{it.key} is {got[1]} wide and {got[0]} high ({got[2]} channels) but the dataset is "
                f"{shape[1]} wide and {shape[0]} high (set by {self.task.first_key}); pass --size "
                f"{shape[0]}x{shape[1]} (height x width) to resize all images to that"
            )
        classes = self.task.classes
        if arr is not None and classes is not None and outside_classes(label, classes):
            # A record's own label beside class folders: it numbers something else, and would be
            # shown and trained on as a class the dataset does not have (verify refuses it too).
            arr, reason = None, f"its label {label} names none of the dataset's {classes} classes"
        if arr is None:
            if self.task.options.on_error == "fail":
                raise LogitifyError(f"cannot read {it.key}: {reason} (--on-error fail)")
            self.skipped.append({"source": it.key, "reason": reason})
            self.warn(f"skipped {it.key}: {reason}")
            return
        if reason == MADE_GREY:
            self.num_made_grey += 1
            if len(self.made_grey) < MADE_GREY_LISTED:
                self.made_grey.append(it.key)
        self._keys.append(it.key)
        self._labels.append(label)
        self._arrays.append(arr[None])
        if len(self._keys) == self.block:
            self._close_block()

    def add_many(self, items, labels, arrays) -> None:
        """add() for a run of images all read with no reason or note: arrays [n, H, W, C], one slice each Block."""
        classes = self.task.classes
        if arrays.shape[1:] != self.shape or (classes is not None
                                              and any(outside_classes(label, classes) for label in labels)):
            for it, label, arr in zip(items, labels, arrays):  # add() says what is wrong, image by image
                self.add(it, label, arr, None)
            return
        self.tick(len(items))
        at = 0
        while at < len(items):
            take = min(self.block - len(self._keys), len(items) - at)
            self._keys.extend(it.key for it in items[at:at + take])
            self._labels.extend(labels[at:at + take])
            self._arrays.append(arrays[at:at + take])
            at += take
            if len(self._keys) == self.block:
                self._close_block()

    def _close_block(self) -> None:
        if self._keys:
            block = Block(self._keys, self._labels, self._arrays)
            self._keys, self._labels, self._arrays = [], [], []
            self.emit(block)

    def finish(self) -> None:
        """The last, partial Block goes out too."""
        self._close_block()


class ShardGone(Exception):
    """The thread making a shard stopped (it failed): the caller asks its future why."""


_END = object()


class ShardFeed:
    """One shard's pixels, passed from the thread that gathers them to the one making the shard.

    The local runner adds images as the readers deliver them; make_shard
    takes full Blocks off a bounded queue (about FEED_BYTES of pixels), so
    the transform and the writer work beside the readers instead of
    waiting for a whole shard, and a shard's pixels are never all held.
    """

    FEED_BYTES = 16 << 20

    def __init__(self, task, warn=lambda msg: None):
        dims = int(np.prod(task.shape))
        depth = max(2, self.FEED_BYTES // max(1, dims * max(1, task.options.batch_size)))
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._gone = False
        self.collector = Collector(task, warn, emit=self._put)

    @property
    def skipped(self) -> list:
        return self.collector.skipped

    def add(self, it, label, arr, reason) -> None:
        self.collector.add(it, label, arr, reason)

    def add_many(self, items, labels, arrays) -> None:
        self.collector.add_many(items, labels, arrays)

    def close(self) -> None:
        """Every image of the shard has been added."""
        self.collector.finish()
        self._put(_END)

    def _put(self, block) -> None:
        while True:
            if self._gone:
                raise ShardGone()
            try:
                self._queue.put(block, timeout=0.1)
                return
            except queue.Full:
                pass

    def blocks(self, cancel=None):
        """The shard's Blocks in order, as they fill (the consumer's side)."""
        while True:
            try:
                block = self._queue.get(timeout=0.1)
            except queue.Empty:
                if cancel is not None and cancel.is_set():
                    return
                continue
            if block is _END:
                return
            yield block

    def stop(self) -> None:
        """The consumer is done (or failed): a producer waiting on a full queue gives up."""
        self._gone = True


class _PulledFeed:
    """A shard's pixels from an iterator, read in the thread that makes the shard (Beam workers)."""

    def __init__(self, task, pixels, warn, tick):
        self._pixels = pixels
        self._ready = collections.deque()
        self.collector = Collector(task, warn, tick, emit=self._ready.append)

    @property
    def skipped(self) -> list:
        return self.collector.skipped

    def blocks(self, cancel=None):
        for x in self._pixels:
            self.collector.add(*x)
            while self._ready:
                yield self._ready.popleft()
        self.collector.finish()
        while self._ready:
            yield self._ready.popleft()

    def stop(self) -> None:
        pass


def make_shard(task, pixels, transform, warn=lambda msg: None, tick=lambda n: None, cancel=None) -> ShardResult:
    """Read, check, transform and write one shard into task.options.out (a folder or a bucket prefix).

    `pixels` is a ShardFeed another thread fills, or an iterable of
    (item, label, array or None, reason or None) read here.
    """
    feed = pixels if isinstance(pixels, ShardFeed) else _PulledFeed(task, pixels, warn, tick)
    out = task.options.out
    try:
        if not fs.is_remote(out):
            info = write_shard(task, feed, transform, out, cancel)
        else:  # written here, then copied up whole: a bucket never sees half a shard
            local = tempfile.mkdtemp(prefix="logitify-shard-")
            try:
                info = write_shard(task, feed, transform, local, cancel)
                try:
                    fs.upload(os.path.join(local, info["file"]), fs.join(out, info["file"]))
                except OSError as e:
                    raise write_error(e, fs.join(out, info["file"])) from None
            finally:
                shutil.rmtree(local, ignore_errors=True)
    finally:
        feed.stop()
    seen = feed.collector
    return ShardResult(task.spec.index, info["file"], info["num_examples"], info["sha256"], list(feed.skipped),
                       bytes(info["pixels"]), list(seen.made_grey), seen.num_made_grey)


def write_shard(task, feed, transform, out_dir, cancel=None) -> dict:
    """Transform a shard's Blocks as the feed hands them over, straight into its writer.

    The writer is opened for every input the plan gave the shard; when some
    are skipped, the format sets the count right as it closes (the bytes
    are those of a shard opened for the images it holds). A writer thread
    takes each batch's logits (CRC, sha256 and the write release the GIL)
    and hashes its pixels for the fingerprint while the next batch is being
    transformed. Setting `cancel` abandons the shard (its temp file is
    removed). Returns the writer's {file, num_examples, sha256} and
    `pixels`, the images' digests packed (32 bytes each) in shard order.
    """
    opts = task.options
    fmt = get_format(opts.format)
    writer = None
    todo: queue.Queue = queue.Queue(maxsize=2)
    failure = []
    digests = bytearray()  # packed: 32 bytes an image
    bits = opts.params.bits

    def write_batches():
        while True:
            job = todo.get()
            if job is None:
                return
            if not failure:
                try:
                    writer.add(*job[:4])
                    digests.extend(b"".join(fingerprint_mod.digests(job[4], bits)))
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
        writer = fmt.writer(out_dir, task.spec.file, task.shape, len(task.items), opts.compress)
        thread = threading.Thread(target=write_batches, name=f"shard-{task.spec.index}", daemon=True)
        thread.start()
        for block in feed.blocks(cancel):
            if failure:
                break
            if cancel is not None and cancel.is_set():
                break
            keys, images = block.key_list(), block.images
            y, logdet = transform.forward(images, image_seeds(opts.params.seed, keys), copy=False)
            todo.put((keys, block.labels.tolist(), y, logdet, images))
            del block, images  # pixels are freed as they are transformed
            heap.now_and_then()  # and the pages they leave between the shard's keys and log-dets go back
        if cancel is not None and cancel.is_set():
            raise LogitifyError(f"shard {task.spec.index} abandoned")
        todo.put(None)
        thread.join()
        thread = None
        if failure:
            raise failure[0]
        return {**writer.close(), "pixels": digests}
    except OSError as e:
        stop_writer()
        if writer is not None:
            writer.abort()
        raise write_error(e, writer.file if writer is not None else task.spec.file) from None
    except BaseException:
        stop_writer()
        if writer is not None:
            writer.abort()
        raise


def build_transform(opts, shape):
    """Import TensorFlow, place and compile the transform (the slow start of every runner)."""
    from .device import resolve_device
    from .transform import LogitTransform

    transform = LogitTransform(opts.params, shape, resolve_device(opts.device), batch_size=opts.batch_size)
    transform.warm_up()
    return transform
