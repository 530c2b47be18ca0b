"""The pixel fingerprint of a dataset: what its images are, whatever their names or layout.

Each image's digest is the sha256 of its shape and final uint8 pixels (after
geometry, at the kept levels shifted back to 8 bits, before noise: what
decode gives back). `pixels_sha256` hashes the sorted digests, so it does not
depend on names, order, batch size, workers, shard size, format or runner;
`keys_sha256` hashes the sorted keys. docs/format.md gives the exact bytes.

Imports only hashlib and NumPy: shard makers, Beam workers, verify and info use it.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .spill import SpillBuckets, SpillFile


def levels(images: np.ndarray, bits: int) -> np.ndarray:
    """uint8 pixels at `bits` levels, shifted back to 8 bits (v >> (8-bits) << (8-bits)): what decode gives back."""
    shift = 8 - int(bits)
    if shift == 0:
        return images
    return (images >> shift) << shift


def image_digest(pixels: np.ndarray) -> bytes:
    """sha256 (32 bytes) of "HxWxC\n" (ASCII decimal) followed by the uint8 pixels in HWC order."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    h = hashlib.sha256(("x".join(str(int(d)) for d in pixels.shape) + "\n").encode("ascii"))
    h.update(pixels.data)
    return h.digest()


def digests(images: np.ndarray, bits: int = 8) -> list:
    """The digest (image_digest) of each image of a uint8 batch [n, H, W, C], at `bits` levels."""
    images = np.ascontiguousarray(levels(np.asarray(images, dtype=np.uint8), bits))
    if images.ndim != 4:
        return [image_digest(img) for img in images]
    head = hashlib.sha256(("x".join(str(int(d)) for d in images.shape[1:]) + "\n").encode("ascii"))
    out = []
    for img in images:  # (the shape's bytes hashed once a batch; sha256 releases the GIL on the pixels)
        h = head.copy()
        h.update(img.data)
        out.append(h.digest())
    return out


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def to_hex(raw) -> list:
    """Digests as the journal and receipts keep them: lowercase hex strings."""
    return [d.hex() for d in raw]


def hex_json(packed) -> str:
    """The JSON list of to_hex(digests) for packed digests, as json.dumps writes it, without a string per digest."""
    return "".join(hex_json_pieces(packed))


def hex_json_pieces(packed, rows: int = 4096):
    """hex_json(packed) in pieces of `rows` digests: a shard of 350,000 images is 24 MB of text, never held whole."""
    digests = np.frombuffer(packed, np.uint8).reshape(-1, 32)
    yield "["
    for a in range(0, len(digests), rows):
        part = digests[a:a + rows]
        text = np.empty((len(part), 68), np.uint8)
        text[:, 0] = text[:, 65] = ord('"')
        text[:, 1:65:2] = _HEX[part >> 4]
        text[:, 2:65:2] = _HEX[part & 15]
        text[:, 66], text[:, 67] = ord(","), ord(" ")
        piece = text.tobytes().decode("ascii")
        yield piece if a + rows < len(digests) else piece[:-2]
    yield "]"


def from_hex(texts) -> bytes:
    """Hex digests packed into one bytes object, 32 bytes each (ValueError if one is not a sha256)."""
    texts = list(texts)
    if not all(is_digest(t) for t in texts):
        raise ValueError("not a list of sha256 hex digests")
    return bytes.fromhex("".join(texts))


def pixels_sha256(packed) -> str:
    """sha256 of the digests in lowercase hex, sorted, each followed by a newline.

    `packed` is the raw 32-byte digests one after the other, in any order
    (bytes, or a list of such parts). The same as `sort | sha256sum` over a
    file of one hex digest per line.
    """
    parts = [packed] if isinstance(packed, (bytes, bytearray, memoryview)) else packed
    with DigestSet() as digests:
        for p in parts:
            digests.add(p)
        return digests.sha256()


def _hash_sorted(h, rows) -> None:
    """Sort 32-byte rows (in place where they are writable) and feed them to `h` as hex lines.

    As fixed-width byte strings the rows sort in the bytes' order, in place
    (equal rows are equal bytes, so no stable sort and no buffer is needed):
    a million digests cost no index array and no sorted copy.
    """
    if not rows.flags.writeable:
        rows = rows.copy()
    rows.reshape(-1).view("S32").sort()
    for a in range(0, len(rows), 1 << 16):
        part = rows[a:a + (1 << 16)]
        text = np.empty((len(part), 65), np.uint8)
        text[:, 0:64:2] = _HEX[part >> 4]
        text[:, 1:64:2] = _HEX[part & 15]
        text[:, 64] = ord("\n")
        h.update(text.data)


class DigestSet:
    """Many images' digests for pixels_sha256, in bounded memory.

    They are gathered in one buffer of HELD bytes. Each time it fills, it is
    sorted in place and spread over 256 buckets by the digests' first byte,
    appended to one anonymous temporary file; at the end each bucket is
    sorted on its own, and in the buckets' order that is the order of all.
    """

    HELD = 8 << 20

    def __init__(self):
        self.count = 0
        self._buf, self._used, self._spilled = None, 0, None

    def add(self, packed) -> None:
        """One digest, or several packed one after the other."""
        view = memoryview(packed).cast("B")
        if view.nbytes % 32:
            raise ValueError("digests are 32 bytes each")
        self.count += view.nbytes // 32
        if self._buf is None:  # np.empty: its pages cost nothing until digests are written there
            self._buf = np.empty(max(32, self.HELD - self.HELD % 32), np.uint8)
        while view.nbytes:
            n = min(view.nbytes, len(self._buf) - self._used)
            self._buf[self._used:self._used + n] = np.frombuffer(view[:n], np.uint8)
            self._used += n
            view = view[n:]
            if self._used == len(self._buf):
                self._spill()

    def _spill(self) -> None:
        if not self._used:
            return
        if self._spilled is None:
            self._spilled = SpillBuckets(256)
        rows = self._buf[:self._used].reshape(-1, 32)
        rows.reshape(-1).view("S32").sort()  # in place: the buffer is reused
        bounds = np.searchsorted(rows[:, 0], np.arange(257))
        for b in range(256):
            if bounds[b] < bounds[b + 1]:
                self._spilled.add(b, rows[bounds[b]:bounds[b + 1]].data)
        del rows
        self._used = 0

    @property
    def spilled(self) -> bool:
        """Whether digests went to the temporary file (more than HELD bytes of them)."""
        return self._spilled is not None

    def sha256(self) -> str:
        """pixels_sha256 of every digest added."""
        try:
            if self._spilled is None:
                held = self._buf if self._buf is not None else np.empty(0, np.uint8)
                h = hashlib.sha256()
                _hash_sorted(h, held[:self._used].reshape(-1, 32))
                return h.hexdigest()
            self._spill()
            self._buf = None
            h = hashlib.sha256()
            for bucket in self._spilled.each():  # a writable buffer: sorted in place
                _hash_sorted(h, np.frombuffer(bucket, np.uint8).reshape(-1, 32))
            return h.hexdigest()
        finally:
            self.close()

    def close(self) -> None:
        """Drop the digests and their file (also when a run fails before sha256())."""
        self._buf, self._used = None, 0
        if self._spilled is not None:
            self._spilled.close()
            self._spilled = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def keys_sha256(keys) -> str:
    """sha256 of the keys, sorted, each in UTF-8 (lone surrogates allowed) followed by a NUL byte."""
    ks = KeySet()
    ks.add(keys)
    return ks.sha256()


class KeySet:
    """Many keys for keys_sha256, in bounded memory: sorted runs of RUN keys on disk, merged at the end.

    Keys are compared as their UTF-8 bytes (lone surrogates allowed), whose
    order is the order of their code points, as Python sorts strings. Runs
    that follow one another in order (a dataset's keys mostly do) are read
    one after the other rather than merged.
    """

    RUN = 1 << 17  # keys held (about 10 MB of strings) before a sorted run goes to disk

    def __init__(self):
        self._run, self._files, self._spill_file = [], [], None  # _files: ((offset, length), first, last) per run

    def add(self, keys) -> None:
        for k in keys:
            self._run.append(str(k))
            if len(self._run) >= self.RUN:
                self._spill()

    def _spill(self) -> None:
        if self._spill_file is None:
            self._spill_file = SpillFile()
        run = sorted(self._run)
        self._run = []
        start, length = None, 0
        for a in range(0, len(run), 1 << 16):
            off, n = self._spill_file.append(
                "".join(k + "\0" for k in run[a:a + (1 << 16)]).encode("utf-8", "surrogatepass"))
            start = off if start is None else start
            length += n
        self._files.append(((start, length), _encode(run[0]), _encode(run[-1])))

    def sha256(self) -> str:
        try:
            h = hashlib.sha256()
            if not self._files:
                run = sorted(self._run)
                for a in range(0, len(run), 1 << 16):
                    h.update("".join(k + "\0" for k in run[a:a + (1 << 16)]).encode("utf-8", "surrogatepass"))
                return h.hexdigest()
            if self._run:
                self._spill()
            if all(a[2] <= b[1] for a, b in zip(self._files, self._files[1:])):  # in order already
                for where, _, _ in self._files:
                    for block in _blocks(self._spill_file, where, 1 << 20):
                        h.update(block)
                return h.hexdigest()
            import heapq

            out = []
            for k in heapq.merge(*(_read_run(self._spill_file, where) for where, _, _ in self._files)):
                out.append(k)
                if len(out) >= 1 << 16:
                    h.update(b"\0".join(out) + b"\0")
                    out = []
            if out:
                h.update(b"\0".join(out) + b"\0")
            return h.hexdigest()
        finally:
            self.close()

    def close(self) -> None:
        self._run, self._files = [], []
        if self._spill_file is not None:
            self._spill_file.close()
            self._spill_file = None


def _encode(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def _blocks(spill: SpillFile, where, size: int):
    """The bytes of one run in the spill file, `size` at a time."""
    off, n = where
    for a in range(0, n, size):
        yield bytes(spill.read([(off + a, min(size, n - a))]))


def _read_run(spill: SpillFile, where):
    """The keys of a run (NUL-terminated UTF-8), as bytes, in order."""
    rest = b""
    for block in _blocks(spill, where, 1 << 16):  # every run is read at once while they merge: small blocks
        parts = (rest + block).split(b"\0")
        rest = parts.pop()
        yield from parts


def fingerprint(digests: DigestSet, keys) -> dict:
    """The manifest's `fingerprint` object: {pixels_sha256, keys_sha256} (the DigestSet is used up)."""
    return {"pixels_sha256": digests.sha256(), "keys_sha256": keys_sha256(keys)}


def is_digest(x) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)
