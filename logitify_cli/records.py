"""TFRecord input: counting records, reading them in order, parsing Examples.

Records are read in the main process (TensorFlow checks their CRCs); only the
encoded image bytes travel on to the decode workers.
"""
from __future__ import annotations

from ._tf import tf as _tf

IMAGE_KEY_FALLBACKS = ("image", "image/encoded")


def count_records(path: str, compression_type: str):
    """(number of whole records, reason reading stopped early or None)."""
    tf = _tf()
    count = 0
    try:
        for _ in tf.data.TFRecordDataset(path, compression_type=compression_type):
            count += 1
    except (tf.errors.DataLossError, tf.errors.OpError) as e:
        return count, f"corrupt TFRecord data: {_first_line(e)}"
    return count, None


def _first_line(e) -> str:
    msg = getattr(e, "message", None) or str(e)
    return msg.strip().splitlines()[0] if msg.strip() else type(e).__name__


class RecordReader:
    """Reads record `index` of a file, assuming indices mostly come in order."""

    def __init__(self, compression_of):
        self._compression_of = compression_of
        self._path = None
        self._iter = None
        self._next = 0

    def read(self, path: str, index: int) -> bytes:
        tf = _tf()
        if path != self._path or index < self._next:
            ds = tf.data.TFRecordDataset(path, compression_type=self._compression_of(path))
            self._iter = iter(ds.as_numpy_iterator())
            self._path, self._next = path, 0
        while self._next < index:
            next(self._iter)
            self._next += 1
        self._next += 1
        return next(self._iter)


def parse_example(record: bytes, image_key: str, label_key: str):
    """(encoded image bytes, label or -1) from a serialized tf.train.Example."""
    tf = _tf()
    try:
        example = tf.train.Example.FromString(record)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"not a tf.train.Example: {e}") from None
    feats = example.features.feature
    keys = [image_key] + [k for k in IMAGE_KEY_FALLBACKS if k != image_key]
    data = None
    for k in keys:
        if k in feats and feats[k].bytes_list.value:
            data = feats[k].bytes_list.value[0]
            break
    if data is None:
        raise ValueError(f"record has no bytes feature {image_key!r}")
    label = -1
    if label_key in feats and feats[label_key].int64_list.value:
        label = int(feats[label_key].int64_list.value[0])
    return data, label
