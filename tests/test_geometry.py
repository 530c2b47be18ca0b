"""--resize-mode, --crop and --filter give exactly what Pillow's own crop and resize give."""
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from conftest import fail_third_shard, photo, save
from logitify_cli.images import FILTERS, RESIZE_MODES, Geometry, ImageReadError, read_image

PILLOW_FILTERS = {"nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX,
                  "bilinear": Image.Resampling.BILINEAR, "hamming": Image.Resampling.HAMMING,
                  "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def reference(path, channels, size=None, mode="stretch", crop=None, filt="bicubic"):
    """The issue's rules, written again with nothing but Pillow: orientation, mode, crop, resize, paste."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode == "P":  # logitify's rule: a palette image becomes RGB (RGBA with transparency) first
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        img = img.convert(MODES[channels])
    if crop is not None:
        top, left, h, w = crop
        if top + h > img.height or left + w > img.width:
            return None
        img = img.crop((left, top, left + w, top + h))
    if size is not None:
        H, W = size
        w, h = img.size
        f = PILLOW_FILTERS[filt]
        if mode == "stretch":
            img = img.resize((W, H), f, reducing_gap=None)
        elif mode == "center-crop":
            if w * H > h * W:
                w2 = max(1, h * W // H)
                img = img.crop(((w - w2) // 2, 0, (w - w2) // 2 + w2, h))
            else:
                h2 = max(1, w * H // W)
                img = img.crop((0, (h - h2) // 2, w, (h - h2) // 2 + h2))
            img = img.resize((W, H), f, reducing_gap=None)
        else:
            if w * H >= h * W:
                inner = (W, max(1, (h * W + w // 2) // w))
            else:
                inner = (max(1, (w * H + h // 2) // h), H)
            small = img.resize(inner, f, reducing_gap=None)
            img = Image.new(img.mode, (W, H))
            img.paste(small, ((W - inner[0]) // 2, (H - inner[1]) // 2))
    arr = np.asarray(img, np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


@st.composite
def image_files(draw, folder, count):
    """Photo-like images of random sizes (1xN and Nx1 among them), modes and formats, EXIF-turned JPEGs too."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    paths = []
    for i in range(count):
        thin = draw(st.sampled_from(["no", "no", "no", "row", "column"]))
        h = 1 if thin == "row" else draw(st.integers(1, 70))
        w = 1 if thin == "column" else draw(st.integers(1, 70))
        kind = draw(st.sampled_from(["RGB png", "L png", "RGBA png", "LA png", "P png", "RGB jpeg", "L jpeg",
                                     "turned jpeg"]))
        mode = kind.split()[0] if kind != "turned jpeg" else "RGB"
        arr = photo(rng, h, w, 4)
        img = Image.fromarray(arr, "RGBA")
        img = img.convert("RGB").quantize(16) if mode == "P" else img.convert(mode)
        if kind.endswith("png"):
            path = os.path.join(folder, f"im{i:02d}.png")
            img.save(path)
        else:
            path = os.path.join(folder, f"im{i:02d}.jpg")
            exif = Image.Exif()
            if kind == "turned jpeg":
                exif[0x0112] = draw(st.sampled_from([2, 3, 4, 5, 6, 7, 8]))
            img.save(path, quality=90, exif=exif.tobytes())
        paths.append(path)
    return paths


size_st = st.tuples(st.integers(1, 40), st.integers(1, 40))


@settings(max_examples=150)
@given(data=st.data(), channels=st.sampled_from([1, 3, 4]), size=st.one_of(st.none(), size_st),
       mode=st.sampled_from(RESIZE_MODES), filt=st.sampled_from(sorted(FILTERS)))
def test_read_image_equals_pillow_crop_and_resize(tmp_path_factory, data, channels, size, mode, filt):
    folder = str(tmp_path_factory.mktemp("imgs"))
    (path,) = data.draw(image_files(folder, 1))
    crop = data.draw(st.one_of(st.none(), st.tuples(st.integers(0, 20), st.integers(0, 20),
                                                    st.integers(1, 50), st.integers(1, 50))))
    if size is None and crop is None:
        crop = (0, 0, 1, 1)
    want = reference(path, channels, size, mode, crop, filt)
    geometry = Geometry(size=size, resize_mode=mode, crop=crop, filter=filt)
    if want is None:
        with pytest.raises(ImageReadError, match="too small for the crop window"):
            read_image(path, channels, geometry)
        return
    got = read_image(path, channels, geometry)
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", RESIZE_MODES)
@settings(max_examples=2, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_decoded_pngs_equal_pillow_for_every_filter(cli, tmp_path_factory, mode, data):
    """encode with --size, --resize-mode, --filter (and sometimes --crop), decode to PNGs: Pillow's own pixels."""
    work = tmp_path_factory.mktemp("e2e")
    src = work / "src"
    src.mkdir()
    paths = data.draw(image_files(str(src), 6))
    h, w = data.draw(size_st, label="size")
    crop = data.draw(st.one_of(st.none(), st.tuples(st.integers(0, 3), st.integers(0, 3),
                                                    st.integers(1, 30), st.integers(1, 30))), label="crop")
    for i, filt in enumerate(sorted(FILTERS)):
        channels = (1, 3, 4)[i % 3]
        out, back = work / f"out-{filt}", work / f"back-{filt}"
        args = ["encode", src, "-o", out, "--size", f"{h}x{w}", "--resize-mode", mode, "--filter", filt,
                "--channels", channels, "--workers", "1", "--json"]
        if crop:
            args += ["--crop", ",".join(map(str, crop))]
        wants = {os.path.basename(p): reference(p, channels, (h, w), mode, crop, filt) for p in paths}
        r = cli(*args)
        if all(v is None for v in wants.values()):
            assert r.exit_code == 1 and "gave an image" in r.stderr
            continue
        assert r.exit_code == 0, r.output
        m = json.loads((out / "manifest.json").read_text())
        assert m["source"]["resize_mode"] == mode and m["source"]["filter"] == filt
        assert m["source"]["crop"] == (list(crop) if crop else None)
        assert {s["source"] for s in m["skipped"]} == {k for k, v in wants.items() if v is None}
        assert all("too small for the crop window" in s["reason"] for s in m["skipped"])
        assert cli("decode", out, "-o", back, "--workers", "1", "-q").exit_code == 0
        for name, want in wants.items():
            png = back / (os.path.splitext(name)[0] + ".png")
            if want is None:
                assert not png.exists()
                continue
            got = np.asarray(Image.open(png))
            np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=f"{name} {mode} {filt}")
        assert cli("verify", out, "--against", src, "-q").exit_code == 0


def test_default_is_the_old_stretch_and_old_header(cli, image_folder, tmp_path):
    """No geometry option: the same shards as an explicit stretch + bicubic, and a run header without geometry."""
    from logitify_cli.planner import EncodeOptions, plan

    src, truth = image_folder
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("encode", src, "-o", a, "--size", "20x10").exit_code == 0
    assert cli("encode", src, "-o", b, "--size", "20x10", "--resize-mode", "stretch", "--filter", "bicubic").exit_code == 0
    ma, mb = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    assert ma["stats"]["fingerprint"] == mb["stats"]["fingerprint"]
    header = plan(EncodeOptions(sources=[str(src)], out=str(tmp_path / "x"), size=(20, 10))).header
    assert not {"crop", "resize_mode", "filter"} & set(header)
    header = plan(EncodeOptions(sources=[str(src)], out=str(tmp_path / "x"), size=(20, 10), filter="box",
                                resize_mode="border", crop=(1, 2, 3, 4))).header
    assert (header["crop"], header["resize_mode"], header["filter"]) == ([1, 2, 3, 4], "border", "box")
    # bicubic stretch as Pillow does it
    key = sorted(truth)[0]
    want = np.asarray(Image.fromarray(truth[key]).resize((10, 20), Image.Resampling.BICUBIC))
    assert cli("decode", a, "-o", tmp_path / "back", "-q").exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "back" / key)), want)


def test_crop_alone_fixes_the_shape_and_skips_small_images(cli, tmp_path, rng):
    """--crop without --size: images of any size give the window; one too small is skipped, with its reason."""
    src = tmp_path / "src"
    sizes = {"a.png": (30, 40), "b.png": (25, 31), "c.png": (50, 20), "d.png": (9, 9)}
    truth = {k: save(str(src / k), photo(rng, *hw)) for k, hw in sizes.items()}
    out = tmp_path / "out"
    r = cli("encode", src, "-o", out, "--crop", "2,3,20,15", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["shape"] == [20, 15, 3] and m["source"]["crop"] == [2, 3, 20, 15]
    assert m["source"]["resize_mode"] is None and m["source"]["filter"] is None
    assert [s["source"] for s in m["skipped"]] == ["d.png"]
    assert "9x9, too small for the crop window of 15x20" in m["skipped"][0]["reason"]
    assert cli("decode", out, "-o", tmp_path / "back", "-q").exit_code == 0
    for k in ("a.png", "b.png", "c.png"):
        want = np.asarray(Image.open(truth[k]).convert("RGB").crop((3, 2, 18, 22)))
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "back" / k)), want)
    assert cli("verify", out, "--against", src, "-q").exit_code == 0
    r = cli("encode", src, "-o", tmp_path / "fail", "--crop", "2,3,20,15", "--on-error", "fail")
    assert r.exit_code == 1 and "d.png" in r.stderr and "too small" in r.stderr


def test_first_image_too_small_for_the_crop_does_not_set_the_shape(cli, tmp_path, rng):
    src = tmp_path / "src"
    save(str(src / "a.png"), photo(rng, 4, 4))  # first in key order, too small
    save(str(src / "b.png"), photo(rng, 30, 30))
    out = tmp_path / "out"
    assert cli("encode", src, "-o", out, "--crop", "0,0,10,12", "--size", "5x6").exit_code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["shape"] == [5, 6, 3] and [s["source"] for s in m["skipped"]] == ["a.png"]


def test_options_are_checked(cli, image_folder, tmp_path):
    from logitify_cli.cli import FILTER_NAMES, RESIZE_MODE_NAMES, main
    from logitify_cli.conventions import CONVENTIONS
    from logitify_cli.transform import NOISES

    assert sorted(FILTER_NAMES) == sorted(FILTERS) and tuple(RESIZE_MODE_NAMES) == RESIZE_MODES
    # Choices --help lists without importing what holds them: the same names.
    choices = {p.name: tuple(p.type.choices) for p in main.commands["encode"].params if hasattr(p.type, "choices")}
    assert choices["alpha_convention"] == CONVENTIONS and choices["noise"] == NOISES
    src, _ = image_folder
    for bad in (["--filter", "box"], ["--resize-mode", "border"]):
        r = cli("encode", src, "-o", tmp_path / "o", *bad)
        assert r.exit_code == 2 and "without --size" in r.stderr
    for crop in ("1,2,3", "a,b,c,d", "-1,0,4,4", "0,0,0,4"):
        r = cli("encode", src, "-o", tmp_path / "o", "--crop", crop)
        assert r.exit_code == 2 and "--crop" in r.stderr
    r = cli("encode", src, "-o", tmp_path / "o", "--size", "8x8", "--filter", "cubic")
    assert r.exit_code == 2
    with pytest.raises(ValueError):
        Geometry(size=(4, 4), filter="cubic")
    with pytest.raises(ValueError):
        Geometry(size=(4, 4), resize_mode="fit")


def test_resume_with_other_geometry_is_refused(cli, image_folder, tmp_path, monkeypatch):
    from logitify_cli.formats.npz import NpzShardWriter

    src, _ = image_folder
    real = fail_third_shard(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "o"
    base = ["encode", src, "-o", out, "--shard-size", "3", "--size", "12x12", "--resize-mode", "center-crop"]
    assert cli(*base, "--filter", "box").exit_code == 130
    monkeypatch.setattr(NpzShardWriter, "_finish", real)
    r = cli(*base, "--filter", "lanczos", "--resume")
    assert r.exit_code == 1 and "filter" in r.stderr and "box" in r.stderr
    r = cli("encode", src, "-o", out, "--shard-size", "3", "--size", "12x12", "--filter", "box", "--resume")
    assert r.exit_code == 1 and "resize_mode" in r.stderr
    r = cli(*base, "--filter", "box", "--crop", "0,0,10,10", "--resume")
    assert r.exit_code == 1 and "crop" in r.stderr
    r = cli(*base, "--filter", "box", "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_shards"] >= 2


def test_info_and_verify_know_the_geometry(cli, image_folder, tmp_path):
    src, _ = image_folder
    out = tmp_path / "o"
    assert cli("encode", src, "-o", out, "--size", "16x16", "--resize-mode", "border", "--filter", "lanczos",
               "--crop", "1,2,20,28").exit_code == 0
    r = cli("info", out)
    assert r.exit_code == 0
    assert "geometry     crop 28x20 at top 1, left 2, then resized to 16x16 (border, filter lanczos)" in r.stdout
    info = json.loads(cli("info", out, "--json").stdout)
    assert info["geometry"] == {"size": [16, 16], "resize_mode": "border", "crop": [1, 2, 20, 28], "filter": "lanczos"}
    assert cli("verify", out, "--against", src, "-q").exit_code == 0
    # verify reads the sources with the manifest's geometry: another filter gives other pixels
    path = out / "manifest.json"
    m = json.loads(path.read_text())
    m["source"]["filter"] = "nearest"
    path.write_text(json.dumps(m))
    r = cli("verify", out, "--against", src)
    assert r.exit_code == 1 and "differs from its source" in r.stderr
    # and a manifest naming a geometry this tool does not know is refused
    m["source"]["filter"] = "cubic"
    path.write_text(json.dumps(m))
    r = cli("info", out)
    assert r.exit_code == 1 and "filter" in r.stderr


def test_border_pads_with_zeros_in_every_channel(tmp_path, rng):
    path = save(str(tmp_path / "wide.png"), np.full((10, 40, 4), 200, np.uint8))
    got = read_image(path, 4, Geometry(size=(20, 20), resize_mode="border", filter="box"))
    assert got.shape == (20, 20, 4)
    assert (got[:7] == 0).all() and (got[12:] == 0).all() and (got[7:12] == 200).all()


def test_center_crop_window_of_a_one_pixel_image(tmp_path):
    """The window is at least one pixel wide: a 1x1 image becomes the target, all of its one value."""
    path = save(str(tmp_path / "dot.png"), np.full((1, 1, 3), 77, np.uint8))
    got = read_image(path, 3, Geometry(size=(30, 2), resize_mode="center-crop", filter="lanczos"))
    assert got.shape == (30, 2, 3) and (got == 77).all()


def test_a_real_photo_in_every_mode_and_filter(tmp_path):
    """A photograph this project did not make (matplotlib's Grace Hopper JPEG, 512x600), and turned copies."""
    cbook = pytest.importorskip("matplotlib.cbook")
    photo_path = str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    paths = [photo_path]
    with Image.open(photo_path) as img:
        for orientation in (6, 3):
            exif = Image.Exif()
            exif[0x0112] = orientation
            paths.append(str(tmp_path / f"turned{orientation}.jpg"))
            img.save(paths[-1], quality=92, exif=exif.tobytes())
    for path in paths:
        for size, crop in (((64, 64), None), ((32, 80), None), ((100, 30), (40, 15, 400, 300)), ((7, 1), None),
                           ((600, 512), None), ((333, 250), (0, 0, 600, 500))):
            for mode in RESIZE_MODES:
                for filt in FILTERS:
                    geometry = Geometry(size=size, resize_mode=mode, crop=crop, filter=filt)
                    want = reference(path, 3, size, mode, crop, filt)
                    if want is None:  # the turned photo is 600 wide, 512 high: the window does not fit
                        with pytest.raises(ImageReadError, match="too small"):
                            read_image(path, 3, geometry)
                        continue
                    np.testing.assert_array_equal(read_image(path, 3, geometry), want,
                                                  err_msg=f"{path} {size} {crop} {mode} {filt}")


def test_readme_picture_is_there():
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "docs/resize-modes.png" in readme
    with Image.open(os.path.join(root, "docs", "resize-modes.png")) as img:
        assert img.format == "PNG"
