"""Prepared TFDS folders as a source, on datasets TFDS itself writes in the test.

Each dataset is a GeneratorBasedBuilder defined here and prepared with
download_and_prepare() into a temporary data_dir (nothing is downloaded),
once per module: two splits, a ClassLabel with names, an Image feature.
"""
import hashlib
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import photo, save

tfds = pytest.importorskip("tensorflow_datasets")

RGB_CLASSES = ["cat", "dog", "red eel"]
GRAY_CLASSES = ["zero", "one"]


def _images(seed, n, h, w, c):
    rng = np.random.default_rng(seed)
    return [photo(rng, h, w, c) for _ in range(n)]


class TinyPhotos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """RGB 10x14 photo-like images in three named classes; train 13, test 5."""

    VERSION = tfds.core.Version("1.0.0")
    SHARDS = None
    SPLITS = {"train": _images(1, 13, 10, 14, 3), "test": _images(2, 5, 10, 14, 3)}

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(10, 14, 3)),
            "label": tfds.features.ClassLabel(names=RGB_CLASSES),
        }))

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(name) for name in self.SPLITS}

    def _generate_examples(self, split):
        for i, img in enumerate(self.SPLITS[split]):
            yield f"{split}{i}", {"image": img, "label": i % 3}


class TinyGray(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Grayscale (H, W, 1) 9x7 images, two classes, two shards per split, and a nested second Image."""

    VERSION = tfds.core.Version("2.1.0")
    SHARDS = 2
    SPLITS = {"train": _images(3, 9, 9, 7, 1), "validation": _images(4, 4, 9, 7, 1)}

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "digit": tfds.features.Image(shape=(9, 7, 1)),
            "meta": {"thumb": tfds.features.Image(shape=(3, 3, 3)),
                     "kind": tfds.features.ClassLabel(names=["odd", "even"])},
            "label": tfds.features.ClassLabel(names=GRAY_CLASSES),
        }))

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(name) for name in self.SPLITS}

    @staticmethod
    def thumbs(split):
        return _images(7, len(TinyGray.SPLITS[split]), 3, 3, 3)

    def _generate_examples(self, split):
        for i, (img, thumb) in enumerate(zip(self.SPLITS[split], self.thumbs(split))):
            yield f"{split}{i}", {"digit": img, "label": i % 2, "meta": {"thumb": thumb, "kind": (i + 1) % 2}}


def _jpeg(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


class TinyJpeg(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """JPEG bytes stored as they are (as TFDS does for photographs given by path), one split."""

    VERSION = tfds.core.Version("1.0.0")
    SHARDS = None
    JPEGS = [_jpeg(a) for a in _images(6, 4, 24, 20, 3)]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(24, 20, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=["a", "b"]),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, data in enumerate(self.JPEGS):
            yield i, {"image": data, "label": i % 2}


def _prepare(builder_cls, root):
    builder = builder_cls(data_dir=str(root))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=builder_cls.SHARDS))
    return str(builder.data_dir)  # DATA_DIR/NAME/VERSION


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """{name: version folder} of the three datasets, prepared once for this module."""
    root = tmp_path_factory.mktemp("tfds")
    return {cls.__name__: _prepare(cls, root) for cls in (TinyPhotos, TinyGray, TinyJpeg)}


def _digest(arr):
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes() + str(arr.shape).encode()).hexdigest()


def decoded(folder):
    """{class folder: sorted digests of the PNGs in it} and the relative file names."""
    out, names = {}, []
    for root, _, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), folder)
            names.append(rel)
            arr = np.asarray(Image.open(os.path.join(root, f)))
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            out.setdefault(rel.split(os.sep)[0], []).append(_digest(arr))
    return {k: sorted(v) for k, v in out.items()}, sorted(names)


def truth(images, classes, channels=None):
    """What decode must give: {class name: sorted digests}, image i in class i % len(classes)."""
    out = {}
    for i, img in enumerate(images):
        out.setdefault(classes[i % len(classes)], []).append(_digest(img))
    return {k: sorted(v) for k, v in out.items()}


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_a_version_folder_encodes_every_split_with_class_names_and_decodes_bit_for_bit(cli, prepared, tmp_path):
    src = prepared["TinyPhotos"]
    r = cli("encode", src, "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["splits"] == {"train": 13, "test": 5} and res["num_examples"] == 18
    assert res["classes"] == RGB_CLASSES and res["warnings"] == []
    m = manifest(tmp_path / "o")
    assert m["classes"] == RGB_CLASSES and m["shape"] == [10, 14, 3] and sorted(m["splits"]) == ["test", "train"]
    for split, n in (("train", 13), ("test", 5)):
        t = m["splits"][split]["source"]["tfds"]
        assert (t["dataset"], t["version"], t["split"], t["image_key"], t["label_key"]) == \
            ("tiny_photos", "1.0.0", split, "image", "label")
        assert t["num_examples_promised"] == t["num_examples_found"] == n and t["counts_differ"] == []
    assert cli("decode", tmp_path / "o", "-o", tmp_path / "d").exit_code == 0
    for split, n in (("train", 13), ("test", 5)):
        got, names = decoded(tmp_path / "d" / split)
        assert got == truth(TinyPhotos.SPLITS[split], RGB_CLASSES)
        # keys are FILE:INDEX relative to the version folder, in class folders named by the class
        assert all(x.split(os.sep)[0] in RGB_CLASSES for x in names)
        assert {x.split(os.sep, 1)[1] for x in names} == \
            {f"tiny_photos-{split}.tfrecord-00000-of-00001:{i}.png" for i in range(n)}
    info = cli("info", tmp_path / "o")
    assert info.exit_code == 0 and "red eel" in info.stdout
    # One split, by name, and renamed
    r = cli("encode", src, "-o", tmp_path / "t", "--tfds-split", "test", "--split", "heldout")
    assert r.exit_code == 0, r.output
    m = manifest(tmp_path / "t")
    assert m["split"] == "heldout" and m["num_examples"] == 5 and m["source"]["tfds"]["split"] == "test"
    assert [x["sha256"] for x in m["shards"]] == \
        [x["sha256"] for x in manifest(tmp_path / "o")["splits"]["test"]["shards"]]  # the keys decide the bytes
    r = cli("encode", src, "-o", tmp_path / "x", "--split", "heldout")
    assert r.exit_code == 2 and "--tfds-split" in r.stderr and "train, test" in r.stderr


def test_holdout_is_checked_against_the_split_the_tfds_folder_names(cli, prepared, tmp_path):
    """--tfds-split test names the run's split: a holdout called test is refused, one called train is not."""
    src = prepared["TinyPhotos"]
    out = tmp_path / "o"
    r = cli("encode", src, "-o", out, "--tfds-split", "test", "--holdout", "0.4:test")
    assert r.exit_code == 2 and "--holdout names the split 'test' this run already makes" in r.stderr, r.output
    assert not out.exists() or os.listdir(out) == []  # refused before anything was written
    r = cli("encode", src, "-o", out, "--tfds-split", "test", "--holdout", "0.4:train", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert sorted(res["splits"]) == ["test", "train"] and sum(res["splits"].values()) == 5
    assert cli("verify", out).exit_code == 0


@pytest.mark.parametrize("runner", ["local", "beam"])
@pytest.mark.parametrize("shard_size", ["2", "3"])  # the same shard names as before, or other ones
def test_overwrite_of_a_tfds_dataset_beside_another_split_leaves_no_old_shard(cli, prepared, tmp_path, rng, runner,
                                                                              shard_size):
    """--overwrite remakes the TFDS folder's splits one run each, in a dataset that also holds a split of
    its own: the old shards of the split made later go too (no run then finds them unowned), with either runner."""
    src = prepared["TinyPhotos"]
    out = tmp_path / "o"
    assert cli("encode", src, "-o", out, "--shard-size", "2").exit_code == 0
    extra = tmp_path / "extra"
    for i in range(3):
        save(str(extra / "dog" / f"{i}.png"), photo(rng, 10, 14))
    assert cli("encode", extra, "-o", out, "--split", "extra").exit_code == 0
    old = {n for n in os.listdir(out) if n.endswith(".npz")}
    beam = ["--runner", "beam", "--", "--runner=DirectRunner", "--direct_running_mode=in_memory"]
    r = cli("encode", src, "-o", out, "--overwrite", "--shard-size", shard_size, *(beam if runner == "beam" else []))
    assert r.exit_code == 0, r.output
    m = manifest(out)
    assert sorted(m["splits"]) == ["extra", "test", "train"]
    named = {s["file"] for split in m["splits"].values() for s in split["shards"]}
    assert {n for n in os.listdir(out) if n.endswith(".npz")} == named
    assert bool(named & old - {n for n in old if n.startswith("extra-")}) == (shard_size == "2")  # names reused
    assert cli("verify", out).exit_code == 0


def test_a_tfds_folders_splits_into_a_bucket_are_refused_before_anything_runs(cli, prepared):
    """Each split's run would find the one before it in the bucket (written whole): one per prefix."""
    pytest.importorskip("apache_beam")
    r = cli("encode", prepared["TinyPhotos"], "-o", "s3://nowhere/x", "--runner", "beam")
    assert r.exit_code == 2 and "splits (train, test) go into a folder" in r.stderr and "--tfds-split" in r.stderr


def test_keys_survive_a_move_and_the_dataset_folder_picks_the_newest_version(cli, prepared, tmp_path):
    src = prepared["TinyPhotos"]
    assert cli("encode", src, "-o", tmp_path / "a", "--tfds-split", "train").exit_code == 0
    # The dataset folder above, moved elsewhere, with an older version beside the newest:
    # 1.10.0 is newer than 1.9.0 (not in string order), and stderr says which was taken, once.
    moved = tmp_path / "elsewhere" / "tiny_photos"
    shutil.copytree(src, moved / "1.10.0")
    shutil.copytree(src, moved / "1.9.0")
    (moved / "1.9.0" / "label.labels.txt").write_text("old\nnames\nhere\n")
    r = cli("encode", moved, "-o", tmp_path / "b", "--tfds-split", "train")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("using version 1.10.0") == 1 and "1.9.0" in r.stderr
    a, b = manifest(tmp_path / "a"), manifest(tmp_path / "b")
    assert b["classes"] == RGB_CLASSES
    assert a["shards"] == b["shards"] and a["fingerprint"] == b["fingerprint"]  # same keys, same bytes
    r = cli("verify", tmp_path / "a", "--against", moved / "1.10.0")
    assert r.exit_code == 0 and "13 equal to their sources" in r.stderr, r.output


def test_grayscale_and_nested_features(cli, prepared, tmp_path):
    src = prepared["TinyGray"]
    r = cli("encode", src, "-o", tmp_path / "o", "--tfds-split", "validation")
    assert r.exit_code == 2 and "digit" in r.stderr and "meta/thumb" in r.stderr and "--image-key" in r.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()
    r = cli("encode", src, "-o", tmp_path / "o", "--tfds-split", "validation", "--image-key", "digit")
    assert r.exit_code == 0, r.output
    m = manifest(tmp_path / "o")
    assert m["shape"] == [9, 7, 1] and m["classes"] == GRAY_CLASSES and m["num_examples"] == 4
    assert cli("decode", tmp_path / "o", "-o", tmp_path / "d").exit_code == 0
    assert decoded(tmp_path / "d")[0] == truth(TinyGray.SPLITS["validation"], GRAY_CLASSES)
    # The nested image, and the nested ClassLabel, whose names TFDS keeps in meta-kind.labels.txt
    assert os.path.exists(os.path.join(src, "meta-kind.labels.txt"))
    r = cli("encode", src, "-o", tmp_path / "n", "--image-key", "meta/thumb", "--label-key", "meta/kind",
            "--tfds-split", "train")
    assert r.exit_code == 0, r.output
    m = manifest(tmp_path / "n")
    assert m["shape"] == [3, 3, 3] and m["classes"] == ["odd", "even"] and m["num_examples"] == 9
    assert {k.split(":")[0] for k in _keys(tmp_path / "n")} == \
        {f"tiny_gray-train.tfrecord-0000{i}-of-00002" for i in range(2)}  # two shard files, both read
    assert cli("decode", tmp_path / "n", "-o", tmp_path / "dn").exit_code == 0
    thumbs = TinyGray.thumbs("train")
    want = {}
    for i, t in enumerate(thumbs):
        want.setdefault(["odd", "even"][(i + 1) % 2], []).append(_digest(t))
    assert decoded(tmp_path / "dn")[0] == {k: sorted(v) for k, v in want.items()}
    r = cli("encode", src, "-o", tmp_path / "x", "--image-key", "nope")
    assert r.exit_code == 2 and "nope" in r.stderr and "digit, meta/thumb" in r.stderr


def _keys(out):
    import logitify_cli as lg

    return [k for shard in lg.iter_numpy(str(out)) for k in shard["keys"]]


def test_jpeg_images_decode_as_pillow_decodes_them(cli, prepared, tmp_path):
    r = cli("encode", prepared["TinyJpeg"], "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "JPEG" in r.stderr and "Pillow" in r.stderr
    assert cli("decode", tmp_path / "o", "-o", tmp_path / "d").exit_code == 0
    want = truth([np.asarray(Image.open(io.BytesIO(b))) for b in TinyJpeg.JPEGS], ["a", "b"])
    assert decoded(tmp_path / "d")[0] == want


def _tampered(src, tmp_path, change):
    copy = tmp_path / "copy" / "1.0.0"
    shutil.copytree(src, copy)
    info = json.loads((copy / "dataset_info.json").read_text())
    change(info)
    (copy / "dataset_info.json").write_text(json.dumps(info))
    return copy


def test_a_split_that_gives_nothing_is_named_with_what_was_written_before_it(cli, prepared, tmp_path):
    """Every file of the test split gone: the error names the split, and says train is written and kept."""
    copy = _tampered(prepared["TinyPhotos"], tmp_path, lambda info: None)
    for f in copy.glob("*-test.tfrecord-*"):
        f.unlink()
    out = tmp_path / "o"
    r = cli("encode", copy, "-o", out)
    assert r.exit_code == 1, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("logitify: error: split test: ") and \
        "the split(s) train before it are written and kept; make the rest with --tfds-split test" in line, r.stderr
    assert manifest(out)["split"] == "train" and "splits" not in manifest(out)  # a dataset of that one split
    assert cli("verify", out).exit_code == 0


def test_a_programs_failed_split_carries_its_fields_and_crosses_processes(prepared, tmp_path):
    """The same failure through the library: SplitFailed names the split, the splits kept, what
    --tfds-split makes the rest with, and the cause, and keeps them all through pickling."""
    import pickle

    from logitify_cli.encode_run import run_encode
    from logitify_cli.errors import LogitifyError, SplitFailed
    from logitify_cli.planner import EncodeOptions
    from logitify_cli.report import Reporter

    copy = _tampered(prepared["TinyPhotos"], tmp_path, lambda info: None)
    for f in copy.glob("*-test.tfrecord-*"):
        f.unlink()
    with pytest.raises(SplitFailed) as caught:
        run_encode(EncodeOptions(sources=[str(copy)], out=str(tmp_path / "o"), split=None), Reporter(quiet=True))
    for e in (caught.value, pickle.loads(pickle.dumps(caught.value))):
        assert (e.split, e.kept, e.rest, e.exit_code) == ("test", ["train"], ["test"], 1)
        assert isinstance(e.cause, LogitifyError) and not isinstance(e.cause, SplitFailed)
        assert e.message == f"split test: {e.cause.message} (the split(s) train before it are written and kept; " \
            "make the rest with --tfds-split test)"


def test_a_record_with_damaged_data_is_skipped_and_its_file_still_counts_it(cli, prepared, tmp_path):
    """One flipped byte in a record's data: that record is skipped with its reason, and its file is not said
    to hold fewer records than dataset_info.json counts (it holds them all; one is damaged)."""
    copy = _tampered(prepared["TinyPhotos"], tmp_path, lambda info: None)
    (shard,) = copy.glob("*-test.tfrecord-*")
    data = bytearray(shard.read_bytes())
    data[12 + 5] ^= 0xFF  # inside record 0's data, past its 12-byte header
    shard.write_bytes(bytes(data))
    r = cli("encode", copy, "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [s["source"] for s in res["skipped"]] == [f"{shard.name}:0"] and "checksum" in res["skipped"][0]["reason"]
    assert not any("dataset_info.json says" in w for w in res["warnings"]), res["warnings"]
    t = manifest(tmp_path / "o")["splits"]["test"]["source"]["tfds"]
    assert t["counts_differ"] == [] and t["num_examples_found"] == 4


def test_a_count_that_disagrees_with_dataset_info_is_reported(cli, prepared, tmp_path):
    def more(info):
        train = next(s for s in info["splits"] if s["name"] == "train")
        train["shardLengths"][0] = str(int(train["shardLengths"][0]) + 2)

    copy = _tampered(prepared["TinyPhotos"], tmp_path, more)
    r = cli("encode", copy, "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    assert "holds 13 records, dataset_info.json says 15" in r.stderr
    assert "13 examples found, dataset_info.json promises 15" in r.stderr
    res = json.loads(r.stdout)
    assert res["splits"] == {"train": 13, "test": 5} and any("promises 15" in w for w in res["warnings"])
    m = manifest(tmp_path / "o")
    t = m["splits"]["train"]["source"]["tfds"]
    assert t["num_examples_promised"] == 15 and t["num_examples_found"] == 13
    assert t["counts_differ"] == [{"file": "tiny_photos-train.tfrecord-00000-of-00001", "expected": 15, "found": 13}]
    assert m["splits"]["test"]["source"]["tfds"]["counts_differ"] == []
    info = cli("info", tmp_path / "o", "--split", "train")
    assert info.exit_code == 0 and "13 examples, dataset_info.json promises 15" in info.stdout
    # A shard file dataset_info.json lists but that is gone: skipped by name, and counted
    os.remove(copy / "tiny_photos-test.tfrecord-00000-of-00001")
    shutil.copy(copy / "tiny_photos-train.tfrecord-00000-of-00001", copy / "tiny_photos-test.tfrecord-00000-of-00001.x")
    r = cli("encode", copy, "-o", tmp_path / "t", "--tfds-split", "test")
    assert r.exit_code == 1 and "no such file" in r.stderr and "0 examples found" in r.stderr


def test_what_cannot_be_read_is_refused_with_its_reason(cli, prepared, tmp_path):
    def array_record(info):
        info["fileFormat"] = "array_record"

    r = cli("encode", _tampered(prepared["TinyPhotos"], tmp_path, array_record), "-o", tmp_path / "o")
    assert r.exit_code == 1 and "array_record" in r.stderr and "TFRecord" in r.stderr
    r = cli("encode", prepared["TinyPhotos"], "-o", tmp_path / "o", "--tfds-split", "test,valid")
    assert r.exit_code == 2 and "'valid'" in r.stderr and "train, test" in r.stderr
    r = cli("encode", prepared["TinyPhotos"], prepared["TinyJpeg"], "-o", tmp_path / "o")
    assert r.exit_code == 2 and "on its own" in r.stderr
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(TinyPhotos.SPLITS["test"][0]).save(photos / "a.png")
    r = cli("encode", photos, "-o", tmp_path / "o", "--tfds-split", "train")
    assert r.exit_code == 2 and "--tfds-split" in r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("claim", ["numShards", "numShards as a number", "shardLengths"])
def test_a_shard_count_no_tfds_split_has_is_refused_before_a_name_is_made(cli, prepared, tmp_path, claim):
    """A few bytes of dataset_info.json claiming a trillion shards made a name for each (memory without
    bound, no end): refused at once."""
    def many(info):
        train = next(s for s in info["splits"] if s["name"] == "train")
        lengths = train.pop("shardLengths")
        if claim == "shardLengths":
            train["shardLengths"] = lengths + ["1"] * 100_000
        else:
            train["numShards"] = "1000000000000" if claim == "numShards" else 10**12

    r = cli("encode", _tampered(prepared["TinyPhotos"], tmp_path, many), "-o", tmp_path / "o")
    assert r.exit_code != 0 and "more than the 100,000 any prepared TFDS split has" in r.stderr, r.output


@pytest.mark.parametrize("field", ["a shard length", "split name", "filepathTemplate", "filepathTemplate format"])
def test_huge_values_in_dataset_info_are_refused_in_one_short_line(cli, prepared, tmp_path, field):
    """A stranger's dataset_info.json is quoted cut short, never whole."""
    def huge(info):
        train = next(s for s in info["splits"] if s["name"] == "train")
        if field == "a shard length":
            train["shardLengths"][0] = "9" * 1_000_000
        elif field == "split name":
            info["splits"].append({**train, "name": "x" * 1_000_000, "filepathTemplate": "{SPLIT}%"})
        elif field == "filepathTemplate":
            train["filepathTemplate"] = "{NOPE}" + "y" * 1_000_000
        else:  # the format error itself quotes the template
            train["filepathTemplate"] = "{SHARD_INDEX:" + "y" * 1_000_000 + "}"

    r = cli("encode", _tampered(prepared["TinyPhotos"], tmp_path, huge), "-o", tmp_path / "o")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert 0 < len(r.stderr) < 2000, r.stderr[:300]


def test_tfds_reads_logitifys_tfrecord_output_with_the_same_class_names(cli, prepared, tmp_path):
    r = cli("encode", prepared["TinyPhotos"], "-o", tmp_path / "o", "-f", "tfrecord", "--name", "tiny_logits")
    assert r.exit_code == 0, r.output
    builder = tfds.builder_from_directory(str(tmp_path / "o"))
    assert builder.info.features["label"].names == RGB_CLASSES
    assert (tmp_path / "o" / "label.labels.txt").read_text().split("\n")[:3] == RGB_CLASSES
    for split, n in (("train", 13), ("test", 5)):
        assert builder.info.splits[split].num_examples == n
        labels = sorted(int(ex["label"]) for ex in tfds.as_numpy(builder.as_dataset(split=split)))
        assert labels == sorted(i % 3 for i in range(n))
    # Made again with another alpha: --overwrite replaces every split the folder's splits are remade into
    r = cli("encode", prepared["TinyPhotos"], "-o", tmp_path / "o", "-f", "tfrecord", "--name", "tiny_logits",
            "--alpha", "0.1", "--overwrite")
    assert r.exit_code == 0, r.output
    m = manifest(tmp_path / "o")
    assert m["transform"]["alpha"] == 0.1 and {k: v["num_examples"] for k, v in m["splits"].items()} == \
        {"train": 13, "test": 5}


def test_metadata_of_older_tfds_versions_reads_the_same(cli, prepared, tmp_path):
    """features.json as TFDS 4.0 wrote it ({type, content} with plain content), numShards without
    shardLengths as before TFDS 3: the same features, files and shards."""
    src = prepared["TinyPhotos"]
    old = tmp_path / "old" / "1.0.0"
    shutil.copytree(src, old)
    feat = "tensorflow_datasets.core.features."
    (old / "features.json").write_text(json.dumps({
        "type": feat + "features_dict.FeaturesDict",
        "content": {
            "image": {"type": feat + "image_feature.Image",
                      "content": {"shape": [10, 14, 3], "dtype": "uint8", "encoding_format": None}},
            "label": {"type": feat + "class_label_feature.ClassLabel", "content": {"num_classes": 3}}}}))
    info = json.loads((old / "dataset_info.json").read_text())
    for s in info["splits"]:
        n = sum(int(x) for x in s.pop("shardLengths"))
        s.pop("filepathTemplate", None)
        s["numShards"] = "1"
        s["statistics"] = {"numExamples": str(n + (s["name"] == "test"))}  # one promised test example is missing
    del info["fileFormat"]
    (old / "dataset_info.json").write_text(json.dumps(info))
    assert cli("encode", src, "-o", tmp_path / "new", "--tfds-split", "test").exit_code == 0
    r = cli("encode", old, "-o", tmp_path / "o", "--tfds-split", "test")
    assert r.exit_code == 0, r.output
    assert "5 examples found, dataset_info.json promises 6" in r.stderr
    a, b = manifest(tmp_path / "new"), manifest(tmp_path / "o")
    assert a["shards"] == b["shards"] and b["classes"] == RGB_CLASSES


@pytest.mark.parametrize("bad", ["../../up", "a/../../b", "."])
def test_class_names_decode_cannot_use_as_folders_are_refused_at_encode(cli, prepared, tmp_path, bad):
    """Whatever encode takes, decode gives back: a class named '../../up' would be refused by decode (its
    images would land outside the folder), so encode refuses it first, by name, writing nothing."""
    copy = tmp_path / "copy" / "1.0.0"
    shutil.copytree(prepared["TinyPhotos"], copy)
    (copy / "label.labels.txt").write_text("\n".join([bad] + RGB_CLASSES[1:]) + "\n")
    r = cli("encode", copy, "-o", tmp_path / "o")
    assert r.exit_code == 1 and repr(bad) in r.stderr and "cannot name the folder" in r.stderr, r.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    (copy / "label.labels.txt").write_text("\n".join(["/abs/ok"] + RGB_CLASSES[1:]) + "\n")
    assert cli("encode", copy, "-o", tmp_path / "o", "--tfds-split", "train").exit_code == 0
    assert cli("decode", tmp_path / "o", "-o", tmp_path / "back").exit_code == 0
    assert (tmp_path / "back" / "abs" / "ok").is_dir()
    # Two names, one folder ('cat' and '/cat'): decode would mix their images, so encode refuses them too.
    (copy / "label.labels.txt").write_text("\n".join(["/" + RGB_CLASSES[1]] + RGB_CLASSES[1:]) + "\n")
    r = cli("encode", copy, "-o", tmp_path / "o2", "--tfds-split", "train")
    assert r.exit_code == 1 and f"classes 0 and 1 both decode into the folder '{RGB_CLASSES[1]}'" in r.stderr, \
        r.output


@pytest.mark.parametrize("count, said", [("1000000000000", "claims 1000000000000 classes"),
                                         ("-5", "not a whole number of classes"), (-5, "not a whole number"),
                                         (3.7, "not a whole number"), (True, "not a whole number"),
                                         (float("inf"), "not a whole number")])
def test_a_class_count_no_dataset_has_is_refused_without_naming_each_class(cli, prepared, tmp_path, count, said):
    """features.json claiming a trillion classes, with no names file: refused at once, not '0' ... '999999999999'
    made one string at a time; a count that is not a whole number is no count (it once made a dataset with
    no classes whose labels verify then refused)."""
    copy = tmp_path / "copy" / "1.0.0"
    shutil.copytree(prepared["TinyPhotos"], copy)
    os.remove(copy / "label.labels.txt")
    doc = json.loads((copy / "features.json").read_text())
    label = doc["featuresDict"]["features"]["label"]
    label["classLabel"] = {"numClasses": count}
    (copy / "features.json").write_text(json.dumps(doc))
    r = cli("encode", copy, "-o", tmp_path / "o")
    assert r.exit_code == 1 and said in r.stderr and "Traceback" not in r.output, r.output
