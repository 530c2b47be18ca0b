"""Shard formats are pluggable, and the dataset folder can be read from its documentation alone.

1. A shard format is one ShardFormat subclass and one register() line: the
   toy format below goes through encode, verify, info, decode, the loaders
   and --overwrite with nothing else changed.
2. The reader printed in docs/format.md (standard library and NumPy only)
   reads npz and TFRecord datasets exactly as logitify itself does.
"""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import logitify_cli as lg
from logitify_cli import formats
from logitify_cli.errors import LogitifyError
from logitify_cli.formats import ShardFormat, ShardWriter, check_chunk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "sample_images")


# -- a toy format: one class for the files, one writer, one register() line ---------------------

class ToyWriter(ShardWriter):
    """Holds a shard's examples until close(), then writes the header line and the logits.

    A toy: a real format would stream the logits as they come (the npz writer
    does). The base class writes under the temporary name and renames.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._keys, self._labels, self._logdet, self._logits = [], [], [], []

    def add(self, keys, labels, logits, logdet):
        self._keys.extend(keys)
        self._labels.extend(int(v) for v in labels)
        self._logdet.extend(float(v) for v in np.asarray(logdet, np.float32))
        self._logits.append(np.ascontiguousarray(logits, "<f4").tobytes())
        self.count += len(keys)

    def _finish(self):
        header = {"toy": 1, "count": self.count, "shape": list(self.shape),
                  "keys": self._keys, "labels": self._labels, "logdet": self._logdet}
        with open(self.tmp, "wb") as f:
            f.write(json.dumps(header, sort_keys=True).encode("ascii") + b"\n")
            for part in self._logits:
                f.write(part)
        return None  # the base class reads the sha256 back, then fsyncs and renames


class ToyFormat(ShardFormat):
    """One file per shard: a JSON header line, then raw little-endian float32 logits (HWC)."""

    name = "toy"
    template = "{name}-{split}-{index:05d}-of-{count:05d}.toy"
    glob = "*-?????-of-?????.toy"

    def writer(self, out_dir, file, shape, count, compress):
        return ToyWriter(self, out_dir, file, shape, count, compress)

    @staticmethod
    def _header(f, name, count):
        line = f.readline(4096 + 8192 * count)  # keys are paths: never longer than this
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no header line")
            h = json.loads(line)
            keys, labels, logdet = h["keys"], h["labels"], h["logdet"]
            if not (h["count"] == count == len(keys) == len(labels) == len(logdet)):
                raise ValueError(f"header of {h['count']} examples, manifest says {count}")
        except (ValueError, KeyError, TypeError) as e:
            raise LogitifyError(f"shard {name}: bad header ({e})") from None
        return h, len(line)

    def read_chunks(self, path, shape, count, compressed, rows=None):
        from logitify_cli.formats.base import chunk_rows

        name, shape = os.path.basename(path), tuple(shape)
        nbytes = 4 * int(np.prod(shape))
        rows = rows or chunk_rows(shape)
        with open(path, "rb") as f:
            h, _ = self._header(f, name, count)
            if tuple(h["shape"]) != shape:
                raise LogitifyError(f"shard {name}: shape {h['shape']}, manifest says {list(shape)}")
            for a in range(0, count, rows):
                b = min(count, a + rows)
                data = f.read((b - a) * nbytes)
                if len(data) != (b - a) * nbytes:
                    raise LogitifyError(f"shard {name}: truncated")
                yield check_chunk(name, {
                    "logits": np.frombuffer(data, "<f4").reshape((b - a,) + shape),
                    "logdet": np.array(h["logdet"][a:b], np.float32),
                    "keys": np.array(h["keys"][a:b], str) if b > a else np.zeros(0, "<U1"),
                    "labels": np.array(h["labels"][a:b], np.int64),
                }, shape)
            if f.read(1):
                raise LogitifyError(f"shard {name}: bytes after the last example")

    def tf_dataset(self, files, shape, compressed):
        """tf.data's own fixed-length record reader for the logits, the header's columns beside them."""
        import tensorflow as tf

        parts = []
        for path in files:  # {path: num_examples} from the manifest, or a list of paths
            count = files[path] if isinstance(files, dict) else _count(path)
            with open(path, "rb") as f:
                h, header_bytes = self._header(f, os.path.basename(path), count)
            logits = tf.data.FixedLengthRecordDataset(path, 4 * int(np.prod(shape)), header_bytes=header_bytes).map(
                lambda r: tf.reshape(tf.io.decode_raw(r, tf.float32, little_endian=True), shape))
            columns = tf.data.Dataset.from_tensor_slices({
                "logdet": np.array(h["logdet"], np.float32),
                "key": np.array([k.encode("utf-8", "surrogatepass") for k in h["keys"]], dtype=bytes),
                "label": np.array(h["labels"], np.int64)})
            parts.append(tf.data.Dataset.zip((logits, columns)).map(lambda y, c: {"logits": y, **c}))
        ds = parts[0]
        for p in parts[1:]:
            ds = ds.concatenate(p)
        return ds


def _count(path):
    with open(path, "rb") as f:
        return json.loads(f.readline())["count"]


@pytest.fixture
def toy():
    fmt = formats.register(ToyFormat())  # the one line a new format adds to logitify_cli/formats/__init__.py
    yield fmt
    formats.FORMATS.pop(fmt.name, None)


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_format_is_one_class_and_one_registry_line(cli, toy, image_folder, tmp_path):
    src, truth = image_folder
    out = tmp_path / "toy"
    r = cli("encode", src, "-o", out, "-f", "toy", "--shard-size", "5", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["format"] == "toy" and summary["num_examples"] == len(truth)
    shard_files = [f"logitify-train-{i:05d}-of-00003.toy" for i in range(3)]
    assert files_in(out) == sorted(shard_files + ["manifest.json"])  # no journal, lock or temp file is left
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "toy" and m["files"] == [] and [s["file"] for s in m["shards"]] == shard_files

    # The file is what the class says: a header line, then count x H x W x C float32 values.
    with open(out / shard_files[0], "rb") as f:
        header = json.loads(f.readline())
        assert header["count"] == 5 and header["keys"] == sorted(truth)[:5]
        assert len(f.read()) == 5 * 24 * 32 * 3 * 4

    r = cli("verify", out, "--against", src)
    assert r.exit_code == 0, r.output
    r = cli("info", out, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["format"] == "toy" and info["num_examples"] == len(truth)
    assert info["class_counts"] == {"cats": 7, "dogs": 6}

    back = tmp_path / "back"
    r = cli("decode", out, "-o", back)
    assert r.exit_code == 0, r.output
    for key, arr in truth.items():
        np.testing.assert_array_equal(np.asarray(Image.open(back / key)), arr)

    # The same inputs as npz: the same logits, whichever format holds them.
    npz = tmp_path / "npz"
    assert cli("encode", src, "-o", npz, "--shard-size", "5").exit_code == 0
    for a, b in zip(lg.iter_numpy(str(out)), lg.iter_numpy(str(npz)), strict=True):
        for k in ("logits", "logdet", "keys", "labels"):
            np.testing.assert_array_equal(a[k], b[k])
    for noise in ("stored", "fresh"):  # fresh noise reads slices: the toy's come from its tf_dataset
        got = list(lg.load(str(out), with_keys=True, with_labels=True, noise=noise).as_numpy_iterator())
        want = list(lg.load(str(npz), with_keys=True, with_labels=True, noise=noise).as_numpy_iterator())
        assert len(got) == len(want) == len(truth)
        for g, w in zip(got, want):
            for x, y in zip(g, w):
                np.testing.assert_array_equal(x, y)

    # An altered shard is caught by the same sha256 check as any format's.
    data = bytearray((out / shard_files[1]).read_bytes())
    data[-1] ^= 1
    (out / shard_files[1]).write_bytes(bytes(data))
    r = cli("verify", out)
    assert r.exit_code == 1 and shard_files[1] in r.stderr


def test_overwrite_replaces_a_toy_dataset_by_its_manifest(cli, toy, image_folder, tmp_path):
    src, _ = image_folder
    out = tmp_path / "out"
    assert cli("encode", src, "-o", out, "-f", "toy", "--shard-size", "5").exit_code == 0
    # Another shard count, so other file names: the old ones are known only from the old manifest.
    r = cli("encode", src, "-o", out, "-f", "toy", "--shard-size", "20", "--overwrite")
    assert r.exit_code == 0, r.output
    assert files_in(out) == ["logitify-train-00000-of-00001.toy", "manifest.json"]
    # And into another format: the toy manifest still says which files are logitify's.
    r = cli("encode", src, "-o", out, "--shard-size", "20", "--overwrite")
    assert r.exit_code == 0, r.output
    assert files_in(out) == ["manifest.json", "train-00000-of-00001.npz"]
    # A file logitify did not write is never removed.
    assert cli("encode", src, "-o", out, "-f", "toy", "--overwrite").exit_code == 0
    (out / "notes.txt").write_text("mine")
    r = cli("encode", src, "-o", out, "-f", "toy", "--shard-size", "5", "--overwrite")
    assert r.exit_code == 1 and "notes.txt" in r.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_an_unregistered_format_is_refused(cli, image_folder, tmp_path):
    src, _ = image_folder
    r = cli("encode", src, "-o", tmp_path / "o", "-f", "toy")
    assert r.exit_code == 2 and "toy" in r.stderr


# -- the reader printed in docs/format.md -------------------------------------------------------

def doc_reader():
    """The docs' reader, run as it is printed (the block that starts with `# logitify_reader.py`)."""
    with open(os.path.join(ROOT, "docs", "format.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"```python\n(# logitify_reader\.py\n.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/format.md has one reader block"
    namespace = {"__name__": "logitify_reader"}
    exec(compile(blocks[0], "docs/format.md", "exec"), namespace)
    return namespace


def sample_pixels():
    out = {}
    for folder in sorted(os.listdir(SAMPLES)):
        for name in sorted(os.listdir(os.path.join(SAMPLES, folder))):
            out[f"{folder}/{name}"] = np.asarray(Image.open(os.path.join(SAMPLES, folder, name)).convert("RGB"))
    return out


@pytest.mark.parametrize("args", [["-f", "npz", "--shard-size", "16"], ["-f", "npz", "--compress"],
                                  ["-f", "tfrecord", "--shard-size", "16"], ["-f", "tfrecord", "--compress"]],
                         ids=["npz", "npz-deflate", "tfrecord", "tfrecord-gzip"])
def test_the_documented_reader_reads_what_logitify_reads(cli, tmp_path, args):
    out = tmp_path / "ds"
    r = cli("encode", SAMPLES, "-o", out, *args)
    assert r.exit_code == 0, r.output
    reader = doc_reader()
    manifest, shards = reader["read_dataset"](str(out))
    mine, theirs = list(shards), [d for _, d in lg.LogitDataset(str(out)).iter_shards()]
    assert len(mine) == len(theirs) == len(manifest["shards"])
    pixels = sample_pixels()
    seen = 0
    for a, b in zip(mine, theirs):
        assert sorted(a) == sorted(b) == ["keys", "labels", "logdet", "logits"]
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k])
        restored = reader["images"](a["logits"], manifest["transform"])
        assert restored.dtype == np.uint8
        for key, label, img in zip(a["keys"], a["labels"], restored):
            np.testing.assert_array_equal(img, pixels[key])
            assert manifest["classes"][label] == key.split("/")[0]
        seen += len(a["keys"])
    assert seen == manifest["num_examples"] == len(pixels)


@pytest.mark.parametrize("fmt", ["npz", "tfrecord"])
def test_the_documented_reader_reads_empty_shards_and_undecodable_names(cli, tmp_path, rng, fmt):
    """Shard 0 holds only unreadable inputs (an empty shard); a file name that is not UTF-8 is a key."""
    from conftest import save

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "1.png").write_bytes(b"not a png")
    (src / "a" / "2.png").write_bytes(b"")
    save(str(src / "b" / "ok.png"), rng.integers(0, 256, (6, 5, 3), dtype=np.uint8))
    name = os.path.join(os.fsencode(src / "b"), b"n\xffx.png")
    with open(name, "wb") as f:
        f.write((src / "b" / "ok.png").read_bytes())
    out = tmp_path / "ds"
    r = cli("encode", src, "-o", out, "-f", fmt, "--shard-size", "2")
    assert r.exit_code == 0, r.output
    reader = doc_reader()
    manifest, shards = reader["read_dataset"](str(out))
    mine, theirs = list(shards), [d for _, d in lg.LogitDataset(str(out)).iter_shards()]
    assert [len(s["keys"]) for s in mine] == [0, 2] and len(manifest["skipped"]) == 2
    for a, b in zip(mine, theirs, strict=True):
        for k in ("logits", "logdet", "keys", "labels"):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k])
    assert "b/n\udcffx.png" in list(mine[1]["keys"])
    assert np.array_equal(reader["images"](mine[1]["logits"], manifest["transform"])[0],
                          reader["images"](mine[1]["logits"], manifest["transform"])[1])


def test_the_documented_reader_refuses_an_altered_shard(cli, tmp_path):
    out = tmp_path / "ds"
    assert cli("encode", SAMPLES, "-o", out, "-f", "tfrecord").exit_code == 0
    shard = next(out.glob("*.tfrecord-*"))
    data = bytearray(shard.read_bytes())
    data[40] ^= 1
    shard.write_bytes(bytes(data))
    reader = doc_reader()
    with pytest.raises(ValueError, match="sha256"):
        list(reader["read_dataset"](str(out))[1])
    with pytest.raises(ValueError, match="CRC"):
        list(reader["tfrecords"](str(shard), False))


# -- the example format printed in ARCHITECTURE.md ---------------------------------------------

def test_the_architecture_example_format_works_as_printed(cli, image_folder, tmp_path):
    import types

    with open(os.path.join(ROOT, "ARCHITECTURE.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(# logitify_cli/formats/raw\.py\n.*?)```", f.read(), re.S)
    assert len(blocks) == 1
    module = types.ModuleType("logitify_cli.formats.raw")
    module.__package__ = "logitify_cli.formats"
    exec(compile(blocks[0], "ARCHITECTURE.md", "exec"), module.__dict__)
    formats.register(module.RawFormat())
    try:
        src, truth = image_folder
        raw, npz = tmp_path / "raw", tmp_path / "npz"
        assert cli("encode", src, "-o", raw, "-f", "raw", "--shard-size", "5").exit_code == 0
        assert cli("encode", src, "-o", npz, "--shard-size", "5").exit_code == 0
        assert sorted(p.name for p in raw.glob("*.raw")) == [f"logitify-train-{i:05d}-of-00003.raw" for i in range(3)]
        for a, b in zip(lg.iter_numpy(str(raw)), lg.iter_numpy(str(npz)), strict=True):
            for k in ("logits", "logdet", "keys", "labels"):
                np.testing.assert_array_equal(a[k], b[k])
        got = list(lg.load(str(raw), with_keys=True, with_labels=True).as_numpy_iterator())
        want = list(lg.load(str(npz), with_keys=True, with_labels=True).as_numpy_iterator())
        assert len(got) == len(want) == len(truth)
        for g, w in zip(got, want):
            for x, y in zip(g, w):
                np.testing.assert_array_equal(x, y)
        assert cli("verify", raw).exit_code == 0
    finally:
        formats.FORMATS.pop("raw", None)


@pytest.mark.parametrize("fmt", ["npz", "tfrecord", "toy"])
def test_read_fields_gives_read_chunks_arrays_and_npz_leaves_logits_unread(cli, toy, image_folder, tmp_path, fmt):
    """Passes that need the keys alone get the same arrays; npz does not read a logits member to give them."""
    from logitify_cli.dataset import LogitDataset

    src, _ = image_folder
    out = tmp_path / "ds"
    assert cli("encode", src, "-o", out, "-f", fmt, "--shard-size", "5").exit_code == 0
    ds = LogitDataset(str(out))
    for fields in (("keys",), ("keys", "labels"), ("logdet", "labels"), ("logits", "keys")):
        for shard in ds.shards:
            whole = list(ds.iter_chunks(shard, rows=2))
            some = list(ds.iter_chunks(shard, rows=2, fields=fields))
            assert [tuple(c) for c in some] == [fields] * len(whole)
            for a, b in zip(whole, some):
                for f in fields:
                    np.testing.assert_array_equal(a[f], b[f])
    if fmt != "npz":
        return
    import zipfile

    shard = ds.shards[0]
    path = out / shard.file
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("logits.npy")
    data = bytearray(path.read_bytes())
    at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size - 8
    data[at:at + 8] = b"\xff" * 8  # the last logits, past the .npy header: the member's CRC-32 no longer holds
    path.write_bytes(bytes(data))
    keys = np.concatenate([c["keys"] for c in ds.iter_chunks(shard, check=False, fields=("keys",))])
    assert len(keys) == shard.num_examples
    with pytest.raises(LogitifyError, match="logits"):
        list(ds.iter_chunks(shard, check=False))


@pytest.mark.parametrize("fmt_name", ["npz", "tfrecord", "toy"])
def test_every_format_writes_an_index_ownership_can_find(toy, fmt_name):
    """A journal's shards are found by the numbers in their names (outdir.header_owns): every shard of every
    count, with digits in the dataset and split names too, is owned, and near misses are not."""
    from logitify_cli import formats
    from logitify_cli.outdir import header_files, header_owns

    fmt = formats.get(fmt_name)
    for name, split in (("mnist", "train"), ("ds10", "v2"), ("00003", "s00001")):
        for count in (1, 7, 100, 99999):
            header = {"format": fmt.name, "num_shards": count, "name": name, "split": split}
            indexes = sorted({0, count // 2, count - 1})
            files = [fmt.shard_file(name, split, i, count) for i in indexes]
            assert all(header_owns(header, f) for f in files), (name, split, count)
            if count < 100:
                assert header_files(header) == [fmt.shard_file(name, split, i, count) for i in range(count)]
            for f in files:
                assert not header_owns(header, f + "\n") and not header_owns(header, "x" + f)
            assert not header_owns(header, fmt.shard_file(name, split, count, count))
            assert not header_owns({**header, "num_shards": count + 1}, files[-1])
