"""Sources: what the user names, turned into a sorted list of keyed inputs.

An Item is known before any pixel is read (its key, its label where the
folder gives one, and where its bytes live), so the shard layout of a run is
fixed up front. Each kind of input is a class beside its siblings:
ImageFile, ImageFolder and TfrecordFile.
"""
from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

from .errors import LogitifyError, UsageError
from .images import is_image_name

TFRECORD_RE = re.compile(r"\.(tfrecords?|tfrec)(-\d{5}-of-\d{5})?$", re.IGNORECASE)
GZIP_MAGIC = b"\x1f\x8b"


class Item(NamedTuple):
    """One input image. index >= 0 marks record `index` of a TFRecord file.

    A tuple rather than a frozen dataclass: a run makes one per input (twice
    for class folders), and tuples are made about four times faster. Order
    items with `items.sort(key=ORDER)`: by sort_key alone.
    """

    sort_key: tuple
    key: str
    path: str
    index: int = -1
    label: int = -1
    class_name: str | None = None


ORDER = operator.itemgetter(0)


def _as_key(path: str) -> str:
    key = path.replace(os.sep, "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def is_tfrecord_name(name: str) -> bool:
    return bool(TFRECORD_RE.search(name))


def is_hidden(name: str) -> bool:
    return name.startswith(".")  # covers macOS '._*' resource forks too


class ImageFile:
    """A single image path: its key is the path as given."""

    def __init__(self, path: str):
        self.path = path

    def items(self):
        key = _as_key(self.path)
        return [Item((key, -1), key, self.path)], []


class ImageFolder:
    """A directory searched recursively; first sub-folder = class (ImageFolder)."""

    def __init__(self, path: str):
        self.path = path

    def items(self):
        found = []
        stack = [("", self.path)]
        while stack:
            rel_dir, full_dir = stack.pop()
            try:
                entries = list(os.scandir(full_dir))
            except OSError:
                continue
            for e in entries:
                name = e.name
                if is_hidden(name):
                    continue
                rel = rel_dir + name
                try:
                    is_dir = e.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if is_dir:
                    stack.append((rel + "/", e.path))
                elif is_image_name(name):
                    found.append((rel, e.path))
        found.sort()
        nested = any("/" in rel for rel, _ in found)
        items = []
        for rel, full in found:
            cls = rel.split("/", 1)[0] if nested and "/" in rel else None
            items.append(Item((rel, -1), rel, full, class_name=cls))
        return items, []


class TfrecordFile:
    """A TFRecord file of tf.train.Example records; key FILE:INDEX."""

    def __init__(self, path: str, compression: str | None = None):
        self.path = path
        self.compression = compression

    def compression_type(self) -> str:
        if self.compression is not None:
            return "GZIP" if self.compression.lower() == "gzip" else ""
        with open(self.path, "rb") as f:
            return "GZIP" if f.read(2) == GZIP_MAGIC else ""

    def items(self):
        from .records import count_records

        name = _as_key(self.path)
        count, error = count_records(self.path, self.compression_type())
        items = [Item((name, i), f"{name}:{i}", self.path, index=i) for i in range(count)]
        skipped = []
        if error:
            skipped.append({"source": f"{name}:{count}", "reason": error})
        return items, skipped


def source_for(path: str, compression: str | None = None):
    """The source class for one path named by the user."""
    if os.path.isdir(path):
        return ImageFolder(path)
    if is_tfrecord_name(os.path.basename(path)):
        if not os.path.exists(path):
            raise UsageError(f"no such file: {path}")
        return TfrecordFile(path, compression)
    return ImageFile(path)


@dataclass
class Inventory:
    """Every input of a run, sorted by key, with the classes the folders gave."""

    items: list
    classes: list | None
    skipped: list


def discover(paths, compression: str | None = None) -> Inventory:
    if not paths:
        raise UsageError("no sources given")
    items, skipped = [], []
    for path in paths:
        if not os.path.lexists(path):
            skipped.append({"source": _as_key(path), "reason": "no such file or directory"})
            continue
        found, bad = source_for(path, compression).items()
        items.extend(found)
        skipped.extend(bad)
    items.sort(key=ORDER)
    seen = {}
    for it in items:
        if it.key in seen:
            raise LogitifyError(
                f"two inputs share the key {it.key!r} ({seen[it.key]} and {it.path}); "
                "encode them in separate runs or name their common parent folder"
            )
        seen[it.key] = it.path
    names = sorted({it.class_name for it in items if it.class_name is not None})
    classes = names or None
    if classes:
        index = {n: i for i, n in enumerate(names)}
        items = [
            Item(it.sort_key, it.key, it.path, it.index, index[it.class_name], it.class_name)
            if it.class_name is not None
            else it
            for it in items
        ]
    return Inventory(items, classes, skipped)


def read_path_list(stream, null: bool = False):
    """Paths from a stream: one per line, or NUL-separated (find -print0)."""
    data = stream.read()
    if isinstance(data, bytes):
        data = data.decode("utf-8", "surrogateescape")
    parts = data.split("\0") if null else data.splitlines()
    return [p for p in parts if p.strip()]
