"""manifest.json: what a dataset folder holds, written last, read with suspicion.

Read into a typed Manifest: every field checked for type and honesty, so the
rest of the code never meets a string where a list goes, or an infinite seed.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace

from . import __version__
from .errors import LogitifyError
from .images import DEFAULT_FILTER
from .report import short, skipped_order
from .transform import TransformParams

FORMAT_VERSION = 1  # a folder of one split: the layout every earlier logitify wrote
SPLITS_VERSION = 2  # a folder of several splits: dataset-wide fields once, then `splits`
MANIFEST = "manifest.json"
JOURNAL = ".logitify-journal.jsonl"  # the journal of split "train"; others: journal_name(split)
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


# Split names: what TFDS accepts in a split name and a shard file name can hold.
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}\Z")  # \Z: "$" would also take a name ending in a newline
# The `source` fields that say how pixels were made: one value for the whole dataset.
PIXEL_SOURCE = ("size", "channels", "resize_mode", "crop", "filter", "exif_orientation", "jpeg_draft")
# The geometry fields of a `source` (and of a run's journal header) and the value each has when absent.
# A run header holds only those that differ, so a run from before a field existed still resumes.
GEOMETRY_DEFAULTS = {"resize_mode": "stretch", "crop": None, "filter": DEFAULT_FILTER, "exif_orientation": True,
                     "jpeg_draft": False}


def journal_name(split: str) -> str:
    """The resume journal of a run making `split` (one per split, so splits resume on their own)."""
    return JOURNAL if split == "train" else f".logitify-journal-{split}.jsonl"


@dataclass
class SplitRecord:
    """What a manifest records of one split: its shards and what was made of its inputs."""

    shards: list
    skipped: list = field(default_factory=list)
    fingerprint: dict | None = None  # {pixels_sha256, keys_sha256}; None in manifests made before it existed
    stats: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # every `source` field, the dataset-wide ones included

    @property
    def num_examples(self) -> int:
        return sum(s.num_examples for s in self.shards)

    def to_dict(self, pixel_source: bool = True) -> dict:
        source = self.source if pixel_source else {k: v for k, v in self.source.items() if k not in PIXEL_SOURCE}
        return {"num_examples": self.num_examples, "shards": [s.to_dict() for s in self.shards],
                "skipped": self.skipped,
                **({"fingerprint": dict(self.fingerprint)} if self.fingerprint is not None else {}),
                "source": source, "stats": self.stats}


@dataclass
class Manifest:
    """A dataset folder's manifest. `folder` is where it was read from (not written).

    The transform, shape, format, classes and geometry are the dataset's;
    `splits` holds each split's shards. `split` is the split this object
    speaks for (`shards`, `skipped`, `fingerprint`, `stats`, `source`); it is
    None when several splits were read and none was chosen with select().
    """

    format: str
    name: str
    shape: tuple
    params: TransformParams
    classes: list | None
    splits: dict  # name -> SplitRecord
    split: str | None = None
    compressed: bool = False
    files: list = field(default_factory=list)
    preset: dict | None = None  # --preset: the recipe, its sources and the options that deviated from it
    tool_version: str = __version__
    folder: str | None = None

    def __post_init__(self):
        if self.split is None and len(self.splits) == 1:
            self.split = next(iter(self.splits))

    @property
    def split_names(self) -> list:
        return sorted(self.splits)

    @property
    def record(self) -> SplitRecord:
        if self.split is None:
            raise LogitifyError(f"{self.where()}: this dataset has the splits {', '.join(self.split_names)}; "
                                "name one (split=... in Python, --split on the command line)")
        return self.splits[self.split]

    def where(self) -> str:
        return self.folder or "this dataset"

    def select(self, split: str | None) -> "Manifest":
        """This manifest speaking for one split (None: the only one there is), or LogitifyError naming the splits."""
        if split is None:
            out = replace(self)
            out.record  # noqa: B018 -- refuses a choice left open
            return out
        if split not in self.splits:
            raise LogitifyError(f"{self.where()}: no split {split!r} in this dataset (it has "
                                f"{', '.join(self.split_names)})")
        return replace(self, split=split)

    def each_split(self):
        """This manifest once per split, in name order."""
        return [self.select(n) for n in self.split_names]

    @property
    def shards(self) -> list:
        return self.record.shards

    @property
    def skipped(self) -> list:
        return self.record.skipped

    @property
    def stats(self) -> dict:
        return self.record.stats

    @property
    def source(self) -> dict:
        return self.record.source

    @property
    def fingerprint(self) -> dict | None:
        return self.record.fingerprint

    @fingerprint.setter
    def fingerprint(self, value) -> None:
        self.record.fingerprint = value

    @property
    def num_examples(self) -> int:
        return self.record.num_examples

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
        """Every file of this dataset's folder that logitify wrote: every split's shards, metadata, the manifest."""
        return [s.file for n in self.split_names for s in self.splits[n].shards] + list(self.files) + [MANIFEST]

    def to_dict(self) -> dict:
        """Version 1 (every earlier logitify's layout) for one split, version 2 for several."""
        head = {
            "tool_version": self.tool_version,
            "format": self.format,
            "name": self.name,
        }
        wide = {
            "shape": [int(s) for s in self.shape],
            "dtype": "float32",
            "compressed": bool(self.compressed),
            "transform": self.transform,
            "logdet": self.logdet,
            "alpha_conventions": _alpha_equivalents(self.params.alpha),
            "classes": self.classes,
            **({"preset": self.preset} if self.preset else {}),
        }
        if len(self.splits) == 1:
            (split, rec), = self.splits.items()
            one = rec.to_dict()
            return {"format_version": FORMAT_VERSION, **head, "split": split, "num_examples": one["num_examples"],
                    **wide, "shards": one["shards"], "skipped": one["skipped"],
                    **({"fingerprint": one["fingerprint"]} if "fingerprint" in one else {}),
                    "files": list(self.files), "source": one["source"], "stats": one["stats"]}
        first = self.splits[self.split_names[0]]
        return {"format_version": SPLITS_VERSION, **head, **wide,
                "splits": {n: self.splits[n].to_dict(pixel_source=False) for n in self.split_names},
                "files": list(self.files),
                "source": {k: first.source.get(k) for k in PIXEL_SOURCE
                           if k not in ("exif_orientation", "jpeg_draft") or k in first.source}}

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
        version = m.get("format_version")
        if type(version) is not int or version not in (FORMAT_VERSION, SPLITS_VERSION):
            fail(f"format_version {short(version)} (this tool reads {FORMAT_VERSION} and {SPLITS_VERSION})")
        if not isinstance(m.get("format"), str) or m["format"] not in FORMATS:
            fail(f"unknown format {short(m.get('format'))}")
        shape = m.get("shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(type(s) is int and s > 0 for s in shape)):
            fail(f"shape {short(shape)} is not [H, W, C] of positive integers")
        if max(shape[:2]) >= 1 << 20:
            fail(f"shape {short(shape)} has a side of 2^20 or more, larger than any image this tool writes")
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
        files = m.get("files", [])
        if not (isinstance(files, list) and all(isinstance(f, str) and _plain_name(f) for f in files)):
            fail("files is not a list of file names in the dataset folder")
        name = m.get("name", "logitify")
        if not isinstance(name, str):
            fail("name must be a string")
        if not isinstance(m.get("source", {}), dict):
            fail("source is not an object")
        if version == FORMAT_VERSION:
            split = m.get("split", "train")
            if not isinstance(split, str):
                fail("split must be a string")
            splits = {split: _split_record(m, {}, fail, "")}
        else:
            raw = m.get("splits")
            if not (isinstance(raw, dict) and raw):
                fail("splits is not an object of one or more splits")
            splits = {}
            for n, d in raw.items():
                if not SPLIT_NAME.match(n):
                    fail(f"split name {short(n)} is not letters, digits and _")
                if not isinstance(d, dict):
                    fail(f"split {n} is not an object")
                splits[n] = _split_record(d, m.get("source", {}), fail, f"split {n}: ")
        owned = [s.file for r in splits.values() for s in r.shards]
        if len(set(owned)) != len(owned):
            fail("two shard entries name the same file")
        preset = m.get("preset")
        if preset is not None and not (isinstance(preset, dict) and isinstance(preset.get("name"), str)
                                       and isinstance(preset.get("recipe", {}), dict)
                                       and isinstance(preset.get("sources", {}), dict)
                                       and isinstance(preset.get("deviations", []), list)
                                       and all(isinstance(d, dict) for d in preset.get("deviations", []))
                                       and isinstance(preset.get("split_sizes", {}), dict)):
            fail("preset is not {name, recipe, sources, deviations, ...}")
        if type(m.get("compressed", False)) is not bool:
            fail(f"compressed {short(m.get('compressed'))} is not true or false")
        tool = m.get("tool_version")
        out = cls(format=m["format"], name=name, shape=tuple(shape), params=params, classes=classes, splits=splits,
                  compressed=m.get("compressed", False), files=files, preset=preset,
                  tool_version=tool if isinstance(tool, str) else "unknown")
        wide = m.get("source", {}) if version != FORMAT_VERSION else {}
        for n, r in splits.items():  # what the images were made to is what the logits hold
            size, channels = r.source.get("size"), r.source.get("channels")
            if size is not None and tuple(size) != tuple(shape[:2]):
                own = "" if "size" in wide or version == FORMAT_VERSION else f"split {n}: "
                fail(f"{own}source: size {short(size)} but the logits are {shape[0]}x{shape[1]}")
            if channels is not None and channels != shape[2]:
                own = "" if "channels" in wide or version == FORMAT_VERSION else f"split {n}: "
                fail(f"{own}source: channels {short(channels)} but the logits have {shape[2]}")
        if "files" not in m:  # written before manifests listed them: the format's own metadata
            out.files = out.shard_format().metadata_files(out)
        return out


def _split_record(m: dict, wide_source: dict, fail, what: str) -> SplitRecord:
    """One split's record (the top level of a version 1 manifest, or an entry of `splits`), checked."""
    shards = m.get("shards")
    if not isinstance(shards, list):
        fail(f"{what}shards is not a list")
    entries = []
    for s in shards:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and type(s.get("num_examples")) is int
                and isinstance(s.get("sha256"), str) and s["num_examples"] >= 0):
            fail(f"{what}bad shard entry {short(s)}")
        if not _plain_name(s["file"]):
            fail(f"{what}shard file name {short(s['file'])} names no file inside the dataset folder "
                 "(it points outside, or is too long)")
        entries.append(ShardEntry(s["file"], s["num_examples"], s["sha256"]))
    total = sum(e.num_examples for e in entries)
    if m.get("num_examples") != total:
        fail(f"{what}num_examples {short(m.get('num_examples'))} but the shards hold {total}")
    skipped = m.get("skipped", [])
    if not (isinstance(skipped, list) and all(
            isinstance(x, dict) and isinstance(x.get("source"), str) and isinstance(x.get("reason"), str)
            for x in skipped)):
        fail(f"{what}skipped is not a list of {{source, reason}}")
    for k in ("source", "stats"):
        if not isinstance(m.get(k, {}), dict):
            fail(f"{what}{k} is not an object")
    source = {**m.get("source", {}), **{k: wide_source[k] for k in PIXEL_SOURCE if k in wide_source}}
    problem = _geometry_problem(source)
    if problem:
        fail(f"source: {problem}")
    fp = m.get("fingerprint")
    if fp is not None and not (isinstance(fp, dict) and set(fp) == {"pixels_sha256", "keys_sha256"}
                               and all(_is_sha256(v) for v in fp.values())):
        fail(f"{what}fingerprint is not {{pixels_sha256, keys_sha256}} of two sha256 hex digests")
    return SplitRecord(shards=entries, skipped=skipped, fingerprint=dict(fp) if fp is not None else None,
                       stats=m.get("stats", {}), source=source)


def _is_sha256(x) -> bool:
    from .fingerprint import is_digest

    return is_digest(x)


def source_geometry(record: dict) -> dict:
    """Every geometry field of a manifest's `source` or a run header, absent ones at their defaults.

    resize_mode and filter are None without a size (nothing is resized).
    The one form geometries are compared in and options are rebuilt from.
    """
    sized = record.get("size") is not None
    return {"resize_mode": (record.get("resize_mode") or GEOMETRY_DEFAULTS["resize_mode"]) if sized else None,
            "crop": list(record["crop"]) if record.get("crop") else None,
            "filter": (record.get("filter") or GEOMETRY_DEFAULTS["filter"]) if sized else None,
            "exif_orientation": record.get("exif_orientation") is not False,
            "jpeg_draft": record.get("jpeg_draft") is True}


def _geometry_problem(source: dict) -> str | None:
    """What is wrong with the geometry a manifest's `source` records (resize_mode, crop, filter), if anything."""
    from .images import FILTERS, RESIZE_MODES

    mode, crop, filt = source.get("resize_mode"), source.get("crop"), source.get("filter")
    if mode is not None and not (isinstance(mode, str) and mode in RESIZE_MODES):
        return f"resize_mode {short(mode)} is not one of {', '.join(RESIZE_MODES)}"
    if filt is not None and not (isinstance(filt, str) and filt in FILTERS):
        return f"filter {short(filt)} is not one of {', '.join(FILTERS)}"
    size = source.get("size")
    if size is not None and not (isinstance(size, list) and len(size) == 2
                                 and all(type(v) is int and 0 < v < 1 << 20 for v in size)):
        return f"size {short(size)} is not [height, width] of positive integers"
    channels = source.get("channels")
    if channels is not None and channels not in (1, 3, 4):  # True == 1: a boolean is refused below
        return f"channels {short(channels)} is not 1, 3 or 4"
    if type(channels) not in (int, type(None)):
        return f"channels {short(channels)} is not 1, 3 or 4"
    if source.get("exif_orientation", True) is not True and source.get("exif_orientation") is not False:
        return f"exif_orientation {source.get('exif_orientation')!r} is not true or false"
    if crop is not None and not (isinstance(crop, list) and len(crop) == 4
                                 and all(type(v) is int and 0 <= v < 1 << 20 for v in crop)
                                 and min(crop[2:]) > 0):
        return f"crop {crop!r} is not [top, left, height, width]"
    draft = source.get("jpeg_draft", False)
    if type(draft) is not bool:
        return f"jpeg_draft {draft!r} is not true or false"
    if draft and (not source.get("size") or crop is not None):
        return "jpeg_draft is set without a size, or with a crop"
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
    if not os.path.lexists(path):
        raise LogitifyError(f"{dataset_dir}: no {MANIFEST} here (is it a logitify output folder?)")
    if not os.path.isfile(path):  # a FIFO, a device, a folder or a dangling link: never opened
        raise LogitifyError(f"{path}: not a valid logitify manifest: not a regular file")
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


def for_run(plan, shards, skipped, stats: dict, pixels=None, base: Manifest | None = None) -> Manifest:
    """The manifest of a finished encode run, the same for every runner.

    `pixels`: a fingerprint.DigestSet of every shard's pixel digests, for
    the fingerprint (used up here); its keys are the plan's inputs less the
    skipped ones.
    `base`: the dataset this run adds its split to (its other splits are kept).
    """
    from .fingerprint import fingerprint

    opts = plan.options
    fp = None
    if pixels is not None:
        gone = {s["source"] for s in skipped}
        fp = fingerprint(pixels, (k for k in plan.items.keys() if k not in gone))  # keys only: no Item per input
    record = SplitRecord(
        shards=list(shards), skipped=sorted(skipped, key=skipped_order), fingerprint=fp,
        stats={**stats, "fingerprint": plan.fingerprint},
        source={"size": list(opts.size) if opts.size else None, "channels": plan.channels,
                "max_pixels": opts.max_pixels, "image_key": opts.image_key, "label_key": opts.label_key,
                "shard_size": plan.shard_size, **opts.geometry_record(),
                **({"tfds": plan.tfds} if plan.tfds is not None else {})})
    splits = {n: r for n, r in (base.splits.items() if base is not None else ()) if n != plan.split}
    splits[plan.split] = record
    m = Manifest(format=opts.format, name=opts.name, shape=tuple(plan.shape), params=opts.params,
                 classes=base.classes if base is not None else plan.classes,
                 splits=dict(sorted(splits.items())), split=plan.split, compressed=bool(opts.compress),
                 preset=opts.preset if base is None else base.preset)
    m.files = m.shard_format().metadata_files(m)
    return m
