"""`logitify verify`: trust nothing a dataset folder says until it is checked.

Shards are read a slice at a time, and each slice's logits are checked in
blocks (transform.LOG_DET_BLOCK), so memory follows the slice size whatever
one image's size is. Keys are remembered as 8-byte hashes (on disk past HASHES_HELD) to
find duplicates; only the first PROBLEMS_LISTED problems are kept and
printed one by one, the rest are counted. With --against, each decoded
image is kept only as a digest until its source is read.
"""
from __future__ import annotations

import os
import re
import time

import numpy as np

from .dataset import LogitDataset, split_names
from .fingerprint import DigestSet, KeySet
from .images import ImageSizeMismatch
from .spill import SpillBuckets
from .splits import outside_classes
from .transform import forward_log_det_numpy
from .formats.base import chunk_rows
from .errors import LogitifyError
from .report import QUIET
from .results import VerifyResult

LOGDET_RTOL = 1e-4
BLOCK_VALUES = 1 << 18  # key characters hashed at a time (the logits' blocks: transform.LOG_DET_BLOCK)
VERIFY_SLICE_BYTES = 8 << 20  # logits checked (and inverted) at a time
PROBLEMS_LISTED = 1000  # problems kept and printed by name; more are counted
HASHES_HELD = 1 << 22  # key hashes held in memory (32 MB) before they go to disk
BUCKETS = 64


def _digest(img: np.ndarray) -> bytes:
    """An image's digest, as the fingerprint defines it (shape and uint8 pixels)."""
    from .fingerprint import image_digest

    return image_digest(img)


class KeyHashes:
    """Which keys occur more than once, in bounded memory.

    Each key is kept as a 64-bit hash, keyed afresh in each process so no
    dataset can be made to collide; past HASHES_HELD hashes they are
    spread over BUCKETS buckets in a temporary file with no name (spill.py),
    and each bucket is sorted on its own at the end.
    """

    def __init__(self):
        seed = np.frombuffer(os.urandom(16), np.uint64)
        self._rng = np.random.Generator(np.random.PCG64(int(seed[0]) << 64 | int(seed[1])))
        self._mult = np.zeros(0, np.uint64)
        self._parts, self._held = [], 0
        self._spilled = None

    def hashes(self, keys) -> np.ndarray:
        keys = np.ascontiguousarray(keys)
        n = len(keys)
        if not n:
            return np.zeros(0, np.uint64)
        chars = keys.view(np.uint32).reshape(n, -1)
        if chars.shape[1] > len(self._mult):
            extra = self._rng.integers(1, 1 << 63, chars.shape[1] - len(self._mult), dtype=np.uint64)
            self._mult = np.concatenate([self._mult, extra * np.uint64(2) + np.uint64(1)])
        width = chars.shape[1]
        mult = self._mult[:width]
        h = np.empty(n, np.uint64)
        step = max(1, BLOCK_VALUES // width)
        with np.errstate(over="ignore"):
            for a in range(0, n, step):  # a zero (padding) adds nothing: hashes ignore the array's width
                h[a:a + step] = (chars[a:a + step].astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)
            h ^= h >> np.uint64(31)
            h *= np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
        return h

    def add(self, keys) -> None:
        h = self.hashes(keys)
        self._parts.append(h)
        self._held += len(h)
        if self._held >= HASHES_HELD:
            self._spill()

    def _spill(self) -> None:
        if self._spilled is None:
            self._spilled = SpillBuckets(BUCKETS)
        h = np.concatenate(self._parts) if self._parts else np.zeros(0, np.uint64)
        self._parts, self._held = [], 0
        bucket = (h >> np.uint64(58)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")
        h, bucket = h[order], bucket[order]
        bounds = np.searchsorted(bucket, np.arange(BUCKETS + 1))
        for i in range(BUCKETS):
            if bounds[i] < bounds[i + 1]:
                self._spilled.add(i, h[bounds[i]:bounds[i + 1]].data)

    def repeated(self):
        """(hashes seen more than once, sorted; how many occurrences are repeats)."""
        try:
            if self._spilled is None:
                groups = [np.concatenate(self._parts) if self._parts else np.zeros(0, np.uint64)]
            else:
                self._spill()
                groups = (np.frombuffer(bucket, np.uint64) for bucket in self._spilled.each())
            found, repeats = [], 0
            for h in groups:
                h = np.sort(h)
                same = h[1:] == h[:-1]
                repeats += int(same.sum())
                found.append(np.unique(h[1:][same]))
            return (np.concatenate(found) if found else np.zeros(0, np.uint64)), repeats
        finally:
            self.close()

    def close(self) -> None:
        self._parts = []
        if self._spilled is not None:
            self._spilled.close()
            self._spilled = None


class KeyedDigests:
    """{key: decoded image's digest} for --against, in bounded memory.

    Past HELD entries they move to SQLite's private temporary database
    (keys as their UTF-8 bytes, whose order is the keys' order), whose file
    SQLite unlinks as it opens it: nothing is left by a killed run.
    """

    HELD = 1 << 18

    def __init__(self):
        self._mem, self._db = {}, None

    def update(self, pairs) -> None:
        if self._db is None:
            self._mem.update(pairs)
            if len(self._mem) > self.HELD:
                self._to_disk()
        else:
            self._db.executemany("INSERT OR REPLACE INTO d VALUES (?, ?)", ((_utf8(k), v) for k, v in pairs))

    def _to_disk(self) -> None:
        import sqlite3

        self._db = sqlite3.connect("")  # "": a temporary on-disk database, deleted on close
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("CREATE TABLE d (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")
        self._db.executemany("INSERT INTO d VALUES (?, ?)", ((_utf8(k), v) for k, v in self._mem.items()))
        self._mem = {}

    def pop(self, key: str):
        """The digest of `key`, removed; None if it is not (or no longer) here."""
        if self._db is None:
            return self._mem.pop(key, None)
        k = _utf8(key)
        row = self._db.execute("SELECT v FROM d WHERE k = ?", (k,)).fetchone()
        if row is not None:
            self._db.execute("DELETE FROM d WHERE k = ?", (k,))
        return None if row is None else row[0]

    def remaining(self):
        """The keys never popped, in order."""
        if self._db is None:
            yield from sorted(self._mem)
            return
        for (k,) in self._db.execute("SELECT k FROM d ORDER BY k"):
            yield k.decode("utf-8", "surrogatepass")

    def close(self) -> None:
        self._mem = {}
        if self._db is not None:
            self._db.close()
            self._db = None


def _utf8(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


class BadLabels:
    """Labels of one shard that name none of the dataset's classes, gathered slice by slice.

    Encode writes a class's index, or -1 for an image without one; any other
    value would be shown and trained on as a class the dataset does not have.
    """

    NAMED = 5  # distinct values named in the problem line; the examples are all counted

    def __init__(self, classes: int):
        self.classes = classes
        self.values, self.more, self.count = set(), False, 0

    def add(self, labels) -> None:
        bad = labels[outside_classes(labels, self.classes)]
        if not len(bad):
            return
        self.count += len(bad)
        for v in np.unique(bad).tolist():
            if v in self.values:
                continue
            if len(self.values) < self.NAMED:
                self.values.add(v)
            else:
                self.more = True

    def message(self) -> str:
        values = ", ".join(map(str, sorted(self.values))) + (" and more" if self.more else "")
        return (f"{self.count} label(s) name none of the {self.classes} classes "
                f"(0 to {self.classes - 1}, or -1 for none): {values}")


class Problems:
    """The problems found: the first PROBLEMS_LISTED by name (and on stderr), the rest counted."""

    def __init__(self, report):
        self.report = report
        self.listed = []
        self.count = 0

    prefix = ""  # "split: " when several splits are verified

    def __call__(self, where, what) -> None:
        where = self.prefix + where
        self.count += 1
        if len(self.listed) < PROBLEMS_LISTED:
            self.listed.append({"where": where, "problem": what})
            self.report.warn(f"{where}: {what}")

    @property
    def full(self) -> bool:
        return len(self.listed) >= PROBLEMS_LISTED


def _check_class_folders(classes, problem) -> None:
    """Each class must name a folder of its own decode can put its images in: the rule encode applies."""
    from .outputs import class_folder_problems

    for reason in class_folder_problems(classes):
        problem("classes", reason)


def verify(path: str, against=None, report=QUIET, split: str | None = None) -> VerifyResult:
    """Every split (or the one named); --against compares one split with its sources, so it needs the split named."""
    held = []  # digest and key sets, whose files on disk go however verify ends
    try:
        return _verify(path, against, report, split, held)
    finally:
        for x in held:
            x.close()


def _verify(path: str, against, report, split, held: list) -> VerifyResult:
    from .errors import UsageError

    t0 = time.time()
    names = split_names(path) if split is None else [split]
    if against and len(names) > 1:
        raise UsageError(f"{path} has the splits {', '.join(names)}: --against compares one split with its "
                         "sources; name it with --split")
    problem = Problems(report)
    checked = found = shards = 0
    fingerprints = {}
    elsewhere = _OtherSplits(path, names, held) if against else None
    for i, name in enumerate(names):
        ds = LogitDataset(path, name)
        if i == 0:  # the classes are the dataset's, one list for every split
            _check_class_folders(ds.classes, problem)
        problem.prefix = f"{name}: " if len(names) > 1 else ""
        c, k, fp = _verify_split(ds, against, report, problem, held, elsewhere)
        checked, found, shards = checked + c, found + k, shards + len(ds.shards)
        fingerprints[name] = fp
    lossless = ds.params.lossless  # one transform for every split
    if problem.count > len(problem.listed):
        report.warn(f"... and {problem.count - len(problem.listed)} more problem(s), not listed")
    result = VerifyResult(dataset=path, num_examples=checked, num_shards=shards,
                          compared_with_sources=found if lossless else 0, sources_found=found, lossless=lossless,
                          problems=problem.listed, seconds=round(time.time() - t0, 3),
                          against=bool(against), num_problems=problem.count,
                          fingerprint=fingerprints[names[0]] if len(names) == 1 else None,
                          splits={n: fingerprints[n] for n in names} if len(names) > 1 else None)
    if problem.count:
        names = sorted({p["where"] for p in problem.listed})
        shown = ", ".join(names[:10]) + (" and more" if len(names) > 10 or problem.count > len(problem.listed) else "")
        raise LogitifyError(f"{problem.count} problem(s) in {path}: {shown}", result=result)
    return result


class _OtherSplits:
    """The keys of the dataset's other splits, read at the first source this split lacks.

    Sources of theirs (--holdout's share, say) are not missing from the
    dataset. Where every source is in the split, nothing more is read; a
    shard of theirs that cannot be read adds no keys (verifying that split
    says what is wrong with it).
    """

    def __init__(self, path: str, names: list, held: list):
        self.path, self.names, self.held, self.keys = path, names, held, None

    def pop(self, key: str):
        if self.keys is None:
            self.keys = KeyedDigests()
            self.held.append(self.keys)
            for name in split_names(self.path):
                if name not in self.names:
                    self._add(LogitDataset(self.path, name))
        return self.keys.pop(key)

    def _add(self, ds) -> None:
        # Its skipped inputs too: a source that split could not read is the other split's, not missing here.
        self.keys.update((str(s["source"]), b"") for s in ds.manifest.skipped if isinstance(s, dict))
        for shard in ds.shards:
            try:
                for chunk in ds.iter_chunks(shard, check=True, fields=("keys",)):
                    self.keys.update((str(k), b"") for k in chunk["keys"])
            except LogitifyError:
                continue


def _verify_split(ds, against, report, problem, held: list, elsewhere=None):
    """(examples checked, sources found, recomputed fingerprint) of one split; problems go to `problem`."""
    params = ds.params
    checked = 0
    decoded = KeyedDigests() if against else None
    held += [decoded] if decoded is not None else []
    # The fingerprint, recomputed from the decoded images where they are the
    # encoded pixels (lossless), and from the sources with --against.
    want_fp = ds.manifest.fingerprint
    pixel_digests = DigestSet() if want_fp is not None and params.lossless else None
    fp_keys = KeySet() if want_fp is not None else None
    held += [x for x in (pixel_digests, fp_keys) if x is not None]
    shard_failed = False
    rows = chunk_rows(ds.shape, VERIFY_SLICE_BYTES)  # each slice is also inverted: smaller than a reader's default
    keys_seen = KeyHashes()
    try:
        with report.bar(ds.num_examples, "verify") as bar:
            for shard in ds.shards:
                labels = BadLabels(len(ds.classes)) if ds.classes is not None else None  # none: labels are free
                try:
                    for chunk in ds.iter_chunks(shard, check=True, rows=rows, records=True):
                        keys, logits, logdet = chunk["keys"], chunk["logits"], chunk["logdet"]
                        if labels is not None:
                            labels.add(chunk["labels"])
                        finite, ref = forward_log_det_numpy(logits, params.alpha, np.isfinite(logdet))
                        for k in keys[~finite]:
                            problem(str(k), "logits or log-det not finite")
                        off = np.abs(logdet.astype(np.float64) - ref) > LOGDET_RTOL * np.maximum(1.0, np.abs(ref))
                        for k in keys[off & finite]:
                            problem(str(k), "stored log-det does not match its logits")
                        keys_seen.add(keys)
                        if fp_keys is not None:
                            fp_keys.add(keys.tolist())
                        if decoded is not None and not params.lossless:
                            # Lossy: decoded images are not the encoded pixels, and are compared with
                            # nothing; the sources are looked for by key only.
                            decoded.update((k, b"") for k in keys.tolist())
                        elif decoded is not None or pixel_digests is not None:
                            safe = logits if finite.all() else np.where(np.isfinite(logits), logits, 0)  # (reported)
                            digests = [_digest(img) for img in ds.inverse(safe)]
                            if decoded is not None:
                                decoded.update(zip(keys.tolist(), digests))
                            if pixel_digests is not None:
                                pixel_digests.add(b"".join(digests))
                            del digests
                        checked += len(keys)
                        bar.update(len(keys))
                        del chunk, keys, logits, logdet  # before the next slice is read
                except LogitifyError as e:
                    problem(shard.file, e.message)
                    shard_failed = True
                if labels is not None and labels.count:
                    problem(shard.file, labels.message())
        repeated, repeats = keys_seen.repeated()
    finally:
        keys_seen.close()
    if repeats:
        _name_repeats(ds, keys_seen, repeated, repeats, problem)
    source_digests = DigestSet() if want_fp is not None else None
    held += [source_digests] if source_digests is not None else []
    found = _compare_sources(ds, against, decoded, problem, source_digests, elsewhere) if against else 0
    fingerprint = None
    if want_fp is not None and not shard_failed:
        fingerprint = _check_fingerprint(want_fp, fp_keys, pixel_digests, source_digests if against else None,
                                         ds.num_examples, problem)
    return checked, found, fingerprint


def _name_repeats(ds, hashes: KeyHashes, repeated, repeats: int, problem) -> None:
    """A second pass, only when some key hash repeats: name the keys that appear more than once."""
    seen = set()
    named = 0
    for shard in ds.shards:
        try:
            for chunk in ds.iter_chunks(shard, check=False, fields=("keys",)):
                keys = chunk["keys"]
                for k in keys[np.isin(hashes.hashes(keys), repeated)]:
                    k = str(k)
                    if k in seen:
                        named += 1
                        problem(k, "key appears twice")
                    elif len(seen) < PROBLEMS_LISTED * 100:
                        seen.add(k)
                if problem.full:
                    break
        except LogitifyError:
            continue  # already a problem of the first pass
        if problem.full:
            break
    if problem.full or len(seen) >= PROBLEMS_LISTED * 100:  # the rest are counted by their hashes
        problem.count += max(0, repeats - named)


def _check_fingerprint(want, keys, decoded_digests, source_digests, count, problem) -> dict:
    """Recompute the manifest's fingerprint (keys; pixels from the decoded images and the sources), report a mismatch.

    Returns what was recomputed: {keys_sha256, pixels_sha256 (decoded, or
    None when the dataset is lossy), sources_pixels_sha256 (with --against,
    or None)}.
    """
    out = {"keys_sha256": keys.sha256(), "pixels_sha256": None, "sources_pixels_sha256": None}
    if out["keys_sha256"] != want["keys_sha256"]:
        problem("fingerprint", f"keys_sha256 of the shards' keys is {out['keys_sha256']}, "
                               f"the manifest says {want['keys_sha256']}")
    for name, digests, where in (("pixels_sha256", decoded_digests, "the decoded images"),
                                 ("sources_pixels_sha256", source_digests, "the sources")):
        if digests is None or digests.count != count:  # (a missing image is reported already)
            continue
        out[name] = digests.sha256()
        if out[name] != want["pixels_sha256"]:
            problem("fingerprint", f"pixels_sha256 of {where} is {out[name]}, the manifest says {want['pixels_sha256']}")
    return out


def _compare_sources(ds, sources, decoded, problem, digests=None, elsewhere=None) -> int:
    """Read the sources as encode did (same geometry, channels, keys) and compare digests; returns how many were found.

    A lossy dataset's decoded images are not its pixels, so there only the
    shapes are compared. The digest of each source image found in the
    dataset is appended to `digests`, if given.
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
                         **EncodeOptions.geometry_options(src))
    if type(src.get("max_pixels")) is int and src["max_pixels"] > 0:
        opts.max_pixels = src["max_pixels"]
    tfds = src.get("tfds") if isinstance(src.get("tfds"), dict) else {}
    tfds = {k: v for k, v in tfds.items() if isinstance(v, str)}  # a TFDS source's split and features, as recorded
    inv = discover(opts.sources, tfds_split=tfds.get("split"), image_key=tfds.get("image_key"),
                   label_key=tfds.get("label_key"))
    for note in inv.notes:  # sources named twice, read once: said as encode says it
        problem.report.warn(note)
    skipped = {s["source"] for s in ds.manifest.skipped}
    for s in inv.skipped:  # what cannot be read now, named as encode names it (the dataset's own skips are no news)
        if s["source"] not in skipped:
            problem.report.warn(f"skipped {s['source']}: {s['reason']}")
    shift = 8 - ds.params.bits
    found = 0

    def wrong_shape(key, shape):
        problem(key, f"the source gives shape {list(shape)}, the dataset {list(ds.shape)}")

    with OrderedPool(1) as pool:
        # Sizes are checked from headers where nothing resizes: a source that changed size is named, not decoded.
        for it, _, arr, reason in PixelStream(inv.items, opts, channels, pool, int(np.prod(ds.shape)),
                                              expect=opts.expect_size(ds.shape)):
            got = decoded.pop(it.key)
            if got is None:
                if it.key not in skipped and (elsewhere is None or elsewhere.pop(it.key) is None):
                    problem(it.key, "in the sources but not in the dataset")
                continue
            if isinstance(reason, ImageSizeMismatch):
                wrong_shape(it.key, reason.shape)
                found += 1
                continue
            if arr is None:
                problem(it.key, f"source cannot be read now: {reason}")
                continue
            want = (arr >> shift) << shift
            if digests is not None:
                digests.add(_digest(want))
            if want.shape != tuple(ds.shape):
                wrong_shape(it.key, want.shape)
            elif got != _digest(want) and ds.params.lossless:
                problem(it.key, "decoded image differs from its source")
            found += 1
    unreadable = _Unreadable(inv.skipped)
    for k in decoded.remaining():
        problem(k, unreadable.missing(k))
    return found


class _Unreadable:
    """What discovery could not read in the sources, to say why a dataset key has no source now.

    A record's key is "FILE:INDEX". A TFRecord file may be skipped whole
    ("FILE") or from a damaged record on ("FILE:3", or "FILE:3..9" in a
    TFDS folder): its records' keys are named with that entry. Any other
    key (a file name may hold a ':') only with its own entry.
    """

    _RECORD = re.compile(r"(.*):[0-9]+(?:\.\.[0-9]+)?")

    def __init__(self, skipped: list):
        self.exact = {s["source"]: s["reason"] for s in skipped}
        self.files = {}
        for source, reason in self.exact.items():
            self.files.setdefault(source, (source, reason))
            record = self._RECORD.fullmatch(source)
            if record:
                self.files.setdefault(record.group(1), (source, reason))

    def missing(self, key: str) -> str:
        """The problem to report for a key of the dataset that no source gave."""
        if key in self.exact:
            return f"in the dataset, but its source cannot be read now: {self.exact[key]}"
        record = self._RECORD.fullmatch(key)
        hit = self.files.get(record.group(1)) if record else None
        why = f" ({hit[0]} cannot be read now: {hit[1]})" if hit else ""
        return "in the dataset but not found in the sources" + why
