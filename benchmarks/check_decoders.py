"""Every file of a corpus: the fast decoders give exactly Pillow's pixels, or Pillow's refusal.

    python benchmarks/check_decoders.py FOLDER [--channels 3] [--size 64x64 --filter box]

Reads each image twice, through read_image's shortcuts (plain PNG, plain
JPEG) and through Pillow's road alone, and compares the results byte for
byte. Prints how many files took a shortcut, and exits 1 naming any file
where the two differ. With --draft-error (and --size), it also measures
how far --jpeg-draft's pixels are from the exact ones: mean absolute
difference, largest difference and PSNR over the whole corpus.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from logitify_cli.images import Geometry, ImageReadError, _shortcut, read_image  # noqa: E402
from logitify_cli.sources import ImageFolder  # noqa: E402


def _outcome(path, channels, geometry, fast):
    try:
        return read_image(path, channels, geometry, fast=fast)
    except ImageReadError as e:
        return str(e)


def check(job):
    paths, channels, geometry, draft = job
    bad, took, n, abs_sum, sq_sum, peak = [], 0, 0, 0, 0, 0
    for p in paths:
        fast, slow = _outcome(p, channels, geometry, True), _outcome(p, channels, geometry, False)
        if isinstance(fast, str) or isinstance(slow, str):
            same = fast == slow
        else:
            same = fast.shape == slow.shape and np.array_equal(fast, slow)
        if not same:
            bad.append(p)
        try:
            took += _shortcut(p, 10**9, channels, None, None) is not None
        except ImageReadError:
            pass
        if draft is not None and not isinstance(slow, str):
            d = read_image(p, channels, draft).astype(np.int64) - slow
            n += d.size
            abs_sum += int(np.abs(d).sum())
            sq_sum += int((d * d).sum())
            peak = max(peak, int(np.abs(d).max()))
    return bad, took, (n, abs_sum, sq_sum, peak)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--size", help="HxW: compare after this resize too")
    ap.add_argument("--filter", default="box")
    ap.add_argument("--draft-error", action="store_true", help="measure --jpeg-draft against the exact road")
    a = ap.parse_args()
    geometry = draft = None
    if a.size:
        h, w = (int(v) for v in a.size.lower().split("x"))
        geometry = Geometry(size=(h, w), filter=a.filter)
        if a.draft_error:
            draft = Geometry(size=(h, w), filter=a.filter, jpeg_draft=True)
    paths = [it.path for it in ImageFolder(a.folder).items()[0]]
    jobs = [(paths[i:i + 200], a.channels, geometry, draft) for i in range(0, len(paths), 200)]
    bad, took, n, abs_sum, sq_sum, peak = [], 0, 0, 0, 0, 0
    with ProcessPoolExecutor() as ex:
        for b, t, (n1, a1, s1, p1) in ex.map(check, jobs):
            bad += b
            took += t
            n, abs_sum, sq_sum, peak = n + n1, abs_sum + a1, sq_sum + s1, max(peak, p1)
    print(f"{len(paths)} files, {took} through a shortcut, {len(bad)} differ from Pillow")
    for p in bad[:20]:
        print(f"  differs: {p}")
    if n:
        mse = sq_sum / n
        psnr = math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)
        print(f"--jpeg-draft against the exact road: mean |diff| {abs_sum / n:.3f}, max {peak}, "
              f"PSNR {psnr:.2f} dB over {n} values")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
