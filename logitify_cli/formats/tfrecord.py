"""TFRecord shards: `{name}-{split}.tfrecord-{i:05d}-of-{n:05d}`, one tf.train.Example per image.

Features: `logits` (raw little-endian float32 bytes, HWC), `logdet` (float),
`key` (bytes), `label` (int64). Beside plain shards, the TFDS metadata
(dataset_info.json, features.json, label.labels.txt) that lets
`tfds.builder_from_directory` load the folder.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import LogitifyError
from ..tfrecord_io import ExampleWriter, iter_records, parse_example
from .base import ShardFormat, ShardWriter, check_chunk, chunk_rows

# TFDS's own file name template; our shard names are this template filled in,
# so the two can never disagree.
TFDS_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
KEY_BYTES_MAX = 16384  # a record's key, label and log-det take far less
TFDS_FILES = ("dataset_info.json", "features.json", "label.labels.txt")
TF_PARSE_BATCH = 256  # records tf_dataset parses at a time


class TfrecordShardWriter(ShardWriter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .._tf import tf

        self.tf = tf()
        options = self.tf.io.TFRecordOptions(compression_type="GZIP" if self.compress else "")
        self._writer = self.tf.io.TFRecordWriter(self.tmp, options)
        self._examples = ExampleWriter(int(np.prod(self.shape)) * 4)

    def add(self, keys, labels, logits, logdet):
        logits = np.ascontiguousarray(logits, dtype="<f4")
        logdet = np.ascontiguousarray(logdet, dtype="<f4")
        serialize, write = self._examples.serialize, self._writer.write
        for i, key in enumerate(keys):
            write(serialize(key.encode("utf-8", "surrogatepass"), int(labels[i]), logdet[i].tobytes(), logits[i].data))
        self.count += len(keys)

    def _finish(self):
        self._writer.close()
        return None  # the sha256 is read back: TFRecordWriter owns the file

    def abort(self):
        try:
            self._writer.close()
        except Exception:
            pass
        super().abort()


class TfrecordFormat(ShardFormat):
    name = "tfrecord"
    template = (TFDS_TEMPLATE.replace("{DATASET}", "{name}").replace("{SPLIT}", "{split}")
                .replace("{FILEFORMAT}", "tfrecord").replace("{SHARD_X_OF_Y}", "{index:05d}-of-{count:05d}"))
    glob = "*.tfrecord-?????-of-?????"
    description = "TFRecord files of tf.train.Example, with TFDS metadata"

    def writer(self, out_dir, file, shape, count, compress):
        return TfrecordShardWriter(self, out_dir, file, shape, count, compress)

    def read_chunks(self, path, shape, count, compressed, rows=None):
        name = os.path.basename(path)
        shape = tuple(shape)
        nbytes = 4 * int(np.prod(shape))
        rows = rows or chunk_rows(shape)
        keys, labels, logdet, raw = [], [], [], []
        seen = 0

        def chunk():
            out = {
                "logits": np.frombuffer(b"".join(raw), dtype="<f4").reshape((-1,) + shape),
                "logdet": np.array(logdet, dtype=np.float32),
                "keys": np.array(keys, dtype=str) if keys else np.zeros(0, "<U1"),
                "labels": np.array(labels, dtype=np.int64),
            }
            return check_chunk(name, out, shape)

        try:
            for i, rec in enumerate(iter_records(path, compressed, max_length=nbytes + KEY_BYTES_MAX)):
                if i >= count:
                    raise LogitifyError(f"shard {name}: holds more than the {count} examples the manifest says")
                ex = parse_example(rec)
                try:
                    (y,), (ld,), (key,) = ex["logits"], ex["logdet"], ex["key"]
                except (KeyError, ValueError):
                    raise LogitifyError(f"shard {name}: record {i} lacks logits, logdet or key") from None
                if not isinstance(y, bytes) or len(y) != nbytes:
                    raise LogitifyError(f"shard {name}: record {i} has {len(y)} logit bytes, expected {nbytes}")
                label = ex.get("label") or [-1]
                if len(label) != 1:
                    raise LogitifyError(f"shard {name}: record {i} has {len(label)} labels, expected one")
                raw.append(y)
                logdet.append(ld)
                keys.append(key.decode("utf-8", "surrogatepass"))
                labels.append(label[0])
                seen += 1
                if len(raw) == rows:
                    yield chunk()
                    keys, labels, logdet, raw = [], [], [], []
        except LogitifyError:
            raise
        except (ValueError, OSError, EOFError, UnicodeDecodeError, TypeError) as e:
            raise LogitifyError(f"shard {name}: unreadable ({e})") from None
        if seen != count:
            raise LogitifyError(f"shard {name}: holds {seen} examples, manifest says {count}")
        if raw:
            yield chunk()

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
        return [f for f in TFDS_FILES if f != "label.labels.txt" or manifest.classes]

    def write_metadata(self, out_dir, manifest):
        if manifest.compressed:
            return []
        from ..tfds_meta import write_tfds_metadata

        return write_tfds_metadata(out_dir, manifest, self)
