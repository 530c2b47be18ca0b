"""Runs that survive: kill and resume, Ctrl-C, full disks, overwrite safety."""
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import fail_third_shard, photo, save

ENV = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(5)
    for i in range(1500):
        save(str(root / f"c{i % 3}" / f"{i:04d}.png"), photo(rng, 8, 8))
    return root


def shard_state(out):
    m = json.loads((out / "manifest.json").read_text())
    return m["shards"], {s["file"]: hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() for s in m["shards"]}


ARGS = ["--shard-size", "100", "--batch-size", "1", "--workers", "1"]


def test_kill_at_random_points_then_resume(cli, many_images, tmp_path):
    assert cli("encode", many_images, "-o", tmp_path / "ref", *ARGS).exit_code == 0
    ref_shards, ref_hashes = shard_state(tmp_path / "ref")
    assert len(ref_shards) == 15
    rnd = random.Random(os.environ.get("PYTEST_SEED", 11))
    cut_short = 0
    for attempt, sig in enumerate((signal.SIGKILL, signal.SIGINT, signal.SIGTERM, signal.SIGKILL)):
        out = tmp_path / f"run{attempt}"
        p = subprocess.Popen([sys.executable, "-m", "logitify_cli", "encode", str(many_images), "-o", str(out), *ARGS],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        want = rnd.randint(0, 8)
        stop = sig in (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, or a scheduler ending the job
        if stop:  # once its handler is surely set (the first shard is written after it),
            want = 1  # with fourteen shards still to make
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            done = [n for n in os.listdir(out)] if out.exists() else []
            if sum(n.endswith(".npz") for n in done) >= want:
                break
            time.sleep(0.01)
        time.sleep(rnd.uniform(0, 0.3))
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        if stop:  # 14 shards of one-image batches take far longer than 0.3 s; a shell reports 128 + the signal
            assert p.returncode == 128 + sig and "interrupted" in err and "Traceback" not in err, (p.returncode,
                                                                                                   err[-2000:])
            assert not any(".tmp-" in n for n in os.listdir(out)), f"{sig.name} left a temporary file"
        # Every file under a final shard name is whole.
        for name in os.listdir(out):
            if name.endswith(".npz"):
                with np.load(out / name, allow_pickle=False) as z:
                    assert z["logits"].shape[0] == len(z["keys"])
        if (out / "manifest.json").exists():  # killed after the manifest: the dataset is whole
            assert cli("verify", out).exit_code == 0
        else:
            cut_short += 1
        r = cli("encode", many_images, "-o", out, *ARGS[:2], "--resume")
        assert r.exit_code == 0, r.output
        shards, hashes = shard_state(out)
        assert shards == ref_shards and hashes == ref_hashes
    assert cut_short >= 3, "the kills came too late to test anything"


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _writing_into_a_full_pipe(pid) -> bool:
    """Whether pid sleeps in write(2) on a pipe (not in a read: an idle reader waits on its job pipe)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
        if wchan in ("pipe_write", "anon_pipe_write", "pipe_wait_writable"):
            return True
        if wchan == "pipe_wait":  # older kernels: either direction; the system call tells
            with open(f"/proc/{pid}/syscall") as f:
                return f.read().split()[:1] == ["1"] and os.uname().machine == "x86_64"
    except OSError:
        pass
    return False


def _loading_tensorflow(pid) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "tensorflow" in f.read()
    except OSError:
        return False


def ctrl_c(p) -> str:
    """SIGINT to a running CLI process; its stderr once it has ended (a failure if it does not, within 60 s)."""
    p.send_signal(signal.SIGINT)
    try:
        return p.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail("the run did not stop after Ctrl-C")


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/wchan"), reason="needs Linux's /proc/PID/wchan")
def test_ctrl_c_while_a_reader_is_halfway_through_sending_pixels(tmp_path):
    """A reader stopped in the middle of sending a result of several MB must not leave the run waiting.

    Its 256x256 images travel 21 to a result (4 MB, far more than a pipe
    holds). Once TensorFlow is loading (its libraries are mapped), this
    process reads those results slowly, and a reader is seen blocked
    writing one; Ctrl-C then stops the readers halfway. The executor's
    thread used to wait for the rest of that result forever.
    """
    src = tmp_path / "big"
    rng = np.random.default_rng(9)
    for i in range(200):
        save(str(src / f"{i:03d}.png"), photo(rng, 256, 256), compress_level=0)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "logitify_cli", "encode", str(src), "-o", str(out), "--workers", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 60
    loading = seen = False
    while not seen and time.time() < deadline and p.poll() is None:
        loading = loading or _loading_tensorflow(p.pid)
        seen = loading and any(_writing_into_a_full_pipe(c) for c in _children(p.pid))
        time.sleep(0.001)
    err = ctrl_c(p)
    if not seen:  # e.g. a kernel that hides wchan, or readers done before the import began
        pytest.skip("no reader was seen halfway through sending a result")
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, (p.returncode, err[-2000:])


# A decode that stops halfway through one chosen file (a PNG: half its bytes written; an npz: its
# empty placeholder made, the rename not yet done), says so in a marker file, and waits to be stopped.
# Decode never loads TensorFlow, so its workers are forked and run this too.
HALF_WRITE = """
import os, signal, sys, time
real_write, real_replace = os.write, os.replace
marker, stall_at = sys.argv.pop(1), sys.argv.pop(1)

def stall():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # as if it came just before
    open(marker, "w").close()
    time.sleep(600)

def aimed(path):  # the file itself, or the hidden sibling that is to replace it
    here, name = os.path.split(path)
    folder, target = os.path.split(stall_at)
    return here.endswith(folder) and (name == target or name.startswith(f".{target}."))

def write(fd, data):
    if aimed(os.readlink(f"/proc/self/fd/{fd}")):
        real_write(fd, memoryview(data)[:len(data) // 2])
        stall()
    return real_write(fd, data)

def replace(src, dst, **kw):
    if str(dst) == stall_at:
        stall()
    return real_replace(src, dst, **kw)

os.write, os.replace = write, replace
from logitify_cli.cli import main
main(prog_name="logitify")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
@pytest.mark.parametrize("fmt", ["png", "npz"])
@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_on_decode_leaves_no_half_written_file(cli, image_folder, tmp_path, fmt, workers):
    """Ctrl-C while a file is half made (by a worker, or by the run itself): it is dropped, the ones before kept.

    13 images in shards of 5: the third shard (dog_03 to dog_05) stalls on its first file, once the
    first two shards' files are all written.
    """
    src, truth = image_folder
    ds = tmp_path / "ds"
    assert cli("encode", src, "-o", ds, "--shard-size", "5").exit_code == 0
    out, marker = tmp_path / "out", tmp_path / "stalled"
    stall_at, before = {"png": ("dogs/dog_03.png", sorted(truth)[:10]),
                        "npz": ("images-00002-of-00003.npz", [f"images-0000{i}-of-00003.npz" for i in (0, 1)])}[fmt]
    p = subprocess.Popen([sys.executable, "-c", HALF_WRITE, str(marker), stall_at, "decode", str(ds), "-o", str(out),
                          "-f", fmt, "--workers", str(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)

    def files():
        return sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()) if out.exists() else []

    deadline = time.time() + 60
    while not (marker.exists() and set(before) <= set(files())) and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert marker.exists() and set(before) <= set(files()), (files(), p.poll())
    time.sleep(0.2)  # the other worker: done with what it had (nothing is left for it to take)
    err = ctrl_c(p)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, (p.returncode, err[-2000:])
    assert files() == before  # the stalled file is gone (no temporary left either), every earlier one kept
    for rel in before:
        if fmt == "png":  # whole: it loads, with the pixels it was given
            np.testing.assert_array_equal(np.asarray(Image.open(out / rel)), truth[rel])
        else:
            with np.load(out / rel, allow_pickle=False) as z:
                assert len(z["images"]) == len(z["keys"]) == 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_ctrl_c_on_decode_with_overwrite_keeps_the_old_file_whole(cli, image_folder, tmp_path, fmt):
    """--overwrite over an earlier decode, stopped as a file's replacement is half made: the old file is still there."""
    src, truth = image_folder
    ds, out, marker = tmp_path / "ds", tmp_path / "out", tmp_path / "stalled"
    assert cli("encode", src, "-o", ds, "--shard-size", "5").exit_code == 0
    assert cli("decode", ds, "-o", out, "-f", fmt).exit_code == 0
    stall_at = {"png": "dogs/dog_03.png", "npz": "images-00002-of-00003.npz"}[fmt]
    # The old file differs from what the new run writes there, so the two can be told apart.
    if fmt == "png":
        save(str(out / stall_at), 255 - truth[stall_at])
    else:
        shutil.copyfile(out / "images-00000-of-00003.npz", out / stall_at)

    def files():
        return {str(f.relative_to(out)): f.read_bytes() for f in out.rglob("*") if f.is_file()}

    old = files()
    p = subprocess.Popen([sys.executable, "-c", HALF_WRITE, str(marker), stall_at, "decode", str(ds), "-o", str(out),
                          "-f", fmt, "--overwrite", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    assert marker.exists(), p.poll()
    err = ctrl_c(p)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, (p.returncode, err[-2000:])
    now = files()
    assert sorted(now) == sorted(old)  # nothing lost, no temporary left
    assert now[stall_at] == old[stall_at]  # the one being replaced is the old file, whole


def assert_shards_before_the_failure(out, count):
    """Shards 0 and 1 are whole, shard 2 (the failed one) is absent.

    Shard 3 may have been finished beside shard 2 before the failure was
    seen; if it is there, it is whole (resume writes it again, same bytes).
    """
    names = sorted(n for n in os.listdir(out) if n.endswith(".npz"))
    assert names[:2] == [f"train-0000{i}-of-{count:05d}.npz" for i in range(2)]
    assert set(names[2:]) <= {f"train-00003-of-{count:05d}.npz"}
    for name in names:
        with np.load(out / name, allow_pickle=False) as z:
            assert z["logits"].shape[0] == len(z["keys"])


def test_resume_with_other_options_is_refused(cli, many_images, tmp_path, monkeypatch):
    from logitify_cli.formats.npz import NpzShardWriter

    real = fail_third_shard(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "o"
    r = cli("encode", many_images, "-o", out, "--shard-size", "50")
    assert r.exit_code == 130 and "interrupted" in r.stderr
    monkeypatch.setattr(NpzShardWriter, "_finish", real)
    assert_shards_before_the_failure(out, 30)
    r = cli("encode", many_images, "-o", out, "--shard-size", "50", "--resume", "--alpha", "0.1")
    assert r.exit_code == 1 and "alpha" in r.stderr
    r = cli("encode", many_images / "c0", "-o", out, "--shard-size", "50", "--resume")
    assert r.exit_code == 1 and "input" in r.stderr
    r = cli("encode", many_images, "-o", out, "--shard-size", "50", "--resume")
    assert r.exit_code == 0
    # A finished dataset resumes to itself, and refuses other inputs.
    r = cli("encode", many_images, "-o", out, "--shard-size", "50", "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_shards"] == 30
    r = cli("encode", many_images, "-o", out, "--shard-size", "50", "--resume", "--seed", "4")
    assert r.exit_code == 1


def test_full_disk_ends_cleanly(cli, many_images, tmp_path, monkeypatch):
    """ENOSPC on the third shard: exit 1, one clear line, no lying manifest."""
    from logitify_cli.formats.npz import NpzShardWriter

    real = fail_third_shard(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), partial=True)
    out = tmp_path / "o"
    r = cli("encode", many_images, "-o", out, "--shard-size", "100")
    assert r.exit_code == 1
    assert r.stderr.strip().count("\n") == 0 and "no space left on device" in r.stderr
    assert not (out / "manifest.json").exists()
    assert not any(n.startswith(".") and n != ".logitify-journal.jsonl" for n in os.listdir(out)), "a temp file was left"
    from logitify_cli.errors import WriteError, write_error

    e = write_error(OSError(errno.ENOSPC, "No space left on device"), "x.npz")  # what the line is made of
    assert isinstance(e, WriteError) and (e.what, e.errno, e.reason) == ("x.npz", errno.ENOSPC, "no space left on device")
    assert_shards_before_the_failure(out, 15)
    monkeypatch.setattr(NpzShardWriter, "_finish", real)
    assert cli("encode", many_images, "-o", out, "--shard-size", "100", "--resume").exit_code == 0
    assert cli("verify", out).exit_code == 0


def test_tiny_filesystem(cli, many_images, tmp_path):
    """A real 1 MB tmpfs where the machine lets us mount one (root)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mnt / "o"
        r = cli("encode", many_images, "-o", out, "--shard-size", "200")
        assert r.exit_code == 1 and "no space left on device" in r.stderr and "Traceback" not in r.output
        assert not (out / "manifest.json").exists()
        assert not any(".tmp-" in n for n in os.listdir(out))
        for name in os.listdir(out):
            if name.endswith(".npz"):
                with np.load(out / name, allow_pickle=False) as z:
                    assert len(z["keys"]) == 200
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_overwrite_removes_only_what_logitify_wrote(cli, many_images, tmp_path):
    out = tmp_path / "o"
    assert cli("encode", many_images / "c1", "-o", out, "-f", "tfrecord").exit_code == 0
    assert cli("encode", many_images / "c2", "-o", out, "--overwrite").exit_code == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "train-00000-of-00001.npz"]
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    before = sorted(os.listdir(out))
    for extra in ([], ["--overwrite"]):
        r = cli("encode", many_images / "c2", "-o", out, *extra)
        assert r.exit_code == 1 and sorted(os.listdir(out)) == before
    assert "notes.txt" in r.stderr


@st.composite
def random_image_file(draw):
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "LA", "1", "CMYK", "I;16"]))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    fmt = draw(st.sampled_from(["png", "bmp", "tiff", "webp"]))
    if mode == "CMYK":
        fmt = "tiff"  # the only one of these formats that stores CMYK
    if mode in ("I;16", "LA") and fmt in ("bmp", "webp"):
        fmt = "png"
    if mode in ("RGBA", "P", "1") and fmt == "webp":
        fmt = "png"
    return mode, h, w, seed, fmt


@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(random_image_file(), min_size=1, max_size=4), channels=st.sampled_from(["1", "3", "4"]),
       alpha=st.floats(1e-6, 0.99), c=st.floats(0.05, 1.0), bits=st.integers(1, 8), noise=st.sampled_from(["uniform", "none"]),
       fmt=st.sampled_from(["npz", "tfrecord"]))
def test_encode_decode_is_the_identity(cli, tmp_path_factory, files, channels, alpha, c, bits, noise, fmt):
    from logitify_cli.images import read_image as read_pixels

    root = tmp_path_factory.mktemp("prop")
    src = root / "src"
    src.mkdir()
    h0, w0 = files[0][1], files[0][2]
    for i, (mode, h, w, seed, ext) in enumerate(files):
        rng = np.random.default_rng(seed)
        if mode == "I;16":
            img = Image.fromarray(rng.integers(0, 65536, (h0, w0), dtype=np.uint16))
        else:
            img = Image.fromarray(rng.integers(0, 256, (h0, w0, 3), dtype=np.uint8)).convert(mode)
        img.save(src / f"{i}.{ext}", **({"lossless": True} if ext == "webp" else {}))
    r = cli("encode", src, "-o", root / "o", "-f", fmt, "--channels", channels, "--alpha", repr(alpha),
            "--corruption-level", repr(c), "--bits", bits, "--noise", noise)
    assert r.exit_code == 0, r.output
    r = cli("decode", root / "o", "-o", root / "back")
    assert r.exit_code == 0, r.output
    shift = 8 - bits
    for i, (_, _, _, _, ext) in enumerate(files):
        want = read_pixels(str(src / f"{i}.{ext}"), int(channels))
        got = np.asarray(Image.open(root / "back" / f"{i}.png"))
        got = got[:, :, None] if got.ndim == 2 else got
        np.testing.assert_array_equal(got, (want >> shift) << shift)


def test_a_resume_names_the_colour_images_its_kept_shards_made_grey(cli, tmp_path, monkeypatch):
    """The journal keeps each shard's colour images made grey: the resumed run names them all."""
    from logitify_cli.formats.npz import NpzShardWriter

    src = tmp_path / "grey"
    rng = np.random.default_rng(3)
    colour = {1, 3, 21, 33}  # shards 0 and 1 (kept), and 2 (made again); none in the channel sample
    for i in range(130):
        img = photo(rng, 4, 4)
        save(str(src / f"g{i:03d}.png"), img if i in colour else img[:, :, 0])
    out = tmp_path / "o"
    real = fail_third_shard(monkeypatch, KeyboardInterrupt())
    assert cli("encode", src, "-o", out, "--shard-size", "16").exit_code == 130
    monkeypatch.setattr(NpzShardWriter, "_finish", real)
    r = cli("encode", src, "-o", out, "--shard-size", "16", "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_shards"] >= 2, r.output
    (note,) = json.loads(r.stdout)["warnings"]
    assert note.startswith("4 colour image(s) were made grey (g001.png, g003.png, g021.png, ...)"), note


def test_a_failure_after_a_shard_was_whole_keeps_it_in_the_journal(cli, tmp_path, rng, monkeypatch):
    """--on-error fail in shard 1, once shard 0 is whole: shard 0 is the run's (journaled), not an orphan."""
    from logitify_cli.shards import ShardFeed

    src = tmp_path / "src"
    for i in range(12):
        save(str(src / f"{i:02d}.png"), photo(rng, 8, 8))
    data = (src / "08.png").read_bytes()
    (src / "08.png").write_bytes(data[:len(data) // 2])  # its header is whole: it fails when read
    out = tmp_path / "o"
    first = out / "train-00000-of-00003.npz"
    real = ShardFeed.add

    def add_once_shard_0_is_whole(self, it, label, arr, reason):
        if reason is not None:
            deadline = time.time() + 30
            while not first.exists() and time.time() < deadline:
                time.sleep(0.01)
        return real(self, it, label, arr, reason)

    monkeypatch.setattr(ShardFeed, "add", add_once_shard_0_is_whole)
    r = cli("encode", src, "-o", out, "--shard-size", "5", "--on-error", "fail", "--workers", "1")
    assert r.exit_code == 1 and "08.png" in r.stderr, r.output
    assert first.exists()
    journal = [json.loads(line) for line in (out / ".logitify-journal.jsonl").read_text().splitlines()]
    assert [e["shard"]["file"] for e in journal[1:]] == [first.name]
    monkeypatch.setattr(ShardFeed, "add", real)
    r = cli("encode", src, "-o", out, "--shard-size", "5", "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_shards"] == 1, r.output
    r = cli("encode", src, "-o", out, "--shard-size", "5", "--overwrite")
    assert r.exit_code == 0, r.output
    assert cli("verify", out).exit_code == 0


def test_a_split_remade_under_its_old_names_and_stopped_leaves_no_lying_manifest(cli, many_images, tmp_path,
                                                                                   monkeypatch):
    """--split test --overwrite with as many shards as before, stopped at its third: the manifest no longer
    lists test (its files are partly the new run's), the other split is whole, and --resume finishes."""
    import logitify_cli as lg
    from logitify_cli.formats.npz import NpzShardWriter

    out = tmp_path / "ds"
    args = ["--shard-size", "100"]
    assert cli("encode", many_images / "c0", "-o", out, *args).exit_code == 0
    assert cli("encode", many_images / "c1", "-o", out, "--split", "test", *args).exit_code == 0
    real = fail_third_shard(monkeypatch, KeyboardInterrupt(), split="test")
    r = cli("encode", many_images / "c2", "-o", out, "--split", "test", "--overwrite", *args)
    assert r.exit_code == 130
    assert "test: the new shards take the old shards' names, so the old ones are removed now" in r.stderr
    monkeypatch.setattr(NpzShardWriter, "_finish", real)
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(m.get("splits", {m.get("split"): m})) == ["train"], m.keys()
    assert cli("verify", out).exit_code == 0
    r = cli("encode", many_images / "c2", "-o", out, "--split", "test", "--resume", "--json", *args)
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_shards"] >= 2, r.output
    assert cli("verify", out).exit_code == 0
    keys = {str(k) for a in lg.iter_numpy(str(out), split="test") for k in a["keys"]}
    assert keys == {str(p.relative_to(many_images / "c2")) for p in (many_images / "c2").iterdir()}
    # A finished split resumes to itself: its shards are kept, not taken out and made again.
    files = {p.name: p.stat().st_ino for p in out.iterdir() if p.name.startswith("test-")}
    r = cli("encode", many_images / "c2", "-o", out, "--split", "test", "--resume", "--json", *args)
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_shards"] == len(files), r.output
    assert {p.name: p.stat().st_ino for p in out.iterdir() if p.name.startswith("test-")} == files


def test_a_stop_while_the_replaced_split_is_taken_out_leaves_a_folder_logitify_can_go_on_with(
        cli, many_images, tmp_path, monkeypatch):
    """Stopped between taking the split out of the manifest and removing its last old shard: the run's
    journal already owns those names, so --resume and --overwrite both go on; and an old shard that is an
    input of the run is refused, not removed."""
    out = tmp_path / "ds"
    args = ["--shard-size", "100"]
    assert cli("encode", many_images / "c0", "-o", out, *args).exit_code == 0
    assert cli("encode", many_images / "c1", "-o", out, "--split", "test", *args).exit_code == 0
    real, seen = os.unlink, []

    def unlink(path, *a, **kw):
        if os.path.basename(str(path)).startswith("test-"):
            seen.append(path)
            if len(seen) == 2:
                raise KeyboardInterrupt
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    r = cli("encode", many_images / "c2", "-o", out, "--split", "test", "--overwrite", *args)
    monkeypatch.setattr(os, "unlink", real)
    assert r.exit_code == 130 and len(seen) == 2
    assert any(n.startswith("test-") for n in os.listdir(out))  # old shards left by the stop
    r = cli("encode", many_images / "c2", "-o", out, "--split", "test", "--resume", *args)
    assert r.exit_code == 0, r.output
    assert cli("verify", out).exit_code == 0


def test_an_old_shard_that_is_an_input_of_the_run_replacing_it_is_refused(cli, many_images, tmp_path):
    """A TFRecord shard of the split being remade, named as an input (its 100 records make 5 shards of 120
    with c2's 500 images: the old names): refused before anything is removed."""
    out = tmp_path / "ds"
    args = ["-f", "tfrecord"]
    assert cli("encode", many_images / "c0", "-o", out, "--shard-size", "100", *args).exit_code == 0
    assert cli("encode", many_images / "c1", "-o", out, "--split", "test", "--shard-size", "100", *args).exit_code == 0
    shard = out / "logitify-test.tfrecord-00000-of-00005"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    r = cli("encode", many_images / "c2", shard, "-o", out, "--split", "test", "--shard-size", "120",
            "--overwrite", *args)
    assert r.exit_code == 1 and "an input of this run" in r.stderr, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")} == before
    assert cli("verify", out).exit_code == 0


@pytest.mark.parametrize("finished", [False, True])
def test_an_overwrite_stopped_while_it_removes_leaves_only_owned_files(cli, many_images, tmp_path, monkeypatch,
                                                                       finished):
    """Ctrl-C between two removals of --overwrite: what is left is still owned (the manifest and journals go
    last), so the next --overwrite takes it, where it used to find shards nothing owned and refuse."""
    from logitify_cli.formats.npz import NpzShardWriter

    out = tmp_path / "o"
    if finished:
        assert cli("encode", many_images, "-o", out, "--shard-size", "50").exit_code == 0
    else:  # a failed run: a journal and two whole shards
        real = fail_third_shard(monkeypatch, KeyboardInterrupt())
        assert cli("encode", many_images, "-o", out, "--shard-size", "50").exit_code == 130
        monkeypatch.setattr(NpzShardWriter, "_finish", real)
    unlink, removed = os.unlink, []

    def stopping(path, *args, **kwargs):
        removed.append(os.path.basename(path))
        if len(removed) == 2:  # once, between the first removal and the second
            raise KeyboardInterrupt
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", stopping)
    r = cli("encode", many_images, "-o", out, "--shard-size", "40", "--overwrite")
    monkeypatch.setattr(os, "unlink", unlink)
    assert r.exit_code == 130 and removed and removed[0].endswith(".npz"), (r.output, removed)
    r = cli("encode", many_images, "-o", out, "--shard-size", "40", "--overwrite")
    assert r.exit_code == 0, r.output
    assert cli("verify", out).exit_code == 0


def test_a_receipt_whose_shard_is_gone_is_still_logitifys(cli, many_images, tmp_path, monkeypatch):
    """A Beam receipt beside a shard the journal names belongs to the run even when the shard itself is gone
    (removed by hand, or never renamed into place): --overwrite takes it; one beside a user's name it does not."""
    from logitify_cli.formats.npz import NpzShardWriter

    out = tmp_path / "o"
    real = fail_third_shard(monkeypatch, KeyboardInterrupt())
    assert cli("encode", many_images, "-o", out, "--shard-size", "50").exit_code == 130
    monkeypatch.setattr(NpzShardWriter, "_finish", real)
    (out / ".train-00004-of-00030.npz.receipt.json").write_text("{}")
    (out / ".train-00004-of-00031.npz.receipt.json").write_text("mine")
    r = cli("encode", many_images, "-o", out, "--shard-size", "50", "--overwrite")
    assert r.exit_code == 1 and ".train-00004-of-00031.npz.receipt.json, which logitify did not write" in r.stderr
    (out / ".train-00004-of-00031.npz.receipt.json").unlink()
    r = cli("encode", many_images, "-o", out, "--shard-size", "50", "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / ".train-00004-of-00030.npz.receipt.json").exists()
    # --resume, which reads no receipt, takes one too: a local run leaves none behind
    assert cli("encode", many_images, "-o", out, "--shard-size", "50", "--overwrite").exit_code == 0
    (out / ".train-00004-of-00030.npz.receipt.json").write_text("{}")
    r = cli("encode", many_images, "-o", out, "--shard-size", "50", "--resume")
    assert r.exit_code == 0, r.output
    assert not [n for n in os.listdir(out) if n.endswith(".receipt.json")]


def test_a_journal_past_64_mib_is_read_whole(tmp_path):
    """A shard's journal line holds a digest per image: ImageNet's 1.28 million images make an 83 MB journal,
    of which a 64 MiB cap kept three quarters (--resume then made the rest again)."""
    from logitify_cli.outdir import Journal

    header = {"format": "npz", "num_shards": 1000, "name": "logitify", "split": "train"}
    digests = "0" * 64 * 1281
    with open(tmp_path / ".logitify-journal.jsonl", "w") as f:
        f.write(json.dumps({"header": header}) + "\n")
        for i in range(1000):
            f.write(json.dumps({"shard": {"index": i, "file": f"train-{i:05d}-of-01000.npz", "num_examples": 1281,
                                          "sha256": "0" * 64, "skipped": [], "pixels": digests}}) + "\n")
    assert (tmp_path / ".logitify-journal.jsonl").stat().st_size > 78 << 20
    got, entries = Journal(str(tmp_path)).load()
    assert got == header and sorted(entries) == list(range(1000))


def test_a_stop_between_the_tfds_metadata_and_the_manifest_leaves_a_folder_resume_finishes(cli, many_images,
                                                                                          tmp_path, monkeypatch):
    """Ctrl-C after dataset_info.json is written and before manifest.json: the run takes its metadata back,
    so --resume (which used to refuse dataset_info.json as someone else's file) keeps every shard and ends."""
    from logitify_cli import manifest as manifest_mod

    out = tmp_path / "o"
    real = manifest_mod.write

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(manifest_mod, "write", stopped)
    r = cli("encode", many_images, "-o", out, "-f", "tfrecord", "--shard-size", "500")
    assert r.exit_code == 130, r.output
    monkeypatch.setattr(manifest_mod, "write", real)
    assert not (out / "dataset_info.json").exists() and not (out / "manifest.json").exists()
    r = cli("encode", many_images, "-o", out, "-f", "tfrecord", "--shard-size", "500", "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_shards"] == 3, r.output
    assert (out / "dataset_info.json").exists() and cli("verify", out).exit_code == 0


def test_a_stop_while_the_plan_runs_waits_for_it_and_leaves_no_lock(many_images, tmp_path, monkeypatch):
    """Ctrl-C while the plan's thread runs (before TensorFlow's import): the stop waits for the plan, which
    makes nothing once it is planned (no folder, no lock). On Python 3.11 a join that a Ctrl-C interrupted makes the next join of
    that thread return at once while it still runs (simulated here): the plan then made the folder and took
    its lock after the stop had returned, and the lock stayed."""
    import threading

    from logitify_cli import encode_run
    from logitify_cli.planner import EncodeOptions
    from logitify_cli.report import Reporter

    real_start, real_join = encode_run._start, threading.Thread.join

    def slow_start(*args, **kwargs):
        time.sleep(0.5)
        return real_start(*args, **kwargs)

    def interrupted_join(self, timeout=None):
        if self.name != "plan":
            return real_join(self, timeout)
        if timeout is not None:
            raise KeyboardInterrupt  # the Ctrl-C lands in the first join
        return None  # and the next join of that thread returns at once, as on 3.11

    monkeypatch.setattr(encode_run, "_start", slow_start)
    monkeypatch.setattr(threading.Thread, "join", interrupted_join)
    out = tmp_path / "new" / "o"
    with pytest.raises(KeyboardInterrupt):
        encode_run.run_encode(EncodeOptions(sources=[str(many_images)], out=str(out)), Reporter(quiet=True))
    monkeypatch.undo()
    time.sleep(1.0)  # a plan still running would take the lock meanwhile
    assert not [t for t in threading.enumerate() if t.name == "plan"]
    assert not os.path.lexists(out / ".logitify.lock")
    assert not (tmp_path / "new").exists()  # stopped before the plan was made: it made nothing after


def test_what_a_stop_says_follows_what_the_run_left(cli, many_images, tmp_path, monkeypatch):
    """Stopped before its first shard, a run into a new folder leaves nothing (not even a journal) and says
    so; stopped as its first shard is renamed into place but not yet recorded, the journal stays (that shard
    is logitify's) and --resume finishes; through `new/..` into a folder that was there, the advice is never
    'nothing was written', though the path names nothing once `new` is gone."""
    from logitify_cli import encode_run
    from logitify_cli.outdir import Journal

    args = ["--shard-size", "500"]
    clean = tmp_path / "clean"
    assert cli("encode", many_images, "-o", clean, *args).exit_code == 0
    real_run, real_append = encode_run._run, Journal.append

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(encode_run, "_run", stopped)  # the folder, its lock and journal are made by now
    out = tmp_path / "new" / "o"
    r = cli("encode", many_images, "-o", out, *args)
    assert r.exit_code == 130 and r.stderr.strip().endswith("interrupted before anything was written; run the "
                                                             "same command again"), r.stderr
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(encode_run, "_run", real_run)
    monkeypatch.setattr(Journal, "append", stopped)
    r = cli("encode", many_images, "-o", out, *args)
    assert r.exit_code == 130 and "run again with --resume" in r.stderr, r.stderr
    left = sorted(os.listdir(out))
    assert ".logitify-journal.jsonl" in left and "train-00000-of-00003.npz" in left, left
    there = tmp_path / "there"
    there.mkdir()
    odd = tmp_path / "gone" / ".." / "there"
    r = cli("encode", many_images, "-o", odd, *args)
    assert r.exit_code == 130 and "before anything was written" not in r.stderr, r.stderr
    assert "train-00000-of-00003.npz" in os.listdir(there) and not (tmp_path / "gone").exists()
    monkeypatch.setattr(Journal, "append", real_append)
    for done in (out, odd):
        assert cli("encode", many_images, "-o", done, *args, "--resume").exit_code == 0
        assert shard_state(done) == shard_state(clean)


def test_a_stop_while_tensorflow_loads_after_the_plan_leaves_nothing(cli, many_images, tmp_path, monkeypatch):
    """Ctrl-C while TensorFlow is still loading, once the plan has started its journal: no shard was made,
    so neither the journal nor the folder the run made is left, and the run says so."""
    from logitify_cli import _tf

    out = tmp_path / "new" / "o"

    def stopped_once_planned():
        deadline = time.time() + 60
        while not (out / ".logitify-journal.jsonl").exists() and time.time() < deadline:
            time.sleep(0.01)
        raise KeyboardInterrupt

    monkeypatch.setattr(_tf, "tf", stopped_once_planned)  # the import the run waits on while it plans
    r = cli("encode", many_images, "-o", out, "--shard-size", "500")
    assert r.exit_code == 130 and "interrupted before anything was written" in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert cli("encode", many_images, "-o", out, "--shard-size", "500").exit_code == 0
