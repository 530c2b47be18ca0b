"""Peak memory of whole process trees: many small inputs, and reading a dataset back.

    python benchmarks/memory.py many [--count 1000000] [--work DIR]
    python benchmarks/memory.py readback [--count 50000] [--work DIR]
    python benchmarks/memory.py run -- logitify info out     # any one command

Each command runs as a fresh subprocess. Every ~50 ms the proportional set
size (PSS, from /proc/PID/smaps_rollup) of it and of every process below it
is summed: pages shared between a parent and its forked workers are counted
once, split between them, so the figure is what the tree costs the machine.
Reported per command: peak PSS and wall seconds. The kernel's own
high-water mark of each process's resident set is read too; when the
largest one exceeds the sampled peak (a loaded machine starved the
sampler), the line says so.

`many` writes COUNT 8x8 PNGs (one image's rows varied per file, written by
all cores) and links every tenth of them into a second folder; for both it
measures discovery alone (`sources.discover`, the first thing encode does)
and a whole `logitify encode`, and prints the ratio of the peaks. Memory
figures are steady from run to run; times on a shared machine are not.

`readback` builds COUNT photo-like 32x32 PNGs (benchmarks/corpus.py),
encodes them with the default shard size and with one shard for all, and
measures verify (with and without --against), info, info --plot, decode
(PNG and npz) and the loaders (lg.load, lg.load with fresh noise,
lg.iter_numpy) on each.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
INTERVAL = 0.05
CODE = [ROOT]  # the checkout whose logitify_cli is measured (--code)


def _pss(pid: int) -> int:
    """Proportional set size of one process in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _tree(pid: int) -> list:
    """A process and all its descendants, from /proc."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def tree_pss(pid: int) -> int:
    return sum(_pss(p) for p in _tree(pid))


def _hwm(pid: int) -> int:
    """The kernel's high-water mark of one process's resident set (VmHWM), in bytes.

    No sample can miss it: a check that the sampled PSS saw the largest
    process's peak (a loaded machine can starve the sampling thread).
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def measure(argv, env=None, cwd=None, stdin=None):
    """(wall seconds, peak PSS bytes of the process tree, stdout) of one fresh process."""
    env = {**os.environ, "PYTHONPATH": CODE[0] + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    t0 = time.perf_counter()
    # In the checkout measured: `python -m` and `python -c` put the working folder first on sys.path.
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin, text=True,
                         env=env, cwd=cwd or CODE[0])
    peak = hwm = 0
    done = threading.Event()

    def poll():
        nonlocal peak, hwm
        while not done.is_set():
            tree = _tree(p.pid)
            peak = max(peak, sum(_pss(q) for q in tree))
            hwm = max([hwm] + [_hwm(q) for q in tree])
            done.wait(INTERVAL)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = p.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}):\n{err[-3000:]}")
    if hwm > peak + (64 << 20):  # resident counts shared libraries whole, PSS in part
        print(f"  (one process of {' '.join(argv)[:60]} reached {hwm / 2**20:.0f} MiB resident, more than the "
              f"{peak / 2**20:.0f} MiB PSS sampled: a sample was missed, run it again)", flush=True)
    return seconds, peak, out


# -- many small PNGs ----------------------------------------------------------------------------

def _png(rows: bytes, w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))


def _where(root: str, i: int) -> str:
    """10 classes, folders of at most 1,000 files."""
    return os.path.join(root, f"c{i % 10}", f"{i // 10000:04d}", f"{i:07d}.png")


def _write_many(args):
    root, lo, hi = args
    side = 8
    base = bytearray()
    for y in range(side):
        base += b"\x00" + bytes((x * 29 + y * 53 + c * 71) % 256 for x in range(side) for c in range(3))
    made = set()
    for i in range(lo, hi):
        rows = bytearray(base)
        rows[1:5] = i.to_bytes(4, "little")  # every image differs in its first pixels
        path = _where(root, i)
        d = os.path.dirname(path)
        if d not in made:
            os.makedirs(d, exist_ok=True)
            made.add(d)
        with open(path, "wb") as f:
            f.write(_png(bytes(rows), side, side))
    return hi - lo


def build_many(root: str, count: int) -> None:
    step = 20_000
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as ex:
        list(ex.map(_write_many, [(root, a, min(count, a + step)) for a in range(0, count, step)]))


def link_tenth(root: str, count: int, out: str) -> int:
    made = 0
    for i in range(0, count, 10):
        src, dst = _where(root, i), _where(out, i)
        if made % 1000 == 0 or not os.path.isdir(os.path.dirname(dst)):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.link(src, dst)
        made += 1
    return made


DISCOVER = """
import sys
from logitify_cli.sources import discover
inv = discover(sys.argv[1:])
print(len(inv.items))
"""


def many(args, work):
    big, tenth = os.path.join(work, "many"), os.path.join(work, "tenth")
    if not os.path.isdir(big):
        t = time.time()
        build_many(big, args.count)
        print(f"wrote {args.count} 8x8 PNGs in {time.time() - t:.1f} s", flush=True)
    if not os.path.isdir(tenth):
        link_tenth(big, args.count, tenth)
    rows = {}
    logitify = [sys.executable, "-m", "logitify_cli"]
    for name, folder in (("N/10", tenth), ("N", big)):
        out = os.path.join(work, "enc-" + name.replace("/", ""))
        s, peak, found = measure([sys.executable, "-c", DISCOVER, folder])
        rows[f"discovery, {name}"] = (s, peak, int(found))
        shutil.rmtree(out, ignore_errors=True)
        s, peak, _ = measure(logitify + ["encode", folder, "-o", out, "-q"])
        rows[f"encode, {name}"] = (s, peak, int(found))
        shutil.rmtree(out, ignore_errors=True)
    report(rows)
    print(f"encode peak N / N/10: {rows['encode, N'][1] / rows['encode, N/10'][1]:.3f}")
    print(f"discovery peak N / N/10: {rows['discovery, N'][1] / rows['discovery, N/10'][1]:.3f}")
    return rows


# -- reading back ---------------------------------------------------------------------------------

LOAD = """
import sys, numpy as np
import logitify_cli as lg
kw = {"noise": "fresh"} if sys.argv[2] == "fresh" else {}
n = 0
for y, ld in lg.load(sys.argv[1], **kw).batch(256):
    n += int(y.shape[0]) + int(np.isnan(ld.numpy()).sum())
print(n)
"""

ITER_NUMPY = """
import sys
import logitify_cli as lg
n = 0
for d in lg.iter_numpy(sys.argv[1]):
    n += len(d["logits"])
print(n)
"""


def readback(args, work):
    from corpus import build

    src = os.path.join(work, "photos")
    if not os.path.isdir(src):
        build(src, args.count, 32, seed=0)
    logitify = [sys.executable, "-m", "logitify_cli"]
    rows = {}
    for layout, extra in (("default shards", []), ("one shard", ["--shard-size", str(args.count)])):
        if args.layout and layout not in args.layout:
            continue
        enc = os.path.join(work, "enc-" + layout.replace(" ", "-"))
        shutil.rmtree(enc, ignore_errors=True)
        rows[f"encode, {layout}"] = measure(logitify + ["encode", src, "-o", enc, "-q"] + extra)[:2]
        print_row(f"encode, {layout}", *rows[f"encode, {layout}"], flush=True)
        dec = os.path.join(work, "dec")
        for name, argv in (
            ("verify", ["verify", enc, "-q"]),
            ("verify --against", ["verify", enc, "--against", src, "-q"]),
            ("info", ["info", enc, "--json"]),
            ("info --plot", ["info", enc, "--plot", os.path.join(work, "plot.png"), "--json"]),
            ("decode (PNG)", ["decode", enc, "-o", dec, "-q"]),
            ("decode -f npz", ["decode", enc, "-o", dec, "-f", "npz", "-q"]),
        ):
            if args.only and name not in args.only:
                continue
            shutil.rmtree(dec, ignore_errors=True)
            rows[f"{name}, {layout}"] = measure(logitify + argv)[:2]
            print_row(f"{name}, {layout}", *rows[f"{name}, {layout}"], flush=True)
        shutil.rmtree(dec, ignore_errors=True)
        for name, argv in (("lg.load", [LOAD, enc, "stored"]), ("lg.load fresh", [LOAD, enc, "fresh"]),
                           ("lg.iter_numpy", [ITER_NUMPY, enc])):
            if args.only and name not in args.only:
                continue
            rows[f"{name}, {layout}"] = measure([sys.executable, "-c"] + argv)[:2]
            print_row(f"{name}, {layout}", *rows[f"{name}, {layout}"], flush=True)
    return rows


def print_row(name, seconds, peak, *rest, flush=False):
    print(f"{name:<40} {seconds:8.2f} s {peak / 2**20:9.0f} MiB", flush=flush)


def report(rows):
    for name, (s, peak, *rest) in rows.items():
        print_row(name, s, peak)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=("many", "readback", "run"))
    ap.add_argument("command", nargs=argparse.REMAINDER, help="with `run`: the command to measure, after --")
    ap.add_argument("--count", type=int, help="images (many: 1,000,000; readback: 50,000)")
    ap.add_argument("--work", help="work folder, kept (default: a temporary one, removed at the end)")
    ap.add_argument("--only", action="append", help="readback: only these commands (e.g. --only info)")
    ap.add_argument("--code", help="measure the logitify_cli of this checkout (default: this one), "
                                   "e.g. another branch's, for a before/after comparison")
    ap.add_argument("--layout", action="append", choices=("default shards", "one shard"),
                    help="readback: only this shard layout")
    args = ap.parse_args()
    if args.code:
        CODE[0] = os.path.abspath(args.code)
    if args.workload == "run":
        s, peak, _ = measure(args.command[1:] if args.command[:1] == ["--"] else args.command, cwd=os.getcwd())
        print_row(" ".join(args.command)[:40], s, peak)
        return
    args.count = args.count or (1_000_000 if args.workload == "many" else 50_000)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="logitify-memory-"))
    os.makedirs(work, exist_ok=True)
    try:
        rows = (many if args.workload == "many" else readback)(args, work)
        if args.workload == "readback":
            print()
            report(rows)
        print(json.dumps({"workload": args.workload, "count": args.count,
                          "seconds": {k: round(v[0], 2) for k, v in rows.items()},
                          "peak_mib": {k: round(v[1] / 2**20) for k, v in rows.items()}}))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
