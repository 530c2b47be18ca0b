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
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import images as images_mod
from .errors import LogitifyError
from .pixels import PixelStream, payloads
from .pool import OrderedPool
from .sources import ItemList
from .transform import TransformParams

SHARD_BYTES = 256 << 20  # default shard size: about this many bytes of logits


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
    image_key: str = "image"
    label_key: str = "label"
    name: str = "logitify"
    split: str = "train"
    on_error: str = "skip"
    resume: bool = False
    overwrite: bool = False
    max_pixels: int = images_mod.DEFAULT_MAX_PIXELS
    resize_mode: str = "stretch"  # how --size resizes: stretch, center-crop, border
    crop: tuple | None = None  # (top, left, height, width), taken before any resize
    filter: str = images_mod.DEFAULT_FILTER  # Pillow's resampling filter for --size

    @property
    def geometry(self):
        """What read_image does to each image's size (an images.Geometry), or None when nothing changes it."""
        if self.size is None and self.crop is None:
            return None
        return images_mod.Geometry(size=self.size, resize_mode=self.resize_mode, crop=self.crop,
                                   filter=self.filter)

    def expect_size(self, shape):
        """The (height, width) every input must have, read from headers, when nothing crops or resizes."""
        return None if self.geometry is not None else tuple(shape[:2])

    def geometry_record(self) -> dict:
        """The geometry as the manifest's `source` records it: resize_mode and filter only when --size resizes."""
        return {"resize_mode": self.resize_mode if self.size else None,
                "crop": list(self.crop) if self.crop else None,
                "filter": self.filter if self.size else None}


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

    @property
    def expect(self):
        """The (height, width) every input must have, read from headers, when nothing crops or resizes."""
        return self.options.expect_size(self.shape)


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
        return ShardTask(spec, self.items_of(spec), self.options, tuple(self.shape), self.channels, self.first_key)

    def shards_of(self, keys) -> dict:
        """{key: shard index} for those of `keys` that are inputs (one pass over the inputs)."""
        keys = set(keys)
        if not keys:
            return {}
        return {it.key: j // self.shard_size for j, it in enumerate(self.items) if it.key in keys}


def probe(items, opts: EncodeOptions):
    """(shape, channels, item) of the first readable input in order, or (None, None, None)."""
    for it, payload, _ in payloads(items, opts):
        if isinstance(payload, BaseException):
            continue
        try:
            channels = opts.channels
            if channels is None:
                mode = images_mod.peek_mode(payload, opts.max_pixels)
                channels = 1 if images_mod.is_grayscale_mode(mode) else 3
            arr = images_mod.read_image(payload, channels, opts.geometry, opts.max_pixels)
            return arr.shape, channels, it
        except images_mod.ImageReadError:
            continue
    return None, None, None


def fingerprint(header: dict) -> str:
    """What a resume compares, and the manifest records: a hash of the run header."""
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def run_header(opts: EncodeOptions, shape, channels, shard_size, n_shards, items) -> dict:
    """The inputs and every option that changes a shard's bytes: what a resume must match."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\0{it.label}\0".encode("utf-8", "surrogatepass"))
    header = {
        "format": opts.format,
        "name": opts.name,
        "split": opts.split,
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
    if opts.crop:
        header["crop"] = list(opts.crop)
    if opts.size and opts.resize_mode != "stretch":
        header["resize_mode"] = opts.resize_mode
    if opts.size and opts.filter != images_mod.DEFAULT_FILTER:
        header["filter"] = opts.filter
    return header


def plan(opts: EncodeOptions) -> RunPlan:
    """Discover, probe and lay out the shards; nothing is written."""
    from .formats import get
    from .sources import discover

    fmt = get(opts.format)
    inv = discover(opts.sources, opts.compression)
    if not inv.items:
        raise LogitifyError("no images found in " + ", ".join(map(str, opts.sources)),
                            notes=[f"skipped {s['source']}: {s['reason']}" for s in inv.skipped])
    notes = [f"skipped {s['source']}: {s['reason']}" for s in inv.skipped]
    shape, channels, first = probe(inv.items, opts)
    if shape is None:
        # Every input is bad: record why, one by one, then fail.
        with OrderedPool(1) as pool:
            for it, _, _, reason in PixelStream(inv.items, opts, opts.channels or 3, pool, 1):
                notes.append(f"skipped {it.key}: {reason}")
        raise LogitifyError(f"none of the {len(inv.items)} inputs could be read as an image", notes=notes)
    dims = int(np.prod(shape))
    shard_size = opts.shard_size or max(1, SHARD_BYTES // (4 * dims))
    n = len(inv.items)
    n_shards = max(1, -(-n // shard_size))
    shards = [ShardSpec(i, n_shards, fmt.shard_file(opts.name, opts.split, i, n_shards),
                        i * shard_size, min(n, (i + 1) * shard_size)) for i in range(n_shards)]
    header = run_header(opts, shape, channels, shard_size, n_shards, inv.items)
    if not opts.params.lossless:
        notes.append("this transform is lossy: decode gives the nearest level, not always the original "
                     f"(noise {opts.params.noise}, corruption level {opts.params.corruption_level})")
    return RunPlan(opts, inv.items, inv.classes, list(inv.skipped), tuple(shape), channels, first.key,
                   shard_size, shards, header, notes)
