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
    rows = np.frombuffer(packed, np.uint8).reshape(-1, 32)
    if not len(rows):
        return "[]"
    text = np.empty((len(rows), 68), np.uint8)
    text[:, 0] = text[:, 65] = ord('"')
    text[:, 1:65:2] = _HEX[rows >> 4]
    text[:, 2:65:2] = _HEX[rows & 15]
    text[:, 66], text[:, 67] = ord(","), ord(" ")
    return "[" + text.tobytes()[:-2].decode("ascii") + "]"


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
    if not isinstance(packed, (bytes, bytearray, memoryview)):
        packed = b"".join(packed)
    rows = np.frombuffer(packed, np.uint8)
    if rows.size % 32:
        raise ValueError("digests are 32 bytes each")
    rows = rows.reshape(-1, 32)
    words = rows.view(">u8")  # four big-endian words a row: their order is the bytes' order
    rows = rows[np.lexsort(words.T[::-1])]
    h = hashlib.sha256()
    for a in range(0, len(rows), 1 << 16):
        part = rows[a:a + (1 << 16)]
        text = np.empty((len(part), 65), np.uint8)
        text[:, 0:64:2] = _HEX[part >> 4]
        text[:, 1:64:2] = _HEX[part & 15]
        text[:, 64] = ord("\n")
        h.update(text.data)
    return h.hexdigest()


def keys_sha256(keys) -> str:
    """sha256 of the keys, sorted, each in UTF-8 (lone surrogates allowed) followed by a NUL byte."""
    h = hashlib.sha256()
    ordered = sorted(str(k) for k in keys)
    for i in range(0, len(ordered), 1 << 16):
        h.update("".join(k + "\0" for k in ordered[i:i + (1 << 16)]).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def fingerprint(packed, keys) -> dict:
    """The manifest's `fingerprint` object: {pixels_sha256, keys_sha256}."""
    return {"pixels_sha256": pixels_sha256(packed), "keys_sha256": keys_sha256(keys)}


def is_digest(x) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)
