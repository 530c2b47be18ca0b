"""Scratch space on disk for data too large to hold, named nowhere.

A run that gathers more than it should keep in memory (a million pixel
digests, keys, key hashes) appends it to a temporary file and reads it back
at the end. The file's name is removed as it is made, so a run killed with
SIGKILL leaves nothing in the temporary folder; the data goes when the
process does.
"""
from __future__ import annotations


class SpillFile:
    """An anonymous temporary file that pieces are appended to and read back from by (offset, length).

    Its name is removed as it is made (O_TMPFILE where the system has it),
    so nothing is left in the temporary folder by a run that is killed.
    """

    def __init__(self):
        import tempfile

        self._f = tempfile.TemporaryFile(prefix="logitify-")
        self._end = 0

    def append(self, data) -> tuple:
        n = memoryview(data).nbytes
        self._f.seek(self._end)
        self._f.write(data)
        self._end += n
        return self._end - n, n

    def read(self, pieces) -> bytearray:
        """The pieces at these (offset, length)s, one after another, in one writable buffer."""
        out = bytearray(sum(n for _, n in pieces))
        view, at = memoryview(out), 0
        for off, n in pieces:
            self._f.seek(off)
            if self._f.readinto(view[at:at + n]) != n:
                raise OSError(f"the spill file ended early (wanted {n} bytes at {off})")
            at += n
        return out

    def close(self) -> None:
        self._f.close()


class SpillBuckets:
    """Data spread over n buckets, appended to one SpillFile as it comes; each bucket read back whole, in order."""

    def __init__(self, n: int):
        self._file = SpillFile()
        self._pieces = [[] for _ in range(n)]  # (offset, length) of each bucket's pieces in the file

    def add(self, bucket: int, data) -> None:
        self._pieces[bucket].append(self._file.append(data))

    def each(self):
        """Every bucket that holds anything, as one writable buffer, bucket by bucket."""
        for pieces in self._pieces:
            if pieces:
                yield self._file.read(pieces)

    def close(self) -> None:
        self._file.close()
