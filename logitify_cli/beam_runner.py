"""The Beam runner: the same shards, made by any worker of any Beam engine.

The launcher plans exactly as the local runner does (same discovery, same
probe, same shard layout), so each output shard's list of inputs is known
before a pixel is read. That list is the unit of work: a worker decodes its
inputs, runs the same transform and the same sink, and leaves a receipt
(count, sha256, skipped inputs). A retried shard gives the same bytes. The
launcher writes the manifest once, at the end, from the receipts.

Sources and outputs go through Beam's FileSystems, so cloud paths work where
Beam's extras (e.g. apache-beam[gcp]) are installed.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time

import numpy as np

from . import images as images_mod
from . import manifest as manifest_mod
from .errors import LogitifyError, UsageError

RECEIPT = ".{file}.receipt.json"
_TRANSFORMS = {}


def _pipeline_options(beam_args):
    """Beam's options, quiet unless asked: its workers log at INFO by default."""
    import logging

    from . import _tf

    _, _, PipelineOptions = _beam()
    args = list(beam_args or ["--runner=DirectRunner"])
    if not _tf.verbose:
        logging.getLogger().setLevel(logging.ERROR)
        if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
            args.append("--default_sdk_harness_log_level=ERROR")
    return PipelineOptions(args)


@contextlib.contextmanager
def _scratch():
    """A private temp root for one pipeline run, removed after it.

    Beam's local job service and stager make temp folders they never remove
    (two or three per run); pointing tempfile at our own folder keeps them
    out of the machine's temp directory.
    """
    root = tempfile.mkdtemp(prefix="logitify-beam-")
    before = tempfile.tempdir
    tempfile.tempdir = root
    try:
        yield root
    finally:
        tempfile.tempdir = before
        shutil.rmtree(root, ignore_errors=True)


def _beam():
    import logging

    from . import _tf

    if not _tf.verbose:  # Beam warns about optional cloud clients at import
        logging.getLogger().setLevel(logging.ERROR)
    try:
        import apache_beam as beam
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise UsageError("--runner beam needs Apache Beam: pip install 'logitify[beam]'") from None
    return beam, FileSystems, PipelineOptions


def _is_remote(path: str) -> bool:
    return "://" in path


def _join(base: str, name: str) -> str:
    if _is_remote(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def _write_json(path: str, obj) -> None:
    data = (json.dumps(obj, indent=2) + "\n").encode()
    if _is_remote(path):
        _, fs, _ = _beam()
        with fs.create(path) as f:
            f.write(data)
    else:
        manifest_mod.write_json_atomic(path, obj)


def _read_bytes(path: str) -> bytes:
    if _is_remote(path):
        _, fs, _ = _beam()
        with fs.open(path) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _transform(opts, shape):
    from .pipeline import _start_transform

    key = (opts.params, tuple(shape), opts.batch_size, opts.device)
    if key not in _TRANSFORMS:
        _TRANSFORMS[key] = _start_transform(opts, shape)
    return _TRANSFORMS[key]


def make_shard(spec: dict) -> dict:
    """One output shard, start to end, on whichever worker gets it."""
    from .pipeline import SHARD_SINKS, _payloads, _write_shard, collect_shard

    opts, items, shape = spec["opts"], spec["items"], tuple(spec["shape"])

    def decoded():
        for it, payload, label in _payloads(items, opts):
            try:
                if isinstance(payload, BaseException):
                    raise images_mod.ImageReadError(str(payload))
                if isinstance(payload, str) and _is_remote(payload):
                    payload = _read_bytes(payload)
                yield it, label, images_mod.decode(payload, spec["channels"], opts.size, opts.max_pixels), None
            except images_mod.ImageReadError as e:
                yield it, label, None, str(e)

    # Warnings are the launcher's to print, from the receipts.
    good, skipped = collect_shard(decoded(), opts, shape, spec["first_key"], warn=lambda msg: None)
    sink_cls = SHARD_SINKS[opts.format]
    remote = _is_remote(opts.out)
    local_opts = opts
    tmpdir = None
    if remote:  # build locally, then copy through FileSystems
        import dataclasses

        tmpdir = tempfile.mkdtemp(prefix="logitify-shard-")
        local_opts = dataclasses.replace(opts, out=tmpdir)
    try:
        info = _write_shard(sink_cls, local_opts, spec["index"], spec["n_shards"], shape, good,
                            _transform(opts, shape))
        if remote:
            _, fs, _ = _beam()
            fs.copy([os.path.join(tmpdir, info["file"])], [_join(opts.out, info["file"])])
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
    receipt = {"index": spec["index"], **info, "skipped": skipped}
    _write_json(_join(opts.out, RECEIPT.format(file=info["file"])), receipt)
    return receipt


def _remote_items(opts):
    """Discovery through FileSystems.match for cloud folders and files."""
    from .sources import Item, inventory, is_tfrecord_name

    _, fs, _ = _beam()
    items = []
    for src in opts.sources:
        base = src.rstrip("/")
        matches = fs.match([base + "/**"])[0].metadata_list or fs.match([base])[0].metadata_list
        for m in matches:
            rel = m.path[len(base) + 1:] if m.path.startswith(base + "/") else m.path
            name = rel.rsplit("/", 1)[-1]
            if name.startswith(".") or is_tfrecord_name(name) or not images_mod.is_image_name(name):
                continue
            cls = rel.split("/", 1)[0] if "/" in rel else None
            items.append(Item(rel, rel, m.path, class_name=cls))
    return inventory(items, [])


def encode_beam(opts, report, beam_args) -> dict:
    """`logitify encode --runner beam [-- BEAM_OPTIONS...]`."""
    beam, fs, PipelineOptions = _beam()
    from . import pipeline as P
    from .sinks import SHARD_SINKS

    t0 = time.time()
    if opts.resume:
        raise UsageError("--resume is for the local runner; a Beam run retries failed shards itself")
    remote = any(_is_remote(s) for s in opts.sources)
    if not _is_remote(opts.out):
        P.refuse_existing_output(opts.out, opts.overwrite, False)
        P.prepare_output(opts.out, opts.overwrite, False)
    inv = _remote_items(opts) if remote else P.discover(opts.sources, opts.compression)
    if not inv.items:
        raise LogitifyError("no images found in " + ", ".join(map(str, opts.sources)))
    probe_opts = opts
    if remote:
        first = inv.items[0]
        shape = images_mod.decode(_read_bytes(first.path), opts.channels or 3, opts.size, opts.max_pixels).shape
        channels = shape[2]
    else:
        shape, channels, first = P._probe(inv.items, probe_opts)
        if shape is None:
            raise LogitifyError(f"none of the {len(inv.items)} inputs could be read as an image")
    dims = int(np.prod(shape))
    shard_size = opts.shard_size or max(1, P.SHARD_BYTES // (4 * dims))
    n_shards = max(1, -(-len(inv.items) // shard_size))
    for s in inv.skipped:
        report.warn(f"skipped {s['source']}: {s['reason']}")
    specs = [{"opts": opts, "index": i, "n_shards": n_shards, "shape": list(shape), "channels": channels,
              "first_key": first.key,
              "items": inv.items[i * shard_size:(i + 1) * shard_size]} for i in range(n_shards)]
    options = _pipeline_options(beam_args)
    try:
        with _scratch(), beam.Pipeline(options=options) as p:
            _ = (p | "Shards" >> beam.Create(specs, reshuffle=False)
                   | "Spread" >> beam.Reshuffle()
                   | "MakeShard" >> beam.Map(make_shard))
    except LogitifyError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()
        useful = [m for m in msg if "LogitifyError" in m or "cannot read" in m or "pass --size" in m]
        raise LogitifyError(f"the Beam pipeline failed: {(useful or msg or [type(e).__name__])[-1]}") from None
    shards, skipped = [], list(inv.skipped)
    for i in range(n_shards):
        name = SHARD_SINKS[opts.format].shard_name(opts.name, opts.split, i, n_shards)
        path = _join(opts.out, RECEIPT.format(file=name))
        try:
            receipt = json.loads(_read_bytes(path))
        except (OSError, ValueError) as e:
            raise LogitifyError(f"no receipt for shard {name} ({e})") from None
        shards.append({k: receipt[k] for k in ("file", "num_examples", "sha256")})
        for s in receipt["skipped"]:
            report.warn(f"skipped {s['source']}: {s['reason']}")
        skipped.extend(receipt["skipped"])
    skipped.sort(key=lambda s: s["source"])
    total = sum(s["num_examples"] for s in shards)
    if total == 0:
        raise LogitifyError(f"none of the {len(inv.items)} inputs could be read as an image")
    seconds = time.time() - t0
    header = P._run_header(opts, shape, channels, shard_size, n_shards, inv.items)
    m = P.build_manifest(opts, shape, channels, shard_size, inv.classes, shards, skipped, header,
                         {"seconds": round(seconds, 3), "images_per_second": round(total / seconds, 1),
                          "runner": "beam"})
    extra = []
    if not _is_remote(opts.out):
        extra = SHARD_SINKS[opts.format].write_metadata(opts.out, m)
        P.Journal(opts.out).remove()
    _write_json(_join(opts.out, manifest_mod.MANIFEST), m)
    for s in shards:
        path = _join(opts.out, RECEIPT.format(file=s["file"]))
        if _is_remote(path):
            fs.delete([path])
        else:
            os.unlink(path)
    return {"command": "encode", "runner": "beam", "output": opts.out, "format": opts.format, "num_examples": total,
            "num_shards": n_shards, "shards": [s["file"] for s in shards], "resumed_shards": 0, "shape": list(shape),
            "classes": inv.classes, "skipped": skipped, "metadata_files": extra, "seconds": round(seconds, 3),
            "images_per_second": round(total / seconds, 1)}


def decode_shard(spec: dict) -> dict:
    """Decode one shard of a dataset to PNGs (or npz) inside the output folder."""
    from .dataset import LogitDataset
    from .sinks import NpzImageSink, PngImageSink, write_png

    ds = LogitDataset(spec["dataset"])
    shard = ds.manifest["shards"][spec["index"]]
    arrays = ds.read_shard(shard)
    images = ds.inverse(arrays["logits"])
    refused = []
    if spec["format"] == "npz":
        NpzImageSink(spec["out"]).write_shard(spec["index"], len(ds.manifest["shards"]), images,
                                              [str(k) for k in arrays["keys"]], arrays["labels"])
        return {"index": spec["index"], "written": len(images), "refused": []}
    png = PngImageSink(spec["out"])
    written = 0
    for key, img in zip(arrays["keys"], images):
        try:
            path = png.target(str(key))
        except ValueError as e:
            refused.append({"key": str(key), "reason": str(e)})
            continue
        write_png(path, img)
        written += 1
    return {"index": spec["index"], "written": written, "refused": refused}


def decode_beam(dataset, out, fmt, overwrite, report, beam_args) -> dict:
    beam, _, PipelineOptions = _beam()
    from .dataset import LogitDataset

    t0 = time.time()
    ds = LogitDataset(dataset)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise LogitifyError(f"output folder {out} is not empty; pass --overwrite to write into it")
    os.makedirs(out, exist_ok=True)
    specs = [{"dataset": os.path.abspath(dataset), "out": os.path.abspath(out), "format": fmt, "index": i}
             for i in range(len(ds.manifest["shards"]))]
    results_dir = tempfile.mkdtemp(prefix="logitify-decode-")
    try:
        for s in specs:
            s["results"] = results_dir
        try:
            with _scratch(), beam.Pipeline(options=_pipeline_options(beam_args)) as p:
                _ = p | beam.Create(specs, reshuffle=False) | beam.Reshuffle() | beam.Map(_decode_and_report)
        except Exception as e:
            msg = str(e).strip().splitlines()
            raise LogitifyError(f"the Beam pipeline failed: {(msg or [type(e).__name__])[-1]}") from None
        results = [json.load(open(os.path.join(results_dir, f"{s['index']}.json"))) for s in specs]
    finally:
        shutil.rmtree(results_dir, ignore_errors=True)
    written = sum(r["written"] for r in results)
    refused = [x for r in results for x in r["refused"]]
    for x in refused:
        report.warn(f"refused key {x['key']!r}: {x['reason']}")
    seconds = time.time() - t0
    summary = {"command": "decode", "runner": "beam", "dataset": dataset, "output": out, "format": fmt,
               "num_images": written, "refused": refused, "seconds": round(seconds, 3),
               "images_per_second": round(written / seconds, 1) if seconds else None}
    if refused:
        raise LogitifyError(f"{len(refused)} key(s) would have written outside {out} and were refused", summary)
    return summary


def _decode_and_report(spec):
    r = decode_shard(spec)
    with open(os.path.join(spec["results"], f"{spec['index']}.json"), "w") as f:
        json.dump(r, f)
    return r
