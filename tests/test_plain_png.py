"""The plain-PNG shortcut must give exactly what Pillow's full road gives.

read_image(fast=True) may skip Image.open for plain PNGs; on every file, valid,
odd or damaged, it must return the same pixels or fail with the same reason
as read_image(fast=False).
"""
import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from conftest import damage, photo
from logitify_cli.images import ImageReadError, _plain_png, read_image


def outcome(source, channels, fast, size=None):
    try:
        return read_image(source, channels, size, fast=fast)
    except ImageReadError as e:
        return str(e)


def same(a, b):
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b  # str == ndarray would compare elementwise
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def png_bytes(arr, mode, **kw):
    buf = io.BytesIO()
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if img.mode != mode:
        img = img.convert(mode)
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def chunk(cid, body):
    return struct.pack(">I", len(body)) + cid + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(cid)))


def chunks(data):
    """[(cid, body)] of a PNG."""
    out, pos = [], 8
    while pos + 8 <= len(data):
        length, cid = struct.unpack_from(">I4s", data, pos)
        out.append((cid, data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def assemble(parts):
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(c, b) for c, b in parts)


modes = st.sampled_from(["L", "LA", "RGB", "RGBA", "P", "I;16", "1"])


@st.composite
def pngs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    mode = draw(modes)
    arr = photo(rng, h, w, 4 if mode in ("RGBA", "LA") else 3)
    kw = {"compress_level": draw(st.integers(0, 9))}
    if draw(st.booleans()):
        info = PngImagePlugin.PngInfo()
        info.add_text(draw(st.sampled_from(["Comment", "Software", "exif"])), "x" * draw(st.integers(0, 50)),
                      zip=draw(st.booleans()))
        kw["pnginfo"] = info
    if draw(st.booleans()):
        kw["dpi"] = (72, 72)
    if mode in ("L", "RGB") and draw(st.booleans()):
        kw["transparency"] = 0 if mode == "L" else (0, 0, 0)
    if draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(1, 8))
        kw["exif"] = exif.tobytes()
    if mode == "I;16":
        img = Image.fromarray((arr[:, :, 0].astype(np.uint16) * 257))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()
    return png_bytes(arr, mode, **kw)


@given(data=pngs(), channels=st.sampled_from([1, 3, 4]), resize=st.booleans())
def test_shortcut_equals_pillow_on_valid_pngs(data, channels, resize):
    size = (7, 9) if resize else None
    assert same(outcome(data, channels, True, size), outcome(data, channels, False, size))


@settings(max_examples=400)
@given(data=pngs(), channels=st.sampled_from([1, 3]), at=st.one_of(st.integers(0, 40), st.floats(0, 1)),
       byte=st.integers(0, 255), how=st.sampled_from(["flip", "cut", "extend"]))
def test_shortcut_equals_pillow_on_damaged_pngs(data, channels, at, byte, how):
    # Half the damage lands in the first 40 bytes (signature, IHDR and its CRC), half anywhere.
    bad = damage(data, at, byte, how)
    assert same(outcome(bad, channels, True), outcome(bad, channels, False))


@st.composite
def restreamed_pngs(draw):
    """A plain PNG whose zlib stream is damaged, cut, padded or split anew, every chunk CRC valid.

    Damage that breaks a CRC never reaches a decoder (the shortcut declines
    the file); this reaches it, where a decoder could differ from Pillow's
    verdict on a stream with bytes past its last row, a wrong checksum or a
    bad code, or on where the chunks cut it.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA"]))
    data = png_bytes(photo(rng, h, w, 4), mode, compress_level=draw(st.integers(0, 9)))
    parts = chunks(data)
    z = b"".join(b for c, b in parts if c == b"IDAT")
    raw = zlib.decompress(z)
    how = draw(st.sampled_from(["flip", "cut", "extend", "tail", "rows", "sync"]))
    at = draw(st.integers(0, len(z) - 1))
    if how == "flip":
        z = z[:at] + bytes([z[at] ^ draw(st.integers(1, 255))]) + z[at + 1:]
    elif how == "cut":
        z = z[:at]
    elif how == "extend":
        z += draw(st.binary(min_size=1, max_size=8))
    elif how == "tail":  # the last rows end a block that is not final, then something else follows
        co = zlib.compressobj()
        z = co.compress(raw) + co.flush(zlib.Z_SYNC_FLUSH) + draw(st.binary(max_size=8))
    elif how == "rows":  # more rows than the header says, or fewer
        cut = draw(st.integers(-len(raw), len(raw)))
        z = zlib.compress(raw + raw[:cut] if cut > 0 else raw[:len(raw) + cut])
    else:  # a good stream, every byte in place, for the splits alone
        pass
    cuts = sorted(draw(st.lists(st.integers(0, len(z)), max_size=4)))
    pieces = [z[a:b] for a, b in zip([0, *cuts], [*cuts, len(z)])]
    return assemble([parts[0], *((b"IDAT", p) for p in pieces), (b"IEND", b"")])


@settings(max_examples=300)
@given(data=restreamed_pngs(), channels=st.sampled_from([1, 3]))
def test_shortcut_equals_pillow_on_damaged_streams(data, channels):
    assert same(outcome(data, channels, True), outcome(data, channels, False))


def test_last_rows_waiting_in_zlib_at_a_chunk_end(rng):
    """Pillow calls inflate only with input in hand: rows zlib could still give from its own state at the
    end of a chunk need the next chunk, and its bytes decide. A decoder that asks zlib for them without
    input (libspng does) gives pixels where Pillow refuses; the shortcut must not."""
    z = zlib.compress(bytes(6))  # a 1x3 grey image of zeros: one long match
    ihdr = (b"IHDR", struct.pack(">IIBBBBB", 1, 3, 8, 0, 0, 0, 0))
    bad = z[:-1] + bytes([z[-1] ^ 1])  # a wrong Adler-32
    cases = {
        "stream cut after the match": [(b"IDAT", z[:6])],
        "wrong checksum in a chunk of its own": [(b"IDAT", bad[:6]), (b"IDAT", bad[6:])],
        "good checksum in a chunk of its own": [(b"IDAT", z[:6]), (b"IDAT", z[6:])],
    }
    for name, parts in cases.items():
        png = assemble([ihdr, *parts, (b"IEND", b"")])
        for channels in (1, 3):
            assert same(outcome(png, channels, True), outcome(png, channels, False)), name
    assert isinstance(outcome(assemble([ihdr, *cases["stream cut after the match"], (b"IEND", b"")]), 3, False), str)
    # A photo whose bottom rows are flat, its stream cut before the end-of-block code.
    arr = photo(rng, 32, 32)
    arr[-6:] = 255
    parts = chunks(png_bytes(arr, "RGB"))
    z = b"".join(b for c, b in parts if c == b"IDAT")
    png = assemble([parts[0], (b"IDAT", z[:-5]), (b"IEND", b"")])
    assert same(outcome(png, 3, True), outcome(png, 3, False))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_a_plain_png_of_another_size_is_refused_as_pillow_refuses_it(rng, mode):
    """expect_size (h, w) against a 5x7 file, turned a quarter or not: both roads name the same sizes."""
    data = png_bytes(photo(rng, 5, 7, 4), mode)

    def sized(fast, channels, expect):
        try:
            return read_image(data, channels, fast=fast, expect_size=expect)
        except ImageReadError as e:
            return f"{type(e).__name__}: {e}"

    for channels in (1, 3, 4):
        assert isinstance(sized(True, channels, (5, 7)), np.ndarray)
        for expect in ((7, 5), (5, 8), (1, 1)):
            got = sized(True, channels, expect)
            assert got.startswith("ImageSizeMismatch"), (channels, expect, got)
            assert got == sized(False, channels, expect)


def test_shortcut_is_taken_for_plain_pngs_and_paths(tmp_path, rng):
    # The property tests above would pass vacuously if the shortcut never ran.
    for mode in ("L", "LA", "RGB", "RGBA"):
        data = png_bytes(photo(rng, 12, 10, 4), mode, pnginfo=None, dpi=(300, 300))
        img = _plain_png(data, 10**9)
        assert img is not None and img.mode == mode
        path = tmp_path / f"{mode}.png"
        path.write_bytes(data)
        assert _plain_png(str(path), 10**9) is not None
        for channels in (1, 3, 4):
            for size in (None, (5, 7)):
                assert same(read_image(str(path), channels, size), read_image(data, channels, size, fast=False))


def test_shortcut_declines_what_could_change_pixels(rng):
    base = chunks(png_bytes(photo(rng, 8, 8), "RGB"))
    ihdr, rest = base[0], base[1:]
    idat = [c for c in rest if c[0] == b"IDAT"]
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {
        "tRNS": [ihdr, (b"tRNS", b"\0\0\0\0\0\0"), *idat, (b"IEND", b"")],
        "eXIf": [ihdr, (b"eXIf", exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif") else exif.tobytes()),
                 *idat, (b"IEND", b"")],
        "text after data": [ihdr, *idat, (b"tEXt", b"Comment\0hi"), (b"IEND", b"")],
        "no IEND": [ihdr, *idat],
        "short pHYs": [ihdr, (b"pHYs", b"\0\0"), *idat, (b"IEND", b"")],
        "exif text": [ihdr, (b"tEXt", b"exif\0" + b"00"), *idat, (b"IEND", b"")],
        "iCCP": [ihdr, (b"iCCP", b"icc\0\0" + zlib.compress(b"x" * 10)), *idat, (b"IEND", b"")],
    }
    for name, parts in cases.items():
        data = assemble(parts)
        assert _plain_png(data, 10**9) is None, name
        assert same(outcome(data, 3, True), outcome(data, 3, False)), name
    plain = assemble([ihdr, (b"tEXt", b"Comment\0hi"), (b"pHYs", b"\0" * 9), *idat, (b"IEND", b"")])
    assert _plain_png(plain, 10**9) is not None


def test_bad_header_crc_fails_as_pillow_does(rng):
    data = bytearray(png_bytes(photo(rng, 8, 8), "RGB"))
    data[29] ^= 0xFF  # inside IHDR's body: its CRC no longer matches
    assert _plain_png(bytes(data), 10**9) is None
    with pytest.raises(ImageReadError):
        read_image(bytes(data), 3)


def test_pixel_limits_apply_to_the_shortcut(rng):
    data = png_bytes(photo(rng, 20, 20), "RGB")
    assert _plain_png(data, 399) is None
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(data, 3, max_pixels=399)


def test_chunks_pillow_reads_into_its_own_keys(rng):
    """A short cHRM, or text filed under a key Pillow itself uses, changes Pillow's verdict: both roads agree."""
    arr = photo(rng, 8, 8)
    base = chunks(png_bytes(arr, "RGB"))
    ihdr, idat = base[0], [c for c in base[1:] if c[0] == b"IDAT"]
    cases = {
        "cHRM of 5 bytes": [(b"cHRM", b"\0" * 5)],
        "text 'transparency'": [(b"tEXt", b"transparency\0x")],
        "text 'bbox'": [(b"tEXt", b"bbox\0x")],
        "text 'interlace'": [(b"tEXt", b"interlace\x001")],
    }
    for name, extra in cases.items():
        data = assemble([ihdr, *extra, *idat, (b"IEND", b"")])
        for channels in (1, 3, 4):
            assert same(outcome(data, channels, True), outcome(data, channels, False)), (name, channels)
    data = assemble([ihdr, (b"tEXt", b"interlace\x001"), *idat, (b"IEND", b"")])
    got = outcome(data, 3, False)
    assert isinstance(got, str) or not np.array_equal(got, arr)  # the keyword did change Pillow's verdict


def test_a_short_stream_split_across_chunks(rng):
    """Where the IDAT chunks split a zlib stream that ends rows early decides Pillow's verdict; both roads agree."""
    arr = rng.integers(0, 256, (8, 24), dtype=np.uint8)
    z = zlib.compress(b"".join(b"\0" + arr[y].tobytes() for y in range(3)))  # 3 of 8 rows
    ihdr = (b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    for parts in ([(b"IDAT", z)], [(b"IDAT", z[:-4]), (b"IDAT", z[-4:])], [(b"IDAT", z[:5]), (b"IDAT", z[5:])]):
        data = assemble([ihdr, *parts, (b"IEND", b"")])
        assert same(outcome(data, 3, True), outcome(data, 3, False)), [len(b) for _, b in parts]
    split = assemble([ihdr, (b"IDAT", z[:-4]), (b"IDAT", z[-4:]), (b"IEND", b"")])
    assert isinstance(outcome(split, 3, False), str)  # the case that differed: Pillow refuses it


def test_a_huge_header_over_a_tiny_stream_touches_no_memory():
    """A 9000x9000 RGBA header over 100 bytes of rows is refused as truncated: the shortcut must not
    fill 324 MB of image first (Pillow's own road never touches the pages it was given)."""
    code = textwrap.dedent('''
        import resource, struct, zlib
        from logitify_cli.images import ImageReadError, read_image
        def chunk(c, b):
            return struct.pack(">I", len(b)) + c + b + struct.pack(">I", zlib.crc32(b, zlib.crc32(c)))
        png = (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 6, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_image(png, 3)
        except ImageReadError as e:
            print(e)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    ''')
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=120)
    message, grown = r.stdout.splitlines()
    assert "truncated" in message, r.stdout + r.stderr
    assert int(grown) < 64, f"{grown} MB more at the peak"
