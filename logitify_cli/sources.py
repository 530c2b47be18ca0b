"""Sources: what the user names, turned into a sorted list of keyed inputs.

An Item is known before any pixel is read (its key, its label where the
folder gives one, and where its bytes live), so the shard layout of a run is
fixed up front. Each kind of input is a class beside its siblings:
ImageFile, ImageFolder, TfrecordFile, TfdsDataset and BucketPrefix.

Discovery never reads a byte of an input, never waits on one (FIFOs,
sockets and devices named like images are skipped with a reason), and says
what it did not follow: broken links, link loops, unreadable folders.
"""
from __future__ import annotations

import collections
import heapq
import operator
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import LogitifyError, UsageError
from .images import file_kind, is_image_name
from .report import listing, printable, short, skipped_order

TFRECORD_RE = re.compile(r"\.(tfrecords?|tfrec)(-\d{5}-of-\d{5})?\Z", re.IGNORECASE)
GZIP_MAGIC = b"\x1f\x8b"


class Item(NamedTuple):
    """One input image. index >= 0 marks record `index` of a TFRecord file.

    Discovery makes one per input before ItemList packs them, so an Item
    holds nothing it can share or derive: a folder's images keep the folder
    (one string for all of them) and their key, and give `path` as the two
    joined. A tuple rather than a frozen dataclass: tuples are made about
    four times faster and are smaller.

    Order items with `items.sort(key=ORDER)`: by name, which is the key of
    an image and the file's key for TFRecord records. The sort is stable
    and a file's records are listed in index order, so they stay in it.
    """

    name: str
    key: str
    where: str  # the file itself or, where relative, the folder (with a trailing separator)
    index: int = -1
    label: int = -1
    class_name: str | None = None
    relative: bool = False

    @property
    def path(self) -> str:
        return self.where + self.key if self.relative else self.where


ORDER = operator.itemgetter(0)


def _as_key(path: str) -> str:
    """A relative path as a key: '/' between names, and no empty or '.' names (a//x.png and ./a/./x.png are a/x.png)."""
    return "/".join(part for part in path.replace(os.sep, "/").split("/") if part not in ("", "."))


def is_tfrecord_name(name: str) -> bool:
    return bool(TFRECORD_RE.search(name))


def is_hidden(name: str) -> bool:
    return name.startswith(".")  # covers macOS '._*' resource forks too


def _narrow(a: np.ndarray) -> np.ndarray:
    """int32 where every value fits (4 bytes an input saved per column), else the int64 array itself."""
    if not a.size or (int(a.min()) >= -(1 << 31) and int(a.max()) < 1 << 31):
        return a.astype(np.int32)
    return a


class ItemList(Sequence):
    """A run's Items, stored by column: about 43 bytes per input (a 19-character key), not 190.

    A run holds its inputs from discovery to the manifest; at ImageNet's
    1.28 million images a list of Items alone was 246 MiB. Keys live in one
    string, the rest in NumPy arrays (int32 where the values fit) and small
    shared tables, and an Item is made when asked for: one at a time when
    iterated, a list for a slice; part() gives one shard's inputs packed.
    """

    def __init__(self, items):
        n = len(items)
        lengths = np.fromiter((len(it.key) for it in items), np.int64, n)
        ends = np.cumsum(lengths)
        self._ends, self._starts = _narrow(ends), _narrow(ends - lengths)
        self._keys = "".join(it.key for it in items)
        places, classes = {}, {}
        self._place = np.fromiter(
            (places.setdefault((None if it.name == it.key else it.name, it.where, it.relative),
                               len(places)) for it in items), np.int32, n)
        self._places = list(places)
        self._index = _narrow(np.fromiter((it.index for it in items), np.int64, n))
        self._label = _narrow(np.fromiter((it.label for it in items), np.int64, n))
        self._cls = np.fromiter(
            (-1 if it.class_name is None else classes.setdefault(it.class_name, len(classes)) for it in items),
            np.int32, n)
        self._classes = list(classes)

    def _items(self, a: int, b: int) -> list:
        """Items a..b-1, column by column (NumPy scalars one by one cost ~4x more)."""
        keys, places, classes = self._keys, self._places, self._classes
        make = tuple.__new__  # Item's own __new__ is Python code: three times slower
        out = []
        for s, e, p, index, label, c in zip(self._starts[a:b].tolist(), self._ends[a:b].tolist(),
                                            self._place[a:b].tolist(), self._index[a:b].tolist(),
                                            self._label[a:b].tolist(), self._cls[a:b].tolist()):
            key = keys[s:e]
            name, where, relative = places[p]
            out.append(make(Item, (key if name is None else name, key, where, index, label,
                                   None if c < 0 else classes[c], relative)))
        return out

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return self._items(start, max(start, stop))
            return [self._items(j, j + 1)[0] for j in range(start, stop, step)]
        n = len(self)
        if not -n <= i < n:
            raise IndexError("item index out of range")
        i %= n
        return self._items(i, i + 1)[0]

    def __iter__(self):
        for a in range(0, len(self), 4096):
            yield from self._items(a, a + 4096)

    def keys(self):
        """Every key, in order, made a few thousand at a time."""
        keys = self._keys
        for a in range(0, len(self), 4096):
            for s, e in zip(self._starts[a:a + 4096].tolist(), self._ends[a:a + 4096].tolist()):
                yield keys[s:e]

    def first_records(self, n: int) -> list:
        """The first n items, in order, that are TFRecord records."""
        return [self[i] for i in np.flatnonzero(self._index >= 0)[:n].tolist()]

    def class_names(self) -> list:
        """The class names the items carry, sorted."""
        used = np.unique(self._cls[self._cls >= 0])
        return sorted(self._classes[i] for i in used.tolist())

    def label_by_class(self, names) -> None:
        """Each item with a class name gets that name's position in `names` as its label, in place."""
        if not self._classes:
            return
        where = {n: i for i, n in enumerate(names)}
        mapping = np.array([where.get(c, -1) for c in self._classes] + [-1], np.int64)
        has = self._cls >= 0
        self._label = _narrow(np.where(has, mapping[self._cls], self._label))

    @classmethod
    def join(cls, parts) -> "ItemList":
        """Lists made apart (each with its own storage) one after another, as one list."""
        parts = list(parts)
        if len(parts) == 1:
            return parts[0]
        out = ItemList.__new__(ItemList)
        places, classes = {}, {}
        cols = {c: [] for c in ("_starts", "_ends", "_place", "_index", "_label", "_cls")}
        keys, offset = [], 0
        for p in parts:
            p = p.part(0, len(p))  # its own keys only, starting at 0
            place_of = np.array([places.setdefault(x, len(places)) for x in p._places] or [0], np.int32)
            class_of = np.array([classes.setdefault(x, len(classes)) for x in p._classes] + [-1], np.int32)
            keys.append(p._keys)
            cols["_starts"].append(p._starts.astype(np.int64) + offset)
            cols["_ends"].append(p._ends.astype(np.int64) + offset)
            offset += len(p._keys)
            cols["_place"].append(place_of[p._place])
            cols["_index"].append(p._index.astype(np.int64))
            cols["_label"].append(p._label.astype(np.int64))
            cols["_cls"].append(class_of[p._cls])
        out._keys = "".join(keys)
        for c, arrays in cols.items():
            joined = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
            setattr(out, c, joined.astype(np.int32) if c in ("_place", "_cls") else _narrow(joined))
        out._places, out._classes = list(places), list(classes)
        return out

    def relabel(self, mapping) -> None:
        """Labels renumbered in place: label i becomes mapping[i] (-1, no label, stays)."""
        mapping = np.asarray(mapping, np.int64)
        has = self._label >= 0
        self._label = np.where(has, mapping[np.where(has, self._label, 0)], self._label)

    def concat(self, others) -> "ItemList":
        """This list followed by others made by select() from the same list (they share its storage)."""
        out = ItemList.__new__(ItemList)
        out.__dict__.update(self.__dict__)
        for col in ("_starts", "_ends", "_place", "_index", "_label", "_cls"):
            setattr(out, col, np.concatenate([getattr(x, col) for x in [self, *others]]))
        return out

    def part(self, a: int, b: int) -> "ItemList":
        """Items a..b-1 as a list of their own: one shard's inputs without an object per input.

        Its keys are copied out of this list's string, so it pickles (to a
        Beam worker) at the size of its own inputs, not of the whole run's.
        """
        n = len(self)
        a, b = max(0, min(a, n)), max(0, min(b, n))
        b = max(a, b)
        out = ItemList.__new__(ItemList)
        out.__dict__.update(self.__dict__)
        # select() and concat() keep the shared string, so a part's keys need
        # not be in order or side by side in it: take the span they cover.
        lo = int(self._starts[a:b].min()) if b > a else 0
        hi = int(self._ends[a:b].max()) if b > a else 0
        out._keys = self._keys[lo:hi]
        out._starts = self._starts[a:b] - lo
        out._ends = self._ends[a:b] - lo
        for col in ("_place", "_index", "_label", "_cls"):
            setattr(out, col, getattr(self, col)[a:b].copy())
        return out

    def select(self, positions) -> "ItemList":
        """The items at these positions, sharing this list's storage."""
        out = ItemList.__new__(ItemList)
        out.__dict__.update(self.__dict__)
        positions = np.asarray(positions, np.int64)
        for col in ("_starts", "_ends", "_place", "_index", "_label", "_cls"):
            setattr(out, col, getattr(self, col)[positions])
        return out


class SortedRuns:
    """Items as discovery finds them, kept packed: sorted runs of RUN items, merged at the end.

    A list of a million Items costs about 190 MB before it could be packed;
    here at most one run is held as Items, the rest as ItemLists (about 43
    bytes an input). Runs are sorted stably by ORDER and merged stably
    (earlier runs first on equal names), so the result is the order one
    stable sort of everything would give.
    """

    RUN = 1 << 16

    def __init__(self):
        self.runs, self.chunk = [], []

    def add(self, item: Item) -> None:
        self.chunk.append(item)
        if len(self.chunk) >= self.RUN:
            self._close()

    def extend(self, items) -> None:
        for it in items:
            self.add(it)

    def _close(self) -> None:
        if self.chunk:
            self.chunk.sort(key=ORDER)
            self.runs.append(ItemList(self.chunk))
            self.chunk = []

    def __len__(self) -> int:
        return sum(map(len, self.runs)) + len(self.chunk)

    def sorted(self) -> "ItemList":
        """Every item added, sorted, packed; the runs are let go."""
        self._close()
        runs, self.runs = self.runs, []
        if len(runs) <= 1:
            return runs[0] if runs else ItemList([])
        out, buf = [], []
        for it in heapq.merge(*runs, key=ORDER):
            buf.append(it)
            if len(buf) == self.RUN:
                out.append(ItemList(buf))
                buf = []
        if buf:
            out.append(ItemList(buf))
        del runs, buf
        return ItemList.join(out)


class ImageFile:
    """A single image path; its key is the path as given, or as single_file_keys() chose.

    Only a regular file becomes an input: a missing path, a broken link, a
    FIFO, socket or device is a skipped entry with its reason, and nothing
    is opened to find out.
    """

    def __init__(self, path: str, key: str | None = None, mode=None):
        self.path = path
        self.key = key
        self._mode = mode  # os.stat(path).st_mode or the OSError, if the caller has it

    def items(self):
        key = self.key or _as_key(self.path)
        reason = _unusable(self.path, self._mode)
        if reason:
            return [], [{"source": key, "reason": reason}]
        return [Item(key, key, self.path)], []


def _stat_mode(path: str):
    """os.stat(path).st_mode, or the OSError (following links)."""
    try:
        return os.stat(path).st_mode
    except OSError as e:
        return e


def _unusable(path: str, mode=None) -> str | None:
    """Why a file named by the user cannot be an input, or None."""
    if mode is None:
        mode = _stat_mode(path)
    if isinstance(mode, FileNotFoundError):
        return "broken symbolic link" if os.path.islink(path) else "no such file or directory"
    if isinstance(mode, OSError):
        return f"cannot read: {_why(mode)}"
    if not stat.S_ISREG(mode):
        return _not_regular(mode)
    return None


def _not_regular(mode: int) -> str:
    return f"not a regular file ({file_kind(mode)})"


def _why(e: OSError) -> str:
    return e.strerror or str(e)


class ImageFolder:
    """A directory searched recursively; first sub-folder = class (ImageFolder).

    Links to folders are followed (a class folder may live on another
    disk), each real folder once: a link back to a folder on its own path
    is a loop, and a second way into a folder already searched is not taken
    (its images would be there twice, under two keys). What is not followed
    or cannot be read is listed with a reason, not dropped.
    """

    def __init__(self, path: str):
        self.path = path

    def items(self):
        """(items in no particular order (discover() sorts them), skipped entries)."""
        items = []
        skipped = self.walk(items.append)
        return items, skipped

    def walk(self, add):
        """Hand each image found to `add`, in no particular order; returns the skipped entries.

        Each Item is built while the directory is read (no DirEntry list, no
        intermediate tuples), sharing the folder's path and its class name,
        and goes straight to `add` (discover() packs them as they come). The
        plain tree is searched first and links to folders afterwards, in
        order of their keys, so which way into a folder counts does not
        depend on the order the disk lists entries in.
        """
        skipped = []
        classes = {}
        root = os.path.join(self.path, "")  # keys use "/", which every OS here accepts in paths
        seen = {}  # (st_dev, st_ino) of each folder searched -> its key prefix ("" for the top)
        stack = [("", self.path)]
        links = []  # heap of (key, path) of links to folders, followed after the plain tree

        def skip(rel, reason):
            skipped.append({"source": rel or _as_key(self.path), "reason": reason})

        while stack or links:
            if not stack:
                rel, path = heapq.heappop(links)
                stack.append((rel + "/", path))
            rel_dir, full_dir = stack.pop()
            try:
                st = os.stat(full_dir)
                it = os.scandir(full_dir)
            except OSError as e:
                skip(rel_dir[:-1], f"cannot read folder: {_why(e)}")
                continue
            first = seen.setdefault((st.st_dev, st.st_ino), rel_dir)
            if first != rel_dir:
                it.close()
                where = f"'{first[:-1]}'" if first else "the top folder"
                if rel_dir.startswith(first):
                    skip(rel_dir[:-1], f"symbolic link loop: leads back to {where}")
                else:
                    skip(rel_dir[:-1], f"not followed: the same folder as {where}, searched already")
                continue
            with it:
                while True:
                    try:
                        e = next(it)
                    except StopIteration:
                        break
                    except OSError as err:  # the folder vanished or broke while being read
                        skip(rel_dir[:-1], f"folder read only in part: {_why(err)}")
                        break
                    name = e.name
                    if is_hidden(name):
                        continue
                    rel = rel_dir + name
                    try:
                        if e.is_file(follow_symlinks=False):
                            regular = True
                        elif e.is_dir(follow_symlinks=False):
                            stack.append((rel + "/", e.path))
                            continue
                        elif e.is_symlink():
                            try:
                                mode = os.stat(e.path).st_mode
                            except FileNotFoundError:
                                skip(rel, "broken symbolic link")
                                continue
                            except OSError as err:
                                skip(rel, f"cannot follow symbolic link: {_why(err)}")
                                continue
                            if stat.S_ISDIR(mode):
                                heapq.heappush(links, (rel, e.path))
                                continue
                            regular = stat.S_ISREG(mode)
                        else:
                            mode = e.stat(follow_symlinks=False).st_mode
                            regular = False
                    except OSError as err:  # the entry vanished while being looked at
                        if is_image_name(name):
                            skip(rel, f"cannot read: {_why(err)}")
                        continue
                    if not is_image_name(name):
                        continue
                    if not regular:
                        skip(rel, _not_regular(mode))
                        continue
                    cls = None
                    if rel_dir:  # nested: the first sub-folder is the class
                        top = rel_dir[:rel_dir.index("/")]
                        cls = classes.setdefault(top, top)
                    add(Item(rel, rel, root, class_name=cls, relative=True))
        return skipped


class TfrecordFile:
    """A TFRecord file of tf.train.Example records; key FILE:INDEX (FILE as for ImageFile)."""

    def __init__(self, path: str, compression: str | None = None, name: str | None = None):
        self.path = path
        self.compression = compression
        self.name = name

    def compression_type(self) -> str:
        """"GZIP" or ""; OSError if the file cannot be read (a FIFO is refused, not waited on)."""
        if self.compression is not None:
            return "GZIP" if self.compression.lower() == "gzip" else ""
        from . import fs

        if fs.is_remote(self.path):
            with fs.open_read(self.path) as f:
                return "GZIP" if f.read(2) == GZIP_MAGIC else ""
        from .images import open_regular

        fd = open_regular(self.path)
        try:
            return "GZIP" if os.pread(fd, 2, 0) == GZIP_MAGIC else ""
        finally:
            os.close(fd)

    def items(self):
        items, skipped, _, _ = self.survey()
        return items, skipped

    def survey(self):
        """(items, skipped entries, end, located): an Item per readable record, an entry per record that is not.

        A record with damaged data is skipped alone, and the records after
        it stay inputs. Where reading stops early (a damaged header, a cut),
        `end` is (index, reason) and that index is skipped; no record after
        it can be located, so the reason says what is lost. `located` counts
        the records found, those with damaged data too.
        """
        from .records import census

        name = self.name or _as_key(self.path)
        try:
            compression = self.compression_type()
        except OSError as e:
            reason = f"cannot read: {_why(e)}"
            return [], [{"source": f"{name}:0", "reason": reason}], (0, reason), 0
        found = census(self.path, compression)
        damaged = {e.index: e.reason for e in found.damaged}
        items = [Item(name, f"{name}:{i}", self.path, index=i) for i in range(found.count) if i not in damaged]
        skipped = [{"source": f"{name}:{i}", "reason": f"corrupt TFRecord data: {reason}"}
                   for i, reason in damaged.items()]
        end = None
        if found.end:
            end = (found.count, found.end)
            skipped.append({"source": f"{name}:{found.count}", "reason": found.end})
        return items, skipped, end, found.count


def _parts(path: str) -> list:
    seps = "/\\" if os.name == "nt" else "/"
    return re.split(f"[{re.escape(seps)}]", path)


def single_file_keys(paths) -> dict:
    """{path: key} for files named one by one (images, TFRecord files).

    Relative paths without '..' keep their key: the path as given (as
    before). If any path is absolute or climbs with '..', every one of them
    is keyed by its path relative to the deepest folder holding them all
    (`find "$PWD/photos" -print0` gives keys like 'cats/a.png', not
    '/home/...'), so keys stay relative, never contain '..', do not depend
    on the order the paths came in, and two different files never share one.
    """
    paths = list(dict.fromkeys(paths))
    if all(not os.path.isabs(p) and not os.path.splitdrive(p)[0] and not (".." in p and ".." in _parts(p))
           for p in paths):
        return {p: _as_key(p) for p in paths}
    full = {p: os.path.abspath(p) for p in paths}
    out = {}
    by_drive = {}
    for p, f in full.items():
        by_drive.setdefault(os.path.splitdrive(f)[0], []).append(p)
    for drive, group in by_drive.items():
        base = os.path.commonpath([os.path.dirname(full[p]) for p in group])
        for p in group:
            key = os.path.relpath(full[p], base).replace(os.sep, "/")
            if len(by_drive) > 1:  # Windows, several drives: the drive letter leads
                key = drive.rstrip(":").replace("\\", "/").strip("/") + "/" + key
            out[p] = key
    return out


@dataclass
class Inventory:
    """Every input of a run, sorted by key, with the classes the folders gave.

    A TFDS folder also says which features hold the image and the label
    (`tfds`, what the manifest records of it) and how many channels its
    images have; `notes` are what discovery has to tell the user.
    """

    items: Sequence  # an ItemList
    classes: list | None
    skipped: list
    notes: list = field(default_factory=list)
    tfds: dict | None = None
    channels: int | None = None


class TfdsDataset:
    """A prepared TFDS dataset (its version folder, or the dataset folder above it): one split's records.

    Keys are FILE:INDEX with FILE relative to the version folder, so they do
    not depend on where the data lives or which of the two folders was
    named. The features say where the image and the label are; the class
    names come from the ClassLabel. Records are counted, and each shard's
    count compared with dataset_info.json's: a difference is a note, and
    recorded, never silent.
    """

    LISTED = 20  # shard files whose count differs, named one by one; the rest are counted

    def __init__(self, path: str, split: str | None = None, image_key: str | None = None,
                 label_key: str | None = None):
        from . import tfds_folder

        self.path = path
        found = tfds_folder.locate(path)
        if found is None:
            raise UsageError(f"{path} is not a prepared TFDS folder (no dataset_info.json in it or in a "
                             "VERSION folder below it)")
        self.folder, note = found
        self.notes = [note] if note else []
        self.meta = tfds_folder.read(self.folder)
        self.choice = tfds_folder.choose(self.meta, image_key, label_key)
        names = list(self.meta.splits)
        if split is None:
            if len(names) > 1:
                raise UsageError(f"{path} has the splits {listing(names)}; name one with --tfds-split")
            split = names[0]
        if split not in self.meta.splits:
            raise UsageError(f"{path} has no split {short(split)} (it has {listing(names)})")
        self.split = self.meta.splits[split]
        if self.choice.image.encoding == "jpeg":
            self.notes.append(f"TFDS feature {short(self.choice.image.key)} holds JPEG images: they are decoded with "
                              "Pillow (an exact IDCT); TFDS's tf.data pipeline decodes with TensorFlow's faster "
                              "IDCT, which differs by a few levels")

    LOST_NAMED = 1000  # records lost past a damaged header, named one by one

    def items(self):
        from .records import unreachable

        items, skipped, differ = [], [], []
        lengths = self.split.lengths or (None,) * len(self.split.files)
        for rel, want in zip(self.split.files, lengths):
            full = os.path.join(self.folder, *rel.split("/"))
            end = None
            if not os.path.lexists(full):
                skipped.append({"source": rel, "reason": "no such file (dataset_info.json lists it)"})
                found, located = [], 0
            else:
                found, bad, end, located = TfrecordFile(full, None, rel).survey()
                skipped.extend(bad)
                if end is not None and want is not None and want > end[0] + 1:
                    # dataset_info.json says how many records the file held: each one lost past the stop is
                    # named, or past LOST_NAMED (a stranger's count may be 10**12) the run of them in one entry
                    lost = range(end[0] + 1, want)
                    if len(lost) <= self.LOST_NAMED:
                        skipped.extend({"source": f"{rel}:{i}", "reason": unreachable(*end)} for i in lost)
                    else:
                        skipped.append({"source": f"{rel}:{lost[0]}..{lost[-1]}",
                                        "reason": f"{unreachable(*end)} ({len(lost)} records, as "
                                                  "dataset_info.json counts them)"})
            items.extend(found)
            # The records the file holds, damaged ones too (each is named, skipped, already); where a header
            # stops the reading, what lies past it is named above, and the count is not the file's to say.
            if want is not None and located != want and (end is None or located > want):
                differ.append({"file": rel, "expected": want, "found": located})
        promised = self.split.num_examples
        notes = list(self.notes)
        where = f"TFDS split {short(self.split.name)} of {short(self.meta.name)}"
        for d in differ[:self.LISTED]:
            notes.append(f"{where}: {short(d['file'])} holds {d['found']} records, dataset_info.json says {d['expected']}")
        if len(differ) > self.LISTED:
            notes.append(f"{where}: {len(differ) - self.LISTED} more shard files hold other counts than "
                         "dataset_info.json says")
        if promised is not None and promised != len(items):
            notes.append(f"{where}: {len(items)} examples found, dataset_info.json promises {promised}")
        self.record = {
            "dataset": self.meta.name, "version": self.meta.version, "split": self.split.name,
            "image_key": self.choice.image.key,
            "label_key": self.choice.label.key if self.choice.label else None,
            "num_examples_promised": promised, "num_examples_found": len(items),
            "counts_differ": differ,
        }
        self.notes = notes
        return items, skipped

    @property
    def channels(self) -> int | None:
        """The channels TFDS decodes this image feature to, where features.json fixes them (1, 3 or 4)."""
        shape = self.choice.image.shape
        return shape[-1] if len(shape) == 3 and shape[-1] in (1, 3, 4) else None


class BucketPrefix:
    """A folder-like prefix (or one object) in a bucket, listed through Beam's FileSystems.

    Keys are relative to the prefix, as for a local folder; the first
    sub-folder is the class. A single object's key is its name, with no class.
    """

    def __init__(self, path: str, compression: str | None = None):
        self.path = path.rstrip("/")
        self.compression = compression

    def items(self):
        from . import fs

        items, skipped = [], []
        base = self.path + "/"
        for path, size in fs.listing(self.path):
            if path == self.path:  # the prefix names one object
                rel = fs.basename(path)
            elif path.startswith(base):
                rel = path[len(base):]
            else:
                continue
            parts = rel.split("/")
            name = parts[-1]
            if any(part in (".", "..") for part in parts) and (is_image_name(name) or is_tfrecord_name(name)):
                # An object store's key may hold what no folder can: said, not passed over as hidden.
                skipped.append({"source": rel, "reason": "its name has a '.' or '..' part, which no file path "
                                                          "inside a folder can have"})
                continue
            if not name or any(is_hidden(part) for part in parts):
                continue
            top = parts[0] if len(parts) > 1 and path != self.path else None
            if is_tfrecord_name(name):
                found, bad = TfrecordFile(path, self.compression, rel).items()
                items.extend(found)
                skipped.extend(bad)
            elif is_image_name(name):
                items.append(Item(rel, rel, path, class_name=top))
        return items, skipped


def _refuse_nested(kinds: dict) -> None:
    """A source the walk of a folder source would also take gives its images twice, under two keys each.

    Seen as the walk sees it: through links to folders, and leaving out
    hidden entries and files without an image name, which it never takes.
    Each path is looked for by its parents (as given, and with links to
    folders resolved) among the folders' own spellings.
    """
    roots = {}
    for p, m in kinds.items():
        if isinstance(m, int) and stat.S_ISDIR(m):
            for spelling in (os.path.abspath(p), os.path.realpath(p)):
                roots.setdefault(spelling, p)
    if not roots or len(kinds) < 2:
        return
    for path, mode in kinds.items():
        if not isinstance(mode, int):
            continue
        given = os.path.abspath(path)
        if stat.S_ISDIR(mode):
            spellings = {given, os.path.realpath(path)}
        elif is_image_name(os.path.basename(path)):
            spellings = {given, os.path.join(os.path.realpath(os.path.dirname(given)), os.path.basename(given))}
        else:
            continue
        for spelling in spellings:
            cur, hidden = spelling, False
            while True:
                parent = os.path.dirname(cur)
                if parent == cur:
                    break
                hidden = hidden or is_hidden(os.path.basename(cur))
                folder = roots.get(parent)
                if folder is not None and folder != path and not hidden:
                    raise UsageError(f"{short(path)} lies inside {short(folder)}, also a source: its images "
                                     "would be encoded twice, under two keys")
                cur = parent


def _named_once(paths) -> tuple:
    """(the paths, each once, in order; those named more than once): two path lists joined are one input each.

    A million paths from stdin are told apart by 64-bit hashes first (8 bytes
    a path); only when one repeats are the strings counted.
    """
    paths = list(paths)
    hashes = np.fromiter(map(hash, paths), np.int64, len(paths))
    if len(np.unique(hashes)) == len(paths):
        return paths, []
    times = collections.Counter(paths)
    return list(times), [p for p, n in times.items() if n > 1]


def discover(paths, compression: str | None = None, *, tfds_split: str | None = None,
             image_key: str | None = None, label_key: str | None = None) -> Inventory:
    """Everything the user named, found and keyed; nothing is read or waited on.

    One stat per path: a folder is searched, a regular file becomes an
    input, anything else (missing, a broken link, a FIFO, socket or
    device) is a skipped entry with its reason. A prepared TFDS folder is
    a source of its own (`tfds_split` of it; the keys choose its features).
    """
    from . import fs, tfds_folder

    if not paths:
        raise UsageError("no sources given")
    paths, twice = _named_once(paths)
    kinds = {path: _stat_mode(path) for path in paths if not fs.is_remote(path)}
    tfds = [p for p, m in kinds.items() if isinstance(m, int) and stat.S_ISDIR(m) and tfds_folder.locate(p)]
    if tfds:
        if len(paths) > 1:
            others = [p for p in paths if p != tfds[0]]
            raise UsageError(f"{tfds[0]} is a TFDS dataset: encode it on its own, not with {others[0]}")
        return tfds_inventory(TfdsDataset(tfds[0], tfds_split, image_key, label_key))
    _refuse_nested(kinds)
    keys = single_file_keys(p for p in kinds if not (isinstance(kinds[p], int) and stat.S_ISDIR(kinds[p])))
    items, skipped = SortedRuns(), []
    for path in paths:
        if fs.is_remote(path):
            found, bad = BucketPrefix(path, compression).items()
            items.extend(found)
            skipped.extend(bad)
            continue
        mode = kinds[path]
        if isinstance(mode, int) and stat.S_ISDIR(mode):
            skipped.extend(ImageFolder(path).walk(items.add))  # a million images are never a list of Items
            continue
        if isinstance(mode, int) and stat.S_ISREG(mode) and is_tfrecord_name(os.path.basename(path)):
            source = TfrecordFile(path, compression, keys[path])
        else:
            source = ImageFile(path, keys[path], mode)
        found, bad = source.items()
        items.extend(found)
        skipped.extend(bad)
    skipped.sort(key=skipped_order)
    inv = inventory(items, skipped)
    if twice:
        inv.notes.append(f"{len(twice)} source(s) named more than once, each read once: "
                         + ", ".join(printable(p) for p in twice[:3]) + (", ..." if len(twice) > 3 else ""))
    return inv


def tfds_inventory(source: TfdsDataset) -> Inventory:
    """A TFDS split's inventory: its records, the ClassLabel's names (labels come from the records)."""
    items, skipped = source.items()
    skipped.sort(key=skipped_order)
    inv = inventory(items, skipped)
    inv.classes = source.choice.classes
    inv.notes, inv.tfds, inv.channels = [*inv.notes, *source.notes], source.record, source.channels
    return inv


def inventory(items, skipped: list) -> Inventory:
    """Sort, refuse two inputs with one key, number the classes and pack.

    The end of every discovery: local here, through Beam's FileSystems for
    cloud folders. `items` (Items, or a SortedRuns) is consumed.
    """
    if not isinstance(items, SortedRuns):
        runs = SortedRuns()
        runs.extend(items)
        items = runs
    packed = items.sorted()
    notes = []
    dup = _first_duplicate_key(packed)
    if dup is not None:
        packed, count, shown = _one_file_once(packed)
        if count:
            notes.append(f"{count} input(s) named more than once, in other spellings, each read once: "
                         + ", ".join(f"{printable(a)} as {printable(b)}" for a, b in shown)
                         + (", ..." if count > len(shown) else ""))
            dup = _first_duplicate_key(packed)
    if dup is not None:
        first, second = [it.path for it in packed if it.key == dup][:2]
        raise LogitifyError(
            f"two inputs share the key {dup!r} ({first} and {second}); "
            "encode them in separate runs or name their common parent folder"
        )
    names = packed.class_names()
    if names:
        packed.label_by_class(names)
    return Inventory(packed, names or None, skipped, notes)


def _same_file(a: str, b: str) -> bool:
    """Whether two spellings name one file: one bucket path, or one local file (links followed)."""
    if a == b:
        return True
    if "://" in a + b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _one_file_once(items: ItemList) -> tuple:
    """(the items with a file met again under the same key and label dropped, how many, the first 3 (kept, dropped) paths).

    A file named in two spellings (a/x.png and ./a/x.png, or a folder by a
    relative and an absolute path) is one input, as a path named twice is.
    Two different files under one key stay, for inventory to refuse. Only
    the items whose key's hash repeats are made (the list is sorted by key).
    """
    import array

    hashes = np.fromiter(map(hash, items.keys()), np.int64, len(items))
    repeats = np.flatnonzero(hashes[1:] == hashes[:-1])  # item i + 1 may have item i's key
    drop, count, shown = array.array("q"), 0, []
    at = 0
    while at < len(repeats):
        end = at
        while end + 1 < len(repeats) and repeats[end + 1] == repeats[end] + 1:
            end += 1
        start = int(repeats[at])
        group = items[start:int(repeats[end]) + 2]
        kept = []
        for j, it in enumerate(group):
            same = next((k for k in kept if k.key == it.key and k.label == it.label and k.class_name == it.class_name
                         and k.index == it.index and _same_file(k.path, it.path)), None)
            if same is None:
                kept.append(it)
            else:
                drop.append(start + j)
                count += 1
                if len(shown) < 3:
                    shown.append((same.path, it.path))
        at = end + 1
    if not count:
        return items, 0, []
    keep = np.ones(len(items), bool)
    keep[np.frombuffer(drop, np.int64)] = False
    return items.select(np.flatnonzero(keep)), count, shown


def _first_duplicate_key(items: ItemList):
    """The least key two inputs share, or None.

    Keys are compared by their 64-bit hashes first (8 bytes an input); only
    keys whose hash repeats are compared as strings.
    """
    if len(items) < 2:
        return None
    hashes = np.fromiter(map(hash, items.keys()), np.int64, len(items))
    ordered = np.sort(hashes)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(repeated):
        return None
    suspects = set(repeated.tolist())
    keys = sorted(k for k, h in zip(items.keys(), hashes.tolist()) if h in suspects)
    return next((a for a, b in zip(keys, keys[1:]) if a == b), None)


def read_path_list(stream, null: bool = False):
    r"""Paths from a stream: NUL-separated (find -print0), or one per line.

    Lines end at "\n" only (not at "\r", U+2028, "\x0b", "\x0c", "\x1c"-"\x1e"
    or "\x85", which are ordinary characters in POSIX names). A "\r" is
    part of the name too, except when every line ends with one: such a list
    came from a CRLF tool, so one "\r" is taken off each line. Blank lines
    are ignored; names of any kind are safe only with NUL separators.
    """
    data = stream.read()
    if isinstance(data, bytes):
        data = data.decode("utf-8", "surrogateescape")
    if null:
        return [p for p in data.split("\0") if p]
    lines = data.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if lines and all(line.endswith("\r") for line in lines):
        lines = [line[:-1] for line in lines]
    return [p for p in lines if p.strip()]
