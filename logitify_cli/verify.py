"""`logitify verify`: trust nothing a dataset folder says until it is checked.

Shards are read a slice at a time; with --against, each decoded image is
kept only as a digest until its source is read, so memory follows the slice
size and the number of keys, never the dataset's pixels.
"""
from __future__ import annotations

import hashlib
import math
import time

import numpy as np

from .dataset import LogitDataset
from .errors import LogitifyError
from .report import QUIET
from .results import VerifyResult

LOGDET_RTOL = 1e-4


def _logdet64(logits, alpha):
    y = logits.reshape(len(logits), -1).astype(np.float64)
    terms = np.logaddexp(0.0, y) + np.logaddexp(0.0, -y)
    return terms.sum(axis=1) + y.shape[1] * math.log1p(-alpha)


def _digest(img: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(img.shape).encode())
    h.update(np.ascontiguousarray(img).data)
    return h.digest()


def verify(path: str, against=None, report=QUIET) -> VerifyResult:
    t0 = time.time()
    ds = LogitDataset(path)
    params = ds.params
    problems = []
    checked = 0
    decoded = {} if against else None

    def problem(where, what):
        problems.append({"where": where, "problem": what})
        report.warn(f"{where}: {what}")

    seen = set()
    with report.bar(ds.num_examples, "verify") as bar:
        for shard in ds.shards:
            try:
                for chunk in ds.iter_chunks(shard, check=True, rows=2048):
                    keys, logits, logdet = chunk["keys"], chunk["logits"], chunk["logdet"]
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
                        for k, img in zip(keys, ds.inverse(logits)):
                            decoded[str(k)] = _digest(img)
                    checked += len(keys)
                    bar.update(len(keys))
            except LogitifyError as e:
                problem(shard.file, e.message)
    compared = _compare_sources(ds, against, decoded, problem) if against else 0
    result = VerifyResult(dataset=path, num_examples=checked, num_shards=len(ds.shards),
                          compared_with_sources=compared, problems=problems, seconds=round(time.time() - t0, 3),
                          against=bool(against))
    if problems:
        names = sorted({p["where"] for p in problems})
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise LogitifyError(f"{len(problems)} problem(s) in {path}: {shown}", result=result)
    return result


def _compare_sources(ds, sources, decoded, problem) -> int:
    """Read the sources as encode did (same size, channels, keys) and compare digests."""
    from .pixels import PixelStream
    from .planner import EncodeOptions
    from .pool import OrderedPool
    from .sources import discover

    src = ds.manifest.source
    size = tuple(src["size"]) if isinstance(src.get("size"), list) and len(src["size"]) == 2 else None
    channels = src.get("channels") if src.get("channels") in (1, 3, 4) else ds.shape[2]
    opts = EncodeOptions(sources=list(sources), out="", image_key=str(src.get("image_key", "image")),
                         label_key=str(src.get("label_key", "label")), size=size, channels=channels)
    if type(src.get("max_pixels")) is int and src["max_pixels"] > 0:
        opts.max_pixels = src["max_pixels"]
    inv = discover(opts.sources)
    skipped = {s["source"] for s in ds.manifest.skipped}
    shift = 8 - ds.params.bits
    compared = 0
    with OrderedPool(1) as pool:
        for it, _, arr, reason in PixelStream(inv.items, opts, channels, pool, int(np.prod(ds.shape))):
            if it.key not in decoded:
                if it.key not in skipped:
                    problem(it.key, "in the sources but not in the dataset")
                continue
            got = decoded.pop(it.key)
            if arr is None:
                problem(it.key, f"source cannot be read now: {reason}")
                continue
            want = (arr >> shift) << shift
            if want.shape != tuple(ds.shape):
                problem(it.key, f"the source gives shape {list(want.shape)}, the dataset {list(ds.shape)}")
            elif got != _digest(want) and ds.params.lossless:
                problem(it.key, "decoded image differs from its source")
            compared += 1
    for k in sorted(decoded):
        problem(k, "in the dataset but not found in the sources")
    return compared
