"""Encode/decode speed and memory against baselines, all in one run.

    python benchmarks/bench.py                    # builds 50,000 photo-like 32x32 PNGs
    python benchmarks/bench.py --folder PHOTOS    # or your own folder of same-size images

Every contender runs as a fresh process, so each pays its own start-up
(TensorFlow's import included), and its peak memory is the sum of the
resident sets of its whole process tree, sampled every 20 ms. Printed:
wall seconds, images/s, peak memory, and the ratios the project promises:

  encode / tf.data + LogitifyImage formula   (goal <= 0.55)
  encode / Pillow decode floor on all cores  (goal <= 1.3)
  decode / per-image Python loop             (goal <= 0.6)
  peak(encode, N) / peak(encode, N/10)       (goal <= 1.15, and peak <= 1 GiB)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # logitify_cli from this checkout, installed or not

from logitify_cli.sources import ImageFolder  # noqa: E402

# Every baseline reads the same list of files (one path per line), so a
# folder of JPEGs or of mixed formats is measured as fairly as PNGs.
PILLOW_FLOOR = r'''
import os, sys, numpy as np
from concurrent.futures import ProcessPoolExecutor
from PIL import Image

def dec(paths):
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])

if __name__ == "__main__":
    files = open(sys.argv[1]).read().splitlines()
    chunks = [files[i:i + 256] for i in range(0, len(files), 256)]
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as ex:
        n = sum(len(a) for a in ex.map(dec, chunks))
    print(n)
'''

TFDATA_BASELINE = r'''
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
# TFGENZOO's LogitifyImage.forward, as a plain tf.data pipeline.
alpha, c = 0.05, 1.0
pre = np.float32(np.log(alpha) - np.log(1 - alpha))
def logitify(x):
    z = tf.cast(x, tf.float32) / 255.0 * 255.0
    z = z + c * tf.random.uniform(tf.shape(z))
    z = z / (255.0 + c)
    z = z * (1 - alpha) + alpha * 0.5
    z = tf.math.log(z) - tf.math.log(1.0 - z)
    ldj = tf.reduce_sum(tf.math.softplus(z) + tf.math.softplus(-z) - tf.math.softplus(pre), [1, 2, 3])
    return z, ldj
files = open(sys.argv[1]).read().splitlines()
decode = lambda f: tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False)
ds = (tf.data.Dataset.from_tensor_slices(files)
      .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
      .batch(256).map(logitify, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
ys, lds = [], []
for y, ld in ds:
    ys.append(y.numpy()); lds.append(ld.numpy())
np.savez(sys.argv[2], logits=np.concatenate(ys), logdet=np.concatenate(lds))
print(sum(len(l) for l in lds))
'''

DECODE_LOOP = r'''
import os, sys, numpy as np
from PIL import Image
out = sys.argv[2]
n = 0
for name in sorted(os.listdir(sys.argv[1])):
    if not name.endswith(".npz"):
        continue
    with np.load(os.path.join(sys.argv[1], name), allow_pickle=False) as z:
        logits, keys = z["logits"], z["keys"]
    for key, y in zip(keys, logits):
        p = 1.0 / (1.0 + np.exp(-y.astype(np.float64)))
        k = np.clip(np.floor((p - 0.025) / 0.95 * 256.0), 0, 255).astype(np.uint8)
        path = os.path.join(out, os.path.splitext(str(key))[0] + ".png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(k).save(path)
        n += 1
print(n)
'''

PER_IMAGE_LOOP = r'''
import os, sys, numpy as np
from PIL import Image
alpha, c = 0.05, 1.0
rng = np.random.default_rng(0)
ys, lds = [], []
for f in open(sys.argv[1]).read().splitlines():
    x = np.asarray(Image.open(f).convert("RGB"), np.float32)
    z = (x + c * rng.random(x.shape, np.float32)) / (255.0 + c)
    z = z * (1 - alpha) + alpha / 2
    y = np.log(z) - np.log1p(-z)
    lds.append(np.sum(np.logaddexp(0, y) + np.logaddexp(0, -y)) + y.size * np.log1p(-alpha))
    ys.append(y)
np.savez(sys.argv[2], logits=np.stack(ys), logdet=np.array(lds, np.float32))
print(len(ys))
'''


_KCMP = {"x86_64": 312, "aarch64": 272}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)


def _shares_memory(a: int, b: int) -> bool:
    """Whether two processes share one address space (kcmp KCMP_VM)."""
    return _KCMP is not None and _libc.syscall(_KCMP, a, b, 1, 0, 0) == 0


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc.

    A child that still shares its parent's address space (a vfork before
    exec: TensorFlow's import runs `uname -p` through subprocess) is counted
    once, not twice.
    """
    total, todo, seen = 0, [(pid, None)], set()
    while todo:
        p, parent = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            if parent is None or not _shares_memory(p, parent):
                with open(f"/proc/{p}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend((int(c), p) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def measure(name, argv, env=None):
    """(seconds, peak bytes of the process tree) of one fresh process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(p.pid))
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = p.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"{name} failed ({p.returncode}):\n{err[-3000:]}")
    return seconds, peak


def script(code):
    return [sys.executable, "-c", textwrap.dedent(code)]


def image_list(folder, work, name):
    """The files `logitify encode FOLDER` reads, in its order, as a list file for the baselines.

    Reading each once also gives every contender the same warm page cache.
    """
    items, _ = ImageFolder(folder).items()
    paths = [item.path for item in items]
    for f in paths:
        with open(f, "rb") as fh:
            fh.read()
    list_file = os.path.join(work, name)
    with open(list_file, "w") as f:
        f.write("\n".join(paths))
    return list_file, paths


def tenth_of(folder, paths, out):
    """Every tenth file of a folder, at the same relative paths (hard links where possible)."""
    for f in paths[::10]:
        dst = os.path.join(out, os.path.relpath(f, folder))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(f, dst)
        except OSError:
            shutil.copyfile(f, dst)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", help="a folder of images (default: build a photo-like corpus)")
    ap.add_argument("--count", type=int, default=50_000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--skip-slow", action="store_true", help="skip the per-image encode loop baseline")
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender; the median is reported")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="logitify-bench-")
    try:
        small = os.path.join(work, "small")
        if args.folder:
            big = args.folder
            files, paths = image_list(big, work, "files.txt")
            if not paths:
                raise SystemExit(f"no images in {big}")
            tenth_of(big, paths, small)
            print(f"folder: {len(paths)} images, and every tenth of them for the memory comparison", flush=True)
        else:
            from corpus import build

            big = os.path.join(work, "big")
            t = time.time()
            build(big, args.count, args.size, seed=0)
            build(small, max(1, args.count // 10), args.size, seed=1)
            files, paths = image_list(big, work, "files.txt")
            print(f"corpus: {args.count} + {args.count // 10} photo-like {args.size}x{args.size} PNGs "
                  f"in {time.time() - t:.1f} s", flush=True)
        n = len(paths)
        n_small = len(ImageFolder(small).items()[0])
        logitify = [sys.executable, "-m", "logitify_cli"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
        rows = {}

        def median_run(name, argv, out=None):
            """Median seconds and peak memory over --repeat fresh runs (timings drift by tens of %).

            `out` is removed before each run, outside the timing.
            """
            runs = []
            for _ in range(args.repeat):
                if out:
                    shutil.rmtree(out, ignore_errors=True)
                runs.append(measure(name, argv, env))
            runs.sort()
            return runs[len(runs) // 2][0], max(p for _, p in runs)

        def run(name, argv, out=None):
            s, peak = median_run(name, argv, out)
            rows[name] = (s, peak)
            print(f"{name:<34} {s:8.2f} s {n / s:10.0f} img/s {peak / 2**20:9.0f} MiB", flush=True)

        run("pillow decode floor (all cores)", script(PILLOW_FLOOR) + [files])
        run("tf.data + LogitifyImage formula", script(TFDATA_BASELINE) + [files, os.path.join(work, "tfdata.npz")])
        if not args.skip_slow:
            run("per-image Pillow+NumPy loop", script(PER_IMAGE_LOOP) + [files, os.path.join(work, "loop.npz")])
        enc_dir = os.path.join(work, "enc")
        run("logitify encode", logitify + ["encode", big, "-o", enc_dir, "-q"], out=enc_dir)
        run("logitify decode (PNG)", logitify + ["decode", enc_dir, "-o", os.path.join(work, "dec"), "-q"],
            out=os.path.join(work, "dec"))
        run("per-image decode loop (PNG)", script(DECODE_LOOP) + [enc_dir, os.path.join(work, "dec2")],
            out=os.path.join(work, "dec2"))
        small_dir = os.path.join(work, "enc_small")
        s, peak = median_run("small", logitify + ["encode", small, "-o", small_dir, "-q"], out=small_dir)
        rows["logitify encode (N/10)"] = (s, peak)
        print(f"{'logitify encode (N/10)':<34} {s:8.2f} s {n_small / s:10.0f} img/s {peak / 2**20:9.0f} MiB")

        enc, _ = rows["logitify encode"]
        ratios = {
            "encode / tf.data baseline (goal <= 0.55)": enc / rows["tf.data + LogitifyImage formula"][0],
            "encode / Pillow floor (goal <= 1.3)": enc / rows["pillow decode floor (all cores)"][0],
            "decode / per-image loop (goal <= 0.6)": rows["logitify decode (PNG)"][0] / rows["per-image decode loop (PNG)"][0],
        }
        if "per-image Pillow+NumPy loop" in rows:
            ratios["encode / per-image encode loop"] = enc / rows["per-image Pillow+NumPy loop"][0]
        ratios["encode peak memory, GiB (goal <= 1)"] = rows["logitify encode"][1] / 2**30
        ratios["peak(N) / peak(N/10) (goal <= 1.15)"] = rows["logitify encode"][1] / rows["logitify encode (N/10)"][1]
        print()
        for k, v in ratios.items():
            print(f"{k:<44} {v:6.2f}")
        print(json.dumps({"images": n, "seconds": {k: round(v[0], 3) for k, v in rows.items()},
                          "peak_mib": {k: round(v[1] / 2**20) for k, v in rows.items()},
                          "ratios": {k: round(v, 3) for k, v in ratios.items()}}))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
