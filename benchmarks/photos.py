"""Benchmark corpora from real photographs that ship inside Python packages (no download).

    python benchmarks/photos.py jpeg OUT --count 10000    # ~500x375 JPEGs, quality 85-95
    python benchmarks/photos.py png OUT --count 50000     # 32x32 PNG crops

Synthetic "photo-like" images flatter a decoder (smooth gradients compress
and decode unlike real detail), so these are cut from real photographs.
Each file is a random crop (aspect 4:3 or 3:4 for JPEGs, square for PNGs)
of a random scale of one source photo, randomly mirrored, resized with
Pillow's LANCZOS (JPEGs: about 500x375, +-10% on each side; PNGs: 32x32),
saved as a baseline 4:2:0 JPEG of quality 85-95 (one in ten progressive),
as most ImageNet and CelebA files are, or as a PNG with Pillow's defaults.
Files go into one folder per source photo (the class), named by index, and
the same --seed gives the same files.

The source photographs and their licences (as stated in scikit-image's and
matplotlib's own documentation of these files):

  skimage  astronaut.png          Eileen Collins, NASA: public domain
  skimage  chelsea.png            a cat, by Stefan van der Walt: CC0
  skimage  coffee.png             a cup of coffee, by Rachel Michetti: CC0
  skimage  rocket.jpg             SpaceX Falcon 9: public domain (SpaceX)
  skimage  hubble_deep_field.jpg  NASA/ESA Hubble: public domain
  skimage  retina.jpg             a human retina, by Mikael Haggstrom: CC0
  skimage  immunohistochemistry   colonic glands (CMMI): no known copyright restrictions
  mpl      grace_hopper.jpg       Grace Hopper, US Navy: public domain

Needs scikit-image and matplotlib (pip install ".[bench]").
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
           "grace_hopper")


def load_sources():
    """{name: RGB uint8 array} of the photographs above, all from installed packages."""
    import matplotlib.cbook
    import skimage.data

    out = {}
    for name in SOURCES:
        if name == "grace_hopper":
            with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
                out[name] = np.asarray(Image.open(f).convert("RGB"))
        else:
            out[name] = np.ascontiguousarray(getattr(skimage.data, name)()[:, :, :3])
    return out


_PHOTOS = None


def _photos():
    global _PHOTOS
    if _PHOTOS is None:
        _PHOTOS = {k: Image.fromarray(v) for k, v in load_sources().items()}
    return _PHOTOS


def _crop(rng, img, aspect):
    """A random window of aspect w/h covering 35-100% of the largest such window, maybe mirrored."""
    W, H = img.size
    if W / H > aspect:
        h0, w0 = H, H * aspect
    else:
        w0, h0 = W, W / aspect
    f = rng.uniform(0.35, 1.0)
    w, h = max(2, int(w0 * f)), max(2, int(h0 * f))
    left, top = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
    img = img.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def make(job):
    kind, index, out, seed = job
    rng = np.random.default_rng([seed, index])
    names = sorted(_photos())
    name = names[int(rng.integers(len(names)))]
    photo = _photos()[name]
    if kind == "jpeg":
        portrait = rng.random() < 0.2
        w, h = (375, 500) if portrait else (500, 375)
        w, h = int(w * rng.uniform(0.9, 1.1)), int(h * rng.uniform(0.9, 1.1))
        img = _crop(rng, photo, w / h).resize((w, h), Image.Resampling.LANCZOS)
        img.save(os.path.join(out, name, f"{index:06d}.jpg"), quality=int(rng.integers(85, 96)),
                 subsampling=2, progressive=bool(rng.random() < 0.1))
    else:
        img = _crop(rng, photo, 1.0).resize((32, 32), Image.Resampling.LANCZOS)
        img.save(os.path.join(out, name, f"{index:06d}.png"))


def build(kind, out, count, seed=0, workers=None):
    for name in SOURCES:
        os.makedirs(os.path.join(out, name), exist_ok=True)
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(make, [(kind, i, out, seed) for i in range(count)], chunksize=256))
    for name in SOURCES:  # a photo no crop happened to come from leaves no empty class
        try:
            os.rmdir(os.path.join(out, name))
        except OSError:
            pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["jpeg", "png"])
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    build(a.kind, a.out, a.count, a.seed)
