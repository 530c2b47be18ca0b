"""Loader throughput: stored and fresh-noise logits against decoding the PNGs every epoch.

    python benchmarks/loader.py [--count 50000] [--size 32] [--repeat 5] [--work DIR]

Builds photo-like PNGs (benchmarks/corpus.py), encodes them to npz and to
TFRecord shards, then times epochs of each contender in this process,
consumed as a training loop would (.batch(256), every tensor of every batch
touched):

- the baseline a user would otherwise run: tf.data reads and decodes every
  PNG and applies TFGENZOO's LogitifyImage formula with fresh noise;
- lg.load(path): the stored logits;
- lg.load(path, noise="fresh", epoch=E): a new draw, recomputed in the graph.

Every contender runs one warm-up epoch (compiles, fills the page cache),
then --repeat rounds, each round one epoch of every contender in turn, so a
change in the machine's load falls on all of them alike. Reported: the
median epoch, the spread (slowest to fastest epoch), the CPU time per image
(all threads of this process) and the median of each round's ratio to that
round's baseline.
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


def epoch(make):
    """(seconds, CPU seconds, images) of one epoch, every tensor of every batch touched."""
    ds = make().prefetch(2)
    t, cpu = time.perf_counter(), time.process_time()
    n = 0
    for batch in ds:
        n += int(batch[0].shape[0])
        for x in batch:  # as a training step would: each tensor is there, on the host
            x[-1].numpy()
    return time.perf_counter() - t, time.process_time() - cpu, n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=50000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
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
    rows = [("tf.data decode-every-epoch + LogitifyImage", lambda r: baseline(tf, files))]
    for fmt, out in outs.items():
        rows.append((f"lg.load, stored ({fmt})", lambda r, out=out: lg.load(out).batch(256)))
        rows.append((f"lg.load, fresh noise ({fmt})",
                     lambda r, out=out: lg.load(out, noise="fresh", epoch=1 + r).batch(256)))
    times = {name: [] for name, _ in rows}
    for r in range(args.repeat + 1):  # round 0 warms up
        for name, make in rows:
            sec, cpu, n = epoch(lambda: make(r))
            if r:
                times[name].append((sec, cpu, n))
    print(f"{args.count} images {args.size}x{args.size}, {args.repeat} rounds after a warm-up; "
          f"median epoch, spread slowest-fastest, CPU per image, median ratio to the same round's baseline\n")
    print("| loader | seconds | images/s | spread (images/s) | CPU us/image | x baseline |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    base = times[rows[0][0]]
    for name, _ in rows:
        t = times[name]
        rates = sorted(n / sec for sec, _, n in t)
        sec = statistics.median(sec for sec, _, _ in t)
        n = t[0][2]
        cpu = statistics.median(c / k for _, c, k in t) * 1e6
        ratio = statistics.median((n / a) / (m / b) for (a, _, n), (b, _, m) in zip(t, base))
        print(f"| {name} | {sec:.2f} | {n / sec:,.0f} | {rates[0]:,.0f}-{rates[-1]:,.0f} | {cpu:.0f} | "
              f"{ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
