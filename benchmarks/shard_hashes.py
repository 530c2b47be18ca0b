"""Shard sha256s of a fixed corpus under several option sets.

A refactor or a speed-up must not change a shard's bytes. Run this before
and after a change and compare the two outputs (they are sorted JSON lines):

    python benchmarks/shard_hashes.py > before.jsonl
    ... change ...
    python benchmarks/shard_hashes.py > after.jsonl && diff before.jsonl after.jsonl

The corpus is built by corpus.py from fixed seeds (photo-like PNGs in two
class folders, some grayscale ones, a JPEG and a TFRecord file of encoded
images), so the same command gives the same bytes on any machine with the
same TensorFlow device type.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from corpus import build  # noqa: E402

RUNS = {
    "npz": [],
    "npz-compress": ["--compress"],
    "tfrecord": ["-f", "tfrecord"],
    "tfrecord-gzip": ["-f", "tfrecord", "--compress"],
    "bits5-c0.5-alpha0.3": ["--bits", "5", "--corruption-level", "0.5", "--alpha", "0.3", "--shard-size", "97"],
    "none-noise": ["--noise", "none", "--shard-size", "250"],
    "gaussian": ["--noise", "gaussian", "--seed", "7"],
    "resize-16x20": ["--size", "16x20", "--channels", "4"],
}


def _tfrecord_of_images(path: str, count: int, size: int, seed: int) -> None:
    """A TFRecord file of tf.train.Example records (image bytes + int64 label)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    with tf.io.TFRecordWriter(path) as w:
        for i in range(count):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            feats = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buf.getvalue()])),
                     "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 3]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(deterministic=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1200, help="photo-like PNGs in the corpus")
    ap.add_argument("--work", help="work folder (default: a temporary one)")
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="logitify-hashes-")
    src = os.path.join(work, "corpus")
    if not os.path.isdir(src):
        build(src, a.count, 32, seed=11, gray=0)
        os.makedirs(os.path.join(src, "jpeg"), exist_ok=True)
        rng = np.random.default_rng(5)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            os.path.join(src, "jpeg", "noise.jpg"), quality=90)
        _tfrecord_of_images(os.path.join(work, "records.tfrecord"), 150, 32, 3)
    gray = os.path.join(work, "gray")
    if not os.path.isdir(gray):
        build(gray, 0, 24, seed=12, gray=60)
    # Relative to the work folder, so keys (and so the noise) do not depend on where it lies.
    inputs = {"corpus": ["corpus"], "records": ["records.tfrecord"], "gray": ["gray"]}
    lines = []
    for input_name, paths in inputs.items():
        for run, extra in RUNS.items():
            if input_name != "corpus" and run not in ("npz", "tfrecord", "bits5-c0.5-alpha0.3"):
                continue
            out = os.path.join(work, f"out-{input_name}-{run}")
            cmd = [sys.executable, "-m", "logitify_cli", "encode", *paths, "-o", out, "-q", "--overwrite",
                   "--json", *extra]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=work,
                               env={**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..")})
            if r.returncode != 0:
                lines.append({"input": input_name, "run": run, "error": r.stderr.strip()[-300:]})
                continue
            with open(os.path.join(out, "manifest.json")) as f:
                m = json.load(f)
            for s in m["shards"]:
                lines.append({"input": input_name, "run": run, "file": s["file"], "sha256": s["sha256"]})
    for line in sorted(lines, key=lambda d: json.dumps(d, sort_keys=True)):
        print(json.dumps(line, sort_keys=True))


if __name__ == "__main__":
    main()
