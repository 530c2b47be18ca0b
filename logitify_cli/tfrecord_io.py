"""Our TFRecord shards' tf.train.Example wire format, both ways, without protobuf objects.

Writing: building four Features and an Example per image through protobuf's
Python API cost about as much as the rest of a TFRecord shard's writing.
ExampleWriter lays out the same bytes that
Example.SerializeToString(deterministic=True) gives (tests/test_tfrecord.py
checks this on generated examples), so the shards' sha256 is unchanged.

Reading: wire_fields walks the same wire format, for formats/tfrecord.py,
which reads shards in place, a record at a time. Anything malformed raises
ValueError.
"""
from __future__ import annotations


_U64 = (1 << 64) - 1


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, varint length, payload."""
    return tag + _uvarint(len(payload)) + payload


def _map_entry(name: bytes, feature: bytes) -> bytes:
    """One entry of Features.feature (field 1): key = 1, value = 2."""
    return _field(b"\x0a", _field(b"\x0a", name) + _field(b"\x12", feature))


class ExampleWriter:
    """Serialized Examples {key: bytes, label: int64, logdet: float, logits: bytes}.

    Map entries come sorted by name, as deterministic serialization sorts
    them; the logits' field header depends only on their size, so it is
    made once and each record is joined with one copy of the logits.
    """

    def __init__(self, logits_nbytes: int):
        n = int(logits_nbytes)
        bytes_list = 1 + len(_uvarint(n)) + n  # BytesList {value: logits}
        feature = 1 + len(_uvarint(bytes_list)) + bytes_list  # Feature {bytes_list}
        entry = len(b"\x0a\x06logits") + 1 + len(_uvarint(feature)) + feature
        self.logits_nbytes = n
        self._logits_head = (b"\x0a" + _uvarint(entry) + b"\x0a\x06logits" + b"\x12" + _uvarint(feature)
                             + b"\x0a" + _uvarint(bytes_list) + b"\x0a" + _uvarint(n))

    def serialize(self, key: bytes, label: int, logdet: bytes, logits) -> bytes:
        """key as bytes, logdet as 4 little-endian float32 bytes, logits a buffer of logits_nbytes."""
        if memoryview(logits).nbytes != self.logits_nbytes:
            raise ValueError(f"logits of {memoryview(logits).nbytes} bytes, expected {self.logits_nbytes}")
        head = (_map_entry(b"key", _field(b"\x0a", _field(b"\x0a", key)))  # bytes_list = 1
                + _map_entry(b"label", _field(b"\x1a", _field(b"\x0a", _uvarint(label & _U64))))  # int64_list = 3
                + _map_entry(b"logdet", _field(b"\x12", _field(b"\x0a", logdet))))  # float_list = 2, packed
        size = len(head) + len(self._logits_head) + self.logits_nbytes
        return b"".join((b"\x0a", _uvarint(size), head, self._logits_head, logits))  # Example.features = 1


def read_varint(b, i: int):
    """(value, next index) of the protobuf varint at b[i]; at most 10 bytes, as protobuf allows."""
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
        if shift > 63:
            raise ValueError("varint too long")


def wire_fields(b):
    """(field number, wire type, value) of one protobuf message; values are slices of b (views, if b is a memoryview) or ints."""
    i, n = 0, len(b)
    while i < n:
        tag, i = read_varint(b, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            v, i = read_varint(b, i)
        elif wire in (1, 5):
            k = 8 if wire == 1 else 4
            v, i = b[i:i + k], i + k
        elif wire == 2:
            k, i = read_varint(b, i)
            v, i = b[i:i + k], i + k
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > n:
            raise ValueError("truncated field")
        yield field, wire, v
