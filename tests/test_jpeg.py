"""The JPEG shortcut (libjpeg-turbo through simplejpeg) must give exactly what Pillow's road gives.

On every file, valid, odd or damaged, read_image(fast=True) must return the
same pixels as read_image(fast=False), or fail with the same reason; with
--jpeg-draft too (both roads then use the same DCT scale).
"""
import gc
import io

import numpy as np
import pytest
import simplejpeg
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import damage, photo
from logitify_cli import jpeg
from logitify_cli.images import (FILTERS, RESIZE_MODES, Geometry, ImageReadError, ImageSizeMismatch,
                                  _plain_jpeg, read_image)

SAMPLINGS = ("444", "422", "420", "440", "411")


def outcome(source, channels, fast, geometry=None, expect_size=None):
    try:
        return read_image(source, channels, geometry, fast=fast, expect_size=expect_size)
    except ImageSizeMismatch as e:
        return ("size", e.shape, e.expected)
    except ImageReadError as e:
        return str(e)


def same(a, b):
    if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
        return a == b
    return a.shape == b.shape and np.array_equal(a, b)


def exif_bytes(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def jpeg_bytes(arr, mode="RGB", quality=90, sampling="420", progressive=False, restart=0, orientation=None,
               encoder="pillow"):
    """A JPEG of arr in mode L, RGB or CMYK, by Pillow's encoder or by libjpeg-turbo's (for 4:4:0 and 4:1:1)."""
    if encoder == "turbo" and mode in ("L", "RGB"):
        if mode == "L":
            arr = np.ascontiguousarray(arr[:, :, :1])
        data = simplejpeg.encode_jpeg(np.ascontiguousarray(arr), quality, "GRAY" if mode == "L" else "RGB",
                                      "Gray" if mode == "L" else sampling)
        if orientation is not None:  # an APP1 Exif segment right after SOI
            body = exif_bytes(orientation)
            data = data[:2] + b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body + data[2:]
        return data
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    kw = {"quality": quality, "progressive": progressive,
          "subsampling": {"444": 0, "422": 1, "420": 2}.get(sampling, 2)}
    if restart:
        kw["restart_marker_blocks"] = restart
    if orientation is not None:
        kw["exif"] = exif_bytes(orientation)
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


jpegs = st.builds(
    lambda seed, h, w, mode, quality, sampling, progressive, restart, orientation, encoder: jpeg_bytes(
        photo(np.random.default_rng(seed), h, w), mode, quality, sampling, progressive, restart, orientation,
        encoder),
    seed=st.integers(0, 2**32 - 1), h=st.integers(1, 70), w=st.integers(1, 70),
    mode=st.sampled_from(["RGB", "RGB", "L", "CMYK"]), quality=st.integers(60, 100),
    sampling=st.sampled_from(SAMPLINGS), progressive=st.booleans(), restart=st.sampled_from([0, 0, 1, 3]),
    orientation=st.sampled_from([None, None, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    encoder=st.sampled_from(["pillow", "turbo"]))

sizes = st.tuples(st.integers(1, 40), st.integers(1, 40))
geometries = st.one_of(
    st.none(),
    st.builds(Geometry, size=sizes, resize_mode=st.sampled_from(RESIZE_MODES),
              filter=st.sampled_from(sorted(FILTERS)), jpeg_draft=st.booleans()),
    # A crop window (in full-size pixels, so never with the draft), then perhaps a resize.
    st.builds(Geometry, size=st.none() | sizes, resize_mode=st.sampled_from(RESIZE_MODES),
              crop=st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(1, 50), st.integers(1, 50)),
              filter=st.sampled_from(sorted(FILTERS))))


@settings(max_examples=150)
@given(data=jpegs, channels=st.sampled_from([1, 3, 4]), geometry=geometries)
def test_shortcut_equals_pillow_on_valid_jpegs(data, channels, geometry):
    assert same(outcome(data, channels, True, geometry), outcome(data, channels, False, geometry))


@settings(max_examples=150)
@given(data=jpegs, channels=st.sampled_from([1, 3]), at=st.one_of(st.integers(0, 30), st.floats(0, 1)),
       byte=st.integers(0, 255), how=st.sampled_from(["flip", "cut", "extend"]), geometry=geometries)
def test_shortcut_equals_pillow_on_damaged_jpegs(data, channels, at, byte, how, geometry):
    # Half the damage lands in the first 30 bytes (markers and their lengths), half anywhere.
    bad = damage(data, at, byte, how)
    assert same(outcome(bad, channels, True, geometry), outcome(bad, channels, False, geometry))


@settings(max_examples=40)
@given(data=jpegs, want=st.tuples(st.integers(1, 70), st.integers(1, 70)))
def test_header_size_check_agrees(data, want):
    assert same(outcome(data, 3, True, expect_size=want), outcome(data, 3, False, expect_size=want))


def test_shortcut_is_taken_for_plain_jpegs(tmp_path, rng):
    # The properties above would pass vacuously if the shortcut never ran, or never mapped colour pixels
    # (the Pillow this project installs maps them; another may not, and then the copy below is used).
    assert jpeg._maps_rgb()
    arr = photo(rng, 37, 53)
    for mode in ("L", "RGB"):
        for encoder in ("pillow", "turbo"):
            for sampling in SAMPLINGS if mode == "RGB" else ("444",):
                for progressive in (False, True):
                    for orientation in (None, 1, 6):
                        data = jpeg_bytes(arr, mode, 85, sampling, progressive, 2 if encoder == "pillow" else 0,
                                          orientation, encoder)
                        img = _plain_jpeg(data, 10**9, 3, None, None)
                        assert img is not None and img.mode == mode, (mode, encoder, sampling, progressive)
                        if mode == "RGB" and orientation in (None, 1):  # (a turned image is a new one)
                            assert img.readonly  # over libjpeg-turbo's own buffer (Image.fromarray would copy)
                        assert img.size == ((37, 53) if orientation == 6 else (53, 37))
                        for g in (None, Geometry(size=(9, 7), filter="box", jpeg_draft=True)):
                            assert same(read_image(data, 3, g), read_image(data, 3, g, fast=False))
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg_bytes(arr))
    assert same(read_image(str(path), 3), read_image(str(path), 3, fast=False))


def test_shortcut_declines_what_libjpeg_alone_cannot_settle(rng):
    arr = photo(rng, 16, 16)
    plain = jpeg_bytes(arr)
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x tiff:Orientation=\"6\"/>"
    cases = {
        "CMYK (Adobe marker)": jpeg_bytes(arr, "CMYK"),
        "Exif and XMP": jpeg_bytes(arr, orientation=1)[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big")
        + xmp + jpeg_bytes(arr, orientation=1)[2:],
        "MPO index": plain[:2] + b"\xff\xe2\x00\x0aMPF\x00\x00\x00\x00\x00" + plain[2:],
        "truncated": plain[:-40],
        "damaged scan": plain[:-60] + b"\xff\xd0" * 10 + plain[-40:],
    }
    for name, data in cases.items():
        decoded = _plain_jpeg(data, 10**9, 3, None, None)
        assert decoded is None, name
        assert same(outcome(data, 3, True), outcome(data, 3, False)), name
    # A truncated file is refused, as Pillow refuses it.
    assert isinstance(outcome(plain[:-40], 3, True), str)
    # XMP alone: Pillow's road reads no orientation from it, nor does the shortcut.
    only_xmp = plain[:2] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + plain[2:]
    assert _plain_jpeg(only_xmp, 10**9, 3, None, None).size == (16, 16)
    assert same(outcome(only_xmp, 3, True), outcome(only_xmp, 3, False))


def test_a_progressive_file_of_too_many_scans_goes_to_pillows_road(rng):
    """Every scan redoes the whole image: a file of thousands is Pillow's to decode (or refuse), once."""
    prog = jpeg_bytes(photo(rng, 16, 16), progressive=True)
    last = prog.rindex(b"\xff\xda")
    scans = prog.count(b"\xff\xda")
    assert jpeg.header(prog) is not None and 2 < scans <= jpeg.MAX_SCANS
    many = prog[:-2] + prog[last:-2] * (jpeg.MAX_SCANS + 1 - scans) + b"\xff\xd9"  # the last scan, over and over
    assert jpeg.header(many) is None
    assert same(outcome(many, 3, True), outcome(many, 3, False))
    assert jpeg.header(prog[:-2] + prog[last:-2] * (jpeg.MAX_SCANS - scans) + b"\xff\xd9") is not None


def test_pixel_limits_apply_to_the_shortcut(rng):
    data = jpeg_bytes(photo(rng, 20, 20))
    assert _plain_jpeg(data, 399, 3, None, None) is None
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(data, 3, max_pixels=399)


def test_draft_scale_is_pillows():
    # Pillow's own choice, read back from the size draft() gives.
    for w, h, size in ((500, 375, (64, 64)), (64, 64, (64, 64)), (1000, 90, (30, 10)), (130, 70, (16, 9)),
                       (17, 300, (2, 2)), (640, 480, (640, 1))):
        img = Image.open(io.BytesIO(jpeg_bytes(photo(np.random.default_rng(0), h, w))))
        img.draft("RGB", size)
        s = jpeg.draft_scale(w, h, size)
        assert img.size == (-(-w // s), -(-h // s)), (w, h, size)


def test_draft_on_tiny_jpegs_equals_pillows_draft():
    """Every draft scale of every small image: where another DCT scale n/8 gives the same size (a 3x3 file
    at 1/2 is 2x2 at 3/8, 4/8 and 5/8 too), libjpeg-turbo may pick it, so the shortcut must not be taken."""
    rng = np.random.default_rng(5)
    differ = []
    for h in range(1, 13):
        for w in range(1, 13):
            data = jpeg_bytes(photo(rng, h, w), quality=90)
            for size in ((1, 1), (1, 2), (2, 1), (2, 2), (3, 3)):
                g = Geometry(size=size, filter="box", jpeg_draft=True)
                if not same(read_image(data, 3, g), read_image(data, 3, g, fast=False)):
                    differ.append((h, w, size))
    assert not differ
    assert not jpeg.scale_is_settled(3, 3, 2) and not jpeg.scale_is_settled(5, 5, 4)
    assert jpeg.scale_is_settled(500, 375, 4) and jpeg.scale_is_settled(375, 500, 8)


def test_draft_gives_other_pixels_and_needs_a_size(rng):
    data = jpeg_bytes(photo(rng, 300, 400), quality=95)
    exact = read_image(data, 3, Geometry(size=(32, 32), filter="box"))
    draft = read_image(data, 3, Geometry(size=(32, 32), filter="box", jpeg_draft=True))
    assert draft.shape == exact.shape and not np.array_equal(draft, exact)
    assert np.abs(draft.astype(int) - exact).mean() < 3
    with pytest.raises(ValueError):
        Geometry(jpeg_draft=True)
    with pytest.raises(ValueError):
        Geometry(size=(8, 8), crop=(0, 0, 4, 4), jpeg_draft=True)


def test_jpeg_draft_through_the_cli(tmp_path, cli, rng):
    """--jpeg-draft: recorded in the manifest and shown by info; decode and verify --against agree with it."""
    import json

    src = tmp_path / "photos"
    (src / "a").mkdir(parents=True)
    for i, (h, w, ori) in enumerate(((150, 200, None), (120, 90, 6), (40, 30, None))):
        (src / "a" / f"{i}.jpg").write_bytes(jpeg_bytes(photo(rng, h, w), quality=92, orientation=ori))
    res = cli("encode", src, "--size", "20x24", "--filter", "box", "--jpeg-draft", "-o", tmp_path / "d", "-q")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["source"]["jpeg_draft"] is True
    info = cli("info", tmp_path / "d", "--json")
    assert json.loads(info.output)["geometry"]["jpeg_draft"] is True
    assert "draft" in cli("info", tmp_path / "d").output
    assert cli("verify", tmp_path / "d", "--against", src).exit_code == 0
    assert cli("decode", tmp_path / "d", "-o", tmp_path / "out", "-q").exit_code == 0
    draft = Geometry(size=(20, 24), filter="box", jpeg_draft=True)
    exact = Geometry(size=(20, 24), filter="box")
    differs = 0
    for i in range(3):
        got = np.asarray(Image.open(tmp_path / "out" / "a" / f"{i}.png"))
        path = str(src / "a" / f"{i}.jpg")
        assert np.array_equal(got, read_image(path, 3, draft, fast=False))
        differs += not np.array_equal(got, read_image(path, 3, exact, fast=False))
    assert differs == 2  # the 30x40 one is too small for any draft scale
    # Without the flag the manifest says nothing of it, and the pixels are the exact ones.
    assert cli("encode", src, "--size", "20x24", "--filter", "box", "-o", tmp_path / "e", "-q").exit_code == 0
    assert "jpeg_draft" not in json.loads((tmp_path / "e" / "manifest.json").read_text())["source"]
    assert "jpeg_draft" not in json.loads(cli("info", tmp_path / "e", "--json").output)["geometry"]
    for args in ((), ("--size", "8x8", "--crop", "0,0,30,30")):
        res = cli("encode", src, "--jpeg-draft", *args, "-o", tmp_path / "f")
        assert res.exit_code == 2 and "--jpeg-draft" in res.output


def segment(marker, body):
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def exif_ifd(entries, extra=b""):
    """An APP1 Exif body: little-endian IFD0 of (tag, type, count, 4 value bytes) entries, then `extra`."""
    ifd = b"II*\0" + (8).to_bytes(4, "little") + len(entries).to_bytes(2, "little")
    ifd += b"".join(t.to_bytes(2, "little") + k.to_bytes(2, "little") + n.to_bytes(4, "little") + v
                    for t, k, n, v in entries)
    return b"Exif\0\0" + ifd + b"\0\0\0\0" + extra


def test_header_segments_pillow_refuses_are_refused_by_both_roads(rng):
    """Segments Pillow's plugin parses itself, malformed: libjpeg alone would decode these files."""
    plain = jpeg_bytes(photo(rng, 16, 24))
    bad = {
        "short JFIF": segment(0xE0, b"JFIF\0\1"),
        "short ICC fragment": segment(0xE2, b"ICC_PROFILE\0\1"),
        "truncated Photoshop resource": segment(0xED, b"Photoshop 3.0\0" + b"8BIM\x03\xed"),
        "EXIF resolution Pillow cannot read": segment(0xE1, exif_ifd(
            [(0x011A, 7, 1, b"\0" * 4), (0x0128, 3, 1, (2).to_bytes(2, "little") + b"\0\0")])),
    }
    for name, seg in bad.items():
        data = plain[:2] + seg + plain[2:]
        fast, slow = outcome(data, 3, True), outcome(data, 3, False)
        assert isinstance(slow, str), name  # Pillow refuses it ...
        assert same(fast, slow), name  # ... and so does the shortcut


def test_orientation_with_tags_pillow_cannot_write_back(rng, tmp_path):
    """exif_transpose rewrites the EXIF it turns; tags it cannot write made it fail. The pixels never needed that."""
    six = (0x0112, 3, 1, (6).to_bytes(2, "little") + b"\0\0")
    odd = {"DotRange as RATIONAL": exif_ifd([six, (0x0150, 5, 1, (38).to_bytes(4, "little"))],
                                            (72).to_bytes(4, "little") + (1).to_bytes(4, "little")),
           "YResolution as UNDEFINED": exif_ifd([six, (0x011B, 7, 1, b"\0" * 4)])}
    arr = photo(rng, 16, 24)
    plain = jpeg_bytes(arr)
    for name, body in odd.items():
        data = plain[:2] + segment(0xE1, body) + plain[2:]
        fast, slow = outcome(data, 3, True), outcome(data, 3, False)
        assert isinstance(slow, np.ndarray) and slow.shape == (24, 16, 3), (name, slow)
        assert same(fast, slow), name
        # In a PNG's eXIf only Pillow's road exists: turned, not a crash.
        png = io.BytesIO()
        Image.fromarray(arr).save(png, "PNG", exif=body)
        got = read_image(png.getvalue(), 3)
        assert np.array_equal(got, np.rot90(arr, -1)), name


def test_fill_bytes_before_a_marker(rng):
    """0xFF fill bytes before a marker are legal: the orientation after them still counts."""
    data = jpeg_bytes(photo(rng, 16, 24))
    head = b"\xff\xd8\xff" + segment(0xE1, exif_bytes(6))
    # Read as a marker FF FF with a length, the fill byte would jump over the
    # Exif segment; comments fill the file up to where that jump lands.
    target, pad = 4 + int.from_bytes(head[4:6], "big"), b""
    while target - len(head) - len(pad) > 65537:
        pad += segment(0xFE, b"x" * 65000)
    pad += segment(0xFE, b"y" * (target - len(head) - len(pad) - 4))
    filled = head + pad + data[2:]
    fast, slow = outcome(filled, 3, True), outcome(filled, 3, False)
    assert isinstance(slow, np.ndarray) and slow.shape == (24, 16, 3)
    assert same(fast, slow)


def test_draft_scale_ignores_an_orientation_that_is_not_applied(rng):
    """With EXIF orientation off (every preset), the draft is chosen for the image as stored, on both roads."""
    data = jpeg_bytes(photo(rng, 128, 512), orientation=6)
    g = Geometry(size=(64, 32), filter="box", exif=False, jpeg_draft=True)
    fast, slow = outcome(data, 3, True, g), outcome(data, 3, False, g)
    assert isinstance(slow, np.ndarray) and slow.shape == (64, 32, 3)
    assert same(fast, slow)
    assert not same(slow, outcome(data, 3, False, Geometry(size=(64, 32), filter="box", exif=False)))


def test_a_size_refusal_is_pillows_reading_of_the_header(rng):
    """With an expected size, a header Pillow reads otherwise (or refuses) gives Pillow's verdict on both roads."""
    import struct

    data = jpeg_bytes(photo(rng, 16, 24))
    q, f = data.index(b"\xff\xdb"), data.index(b"\xff\xc0")
    n = struct.unpack(">H", data[f + 2:f + 4])[0]
    sof = data[f + 4:f + 2 + n]
    cases = {
        "short DQT": (data[:q] + segment(0xDB, b"\x03" + bytes(10)) + data[q:], (8, 8)),
        "SOF with stray bytes": (data[:f] + segment(0xC0, sof + b"\1\1") + data[f + 2 + n:], (8, 8)),
        "DHP after SOF": (data[:f + 2 + n] + segment(0xDE, b"\x08" + struct.pack(">HH", 40, 50) + sof[5:])
                          + data[f + 2 + n:], (24, 16)),
        "JPG0 holding an Exif segment": (data[:2] + segment(0xF0, segment(0xE1, exif_bytes(6))) + data[2:], (24, 16)),
    }
    for name, (bad, want) in cases.items():
        assert same(outcome(bad, 3, True, expect_size=want), outcome(bad, 3, False, expect_size=want)), name


def test_colour_pixels_mapped_as_rgb_outlive_their_array(rng):
    # The decoded buffer is Pillow's image memory (no copy): it must stay alive with the image,
    # and read as RGB, whatever the fourth byte holds.
    arr = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    want = arr[:, :, :3].copy()
    img = jpeg._rgb_over(arr)
    del arr
    gc.collect()
    assert img.mode == "RGB" and img.size == (7, 5)
    assert np.array_equal(np.asarray(img), want)
    assert np.array_equal(np.asarray(img.resize((3, 2), Image.Resampling.BOX)),
                          np.asarray(Image.fromarray(want).resize((3, 2), Image.Resampling.BOX)))


@settings(max_examples=40)
@given(data=jpegs, channels=st.sampled_from([1, 3, 4]), geometry=geometries)
def test_where_pillow_cannot_map_rgb_the_copy_gives_its_pixels_too(data, channels, geometry):
    jpeg._maps_rgb.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as m:
            def unmappable(arr):  # as on a Pillow whose map_buffer is gone or maps otherwise
                raise TypeError("map_buffer")

            m.setattr(jpeg, "_rgb_over", unmappable)
            assert not jpeg._maps_rgb()
            fast = outcome(data, channels, True, geometry)
        assert same(fast, outcome(data, channels, False, geometry))
    finally:
        jpeg._maps_rgb.cache_clear()
