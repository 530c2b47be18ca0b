"""The pixel fingerprint: the same for the same pixels whatever the run, another for one other pixel."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import photo, save


def fingerprint_of(out):
    return json.loads((out / "manifest.json").read_text())["fingerprint"]


def by_hand(images: dict, bits: int = 8) -> dict:
    """The fingerprint as docs/format.md defines it, computed here from {key: uint8 HWC array}."""
    shift = 8 - bits
    lines = []
    for arr in images.values():
        arr = ((arr >> shift) << shift).astype(np.uint8)
        head = "x".join(map(str, arr.shape)) + "\n"
        lines.append(hashlib.sha256(head.encode() + arr.tobytes()).hexdigest() + "\n")
    keys = "".join(k + "\0" for k in sorted(images))
    return {"pixels_sha256": hashlib.sha256("".join(sorted(lines)).encode()).hexdigest(),
            "keys_sha256": hashlib.sha256(keys.encode("utf-8", "surrogatepass")).hexdigest()}


@pytest.fixture
def folder(tmp_path, rng):
    """Two class folders of 12x10 RGB PNGs, a grey one, and an unreadable file; returns (folder, {key: RGB array})."""
    root = tmp_path / "src"
    truth = {}
    for i in range(23):
        key = f"c{i % 2}/img_{i:02d}.png"
        arr = photo(rng, 12, 10)
        save(str(root / key), arr)
        truth[key] = arr
    grey = photo(rng, 12, 10, 1)
    save(str(root / "c1" / "zz_grey.png"), grey)  # (last: the first image sets 3 channels)
    truth["c1/zz_grey.png"] = np.repeat(grey, 3, axis=2)
    (root / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    return root, truth


def test_fingerprint_is_the_documented_hash(cli, folder, tmp_path):
    src, truth = folder
    out = tmp_path / "o"
    assert cli("encode", src, "-o", out, "--shard-size", "5").exit_code == 0
    assert fingerprint_of(out) == by_hand(truth)
    out5 = tmp_path / "o5"
    assert cli("encode", src, "-o", out5, "--bits", "5").exit_code == 0
    assert fingerprint_of(out5) == by_hand(truth, 5)
    assert fingerprint_of(out5)["pixels_sha256"] != fingerprint_of(out)["pixels_sha256"]
    # the decoded PNGs give it back: what decode returns is what was hashed
    assert cli("decode", out5, "-o", tmp_path / "back", "-q").exit_code == 0
    back = {k: np.asarray(Image.open(tmp_path / "back" / k)) for k in truth}
    assert by_hand(back) == fingerprint_of(out5)


def test_fingerprint_does_not_depend_on_the_run(cli, folder, tmp_path):
    """Batch size, workers, shard size, format, compression, seed, alpha, noise: one fingerprint."""
    src, truth = folder
    runs = {
        "base": [],
        "batch1-workers1": ["--batch-size", "1", "--workers", "1"],
        "batch7-workers2": ["--batch-size", "7", "--workers", "2", "--shard-size", "4"],
        "shard1": ["--shard-size", "1"],
        "tfrecord": ["-f", "tfrecord", "--shard-size", "6"],
        "tfrecord-gzip": ["-f", "tfrecord", "--compress"],
        "npz-deflate": ["--compress", "--shard-size", "9"],
        "other-transform": ["--seed", "3", "--alpha", "0.2", "--noise", "gaussian"],
    }
    prints = {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert cli("encode", src, "-o", out, *extra).exit_code == 0
        prints[name] = fingerprint_of(out)
    assert all(p == by_hand(truth) for p in prints.values()), prints


def test_fingerprint_local_equals_beam(cli, folder, tmp_path):
    pytest.importorskip("apache_beam")
    src, truth = folder
    beam = ["--runner", "beam", "--", "--runner=DirectRunner"]
    assert cli("encode", src, "-o", tmp_path / "local", "--shard-size", "4").exit_code == 0
    r = cli("encode", src, "-o", tmp_path / "beam", "--shard-size", "7", "-f", "tfrecord", *beam)
    assert r.exit_code == 0, r.output
    assert fingerprint_of(tmp_path / "beam") == fingerprint_of(tmp_path / "local") == by_hand(truth)
    assert not list((tmp_path / "beam").glob(".*receipt*"))


def test_digests_and_keys_gathered_on_disk_give_the_same_fingerprint(cli, folder, tmp_path, monkeypatch):
    """A run whose digests and keys spill to disk (two digests, three keys held) fingerprints as by hand, and leaves no files."""
    import tempfile

    from logitify_cli import fingerprint as fp_mod

    src, truth = folder
    monkeypatch.setattr(fp_mod.DigestSet, "HELD", 64)
    monkeypatch.setattr(fp_mod.KeySet, "RUN", 3)
    spills = []
    real = fp_mod.DigestSet._spill
    monkeypatch.setattr(fp_mod.DigestSet, "_spill", lambda self: spills.append(self._used) or real(self))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for extra in ([], ["--shard-size", "5", "--holdout", "0.3:test"]):
        out = tmp_path / f"o{len(extra)}"
        assert cli("encode", src, "-o", out, *extra).exit_code == 0
        if not extra:
            assert fingerprint_of(out) == by_hand(truth)
        else:
            m = json.loads((out / "manifest.json").read_text())
            seen = 0
            for split in ("train", "test"):
                keys = [str(k) for sh in m["splits"][split]["shards"]
                        for k in np.load(out / sh["file"], allow_pickle=False)["keys"]]
                assert m["splits"][split]["fingerprint"] == by_hand({k: truth[k] for k in keys})
                seen += len(keys)
            assert seen == len(truth)
    assert len(spills) >= 10 and list(scratch.iterdir()) == []
    r = cli("verify", tmp_path / "o0", "--against", src)
    assert r.exit_code == 0, r.output


def test_one_pixel_changes_it_and_names_do_not(cli, folder, tmp_path):
    src, truth = folder
    assert cli("encode", src, "-o", tmp_path / "a").exit_code == 0
    # the same images under other names: same pixels_sha256, other keys_sha256
    renamed = tmp_path / "renamed"
    os.makedirs(renamed)
    for i, key in enumerate(sorted(truth)):
        shutil.copy(src / key, renamed / f"x{i:03d}.png")
    assert cli("encode", renamed, "-o", tmp_path / "b").exit_code == 0
    a, b = fingerprint_of(tmp_path / "a"), fingerprint_of(tmp_path / "b")
    assert a["pixels_sha256"] == b["pixels_sha256"] and a["keys_sha256"] != b["keys_sha256"]
    # one value of one pixel of one image, by one level
    key = "c1/img_07.png"
    arr = truth[key].copy()
    arr[5, 3, 1] ^= 1
    save(str(src / key), arr)
    assert cli("encode", src, "-o", tmp_path / "c").exit_code == 0
    c = fingerprint_of(tmp_path / "c")
    assert c["pixels_sha256"] != a["pixels_sha256"] and c["keys_sha256"] == a["keys_sha256"]
    assert c == by_hand({**truth, key: arr})


def test_resumed_runs_keep_the_fingerprint(cli, folder, tmp_path, monkeypatch):
    from logitify_cli.formats.npz import NpzShardWriter
    from logitify_cli.manifest import JOURNAL

    src, truth = folder
    real = NpzShardWriter._finish

    def failing(self):
        if self.file.startswith("train-00002-"):
            raise KeyboardInterrupt
        return real(self)

    args = ["--shard-size", "4", "--workers", "1"]
    out = tmp_path / "o"
    monkeypatch.setattr(NpzShardWriter, "_finish", failing)
    assert cli("encode", src, "-o", out, *args).exit_code == 130
    monkeypatch.setattr(NpzShardWriter, "_finish", real)
    journal = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]
    kept = [e["shard"] for e in journal[1:]]
    assert kept and all(len(e["pixels"]) == e["num_examples"] for e in kept)
    r = cli("encode", src, "-o", out, *args, "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_shards"] >= 2
    assert fingerprint_of(out) == by_hand(truth)
    # a finished dataset resumed whole keeps its fingerprint
    r = cli("encode", src, "-o", out, *args, "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_shards"] == 7
    assert fingerprint_of(out) == by_hand(truth)
    # a journal without digests (an older run): its shards are made again, the fingerprint stays right
    monkeypatch.setattr(NpzShardWriter, "_finish", failing)
    assert cli("encode", src, "-o", tmp_path / "p", *args).exit_code == 130
    monkeypatch.setattr(NpzShardWriter, "_finish", real)
    lines = (tmp_path / "p" / JOURNAL).read_text().splitlines()
    stripped = [lines[0]] + [json.dumps({"shard": {k: v for k, v in json.loads(x)["shard"].items() if k != "pixels"}})
                             for x in lines[1:]]
    (tmp_path / "p" / JOURNAL).write_text("\n".join(stripped) + "\n")
    r = cli("encode", src, "-o", tmp_path / "p", *args, "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_shards"] == 0
    assert fingerprint_of(tmp_path / "p") == by_hand(truth)


def test_info_prints_it(cli, folder, tmp_path):
    src, truth = folder
    out = tmp_path / "o"
    assert cli("encode", src, "-o", out).exit_code == 0
    want = by_hand(truth)
    r = cli("info", out)
    assert f"fingerprint  pixels sha256 {want['pixels_sha256']}" in r.stdout
    assert f"keys sha256 {want['keys_sha256']}" in r.stdout
    assert json.loads(cli("info", out, "--json").stdout)["fingerprint"] == want
    # a manifest made before fingerprints: info says so, verify has nothing to compare
    m = json.loads((out / "manifest.json").read_text())
    del m["fingerprint"]
    (out / "manifest.json").write_text(json.dumps(m))
    assert "fingerprint  none" in cli("info", out).stdout
    assert json.loads(cli("info", out, "--json").stdout)["fingerprint"] is None
    assert cli("verify", out, "-q").exit_code == 0


def test_verify_recomputes_it(cli, folder, tmp_path):
    src, truth = folder
    out = tmp_path / "o"
    assert cli("encode", src, "-o", out, "--shard-size", "6").exit_code == 0
    want = by_hand(truth)
    r = cli("verify", out, "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["fingerprint"] == {**want, "sources_pixels_sha256": None}
    r = cli("verify", out, "--against", src, "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["fingerprint"] == {**want, "sources_pixels_sha256": want["pixels_sha256"]}
    # a manifest whose fingerprint is not its pixels' is caught
    m = json.loads((out / "manifest.json").read_text())
    m["fingerprint"]["pixels_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(m))
    r = cli("verify", out)
    assert r.exit_code == 1 and "fingerprint" in r.stderr and "pixels_sha256 of the decoded images" in r.stderr
    m["fingerprint"] = {**want, "keys_sha256": "1" * 64}
    (out / "manifest.json").write_text(json.dumps(m))
    r = cli("verify", out)
    assert r.exit_code == 1 and "keys_sha256" in r.stderr
    m["fingerprint"] = {"pixels_sha256": "abc"}
    (out / "manifest.json").write_text(json.dumps(m))
    r = cli("verify", out)
    assert r.exit_code == 1 and "not a valid logitify manifest: fingerprint" in r.stderr


def test_verify_against_sources_of_a_lossy_dataset(cli, folder, tmp_path):
    """Gaussian noise: decoded images are not the pixels, but the sources still give the fingerprint."""
    src, truth = folder
    out = tmp_path / "o"
    assert cli("encode", src, "-o", out, "--noise", "gaussian").exit_code == 0
    r = cli("verify", out, "--against", src, "--json")
    assert r.exit_code == 0, r.output
    fp = json.loads(r.stdout)["fingerprint"]
    assert fp["pixels_sha256"] is None and fp["sources_pixels_sha256"] == by_hand(truth)["pixels_sha256"]
    key = "c0/img_04.png"
    arr = truth[key].copy()
    arr[0, 0, 0] ^= 128
    save(str(src / key), arr)
    r = cli("verify", out, "--against", src)
    assert r.exit_code == 1 and "pixels_sha256 of the sources" in r.stderr


def test_the_reader_in_the_docs_recomputes_it(cli, folder, tmp_path):
    """docs/format.md's plain-Python reader gives the manifest's fingerprint from the logits, both formats."""
    import re

    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "docs", "format.md"), encoding="utf-8") as f:
        (block,) = re.findall(r"```python\n(# logitify_reader\.py\n.*?)```", f.read(), re.S)
    reader = {"__name__": "logitify_reader"}
    exec(compile(block, "docs/format.md", "exec"), reader)
    src, truth = folder
    for fmt in ("npz", "tfrecord"):
        out = tmp_path / fmt
        assert cli("encode", src, "-o", out, "-f", fmt, "--shard-size", "5", "--bits", "6").exit_code == 0
        manifest, shards = reader["read_dataset"](str(out))
        assert reader["fingerprint"](manifest, shards) == manifest["fingerprint"] == by_hand(truth, 6)


def _digest_lists():
    from hypothesis import strategies as st

    base = st.binary(min_size=32, max_size=32)
    # near neighbours: shared prefixes, trailing zero bytes, all-zero and all-0xff digests
    odd = st.tuples(base, st.integers(0, 31), st.sampled_from([0, 1, 255])).map(
        lambda t: t[0][:t[1]] + bytes([t[2]]) * (32 - t[1]))
    return st.lists(base | odd, max_size=60)



@settings(max_examples=200, deadline=None)
@given(digests=_digest_lists())
def test_pixels_sha256_is_sort_then_sha256sum_of_the_hex_lines(digests):
    """The fingerprint's pixel half, sorted in place as byte strings, equals `sort | sha256sum` of the hex lines."""
    from logitify_cli.fingerprint import pixels_sha256

    want = hashlib.sha256("".join(sorted(d.hex() + "\n" for d in digests)).encode()).hexdigest()
    joined = b"".join(digests)
    assert pixels_sha256(joined) == want
    assert pixels_sha256([joined[:32 * (len(digests) // 2)], bytearray(joined[32 * (len(digests) // 2):])]) == want
    assert joined == b"".join(digests)  # the caller's bytes are left as they were


@settings(max_examples=150, deadline=None)
@given(digests=_digest_lists(), held=st.integers(1, 7), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_digest_set_spills_to_the_same_hash(digests, held, cuts):
    """DigestSet, however small its buffer and however its input is cut, hashes as `sort | sha256sum` does."""
    from logitify_cli.fingerprint import DigestSet

    want = hashlib.sha256("".join(sorted(d.hex() + "\n" for d in digests)).encode()).hexdigest()
    joined = b"".join(digests)
    bounds = sorted({0, len(digests), *(min(c, len(digests)) for c in cuts)})
    ds = DigestSet()
    ds.HELD = 32 * held
    for a, b in zip(bounds, bounds[1:]):
        ds.add(joined[32 * a:32 * b])
    spilled = ds.spilled
    assert ds.count == len(digests)
    assert ds.sha256() == want
    assert not ds.spilled  # its file is closed once hashed
    assert spilled == (len(digests) >= held)


SPILL_CODE = """
import hashlib, os, sys
import numpy as np
from logitify_cli import verify
from logitify_cli.fingerprint import DigestSet, KeySet, keys_sha256

rng = np.random.default_rng(3)
digests = [bytes(d) for d in rng.integers(0, 256, (500, 32), dtype=np.uint8)]
keys = [f"k/{i:04d}-{'é' * (i % 3)}.png" for i in rng.permutation(700)]
ds, ks, kh, kd = DigestSet(), KeySet(), verify.KeyHashes(), verify.KeyedDigests()
ds.HELD, ks.RUN, kd.HELD = 32 * 40, 64, 50
verify.HASHES_HELD = 100
ds.add(b"".join(digests))
ks.add(keys)
for a in range(0, 700, 70):
    kh.add(keys[a:a + 70] + keys[:3])
kd.update((k, k.encode()) for k in keys)
assert ds.spilled and len(ks._files) > 5 and kh._spilled is not None and kd._db is not None
print(sorted(os.listdir(sys.argv[1])))  # while all four hold data on disk
want = hashlib.sha256("".join(sorted(d.hex() + "\\n" for d in digests)).encode()).hexdigest()
assert ds.sha256() == want
assert ks.sha256() == keys_sha256(keys)  # the same as in memory, merged from 11 runs
found, repeats = kh.repeated()
assert repeats == 30 and len(found) == 3
assert kd.pop(keys[5]) == keys[5].encode() and kd.pop(keys[5]) is None
assert list(kd.remaining()) == sorted(set(keys) - {keys[5]})
"""


def test_spilled_digests_keys_and_hashes_leave_no_file_behind(tmp_path):
    """What goes to disk has no name there, so a run killed holding it (SIGKILL) leaves nothing in TMPDIR."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp), SQLITE_TMPDIR=str(temp))
    r = subprocess.run([sys.executable, "-c", SPILL_CODE, str(temp)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]"]
    assert list(temp.iterdir()) == []
