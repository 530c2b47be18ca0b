"""TFRecord input: counting records, reading them in order, parsing Examples.

Records are framed and checked here, not by TensorFlow: a TFRecord header is
a length and a checksum of that length, and TensorFlow allocates whatever a
header with a valid checksum claims (2**40 bytes took the process down with
SIGSEGV, no message). Every record's length is checked against what the file
can still hold (for GZIP files, a ceiling per record and a bound on all the
bytes inflated) before anything is allocated, and every record's data
checksum (masked CRC32C, as TFRecord defines it) before it is handed out.
A record whose data checksum fails is given as a RecordError in its place,
and the records after it are read on: its header still says where the next
one starts. A header that cannot be trusted (or a file that ends, or GZIP
data that breaks) ends the file's readable records, with a reason: nothing
after it can be located.

Records are read in the main process; only the encoded image bytes travel on
to the reader processes.
"""
from __future__ import annotations

import os
import struct
import zlib
from typing import NamedTuple

import numpy as np

from ._tf import tf as _tf

IMAGE_KEY_FALLBACKS = ("image", "image/encoded")

# The most a record may claim. A GZIP file's records cannot be checked
# against its size, and a sparse file can claim a terabyte it does not hold;
# no encoded image a run could use comes near this (an uncompressed RGB
# image at Pillow's pixel limit is 256 MiB).
MAX_RECORD_BYTES = 256 << 20
# All the bytes a GZIP file may inflate to: this many times its own size, but
# at least GZIP_MIN_BUDGET. Records of encoded images barely compress; deflate
# itself can reach about 1032:1, which is what a bomb uses.
GZIP_MAX_RATIO = 100
GZIP_MIN_BUDGET = 1 << 30

_BLOCK = 1 << 20  # bytes read (or inflated) at a time
_BATCH_BYTES = 4 << 20  # records whose data checksums are checked together


class RecordError(ValueError):
    """Record `index` of a TFRecord file cannot be read, for `reason`.

    Raised, it ends the file's records: nothing after `index` can be found.
    Given in a record's place by read_records, only that record is lost.
    """

    def __init__(self, index: int, reason: str, checksum: bool = False):
        super().__init__(f"record {index}: {reason}")
        self.index = index
        self.reason = reason
        self.checksum = checksum  # its bytes fail a checksum (header or data), as bytes changed do


def unreachable(index: int, reason: str) -> str:
    """Why a record after `index` cannot be read: reading stopped there, for `reason`, before it was located."""
    return f"unreachable after record {index}: {reason}"


class _Unreadable(Exception):
    """The byte stream under the records broke (reason in args[0])."""


# -- CRC32C (Castagnoli), as TFRecord uses it ------------------------------------------

_POLY = 0x82F63B78
_MASK_DELTA = 0xA282EAD8
_LANE = 64  # bytes per lane: lanes are checksummed side by side, then combined
_tables = {}


def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


def _word_tables():
    """(lo, hi): four zero bytes fed to a state x give lo[x & 0xffff] ^ hi[x >> 16]."""
    if "word" not in _tables:
        t = _byte_table()
        v = np.arange(65536, dtype=np.uint32)
        halves = []
        for x in (v, v << np.uint32(16)):
            for _ in range(4):
                x = t[x & 0xFF] ^ (x >> np.uint32(8))
            halves.append(x)
        _tables["word"] = tuple(halves)
        _tables["word_lists"] = tuple(h.tolist() for h in halves)
        _tables["byte_list"] = t.tolist()
    return _tables["word"]


def _zeros_operator(level: int) -> np.ndarray:
    """(4, 256) tables that feed _LANE * 2**level zero bytes to a state, one per byte of it."""
    key = ("zeros", level)
    if key not in _tables:
        if level == 0:
            lo, hi = _word_tables()
            x = np.arange(256, dtype=np.uint32)[None, :] << (np.arange(4, dtype=np.uint32)[:, None] * 8)
            for _ in range(_LANE // 4):
                x = lo[x & 0xFFFF] ^ hi[x >> np.uint32(16)]
            _tables[key] = x
        else:
            half = _zeros_operator(level - 1)
            _tables[key] = _apply(half, half)
    return _tables[key]


def _apply(op: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The linear map `op` (from _zeros_operator) applied to every state in x."""
    return (op[0][x & 0xFF] ^ op[1][(x >> np.uint32(8)) & 0xFF]
            ^ op[2][(x >> np.uint32(16)) & 0xFF] ^ op[3][x >> np.uint32(24)])


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C of data, continuing from crc (plain Python, for short inputs)."""
    _word_tables()
    t = _tables["byte_list"]
    crc ^= 0xFFFFFFFF
    for b in bytes(data):
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _masked_length_crc(head: bytes) -> int:
    """masked_crc32c of a header's 8 length bytes, in a few steps (once per record)."""
    lo, hi = _tables["word_lists"]
    a, b = struct.unpack_from("<II", head)
    s = a ^ 0xFFFFFFFF
    s = lo[s & 0xFFFF] ^ hi[s >> 16] ^ b
    s = (lo[s & 0xFFFF] ^ hi[s >> 16]) ^ 0xFFFFFFFF
    return (((s >> 15) | (s << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def crc32c_many(buffers) -> np.ndarray:
    """CRC32C of each buffer, as uint32, computed side by side in NumPy.

    Each buffer is cut into lanes of _LANE bytes, right-aligned (leading zero
    bytes leave a zero state unchanged), with CRC32C's initial all-ones state
    folded into its first four bytes. All lanes of all buffers advance four
    bytes per step, then each buffer's lanes are combined pairwise with the
    operator that feeds a lane's worth of zeros. Several hundred MB/s here,
    where a byte loop in Python manages a few.
    """
    lo, hi = _word_tables()
    sizes = np.fromiter((len(b) for b in buffers), np.int64, len(buffers))
    out = np.zeros(len(buffers), np.uint32)
    short = np.flatnonzero(sizes < 4)
    for i in short.tolist():
        out[i] = crc32c(buffers[i])
    big = np.flatnonzero(sizes >= 4)
    if not len(big):
        return out
    lanes = -(-sizes[big] // _LANE)
    pads = lanes * _LANE - sizes[big]
    zeros = bytes(_LANE)
    # Joined straight into a bytearray (it is written below): one copy of the records, not two.
    joined = bytearray().join(x for i, p in zip(big.tolist(), pads.tolist()) for x in (zeros[:p], buffers[i]))
    flat = np.frombuffer(joined, np.uint8)
    firsts = np.concatenate(([0], np.cumsum(lanes)[:-1])) * _LANE + pads
    flat[(firsts[:, None] + np.arange(4)).ravel()] ^= 0xFF
    words = flat.view("<u4").reshape(-1, _LANE // 4)  # one lane a row; read down the columns
    state = np.zeros(len(words), np.uint32)
    a = np.empty_like(state)
    for j in range(_LANE // 4):
        state ^= words[:, j]
        np.bitwise_and(state, 0xFFFF, out=a)
        state >>= np.uint32(16)
        np.bitwise_xor(np.take(lo, a), np.take(hi, state), out=state)
    # Combine each buffer's lanes: buffers with up to 2**k lanes are padded
    # in front with zero lanes to 2**k and folded in k levels.
    ends = np.cumsum(lanes)
    levels = np.ceil(np.log2(lanes)).astype(np.int64)
    for k in np.unique(levels).tolist():
        rows = np.flatnonzero(levels == k)
        width = 1 << k
        grid = np.zeros((len(rows), width), np.uint32)
        n = lanes[rows]
        col = width - n
        # lane j of buffer r goes to column width - n_r + j
        r_idx = np.repeat(np.arange(len(rows)), n)
        j = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        src = np.repeat(ends[rows] - n, n) + j
        grid[r_idx, np.repeat(col, n) + j] = state[src]
        level = 0
        while grid.shape[1] > 1:
            grid = _apply(_zeros_operator(level), grid[:, 0::2]) ^ grid[:, 1::2]
            level += 1
        out[big[rows]] = grid[:, 0] ^ np.uint32(0xFFFFFFFF)
    return out


def _mask(crc: np.ndarray) -> np.ndarray:
    crc = crc.astype(np.uint64)
    return ((((crc >> np.uint64(15)) | (crc << np.uint64(17))) + np.uint64(_MASK_DELTA)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


# -- the bytes under the records -------------------------------------------------------

class _Source:
    """Bytes of a local file (a descriptor) or of an object in a bucket (a file object)."""

    def __init__(self, fd: int | None = None, fileobj=None, size: int | None = None):
        self.fd, self.fileobj = fd, fileobj
        self.size = os.fstat(fd).st_size if fd is not None else size

    def read(self, n: int) -> bytes:
        return os.read(self.fd, n) if self.fd is not None else self.fileobj.read(n)

    def readinto(self, view: memoryview) -> int:
        if self.fd is not None:
            return os.readv(self.fd, [view])
        if hasattr(self.fileobj, "readinto"):
            return self.fileobj.readinto(view) or 0
        got = self.fileobj.read(len(view))
        view[:len(got)] = got
        return len(got)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        else:
            self.fileobj.close()


class _Bytes:
    """A byte stream handed out in exact lengths: take(n), and take_own(n) for records of a buffer of their own."""

    _buf: bytes
    _pos: int

    def take(self, n: int) -> bytes:
        raise NotImplementedError

    def _fill(self, view: memoryview, have: int) -> int:
        """Fill view from `have` on, straight from the source; how many bytes it holds then."""
        raise NotImplementedError

    def take_own(self, n: int) -> memoryview:
        """take(n), in a buffer of its own that a large record is read (or inflated) straight into: no copy is made."""
        if n < _BLOCK:
            return memoryview(bytearray(self.take(n)))
        view = memoryview(bytearray(n))
        have = min(n, len(self._buf) - self._pos)
        view[:have] = self._buf[self._pos:self._pos + have]
        self._buf, self._pos = b"", 0
        return view[:self._fill(view, have)]


class _PlainBytes(_Bytes):
    """A file's bytes handed out in exact lengths, and how many are left."""

    def __init__(self, fd: "_Source"):
        self._fd = fd
        self.left = fd.size
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        pos = self._pos
        if pos + n <= len(self._buf):
            self._pos = pos + n
            self.left -= n
            return self._buf[pos:pos + n]
        parts = [self._buf[pos:]]
        have = len(parts[0])
        while have < n:
            chunk = self._fd.read(max(n - have, _BLOCK))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        buf = b"".join(parts)
        out = buf[:n]
        self._buf, self._pos = buf, len(out)
        self.left -= len(out)
        return out

    def _fill(self, view: memoryview, have: int) -> int:
        while have < len(view):
            got = self._fd.readinto(view[have:])
            if not got:
                break
            have += got
        self.left -= have
        return have


class _GzipBytes(_Bytes):
    """The inflated bytes of a GZIP file (members one after another), within a budget (None: no bound)."""

    left = None  # unknown until inflated

    def __init__(self, fd: "_Source", budget: int | None):
        self._fd = fd
        self._budget = budget
        self._inflated = 0
        self._z = zlib.decompressobj(31)
        self._started = False  # the current member has input
        self._in = b""
        self._buf = b""
        self._pos = 0

    def _more(self, want: int) -> list:
        out, got = [], 0
        while got < want:
            if not self._in:
                self._in = self._fd.read(1 << 16)
                if not self._in:
                    if self._started and not self._z.eof:
                        raise _Unreadable("the GZIP data is cut short (truncated file)")
                    break
            if self._z.eof:  # another member follows
                if self._in[:2] != b"\x1f\x8b":
                    raise _Unreadable("bytes after the end of the GZIP data")
                self._z = zlib.decompressobj(31)
            self._started = True
            try:
                chunk = self._z.decompress(self._in, max(want - got, 1 << 16))
            except zlib.error as e:
                raise _Unreadable(f"damaged GZIP data ({e})") from None
            self._in = self._z.unused_data if self._z.eof else self._z.unconsumed_tail
            self._inflated += len(chunk)
            if self._budget is not None and self._inflated > self._budget:
                raise _Unreadable(f"the GZIP data inflates to more than {self._budget} bytes "
                                  "(a decompression bomb?)")
            out.append(chunk)
            got += len(chunk)
        return out

    def take(self, n: int) -> bytes:
        pos = self._pos
        if pos + n <= len(self._buf):
            self._pos = pos + n
            return self._buf[pos:pos + n]
        rest = self._buf[pos:]
        buf = b"".join([rest, *self._more(n - len(rest))])
        out = buf[:n]
        self._buf, self._pos = buf, len(out)
        return out

    def _fill(self, view: memoryview, have: int) -> int:
        n = len(view)
        while have < n:
            data = b"".join(self._more(min(n - have, _BLOCK)))
            if not data:
                break
            used = min(len(data), n - have)  # zlib may give more than asked: the rest starts what follows
            view[have:have + used] = data[:used]
            have += used
            if used < len(data):
                self._buf, self._pos = data[used:], 0
        return have


def _open_bytes(path: str, compression_type: str, bound_inflated: bool):
    """(source, byte stream) of a regular file or a bucket's object; OSError for anything else.

    A local file is opened so that a FIFO or device is refused, never waited on.
    """
    from . import fs

    if fs.is_remote(path):
        fd = _Source(fileobj=fs.open_read(path), size=fs.size(path))
    else:
        from .images import open_regular

        fd = _Source(fd=open_regular(path))
    try:
        if (compression_type or "").upper() == "GZIP":
            budget = max(GZIP_MIN_BUDGET, GZIP_MAX_RATIO * fd.size) if bound_inflated else None
            return fd, _GzipBytes(fd, budget)
        return fd, _PlainBytes(fd)
    except BaseException:
        fd.close()
        raise


def _at(stream, offset: int) -> str:
    """Where a record starts, for a message: in the file, or in a GZIP file's inflated bytes."""
    return f"offset {offset}" if stream.left is not None else f"offset {offset} of the inflated data"


def _frames(stream, max_record_bytes: int, own: bool = False):
    """(data, stored masked data checksum, offset of its header) of each record; RecordError where framing fails.

    With `own`, each record's data is a memoryview of a buffer of its own (see take_own).

    A record's length is trusted only once its checksum matches, it fits in
    what the file still holds (when known) and is at most max_record_bytes.
    A framing error names where the record starts and what is lost with it,
    since no record after it can be located.
    """
    index = offset = 0
    take = stream.take
    _word_tables()

    def lost() -> str:
        left = stream.left
        if left is None:
            return "; nothing after it can be read"
        return f"; the {left} bytes after it cannot be read" if left else ""

    while True:
        try:
            head = take(12)
        except _Unreadable as e:
            raise RecordError(index, str(e)) from None
        if not head:
            return
        at = _at(stream, offset)
        if len(head) < 12:
            raise RecordError(index, f"the file ends inside the record header at {at} (truncated)")
        n, stored = struct.unpack("<QI", head)
        if _masked_length_crc(head) != stored:
            raise RecordError(index, f"damaged record header at {at} (length checksum mismatch){lost()}",
                              checksum=True)
        left = stream.left
        if left is not None and n + 4 > left:
            raise RecordError(index, f"the header at {at} claims {n} bytes but the file holds only "
                                     f"{max(0, left - 4)} more (truncated or damaged)")
        if n > max_record_bytes:
            raise RecordError(index, f"the header at {at} claims {n} bytes, more than the {max_record_bytes} "
                                     f"a record may have{lost()}")
        try:
            data = stream.take_own(n) if own else take(n)
            crc = take(4)
        except _Unreadable as e:
            raise RecordError(index, str(e)) from None
        except MemoryError:
            raise RecordError(index, f"a record of {n} bytes at {at} does not fit in memory{lost()}") from None
        if len(data) < n or len(crc) < 4:
            raise RecordError(index, f"the file ends inside the record at {at} (truncated)")
        yield data, crc, offset
        del data  # before the next record's buffer is made
        index += 1
        offset += 16 + n


def read_records(path: str, compression_type: str = "", check_data: bool = True,
                 max_record_bytes: int = MAX_RECORD_BYTES, bound_inflated: bool = True):
    """Each record of a TFRecord file in order: its bytes, or a RecordError in its place.

    A record whose data checksum fails is given as a RecordError (not
    raised), and the records after it are read on: one damaged image must
    not cost the good ones behind it. Raises RecordError (a ValueError with
    .index and .reason) where the framing fails, after giving every record
    before it; OSError if the file cannot be opened or is not a regular
    file. `check_data=False` skips the data checksums (files vouched for by
    a sha256) and gives each record as a memoryview of a buffer of its own,
    a large one read straight into it, so reading holds one record's bytes
    once; `max_record_bytes` caps each record, `bound_inflated` limits
    what a GZIP file may inflate to (GZIP_MAX_RATIO, GZIP_MIN_BUDGET).
    """
    source, stream = _open_bytes(path, compression_type, bound_inflated)
    try:
        if not check_data:
            for data, _, _ in _frames(stream, max_record_bytes, own=True):
                yield data
            return
        batch, crcs, offsets, size = [], [], [], 0
        frames = _frames(stream, max_record_bytes)
        ended = None
        done = 0
        while ended is None:
            try:
                for data, crc, offset in frames:
                    batch.append(data)
                    crcs.append(crc)
                    offsets.append(offset)
                    size += len(data) + 64
                    if size >= _BATCH_BYTES:
                        break
                else:
                    ended = True
            except RecordError as e:
                ended = e
            if batch:
                want = np.frombuffer(b"".join(crcs), "<u4")
                for i in np.flatnonzero(_mask(crc32c_many(batch)) != want).tolist():
                    batch[i] = RecordError(done + i, f"damaged record at {_at(stream, offsets[i])} "
                                                     "(data checksum mismatch)", checksum=True)
                yield from batch
                done += len(batch)
                batch, crcs, offsets, size = [], [], [], 0
        if isinstance(ended, RecordError):
            raise ended
    finally:
        source.close()


class Census(NamedTuple):
    """A TFRecord file read through once, as discovery needs it."""

    count: int  # records located: indices 0..count-1
    damaged: list  # a RecordError for each of those whose data is damaged
    end: str | None  # why no record can be located from index `count` on, or None (the file ended cleanly)


def census(path: str, compression_type: str) -> Census:
    """The records of a file: how many can be located, which of them are damaged, and why reading stopped early."""
    count, damaged = 0, []
    try:
        for record in read_records(path, compression_type):
            if isinstance(record, RecordError):
                damaged.append(record)
            count += 1
    except RecordError as e:
        return Census(count, damaged, f"corrupt TFRecord data: {e.reason}")
    except OSError as e:
        return Census(count, damaged, f"cannot read: {e.strerror or e}")
    return Census(count, damaged, None)


class RecordReader:
    """Reads record `index` of a file, assuming indices mostly come in order.

    Raises RecordError (a ValueError) for a record that cannot be read: a
    damaged one (the records after it are still read), or one that cannot
    be located because reading the file stopped before it. The stop is kept,
    so each later index of that file is refused at once instead of reading
    the file again from its start.
    """

    def __init__(self, compression_of):
        self._compression_of = compression_of
        self._path = None
        self._iter = None
        self._next = 0
        self._ended = None  # (RecordError of the record at self._next, reason for those after it)

    def _open(self, path: str) -> None:
        self._iter, self._ended = None, None
        self._path, self._next = path, 0
        try:
            self._iter = read_records(path, self._compression_of(path))
        except OSError as e:
            reason = f"cannot read: {e.strerror or e}"
            self._ended = (RecordError(0, reason), reason)

    def _refuse(self, index: int):
        error, later = self._ended
        return error if index == error.index else RecordError(index, later)

    def read(self, path: str, index: int) -> bytes:
        if path != self._path or index < self._next:
            self._open(path)
        if self._ended is not None:
            raise self._refuse(index)
        try:
            while True:
                record = next(self._iter)
                self._next += 1
                if self._next > index:
                    break
        except StopIteration:
            reason = "record missing (the file is shorter than when it was counted)"
            self._ended = (RecordError(self._next, reason), reason)
        except OSError as e:
            reason = f"cannot read: {e.strerror or e}"
            self._ended = (RecordError(self._next, reason), reason)
        except RecordError as e:
            self._ended = (e, unreachable(e.index, e.reason))
        else:
            if isinstance(record, RecordError):
                raise record
            return record
        self._iter = None
        raise self._refuse(index)


def _features(record: bytes):
    """The feature map of a serialized tf.train.Example; ValueError if it is not one."""
    _tf()  # imported as the command line imports it, before its proto module below
    from tensorflow.core.example.example_pb2 import Example  # tf.train.Example itself, without tf.train

    try:
        return Example.FromString(record).features.feature
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"not a tf.train.Example: {e}") from None


def feature_kinds(record: bytes) -> dict:
    """{feature name: "bytes_list", "float_list", "int64_list", or None for an empty one} of a tf.train.Example."""
    feats = _features(record)
    return {name: feats[name].WhichOneof("kind") for name in sorted(feats)}


def parse_example(record: bytes, image_key: str, label_key: str):
    """(encoded image bytes, label or -1) from a serialized tf.train.Example."""
    feats = _features(record)
    # The usual names stand in for each other; a key the user named is the only one read.
    keys = [image_key] + ([k for k in IMAGE_KEY_FALLBACKS if k != image_key] if image_key in IMAGE_KEY_FALLBACKS
                          else [])
    data = None
    for k in keys:
        if k in feats and feats[k].bytes_list.value:
            values = feats[k].bytes_list.value
            if len(values) != 1:  # which one is the image? Not ours to guess
                raise ValueError(f"its image feature {k!r} holds {len(values)} images, not one")
            data = values[0]
            break
    if data is None:
        raise ValueError(f"record has no bytes feature {image_key!r}")
    label = -1
    if label_key in feats and feats[label_key].WhichOneof("kind") == "int64_list":
        # A feature of bytes or floats under that name is no class number (a caption, a score): no label.
        feat = feats[label_key]
        count = len(feat.int64_list.value)
        if count > 1:
            raise ValueError(f"its label {label_key!r} holds {count} values, not one")
        if count:
            label = int(feat.int64_list.value[0])
            if label < -1:  # -1 is "no label"; any other negative number numbers nothing
                raise ValueError(f"its label {label} is negative")
    return data, label
