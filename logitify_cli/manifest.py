"""manifest.json: what a dataset folder holds, written last, read with suspicion.

Read into a typed Manifest: every field checked for type and honesty, so the
rest of the code never meets a string where a list goes, or an infinite seed.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from . import __version__
from .errors import LogitifyError
from .report import short
from .transform import TransformParams

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = ".logitify-journal.jsonl"
LOCK = ".logitify.lock"
LOGDET_CONVENTION = "tfgenzoo"
MANIFEST_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class ShardEntry:
    file: str
    num_examples: int
    sha256: str

    def to_dict(self) -> dict:
        return {"file": self.file, "num_examples": self.num_examples, "sha256": self.sha256}


@dataclass
class Manifest:
    """A dataset folder's manifest. `folder` is where it was read from (not written)."""

    format: str
    name: str
    split: str
    shape: tuple
    params: TransformParams
    classes: list | None
    shards: list
    skipped: list = field(default_factory=list)
    compressed: bool = False
    source: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    fingerprint: dict | None = None  # {pixels_sha256, keys_sha256}; None in manifests made before it existed
    tool_version: str = __version__
    folder: str | None = None

    @property
    def num_examples(self) -> int:
        return sum(s.num_examples for s in self.shards)

    @property
    def dims(self) -> int:
        return int(self.shape[0]) * int(self.shape[1]) * int(self.shape[2])

    @property
    def transform(self) -> dict:
        return self.params.to_dict()

    @property
    def logdet(self) -> dict:
        return {
            "convention": LOGDET_CONVENTION,
            "dims": self.dims,
            "bpd_offset_nats": self.params.bpd_offset_nats(self.dims),
            "bits_per_dim": "-(log p(y) + logdet - bpd_offset_nats) / (dims * ln 2)",
        }

    def shard_format(self):
        from .formats import get

        return get(self.format)

    def owned_files(self) -> list:
        """Every file of this dataset's folder that logitify wrote: shards, metadata, the manifest."""
        return [s.file for s in self.shards] + list(self.files) + [MANIFEST]

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "tool_version": self.tool_version,
            "format": self.format,
            "name": self.name,
            "split": self.split,
            "num_examples": self.num_examples,
            "shape": [int(s) for s in self.shape],
            "dtype": "float32",
            "compressed": bool(self.compressed),
            "transform": self.transform,
            "logdet": self.logdet,
            "alpha_conventions": _alpha_equivalents(self.params.alpha),
            "classes": self.classes,
            "shards": [s.to_dict() for s in self.shards],
            "skipped": self.skipped,
            **({"fingerprint": dict(self.fingerprint)} if self.fingerprint is not None else {}),
            "files": list(self.files),
            "source": self.source,
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, m, where: str = MANIFEST) -> "Manifest":
        """A checked Manifest from parsed JSON, or LogitifyError naming what is wrong."""
        from .formats import FORMATS

        def fail(what):
            if len(what) > 300:
                what = what[:297] + "..."
            raise LogitifyError(f"{where}: not a valid logitify manifest: {what}")

        if not isinstance(m, dict):
            fail("not a JSON object")
        if m.get("format_version") != FORMAT_VERSION:
            fail(f"format_version {short(m.get('format_version'))} (this tool reads {FORMAT_VERSION})")
        if not isinstance(m.get("format"), str) or m["format"] not in FORMATS:
            fail(f"unknown format {short(m.get('format'))}")
        shape = m.get("shape")
        if not (isinstance(shape, list) and len(shape) == 3
                and all(type(s) is int and 0 < s < 1 << 20 for s in shape)):
            fail(f"shape {short(shape)} is not [H, W, C] of positive integers")
        if shape[2] not in (1, 3, 4):
            fail(f"{shape[2]} channels (expected 1, 3 or 4)")
        if shape[0] * shape[1] * shape[2] > 1 << 31:
            fail(f"shape {shape!r} is larger than any image this tool writes")
        if m.get("dtype") != "float32":
            fail(f"dtype {short(m.get('dtype'))} (expected float32)")
        t = m.get("transform")
        if not isinstance(t, dict):
            fail("transform is not an object")
        try:
            for k in ("alpha", "corruption_level"):
                if type(t.get(k)) not in (int, float) or not math.isfinite(t[k]):
                    raise ValueError(f"{k} {short(t.get(k))} is not a finite number")
            if type(t.get("seed")) is not int or type(t.get("bits")) is not int:
                raise ValueError("seed and bits must be integers")
            params = TransformParams.from_dict(t)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            fail(f"transform parameters: {e}")
        shards = m.get("shards")
        if not isinstance(shards, list):
            fail("shards is not a list")
        entries = []
        for s in shards:
            if not (isinstance(s, dict) and isinstance(s.get("file"), str) and type(s.get("num_examples")) is int
                    and isinstance(s.get("sha256"), str) and s["num_examples"] >= 0):
                fail(f"bad shard entry {short(s)}")
            if not _plain_name(s["file"]):
                fail(f"shard file name {short(s['file'])} names no file inside the dataset folder "
                     "(it points outside, or is too long)")
            entries.append(ShardEntry(s["file"], s["num_examples"], s["sha256"]))
        if len({e.file for e in entries}) != len(entries):
            fail("two shard entries name the same file")
        total = sum(e.num_examples for e in entries)
        if m.get("num_examples") != total:
            fail(f"num_examples {short(m.get('num_examples'))} but the shards hold {total}")
        classes = m.get("classes")
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            fail("classes is neither null nor a list of names")
        if "alpha_conventions" in m and m["alpha_conventions"] != _alpha_equivalents(params.alpha):
            fail(f"alpha_conventions {short(m['alpha_conventions'])} are not the transform's alpha "
                 f"{params.alpha!r} in each convention")
        ld = m.get("logdet")
        if not isinstance(ld, dict) or ld.get("convention") != LOGDET_CONVENTION \
                or type(ld.get("bpd_offset_nats")) not in (int, float) or not math.isfinite(ld["bpd_offset_nats"]):
            fail("logdet section missing or not the tfgenzoo convention")
        skipped = m.get("skipped", [])
        if not (isinstance(skipped, list) and all(
                isinstance(x, dict) and isinstance(x.get("source"), str) and isinstance(x.get("reason"), str)
                for x in skipped)):
            fail("skipped is not a list of {source, reason}")
        files = m.get("files", [])
        if not (isinstance(files, list) and all(isinstance(f, str) and _plain_name(f) for f in files)):
            fail("files is not a list of file names in the dataset folder")
        name = m.get("name", "logitify")
        split = m.get("split", "train")
        if not isinstance(name, str) or not isinstance(split, str):
            fail("name and split must be strings")
        for k in ("source", "stats"):
            if not isinstance(m.get(k, {}), dict):
                fail(f"{k} is not an object")
        problem = _geometry_problem(m.get("source", {}))
        if problem:
            fail(f"source: {problem}")
        fp = m.get("fingerprint")
        if fp is not None and not (isinstance(fp, dict) and set(fp) == {"pixels_sha256", "keys_sha256"}
                                   and all(_is_sha256(v) for v in fp.values())):
            fail("fingerprint is not {pixels_sha256, keys_sha256} of two sha256 hex digests")
        version = m.get("tool_version")
        out = cls(format=m["format"], name=name, split=split, shape=tuple(shape), params=params,
                  classes=classes, shards=entries, skipped=skipped, compressed=bool(m.get("compressed", False)),
                  source=m.get("source", {}), stats=m.get("stats", {}), files=files,
                  fingerprint=dict(fp) if fp is not None else None, tool_version=version if isinstance(version, str) else "unknown")
        if "files" not in m:  # written before manifests listed them: the format's own metadata
            out.files = out.shard_format().metadata_files(out)
        return out


def _is_sha256(x) -> bool:
    from .fingerprint import is_digest

    return is_digest(x)


def _geometry_problem(source: dict) -> str | None:
    """What is wrong with the geometry a manifest's `source` records (resize_mode, crop, filter), if anything."""
    from .images import FILTERS, RESIZE_MODES

    mode, crop, filt = source.get("resize_mode"), source.get("crop"), source.get("filter")
    if mode is not None and mode not in RESIZE_MODES:
        return f"resize_mode {mode!r} is not one of {', '.join(RESIZE_MODES)}"
    if filt is not None and filt not in FILTERS:
        return f"filter {filt!r} is not one of {', '.join(FILTERS)}"
    if crop is not None and not (isinstance(crop, list) and len(crop) == 4
                                 and all(type(v) is int and 0 <= v < 1 << 20 for v in crop)
                                 and min(crop[2:]) > 0):
        return f"crop {crop!r} is not [top, left, height, width]"
    return None


def _alpha_equivalents(alpha: float) -> dict:
    from .conventions import alpha_equivalents

    return alpha_equivalents(alpha)


def _plain_name(f: str) -> bool:
    """A name of a file right in the dataset folder, one this system can spell (at most 255 bytes)."""
    if not f or "/" in f or "\\" in f or f in (".", "..") or "\0" in f or len(f) > 255:
        return False
    try:
        return len(os.fsencode(f)) <= 255
    except UnicodeError:
        return False


def _reject_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def parse(data: bytes, where: str) -> Manifest:
    try:
        m = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
        raise LogitifyError(f"{where}: not a valid logitify manifest: not JSON ({e})") from None
    return Manifest.from_dict(m, where)


def read(dataset_dir: str) -> Manifest:
    """The manifest of a dataset folder (or the manifest file itself), checked."""
    if not os.path.exists(dataset_dir):
        raise LogitifyError(f"no such dataset: {dataset_dir}")
    path = os.path.join(dataset_dir, MANIFEST) if os.path.isdir(dataset_dir) else dataset_dir
    if not os.path.isfile(path):
        raise LogitifyError(f"{dataset_dir}: no {MANIFEST} here (is it a logitify output folder?)")
    try:
        with open(path, "rb") as f:
            data = f.read(MANIFEST_MAX_BYTES + 1)
    except OSError as e:
        raise LogitifyError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > MANIFEST_MAX_BYTES:
        raise LogitifyError(f"{path}: not a valid logitify manifest: larger than {MANIFEST_MAX_BYTES >> 20} MiB")
    m = parse(data, path)
    m.folder = os.path.dirname(os.path.abspath(path))
    return m


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode("utf-8")


def write(out_dir: str, manifest: Manifest) -> None:
    """Write manifest.json (here through a temporary name and a rename, or as one object in a bucket)."""
    from . import fs

    fs.write_bytes(fs.join(out_dir, MANIFEST), json_bytes(manifest.to_dict()))


def for_run(plan, shards, skipped, stats: dict, pixels=None) -> Manifest:
    """The manifest of a finished encode run, the same for every runner.

    `pixels`: every shard's pixel digests, packed (shards.packed_digests),
    for the fingerprint; its keys are the plan's inputs less the skipped ones.
    """
    from .fingerprint import fingerprint

    opts = plan.options
    fp = None
    if pixels is not None:
        gone = {s["source"] for s in skipped}
        fp = fingerprint(pixels, (it.key for it in plan.items if it.key not in gone))
    m = Manifest(
        format=opts.format, name=opts.name, split=opts.split, shape=tuple(plan.shape), params=opts.params,
        classes=plan.classes, shards=list(shards), skipped=sorted(skipped, key=lambda s: s["source"]),
        compressed=bool(opts.compress),
        source={"size": list(opts.size) if opts.size else None, "channels": plan.channels,
                "max_pixels": opts.max_pixels, "image_key": opts.image_key, "label_key": opts.label_key,
                "shard_size": plan.shard_size, **opts.geometry_record()},
        stats={**stats, "fingerprint": plan.fingerprint},
        fingerprint=fp,
    )
    m.files = m.shard_format().metadata_files(m)
    return m
