"""Inputs made by someone unlucky or hostile: the run says why, never crashes, never hangs."""
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import photo, save
from test_plain_png import pngs, same

ENV = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- TFRecord framing, written here from the format's definition -------------------------

def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def header(n: int) -> bytes:
    """A record header claiming n bytes, its length checksum right."""
    length = struct.pack("<Q", n)
    return length + struct.pack("<I", _masked(length))


def record(data: bytes) -> bytes:
    return header(len(data)) + data + struct.pack("<I", _masked(data))


def example(image: bytes, label: int = 0) -> bytes:
    """A tf.train.Example {image: bytes, label: int64}, laid out by hand."""
    def field(tag, payload):
        return bytes([tag]) + _varint(len(payload)) + payload

    def entry(name, feature):
        return field(0x0A, field(0x0A, name) + field(0x12, feature))

    feats = entry(b"image", field(0x0A, field(0x0A, image))) + entry(b"label", field(0x1A, field(0x0A, _varint(label))))
    return field(0x0A, feats)


def _varint(n):
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def run_cli(*args, timeout=120, env=None, stdin=None):
    return subprocess.run([sys.executable, "-m", "logitify_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or ENV, cwd=REPO, input=stdin)


def test_crc32c_check_value():
    from logitify_cli.records import crc32c, masked_crc32c

    assert _crc32c(b"123456789") == crc32c(b"123456789") == 0xE3069283
    assert masked_crc32c(b"abc") == _masked(b"abc")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=700) | st.integers(0, 5000).map(lambda n: np.random.default_rng(n).bytes(n)),
                max_size=30))
def test_crc32c_many_agrees_with_the_definition(buffers):
    from logitify_cli.records import crc32c, crc32c_many

    assert crc32c_many(buffers).tolist() == [crc32c(b) for b in buffers]
    assert [crc32c(b) for b in buffers[:4]] == [_crc32c(b) for b in buffers[:4]]


def test_huge_length_header_ends_the_file_without_a_crash(tmp_path, rng):
    """2**40 bytes claimed with a valid length checksum: TensorFlow died of SIGSEGV here."""
    good = example(png(photo(rng, 8, 8)), 1)
    path = tmp_path / "evil.tfrecord"
    path.write_bytes(record(good) + header(1 << 40) + b"\0" * 64)
    r = run_cli("encode", path, "-o", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["num_examples"] == 1
    (skip,) = m["skipped"]
    assert skip["source"].endswith("evil.tfrecord:1")
    assert "corrupt" in skip["reason"] and str(1 << 40) in skip["reason"]


@pytest.mark.parametrize("compressed", [False, True])
def test_every_truncation_keeps_the_whole_records_before_it(tmp_path, rng, compressed):
    from logitify_cli.records import census, read_records

    recs = [example(png(photo(rng, 4, 4)), i) for i in range(3)]
    data = b"".join(record(r) for r in recs)
    ends = np.cumsum([len(record(r)) for r in recs]).tolist()
    if compressed:
        data = gzip.compress(data)
    path = tmp_path / "cut.tfrecord"
    for cut in range(len(data) + 1):
        path.write_bytes(data[:cut])
        count, damaged, reason = census(str(path), "GZIP" if compressed else "")
        assert damaged == []
        if compressed:
            assert (reason is None) == (cut in (0, len(data))), (cut, reason)
            assert count == (3 if cut == len(data) else count) and count <= 3
        else:
            assert count == sum(e <= cut for e in ends)
            assert (reason is None) == (cut in [0, *ends]), (cut, reason)
        if reason:
            assert reason.startswith("corrupt TFRecord data: ")
        got = []
        with pytest.raises(ValueError) if reason else _nothing():
            for rec in read_records(str(path), "GZIP" if compressed else ""):
                got.append(rec)
        assert got == recs[:count]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_damaged_bytes_never_hand_out_a_damaged_record(data):
    """Any flipped byte: every record given is intact and in its place; a damaged one is an error in its place."""
    import tempfile

    from logitify_cli.records import RecordError, read_records

    recs = [data.draw(st.binary(max_size=300)) for _ in range(data.draw(st.integers(1, 4)))]
    raw = bytearray(b"".join(record(r) for r in recs))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.tfrecord")
        with open(path, "wb") as f:
            f.write(raw)
        got = []
        try:
            for rec in read_records(path):
                got.append(rec)
        except RecordError as e:
            assert e.index == len(got)
        assert len(got) <= len(recs)
        for i, rec in enumerate(got):
            if isinstance(rec, RecordError):
                assert rec.index == i and "data checksum" in rec.reason
            else:
                assert rec == recs[i]


def test_files_written_by_tensorflow_read_the_same(tmp_path):
    import tensorflow as tf

    from logitify_cli.records import read_records

    rng = np.random.default_rng(3)
    recs = [rng.bytes(int(n)) for n in rng.integers(0, 20000, 50)] + [b"", b"x" * 3]
    for comp in ("", "GZIP"):
        path = str(tmp_path / f"tf{comp}.tfrecord")
        with tf.io.TFRecordWriter(path, tf.io.TFRecordOptions(compression_type=comp)) as w:
            for r in recs:
                w.write(r)
        assert list(read_records(path, comp)) == recs
    # GZIP members one after another (gzip a b > c) read as one stream
    both = tmp_path / "two.tfrecord"
    both.write_bytes(gzip.compress(record(b"one")) + gzip.compress(record(b"two")))
    assert list(read_records(str(both), "GZIP")) == [b"one", b"two"]


def test_gzip_record_claiming_too_much_is_refused_before_inflating_it(tmp_path):
    from logitify_cli.records import MAX_RECORD_BYTES, census

    path = tmp_path / "big.tfrecord"
    path.write_bytes(gzip.compress(record(b"fine") + header(1 << 40) + b"\0" * 100))
    count, _, reason = census(str(path), "GZIP")
    assert count == 1 and str(1 << 40) in reason and str(MAX_RECORD_BYTES) in reason
    path.write_bytes(gzip.compress(record(b"fine")) + b"trailing junk")
    assert census(str(path), "GZIP") == (1, [], "corrupt TFRecord data: bytes after the end of the GZIP data")


def test_sparse_file_claiming_a_terabyte_is_refused_without_reading_it(tmp_path):
    from logitify_cli.records import census

    path = tmp_path / "sparse.tfrecord"
    with open(path, "wb") as f:
        f.write(record(b"fine") + header((1 << 40) - 100))
        f.truncate(1 << 40)  # holes: no disk used, but the size fits the claim
    t = time.monotonic()
    count, _, reason = census(str(path), "")
    assert time.monotonic() - t < 5
    assert count == 1 and "a record may have" in reason


def test_gzip_bomb_stops_at_the_budget(tmp_path, monkeypatch):
    """A small file that inflates without end: reading stops at a bound, with a reason, in bounded memory."""
    from logitify_cli import records

    zeros = record(bytes(1 << 20))  # valid 1 MiB records of zeros: they compress about 1000:1
    path = tmp_path / "bomb.tfrecord.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        for _ in range(200):
            f.write(zeros)
    assert path.stat().st_size < (1 << 20)
    monkeypatch.setattr(records, "GZIP_MIN_BUDGET", 64 << 20)  # the default budget, smaller, for a quick test
    t = time.monotonic()
    count, _, reason = records.census(str(path), "GZIP")
    assert time.monotonic() - t < 30
    assert 50 <= count < 64 and "decompression bomb" in reason


def test_fifo_named_like_a_tfrecord_is_skipped(tmp_path):
    from logitify_cli.records import census

    fifo = tmp_path / "pipe.tfrecord"
    os.mkfifo(fifo)
    count, _, reason = census(str(fifo), "")
    assert count == 0 and "named pipe" in reason


# -- files that are not files ----------------------------------------------------------

def _fifo(path):
    os.mkfifo(path)
    return str(path)


def test_reading_a_fifo_named_like_an_image_never_blocks(tmp_path):
    from logitify_cli.images import ImageReadError, read_image, read_many, peek_mode

    path = _fifo(tmp_path / "pipe.png")
    t = time.monotonic()
    for fast in (True, False):
        with pytest.raises(ImageReadError, match="not a regular file \\(a named pipe\\)"):
            read_image(path, 3, fast=fast)
    with pytest.raises(ImageReadError, match="named pipe"):
        peek_mode(path)
    _, _, _, reasons = read_many([path], 3, None, 10**8)
    assert "named pipe" in reasons[0]
    assert time.monotonic() - t < 5


# -- sizes read from headers -----------------------------------------------------------

def _load_forbidden(monkeypatch):
    """Any pixel decoding from here on fails the test."""
    from PIL import ImageFile

    def boom(*a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    monkeypatch.setattr(Image, "frombytes", boom)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
@pytest.mark.parametrize("fast", [True, False])
def test_expected_size_refuses_other_sizes_from_the_header(tmp_path, rng, monkeypatch, fmt, fast):
    from logitify_cli.images import ImageReadError, ImageSizeMismatch, read_image

    path = save(str(tmp_path / f"a.{fmt.lower()}"), photo(rng, 40, 60), format=fmt)
    assert read_image(path, 3, expect_size=(40, 60), fast=fast).shape == (40, 60, 3)
    _load_forbidden(monkeypatch)
    with pytest.raises(ImageSizeMismatch) as e:
        read_image(path, 1, expect_size=(24, 32), fast=fast)
    assert isinstance(e.value, ImageReadError)
    assert e.value.shape == (40, 60, 1) and e.value.expected == (24, 32)
    assert str(e.value) == "image is 60x40 but 32x24 was expected"
    decode_args = dict(size=(24, 32), expect_size=(99, 99))  # with --size every image fits: no refusal
    monkeypatch.undo()
    assert read_image(path, 3, fast=fast, **decode_args).shape == (24, 32, 3)


def test_expected_size_sees_exif_orientation_without_decoding(tmp_path, rng, monkeypatch):
    from logitify_cli.images import ImageSizeMismatch, read_image

    img = Image.fromarray(photo(rng, 24, 32))  # stored 32 wide, 24 high
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: 24 wide, 32 high once oriented
    path = str(tmp_path / "turned.jpg")
    img.save(path, exif=exif.tobytes(), quality=95)
    want = read_image(path, 3)
    assert want.shape == (32, 24, 3)
    np.testing.assert_array_equal(read_image(path, 3, expect_size=(32, 24)), want)
    _load_forbidden(monkeypatch)
    with pytest.raises(ImageSizeMismatch) as e:
        read_image(path, 3, expect_size=(24, 32))
    assert e.value.shape == (32, 24, 3)


def test_damaged_image_of_another_size_is_refused_for_its_size(tmp_path):
    """The header is enough: the damaged pixel data behind it is never reached."""
    from logitify_cli.images import ImageSizeMismatch, read_image

    import zlib

    def chunk(cid, body):
        return struct.pack(">I", len(body)) + cid + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(cid)))

    ihdr = struct.pack(">IIBBBBB", 8000, 8000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    (tmp_path / "big.png").write_bytes(data)
    for source in (str(tmp_path / "big.png"), data):
        for fast in (True, False):
            with pytest.raises(ImageSizeMismatch, match="8000x8000 but 32x24"):
                read_image(source, 3, expect_size=(24, 32), fast=fast)


def test_decode_many_hands_back_the_mismatch_with_its_fields(tmp_path, rng):
    import pickle

    from logitify_cli.images import ImageSizeMismatch, read_many

    a = save(str(tmp_path / "a.png"), photo(rng, 24, 32))
    b = save(str(tmp_path / "b.png"), photo(rng, 40, 60))
    c = str(tmp_path / "c.png")
    open(c, "wb").close()
    result = pickle.loads(pickle.dumps(read_many([a, b, c], 3, None, 10**8, expect_size=(24, 32))))
    stack, same, odd, (r0, r1, r2) = result  # the images of the chunk's shape stacked, their places, the rest
    assert stack.shape == (1, 24, 32, 3) and same == [0] and odd == {} and r0 is None
    assert isinstance(r1, ImageSizeMismatch) and r1.shape == (40, 60, 3) and r1.expected == (24, 32)
    assert isinstance(r2, str) and "empty" in r2


def test_huge_images_of_the_wrong_size_cost_no_memory(tmp_path):
    """Six in-limit 8000x8000 PNGs in a run of 32x24 images: refused from their headers, in a few MB."""
    path = tmp_path / "huge.png"
    Image.new("RGB", (8000, 8000)).save(path, compress_level=1)
    code = (
        "import resource, sys\n"
        "from logitify_cli.images import read_many\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"stack, same, odd, reasons = read_many([{str(path)!r}] * 6, 3, None, 89_478_485, expect_size=(24, 32))\n"
        "assert stack is None and not same and not odd, (same, odd)\n"
        "assert all(r.shape == (8000, 8000, 3) for r in reasons), reasons\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < 40_000  # KiB; one decoded image alone is 192,000


# -- TensorFlow's import -----------------------------------------------------------------

def _python(code, env_extra=None, timeout=180):
    env = dict(ENV, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def test_two_threads_importing_tensorflow_leave_stderr_working():
    """Threads arriving while TensorFlow is being imported wait; fd 2 is redirected once and restored."""
    code = (
        "import os, sys, threading, time\n"
        "from logitify_cli import _tf\n"
        "_tf.own_process = True\n"  # as the command line sets it
        "real_dup2, moves = os.dup2, []\n"
        "def spy(fd, fd2, *a):\n"
        "    if fd2 == 2:\n"
        "        moves.append(threading.current_thread().name)\n"
        "    return real_dup2(fd, fd2, *a)\n"
        "os.dup2 = spy\n"
        "def load(late):\n"
        "    while late and 'tensorflow' not in sys.modules:\n"  # arrive while the first is importing
        "        time.sleep(0.001)\n"
        "    _tf.tf()\n"
        "threads = [threading.Thread(target=load, args=(late,)) for late in (False, True, True)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "assert len(moves) == 2 and moves[0] == moves[1], moves\n"
        "print('python still reaches stderr', file=sys.stderr, flush=True)\n"
        "os.write(2, b'fd 2 too\\n')\n"
    )
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "python still reaches stderr\nfd 2 too\n"


@pytest.mark.parametrize("level", ["0", "1", "2"])
def test_a_users_log_level_does_not_let_tensorflow_talk_in_a_command(level):
    code = (
        "import os\n"
        "from logitify_cli import _tf\n"
        "_tf.own_process = True\n"  # as the command line sets it
        "tf = _tf.tf()\n"
        "f = tf.function(lambda x: tf.reduce_sum(x * 2.0), jit_compile=True)\n"  # XLA logs its start-up
        "f(tf.ones([8]))\n"
        "assert os.environ['TF_CPP_MIN_LOG_LEVEL'] == " + repr(level) + ", 'the user value is back'\n"
    )
    r = _python(code, {"TF_CPP_MIN_LOG_LEVEL": level})
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


def test_verbose_shows_tensorflows_lines():
    r = _python("from logitify_cli import _tf\n_tf.own_process = _tf.verbose = True\n_tf.tf()\n")
    assert r.returncode == 0 and r.stderr.strip()


def test_a_library_caller_keeps_its_own_tensorflow_settings():
    """The library imports TensorFlow as the caller would: their log level, oneDNN, Keras, optimizer options."""
    code = (
        "import os\n"
        "from logitify_cli import _tf\n"
        "tf = _tf.tf()\n"
        "f = tf.function(lambda x: tf.reduce_sum(x * 2.0), jit_compile=True)\n"
        "f(tf.ones([8]))\n"
        "assert os.environ['TF_CPP_MIN_LOG_LEVEL'] == '0' and 'TF_ENABLE_ONEDNN_OPTS' not in os.environ\n"
        "assert tf.config.optimizer.get_experimental_options().get('arithmetic_optimization') is None\n"
        "assert tf.get_logger().level == 0\n"
    )
    r = _python(code, {"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip()  # the caller asked for TensorFlow's lines, and gets them


# -- lists of paths on stdin -------------------------------------------------------------

def test_path_lists_split_on_newline_only():
    from logitify_cli.sources import read_path_list

    odd = ["a\rb.png", "c\u2028d.png", "e\x0bf.png", "g\x0ch.png", "i\x1cj\x1dk\x1el.png", "m\x85n.png", " sp.png"]
    assert read_path_list(io.StringIO("\n".join(odd) + "\n")) == odd
    assert read_path_list(io.BytesIO(("\n".join(odd)).encode())) == odd
    assert read_path_list(io.StringIO("x.png\r\ny.png\r\n\r\n")) == ["x.png", "y.png"]  # a CRLF list
    assert read_path_list(io.StringIO("x.png\r\ny.png\n")) == ["x.png\r", "y.png"]  # a name ending in CR
    assert read_path_list(io.BytesIO(b"a\nb.png\0 \0\0c\xff.png\0"), null=True) == ["a\nb.png", " ", "c\udcff.png"]
    assert read_path_list(io.StringIO("\n  \nz.png")) == ["z.png"]


# -- discovery: what is a file, a folder, a link -----------------------------------------

def _tree(root, rng, rels):
    for rel in rels:
        save(str(root / rel), photo(rng, 4, 4), format="PNG")
    return root


def _found(inv):
    return [(it.key, it.class_name) for it in inv.items], {s["source"]: s["reason"] for s in inv.skipped}


def test_fifos_sockets_and_devices_are_skipped_at_discovery(tmp_path, rng):
    import socket

    from logitify_cli.sources import discover

    src = _tree(tmp_path / "s", rng, ["cats/a.png"])
    os.mkfifo(src / "cats" / "pipe.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "cats" / "sock.png"))
    os.symlink("/dev/null", src / "cats" / "null.png")
    os.mkfifo(src / "cats" / "pipe.txt")  # not named like an image: not an input at all
    os.mkfifo(tmp_path / "alone.png")
    try:
        inv = discover([str(src), str(tmp_path / "alone.png"), "/dev/zero"])
    finally:
        sock.close()
    items, skipped = _found(inv)
    assert items == [("cats/a.png", "cats")]
    assert {k.rsplit("/", 1)[-1]: v for k, v in skipped.items()} == {
        "pipe.png": "not a regular file (a named pipe)",
        "sock.png": "not a regular file (a socket)",
        "null.png": "not a regular file (a character device)",
        "alone.png": "not a regular file (a named pipe)",
        "zero": "not a regular file (a character device)",
    }


@pytest.mark.parametrize("as_single_path", [False, True])
def test_encode_with_a_fifo_named_like_an_image_finishes(tmp_path, rng, as_single_path):
    src = _tree(tmp_path / "s", rng, ["cats/a.png", "dogs/b.png"])
    fifo = src / "cats" / "pipe.png"
    os.mkfifo(fifo)
    args = [fifo, src / "cats" / "a.png"] if as_single_path else [src]
    r = run_cli("encode", *args, "-o", tmp_path / "out", timeout=120)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["reason"] for s in m["skipped"]] == ["not a regular file (a named pipe)"]
    assert "named pipe" in r.stderr


def test_links_to_folders_are_followed_once_and_loops_are_listed(tmp_path, rng):
    from logitify_cli.sources import discover

    ext = _tree(tmp_path / "other_disk", rng, ["cats/a.png", "cats/deep/b.png"])
    src = _tree(tmp_path / "s", rng, ["dogs/c.png"])
    os.symlink(ext / "cats", src / "felines")  # a class folder kept elsewhere
    os.symlink(ext / "cats", src / "zz_again")  # a second way into the same folder
    os.symlink(src, src / "dogs" / "up")  # back to the top: a loop
    os.symlink(".", src / "dogs" / "self")  # to itself
    os.symlink(tmp_path / "gone", src / "dogs" / "gone.png")
    os.symlink(tmp_path / "gone", src / "gone_folder")
    items, skipped = _found(discover([str(src)]))
    assert items == [("dogs/c.png", "dogs"), ("felines/a.png", "felines"), ("felines/deep/b.png", "felines")]
    assert skipped == {
        "dogs/gone.png": "broken symbolic link",
        "dogs/self": "symbolic link loop: leads back to 'dogs'",
        "dogs/up": "symbolic link loop: leads back to the top folder",
        "gone_folder": "broken symbolic link",
        "zz_again": "not followed: the same folder as 'felines', searched already",
    }


def test_unreadable_folders_are_listed(tmp_path, rng, monkeypatch):
    from logitify_cli import sources

    src = _tree(tmp_path / "s", rng, ["cats/a.png", "dogs/b.png"])
    real = os.scandir

    def scandir(path):
        if os.path.basename(os.path.normpath(path)) == "dogs":
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(sources.os, "scandir", scandir)
    items, skipped = _found(sources.discover([str(src)]))
    assert items == [("cats/a.png", "cats")]
    assert skipped == {"dogs": "cannot read folder: Permission denied"}
    items, skipped = _found(sources.discover([str(src / "dogs")]))
    assert items == [] and list(skipped.values()) == ["cannot read folder: Permission denied"]


# -- keys of files named one by one ------------------------------------------------------

def test_absolute_inputs_get_relative_keys_in_any_order(tmp_path, rng, monkeypatch):
    from logitify_cli.sources import discover, single_file_keys

    root = _tree(tmp_path / "photos", rng, ["cats/a.png", "cats/b.png", "dogs/a.png", "x.png"])
    paths = [str(root / r) for r in ("cats/a.png", "cats/b.png", "dogs/a.png", "x.png")]
    keys = [it.key for it in discover(paths).items]
    assert keys == ["cats/a.png", "cats/b.png", "dogs/a.png", "x.png"]
    assert [it.key for it in discover(paths[::-1]).items] == keys
    assert single_file_keys(paths[:2]) == {paths[0]: "a.png", paths[1]: "b.png"}
    monkeypatch.chdir(root / "cats")
    # '..' never reaches a key; relative inputs without it keep theirs
    assert single_file_keys(["../dogs/a.png", "a.png"]) == {"../dogs/a.png": "dogs/a.png", "a.png": "cats/a.png"}
    assert single_file_keys(["a.png", "./b.png", "sub//./c.png"]) == {"a.png": "a.png", "./b.png": "b.png",
                                                                       "sub//./c.png": "sub/c.png"}
    assert single_file_keys([paths[0], "/" + paths[0].lstrip("/")]) == {paths[0]: "a.png"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "..", ".", "c.png", "d e", "f\\g"]), min_size=1, max_size=4),
                min_size=1, max_size=6), st.booleans(), st.randoms())
def test_single_file_keys_are_relative_distinct_and_order_free(parts, absolute, rnd):
    from logitify_cli.outputs import key_relpath
    from logitify_cli.sources import single_file_keys

    paths = [("/base/" if absolute else "") + "/".join(p) + "/z.png" for p in parts]
    keys = single_file_keys(paths)
    shuffled = list(paths)
    rnd.shuffle(shuffled)
    assert single_file_keys(shuffled) == keys
    for p, k in keys.items():
        assert not k.startswith("/") and ".." not in k.split("/")
        key_relpath(k)  # decode accepts it
    files = {}
    for p, k in keys.items():
        files.setdefault(k, set()).add(os.path.abspath(p))
    assert all(len(f) == 1 for f in files.values())  # two files never share a key


def test_find_with_absolute_paths_then_decode(tmp_path, rng):
    """find "$PWD/photos" -name '*.png' -print0 | logitify encode - --null: decode gives the images back."""
    root = tmp_path / "photos"
    truth = {}
    for rel in ("cats/a.png", "dogs/b.png"):
        truth[rel] = photo(rng, 6, 5)
        save(str(root / rel), truth[rel])
    listing = "".join(str(root / rel) + "\0" for rel in truth)
    r = run_cli("encode", "-", "--null", "-o", tmp_path / "out", stdin=listing)
    assert r.returncode == 0, r.stderr
    r = run_cli("decode", tmp_path / "out", "-o", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    for rel, arr in truth.items():
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "back" / rel)), arr)


# -- keys as file names on decode ---------------------------------------------------------

def test_backslash_and_colon_are_name_characters_on_posix(monkeypatch):
    from logitify_cli.outputs import key_relpath, png_relpath

    if os.name == "nt":
        pytest.skip("POSIX names")
    for key in ("c:x.png", "x\\..\\y.png", "a\\b.png", "d/train.tfrecord:3", "\\\\server\\share.png"):
        assert key_relpath(key) == key
    assert png_relpath("a\\b.jpg") == "a\\b.png" and png_relpath("d/t.tfrecord:3") == "d/t.tfrecord:3.png"
    assert key_relpath("./a//b/./c.png") == "a/b/c.png"
    for bad in ("", "x\0.png", "/abs.png", "..", "../x.png", "a/../../b.png", "a/..", ".", "./"):
        with pytest.raises(ValueError):
            key_relpath(bad)
    # Windows: '\' separates, drives and devices are refused, streams are not written
    monkeypatch.setattr(os, "name", "nt")
    assert key_relpath("a\\b.png") == "a/b.png"
    assert key_relpath("d/train.tfrecord:3") == "d/train.tfrecord_3"
    for bad in ("c:x.png", "C:\\x.png", "x\\..\\..\\y.png", "\\abs.png", "con.png", "a/NUL", "com1.txt.png"):
        with pytest.raises(ValueError):
            key_relpath(bad)


def test_decode_writes_odd_but_safe_posix_names(cli, tmp_path, rng):
    import hashlib

    if os.name == "nt":
        pytest.skip("POSIX names")
    src = tmp_path / "one"
    save(str(src / "a.png"), photo(rng, 4, 4))
    assert cli("encode", src, "-o", tmp_path / "ds").exit_code == 0
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    shard = tmp_path / "ds" / m["shards"][0]["file"]
    z = dict(np.load(shard, allow_pickle=False))
    keys = ["c:x.png", "x\\..\\y.png", "a\\b.png"]
    n = len(keys)
    np.savez(shard, logits=np.repeat(z["logits"], n, 0), logdet=np.repeat(z["logdet"], n, 0),
             keys=np.array(keys), labels=np.full(n, -1, np.int64))
    m["shards"][0].update(num_examples=n, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    m["num_examples"] = n
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(m))
    r = cli("decode", tmp_path / "ds", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path / "out")) == sorted(keys)


def test_on_error_fail_with_tfrecord_input_says_why(tmp_path, rng):
    """Counting records and TensorFlow's import overlap: the reason must still reach stderr."""
    path = tmp_path / "mixed.tfrecord"
    path.write_bytes(record(example(png(photo(rng, 8, 8)))) + record(example(b"not an image")))
    r = run_cli("encode", path, "-o", tmp_path / "out", "--on-error", "fail")
    assert r.returncode == 1
    assert "mixed.tfrecord:1" in r.stderr and "Traceback" not in r.stderr


def test_on_error_fail_stops_at_a_record_that_lies_about_its_length(cli, tmp_path, rng):
    """A corrupt record found while counting is unreadable input too: --on-error fail stops before writing."""
    path = tmp_path / "lies.tfrecord"
    path.write_bytes(record(example(png(photo(rng, 8, 8)))) + struct.pack("<Q", 1 << 60) + b"\0" * 100)
    r = cli("encode", path, "-o", tmp_path / "out", "--on-error", "fail")
    assert r.exit_code == 1 and "lies.tfrecord:1" in r.stderr and "(--on-error fail)" in r.stderr, r.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    r = cli("encode", path, "-o", tmp_path / "skip")
    assert r.exit_code == 0 and "skipped" in r.stderr and "lies.tfrecord:1" in r.stderr, r.stderr


def test_skipped_records_are_listed_in_their_files_order(cli, tmp_path, rng):
    """Records 2 and 10 of a file skipped: listed :2 then :10, as the records themselves are ordered."""
    good = record(example(png(photo(rng, 8, 8))))
    path = tmp_path / "r.tfrecord"
    path.write_bytes(b"".join(record(b"\xff not an example") if i in (2, 10) else good for i in range(12)))
    (tmp_path / "r.tfrecord.png").write_bytes(b"not a png either")  # a file key between the two by name
    r = cli("encode", path, tmp_path / "r.tfrecord.png", "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    want = ["r.tfrecord:2", "r.tfrecord:10", "r.tfrecord.png"]
    assert [s["source"].rsplit("/", 1)[-1] for s in json.loads(r.stdout)["skipped"]] == want
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [s["source"].rsplit("/", 1)[-1] for s in m["skipped"]] == want


def test_a_label_key_the_first_record_lacks_is_named_with_those_it_has(cli, tmp_path, rng):
    """A mistyped --label-key would give an unlabelled dataset without a word: the warning lists the names."""
    from tensorflow.core.example.example_pb2 import Example

    path = tmp_path / "labelled.tfrecord"
    path.write_bytes(b"".join(record(example(png(photo(rng, 8, 8)), label=i)) for i in range(3)))
    r = cli("encode", path, "-o", tmp_path / "typo", "--label-key", "lable")
    assert r.exit_code == 0, r.output
    assert "--label-key 'lable': record labelled.tfrecord:0 has no feature of that name" in r.stderr, r.stderr
    assert "its int64 features: label" in r.stderr
    r = cli("encode", path, "-o", tmp_path / "bytes", "--label-key", "image", "--json")
    assert r.exit_code == 0 and "holds bytes under that name, not an int64" in json.loads(r.stdout)["warnings"][0]
    empty = Example.FromString(example(png(photo(rng, 8, 8))))
    empty.features.feature["cls"].SetInParent()  # the name is there, with no value
    (tmp_path / "empty.tfrecord").write_bytes(record(empty.SerializeToString()))
    r = cli("encode", tmp_path / "empty.tfrecord", "-o", tmp_path / "empty", "--label-key", "cls")
    assert r.exit_code == 0 and "record empty.tfrecord:0 holds an empty feature under that name" in r.stderr
    # An image file first in key order, then records whose first is no Example: the first that parses is named.
    save(str(tmp_path / "a.png"), photo(rng, 8, 8))
    junk = tmp_path / "junk.tfrecord"
    junk.write_bytes(record(b"\xff\xff\xff garbage") + path.read_bytes())
    r = cli("encode", tmp_path / "a.png", junk, "-o", tmp_path / "mixed", "--label-key", "lable", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["num_examples"] == 4, r.output
    assert "record junk.tfrecord:1 has no feature of that name" in r.stderr, r.stderr
    for argv in (["--label-key", "label"], []):  # the right name, or none named: nothing to say
        r = cli("encode", path, "-o", tmp_path / f"ok{len(argv)}", *argv)
        assert r.exit_code == 0 and "--label-key" not in r.stderr, r.stderr


@settings(max_examples=300, deadline=None)
@given(data=st.data(), channels=st.sampled_from([1, 3]), how=st.sampled_from(["intact", "flip", "cut"]))
def test_both_roads_refuse_the_same_sizes(data, channels, how):
    """With expect_size, the plain-PNG shortcut and Pillow's road still agree, on damaged files too."""
    from logitify_cli.images import ImageReadError, read_image

    def outcome_sized(source, channels, fast, expect):
        try:
            return read_image(source, channels, fast=fast, expect_size=expect)
        except ImageReadError as e:
            return f"{type(e).__name__}: {e}"

    png_data = data.draw(pngs())
    h, w = Image.open(io.BytesIO(png_data)).size[::-1]
    expect = data.draw(st.sampled_from([(h, w), (w, h), (h + 1, w), (3, 5)]))
    if how != "intact":
        i = data.draw(st.integers(0, len(png_data) - 1))
        png_data = png_data[:i] + (bytes([png_data[i] ^ 0x41]) + png_data[i + 1:] if how == "flip" else b"")
    assert same(outcome_sized(png_data, channels, True, expect), outcome_sized(png_data, channels, False, expect))
