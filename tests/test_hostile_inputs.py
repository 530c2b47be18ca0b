"""Inputs made by someone unlucky or hostile: the run says why, never crashes, never hangs."""
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import photo, save

ENV = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- files that are not files ----------------------------------------------------------

def _fifo(path):
    os.mkfifo(path)
    return str(path)


def test_reading_a_fifo_named_like_an_image_never_blocks(tmp_path):
    from logitify_cli.images import ImageReadError, decode, decode_many, peek_mode

    path = _fifo(tmp_path / "pipe.png")
    t = time.monotonic()
    for fast in (True, False):
        with pytest.raises(ImageReadError, match="not a regular file \\(a named pipe\\)"):
            decode(path, 3, fast=fast)
    with pytest.raises(ImageReadError, match="named pipe"):
        peek_mode(path)
    _, _, _, reasons = decode_many([path], 3, None, 10**8)
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
    from logitify_cli.images import ImageReadError, ImageSizeMismatch, decode

    path = save(str(tmp_path / f"a.{fmt.lower()}"), photo(rng, 40, 60), format=fmt)
    assert decode(path, 3, expect_size=(40, 60), fast=fast).shape == (40, 60, 3)
    _load_forbidden(monkeypatch)
    with pytest.raises(ImageSizeMismatch) as e:
        decode(path, 1, expect_size=(24, 32), fast=fast)
    assert isinstance(e.value, ImageReadError)
    assert e.value.shape == (40, 60, 1) and e.value.expected == (24, 32)
    assert str(e.value) == "image is 60x40 but 32x24 was expected"
    decode_args = dict(size=(24, 32), expect_size=(99, 99))  # with --size every image fits: no refusal
    monkeypatch.undo()
    assert decode(path, 3, fast=fast, **decode_args).shape == (24, 32, 3)


def test_expected_size_sees_exif_orientation_without_decoding(tmp_path, rng, monkeypatch):
    from logitify_cli.images import ImageSizeMismatch, decode

    img = Image.fromarray(photo(rng, 24, 32))  # stored 32 wide, 24 high
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: 24 wide, 32 high once oriented
    path = str(tmp_path / "turned.jpg")
    img.save(path, exif=exif.tobytes(), quality=95)
    want = decode(path, 3)
    assert want.shape == (32, 24, 3)
    np.testing.assert_array_equal(decode(path, 3, expect_size=(32, 24)), want)
    _load_forbidden(monkeypatch)
    with pytest.raises(ImageSizeMismatch) as e:
        decode(path, 3, expect_size=(24, 32))
    assert e.value.shape == (32, 24, 3)


def test_damaged_image_of_another_size_is_refused_for_its_size(tmp_path):
    """The header is enough: the damaged pixel data behind it is never reached."""
    from logitify_cli.images import ImageSizeMismatch, decode

    import zlib

    def chunk(cid, body):
        return struct.pack(">I", len(body)) + cid + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(cid)))

    ihdr = struct.pack(">IIBBBBB", 8000, 8000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    (tmp_path / "big.png").write_bytes(data)
    for source in (str(tmp_path / "big.png"), data):
        for fast in (True, False):
            with pytest.raises(ImageSizeMismatch, match="8000x8000 but 32x24"):
                decode(source, 3, expect_size=(24, 32), fast=fast)


def test_decode_many_hands_back_the_mismatch_with_its_fields(tmp_path, rng):
    import pickle

    from logitify_cli.images import ImageSizeMismatch, decode_many, unpack_many

    a = save(str(tmp_path / "a.png"), photo(rng, 24, 32))
    b = save(str(tmp_path / "b.png"), photo(rng, 40, 60))
    c = str(tmp_path / "c.png")
    open(c, "wb").close()
    result = pickle.loads(pickle.dumps(decode_many([a, b, c], 3, None, 10**8, expect_size=(24, 32))))
    (arr, r0), (none, r1), (_, r2) = unpack_many(result)
    assert arr.shape == (24, 32, 3) and r0 is None and none is None
    assert isinstance(r1, ImageSizeMismatch) and r1.shape == (40, 60, 3) and r1.expected == (24, 32)
    assert isinstance(r2, str) and "empty" in r2


def test_huge_images_of_the_wrong_size_cost_no_memory(tmp_path):
    """Six in-limit 8000x8000 PNGs in a run of 32x24 images: refused from their headers, in a few MB."""
    path = tmp_path / "huge.png"
    Image.new("RGB", (8000, 8000)).save(path, compress_level=1)
    code = (
        "import resource, sys\n"
        "from logitify_cli.images import decode_many, unpack_many\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"out = unpack_many(decode_many([{str(path)!r}] * 6, 3, None, 89_478_485, expect_size=(24, 32)))\n"
        "assert all(a is None and r.shape == (8000, 8000, 3) for a, r in out), out\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < 40_000  # KiB; one decoded image alone is 192,000
