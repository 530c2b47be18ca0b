"""`logitify verify`: trust nothing a dataset folder says until it is checked."""
from __future__ import annotations

import math
import time

import numpy as np

from .dataset import LogitDataset
from .errors import LogitifyError

LOGDET_RTOL = 1e-4


def _logdet64(logits, alpha):
    y = logits.reshape(len(logits), -1).astype(np.float64)
    terms = np.logaddexp(0.0, y) + np.logaddexp(0.0, -y)
    return terms.sum(axis=1) + y.shape[1] * math.log1p(-alpha)


def verify(path: str, against=None, report=None) -> dict:
    t0 = time.time()
    ds = LogitDataset(path)
    params = ds.params
    problems = []
    checked = 0
    decoded = {} if against else None

    def problem(where, what):
        problems.append({"where": where, "problem": what})
        if report:
            report.warn(f"{where}: {what}")

    seen = set()
    bar = report.bar(ds.num_examples, "verify") if report else None
    for shard in ds.manifest["shards"]:
        try:
            arrays = ds.read_shard(shard, check=True)
        except LogitifyError as e:
            problem(shard["file"], str(e))
            continue
        keys, logits, logdet = arrays["keys"], arrays["logits"], arrays["logdet"]
        finite = np.isfinite(logits.reshape(len(keys), -1)).all(axis=1) & np.isfinite(logdet)
        for k in keys[~finite]:
            problem(str(k), "logits or log-det not finite")
        ref = _logdet64(np.where(np.isfinite(logits), logits, 0), params.alpha)
        off = np.abs(logdet.astype(np.float64) - ref) > LOGDET_RTOL * np.maximum(1.0, np.abs(ref))
        for k in keys[off & finite]:
            problem(str(k), "stored log-det does not match its logits")
        for k in keys:
            if str(k) in seen:
                problem(str(k), "key appears twice")
            seen.add(str(k))
        if decoded is not None:
            imgs = ds.inverse(logits)
            for k, img in zip(keys, imgs):
                decoded[str(k)] = img
        checked += len(keys)
        if bar:
            bar.update(len(keys))
    if bar:
        bar.close()
    compared = 0
    if against:
        compared = _compare_sources(ds, against, decoded, problem)
    summary = {
        "command": "verify",
        "dataset": path,
        "num_examples": checked,
        "num_shards": len(ds.manifest["shards"]),
        "compared_with_sources": compared,
        "problems": problems,
        "ok": not problems,
        "seconds": round(time.time() - t0, 3),
    }
    if problems:
        names = sorted({p["where"] for p in problems})
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise LogitifyError(f"{len(problems)} problem(s) in {path}: {shown}", summary)
    summary["message"] = f"{path}: {checked} examples in {summary['num_shards']} shard(s) verified" + (
        f", {compared} equal to their sources bit for bit" if against else "")
    return summary


def _compare_sources(ds, sources, decoded, problem) -> int:
    from .pipeline import DecodeStream, EncodeOptions, OrderedPool
    from .sources import discover

    src = ds.manifest.get("source") or {}
    size = tuple(src["size"]) if src.get("size") else None
    channels = src.get("channels") or ds.shape[2]
    opts = EncodeOptions(sources=list(sources), out="", image_key=src.get("image_key", "image"),
                         label_key=src.get("label_key", "label"), size=size, channels=channels)
    if src.get("max_pixels"):
        opts.max_pixels = src["max_pixels"]
    inv = discover(opts.sources)
    skipped = {s["source"] for s in ds.manifest.get("skipped", [])}
    shift = 8 - ds.params.bits
    compared = 0
    with OrderedPool(1) as pool:
        for it, _, arr, reason in DecodeStream(inv.items, opts, channels, size, pool, int(np.prod(ds.shape))):
            if it.key not in decoded:
                if it.key not in skipped:
                    problem(it.key, "in the sources but not in the dataset")
                continue
            got = decoded.pop(it.key)
            if arr is None:
                problem(it.key, f"source cannot be read now: {reason}")
                continue
            want = (arr >> shift) << shift
            if got.shape != want.shape:
                problem(it.key, f"shape {list(got.shape)} but the source gives {list(want.shape)}")
            elif not np.array_equal(got, want):
                if ds.params.lossless:
                    problem(it.key, f"decoded image differs from its source in {int((got != want).sum())} values")
            compared += 1
    for k in sorted(decoded):
        problem(k, "in the dataset but not found in the sources")
    return compared
