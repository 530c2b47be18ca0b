"""Reading a logitify dataset back: shard readers, loaders, the inverse.

The road backwards starts here: a folder with a manifest -> shards of
(keys, labels, logits, logdet), each checked against the manifest before use.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

from . import manifest as manifest_mod
from .errors import LogitifyError
from .sinks import file_sha256

NPZ_FIELDS = ("logits", "logdet", "keys", "labels")


class NpzShardReader:
    """An npz shard, opened without pickle, its arrays checked."""

    def __init__(self, path, shape, compressed=False):
        self.path, self.shape = path, tuple(shape)

    def read(self) -> dict:
        name = os.path.basename(self.path)
        try:
            with np.load(self.path, allow_pickle=False) as z:
                missing = [f for f in NPZ_FIELDS if f not in z.files]
                if missing:
                    raise LogitifyError(f"shard {name}: missing arrays {', '.join(missing)}")
                out = {f: z[f] for f in NPZ_FIELDS}
        except LogitifyError:
            raise
        except ValueError as e:
            if "pickle" in str(e).lower() or "object" in str(e).lower():
                raise LogitifyError(f"shard {name}: holds object (pickled) arrays, refused") from None
            raise LogitifyError(f"shard {name}: unreadable ({e})") from None
        except (OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
            raise LogitifyError(f"shard {name}: unreadable ({e})") from None
        return check_shard_arrays(name, out, self.shape)


def check_shard_arrays(name, out, shape) -> dict:
    n = out["logits"].shape[0] if out["logits"].ndim else -1
    if out["logits"].dtype != np.float32 or out["logits"].shape[1:] != tuple(shape):
        raise LogitifyError(
            f"shard {name}: logits are {out['logits'].dtype} {list(out['logits'].shape)}, "
            f"expected float32 [n, {', '.join(map(str, shape))}]"
        )
    if out["logdet"].dtype != np.float32 or out["logdet"].shape != (n,):
        raise LogitifyError(f"shard {name}: logdet is not float32 [{n}]")
    if out["keys"].dtype.kind != "U" or out["keys"].shape != (n,):
        raise LogitifyError(f"shard {name}: keys are not strings [{n}]")
    if out["labels"].dtype != np.int64 or out["labels"].shape != (n,):
        raise LogitifyError(f"shard {name}: labels are not int64 [{n}]")
    return out


class TfrecordShardReader:
    """A TFRecord shard of Examples (logits, logdet, key, label), read without TF."""

    def __init__(self, path, shape, compressed=False):
        self.path, self.shape, self.compressed = path, tuple(shape), compressed

    def read(self) -> dict:
        from .tfrecord_io import iter_records, parse_example

        name = os.path.basename(self.path)
        nbytes = 4 * int(np.prod(self.shape))
        keys, labels, logdet, raw = [], [], [], []
        try:
            for i, rec in enumerate(iter_records(self.path, self.compressed)):
                ex = parse_example(rec)
                try:
                    (y,), (ld,), (key,) = ex["logits"], ex["logdet"], ex["key"]
                except (KeyError, ValueError):
                    raise LogitifyError(f"shard {name}: record {i} lacks logits, logdet or key") from None
                if not isinstance(y, bytes) or len(y) != nbytes:
                    raise LogitifyError(f"shard {name}: record {i} has {len(y)} logit bytes, expected {nbytes}")
                raw.append(y)
                logdet.append(ld)
                keys.append(key.decode("utf-8", "surrogatepass"))
                labels.append(ex.get("label", [-1])[0])
        except (ValueError, OSError, EOFError, UnicodeDecodeError) as e:
            raise LogitifyError(f"shard {name}: unreadable ({e})") from None
        out = {
            "logits": np.frombuffer(b"".join(raw), dtype="<f4").reshape((-1,) + self.shape),
            "logdet": np.array(logdet, dtype=np.float32),
            "keys": np.array(keys, dtype=str) if keys else np.zeros(0, "<U1"),
            "labels": np.array(labels, dtype=np.int64),
        }
        return check_shard_arrays(name, out, self.shape)


def feature_spec():
    from ._tf import tf as _tf

    tf = _tf()
    return {
        "logits": tf.io.FixedLenFeature([], tf.string),
        "logdet": tf.io.FixedLenFeature([], tf.float32),
        "key": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    }


SHARD_READERS = {"npz": NpzShardReader, "tfrecord": TfrecordShardReader}


class LogitDataset:
    """A dataset folder written by `logitify encode`."""

    def __init__(self, path: str):
        self.path = path
        self.manifest = manifest_mod.read(path)
        self.root = self.manifest["_dir"]
        self.params = self.manifest["_params"]
        self.shape = tuple(self.manifest["shape"])
        self.format = self.manifest["format"]
        self.classes = self.manifest.get("classes")
        self._transform = None

    @property
    def num_examples(self) -> int:
        return self.manifest["num_examples"]

    def shard_path(self, shard: dict) -> str:
        return os.path.join(self.root, shard["file"])

    def check_shard_file(self, shard: dict) -> None:
        """Presence and sha256 of a shard, or a LogitifyError naming it."""
        path = self.shard_path(shard)
        if not os.path.isfile(path):
            raise LogitifyError(f"shard {shard['file']} is missing")
        digest = file_sha256(path)
        if digest != shard["sha256"]:
            raise LogitifyError(f"shard {shard['file']} is altered or truncated (sha256 {digest[:12]}..., manifest says {shard['sha256'][:12]}...)")

    def read_shard(self, shard: dict, check: bool = True) -> dict:
        if check:
            self.check_shard_file(shard)
        reader = SHARD_READERS[self.format](self.shard_path(shard), self.shape, self.manifest.get("compressed", False))
        out = reader.read()
        if len(out["keys"]) != shard["num_examples"]:
            raise LogitifyError(f"shard {shard['file']}: holds {len(out['keys'])} examples, manifest says {shard['num_examples']}")
        return out

    def iter_shards(self, check: bool = True):
        """NumPy dicts (logits, logdet, keys, labels), one per shard."""
        for shard in self.manifest["shards"]:
            yield shard, self.read_shard(shard, check)

    def transform(self, device=None):
        from .transform import LogitTransform

        if self._transform is None:
            self._transform = LogitTransform(self.params, self.shape, device)
        return self._transform

    def inverse(self, logits, device=None) -> np.ndarray:
        """uint8 images from logits with this dataset's parameters.

        On the CPU this is the NumPy twin of the TF inverse (same bytes, no
        TensorFlow start-up); with a device it runs in TensorFlow there.
        """
        if device is None:
            from .transform import inverse_numpy

            return inverse_numpy(self.params, np.asarray(logits, np.float32))
        return np.asarray(self.transform(device).inverse(np.asarray(logits, np.float32)))

    def as_tf_dataset(self, with_keys=False, with_labels=False):
        """A tf.data.Dataset of (logits, logdet[, key][, label]) per image."""
        from ._tf import tf as _tf

        tf = _tf()
        h, w, c = self.shape
        files = [self.shard_path(s) for s in self.manifest["shards"]]
        if self.format == "tfrecord":
            ds = tf.data.TFRecordDataset(files, compression_type="GZIP" if self.manifest.get("compressed") else "")
            spec = feature_spec()

            def parse(rec):
                ex = tf.io.parse_single_example(rec, spec)
                y = tf.reshape(tf.io.decode_raw(ex["logits"], tf.float32, little_endian=True), [h, w, c])
                return {"logits": y, "logdet": ex["logdet"], "key": ex["key"], "label": ex["label"]}

            ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        else:
            shards = list(self.manifest["shards"])

            def gen():
                for shard in shards:
                    d = self.read_shard(shard, check=False)
                    for i in range(len(d["keys"])):
                        yield {"logits": d["logits"][i], "logdet": d["logdet"][i],
                               "key": d["keys"][i].encode("utf-8", "surrogatepass"), "label": d["labels"][i]}

            sig = {
                "logits": tf.TensorSpec([h, w, c], tf.float32),
                "logdet": tf.TensorSpec([], tf.float32),
                "key": tf.TensorSpec([], tf.string),
                "label": tf.TensorSpec([], tf.int64),
            }
            ds = tf.data.Dataset.from_generator(gen, output_signature=sig)

        def pick(ex):
            out = (ex["logits"], ex["logdet"])
            if with_keys:
                out += (ex["key"],)
            if with_labels:
                out += (ex["label"],)
            return out

        return ds.map(pick)


def load(path: str, with_keys: bool = False, with_labels: bool = False):
    """tf.data.Dataset of (logits, logdet[, key][, label]) from a logitify folder."""
    return LogitDataset(path).as_tf_dataset(with_keys=with_keys, with_labels=with_labels)


def iter_numpy(path: str):
    """NumPy dicts (logits, logdet, keys, labels), one per shard, sha256-checked."""
    for _, arrays in LogitDataset(path).iter_shards():
        yield arrays
