"""Shard formats: one class each, and the registry everything else reads.

A format owns its shard file names (template and glob), its writer, its
NumPy reader, its tf.data reader and the metadata it leaves beside the shards.
Nothing outside this package branches on a format's name: the CLI's choices,
the runners, the manifest check, the loaders and `--overwrite` all ask the
registry. To add a format, write one ShardFormat subclass and register it.
"""
from __future__ import annotations

from .base import ShardFormat, ShardWriter, check_chunk
from .npz import NpzFormat
from .tfrecord import TfrecordFormat

FORMATS: dict[str, ShardFormat] = {}


def register(fmt: ShardFormat) -> ShardFormat:
    """Add a format to the registry (its `name` is what users pass to --format)."""
    FORMATS[fmt.name] = fmt
    return fmt


register(NpzFormat())
register(TfrecordFormat())


def get(name: str) -> ShardFormat:
    try:
        return FORMATS[name]
    except KeyError:
        from ..errors import UsageError

        raise UsageError(f"unknown shard format {name!r} (known: {', '.join(FORMATS)})") from None


def names() -> list[str]:
    return list(FORMATS)


__all__ = ["FORMATS", "ShardFormat", "ShardWriter", "check_chunk", "get", "names", "register"]
