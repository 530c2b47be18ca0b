"""Every Pillow rule (modes, EXIF, bad files), on files the tests make."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from conftest import photo, save
from logitify_cli.images import ImageReadError, read_image, is_grayscale_mode, peek_mode


def test_exif_orientation_is_applied(tmp_path, rng):
    arr = photo(rng, 10, 20)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = str(tmp_path / "rot.jpg")
    img.save(path, exif=exif, quality=100)
    out = read_image(path, 3)
    assert out.shape == (20, 10, 3)
    plain = read_image(save(str(tmp_path / "plain.jpg"), arr, quality=100), 3)
    np.testing.assert_array_equal(out, np.rot90(plain, k=-1))


def test_palette_la_rgba_cmyk_and_1bit_convert(tmp_path, rng):
    arr = photo(rng, 12, 12)
    rgb = Image.fromarray(arr)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "p.png"), 3), np.asarray(pal.convert("RGB")))
    la = rgb.convert("LA")
    la.save(tmp_path / "la.png")
    assert read_image(str(tmp_path / "la.png"), 1)[:, :, 0].tolist() == np.asarray(rgb.convert("L")).tolist()
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "rgba.png"), 3), arr)
    assert read_image(str(tmp_path / "rgba.png"), 4)[:, :, 3].min() == 128
    cmyk = rgb.convert("CMYK")
    cmyk.save(tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(read_image(str(tmp_path / "cmyk.tif"), 3), np.asarray(cmyk.convert("RGB")))
    bw = rgb.convert("1")
    bw.save(tmp_path / "bw.png")
    out = read_image(str(tmp_path / "bw.png"), 1)
    assert set(np.unique(out)) <= {0, 255} and out.shape == (12, 12, 1)


def test_16_bit_is_scaled_not_clipped(tmp_path):
    vals = np.array([[0, 255, 256, 40000], [65535, 1000, 30000, 511]], np.uint16)
    Image.fromarray(vals).save(tmp_path / "g16.png")
    assert peek_mode(str(tmp_path / "g16.png")).startswith("I")
    out = read_image(str(tmp_path / "g16.png"), 1)[:, :, 0]
    np.testing.assert_array_equal(out, (vals >> 8).astype(np.uint8))


def test_16_bit_pnm_is_scaled_and_32_bit_integers_are_refused_not_zeroed(tmp_path):
    """Pillow opens 16-bit PGM and 32-bit integer TIFF both as mode "I": the first keeps its high byte like
    any 16-bit image, the second (any range at all) is refused with a reason, never read as black."""
    vals = np.array([[0, 255, 256, 40000], [65535, 1000, 30000, 511]], np.uint16)
    (tmp_path / "g16.pgm").write_bytes(b"P5 4 2 65535\n" + vals.astype(">u2").tobytes())
    assert Image.open(tmp_path / "g16.pgm").mode == "I"
    np.testing.assert_array_equal(read_image(str(tmp_path / "g16.pgm"), 1)[:, :, 0], (vals >> 8).astype(np.uint8))
    Image.fromarray(vals.astype(np.uint16)).save(tmp_path / "g16.tif")
    np.testing.assert_array_equal(read_image(str(tmp_path / "g16.tif"), 1)[:, :, 0], (vals >> 8).astype(np.uint8))
    for top in (255, 70000):
        wide = np.arange(8, dtype=np.int32).reshape(2, 4) * (top // 7)
        Image.fromarray(wide).save(tmp_path / f"i32-{top}.tif")
        assert Image.open(tmp_path / f"i32-{top}.tif").mode == "I"
        with pytest.raises(ImageReadError, match="32-bit integer images are not supported"):
            read_image(str(tmp_path / f"i32-{top}.tif"), 1)


def test_a_turned_16_bit_image_in_mode_i_keeps_its_high_byte(tmp_path, monkeypatch):
    """Pillow before 10.3 opened 16-bit grey PNGs as mode "I": the bit depth is read from the file before an
    EXIF turn (whose result has no format), so a turned one is not taken for 32-bit."""
    from PIL import PngImagePlugin

    if (16, 0) not in getattr(PngImagePlugin, "_MODES", {}):
        pytest.skip("this Pillow lays out its PNG modes otherwise")
    vals = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter
    Image.fromarray(vals).save(tmp_path / "g16.png", exif=exif)
    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))
    assert Image.open(tmp_path / "g16.png").mode == "I"
    out = read_image(str(tmp_path / "g16.png"), 1)[:, :, 0]
    np.testing.assert_array_equal(out, np.rot90(vals >> 8, -1).astype(np.uint8))


def test_first_frame_of_gif_and_tiff(tmp_path, rng):
    frames = [Image.fromarray(photo(rng, 8, 8)).convert("P") for _ in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.gif"), 3), np.asarray(frames[0].convert("RGB")))
    pages = [Image.fromarray(photo(rng, 8, 8)) for _ in range(2)]
    pages[0].save(tmp_path / "a.tif", save_all=True, append_images=pages[1:])
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.tif"), 3), np.asarray(pages[0]))


def test_formats_bmp_webp_lossless(tmp_path, rng):
    arr = photo(rng, 9, 7)
    for name, kw in (("a.bmp", {}), ("a.webp", {"lossless": True})):
        np.testing.assert_array_equal(read_image(save(str(tmp_path / name), arr, **kw), 3), arr)


def test_channels_and_resize(tmp_path, rng):
    arr = photo(rng, 20, 30)
    path = save(str(tmp_path / "a.png"), arr)
    assert read_image(path, 1).shape == (20, 30, 1)
    assert read_image(path, 4).shape == (20, 30, 4)
    assert read_image(path, 3, size=(8, 16)).shape == (8, 16, 3)
    assert is_grayscale_mode("L") and is_grayscale_mode("I;16") and not is_grayscale_mode("RGB")


@pytest.mark.parametrize("maker,reason", [
    (lambda p: open(p, "wb").close(), "empty"),
    (lambda p: open(p, "wb").write(b"this is not an image at all"), "not an image"),
    (lambda p: os.symlink("/nonexistent/target.png", p), "broken"),
    (lambda p: os.mkdir(p), "directory"),
])
def test_bad_inputs_raise_a_reason(tmp_path, maker, reason):
    path = str(tmp_path / "bad.png")
    maker(path)
    with pytest.raises(ImageReadError, match=reason):
        read_image(path, 3)


def test_truncated_image(tmp_path, rng):
    buf = io.BytesIO()
    Image.fromarray(photo(rng, 64, 64)).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="(?i)truncat|unreadable image"):
        read_image(str(path), 3)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # A 30000x30000 PNG whose data is tiny: only the header is ever read.
    img = Image.new("1", (30000, 30000))
    path = tmp_path / "bomb.png"
    img.save(path, optimize=True)
    with pytest.raises(ImageReadError, match="decompression bomb: 900000000 pixels exceeds the limit of 89478485 "
                                             r"\(--max-pixels\)"):  # ours, not Pillow's twice-as-large one
        read_image(str(path), 3)
    with pytest.raises(ImageReadError, match="decompression bomb.* the limit of 10000 "):
        read_image(str(path), 3, max_pixels=10_000)


@pytest.mark.parametrize("side", [40, 50])  # past Pillow's warning, and past its error at twice its limit
def test_max_pixels_may_go_above_pillows_own_limit(tmp_path, rng, monkeypatch, side):
    from PIL import Image

    from logitify_cli.images import ImageReadError, read_image

    path = str(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    from logitify_cli.images import Geometry

    for fast in (True, False):
        assert read_image(path, 3, max_pixels=side * side, fast=fast).shape == (side, side, 3)
        crop = Geometry(crop=(0, 0, side - 1, side - 1))  # Pillow checks a crop's size too
        assert read_image(path, 3, crop, max_pixels=side * side, fast=fast).shape == (side - 1, side - 1, 3)
        with pytest.raises(ImageReadError, match="decompression bomb"):
            read_image(path, 3, max_pixels=1000, fast=fast)
    assert Image.MAX_IMAGE_PIXELS == 1000  # lifted only while a header was read
