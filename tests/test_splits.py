"""Several splits in one dataset folder: added in later runs, or held out in the same run."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import photo, save


def tree(root):
    """sha256 of every file under root, by relative path: the whole folder's bytes."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def two_folders(tmp_path, rng):
    """A train folder (classes cats, dogs, owls) and a test folder lacking owls; {key: array} of each."""
    folders = {}
    for split, counts in (("train", {"cats": 5, "dogs": 4, "owls": 3}), ("test", {"cats": 2, "dogs": 3})):
        truth = {}
        for cls, n in counts.items():
            for i in range(n):
                arr = photo(rng, 12, 16)
                key = f"{cls}/{split}_{i}.png"
                save(str(tmp_path / split / key), arr)
                truth[key] = arr
        folders[split] = (tmp_path / split, truth)
    return folders


def test_a_split_added_in_a_second_run_loads_everywhere(cli, two_folders, tmp_path):
    (train, train_truth), (test, test_truth) = two_folders["train"], two_folders["test"]
    out = tmp_path / "ds"
    assert cli("encode", train, "-o", out, "-f", "tfrecord", "--shard-size", "5").exit_code == 0
    one = json.loads((out / "manifest.json").read_text())
    r = cli("encode", test, "-o", out, "-f", "tfrecord", "--split", "test", "--shard-size", "5", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 2 and sorted(m["splits"]) == ["test", "train"]
    assert m["splits"]["train"]["shards"] == one["shards"]  # the first split is untouched
    assert m["splits"]["train"]["fingerprint"] == one["fingerprint"]
    assert m["splits"]["test"]["num_examples"] == len(test_truth)
    # TFDS: both splits with their counts; the test labels mean the dataset's classes
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder_from_directory(str(out))
    assert {n: s.num_examples for n, s in builder.info.splits.items()} == {"train": 12, "test": 5}
    assert builder.info.features["label"].names == ["cats", "dogs", "owls"]
    for split, truth in (("train", train_truth), ("test", test_truth)):
        got = list(tfds.as_numpy(builder.as_dataset(split=split)))
        assert sorted(ex["key"].decode() for ex in got) == sorted(truth)
        names = builder.info.features["label"].names
        assert all(names[ex["label"]] == ex["key"].decode().split("/")[0] for ex in got)
    # logitify's own loaders, per split; without a split the choice is refused, naming the splits
    import logitify_cli as lg
    from logitify_cli.errors import LogitifyError

    for split, truth in (("train", train_truth), ("test", test_truth)):
        keys = [k.numpy().decode() for _, _, k in lg.load(str(out), with_keys=True, split=split)]
        assert sorted(keys) == sorted(truth)
        ds = lg.LogitDataset(str(out), split=split)
        for arrays in lg.iter_numpy(str(out), split=split):
            for key, img in zip(arrays["keys"], ds.inverse(arrays["logits"])):
                np.testing.assert_array_equal(img, truth[key])
    with pytest.raises(LogitifyError, match="test, train"):
        lg.load(str(out))
    # the standard-library reader printed in docs/format.md reads each split, and refuses to guess
    from test_formats import doc_reader

    reader = doc_reader()
    for split, truth in (("train", train_truth), ("test", test_truth)):
        man, shards = reader["read_dataset"](str(out), split)
        got = {str(k): img for sh in shards for k, img in zip(sh["keys"], reader["images"](sh["logits"], man["transform"]))}
        assert sorted(got) == sorted(truth) and all(np.array_equal(got[k], truth[k]) for k in truth)
        assert reader["fingerprint"](*reader["read_dataset"](str(out), split)) == m["splits"][split]["fingerprint"]
    with pytest.raises(ValueError, match="name one of the splits"):
        reader["read_dataset"](str(out))
    with pytest.raises(LogitifyError, match="no split 'val'"):
        lg.LogitDataset(str(out), split="val")
    # info, verify and decode know both
    info = json.loads(cli("info", out, "--json").stdout)
    assert info["split_names"] == ["test", "train"]
    assert {n: s["num_examples"] for n, s in info["splits"].items()} == {"train": 12, "test": 5}
    assert info["splits"]["test"]["fingerprint"] == m["splits"]["test"]["fingerprint"]
    assert info["splits"]["test"]["class_counts"] == {"cats": 2, "dogs": 3}
    r = cli("verify", out, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["num_examples"] == 17
    assert cli("verify", out, "--split", "test", "--against", test).exit_code == 0
    assert cli("verify", out, "--against", test).exit_code == 2  # which split? named in the error
    assert cli("decode", out, "-o", tmp_path / "back").exit_code == 0
    for split, truth in (("train", train_truth), ("test", test_truth)):
        for key, arr in truth.items():
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "back" / split / key)), arr)
    assert cli("decode", out, "-o", tmp_path / "only", "--split", "test").exit_code == 0
    assert sorted(str(p.relative_to(tmp_path / "only")) for p in (tmp_path / "only").rglob("*.png")) == sorted(test_truth)


MISMATCHES = [(["--alpha", "0.1"], "alpha", "0.05", "0.1"), (["--bits", "5"], "bits", "8", "5"),
              (["--seed", "3"], "seed", "0", "3"), (["--noise", "none"], "noise", "'uniform'", "'none'"),
              (["--corruption-level", "0.5"], "corruption_level", "1.0", "0.5"),
              (["-f", "tfrecord"], "format", "'npz'", "'tfrecord'"), (["--size", "8x8"], "shape", "[12, 16, 3]", "[8, 8, 3]"),
              (["--channels", "1"], "shape", "[12, 16, 3]", "[12, 16, 1]"), (["--compress"], "compressed", "False", "True"),
              (["--name", "other"], "name", "'logitify'", "'other'"),
              (["--crop", "0,0,12,16"], "crop", "None", "[0, 0, 12, 16]")]


def test_a_split_that_differs_is_refused_and_nothing_is_touched(cli, two_folders, tmp_path):
    (train, _), (test, _) = two_folders["train"], two_folders["test"]
    out = tmp_path / "ds"
    assert cli("encode", train, "-o", out).exit_code == 0
    assert cli("encode", test, "-o", out, "--split", "val").exit_code == 0
    before = tree(out)
    for args, field, there, here in MISMATCHES:
        for extra in ([], ["--overwrite"]):  # replacing one split is held to the others just the same
            r = cli("encode", test, "-o", out, "--split", "test" if not extra else "val", *args, *extra)
            assert r.exit_code == 1 and f": {field} is {there} there, {here} in this run" in r.stderr, r.stderr
            assert "nothing was written" in r.stderr
            assert tree(out) == before


def test_adding_a_split_never_replaces_a_file_it_did_not_write(cli, two_folders, tmp_path):
    """A user's file, or link, named like a shard of the new split is refused, not replaced."""
    (train, _), (test, _) = two_folders["train"], two_folders["test"]
    out = tmp_path / "ds"
    assert cli("encode", train, "-o", out).exit_code == 0
    outside = tmp_path / "outside.txt"
    outside.write_text("theirs")
    (out / "test-00000-of-00001.npz").write_text("mine")
    (out / "test-00000-of-00001.npz.link").symlink_to(outside)  # not a shard name: left alone
    before = tree(out)
    r = cli("encode", test, "-o", out, "--split", "test")
    assert r.exit_code == 1 and "test-00000-of-00001.npz, which logitify did not write" in r.stderr, r.stderr
    assert tree(out) == before and outside.read_text() == "theirs"
    os.remove(out / "test-00000-of-00001.npz")
    os.symlink(outside, out / "test-00000-of-00001.npz")
    r = cli("encode", test, "-o", out, "--split", "test")
    assert r.exit_code == 1 and "which logitify did not write" in r.stderr, r.stderr
    assert os.path.islink(out / "test-00000-of-00001.npz") and outside.read_text() == "theirs"


def test_classes_of_a_later_split(cli, two_folders, tmp_path, rng):
    (train, _), (test, _) = two_folders["train"], two_folders["test"]
    out = tmp_path / "ds"
    assert cli("encode", test, "-o", out, "--split", "test").exit_code == 0  # cats, dogs
    before = tree(out)
    r = cli("encode", train, "-o", out)  # brings owls: a label the dataset does not have
    assert r.exit_code == 1 and "class 'owls' is not one of the dataset's classes" in r.stderr
    assert tree(out) == before
    flat = tmp_path / "flat"
    save(str(flat / "a.png"), photo(rng, 12, 16))
    r = cli("encode", flat, "-o", out, "--split", "unlabelled")
    assert r.exit_code == 1 and tree(out) == before
    assert "classes are ['cats', 'dogs'], this run's are none (its images are not in class folders)" in r.stderr
    assert "None" not in r.stderr


def test_overwrite_replaces_only_its_split(cli, two_folders, tmp_path):
    (train, _), (test, test_truth) = two_folders["train"], two_folders["test"]
    out = tmp_path / "ds"
    assert cli("encode", train, "-o", out, "--shard-size", "4").exit_code == 0
    assert cli("encode", train, "-o", out, "--split", "test", "--shard-size", "4").exit_code == 0
    train_files = {f: h for f, h in tree(out).items() if f.startswith("train-")}
    r = cli("encode", test, "-o", out, "--split", "test")
    assert r.exit_code == 1 and "already holds the split 'test'" in r.stderr
    assert cli("encode", test, "-o", out, "--split", "test", "--overwrite").exit_code == 0
    after = tree(out)
    assert {f: h for f, h in after.items() if f.startswith("train-")} == train_files
    assert sorted(f for f in after if f.startswith("test-")) == ["test-00000-of-00001.npz"]  # old 3 shards gone
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["test"]["num_examples"] == len(test_truth) and m["splits"]["train"]["num_examples"] == 12


def test_holdout_is_stable_when_files_are_added(cli, tmp_path, rng):
    src = tmp_path / "src"
    for i in range(40):
        save(str(src / f"{i:03d}.png"), photo(rng, 6, 6))

    def membership(out):
        import logitify_cli as lg

        return {split: {str(k) for a in lg.iter_numpy(str(out), split=split) for k in a["keys"]}
                for split in ("train", "test")}

    for split, holdout in ((None, "train"), ("val", "val")):  # the holdout must be another split than the run's
        r = cli("encode", src, "-o", tmp_path / "a", "--holdout", f"0.25:{holdout}", *(["--split", split] if split else []))
        assert r.exit_code == 2 and f"names the split {holdout!r} this run already makes" in r.stderr
    assert cli("encode", src, "-o", tmp_path / "a", "--holdout", "0.25:test").exit_code == 0
    first = membership(tmp_path / "a")
    assert first["test"] and first["train"] and not first["test"] & first["train"]
    assert len(first["test"] | first["train"]) == 40
    for i in range(40, 70):
        save(str(src / f"{i:03d}.png"), photo(rng, 6, 6))
    assert cli("encode", src, "-o", tmp_path / "b", "--holdout", "0.25:test", "--shard-size", "7").exit_code == 0
    second = membership(tmp_path / "b")
    assert first["test"] <= second["test"] and first["train"] <= second["train"]  # nobody moved
    # the rule itself: sha256 of a tag, the seed and the key, below the share
    tag = b"logitify-holdout\0"
    share = {k: int.from_bytes(hashlib.sha256(tag + b"0\0" + k.encode()).digest()[:8], "big") / 2 ** 64
             for k in second["test"] | second["train"]}
    assert second["test"] == {k for k, u in share.items() if u < 0.25}


def test_holdout_share_is_near_the_fraction():
    from logitify_cli.splits import holdout_mask

    keys = [f"img/{i}.png" for i in range(20000)]
    for seed, fraction in ((0, 0.1), (7, 0.5)):
        got = holdout_mask(seed, keys, fraction).mean()
        assert abs(got - fraction) < 4 * (fraction * (1 - fraction) / len(keys)) ** 0.5
    assert (holdout_mask(0, keys, 0.3) != holdout_mask(1, keys, 0.3)).any()  # the seed chooses another share


def test_resume_works_per_split(cli, two_folders, tmp_path, monkeypatch):
    """A killed run adding a split leaves the dataset's other splits as they were; --resume finishes it."""
    (train, _), (test, _) = two_folders["train"], two_folders["test"]
    out = tmp_path / "ds"
    assert cli("encode", train, "-o", out).exit_code == 0
    before = tree(out)
    import logitify_cli.shards as shards_mod

    real, calls = shards_mod.make_shard, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("logitify_cli.encode_run.make_shard", dying)
    r = cli("encode", test, "-o", out, "--split", "test", "--shard-size", "2")
    assert r.exit_code == 130
    assert {f: h for f, h in tree(out).items() if not f.startswith((".", "test-"))} == before
    # The journal stays exactly when a shard of the split does (one that names nothing there is dropped).
    made = [f for f in os.listdir(out) if "test-0" in f]  # a shard, or its temporary
    assert (out / ".logitify-journal-test.jsonl").exists() == bool(made), made
    monkeypatch.setattr("logitify_cli.encode_run.make_shard", real)
    assert cli("encode", test, "-o", out, "--split", "test", "--shard-size", "2", "--resume").exit_code == 0
    assert cli("encode", test, "-o", tmp_path / "whole", "--split", "test", "--shard-size", "2").exit_code == 0
    m, whole = (json.loads((d / "manifest.json").read_text()) for d in (out, tmp_path / "whole"))
    assert m["splits"]["test"]["shards"] == whole["shards"] and m["splits"]["test"]["fingerprint"] == whole["fingerprint"]
    assert not any(f.startswith(".") for f in os.listdir(out))
    assert cli("verify", out).exit_code == 0


def test_single_split_manifests_keep_their_layout(cli, two_folders, tmp_path):
    """One split: the version 1 layout every earlier logitify wrote and read."""
    out = tmp_path / "ds"
    assert cli("encode", two_folders["test"][0], "-o", out, "--split", "test").exit_code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["split"] == "test" and "splits" not in m
    assert cli("info", out, "--json").exit_code == 0 and json.loads(cli("info", out, "--json").stdout)["split"] == "test"


def test_a_split_joins_a_dataset_whose_manifest_predates_the_resize_options(cli, two_folders, tmp_path):
    """Manifests written before --resize-mode and --filter record a size alone (their resize was a bicubic
    stretch): a split made with those defaults joins them; one made with another filter does not."""
    (train, _), (test, _) = two_folders["train"], two_folders["test"]
    out = tmp_path / "ds"
    assert cli("encode", train, "-o", out, "--size", "8x8").exit_code == 0
    m = json.loads((out / "manifest.json").read_text())
    for source in [m["source"], *[s["source"] for s in m.get("splits", {}).values()]]:
        assert source.pop("resize_mode") == "stretch" and source.pop("filter") == "bicubic"
    (out / "manifest.json").write_text(json.dumps(m))
    r = cli("encode", test, "-o", out, "--split", "box", "--size", "8x8", "--filter", "box")
    assert r.exit_code == 1 and "filter is 'bicubic' there, 'box' in this run" in r.stderr, r.stderr
    r = cli("encode", test, "-o", out, "--split", "test", "--size", "8x8")
    assert r.exit_code == 0, r.output
    assert cli("verify", out).exit_code == 0


def test_a_one_split_dataset_with_a_name_splits_cannot_have_is_read_but_not_joined(cli, two_folders, tmp_path):
    """Early versions took any --split: such a dataset reads as ever, and adding a split to it is refused
    before anything is written (its manifest would name a split no dataset of several splits may have)."""
    a, b = two_folders["train"][0], two_folders["test"][0]
    out = tmp_path / "d"
    assert cli("encode", a, "-o", out).exit_code == 0
    m = json.loads((out / "manifest.json").read_text())
    m["split"] = "my-split"
    (out / "manifest.json").write_text(json.dumps(m))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert cli("verify", out).exit_code == 0
    r = cli("encode", b, "-o", out, "--split", "test")
    assert r.exit_code == 1 and "holds the split my-split" in r.stderr, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_stopped_overwrite_of_one_split_under_other_shard_names_is_finished_by_the_advice(cli, two_folders,
                                                                                           tmp_path, monkeypatch):
    """Replacing a split with another shard count (3 shards of 4 become 4 of 3: other shard names), stopped before its first new shard:
    the manifest still lists the old split, so only the journal lets --resume finish it. The journal stays,
    and the advised --resume gives what an unstopped run gives."""
    from logitify_cli import encode_run

    (train, _), (test, _) = two_folders["train"], two_folders["test"]
    out, whole = tmp_path / "ds", tmp_path / "whole"
    for d in (out, whole):
        assert cli("encode", train, "-o", d, "--shard-size", "4").exit_code == 0
        assert cli("encode", test, "-o", d, "--split", "test").exit_code == 0
    assert cli("encode", train, "-o", whole, "--shard-size", "3", "--overwrite").exit_code == 0

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(encode_run, "_run", stopped)
    r = cli("encode", train, "-o", out, "--shard-size", "3", "--overwrite")
    assert r.exit_code == 130 and "run again with --resume" in r.stderr, r.stderr
    monkeypatch.undo()
    r = cli("encode", train, "-o", out, "--shard-size", "3", "--resume")
    assert r.exit_code == 0, r.stderr
    m, w = (json.loads((d / "manifest.json").read_text()) for d in (out, whole))
    for split in ("train", "test"):
        assert sorted(m["splits"]) == ["test", "train"]
        for field in ("shards", "fingerprint", "num_examples"):
            assert m["splits"][split][field] == w["splits"][split][field], (split, field)
    assert cli("verify", out).exit_code == 0
