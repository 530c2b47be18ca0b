"""Sinks: where batches go. One class per output format, beside its siblings.

Shard sinks (encode) write a shard under a temporary name and rename it only
when whole, so a file under a final name is always complete. Their bytes
depend only on the examples given to them: no timestamps, sorted proto maps.
Image sinks (decode) write PNGs or uint8 npz files inside one folder and
nowhere else.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .tfrecord_io import ExampleWriter

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_rename(tmp: str, final: str, synced: bool = False) -> None:
    if not synced:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, final)


def temp_name(path: str) -> str:
    d, b = os.path.split(path)
    return os.path.join(d, f".{b}.tmp-{os.getpid()}")


class HashingWriter:
    """A write-only, unseekable file that hashes what passes through.

    zipfile then streams entries with data descriptors instead of seeking
    back, so the shard's sha256 is known the moment it is written, with no
    second read of the file.
    """

    PARALLEL_BYTES = 1 << 20

    def __init__(self, path):
        self._f = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self._pos = 0
        self._io = None

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


class ShardSink:
    """Base of the shard writers: collect a shard's examples, write, rename."""

    format: str = ""

    def __init__(self, out_dir, index, count, shape, name="logitify", split="train", compress=False):
        self.out_dir = out_dir
        self.shape = tuple(shape)
        self.compress = compress
        self.file = self.shard_name(name, split, index, count)
        self.path = os.path.join(out_dir, self.file)
        self.tmp = temp_name(self.path)
        self.count = 0

    @staticmethod
    def shard_name(name, split, index, count) -> str:
        raise NotImplementedError

    def add(self, keys, labels, logits, logdet) -> None:
        raise NotImplementedError

    def _write(self) -> None:
        raise NotImplementedError

    def close(self) -> dict:
        try:
            digest = self._write()
            _fsync_rename(self.tmp, self.path, synced=digest is not None)
        except BaseException:
            self.abort()
            raise
        return {"file": self.file, "num_examples": self.count, "sha256": digest or file_sha256(self.path)}

    def abort(self) -> None:
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

    @staticmethod
    def write_metadata(out_dir, manifest) -> list:
        """Format-specific files beside the manifest; returns their names."""
        return []


class NpzShardSink(ShardSink):
    """{split}-{i:05d}-of-{n:05d}.npz: logits, logdet, keys, labels.

    The number of examples is known when the shard is opened, so the logits
    stream straight into the zip entry and memory stays at one batch.
    """

    format = "npz"

    def __init__(self, *args, count: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.expected = count
        self._logdet, self._keys, self._labels = [], [], []
        self._raw = HashingWriter(self.tmp)
        self._zip = zipfile.ZipFile(self._raw, "w")
        self._entry = self._open_entry("logits.npy")
        header = {"descr": "<f4", "fortran_order": False, "shape": (count,) + self.shape}
        np.lib.format.write_array_header_1_0(self._entry, header)

    @staticmethod
    def shard_name(name, split, index, count):
        return f"{split}-{index:05d}-of-{count:05d}.npz"

    def add(self, keys, labels, logits, logdet):
        if self.count + len(keys) > self.expected:
            raise ValueError("more examples than the shard was opened for")
        self._entry.write(np.ascontiguousarray(logits, dtype="<f4").data)
        self._logdet.append(np.asarray(logdet, dtype="<f4"))
        self._keys.extend(keys)
        self._labels.extend(int(v) for v in labels)
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

    def _write(self):
        if self.count != self.expected:
            raise ValueError(f"shard opened for {self.expected} examples got {self.count}")
        self._entry.close()
        logdet = np.concatenate(self._logdet) if self._logdet else np.zeros(0, "<f4")
        self._array("logdet", logdet)
        keys = np.array(self._keys, dtype=str) if self._keys else np.zeros(0, dtype="<U1")
        self._array("keys", keys)
        self._array("labels", np.array(self._labels, dtype="<i8").reshape(-1))
        self._zip.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        return self._raw.sha256.hexdigest()

    def abort(self):
        for f in (self._entry, self._zip, self._raw):
            try:
                f.close()
            except Exception:
                pass
        super().abort()


class TfrecordShardSink(ShardSink):
    """{name}-{split}.tfrecord-{i:05d}-of-{n:05d}: one tf.train.Example per image."""

    format = "tfrecord"

    def __init__(self, *args, count: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        from ._tf import tf

        self.tf = tf()
        options = self.tf.io.TFRecordOptions(compression_type="GZIP" if self.compress else "")
        self._writer = self.tf.io.TFRecordWriter(self.tmp, options)
        self._examples = ExampleWriter(int(np.prod(self.shape)) * 4)

    @staticmethod
    def shard_name(name, split, index, count):
        return f"{name}-{split}.tfrecord-{index:05d}-of-{count:05d}"

    def add(self, keys, labels, logits, logdet):
        logits = np.ascontiguousarray(logits, dtype="<f4")
        logdet = np.ascontiguousarray(logdet, dtype="<f4")
        serialize, write = self._examples.serialize, self._writer.write
        for i, key in enumerate(keys):
            write(serialize(key.encode("utf-8", "surrogatepass"), int(labels[i]), logdet[i].tobytes(), logits[i].data))
        self.count += len(keys)

    def _write(self):
        self._writer.close()

    def abort(self):
        try:
            self._writer.close()
        except Exception:
            pass
        super().abort()

    @staticmethod
    def write_metadata(out_dir, manifest):
        if manifest.get("compressed"):
            return []  # TFDS reads only plain TFRecords; our own loader reads GZIP
        from .tfds_meta import write_tfds_metadata

        return write_tfds_metadata(out_dir, manifest)


SHARD_SINKS = {cls.format: cls for cls in (NpzShardSink, TfrecordShardSink)}


# -- decode side -------------------------------------------------------------------

IMAGE_SUFFIXES = frozenset(
    ".png .jpg .jpeg .jpe .jfif .bmp .dib .gif .webp .tif .tiff .ppm .pgm .pbm .pnm".split()
)


def key_relpath(key: str) -> str:
    """A key as a relative path inside the output folder, or ValueError.

    Keys come from manifests written by strangers: empty keys, NUL,
    absolute paths and '..' components are refused rather than cleaned up.
    Only '/' separates folders: on POSIX '\\' and ':' are ordinary
    characters of a name (the key 'a\\b.png' is one file, 'c:x.png' a file
    in the output folder). On Windows '\\' separates too, drives and device
    names (CON, NUL, COM1, ...) are refused, and any other ':' becomes '_'
    (it would name an NTFS stream; TFRecord keys are FILE:INDEX).
    """
    if not isinstance(key, str) or not key:
        raise ValueError("empty key")
    if "\0" in key:
        raise ValueError("key contains a NUL byte")
    text = key
    if os.name == "nt":
        text = key.replace("\\", "/")
        if len(text) > 1 and text[1] == ":" and text[0].isalpha():
            raise ValueError("key is an absolute path")
        text = text.replace(":", "_")
    if text.startswith("/"):
        raise ValueError("key is an absolute path")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise ValueError("key climbs out of the output folder ('..')")
    if os.name == "nt":
        devices = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10))}
        if any(p.split(".")[0].rstrip(" ").upper() in devices for p in parts):
            raise ValueError("key names a Windows device (CON, NUL, COM1, ...)")
    return "/".join(parts)


def png_relpath(key: str) -> str:
    rel = key_relpath(key)
    stem, ext = os.path.splitext(rel)
    if ext.lower() in IMAGE_SUFFIXES and not stem.endswith("/") and os.path.basename(stem):
        return stem + ".png"
    return rel + ".png"


def inside(root: str, path: str) -> bool:
    root = os.path.realpath(root)
    return os.path.realpath(path).startswith(root + os.sep)


class PngImageSink:
    """Lossless PNGs at each key, '.png' for the extension, class folders kept."""

    format = "png"

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self._taken = set()
        self._dirs = {}  # parent folder -> checked to lie inside out_dir

    def target(self, key: str) -> str:
        """The file a key goes to; ValueError if it would leave the folder."""
        rel = png_relpath(key)
        if rel in self._taken:  # e.g. a.jpg and a.png both in the input
            rel = key_relpath(key) + ".png"
            if rel in self._taken:
                raise ValueError(f"two keys map to the same file {rel!r}")
        path = os.path.join(self.out_dir, rel)
        parent = os.path.dirname(path)
        ok = self._dirs.get(parent)
        if ok is None:
            os.makedirs(parent, exist_ok=True)
            ok = self._dirs[parent] = parent == self.out_dir or inside(self.out_dir, os.path.join(parent, "x"))
        if not ok:
            raise ValueError("key leads outside the output folder through a link")
        self._taken.add(rel)
        return path

    def close(self):
        return None


def write_png(path: str, image: np.ndarray) -> None:
    """Encode in memory, then one write: a failed write leaves no file behind.

    (A rename per image would double the cost of small files; a PNG cut by
    SIGKILL is caught by its own CRC and rewritten by running decode again.)
    """
    import io

    from PIL import Image

    arr = image[:, :, 0] if image.shape[2] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    try:
        with open(path, "wb") as f:
            f.write(buf.getbuffer())
    except BaseException:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


class NpzImageSink:
    """images-{i:05d}-of-{n:05d}.npz per shard: uint8 images, keys, labels."""

    format = "npz"

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def write_shard(self, index, count, images, keys, labels) -> str:
        name = f"images-{index:05d}-of-{count:05d}.npz"
        path = os.path.join(self.out_dir, name)
        tmp = temp_name(path)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, keys=np.array(keys, dtype=str) if keys else np.zeros(0, "<U1"),
                         labels=np.asarray(labels, dtype="<i8"))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return name
