"""--preset: the published recipes of the standard sets, each value read from its project's own code.

A preset sets size, crop, resize mode, filter, bits and channels; options
given on the command line (or in the environment) still win, with a
warning, and the manifest records the recipe, its source and every
deviation, so a dataset never claims to be a preset it is not.
Only click-free, TensorFlow-free code here: `--help` lists the names.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import LogitifyError

# The options a preset sets, as the CLI names them.
OPTIONS = ("size", "crop", "resize_mode", "filter", "bits", "channels")


@dataclass(frozen=True)
class Preset:
    """One recipe. `sources` maps each value to the file (repository and path) it was read from."""

    name: str
    title: str
    size: tuple | None  # (H, W), or None: images are taken as they are
    crop: tuple | None  # (top, left, height, width), before the resize
    resize_mode: str | None
    filter: str | None
    bits: int
    channels: int
    input_size: tuple | None  # (H, W) every input must have when nothing resizes
    split_sizes: dict  # split name -> number of images of the published set
    sources: dict  # what -> "owner/repo: path (what it says)"
    exact: str  # what logitify reproduces exactly, and what it cannot
    exif_orientation: bool = False  # none of these projects turned images by their EXIF orientation
    notes: tuple = field(default_factory=tuple)

    def values(self) -> dict:
        """The recipe's option values, as the CLI would hold them."""
        return {"size": self.size, "crop": self.crop, "resize_mode": self.resize_mode if self.size else None,
                "filter": self.filter if self.size else None, "bits": self.bits, "channels": self.channels}


_CHRABASZCZ = ("PatrykChrabaszcz/Imagenet32_Scripts: image_resizer_imagent.py "
               "(Image.open, convert('RGB') if not RGB, im.resize((size, size), alg): the whole image, "
               "squashed to a square, no crop, no EXIF turn)")
_TFDS_IMAGENET = ("tensorflow/datasets: tensorflow_datasets/image_classification/imagenet_resized.py "
                  "('the ones provided by Chrabaszcz et. al. using the box resize method'; splits train, validation)")
_GLOW_TFR = ("openai/glow: data_loaders/generate_tfr/generate.py (dump_imagenet: 'train': 1281167, "
             "'validation': 50000)")


def _imagenet(size: int) -> Preset:
    return Preset(
        name=f"imagenet{size}",
        title=f"ImageNet {size}x{size}, Chrabaszcz et al.'s box-downsampled set (TFDS imagenet_resized/{size}x{size})",
        size=(size, size), crop=None, resize_mode="stretch", filter="box", bits=8, channels=3, input_size=None,
        split_sizes={"train": 1_281_167, "validation": 50_000},
        sources={"size, resize, channels": _CHRABASZCZ,
                 "filter box": _TFDS_IMAGENET + "; the script's own default is lanczos, the published files are box",
                 "split sizes": _GLOW_TFR},
        exact="Pillow's BOX resize of the whole decoded image, byte for byte as Pillow gives it here; "
              "the published files were made with 2017's Pillow and JPEG decoder, whose bytes this one may "
              "not match everywhere",
        notes=("not van den Oord et al.'s older ImageNet 32/64 (image-net.org/small, Glow's imagenet-oord): "
               "its downsampling was never published as a script, so no preset can rebuild it",),
    )


PRESETS = {p.name: p for p in (
    _imagenet(32),
    _imagenet(64),
    Preset(
        name="celeba64",
        title="CelebA 64x64 as RealNVP makes it: the 148x148 window at top 40, left 15, resized to 64x64",
        size=(64, 64), crop=(40, 15, 148, 148), resize_mode="stretch", filter="bilinear", bits=8, channels=3,
        input_size=None,
        split_sizes={"train": 162_770, "validation": 19_867, "test": 19_962},
        sources={"crop": "tensorflow/models: research/real_nvp/real_nvp_multiscale_dataset.py "
                         "(image[40:188, 15:163, :] of the 218x178 aligned image)",
                 "size, filter": "tensorflow/models: research/real_nvp/real_nvp_multiscale_dataset.py "
                                 "(tf.image.resize_images(x_in, [64, 64], method=0, align_corners=False): "
                                 "TensorFlow's bilinear)",
                 "channels, input": "tensorflow/models: research/real_nvp/celeba_formatting.py "
                                    "(imread of img_align_celeba, raw RGB bytes)",
                 "split sizes": "CelebA's list_eval_partition.txt, read by celeba_formatting.py --set; "
                                "test 19962 as in real_nvp_multiscale_dataset.py's n_eval_dict"},
        exact="the window exactly; the resize NOT: RealNVP resizes with TensorFlow's bilinear (2x2 taps, no "
              "antialiasing) and keeps the float result unrounded, which no 8-bit dataset can hold; logitify "
              "resizes with Pillow's bilinear (antialiased) and stores 8-bit levels",
        notes=("RealNVP also flips training images left-right at random while it trains; that is augmentation, "
               "not part of the stored pixels",),
    ),
    Preset(
        name="celebahq256",
        title="CelebA-HQ 256x256 at 5 bits, as Glow trains on it",
        size=(256, 256), crop=None, resize_mode="stretch", filter="box", bits=5, channels=3, input_size=None,
        split_sizes={"train": 27_000, "validation": 3_000},
        sources={"bits": "openai/glow: README.md (CelebA-HQ 256x256: train.py --problem celeba --image_size 256 "
                         "--n_bits_x 5); model.py keeps the top n_bits_x bits (x // 2**(8 - n_bits_x))",
                 "size, filter": "openai/glow: data_loaders/generate_tfr/generate.py (dump_celebahq: the 256x256 "
                                 "level of Progressive GAN's CelebA-HQ, each level the mean of 2x2 pixels of the "
                                 "one above: a box filter)",
                 "split sizes": "openai/glow: data_loaders/generate_tfr/generate.py "
                                "(_NUM_IMAGES 'train': 27000, 'validation': 3000)"},
        exact="256x256 inputs exactly (nothing is resized, the top 5 bits are kept as Glow keeps them); from "
              "1024x1024 inputs Pillow's BOX rounds after each pass where Progressive GAN rounds the float mean "
              "once, so some values differ by one 8-bit level",
    ),
    Preset(
        name="cifar10",
        title="CIFAR-10, 32x32, 8 bits, as published: no resize",
        size=None, crop=None, resize_mode=None, filter=None, bits=8, channels=3, input_size=(32, 32),
        split_sizes={"train": 50_000, "test": 10_000},
        sources={"size, bits": "openai/glow: README.md (train.py --problem cifar10 --image_size 32 --n_bits_x 8)",
                 "split sizes": "tensorflow/datasets: tensorflow_datasets/image_classification/cifar.py "
                                "(data_batch_1..5.bin: train, test_batch.bin: test, "
                                "10,000 images a file)"},
        exact="the images as they are, exactly; anything not 32x32 is refused",
    ),
)}


def names() -> list:
    return list(PRESETS)


def get(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise LogitifyError(f"no preset {name!r} (there are {', '.join(PRESETS)})") from None


def _show(option: str, value) -> str:
    """A value as the option would be typed."""
    if value is None:
        return "none"
    if option == "size":
        return f"{value[0]}x{value[1]}"
    if option == "crop":
        return ",".join(str(v) for v in value)
    return str(value)


def resolve(name: str, given: dict, warn) -> tuple:
    """(option values, manifest record) for preset `name` and the options the user gave explicitly.

    `given` holds only options set on the command line or in the environment
    (option name -> value). Each that differs from the recipe wins, is named
    by `warn`, and is listed under the record's `deviations`.
    """
    p = get(name)
    values = p.values()
    deviations = []
    for option in OPTIONS:
        if option not in given:
            continue
        want, got = values[option], given[option]
        if option in ("size", "crop") and got is not None:
            got = tuple(got)
        if got == want:
            continue
        deviations.append({"option": option, "preset": _listed(want), "given": _listed(got)})
        flag = "--" + option.replace("_", "-")
        warn(f"{flag} {_show(option, got)} overrides preset {p.name}'s {_show(option, want)}: "
             f"this dataset is not {p.name} as published, and its manifest says so")
        values[option] = got
    geometry_changed = any(d["option"] in ("size", "crop") for d in deviations)
    record = {
        "name": p.name,
        "title": p.title,
        "recipe": {**{k: _listed(v) for k, v in p.values().items()},
                   "input_size": _listed(p.input_size), "exif_orientation": p.exif_orientation},
        "sources": dict(p.sources),
        "exact": p.exact,
        "notes": list(p.notes),
        "split_sizes": dict(p.split_sizes),
        "deviations": deviations,
        "input_size": None if geometry_changed else _listed(p.input_size),
    }
    return values, record


def _listed(v):
    return list(v) if isinstance(v, tuple) else v


def check_first_image(record: dict, shape, key: str) -> None:
    """Refuse the run when a preset that takes images as they are meets one of another size (cifar10)."""
    want = record.get("input_size")
    if want and tuple(shape[:2]) != tuple(want):
        raise LogitifyError(
            f"preset {record['name']} takes {want[1]}x{want[0]} images as they are, without resizing, "
            f"but {key} is {shape[1]}x{shape[0]}: these are not {record['name']} images "
            f"(pass --size to resize them anyway, and the manifest will say it is not {record['name']})")


def count_notes(manifest, splits=None) -> list:
    """A warning for each split (of `splits`, or all) whose count differs from the preset's published size."""
    record = getattr(manifest, "preset", None)
    if not record:
        return []
    notes = []
    for name in (splits if splits is not None else manifest.split_names):
        want, have = record.get("split_sizes", {}).get(name), manifest.splits[name].num_examples
        if want is not None and want != have:
            notes.append(f"preset {record['name']}: split {name} has {want:,} images as published, "
                         f"this dataset holds {have:,}")
    return notes
