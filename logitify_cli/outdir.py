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

import json
import os
import re

from . import manifest as manifest_mod
from .errors import ForeignFile, LogitifyError, OutputInUse
from .report import printable

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-\d+$")
RECEIPT = ".{file}.receipt.json"  # what a Beam worker leaves beside the shard it made


def describe_difference(old: dict, new: dict) -> str:
    diffs = []
    for k in sorted(set(old) | set(new)):
        if k == "inputs":
            continue
        if old.get(k) != new.get(k):
            diffs.append(f"{k}: was {old.get(k)!r}, now {new.get(k)!r}")
    if old.get("inputs") != new.get("inputs"):
        diffs.append("the input files differ")
    return "; ".join(diffs) or "unknown difference"


class Journal:
    """Append-only record of whole shards, so a killed run can resume."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, manifest_mod.JOURNAL)

    def _write(self, line: str, mode: int) -> None:
        """Append or start afresh, never through a link someone left at the journal's name."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | mode | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def start(self, header: dict) -> None:
        self._write(json.dumps({"header": header}) + "\n", os.O_TRUNC)

    def append(self, entry: dict) -> None:
        self._write(json.dumps({"shard": entry}) + "\n", os.O_APPEND)

    def load(self):
        """(header or None, {index: entry}); a line cut by a kill ends what is known."""
        header, shards = None, {}
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    if not isinstance(rec, dict):
                        break
                    if isinstance(rec.get("header"), dict):
                        header = rec["header"]
                    elif isinstance(rec.get("shard"), dict) and isinstance(rec["shard"].get("index"), int):
                        shards[rec["shard"]["index"]] = rec["shard"]
        except (FileNotFoundError, UnicodeDecodeError):
            return None, {}
        return header, shards

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def header_files(header: dict) -> list:
    """Every shard file a run with this journal header may have written."""
    from .formats import FORMATS

    fmt = FORMATS.get(header.get("format"))
    n = header.get("num_shards")
    if fmt is None or type(n) is not int or not 0 < n < 100000:
        return []
    name, split = str(header.get("name", "")), str(header.get("split", ""))
    return [fmt.shard_file(name, split, i, n) for i in range(n)]


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
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise LogitifyError(f"cannot write {self.path} (the output folder's lock): "
                                    f"{e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = _read_pid(fd)
                os.close(fd)
                who = f"process {pid}" if pid else "another process"
                raise OutputInUse(f"output folder {self.folder} is in use by another logitify run ({who}); "
                                  "wait for it to finish", folder=self.folder, pid=pid) from None
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


class OutputFolder:
    """A run's output folder on this machine."""

    def __init__(self, path: str):
        self.path = path
        self.lock = FolderLock(path)
        self.journal = Journal(path)

    def check(self, overwrite: bool, resume: bool) -> None:
        """Fail at once, before any work, on an output we may not touch."""
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise LogitifyError(f"output {self.path} exists and is not a folder")
        if os.path.isdir(self.path) and os.listdir(self.path) and not (overwrite or resume):
            raise LogitifyError(f"output folder {self.path} is not empty; pass --overwrite to replace "
                                "what logitify wrote there, or --resume to finish it")

    def create(self) -> None:
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise LogitifyError(f"cannot create output folder {self.path}: {e.strerror or e}") from None

    def owned(self) -> set:
        """Names of the files in the folder that logitify wrote (per its manifest and journal)."""
        names = {manifest_mod.LOCK, manifest_mod.JOURNAL}
        mpath = os.path.join(self.path, manifest_mod.MANIFEST)
        if os.path.isfile(mpath) and not os.path.islink(mpath):
            try:
                names.update(manifest_mod.read(mpath).owned_files())
            except LogitifyError:
                pass  # not ours: someone's manifest.json stays theirs
        header, entries = self.journal.load()
        if header is not None:
            names.update(header_files(header))
            names.update(e["file"] for e in entries.values() if isinstance(e.get("file"), str))
        # Receipts a Beam run leaves beside its shards until it writes the manifest.
        names.update(RECEIPT.format(file=n) for n in list(names))
        return names

    def prepare(self, overwrite: bool, resume: bool, inputs=None) -> None:
        """Clear what this run replaces: owned files (--overwrite), leftovers of killed runs (always).

        `inputs(paths)` answers which of these paths are inputs of this run.
        """
        names = sorted(os.listdir(self.path))
        owned = self.owned()

        def ours(n):
            m = _TEMP.match(n)
            return n in owned or (m is not None and m.group("name") in owned)

        temps = [n for n in names if _TEMP.match(n) and ours(n)]
        remove = temps
        if overwrite:
            foreign = [n for n in names if not ours(n)]
            if foreign:
                raise ForeignFile(
                    f"output folder {self.path} holds {printable(foreign[0])}, which logitify did not write; "
                    "--overwrite replaces only logitify's own files: move it away or choose another folder",
                    folder=self.path, file=foreign[0])
            remove = [n for n in names if n not in (manifest_mod.LOCK,)]
        paths = [os.path.join(self.path, n) for n in remove]
        if inputs is not None:
            used = inputs([p for p in paths if os.path.isfile(p)])
            if used:
                raise LogitifyError(f"--overwrite would remove {printable(used[0])}, an input of this run; "
                                    "write the output to another folder")
        for p in paths:
            if os.path.islink(p) or os.path.isfile(p):
                os.unlink(p)

    def resumable(self, header: dict, fingerprint: str, shards_of) -> dict:
        """{index: journal entry} of shards a previous run finished that are still whole.

        `shards_of(keys)` maps input keys to their shard index. The journal
        is started afresh with those entries, ready for this run's.
        """
        from .formats.base import file_sha256

        old, entries = self.journal.load()
        if old is None:
            mpath = os.path.join(self.path, manifest_mod.MANIFEST)
            if not os.path.exists(mpath):
                return {}
            m = manifest_mod.read(mpath)
            if m.stats.get("fingerprint") != fingerprint:
                raise LogitifyError(f"--resume: {self.path} holds a finished dataset made from other inputs or options")
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
