"""Photo-like test images: skies, hills, blobs, texture and sensor noise.

Used to make sample_images/ and the benchmark corpora, so that PNG sizes and
decode costs resemble real photos rather than flat synthetic fills.

    python benchmarks/corpus.py OUT_DIR --count 50000 --size 32
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("landscapes", "objects")


def landscape(rng, s):
    y = np.linspace(0, 1, s)[:, None, None]
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = top * (1 - y) + bottom * y + np.zeros((s, s, 3))
    xs = np.arange(s)
    for layer in range(rng.integers(1, 4)):
        h = s * (0.4 + 0.5 * rng.random()) + s / 8 * np.sin(xs / s * rng.uniform(2, 9) + rng.uniform(0, 6))
        color = rng.uniform(0, 200, 3)
        mask = np.arange(s)[:, None] > h[None, :]
        img[mask] = img[mask] * 0.3 + color * 0.7
    return img


def objects(rng, s):
    img = np.zeros((s, s, 3)) + rng.uniform(40, 220, 3)
    pil = Image.fromarray(img.astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for _ in range(rng.integers(2, 6)):
        x0, y0 = rng.integers(-s // 4, s, 2)
        r = rng.integers(s // 8, s // 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x0 + r, y0 + r], fill=fill)
    return np.asarray(pil, dtype=np.float64)


def make(args):
    index, out, s, cls, seed = args
    rng = np.random.default_rng([seed, index])
    img = (landscape if cls == "landscapes" else objects)(rng, s)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    arr = np.asarray(pil, dtype=np.float64)
    arr += rng.normal(0, rng.uniform(2, 8), arr.shape)  # sensor noise and texture
    Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8)).save(
        os.path.join(out, cls, f"{cls[:-1]}_{index:06d}.png"), optimize=False)


def build(out, count, size, seed=0, workers=None, gray=0):
    for c in CLASSES:
        os.makedirs(os.path.join(out, c), exist_ok=True)
    jobs = [(i, out, size, CLASSES[i % 2], seed) for i in range(count)]
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(make, jobs, chunksize=256))
    if gray:
        os.makedirs(os.path.join(out, "grayscale"), exist_ok=True)
        for i in range(gray):
            rng = np.random.default_rng([seed, 10**9 + i])
            arr = landscape(rng, size).mean(axis=2) + rng.normal(0, 4, (size, size))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").save(
                os.path.join(out, "grayscale", f"gray_{i:03d}.png"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gray", type=int, default=0, help="also this many grayscale images in grayscale/")
    a = ap.parse_args()
    build(a.out, a.count, a.size, a.seed, gray=a.gray)
