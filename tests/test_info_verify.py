"""info and verify through the CLI; hostile datasets; JSON on stdout only."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import photo, save


def test_info_text_and_json(cli, dataset):
    src, truth, out = dataset
    r = cli("info", out)
    assert r.exit_code == 0
    assert "examples     13" in r.stdout and "cats: 7, dogs: 6" in r.stdout and "alpha 0.05" in r.stdout
    r = cli("info", out, "--json")
    s = json.loads(r.stdout)
    assert s["num_examples"] == 13 and s["class_counts"] == {"cats": 7, "dogs": 6}
    parts = [np.load(out / sh["file"], allow_pickle=False) for sh in s["shards"]]
    logits = np.concatenate([p["logits"] for p in parts]).astype(np.float64)
    logdet = np.concatenate([p["logdet"] for p in parts]).astype(np.float64)
    assert s["logits"]["min"] == pytest.approx(logits.min()) and s["logits"]["max"] == pytest.approx(logits.max())
    assert s["logits"]["mean"] == pytest.approx(logits.mean()) and s["logits"]["std"] == pytest.approx(logits.std(), rel=1e-6)
    assert s["logdet"]["mean"] == pytest.approx(logdet.mean()) and s["logdet"]["std"] == pytest.approx(logdet.std(), rel=1e-6)
    assert s["bpd_offset_nats"] == pytest.approx(24 * 32 * 3 * np.log(256))


def test_info_plot_is_a_real_picture(cli, dataset, tmp_path):
    _, _, out = dataset
    r = cli("info", out, "--plot", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    img = Image.open(tmp_path / "p.png")
    assert img.format == "PNG" and img.size[0] >= 800 and img.size[1] >= 500
    arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 20  # not a blank canvas
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 500  # decoded photos are in it


def test_missing_dataset_is_a_clear_error(cli, tmp_path):
    for cmd in (["info"], ["verify"], ["decode", "-o", tmp_path / "x"]):
        r = cli(cmd[0], tmp_path / "nothing", *cmd[1:])
        assert r.exit_code == 1 and "no such dataset" in r.stderr and "Traceback" not in r.output


def test_verify_good_and_against_sources(cli, dataset):
    src, truth, out = dataset
    r = cli("verify", out, "--against", src, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["ok"] and s["num_examples"] == 13 and s["compared_with_sources"] == 13
    assert s["sources_found"] == 13 and s["lossless"]
    r = cli("verify", out, "--against", src)
    assert r.exit_code == 0 and "13 examples in 3 shard(s) verified, 13 equal to their sources bit for bit" in r.stderr


@pytest.mark.parametrize("lossy", [["--noise", "gaussian"], ["--corruption-level", "2"]])
def test_verify_against_sources_of_a_lossy_dataset_claims_no_equality(cli, image_folder, tmp_path, lossy):
    """Decoded images of a lossy dataset are not its pixels: the summary says what was checked, and no more."""
    src, _ = image_folder
    out = tmp_path / "lossy"
    assert cli("encode", src, "-o", out, "--shard-size", "5", *lossy).exit_code == 0
    r = cli("verify", out, "--against", src)
    assert r.exit_code == 0, r.output
    assert "bit for bit" not in r.stderr and "equal" not in r.stderr
    assert "13 sources found with matching shapes" in r.stderr and "lossy" in r.stderr
    s = json.loads(cli("verify", out, "--against", src, "--json").stdout)
    assert s["ok"] and s["compared_with_sources"] == 0 and s["sources_found"] == 13 and not s["lossless"]


def test_verify_against_a_missing_path_names_it(cli, dataset, tmp_path):
    """A source path that names nothing is one error, as encode gives it, not every key missing from the sources."""
    src, truth, out = dataset
    missing = tmp_path / "nowhere"
    for sources in ([missing], [src, missing]):
        r = cli("verify", out, "--against", *sources)
        assert r.exit_code == 2, r.output
        assert r.stderr == f"logitify: error: no such file or directory: {missing}\n"
        assert r.stderr == cli("encode", *sources, "-o", tmp_path / "o").stderr
    r = cli("verify", out, "--against", missing, "--json")
    assert r.exit_code == 2 and json.loads(r.stdout) == {"ok": False, "error": f"no such file or directory: {missing}"}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_verify_against_names_a_source_it_cannot_read_as_encode_does(cli, dataset, tmp_path):
    """A FIFO named as the source (or one in the source folder) is named with its reason, never waited on."""
    src, truth, out = dataset
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    said = "logitify: skipped pipe: not a regular file (a named pipe)\n"
    r = cli("verify", out, "--against", fifo)
    assert r.exit_code == 1 and r.stderr.startswith(said), r.stderr
    assert cli("encode", fifo, "-o", tmp_path / "o").stderr.startswith(said)
    os.mkfifo(src / "late.png")
    r = cli("verify", out, "--against", src)
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("logitify: skipped late.png: not a regular file (a named pipe)\n"), r.stderr


def test_verify_catches_a_changed_source(cli, dataset, rng):
    src, truth, out = dataset
    save(str(src / "cats" / "cat_03.png"), photo(rng, 24, 32))
    r = cli("verify", out, "--against", src)
    assert r.exit_code == 1 and "cats/cat_03.png" in r.stderr


def test_verify_refuses_a_resized_source_from_its_header(cli, dataset, rng, monkeypatch):
    """A source now of another size is named with both shapes, and its pixels are never decoded."""
    from logitify_cli import images

    src, truth, out = dataset
    save(str(src / "dogs" / "dog_02.png"), photo(rng, 240, 320))
    decoded = []
    real = images._convert
    monkeypatch.setattr(images, "_convert", lambda img, *rest: decoded.append(img.size) or real(img, *rest))
    r = cli("verify", out, "--against", src)
    assert r.exit_code == 1
    assert "dogs/dog_02.png: the source gives shape [240, 320, 3], the dataset [24, 32, 3]" in r.stderr, r.stderr
    assert (320, 240) not in decoded and len(decoded) == 12


def _rewrite_shard(out, index, arrays, fix_hash=True):
    m = json.loads((out / "manifest.json").read_text())
    path = out / m["shards"][index]["file"]
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    if fix_hash:
        m["shards"][index]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (out / "manifest.json").write_text(json.dumps(m))
    return m["shards"][index]["file"]


def test_verify_catches_flipped_bytes_and_missing_shards(cli, dataset):
    _, _, out = dataset
    m = json.loads((out / "manifest.json").read_text())
    f0, f2 = m["shards"][0]["file"], m["shards"][2]["file"]
    data = bytearray((out / f0).read_bytes())
    data[len(data) // 2] ^= 0x40
    (out / f0).write_bytes(bytes(data))
    os.unlink(out / f2)
    r = cli("verify", out, "--json")
    assert r.exit_code == 1
    s = json.loads(r.stdout)
    where = {p["where"] for p in s["problems"]}
    assert where == {f0, f2}
    assert f0 in r.stderr and f2 in r.stderr
    r = cli("decode", out, "-o", out.parent / "back")
    assert r.exit_code == 1 and f0 in r.stderr


def test_verify_catches_wrong_logdet_and_nonfinite(cli, dataset):
    _, _, out = dataset
    m = json.loads((out / "manifest.json").read_text())
    z = dict(np.load(out / m["shards"][1]["file"], allow_pickle=False))
    z["logdet"] = z["logdet"].copy()
    z["logdet"][0] += 50
    z["logits"] = z["logits"].copy()
    z["logits"][1, 0, 0, 0] = np.nan
    _rewrite_shard(out, 1, z)
    r = cli("verify", out)
    assert r.exit_code == 1
    assert str(z["keys"][0]) in r.stderr and "log-det" in r.stderr
    assert str(z["keys"][1]) in r.stderr and "finite" in r.stderr


def test_verify_catches_labels_that_name_no_class(cli, dataset):
    """Two classes: -1 (no label), 0 and 1 are labels; 99 and -5 are problems, one line per shard."""
    _, _, out = dataset
    m = json.loads((out / "manifest.json").read_text())
    names = []
    for index, bad in ((0, [99, -5, 99]), (2, [2]), (1, [-1])):
        z = dict(np.load(out / m["shards"][index]["file"], allow_pickle=False))
        z["labels"] = z["labels"].copy()
        z["labels"][:len(bad)] = bad
        names.append(_rewrite_shard(out, index, z))
    r = cli("verify", out, "--json")
    assert r.exit_code == 1, r.output
    s = json.loads(r.stdout)
    assert s["num_problems"] == 2 and [p["where"] for p in s["problems"]] == names[:2]
    assert f"{names[0]}: 3 label(s) name none of the 2 classes (0 to 1, or -1 for none): -5, 99" in r.stderr
    assert f"{names[1]}: 1 label(s) name none of the 2 classes (0 to 1, or -1 for none): 2" in r.stderr
    assert names[2] not in r.stderr


def test_verify_leaves_labels_of_a_dataset_without_classes_alone(cli, tmp_path, rng):
    """Without classes a label is the records' own number, whatever it is."""
    for i in range(3):
        save(str(tmp_path / "flat" / f"{i}.png"), photo(rng, 8, 8))
    out = tmp_path / "ds"
    assert cli("encode", tmp_path / "flat", "-o", out).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["classes"] is None
    z = dict(np.load(out / json.loads((out / "manifest.json").read_text())["shards"][0]["file"]))
    z["labels"] = np.array([99, -5, 7], np.int64)
    _rewrite_shard(out, 0, z)
    r = cli("verify", out)
    assert r.exit_code == 0, r.output


def test_pickled_shard_is_refused(cli, dataset):
    _, _, out = dataset
    m = json.loads((out / "manifest.json").read_text())
    z = dict(np.load(out / m["shards"][0]["file"], allow_pickle=False))
    z["keys"] = np.array([object()] * len(z["keys"]), dtype=object)
    name = _rewrite_shard(out, 0, z)
    for cmd in (["verify", out], ["info", out], ["decode", out, "-o", out.parent / "b"]):
        r = cli(*cmd)
        assert r.exit_code == 1 and name in r.stderr and "Traceback" not in r.output


@pytest.mark.parametrize("edit,words", [
    (lambda m: "{not json", "not JSON"),
    (lambda m: json.dumps({**m, "num_examples": 999}), "num_examples"),
    (lambda m: json.dumps({**m, "shape": [24, 32]}), "shape"),
    (lambda m: json.dumps({**m, "shape": [24, 32, 7]}), "channels"),
    (lambda m: json.dumps({**m, "shape": [1 << 20, 1, 3]}), "2^20 or more"),
    (lambda m: json.dumps({**m, "shape": [0, 32, 3]}), "positive"),
    (lambda m: json.dumps({**m, "shards": [{**m["shards"][0], "file": "../../etc/passwd"}] + m["shards"][1:]}), "outside"),
    (lambda m: json.dumps({**m, "transform": {**m["transform"], "alpha": 3}}), "alpha"),
    (lambda m: json.dumps([1, 2]), "JSON object"),
])
def test_lying_manifests_are_refused(cli, dataset, edit, words):
    _, _, out = dataset
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(edit(m))
    for cmd in ("verify", "info"):
        r = cli(cmd, out)
        assert r.exit_code == 1 and words in r.stderr and "Traceback" not in r.output


def test_manifest_lying_about_shape_of_shard(cli, dataset):
    _, _, out = dataset
    m = json.loads((out / "manifest.json").read_text())
    m["shape"] = [32, 24, 3]
    (out / "manifest.json").write_text(json.dumps(m))
    r = cli("verify", out)
    assert r.exit_code == 1 and "expected float32 [n, 32, 24, 3]" in r.stderr


def test_verify_against_reads_source_paths_from_stdin(cli, dataset):
    """As encode does: '-' stands for the paths listed on stdin."""
    src, truth, ds = dataset
    listed = "\n".join(str(src / k) for k in sorted(truth))
    r = cli("verify", ds, "--against", "-", input=listed + "\n")
    assert r.exit_code == 0, r.stderr


def test_verify_against_one_split_of_a_holdout_dataset(cli, image_folder, tmp_path, rng):
    """The other split's share of the sources is not missing from the dataset; a source in no split still is."""
    from conftest import photo, save

    src, _ = image_folder
    for i in range(4):  # unreadable inputs, skipped by whichever split they fall to: not missing from the other
        (src / "cats" / f"broken{i}.png").write_bytes(b"not an image")
    ds = tmp_path / "held"
    assert cli("encode", src, "-o", ds, "--holdout", "0.3:test").exit_code == 0
    m = json.loads((ds / "manifest.json").read_text())
    assert all(m["splits"][split]["skipped"] for split in ("train", "test"))  # each split skipped one or more
    for split in ("train", "test"):
        r = cli("verify", ds, "--split", split, "--against", src)
        assert r.exit_code == 0, r.stderr
    save(str(src / "cats" / "zz_new.png"), photo(rng, 24, 32))
    r = cli("verify", ds, "--split", "test", "--against", src)
    assert r.exit_code == 1 and "cats/zz_new.png: in the sources but not in the dataset" in r.stderr
    assert r.stderr.count("in the sources but not in the dataset") == 1


def test_verify_against_refuses_a_listed_source_that_names_nothing(cli, dataset):
    _, _, ds = dataset
    r = cli("verify", ds, "--against", "-", input="nosuch\n")
    assert r.exit_code == 2 and "no such file or directory: nosuch" in r.stderr


def test_verify_against_names_only_a_keys_own_unreadable_source(cli, tmp_path, rng):
    """File names may hold ':': 'a:1.png' gone is not blamed on 'a:2.png', a FIFO now, which is named alone."""
    src = tmp_path / "src"
    for name in ("a:1.png", "a:2.png", "p.png"):
        save(str(src / name), photo(rng, 8, 8))
    out = tmp_path / "ds"
    assert cli("encode", src, "-o", out).exit_code == 0
    os.remove(src / "a:1.png")
    os.remove(src / "a:2.png")
    os.mkfifo(src / "a:2.png")
    r = cli("verify", out, "--against", src)
    assert r.exit_code == 1
    lines = {line.split(": ", 2)[1]: line.split(": ", 2)[2] for line in r.stderr.splitlines()
             if line.startswith("logitify: a:")}
    assert lines == {"a:1.png": "in the dataset but not found in the sources",
                     "a:2.png": "in the dataset, but its source cannot be read now: not a regular file (a named pipe)"}, \
        r.stderr
