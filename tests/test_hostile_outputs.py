"""Hostile folders, datasets and names: what logitify may touch, read, hold and print.

Every test builds its own hostile input and checks a user's files, the
process's memory or the terminal come through unharmed.
"""
import hashlib
import io
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import photo, save

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(folder):
    """{relative path: bytes, '-> target' for a link, '/' for a folder} of everything under folder."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "/"
            else:
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tfds_shard(path, images, labels):
    """A TFDS-style TFRecord of Examples {image: PNG bytes, label: int64}, as another tool writes them."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as w:
        for img, lab in zip(images, labels):
            ex = tf.train.Example(features=tf.train.Features(feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png_bytes(img)])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[lab]))}))
            w.write(ex.SerializeToString())


@pytest.fixture
def pics(tmp_path, rng):
    """A folder of four 8x8 PNGs."""
    root = tmp_path / "pics"
    for i in range(4):
        save(str(root / f"p{i}.png"), photo(rng, 8, 8))
    return root


def fake_manifest(folder, **changes):
    """A logitify-valid manifest.json in folder, made by editing the one of a real run."""
    m = json.loads((folder / "manifest.json").read_text())
    m.update(changes)
    (folder / "manifest.json").write_text(json.dumps(m))
    return m


# -- --overwrite and --resume touch only logitify's own files -------------------------------------


def test_overwrite_refuses_a_tfds_folder_of_another_tool(cli, pics, tmp_path, rng):
    tfds = tmp_path / "mnist"
    tfds.mkdir()
    write_tfds_shard(tfds / "mnist-train.tfrecord-00000-of-00001", [photo(rng, 8, 8, 1)[:, :, 0]] * 3, [0, 1, 0])
    (tfds / "dataset_info.json").write_text('{"name": "mnist"}')
    (tfds / "features.json").write_text('{"type": "FeaturesDict"}')
    before = snapshot(tfds)
    for sources in ([tfds], [tfds / "mnist-train.tfrecord-00000-of-00001"], [pics]):
        r = cli("encode", *sources, "-o", tfds, "--overwrite")
        assert r.exit_code == 1, r.output
        assert "dataset_info.json" in r.stderr and "did not write" in r.stderr
        assert snapshot(tfds) == before  # not even a lock file was left


def test_overwrite_refuses_someone_elses_shard_beside_a_logitify_dataset(cli, pics, tmp_path):
    out = tmp_path / "o"
    assert cli("encode", pics, "-o", out).exit_code == 0
    np.savez(out / "photos-00000-of-00002.npz", x=np.arange(3))
    before = snapshot(out)
    r = cli("encode", pics, "-o", out, "--overwrite")
    assert r.exit_code == 1 and "photos-00000-of-00002.npz" in r.stderr
    assert snapshot(out) == before


def test_overwrite_refuses_a_manifest_that_is_not_logitifys(cli, pics, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text('{"version": 3, "files": ["train-00000-of-00001.npz"]}')
    np.savez(out / "train-00000-of-00001.npz", mine=np.arange(3))
    before = snapshot(out)
    r = cli("encode", pics, "-o", out, "--overwrite")
    assert r.exit_code == 1 and "holds manifest.json" in r.stderr
    assert snapshot(out) == before


@pytest.mark.parametrize("claim", ["files", "journal"])
def test_a_manifest_or_journal_cannot_claim_a_users_file(cli, pics, tmp_path, claim):
    """Names logitify never gives its files stay the user's, whatever a manifest or journal says."""
    out = tmp_path / "o"
    assert cli("encode", pics, "-o", out).exit_code == 0
    (out / "thesis.tex").write_text("four years of work")
    if claim == "files":
        fake_manifest(out, files=["thesis.tex"])
    else:
        header = {"format": "npz", "name": "logitify", "split": "train", "num_shards": 1}
        (out / ".logitify-journal.jsonl").write_text(
            json.dumps({"header": header}) + "\n"
            + json.dumps({"shard": {"index": 0, "file": "thesis.tex", "num_examples": 1, "sha256": "0"}}) + "\n")
    r = cli("encode", pics, "-o", out, "--overwrite")
    assert r.exit_code == 1 and "thesis.tex" in r.stderr
    assert (out / "thesis.tex").read_text() == "four years of work"


@pytest.mark.parametrize("name", ["../victim.txt", "/abs/victim.txt"])
def test_a_manifest_naming_files_outside_owns_nothing(cli, pics, tmp_path, name):
    out = tmp_path / "o"
    assert cli("encode", pics, "-o", out).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    m = json.loads((out / "manifest.json").read_text())
    m["shards"][0]["file"] = name if name.startswith("..") else str(victim)
    (out / "manifest.json").write_text(json.dumps(m))
    before = snapshot(out)
    r = cli("encode", pics, "-o", out, "--overwrite")
    assert r.exit_code == 1 and "manifest.json" in r.stderr
    assert snapshot(out) == before and victim.read_text() == "keep"


def test_encoding_a_logitify_tfrecord_dataset_into_itself_removes_nothing(cli, pics, tmp_path):
    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds, "-f", "tfrecord").exit_code == 0
    shard = next(p for p in ds.iterdir() if ".tfrecord-" in p.name)
    before = snapshot(ds)
    r = cli("encode", shard, pics, "-o", ds, "--overwrite", "-f", "tfrecord")
    assert r.exit_code == 1, r.output
    assert shard.name in r.stderr and "an input of this run" in r.stderr
    assert snapshot(ds) == before


def test_a_manifest_naming_an_input_as_its_shard_cannot_remove_it(cli, pics, tmp_path, rng):
    """Another tool's TFRecord, claimed by a (valid) logitify manifest beside it, survives as an input."""
    folder = tmp_path / "mixed"
    assert cli("encode", pics, "-o", folder, "-f", "tfrecord").exit_code == 0
    for p in folder.iterdir():
        if ".tfrecord-" in p.name:
            p.unlink()
    theirs = folder / "mnist-train.tfrecord-00000-of-00001"
    write_tfds_shard(theirs, [photo(rng, 8, 8)] * 2, [0, 1])
    m = json.loads((folder / "manifest.json").read_text())
    m["shards"][0]["file"] = theirs.name
    (folder / "manifest.json").write_text(json.dumps(m))
    before = snapshot(folder)
    r = cli("encode", theirs, "-o", folder, "--overwrite")
    assert r.exit_code == 1 and theirs.name in r.stderr and "input" in r.stderr
    assert snapshot(folder) == before


def test_overwrite_refuses_a_folder_that_looks_like_the_root(cli, pics, tmp_path):
    root = tmp_path / "rootlike"
    for d in ("bin", "etc", "home", "usr"):
        (root / d).mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0")
    (root / "vmlinuz").write_bytes(b"\x7fELF")
    before = snapshot(root)
    r = cli("encode", pics, "-o", root, "--overwrite")
    assert r.exit_code == 1 and "holds bin," in r.stderr
    assert snapshot(root) == before


def test_the_root_and_the_home_folder_are_never_cleared(cli, pics, tmp_path, monkeypatch):
    """The root is checked by the rule alone (nothing is run there); home is a fake one."""
    from logitify_cli.errors import LogitifyError
    from logitify_cli.outdir import OutputFolder, protected_folder

    assert protected_folder("/") == "the root of the file system"
    with pytest.raises(LogitifyError, match="root of the file system"):
        OutputFolder("/").check(overwrite=True, resume=False)
    home = tmp_path / "home"
    # A home folder holding nothing but an old logitify dataset: the ownership rules alone would clear it.
    assert cli("encode", pics, "-o", home).exit_code == 0
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(home)
    for flag in ("--overwrite", "--resume"):
        r = cli("encode", pics, "-o", home, flag)
        assert r.exit_code == 1 and "home folder" in r.stderr
        assert snapshot(home) == before
    r = cli("decode", home, "-o", home, "--overwrite")
    assert r.exit_code == 1 and "home folder" in r.stderr
    assert snapshot(home) == before


def test_overwrite_removes_links_never_their_targets(cli, pics, tmp_path):
    out = tmp_path / "o"
    assert cli("encode", pics, "-o", out).exit_code == 0
    shard = next(p for p in out.iterdir() if p.name.endswith(".npz"))
    precious = tmp_path / "precious.npz"
    precious.write_bytes(b"mine, not logitify's")
    shard.unlink()
    shard.symlink_to(precious)
    r = cli("encode", pics, "-o", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert precious.read_bytes() == b"mine, not logitify's"
    assert not shard.is_symlink() and shard.stat().st_size > 100
    # A manifest that is a link is not logitify's, wherever it points
    theirs = tmp_path / "their-manifest.json"
    theirs.write_bytes((out / "manifest.json").read_bytes())
    (out / "manifest.json").unlink()
    (out / "manifest.json").symlink_to(theirs)
    before = snapshot(out)
    r = cli("encode", pics, "-o", out, "--overwrite")
    assert r.exit_code == 1 and "holds manifest.json" in r.stderr
    assert snapshot(out) == before and json.loads(theirs.read_text())["format"] == "npz"
    # The manifest is named even where the files it would own sort before it (a TFRecord dataset's metadata)
    tfr = tmp_path / "t"
    assert cli("encode", pics, "-o", tfr, "-f", "tfrecord").exit_code == 0
    (tmp_path / "their-tfrecord-manifest.json").write_bytes((tfr / "manifest.json").read_bytes())
    (tfr / "manifest.json").unlink()
    (tfr / "manifest.json").symlink_to(tmp_path / "their-tfrecord-manifest.json")
    before = snapshot(tfr)
    r = cli("encode", pics, "-o", tfr, "-f", "tfrecord", "--overwrite")
    assert r.exit_code == 1 and "holds manifest.json," in r.stderr, r.stderr
    assert snapshot(tfr) == before


@pytest.mark.parametrize("link", ["symbolic", "hard"])
@pytest.mark.parametrize("name,flag", [(".logitify.lock", "--overwrite"), (".logitify.lock", "--resume"),
                                       (".logitify-journal.jsonl", "--resume")])
def test_lock_and_journal_are_never_written_through_a_link(cli, pics, tmp_path, monkeypatch, link, name, flag):
    """A lock that is a link is refused by name before the run starts any work (not after TensorFlow's import)."""
    from logitify_cli import encode_run

    out = tmp_path / "o"
    out.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("precious data")
    if link == "symbolic":
        (out / name).symlink_to(precious)
    else:
        os.link(precious, out / name)
    if name == ".logitify.lock":
        def started(*args, **kwargs):
            raise AssertionError("the run started before it refused the lock")

        monkeypatch.setattr(encode_run, "_start_while_tf_imports", started)
    r = cli("encode", pics, "-o", out, flag)
    assert precious.read_text() == "precious data"
    if name == ".logitify.lock":  # refused by name: a lock is not taken over through a link
        assert r.exit_code == 1 and name in r.stderr and "Traceback" not in r.output
    else:  # a journal that is a link says nothing: the link goes, a journal of the run's own replaces it
        assert r.exit_code == 0, r.output
        assert not os.path.lexists(out / name) and (out / "manifest.json").is_file()


@pytest.mark.parametrize("kind", ["symbolic", "hard", "fifo"])
def test_decode_refuses_a_lock_that_is_not_its_own_before_it_starts(cli, tmp_path, rng, monkeypatch, kind):
    from logitify_cli import decode_run

    if kind == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        save(str(src / f"{i}.png"), photo(rng, 8, 8))
    assert cli("encode", src, "-o", tmp_path / "ds").exit_code == 0
    out, precious = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    precious.write_text("precious data")
    lock = out / ".logitify.lock"
    {"symbolic": lambda: lock.symlink_to(precious), "hard": lambda: os.link(precious, lock),
     "fifo": lambda: os.mkfifo(lock)}[kind]()

    def started(*args, **kwargs):
        raise AssertionError("the decode started before it refused the lock")

    monkeypatch.setattr(decode_run, "_decode_into", started)
    r = cli("decode", tmp_path / "ds", "-o", out, "--overwrite")
    assert r.exit_code == 1 and ".logitify.lock" in r.stderr and "not logitify's lock file" in r.stderr, r.output
    assert precious.read_text() == "precious data" and os.path.lexists(lock)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("kind", ["fifo", "folder"])
@pytest.mark.parametrize("name", [".logitify.lock", ".logitify-journal.jsonl", "train-00000-of-00001.npz"])
@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_fifos_and_folders_under_logitifys_names_neither_hang_nor_crash(pics, tmp_path, kind, name, flag):
    """A FIFO once made the lock check and the journal wait forever for a writer."""
    out = tmp_path / "o"
    out.mkdir()
    os.mkfifo(out / name) if kind == "fifo" else (out / name).mkdir()
    p = cli_process("encode", pics, "-o", out, flag)
    try:
        _, err = p.communicate(timeout=120)
    finally:
        stop_group(p)
    if p.returncode == 0:  # a journal's name is logitify's own: a FIFO there is replaced, never opened
        assert name == ".logitify-journal.jsonl" and kind == "fifo"
    else:
        assert p.returncode == 1 and name in err and "--verbose" not in err, err
        assert (out / name).exists() and "Traceback" not in err


def test_resume_never_replaces_a_file_it_did_not_write(cli, pics, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "train-00000-of-00001.npz").write_bytes(b"someone's archive")
    r = cli("encode", pics, "-o", out, "--resume")
    assert r.exit_code == 1 and "train-00000-of-00001.npz" in r.stderr
    assert (out / "train-00000-of-00001.npz").read_bytes() == b"someone's archive"
    assert sorted(os.listdir(out)) == ["train-00000-of-00001.npz"]


def test_overwrite_still_replaces_logitifys_own_files(cli, pics, tmp_path):
    """The rules above leave the ordinary case working, metadata of either format included."""
    out = tmp_path / "o"
    assert cli("encode", pics, "-o", out, "-f", "tfrecord").exit_code == 0
    assert cli("encode", pics, "-o", out, "--overwrite").exit_code == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "train-00000-of-00001.npz"]
    assert cli("encode", pics, "-o", out, "--overwrite", "-f", "tfrecord").exit_code == 0
    assert cli("verify", out).exit_code == 0


# -- decode writes inside its folder only -----------------------------------------------------------


def rewrite_npz_dataset(ds, keys, labels=None, logits=None, logdet=None):
    """Make a dataset of one npz shard hold these keys (and arrays), manifest and sha256 to match."""
    m = json.loads((ds / "manifest.json").read_text())
    first = m["shards"][0]["file"]
    z = dict(np.load(ds / first, allow_pickle=False))
    for s in m["shards"]:
        (ds / s["file"]).unlink()
    n = len(keys)
    arrays = {"logits": np.repeat(z["logits"][:1], n, 0) if logits is None else logits,
              "logdet": np.repeat(z["logdet"][:1], n, 0) if logdet is None else logdet,
              "keys": np.array(keys),
              "labels": np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)}
    np.savez(ds / first, **arrays)
    m["shards"] = [{"file": first, "num_examples": n, "sha256": hashlib.sha256((ds / first).read_bytes()).hexdigest()}]
    m["num_examples"] = n
    m.pop("fingerprint", None)  # a rewritten dataset vouches for no pixels (the field is optional)
    (ds / "manifest.json").write_text(json.dumps(m))
    return m


@pytest.fixture
def keyed(cli, pics, tmp_path):
    """A function: a dataset (one npz shard of 8x8 images) holding the given keys."""
    made = []

    def make(keys, **arrays):
        ds = tmp_path / f"ds{len(made)}"
        assert cli("encode", pics, "-o", ds).exit_code == 0
        rewrite_npz_dataset(ds, keys, **arrays)
        made.append(ds)
        return ds

    return make


def refusal_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("logitify: refused key")]


def test_decode_png_never_writes_through_links(cli, keyed, tmp_path):
    ds = keyed(["ok.png", "hard.png", "soft.png", "linked/inside.png", "cls/fine.png"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "target.png").write_bytes(b"a user's picture")
    out = tmp_path / "out"
    out.mkdir()
    os.link(elsewhere / "target.png", out / "hard.png")
    (out / "soft.png").symlink_to(elsewhere / "target.png")
    (out / "linked").symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(elsewhere)
    r = cli("decode", ds, "-o", out, "--overwrite")
    assert r.exit_code == 1
    assert snapshot(elsewhere) == before
    lines = refusal_lines(r.stderr)
    assert len(lines) == 3
    for key in ("hard.png", "soft.png", "linked/inside.png"):
        assert sum(key in line for line in lines) == 1
    assert "logitify: error: 3 key(s) could not be written" in r.stderr and "Traceback" not in r.output
    assert Image.open(out / "ok.png").size == (8, 8) and Image.open(out / "cls" / "fine.png").size == (8, 8)


def test_overwrite_replaces_files_whose_names_fill_the_limit(cli, keyed, tmp_path):
    """A replacement is written beside its file under a hidden name first: that name must fit where the file's does."""
    keys = ["語" * 82 + ".png", "a" * 247 + ".png", "ok.png"]  # 250 and 251 bytes, the longest names decode takes
    ds = keyed(keys)
    out = tmp_path / "out"
    r = cli("decode", ds, "-o", out)
    assert r.exit_code == 0, r.output
    for key in keys:
        (out / key).write_bytes(b"an older version")
    r = cli("decode", ds, "-o", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == sorted(keys)  # each replaced, no temporary left
    for key in keys:
        assert Image.open(out / key).size == (8, 8)


def test_leftovers_of_killed_runs_do_not_stand_in_the_way(cli, keyed, tmp_path):
    """Hidden files like those a killed --overwrite leaves (with this very process id) are neither used nor in the way."""
    ds = keyed(["ok.png", "cls/fine.png"])
    out = tmp_path / "out"
    assert cli("decode", ds, "-o", out).exit_code == 0
    planted = [out / f".ok.png.{os.getpid()}-{n}.tmp" for n in range(3)]
    for p in planted:
        p.write_bytes(b"a leftover")
    r = cli("decode", ds, "-o", out, "--overwrite", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert all(p.read_bytes() == b"a leftover" for p in planted)
    assert sorted(os.listdir(out)) == sorted(["ok.png", "cls"] + [p.name for p in planted])


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_decode_npz_never_writes_through_links(cli, keyed, tmp_path, link):
    ds = keyed(["a.png", "b.png"])
    elsewhere = tmp_path / "elsewhere.npz"
    elsewhere.write_bytes(b"a user's archive")
    out = tmp_path / "out"
    out.mkdir()
    target = out / "images-00000-of-00001.npz"
    target.symlink_to(elsewhere) if link == "symbolic" else os.link(elsewhere, target)
    r = cli("decode", ds, "-o", out, "-f", "npz", "--overwrite")
    assert r.exit_code == 1 and elsewhere.read_bytes() == b"a user's archive"
    assert len(refusal_lines(r.stderr)) == 1 and "images-00000-of-00001.npz" in r.stderr
    assert "logitify: error: 1 key(s)" in r.stderr


@pytest.mark.skipif(os.name == "nt", reason="on Windows '\\' and ':' are separators")
def test_backslash_and_colon_are_ordinary_characters(cli, keyed, tmp_path):
    ds = keyed(["a\\b.png", "c:x.png", "dir\\sub/y.png"])
    out = tmp_path / "out"
    r = cli("decode", ds, "-o", out)
    assert r.exit_code == 0, r.output
    assert sorted(snapshot(out)) == ["a\\b.png", "c:x.png", "dir\\sub", "dir\\sub/y.png"]


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_keys_that_cannot_be_file_names_are_refused_one_by_one(cli, keyed, tmp_path, fmt):
    """Escapes, '..', absolute paths and lone surrogates: each refused, the rest written. A name too long for a
    file is cut to fit and tagged, and an overlong folder name is refused."""
    import hashlib

    long = "y" * 300 + ".png"
    bad = ["../up.png", "/abs/x.png", "a/../../up2.png", ".", "lone\ud800surrogate.png", "z" * 300 + "/in.png",
           "d/" * 2000 + "deep.png"]
    deep = "e/" * 200 + "deep.png"  # deep, but a path a file system holds
    ds = keyed(bad + ["good.png", long, deep])
    out = tmp_path / "sandbox" / "out"
    r = cli("decode", ds, "-o", out, "-f", fmt)
    assert "Traceback" not in r.output
    if fmt == "npz":  # keys are data in an npz: nothing to refuse
        assert r.exit_code == 0, r.output
        with np.load(out / "images-00000-of-00001.npz", allow_pickle=False) as z:
            assert len(z["keys"]) == 10
        return
    assert r.exit_code == 1
    assert len(refusal_lines(r.stderr)) == len(bad)
    assert f"logitify: error: {len(bad)} key(s)" in r.stderr
    cut = "y" * 238 + "~" + hashlib.blake2b(long.encode(), digest_size=6).hexdigest() + ".png"
    made = {k: v for k, v in snapshot(tmp_path / "sandbox").items() if not k.startswith("out/e")}
    assert made == {"out": "/", "out/good.png": snapshot(out)["good.png"], f"out/{cut}": snapshot(out)[cut]}
    assert (out / deep).is_file()


def test_a_flood_of_refused_keys_is_counted_not_all_kept(cli, keyed, tmp_path):
    """Refused keys are listed one line each up to a thousand; the rest are counted."""
    ds = keyed([f"../k{i}.png" for i in range(1500)] + ["ok.png"])
    r = cli("decode", ds, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 1
    assert len(refusal_lines(r.stderr)) == 1000 and "500 more refused key(s)" in r.stderr
    assert "logitify: error: 1500 key(s)" in r.stderr
    summary = json.loads(r.stdout)
    assert summary["num_refused"] == 1500 and len(summary["refused"]) == 1000
    assert os.listdir(tmp_path / "out") == ["ok.png"]


def test_decode_never_replaces_the_dataset_it_reads(cli, pics, tmp_path):
    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds, "--split", "images").exit_code == 0
    shard = ds / "images-00000-of-00001.npz"
    before = shard.read_bytes()
    r = cli("decode", ds, "-o", ds, "-f", "npz", "--overwrite")
    assert r.exit_code == 1 and "dataset being decoded" in r.stderr
    assert shard.read_bytes() == before and cli("verify", ds).exit_code == 0


# -- memory stays bounded whatever a small file claims ---------------------------------------------

GiB = 1 << 30
ALPHA = 0.05

MEASURE = """
import json, resource, subprocess, sys, time
t = time.time()
r = subprocess.run([sys.executable, "-m", "logitify_cli", *sys.argv[1:]], capture_output=True, text=True,
                   errors="backslashreplace")
print(json.dumps({"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "seconds": time.time() - t,
                  "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def measured(*args, timeout=600):
    """Run the CLI in a fresh process; its exit code, streams, seconds and peak resident memory (bytes)."""
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    r = subprocess.run([sys.executable, "-c", MEASURE, *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def bomb_manifest(fmt, shape, shard, count, compressed):
    dims = int(np.prod(shape))
    return {"format_version": 1, "tool_version": "0", "format": fmt, "name": "logitify", "split": "train",
            "num_examples": count, "shape": list(shape), "dtype": "float32", "compressed": compressed,
            "transform": {"alpha": ALPHA, "corruption_level": 1.0, "noise": "uniform", "bits": 8, "seed": 0},
            "logdet": {"convention": "tfgenzoo", "dims": dims, "bpd_offset_nats": dims * np.log(256.0),
                       "bits_per_dim": ""},
            "classes": None, "skipped": [], "files": [], "source": {}, "stats": {},
            "shards": [{"file": os.path.basename(shard), "num_examples": count,
                        "sha256": hashlib.sha256(open(shard, "rb").read()).hexdigest()}]}


def zero_logdet(shape):
    """The log-det of all-zero logits: verify finds nothing wrong with them."""
    dims = int(np.prod(shape))
    return np.float32(dims * 2 * np.log(2.0) + dims * np.log1p(-ALPHA))


def _npy_member(z, name, header, nbytes, compress):
    import zipfile

    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    info._compresslevel = 1  # the quickest deflate (a public `compress_level` only from Python 3.13)
    zeros = bytes(8 << 20)
    with z.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for a in range(0, nbytes, len(zeros)):
            f.write(zeros[:min(len(zeros), nbytes - a)])


def npz_bomb(folder, shape, count, claimed=None, key_chars=None):
    """A deflated npz shard of all-zero logits that agrees with its manifest on `count` examples of `shape`.

    `claimed`: how many examples logits.npy's header says it holds instead.
    `key_chars`: keys as one '<U{key_chars}' array of zeros (a bomb of its own).
    """
    import zipfile

    os.makedirs(folder)
    path = os.path.join(folder, "train-00000-of-00001.npz")
    n = count if claimed is None else claimed
    with zipfile.ZipFile(path, "w") as z:
        _npy_member(z, "logits.npy", {"descr": "<f4", "fortran_order": False, "shape": (n,) + shape},
                    4 * int(np.prod(shape)) * n, True)
        if key_chars:
            _npy_member(z, "keys.npy", {"descr": f"<U{key_chars}", "fortran_order": False, "shape": (count,)},
                        4 * key_chars * count, True)
        else:
            with z.open("keys.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.char.add("k", np.arange(count).astype("U12")))
        for name, arr in (("logdet", np.full(count, zero_logdet(shape), "<f4")), ("labels", np.zeros(count, "<i8"))):
            with z.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(bomb_manifest("npz", shape, path, count, True), f)


def npz_lying_stored(folder, shape):
    """An uncompressed npz shard whose header and manifest promise one example far larger than the file."""
    import zipfile

    os.makedirs(folder)
    path = os.path.join(folder, "train-00000-of-00001.npz")
    with zipfile.ZipFile(path, "w") as z:
        for name, descr, shp in (("logits", "<f4", (1,) + shape), ("logdet", "<f4", (1,)), ("keys", "<U1", (1,)),
                                 ("labels", "<i8", (1,))):
            _npy_member(z, name + ".npy", {"descr": descr, "fortran_order": False, "shape": shp}, 8, False)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(bomb_manifest("npz", shape, path, 1, False), f)


def gzip_record_bomb(folder, shape, compressed=True):
    """A TFRecord shard (GZIP) of one record whose all-zero logits fill `shape`."""
    import struct

    from logitify_cli.records import masked_crc32c
    from logitify_cli.tfrecord_io import ExampleWriter, _field, _map_entry, _uvarint

    os.makedirs(folder)
    path = os.path.join(folder, "logitify-train.tfrecord-00000-of-00001")
    nbytes = 4 * int(np.prod(shape))
    head = (_map_entry(b"key", _field(b"\x0a", _field(b"\x0a", b"big.png")))
            + _map_entry(b"label", _field(b"\x1a", _field(b"\x0a", _uvarint(0))))
            + _map_entry(b"logdet", _field(b"\x12", _field(b"\x0a", zero_logdet(shape).tobytes()))))
    logits_head = ExampleWriter(nbytes)._logits_head
    prefix = b"\x0a" + _uvarint(len(head) + len(logits_head) + nbytes) + head + logits_head
    if compressed:  # a whole record, framed and checksummed by TensorFlow's own writer
        import tensorflow as tf

        options = tf.io.TFRecordOptions(compression_type="GZIP", compression_level=1)
        with tf.io.TFRecordWriter(path, options) as w:
            w.write(prefix + bytes(nbytes))
    else:  # only the frame's head, whose length claims the record
        length = struct.pack("<Q", len(prefix) + nbytes)
        with open(path, "wb") as f:
            f.write(length + struct.pack("<I", masked_crc32c(length)) + prefix)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(bomb_manifest("tfrecord", shape, path, 1, compressed), f)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """Small files that claim to expand enormously, each beside a manifest that vouches for it."""
    root = tmp_path_factory.mktemp("bombs")
    made = {
        # 2 MB of deflate, 500 MB of logits: 162,760 examples of 16x16x3
        "npz-many-examples": lambda d: npz_bomb(d, (16, 16, 3), 162_760),
        # one 500 MB example, manifest and header agreeing
        "npz-one-huge-example": lambda d: npz_bomb(d, (11180, 11180, 1), 1),
        # the header claims 162,760 examples, the manifest one
        "npz-header-claims-more": lambda d: npz_bomb(d, (16, 16, 3), 1, claimed=162_760),
        # 100,000 keys of 4,096 characters: 1.6 GB of keys behind 8 MB
        "npz-key-bomb": lambda d: npz_bomb(d, (1, 1, 1), 100_000, key_chars=4096),
        # one GZIP record that inflates to 1 GiB
        "gzip-record-1GiB": lambda d: gzip_record_bomb(d, (16384, 16384, 1)),
        # just under what a compressed shard's example may inflate to (128 MiB): read, in bounded memory
        "npz-at-the-limit": lambda d: npz_bomb(d, (5792, 5792, 1), 3),
        "gzip-record-at-the-limit": lambda d: gzip_record_bomb(d, (5792, 5792, 1)),
        # an uncompressed record and an uncompressed npz member claiming gigabytes the files do not hold
        "tfrecord-claims-4GiB": lambda d: gzip_record_bomb(d, (32768, 32768, 1), compressed=False),
        "npz-claims-4GiB": lambda d: npz_lying_stored(d, (32768, 32768, 1)),
    }
    for name, build in made.items():
        build(str(root / name))
    return root


BOMB_RESULTS = {"npz-at-the-limit": 0, "gzip-record-at-the-limit": 0, "npz-many-examples": 0, "npz-one-huge-example": 1, "npz-header-claims-more": 1,
                "npz-key-bomb": None, "gzip-record-1GiB": 1, "tfrecord-claims-4GiB": 1, "npz-claims-4GiB": 1}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
@pytest.mark.parametrize("bomb", sorted(BOMB_RESULTS))
@pytest.mark.parametrize("command", ["verify", "info", "info --plot", "decode"])
def test_small_hostile_files_stay_under_1GiB(bombs, tmp_path, bomb, command):
    ds = bombs / bomb
    args = {"verify": ["verify", ds], "info": ["info", ds], "info --plot": ["info", ds, "--plot", tmp_path / "p.png"],
            # 162,760 PNG files take a while whatever the memory: the many-examples bomb is decoded to npz
            "decode": ["decode", ds, "-o", tmp_path / "out"] + (["-f", "npz"] if bomb == "npz-many-examples" else [])}
    r = measured(*args[command])
    assert r["peak"] < GiB, f"{bomb} {command}: peak {r['peak'] / 2**20:.0f} MiB"
    assert r["seconds"] < 60
    assert "Traceback" not in r["stderr"] + r["stdout"]
    assert r["rc"] in (0, 1)
    if BOMB_RESULTS[bomb] is not None and not (bomb == "npz-many-examples" and command == "decode"):
        assert r["rc"] == BOMB_RESULTS[bomb], r["stderr"][-500:]
    if r["rc"] == 1:
        assert sum(line.startswith("logitify: error:") for line in r["stderr"].splitlines()) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_a_large_shard_is_read_in_slices(cli, tmp_path, rng):
    """2,500 64x128 images in ONE shard, 246 MB of logits: no command's memory follows the shard.

    Each command's peak is compared with its own peak on a one-image dataset
    (the interpreter, NumPy, matplotlib): the difference stays a fraction of the shard.
    """
    src = tmp_path / "src"
    n = 2_500
    for i in range(n):
        save(str(src / f"c{i % 4}" / f"{i:05d}.png"), photo(rng, 64, 128), compress_level=1)
    ds, tiny = tmp_path / "ds", tmp_path / "tiny"
    save(str(tmp_path / "one" / "c0" / "00000.png"), photo(rng, 64, 128))
    for args in (["encode", src, "-o", ds, "--shard-size", str(n)], ["encode", tmp_path / "one", "-o", tiny]):
        r = cli(*args)  # in this process: only the commands reading the shard back are measured
        assert r.exit_code == 0, r.output
    shard = next(ds.glob("*.npz"))
    logits_bytes = n * 64 * 128 * 3 * 4
    assert shard.stat().st_size > logits_bytes
    commands = {"verify": lambda d, o: ["verify", d], "info": lambda d, o: ["info", d],
                "info --plot": lambda d, o: ["info", d, "--plot", o / "p.png"],
                "decode": lambda d, o: ["decode", d, "-o", o / "png"],
                "decode -f npz": lambda d, o: ["decode", d, "-o", o / "npz", "-f", "npz"]}
    for name, args in commands.items():
        (tmp_path / "base").mkdir(exist_ok=True)
        base = measured(*args(tiny, tmp_path / "base"))
        r = measured(*args(ds, tmp_path))
        assert r["rc"] == 0 and base["rc"] == 0, r["stderr"] + base["stderr"]
        grew = r["peak"] - base["peak"]
        assert grew < logits_bytes / 4, f"{name}: {grew / 2**20:.0f} MiB more than for one image"
        assert r["peak"] < logits_bytes * 0.6, f"{name}: peak {r['peak'] / 2**20:.0f} MiB"
    with np.load(tmp_path / "npz" / "images-00000-of-00001.npz", allow_pickle=False) as z:
        assert z["images"].shape == (n, 64, 128, 3) and len(set(z["keys"].tolist())) == n
        key = str(z["keys"][123])
        assert np.array_equal(z["images"][123], np.asarray(Image.open(tmp_path / "png" / key).convert("RGB")))


@pytest.mark.parametrize("held", [1 << 22, 5])
def test_verify_names_duplicate_keys_from_hashes_in_memory_or_on_disk(cli, keyed, monkeypatch, held):
    """Keys are remembered as hashes, spilled to disk past a bound; duplicates are still named."""
    from logitify_cli import verify

    monkeypatch.setattr(verify, "HASHES_HELD", held)
    keys = [f"k{i}.png" for i in range(40)] + ["k3.png", "k17.png", "k17.png", "a\u00e9\U0001f600.png", "a\u00e9\U0001f600.png"]
    ds = keyed(keys)
    r = cli("verify", ds, "--json")
    assert r.exit_code == 1
    summary = json.loads(r.stdout)
    twice = sorted(p["where"] for p in summary["problems"] if p["problem"] == "key appears twice")
    assert twice == sorted(["k3.png", "k17.png", "k17.png", "a\u00e9\U0001f600.png"])
    assert summary["num_problems"] == 4
    assert cli("verify", keyed([f"k{i}.png" for i in range(40)])).exit_code == 0


# -- one clear line for every bad input, never a traceback -----------------------------------------

FORGED = "\nlogitify: error: forged\x1b[31m"


def one_clear_error(r, code=1):
    """Exit `code`, exactly one `logitify: error:` line, short, expected (not a bug's), nothing raw."""
    lines = [line for line in r.stderr.splitlines() if line.startswith("logitify: error:")]
    assert r.exit_code == code, r.output
    assert len(lines) == 1, r.stderr[-2000:]
    assert len(lines[0]) < 600 and "--verbose for details" not in lines[0], lines[0][:600]
    assert "Traceback" not in r.output and "\x1b" not in r.output
    return lines[0]


def four_commands(cli, ds, tmp_path):
    return [cli("info", ds), cli("verify", ds), cli("decode", ds, "-o", tmp_path / "out"),
            cli("info", ds, "--plot", tmp_path / "p.png")]


MANIFEST_EDITS = {
    "seed Infinity": lambda t: t.replace('"seed": 0', '"seed": Infinity'),
    "alpha NaN": lambda t: t.replace('"alpha": 0.05', '"alpha": NaN'),
    "shape a string": lambda t: json.dumps({**json.loads(t), "shape": "8x8x3"}),
    "shards not a list": lambda t: json.dumps({**json.loads(t), "shards": {"a": 1}}),
    "classes not strings": lambda t: json.dumps({**json.loads(t), "classes": [1, None]}),
    "format a list": lambda t: json.dumps({**json.loads(t), "format": ["npz"]}),
    "a 10 MB shard name": lambda t: json.dumps(
        {**json.loads(t), "shards": [{**json.loads(t)["shards"][0], "file": "x" * (10 << 20)}]}),
    "a 10 MB format version": lambda t: json.dumps({**json.loads(t), "format_version": "v" * (10 << 20)}),
    "100 MB": lambda t: json.dumps({**json.loads(t), "stats": {"pad": "x" * (100 << 20)}}),
    "deeply nested": lambda t: "[" * 200_000 + "]" * 200_000,
    "not UTF-8": lambda t: b"\xff\xfe{",
    # The source's geometry is read back by verify --against (which makes every source that size)
    # and shown by info: a size other than the logits' own, or no pair at all, is refused at once.
    **{f"source {field} {value}": (lambda field, value: lambda t: json.dumps(
        {**json.loads(t), "source": {**json.loads(t)["source"], field: value}}))(field, value)
       for field, value in (("size", [8000, 8000]), ("size", [-1, 8]), ("size", [8, 8, 3]), ("size", "x"),
                            ("filter", ["box"]), ("resize_mode", {"a": 1}), ("channels", 1), ("channels", True))},
    "compressed a string": lambda t: json.dumps({**json.loads(t), "compressed": "false"}),
}


@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_broken_manifests_are_one_clear_line(cli, pics, tmp_path, edit):
    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds).exit_code == 0
    text = MANIFEST_EDITS[edit]((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    for r in four_commands(cli, ds, tmp_path):
        assert f"{ds / 'manifest.json'}: " in one_clear_error(r)  # the file named, whatever is wrong in it


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_manifest_that_is_a_fifo_or_a_dangling_link(cli, pics, tmp_path):
    """Neither is opened (a FIFO would wait forever for a writer); each is named for what it is, not 'no manifest here'."""
    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds).exit_code == 0
    (ds / "manifest.json").unlink()
    os.symlink(tmp_path / "nowhere.json", ds / "manifest.json")
    for r in four_commands(cli, ds, tmp_path):
        assert "not a regular file" in one_clear_error(r)
    (ds / "manifest.json").unlink()
    os.mkfifo(ds / "manifest.json")
    for command in ("info", "verify"):
        p = cli_process(command, ds)
        try:
            _, err = p.communicate(timeout=120)
        finally:
            stop_group(p)
        assert p.returncode == 1 and "manifest.json: not a valid logitify manifest: not a regular file" in err, err


def test_a_manifest_that_is_a_folder_and_missing_or_unreadable_shards(cli, pics, tmp_path):
    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds).exit_code == 0
    shard = next(ds.glob("*.npz"))
    shard.unlink()
    for r in four_commands(cli, ds, tmp_path):
        assert shard.name in one_clear_error(r) and "missing" in r.stderr
    os.mkfifo(shard)  # never opened, and not called missing
    for r in four_commands(cli, ds, tmp_path):
        assert shard.name in one_clear_error(r) and "not a regular file" in r.stderr
    shard.unlink()
    if os.geteuid() == 0:  # root reads any file: a file whose every read fails instead
        if not os.path.exists("/proc/self/mem"):
            pytest.skip("no file that fails to read")
        shard.symlink_to("/proc/self/mem")
    else:
        shard.write_bytes(b"x")
        shard.chmod(0)
    for r in four_commands(cli, ds, tmp_path):
        assert shard.name in one_clear_error(r)
    shard.unlink()
    with open(shard, "wb") as f:  # a sparse file: nothing on disk, 100 GB to read and hash
        f.truncate(100 << 30)
    for r in four_commands(cli, ds, tmp_path):
        assert shard.name in one_clear_error(r) and "bytes, more than" in r.stderr
    (ds / "manifest.json").unlink()
    (ds / "manifest.json").mkdir()
    for r in four_commands(cli, ds, tmp_path):
        assert "manifest.json" in one_clear_error(r)


def test_nan_logits_plot_and_bad_plot_names(cli, keyed, tmp_path):
    logits = np.zeros((3, 8, 8, 3), np.float32)
    logits[0, 0, 0, 0] = np.nan
    logits[1] = np.inf
    ds = keyed(["a.png", "b.png", "c.png"], logits=logits, logdet=np.full(3, np.nan, np.float32))
    r = cli("info", ds, "--plot", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "p.png").size[0] > 100
    assert "193 logit value(s) and 3 log-det(s) are not finite" in r.stderr
    got = json.loads(cli("info", ds, "--json").stdout)
    assert got["logits"]["non_finite"] == 193 and got["logits"]["count"] == 3 * 192 - 193
    assert "a.png" in one_clear_error(cli("verify", ds))
    # decode gives back no made-up pixels: it names the images and fails
    err = one_clear_error(cli("decode", ds, "-o", tmp_path / "back"))
    assert "'a.png', 'b.png'" in err and "not finite" in err and "'c.png'" not in err
    assert ".xyz" in one_clear_error(cli("info", ds, "--plot", tmp_path / "x.xyz"), code=2)
    assert "cannot write" in one_clear_error(cli("info", ds, "--plot", tmp_path / "no" / "such" / "p.png"))


def test_constant_logits_and_a_single_example_plot(cli, keyed, tmp_path):
    """One example, or logits all alike: histograms of zero width still draw."""
    ds = keyed(["only.png"], logits=np.zeros((1, 8, 8, 3), np.float32), logdet=np.full(1, 3.0e8, np.float32))
    r = cli("info", ds, "--plot", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "p.png") as im:  # a whole figure, not an empty file
        assert im.format == "PNG" and min(im.size) > 100 and len(im.convert("L").getcolors(1 << 16)) > 2


@pytest.mark.parametrize("label,ok", [([], True), ([1, 2], False), ("bytes", False), ("key-int", False)])
def test_tfrecord_records_with_odd_labels_and_keys(cli, pics, tmp_path, label, ok):
    import tensorflow as tf

    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds, "-f", "tfrecord").exit_code == 0
    m = json.loads((ds / "manifest.json").read_text())
    shard = ds / m["shards"][0]["file"]
    records = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(shard))]
    with tf.io.TFRecordWriter(str(shard)) as w:
        for ex in records:
            f = ex.features.feature
            if label == "bytes":
                f["label"].Clear()
                f["label"].bytes_list.value.append(b"cat")
            elif label == "key-int":
                f["key"].Clear()
                f["key"].int64_list.value.append(7)
            else:
                f["label"].Clear()
                f["label"].int64_list.value.extend(label)
            w.write(ex.SerializeToString())
    m["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (ds / "manifest.json").write_text(json.dumps(m))
    for r in four_commands(cli, ds, tmp_path):
        if ok:
            assert r.exit_code == 0, r.output
        else:
            assert shard.name in one_clear_error(r)


# -- nothing from data reaches the terminal raw ----------------------------------------------------


def no_forgery(r):
    text = r.output
    assert "\x1b" not in text
    assert not any(line.startswith("logitify: error: forged") for line in text.splitlines())


def test_encode_skip_warnings_escape_file_names(cli, pics, tmp_path):
    (pics / f"bad{FORGED}.png").write_bytes(b"not a png")
    r = cli("encode", pics, "-o", tmp_path / "o")
    assert r.exit_code == 0 and "skipped" in r.stderr
    no_forgery(r)
    r = cli("encode", pics, "-o", tmp_path / "o2", "--on-error", "fail")
    one_clear_error(r)
    no_forgery(r)
    r = cli("info", tmp_path / "o")  # the skipped list, printed again
    assert r.exit_code == 0 and "bad\\nlogitify" in r.stdout
    no_forgery(r)


def test_decode_refusals_and_verify_problems_escape_keys(cli, keyed, tmp_path):
    keys = [f"../up{FORGED}.png", f"nan{FORGED}.png", "fine.png"]
    r = cli("decode", keyed(keys), "-o", tmp_path / "out")
    assert len(refusal_lines(r.stderr)) == 1
    one_clear_error(r)
    no_forgery(r)
    logits = np.zeros((3, 8, 8, 3), np.float32)
    logits[1] = np.nan
    ds = keyed(keys, logits=logits)
    for r in (cli("verify", ds), cli("decode", ds, "-o", tmp_path / "out2")):
        one_clear_error(r)
        no_forgery(r)
        assert "nan\\nlogitify" in r.stderr


def test_info_escapes_what_the_manifest_says(cli, pics, tmp_path):
    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds).exit_code == 0
    fake_manifest(ds, name=f"n{FORGED}", split=f"s{FORGED}", classes=[f"c{FORGED}", "$^$"],
                  skipped=[{"source": f"x{FORGED}", "reason": f"r{FORGED}"}])
    m = json.loads((ds / "manifest.json").read_text())
    rewrite_npz_dataset(ds, ["a.png", "b.png"], labels=[0, 1])
    for args in (["info", ds], ["info", ds, "--plot", tmp_path / "p.png"], ["verify", ds]):
        r = cli(*args)
        assert r.exit_code == 0, r.output
        no_forgery(r)
    assert m["classes"][0] in json.loads(cli("info", ds, "--json").stdout)["classes"][0]


# -- one run at a time: the lock ---------------------------------------------------------------------


LOCK = ".logitify.lock"
SLOW = ["--workers", "1", "--batch-size", "1", "--shard-size", "100"]


@pytest.fixture(scope="module")
def slow_input(tmp_path_factory):
    """4,000 small images: with one worker and batches of one, a run of several seconds."""
    root = tmp_path_factory.mktemp("slow")
    rng = np.random.default_rng(7)
    for i in range(4000):
        save(str(root / f"c{i % 3}" / f"{i:04d}.png"), photo(rng, 8, 8))
    return root


def cli_process(*args):
    """The CLI as a process of its own (its own session, so it and its workers can be stopped together)."""
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "logitify_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def run_cli(*args, timeout=300):
    p = cli_process(*args)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def wait_for_lock(proc, out, timeout=120):
    """Until the run holds the folder's lock (its process id is in the lock file)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if (out / LOCK).read_text().strip() == str(proc.pid):
                return
        except OSError:
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the run never took its lock")


def stop_group(proc):
    """SIGKILL what this test started (the run's own session), if anything of it is left."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.communicate()


def test_a_second_run_is_refused_with_the_first_ones_pid(slow_input, tmp_path, keyed):
    ds = keyed(["a.png"])
    out = tmp_path / "o"
    first = cli_process("encode", slow_input, "-o", out, *SLOW)
    try:
        wait_for_lock(first, out)
        for args in (["encode", slow_input, "-o", out, "--overwrite"], ["encode", slow_input, "-o", out],
                     ["encode", slow_input, "-o", out, "--resume"], ["decode", ds, "-o", out, "--overwrite"]):
            rc, _, err = run_cli(*args)
            assert rc == 1 and f"in use by another logitify run (process {first.pid})" in err, err
            assert first.poll() is None, "the second run must not disturb the first"
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        stop_group(first)
    assert not (out / LOCK).exists()
    assert run_cli("verify", out)[0] == 0


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(slow_input, tmp_path):
    import signal

    out = tmp_path / "o"
    first = cli_process("encode", slow_input, "-o", out, *SLOW)
    try:
        wait_for_lock(first, out)
        os.kill(first.pid, signal.SIGKILL)  # the run's main process only: its readers die with it
        first.wait(timeout=60)
    finally:
        stop_group(first)
    assert (out / LOCK).read_text().strip() == str(first.pid)  # left behind, but held by nobody
    rc, _, err = run_cli("encode", slow_input, "-o", out, *SLOW, "--resume")
    assert rc == 0, err
    assert not (out / LOCK).exists()
    assert run_cli("verify", out)[0] == 0


def test_the_lock_is_gone_after_a_run_that_fails(cli, pics, tmp_path, keyed):
    (pics / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "o"
    rc, _, err = run_cli("encode", pics, "-o", out, "--on-error", "fail", "--workers", "1")
    assert rc == 1 and "broken.png" in err
    assert not (out / LOCK).exists()
    ds = keyed(["../out.png", "in.png"])
    out = tmp_path / "d"
    rc, _, err = run_cli("decode", ds, "-o", out)
    assert rc == 1 and "refused" in err
    assert sorted(os.listdir(out)) == ["in.png"]


def test_a_plot_name_that_is_a_folder_is_a_usage_error(cli, pics, tmp_path):
    from logitify_cli.errors import UsageError
    from logitify_cli.info import info

    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds).exit_code == 0
    (tmp_path / "p.png").mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        info(str(ds), str(tmp_path / "p.png"))


def test_a_plot_is_never_written_through_a_link_at_its_name(cli, pics, tmp_path):
    """--plot at a link (to someone's file, or dangling): the link is replaced by the plot, nothing outside changes."""
    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds).exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"someone's file")
    for target in (victim, tmp_path / "nowhere.txt"):
        link = tmp_path / "link.png"
        if os.path.lexists(link):
            link.unlink()
        os.symlink(target, link)
        r = cli("info", ds, "--plot", link)
        assert r.exit_code == 0, r.output
        assert not os.path.islink(link) and Image.open(link).size[0] > 100
    assert victim.read_bytes() == b"someone's file" and not (tmp_path / "nowhere.txt").exists()
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("where", ["logits", "key", "header"])
def test_verify_checks_each_tfrecord_records_checksums(cli, pics, tmp_path, compress, where):
    """A TFRecord shard changed inside a record, with its sha256 in the manifest changed to match: the
    file's hash cannot tell, the record's own CRC32C can (as TensorFlow's reader, which would fail later)."""
    import gzip

    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds, "-f", "tfrecord", *(["--compress"] if compress else [])).exit_code == 0
    assert cli("verify", ds).exit_code == 0
    m = json.loads((ds / "manifest.json").read_text())
    shard = ds / m["shards"][0]["file"]
    data = bytearray(gzip.decompress(shard.read_bytes()) if compress else shard.read_bytes())
    (n,) = struct.unpack_from("<Q", data, 0)
    first = 16 + n  # the second record starts here
    at = {"logits": first + 12 + n // 2, "key": first + 12 + n - 20, "header": first + 2}[where]
    data[at] ^= 0x40
    shard.write_bytes(gzip.compress(bytes(data)) if compress else bytes(data))
    m["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (ds / "manifest.json").write_text(json.dumps(m))
    r = cli("verify", ds)
    one_clear_error(r)
    assert "record 1" in r.stderr and "fails its checksum" in r.stderr, r.stderr


def test_verify_names_a_class_that_decode_cannot_make_a_folder_of(cli, keyed, tmp_path):
    """A manifest whose class climbs out ('../../x'): decode refuses its images, so verify must not pass it."""
    ds = keyed(["a.png", "b.png"], labels=[0, 1])
    fake_manifest(ds, classes=["../../x", "fine"])
    r = cli("verify", ds)
    assert r.exit_code == 1 and "classes: class '../../x' cannot name the folder its images decode into" in r.stderr, \
        r.output
    fake_manifest(ds, classes=["cat", "/a/abbey"])  # TFDS's own names can be paths: they decode into a/abbey
    assert cli("verify", ds).exit_code == 0
    for classes, folder in ((["cat", "cat"], "cat"), (["cat", "/cat"], "cat"), (["", ""], ".")):
        fake_manifest(ds, classes=classes)  # two labels, one folder: decode would mix their images
        r = cli("verify", ds)
        assert r.exit_code == 1 and f"classes 0 and 1 both decode into the folder '{folder}'" in r.stderr, r.output


def test_a_class_folder_does_not_make_a_bad_key_good(cli, keyed, tmp_path):
    """With classes, images go into class folders: an absolute or climbing key is still refused, not joined."""
    ds = keyed(["/abs/x.png", "../up.png", "fine.png"], labels=[0, 0, 0])
    fake_manifest(ds, classes=["cat"])
    out = tmp_path / "sandbox" / "out"
    r = cli("decode", ds, "-o", out)
    assert r.exit_code == 1 and len(refusal_lines(r.stderr)) == 2, r.output
    fine = snapshot(out)["cat/fine.png"]
    assert snapshot(tmp_path / "sandbox") == {"out": "/", "out/cat": "/", "out/cat/fine.png": fine}


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_decode_of_several_splits_never_writes_through_a_link_at_a_split_folder(cli, pics, tmp_path, fmt):
    """OUT is the user's choice; OUT/SPLIT is decode's own folder: a link planted there (even with --overwrite)
    is refused, and what it points at is left as it was."""
    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds).exit_code == 0
    assert cli("encode", pics, "-o", ds, "--split", "test").exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "cat").mkdir(parents=True)
    (elsewhere / "cat" / "0.png").write_bytes(b"precious")
    (elsewhere / "images-00000-of-00001.npz").write_bytes(b"precious")
    before = snapshot(elsewhere)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(elsewhere, out / "test")
    r = cli("decode", ds, "-o", out, "-f", fmt, "--overwrite")
    assert r.exit_code == 1 and "is a link: decode does not write through it" in r.stderr, r.output
    assert snapshot(elsewhere) == before


@pytest.mark.parametrize("change", [{"name": "../escaped"}, {"name": ".hidden"}, {"split": "../x"},
                                    {"jpeg_draft": True}, {"jpeg_draft": True, "size": (8, 8), "crop": (0, 0, 4, 4)},
                                    {"holdout": (0.5, "bad-name")}, {"holdout": (0.5, "../../x")},
                                    {"holdout": (1.0, "test")}, {"holdout": (float("nan"), "test")}])
def test_a_program_is_held_to_the_options_the_cli_checks(image_folder, tmp_path, change):
    """A name that would lead shard files out of the output folder, and other options the CLI refuses as it
    parses, are refused by the run itself, before anything is written, for a program that calls it too."""
    from logitify_cli.encode_run import run_encode
    from logitify_cli.errors import UsageError
    from logitify_cli.planner import EncodeOptions
    from logitify_cli.report import Reporter

    src, _ = image_folder
    out = tmp_path / "inner" / "out"
    before = sorted(os.listdir(tmp_path))
    opts = EncodeOptions(sources=[str(src)], out=str(out), format="tfrecord", **change)
    with pytest.raises(UsageError):
        run_encode(opts, Reporter(quiet=True))
    assert sorted(os.listdir(tmp_path)) == before and not out.exists()


def test_a_program_cannot_send_the_local_runner_to_a_bucket(dataset, image_folder, tmp_path, monkeypatch):
    """The local runner's folder rules are for local folders: a bucket path is refused, not made a folder 'gs:'."""
    from logitify_cli.decode_run import run_decode
    from logitify_cli.encode_run import run_encode
    from logitify_cli.errors import UsageError
    from logitify_cli.planner import EncodeOptions
    from logitify_cli.report import Reporter

    _, _, ds = dataset
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UsageError, match="--runner beam"):
        run_decode(str(ds), "gs://bucket/restored")
    with pytest.raises(UsageError, match="--runner beam"):
        run_encode(EncodeOptions(sources=[str(image_folder[0])], out="s3://bucket/ds"), Reporter(quiet=True))
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("fmt", [["npz"], {"a": 1}, 3, None])
def test_a_journal_whose_header_names_no_format_owns_nothing(cli, pics, tmp_path, fmt):
    """A journal header's format must be a format's name: a list or an object there is no TypeError, the
    journal owns no shard, and --overwrite goes on with what is logitify's (the journal itself)."""
    out = tmp_path / "o"
    out.mkdir()
    (out / ".logitify-journal.jsonl").write_text(json.dumps({"header": {"format": fmt, "num_shards": 1}}) + "\n")
    r = cli("encode", pics, "-o", out, "--overwrite")
    assert r.exit_code == 0 and "Traceback" not in r.output and "TypeError" not in r.output, r.output
    assert cli("verify", out).exit_code == 0


def test_names_ending_in_a_newline_are_not_logitifys(cli, image_folder, tmp_path):
    """'$' in a pattern also matches before a final newline: a user's '.logitify-journal.jsonl\\n' or
    '.train-00000-of-00001.npz.tmp-1\\n' beside a dataset stays theirs, and --overwrite stops."""
    src, _ = image_folder
    for name in (".logitify-journal.jsonl\n", ".train-00000-of-00001.npz.tmp-1\n"):
        out = tmp_path / f"o{len(name)}"
        assert cli("encode", src, "-o", out).exit_code == 0
        (out / name).write_bytes(b"mine")
        r = cli("encode", src, "-o", out, "--overwrite")
        assert r.exit_code == 1 and "which logitify did not write" in r.stderr, r.output
        assert (out / name).read_bytes() == b"mine"
    r = cli("encode", src, "-o", tmp_path / "s", "--split", "train\n")
    assert r.exit_code == 2 and not (tmp_path / "s").exists(), r.output


def test_a_planted_journal_claiming_every_shard_of_a_long_name_is_looked_up_not_listed(tmp_path):
    """A 100 KB journal header claiming 99,999 shards of a 100,000-character name: ownership is asked of the
    names present, so it answers at once instead of listing gigabytes of names."""
    import time

    from logitify_cli.outdir import OutputFolder, header_owns

    header = {"format": "tfrecord", "num_shards": 99999, "name": "n" * 100000, "split": "train"}
    (tmp_path / ".logitify-journal-x.jsonl").write_text(json.dumps({"header": header}) + "\n")
    (tmp_path / "mnist-train.tfrecord-00003-of-00099").write_bytes(b"mine")
    t0 = time.process_time()
    owned = OutputFolder(str(tmp_path)).owned()
    assert time.process_time() - t0 < 5
    assert "mnist-train.tfrecord-00003-of-00099" not in owned and ".logitify-journal-x.jsonl" in owned
    small = {**header, "name": "mnist", "num_shards": 99}
    assert header_owns(small, "mnist-train.tfrecord-00003-of-00099")
    assert not header_owns(small, "mnist-train.tfrecord-00099-of-00099")
    assert not header_owns(small, "mnist-train.tfrecord-00003-of-00098")


def test_ownership_reads_a_journals_header_alone(tmp_path):
    """Ownership needs a journal's header line only: a planted journal whose entry lines hold megabytes of
    nested junk (parsed JSON takes some 27 times its text in memory) is not parsed for it; --resume's reading
    keeps only the fields a journal writes."""
    import time
    import tracemalloc

    from logitify_cli.outdir import Journal, OutputFolder

    header = {"format": "npz", "num_shards": 3, "name": "logitify", "split": "train"}
    junk = "[" + "[]," * (3 << 20) + "[]]"  # parsed: some 190 MB a line
    with open(tmp_path / ".logitify-journal.jsonl", "w") as f:
        f.write(json.dumps({"header": header}) + "\n")
        for i in range(3):
            f.write(f'{{"shard": {{"index": {i}, "file": "train-{i:05d}-of-00003.npz", "num_examples": 1, '
                    f'"sha256": "0", "skipped": [], "pixels": "00", "extra": {junk}}}}}\n')
            (tmp_path / f"train-{i:05d}-of-00003.npz").write_bytes(b"")
    t0 = time.process_time()
    tracemalloc.start()  # this process's peak may be past already: Python's own allocations are counted here
    try:
        owned = OutputFolder(str(tmp_path)).owned()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.process_time() - t0 < 1 and "train-00001-of-00003.npz" in owned
    assert peak < 100 << 20, peak
    got, entries = Journal(str(tmp_path)).load()
    assert got == header and sorted(entries) == [0, 1, 2] and all("extra" not in e for e in entries.values())


def test_resume_reads_no_entry_of_a_journal_made_with_other_options(tmp_path):
    """--resume compares a journal's header first: a planted journal of other options (here its shard count)
    is refused before its entry lines are read (a 486 MB one took 3.6 GB and 14 s to say so), and under the
    right header an entry holding more inputs than a shard is given is not kept."""
    import time

    from logitify_cli.outdir import Journal

    header = {"format": "npz", "num_shards": 3, "name": "logitify", "split": "train", "shard_size": 36}
    junk = [{"source": "s", "reason": "r"}] * 400000
    with open(tmp_path / ".logitify-journal.jsonl", "w") as f:
        f.write(json.dumps({"header": header}) + "\n")
        for i in range(3):
            f.write(json.dumps({"shard": {"index": i, "file": f"train-{i:05d}-of-00003.npz", "num_examples": 1,
                                          "sha256": "0", "skipped": junk if i else [], "pixels": "00"}}) + "\n")
    journal = Journal(str(tmp_path))
    t0 = time.process_time()
    got, entries = journal.load(expect={**header, "num_shards": 8})
    assert time.process_time() - t0 < 0.2 and got == header and entries == {}
    got, entries = journal.load(expect=header)
    assert got == header and sorted(entries) == [0]  # the two entries of 400,000 skipped inputs are not the run's


def test_make_folder_records_what_it_made_and_a_failed_run_takes_it_back(tmp_path, monkeypatch):
    """make_folder makes the missing levels of a path as os.makedirs does (trailing slash, `..`, a link on the
    way), records each as it is made, and drop_made_folder removes exactly those, while empty; a stop
    halfway through making them leaves none."""
    from logitify_cli.errors import LogitifyError
    from logitify_cli.outdir import drop_made_folder, make_folder

    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere" / "sub"
    elsewhere.mkdir(parents=True)
    (tmp_path / "link").symlink_to(elsewhere)
    mine = tmp_path / "mine"
    mine.mkdir()
    for path, expect in (("a/b/c", "a/b/c"), ("d/e/", "d/e"), ("nx/..", None), ("link/../zz/q", "elsewhere/zz/q"),
                         (str(mine / "f"), "mine/f")):
        made = make_folder(path)
        assert os.path.isdir(path)
        drop_made_folder(made)
        assert not os.path.lexists(path.rstrip("/")) or path == "nx/.."
        assert sorted(os.listdir(tmp_path)) == ["elsewhere", "link", "mine"], path
        assert os.listdir(tmp_path / "elsewhere") == ["sub"] and mine.is_dir()
        if expect is not None:
            assert not (tmp_path / expect).exists()
    made = make_folder("g/h")
    (tmp_path / "g" / "h" / "kept.txt").write_text("x")  # not empty: nothing goes
    drop_made_folder(made)
    assert (tmp_path / "g" / "h" / "kept.txt").is_file()
    (tmp_path / "g" / "gone").symlink_to(tmp_path / "nowhere")  # a link to nothing names no folder to make in
    with pytest.raises(LogitifyError, match="cannot create output folder g/gone/v/w: g/gone is a link to nothing"):
        make_folder("g/gone/v/w")
    (tmp_path / "g" / "file").write_text("x")
    with pytest.raises(LogitifyError, match="cannot create output folder g/file/v: Not a directory"):
        make_folder("g/file/v")
    assert not (tmp_path / "nowhere").exists()
    real = os.mkdir
    calls = []

    def stopped(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", stopped)
    with pytest.raises(KeyboardInterrupt):
        make_folder("p/q/r")
    assert not (tmp_path / "p").exists() and calls == ["p", "p/q"]
    calls.clear()
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(LogitifyError, match="cannot create output folder s/t: denied"):
        make_folder("s/t")


@pytest.mark.parametrize("flag", [None, "--overwrite", "--resume"])
def test_an_output_named_through_a_folder_yet_to_be_made_is_checked_once_it_is_there(cli, pics, tmp_path,
                                                                                      monkeypatch, flag):
    """`-o new/..` names no folder until `new` is made, then the folder holding the user's files: it is
    refused as that folder would be, nothing is written there, and `new` goes again."""
    home = tmp_path / "work"
    home.mkdir()
    (home / "thesis.txt").write_text("mine")
    monkeypatch.chdir(home)
    r = cli("encode", pics, "-o", "new/..", *([flag] if flag else []))
    assert r.exit_code == 1, r.output
    assert ("not empty" if flag is None else f"which logitify did not write; {flag} touches only") in r.stderr
    assert sorted(os.listdir(home)) == ["thesis.txt"] and (home / "thesis.txt").read_text() == "mine"
    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds).exit_code == 0
    monkeypatch.setenv("HOME", str(home))  # decode --overwrite never writes into the home folder
    r = cli("decode", ds, "-o", "new/..", *(["--overwrite"] if flag == "--overwrite" else []))
    assert r.exit_code == 1 and ("home folder" if flag == "--overwrite" else "not empty") in r.stderr, r.stderr
    assert sorted(os.listdir(home)) == ["thesis.txt"]


def test_an_output_that_is_a_link_to_nothing_is_named_so(cli, pics, tmp_path):
    """`-o LINK` where LINK points nowhere, or a folder on the way to the output is such a link: the message
    says so (it said 'exists and is not a folder', and 'File exists'), and nothing is made at its target."""
    (tmp_path / "dl").symlink_to(tmp_path / "nowhere")
    ds = tmp_path / "ds"
    assert cli("encode", pics, "-o", ds).exit_code == 0
    for args in (["encode", pics], ["decode", ds]):
        for out, said in ((tmp_path / "dl", f"output {tmp_path / 'dl'} is a link to nothing"),
                          (tmp_path / "dl" / "x", f"{tmp_path / 'dl'} is a link to nothing")):
            r = cli(*args, "-o", out)
            assert r.exit_code == 1 and said in r.stderr, r.stderr
    assert not (tmp_path / "nowhere").exists()
