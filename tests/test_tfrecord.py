"""TFRecord in and out: TFDS-style inputs, TFDS-loadable outputs, the loaders."""
import gzip
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import reference as ref
from conftest import photo, save
import logitify_cli as lg


def example(tf, img_bytes, label=None, image_key="image"):
    f = {image_key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[img_bytes]))}
    if label is not None:
        f["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    return tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString()


def png_bytes(arr, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def tfds_input(tmp_path, rng):
    """Two TFDS-style shards, the second GZIP'd; returns (dir, {key: (array, label)})."""
    import tensorflow as tf

    d = tmp_path / "tfin"
    d.mkdir()
    truth = {}
    for shard in range(2):
        name = f"mnistish-train.tfrecord-{shard:05d}-of-00002"
        opts = tf.io.TFRecordOptions(compression_type="GZIP" if shard else "")
        with tf.io.TFRecordWriter(str(d / name), opts) as w:
            for i in range(5):
                arr = photo(rng, 12, 10)
                label = (shard * 5 + i) % 3
                w.write(example(tf, png_bytes(arr), label, image_key="image" if shard == 0 else "image/encoded"))
                truth[f"{d.name}/{name}:{i}"] = (arr, label)
    return d, truth


def load_all(out):
    m = json.loads((out / "manifest.json").read_text())
    if m["format"] == "npz":
        parts = [np.load(out / s["file"], allow_pickle=False) for s in m["shards"]]
        return m, {k: np.concatenate([p[k] for p in parts]) for k in ("logits", "logdet", "keys", "labels")}
    import tensorflow as tf

    keys, logits, logdet, labels = [], [], [], []
    for s in m["shards"]:
        for rec in tf.data.TFRecordDataset(str(out / s["file"]), compression_type="GZIP" if m["compressed"] else ""):
            ex = tf.train.Example.FromString(rec.numpy())
            f = ex.features.feature
            keys.append(f["key"].bytes_list.value[0].decode())
            labels.append(f["label"].int64_list.value[0])
            logdet.append(f["logdet"].float_list.value[0])
            # A plain parse: raw little-endian float32 bytes in HWC order.
            logits.append(np.frombuffer(f["logits"].bytes_list.value[0], "<f4").reshape(m["shape"]))
    return m, {"keys": np.array(keys), "labels": np.array(labels), "logdet": np.array(logdet, np.float32),
               "logits": np.stack(logits)}


def test_tfds_style_input_with_gzip(cli, tfds_input, tmp_path):
    d, truth = tfds_input
    os.chdir(tmp_path)
    files = sorted(p.name for p in d.iterdir())
    r = cli("encode", *[f"{d.name}/{f}" for f in files], "-o", "out")
    assert r.exit_code == 0, r.output
    m, a = load_all(tmp_path / "out")
    assert m["num_examples"] == 10 and m["skipped"] == []
    assert list(a["keys"]) == sorted(truth, key=lambda k: (k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1])))
    for key, y, label in zip(a["keys"], a["logits"], a["labels"]):
        arr, lab = truth[key]
        assert label == lab
        assert np.array_equal(ref.inverse_levels(y), arr)
    r = cli("decode", "out", "-o", "back")
    assert r.exit_code == 0, r.output
    for key, (arr, _) in truth.items():
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "back" / (key + ".png"))), arr)


def test_corrupt_records_are_skipped(cli, tfds_input, tmp_path):
    import tensorflow as tf

    d, truth = tfds_input
    good = d / "mnistish-train.tfrecord-00000-of-00002"
    data = good.read_bytes()
    cut = d / "cut.tfrecord"
    cut.write_bytes(data[: len(data) * 3 // 5])  # truncated in the middle of a record
    with tf.io.TFRecordWriter(str(d / "odd.tfrecord")) as w:
        w.write(example(tf, b"not an image", 1))
        w.write(tf.train.Example().SerializeToString())  # missing feature
        w.write(b"not even a proto \xff\xfe")
        w.write(example(tf, png_bytes(photo(np.random.default_rng(0), 12, 10)), 2))
    r = cli("encode", d, "-o", tmp_path / "o")  # a folder of TFRecords is not a folder of images ...
    assert r.exit_code == 1 and "no images" in r.stderr
    r = cli("encode", *sorted(d.iterdir()), "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    m, a = load_all(tmp_path / "o")
    reasons = {s["source"].rsplit("/", 1)[-1]: s["reason"] for s in m["skipped"]}
    assert "corrupt" in reasons["cut.tfrecord:2"] or "corrupt" in reasons["cut.tfrecord:3"]
    assert "odd.tfrecord:0" in reasons and "odd.tfrecord:1" in reasons and "odd.tfrecord:2" in reasons
    assert "no bytes feature" in reasons["odd.tfrecord:1"]
    assert any(k.endswith("odd.tfrecord:3") for k in a["keys"])
    assert sum(k.split("/")[-1].startswith("cut.tfrecord:") for k in a["keys"]) >= 2


# -- damage inside a file: what it costs, and that it is said -------------------------

def records_file(path, n, seed=0):
    """n labelled 8x6 PNG records written by TensorFlow; returns ([pixels], [header offsets])."""
    import tensorflow as tf

    arrs = [photo(np.random.default_rng([seed, i]), 8, 6) for i in range(n)]
    with tf.io.TFRecordWriter(str(path)) as w:
        for i, a in enumerate(arrs):
            w.write(example(tf, png_bytes(a), i))
    data, offsets = path.read_bytes(), [0]
    for _ in range(n - 1):
        offsets.append(offsets[-1] + 16 + int.from_bytes(data[offsets[-1]:offsets[-1] + 8], "little"))
    return arrs, offsets


def flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def encoded(out):
    """{key: pixels} of a dataset, through the exact inverse."""
    _, a = load_all(out)
    return {str(k).rsplit("/", 1)[-1]: ref.inverse_levels(y) for k, y in zip(a["keys"], a["logits"])}


def test_a_record_with_damaged_data_costs_only_itself(cli, tmp_path):
    """Its header still says where the next record starts: the records after it are encoded."""
    os.chdir(tmp_path)
    arrs, offsets = records_file(tmp_path / "bad.tfrecord", 7)
    flip(tmp_path / "bad.tfrecord", offsets[3] + 12 + 5)  # inside record 3's data
    r = cli("encode", "bad.tfrecord", "-o", "out", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["num_examples"] == 6
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (skip,) = m["skipped"]
    assert skip["source"] == "bad.tfrecord:3"
    assert "data checksum mismatch" in skip["reason"] and f"offset {offsets[3]}" in skip["reason"]
    got = encoded(tmp_path / "out")
    assert sorted(got) == [f"bad.tfrecord:{i}" for i in (0, 1, 2, 4, 5, 6)]
    for i in (0, 1, 2, 4, 5, 6):
        np.testing.assert_array_equal(got[f"bad.tfrecord:{i}"], arrs[i])
    r = cli("verify", "out", "--against", "bad.tfrecord")
    assert r.exit_code == 0 and "6 equal to their sources" in r.stderr, r.output
    r = cli("encode", "bad.tfrecord", "-o", "strict", "--on-error", "fail")
    assert r.exit_code == 1 and "bad.tfrecord:3" in r.stderr and "data checksum" in r.stderr


def test_a_damaged_record_header_says_what_it_hides(cli, tmp_path):
    """No record after a header that cannot be trusted can be located: the bytes lost are named."""
    os.chdir(tmp_path)
    arrs, offsets = records_file(tmp_path / "bad.tfrecord", 7)
    flip(tmp_path / "bad.tfrecord", offsets[3] + 2)  # record 3's length field
    size = (tmp_path / "bad.tfrecord").stat().st_size
    r = cli("encode", "bad.tfrecord", "-o", "out")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["num_examples"] == 3
    (skip,) = m["skipped"]
    assert skip["source"] == "bad.tfrecord:3"
    assert "length checksum mismatch" in skip["reason"] and f"offset {offsets[3]}" in skip["reason"]
    assert f"the {size - offsets[3] - 12} bytes after it cannot be read" in skip["reason"]  # records 4..6 among them
    assert skip["reason"] in r.stderr
    assert sorted(encoded(tmp_path / "out")) == [f"bad.tfrecord:{i}" for i in range(3)]
    r = cli("verify", "out", "--against", "bad.tfrecord")
    assert r.exit_code == 0 and "3 equal to their sources" in r.stderr, r.output


def test_verify_against_says_why_a_source_cannot_be_read_now(cli, tmp_path):
    """A source damaged or replaced after encode: verify names discovery's reason, not just "not found"."""
    os.chdir(tmp_path)
    records_file(tmp_path / "data.tfrecord", 5)
    assert cli("encode", "data.tfrecord", "-o", "out").exit_code == 0
    _, offsets = records_file(tmp_path / "data.tfrecord", 5)
    flip(tmp_path / "data.tfrecord", offsets[2] + 2)  # record 2's length field: 2..4 are out of reach
    r = cli("verify", "out", "--against", "data.tfrecord")
    assert r.exit_code == 1
    lines = {line.split(": ", 2)[1]: line for line in r.stderr.splitlines() if line.startswith("logitify: data")}
    assert sorted(lines) == [f"data.tfrecord:{i}" for i in (2, 3, 4)], r.stderr
    assert "its source cannot be read now: corrupt TFRecord data" in lines["data.tfrecord:2"]
    for i in (3, 4):
        assert "not found in the sources (data.tfrecord:2 cannot be read now: corrupt" in lines[f"data.tfrecord:{i}"]
    os.remove(tmp_path / "data.tfrecord")
    os.mkfifo(tmp_path / "data.tfrecord")
    r = cli("verify", "out", "--against", "data.tfrecord")
    assert r.exit_code == 1
    assert r.stderr.count("(data.tfrecord cannot be read now: not a regular file (a named pipe))") == 5, r.stderr


def test_records_damaged_after_they_were_counted_are_each_reported(cli, tmp_path, monkeypatch):
    """Files counted whole at discovery and damaged before they are read: every planned record is accounted for."""
    from logitify_cli import sources

    os.chdir(tmp_path)
    _, offsets = records_file(tmp_path / "data.tfrecord", 7)
    _, head_offsets = records_file(tmp_path / "head.tfrecord", 7, seed=1)
    discover = sources.discover

    def then_damaged(*args, **kwargs):
        inventory = discover(*args, **kwargs)
        flip(tmp_path / "data.tfrecord", offsets[3] + 12 + 5)
        flip(tmp_path / "head.tfrecord", head_offsets[3] + 2)
        return inventory

    monkeypatch.setattr(sources, "discover", then_damaged)
    r = cli("encode", "data.tfrecord", "head.tfrecord", "-o", "out")
    assert r.exit_code == 0, r.output
    assert "encoded 9 images" in r.stderr and "(5 skipped)" in r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {s["source"]: s["reason"] for s in m["skipped"]}
    assert sorted(reasons) == ["data.tfrecord:3"] + [f"head.tfrecord:{i}" for i in range(3, 7)]
    assert "data checksum mismatch" in reasons["data.tfrecord:3"]
    assert "length checksum mismatch" in reasons["head.tfrecord:3"]
    for i in range(4, 7):
        assert "unreachable after record 3" in reasons[f"head.tfrecord:{i}"]
    assert sorted(encoded(tmp_path / "out")) == \
        [f"data.tfrecord:{i}" for i in (0, 1, 2, 4, 5, 6)] + [f"head.tfrecord:{i}" for i in range(3)]


def tfds_folder(root, lengths):
    """A prepared TFDS folder, written by hand, of one split 'train' with 8x6 RGB images and no label."""
    root.mkdir()
    (root / "dataset_info.json").write_text(json.dumps({
        "name": "tiny", "version": "1.0.0",
        "splits": [{"name": "train", "shardLengths": [str(n) for n in lengths]}]}))
    image = {"pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
             "image": {"shape": {"dimensions": ["8", "6", "3"]}, "dtype": "uint8", "encodingFormat": "png"}}
    (root / "features.json").write_text(json.dumps({
        "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
        "featuresDict": {"features": {"image": image}}}))
    return [root / f"tiny-train.tfrecord-{i:05d}-of-{len(lengths):05d}" for i in range(len(lengths))]


def test_damage_in_tfds_shards_skips_only_what_it_must_and_names_every_record_lost(cli, tmp_path):
    """dataset_info.json says how many records a shard held, so each one a damaged header hides is named."""
    os.chdir(tmp_path)
    data, head = tfds_folder(tmp_path / "tiny", [7, 7])
    arrs, offsets = records_file(data, 7)
    _, head_offsets = records_file(head, 7, seed=1)
    flip(data, offsets[3] + 12 + 5)
    flip(head, head_offsets[3] + 2)
    r = cli("encode", "tiny", "-o", "out", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["num_examples"] == 9
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {s["source"]: s["reason"] for s in m["skipped"]}
    assert sorted(reasons) == [f"{data.name}:3"] + [f"{head.name}:{i}" for i in range(3, 7)]
    assert "data checksum mismatch" in reasons[f"{data.name}:3"]
    assert "length checksum mismatch" in reasons[f"{head.name}:3"]
    for i in range(4, 7):
        assert "unreachable after record 3" in reasons[f"{head.name}:{i}"]
    got = encoded(tmp_path / "out")
    assert sorted(got) == [f"{data.name}:{i}" for i in (0, 1, 2, 4, 5, 6)] + [f"{head.name}:{i}" for i in range(3)]
    for i in (0, 1, 2, 4, 5, 6):
        np.testing.assert_array_equal(got[f"{data.name}:{i}"], arrs[i])
    r = cli("verify", "out", "--against", "tiny")
    assert r.exit_code == 0 and "9 equal to their sources" in r.stderr, r.output


def test_tfrecord_output_equals_npz_and_loads_everywhere(cli, image_folder, tmp_path):
    src, truth = image_folder
    assert cli("encode", src, "-o", tmp_path / "n", "--shard-size", "6").exit_code == 0
    r = cli("encode", src, "-o", tmp_path / "t", "-f", "tfrecord", "--shard-size", "6", "--batch-size", "5")
    assert r.exit_code == 0, r.output
    m, t = load_all(tmp_path / "t")
    _, n = load_all(tmp_path / "n")
    assert [s["file"] for s in m["shards"]] == [f"logitify-train.tfrecord-{i:05d}-of-00003" for i in range(3)]
    assert list(t["keys"]) == list(n["keys"])
    assert t["logits"].tobytes() == n["logits"].tobytes() and t["logdet"].tobytes() == n["logdet"].tobytes()
    assert list(t["labels"]) == list(n["labels"])
    # Deterministic bytes for another batch size.
    assert cli("encode", src, "-o", tmp_path / "t2", "-f", "tfrecord", "--shard-size", "6", "--batch-size", "2").exit_code == 0
    assert json.loads((tmp_path / "t2" / "manifest.json").read_text())["shards"] == m["shards"]
    # TFDS loads it, with the classes as a ClassLabel.
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder_from_directory(str(tmp_path / "t"))
    assert builder.info.features["label"].names == ["cats", "dogs"]
    got = {ex["key"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split="train"))}
    assert len(got) == len(truth)
    for key, y in zip(n["keys"], n["logits"]):
        assert got[key]["logits"].dtype == np.float32 and got[key]["logits"].shape == (24, 32, 3)
        np.testing.assert_array_equal(got[key]["logits"], y)
    # The project's own loaders, both formats.
    import logitify_cli as lg

    for fmt in ("n", "t"):
        ys = [(k.numpy().decode(), y.numpy(), ld.numpy()) for y, ld, k in lg.load(str(tmp_path / fmt), with_keys=True)]
        assert [k for k, _, _ in ys] == list(n["keys"])
        np.testing.assert_array_equal(np.stack([y for _, y, _ in ys]), n["logits"])
        shards = list(lg.iter_numpy(str(tmp_path / fmt)))
        assert sum(len(s["keys"]) for s in shards) == len(truth)
        ds = lg.LogitDataset(str(tmp_path / fmt))
        np.testing.assert_array_equal(ds.inverse(shards[0]["logits"]), np.stack([truth[k] for k in shards[0]["keys"]]))
    # In TensorFlow on a device (--device gpu's road, here on the CPU), in batches of the size asked for.
    ds = lg.LogitDataset(str(tmp_path / "t"))
    np.testing.assert_array_equal(ds.inverse(shards[0]["logits"], "/CPU:0", batch_size=3),
                                  np.stack([truth[k] for k in shards[0]["keys"]]))
    assert ds.transform().batch_size == 3
    r = cli("decode", tmp_path / "t", "-o", tmp_path / "back")
    assert r.exit_code == 0
    for key, arr in truth.items():
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "back" / key)), arr)


def test_compress_writes_gzip(cli, image_folder, tmp_path):
    src, truth = image_folder
    r = cli("encode", src, "-o", tmp_path / "t", "-f", "tfrecord", "--compress")
    assert r.exit_code == 0, r.output
    m, t = load_all(tmp_path / "t")
    shard = tmp_path / "t" / m["shards"][0]["file"]
    assert shard.read_bytes()[:2] == b"\x1f\x8b"
    gzip.decompress(shard.read_bytes())  # a whole GZIP stream
    assert len(t["keys"]) == len(truth)
    r = cli("decode", tmp_path / "t", "-o", tmp_path / "back")
    assert r.exit_code == 0
    key = sorted(truth)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "back" / key)), truth[key])


# -- the hand-laid Example wire format ------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from logitify_cli.tfrecord_io import ExampleWriter, read_varint, wire_fields  # noqa: E402


# Examples read back as the shard reader walks them (formats/tfrecord._features), values decoded here.
def _feature(b: bytes):
    for kind, _, lst in wire_fields(b):
        if kind == 1:  # bytes_list
            return [v for f, w, v in wire_fields(lst) if f == 1 and w == 2]
        if kind == 2:  # float_list, packed or not
            vals = []
            for f, w, v in wire_fields(lst):
                if f == 1:
                    vals.extend(np.frombuffer(v, "<f4").tolist())
            return vals
        if kind == 3:  # int64_list, packed or not
            vals = []
            for f, w, v in wire_fields(lst):
                if f != 1:
                    continue
                if w == 0:
                    vals.append(v)
                else:
                    j = 0
                    while j < len(v):
                        x, j = read_varint(v, j)
                        vals.append(x)
            return [x - (1 << 64) if x >= 1 << 63 else x for x in vals]
    return []


def parse_example(record: bytes) -> dict:
    """{name: list of values} of a serialized tf.train.Example: the shard reader's walk of its map, each
    feature's values read here."""
    from logitify_cli.formats.tfrecord import _features

    return {bytes(name).decode("utf-8", "surrogatepass"): _feature(bytes(value))
            for name, value in _features(record).items()}


_keys = st.text(st.characters(codec="utf-8"), min_size=0, max_size=300).map(lambda s: s.encode("utf-8"))
# logits sizes around the varint length boundaries of 2**7 and 2**14, and typical ones
_sizes = st.sampled_from([0, 4, 124, 128, 132, 16380, 16384, 16388, 12288]) | st.integers(0, 40_000).map(lambda n: 4 * n)


@settings(max_examples=300, deadline=None)
@given(key=_keys, label=st.integers(-(2**63), 2**63 - 1),
       logdet=st.floats(width=32, allow_nan=False), size=_sizes, data=st.data())
def test_examples_are_protobufs_deterministic_bytes(key, label, logdet, size, data):
    """The same bytes as tf.train.Example.SerializeToString(deterministic=True): shard hashes hold."""
    import tensorflow as tf

    logits = data.draw(st.binary(min_size=size, max_size=size)) if size < 64 else np.random.default_rng(size).bytes(size)
    ld = np.float32(logdet)
    train = tf.train
    feats = {
        "key": train.Feature(bytes_list=train.BytesList(value=[key])),
        "label": train.Feature(int64_list=train.Int64List(value=[label])),
        "logdet": train.Feature(float_list=train.FloatList(value=[float(ld)])),
        "logits": train.Feature(bytes_list=train.BytesList(value=[logits])),
    }
    want = train.Example(features=train.Features(feature=feats)).SerializeToString(deterministic=True)
    got = ExampleWriter(size).serialize(key, label, ld.tobytes(), logits)
    assert got == want
    back = parse_example(got)
    assert back == {"key": [key], "label": [label], "logdet": [float(ld)], "logits": [logits]}


def test_example_writer_refuses_logits_of_the_wrong_size():
    with pytest.raises(ValueError, match="expected 12"):
        ExampleWriter(12).serialize(b"k", 0, b"\0\0\0\0", b"\0" * 8)


def test_record_labels_beside_class_folders_stay_inside_the_classes(cli, tmp_path, rng):
    """Class folders number the classes; a record's own label past them is skipped, so verify holds."""
    import tensorflow as tf

    from conftest import save

    for cls in ("cat", "dog"):
        save(str(tmp_path / "cls" / cls / "0.png"), photo(rng, 8, 8))
    with tf.io.TFRecordWriter(str(tmp_path / "l.tfrecord")) as w:
        for label in (0, 1, 7, -5):
            w.write(example(tf, png_bytes(photo(rng, 8, 8)), label))
    r = cli("encode", tmp_path / "cls", tmp_path / "l.tfrecord", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.stderr
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["classes"] == ["cat", "dog"] and m["num_examples"] == 4
    assert sorted(s["source"] for s in m["skipped"]) == ["l.tfrecord:2", "l.tfrecord:3"]
    assert "names none of the dataset's 2 classes" in r.stderr
    assert cli("verify", tmp_path / "o").exit_code == 0


def test_a_huge_promised_count_behind_a_damaged_header_is_one_entry(cli, tmp_path):
    """shardLengths comes from a stranger: 10**12 lost records are one range, not a list of 10**12."""
    os.chdir(tmp_path)
    data, head = tfds_folder(tmp_path / "tiny", [7, 10**12])
    records_file(data, 7)
    _, head_offsets = records_file(head, 7, seed=1)
    flip(head, head_offsets[3] + 2)
    r = cli("encode", "tiny", "-o", "out")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    lost = [s for s in m["skipped"] if s["source"].startswith(head.name)]
    assert [s["source"] for s in lost] == [f"{head.name}:3", f"{head.name}:4..{10**12 - 1}"]
    assert "999999999996 records" in lost[1]["reason"]


def test_records_whose_image_or_label_is_not_one_value_are_skipped_with_the_reason(cli, tmp_path):
    """Two images, a list of labels, a negative label: no guess, each skipped by name. A label feature of bytes
    or floats is not a class number: those records have no label, as records without one."""
    import tensorflow as tf

    img = png_bytes(photo(np.random.default_rng(0), 12, 10))

    def ex(images=(img,), **label):
        f = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=list(images)))}
        f.update({"label": tf.train.Feature(**label)} if label else {})
        return tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString()

    path = tmp_path / "odd.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
        for rec in (ex(int64_list=tf.train.Int64List(value=[3])), ex(images=(img, img)),
                    ex(int64_list=tf.train.Int64List(value=[1, 2])), ex(bytes_list=tf.train.BytesList(value=[b"cat"])),
                    ex(float_list=tf.train.FloatList(value=[1.0])), ex(int64_list=tf.train.Int64List(value=[-5])),
                    ex(int64_list=tf.train.Int64List(value=[])), ex()):
            w.write(rec)
    r = cli("encode", path, "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    m, a = load_all(tmp_path / "o")
    reasons = {s["source"].rsplit(":", 1)[-1]: s["reason"] for s in m["skipped"]}
    assert sorted(reasons) == ["1", "2", "5"], reasons
    assert "2 images, not one" in reasons["1"] and "holds 2 values" in reasons["2"] and "-5 is negative" in reasons["5"]
    # a label feature of bytes or floats numbers no class: no label, as with none at all
    assert sorted(zip((k.rsplit(":", 1)[-1] for k in a["keys"]), a["labels"].tolist())) == \
        [("0", 3), ("3", -1), ("4", -1), ("6", -1), ("7", -1)]
    # An image key the user named is the only one read: no other feature stands in for it
    r = cli("encode", path, "-o", tmp_path / "p", "--image-key", "nosuch")
    assert r.exit_code == 1 and "no bytes feature 'nosuch'" in r.stderr, r.stderr


def test_gzip_shards_of_records_over_a_mebibyte_read_back_whole(cli, tmp_path, rng):
    """A record of 1 MiB or more is inflated straight into its own buffer, and zlib may give more than asked:
    what comes after it belongs to the next record. Such a shard read back as 'unreadable'."""
    src = tmp_path / "src"
    for i in range(3):
        save(str(src / f"{i}.png"), rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))  # 1.08 MB of logits
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    assert cli("encode", src, "-o", plain, "-f", "tfrecord").exit_code == 0
    assert cli("encode", src, "-o", packed, "-f", "tfrecord", "--compress").exit_code == 0
    a, b = (list(lg.iter_numpy(str(d))) for d in (plain, packed))
    assert sum(len(x["keys"]) for x in b) == 3
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    r = cli("verify", packed)
    assert r.exit_code == 0, r.stderr
