"""The maths: dequantize-and-logit, its inverse and both log-dets, in one place.

Forward, per image of D values with levels k in 0..L-1:

    x~ = k + c*e,  z = x~ / (L-1+c),  p = z(1-a) + a/2,  y = logit(p)
    logdet = sum(softplus(y) + softplus(-y)) + D*log(1-a)      (TFGENZOO's)

Numerical care, so that float32 logits give every level back at any alpha:
- p and 1-p are each formed from x~ and from (L-1+c) - x~ directly, and
  y = sign(p-q) * log1p(|p-q| / min(p,q)) keeps full relative precision
  near p = 1/2 (large alpha) and near 0 or 1 (tiny alpha);
- the inverse goes through tanh(y/2) = p - q, in float64;
- uniform noise keeps a guard of GUARD (in level units; at most a quarter
  of an interval narrower than 4*GUARD) from the edges of each level's
  interval, far below any statistical test's reach but above float32
  rounding, so floor() can never land on a neighbour.
- each image's noise is a counter-based hash of (seed, key, pixel index): it
  does not depend on batch size, order, worker or device.
- per-image sums are fixed-order pairwise trees, so an image's log-det has
  the same bits wherever it sits in whichever batch.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np

NOISES = ("uniform", "gaussian", "none")
GUARD = 2.0 ** -13  # level units kept clear at each end of a level's interval
PAD = 64  # flattened images are padded to a multiple of this many values
# A batch holds at most this many bytes of uint8 pixels (and at least one
# image): a batch is padded to its full size, so one 9400x9400 image in a
# batch of 256 would otherwise ask for 63 GiB. Values never depend on it.
BATCH_PIXEL_BYTES = 64 << 20
TINY, HUGE = 1e-30, 1e30  # the least alpha and corruption level, and the largest corruption level


@dataclass(frozen=True)
class TransformParams:
    """The parameters of the transform, validated; what the manifest records."""

    alpha: float = 0.05
    corruption_level: float = 1.0
    noise: str = "uniform"
    bits: int = 8
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha < 1.0):
            raise ValueError(f"alpha must lie strictly between 0 and 1, got {self.alpha!r}")
        c = self.corruption_level
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0.0):
            raise ValueError(f"corruption_level must be a finite number > 0, got {c!r}")
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {', '.join(NOISES)}, got {self.noise!r}")
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 8):
            raise ValueError(f"bits must be an integer from 1 to 8, got {self.bits!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def check_float32(self) -> None:
        """For a new encode: float32 carries the transform, and values past these bounds give infinities there.

        Not applied when a manifest is read: a dataset made before the bounds stays readable.
        """
        if self.alpha < TINY:
            raise ValueError(f"alpha must be at least {TINY:g}, got {self.alpha!r}")
        if not TINY <= self.corruption_level <= HUGE:
            raise ValueError(f"corruption_level must be from {TINY:g} to {HUGE:g}, got {self.corruption_level!r}")

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def denominator(self) -> float:
        """L - 1 + c: what x~ is divided by."""
        return self.levels - 1 + self.corruption_level

    @property
    def lossless(self) -> bool:
        """True where decoding gives back every level bit for bit."""
        return self.noise in ("uniform", "none") and self.corruption_level <= 1.0

    def bpd_offset_nats(self, dims: int) -> float:
        """D * log((L-1+c)/c): turns a logit-space likelihood into bits/dim."""
        return dims * math.log(self.denominator / self.corruption_level)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformParams":
        return cls(
            alpha=float(d["alpha"]),
            corruption_level=float(d["corruption_level"]),
            noise=str(d["noise"]),
            bits=int(d["bits"]),
            seed=int(d["seed"]),
        )


def image_seeds(seed: int, keys) -> np.ndarray:
    """Two uint32 words per key: the only input of an image's noise."""
    return key_seeds(seed, (key.encode("utf-8", "surrogatepass") for key in keys))


def key_seeds(seed: int, keys) -> np.ndarray:
    """image_seeds() for keys given as UTF-8 bytes (as tf.data carries them): the same words.

    The hash of the prefix is taken once and copied per key, and the digests
    are joined into one array at the end (0.2 us a key, where a row at a time
    took 1 us).
    """
    start = hashlib.blake2b(str(int(seed)).encode() + b"\0", digest_size=8)
    digests = bytearray()
    for key in keys:
        h = start.copy()
        h.update(key)
        digests += h.digest()
    return np.frombuffer(bytes(digests), dtype="<u4").reshape(-1, 2).astype(np.uint32)


# Domains of the re-keyed noise: training epochs and evaluation draws never share words.
EPOCH_DOMAIN = 0x3C6EF372
DRAW_DOMAIN = 0xA54FF53A


def _fmix_ops(h, xor, shr, const):
    h = xor(h, shr(h, 16))
    h = h * const(0x85EBCA6B)
    h = xor(h, shr(h, 13))
    h = h * const(0xC2B2AE35)
    return xor(h, shr(h, 16))


def _mix_ops(seeds0, seeds1, n, domain, xor, shr, const):
    m = _fmix_ops(n * const(0x9E3779B9) + const(domain), xor, shr, const)
    m2 = _fmix_ops(m + const(0x6A09E667), xor, shr, const)
    return _fmix_ops(xor(seeds0, m), xor, shr, const), _fmix_ops(xor(seeds1, m2), xor, shr, const)


def rekey_seeds_numpy(seeds, n, domain: int) -> np.ndarray:
    """Seed words [..., 2] re-keyed by counter n (epoch or draw) in a domain; NumPy twin of rekey_seeds_tf.

    For the epoch domain, n = 0 leaves the words as they are: epoch 0 is the
    noise encode drew, so the shards on disk are epoch 0.
    """
    s = np.asarray(seeds, np.uint32)
    n = np.broadcast_to(np.asarray(n, np.uint64).astype(np.uint32), s.shape[:-1])

    def const(v):
        return np.uint32(v)

    with np.errstate(over="ignore"):
        a, b = _mix_ops(s[..., 0], s[..., 1], n, domain, np.bitwise_xor, np.right_shift, const)
    out = np.stack([a, b], axis=-1).astype(np.uint32)
    if domain == EPOCH_DOMAIN:
        out = np.where((n == 0)[..., None], s, out)
    return out


def rekey_seeds_tf(tf, seeds, n, domain: int):
    """TensorFlow twin of rekey_seeds_numpy: seeds uint32 [..., 2], n an integer tensor broadcasting to [...]."""
    u32 = tf.uint32
    seeds = tf.convert_to_tensor(seeds, u32)
    n = tf.cast(tf.cast(n, tf.int64) % (1 << 32), u32) + tf.zeros_like(seeds[..., 0])

    def const(v):
        return tf.constant(v, u32)

    a, b = _mix_ops(seeds[..., 0], seeds[..., 1], n, domain, tf.bitwise.bitwise_xor, tf.bitwise.right_shift, const)
    out = tf.stack([a, b], axis=-1)
    if domain == EPOCH_DOMAIN:
        out = tf.where(tf.equal(n, 0)[..., None], seeds, out)
    return out


LOG_DET_BLOCK = 1 << 18  # logits at a time in forward_log_det_numpy: float64 temporaries of 2 MB


def forward_log_det_numpy(logits, alpha: float, finite=None):
    """(finite [n], forward log-det float64 [n]) of logits [n, ...], the float64 twin of forward_log_det_jacobian.

    log|det| = D log(1 - alpha) + sum(softplus(y) + softplus(-y)) over the
    D logits of an example, in blocks of LOG_DET_BLOCK logits, so a slice of
    any size costs a few MB. An example is finite when `finite` (say its
    stored log-det's) and every logit are; non-finite logits are left out
    of the sum.
    """
    n = len(logits)
    flat = logits.reshape(n, -1)
    dims = flat.shape[1]
    finite = np.ones(n, bool) if finite is None else np.array(finite, bool)
    ref = np.full(n, dims * math.log1p(-alpha))
    rows = max(1, LOG_DET_BLOCK // max(1, dims))
    cols = max(1, min(dims, LOG_DET_BLOCK))
    for r in range(0, n, rows):
        block = flat[r:r + rows]
        for c in range(0, dims, cols):
            part = block[:, c:c + cols]
            ok = np.isfinite(part)
            finite[r:r + rows] &= ok.all(axis=1)
            y = np.where(ok, part, 0).astype(np.float64)
            ref[r:r + rows] += (np.logaddexp(0.0, y) + np.logaddexp(0.0, -y)).sum(axis=1)
    return finite, ref


def inverse_constants(p: TransformParams):
    """(base, scale, top, shift) of the inverse: k = clip(floor(base + tanh(y/2)*scale), 0, top).

    tanh(y/2) = p - q, so x~ = (L-1+c)/2 + tanh(y/2) * (L-1+c) / (2(1-alpha)).
    The level is the one whose interval [k, k+c) is nearest to x~: floor of
    x~ + (1-c)/2 (uniform, none), or floor of x~ + 1/2 (gaussian, centred
    noise). For exact data this is floor(z * (L-1+c)).
    """
    lc = p.denominator
    scale = lc / (2.0 * (1.0 - p.alpha))
    base = 0.5 * lc + (0.5 if p.noise == "gaussian" else 0.5 * (1.0 - p.corruption_level))
    return base, scale, float(p.levels - 1), 8 - p.bits


def inverse_numpy(p: TransformParams, logits) -> np.ndarray:
    """The inverse in NumPy float64, bit for bit the levels LogitTransform.inverse gives.

    Decoding needs no TensorFlow on the CPU: this is the same formula.
    """
    base, scale, top, shift = inverse_constants(p)
    y = np.asarray(logits, dtype=np.float64)
    k = np.tanh(0.5 * y)
    k *= scale
    k += base
    np.floor(k, out=k)
    np.clip(k, 0.0, top, out=k)
    out = k.astype(np.uint8)
    if shift:
        out <<= shift
    return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class LogitTransform:
    """Forward, inverse and both log-dets of LogitifyImage, batch-wise in TF.

    forward(uint8 [B,H,W,C], uint32 seeds [B,2]) -> (float32 logits, float32 logdet [B])
    inverse(float32 logits [B,H,W,C]) -> uint8 images (levels << (8-bits))
    forward_log_det_jacobian(logits) -> float64 [B], from the logits alone
    inverse_log_det_jacobian(logits) = -forward_log_det_jacobian(logits)
    """

    def __init__(self, params: TransformParams, shape, device: str | None = None, batch_size: int = 256):
        from ._tf import tf as _load

        tf = _load()
        self.tf = tf
        self.params = params
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be [H, W, C] of positive sizes, got {shape!r}")
        self.dims = int(np.prod(self.shape))
        self.padded_dims = _round_up(self.dims, PAD)
        self.device = device
        self.batch_size = max(1, min(int(batch_size), BATCH_PIXEL_BYTES // self.dims))
        self._forward = None
        self._inverse = None

    # -- public API -------------------------------------------------------------

    def forward(self, images, seeds, copy: bool = True):
        """Logits and TFGENZOO log-det of a uint8 batch; seeds from image_seeds().

        Returns NumPy arrays (float32 [B,H,W,C], float32 [B]). With
        copy=False they may be read-only views of TensorFlow's output
        buffers: the shard writer only reads them, and a batch's logits are
        not copied once more on their way to the file.
        """
        if self._forward is None:
            self._forward = self._build_forward()
        images = np.asarray(images, dtype=np.uint8)
        seeds = np.asarray(seeds, dtype=np.uint32)
        as_array = (lambda t: t.numpy()) if copy else np.asarray
        ys, lds = [], []
        for chunk, n in self._fixed_batches(images, seeds):
            with self._device_scope():
                y, logdet = self._forward(*chunk)
            ys.append(as_array(y)[:n])
            lds.append(as_array(logdet)[:n])
        if len(ys) == 1:
            return ys[0], lds[0]
        return np.concatenate(ys), np.concatenate(lds)

    def inverse(self, logits):
        """uint8 images [B,H,W,C] from logits (the levels, shifted back to 8 bits)."""
        if self._inverse is None:
            self._inverse = self._build_inverse()
        logits = np.asarray(logits, dtype=np.float32)
        out = []
        for (chunk,), n in self._fixed_batches(logits):
            with self._device_scope():
                out.append(self._inverse(chunk).numpy()[:n])
        return out[0] if len(out) == 1 else np.concatenate(out)

    def graph_functions(self):
        """(forward, inverse) as the tf.functions encode runs, for use inside a tf.data graph.

        forward(uint8 images, uint32 seeds [B,2]) -> (logits, float32 logdet);
        inverse(float32 logits) -> uint8 images. Re-noising a stored dataset
        is inverse then forward with other seed words: no second copy of the maths.
        """
        if self._forward is None:
            self._forward = self._build_forward()
        if self._inverse is None:
            self._inverse = self._build_inverse()
        return self._forward, self._inverse

    def warm_up(self) -> None:
        """Compile the forward pass now (XLA compiles once per batch shape)."""
        zeros = np.zeros((1,) + self.shape, np.uint8)
        self.forward(zeros, np.zeros((1, 2), np.uint32))

    def _fixed_batches(self, *arrays):
        """Chunks of exactly batch_size rows (the last one zero-padded).

        One shape means one compiled program, and an image's values never
        depend on how many others share its batch.
        """
        total = len(arrays[0])
        bs = self.batch_size
        if total == 0:
            return
        for start in range(0, total, bs):
            parts = [a[start:start + bs] for a in arrays]
            n = len(parts[0])
            if n < bs:
                parts = [np.concatenate([p, np.zeros((bs - n,) + p.shape[1:], p.dtype)]) for p in parts]
            yield parts, n

    def forward_log_det_jacobian(self, logits):
        """TFGENZOO's forward log-det, recomputed from stored logits (float64)."""
        tf = self.tf
        y = tf.cast(tf.reshape(logits, [-1, self.dims]), tf.float64)
        terms = tf.math.softplus(y) + tf.math.softplus(-y)
        return tf.reduce_sum(terms, axis=1) + self.dims * math.log1p(-self.params.alpha)

    def inverse_log_det_jacobian(self, logits):
        """The inverse's log-det is minus the forward's (TFGENZOO's docs slip here)."""
        return -self.forward_log_det_jacobian(logits)

    # -- graph building ---------------------------------------------------------

    def _device_scope(self):
        if self.device:
            return self.tf.device(self.device)
        import contextlib

        return contextlib.nullcontext()

    def _tree_sum(self, x):
        """Row sums of [B, N] in a fixed pairwise order, whatever B is."""
        tf = self.tf
        n = int(x.shape[1])
        while n > 1:
            leaf = 1
            while leaf < min(n, 1024):
                leaf *= 2
            n_pad = _round_up(n, leaf)
            if n_pad != n:
                x = tf.pad(x, [[0, 0], [0, n_pad - n]])
            x = tf.reshape(x, [-1, n_pad // leaf, leaf])
            while leaf > 1:
                leaf //= 2
                x = x[:, :, :leaf] + x[:, :, leaf:]
            x = x[:, :, 0]
            n = int(x.shape[1])
        return x[:, 0]

    def _noise_uniform(self, seeds):
        """[B, Dp] uint32 hash bits, then floats in [0, 1) with 24 bits."""
        tf = self.tf
        u32 = tf.uint32
        # Computed in the graph (an iota XLA fuses), not a constant: a constant
        # of every pixel index was 4 bytes a value, held several times over.
        idx = tf.cast(tf.range(self.padded_dims, dtype=tf.int64), u32)[tf.newaxis, :]
        s0 = seeds[:, 0:1]
        s1 = seeds[:, 1:2]

        def fmix(h):
            return _fmix_ops(h, tf.bitwise.bitwise_xor, tf.bitwise.right_shift, lambda v: tf.constant(v, u32))

        h = fmix(idx * tf.constant(0x9E3779B9, u32) + s0)
        h1 = fmix(tf.bitwise.bitwise_xor(h, s1))
        scale = 2.0 ** -24
        u1 = tf.cast(tf.bitwise.right_shift(h1, 8), tf.float32) * scale
        if self.params.noise != "gaussian":
            return u1, None
        h2 = fmix(h1 + tf.constant(0x6A09E667, u32))
        u2 = tf.cast(tf.bitwise.right_shift(h2, 8), tf.float32) * scale
        return u1, u2

    def _build_forward(self):
        tf = self.tf
        p = self.params
        a = p.alpha
        c = p.corruption_level
        top = float(p.levels - 1)
        lc = p.denominator
        half = 0.5 * a * lc  # (a/2) * (L-1+c): p*(L-1+c) at x~ = 0
        one_minus_a = 1.0 - a
        inv_lc = 1.0 / lc
        shift = 8 - p.bits
        dims, dp = self.dims, self.padded_dims
        const = dims * math.log1p(-a)
        h, w, ch = self.shape

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, h, w, ch], tf.uint8),
                tf.TensorSpec([None, 2], tf.uint32),
            ],
            jit_compile=True,
            reduce_retracing=True,
            autograph=False,
        )
        def forward(images, seeds):
            x = tf.reshape(images, [-1, dims])
            if shift:
                x = tf.bitwise.right_shift(x, tf.constant(shift, tf.uint8))
            if dp != dims:
                x = tf.pad(x, [[0, 0], [0, dp - dims]])
            # Integer parts stay integers until the one float addition, so no
            # optimizer can fold constants into a cancelling float sum.
            ki = tf.cast(x, tf.int32)
            k = tf.cast(ki, tf.float32)
            k_rest = tf.cast(int(top) - ki, tf.float32)  # L-1-k, exact
            k_diff = tf.cast(2 * ki - int(top), tf.float32)  # 2k-(L-1), exact
            if p.noise == "none":
                xt = k + 0.5 * c
                rt = k_rest + 0.5 * c
                dt = k_diff
            elif p.noise == "uniform":
                delta = min(GUARD / c, 0.25)
                u, _ = self._noise_uniform(seeds)
                xt = k + c * (delta + (1.0 - 2.0 * delta) * u)
                rt = k_rest + c * ((1.0 - delta) - (1.0 - 2.0 * delta) * u)
                dt = k_diff + c * ((2.0 * delta - 1.0) + 2.0 * (1.0 - 2.0 * delta) * u)
            else:  # gaussian, Box-Muller, clipped so p stays inside (0, 1)
                u1, u2 = self._noise_uniform(seeds)
                g = tf.sqrt(-2.0 * tf.math.log1p(-u1)) * tf.cos((2.0 * math.pi) * u2)
                margin = half / (2.0 * one_minus_a)
                xt = tf.clip_by_value(k + c * g, -margin, lc + margin)
                rt = lc - xt
                dt = xt - rt
            big_p = xt * one_minus_a + half
            big_q = rt * one_minus_a + half
            if p.noise == "gaussian":
                # The clip keeps P and Q at least half/2; where 1-a rounds to 1 in
                # float32, XLA folds (lc - xt) + half into (lc + half) - xt, which
                # loses half and gave Q = 0, an infinite logit. Held at half/2.
                big_p = tf.maximum(big_p, 0.5 * half)
                big_q = tf.maximum(big_q, 0.5 * half)
            y = tf.sign(dt) * tf.math.log1p(tf.abs(dt) * one_minus_a / tf.minimum(big_p, big_q))
            pq = (big_p * inv_lc) * (big_q * inv_lc)
            terms = -tf.math.log(pq)  # softplus(y) + softplus(-y)
            if dp != dims:
                y = y[:, :dims]
                terms = terms[:, :dims]
            logdet = self._tree_sum(tf.cast(terms, tf.float64)) + const
            return tf.reshape(y, [-1, h, w, ch]), tf.cast(logdet, tf.float32)

        return forward

    def _build_inverse(self):
        tf = self.tf
        base, scale, top, shift = inverse_constants(self.params)
        h, w, ch = self.shape

        @tf.function(input_signature=[tf.TensorSpec([None, h, w, ch], tf.float32)], jit_compile=True,
                     reduce_retracing=True, autograph=False)
        def inverse(logits):
            t = tf.math.tanh(0.5 * tf.cast(logits, tf.float64))
            k = tf.clip_by_value(tf.floor(base + t * scale), 0.0, top)
            k = tf.cast(k, tf.uint8)
            if shift:
                k = tf.bitwise.left_shift(k, tf.constant(shift, tf.uint8))
            return k

        return inverse
