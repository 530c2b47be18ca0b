"""Loader throughput: stored and fresh-noise logits against decoding the PNGs every epoch.

    python benchmarks/loader.py [--count 50000] [--size 32] [--repeat 3] [--work DIR]

Builds photo-like PNGs (benchmarks/corpus.py), encodes them to npz and to
TFRecord shards, then times one epoch of each contender in this process,
consumed as a training loop would (.batch(256), every tensor touched):

- the baseline a user would otherwise run: tf.data reads and decodes every
  PNG and applies the seed's LogitifyImage formula with fresh noise;
- lg.load(path): the stored logits;
- lg.load(path, noise="fresh", epoch=1): a new draw, recomputed in the graph.

Each is run --repeat times after one warm-up epoch; the median is reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def baseline(tf, files):
    import numpy as np

    alpha, c = 0.05, 1.0
    pre = np.float32(np.log(alpha) - np.log(1 - alpha))

    def logitify(x):
        z = tf.cast(x, tf.float32)
        z = z + c * tf.random.uniform(tf.shape(z))
        z = z / (255.0 + c)
        z = z * (1 - alpha) + alpha * 0.5
        z = tf.math.log(z) - tf.math.log(1.0 - z)
        ldj = tf.reduce_sum(tf.math.softplus(z) + tf.math.softplus(-z) - tf.math.softplus(pre), [1, 2, 3])
        return z, ldj

    def decode(f):
        return tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False)

    return (tf.data.Dataset.from_tensor_slices(files).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(256).map(logitify, num_parallel_calls=tf.data.AUTOTUNE))


def epoch_seconds(make, repeat):
    times = []
    n = 0
    for r in range(repeat + 1):
        ds = make().prefetch(2)
        t = time.perf_counter()
        n = 0
        for y, ld in ds:
            n += int(ld.shape[0])
            float(y[0, 0, 0, 0])  # touch the result
        if r:  # the first pass warms up (compiles, fills the page cache)
            times.append(time.perf_counter() - t)
    return statistics.median(times), n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=50000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", help="reuse this folder (images and encodings are kept)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="logitify-loader-")
    images = os.path.join(work, f"images-{args.count}-{args.size}")
    if not os.path.isdir(images):
        from corpus import build

        build(images, args.count, args.size)
    outs = {}
    for fmt in ("npz", "tfrecord"):
        out = os.path.join(work, f"{fmt}-{args.count}-{args.size}")
        if not os.path.isfile(os.path.join(out, "manifest.json")):
            subprocess.run([sys.executable, "-m", "logitify_cli", "encode", images, "-o", out, "-f", fmt, "-q",
                            "--overwrite"], check=True, env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})
        outs[fmt] = out

    import logitify_cli as lg
    from logitify_cli._tf import tf as _tf

    tf = _tf()
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(images) for f in fs if f.endswith(".png"))
    rows = [("tf.data decode-every-epoch + LogitifyImage", lambda: baseline(tf, files))]
    for fmt, out in outs.items():
        rows.append((f"lg.load, stored ({fmt})", lambda out=out: lg.load(out).batch(256)))
        rows.append((f"lg.load, fresh noise ({fmt})", lambda out=out: lg.load(out, noise="fresh", epoch=1).batch(256)))
    print(f"{args.count} images {args.size}x{args.size}, median of {args.repeat} epochs after a warm-up\n")
    print("| loader | seconds | images/s | x baseline |\n| --- | ---: | ---: | ---: |")
    base = None
    for name, make in rows:
        sec, n = epoch_seconds(make, args.repeat)
        rate = n / sec
        base = base or rate
        print(f"| {name} | {sec:.2f} | {rate:,.0f} | {rate / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
