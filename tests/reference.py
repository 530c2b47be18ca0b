"""A float64 NumPy reference of the transform, written independently of the package.

It re-derives the noise from its published construction (a keyed murmur3
finalizer over the pixel index) and applies the textbook formulas in float64.
"""
import hashlib
import math

import numpy as np

GUARD = 2.0 ** -13


def fmix32(h):
    h = h.astype(np.uint64) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def seeds_of(seed, key):
    d = hashlib.blake2b(str(seed).encode() + b"\0" + key.encode(), digest_size=8).digest()
    return np.frombuffer(d, "<u4").astype(np.uint64)


def uniforms(seed, key, dims):
    s0, s1 = seeds_of(seed, key)
    idx = np.arange(dims, dtype=np.uint64)
    h = fmix32((idx * 0x9E3779B9 + s0) & 0xFFFFFFFF)
    h1 = fmix32(h ^ s1)
    u1 = (h1 >> 8).astype(np.float64) * 2.0 ** -24
    h2 = fmix32((h1 + 0x6A09E667) & 0xFFFFFFFF)
    u2 = (h2 >> 8).astype(np.float64) * 2.0 ** -24
    return u1, u2


def noise(seed, key, dims, kind, c):
    u1, u2 = uniforms(seed, key, dims)
    if kind == "none":
        return np.full(dims, 0.5)
    if kind == "uniform":
        delta = min(GUARD / c, 0.25)
        return delta + (1 - 2 * delta) * u1
    return np.sqrt(-2 * np.log1p(-u1)) * np.cos(2 * math.pi * u2)


def levels(img, bits):
    return (img.astype(np.int64) >> (8 - bits)).astype(np.float64)


def forward(img, key, *, alpha=0.05, c=1.0, noise_kind="uniform", bits=8, seed=0):
    """(logits float64 [H,W,C], logdet float64) for one uint8 image."""
    L = 2 ** bits
    k = levels(img, bits).reshape(-1)
    e = noise(seed, key, k.size, noise_kind, c)
    xt = k + c * e
    if noise_kind == "gaussian":
        m = 0.5 * alpha * (L - 1 + c) / (2 * (1 - alpha))
        xt = np.clip(xt, -m, L - 1 + c + m)
    z = xt / (L - 1 + c)
    p = z * (1 - alpha) + alpha / 2
    y = np.log(p) - np.log1p(-p)
    return y.reshape(img.shape), logdet_from_logits(y, alpha)


def softplus(x):
    return np.logaddexp(0.0, x)


def logdet_from_logits(y, alpha):
    """TFGENZOO's forward log-det from logits, float64."""
    y = np.asarray(y, np.float64).reshape(-1)
    return float(np.sum(softplus(y) + softplus(-y)) + y.size * math.log1p(-alpha))


def tfgenzoo_inverse(y, alpha):
    """TFGENZOO LogitifyImage.inverse, float64: (x in [0,1], inverse log-det)."""
    y = np.asarray(y, np.float64)
    x = 1.0 / (1.0 + np.exp(-y))
    x = (x - 0.5 * alpha) / (1.0 - alpha)
    pre = math.log(alpha) - math.log(1 - alpha)
    ildj = -np.sum(softplus(y) + softplus(-y) - softplus(pre))
    return x, float(ildj)


def inverse_levels(y, *, alpha=0.05, c=1.0, bits=8, noise_kind="uniform"):
    """The inverse in float64: floor for uniform/none, nearest for gaussian."""
    L = 2 ** bits
    p = 1.0 / (1.0 + np.exp(-np.asarray(y, np.float64)))
    z = (p - alpha / 2) / (1 - alpha)
    xt = z * (L - 1 + c)
    k = np.round(xt) if noise_kind == "gaussian" else np.floor(xt)
    return np.clip(k, 0, L - 1)
