"""Real-photo workloads against their floors and peers, all in one run.

    python benchmarks/bench_photos.py                       # 10,000 JPEGs and 50,000 32x32 PNGs
    python benchmarks/bench_photos.py --count 2000 --png-count 10000 --repeat 2

Corpora come from photos.py (real photographs with a clear licence). Every
contender is a fresh process (so each pays its own start-up), and the
median of --repeat runs is reported with the spread of the runs, then:

  JPEG  encode --size 64x64 --filter box / Pillow decode+BOX floor (goal <= 1.15)
        the same / tf.data (decode_jpeg, resize "area", formula, np.savez)      (goal <= 0.8)
  draft encode ... --jpeg-draft / Pillow draft+BOX floor                       (goal <= 1.15)
        the same / the tf.data pipeline                                        (goal <= 0.5)
  PNG   encode (32x32) / Pillow decode floor (goal <= 1.3), / tf.data (goal <= 0.55)
  decode to PNG / per-image decode loop                                        (goal <= 0.5)

Each line also gives the median core-seconds (user + system CPU of the
process and of the workers it waited for), and the encodes' core-seconds
are compared with their floors': those move far less than wall seconds
when a shared machine's speed swings.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench import DECODE_LOOP, PILLOW_FLOOR, TFDATA_BASELINE, image_list, measure, script  # noqa: E402

# Pillow alone: decode and BOX-resize every file to 64x64 on all cores (with DRAFT, after Pillow's draft()).
JPEG_FLOOR = r'''
import os, sys, numpy as np
from concurrent.futures import ProcessPoolExecutor
from PIL import Image
DRAFT = sys.argv[2] == "draft"

def dec(paths):
    out = []
    for p in paths:
        im = Image.open(p)
        if DRAFT:
            im.draft("RGB", (64, 64))
        out.append(np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BOX, reducing_gap=None)))
    return np.stack(out)

if __name__ == "__main__":
    files = open(sys.argv[1]).read().splitlines()
    chunks = [files[i:i + 64] for i in range(0, len(files), 64)]
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as ex:
        n = sum(len(a) for a in ex.map(dec, chunks))
    print(n)
'''

# The plain tf.data pipeline: decode_jpeg, resize "area" to 64x64, TFGENZOO's formula, one np.savez.
JPEG_TFDATA = TFDATA_BASELINE.replace(
    'decode = lambda f: tf.io.decode_image(tf.io.read_file(f), channels=3, expand_animations=False)',
    'decode = lambda f: tf.cast(tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(f), channels=3), '
    '(64, 64), "area"), tf.uint8)')
assert JPEG_TFDATA != TFDATA_BASELINE


def measure_cpu(name, argv, env):
    """measure() and the CPU seconds (user + system) of the process and the workers it waited for.

    Core-seconds move far less than wall seconds when the machine's speed
    swings, and show what each contender costs beyond the floor.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, peak = measure(name, argv, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, peak, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10_000, help="photo-size JPEGs")
    ap.add_argument("--png-count", type=int, default=50_000, help="32x32 PNGs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=["jpeg", "png"], help="run one workload")
    ap.add_argument("--keep", help="build (or reuse) the corpora in this folder and keep them")
    args = ap.parse_args()
    from photos import build

    work = tempfile.mkdtemp(prefix="logitify-photos-")
    corpora = args.keep or work
    logitify = [sys.executable, "-m", "logitify_cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    rows, ratios = {}, {}

    def run(name, argv, n, out=None):
        runs = []
        for k in range(args.repeat):
            # Each run writes a folder of its own: removing 50,000 files just before writing as many into
            # the same folder cost the kernel several times the writing itself on some days.
            fresh = f"{out}-{k}" if out else None
            runs.append(measure_cpu(name, [fresh if a == out and out else a for a in argv], env))
        if out:  # outside the measurements: the last run's folder is the one later workloads read
            shutil.rmtree(out, ignore_errors=True)
            if os.path.isdir(f"{out}-{args.repeat - 1}"):
                os.replace(f"{out}-{args.repeat - 1}", out)
            for k in range(args.repeat - 1):
                shutil.rmtree(f"{out}-{k}", ignore_errors=True)
        secs = [s for s, _, _ in runs]
        med = statistics.median(secs)
        cpu = statistics.median(c for _, _, c in runs)
        rows[name] = {"median_s": round(med, 3), "runs_s": [round(s, 3) for s in secs],
                      "peak_mib": round(max(p for _, p, _ in runs) / 2**20), "core_s": round(cpu, 2)}
        print(f"{name:<40} {med:8.2f} s  ({min(secs):.2f}-{max(secs):.2f}) {n / med:9.0f} img/s "
              f"{rows[name]['peak_mib']:7d} MiB {cpu:7.1f} core-s", flush=True)
        return med

    try:
        if args.only in (None, "jpeg"):
            jdir = os.path.join(corpora, f"jpeg-{args.count}")
            if not os.path.isdir(jdir):
                t = time.time()
                build("jpeg", jdir, args.count)
                print(f"corpus: {args.count} real-photo JPEGs of about 500x375 in {time.time() - t:.1f} s")
            files, paths = image_list(jdir, work, "jpegs.txt")
            n = len(paths)
            enc = os.path.join(work, "enc-jpeg")
            geo = ["--size", "64x64", "--filter", "box"]
            floor = run("JPEG: Pillow decode+BOX floor", script(JPEG_FLOOR) + [files, "exact"], n)
            tfd = run("JPEG: tf.data pipeline", script(JPEG_TFDATA) + [files, os.path.join(work, "t.npz")], n)
            e = run("JPEG: logitify encode", logitify + ["encode", jdir, "-o", enc, "-q", *geo], n, enc)
            dfloor = run("JPEG: Pillow draft+BOX floor", script(JPEG_FLOOR) + [files, "draft"], n)
            d = run("JPEG: logitify encode --jpeg-draft", logitify + ["encode", jdir, "-o", enc, "-q", *geo,
                                                                       "--jpeg-draft"], n, enc)
            ratios.update({"JPEG encode / Pillow floor (goal <= 1.15)": e / floor,
                           "JPEG encode / tf.data (goal <= 0.8)": e / tfd,
                           "draft encode / draft floor (goal <= 1.15)": d / dfloor,
                           "draft encode / tf.data (goal <= 0.5)": d / tfd,
                           "draft floor / exact floor": dfloor / floor})
        if args.only in (None, "png"):
            pdir = os.path.join(corpora, f"png-{args.png_count}")
            if not os.path.isdir(pdir):
                t = time.time()
                build("png", pdir, args.png_count)
                print(f"corpus: {args.png_count} real-photo 32x32 PNGs in {time.time() - t:.1f} s")
            files, paths = image_list(pdir, work, "pngs.txt")
            n = len(paths)
            enc = os.path.join(work, "enc-png")
            floor = run("PNG: Pillow decode floor", script(PILLOW_FLOOR) + [files], n)
            tfd = run("PNG: tf.data pipeline", script(TFDATA_BASELINE) + [files, os.path.join(work, "t.npz")], n)
            e = run("PNG: logitify encode", logitify + ["encode", pdir, "-o", enc, "-q"], n, enc)
            dec, loop = os.path.join(work, "dec"), os.path.join(work, "loop")
            d = run("PNG: logitify decode (PNG)", logitify + ["decode", enc, "-o", dec, "-q"], n, dec)
            lp = run("PNG: per-image decode loop", script(DECODE_LOOP) + [enc, loop], n, loop)
            ratios.update({"PNG encode / Pillow floor (goal <= 1.3)": e / floor,
                           "PNG encode / tf.data (goal <= 0.55)": e / tfd,
                           "decode / per-image loop (goal <= 0.5)": d / lp})
        core = {k: v["core_s"] for k, v in rows.items()}
        for label, a, b in (("JPEG encode core-s / floor core-s", "JPEG: logitify encode", "JPEG: Pillow decode+BOX floor"),
                            ("draft encode core-s / draft floor core-s", "JPEG: logitify encode --jpeg-draft",
                             "JPEG: Pillow draft+BOX floor"),
                            ("PNG encode core-s / floor core-s", "PNG: logitify encode", "PNG: Pillow decode floor")):
            if a in core and core[b]:
                ratios[label] = core[a] / core[b]
        print()
        for k, v in ratios.items():
            print(f"{k:<46} {v:6.2f}")
        print(json.dumps({"runs": rows, "ratios": {k: round(v, 3) for k, v in ratios.items()},
                          "load": os.getloadavg()}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
