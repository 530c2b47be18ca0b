"""The maths against a float64 NumPy reference: logits, log-dets, inverse, noise."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import photo
from logitify_cli.transform import LogitTransform, TransformParams, image_seeds, inverse_numpy

_cache = {}


def transform(params, shape):
    key = (params, shape)
    if key not in _cache:
        _cache[key] = LogitTransform(params, shape)
    return _cache[key]


def run(params, images, keys):
    t = transform(params, images.shape[1:])
    y, ld = t.forward(images, image_seeds(params.seed, keys))
    return y, ld, t


SHAPES = [(8, 8, 1), (7, 5, 3), (16, 16, 3), (5, 9, 4)]
alphas = st.sampled_from([1e-6, 1e-4, 0.01, 0.05, 0.3, 0.5, 0.9, 0.99]) | st.floats(1e-6, 0.99)
lossless_c = st.sampled_from([1.0, 0.5, 0.25, 0.01]) | st.floats(0.01, 1.0)


@st.composite
def batches(draw):
    shape = draw(st.sampled_from(SHAPES))
    n = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["random", "photo", "extremes"]))
    if kind == "random":
        imgs = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    elif kind == "photo":
        imgs = np.stack([photo(rng, *shape) for _ in range(n)])
    else:
        imgs = rng.choice(np.array([0, 1, 127, 128, 254, 255], np.uint8), (n,) + shape)
    keys = [f"img/{seed}_{i}.png" for i in range(n)]
    return imgs, keys


@settings(max_examples=40)
@given(batch=batches(), alpha=alphas, c=lossless_c, noise=st.sampled_from(["uniform", "none"]),
       bits=st.sampled_from([8, 8, 5, 3, 1]), seed=st.integers(0, 2**40))
def test_lossless_round_trip_and_reference(batch, alpha, c, noise, bits, seed):
    imgs, keys = batch
    p = TransformParams(alpha=alpha, corruption_level=c, noise=noise, bits=bits, seed=seed)
    y, ld, t = run(p, imgs, keys)
    assert y.dtype == np.float32 and np.isfinite(y).all() and np.isfinite(ld).all()
    for i, key in enumerate(keys):
        y64, ld64 = ref.forward(imgs[i], key, alpha=alpha, c=c, noise_kind=noise, bits=bits, seed=seed)
        # Same point of the dequantized space: compare where the logits say x~ is.
        lc = p.denominator
        xt_ours = (1 / (1 + np.exp(-y[i].astype(np.float64))) - alpha / 2) / (1 - alpha) * lc
        xt_ref = (1 / (1 + np.exp(-y64)) - alpha / 2) / (1 - alpha) * lc
        assert np.max(np.abs(xt_ours - xt_ref)) < 5e-5
        np.testing.assert_allclose(y[i], y64, rtol=1e-5, atol=1e-5 * max(1e-3, 1 - alpha))
        # The log-det is TFGENZOO's, from the logits, in float64.
        assert math.isclose(ld[i], ref.logdet_from_logits(y[i], alpha), rel_tol=1e-5, abs_tol=1e-3)
        assert math.isclose(ld[i], ld64, rel_tol=1e-5, abs_tol=1e-3)
        # TFGENZOO's inverse on our logits: the same levels, minus our log-det.
        x, ildj = ref.tfgenzoo_inverse(y[i], alpha)
        assert math.isclose(ildj, -float(ld[i]), rel_tol=1e-5, abs_tol=1e-3)
    levels = ref.levels(imgs, bits)
    # The float64 reference inverse gives every level back ...
    assert np.array_equal(ref.inverse_levels(y, alpha=alpha, c=c, bits=bits), levels)
    # ... and so does ours, shifted back to 8 bits.
    back = t.inverse(y)
    assert back.dtype == np.uint8
    assert np.array_equal(back, (levels.astype(np.uint8) << (8 - bits)))
    # The NumPy twin used by decode on the CPU gives the same bytes.
    assert inverse_numpy(p, y).tobytes() == back.tobytes()


@settings(max_examples=25)
@given(batch=batches(), alpha=alphas, c=st.floats(1e-3, 50.0), noise=st.sampled_from(["uniform", "gaussian", "none"]),
       bits=st.integers(1, 8))
def test_never_nan_or_inf(batch, alpha, c, noise, bits):
    imgs, keys = batch
    p = TransformParams(alpha=alpha, corruption_level=c, noise=noise, bits=bits)
    y, ld, t = run(p, imgs, keys)
    assert np.isfinite(y).all() and np.isfinite(ld).all()
    back = t.inverse(y)
    assert back.max() <= 255 and ((back >> (8 - bits)) < 2**bits).all()
    assert inverse_numpy(p, y).tobytes() == back.tobytes()


def test_gaussian_is_lossy_but_near(rng):
    imgs = np.stack([photo(rng, 16, 16) for _ in range(4)])
    keys = [f"g{i}" for i in range(4)]
    p = TransformParams(noise="gaussian", corruption_level=0.3)
    y, ld, t = run(p, imgs, keys)
    for i in range(4):
        y64, _ = ref.forward(imgs[i], keys[i], noise_kind="gaussian", c=0.3)
        np.testing.assert_allclose(y[i], y64, rtol=1e-5, atol=1e-5)
    back = t.inverse(y).astype(int)
    diff = np.abs(back - imgs.astype(int))
    assert diff.max() <= 3 and (diff == 0).mean() > 0.85


def test_noise_does_not_depend_on_batching_or_order(rng):
    imgs = np.stack([photo(rng, 13, 11) for _ in range(9)])  # 429 values: not a multiple of any packet
    keys = [f"dir/{i}.png" for i in range(9)]
    p = TransformParams(seed=7)
    y_all, ld_all, _ = run(p, imgs, keys)
    order = rng.permutation(9)
    y_perm, ld_perm, _ = run(p, imgs[order], [keys[i] for i in order])
    assert y_perm.tobytes() == y_all[order].tobytes() and ld_perm.tobytes() == ld_all[order].tobytes()
    for i in range(9):
        y1, ld1, _ = run(p, imgs[i:i + 1], keys[i:i + 1])
        assert y1.tobytes() == y_all[i:i + 1].tobytes() and ld1.tobytes() == ld_all[i:i + 1].tobytes()


@pytest.mark.parametrize("shape", [(13, 11, 3), (32, 32, 3), (5, 7, 1)])
def test_compiled_batch_size_does_not_change_bytes(rng, shape):
    imgs = np.stack([photo(rng, *shape) for _ in range(10)])
    keys = [f"k{i}" for i in range(10)]
    p = TransformParams(seed=3, alpha=0.3)
    seeds = image_seeds(3, keys)
    outs = [LogitTransform(p, shape, batch_size=bs).forward(imgs, seeds) for bs in (1, 3, 7, 256)]
    for y, ld in outs[1:]:
        assert y.tobytes() == outs[0][0].tobytes() and ld.tobytes() == outs[0][1].tobytes()
    # The shard writer takes TensorFlow's buffers as they are (copy=False): the same values.
    for bs in (3, 256):
        y, ld = LogitTransform(p, shape, batch_size=bs).forward(imgs, seeds, copy=False)
        assert y.tobytes() == outs[0][0].tobytes() and ld.tobytes() == outs[0][1].tobytes()
    backs = [LogitTransform(p, shape, batch_size=bs).inverse(outs[0][0]) for bs in (1, 4, 256)]
    for b in backs:
        np.testing.assert_array_equal(b, imgs)


def test_a_batch_of_large_images_is_bounded_by_bytes(rng, monkeypatch):
    """Batches are padded to full size: for large images the batch shrinks so its pixels fit the bound."""
    import logitify_cli.transform as transform_mod

    shape = (8, 8, 3)
    monkeypatch.setattr(transform_mod, "BATCH_PIXEL_BYTES", 4 * 8 * 8 * 3 + 5)
    t = LogitTransform(TransformParams(seed=1), shape, batch_size=256)
    assert 1 <= t.batch_size and t.batch_size * t.dims <= transform_mod.BATCH_PIXEL_BYTES
    monkeypatch.setattr(transform_mod, "BATCH_PIXEL_BYTES", 1)  # less than one image: still one at a time
    assert LogitTransform(TransformParams(seed=1), shape, batch_size=256).batch_size == 1
    monkeypatch.undo()
    imgs = np.stack([photo(rng, *shape) for _ in range(10)])
    seeds = image_seeds(1, [f"k{i}" for i in range(10)])
    y, ld = t.forward(imgs, seeds)
    y_big, ld_big = LogitTransform(TransformParams(seed=1), shape, batch_size=256).forward(imgs, seeds)
    assert y.tobytes() == y_big.tobytes() and ld.tobytes() == ld_big.tobytes()


def test_traced_once_whatever_the_batch_sizes(rng):
    # Every batch is padded to the compiled size: one trace, one XLA program.
    t = LogitTransform(TransformParams(), (6, 5, 3), batch_size=8)
    for n in (1, 8, 3, 17, 8, 30):
        imgs = np.stack([photo(rng, 6, 5) for _ in range(n)])
        y, _ = t.forward(imgs, image_seeds(0, [str(i) for i in range(n)]))
        t.inverse(y)
    assert t._forward.experimental_get_tracing_count() == 1
    assert t._inverse.experimental_get_tracing_count() == 1


def test_seed_and_key_change_the_noise(rng):
    img = photo(rng, 16, 16)[None]
    y0, _, _ = run(TransformParams(seed=0), img, ["a.png"])
    y1, _, _ = run(TransformParams(seed=1), img, ["a.png"])
    y2, _, _ = run(TransformParams(seed=0), img, ["b.png"])
    y3, _, _ = run(TransformParams(seed=0), img, ["a.png"])
    assert not np.array_equal(y0, y1) and not np.array_equal(y0, y2)
    assert y0.tobytes() == y3.tobytes()


def ks_uniform(samples):
    """Kolmogorov-Smirnov distance of samples from U[0, 1)."""
    s = np.sort(samples)
    n = s.size
    cdf_hi = np.arange(1, n + 1) / n
    cdf_lo = np.arange(0, n) / n
    return max(np.max(cdf_hi - s), np.max(s - cdf_lo))


@pytest.mark.parametrize("c", [1.0, 0.5])
def test_noise_is_uniform_per_pixel(c):
    """The fractional part of x~ (in units of c) is U[0,1): KS test, and by bins."""
    img = np.full((1, 256, 256, 3), 100, np.uint8)
    y, _, _ = run(TransformParams(corruption_level=c, alpha=0.05), img, ["flat.png"])
    p = 1 / (1 + np.exp(-y.astype(np.float64)))
    xt = (p - 0.025) / 0.95 * (255 + c)
    e = (xt - 100) / c
    assert e.min() >= 0 and e.max() < 1
    n = e.size
    assert ks_uniform(e.ravel()) < 1.36 / math.sqrt(n) * 1.5  # well inside the 5% band
    counts = np.histogram(e, bins=64, range=(0, 1))[0]
    chi2 = np.sum((counts - n / 64) ** 2 / (n / 64))
    assert chi2 < 120  # 63 degrees of freedom: p ~ 1e-5 beyond this
    # Neighbouring pixels are not correlated.
    flat = e.ravel()
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.01


@pytest.mark.parametrize("kwargs", [
    {"alpha": 0}, {"alpha": 1}, {"alpha": 1.5}, {"alpha": -0.1}, {"corruption_level": 0},
    {"corruption_level": -1}, {"corruption_level": float("inf")}, {"bits": 0}, {"bits": 9},
    {"noise": "laplace"}, {"seed": 1.5},
])
def test_invalid_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        TransformParams(**kwargs)


def test_bpd_offset_and_inverse_log_det(rng):
    p = TransformParams(alpha=0.05, corruption_level=0.5, bits=5)
    assert math.isclose(p.bpd_offset_nats(3072), 3072 * math.log((31.5) / 0.5))
    imgs = np.stack([photo(rng, 8, 8) for _ in range(3)])
    y, ld, t = run(p, imgs, ["a", "b", "c"])
    fldj = np.asarray(t.forward_log_det_jacobian(y))
    ildj = np.asarray(t.inverse_log_det_jacobian(y))
    np.testing.assert_allclose(fldj, ld, rtol=1e-5)
    np.testing.assert_array_equal(ildj, -fldj)


@given(st.integers(1, 5), st.integers(1, 3000), st.floats(1e-6, 0.5),
       st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from([np.nan, np.inf, -np.inf])), max_size=3),
       st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_the_float64_log_det_is_the_references_and_leaves_non_finite_examples_out(n, dims, alpha, bad, seed):
    """verify's reference log-det (blocks of LOG_DET_BLOCK values) against the tests' own formula."""
    from logitify_cli import transform
    from reference import logdet_from_logits

    r = np.random.default_rng(seed)
    y = (r.standard_normal((n, dims)) * r.choice([0.1, 3.0, 40.0])).astype(np.float32)
    for at, value in bad:
        y.flat[at % y.size] = value
    stored_finite = r.random(n) < 0.9
    old = transform.LOG_DET_BLOCK
    transform.LOG_DET_BLOCK = int(r.integers(1, 5000))  # blocks across and within examples
    try:
        finite, ref = transform.forward_log_det_numpy(y, alpha, stored_finite)
    finally:
        transform.LOG_DET_BLOCK = old
    ok = np.isfinite(y).all(axis=1)
    np.testing.assert_array_equal(finite, ok & stored_finite)
    for i in np.flatnonzero(ok):
        assert math.isclose(ref[i], logdet_from_logits(y[i], alpha), rel_tol=1e-12, abs_tol=1e-9)


@pytest.mark.parametrize("alpha,c,bits", [(1e-8, 1.0, 8), (1e-9, 100.0, 8), (1e-7, 1e-6, 1), (3e-8, 1e6, 4)])
def test_gaussian_noise_at_tiny_alpha_stays_finite(alpha, c, bits):
    """Where 1-alpha rounds to 1 in float32, an optimizer's refolding lost alpha's share and gave Q = 0."""
    from logitify_cli.transform import LogitTransform

    params = TransformParams(alpha=alpha, corruption_level=c, noise="gaussian", bits=bits)
    images = np.stack([np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8),
                       (np.arange(768) % 256).astype(np.uint8).reshape(16, 16, 3)])
    y, logdet = LogitTransform(params, (16, 16, 3)).forward(images, image_seeds(0, ["a", "b", "c"]))
    assert np.isfinite(y).all() and np.isfinite(logdet).all()


@pytest.mark.parametrize("kw", [{"alpha": 1e-40}, {"corruption_level": 1e-40}, {"corruption_level": 3.5e38}])
def test_parameters_float32_cannot_carry_are_refused_for_a_new_encode(kw):
    params = TransformParams(**kw)  # a manifest with them, from before the bounds, still reads
    with pytest.raises(ValueError):
        params.check_float32()


@pytest.mark.parametrize("kw", [{"corruption_level": float("nan")}, {"corruption_level": float("inf")}])
def test_parameters_that_are_no_numbers_are_refused(kw):
    with pytest.raises(ValueError):
        TransformParams(**kw)
