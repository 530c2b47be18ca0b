"""TFRecord shards: `{name}-{split}.tfrecord-{i:05d}-of-{n:05d}`, one tf.train.Example per image.

Features: `logits` (raw little-endian float32 bytes, HWC), `logdet` (float),
`key` (bytes), `label` (int64). Beside plain shards, the TFDS metadata
(dataset_info.json, features.json, label.labels.txt) that lets
`tfds.builder_from_directory` load the folder.
"""
from __future__ import annotations

import contextlib
import errno
import os
import struct

import numpy as np

from ..errors import LogitifyError, ShardError
from ..fs import Writeback, fd_path
from ..tfrecord_io import ExampleWriter, read_varint, wire_fields
from . import tfds_meta
from .base import FIELDS, ShardFormat, ShardWriter, check_chunk, chunk_rows, refuse_expanding

KEY_BYTES_MAX = 16384  # a record's key, label and log-det take far less


# -- reading back, in the memory of one record ---------------------------------------------------
#
# Each record is read into a buffer of its own and parsed through memoryviews
# (records.read_records), so the logits are never copied out of it: protobuf
# objects, or slicing bytes at each level of an Example, held five copies of
# a record's logits at once.

def _records(path: str, compressed: bool, max_length: int):
    """Memoryviews of the records of a shard, each checked to fit before it is read; data checksums not checked.

    A shard already matched its sha256: its size is bounded by refuse_expanding
    and max_length, so the inflation bound for strangers' inputs is off.
    """
    from ..records import read_records

    return read_records(path, "GZIP" if compressed else "", check_data=False, max_record_bytes=max_length,
                        bound_inflated=False)


def _checked_records(path: str, compressed: bool, max_length: int):
    """The records with every header and data checksum checked, as inputs are read (records.read_records)."""
    from ..records import RecordError, read_records

    for rec in read_records(path, "GZIP" if compressed else "", max_record_bytes=max_length, bound_inflated=False):
        if isinstance(rec, RecordError):  # raised too, where the framing itself fails
            raise rec
        yield rec


def _features(record) -> dict:
    """{name: Feature message view} of a serialized tf.train.Example."""
    out = {}
    for f, w, features in wire_fields(record):
        if f != 1 or w != 2:
            continue
        for f2, w2, entry in wire_fields(features):
            if f2 != 1 or w2 != 2:
                continue
            name, value = None, memoryview(b"")
            for f3, w3, v in wire_fields(entry):
                if f3 == 1 and w3 == 2:
                    name = bytes(v)
                elif f3 == 2 and w3 == 2:
                    value = v
            if name is not None:
                out[name] = value
    return out


def _first(feature):
    """(kind, how many values up to 2, the first value) of a Feature: kind 1 bytes, 2 float, 3 int64.

    Values are counted, never gathered: a list of millions costs nothing.
    """
    kind, count, first = None, 0, None
    for k, w, lst in wire_fields(feature):
        if w != 2 or k not in (1, 2, 3):
            continue
        kind, count, first = k, 0, None  # a oneof: the last one set counts
        for f, w2, v in wire_fields(lst):
            if f != 1 or count >= 2:
                continue
            if k == 1 and w2 == 2:
                values = [v]
            elif k == 2 and w2 == 5:
                values = [struct.unpack("<f", v)[0]]
            elif k == 2 and w2 == 2:
                if len(v) % 4:
                    raise ValueError("a packed float list of odd length")
                values = [struct.unpack_from("<f", v, j)[0] for j in range(0, min(len(v), 8), 4)]
            elif k == 3 and w2 == 0:
                values = [v]
            elif k == 3 and w2 == 2:
                values, j = [], 0
                while j < len(v) and len(values) < 2:
                    x, j = read_varint(v, j)
                    values.append(x)
            else:
                continue
            if first is None and values:
                first = values[0]
            count += len(values)
    if kind == 3 and first is not None:
        first &= (1 << 64) - 1  # int64 on the wire: two's complement in ten bytes at most
        if first >= 1 << 63:
            first -= 1 << 64
    return kind, min(count, 2), first


TF_PARSE_BATCH = 256  # records tf_dataset parses at a time


class TfrecordShardWriter(ShardWriter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .._tf import tf

        self.tf = tf()
        options = self.tf.io.TFRecordOptions(compression_type="GZIP" if self.compress else "")
        # TensorFlow opens files by name only: it is given the one made for it, not what is at its name now.
        self._writer = self.tf.io.TFRecordWriter(fd_path(self.fd, self.tmp), options)
        self._examples = ExampleWriter(int(np.prod(self.shape)) * 4)
        self._writeback = Writeback(self.fd)  # the same file, through the descriptor held

    def add(self, keys, labels, logits, logdet):
        logits = np.ascontiguousarray(logits, dtype="<f4")
        logdet = np.ascontiguousarray(logdet, dtype="<f4")
        serialize, write = self._examples.serialize, self._writer.write
        with self._as_os_error():
            for i, key in enumerate(keys):
                write(serialize(key.encode("utf-8", "surrogatepass"), int(labels[i]), logdet[i].tobytes(),
                                logits[i].data))
        self.count += len(keys)
        self._writeback.wrote(logits.nbytes)  # about what reached TensorFlow's buffer (less if compressed)

    def _finish(self):
        with self._as_os_error():
            self._writer.close()
        return None  # the sha256 is read back: TFRecordWriter owns the file

    @contextlib.contextmanager
    def _as_os_error(self):
        """TensorFlow's own write errors (a full disk, a file size limit) as the OSError every writer raises."""
        try:
            yield
        except self.tf.errors.OpError as e:
            message = str(e.message).rsplit("; ", 1)[-1]  # '/proc/self/fd/17; File too large': the reason
            raise OSError(errno.EIO, message) from None

    def abort(self):
        try:
            self._writer.close()
        except Exception:
            pass
        super().abort()


class TfrecordFormat(ShardFormat):
    name = "tfrecord"
    # TFDS's own file name template, filled in: the two can never disagree.
    template = (tfds_meta.TEMPLATE.replace("{DATASET}", "{name}").replace("{SPLIT}", "{split}")
                .replace("{FILEFORMAT}", "tfrecord").replace("{SHARD_X_OF_Y}", "{index:05d}-of-{count:05d}"))
    glob = "*.tfrecord-?????-of-?????"
    metadata_names = tfds_meta.FILES
    record_checksums = True  # each record's CRC32C (verify checks them)

    def writer(self, out_dir, file, shape, count, compress):
        return TfrecordShardWriter(self, out_dir, file, shape, count, compress)

    def read_fields(self, path, shape, count, compressed, fields, rows=None):
        return self.read_chunks(path, shape, count, compressed, rows, fields=tuple(fields))

    def read_chunks(self, path, shape, count, compressed, rows=None, records=False, fields=FIELDS):
        """Records a slice at a time; a GZIP shard's records only up to EXPANDING_EXAMPLE_MAX each.

        With `records`, every record's checksums too (CRC32C, in NumPy: a few
        hundred MB/s). Every record is read whatever `fields` says (its logits
        lie between its other fields); those not wanted are not copied out.
        """
        name = os.path.basename(path)
        shape = tuple(shape)
        nbytes = 4 * int(np.prod(shape))
        if compressed and count:
            refuse_expanding(name, shape)
        step = chunk_rows(shape, extra=KEY_BYTES_MAX // 16)
        step = min(step, rows) if rows else step
        keys, labels, logdet, raw = [], [], [], []
        seen = 0
        want_logits = "logits" in fields

        def logits():
            if len(raw) == 1:  # one large record: its logits are used where they lie in its buffer
                return np.frombuffer(raw[0], dtype="<f4").reshape((1,) + shape)
            out = np.empty((len(raw),) + shape, "<f4")
            for j, y in enumerate(raw):
                out[j] = np.frombuffer(y, dtype="<f4").reshape(shape)
            return out

        make = {"logits": logits, "logdet": lambda: np.array(logdet, dtype=np.float32),
                "keys": lambda: np.array(keys, dtype=str) if keys else np.zeros(0, "<U1"),
                "labels": lambda: np.array(labels, dtype=np.int64)}

        def chunk():
            return check_chunk(name, {f: make[f]() for f in fields}, shape)

        try:
            reader = _checked_records if records else _records
            for i, rec in enumerate(reader(path, compressed, max_length=nbytes + KEY_BYTES_MAX)):
                if i >= count:
                    raise ShardError(name, f"holds more than the {count} examples the manifest says")
                feats = _features(rec)
                if not all(k in feats for k in (b"logits", b"logdet", b"key")):
                    raise ShardError(name, f"record {i} lacks logits, logdet or key")
                kinds = {k: _first(feats[k]) for k in (b"logits", b"logdet", b"key")}
                (yk, yn, y), (dk, dn, ld), (kk, kn, key) = kinds[b"logits"], kinds[b"logdet"], kinds[b"key"]
                if (yk, yn, dk, dn, kk, kn) != (1, 1, 2, 1, 1, 1):
                    raise ShardError(name, f"record {i} does not hold one logits bytes, one float "
                                        "log-det and one bytes key")
                if len(y) != nbytes:
                    raise ShardError(name, f"record {i} has {len(y)} logit bytes, expected {nbytes}")
                lk, ln, lab = _first(feats[b"label"]) if b"label" in feats else (None, 0, None)
                if ln == 0:
                    lab = -1  # an empty label list: no label
                elif ln != 1 or lk != 3:
                    raise ShardError(name, f"record {i} has {'two or more' if ln > 1 else 'a'} "
                                        f"{'labels' if ln > 1 else 'label that is not an int64'}, expected one int64")
                raw.append(y if want_logits else None)
                del y, feats, kinds, rec
                logdet.append(ld)
                keys.append(bytes(key).decode("utf-8", "surrogatepass"))
                labels.append(lab)
                seen += 1
                if len(raw) == step:
                    yield chunk()
                    keys, labels, logdet, raw = [], [], [], []
        except LogitifyError:
            raise
        except (ValueError, OSError, EOFError, UnicodeDecodeError, TypeError, OverflowError, MemoryError) as e:
            if getattr(e, "checksum", False):  # records.RecordError: checked before the record is parsed
                raise ShardError(name, f"record {e.index} fails its checksum (CRC32C): its bytes "
                                    f"were changed ({e.reason})") from None
            raise ShardError(name, f"unreadable ({e})") from None
        if seen != count:
            raise ShardError(name, f"holds {seen} examples, manifest says {count}")
        if raw:
            yield chunk()

    def max_bytes(self, shape, count):
        per_record = 16 + 4 * int(np.prod(shape)) + KEY_BYTES_MAX  # framing, logits, all the rest
        return (1 << 20) + count * per_record * 101 // 100  # GZIP may add a little

    def tf_slices(self, files, shape, compressed, fields, rows=None):
        return self.tf_dataset(files, shape, compressed, batched=True, fields=fields, rows=rows)

    def tf_dataset(self, files, shape, compressed, batched=False, fields=None, rows=None):
        """Records read by tf.data, parsed a batch at a time, then split into examples.

        batched=True hands over the parsed batches (dicts of [n, ...] tensors,
        n <= rows, TF_PARSE_BATCH unless `rows` says), for callers that work on
        whole batches and unbatch last; `fields` names the components wanted
        (default all four). Shards are read one after the other, in order.
        """
        from .._tf import tf as _tf

        tf = _tf()
        h, w, c = shape
        fields = tuple(fields or ("logits", "logdet", "key", "label"))
        ds = tf.data.TFRecordDataset(list(files), compression_type="GZIP" if compressed else "")
        spec = {
            "logits": tf.io.FixedLenFeature([], tf.string),
            "logdet": tf.io.FixedLenFeature([], tf.float32),
            "key": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        }
        spec = {f: spec[f] for f in fields}

        def parse(recs):
            ex = tf.io.parse_example(recs, spec)
            if "logits" in ex:
                ex["logits"] = tf.reshape(tf.io.decode_raw(ex["logits"], tf.float32, little_endian=True),
                                          [-1, h, w, c])
            return ex

        # Parsing a batch of records at once costs about as much as parsing one.
        ds = ds.batch(rows or TF_PARSE_BATCH).map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds if batched else ds.unbatch()

    def metadata_files(self, manifest):
        if manifest.compressed:
            return []  # TFDS reads only plain TFRecords; our own loader reads GZIP
        return tfds_meta.metadata_files(manifest)

    def check_classes(self, classes) -> None:
        """label.labels.txt holds one name a line, which TFDS strips and skips when blank.

        A name with a line break, a blank one, or one with spaces at its ends
        would be read back as other names, or shift every class after it.
        """
        from ..report import printable

        for name in classes or ():
            if "\n" in name or not name.strip() or name.strip() != name:
                raise LogitifyError(f"class {printable(name)!r} cannot be written to TFDS's label.labels.txt (one "
                                    "name a line, stripped of spaces at its ends, blank lines skipped): rename "
                                    "it, or write -f npz")

    def write_metadata(self, out_dir, manifest):
        if manifest.compressed:
            return []
        return tfds_meta.write_tfds_metadata(out_dir, manifest)
