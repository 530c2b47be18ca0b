"""What every shard format provides, and the checks every reader shares."""
from __future__ import annotations

import fnmatch
import hashlib
import os

import numpy as np

from ..errors import LogitifyError, ShardError

# Examples a reader hands over at a time: whole shards can be gigabytes, so
# readers work through them in slices of about this many bytes of logits.
CHUNK_BYTES = 16 << 20
# A compressed shard (deflated npz member, GZIP TFRecord) can claim anything:
# a 1 MB file inflates to gigabytes. One example of a compressed shard is
# read only up to this many bytes of logits (a 4096x4096x2 image); larger
# ones are refused before anything is inflated. Uncompressed shards hold
# what they claim on disk, so their examples are read whatever their size.
EXPANDING_EXAMPLE_MAX = 128 << 20


def temp_name(path: str) -> str:
    """Where a file is written before it is renamed into place."""
    d, b = os.path.split(path)
    return os.path.join(d, f".{b}.tmp-{os.getpid()}")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def chunk_rows(shape, chunk_bytes: int | None = None, extra: int = 0) -> int:
    """Examples per chunk for logits of this shape (and `extra` bytes more per example).

    Without `chunk_bytes`, CHUNK_BYTES as it is at the call (the tests shrink it
    to prove that results do not depend on the slices).
    """
    return max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * int(np.prod(shape)) + extra))


def refuse_expanding(name: str, shape) -> None:
    """ShardError if one example of this shape is more than a compressed shard may inflate to."""
    nbytes = 4 * int(np.prod(shape))
    if nbytes > EXPANDING_EXAMPLE_MAX:
        raise ShardError(
            name, f"its examples would inflate to {nbytes / 1e6:.0f} MB of logits each "
            f"({'x'.join(map(str, shape))}); logitify inflates at most {EXPANDING_EXAMPLE_MAX >> 20} MiB per "
            "example from a compressed shard")


FIELDS = ("logits", "logdet", "keys", "labels")  # what read_chunks gives, all of them unless fewer are asked for


def check_chunk(name: str, out: dict, shape) -> dict:
    """A chunk's arrays (those it has of FIELDS) have the dtypes and shapes the manifest promises, or ShardError."""
    first = next(iter(out.values()))
    n = first.shape[0] if first.ndim else -1
    if "logits" in out and (out["logits"].dtype != np.float32 or out["logits"].shape[1:] != tuple(shape)):
        raise ShardError(name, f"logits are {out['logits'].dtype} {list(out['logits'].shape)}, "
                               f"expected float32 [n, {', '.join(map(str, shape))}]")
    if "logdet" in out and (out["logdet"].dtype != np.float32 or out["logdet"].shape != (n,)):
        raise ShardError(name, f"logdet is not float32 [{n}]")
    if "keys" in out and (out["keys"].dtype.kind != "U" or out["keys"].shape != (n,)):
        raise ShardError(name, f"keys are not strings [{n}]")
    if "labels" in out and (out["labels"].dtype != np.int64 or out["labels"].shape != (n,)):
        raise ShardError(name, f"labels are not int64 [{n}]")
    return out


class ShardWriter:
    """Writes one shard under a temporary name and renames it only when whole.

    A file under a final name is therefore always complete. Bytes depend only
    on the examples given: no timestamps, fixed field order, and not on the
    count the shard was opened for (`count`, the most it may hold).

    The temporary file is made here, new (fs.create_new: a link at its name
    is removed, not written through), and `fd` held open: a format writes
    through it (take_fd), or its library opens the name itself. Either way
    the name must still be that file when it is renamed into place.
    """

    def __init__(self, fmt: "ShardFormat", out_dir: str, file: str, shape, count: int, compress: bool):
        from ..fs import create_new

        self.format = fmt
        self.out_dir = out_dir
        self.shape = tuple(shape)
        self.compress = compress
        self.file = file
        self.path = os.path.join(out_dir, file)
        self.tmp = temp_name(self.path)
        self.expected = count
        self.count = 0
        self.fd = create_new(self.tmp)
        made = os.fstat(self.fd)
        self._made = (made.st_dev, made.st_ino)

    def take_fd(self) -> int:
        """The temporary file's descriptor, for a writer that then owns (and closes) it."""
        fd, self.fd = self.fd, None
        return fd

    def add(self, keys, labels, logits, logdet) -> None:
        raise NotImplementedError

    def _finish(self) -> str | None:
        """Close the temporary file; return its sha256 if known (and the file synced)."""
        raise NotImplementedError

    def close(self) -> dict:
        """Finish, sync and rename the shard. It may hold fewer examples than it was opened for
        (inputs that could not be read): a format whose bytes depend on the count sets it right."""
        try:
            if self.count > self.expected:
                raise ValueError(f"shard opened for {self.expected} examples got {self.count}")
            digest = self._finish()
            now = os.lstat(self.tmp)
            if (now.st_dev, now.st_ino) != self._made:  # a link or file put at the name: never renamed into place
                raise LogitifyError(f"{self.tmp}: the temporary shard was replaced while it was written")
            if digest is None:  # a library wrote by the name: synced through the descriptor held since
                os.fsync(self.fd)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        finally:
            self._close_fd()
        return {"file": self.file, "num_examples": self.count, "sha256": digest or file_sha256(self.path)}

    def _close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.take_fd())

    def abort(self) -> None:
        self._close_fd()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class ShardFormat:
    """One shard format. Subclasses set the class attributes and the methods."""

    name: str = ""
    template: str = ""  # str.format with name, split, index, count; the index in decimal, set off from other digits
    glob: str = ""  # fnmatch pattern every shard file name of this format matches
    metadata_names: tuple = ()  # every name write_metadata() may ever write
    record_checksums: bool = False  # checksums per record, beyond the file's sha256 (read_chunks' `records`)

    def shard_file(self, name: str, split: str, index: int, count: int) -> str:
        return self.template.format(name=name, split=split, index=index, count=count)

    def owns(self, file: str) -> bool:
        """Whether a file name is one this format writes: a shard name or its metadata.

        --overwrite removes what a manifest names only when the name also has
        this shape, so a manifest cannot send it after a user's other files.
        """
        return (bool(file) and "/" not in file and os.sep not in file
                and (fnmatch.fnmatchcase(file, self.glob) or file in self.metadata_names))

    def writer(self, out_dir: str, file: str, shape, count: int, compress: bool) -> ShardWriter:
        raise NotImplementedError

    def read_chunks(self, path: str, shape, count: int, compressed: bool, rows: int | None = None):
        """Dicts of NumPy arrays (logits, logdet, keys, labels), `rows` examples at a time.

        Never holds more than one chunk, and never reads more than `count`
        examples of `shape` promise: a shard that says otherwise is refused.
        A format with record_checksums also takes `records=True` (verify's):
        check the checksums it keeps per record too.
        """
        raise NotImplementedError

    def read_fields(self, path: str, shape, count: int, compressed: bool, fields, rows: int | None = None):
        """read_chunks' dicts with only `fields` (of FIELDS, in its order), for passes that need the keys alone.

        This default reads every array and drops the rest; a format that
        keeps the logits apart from the keys leaves them unread.
        """
        for chunk in self.read_chunks(path, shape, count, compressed, rows):
            yield {f: chunk[f] for f in fields}

    def tf_dataset(self, files: list, shape, compressed: bool):
        """A tf.data.Dataset of dicts {logits, logdet, key, label}, one per example."""
        raise NotImplementedError

    def tf_slices(self, files, shape, compressed: bool, fields, rows: int | None = None):
        """A tf.data.Dataset of dicts of `fields`, each [n, ...] with n <= rows: examples a slice at a time.

        For loaders that work on whole slices (fresh noise) and unbatch last.
        This default batches tf_dataset's examples; a format that can hand
        over slices as they lie in its shards says so here, faster.
        """
        fields = tuple(fields)
        rows = rows or chunk_rows(shape)
        return self.tf_dataset(files, shape, compressed).map(lambda ex: {f: ex[f] for f in fields}).batch(rows)

    def max_bytes(self, shape, count: int) -> int:
        """The most a shard of `count` examples of `shape` can take on disk.

        A larger file (a sparse file, a link to a device-sized file) is refused
        before it is read, so no dataset can keep the sha256 check busy for hours.
        The default allows the logits plus 64 KiB per example and 1 MiB of
        framing; a format that knows its layout says it more tightly.
        """
        return count * (4 * int(np.prod(shape)) + (64 << 10)) + (1 << 20)

    def check_classes(self, classes) -> None:
        """Refuse, before anything is written, class names this format's metadata cannot carry."""

    def metadata_files(self, manifest) -> list:
        """Names of the files write_metadata() writes for this manifest."""
        return []

    def write_metadata(self, out_dir: str, manifest) -> list:
        """Format-specific files beside the manifest; returns their names."""
        return []
