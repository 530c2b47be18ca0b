"""manifest.json: what a dataset folder holds, written last, read with suspicion."""
from __future__ import annotations

import json
import math
import os

from . import __version__
from .errors import LogitifyError
from .transform import TransformParams

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = ".logitify-journal.jsonl"
LOGDET_CONVENTION = "tfgenzoo"


def build(*, fmt, name, split, shape, params: TransformParams, classes, shards, skipped, compress, source=None,
          stats=None):
    dims = int(shape[0]) * int(shape[1]) * int(shape[2])
    return {
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "format": fmt,
        "name": name,
        "split": split,
        "num_examples": sum(s["num_examples"] for s in shards),
        "shape": [int(s) for s in shape],
        "dtype": "float32",
        "compressed": bool(compress),
        "transform": params.to_dict(),
        "logdet": {
            "convention": LOGDET_CONVENTION,
            "dims": dims,
            "bpd_offset_nats": params.bpd_offset_nats(dims),
            "bits_per_dim": "-(log p(y) + logdet - bpd_offset_nats) / (dims * ln 2)",
        },
        "classes": classes,
        "shards": shards,
        "skipped": skipped,
        "source": source or {},
        "stats": stats or {},
    }


def write_json_atomic(path: str, obj) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write(out_dir: str, manifest: dict) -> None:
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)


def _fail(path, what):
    raise LogitifyError(f"{path}: not a valid logitify manifest: {what}")


def read(dataset_dir: str) -> dict:
    """The manifest of a dataset folder, checked for shape and honesty."""
    if not os.path.exists(dataset_dir):
        raise LogitifyError(f"no such dataset: {dataset_dir}")
    path = os.path.join(dataset_dir, MANIFEST) if os.path.isdir(dataset_dir) else dataset_dir
    if not os.path.isfile(path):
        raise LogitifyError(f"{dataset_dir}: no {MANIFEST} here (is it a logitify output folder?)")
    try:
        with open(path, "rb") as f:
            m = json.loads(f.read(64 << 20).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(path, f"not JSON ({e})")
    except OSError as e:
        raise LogitifyError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(m, dict):
        _fail(path, "not a JSON object")
    if m.get("format_version") != FORMAT_VERSION:
        _fail(path, f"format_version {m.get('format_version')!r} (this tool reads {FORMAT_VERSION})")
    if m.get("format") not in ("npz", "tfrecord"):
        _fail(path, f"unknown format {m.get('format')!r}")
    shape = m.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and 0 < s < 1 << 20 for s in shape)):
        _fail(path, f"shape {shape!r} is not [H, W, C] of positive integers")
    if shape[2] not in (1, 3, 4):
        _fail(path, f"{shape[2]} channels (expected 1, 3 or 4)")
    if m.get("dtype") != "float32":
        _fail(path, f"dtype {m.get('dtype')!r} (expected float32)")
    try:
        m["_params"] = TransformParams.from_dict(m.get("transform") or {})
    except (KeyError, TypeError, ValueError) as e:
        _fail(path, f"transform parameters: {e}")
    shards = m.get("shards")
    if not isinstance(shards, list):
        _fail(path, "shards is not a list")
    total = 0
    for s in shards:
        if not (isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("num_examples"), int)
                and isinstance(s.get("sha256"), str) and s["num_examples"] >= 0):
            _fail(path, f"bad shard entry {s!r}")
        f = s["file"]
        if "/" in f or "\\" in f or f in (".", "..") or "\0" in f:
            _fail(path, f"shard file name {f!r} points outside the dataset folder")
        total += s["num_examples"]
    if m.get("num_examples") != total:
        _fail(path, f"num_examples {m.get('num_examples')!r} but the shards hold {total}")
    classes = m.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        _fail(path, "classes is neither null nor a list of names")
    ld = m.get("logdet") or {}
    if ld.get("convention") != LOGDET_CONVENTION or not isinstance(ld.get("bpd_offset_nats"), (int, float)) \
            or not math.isfinite(ld["bpd_offset_nats"]):
        _fail(path, "logdet section missing or not the tfgenzoo convention")
    m.setdefault("skipped", [])
    m.setdefault("name", "logitify")
    m["_dir"] = os.path.dirname(os.path.abspath(path))
    return m


def public(m: dict) -> dict:
    """The manifest without the fields read() adds."""
    return {k: v for k, v in m.items() if not k.startswith("_")}
