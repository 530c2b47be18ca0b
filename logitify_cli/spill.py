"""Scratch space on disk for data too large to hold, named nowhere.

A run that gathers more than it should keep in memory (a million pixel
digests, keys, key hashes) appends it to a temporary file and reads it back
at the end. The file's name is removed as it is made, so a run killed with
SIGKILL leaves nothing in the temporary folder; the data goes when the
process does.
"""
from __future__ import annotations

import os


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
        self._f.write(data)
        self._end += n
        return self._end - n, n

    def read(self, pieces) -> bytearray:
        """The pieces at these (offset, length)s, one after another, in one writable buffer."""
        self._f.flush()
        out = bytearray(sum(n for _, n in pieces))
        view, at, fd = memoryview(out), 0, self._f.fileno()
        for off, n in pieces:
            done = 0
            while done < n:
                got = os.pread(fd, min(n - done, 1 << 24), off + done)
                if not got:
                    raise OSError(f"the spill file ended early ({done} of {n} bytes)")
                view[at + done:at + done + len(got)] = got
                done += len(got)
            at += n
        return out

    def close(self) -> None:
        self._f.close()
