"""The stream of pixels: inputs read into uint8 arrays, in order, ahead of use.

Reading (file -> pixels) runs in the worker pool; records of TFRecord inputs
and objects in buckets are fetched here and only their bytes travel on.
"""
from __future__ import annotations

import numpy as np

from . import fs
from . import images as images_mod
from .pool import OrderedPool


def payloads(items, opts):
    """(item, path-or-bytes-or-error, label) for each item, in order.

    `opts` gives `compression`, `image_key` and `label_key` for TFRecord inputs.
    """
    reader = None
    for it in items:
        if it.index < 0:
            path = it.path
            if fs.is_remote(path):
                try:
                    yield it, fs.read_bytes(path), it.label
                except OSError as e:
                    yield it, OSError(str(e)), it.label
                continue
            yield it, path, it.label
            continue
        if reader is None:
            reader = record_reader(opts.compression)
        from .records import parse_example

        try:
            data, label = parse_example(reader.read(it.path, it.index), opts.image_key, opts.label_key)
            yield it, data, label
        except (ValueError, StopIteration, OSError) as e:
            yield it, ValueError(str(e) or "record missing"), -1


def record_reader(compression):
    """A RecordReader of the run's TFRecord inputs, each file's compression as --compression says or as found."""
    from .records import RecordReader
    from .sources import TfrecordFile

    return RecordReader(lambda p: TfrecordFile(p, compression).compression_type())


def chunks(iterable, n, total=None, tail=0, weight=None, max_weight=None):
    """Lists of at most n items, in order, none empty.

    With `total` known, the last `tail` items go in lists of an eighth of n:
    the workers then finish within a short job of each other (341 photos to
    a job are 0.4 s of a reader's work, which one reader spent alone at the
    end of a run while the other had nothing left). With `weight`, a list
    also ends once its items weigh `max_weight` (bytes that travel with them).
    """
    chunk, held, left = [], 0, total
    size = n if left is None or left > tail else max(1, n // 8)
    for x in iterable:
        chunk.append(x)
        if weight is not None:
            held += weight(x)
        if len(chunk) >= size or (max_weight is not None and held >= max_weight):
            yield chunk
            if left is not None:
                left -= len(chunk)
                size = n if left > tail else max(1, n // 8)
            chunk, held = [], 0
    if chunk:
        yield chunk


def _payload_bytes(x) -> int:
    """Bytes a payload carries to a worker: a record's or an object's image (a path carries none)."""
    payload = x[1]
    return len(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else 0


def _length(items):
    try:
        return len(items)
    except TypeError:  # an iterator: no tail to taper
        return None


class ReadTask:
    """A picklable chunk task for the pool: payloads in, packed pixels or reasons out."""

    def __init__(self, channels, size, max_pixels, expect=None, note_colour=False):
        self.channels, self.size, self.max_pixels, self.expect = channels, size, max_pixels, expect
        self.note_colour = note_colour

    def __call__(self, payloads):
        return images_mod.read_many(payloads, self.channels, self.size, self.max_pixels, expect_size=self.expect,
                                    note_colour=self.note_colour)


def read_in_process(items, opts, channels, expect=None, note_colour=False):
    """(item, label, array or None, reason or note or None) for each item, read here (Beam workers)."""
    geometry = opts.geometry
    for it, payload, label in payloads(items, opts):
        arr, reason = images_mod.read_one(payload, channels, geometry, opts.max_pixels, expect, note_colour)
        yield it, label, arr, reason


class PixelStream:
    """(item, label, uint8 array or None, reason or note or None), in item order.

    Reading runs ahead in the workers, up to `ahead_bytes` of pixels, so a
    run can import TensorFlow while the first images are being read.
    """

    CHUNK_BYTES = 4 << 20  # pixels per job: big enough that workers never wait on this process's GIL
    # and at most this many images. 256 32x32 PNGs are 15 ms of a reader's
    # work, shorter than the stalls of TensorFlow's import (its libraries load
    # with the GIL held), and the readers ran dry; 1,024 took 50,000 of them
    # from 4.68 to 4.56 s and 7.9 to 7.7 core-seconds (four interleaved runs).
    CHUNK_IMAGES = 1024
    # What an image in flight costs besides its pixels: its item, path and
    # result entry, on both ends of the pipe. It matters for small images
    # (784 bytes of pixels for MNIST), where counting pixels alone let
    # hundreds of thousands of images be in flight.
    IN_FLIGHT_OVERHEAD = 512

    def __init__(self, items, opts, channels, pool: OrderedPool, image_bytes: int, ahead_bytes: int = 64 << 20,
                 ahead_images: int | None = None, expect=None, note_colour=False):
        self.task = ReadTask(channels, opts.geometry, opts.max_pixels, expect, note_colour)
        self.chunk = max(1, min(self.CHUNK_IMAGES, self.CHUNK_BYTES // max(1, image_bytes)))
        self.pool_workers = pool.workers
        self.image_bytes = max(1, image_bytes)
        self.ahead(ahead_bytes, ahead_images)
        total = _length(items)
        tail = min(2 * pool.workers * self.chunk, (total or 0) // 4) if pool.workers > 1 else 0
        # Encoded images from records and buckets travel in the job: at most CHUNK_BYTES of them too.
        jobs = ((ch, [p for _, p, _ in ch]) for ch in chunks(payloads(items, opts), self.chunk, total, tail,
                                                              _payload_bytes, self.CHUNK_BYTES))
        self._results = pool.imap(self.task, jobs, window=lambda: self.window, describe=self._describe)
        self._chunk = None  # the chunk being handed out: see _load
        self._at = 0

    def ahead(self, nbytes: int, images: int | None = None) -> None:
        """Let the workers read up to about nbytes (and at most `images` images) ahead of use."""
        per_job = (self.image_bytes + self.IN_FLIGHT_OVERHEAD) * self.chunk
        jobs = nbytes // per_job
        least = self.pool_workers * 3  # every worker busy, with work queued behind
        if images is not None:
            jobs = min(jobs, images // self.chunk)
            least = max(self.pool_workers, min(least, images // self.chunk))
        self.window = max(least, jobs)

    @staticmethod
    def _describe(chunk):
        return ", ".join(it.key for it, _, _ in chunk[:3]) + (" ..." if len(chunk) > 3 else "")

    def start(self):
        """Submit a window of work now and wait for the first result.

        The wait is what gives the plan its head start over TensorFlow's
        import: the readers are busy by the time the import begins.
        """
        if self._chunk is None:
            self._load()
        return self

    def _load(self) -> None:
        """The next chunk's results, kept as the readers packed them (read_many).

        `rows[i]` is image i's row in the stacked array (-1: not in it), and
        `clean[i]` says it was read with no reason or note: a run of clean
        images is one slice of the stack (take_clean).
        """
        chunk, (stack, same, odd, reasons) = next(self._results)
        rows = np.full(len(chunk), -1, np.int64)
        rows[np.asarray(same, np.int64)] = np.arange(len(same))
        clean = (rows >= 0) & np.fromiter((r is None for r in reasons), bool, len(reasons))
        self._chunk, self._stack, self._odd, self._reasons = chunk, stack, odd, reasons
        self._rows, self._clean, self._at = rows, clean, 0

    def _ready(self) -> None:
        if self._chunk is None or self._at == len(self._chunk):
            self._chunk = None  # a chunk's pixels go once handed out
            self._load()

    def __iter__(self):
        return self

    def __next__(self):
        self._ready()
        i = self._at
        self._at = i + 1
        it, _, label = self._chunk[i]
        row = int(self._rows[i])
        return it, label, (self._stack[row] if row >= 0 else self._odd.get(i)), self._reasons[i]

    def take_clean(self, limit: int):
        """(items, labels, pixels [n, ...]) of the next n <= limit images if they were all read cleanly, else None.

        The pixels are one slice of the readers' own array: a shard of small
        images is handed over a run at a time, not an image at a time.
        """
        self._ready()
        i = self._at
        clean = self._clean[i:i + limit]
        n = len(clean) if clean.all() else int(np.argmin(clean))
        if n < 2:
            return None
        self._at = i + n
        part = self._chunk[i:i + n]
        row = int(self._rows[i])
        return [it for it, _, _ in part], [label for _, _, label in part], self._stack[row:row + n]
