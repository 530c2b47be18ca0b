"""Several splits in one dataset folder: which inputs go to which split, and what a new split must share.

A dataset's transform, shape, format and geometry are one for all its
splits, so a model trained on one split is evaluated on another under the
same maths. A run that adds a split to a finished dataset is checked here
against the dataset before anything is written. `--holdout` sends a share
of a run's inputs to a second split by a hash of (seed, key) alone: adding
files never moves an image from one split to the other.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .errors import SplitMismatch, UsageError
from .manifest import source_geometry
from .report import short

HOLDOUT_TAG = b"logitify-holdout\0"


def holdout_share(seed: int, key: str) -> float:
    """Where a key falls in [0, 1): the first 8 bytes of sha256(tag, seed, key), big-endian, over 2**64."""
    h = hashlib.sha256(HOLDOUT_TAG + f"{int(seed)}\0".encode("ascii") + key.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest()[:8], "big") / 2.0 ** 64


def holdout_mask(seed: int, keys, fraction: float) -> np.ndarray:
    """True for each key that goes to the holdout split: holdout_share(seed, key) < fraction."""
    return np.fromiter((holdout_share(seed, k) < fraction for k in keys), bool)


def outside_classes(labels, classes: int):
    """Where a label names none of `classes` classes (encode writes a class's index, or -1 for none).

    One label gives a bool, an array of them a mask: encode checks each
    record's own label, verify each slice of a shard, by this one rule.
    """
    return (labels < -1) | (labels >= classes)


def parse_holdout(text: str) -> tuple:
    """'FRACTION:NAME' -> (fraction, name), or UsageError."""
    from .manifest import SPLIT_NAME

    frac, sep, name = text.partition(":")
    try:
        fraction = float(frac)
    except ValueError:
        fraction = None
    if not sep or fraction is None or not 0 < fraction < 1:
        raise UsageError(f"--holdout {text!r} is not FRACTION:NAME with 0 < FRACTION < 1, e.g. 0.1:test")
    if not SPLIT_NAME.match(name):
        raise UsageError(f"--holdout {text!r}: the split name must be letters, digits and _ (at most 64)")
    return fraction, name


def class_mapping(dataset_classes, run_classes, where: str):
    """Labels of this run's classes renumbered as the dataset's, or SplitMismatch.

    A later split may lack some of the dataset's classes (a test folder
    without one class), but a class the dataset does not know has no label
    and is refused by name, as is a labelled run into an unlabelled
    dataset and the other way round.
    """
    if dataset_classes == run_classes:
        return None
    if dataset_classes is None or run_classes is None:
        def said(classes):
            return "none (its images are not in class folders)" if classes is None else short(classes)

        raise SplitMismatch(f"{where}: the dataset's classes are {said(dataset_classes)}, this run's are "
                            f"{said(run_classes)}; nothing was written", field="classes",
                            dataset=dataset_classes, run=run_classes)
    new = [c for c in run_classes if c not in dataset_classes]
    if new:
        raise SplitMismatch(f"{where}: class {short(new[0])} is not one of the dataset's classes "
                            f"({', '.join(map(short, dataset_classes[:10]))}{' ...' if len(dataset_classes) > 10 else ''})"
                            f"{f' (and {len(new) - 1} more new)' if len(new) > 1 else ''}; nothing was written",
                            field="classes", dataset=dataset_classes, run=run_classes)
    index = {c: i for i, c in enumerate(dataset_classes)}
    return np.array([index[c] for c in run_classes], np.int64)


def dataset_fields(m) -> dict:
    """What every split of a dataset shares, by the name the refusal gives it."""
    t = m.params
    src = m.splits[m.split_names[0]].source  # the geometry is the same in every split
    return {"format": m.format, "name": m.name, "compressed": bool(m.compressed), "shape": list(m.shape),
            "alpha": t.alpha, "corruption_level": t.corruption_level, "noise": t.noise, "bits": t.bits,
            "seed": t.seed, "size": src.get("size"), "channels": src.get("channels", m.shape[2]),
            **source_geometry(src)}


def run_fields(plan) -> dict:
    opts, t = plan.options, plan.options.params
    return {"format": opts.format, "name": opts.name, "compressed": bool(opts.compress), "shape": list(plan.shape),
            "alpha": t.alpha, "corruption_level": t.corruption_level, "noise": t.noise, "bits": t.bits,
            "seed": t.seed, "size": list(opts.size) if opts.size else None, "channels": plan.channels,
            **opts.geometry_fields()}


def refuse_mismatch(base, plan, folder: str) -> None:
    """SplitMismatch naming the first field where this run differs from the dataset it adds a split to.

    The seed too: the manifest holds one transform for the dataset, and
    fresh noise and any re-encoding rebuild every split's noise from it
    (each image's noise hashes (seed, key), so splits still draw apart).
    """
    have, want = dataset_fields(base), run_fields(plan)
    if set(have) != set(want):  # the two lists are kept by hand: one field short would go unchecked
        raise AssertionError(f"dataset_fields and run_fields name other fields: {sorted(set(have) ^ set(want))}")
    for k in have:
        if have[k] != want[k]:
            raise SplitMismatch(
                f"{folder}: split {plan.split!r} would not match the dataset's splits "
                f"({', '.join(base.split_names)}): {k} is {short(have[k])} there, {short(want[k])} in this run; "
                "every split shares the transform, shape, format and geometry (nothing was written)",
                field=k, dataset=have[k], run=want[k])
