"""Train a small RealNVP-style flow on a logitify dataset, with fresh dequantization noise every epoch.

    logitify encode sample_images -o out --shard-size 8
    python examples/train_flow.py out --epochs 20

Each epoch reads the same shards with its own noise (lg.load(..., noise="fresh",
epoch=e)), so the model cannot fit one stored draw. The last shard is held
out as the test set unless --test names another encoded folder. Test bits/dim
are reported on the stored draw (epoch 0) and, at the end, as the
importance-weighted bound over K fresh draws per image (as Flow++ reports).

The flow: a per-dimension affine layer (actnorm-like), then affine coupling
layers over alternating halves of the flattened logits, each with a small
MLP giving a tanh-bounded log-scale and a shift; a standard normal base.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import logitify_cli as lg  # noqa: E402


class Coupling(tf.Module):
    """y_b = x_b * exp(s(x_a)) + t(x_a) on one half b of the dimensions, given the other half a."""

    def __init__(self, dims, mask, hidden, name=None):
        super().__init__(name=name)
        self.mask = tf.constant(mask, tf.float32)
        init = tf.keras.initializers.GlorotUniform(seed=len(mask) + int(mask[0]))
        self.w1 = tf.Variable(init([dims, hidden]))
        self.b1 = tf.Variable(tf.zeros([hidden]))
        self.w2 = tf.Variable(tf.zeros([hidden, 2 * dims]))  # starts as the identity map
        self.b2 = tf.Variable(tf.zeros([2 * dims]))
        self.scale = tf.Variable(tf.ones([dims]))

    def __call__(self, x):
        h = tf.nn.relu(tf.matmul(x * self.mask, self.w1) + self.b1)
        s, t = tf.split(tf.matmul(h, self.w2) + self.b2, 2, axis=-1)
        s = self.scale * tf.tanh(s) * (1.0 - self.mask)
        t = t * (1.0 - self.mask)
        return x * tf.exp(s) + t, tf.reduce_sum(s, axis=-1)


class Flow(tf.Module):
    def __init__(self, dims, layers=4, hidden=128):
        super().__init__()
        self.dims = dims
        self.shift = tf.Variable(tf.zeros([dims]))
        self.log_scale = tf.Variable(tf.zeros([dims]))
        parity = np.arange(dims) % 2
        self.layers = [Coupling(dims, (parity == i % 2).astype(np.float32), hidden) for i in range(layers)]

    def init_from(self, y):
        """Data-dependent start: the first layer whitens each dimension (as Glow's actnorm)."""
        y = tf.reshape(y, [-1, self.dims])
        self.shift.assign(-tf.reduce_mean(y, 0))
        self.log_scale.assign(-tf.math.log(tf.math.reduce_std(y, 0) + 1e-3))

    def log_prob(self, y):
        """log p(y) on the logits: standard normal base, plus every layer's log-det."""
        x = tf.reshape(y, [-1, self.dims])
        x = (x + self.shift) * tf.exp(self.log_scale)
        logdet = tf.reduce_sum(self.log_scale) * tf.ones_like(x[:, 0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet += ld
        base = -0.5 * tf.reduce_sum(tf.square(x), axis=-1) - 0.5 * self.dims * math.log(2 * math.pi)
        return base + logdet


def split_readers(train, test):
    """(train kwargs, test kwargs, test path): hold out the last shard when there is no test folder."""
    if test:
        return {}, {}, test
    shards = [s.file for s in lg.LogitDataset(train).shards]
    if len(shards) < 2:
        print("note: one shard only, so the test set is the training set", file=sys.stderr)
        return {}, {}, train
    return {"shards": shards[:-1]}, {"shards": shards[-1:]}, train


def mean_bpd(flow, ds, manifest):
    total, n = 0.0, 0
    for y, logdet in ds:
        bpd = lg.bits_per_dim(flow.log_prob(y), logdet, manifest)
        total += float(tf.reduce_sum(bpd))
        n += int(bpd.shape[0])
    return total / max(n, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("train", help="a folder written by `logitify encode`")
    ap.add_argument("--test", help="another encoded folder (default: the train folder's last shard)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=None, help="at most this many steps per epoch (smoke runs)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--draws", type=int, default=16, help="fresh noise draws per test image at the end")
    args = ap.parse_args(argv)
    tf.random.set_seed(0)

    train_kw, test_kw, test_path = split_readers(args.train, args.test)
    manifest = lg.LogitDataset(args.train).manifest
    test_manifest = lg.LogitDataset(test_path).manifest
    dims = manifest.dims
    flow = Flow(dims, args.layers, args.hidden)
    first = next(iter(lg.load(args.train, noise="fresh", **train_kw).batch(256)))
    flow.init_from(first[0])
    opt = tf.keras.optimizers.Adam(args.lr)

    @tf.function(reduce_retracing=True)
    def step(y, logdet):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(lg.bits_per_dim(flow.log_prob(y), logdet, manifest))
        grads = tape.gradient(loss, flow.trainable_variables)
        opt.apply_gradients(zip(grads, flow.trainable_variables))
        return loss

    test = lg.load(test_path, noise="fresh", epoch=0, **test_kw).batch(64)  # epoch 0: the stored draw
    results = {"train": [], "test": []}
    start = time.perf_counter()
    # Every epoch its own noise, from the same shards: epochs=N runs them in a row.
    for epoch in range(args.epochs):
        ds = lg.load(args.train, noise="fresh", epoch=epoch, **train_kw).shuffle(1024, seed=epoch)
        losses = []
        for i, (y, logdet) in enumerate(ds.batch(args.batch_size, drop_remainder=True)):
            if args.steps is not None and i >= args.steps:
                break
            losses.append(float(step(y, logdet)))
        train_bpd = float(np.mean(losses)) if losses else float("nan")
        test_bpd = mean_bpd(flow, test, test_manifest)
        results["train"].append(train_bpd)
        results["test"].append(test_bpd)
        print(f"epoch {epoch:3d}  train {train_bpd:.4f} bits/dim  test {test_bpd:.4f} bits/dim  "
              f"({time.perf_counter() - start:.1f} s)", flush=True)

    # The importance-weighted bound over K fresh draws per test image (Flow++'s run_iw_eval).
    k = args.draws
    total, n = 0.0, 0
    for ys, lds in lg.load(test_path, noise="fresh", draws=k, **test_kw).batch(max(1, 256 // k)):
        b = tf.shape(ys)[0]
        log_probs = tf.reshape(flow.log_prob(tf.reshape(ys, [-1, *ys.shape[2:]])), [b, k])
        iw = lg.iw_bits_per_dim(log_probs, lds, test_manifest)
        total += float(tf.reduce_sum(iw))
        n += int(b)
    results["test_iw"] = total / max(n, 1)
    print(f"test, {k} draws per image (importance-weighted): {results['test_iw']:.4f} bits/dim")
    return results


if __name__ == "__main__":
    main()
