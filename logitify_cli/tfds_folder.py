"""A prepared TFDS dataset folder, read from its own metadata (no tensorflow-datasets needed).

`tfds.load` and `download_and_prepare` leave DATA_DIR/NAME[/CONFIG]/VERSION/
holding dataset_info.json (splits, their shard files and lengths),
features.json (which feature is the image, which the class label) and
NAME.labels.txt files beside them (a ClassLabel's names). This module finds
such a folder, reads those files with suspicion (they come from anyone) and
says which shard files hold each split and how many records TFDS promised.
The records themselves are read like any TFRecord input.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from .errors import FeatureChoice, TfdsMetadataError as TfdsError
from .report import listing, short

INFO_FILE = "dataset_info.json"
FEATURES_FILE = "features.json"
META_MAX_BYTES = 64 << 20  # a dataset_info.json of ImageNet-21k's 10,000s of shards is a few MB
DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"  # TFDS's naming.DEFAULT_FILENAME_TEMPLATE
VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)\Z")


@dataclass(frozen=True)
class Feature:
    """An Image or ClassLabel feature: its key in the Example (nested names joined by '/')."""

    key: str
    kind: str  # "Image" or "ClassLabel"
    shape: tuple = ()  # Image: (H, W, C), None where TFDS leaves it open
    dtype: str = ""  # Image: "uint8", "uint16", "float32"
    encoding: str = "png"  # Image: "png" or "jpeg" (TFDS's default is PNG)
    num_classes: int | None = None  # ClassLabel
    names_file: str = ""  # ClassLabel: where TFDS writes its names, relative to the folder
    names: tuple | None = None  # ClassLabel: names given in features.json itself (old TFDS)


@dataclass(frozen=True)
class Split:
    name: str
    files: tuple  # shard files relative to the folder, in shard order
    lengths: tuple | None  # records TFDS wrote to each file, or None (old metadata without shardLengths)
    num_examples: int | None  # what TFDS promised in all


@dataclass
class TfdsFolder:
    """One prepared dataset version: its name, version, splits and features."""

    path: str  # the version folder: keys are relative to it
    name: str
    version: str
    splits: dict  # name -> Split, in dataset_info.json's order
    features: list = field(default_factory=list)  # Image and ClassLabel features, in key order

    def images(self) -> list:
        return [f for f in self.features if f.kind == "Image"]

    def labels(self) -> list:
        return [f for f in self.features if f.kind == "ClassLabel"]


def _has_info(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INFO_FILE))


def _versions(path: str) -> list:
    """(version tuple, name) of each VERSION sub-folder holding a dataset_info.json."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    found = []
    for n in names:
        m = VERSION_RE.match(n)
        if m and _has_info(os.path.join(path, n)):
            found.append((tuple(int(g) for g in m.groups()), n))
    return sorted(found)


def locate(path: str):
    """(version folder, note or None) if `path` is a prepared TFDS folder or the dataset folder above one; else None.

    The dataset folder's newest version wins, in semantic version order
    (1.10.0 after 1.9.0), and the note says which was taken.
    """
    if _has_info(path):
        return path, None
    found = _versions(path)
    if not found:
        return None
    _, newest = found[-1]
    note = f"TFDS dataset {path}: using version {newest}"
    if len(found) > 1:
        note += " (the newest of " + ", ".join(n for _, n in found) + ")"
    return os.path.join(path, newest), note


def _read_json(path: str):
    try:
        with open(path, "rb") as f:
            data = f.read(META_MAX_BYTES + 1)
    except FileNotFoundError:
        raise TfdsError(path, "missing: a prepared TFDS folder has dataset_info.json and features.json") from None
    except OSError as e:
        raise TfdsError(path, f"cannot read: {e.strerror or e}") from None
    if len(data) > META_MAX_BYTES:
        raise TfdsError(path, f"larger than {META_MAX_BYTES >> 20} MiB")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise TfdsError(path, f"not valid JSON ({e})") from None


# More shards than any prepared TFDS split has (ImageNet's train split has 1,024; the encode journal
# allows 100,000): a claim beyond it would have a name made for each before one is looked for.
SHARDS_MAX = 100_000
# More classes than any dataset names (ImageNet-21k has 21,841): a ClassLabel without a names file gets
# '0', '1', ... made for it, and a claim of a trillion would have made each.
CLASSES_MAX = 1_000_000


def _shard_count(count: int, name: str, where: str) -> int:
    if count > SHARDS_MAX:
        raise TfdsError(where, f"split {short(name)} claims {count} shards, more than the {SHARDS_MAX:,} "
                               "any prepared TFDS split has")
    return count


def _count(value, what: str, where: str) -> int:
    """A non-negative integer that TFDS writes as a JSON string (int64 in proto JSON) or a number."""
    if isinstance(value, str) and value.isdigit() and len(value) < 19:
        return int(value)
    if type(value) is int and value >= 0:
        return value
    raise TfdsError(where, f"{what} is {short(value)}, not a count")


def _shard_files(template: str, dataset: str, split: str, count: int, where: str) -> tuple:
    """The shard file names TFDS's ShardedFileTemplate gives for `count` shards."""
    template = template[:template.rfind("%")] if "%" in template else template  # TFDS strips an encoding suffix
    digits = max(5, len(str(count)))
    files = []
    for i in range(count):
        index, total = f"{i:0{digits}d}", f"{count:0{digits}d}"
        try:
            rel = template.format(DATASET=dataset, SPLIT=split, FILEFORMAT="tfrecord", SHARD_INDEX=index,
                                  NUM_SHARDS=total, SHARD_X_OF_Y=f"{index}-of-{total}")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise TfdsError(where, f"split {short(split)}: filepathTemplate {short(template)} cannot be filled ({short(str(e))})") from None
        parts = rel.replace("\\", "/").split("/")
        if not rel or os.path.isabs(rel) or any(p in ("", ".", "..") for p in parts) or "\0" in rel:
            raise TfdsError(where, f"split {short(split)}: shard file {short(rel)} is not a file inside the dataset folder")
        files.append("/".join(parts))
    return tuple(files)


def _splits(info: dict, dataset: str, where: str) -> dict:
    raw = info.get("splits")
    if not isinstance(raw, list) or not raw:
        raise TfdsError(where, "lists no splits (was the dataset prepared?)")
    out = {}
    for s in raw:
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not s["name"]:
            raise TfdsError(where, f"a split entry without a name: {str(s)[:80]}")
        name = s["name"]
        if name in out:
            raise TfdsError(where, f"split {short(name)} is listed twice")
        template = s.get("filepathTemplate") or DEFAULT_TEMPLATE
        if not isinstance(template, str):
            raise TfdsError(where, f"split {short(name)}: filepathTemplate is not a string")
        stats = s.get("statistics") if isinstance(s.get("statistics"), dict) else {}
        promised = _count(stats["numExamples"], f"split {short(name)}: numExamples", where) \
            if "numExamples" in stats else None
        if "shardLengths" in s:
            if not isinstance(s["shardLengths"], list):
                raise TfdsError(where, f"split {short(name)}: shardLengths is not a list")
            _shard_count(len(s["shardLengths"]), name, where)
            lengths = tuple(_count(v, f"split {short(name)}: a shard length", where) for v in s["shardLengths"])
            count = len(lengths)
            promised = sum(lengths)
        elif "numShards" in s:  # metadata of TFDS before 3.0: how many shards, no length each
            lengths = None
            count = _shard_count(_count(s["numShards"], f"split {short(name)}: numShards", where), name, where)
        else:
            raise TfdsError(where, f"split {short(name)} has neither shardLengths nor numShards")
        out[name] = Split(name, _shard_files(template, dataset, name, count, where), lengths, promised)
    return out


# -- features.json ------------------------------------------------------------------------------
#
# TFDS has written it in three dialects: proto JSON ({"pythonClassName": C,
# "<kind>": {...}}, TFDS >= 4.5), and older {"type": C, "content": ...}
# with the content either proto JSON (beside "proto_cls") or plain keys.

def _class_and_content(node):
    if not isinstance(node, dict):
        return None, None
    if "type" in node and isinstance(node["type"], str):
        content = node.get("content")
        if isinstance(content, str):  # a proto serialized as a JSON string
            try:
                content = json.loads(content)
            except ValueError:
                content = None
        return node["type"], content
    cls = node.get("pythonClassName")
    if not isinstance(cls, str):
        return None, None
    rest = [v for k, v in node.items() if k not in ("pythonClassName", "description", "docs")]
    return cls, (rest[0] if len(rest) == 1 else None)


def _children(node, content) -> dict:
    """A FeaturesDict's {name: node}."""
    if not isinstance(content, dict):
        return {}
    if "type" in node and "proto_cls" not in node and "features" not in content:
        return content  # the oldest dialect: the content is the dict itself
    features = content.get("features")
    return features if isinstance(features, dict) else {}


def _dims(shape) -> tuple:
    if isinstance(shape, dict):
        shape = shape.get("dimensions", [])
    if not isinstance(shape, list):
        return ()
    out = []
    for d in shape:
        try:
            d = int(d)
        except (TypeError, ValueError):
            d = -1
        out.append(d if d >= 0 else None)
    return tuple(out)


def _walk(node, path: tuple, out: list, depth: int = 0) -> None:
    cls, content = _class_and_content(node)
    if cls is None or depth > 32:
        return
    kind = cls.rsplit(".", 1)[-1]
    if kind == "FeaturesDict":
        for name, child in sorted(_children(node, content).items()):
            if isinstance(name, str) and name:
                _walk(child, path + (name,), out, depth + 1)
        return
    if not path or not isinstance(content, dict):
        return
    key = "/".join(path)
    if kind == "Image":
        encoding = content.get("encodingFormat", content.get("encoding_format")) or "png"
        out.append(Feature(key, "Image", shape=_dims(content.get("shape")), dtype=str(content.get("dtype", "uint8")),
                           encoding=str(encoding)))
    elif kind == "ClassLabel":
        n = _class_count(content.get("numClasses", content.get("num_classes")))
        names = content.get("names")
        names = tuple(names) if isinstance(names, list) and all(isinstance(x, str) for x in names) else None
        # TFDS's convert_feature_name_to_filename: '/' inside a name becomes '.', levels join with '-'
        names_file = "-".join(p.replace("/", ".") for p in path) + ".labels.txt"
        out.append(Feature(key, "ClassLabel", num_classes=n, names_file=names_file, names=names))


def _class_count(value):
    """A ClassLabel's numClasses: a whole number (TFDS writes it as a string of digits), or None if it gives none.

    A negative, fractional, boolean or infinite count is no count: -1 stands for it, which class_names refuses.
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else -1
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        return int(value.strip())
    return -1


def read_features(path: str) -> list:
    """The Image and ClassLabel features of a features.json, by their keys in the Example."""
    where = os.path.join(path, FEATURES_FILE)
    doc = _read_json(where)
    out = []
    _walk(doc, (), out)
    if _class_and_content(doc)[0] is None:
        raise TfdsError(where, "not a TFDS features description")
    return sorted(out, key=lambda f: f.key)


def class_names(folder: str, feature: Feature) -> list:
    """A ClassLabel's names: its .labels.txt (as TFDS reads it), else features.json's, else '0', '1', ..."""
    if feature.num_classes == -1:
        raise TfdsError(os.path.join(folder, FEATURES_FILE), f"the class count of {short(feature.key)} is not a whole "
                                                              "number of classes")
    where = os.path.join(folder, feature.names_file)
    try:
        with open(where, "rb") as f:
            data = f.read(META_MAX_BYTES + 1)
    except FileNotFoundError:
        data = None
    except OSError as e:
        raise TfdsError(where, f"cannot read: {e.strerror or e}") from None
    if data is not None:
        if len(data) > META_MAX_BYTES:
            raise TfdsError(where, f"larger than {META_MAX_BYTES >> 20} MiB")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TfdsError(where, f"not UTF-8 text ({e})") from None
        names = [n.strip() for n in text.split("\n") if n.strip()]  # TFDS's _load_names_from_file
    elif feature.names:
        names = list(feature.names)
    elif feature.num_classes:
        if feature.num_classes > CLASSES_MAX:
            raise TfdsError(os.path.join(folder, FEATURES_FILE),
                            f"{short(feature.key)} claims {feature.num_classes} classes, more than the "
                            f"{CLASSES_MAX:,} any dataset has")
        return [str(i) for i in range(feature.num_classes)]
    else:
        raise TfdsError(where, f"missing, and features.json gives no class count for {short(feature.key)}")
    if feature.num_classes is not None and len(names) != feature.num_classes:
        raise TfdsError(where, f"holds {len(names)} class names, features.json says {feature.num_classes} "
                               f"classes for {short(feature.key)}")
    if len(set(names)) != len(names):
        raise TfdsError(where, "names a class twice")
    return names


def read(path: str) -> TfdsFolder:
    """The dataset version in `path` (a folder holding dataset_info.json), checked."""
    where = os.path.join(path, INFO_FILE)
    info = _read_json(where)
    if not isinstance(info, dict):
        raise TfdsError(where, "not a JSON object")
    file_format = info.get("fileFormat", "tfrecord") or "tfrecord"
    if file_format != "tfrecord":
        raise TfdsError(where, f"the shards are {file_format!s:.40}, and logitify reads TFDS datasets written as "
                               "TFRecord (prepare it with file_format='tfrecord', TFDS's default)")
    name = info.get("name")
    if not isinstance(name, str) or not name:
        raise TfdsError(where, "has no dataset name")
    version = info.get("version", "")
    return TfdsFolder(path=path, name=name, version=str(version), splits=_splits(info, name, where),
                      features=read_features(path))


@dataclass(frozen=True)
class Choice:
    """What a run takes from a TFDS folder: the image feature, the label feature (or none) and its names."""

    image: Feature
    label: Feature | None
    classes: list | None


def choose(folder: TfdsFolder, image_key: str | None, label_key: str | None) -> Choice:
    """The image and label features, from the user's --image-key/--label-key or the features themselves.

    One Image feature is taken; several must be chosen between. One
    ClassLabel is taken (of several, the one called 'label'); none leaves
    the examples unlabelled.
    """
    where = os.path.join(folder.path, FEATURES_FILE)
    images, labels = folder.images(), folder.labels()
    image_keys, label_keys = [f.key for f in images], [f.key for f in labels]
    if image_key is not None:
        image = next((f for f in images if f.key == image_key), None)
        if image is None:
            raise FeatureChoice(f"--image-key {short(image_key)}: {where} has no Image feature of that name"
                                + (f"; its Image features: {listing(image_keys)}" if images else ""),
                                option="--image-key", features=image_keys)
    elif len(images) == 1:
        image = images[0]
    elif not images:
        raise TfdsError(where, "has no Image feature: logitify encodes datasets of images")
    else:
        raise FeatureChoice(f"{where} has several Image features ({listing(image_keys)}); "
                            "choose one with --image-key", option="--image-key", features=image_keys)
    if image.dtype != "uint8":
        raise TfdsError(where, f"Image feature {short(image.key)} holds {short(image.dtype)} pixels; logitify encodes 8-bit images")
    if label_key is not None:
        label = next((f for f in labels if f.key == label_key), None)
        if label is None:
            raise FeatureChoice(f"--label-key {short(label_key)}: {where} has no ClassLabel feature of that name"
                                + (f"; its ClassLabel features: {listing(label_keys)}" if labels else ""),
                                option="--label-key", features=label_keys)
    elif len(labels) == 1:
        label = labels[0]
    elif not labels:
        label = None
    else:
        label = next((f for f in labels if f.key == "label"), None)
        if label is None:
            raise FeatureChoice(f"{where} has several ClassLabel features ({listing(label_keys)}); "
                                "choose one with --label-key", option="--label-key", features=label_keys)
    classes = class_names(folder.path, label) if label is not None else None
    return Choice(image, label, classes)
