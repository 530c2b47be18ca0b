"""--preset: each standard set's pixels as its project's code makes them, written again here with Pillow and NumPy."""
import json
import os

import numpy as np
from PIL import Image

from conftest import photo, save
from logitify_cli.presets import PRESETS


def decoded(cli, out, back, *args):
    """{file name without extension: uint8 HWC} decoded from a dataset folder."""
    r = cli("decode", out, "-o", back, "--workers", "1", "-q", *args)
    assert r.exit_code == 0, r.output
    got = {}
    for root, _, files in os.walk(back):
        for f in files:
            arr = np.asarray(Image.open(os.path.join(root, f)))
            got[os.path.splitext(f)[0]] = arr if arr.ndim == 3 else arr[:, :, None]
    return got


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def photos(folder, rng, sizes):
    """Photo-like files of many sizes and aspect ratios, in the modes and formats photo sets hold.

    One JPEG carries an EXIF orientation: the recipes' own scripts never
    turn images by it, and neither does a preset.
    """
    kinds = ["RGB jpeg", "L jpeg", "turned jpeg", "RGBA png", "P png", "RGB png", "CMYK jpeg"]
    paths = []
    for i, (h, w) in enumerate(sizes):
        kind = kinds[i % len(kinds)]
        img = Image.fromarray(photo(rng, h, w, 3))
        if kind.startswith("L"):
            img = img.convert("L")
        elif kind.startswith("RGBA"):
            img = Image.fromarray(photo(rng, h, w, 4), "RGBA")
        elif kind.startswith("P"):
            img = img.quantize(64)
        elif kind.startswith("CMYK"):
            img = img.convert("CMYK")
        path = os.path.join(folder, f"p{i:02d}.{'png' if kind.endswith('png') else 'jpg'}")
        if kind == "turned jpeg":
            exif = Image.Exif()
            exif[0x0112] = 6
            img.save(path, quality=90, exif=exif)
        else:
            img.save(path, **({"quality": 90} if path.endswith(".jpg") else {}))
        paths.append(path)
    return paths


def test_imagenet64_is_pillow_box_of_the_whole_image(cli, tmp_path, rng):
    """Chrabaszcz et al.'s recipe: Image.open(f).convert('RGB').resize((64, 64), Image.BOX), nothing else."""
    src = tmp_path / "src"
    src.mkdir()
    sizes = [(150, 200), (200, 133), (64, 64), (40, 90), (217, 131), (97, 256), (1, 80), (133, 200)]
    paths = photos(str(src), rng, sizes)
    out = tmp_path / "out"
    r = cli("encode", src, "-o", out, "--preset", "imagenet64", "--workers", "1", "--shard-size", "3")
    assert r.exit_code == 0, r.output
    assert "overrides" not in r.stderr
    assert "1,281,167" in r.stderr and "holds 8" in r.stderr  # the published train split is larger
    got = decoded(cli, out, tmp_path / "back")
    for p in paths:
        want = np.asarray(Image.open(p).convert("RGB").resize((64, 64), Image.BOX))
        np.testing.assert_array_equal(got[os.path.splitext(os.path.basename(p))[0]], want, err_msg=p)
    m = manifest(out)
    assert m["shape"] == [64, 64, 3] and m["transform"]["bits"] == 8
    assert m["source"]["filter"] == "box" and m["source"]["crop"] is None and m["source"]["exif_orientation"] is False
    assert m["preset"]["name"] == "imagenet64" and m["preset"]["deviations"] == []
    assert "Imagenet32_Scripts" in " ".join(m["preset"]["sources"].values())
    assert cli("verify", out, "--against", src, "-q").exit_code == 0


def test_celeba64_is_realnvps_window_then_a_64x64_resize(cli, tmp_path, rng):
    """RealNVP's image[40:188, 15:163, :] of the 218x178 aligned image, then 64x64 (Pillow's bilinear)."""
    src = tmp_path / "src"
    arrays = {f"{i:06d}": photo(rng, 218, 178) for i in range(3)}
    for k, a in arrays.items():
        save(str(src / f"{k}.png"), a)
    save(str(src / "small.png"), photo(rng, 150, 178))  # too short for the window: skipped with its reason
    out = tmp_path / "out"
    r = cli("encode", src, "-o", out, "--preset", "celeba64", "--split", "test", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert "19,962" in r.stderr
    got = decoded(cli, out, tmp_path / "back")
    for k, a in arrays.items():
        window = a[40:188, 15:163, :]  # as RealNVP slices it
        want = np.asarray(Image.fromarray(window).resize((64, 64), Image.BILINEAR))
        np.testing.assert_array_equal(got[k], want)
    m = manifest(out)
    assert m["source"]["crop"] == [40, 15, 148, 148] and m["source"]["filter"] == "bilinear"
    assert [s["source"] for s in m["skipped"]] == ["small.png"]
    assert "not" in m["preset"]["exact"].lower() and "TensorFlow" in m["preset"]["exact"]


def test_celebahq256_keeps_glows_5_bits_and_info_shows_the_recipe(cli, tmp_path, rng):
    src = tmp_path / "src"
    a = photo(rng, 256, 256)
    save(str(src / "im0.png"), a)
    out = tmp_path / "out"
    r = cli("encode", src, "-o", out, "--preset", "celebahq256", "--split", "validation", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert "overrides" not in r.stderr and "3,000" in r.stderr
    got = decoded(cli, out, tmp_path / "back")
    np.testing.assert_array_equal(got["im0"], (a // 8) * 8)  # Glow: floor(x / 2**(8 - n_bits_x)), shifted back
    m = manifest(out)
    assert m["transform"]["bits"] == 5 and m["preset"]["recipe"]["bits"] == 5 and m["preset"]["deviations"] == []
    r = cli("info", out)
    assert r.exit_code == 0
    assert "preset       celebahq256" in r.output and "openai/glow: README.md" in r.output
    assert "deviation  none" in r.output
    info = json.loads(cli("info", out, "--json").output)
    assert info["preset"]["name"] == "celebahq256" and info["preset"]["split_sizes"]["validation"] == 3000


def test_cifar10_takes_32x32_images_as_they_are(cli, tmp_path, rng, monkeypatch):
    src = tmp_path / "src"
    arrays = {f"c{i}": photo(rng, 32, 32) for i in range(3)}
    for k, a in arrays.items():
        save(str(src / "cat" / f"{k}.png"), a)
    out = tmp_path / "out"
    monkeypatch.setenv("LOGITIFY_BITS", "8")  # given, but equal to the recipe: no warning, no deviation
    r = cli("encode", src, "-o", out, "--preset", "cifar10", "--split", "test", "--channels", "3", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert "overrides" not in r.stderr
    assert "split test has 10,000 images as published, this dataset holds 3" in r.stderr
    got = decoded(cli, out, tmp_path / "back")
    for k, a in arrays.items():
        np.testing.assert_array_equal(got[k], a)
    m = manifest(out)
    assert m["preset"]["deviations"] == [] and m["source"]["size"] is None and m["shape"] == [32, 32, 3]

    # An option given that differs from the recipe wins, says so, and the manifest and info record it.
    out4 = tmp_path / "out4"
    r = cli("encode", src, "-o", out4, "--preset", "cifar10", "--bits", "4", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert "--bits 4 overrides preset cifar10's 8" in r.stderr
    m = manifest(out4)
    assert m["transform"]["bits"] == 4 and m["preset"]["deviations"] == [{"option": "bits", "preset": 8, "given": 4}]
    got = decoded(cli, out4, tmp_path / "back4")
    for k, a in arrays.items():
        np.testing.assert_array_equal(got[k], (a >> 4) << 4)
    r = cli("info", out4)
    assert "--bits 4 instead of the preset's 8" in r.output
    # --json carries what stderr said: a pipeline reading only the answer learns it is not CIFAR-10 as published.
    r = cli("encode", src, "-o", tmp_path / "out5", "--preset", "cifar10", "--bits", "4", "--workers", "1", "--json")
    assert r.exit_code == 0, r.output
    warnings = json.loads(r.stdout)["warnings"]
    assert [w for w in warnings if "--bits 4 overrides preset cifar10's 8" in w]
    assert [w for w in warnings if "split train has 50,000 images as published, this dataset holds 3" in w]
    assert all(w in r.stderr for w in warnings)


def test_cifar10_refuses_photos_before_writing_anything(cli, tmp_path, rng):
    src = tmp_path / "src"
    save(str(src / "a.jpg"), photo(rng, 480, 640))
    save(str(src / "b.png"), photo(rng, 32, 32))
    out = tmp_path / "out"
    r = cli("encode", src, "-o", out, "--preset", "cifar10", "--workers", "1")
    assert r.exit_code == 1
    assert "preset cifar10 takes 32x32 images" in r.stderr and "a.jpg is 640x480" in r.stderr
    assert not (out / "manifest.json").exists()
    # A 32x32 image first, a photo later: the run still stops, naming the photo.
    save(str(src / "0.png"), photo(rng, 32, 32))
    r = cli("encode", src, "-o", out, "--preset", "cifar10", "--workers", "1", "--overwrite")
    assert r.exit_code == 1 and "a.jpg is 640 wide and 480 high" in r.stderr
    assert not (out / "manifest.json").exists()
    # Resizing them anyway is an explicit choice the manifest records.
    r = cli("encode", src, "-o", out, "--preset", "cifar10", "--size", "32x32", "--workers", "1", "--overwrite")
    assert r.exit_code == 0, r.output
    assert "--size 32x32 overrides preset cifar10's none" in r.stderr
    m = manifest(out)
    assert m["preset"]["deviations"] == [{"option": "size", "preset": None, "given": [32, 32]}]
    assert m["preset"]["input_size"] is None


def test_every_preset_names_the_files_its_values_were_read_from():
    for p in PRESETS.values():
        assert p.sources and p.exact and p.split_sizes
        for where in p.sources.values():
            repo = where.split(":")[0]
            assert repo.startswith("CelebA") or repo.count("/") == 1, where
    assert any("van den Oord" in n for n in PRESETS["imagenet64"].notes)


def test_unknown_preset_is_a_usage_error(cli, image_folder, tmp_path):
    r = cli("encode", image_folder[0], "-o", tmp_path / "o", "--preset", "imagenet128")
    assert r.exit_code == 2 and "imagenet64" in r.stderr


def test_a_manifest_with_a_malformed_preset_is_refused(cli, image_folder, tmp_path):
    out = tmp_path / "out"
    assert cli("encode", image_folder[0], "-o", out, "-q").exit_code == 0
    m = manifest(out)
    for bad in ({"name": 3}, {"name": "x", "deviations": "none"}, "imagenet64"):
        (out / "manifest.json").write_text(json.dumps({**m, "preset": bad}))
        r = cli("info", out)
        assert r.exit_code == 1 and "preset" in r.stderr, bad


def test_a_preset_dataset_takes_a_test_split_and_warns_per_split(cli, tmp_path, rng):
    """A split added under the same preset keeps the recipe; one read with EXIF turning is another geometry."""
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir(), test.mkdir()
    photos(train, rng, [(40, 50), (33, 20), (64, 64)])
    photos(test, rng, [(50, 40), (20, 33)])
    out = tmp_path / "out"
    r = cli("encode", train, "-o", out, "--preset", "imagenet32", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert "split train has 1,281,167 images as published, this dataset holds 3" in r.output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = cli("encode", test, "-o", out, "--split", "validation", "--size", "32x32", "--filter", "box",
            "--workers", "1")
    assert r.exit_code == 1 and "exif_orientation" in r.output, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = cli("encode", test, "-o", out, "--split", "validation", "--preset", "imagenet32", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert "split validation has 50,000 images as published, this dataset holds 2" in r.output
    assert "split train" not in r.output  # only the splits this run made are counted again
    m = manifest(out)
    assert m["preset"]["name"] == "imagenet32" and set(m["splits"]) == {"train", "validation"}
    assert m["source"].get("exif_orientation") is False
    got = decoded(cli, out, tmp_path / "back", "--split", "validation")
    assert len(got) == 2
    for p in sorted(test.iterdir()):
        want = np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BOX))
        assert np.array_equal(got[p.stem], want), p.name


def test_jpeg_draft_is_never_part_of_a_preset(cli, tmp_path, rng):
    """A preset leaves --jpeg-draft off; asked for, it is a deviation the manifest names."""
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(photo(rng, 300, 200, 3)).save(src / "a.jpg", quality=90)
    r = cli("encode", src, "-o", tmp_path / "plain", "--preset", "imagenet32", "--workers", "1")
    assert r.exit_code == 0, r.output
    assert "jpeg_draft" not in manifest(tmp_path / "plain")["source"]
    r = cli("encode", src, "-o", tmp_path / "draft", "--preset", "imagenet32", "--jpeg-draft", "--workers", "1")
    assert r.exit_code == 0 and "--jpeg-draft gives other pixels" in r.output, r.output
    m = manifest(tmp_path / "draft")
    assert m["source"]["jpeg_draft"] is True
    assert {"option": "jpeg_draft", "preset": False, "given": True} in m["preset"]["deviations"]
