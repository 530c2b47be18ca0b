"""The shard writer's hashing file: the sha256 in a manifest is the file's."""
import errno
import hashlib
import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitify_cli.formats.npz import HashingWriter

BIG = HashingWriter.PARALLEL_BYTES


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 100, BIG - 1, BIG, BIG + 7, 3 * BIG]), max_size=6),
       seed=st.integers(0, 2**32 - 1))
def test_hashes_and_writes_the_same_bytes_in_order(tmp_path_factory, sizes, seed):
    rng = np.random.default_rng(seed)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    path = tmp_path_factory.mktemp("w") / "f.bin"
    w = HashingWriter(os.open(path, os.O_WRONLY | os.O_CREAT))
    for i, c in enumerate(chunks):  # numpy buffers and bytes, as zipfile hands them over
        assert w.write(c.data if i % 2 else c.tobytes()) == c.size
    assert w.tell() == sum(sizes)
    w.close()
    data = path.read_bytes()
    assert data == b"".join(c.tobytes() for c in chunks)
    assert w.sha256.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("size", [100, 2 * BIG])
def test_a_failed_write_raises(size):
    w = HashingWriter(os.open("/dev/full", os.O_WRONLY))
    with pytest.raises(OSError) as e:
        w.write(b"x" * size)
        w.flush()
    assert e.value.errno == errno.ENOSPC
    try:
        w.close()
    except OSError:
        pass


@settings(max_examples=60)
@given(h=st.integers(1, 40), w=st.integers(1, 40), c=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 2**32 - 1))
def test_decode_pngs_read_back_as_their_pixels(h, w, c, seed):
    """decode's own PNG writer: Pillow reads back every pixel, in the mode the channels say."""
    import io as _io

    from PIL import Image as _Image

    from logitify_cli.outputs import png_bytes

    arr = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    img = _Image.open(_io.BytesIO(png_bytes(arr)))
    assert img.mode == {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[c]
    back = np.asarray(img)
    assert np.array_equal(back.reshape(h, w, c), arr)


@pytest.mark.parametrize("fmt", ["npz", "tfrecord"])
def test_a_shard_is_never_written_through_a_link_at_its_temporary_name(tmp_path, fmt, monkeypatch):
    """Someone who can write the output folder puts a link at a run's temporary shard name, before the
    writer opens it or while it writes: the file outside stays as it was, and no link becomes a shard."""
    from logitify_cli import fs
    from logitify_cli.errors import LogitifyError
    from logitify_cli.formats import get
    from logitify_cli.formats.base import temp_name

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"someone's file")
    out = tmp_path / "out"
    out.mkdir()
    f = get(fmt)
    name = f.shard_file("d", "train", 0, 1)
    logits = np.ones((2, 4, 4, 3), np.float32)

    os.symlink(victim, temp_name(str(out / name)))
    w = f.writer(str(out), name, (4, 4, 3), 2, False)
    w.add(["a", "b"], [-1, -1], logits, np.zeros(2, np.float32))
    w.close()
    assert victim.read_bytes() == b"someone's file"
    assert os.path.isfile(out / name) and not os.path.islink(out / name)

    w = f.writer(str(out), name, (4, 4, 3), 2, False)
    os.unlink(w.tmp)
    os.symlink(victim, w.tmp)
    w.add(["a", "b"], [-1, -1], logits, np.zeros(2, np.float32))
    with pytest.raises(LogitifyError, match="replaced while it was written"):
        w.close()
    assert victim.read_bytes() == b"someone's file" and not os.path.lexists(w.tmp)

    # The link appears between the file's making and its opening by the format's library (TensorFlow's
    # TFRecordWriter opens by name): the library writes the file that was made, not the link.
    real = fs.create_new

    def create_then_swap(tmp):
        fd = real(tmp)
        os.unlink(tmp)
        os.symlink(victim, tmp)
        return fd

    monkeypatch.setattr(fs, "create_new", create_then_swap)
    w = f.writer(str(out), name, (4, 4, 3), 2, False)
    w.add(["a", "b"], [-1, -1], logits, np.zeros(2, np.float32))
    with pytest.raises(LogitifyError, match="replaced while it was written"):
        w.close()
    assert victim.read_bytes() == b"someone's file" and not os.path.lexists(w.tmp)


# Keys from a few stems, suffixes and folders, so that many compete for one PNG name (a.jpg, a.png, a.png.png),
# a file's name is another key's folder (a.jpg, a.png/b.png), or names reach the file system's limit.
def _renamed(folder):
    """The name PngNames gives a folder whose name a file took: cut to fit, then ~ and 12 hex digits of it."""
    import hashlib

    return folder[:242] + "~" + hashlib.blake2b(folder.encode(), digest_size=6).hexdigest()


_LONG = "y" * 251 + ".png"  # a folder whose renamed name must be cut to fit
_KEY = st.builds(lambda folder, stem, ends: folder + stem + "".join(ends),
                 st.sampled_from(["", "cats/", "dogs/", "a.png/", "cats/a.png/", "a.png/a.png/",
                                  _renamed("a.png") + "/", _LONG + "/", _renamed(_LONG) + "/"]),
                 st.sampled_from(["a", "b", "a.png", "x" * 248, _LONG[:-4], "é", "\udcc3\udca9"]),
                 st.lists(st.sampled_from([".png", ".jpg", ".PNG", ".bmp", ""]), max_size=2))


def _names_taken(output, shards, settled_first=False):
    """{(shard, position): file or 'refused'} as output (made per shard by a callable, or one) names them."""
    got = {}
    for s, rows in enumerate(shards):
        out = output(s) if callable(output) else output
        out.begin_shard(s, len(rows), (1, 1, 1))
        jobs = []
        for a, b in ((0, len(rows) // 2), (len(rows) // 2, len(rows))):  # a shard comes in slices
            part = rows[a:b]
            jobs += out.add(s, [k for k, _ in part], [label for _, label in part],
                            np.zeros((len(part), 1, 1, 1), np.uint8))
        named = {key: rel for job in jobs for key, rel, _ in job[2]}
        refused = {x["key"] for x in out.refused}
        for i, (key, _) in enumerate(rows):
            got[(s, i)] = "refused" if key in refused else named[key]
        out.refused.clear()
    return got


@given(st.lists(st.tuples(_KEY, st.integers(-1, 2)), max_size=24, unique_by=lambda kl: kl[0]),
       st.lists(st.integers(0, 24), max_size=4), st.sampled_from([[], ["cats", "dogs", "/x/birds"]]))
@settings(max_examples=300, deadline=None)
def test_names_settled_per_shard_are_those_taken_in_key_order(keyed, cuts, classes):
    """Beam names each shard apart from the others: the keys that compete for a file are settled
    first (settle_names), and every key gets the file the local runner's one pass gives it."""
    from logitify_cli.beam_runner import _clashing
    from logitify_cli.outputs import PngOutput, name_claims, settle_names

    bounds = sorted({0, len(keyed), *(c for c in cuts if c <= len(keyed))})
    shards = [keyed[a:b] for a, b in zip(bounds, bounds[1:])]
    local = _names_taken(PngOutput("out", len(shards), False, classes=classes), shards)

    by_file = {}
    for s, rows in enumerate(shards):
        half = len(rows) // 2  # claimed a slice at a time, as the Beam stage reads a shard
        for start, part in ((0, rows[:half]), (half, rows[half:])):
            for name, who in name_claims(classes, s, start, [k for k, _ in part], [label for _, label in part]):
                by_file.setdefault(name, []).append(who)
    clashing = [who for claim in by_file.items() for who in _clashing(claim)]
    settled = settle_names(clashing, classes)
    apart = _names_taken(lambda s: PngOutput("out", len(shards), False, classes=classes, settled=settled), shards)
    assert apart == local
    made = [os.fsdecode(os.fsencode(rel)) for rel in local.values() if rel != "refused"]  # as the disk sees them
    assert len(made) == len(set(made))  # no two keys ever share a file
    folders = {"/".join(rel.split("/")[:i]) for rel in made for i in range(1, rel.count("/") + 1)}
    assert not folders & set(made)  # nor is a file where another key's file needs a folder
    assert all(len(part.encode()) <= 255 for rel in made for part in rel.split("/"))


def test_a_key_whose_own_names_cannot_be_had_gets_its_name_cut_to_fit_and_tagged():
    """Both names taken, a folder in the way, a name too long: a name still, made from the key."""
    import hashlib

    from logitify_cli.outputs import NAME_MAX, PngNames

    def tag(text):
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    names = PngNames()
    assert [names.take(k) for k in ("a.png", "a.jpg", "a.png.png")] == ["a.png", "a.jpg.png", "a.png.png"]
    names = PngNames()
    assert [names.take(k) for k in ("a.png", "a.jpg.png", "a.jpg")] == ["a.png", "a.jpg.png", f"a.jpg~{tag('a.jpg')}.png"]
    # A file and a folder that want one name, in either order: the folder keeps it when it came first.
    names = PngNames()
    assert [names.take(k) for k in ("b.png/c.png", "b.tif")] == ["b.png/c.png", "b.tif.png"]
    names = PngNames()
    moved = f"k/b.png~{tag('k/b.png')}"
    assert [names.take(k) for k in ("k/b.jpg", "k/b.png/c.png", "k/b.png/d.tif")] == [
        "k/b.png", f"{moved}/c.png", f"{moved}/d.png"]
    # Names at the file system's limit: the second key's name, and every record of a long file name.
    # One name spelled two ways (the bytes of 'é' as surrogate escapes) is one name.
    names = PngNames()
    assert [os.fsencode(names.take(k)) for k in ("é.jpg", "\udcc3\udca9.png")] == [b"\xc3\xa9.png",
                                                                                   b"\xc3\xa9.png.png"]
    names = PngNames()
    long_jpg, long_png, record = "x" * 251 + ".jpg", "x" * 251 + ".png", "r" * 246 + ".tfrecord:0"
    got = [names.take(k) for k in (long_jpg, long_png, record)]
    assert got[0] == long_png
    assert got[1] == "x" * (NAME_MAX - 17) + f"~{tag(long_png)}.png" and len(got[1]) == NAME_MAX
    assert got[2] == record[:NAME_MAX - 17] + f"~{tag(record)}.png"


def test_an_output_folder_moved_away_mid_run_is_an_error_not_images_in_two_folders(tmp_path):
    """Decode's jobs open the folder by name: moved away and another made in its place, the jobs after
    that fail (the run says so) instead of writing the rest into the new folder."""
    from logitify_cli.outputs import PngOutput

    out = tmp_path / "out"
    out.mkdir()
    output = PngOutput(str(out), 1, False)
    output.begin_shard(0, 4, (2, 2, 3))
    first, second = (output.add(0, keys, [-1, -1], np.zeros((2, 2, 2, 3), np.uint8))
                     for keys in (["a.png", "b.png"], ["c.png", "d.png"]))
    assert PngOutput.write(first[0])["problems"] == []
    out.rename(tmp_path / "moved")
    out.mkdir()
    done = PngOutput.write(second[0])
    assert [p["refused"] for p in done["problems"]] == [False, False]
    assert all("was moved or replaced during the run" in p["reason"] for p in done["problems"])
    assert os.listdir(out) == [] and sorted(os.listdir(tmp_path / "moved")) == ["a.png", "b.png"]


def test_a_folder_filled_between_decodes_look_and_its_lock_is_refused(tmp_path):
    """Two decodes into one new folder both found it empty; the second then wrote beside the first's files.
    Emptiness is looked at again once the lock is held."""
    from logitify_cli.decode_run import locked_folder, prepare_folder
    from logitify_cli.errors import LogitifyError

    out = tmp_path / "out"
    prepare_folder(str(out), False)
    (out / "a.png").write_bytes(b"the first run's")  # the other run, between the look and the lock
    with pytest.raises(LogitifyError, match="is not empty; pass --overwrite"):
        locked_folder(str(out), False)
    locked_folder(str(out), True).release()  # with --overwrite it may, and the lock goes with the run
    assert os.listdir(out) == ["a.png"]


def test_npz_decode_and_a_beam_workers_output_write_only_into_the_folder_the_run_locked(tmp_path):
    """The npz output checks the folder as each shard begins; a Beam worker's output takes the identity the
    launcher saw, not the one of whatever folder has the name when its shard starts."""
    from logitify_cli.errors import WriteError
    from logitify_cli.outputs import NpzOutput, PngOutput, folder_identity

    out = tmp_path / "out"
    out.mkdir()
    output = NpzOutput(str(out), 2, False)
    output.begin_shard(0, 1, (2, 2, 3))
    output.add(0, ["a.png"], [-1], np.zeros((1, 2, 2, 3), np.uint8))
    out.rename(tmp_path / "moved")
    out.mkdir()
    with pytest.raises(WriteError, match="images-00001-of-00002.npz: the output folder .* was moved or replaced"):
        output.begin_shard(1, 1, (2, 2, 3))
    job = output.end_shard(0)[0]
    assert NpzOutput.write(job)["problems"] and os.listdir(out) == []
    output.close()
    locked = folder_identity(str(tmp_path / "moved"))
    worker = PngOutput(str(out), 1, False, identity=locked)  # made per shard, in a worker, after the swap
    jobs = worker.add(0, ["b.png"], [-1], np.zeros((1, 2, 2, 3), np.uint8))
    assert PngOutput.write(jobs[0])["problems"] and os.listdir(out) == []


@pytest.mark.parametrize("fmt", ["npz", "tfrecord"])
def test_a_shard_is_handed_to_the_disk_as_it_grows_not_all_at_its_fsync(tmp_path, fmt, monkeypatch):
    """Each format asks the kernel to start writing the temporary shard every Writeback.STEP bytes (so
    the fsync before the rename waits for little), through the shard's own file; the bytes are the same."""
    from logitify_cli import fs
    from logitify_cli.formats import get

    logits = np.random.default_rng(0).standard_normal((64, 16, 16, 3)).astype(np.float32)  # 192 KiB
    digests = []
    for step in (None, 16 << 10):
        started = []
        if step:
            monkeypatch.setattr(fs.Writeback, "STEP", step)
            real = fs.Writeback.start
            monkeypatch.setattr(fs.Writeback, "start", lambda self: started.append(
                (os.fstat(self.fd).st_ino, real(self))))
        out = tmp_path / f"out-{step}"
        out.mkdir()
        f = get(fmt)
        name = f.shard_file("d", "train", 0, 1)
        w = f.writer(str(out), name, (16, 16, 3), 64, False)
        tmp_ino = os.stat(w.tmp).st_ino
        for i in range(0, 64, 8):
            w.add([f"k{j}" for j in range(i, i + 8)], [-1] * 8, logits[i:i + 8], np.zeros(8, np.float32))
        info = w.close()
        digests.append(info["sha256"])
        if step:
            assert len(started) >= 8 and {ino for ino, _ in started} == {tmp_ino}
            # Linux takes the request (unless a sandbox forbids the call); elsewhere there is nothing to ask,
            # and the fsync alone makes the shard durable.
            if sys.platform.startswith("linux") and not forbidden():
                assert all(ok for _, ok in started)
            else:
                assert not any(ok for _, ok in started)
    assert digests[0] == digests[1]


def forbidden() -> bool:
    """Whether this process may not call sync_file_range (a seccomp sandbox: ENOSYS or EPERM)."""
    import ctypes

    from logitify_cli.fs import _sync_file_range

    call = _sync_file_range()
    if not call:
        return False
    r, w = os.pipe()
    try:
        call(w, 0, 0, 2)
        return ctypes.get_errno() in (errno.ENOSYS, errno.EPERM)
    finally:
        os.close(r)
        os.close(w)


def test_writeback_asks_nothing_of_what_is_not_a_file():
    from logitify_cli.fs import Writeback

    r, w = os.pipe()
    try:
        assert Writeback(w).start() is False
    finally:
        os.close(r)
        os.close(w)
