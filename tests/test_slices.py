"""Reading back in slices: info, verify and the loaders give the same results whatever the slice size."""
import json
import os
import pickle
import tempfile

import numpy as np
import pytest
from hypothesis import given, strategies as st

import logitify_cli as lg
from logitify_cli import fingerprint
from logitify_cli import info as info_mod
from logitify_cli import verify as verify_mod
from logitify_cli.formats import base
from logitify_cli.errors import LogitifyError
from logitify_cli.sources import Item, ItemList


def tiny_slices(monkeypatch):
    """One example per slice, wherever a reader or a command picks its slice size; keys and digests on disk."""
    monkeypatch.setattr(base, "CHUNK_BYTES", 1)
    monkeypatch.setattr(verify_mod.KeyedDigests, "HELD", 2)
    monkeypatch.setattr(fingerprint.KeySet, "RUN", 3)
    monkeypatch.setattr(fingerprint.DigestSet, "HELD", 64)
    monkeypatch.setattr(verify_mod, "VERIFY_SLICE_BYTES", 1)
    monkeypatch.setattr(info_mod, "BLOCK_VALUES", 1 << 16)  # the least it may be: one summing run
    monkeypatch.setattr(info_mod, "SAMPLER_DRAWS", 7)


def _json(cli, *args):
    r = cli(*args, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    out.pop("seconds", None)
    return out


@pytest.mark.parametrize("fmt", ["npz", "tfrecord"])
def test_info_and_verify_do_not_depend_on_the_slice_size(cli, image_folder, tmp_path, monkeypatch, fmt):
    src, _ = image_folder
    out = tmp_path / fmt
    assert cli("encode", src, "-o", out, "--shard-size", "5", "-f", fmt).exit_code == 0
    # So many values that the histogram keeps a sample, not all of them.
    monkeypatch.setattr(info_mod, "HIST_VALUES", 5000)
    default = (_json(cli, "info", out), _json(cli, "verify", out, "--against", src),
               info_mod.gather(str(out), want_samples=True))
    tiny_slices(monkeypatch)
    tiny = (_json(cli, "info", out), _json(cli, "verify", out, "--against", src),
            info_mod.gather(str(out), want_samples=True))
    assert default[0] == tiny[0]  # every statistic, bit for bit
    assert default[1] == tiny[1] and default[1]["ok"] and default[1]["fingerprint"]["pixels_sha256"]
    (_, _, samples_a, hist_a, ld_a), (_, _, samples_b, hist_b, ld_b) = default[2], tiny[2]
    assert 0 < len(hist_a) < 13 * 24 * 32 * 3
    np.testing.assert_array_equal(hist_a, hist_b)
    np.testing.assert_array_equal(ld_a, ld_b)
    assert samples_a.keys() == samples_b.keys()
    for lab in samples_a:
        assert [k for k, _ in samples_a[lab]] == [k for k, _ in samples_b[lab]]


def test_verify_names_the_same_problems_with_its_sets_on_disk(cli, dataset, monkeypatch, rng):
    import shutil

    from conftest import photo, save

    src, _, out = dataset
    os.remove(src / "cats" / "cat_02.png")
    os.remove(src / "dogs" / "dog_04.png")
    save(str(src / "dogs" / "dog_99.png"), photo(rng, 24, 32))
    runs = []
    for tiny in (False, True):
        if tiny:
            tiny_slices(monkeypatch)
        before = set(os.listdir(tempfile.gettempdir()))
        r = cli("verify", out, "--against", src, "--json")
        assert r.exit_code == 1
        assert set(os.listdir(tempfile.gettempdir())) <= before  # nothing left behind
        runs.append(json.loads(r.stdout))
        runs[-1].pop("seconds")
    assert runs[0] == runs[1]
    named = [(p["where"], p["problem"]) for p in runs[0]["problems"]]
    assert named == [("dogs/dog_99.png", "in the sources but not in the dataset"),
                     ("cats/cat_02.png", "in the dataset but not found in the sources"),
                     ("dogs/dog_04.png", "in the dataset but not found in the sources")]
    shutil.rmtree(src)


def test_info_statistics_against_float64(cli, dataset):
    _, _, out = dataset
    s = _json(cli, "info", out)
    d = lg.LogitDataset(str(out))
    logits = np.concatenate([a["logits"].reshape(-1) for _, a in d.iter_shards()]).astype(np.float64)
    assert s["logits"]["mean"] == pytest.approx(logits.mean(), rel=1e-12)
    assert s["logits"]["std"] == pytest.approx(logits.std(), rel=1e-9)
    assert (s["logits"]["min"], s["logits"]["max"]) == (logits.min(), logits.max())


@given(st.lists(st.floats(-40, 40, width=32), min_size=0, max_size=300),
       st.lists(st.integers(0, 300), max_size=6), st.sampled_from([np.nan, np.inf, None]))
def test_running_statistics_ignore_where_slices_end(values, cuts, odd):
    a = np.array(values, np.float32)
    if odd is not None and a.size:
        a[:: 7] = odd
    old = info_mod._Running.SUM_RUN
    info_mod._Running.SUM_RUN = 16  # so short a run that the carried-over part is tested
    try:
        whole, parts = info_mod._Running(), info_mod._Running()
        whole.add(a)
        for piece in np.split(a, sorted(min(c, a.size) for c in cuts)):
            parts.add(piece)
        ra, rb = whole.result(), parts.result()
    finally:
        info_mod._Running.SUM_RUN = old
    assert ra == rb
    finite = a[np.isfinite(a)].astype(np.float64)
    assert ra["count"] == finite.size
    if finite.size:
        assert ra["mean"] == pytest.approx(finite.mean(), rel=1e-12, abs=1e-12)
        assert (ra["min"], ra["max"]) == (finite.min(), finite.max())


@given(st.integers(1, 5000), st.lists(st.integers(1, 400), min_size=1, max_size=30), st.floats(0.01, 0.9))
def test_sampler_takes_the_same_places_whatever_the_slices(total, sizes, rate):
    values = np.arange(total, dtype=np.float32)
    a = info_mod._Sampler(rate, 3).take(values)
    s, taken, at = info_mod._Sampler(rate, 3), [], 0
    while at < total:
        n = sizes[len(taken) % len(sizes)]
        taken.append(s.take(values[at:at + n]))
        at += n
    np.testing.assert_array_equal(a, np.concatenate(taken))
    assert np.all(np.diff(a) > 0)  # places in order, each once


def test_iter_numpy_hands_over_slices_of_fixed_rows(dataset):
    _, _, out = dataset
    d = lg.LogitDataset(str(out))
    whole = [a for _, a in d.iter_shards()]
    for rows in (1, 2, 3, 5, 100):
        got = list(lg.iter_numpy(str(out), rows=rows))
        want = [min(rows, sh.num_examples - a) for sh in d.shards for a in range(0, sh.num_examples, rows)]
        assert [len(g["keys"]) for g in got] == want
        for k in ("logits", "logdet", "keys", "labels"):
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), np.concatenate([w[k] for w in whole]))
            assert all(g[k].dtype == whole[0][k].dtype for g in got)
    assert [len(g["keys"]) for g in lg.iter_numpy(str(out), rows=np.int64(3))] == [
        min(3, sh.num_examples - a) for sh in d.shards for a in range(0, sh.num_examples, 3)]
    for bad in (0, -1, 2.5, True, "3"):  # refused, where -1 once gave one row at a time and 0 the default
        with pytest.raises(LogitifyError, match="rows must be a positive integer"):
            next(lg.iter_numpy(str(out), rows=bad))


def test_iter_numpy_rows_do_not_follow_the_reader(dataset, monkeypatch):
    _, _, out = dataset
    default = list(lg.iter_numpy(str(out), rows=4))
    monkeypatch.setattr(base, "CHUNK_BYTES", 1)  # the reader hands over one example at a time
    tiny = list(lg.iter_numpy(str(out), rows=4))
    assert [len(a["keys"]) for a in default] == [len(a["keys"]) for a in tiny] == [4, 1, 4, 1, 3]
    for a, b in zip(default, tiny):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_a_shards_inputs_are_packed_and_pickle_at_their_own_size():
    items = [Item(f"c{i % 3}/{i:05d}.png", f"c{i % 3}/{i:05d}.png", "/data/", -1, i % 3, f"c{i % 3}", True)
             for i in range(3000)]
    items.sort(key=lambda it: it.name)
    packed = ItemList(items)
    for a, b in ((0, 3000), (10, 20), (2990, 3005), (5, 5)):
        part = packed.part(a, b)
        assert list(part) == items[a:b]
        assert part[0:len(part)] == items[a:b]
    small = pickle.dumps(packed.part(100, 110))
    assert len(small) < len(pickle.dumps(packed)) / 20
