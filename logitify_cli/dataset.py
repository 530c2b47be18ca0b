"""Reading a logitify dataset back: shards, loaders, the inverse.

The road backwards starts here: a folder (or bucket prefix) with a manifest
-> shards of (keys, labels, logits, logdet), each checked against the
manifest before use and read in slices, so memory follows the slice, not
the shard.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile

import numpy as np

from . import fs
from . import manifest as manifest_mod
from .errors import LogitifyError, ShardError
from .formats.base import file_sha256

INVERSE_VALUES = 1 << 18  # logits the NumPy inverse takes at a time: 2 MB per float64 temporary
SLICE_BYTES = 64 << 20  # logits of one slice iter_numpy hands over, by default


def _unreadable(shard, why) -> ShardError:
    return ShardError(shard.file, f"cannot be read: {why}", f"shard {shard.file} cannot be read: {why}")


def _shard_is(shard, what: str) -> ShardError:
    return ShardError(shard.file, what, f"shard {shard.file} is {what}")


def _too_big(shard, size: int, shape) -> ShardError:
    return _shard_is(shard, f"{size} bytes, more than {shard.num_examples} examples of "
                            f"{'x'.join(map(str, shape))} can take")


def read_manifest(path: str):
    """The manifest of a dataset folder here or in a bucket, every split of it."""
    if fs.is_remote(path):
        where = fs.join(path, manifest_mod.MANIFEST)
        try:
            data = fs.read_bytes(where, manifest_mod.MANIFEST_MAX_BYTES + 1)
        except OSError as e:
            raise LogitifyError(f"{path}: cannot read {manifest_mod.MANIFEST}: {e}") from None
        m = manifest_mod.parse(data, where)
        m.folder = path
        return m
    return manifest_mod.read(path)


def split_names(path: str) -> list:
    """The splits of a dataset folder, in name order."""
    return read_manifest(path).split_names


class LogitDataset:
    """One split of a dataset folder written by `logitify encode`, here or in a bucket.

    `split` may be left out when the dataset has one split; with several,
    it must be named (LogitifyError lists them): reading "the dataset" then
    has no single meaning, and a silent choice would mix up train and test.
    """

    def __init__(self, path: str, split: str | None = None):
        self.path = path
        self.remote = fs.is_remote(path)
        self.manifest = read_manifest(path).select(split)
        self.root = path.rstrip("/") if self.remote else self.manifest.folder
        self.split = self.manifest.split
        self.params = self.manifest.params
        self.shape = tuple(self.manifest.shape)
        self.format = self.manifest.shard_format()
        self.classes = self.manifest.classes
        self._transform = None

    @property
    def num_examples(self) -> int:
        return self.manifest.num_examples

    @property
    def shards(self) -> list:
        return self.manifest.shards

    def shard_path(self, shard) -> str:
        return fs.join(self.root, shard.file)

    def check_shard_file(self, shard) -> None:
        """Presence and sha256 of a local shard, or a LogitifyError naming it."""
        path = self.shard_path(shard)
        if not os.path.isfile(path):
            what = "missing" if not os.path.lexists(path) else (
                "a folder, not a file" if os.path.isdir(path) else "not a regular file (a pipe, device or dead link)")
            raise _shard_is(shard, what)
        try:
            size = os.path.getsize(path)
            if size > self.format.max_bytes(self.shape, shard.num_examples):
                raise _too_big(shard, size, self.shape)
            digest = file_sha256(path)
        except OSError as e:
            raise _unreadable(shard, e.strerror or e) from None
        self._check_digest(shard, digest)

    @staticmethod
    def _check_digest(shard, digest):
        if digest != shard.sha256:
            raise _shard_is(shard, f"altered or truncated (sha256 {digest[:12]}..., manifest says "
                                   f"{shard.sha256[:12]}...)")

    @contextlib.contextmanager
    def local_shard(self, shard, check: bool = True):
        """A path on this machine holding the shard: the file itself, or a checked download."""
        if not self.remote:
            if check:
                self.check_shard_file(shard)
            yield self.shard_path(shard)
            return
        try:
            size = fs.size(self.shard_path(shard))
        except OSError as e:
            raise _unreadable(shard, e) from None
        if size > self.format.max_bytes(self.shape, shard.num_examples):
            raise _too_big(shard, size, self.shape)
        tmp = tempfile.mkdtemp(prefix="logitify-read-")
        try:
            local = os.path.join(tmp, shard.file)
            h = hashlib.sha256()
            try:
                with fs.open_read(self.shard_path(shard)) as src, open(local, "wb") as dst:
                    for block in iter(lambda: src.read(8 << 20), b""):
                        h.update(block)
                        dst.write(block)
            except OSError as e:
                raise _unreadable(shard, e) from None
            if check:
                self._check_digest(shard, h.hexdigest())
            yield local
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def iter_chunks(self, shard, check: bool = True, rows: int | None = None, records: bool = False,
                    fields=None):
        """NumPy dicts (logits, logdet, keys, labels, or the `fields` named) of one shard, a slice at a time.

        `check` compares the shard with the manifest's sha256 first; `records`
        also checks each record's own checksums where the format keeps them
        apart from the file's (TFRecord; slower, so verify's alone), and is
        not for a read of some `fields`.
        """
        extra = {"records": True} if records and self.format.record_checksums else {}
        with self.local_shard(shard, check) as path:
            if fields is not None:
                yield from self.format.read_fields(path, self.shape, shard.num_examples, self.manifest.compressed,
                                                   fields, rows)
            else:
                yield from self.format.read_chunks(path, self.shape, shard.num_examples,
                                                   self.manifest.compressed, rows, **extra)

    def read_shard(self, shard, check: bool = True) -> dict:
        """One whole shard as NumPy arrays (its logits held once: filled in place, slice by slice)."""
        n = shard.num_examples
        out = {"logits": np.empty((n,) + self.shape, np.float32), "logdet": np.empty(n, np.float32),
               "labels": np.empty(n, np.int64)}
        keys, at = [], 0
        for part in self.iter_chunks(shard, check):
            b = at + len(part["keys"])
            for k in ("logits", "logdet", "labels"):
                out[k][at:b] = part[k]
            keys.append(part["keys"])
            at = b
        out["keys"] = np.concatenate(keys) if keys else np.zeros(0, "<U1")
        return out

    def iter_shards(self, check: bool = True):
        """(shard entry, NumPy dict) for each shard, whole: memory follows the shard size."""
        for shard in self.shards:
            yield shard, self.read_shard(shard, check)

    def iter_slices(self, rows: int | None = None, check: bool = True):
        """(shard entry, NumPy dict of `rows` examples) in order: memory follows the slice, not the shard.

        Each shard comes in slices of exactly `rows` examples (its last one
        shorter), whatever the format reads at a time; by default as many as
        fit in SLICE_BYTES of logits.
        """
        from .formats.base import chunk_rows

        if rows is None:
            rows = max(1, chunk_rows(self.shape, SLICE_BYTES))
        else:
            n = whole_number(rows)
            if n is None or n < 1:
                raise LogitifyError(f"rows must be a positive integer (or None for the default), got {rows!r}")
            rows = n
        for shard in self.shards:
            parts, held = [], 0
            for part in self.iter_chunks(shard, check, rows=rows):
                parts.append(part)
                held += len(part["keys"])
                while held >= rows:
                    out, parts, held = _split(parts, rows)
                    yield shard, out
            if held:
                yield shard, _split(parts, held)[0]

    def transform(self, device=None, batch_size: int = 256):
        from .transform import LogitTransform

        if self._transform is None:
            self._transform = LogitTransform(self.params, self.shape, device, batch_size)
        return self._transform

    def inverse(self, logits, device=None, batch_size: int = 256) -> np.ndarray:
        """uint8 images from logits with this dataset's parameters.

        On the CPU this is the NumPy twin of the TF inverse (same bytes, no
        TensorFlow start-up). It works value by value, so it runs over at
        most INVERSE_VALUES at a time and its float64 temporaries stay small
        however large one image is; with a device it runs in TensorFlow there.
        """
        logits = np.asarray(logits, np.float32)
        if device is not None:
            return np.asarray(self.transform(device, batch_size).inverse(logits))
        from .transform import inverse_numpy

        with np.errstate(invalid="ignore"):  # a non-finite logit has no level; verify names it
            if logits.size <= INVERSE_VALUES:
                return inverse_numpy(self.params, logits)
            out = np.empty(logits.shape, np.uint8)
            flat_in, flat_out = logits.reshape(-1), out.reshape(-1)
            for a in range(0, flat_in.size, INVERSE_VALUES):
                flat_out[a:a + INVERSE_VALUES] = inverse_numpy(self.params, flat_in[a:a + INVERSE_VALUES])
            return out

    def refuse_remote_for_tf(self) -> None:
        """tf.data reads the shards by path: a dataset in a bucket is refused, with what to do."""
        if self.remote:
            raise LogitifyError(f"{self.path}: tf.data cannot read this store here; copy the dataset folder "
                                "to a local disk first (e.g. aws s3 cp --recursive, gsutil -m cp -r)")

    def as_tf_dataset(self, with_keys=False, with_labels=False):
        """A tf.data.Dataset of (logits, logdet[, key][, label]) per image."""
        self.refuse_remote_for_tf()
        files = {self.shard_path(s): s.num_examples for s in self.shards}
        fields = ("logits", "logdet") + (("key",) if with_keys else ()) + (("label",) if with_labels else ())

        def pick(ex):
            return tuple(ex[f] for f in fields)

        # Choosing the components costs one small step per slice, where it cost one per image.
        ds = self.format.tf_slices(files, self.shape, self.manifest.compressed, fields)
        return ds.map(pick).prefetch(1).unbatch()


def whole_number(value):
    """An integer of any kind that is one (NumPy's included, not a bool), or None: what the API's counts take."""
    import operator

    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def load(path: str, with_keys: bool = False, with_labels: bool = False, noise: str = "stored",
         epoch: int = 0, epochs: int | None = None, draws: int | None = None, shards=None, split: str | None = None):
    """tf.data.Dataset of (logits, logdet[, key][, label]) from a logitify folder.

    noise="stored" gives the logits on disk. noise="fresh" redraws the
    dequantization noise in the graph: `epoch=E` is epoch E's draw (epoch 0
    is the stored one, bit for bit), `epochs=N` runs N epochs in a row from
    `epoch`, `draws=K` gives K evaluation draws per image (logits
    [K,H,W,C], log-dets [K]). `shards` (fresh only) reads a subset of shards.
    `split` names the split; it may be left out when there is only one.
    """
    ds = LogitDataset(path, split)
    if noise == "fresh":
        from .noise import fresh_dataset

        return fresh_dataset(ds, epoch=epoch, epochs=epochs, draws=draws, with_keys=with_keys,
                             with_labels=with_labels, shards=shards)
    if noise != "stored":
        raise LogitifyError(f"noise must be 'stored' or 'fresh', got {noise!r}")
    if epoch or epochs is not None or draws is not None or shards is not None:
        raise LogitifyError("epoch, epochs, draws and shards need noise='fresh' (the stored logits are one draw)")
    return ds.as_tf_dataset(with_keys=with_keys, with_labels=with_labels)


def _split(parts: list, rows: int):
    """(the first `rows` examples of the parts as one dict, the parts left, how many they hold)."""
    if len(parts) == 1 and len(parts[0]["keys"]) == rows:
        return parts[0], [], 0
    whole = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    head = {k: v[:rows] for k, v in whole.items()}
    left = len(whole["keys"]) - rows
    return head, ([{k: v[rows:] for k, v in whole.items()}] if left else []), left


def iter_numpy(path: str, split: str | None = None, rows: int | None = None):
    """NumPy dicts (logits, logdet, keys, labels), sha256-checked, a slice of a shard at a time.

    Each shard comes in slices of `rows` examples (its last one shorter;
    by default as many as fit in SLICE_BYTES of logits), so memory stays flat
    whatever the shard size. `split` names one split (needed when the dataset
    has several). `LogitDataset(path, split).iter_shards()` gives whole shards.
    """
    for _, arrays in LogitDataset(path, split).iter_slices(rows):
        yield arrays
