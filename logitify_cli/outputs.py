"""Image outputs of `decode`: PNG files at each key, or uint8 npz per shard.

One interface for both, so neither runner branches on the output format:
the runner hands each shard's images to `add()` and `end_shard()`, which
return picklable jobs, and runs each job with `write()` (in a worker process
locally, in the Beam worker itself). Jobs create every folder and file
without following links: a key whose path meets a symbolic link, a hard
link or a non-folder is refused, by name, and nothing is written through it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import zlib

import numpy as np

from . import fs, pool

IMAGE_SUFFIXES = frozenset(
    ".png .jpg .jpeg .jpe .jfif .bmp .dib .gif .webp .tif .tiff .ppm .pgm .pbm .pnm".split()
)
PNG_JOB = 64  # images per PNG job at most
PNG_JOB_BYTES = 8 << 20  # and about this many bytes of pixels: large images travel a few at a time
NAME_MAX = 255  # bytes in one file name on the file systems we know
DEPTH_MAX = 255  # folders in a key's path: a path deeper than this is no image tree's (PATH_MAX is 4096 bytes)
REFUSED_LISTED = 1000  # refused keys kept (and printed) by name; more are counted
# Errors that say a key cannot be a file name here: the key is refused, the run goes on.
KEY_ERRNOS = frozenset(getattr(errno, n) for n in ("ENAMETOOLONG", "EILSEQ", "EINVAL") if hasattr(errno, n))


class Refused(Exception):
    """A key whose file cannot be written where it belongs without touching something else."""


def key_relpath(key: str, long_name: bool = False) -> str:
    """A key as a relative path inside the output folder, or ValueError.

    With long_name, its last name may be longer than a file name can be
    (PngNames then cuts it to fit).

    Keys come from manifests written by strangers: empty keys, NUL,
    absolute paths and '..' components are refused rather than cleaned up.
    Only '/' separates folders: on POSIX '\\' and ':' are ordinary
    characters of a name (the key 'a\\b.png' is one file, 'c:x.png' a file
    in the output folder). On Windows '\\' separates too, drives and device
    names (CON, NUL, COM1, ...) are refused, and any other ':' becomes '_'
    (it would name an NTFS stream; TFRecord keys are FILE:INDEX).
    """
    if not isinstance(key, str) or not key:
        raise ValueError("empty key")
    if "\0" in key:
        raise ValueError("key contains a NUL byte")
    try:
        os.fsencode(key)
    except UnicodeError:
        raise ValueError("key holds characters no file name here can have") from None
    text = key
    if os.name == "nt":
        text = key.replace("\\", "/")
        if len(text) > 1 and text[1] == ":" and text[0].isalpha():
            raise ValueError("key is an absolute path")
        text = text.replace(":", "_")
    if text.startswith("/"):
        raise ValueError("key is an absolute path")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError("key climbs out of the output folder ('..')")
    if not parts:
        raise ValueError("key names the output folder itself, not a file in it")
    if any(len(os.fsencode(p)) > NAME_MAX for p in (parts[:-1] if long_name else parts)):
        raise ValueError(f"key has a name longer than {NAME_MAX} bytes")
    if len(parts) > DEPTH_MAX:
        raise ValueError(f"key is more than {DEPTH_MAX} folders deep")
    if os.name == "nt":
        devices = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10))}
        if any(p.split(".")[0].rstrip(" ").upper() in devices for p in parts):
            raise ValueError("key names a Windows device (CON, NUL, COM1, ...)")
    return "/".join(parts)


def class_folder(name: str) -> str:
    """The folder decode puts a class's images in: the name as a relative path (TFDS's '/a/abbey' is a/abbey).

    ValueError where the name cannot be one ('..', NUL, too long): encode
    refuses such classes, so what it accepts decodes.
    """
    folder = name.lstrip("/")
    try:
        return key_relpath(folder) if folder else ""
    except ValueError as e:  # the key's reasons, said of a folder
        raise ValueError(str(e).replace("key ", "it ", 1).replace("not a file in it", "not a folder in it")) from None


def class_folder_problems(classes) -> list:
    """Why each class that decode cannot give a folder of its own cannot: a name no folder can have
    (see class_folder), or the folder of an earlier class ('cat' and '/cat'). Encode refuses such
    classes before a pixel is read, and verify names them."""
    from .report import printable

    problems, folders = [], {}
    for label, name in enumerate(classes or ()):
        try:
            folder = class_folder(name)
        except ValueError as e:
            problems.append(f"class {printable(name)!r} cannot name the folder its images decode into ({e})")
            continue
        if folder in folders:
            problems.append(f"classes {folders[folder]} and {label} both decode into the folder "
                            f"{printable(folder or '.')!r}")
        folders.setdefault(folder, label)
    return problems


def png_relpath(key: str, replace_suffix: bool = True) -> str:
    """The key's PNG file: its image suffix replaced by '.png' (or, without replace_suffix, '.png' added)."""
    rel = key_relpath(key)
    stem, ext = os.path.splitext(rel)
    if replace_suffix and ext.lower() in IMAGE_SUFFIXES and not stem.endswith("/") and os.path.basename(stem):
        rel = stem + ".png"
    else:
        rel += ".png"
    if len(os.fsencode(os.path.basename(rel))) > NAME_MAX:
        raise ValueError(f"key's file name with '.png' is longer than {NAME_MAX} bytes")
    return rel


def png_bytes(image: np.ndarray) -> bytes:
    """A lossless 8-bit PNG of image [H, W, C] (C = 1, 2, 3 or 4): no filter, zlib level 1.

    Written here rather than by Pillow's encoder, which costs several times
    as much per small image in Python set-up; any PNG reader, Pillow
    included, reads back exactly these pixels (tests/test_sinks.py).
    """
    h, w, c = image.shape
    raw = np.empty((h, w * c + 1), np.uint8)
    raw[:, 0] = 0  # filter type None on every row
    raw[:, 1:] = image.reshape(h, w * c)
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR[c], 0, 0, 0)),
                     _png_chunk(b"IDAT", zlib.compress(raw.data, 1)), _png_chunk(b"IEND", b"")))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR = {1: 0, 2: 4, 3: 2, 4: 6}  # grey, grey+alpha, RGB, RGBA


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


class _Folders:
    """Open folders under a root, made and entered without following links."""

    FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

    def __init__(self, root: str, identity=None):
        self.root = root
        self.identity = identity  # (device, inode) the root must still have: see folder_identity
        self.fds = {}

    CACHED = 256  # open folders kept at once (a run of keys in one folder opens it once)

    def fd(self, rel_dir: str) -> int:
        """The open folder rel_dir, made and entered a level at a time from the nearest one open."""
        if rel_dir in self.fds:
            return self.fds[rel_dir]
        if len(self.fds) >= self.CACHED:  # keys many folders deep, or in many folders: let them go
            self.close()
        parts = rel_dir.split("/") if rel_dir else []
        depth = len(parts)
        while depth and "/".join(parts[:depth]) not in self.fds:
            depth -= 1
        if depth == 0 and "" not in self.fds:
            # The root is the user's own choice of folder: a link there is theirs to make.
            fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(fd)
            try:
                refuse_moved(self.root, self.identity, (st.st_dev, st.st_ino))
            except OSError:
                os.close(fd)
                raise
            self.fds[""] = fd
        pfd = self.fds["/".join(parts[:depth])]
        for i in range(depth, len(parts)):
            name, here = parts[i], "/".join(parts[:i + 1])
            try:
                os.mkdir(name, 0o777, dir_fd=pfd)
            except FileExistsError:
                pass
            try:
                pfd = os.open(name, self.FLAGS, dir_fd=pfd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise Refused(f"{here} is a link or not a folder") from None
                raise
            self.fds[here] = pfd
        return pfd

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _replaceable(dfd: int, name: str, rel: str, overwrite: bool, protect) -> bool:
    """Whether a file is at name (False: nothing there); Refused unless it is a plain file this run may replace.

    `protect` holds (device, inode) of files never to replace: the dataset being decoded.
    """
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise Refused(f"{rel} is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{rel} exists and is not a file")
    if st.st_nlink > 1:
        raise Refused(f"{rel} is a hard link to a file elsewhere")
    if (st.st_dev, st.st_ino) in protect:
        raise Refused(f"{rel} is a file of the dataset being decoded")
    if not overwrite:
        raise Refused(f"{rel} exists (pass --overwrite to replace it)")
    return True


def _temp_name(name: str) -> str:
    """A hidden sibling's name for name's replacement: at most 200 bytes of name, so it fits wherever name does.

    Its suffix is random, so leftovers of killed runs (whose process ids come
    round again) never stand in the way.
    """
    import secrets

    stem = name[:200]
    while len(os.fsencode(stem)) > 200:  # characters of several bytes each
        stem = stem[:-1]
    return f".{stem}.{secrets.token_hex(6)}.tmp"


def _create(folders: _Folders, rel: str, overwrite: bool, protect=frozenset(), opening=None, beside: bool = True):
    """(fd, None) of a new file at rel, or (fd, temporary name) of the one that is to replace rel's file.

    An existing file is replaced only with overwrite, and never touched
    before its replacement is whole: the caller writes the temporary
    sibling and renames it over the old file (a stop before that leaves
    the old file as it was). Without `beside` no sibling is made for an
    existing file, and (None, None) says the caller may rename its own
    file over it. `opening` (a list) holds [folder fd, name]
    while an exclusive open is under way: a Ctrl-C that lands as it returns
    loses the descriptor, not the knowledge.
    """
    rel_dir, _, name = rel.rpartition("/")
    dfd = folders.fd(rel_dir)
    for _ in range(3):
        if opening is not None:
            opening[:] = [dfd, name]
        try:
            return os.open(name, _FLAGS, 0o644, dir_fd=dfd), None
        except FileExistsError:
            if opening is not None:
                opening.clear()  # someone's file, not ours
        if _replaceable(dfd, name, rel, overwrite, protect):
            if not beside:
                return None, None
            tmp = _temp_name(name)
            if opening is not None:
                opening[:] = [dfd, tmp]
            try:
                return os.open(tmp, _FLAGS, 0o644, dir_fd=dfd), tmp
            except FileExistsError:  # 48 random bits taken: another name next time
                if opening is not None:
                    opening.clear()
    raise Refused(f"{rel} keeps reappearing")


def _drop_empty(opening) -> None:
    """Remove the empty file an interrupted exclusive open made (see _create); never a file with bytes."""
    if not opening:
        return
    dfd, name = opening
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def write_file(root: str, rel: str, data, overwrite: bool, folders: _Folders | None = None,
               protect=frozenset()) -> None:
    """Write data at root/rel: in a bucket as an object, here without following any link.

    A file already there (with overwrite) is replaced by a rename once the
    new bytes are all written, so a stop leaves the old file or the new.
    """
    if fs.is_remote(root):
        fs.write_bytes(fs.join(root, rel), bytes(data))
        return
    own = folders is None
    folders = folders or _Folders(root)
    rel_dir, _, name = rel.rpartition("/")

    def drop(made):  # may run twice when a stop comes during it: both steps tolerate that
        fd, tmp = made
        try:
            os.close(fd)
        except OSError:
            pass
        try:
            os.unlink(tmp or name, dir_fd=folders.fd(rel_dir))
        except OSError:
            pass

    opening = []
    try:
        # A worker stopped mid-write (Ctrl-C on the run) drops the file, as this process does here.
        try:
            made = pool.undoable(lambda: _create(folders, rel, overwrite, protect, opening), drop)
        except BaseException as e:
            if not isinstance(e, Exception):  # Ctrl-C here, maybe just as the file was made
                _drop_empty(opening)
            raise
        fd, tmp = made
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            drop(made)
            pool.settled()
            raise
        if tmp is None:
            pool.settled()  # every byte is written: a stop from here on keeps the file
        else:  # a rename replaces a name, never writes through it
            dfd = folders.fd(rel_dir)
            try:
                pool.settled(lambda: os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd))
            except BaseException:
                drop(made)
                raise
        os.close(fd)
    finally:
        if own:
            folders.close()


def problem(key: str, rel: str, e: BaseException) -> dict:
    """A failed write as a problem: refused when the key is to blame, a failure of the run otherwise."""
    if isinstance(e, Refused):
        return {"key": key, "reason": str(e), "refused": True}
    if isinstance(e, OSError) and e.errno in KEY_ERRNOS:
        return {"key": key, "reason": f"{rel} cannot be made here: {e.strerror or e}", "refused": True}
    if isinstance(e, OSError):
        return {"key": key, "reason": f"cannot write {rel}: {e.strerror or e}", "refused": False}
    return {"key": key, "reason": f"{rel} cannot be made here: {e}", "refused": True}  # ValueError: the name


def folder_identity(root: str):
    """(device, inode) of a local output folder, or None (a bucket, or not there yet)."""
    if fs.is_remote(root):
        return None
    try:
        st = os.stat(root)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def refuse_moved(root: str, identity, now) -> None:
    """OSError (ESTALE) if the output folder's (device, inode) is no longer the one the run locked."""
    if identity is not None and now != identity:
        raise OSError(errno.ESTALE, f"the output folder {root} was moved or replaced during the run")


class ImageOutput:
    """Base of the image outputs."""

    name = ""

    # Whether a key's file name depends on the keys of earlier shards: a runner that makes shards
    # apart (Beam) settles those names for the whole dataset first (settle_names) and passes them in.
    names_span_shards = False

    def __init__(self, root: str, n_shards: int, overwrite: bool, protect=None, classes=None, settled=None,
                 identity=None):
        self.root, self.n_shards, self.overwrite = root, n_shards, overwrite
        self.protect = None if protect is None else frozenset(protect)  # see _create
        self.classes = list(classes) if classes else []  # the dataset's class names, by label
        self.refused = []  # {key, reason} of the first REFUSED_LISTED keys no file can be made for
        self.num_refused = 0  # all of them
        # Jobs open the folder by its name: one moved away (and another made in its place) mid-run is
        # an error, not images split between two folders and a run that says it wrote them all.
        # The launcher's, where it locked the folder (a Beam worker makes its output per shard).
        self.identity = identity if identity is not None else folder_identity(root)

    def refuse(self, key: str, reason: str) -> None:
        """Keep a refused key: by name for the first REFUSED_LISTED, counted after that."""
        self.num_refused += 1
        if len(self.refused) < REFUSED_LISTED:
            self.refused.append({"key": key, "reason": reason})

    def add(self, shard: int, keys, labels, images) -> list:
        """Jobs ready to run for a slice of a shard's images."""
        raise NotImplementedError

    def begin_shard(self, shard: int, count: int, shape) -> None:
        """Called before a shard's first slice, with how many images it holds and their shape."""

    def end_shard(self, shard: int) -> list:
        return []

    def close(self) -> None:
        """Drop whatever a failed run left half made."""

    @staticmethod
    def write(job) -> list:
        """Run one job (in any process): {"images": how many it held, "problems": [{key, reason, refused}]}."""
        raise NotImplementedError


def _tag(text: str) -> str:
    """12 hex digits of a path: what makes a name that had to change unlike any other."""
    import hashlib

    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=6).hexdigest()


_TAGGED = "~" + "[0-9a-f]" * 12  # what _tagged adds to a name (its pattern, for fnmatch)


def _cut(name: str, room: int) -> str:
    """name, cut to at most `room` bytes as a file name (never inside a character)."""
    name = name[:room]
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return name


def _tagged(path: str, end: str = "") -> str:
    """path with its last name cut to fit, then ~TAG (of the whole path) and `end`."""
    head, _, base = path.rpartition("/")
    name = _cut(base, NAME_MAX - 13 - len(end)) + f"~{_tag(path)}{end}"
    return f"{head}/{name}" if head else name


def _last_resort(rel: str) -> str:
    """A key's file when neither of its own names can be had: its name, cut to fit, then ~TAG.png."""
    return _tagged(rel, ".png")


def _folders_named(rel: str, pattern: str) -> list:
    """The folders of a file's path whose own name matches `pattern` (fnmatch, case as given)."""
    import fnmatch

    parts = rel.split("/")[:-1]
    return ["/".join(parts[:i + 1]) for i, p in enumerate(parts) if fnmatch.fnmatchcase(p, pattern)]


def _png_folders(rel: str) -> list:
    """The folders of a file's path that a PNG file could also be named (those ending in '.png')."""
    return _folders_named(rel, "*.png")


def _tagged_folders(rel: str) -> list:
    """The folders of a file's path named as PngNames renames a folder (NAME~TAG): a renamed one may meet them."""
    return _folders_named(rel, "*" + _TAGGED)


class PngNames:
    """The PNG each key decodes to, taken in key order.

    A key's file is the key with '.png' for its image suffix. When an
    earlier key took that name (a.jpg before a.png), or a folder of an
    earlier key's file has it, or it is too long for a file name, the key
    with '.png' added; failing that too, its name cut to fit with ~TAG.png.
    A folder whose name an earlier key's file took (b.jpg decoded as b.png,
    then b.png/c.png) becomes FOLDER~TAG for the files after it.
    """

    def __init__(self, classes=None):
        self.classes = list(classes or ())
        self.taken = set()
        self.folders = set()  # folders of taken files whose names end in '.png'

    def claims(self, key: str, label: int = -1) -> tuple:
        """The files the key may take, in the order it takes them: each a path, or the ValueError saying why not.

        ValueError for a key no file can be made for.
        """
        return tuple(self._candidates(key, label))

    def _candidates(self, key: str, label: int):
        """claims(), made one at a time (most keys take their first): the key's own checks happen at once."""
        rel = key_relpath(key, long_name=True)  # the key's own rules first: a class folder before '/abs' must not make it relative
        # Names are compared as the file system does, by their bytes: a key spelling a name's bytes with
        # surrogate escapes ('\udcc3\udca9' for 'é') is the same name, and is named (and tagged) as it.
        key, rel = os.fsdecode(os.fsencode(key)), os.fsdecode(os.fsencode(rel))
        if 0 <= label < len(self.classes):
            folder = class_folder(self.classes[label])
            if folder and not key.startswith(folder + "/"):
                key, rel = folder + "/" + key, folder + "/" + rel
        return self._names_of(key, rel)

    @staticmethod
    def _names_of(key: str, rel: str):
        for replace in (True, False):
            try:
                yield png_relpath(key, replace_suffix=replace)
            except ValueError as e:  # too long with '.png'
                yield e
        yield _last_resort(rel)

    def _moved(self, rel: str) -> str:
        """The path with each folder that a taken file already names given its ~TAG."""
        if ".png/" not in rel:
            return rel
        for _ in range(rel.count("/")):
            folder = next((f for f in _png_folders(rel) if f in self.taken), None)
            if folder is None:
                break
            rel = _tagged(folder) + rel[len(folder):]
        return rel

    def take(self, key: str, label: int = -1) -> str:
        """The file of the next key in order (ValueError if it can have none)."""
        tried = []
        for rel in self._candidates(key, label):
            if isinstance(rel, ValueError):
                continue
            rel = self._moved(rel)
            if rel in self.taken or rel in self.folders:
                tried.append(rel)
                continue
            self.taken.add(rel)
            if ".png/" in rel:
                self.folders.update(_png_folders(rel))
            return rel
        raise ValueError(f"two keys map to the same file {tried[-1]!r}")

    def own(self, key: str, label: int = -1) -> str:
        """The file a key takes when no other key competes for its names."""
        return next(rel for rel in self._candidates(key, label) if isinstance(rel, str))


def name_claims(classes, shard: int, start: int, keys, labels):
    """(name, (kind, (shard, position, key, label))): settle_names' input, grouped by name.

    Each key claims each file it may take ('file'), each folder of those a
    PNG file could be named ('folder'), and each folder named as a renamed
    one is ('folder'); and, for each such '.png' folder, the name it would
    be renamed to ('moved').
    """
    names = PngNames(classes)
    for i, (key, label) in enumerate(zip(keys, labels)):
        key, label = str(key), int(label)
        try:
            claims = names.claims(key, label)
        except ValueError:  # refused whatever the other keys are
            continue
        who = (shard, start + i, key, label)
        files = {rel for rel in claims if isinstance(rel, str)}
        for rel in sorted(files):
            yield rel, ("file", who)
        png = {f for rel in files for f in _png_folders(rel)}
        for folder in sorted(png | {f for rel in files for f in _tagged_folders(rel)}):
            yield folder, ("folder", who)
        for folder in sorted(png):
            yield _tagged(folder), ("moved", who)


def clashing(claims) -> list:
    """The keys that compete for one name: two keys' files, a key's file and another's folder, or a
    folder renamed as one that another key's files are in."""
    of = {"file": set(), "folder": set(), "moved": set()}
    for kind, who in claims:
        of[kind].add(who)
    keys = {kind: {w[:2] for w in whos} for kind, whos in of.items()}
    if (len(keys["file"]) > 1 or (keys["file"] and keys["folder"] - keys["file"])
            or (keys["moved"] and keys["folder"] - keys["moved"])):
        return sorted(of["file"] | of["folder"] | of["moved"])
    return []


def settle_names(clashing, classes) -> dict:
    """{(shard, position): (file, None) or (None, reason)} for keys whose names other keys claim too.

    `clashing` holds (shard, position, key, label) of every key that claims
    a name another key claims as well. Taking those keys alone in key order
    gives each the file taking every key would: a key no other key competes
    with has its own name whatever comes before it.
    """
    names = PngNames(classes)
    out = {}
    for shard, position, key, label in sorted(set(clashing)):
        try:
            out[(shard, position)] = (names.take(key, label), None)
        except ValueError as e:
            out[(shard, position)] = (None, str(e))
    return out


class PngOutput(ImageOutput):
    """Lossless PNGs at each key, '.png' for the extension, in their class's folder.

    An image folder's keys start with their class folder already; a
    record's key (FILE:INDEX) is put in the folder of its label's class, so
    a labelled TFDS or TFRecord dataset decodes to an image folder.
    """

    name = "png"
    names_span_shards = True

    def __init__(self, *args, settled=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._names = PngNames(self.classes)
        # {(shard, position): (file, None) or (None, reason)} for the keys that share a name with
        # another key, settled for the whole dataset beforehand; None: settled here, in key order.
        self._settled = settled
        self._at = (0, 0)  # (shard, position) of the next key

    def _target(self, key: str, label: int = -1) -> str:
        if self._settled is None:
            return self._names.take(key, label)
        settled = self._settled.get(self._at)
        if settled is None:  # no other key claims its names: its own
            return self._names.own(key, label)
        rel, reason = settled
        if reason is not None:
            raise ValueError(reason)
        return rel

    def add(self, shard, keys, labels, images):
        batch = []
        if self._at[0] != shard:
            self._at = (shard, 0)
        for key, label, img in zip(keys, labels, images):
            key = str(key)
            try:
                batch.append((key, self._target(key, int(label)), img))
            except ValueError as e:
                self.refuse(key, str(e))
            self._at = (shard, self._at[1] + 1)
        per_job = max(1, min(PNG_JOB, PNG_JOB_BYTES // max(1, images[0].nbytes))) if len(images) else PNG_JOB
        protect = self.protect or frozenset()
        return [(self.root, self.overwrite, batch[a:a + per_job], protect, self.identity)
                for a in range(0, len(batch), per_job)]

    @staticmethod
    def write(job):
        root, overwrite, batch, protect, identity = job
        problems = []
        folders = None if fs.is_remote(root) else _Folders(root, identity)
        try:
            for key, rel, img in batch:
                try:
                    write_file(root, rel, png_bytes(img), overwrite, folders, protect)
                except (Refused, OSError, ValueError) as e:
                    problems.append(problem(key, rel, e))
        finally:
            if folders is not None:
                folders.close()
        return {"images": len(batch), "problems": problems}


class _NpzStream:
    """One shard's npz, written under a temporary name as its slices come.

    The images stream straight into the zip entry, so the shard is never
    whole in memory; keys and labels go to a side file beside it (keys of
    each slice at that slice's width) and are copied in at the end, keys
    widened to the widest. Locally both files are created in the output
    folder without following links; for a bucket, in a local temp folder.
    """

    def __init__(self, root: str, name: str, count: int, shape):
        import tempfile
        import zipfile

        self.remote = fs.is_remote(root)
        self.name, self.count = name, count
        self.dir = tempfile.mkdtemp(prefix="logitify-npz-") if self.remote else root
        self.tmp = f".{name}.tmp-{os.getpid()}"
        self.side = f".{name}.side.tmp-{os.getpid()}"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for n in (self.tmp, self.side):
            try:
                os.unlink(os.path.join(self.dir, n))  # a leftover of a killed run of this process id
            except FileNotFoundError:
                pass
        self._file = os.fdopen(os.open(os.path.join(self.dir, self.tmp), flags, 0o644), "w+b")
        self._side = os.fdopen(os.open(os.path.join(self.dir, self.side), flags, 0o644), "w+b")
        self._zip = zipfile.ZipFile(self._file, "w", allowZip64=True)
        self._entry = self._open_entry("images.npy")
        np.lib.format.write_array_header_1_0(
            self._entry, {"descr": "|u1", "fortran_order": False, "shape": (count,) + tuple(shape)})
        self._parts = []  # (rows, key width) of each slice in the side file
        self.written = 0

    def _open_entry(self, name):
        import zipfile

        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        return self._zip.open(info, "w", force_zip64=True)

    def add(self, keys, labels, images) -> None:
        if self.written + len(images) > self.count:
            raise ValueError(f"{self.name}: more images than the shard holds")
        self._entry.write(np.ascontiguousarray(images, np.uint8).data)
        keys = np.asarray(keys)
        keys = keys.astype("<U1") if keys.size == 0 else np.ascontiguousarray(keys.astype(f"<U{max(1, keys.dtype.itemsize // 4)}"))
        self._side.write(np.asarray(labels, "<i8").tobytes())
        self._side.write(keys.tobytes())
        self._parts.append((len(images), keys.dtype.itemsize))
        self.written += len(images)

    def _copy(self, entry, width: int, keys: bool) -> None:
        pos = 0
        for rows, itemsize in self._parts:
            self._side.seek(pos + (8 * rows if keys else 0))
            if keys:
                part = np.frombuffer(self._side.read(rows * itemsize), f"<U{itemsize // 4}")
                entry.write(part.astype(f"<U{width}").tobytes())
            else:
                entry.write(self._side.read(8 * rows))
            pos += rows * (8 + itemsize)

    def finish(self) -> tuple:
        """Close the zip; the job that puts it in place under its name."""
        if self.written != self.count:
            raise ValueError(f"{self.name}: {self.written} images, the shard holds {self.count}")
        self._entry.close()
        width = max([itemsize // 4 for _, itemsize in self._parts] + [1])
        with self._open_entry("keys.npy") as e:
            np.lib.format.write_array_header_1_0(e, {"descr": f"<U{width}", "fortran_order": False,
                                                     "shape": (self.count,)})
            self._copy(e, width, keys=True)
        with self._open_entry("labels.npy") as e:
            np.lib.format.write_array_header_1_0(e, {"descr": "<i8", "fortran_order": False, "shape": (self.count,)})
            self._copy(e, width, keys=False)
        self._zip.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self.close(keep=True)
        return self.dir, self.tmp, self.remote

    def close(self, keep: bool = False) -> None:
        for f in (getattr(self, "_entry", None), getattr(self, "_zip", None), self._file, self._side):
            try:
                if f is not None:
                    f.close()
            except (OSError, ValueError):
                pass
        names = [self.side] + ([] if keep else [self.tmp])
        for n in names:
            try:
                os.unlink(os.path.join(self.dir, n))
            except FileNotFoundError:
                pass
        if self.remote and not keep:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)


def _place(root: str, folder: str, tmp: str, name: str, overwrite: bool, protect, remote: bool,
           identity=None) -> None:
    """Move a finished temporary file to its name: the same refusals as a new file, and no link followed."""
    if remote:
        import shutil

        try:
            fs.upload(os.path.join(folder, tmp), fs.join(root, name))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    folders = _Folders(root, identity)
    try:
        dfd = folders.fd("")
        opening = []  # [folder fd, name] once this job has made, or is making, its empty placeholder

        def drop(_=None):
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            _drop_empty(opening)  # the placeholder: a shard renamed over it is never empty

        def claim():
            """Hold the name: an empty placeholder for a new file (so no other file can take it meanwhile),
            nothing for an old file this run may replace (it stays whole until the rename)."""
            fd, _ = _create(folders, name, overwrite, protect, opening, beside=False)
            if fd is not None:
                os.close(fd)

        try:
            # Stopped (Ctrl-C on the run) before the rename, a worker leaves neither file behind.
            # Links, hard links and the dataset's own files are refused.
            pool.undoable(claim, drop)
            # A rename replaces a name, never writes through it.
            pool.settled(lambda: os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd))
        except BaseException:
            drop()
            pool.settled()
            raise
    finally:
        folders.close()


class NpzOutput(ImageOutput):
    """images-{i:05d}-of-{n:05d}.npz per shard: uint8 images, keys, labels, streamed to disk."""

    name = "npz"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._open = {}
        self._handed = []  # (folder, temporary name, remote) of each finished shard given to a job

    def _file(self, shard: int) -> str:
        return f"images-{shard:05d}-of-{self.n_shards:05d}.npz"

    def begin_shard(self, shard, count, shape):
        with self._writing(shard):
            refuse_moved(self.root, self.identity, folder_identity(self.root))  # see ImageOutput
            self._open[shard] = _NpzStream(self.root, self._file(shard), count, shape)

    def add(self, shard, keys, labels, images):
        if shard not in self._open:  # its count and shape come from begin_shard, never from a first slice
            raise RuntimeError(f"images of shard {shard} added before begin_shard")
        with self._writing(shard):
            self._open[shard].add([str(k) for k in keys] if not isinstance(keys, np.ndarray) else keys, labels,
                                  images)
        return []

    @contextlib.contextmanager
    def _writing(self, shard):
        """A failed write of the shard's file (a full disk, a file size limit) as the one line that names it."""
        try:
            yield
        except OSError as e:
            from .errors import write_error

            raise write_error(e, self._file(shard)) from None

    def end_shard(self, shard):
        if shard not in self._open:
            raise RuntimeError(f"shard {shard} ended before begin_shard")
        stream = self._open.pop(shard)
        try:
            with self._writing(shard):
                folder, tmp, remote = stream.finish()
        except BaseException:
            stream.close()
            raise
        self._handed.append((folder, tmp, remote))
        return [(self.root, self.overwrite, self._file(shard), folder, tmp, remote, stream.count,
                 self.protect or frozenset(), self.identity)]

    def close(self):
        for stream in self._open.values():
            stream.close()
        self._open = {}
        # A job that ran has moved its file (or dropped it); one a stopped run never ran has not.
        for folder, tmp, remote in self._handed:
            if remote:
                import shutil

                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                os.unlink(os.path.join(folder, tmp))
            except OSError:
                pass
        self._handed = []

    @staticmethod
    def write(job):
        root, overwrite, name, folder, tmp, remote, count, protect, identity = job
        problems = []
        try:
            _place(root, folder, tmp, name, overwrite, protect, remote, identity)
        except (Refused, OSError, ValueError) as e:
            problems = [problem(name, name, e)]
        return {"images": 0 if problems else count, "problems": problems}


IMAGE_OUTPUTS = {cls.name: cls for cls in (PngOutput, NpzOutput)}
