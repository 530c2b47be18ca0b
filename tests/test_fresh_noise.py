"""Fresh noise from stored shards: epoch 0 is the shards, other epochs are honest redraws.

Values are checked against the float64 NumPy reference (tests/reference.py)
and an independent re-statement of the re-keying built from its fmix32.
"""
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import logitify_cli as lg
import reference as ref
from conftest import photo, save
from logitify_cli.errors import LogitifyError
from logitify_cli.noise import fresh_dataset
from logitify_cli.transform import (DRAW_DOMAIN, EPOCH_DOMAIN, LogitTransform, TransformParams, image_seeds,
                                    rekey_seeds_numpy, rekey_seeds_tf)

SHAPE = (16, 12, 3)
N = 40
# Two parameter sets: the defaults, and a low-bit, narrow-interval, large-alpha one.
PARAMS = {
    "default": [],
    "odd": ["--alpha", "0.3", "--corruption-level", "0.5", "--bits", "5", "--seed", "11"],
}


def encode(src, out, *args):
    from logitify_cli.cli import main

    r = CliRunner().invoke(main, ["encode", str(src), "-o", str(out), "-q", "--overwrite", *map(str, args)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return str(out)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh") / "images"
    rng = np.random.default_rng(99)
    for i in range(N):
        save(str(root / f"c{i % 3}" / f"im_{i:02d}.png"), photo(rng, *SHAPE[:2]))
    return root


@pytest.fixture(scope="module")
def datasets(images, tmp_path_factory):
    """{(format, params name): path}, each in several shards."""
    out = {}
    base = tmp_path_factory.mktemp("encoded")
    for fmt in ("npz", "tfrecord"):
        for name, args in PARAMS.items():
            out[fmt, name] = encode(images, base / f"{fmt}-{name}", "-f", fmt, "--shard-size", 9, *args)
    return out


def by_key(ds):
    """{key: (logits, logdet[, label])} from a dataset built with_keys (key third)."""
    out = {}
    for row in ds:
        row = [x.numpy() for x in row]
        key = row[2].decode()
        assert key not in out
        out[key] = (row[0], row[1]) + tuple(row[3:])
    return out


def stored(path):
    return {k: v for shard in lg.iter_numpy(path) for k, v in
            zip(shard["keys"], zip(shard["logits"], shard["logdet"], shard["labels"]))}


def fresh(path, **kw):
    return by_key(lg.load(path, noise="fresh", with_keys=True, **kw))


# -- re-keying: an independent statement from the reference's fmix32 ---------------------------

def ref_rekey(words, n, domain):
    """The re-keyed seed words, re-stated in uint64 arithmetic with the reference's fmix32."""
    f = ref.fmix32
    mask = 0xFFFFFFFF
    s0, s1 = (np.uint64(w) for w in words)
    m = f(np.array([(n * 0x9E3779B9 + domain) & mask], np.uint64))
    m2 = f((m + 0x6A09E667) & mask)
    return np.array([f(s0 ^ m)[0], f(s1 ^ m2)[0]], np.uint64)


def ref_forward_words(img, words, p):
    """reference.forward with explicit seed words (instead of the key's)."""
    L, c, a = p.levels, p.corruption_level, p.alpha
    k = ref.levels(img, p.bits).reshape(-1)
    idx = np.arange(k.size, dtype=np.uint64)
    h = ref.fmix32((idx * 0x9E3779B9 + words[0]) & 0xFFFFFFFF)
    u = (ref.fmix32(h ^ words[1]) >> 8).astype(np.float64) * 2.0 ** -24
    delta = min(ref.GUARD / c, 0.25)
    xt = k + c * (delta + (1 - 2 * delta) * u)
    pp = xt / (L - 1 + c) * (1 - a) + a / 2
    y = np.log(pp) - np.log1p(-pp)
    return y.reshape(img.shape), ref.logdet_from_logits(y, a)


@settings(max_examples=60)
@given(words=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=2), n=st.integers(0, 2**32 - 1),
       domain=st.sampled_from([EPOCH_DOMAIN, DRAW_DOMAIN]))
def test_rekeying_twins_agree_with_the_restatement(words, n, domain):
    from logitify_cli._tf import tf as _tf

    s = np.array([words], np.uint32)
    got = rekey_seeds_numpy(s, n, domain)
    assert np.array_equal(got, rekey_seeds_tf(_tf(), s, np.array([n]), domain).numpy())
    if domain == EPOCH_DOMAIN and n == 0:
        assert np.array_equal(got, s)  # epoch 0 is the stored draw
    else:
        assert np.array_equal(got[0].astype(np.uint64), ref_rekey(words, n, domain))


# -- epoch 0 is the shards ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["npz", "tfrecord"])
@pytest.mark.parametrize("name", list(PARAMS))
def test_epoch_zero_is_the_stored_shards_bit_for_bit(datasets, fmt, name):
    path = datasets[fmt, name]
    want = stored(path)
    got = by_key(lg.load(path, noise="fresh", epoch=0, with_keys=True, with_labels=True))
    assert sorted(got) == sorted(want)
    for key, (y, ld, label) in got.items():
        assert y.tobytes() == want[key][0].tobytes()
        assert ld.tobytes() == want[key][1].tobytes()
        assert label == want[key][2]


# -- later epochs: new noise, same levels, honest log-dets --------------------------------------

def x_tilde(y, p):
    """x~ in float64 from logits, through tanh(y/2) = p - q."""
    lc = p.denominator
    return 0.5 * lc + np.tanh(0.5 * np.asarray(y, np.float64)) * lc / (2 * (1 - p.alpha))


def ks_uniform(u):
    s = np.sort(u)
    n = s.size
    return max(np.max(np.arange(1, n + 1) / n - s), np.max(s - np.arange(n) / n))


@pytest.mark.parametrize("fmt", ["npz", "tfrecord"])
@pytest.mark.parametrize("name", list(PARAMS))
def test_epochs_one_and_two_are_new_noise_on_the_same_levels(datasets, fmt, name):
    path = datasets[fmt, name]
    p = lg.LogitDataset(path).params
    want = stored(path)
    epochs = [fresh(path, epoch=e) for e in (1, 2)]
    us = []
    for key, (y0, ld0, _) in want.items():
        levels = ref.inverse_levels(y0, alpha=p.alpha, c=p.corruption_level, bits=p.bits)
        img = (levels.astype(np.uint8) << (8 - p.bits))
        for e, ep in zip((1, 2), epochs):
            y, ld = ep[key]
            # new noise: almost every value moves
            assert np.mean(y != y0) > 0.99
            # the same levels, by the float64 reference inverse and by the package's
            assert np.array_equal(ref.inverse_levels(y, alpha=p.alpha, c=p.corruption_level, bits=p.bits), levels)
            assert np.array_equal(lg.LogitDataset(path).inverse(y[None])[0], img)
            # the noise sits inside each level's interval
            u = (x_tilde(y, p) - levels) / p.corruption_level
            assert u.min() >= 0.0 and u.max() < 1.0
            us.append(u.ravel())
            # the log-det is the float64 one of these logits
            assert math.isclose(ld, ref.logdet_from_logits(y, p.alpha), rel_tol=1e-5, abs_tol=1e-3)
            # and the values are the reference's, with the epoch's re-keyed words
            words = ref_rekey(ref.seeds_of(p.seed, key), e, EPOCH_DOMAIN)
            y64, ld64 = ref_forward_words(img, words, p)
            np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)
            assert math.isclose(ld, ld64, rel_tol=1e-5, abs_tol=1e-3)
        assert np.mean(epochs[0][key][0] != epochs[1][key][0]) > 0.99
    u = np.concatenate(us)
    n = u.size  # 2 epochs x 40 images x 576 values
    assert ks_uniform(u) < 1.36 / math.sqrt(n) * 1.5
    counts = np.histogram(u, bins=32, range=(0, 1))[0]
    assert np.sum((counts - n / 32) ** 2 / (n / 32)) < 80  # 31 degrees of freedom


def test_same_epoch_whatever_the_batching_order_or_reader(datasets):
    path = datasets["npz", "odd"]
    want = fresh(path, epoch=3)
    ds = lg.LogitDataset(path)
    variants = {
        "batch 1": by_key(fresh_dataset(ds, epoch=3, with_keys=True, batch_size=1)),
        "batch 7": by_key(fresh_dataset(ds, epoch=3, with_keys=True, batch_size=7)),
        "user batches, shuffled": by_key(lg.load(path, noise="fresh", epoch=3, with_keys=True)
                                         .shuffle(64, seed=5).batch(6).unbatch()),
        "shards reversed": by_key(fresh_dataset(ds, epoch=3, with_keys=True,
                                                shards=list(range(len(ds.shards)))[::-1])),
    }
    n = len(ds.shards)
    assert n >= 4
    halves = [fresh(path, epoch=3, shards=[s.file for s in ds.shards[i::2]]) for i in (0, 1)]
    assert not set(halves[0]) & set(halves[1])
    variants["two readers"] = {**halves[0], **halves[1]}
    # NumPy's integers are integers: np.array_split is how hosts share shards out.
    parts = [fresh(path, epoch=np.int64(3), shards=part) for part in np.array_split(np.arange(n), 2)]
    variants["two readers, by NumPy"] = {**parts[0], **parts[1]}
    for name, got in variants.items():
        assert sorted(got) == sorted(want), name
        for key in want:
            assert got[key][0].tobytes() == want[key][0].tobytes(), name
            assert got[key][1].tobytes() == want[key][1].tobytes(), name


@pytest.mark.parametrize("fmt", ["npz", "tfrecord"])
def test_epochs_in_a_row_and_a_restart(datasets, fmt):
    path = datasets[fmt, "default"]
    run = [(y.numpy().tobytes(), ld.numpy().tobytes(), k.numpy()) for y, ld, k in
           lg.load(path, noise="fresh", epochs=3, with_keys=True)]
    assert len(run) == 3 * N
    singles = []
    for e in range(3):
        singles += [(y.numpy().tobytes(), ld.numpy().tobytes(), k.numpy()) for y, ld, k in
                    lg.load(path, noise="fresh", epoch=e, with_keys=True)]
    assert run == singles
    resumed = [(y.numpy().tobytes(), ld.numpy().tobytes(), k.numpy()) for y, ld, k in
               lg.load(path, noise="fresh", epoch=1, epochs=2, with_keys=True)]
    assert resumed == run[N:]


# -- evaluation draws ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["npz", "tfrecord"])
def test_draws_are_distinct_exact_and_apart_from_training(datasets, fmt):
    path = datasets[fmt, "odd"]
    p = lg.LogitDataset(path).params
    k = 3
    got = by_key(lg.load(path, noise="fresh", draws=k, with_keys=True, with_labels=True))
    want = stored(path)
    training = [want] + [fresh(path, epoch=e) for e in (1, 2)]
    assert sorted(got) == sorted(want)
    for key, (ys, lds, label) in got.items():
        assert ys.shape == (k,) + SHAPE and lds.shape == (k,) and label == want[key][2]
        levels = ref.inverse_levels(want[key][0], alpha=p.alpha, c=p.corruption_level, bits=p.bits)
        for d in range(k):
            assert np.array_equal(ref.inverse_levels(ys[d], alpha=p.alpha, c=p.corruption_level, bits=p.bits),
                                  levels)
            assert math.isclose(lds[d], ref.logdet_from_logits(ys[d], p.alpha), rel_tol=1e-5, abs_tol=1e-3)
            for other in range(d):
                assert np.mean(ys[d] != ys[other]) > 0.99
            for t in training:
                assert np.mean(ys[d] != t[key][0]) > 0.99
    # a draw is a function of (seed, key, draw index) alone: fewer draws give the first ones
    two = by_key(lg.load(path, noise="fresh", draws=2, with_keys=True))
    for key in got:
        assert two[key][0].tobytes() == got[key][0][:2].tobytes()


# -- bits per dimension -------------------------------------------------------------------------

def uniform_model_log_prob(y, p):
    """log p(y) of the uniform density on the union of level cells [k, k+c)^D, pushed to logit space.

    In x~ the density is (L c)^-D on its support. x~ = (L-1+c) * (sigmoid(y) - a/2) / (1-a), so
    dx~/dy = (L-1+c) sigmoid(y) sigmoid(-y) / (1-a) per value, and
    log p(y) = -D log(L c) + sum log(dx~/dy).
    With logdet = sum log(dy/dz) and z = x~/(L-1+c), this is
    log p(y) = bpd_offset_nats - D log L - logdet, so bits/dim = log2 L = bits.
    """
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    dims = y.shape[1]
    L, c, a = p.levels, p.corruption_level, p.alpha
    xt = (L - 1 + c) * (1 / (1 + np.exp(-y)) - a / 2) / (1 - a)
    frac = xt - np.floor(xt)
    assert ((frac < c) & (xt >= 0) & (xt < L - 1 + c)).all()  # on the support
    log_jac = np.log(L - 1 + c) - np.logaddexp(0, y) - np.logaddexp(0, -y) - np.log1p(-a)
    return -dims * math.log(L * c) + log_jac.sum(axis=1)


@settings(max_examples=15)
@given(bits=st.integers(1, 8), c=st.sampled_from([1.0, 0.5, 0.1]), alpha=st.sampled_from([1e-4, 0.05, 0.5]),
       seed=st.integers(0, 2**31))
def test_uniform_model_on_uniform_levels_gives_bits_per_dim(bits, c, alpha, seed):
    p = TransformParams(alpha=alpha, corruption_level=c, bits=bits, seed=seed)
    shape = (4, 4, 3)
    rng = np.random.default_rng(seed)
    imgs = (rng.integers(0, 2**bits, (6,) + shape) << (8 - bits)).astype(np.uint8)
    y, ld = LogitTransform(p, shape).forward(imgs, image_seeds(seed, [str(i) for i in range(6)]))
    manifest = SimpleNamespace(dims=48, params=p)
    log_p = uniform_model_log_prob(y, p)
    bpd = lg.bits_per_dim(log_p, ld, manifest)
    np.testing.assert_allclose(bpd, bits, rtol=0, atol=1e-5)
    # K = 1: the importance-weighted bound is the plain one
    np.testing.assert_allclose(lg.iw_bits_per_dim(log_p[:, None], ld[:, None], manifest), bpd, rtol=0, atol=1e-12)


def test_bits_per_dim_helpers_in_tensorflow_and_from_a_path(datasets):
    from logitify_cli._tf import tf as _tf

    tf = _tf()
    path = datasets["npz", "default"]
    m = lg.LogitDataset(path).manifest
    rng = np.random.default_rng(0)
    log_p = rng.normal(-3000, 50, (5, 4))
    ld = rng.normal(2000, 30, (5, 4)).astype(np.float32)
    dims, off = m.dims, m.logdet["bpd_offset_nats"]
    # by hand
    hand = -(log_p + ld.astype(np.float64) - off) / (dims * math.log(2))
    np.testing.assert_allclose(lg.bits_per_dim(log_p, ld, path), hand, rtol=1e-12)
    np.testing.assert_allclose(lg.bits_per_dim(tf.constant(log_p), tf.constant(ld), m).numpy(), hand, rtol=1e-12)
    t = log_p + ld.astype(np.float64)
    iw_hand = -(np.log(np.mean(np.exp(t - t.max(1, keepdims=True)), axis=1)) + t.max(1) - off) / (dims * math.log(2))
    np.testing.assert_allclose(lg.iw_bits_per_dim(log_p, ld, m), iw_hand, rtol=1e-12)
    np.testing.assert_allclose(lg.iw_bits_per_dim(tf.constant(log_p), tf.constant(ld), m).numpy(), iw_hand,
                               rtol=1e-12)
    # the bound tightens with draws: never above the mean of the single-draw values
    assert (lg.iw_bits_per_dim(log_p, ld, m) <= hand.mean(axis=1) + 1e-12).all()


# -- refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, why", [
    (["--noise", "gaussian"], "gaussian"),
    (["--corruption-level", "1.5"], "above 1"),
    (["--noise", "none"], "no noise to redraw"),
])
def test_datasets_that_cannot_give_levels_back_are_refused(images, tmp_path, args, why):
    path = encode(images, tmp_path / "out", *args)
    with pytest.raises(LogitifyError, match=why):
        lg.load(path, noise="fresh", epoch=1)
    with pytest.raises(LogitifyError, match=why):
        lg.load(path, noise="fresh", draws=2)


def test_bad_arguments_are_refused(datasets):
    path = datasets["npz", "default"]
    for kw in ({"epoch": 1}, {"draws": 2}, {"epochs": 2}):
        with pytest.raises(LogitifyError, match="noise='fresh'"):
            lg.load(path, **kw)
    for kw in ({"epoch": -1}, {"epoch": 1.5}, {"epoch": True}, {"epochs": 0}, {"draws": 0}, {"draws": 2, "epoch": 1},
               {"shards": ["nope.npz"]}):
        with pytest.raises(LogitifyError):
            lg.load(path, noise="fresh", **kw)
    n = len(lg.LogitDataset(path).shards)
    with pytest.raises(LogitifyError, match=f"no shard {n} in this split \\(its shards are 0 to {n - 1}\\)"):
        lg.load(path, noise="fresh", shards=[n])
    with pytest.raises(LogitifyError, match="shards must be a list of shard indices or file names"):
        lg.load(path, noise="fresh", shards=1.5)
    one = lg.LogitDataset(path).shards[0]
    by_index, by_name = (fresh(path, epoch=1, shards=s) for s in (np.int64(0), one.file))  # one shard, as itself
    assert len(by_index) == one.num_examples and sorted(by_index) == sorted(by_name)
    with pytest.raises(LogitifyError, match="stored"):
        lg.load(path, noise="new")
    assert os.path.isdir(path)
