"""TFDS metadata beside TFRecord shards, so tfds.builder_from_directory loads them.

Written by hand (the JSON TFDS itself writes for these features), so
tensorflow-datasets is needed only by those who load with it.
"""
from __future__ import annotations

LABELS_FILE = "label.labels.txt"
FILES = ("dataset_info.json", "features.json", LABELS_FILE)  # every name written here, for --overwrite
# Where TFDS finds a split's shards; the TFRecord format names its shards by it.
TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def metadata_files(manifest) -> list:
    """The files write_tfds_metadata writes for this manifest (the labels only with classes)."""
    return [f for f in FILES if f != LABELS_FILE or manifest.classes]


def _tensor(shape, dtype, encoding="none", cls="tensor_feature.Tensor"):
    shp = {"dimensions": [str(int(s)) for s in shape]} if shape else {}
    return {"pythonClassName": f"tensorflow_datasets.core.features.{cls}",
            "tensor": {"shape": shp, "dtype": dtype, "encoding": encoding}}


def features_json(shape, classes) -> dict:
    label = ({"pythonClassName": "tensorflow_datasets.core.features.class_label_feature.ClassLabel",
              "classLabel": {"numClasses": str(len(classes))}}
             if classes else _tensor((), "int64", cls="scalar.Scalar"))
    return {
        "type": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
        "content": {"features": {
            "key": {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {}},
            "label": label,
            "logdet": _tensor((), "float32", cls="scalar.Scalar"),
            "logits": _tensor(shape, "float32", encoding="bytes"),
        }},
        "proto_cls": "tensorflow_datasets.FeaturesDict",
    }


def dataset_info_json(manifest, num_bytes: dict, template: str) -> dict:
    """TFDS's dataset_info.json: every split, with its shard lengths and bytes (`num_bytes`: split -> bytes)."""
    t = manifest.transform
    return {
        "description": (
            "Logits of dequantized images (TFGENZOO LogitifyImage) written by logitify: "
            f"alpha={t['alpha']}, corruption_level={t['corruption_level']}, noise={t['noise']}, "
            f"bits={t['bits']}, seed={t['seed']}. logdet is the forward log-det-Jacobian; "
            f"bpd_offset_nats={manifest.logdet['bpd_offset_nats']}."
        ),
        "fileFormat": "tfrecord",
        "name": manifest.name,
        "splits": [{
            "filepathTemplate": template,
            "name": split,
            "numBytes": str(num_bytes[split]),
            "shardLengths": [str(s.num_examples) for s in manifest.splits[split].shards],
        } for split in manifest.split_names],
        "version": "1.0.0",
    }


def write_tfds_metadata(out_dir: str, manifest) -> list:
    """The metadata_files of this manifest, here or in a bucket; returns their names."""
    from .. import fs
    from ..manifest import json_bytes

    num_bytes = {n: sum(fs.size(fs.join(out_dir, s.file)) for s in r.shards) for n, r in manifest.splits.items()}
    data = {"features.json": lambda: json_bytes(features_json(manifest.shape, manifest.classes)),
            LABELS_FILE: lambda: ("\n".join(manifest.classes) + "\n").encode("utf-8"),
            "dataset_info.json": lambda: json_bytes(dataset_info_json(manifest, num_bytes, TEMPLATE))}
    written = [name for name in data if name in metadata_files(manifest)]  # dataset_info.json last
    for name in written:
        fs.write_bytes(fs.join(out_dir, name), data[name]())
    return written
