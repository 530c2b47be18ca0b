"""npz shards: `{split}-{i:05d}-of-{n:05d}.npz`, arrays logits, logdet, keys, labels.

Plain NumPy zip files (no pickle), readable with `np.load(f, allow_pickle=False)`.
The logits stream into their zip entry batch by batch, so a shard is written
in the memory of one batch, and read back in slices of a few megabytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tokenize
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import LogitifyError, ShardError
from ..fs import Writeback
from .base import FIELDS, ShardFormat, ShardWriter, check_chunk, chunk_rows, refuse_expanding

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
HEADER_MAX = 4096  # an .npy header is at most a few hundred bytes
KEY_CHARS_MAX = 4096  # longest key a reader accepts (keys are paths)
# The dtype each member must have: what the writer writes, nothing a reader must convert.
DTYPES = {"logits": np.dtype("<f4"), "logdet": np.dtype("<f4"), "labels": np.dtype("<i8")}
TF_SLICE_BYTES = 16 << 20  # logits per slice tf_dataset hands to the graph
# A batch's logits go into the zip a piece at a time: the zip's CRC brings
# each piece into the core's cache, where the sha256 and the kernel's copy
# find it (a 12 MB batch at once meant three trips to memory). 600 MB of
# logits took 1.2-1.4 s of CPU in 1 MiB pieces against 2.6-3.1 s whole.
WRITE_PIECE = 1 << 20


class HashingWriter:
    """A write-only, unseekable file that hashes what passes through.

    zipfile then streams entries with data descriptors instead of seeking
    back, so the shard's sha256 is known the moment it is written, with no
    second read of the file.
    """

    PARALLEL_BYTES = WRITE_PIECE  # a full piece is written by a helper thread while this one hashes it

    def __init__(self, fd: int):
        self._f = os.fdopen(fd, "wb")
        self.sha256 = hashlib.sha256()
        self._pos = 0
        self._io = None
        self._writeback = Writeback(fd)

    def write(self, b):
        """Hash and write; a large buffer is written by a helper thread while this one hashes it.

        Both release the GIL, and the kernel's copy into the page cache costs
        as much as the hash, so a shard's tail is written in about half the time.
        """
        n = memoryview(b).nbytes
        if n < self.PARALLEL_BYTES:
            self.sha256.update(b)
            written = self._f.write(b)
        else:
            if self._io is None:
                self._io = ThreadPoolExecutor(1, thread_name_prefix="shard-write")
            pending = self._io.submit(self._f.write, b)
            try:
                self.sha256.update(b)
            finally:
                written = pending.result()
        self._pos += written
        self._writeback.wrote(written)
        return written

    def tell(self):
        return self._pos

    def seek(self, *args):
        raise OSError("not seekable")

    def seekable(self):
        return False

    def flush(self):
        self._f.flush()

    def fileno(self):
        return self._f.fileno()

    def close(self):
        if self._io is not None:
            self._io.shutdown()
            self._io = None
        self._f.close()


class NpzShardWriter(ShardWriter):
    """Logits stream straight into the zip, under a header that says how many examples there are.

    The header is written for the count the shard was opened for. When
    fewer examples come (inputs that could not be read), the shard is
    written again from that draft with the right count, so its bytes are
    those of a shard opened for what it holds; only such shards pay for it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._logdet, self._keys, self._labels = [], [], []
        self._raw = HashingWriter(self.take_fd())
        self._zip = zipfile.ZipFile(self._raw, "w")
        self._entry = self._open_entry("logits.npy")
        header = {"descr": "<f4", "fortran_order": False, "shape": (self.expected,) + self.shape}
        np.lib.format.write_array_header_1_0(self._entry, header)

    def add(self, keys, labels, logits, logdet):
        if self.count + len(keys) > self.expected:
            raise ValueError("more examples than the shard was opened for")
        data = np.ascontiguousarray(logits, dtype="<f4").reshape(-1).view(np.uint8)
        for start in range(0, len(data), WRITE_PIECE):
            self._entry.write(data[start:start + WRITE_PIECE])
        self._logdet.append(np.asarray(logdet, dtype="<f4"))
        # Packed per batch (one string, its lengths): a string object per key cost ~70 bytes a key.
        self._keys.append(("".join(keys), np.fromiter(map(len, keys), np.int64, len(keys))))
        self._labels.append(np.array([int(v) for v in labels], dtype="<i8"))
        self.count += len(keys)

    def _open_entry(self, name):
        info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
        info.compress_type = zipfile.ZIP_DEFLATED if self.compress else zipfile.ZIP_STORED
        info.create_system = 3
        info.external_attr = 0o644 << 16
        return self._zip.open(info, "w", force_zip64=True)

    def _array(self, name, arr):
        with self._open_entry(name + ".npy") as f:
            np.lib.format.write_array(f, arr, allow_pickle=False)

    def _finish(self):
        if self.count < self.expected:
            return self._again()
        self._entry.close()
        logdet = np.concatenate(self._logdet) if self._logdet else np.zeros(0, "<f4")
        self._array("logdet", logdet)
        self._keys_member()
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, "<i8")
        self._array("labels", labels.reshape(-1))
        self._zip.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        return self._raw.sha256.hexdigest()

    def _keys_member(self):
        """keys.npy as np.save writes np.array(keys, dtype=str), a batch of rows at a time.

        The whole array takes 4 bytes per character of the longest key for
        every key: 32 MB for a shard of 350,000 short paths.
        """
        width = max((int(lengths.max()) for _, lengths in self._keys if len(lengths)), default=1)
        dtype = np.dtype(f"<U{width}")
        with self._open_entry("keys.npy") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                     "fortran_order": False, "shape": (self.count,)})
            for text, lengths in self._keys:
                ends = np.cumsum(lengths).tolist()
                rows = [text[a:b] for a, b in zip([0] + ends[:-1], ends)]
                f.write(np.array(rows, dtype=dtype).tobytes())

    def _again(self):
        """Write the shard once more for the examples it got, its logits read back from this draft."""
        self._entry.close()
        self._zip.close()
        self._raw.close()
        draft = self.tmp + "0"  # still a temporary name of this run's (.NAME.tmp-DIGITS)
        os.replace(self.tmp, draft)
        try:
            fresh = NpzShardWriter(self.format, self.out_dir, self.file, self.shape, self.count, self.compress)
            try:
                with zipfile.ZipFile(draft) as z, z.open("logits.npy") as f:
                    _npy_header(f, self.file, "logits")
                    left = self.count * 4 * int(np.prod(self.shape))
                    while left:
                        piece = f.read(min(left, READ_PIECE))
                        if not piece:
                            raise OSError(f"{draft}: the draft of the shard ended early")
                        fresh._entry.write(piece)
                        left -= len(piece)
                fresh._logdet, fresh._keys, fresh._labels = self._logdet, self._keys, self._labels
                fresh.count = self.count
                digest = fresh._finish()
                self._made = fresh._made  # the temporary name now holds the fresh writer's file
                return digest
            except BaseException:
                fresh.abort()
                raise
        finally:
            try:
                os.unlink(draft)
            except FileNotFoundError:
                pass

    def abort(self):
        for f in (self._entry, self._zip, self._raw):
            try:
                f.close()
            except Exception:
                pass
        super().abort()


def _npy_header(f, name: str, member: str):
    """(shape, dtype) of an .npy stream, refusing pickles and Fortran order."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=HEADER_MAX)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=HEADER_MAX)
        else:
            raise ValueError(f"npy version {version}")
    except (ValueError, SyntaxError, EOFError, OSError, TypeError, RecursionError, tokenize.TokenError) as e:
        # NumPy parses the header dict with Python's tokenizer and literal_eval: a damaged one can fail in any of these
        raise ShardError(name, f"{member} is not a NumPy array ({e})") from None
    if dtype.hasobject:
        raise ShardError(name, "holds object (pickled) arrays, refused")
    if fortran:
        raise ShardError(name, f"{member} is in Fortran order")
    return shape, dtype


READ_PIECE = 8 << 20


def _read_exact(f, n: int, name: str, member: str) -> bytearray:
    """n bytes of a member, read into one buffer a piece at a time (zipfile's read(n) holds n twice or more)."""
    data = bytearray(n)
    view = memoryview(data)
    got = 0
    while got < n:
        k = f.readinto(view[got:got + READ_PIECE])
        if not k:
            raise ShardError(name, f"{member} is truncated")
        got += k
    return data


ALIGN = 64  # what TensorFlow takes as it is, without a copy of its own


class StoredMember:
    """A stored (not deflated) zip member read straight from the file into 64-byte aligned arrays.

    zipfile copies every read through its own buffers, and a bytearray is
    not aligned as TensorFlow wants, so the loader paid two copies of every
    slice; this reads each slice once, with readinto at the member's offset.
    The CRC-32 is checked as zipfile checks it: the whole member, header and
    tail included, before the last slice is handed over.
    """

    def __init__(self, path: str, info: zipfile.ZipInfo, name: str, member: str):
        self.name, self.member, self.info = name, member, info
        self._raw = open(path, "rb", buffering=0)
        try:
            self._raw.seek(info.header_offset)
            local = self._read(30)  # zipfile's open() has checked this header's signature and name
            self.start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") \
                + int.from_bytes(local[28:30], "little")
            self._raw.seek(self.start)
        except BaseException:
            self._raw.close()
            raise
        self._crc, self._done = 0, 0

    @staticmethod
    def usable(info: zipfile.ZipInfo) -> bool:
        """Stored, not encrypted, and its size said the same way twice."""
        return info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1 \
            and info.compress_size == info.file_size

    def _read(self, n: int, into=None):
        buf = np.empty(n + ALIGN, np.uint8) if into is None else into
        if into is None:
            buf = buf[-buf.ctypes.data % ALIGN:][:n]
        view, got = memoryview(buf).cast("B"), 0
        while got < n:
            k = self._raw.readinto(view[got:got + READ_PIECE])
            if not k:
                raise ShardError(self.name, f"{self.member} is truncated")
            got += k
        return buf

    def skip(self, n: int) -> None:
        """The first n bytes (the .npy header, which zipfile's stream has parsed), into the CRC only."""
        self._crc = zlib.crc32(self._read(n), self._crc)
        self._done += n

    def read(self, n: int) -> np.ndarray:
        """The next n bytes as a 64-byte aligned uint8 array; at the member's end its CRC is checked."""
        buf = self._read(n)
        self._crc = zlib.crc32(buf, self._crc)
        self._done += n
        return buf

    def finish(self) -> None:
        """Whatever the member holds past the arrays goes into the CRC too; then the CRC must match."""
        tail = self.info.file_size - self._done
        if tail:
            self._crc = zlib.crc32(self._read(tail), self._crc)
        if self._crc != self.info.CRC:
            raise ShardError(self.name, f"unreadable (Bad CRC-32 for file '{self.member}')")

    def close(self) -> None:
        self._raw.close()


class NpzFormat(ShardFormat):
    name = "npz"
    template = "{split}-{index:05d}-of-{count:05d}.npz"
    glob = "*-?????-of-?????.npz"

    def writer(self, out_dir, file, shape, count, compress):
        return NpzShardWriter(self, out_dir, file, shape, count, compress)

    def read_fields(self, path, shape, count, compressed, fields, rows=None):
        return self.read_chunks(path, shape, count, compressed, rows, fields=tuple(fields))

    def read_chunks(self, path, shape, count, compressed, rows=None, fields=FIELDS):
        """The arrays wanted a slice at a time, each read in step with the others; the rest not at all.

        Every header is checked against the manifest's promise before any
        data is read, a member compressed to less than its size is read only
        where an example fits in EXPANDING_EXAMPLE_MAX, and no array is ever
        read whole: memory follows the slice, whatever the file claims.
        """
        name = os.path.basename(path)
        shape = tuple(shape)
        dims = int(np.prod(shape))
        # What each member may hold at the most, from the manifest's promise:
        # a small deflated file that claims more is refused before it is inflated.
        limits = {"logits": HEADER_MAX + 4 * dims * count, "logdet": HEADER_MAX + 4 * count,
                  "labels": HEADER_MAX + 8 * count, "keys": HEADER_MAX + 4 * KEY_CHARS_MAX * count}
        try:
            size = os.path.getsize(path)
            with zipfile.ZipFile(path) as z, contextlib.ExitStack() as stack:
                members = {i.filename: i for i in z.infolist()}
                missing = [f for f in FIELDS if f + ".npy" not in members]
                if missing:
                    raise ShardError(name, f"missing arrays {', '.join(missing)}")
                for field in FIELDS:
                    info = members[field + ".npy"]
                    if info.header_offset + info.compress_size > size:
                        raise ShardError(name, f"{field} runs past the end of the file")
                if members["logits.npy"].compress_type != zipfile.ZIP_STORED and count and "logits" in fields:
                    refuse_expanding(name, shape)
                streams, dtypes, left = {}, {}, {}
                for field in FIELDS:
                    f = streams[field] = stack.enter_context(z.open(field + ".npy"))
                    shp, dtype = _npy_header(f, name, field)
                    want = (count,) + shape if field == "logits" else (count,)
                    if field == "keys":
                        ok = dtype.kind == "U" and dtype.byteorder in "<=|" and 0 < dtype.itemsize <= 4 * KEY_CHARS_MAX
                        dtype = dtype.newbyteorder("<") if ok else dtype
                    else:
                        ok = dtype == DTYPES[field]
                    if not ok or tuple(shp) != want:
                        if field == "logits" and ok and tuple(shp[1:]) == shape and len(shp) == 4:
                            raise ShardError(name, f"holds {shp[0]} examples, manifest says {count}")
                        if field == "logits":
                            raise ShardError(name, f"logits are {dtype} {list(shp)}, "
                                                f"expected float32 [n, {', '.join(map(str, shape))}]")
                        raise ShardError(name, f"{field} is {dtype} {list(shp)}, "
                                            f"not one per example ({count})")
                    # After its header (a few hundred bytes, read whatever the member claims), so a
                    # member of the wrong dtype is named as such; before any of its data.
                    if members[field + ".npy"].file_size > limits[field]:
                        raise ShardError(name, f"{field} holds more than the manifest's "
                                            f"{count} examples of {list(shape)} allow")
                    dtypes[field] = dtype
                    left[field] = members[field + ".npy"].file_size - f.tell()
                step = chunk_rows(shape, extra=4 + 8 + dtypes["keys"].itemsize)
                step = min(step, rows) if rows else step
                info = members["logits.npy"]
                stored = None
                if count and "logits" in fields and StoredMember.usable(info):
                    stored = stack.enter_context(contextlib.closing(StoredMember(path, info, name, "logits.npy")))
                    stored.skip(info.file_size - left["logits"])
                for a in range(0, count, step):
                    n = min(count, a + step) - a
                    out = {}
                    for field in fields:
                        dtype = dtypes[field]
                        per = dtype.itemsize * (dims if field == "logits" else 1)
                        if n * per > left[field]:  # the member ends first: no buffer for what is not there
                            raise ShardError(name, f"{field} is truncated")
                        left[field] -= n * per
                        if field == "logits" and stored is not None:
                            data = stored.read(n * per)
                            if a + n == count:
                                stored.finish()
                            arr = data.view(dtype)
                        else:
                            data = _read_exact(streams[field], n * per, name, field)
                            arr = np.frombuffer(data, dtype)
                        out[field] = arr.reshape((n,) + shape) if field == "logits" else arr
                    yield check_chunk(name, out, shape)
                    del out, data, arr  # before the next slice is read: one at a time
        except LogitifyError:
            raise
        except (OSError, zipfile.BadZipFile, EOFError, KeyError, ValueError, RuntimeError, OverflowError,
                MemoryError) as e:
            raise ShardError(name, f"unreadable ({e})") from None

    def max_bytes(self, shape, count):
        per_example = 4 * int(np.prod(shape)) + 4 + 8 + 4 * KEY_CHARS_MAX
        return (1 << 20) + 4 * HEADER_MAX + count * per_example * 101 // 100  # deflate may add a little

    def tf_slices(self, files, shape, compressed, fields, rows=None):
        return self.tf_dataset(files, shape, compressed, batched=True, fields=fields, rows=rows)

    def tf_dataset(self, files, shape, compressed, batched=False, fields=None, rows=None):
        """Whole slices of each shard go into the graph, then are split into examples.

        batched=True hands over the slices themselves (dicts of [n, ...] tensors,
        n <= rows, about TF_SLICE_BYTES of logits unless `rows` says), for callers
        that work on whole slices and unbatch last; `fields` names the components
        wanted (default all four), so a key is encoded only when asked for.
        """
        from .._tf import tf as _tf

        tf = _tf()
        h, w, c = shape
        counts = list(files.values()) if isinstance(files, dict) else None
        paths = list(files)
        fields = tuple(fields or ("logits", "logdet", "key", "label"))
        rows = rows or chunk_rows(shape, TF_SLICE_BYTES)
        fmt = self

        def utf8(keys):
            if not len(keys):
                return np.zeros(0, "S1")
            try:
                return keys.astype("S")  # plain ASCII keys (most), in one C loop
            except UnicodeEncodeError:
                return np.char.encode(keys, "utf-8", "surrogatepass")

        take = {"logits": lambda d: d["logits"], "logdet": lambda d: d["logdet"],
                "key": lambda d: utf8(d["keys"]), "label": lambda d: d["labels"]}

        def gen():
            for i, path in enumerate(paths):
                count = counts[i] if counts else _count_npz(path)
                for d in fmt.read_chunks(path, shape, count, compressed, rows=rows):
                    yield {f: take[f](d) for f in fields}

        spec = {
            "logits": tf.TensorSpec([None, h, w, c], tf.float32),
            "logdet": tf.TensorSpec([None], tf.float32),
            "key": tf.TensorSpec([None], tf.string),
            "label": tf.TensorSpec([None], tf.int64),
        }
        ds = tf.data.Dataset.from_generator(gen, output_signature={f: spec[f] for f in fields})
        return ds if batched else ds.unbatch()


def _count_npz(path: str) -> int:
    with zipfile.ZipFile(path) as z, z.open("logits.npy") as f:
        shp, _ = _npy_header(f, os.path.basename(path), "logits")
        return int(shp[0])
