"""The output folder: what logitify owns in it, its lock, and the resume journal.

Rules that keep a user's files safe:
- logitify owns only what a logitify manifest or journal in the folder names
  (shards, metadata, the manifest) and its own temporary and lock files;
- `--overwrite` removes owned files only, never an input of the current run,
  and refuses a folder that holds anything else, naming the first such file;
- one run at a time: a lock file held with flock(), so a second run into the
  same folder is refused with the first one's process id, and a lock left by
  a killed run is taken over.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import re
import stat
import time

from . import manifest as manifest_mod
from .errors import ForeignFile, LogitifyError, OutputInUse, write_error
from .report import printable, short

# \Z, not $: "$" also matches before a final newline, and "x.jsonl\n" is someone else's name.
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-\d+\Z")
_JOURNAL = re.compile(r"^\.logitify-journal(?:-(?P<split>[A-Za-z0-9_]{1,64}))?\.jsonl\Z")
RECEIPT = ".{file}.receipt.json"  # what a Beam worker leaves beside the shard it made
_RECEIPT = re.compile(r"^\.(?P<file>.+)\.receipt\.json\Z")
# Never through a link, never kept by a child, never blocked by a FIFO someone left under the name.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def _own_fd(path: str, flags: int, what: str) -> int:
    """Open a file of logitify's own in the output folder, never through a link.

    A symbolic link or a hard link there could make logitify truncate or
    append to a user's file elsewhere: such a file is refused by name.
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):
            raise LogitifyError(f"{printable(path)} is a symbolic link, not logitify's {what}; "
                                "remove it and run again") from None
        raise
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:  # unlinked as it was opened
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "removed while opened", path)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        _refuse_as(path, st, what)
    return fd


def _refuse_as(path: str, st, what: str) -> None:
    """Refuse, by name, a file at one of logitify's own names that is not a plain file of its own."""
    if stat.S_ISLNK(st.st_mode):
        kind = "a symbolic link"
    elif stat.S_ISREG(st.st_mode):
        kind = "a hard link to a file elsewhere"
    else:
        kind = "not a plain file"
    raise LogitifyError(f"{printable(path)} is {kind}, not logitify's {what}; remove it and run again")


def refuse_foreign_own(path: str, what: str) -> None:
    """_own_fd's refusal, from a look alone: a run refuses such a file before it does any work."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except (OSError, ValueError):
        return
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        _refuse_as(path, st, what)


def protected_folder(path: str) -> str | None:
    """What a folder is when it is one --overwrite must never clear: the root, or the home folder."""
    real = os.path.realpath(path)
    if os.path.dirname(real) == real:
        return "the root of the file system"
    home = os.path.expanduser("~")
    if home != "~" and real == os.path.realpath(home):
        return "your home folder"
    return None


def describe_difference(old: dict, new: dict) -> str:
    diffs = []
    for k in sorted(set(old) | set(new), key=str)[:20]:
        if k == "inputs":
            continue
        if old.get(k) != new.get(k):
            diffs.append(f"{short(k)}: was {short(old.get(k))}, now {short(new.get(k))}")
    if old.get("inputs") != new.get("inputs"):
        diffs.append("the input files differ")
    return "; ".join(diffs) or "unknown difference"


def recorded_difference(m, header: dict) -> str:
    """What differs between a finished split's manifest and this run's header, as far as the manifest records it."""
    src = m.source if isinstance(m.source, dict) else {}
    was = {"format": m.format, "name": m.name, "split": m.split, **m.params.to_dict(),
           "shape": list(m.shape), "compress": m.compressed,
           **{k: src.get(k) for k in ("size", "channels", "shard_size", "image_key", "label_key", "max_pixels")},
           **manifest_mod.source_geometry(src)}
    now = {**{k: header.get(k) for k in was}, **(header.get("transform") or {}),
           **manifest_mod.source_geometry(header)}
    diffs = [f"{k}: was {short(was[k])}, now {short(now[k])}" for k in was if was[k] != now[k]]
    return "; ".join(diffs) or "the inputs, or an option the manifest does not record (--holdout, say)"


class Journal:
    """Append-only record of whole shards, so a killed run can resume."""

    def __init__(self, folder: str, split: str = "train"):
        self.path = os.path.join(folder, manifest_mod.journal_name(split))
        self.started = False  # a new journal, by this process

    def start(self, header: dict) -> None:
        """A new journal: whatever held the name before (a link included) is unlinked, not written through."""
        try:
            self.remove()
        except IsADirectoryError:
            pass
        if os.path.lexists(self.path):
            raise LogitifyError(f"{printable(self.path)} is not a plain file, not logitify's journal; "
                                "remove it and run again")
        self._write(os.O_WRONLY | os.O_CREAT | os.O_EXCL, {"header": header})
        self.started = True

    def append(self, entry) -> None:
        """One finished shard: its entry as a dict, its JSON text, or that text in pieces (ShardResult.json_pieces)."""
        if isinstance(entry, dict):
            entry = json.dumps(entry)
        pieces = [entry] if isinstance(entry, str) else entry
        self._write(os.O_WRONLY | os.O_APPEND, itertools.chain(['{"shard": '], pieces, ["}"]))

    def drop_if_nothing_left(self, header: dict) -> None:
        """After a failed or stopped run: the journal it started, if no file its header names is in the folder.

        A journal names the shards its run may leave, so --resume and
        --overwrite can take them back (a Beam run's records no shard). When
        no shard, its temporary or its receipt is there, it stands for
        nothing, and the same command needs no flag. A shard renamed into
        place but not yet recorded keeps it, so it stays logitify's.
        """
        if not self.started:
            return
        try:
            names = os.listdir(os.path.dirname(self.path) or ".")
        except OSError:
            return
        for n in names:
            temp, receipt = _TEMP.match(n), _RECEIPT.match(n)
            n = temp.group("name") if temp else receipt.group("file") if receipt else n
            if header_owns(header, n):
                return
        self.remove()

    def _write(self, flags: int, record) -> None:
        """One line: a dict, or the pieces of its text (a line cut short by a kill is ignored on reading)."""
        try:
            fd = _own_fd(self.path, flags, "journal")
            with open(fd, "a", encoding="utf-8") as f:
                for piece in ([json.dumps(record)] if isinstance(record, dict) else record):
                    f.write(piece)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise write_error(e, self.path) from None

    def load(self, entries: bool = True, expect: dict | None = None):
        """(header or None, {index: entry}); a line cut by a kill ends what is known.

        A journal that is a link, or not a plain file, is not logitify's: it
        says nothing (and so owns nothing in the folder). Entries count only
        where they name the shard file their header gives their index, so a
        journal can never claim a user's file.
        """
        try:
            fd = _own_fd(self.path, os.O_RDONLY, "journal")
        except (OSError, LogitifyError):
            return None, {}
        try:
            with open(fd, "rb") as f:
                return read_journal(f, entries, expect)
        except OSError:
            return None, {}

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


_ENTRY_FIELDS = ("index", "file", "num_examples", "sha256", "skipped", "made_grey", "num_made_grey", "pixels")


def read_journal(f, entries: bool = True, expect: dict | None = None):
    """(header or None, {index: entry}) of a journal read from a binary file, in a folder or a bucket alike.

    A journal starts with its header line (Journal.start writes it first, and
    alone): a first line that is not one, or is longer than any header,
    says nothing. With `entries`, the shards' lines follow, a line at a
    time; one that does not end in a newline (cut by a kill, or longer than
    JOURNAL_MAX_LINE) or is not a JSON object in UTF-8 ends what is known.
    An entry counts only where it names the shard file its header gives its
    index (so a journal never claims a user's file), and keeps only the
    fields a journal writes. Ownership asks for the header alone, and
    --resume for entries only under the header it `expect`s: a journal of
    other options is refused before a line of it past the header is read.
    """
    first, _ = _journal_line(f, JOURNAL_MAX_HEADER)
    if first is None or not isinstance(first.get("header"), dict):
        return None, {}
    header, shards = first["header"], {}
    left = JOURNAL_MAX_BYTES
    while entries and (expect is None or header == expect) and left > 0:
        rec, size = _journal_line(f, min(left, JOURNAL_MAX_LINE))
        if rec is None:
            break
        left -= size
        entry = rec.get("shard")
        if _entry_ok(entry, header):
            shards[entry["index"]] = {k: entry[k] for k in _ENTRY_FIELDS if k in entry}
    return header, shards


def _journal_line(f, limit: int):
    """(the next line of a journal as a JSON object, its length in bytes), or (None, 0) where reading ends."""
    line = f.readline(limit)
    if not line.endswith(b"\n"):
        return None, 0
    try:
        rec = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError included
        return None, 0
    return (rec, len(line)) if isinstance(rec, dict) else (None, 0)


# A journal line per shard holds a 64-digit digest per image (ImageNet's 1.28 million made 83 MB in
# all): the whole is bounded only against a planted file that never ends, a line (and so the memory
# parsing it takes) against one with no newline. A shard of more than about a million images has a
# longer line, and --resume makes it again. A header is a few hundred bytes.
JOURNAL_MAX_BYTES = 4 << 30
JOURNAL_MAX_LINE = 64 << 20
JOURNAL_MAX_HEADER = 64 << 10


def _no_constant(name):
    raise ValueError(name)


def _entry_ok(entry, header: dict) -> bool:
    """A journal entry of a whole shard: the file its header names for its index, with a count and digest."""
    return (isinstance(entry, dict) and type(entry.get("index")) is int
            and entry.get("file") is not None and entry.get("file") == header_file(header, entry["index"])
            and type(entry.get("num_examples")) is int
            and entry["num_examples"] >= 0 and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("skipped", []), list)
            # A shard is given shard_size inputs at most: each made or skipped.
            and (type(header.get("shard_size")) is not int
                 or entry["num_examples"] + len(entry.get("skipped", [])) <= header["shard_size"])
            and all(isinstance(x, dict) and isinstance(x.get("source"), str) and isinstance(x.get("reason"), str)
                    for x in entry.get("skipped", [])))


def _header_format(header: dict):
    """The registered format a journal header names, or None."""
    from .formats import FORMATS

    return FORMATS.get(header.get("format")) if isinstance(header.get("format"), str) else None


def _header_shards(header: dict):
    """(format, name, split, count) of a journal header that names shards, or None."""
    fmt = _header_format(header)
    n = header.get("num_shards")
    if fmt is None or type(n) is not int or not 0 < n < 100000:
        return None
    return fmt, str(header.get("name", "")), str(header.get("split", "")), n


def header_file(header: dict, index: int) -> str | None:
    """The shard file a run with this journal header writes at `index`, or None if it writes none there."""
    got = _header_shards(header)
    if got is None or type(index) is not int:
        return None
    fmt, name, split, n = got
    if not 0 <= index < n:
        return None
    file = fmt.shard_file(name, split, index, n)
    return file if fmt.owns(file) else None


def header_files(header: dict) -> list:
    """Every shard file a run with this journal header may have written (for this run's own header)."""
    got = _header_shards(header)
    if got is None:
        return []
    fmt, name, split, n = got
    return [f for f in (fmt.shard_file(name, split, i, n) for i in range(n)) if fmt.owns(f)]


def header_owns(header: dict, file: str) -> bool:
    """Whether `file` is one of header_files(header), asked of the name itself.

    A planted header may claim 99,999 shards of a name a megabyte long:
    listing them all to look a name up took gigabytes. A shard name holds
    its index in decimal, so only the numbers in `file` are tried.
    """
    if not isinstance(header, dict) or _header_shards(header) is None:
        return False
    return any(header_file(header, int(d)) == file for d in set(re.findall(r"\d{1,6}", file)))


def header_writes(header: dict) -> list:
    """Every file a run with this header writes: its shards, the format's metadata, the manifest."""
    fmt = _header_format(header)
    extra = list(fmt.metadata_names) if fmt is not None else []
    return header_files(header) + extra + [manifest_mod.MANIFEST]


def owns_others(name: str) -> bool:
    """Whether a name is a manifest or a journal, which say what else is logitify's: those go last.

    An --overwrite stopped while it removes files then leaves what is left
    still owned, and the next one takes it.
    """
    return name == manifest_mod.MANIFEST or journal_split(name) is not None


def journal_split(name: str) -> str | None:
    """The split whose journal (manifest.journal_name) has this name, or None for any other name."""
    m = _JOURNAL.match(name)
    if m is None:
        return None
    split = m.group("split") or "train"
    return split if manifest_mod.journal_name(split) == name else None  # ".logitify-journal-train.jsonl" is no one's


def owned_names(manifest, journals: dict, present) -> set:
    """Which of the names `present` in an output logitify owns, a folder or a bucket prefix alike.

    `manifest` is the Manifest there (None when there is none or it is not
    logitify's); `journals` maps each journal's name to its header (None when
    it says nothing). Only names of the shapes logitify gives its files count:
    the manifest's shards and metadata of its own format and the manifest
    itself; the shards a journal's header names (never a manifest or
    metadata, which a planted journal could otherwise claim); the journals;
    and the receipt a Beam run leaves beside a shard of those (until the
    launcher has written the manifest and removes it), shard there or not.
    """
    from .formats import FORMATS

    present = set(present)
    names = set(journals) & present
    listed = set()  # the manifest's shards
    if manifest is not None:
        fmt = FORMATS[manifest.format]
        files = set(manifest.owned_files())
        names.update(f for f in files & present if f == manifest_mod.MANIFEST or fmt.owns(f))
        listed = {f for f in files if f not in fmt.metadata_names and fmt.owns(f)}
    headers = [h for h in journals.values() if isinstance(h, dict)]

    def shard(f):
        return f in listed or any(header_owns(h, f) for h in headers)

    receipts = {n for n, m in ((n, _RECEIPT.match(n)) for n in present) if m and shard(m.group("file"))}
    return names | {f for f in present if shard(f)} | receipts


LOCK_TRIES, LOCK_WAIT = 6, 0.05  # a held lock is retried for a quarter of a second


def in_use(folder: str, pid: int | None) -> OutputInUse:
    who = f"process {pid}" if pid else "another process"
    return OutputInUse(f"output folder {folder} is in use by another logitify run ({who}); wait for it to finish",
                       folder=folder, pid=pid)


class FolderLock:
    """An flock()ed lock file: held for a run's length, gone when the process is."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, manifest_mod.LOCK)
        self.fd = None

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # no flock (Windows): one run at a time is the user's to keep
            return self
        for _ in range(10):
            try:
                fd = _own_fd(self.path, os.O_RDWR | os.O_CREAT, "lock file")
            except FileNotFoundError:  # its holder removed it as we opened it
                continue
            except OSError as e:
                raise LogitifyError(f"cannot take the lock {printable(self.path)}: {e.strerror or e}") from None
            for attempt in range(LOCK_TRIES):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if attempt + 1 < LOCK_TRIES:  # another run's holder() may look for a moment
                        time.sleep(LOCK_WAIT)
                        continue
                    pid = _read_pid(fd)
                    os.close(fd)
                    raise in_use(self.folder, pid) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file as we opened it: try the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self
        raise OutputInUse(f"output folder {self.folder}: cannot take its lock", folder=self.folder, pid=None)

    def holder(self) -> int | None:
        """The process id of a run holding this lock now (0 if it cannot be read), or None.

        Looks without taking the lock for more than a moment, so a run can be
        refused before it does any work; acquire() waits out such a look.
        """
        try:
            import fcntl
        except ImportError:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None  # acquire() refuses it by name
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd) or 0
        finally:
            os.close(fd)
        return None

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_pid(fd) -> int | None:
    try:
        os.lseek(fd, 0, 0)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def not_a_folder(path: str) -> str:
    """What is at `path` instead of a folder, for a message: "is a link to nothing" or "exists and is not a folder"."""
    if os.path.islink(path) and not os.path.exists(path):
        return "is a link to nothing"
    return "exists and is not a folder"


def make_folder(path: str):
    """Make a local output folder and its missing parents, as os.makedirs does; what it made, for drop_made_folder.

    One level at a time, each recorded as it is made, under the path's own
    spelling (the kernel resolves `..` and links in it as makedirs would).
    Stopped or failed midway, it removes what it made.
    """
    missing, at = [], path
    while at and not os.path.exists(at):
        missing.append(at)
        head, tail = os.path.split(at)
        if not tail:  # a trailing slash
            head, tail = os.path.split(head)
        if not head or head == at:
            break
        at = head
    made = []
    try:
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:  # made meanwhile by someone else (or "x/.." of a folder just made): not ours
                if os.path.isdir(folder):
                    continue
                raise LogitifyError(f"cannot create output folder {path}: {folder} {not_a_folder(folder)}") from None
            st = os.stat(folder, follow_symlinks=False)
            made.append((folder, (st.st_dev, st.st_ino)))
    except BaseException as e:
        drop_made_folder(made[::-1])
        if isinstance(e, OSError):
            raise LogitifyError(f"cannot create output folder {path}: {e.strerror or e}") from None
        raise
    return made[::-1] or None  # the deepest first


def make_checked_folder(path: str, recheck=None):
    """make_folder(path), then `recheck()` (for a path a check found missing) unless the folder is one made here.

    A path such as `new/..` names no folder until `new` is made, and then
    names one that may hold a user's files: the check runs again, and a
    refusal takes back what was made.
    """
    made = make_folder(path)
    if recheck is not None and not (made and made[0][0] == path):
        try:
            recheck()
        except BaseException:
            drop_made_folder(made)
            raise
    return made


def drop_made_folder(made) -> None:
    """After a failed run: the folders make_folder() made (`made`, the deepest first), removed while empty.

    A failed first run into a new folder leaves no trace, and the next run
    needs no --overwrite. A folder is removed only while its device and
    inode are those it was made with and it is empty (rmdir removes nothing
    else); a file system may give a folder made in its place the same inode,
    and such a folder, if empty, goes too.
    """
    for folder, identity in made or ():
        try:
            st = os.stat(folder, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != identity:
                return
            os.rmdir(folder)
        except OSError:
            return


class OutputFolder:
    """A run's output folder on this machine."""

    def __init__(self, path: str, split: str = "train"):
        self.path = path
        self.made = None  # the folders create() made (see make_folder)
        self._unchecked = None  # check()'s arguments, when it found no folder to check
        self.lock = FolderLock(path)
        self.journal = Journal(path, split)

    def dataset(self):
        """The finished dataset in this folder (its Manifest, every split), or None."""
        mpath = os.path.join(self.path, manifest_mod.MANIFEST)
        if not os.path.isfile(mpath) or os.path.islink(mpath):
            return None
        try:
            return manifest_mod.read(mpath)
        except LogitifyError:
            return None

    def check(self, overwrite: bool, resume: bool, splits=None, resumable: bool = True) -> None:
        """Fail at once, before any work and before anything is written, on an output we may not touch.

        `resumable`: whether the runner can take --resume (Beam's cannot), for the advice a refusal gives.
        """
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise LogitifyError(f"output {self.path} {not_a_folder(self.path)}")
        if not os.path.isdir(self.path):
            self._unchecked = (overwrite, resume, splits, resumable)  # see create()
            return
        pid = self.lock.holder()
        if pid is not None:
            raise in_use(self.path, pid)
        refuse_foreign_own(self.lock.path, "lock file")
        if overwrite or resume:
            what = protected_folder(self.path)
            if what is not None:
                raise LogitifyError(f"output folder {self.path} is {what}; logitify does not write there with "
                                    f"--{'overwrite' if overwrite else 'resume'}: choose a folder of its own")
        names = self._names()
        if names and not (overwrite or resume):
            finish = ", or --resume to finish it" if resumable else ""
            have = self.dataset()
            if have is None or len(have.splits) == 1 and not set(have.splits) - set(splits or ()):
                raise LogitifyError(f"output folder {self.path} is not empty; pass --overwrite to replace "
                                    f"what logitify wrote there{finish}")
            there = sorted(set(have.splits) & set(splits or ()))
            if there:  # a dataset of other splits too: only the named ones would be replaced
                raise LogitifyError(f"{self.path} already holds the split {there[0]!r}; pass --overwrite to "
                                    f"replace only that split{finish}")
        if overwrite or resume:  # a resume with nothing of logitify's to finish would write beside a user's files
            self._refuse_foreign(names, self.owned(), "--overwrite" if overwrite else "--resume")

    def create(self) -> None:
        """Make the folder; one check() found missing that is there now without being made here is checked now.

        A path such as `new/..` names no folder until `new` is made, and then
        names one that may hold a user's files.
        """
        unchecked, self._unchecked = self._unchecked, None
        self.made = make_checked_folder(self.path, None if unchecked is None else lambda: self.check(*unchecked))

    def drop_if_made(self) -> None:
        """After a failed run: the folders create() made, if they are left empty (see drop_made_folder)."""
        drop_made_folder(self.made)

    def _names(self) -> list:
        try:
            return sorted(os.listdir(self.path))
        except OSError as e:
            raise LogitifyError(f"cannot read output folder {self.path}: {e.strerror or e}") from None

    def owned(self) -> set:
        """Names of the files in the folder that logitify wrote (per its manifest and journals; see owned_names).

        A manifest that is not logitify's, or is a link, owns nothing.
        """
        m = None
        mpath = os.path.join(self.path, manifest_mod.MANIFEST)
        if os.path.isfile(mpath) and not os.path.islink(mpath):
            try:
                m = manifest_mod.read(mpath)
            except LogitifyError:
                pass  # not ours: someone's manifest.json stays theirs
        names = self._names()
        splits = {n: journal_split(n) for n in names}
        journals = {n: Journal(self.path, split).load(entries=False)[0] for n, split in splits.items() if split}
        # A temporary's name counts as the name it stands for (see _ours).
        present = set(names) | {t.group("name") for t in map(_TEMP.match, names) if t is not None}
        return {manifest_mod.LOCK, manifest_mod.JOURNAL} | owned_names(m, journals, present)

    def _ours(self, owned: set):
        """Whether a name in the folder is logitify's: an owned name (or its temporary) that is no folder."""
        def ours(n):
            m = _TEMP.match(n)
            if not (n in owned or (m is not None and m.group("name") in owned)):
                return False
            p = os.path.join(self.path, n)
            return os.path.islink(p) or not os.path.isdir(p)  # logitify never makes a folder here

        return ours

    def _refuse_foreign(self, names: list, owned: set, option: str | None) -> None:
        """Refuse the first of `names` logitify did not write; `option` is the one the user gave, for the message."""
        ours = self._ours(owned)
        # A manifest that is not logitify's is named first: the files it would have owned follow from it.
        foreign = sorted((n for n in names if not ours(n)), key=lambda n: n != manifest_mod.MANIFEST)
        if foreign:
            who = f"{option} touches" if option else "logitify replaces"
            raise ForeignFile(
                f"output folder {self.path} holds {printable(foreign[0])}, which logitify did not write; "
                f"{who} only logitify's own files: move it away or choose another folder",
                folder=self.path, file=foreign[0])

    def prepare(self, overwrite: bool, resume: bool, inputs=None, keep_dataset: bool = False,
                writes=()) -> None:
        """Clear what this run replaces: owned files (--overwrite), leftovers of stopped runs (always).

        `inputs(paths)` answers which of these paths are inputs of this run.
        `keep_dataset`: the run adds or replaces a split of the finished
        dataset here, whose other splits stay; the replaced split's old shards
        go only once the new manifest is written (see remove_stale).
        `writes`: the names this run will write; one that is there and not
        logitify's is refused, so adding a split never replaces a user's file.
        """
        names = self._names()
        owned = self.owned()
        ours = self._ours(owned)
        # A receipt is read only by the Beam run whose worker wrote it, at that run's end.
        remove = [n for n in names if (_TEMP.match(n) or _RECEIPT.match(n)) and ours(n)]
        present = set(names)
        self._refuse_foreign([n for n in writes if n in present], owned, None)
        if overwrite:
            self._refuse_foreign(names, owned, "--overwrite")
        if overwrite and not keep_dataset:
            remove = [n for n in names if n != manifest_mod.LOCK]
        paths = [os.path.join(self.path, n) for n in remove]
        if inputs is not None:
            used = inputs([p for p in paths if os.path.isfile(p)])
            if used:
                raise LogitifyError(f"--overwrite would remove {printable(used[0])}, an input of this run; "
                                    "write the output to another folder")
        for p in sorted(paths, key=lambda p: owns_others(os.path.basename(p))):
            if os.path.islink(p) or os.path.isfile(p):  # a link goes, never what it points at
                os.unlink(p)

    def remove_stale(self, old, new) -> None:
        """After a manifest is written: remove the files in `old` (a replaced split's shards) it no longer names."""
        keep = set(new.owned_files())
        for n in old:
            p = os.path.join(self.path, n)
            if n not in keep and (os.path.islink(p) or os.path.isfile(p)):
                os.unlink(p)

    def resumable(self, header: dict, fingerprint: str, shards_of) -> dict:
        """{index: journal entry} of shards a previous run finished that are still whole.

        `shards_of(keys)` maps input keys to their shard index. The journal
        is started afresh with those entries, ready for this run's.
        """
        from .formats.base import file_sha256

        ours = self._ours(self.owned())
        for n in header_writes(header):
            if os.path.lexists(os.path.join(self.path, n)) and not ours(n):
                raise ForeignFile(f"output folder {self.path} holds {printable(n)}, which logitify did not write "
                                  "and this run would replace; move it away or choose another folder",
                                  folder=self.path, file=n)
        old, entries = self.journal.load(expect=header)
        if old is None:
            mpath = os.path.join(self.path, manifest_mod.MANIFEST)
            if not os.path.exists(mpath):
                return {}
            m = manifest_mod.read(mpath)
            split = header.get("split")
            if split not in m.splits:  # a split this finished dataset does not have yet: nothing to keep
                self.journal.start(header)
                return {}
            m = m.select(split)
            if m.stats.get("fingerprint") != fingerprint:
                raise LogitifyError(f"--resume: {self.path} holds a finished dataset made from other inputs or "
                                    f"options ({recorded_difference(m, header)})")
            old = header
            where = shards_of({x["source"] for x in m.skipped})
            entries = {i: {**s.to_dict(), "index": i, "skipped": [x for x in m.skipped if where.get(x["source"]) == i]}
                       for i, s in enumerate(m.shards)}
        if old != header:
            raise LogitifyError(f"--resume: the earlier run used other inputs or options ({describe_difference(old, header)})")
        keep = {}
        for i, e in entries.items():
            path = os.path.join(self.path, str(e.get("file")))
            if os.path.isfile(path) and not os.path.islink(path) and file_sha256(path) == e.get("sha256"):
                keep[i] = e
        self.journal.start(header)
        for e in keep.values():
            self.journal.append(e)
        return keep
