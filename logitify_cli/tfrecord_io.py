"""Reading our own TFRecord shards without TensorFlow.

decode, info and verify read shards whose sha256 the manifest vouches for,
so the per-record CRCs add nothing; a small reader of the record framing
and of tf.train.Example's protobuf wire format lets them start instantly.
Anything malformed raises ValueError.
"""
from __future__ import annotations

import gzip
import struct

import numpy as np


def iter_records(path: str, compressed: bool):
    opener = gzip.open if compressed else open
    with opener(path, "rb") as f:
        index = 0
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise ValueError(f"record {index}: truncated header")
            (n,) = struct.unpack("<Q", head[:8])
            if n > 1 << 31:
                raise ValueError(f"record {index}: absurd length {n}")
            data = f.read(n)
            if len(data) < n or len(f.read(4)) < 4:
                raise ValueError(f"record {index}: truncated")
            yield data
            index += 1


def _varint(b: bytes, i: int):
    shift = result = 0
    while True:
        if i >= len(b):
            raise ValueError("truncated varint")
        byte = b[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def _fields(b: bytes):
    """(field number, wire type, value) of one protobuf message."""
    i = 0
    while i < len(b):
        tag, i = _varint(b, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(b):
            raise ValueError("truncated field")
        yield field, wire, v


def _feature(b: bytes):
    for kind, _, lst in _fields(b):
        if kind == 1:  # bytes_list
            return [v for f, w, v in _fields(lst) if f == 1 and w == 2]
        if kind == 2:  # float_list, packed or not
            vals = []
            for f, w, v in _fields(lst):
                if f == 1:
                    vals.extend(np.frombuffer(v, "<f4").tolist())
            return vals
        if kind == 3:  # int64_list, packed or not
            vals = []
            for f, w, v in _fields(lst):
                if f != 1:
                    continue
                if w == 0:
                    vals.append(v)
                else:
                    j = 0
                    while j < len(v):
                        x, j = _varint(v, j)
                        vals.append(x)
            return [x - (1 << 64) if x >= 1 << 63 else x for x in vals]
    return []


def parse_example(record: bytes) -> dict:
    """{name: list of values} of a serialized tf.train.Example."""
    out = {}
    for f, w, features in _fields(record):
        if f != 1 or w != 2:
            continue
        for f2, w2, entry in _fields(features):
            if f2 != 1 or w2 != 2:
                continue
            key, value = None, b""
            for f3, _, v in _fields(entry):
                if f3 == 1:
                    key = v.decode("utf-8", "surrogatepass")
                elif f3 == 2:
                    value = v
            if key is not None:
                out[key] = _feature(value)
    return out
