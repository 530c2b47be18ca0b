"""TFDS metadata beside TFRecord shards, so tfds.builder_from_directory loads them.

Written by hand (the JSON TFDS itself writes for these features), so
tensorflow-datasets is needed only by those who load with it.
"""
from __future__ import annotations

import os

TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
LABELS_FILE = "label.labels.txt"


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


def dataset_info_json(manifest: dict, num_bytes: int) -> dict:
    t = manifest["transform"]
    return {
        "description": (
            "Logits of dequantized images (TFGENZOO LogitifyImage) written by logitify: "
            f"alpha={t['alpha']}, corruption_level={t['corruption_level']}, noise={t['noise']}, "
            f"bits={t['bits']}, seed={t['seed']}. logdet is the forward log-det-Jacobian; "
            f"bpd_offset_nats={manifest['logdet']['bpd_offset_nats']}."
        ),
        "fileFormat": "tfrecord",
        "name": manifest["name"],
        "splits": [{
            "filepathTemplate": TEMPLATE,
            "name": manifest["split"],
            "numBytes": str(num_bytes),
            "shardLengths": [str(s["num_examples"]) for s in manifest["shards"]],
        }],
        "version": "1.0.0",
    }


def write_tfds_metadata(out_dir: str, manifest: dict) -> list:
    from .manifest import write_json_atomic

    num_bytes = sum(os.path.getsize(os.path.join(out_dir, s["file"])) for s in manifest["shards"])
    write_json_atomic(os.path.join(out_dir, "features.json"), features_json(manifest["shape"], manifest["classes"]))
    written = ["features.json"]
    if manifest["classes"]:
        with open(os.path.join(out_dir, LABELS_FILE), "w", encoding="utf-8") as f:
            f.write("\n".join(manifest["classes"]) + "\n")
        written.append(LABELS_FILE)
    write_json_atomic(os.path.join(out_dir, "dataset_info.json"), dataset_info_json(manifest, num_bytes))
    written.append("dataset_info.json")
    return written
