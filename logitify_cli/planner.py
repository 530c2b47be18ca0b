"""The plan of an encode run: every shard's inputs, fixed before they are read.

plan(options) discovers the inputs, reads the first readable one for the
dataset's shape, and lays the inputs out in shards: shard i holds inputs
i*N .. i*N+N-1 (less those that turn out unreadable). A shard's bytes then
depend only on its inputs and the options, so any runner (local, Beam) can
make any shard, in any order, on any machine, and a killed run can be
resumed shard by shard.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from . import images as images_mod
from . import manifest as manifest_mod
from .errors import LogitifyError, SplitMismatch, UsageError
from .pixels import PixelStream, payloads
from .outputs import class_folder_problems
from .pool import OrderedPool
from .report import listing, printable, short
from .sources import ItemList
from .transform import TransformParams

SHARD_BYTES = 256 << 20  # default shard size: about this many bytes of logits


JPEG_DRAFT_NEEDS = ("--jpeg-draft scales JPEGs down towards --size before resizing: it needs --size, "
                    "and cannot be used with --crop, whose window is in full-size pixels")


def dataset_name_problem(name) -> str | None:
    """Why a dataset name cannot start shard file names (it must stay one name inside the output folder), or None."""
    if (not isinstance(name, str) or not name or name.startswith(".") or any(c in name for c in "/\\")
            or not name.isprintable() or len(name.encode("utf-8", "surrogatepass")) > 128):
        return ("a dataset name is one file name: no / or \\, no control characters, not starting with '.', "
                "at most 128 bytes")
    return None


@dataclass
class EncodeOptions:
    sources: list
    out: str
    format: str = "npz"
    params: TransformParams = field(default_factory=TransformParams)
    batch_size: int = 256
    shard_size: int | None = None
    size: tuple | None = None
    channels: int | None = None
    device: str = "auto"
    workers: int | None = None
    compress: bool = False
    compression: str | None = None
    image_key: str | None = None  # the feature holding images in TFRecord inputs: "image", or a TFDS folder's
    label_key: str | None = None  # the int64 label feature: "label", or a TFDS folder's ClassLabel
    tfds_split: str | None = None  # the split of a TFDS folder to read
    name: str = "logitify"
    split: str = "train"
    on_error: str = "skip"
    resume: bool = False
    overwrite: bool = False
    max_pixels: int = images_mod.DEFAULT_MAX_PIXELS
    resize_mode: str = "stretch"  # how --size resizes: stretch, center-crop, border
    crop: tuple | None = None  # (top, left, height, width), taken before any resize
    filter: str = images_mod.DEFAULT_FILTER  # Pillow's resampling filter for --size
    holdout: tuple | None = None  # (fraction, split): that share of the inputs, by a hash of (seed, key)
    exif: bool = True  # turn images by their EXIF orientation (presets whose source never did turn it off)
    preset: dict | None = None  # --preset's record for the manifest (presets.resolve)
    jpeg_draft: bool = False  # JPEGs decoded at Pillow's draft scale before the resize (other pixels)
    later_splits: tuple = ()  # splits the same command makes after this run (a TFDS folder's): --overwrite drops them

    def check(self) -> None:
        """UsageError for what no run can take, whoever made these options (the CLI says it as it parses)."""
        if not isinstance(self.split, str) or not manifest_mod.SPLIT_NAME.match(self.split):
            # it names shard files and a journal: letters, digits and _ only
            raise UsageError(f"split name {self.split!r}: use letters, digits and _ (at most 64)")
        problem = dataset_name_problem(self.name)
        if problem:
            raise UsageError(f"--name {self.name!r}: {problem}")
        if self.holdout is not None:
            fraction, name = self.holdout if isinstance(self.holdout, tuple) and len(self.holdout) == 2 else (None, "")
            if not (isinstance(fraction, float) and 0 < fraction < 1) or not isinstance(name, str) \
                    or not manifest_mod.SPLIT_NAME.match(name):
                raise UsageError(f"holdout {self.holdout!r} is not (FRACTION, NAME) with 0 < FRACTION < 1 and a "
                                 "split name of letters, digits and _ (at most 64)")
        if self.jpeg_draft and (self.size is None or self.crop is not None):
            raise UsageError(JPEG_DRAFT_NEEDS)
        try:
            self.params.check_float32()
        except ValueError as e:
            raise UsageError(f"{e} (--alpha, --corruption-level)") from None

    @property
    def geometry(self):
        """What read_image does to each image's size (an images.Geometry), or None when nothing changes it."""
        if self.size is None and self.crop is None and self.exif:
            return None
        return images_mod.Geometry(size=self.size, resize_mode=self.resize_mode, crop=self.crop,
                                   filter=self.filter, exif=self.exif, jpeg_draft=self.jpeg_draft)

    def expect_size(self, shape):
        """The (height, width) every input must have, read from headers, when nothing crops or resizes."""
        return None if (self.size or self.crop) else tuple(shape[:2])

    def geometry_fields(self) -> dict:
        """Every geometry field, named as a manifest's `source` names them (see manifest.source_geometry)."""
        return {"resize_mode": self.resize_mode if self.size else None,
                "crop": list(self.crop) if self.crop else None,
                "filter": self.filter if self.size else None,
                "exif_orientation": self.exif, "jpeg_draft": self.jpeg_draft}

    def geometry_record(self) -> dict:
        """The geometry as the manifest's `source` records it: resize_mode and filter only when --size resizes.

        `exif_orientation` and `jpeg_draft` are there only when they differ
        from the default, so every other run's manifest stays as it was.
        """
        g = self.geometry_fields()
        return {k: v for k, v in g.items()
                if k in ("resize_mode", "crop", "filter") or v != manifest_mod.GEOMETRY_DEFAULTS[k]}

    @staticmethod
    def geometry_options(record: dict) -> dict:
        """The geometry keywords of EncodeOptions that a manifest's `source` (or a run header) records."""
        g = manifest_mod.source_geometry(record)
        return {"crop": tuple(g["crop"]) if g["crop"] else None,
                "resize_mode": g["resize_mode"] or manifest_mod.GEOMETRY_DEFAULTS["resize_mode"],
                "filter": g["filter"] or manifest_mod.GEOMETRY_DEFAULTS["filter"],
                "exif": g["exif_orientation"], "jpeg_draft": g["jpeg_draft"]}


@dataclass(frozen=True)
class ShardSpec:
    """One output shard: its file and the positions of its inputs in the plan."""

    index: int
    n_shards: int
    file: str
    start: int
    stop: int


@dataclass
class ShardTask:
    """Everything make_shard needs for one shard, self-contained (it travels to Beam workers)."""

    spec: ShardSpec
    items: Sequence  # an ItemList (or a list of Items)
    options: EncodeOptions
    shape: tuple
    channels: int
    first_key: str
    classes: int | None = None  # how many classes the dataset names; None where it names none

    @property
    def expect(self):
        """The (height, width) every input must have, read from headers, when nothing crops or resizes."""
        return self.options.expect_size(self.shape)

    @property
    def guessed_grey(self) -> bool:
        return guessed_grey(self.options, self.channels)


def guessed_grey(options, channels) -> bool:
    """Whether the run makes grey images because the first image and a sample were grey (no --channels).

    Colour images the sample missed are then made grey: the readers note
    each one (images.MADE_GREY), and the run names them as it ends.
    """
    return options.channels is None and channels == 1


@dataclass
class RunPlan:
    options: EncodeOptions
    items: Sequence  # an ItemList, sorted by key
    classes: list | None
    skipped: list  # inputs refused at discovery
    shape: tuple
    channels: int
    first_key: str
    shard_size: int
    shards: list  # of ShardSpec
    header: dict
    notes: list
    split: str = "train"
    holdout: "RunPlan | None" = None  # the plan of --holdout's split, made in the same run
    tfds: dict | None = None  # what a TFDS source said of itself, for the manifest

    @property
    def parts(self) -> list:
        """This plan and its holdout's: every split the run makes, in the order its shards are made."""
        return [self] + ([self.holdout] if self.holdout is not None else [])

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.header)

    def items_of(self, spec: ShardSpec):
        """A shard's inputs, packed as the plan's are (a shard of 8x8 images holds 350,000)."""
        if isinstance(self.items, ItemList):
            return self.items.part(spec.start, spec.stop)
        return self.items[spec.start:spec.stop]

    def inputs_among(self, paths) -> list:
        """Which of these local paths are inputs of this run (links followed): never to be removed."""
        import os

        from . import fs

        real = {os.path.realpath(p): p for p in paths}
        if not real:
            return []
        folders, hits = {}, set()
        for it in self.items:
            path = it.path
            if fs.is_remote(path):
                continue
            d, b = os.path.split(path)
            rd = folders.get(d)
            if rd is None:
                rd = folders[d] = os.path.realpath(d)
            rp = os.path.join(rd, b)
            if rp not in real and os.path.islink(path):
                rp = os.path.realpath(path)
            if rp in real:
                hits.add(real[rp])
        return sorted(hits)

    def task(self, spec: ShardSpec) -> ShardTask:
        return ShardTask(spec, self.items_of(spec), self.options, tuple(self.shape), self.channels, self.first_key,
                         len(self.classes) if self.classes else None)

    def shards_of(self, keys) -> dict:
        """{key: shard index} for those of `keys` that are inputs (one pass over the inputs)."""
        keys = set(keys)
        if not keys:
            return {}
        return {it.key: j // self.shard_size for j, it in enumerate(self.items) if it.key in keys}


CHANNEL_SAMPLE = 64  # image files, spread over the run, whose modes choose channels with the first's


def _all_grayscale(items, opts) -> bool:
    """Whether a sample of the inputs are all grayscale, read from their headers.

    One grey image first in key order (ImageNet has some) would otherwise
    make a whole colour dataset grey. The sample is image files spread
    over the inputs and the first records in order: reaching a spread of
    records, or of bucket objects, means reading most of what holds them.
    A colour image the sample misses is still made grey, and named as the
    run ends (guessed_grey).
    """
    files = np.flatnonzero(np.asarray([it.index < 0 and "://" not in it.path for it in items], bool)) \
        if len(items) <= CHANNEL_SAMPLE else None
    if files is None:
        at = np.unique(np.linspace(0, len(items) - 1, CHANNEL_SAMPLE).astype(np.int64))
        files = np.asarray([i for i in at if items[int(i)].index < 0 and "://" not in items[int(i)].path], np.int64)
    records = items.first_records(CHANNEL_SAMPLE) if hasattr(items, "first_records") else []
    for _, payload, _ in itertools.chain(payloads(items.select(files), opts), payloads(records, opts)):
        if isinstance(payload, BaseException):
            continue
        try:
            if not images_mod.is_grayscale_mode(images_mod.peek_mode(payload, opts.max_pixels)):
                return False
        except images_mod.ImageReadError:
            continue
    return True


def probe(items, opts: EncodeOptions):
    """(shape, channels, item, label) of the first readable input in order, or (None, None, None, None)."""
    for it, payload, label in payloads(items, opts):
        if isinstance(payload, BaseException):
            continue
        try:
            channels = opts.channels
            if channels is None:
                mode = images_mod.peek_mode(payload, opts.max_pixels)
                channels = 1 if images_mod.is_grayscale_mode(mode) and _all_grayscale(items, opts) else 3
            arr = images_mod.read_image(payload, channels, opts.geometry, opts.max_pixels)
            return arr.shape, channels, it, label
        except images_mod.ImageReadError:
            continue
    return None, None, None, None


def _label_key_notes(records, opts: EncodeOptions) -> list:
    """A warning when the first record that parses has no int64 feature under the --label-key the user named.

    Records without that feature give images without labels, which is
    right for some files but, at the first record, more likely a mistyped
    name: the warning lists the names the record does hold. `records` are
    the candidates in order (a few: this is a warning, not a census);
    called only where the probe got no label from a record, so a
    labelled run reads nothing twice. Nothing here can fail a run.
    """
    from .pixels import record_reader
    from .records import feature_kinds

    reader = record_reader(opts.compression)
    for it in records:
        try:
            kinds = feature_kinds(reader.read(it.path, it.index))
        except Exception:  # damaged or not an Example: the run itself says so, by its key
            continue
        break
    else:
        return []
    key = opts.label_key
    kind = kinds.get(key)
    if kind == "int64_list":  # it holds -1 or nothing: "no label", said on purpose
        return []
    ints = [printable(k) for k, kind in kinds.items() if kind == "int64_list"]
    if key not in kinds:
        held = "has no feature of that name"
    elif kind is None:
        held = "holds an empty feature under that name"
    else:
        held = f"holds {kind.split('_')[0]} under that name, not an int64"
    return [f"--label-key {short(key)}: record {printable(it.key)} {held}, and records without an int64 "
            "label give images without labels"
            + (f"; its int64 features: {listing(ints)}" if ints else "; it has no int64 feature")]


def fingerprint(header: dict) -> str:
    """What a resume compares, and the manifest records: a hash of the run header."""
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def run_header(opts: EncodeOptions, shape, channels, shard_size, n_shards, items, split=None) -> dict:
    """The inputs and every option that changes a shard's bytes: what a resume must match."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\0{it.label}\0".encode("utf-8", "surrogatepass"))
    header = {
        "format": opts.format,
        "name": opts.name,
        "split": split or opts.split,
        "transform": opts.params.to_dict(),
        "shape": list(shape),
        "size": list(opts.size) if opts.size else None,
        "channels": channels,
        "shard_size": shard_size,
        "num_shards": n_shards,
        "compress": opts.compress,
        "image_key": opts.image_key,
        "label_key": opts.label_key,
        "max_pixels": opts.max_pixels,
        "inputs": h.hexdigest(),
    }
    # The geometry, only where it differs from what runs did before these
    # options existed, so the header (and the fingerprint in stats) of such
    # runs stays the same and they still resume; a resume with other
    # geometry still differs here and is refused.
    header.update({k: v for k, v in opts.geometry_fields().items()
                   if v is not None and v != manifest_mod.GEOMETRY_DEFAULTS[k]})
    if opts.holdout:  # a resume with another share or split name would move images between splits
        header["holdout"] = [opts.holdout[0], opts.holdout[1]]
    return header


def resolved(opts: EncodeOptions, inv) -> EncodeOptions:
    """The options with what the sources settle: feature keys (a TFDS folder's, or "image"/"label"), channels.

    A copy: the caller's options stay as given.
    """
    if inv.tfds is not None:
        return replace(opts, image_key=inv.tfds["image_key"], label_key=inv.tfds["label_key"] or "label",
                       channels=opts.channels or inv.channels)
    return replace(opts, image_key=opts.image_key or "image", label_key=opts.label_key or "label")


def split_runs(opts: EncodeOptions) -> list:
    """The runs an encode makes: one per split of a TFDS folder, named as there; else the one asked for.

    A --holdout split is checked against the run's split once that is
    named (a TFDS folder's split is named by the folder, not by --split).
    """
    runs = _split_runs(opts)
    for run in runs:
        run.check()  # before either runner looks at the output folder
        if run.holdout and run.holdout[1] == run.split:
            raise UsageError(f"--holdout names the split {run.split!r} this run already makes; name another")
    return runs


def _split_runs(opts: EncodeOptions) -> list:
    """split_runs, before the --holdout check.

    `opts.split` None means "as the source names it": each chosen TFDS
    split (--tfds-split, or all of dataset_info.json's) keeps its name,
    and any other source makes "train". A split named with --split
    renames the one TFDS split chosen. Nothing is read but the TFDS
    metadata.
    """
    import os

    from . import fs, tfds_folder
    from .manifest import SPLIT_NAME

    source = opts.sources[0] if len(opts.sources) == 1 else None
    found = (tfds_folder.locate(source) if source is not None and not fs.is_remote(source)
             and os.path.isdir(source) else None)
    if found is None:
        if opts.tfds_split is not None:
            raise UsageError("--tfds-split names splits of a prepared TFDS folder, and the source is not one")
        return [replace(opts, split=opts.split or "train")]
    try:
        meta = tfds_folder.read(found[0])
    except LogitifyError:  # said by the run itself, once the output folder is known to be fit for it
        return [replace(opts, split=opts.split or "train")]
    have = list(meta.splits)
    names = [n.strip() for n in opts.tfds_split.split(",")] if opts.tfds_split else have
    for n in names:
        if n not in meta.splits:
            raise UsageError(f"{source} has no split {short(n)} (it has {listing(have)})")
    if len(set(names)) != len(names):
        raise UsageError(f"--tfds-split {short(opts.tfds_split)} names a split twice")
    if opts.split is not None:
        if len(names) != 1:
            raise UsageError(f"--split {opts.split!r} would rename one TFDS split, and {source} has "
                             f"{listing(names)}: choose one with --tfds-split, or let each keep its name")
        return [replace(opts, tfds_split=names[0])]
    if opts.holdout and len(names) > 1:
        raise UsageError("--holdout takes a share of one split: choose the TFDS split with --tfds-split")
    for n in names:
        if not SPLIT_NAME.match(n):
            raise UsageError(f"the TFDS split {short(n)} cannot be a split name here (letters, digits and _, at "
                             "most 64); choose it with --tfds-split and name it with --split")
    # Later runs name the version folder itself: the dataset folder's choice of version is said once.
    return [replace(opts, tfds_split=n, split=n, sources=opts.sources if i == 0 else [found[0]],
                    later_splits=tuple(names[i + 1:])) for i, n in enumerate(names)]


def plan(opts: EncodeOptions, base=None) -> RunPlan:
    """Discover, probe and lay out the shards of every split the run makes; nothing is written.

    `base`: the dataset (a Manifest) this run adds a split to; this run's
    labels are numbered as its classes (splits.class_mapping).
    """
    from .formats import get
    from .sources import discover
    from .splits import class_mapping, holdout_mask

    opts.check()
    fmt = get(opts.format)
    inv = discover(opts.sources, opts.compression, tfds_split=opts.tfds_split or opts.split,
                   image_key=opts.image_key, label_key=opts.label_key)
    if opts.tfds_split is not None and inv.tfds is None:
        raise UsageError("--tfds-split names a split of a prepared TFDS folder, and no source is one")
    named_label_key = opts.label_key
    opts = resolved(opts, inv)
    notes = list(inv.notes) + [f"skipped {s['source']}: {s['reason']}" for s in inv.skipped]
    if inv.skipped and opts.on_error == "fail":  # found unreadable before any pixel: the same rule as later
        first = inv.skipped[0]
        raise LogitifyError(f"cannot read {first['source']}: {first['reason']} (--on-error fail)")
    if not inv.items:
        raise LogitifyError("no images found in " + ", ".join(map(str, opts.sources)), notes=notes)
    run_classes = inv.classes
    if base is not None:
        if inv.tfds is not None and inv.classes != base.classes:  # labels come from the records, unnumbered
            raise SplitMismatch(f"{opts.out}: the dataset's classes are {short(base.classes)}, the TFDS "
                                f"split's {short(inv.classes)}; nothing was written", field="classes",
                                dataset=base.classes, run=inv.classes)
        mapping = class_mapping(base.classes, inv.classes, opts.out)
        if mapping is not None:
            inv.items.relabel(mapping)
        run_classes = base.classes
    fmt.check_classes(run_classes)
    for reason in class_folder_problems(run_classes):
        raise LogitifyError(f"{reason}: rename it in the source")
    shape, channels, first, first_label = probe(inv.items, opts)
    if shape is None:
        # Every input is bad: record why, one by one, then fail (at the first, with --on-error fail).
        with OrderedPool(1) as pool:
            for it, _, _, reason in PixelStream(inv.items, opts, opts.channels or 3, pool, 1):
                if opts.on_error == "fail":
                    raise LogitifyError(f"cannot read {it.key}: {reason} (--on-error fail)")
                notes.append(f"skipped {it.key}: {reason}")
        raise LogitifyError(f"none of the {len(inv.items)} inputs gave an image (every one was skipped, each "
                            "with its reason)", notes=notes)
    if named_label_key is not None and inv.tfds is None:
        if first.index >= 0:  # the probe read a record: look again only if it gave no label
            if first_label < 0:
                notes.extend(_label_key_notes([first], opts))
        else:  # an image file came first: the records, if any, have not been read yet
            notes.extend(_label_key_notes(inv.items.first_records(16), opts))
    if opts.preset:
        from .presets import check_first_image

        check_first_image(opts.preset, shape, first.key)
    dims = int(np.prod(shape))
    shard_size = opts.shard_size or max(1, SHARD_BYTES // (4 * dims))
    if not opts.params.lossless:
        notes.append("this transform is lossy: decode gives the nearest level, not always the original "
                     f"(noise {opts.params.noise}, corruption level {opts.params.corruption_level})")

    def part(items, split, skipped, notes):
        n = len(items)
        n_shards = max(1, -(-n // shard_size))
        shards = [ShardSpec(i, n_shards, fmt.shard_file(opts.name, split, i, n_shards),
                            i * shard_size, min(n, (i + 1) * shard_size)) for i in range(n_shards)]
        header = run_header(opts, shape, channels, shard_size, n_shards, items, split)
        if inv.tfds is not None:  # what the TFDS folder said, including counts that differ: a resume must match it
            header["tfds"] = inv.tfds
        return RunPlan(opts, items, run_classes, skipped, tuple(shape), channels, first.key, shard_size, shards,
                       header, notes, split=split, tfds=inv.tfds)

    if not opts.holdout:
        return part(inv.items, opts.split, list(inv.skipped), notes)
    fraction, name = opts.holdout
    held = holdout_mask(opts.params.seed, inv.items.keys(), fraction)
    main = part(inv.items.select(np.flatnonzero(~held)), opts.split, list(inv.skipped), notes)
    main.holdout = part(inv.items.select(np.flatnonzero(held)), name, [], [])
    return main
