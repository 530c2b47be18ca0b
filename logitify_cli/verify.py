"""`logitify verify`: trust nothing a dataset folder says until it is checked.

Shards are read a slice at a time; with --against, each decoded image is
kept only as a digest until its source is read, so memory follows the slice
size and the number of keys, never the dataset's pixels.
"""
from __future__ import annotations

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
    """The image's pixel digest, as the fingerprint takes it (sha256 of shape and pixels)."""
    from .fingerprint import image_digest

    return image_digest(img)


def verify(path: str, against=None, report=QUIET) -> VerifyResult:
    t0 = time.time()
    ds = LogitDataset(path)
    params = ds.params
    problems = []
    checked = 0
    decoded = {} if against else None
    # The fingerprint, recomputed from the decoded images where they are the
    # encoded pixels (lossless), and from the sources with --against.
    want_fp = ds.manifest.fingerprint
    pixel_digests = [] if want_fp is not None and params.lossless else None
    shard_failed = False

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
                    if decoded is not None or pixel_digests is not None:
                        safe = logits if finite.all() else np.where(np.isfinite(logits), logits, 0)  # (reported above)
                        for k, img in zip(keys, ds.inverse(safe)):
                            d = _digest(img)
                            if decoded is not None:
                                decoded[str(k)] = d
                            if pixel_digests is not None:
                                pixel_digests.append(d)
                    checked += len(keys)
                    bar.update(len(keys))
            except LogitifyError as e:
                problem(shard.file, e.message)
                shard_failed = True
    source_digests = [] if want_fp is not None else None
    compared = _compare_sources(ds, against, decoded, problem, source_digests) if against else 0
    fingerprint = None
    if want_fp is not None and not shard_failed:
        fingerprint = _check_fingerprint(want_fp, seen, pixel_digests, source_digests if against else None,
                                         ds.num_examples, problem)
    result = VerifyResult(dataset=path, num_examples=checked, num_shards=len(ds.shards),
                          compared_with_sources=compared, problems=problems, seconds=round(time.time() - t0, 3),
                          against=bool(against), fingerprint=fingerprint)
    if problems:
        names = sorted({p["where"] for p in problems})
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise LogitifyError(f"{len(problems)} problem(s) in {path}: {shown}", result=result)
    return result


def _check_fingerprint(want, keys, decoded_digests, source_digests, count, problem) -> dict:
    """Recompute the manifest's fingerprint (keys; pixels from the decoded images and the sources), report a mismatch.

    Returns what was recomputed: {keys_sha256, pixels_sha256 (decoded, or
    None when the dataset is lossy), sources_pixels_sha256 (with --against,
    or None)}.
    """
    from .fingerprint import keys_sha256, pixels_sha256

    out = {"keys_sha256": keys_sha256(keys), "pixels_sha256": None, "sources_pixels_sha256": None}
    if out["keys_sha256"] != want["keys_sha256"]:
        problem("fingerprint", f"keys_sha256 of the shards' keys is {out['keys_sha256']}, "
                               f"the manifest says {want['keys_sha256']}")
    for name, digests, where in (("pixels_sha256", decoded_digests, "the decoded images"),
                                 ("sources_pixels_sha256", source_digests, "the sources")):
        if digests is None or len(digests) != count:  # (a missing image is reported already)
            continue
        out[name] = pixels_sha256(b"".join(digests))
        if out[name] != want["pixels_sha256"]:
            problem("fingerprint", f"pixels_sha256 of {where} is {out[name]}, the manifest says {want['pixels_sha256']}")
    return out


def _compare_sources(ds, sources, decoded, problem, digests=None) -> int:
    """Read the sources as encode did (same geometry, channels, keys) and compare digests.

    The digest of each source image found in the dataset is appended to `digests`, if given.
    """
    from .pixels import PixelStream
    from .planner import EncodeOptions
    from .pool import OrderedPool
    from .sources import discover

    src = ds.manifest.source
    size = tuple(src["size"]) if isinstance(src.get("size"), list) and len(src["size"]) == 2 else None
    channels = src.get("channels") if src.get("channels") in (1, 3, 4) else ds.shape[2]
    opts = EncodeOptions(sources=list(sources), out="", image_key=str(src.get("image_key", "image")),
                         label_key=str(src.get("label_key", "label")), size=size, channels=channels,
                         resize_mode=src.get("resize_mode") or "stretch", filter=src.get("filter") or "bicubic",
                         crop=tuple(src["crop"]) if src.get("crop") else None)
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
            if digests is not None:
                digests.append(_digest(want))
            if want.shape != tuple(ds.shape):
                problem(it.key, f"the source gives shape {list(want.shape)}, the dataset {list(ds.shape)}")
            elif got != _digest(want) and ds.params.lossless:
                problem(it.key, "decoded image differs from its source")
            compared += 1
    for k in sorted(decoded):
        problem(k, "in the dataset but not found in the sources")
    return compared
