"""End to end through the CLI, in-process: encode, decode, options, bad input."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

import reference as ref
from conftest import photo, save, small_pngs


def shard_hashes(out):
    m = json.loads((out / "manifest.json").read_text())
    hashes = {}
    for s in m["shards"]:
        digest = hashlib.sha256((out / s["file"]).read_bytes()).hexdigest()
        assert digest == s["sha256"]
        hashes[s["file"]] = digest
    return hashes


def load_npz(out):
    m = json.loads((out / "manifest.json").read_text())
    parts = [np.load(out / s["file"], allow_pickle=False) for s in m["shards"]]
    return m, {k: np.concatenate([p[k] for p in parts]) for k in ("logits", "logdet", "keys", "labels")}


def read_png(path):
    return np.asarray(Image.open(path))


def test_encode_decode_round_trip(cli, image_folder, tmp_path):
    src, truth = image_folder
    out = tmp_path / "out"
    r = cli("encode", src, "-o", out, "--shard-size", "5")
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    m, a = load_npz(out)
    assert m["num_examples"] == 13 and m["shape"] == [24, 32, 3] and m["format"] == "npz"
    assert m["classes"] == ["cats", "dogs"] and m["skipped"] == []
    assert [s["file"] for s in m["shards"]] == [f"train-{i:05d}-of-00003.npz" for i in range(3)]
    assert m["transform"] == {"alpha": 0.05, "corruption_level": 1.0, "noise": "uniform", "bits": 8, "seed": 0}
    assert m["logdet"]["convention"] == "tfgenzoo"
    assert m["logdet"]["bpd_offset_nats"] == pytest.approx(24 * 32 * 3 * np.log(256.0))
    assert sorted(a["keys"]) == sorted(truth) and list(a["keys"]) == sorted(truth)
    assert a["logits"].dtype == np.float32 and a["logdet"].dtype == np.float32 and a["labels"].dtype == np.int64
    for key, y, ld, label in zip(a["keys"], a["logits"], a["logdet"], a["labels"]):
        assert label == (0 if key.startswith("cats/") else 1)
        assert np.array_equal(ref.inverse_levels(y), truth[key])
        y64, ld64 = ref.forward(truth[key], key)
        np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-6)
        assert ld == pytest.approx(ref.logdet_from_logits(y, 0.05), rel=1e-5)
    back = tmp_path / "back"
    r = cli("decode", out, "-o", back)
    assert r.exit_code == 0, r.output
    for key, arr in truth.items():
        np.testing.assert_array_equal(read_png(back / key), arr)
    r = cli("invert", out, "-o", tmp_path / "back2", "--format", "npz")
    assert r.exit_code == 0, r.output
    listed = [line.split(None, 1) for line in cli("--help").stdout.splitlines() if line.startswith("  invert ")]
    assert listed == [["invert", "The same as decode (its other name)."]]  # not "alias: invert" of itself
    z = np.load(tmp_path / "back2" / "images-00000-of-00003.npz", allow_pickle=False)
    assert z["images"].dtype == np.uint8 and z["images"].shape == (5, 24, 32, 3)
    np.testing.assert_array_equal(z["images"][0], truth[str(z["keys"][0])])


def test_bytes_do_not_depend_on_batch_workers_or_source_order(cli, image_folder, tmp_path):
    src, _ = image_folder
    r = cli("encode", src, "-o", tmp_path / "a", "--shard-size", "4")
    assert r.exit_code == 0
    r = cli("encode", src, "-o", tmp_path / "b", "--shard-size", "4", "--batch-size", "3", "--workers", "2")
    assert r.exit_code == 0
    r = cli("encode", src / "dogs", src / "cats", "-o", tmp_path / "c", "--batch-size", "7", "--workers", "1")
    assert r.exit_code == 0
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    _, a = load_npz(tmp_path / "a")
    _, c = load_npz(tmp_path / "c")
    # Keys of per-folder sources differ (relative to each folder) but the cats' noise
    # depends on the key alone: re-encode cats as their own folder to compare.
    r = cli("encode", src / "cats", "-o", tmp_path / "d", "--batch-size", "2")
    _, d = load_npz(tmp_path / "d")
    assert set(c["keys"]) == {k.split("/", 1)[1] for k in a["keys"]}
    np.testing.assert_array_equal(d["logits"], c["logits"][np.isin(c["keys"], d["keys"])])
    r = cli("encode", src, "-o", tmp_path / "e", "--shard-size", "4", "--seed", "1")
    assert shard_hashes(tmp_path / "e") != shard_hashes(tmp_path / "a")


@pytest.mark.parametrize("opts,bits", [
    (["--alpha", "1e-6"], 8), (["--alpha", "0.99"], 8), (["--corruption-level", "0.5"], 8),
    (["--noise", "none"], 8), (["--bits", "5"], 5), (["--compress"], 8),
])
def test_exact_for_every_lossless_setting(cli, image_folder, tmp_path, opts, bits):
    src, truth = image_folder
    r = cli("encode", src, "-o", tmp_path / "o", *opts)
    assert r.exit_code == 0, r.output
    m, a = load_npz(tmp_path / "o")
    t = m["transform"]
    for key, y in zip(a["keys"], a["logits"]):
        levels = ref.inverse_levels(y, alpha=t["alpha"], c=t["corruption_level"], bits=t["bits"])
        assert np.array_equal(levels, truth[key] >> (8 - bits))
    r = cli("decode", tmp_path / "o", "-o", tmp_path / "back")
    assert r.exit_code == 0, r.output
    for key, arr in truth.items():
        np.testing.assert_array_equal(read_png(tmp_path / "back" / key), (arr >> (8 - bits)) << (8 - bits))


def test_gaussian_says_it_is_lossy(cli, image_folder, tmp_path):
    src, _ = image_folder
    r = cli("encode", src, "-o", tmp_path / "o", "--noise", "gaussian")
    assert r.exit_code == 0 and "lossy" in r.stderr
    r = cli("encode", src, "-o", tmp_path / "o2", "--noise", "gaussian", "-q")
    assert r.exit_code == 0 and r.stderr == "" and r.stdout == ""


def test_grayscale_folder_gives_one_channel(cli, tmp_path, rng):
    for i in range(3):
        save(str(tmp_path / "g" / f"{i}.png"), photo(rng, 8, 8, 1))
    r = cli("encode", tmp_path / "g", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    m, a = load_npz(tmp_path / "o")
    assert m["shape"] == [8, 8, 1] and m["classes"] is None and set(a["labels"]) == {-1}


def test_mixed_modes_and_formats_with_size(cli, tmp_path, rng):
    d = tmp_path / "mixed"
    arr = photo(rng, 30, 40)
    save(str(d / "a.png"), arr)
    save(str(d / "b.jpg"), arr)
    Image.fromarray(arr).convert("P").save(d / "c.gif")
    Image.fromarray(arr).convert("L").save(d / "d.bmp")
    Image.fromarray(arr).convert("RGBA").save(d / "e.webp", lossless=True)
    Image.fromarray(photo(rng, 50, 20)).convert("CMYK").save(d / "f.tiff")
    r = cli("encode", d, "-o", tmp_path / "o")
    assert r.exit_code == 1 and "f.tiff" in r.stderr and "--size" in r.stderr
    r = cli("encode", d, "-o", tmp_path / "o2", "--size", "16x12")
    assert r.exit_code == 0, r.output
    m, a = load_npz(tmp_path / "o2")
    assert m["num_examples"] == 6 and m["shape"] == [16, 12, 3]


def make_bad_files(d, rng):
    os.makedirs(d, exist_ok=True)
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("not an image")
    good = photo(rng, 16, 16)
    import io

    buf = io.BytesIO()
    Image.fromarray(photo(rng, 16, 16)).save(buf, "PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[:60])
    os.symlink(str(d / "missing-target.png"), d / "broken.png")
    (d / "folder.png").mkdir()
    (d / ".hidden.png").write_bytes(b"junk")
    (d / "._resource.png").write_bytes(b"junk")
    Image.new("1", (30000, 30000)).save(d / "bomb.png", optimize=True)
    save(str(d / "wrong_name.jpg"), good)  # a PNG named .jpg is still a good image
    return good


def test_bad_files_are_skipped_and_good_ones_kept(cli, image_folder, tmp_path, rng):
    src, truth = image_folder
    make_bad_files(src / "cats", rng)
    r = cli("encode", src, "-o", tmp_path / "o", "--size", "24x32")
    assert r.exit_code == 0, r.output
    m, a = load_npz(tmp_path / "o")
    skipped = {s["source"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {"cats/empty.png", "cats/text.jpg", "cats/truncated.png", "cats/broken.png", "cats/bomb.png"}
    assert "decompression bomb" in skipped["cats/bomb.png"] and "empty" in skipped["cats/empty.png"]
    for k in skipped:
        assert k in r.stderr
    assert set(truth) <= set(a["keys"]) and "cats/wrong_name.jpg" in set(a["keys"])
    assert m["num_examples"] == len(truth) + 1
    r = cli("encode", src, "-o", tmp_path / "f", "--size", "24x32", "--on-error", "fail")
    # The broken link is found unreadable at discovery, before any pixel is read: the run stops there.
    assert r.exit_code == 1 and "cats/broken.png" in r.stderr and "(--on-error fail)" in r.stderr
    assert "Traceback" not in r.output
    assert not (tmp_path / "f" / "manifest.json").exists()
    # Every input unreadable: --on-error fail still stops at the first, with its reason, and says nothing else.
    r = cli("encode", src / "cats" / "bomb.png", src / "cats" / "truncated.png", "-o", tmp_path / "g",
            "--on-error", "fail")
    assert r.exit_code == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "cannot read bomb.png: decompression bomb" in r.stderr and r.stderr.strip().endswith("(--on-error fail)")


@pytest.mark.parametrize("args", [["-f", "npz"], ["-f", "npz", "--compress"], ["-f", "tfrecord", "--compress"]])
def test_a_shard_with_skipped_inputs_is_the_shard_of_those_it_holds(cli, image_folder, tmp_path, args):
    """A shard is written while its inputs are read, opened for all of them; skips are settled at its close.

    Its bytes must be those of a shard made without the unreadable inputs at
    all: here one shard, so the layout is the same either way.
    """
    src, truth = image_folder
    r = cli("encode", src, "-o", tmp_path / "clean", "--batch-size", "3", *args)
    assert r.exit_code == 0, r.output
    for name, data in (("cats/aa-empty.png", b""), ("dogs/zz-broken.png", b"\x89PNG\r\n\x1a\nnot really"),
                       ("cats/mid-truncated.png", (src / "cats" / sorted(os.listdir(src / "cats"))[0]).read_bytes()[:60])):
        (src / name).write_bytes(data)
    r = cli("encode", src, "-o", tmp_path / "skips", "--batch-size", "3", *args)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "skips" / "manifest.json").read_text())
    assert len(m["skipped"]) == 3 and m["num_examples"] == len(truth)
    shard = m["shards"][0]["file"]
    assert len(m["shards"]) == 1 and shard == json.loads((tmp_path / "clean" / "manifest.json").read_text())["shards"][0]["file"]
    assert (tmp_path / "skips" / shard).read_bytes() == (tmp_path / "clean" / shard).read_bytes()
    assert [n for n in os.listdir(tmp_path / "skips") if ".tmp-" in n] == []
    assert cli("verify", tmp_path / "skips").exit_code == 0


@pytest.mark.parametrize("opt", [["--alpha", "0"], ["--alpha", "1.5"], ["--corruption-level", "0"], ["--bits", "9"],
                                 ["--size", "12"], ["--noise", "laplace"], ["--batch-size", "0"]])
def test_bad_usage_exits_2(cli, image_folder, tmp_path, opt):
    src, _ = image_folder
    r = cli("encode", src, "-o", tmp_path / "o", *opt)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_missing_source_and_existing_output(cli, image_folder, tmp_path):
    src, _ = image_folder
    r = cli("encode", tmp_path / "nope", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "nope" in r.stderr
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep me")
    r = cli("encode", src, "-o", tmp_path / "o")
    assert r.exit_code == 1 and "--overwrite" in r.stderr
    assert os.listdir(tmp_path / "o") == ["mine.txt"]
    # --overwrite replaces logitify's own files only: a folder of someone else's is refused, by name.
    r = cli("encode", src, "-o", tmp_path / "o", "--overwrite")
    assert r.exit_code == 1 and "mine.txt" in r.stderr
    assert os.listdir(tmp_path / "o") == ["mine.txt"]
    os.unlink(tmp_path / "o" / "mine.txt")
    assert cli("encode", src, "-o", tmp_path / "o").exit_code == 0
    assert cli("encode", src, "-o", tmp_path / "o", "--overwrite", "--seed", "3").exit_code == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["transform"]["seed"] == 3


def test_two_inputs_with_one_key_are_refused_by_name(cli, tmp_path, rng):
    for folder in ("a", "b"):
        save(str(tmp_path / folder / "same.png"), photo(rng, 8, 8))
        save(str(tmp_path / folder / f"only_{folder}.png"), photo(rng, 8, 8))
    r = cli("encode", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "o")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "'same.png'" in r.stderr
    assert os.path.join("a", "same.png") in r.stderr and os.path.join("b", "same.png") in r.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()
    # Different keys from two folders are fine.
    r = cli("encode", tmp_path / "a", tmp_path / "b" / "only_b.png", "-o", tmp_path / "o2")
    assert r.exit_code == 0, r.output


def test_class_folders_beside_loose_files(cli, tmp_path, rng):
    """The first sub-folder is the class, at any depth below it; loose files get -1."""
    for rel in ("zebra/deep/er/x.png", "ant/a.png", "loose.png", "zebra/z.png"):
        save(str(tmp_path / "src" / rel), photo(rng, 8, 8))
    r = cli("encode", tmp_path / "src", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    m, a = load_npz(tmp_path / "o")
    assert m["classes"] == ["ant", "zebra"]
    assert dict(zip(a["keys"], a["labels"].tolist())) == {
        "ant/a.png": 0, "loose.png": -1, "zebra/deep/er/x.png": 1, "zebra/z.png": 1}
    assert list(a["keys"]) == sorted(a["keys"])


def test_paths_on_stdin(cli, image_folder, tmp_path):
    src, truth = image_folder
    paths = sorted(str(p) for p in src.rglob("*.png"))
    r = cli("encode", "-", "-o", tmp_path / "o", "--json", input="\n".join(paths) + "\n")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["num_examples"] == len(truth)
    m, a = load_npz(tmp_path / "o")
    # absolute paths are keyed relative to the folder holding them all, so decode can write them back
    assert set(a["keys"]) == {os.path.relpath(p, src).replace(os.sep, "/") for p in paths}
    r = cli("encode", "-", "--null", "-o", tmp_path / "o2", "--json", input="\0".join(paths[:3]) + "\0")
    assert json.loads(r.stdout)["num_examples"] == 3
    # Two lists joined name some paths twice: each is one input, and the run says so.
    r = cli("encode", "-", "-o", tmp_path / "o3", "--json", input="\n".join(paths + paths[:2]) + "\n")
    res = json.loads(r.stdout)
    assert r.exit_code == 0 and res["num_examples"] == len(truth), r.output
    assert res["warnings"] == [f"2 source(s) named more than once, each read once: {paths[0]}, {paths[1]}"]
    # The same file spelled two ways is one input too, and so is a folder named by two spellings.
    other = os.path.join(os.path.dirname(paths[0]), ".", os.path.basename(paths[0]))
    r = cli("encode", paths[0], other, paths[1], "-o", tmp_path / "o4", "--json")
    res = json.loads(r.stdout)
    assert r.exit_code == 0 and res["num_examples"] == 2, r.output
    assert res["warnings"] == ["1 input(s) named more than once, in other spellings, each read once: "
                               f"{paths[0]} as {other}"]
    doubled = paths[1].replace(os.sep, os.sep * 2)  # a//b.png
    r = cli("encode", paths[1], doubled, "-o", tmp_path / "o6", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["num_examples"] == 1, r.output
    r = cli("verify", tmp_path / "o4", "--against", paths[0], other, paths[1])
    assert r.exit_code == 0 and "in other spellings, each read once" in r.stderr, r.output
    r = cli("encode", src, os.path.join(str(src), "..", src.name), "-o", tmp_path / "o5", "--json")
    res = json.loads(r.stdout)
    assert r.exit_code == 0 and res["num_examples"] == len(truth), r.output
    assert res["warnings"][0].startswith(f"{len(truth)} input(s) named more than once, in other spellings")
    assert load_npz(tmp_path / "o5")[1]["keys"].tolist() == load_npz(tmp_path / "o")[1]["keys"].tolist()


def test_decode_refuses_keys_that_escape(cli, tmp_path, rng):
    """A crafted dataset whose keys climb out: nothing lands outside the folder."""
    src = tmp_path / "one"
    save(str(src / "a.png"), photo(rng, 4, 4))
    assert cli("encode", src, "-o", tmp_path / "ds").exit_code == 0
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    z = dict(np.load(tmp_path / "ds" / m["shards"][0]["file"], allow_pickle=False))
    bad = ["../escape.png", "/abs/path.png", "ok/../../up.png", "nul\0.png", "fine/sub.png"]
    n = len(bad)
    arrays = {"logits": np.repeat(z["logits"], n, 0), "logdet": np.repeat(z["logdet"], n, 0),
              "keys": np.array(bad), "labels": np.full(n, -1, np.int64)}
    np.savez(tmp_path / "ds" / m["shards"][0]["file"], **arrays)
    m["shards"][0].update(num_examples=n, sha256=hashlib.sha256((tmp_path / "ds" / m["shards"][0]["file"]).read_bytes()).hexdigest())
    m["num_examples"] = n
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "sandbox" / "out"
    r = cli("decode", tmp_path / "ds", "-o", out)
    assert r.exit_code == 1 and "refused" in r.stderr
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png") if "one" not in p.parts)
    assert written == ["sandbox/out/fine/sub.png"]


@pytest.mark.parametrize("queued", ["default", "tiny"])
def test_gpu_without_gpu_is_a_clear_error(cli, image_folder, tmp_path, monkeypatch, queued):
    """Also when a shard holds more batches than its feed queues: the run stops, it does not wait forever."""
    import threading

    import tensorflow as tf

    from logitify_cli.shards import ShardFeed

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    if queued == "tiny":
        monkeypatch.setattr(ShardFeed, "FEED_BYTES", 1)  # two batches of one image wait; 13 images in the shard
    src, _ = image_folder
    box = {}
    t = threading.Thread(target=lambda: box.update(r=cli("encode", src, "-o", tmp_path / "o", "--device", "gpu",
                                                         "--batch-size", 1)), daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "encode still waiting after 120 s"
    r = box["r"]
    assert r.exit_code == 1 and "GPU" in r.stderr and "Traceback" not in r.output


def test_a_failed_decode_leaves_no_empty_folder_behind(cli, image_folder, tmp_path):
    """A folder decode made and wrote nothing into is removed when it fails; a folder that was there stays."""
    src, _ = image_folder
    assert cli("encode", src, "-o", tmp_path / "ds").exit_code == 0
    shard = next((tmp_path / "ds").glob("*.npz"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the sha256 no longer matches: refused before any image is written
    shard.write_bytes(bytes(data))
    r = cli("decode", tmp_path / "ds", "-o", tmp_path / "new" / "out")
    assert r.exit_code == 1 and shard.name in r.stderr
    assert not (tmp_path / "new" / "out").exists()
    (tmp_path / "mine").mkdir()
    r = cli("decode", tmp_path / "ds", "-o", tmp_path / "mine", "--overwrite")
    assert r.exit_code == 1 and (tmp_path / "mine").is_dir()


@pytest.mark.parametrize("name", ["../escaped", "/abs/name", "sub/x", "a\\b", ".hidden", "", "x" * 129, "a\nb"])
def test_a_dataset_name_stays_inside_the_output_folder(cli, image_folder, tmp_path, name):
    """--name starts every shard's file name: a path there would write outside -o."""
    src, _ = image_folder
    (tmp_path / "parent").mkdir()
    r = cli("encode", src, "-o", tmp_path / "parent" / "out", "-f", "tfrecord", "--name", name)
    assert r.exit_code == 2 and "--name" in r.stderr
    assert sorted(p.name for p in (tmp_path / "parent").iterdir()) == []
    assert not list(tmp_path.glob("**/*escaped*")) and not list(tmp_path.glob("**/*.tfrecord*"))


def test_a_run_that_fails_as_its_readers_start_frees_the_folder(cli, image_folder, tmp_path, monkeypatch):
    """A reader lost at the start (out of memory, say) fails the run; the next run may take the folder."""
    from logitify_cli import pixels
    from logitify_cli.errors import LogitifyError

    src, _ = image_folder

    def lost(self):
        raise LogitifyError("a worker process died")

    with monkeypatch.context() as m:
        m.setattr(pixels.PixelStream, "start", lost)
        r = cli("encode", src, "-o", tmp_path / "o")
    assert r.exit_code == 1 and "worker process died" in r.stderr
    r = cli("encode", src, "-o", tmp_path / "o", "--overwrite")
    assert r.exit_code == 0, r.stderr


def test_decode_into_a_bucket_needs_beam(cli, dataset, tmp_path, monkeypatch):
    """The local runner checks, locks and overwrites local folders only: it made ./s3:/... here."""
    _, _, ds = dataset
    monkeypatch.chdir(tmp_path)
    r = cli("decode", ds, "-o", "s3://bucket/restored")
    assert r.exit_code == 2 and "--runner beam" in r.stderr
    assert not (tmp_path / "s3:").exists()


@pytest.mark.parametrize("opt,value", [("--corruption-level", "nan"), ("--corruption-level", "inf"),
                                       ("--corruption-level", "1e39"), ("--alpha", "1e-40")])
def test_transform_values_float32_cannot_carry_are_usage_errors(cli, image_folder, tmp_path, opt, value):
    src, _ = image_folder
    r = cli("encode", src, "-o", tmp_path / "o", opt, value)
    assert r.exit_code == 2 and "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_an_image_of_another_size_names_the_size_option_to_pass(cli, image_folder, tmp_path, rng):
    """The suggestion is given in --size's own order (height x width), ready to paste."""
    from conftest import photo, save

    src, _ = image_folder  # 24 high, 32 wide
    save(str(src / "dogs" / "zz_odd.png"), photo(rng, 20, 16))
    r = cli("encode", src, "-o", tmp_path / "o")
    assert r.exit_code == 1
    assert "dogs/zz_odd.png is 16 wide and 20 high" in r.stderr and "pass --size 24x32" in r.stderr, r.stderr


def test_decode_gives_back_what_encode_took_long_names_and_path_like_class_names(cli, tmp_path, rng):
    """A 255-byte file or folder name fits as it came; class names that are paths ('/a/abbey', as in
    TFDS's sun397) become folders inside the output, not absolute paths."""
    import json

    from conftest import photo, save

    src = tmp_path / "in"
    long_file = "a" * 251 + ".png"
    long_folder = "k" * 255
    arr = photo(rng, 4, 4)
    save(str(src / "c" / long_file), arr)
    save(str(src / long_folder / "x.png"), arr)
    assert cli("encode", src, "-o", tmp_path / "ds").exit_code == 0
    r = cli("decode", tmp_path / "ds", "-o", tmp_path / "back")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "back" / "c" / long_file).exists() and (tmp_path / "back" / long_folder / "x.png").exists()

    manifest = tmp_path / "ds" / "manifest.json"
    m = json.loads(manifest.read_text())
    assert m["classes"] == ["c", long_folder]
    m["classes"] = ["/a/abbey", "/b/barn"]
    manifest.write_text(json.dumps(m))
    r = cli("decode", tmp_path / "ds", "-o", tmp_path / "sun")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.relative_to(tmp_path / "sun").as_posix() for p in (tmp_path / "sun").rglob("*.png")) == \
        [f"a/abbey/c/{long_file}", f"b/barn/{long_folder}/x.png"]


@pytest.mark.parametrize("odd", ["a\nb", " ", " padded"])
def test_a_class_name_tfds_labels_cannot_hold_is_refused_for_tfrecord_metadata(cli, tmp_path, rng, odd):
    """label.labels.txt is one name a line, stripped, blanks skipped: such a name would shift the classes."""
    from conftest import photo, save

    src = tmp_path / "in"
    for cls in (odd, "cat", "z"):
        save(str(src / cls / "x.png"), photo(rng, 4, 4))
    r = cli("encode", src, "-o", tmp_path / "t", "-f", "tfrecord")
    assert r.exit_code == 1 and "label.labels.txt" in r.stderr and not list((tmp_path / "t").glob("*tfrecord*"))
    assert cli("encode", src, "-o", tmp_path / "n", "-f", "npz").exit_code == 0  # the npz manifest holds any name


@pytest.mark.parametrize("args", [["encode", "{src}", "-o", "{out}", "--alpha", "2"], ["info"],
                                  ["verify", "{out}", "--bogus"], ["decode", "{out}"]])
def test_with_json_a_usage_error_is_one_json_object_too(cli, image_folder, tmp_path, args):
    import json

    src, _ = image_folder
    r = cli(*[a.format(src=src, out=tmp_path / "o") for a in args], "--json")
    assert r.exit_code == 2
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["error"] and r.stdout.count("\n") == 1


def test_one_grey_image_first_does_not_make_a_colour_dataset_grey(cli, tmp_path, rng):
    """Channels come from the first image and a spread of the others: colour anywhere in the sample wins."""
    import json

    from conftest import photo, save

    mixed, grey = tmp_path / "mixed", tmp_path / "grey"
    save(str(mixed / "c" / "a_gray.png"), photo(rng, 8, 8)[:, :, 0])
    for i in range(5):
        save(str(mixed / "c" / f"b{i}.png"), photo(rng, 8, 8))
        save(str(grey / f"{i}.png"), photo(rng, 8, 8)[:, :, 0])
    for src, channels in ((mixed, 3), (grey, 1)):
        assert cli("encode", src, "-o", tmp_path / f"o-{src.name}").exit_code == 0
        assert json.loads((tmp_path / f"o-{src.name}" / "manifest.json").read_text())["shape"] == [8, 8, channels]


def test_colour_images_a_grey_guess_missed_are_named(cli, tmp_path, rng):
    """Channels guessed grey from a sample that missed a colour image: the image is made grey, as the
    run decided, and the run names it (--json's warnings too); --channels says it on purpose, quietly."""
    import io
    import json

    import tensorflow as tf
    from PIL import Image

    from conftest import photo, save

    src = tmp_path / "grey"
    for i in range(130):  # the spread sample takes every other input: the second is not in it
        save(str(src / f"g{i:03d}.png"), photo(rng, 4, 4)[:, :, 0])
    save(str(src / "g000a.png"), photo(rng, 4, 4))
    Image.fromarray(photo(rng, 4, 4)[:, :, 0]).convert("P").save(src / "g001a.png")  # greys in a palette: grey
    r = cli("encode", src, "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["shape"] == [4, 4, 1]
    assert len(res["warnings"]) == 1 and res["warnings"][0].startswith("1 colour image(s) were made grey (g000a.png)")
    assert "--channels 3" in res["warnings"][0] and res["warnings"][0] in r.stderr
    r = cli("encode", src, "-o", tmp_path / "o1", "--channels", "1", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["warnings"] == [] and "made grey" not in r.stderr

    # Records: the first ones in order are sampled too, so one grey record first leaves colour alone.
    def record(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return tf.train.Example(features=tf.train.Features(feature={
            "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buf.getvalue()]))})).SerializeToString()

    with tf.io.TFRecordWriter(str(tmp_path / "r.tfrecord")) as w:
        w.write(record(photo(rng, 4, 4)[:, :, 0]))
        for _ in range(5):
            w.write(record(photo(rng, 4, 4)))
    r = cli("encode", tmp_path / "r.tfrecord", "-o", tmp_path / "o2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["shape"] == [4, 4, 3], r.output


def test_verbose_shows_a_commands_own_oserror_as_a_traceback(cli, tmp_path, monkeypatch):
    """Only a failed write of the answer is a stdout error; the command's own OSError is itself."""
    from logitify_cli import info

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "x")

    monkeypatch.setattr(info, "info", denied)
    from click.testing import CliRunner

    from logitify_cli.cli import main
    r = CliRunner().invoke(main, ["info", str(tmp_path), "--verbose"])
    assert isinstance(r.exception, PermissionError) and "standard output" not in r.output


@pytest.mark.parametrize("name", ["CelebA HQ", "café", "celeba-64.v2"])
def test_a_dataset_name_may_be_any_one_file_name(cli, image_folder, tmp_path, name):
    src, _ = image_folder
    r = cli("encode", src, "-o", tmp_path / "o", "-f", "tfrecord", "--name", name)
    assert r.exit_code == 0, r.stderr
    assert all(p.parent == tmp_path / "o" for p in (tmp_path / "o").glob("*tfrecord*"))
    assert len(list((tmp_path / "o").glob(f"{name}-train.tfrecord-*"))) == 1


def test_a_manifest_with_an_alpha_past_todays_encode_bounds_still_reads(cli, dataset):
    """The float32 bounds are for new encodes: a dataset made before them opens as it did."""
    import json

    _, _, ds = dataset
    m = json.loads((ds / "manifest.json").read_text())
    m["transform"]["alpha"] = 1e-35
    m["alpha_conventions"] = {"tfgenzoo": 1e-35, "realnvp": 1e-35 / 2}
    (ds / "manifest.json").write_text(json.dumps(m))
    r = cli("info", ds)
    assert r.exit_code == 0, r.stderr


def test_a_run_that_fails_before_its_first_shard_leaves_nothing_in_the_way(cli, tmp_path, rng):
    """Images of two sizes without --size: the run fails at once, and leaves no journal behind, so the same
    command with --size needs no --overwrite. A run that made shards keeps its journal for --resume."""
    src = small_pngs(tmp_path / "src", rng, 5)
    save(str(src / "5.png"), photo(rng, 8, 9))
    out = tmp_path / "o"
    out.mkdir()  # the user's folder: it stays, empty
    r = cli("encode", src, "-o", out)
    assert r.exit_code == 1 and "--size" in r.stderr
    assert sorted(os.listdir(out)) == []
    r = cli("encode", src, "-o", out, "--size", "8x8")
    assert r.exit_code == 0, r.output
    new = tmp_path / "a" / "b" / "c"  # folders the run made: gone with it, the parents it made too
    r = cli("encode", src, "-o", new)
    assert r.exit_code == 1 and "--size" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["o", "src"]
    r = cli("encode", src, "-o", tmp_path / "p", "--shard-size", "2", "--batch-size", "1")
    assert r.exit_code == 1 and [n for n in os.listdir(tmp_path / "p") if "journal" in n]


def test_a_size_unlike_the_first_images_in_a_whole_chunk_of_the_readers_is_named(cli, tmp_path, rng):
    """The readers hand over runs of cleanly read images at once: a whole chunk of them of another size than
    the dataset's is refused by the same message, naming its first image, and no shard is kept."""
    src = tmp_path / "src"
    first, odd = photo(rng, 8, 8), photo(rng, 9, 8)
    for i in range(3000):  # the readers' second chunk of 1,024 holds only 8x9 images
        save(str(src / f"{i:04d}.png"), first if i < 1024 else odd)
    r = cli("encode", src, "-o", tmp_path / "o", "--workers", "2")
    assert r.exit_code == 1, r.output
    assert "1024.png is 8 wide and 9 high (3 channels) but the dataset is 8 wide and 8 high" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()  # no shard kept: the folder the run made is gone with it


def test_resume_on_a_finished_dataset_names_what_differs(cli, tmp_path, rng):
    """--resume with other options on a dataset already whole: the difference is named, as for an unfinished run."""
    src = small_pngs(tmp_path / "src", rng, 4)
    out = tmp_path / "o"
    assert cli("encode", src, "-o", out).exit_code == 0
    assert cli("encode", src, "-o", out, "--resume").exit_code == 0  # the same run: nothing to redo
    for args, said in ((["--alpha", "0.1", "--seed", "3"], "alpha: was 0.05, now 0.1; seed: was 0, now 3"),
                       (["-f", "tfrecord"], "format: was 'npz', now 'tfrecord'"),
                       (["--size", "4x4", "--filter", "box"], "filter: was None, now 'box'")):
        r = cli("encode", src, "-o", out, "--resume", *args)
        assert r.exit_code == 1 and said in r.stderr, r.stderr
    sized = tmp_path / "s"
    assert cli("encode", src, "-o", sized, "--size", "4x4").exit_code == 0
    for args, said in ((["--jpeg-draft"], "jpeg_draft: was False, now True"),
                       (["--preset", "imagenet32", "--alpha", "0.05"], "exif_orientation: was True, now False")):
        r = cli("encode", src, "-o", sized, "--resume", "--size", "4x4", *args)
        assert r.exit_code == 1 and said in r.stderr, r.stderr
    (src / "3.png").rename(src / "9.png")
    r = cli("encode", src, "-o", out, "--resume")
    assert r.exit_code == 1 and "the inputs, or an option the manifest does not record" in r.stderr, r.stderr


def test_resume_into_a_folder_of_someone_elses_files_is_refused(cli, tmp_path, rng):
    """--resume with no run of logitify's to finish there: refused by name, as --overwrite is, nothing written."""
    src = small_pngs(tmp_path / "src", rng, 3)
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.txt").write_text("mine")
    for args in (["-o", out], ["-o", src]):
        r = cli("encode", src, *args, "--resume")
        assert r.exit_code == 1 and "which logitify did not write" in r.stderr, r.output
    assert sorted(os.listdir(out)) == ["thesis.txt"] and (out / "thesis.txt").read_text() == "mine"
    assert sorted(os.listdir(src)) == ["0.png", "1.png", "2.png"]


def test_a_failed_decode_removes_only_the_empty_folder_it_made(cli, image_folder, tmp_path, monkeypatch):
    """A decode that fails removes the folder it made, if empty; one someone made in its place stays."""
    from logitify_cli import decode_run
    from logitify_cli.errors import LogitifyError

    src, _ = image_folder
    ds = tmp_path / "ds"
    assert cli("encode", src, "-o", ds).exit_code == 0
    out = tmp_path / "out"

    def swapped(*args, **kwargs):
        out.rename(tmp_path / "moved")
        out.mkdir()  # someone else's, made where the run's was
        raise LogitifyError("failed after the swap")

    monkeypatch.setattr(decode_run, "_decode_into", swapped)
    r = cli("decode", ds, "-o", out)
    assert r.exit_code == 1 and "failed after the swap" in r.stderr
    assert out.is_dir() and (tmp_path / "moved").is_dir()

    def failed(*args, **kwargs):
        raise LogitifyError("failed")

    monkeypatch.setattr(decode_run, "_decode_into", failed)
    r = cli("decode", ds, "-o", tmp_path / "mine")
    assert r.exit_code == 1 and not (tmp_path / "mine").exists()
    r = cli("decode", ds, "-o", tmp_path / "new" / "deeper")
    assert r.exit_code == 1 and not (tmp_path / "new").exists()


def _errors():
    """One of each error logitify raises, with its named fields set."""
    from logitify_cli import errors as E

    return {
        "plain": E.LogitifyError("x", notes=["a note"]),
        "usage": E.UsageError("bad option"),
        "alpha": E.AlphaOutOfRange("alpha", alpha=0.6, convention="realnvp", low=0.0, high=0.5),
        "credentials": E.NoCredentials("s3", "no profile"),
        "in_use": E.OutputInUse("busy", folder="/o", pid=12),
        "foreign": E.ForeignFile("theirs", folder="/o", file="x.npz"),
        "tfds": E.TfdsMetadataError("dataset_info.json", "no splits"),
        "feature": E.FeatureChoice("which", option="--image-key", features=["a", "b"]),
        "write": E.write_error(OSError(28, "No space left on device"), "x.npz"),
        "shard": E.ShardError("x.npz", "truncated"),
        "split": E.SplitMismatch("other alpha", field="alpha", dataset=0.05, run=0.1),
    }


def _raise(name):
    raise _errors()[name]


def test_every_error_comes_from_a_worker_process_with_its_fields():
    """Readers and Beam workers raise in other processes: each error arrives whole, fields and all."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    want = _errors()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, error in want.items():
            got = pool.submit(_raise, name).exception()
            assert type(got) is type(error) and got.args == error.args and str(got) == str(error)
            assert vars(got) == vars(error) and got.message == error.message, name
