"""What each command returns: small objects the CLI prints as a line or as JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .report import skipped_order


@dataclass
class Result:
    """Base: `to_dict()` for --json, `message()` for the one line on stderr."""

    command = ""

    def to_dict(self) -> dict:
        return {"command": self.command, **asdict(self)}

    def message(self) -> str:
        return ""

    def stdout_text(self) -> str:
        """What is printed on stdout without --json (most commands: nothing)."""
        return ""

    @property
    def exit_code(self) -> int:
        return 0


@dataclass
class EncodeResult(Result):
    command = "encode"
    output: str
    format: str
    num_examples: int
    num_shards: int
    shards: list
    shape: list
    classes: list | None
    skipped: list
    metadata_files: list
    seconds: float
    images_per_second: float | None
    resumed_shards: int = 0
    runner: str = "local"
    split: str = "train"
    splits: dict | None = None  # examples of each split this run made (two with --holdout)
    warnings: list = field(default_factory=list)  # what was said on stderr before the run (e.g. TFDS counts that differ)

    @classmethod
    def of_splits(cls, results: list) -> "EncodeResult":
        """One result for runs that made a split each (a TFDS folder's splits)."""
        last = results[-1]
        splits = {}
        for r in results:
            splits.update(r.splits or {r.split: r.num_examples})
        return cls(output=last.output, format=last.format, num_examples=sum(r.num_examples for r in results),
                   num_shards=sum(r.num_shards for r in results), shards=[f for r in results for f in r.shards],
                   shape=last.shape, classes=last.classes,
                   skipped=sorted((s for r in results for s in r.skipped), key=skipped_order),
                   metadata_files=last.metadata_files, seconds=round(sum(r.seconds for r in results), 3),
                   images_per_second=(round(sum(r.num_examples for r in results) / sum(r.seconds for r in results), 1)
                                      if sum(r.seconds for r in results) else None),
                   resumed_shards=sum(r.resumed_shards for r in results), runner=last.runner,
                   split=results[0].split, splits=splits, warnings=[w for r in results for w in r.warnings])

    def message(self) -> str:
        where = (" (" + ", ".join(f"{n}: {k}" for n, k in self.splits.items()) + ")"
                 if self.splits and len(self.splits) > 1 else "")
        return (f"encoded {self.num_examples} images{where} into {self.num_shards} {self.format} shard(s) in "
                f"{self.output}" + (f" ({len(self.skipped)} skipped)" if self.skipped else "")
                + f" in {self.seconds:.1f} s")


@dataclass
class DecodeResult(Result):
    command = "decode"
    dataset: str
    output: str
    format: str
    num_images: int
    refused: list  # the first ones, by name
    seconds: float
    images_per_second: float | None
    runner: str = "local"
    num_refused: int = 0  # all of them, listed or not

    def message(self) -> str:
        return f"decoded {self.num_images} images into {self.output} in {self.seconds:.1f} s"


@dataclass
class VerifyResult(Result):
    command = "verify"
    dataset: str
    num_examples: int
    num_shards: int
    compared_with_sources: int
    problems: list  # the first ones found, by name
    seconds: float
    against: bool = False
    fingerprint: dict | None = None  # what verify recomputed of the manifest's fingerprint
    num_problems: int = 0  # all of them, listed or not
    splits: dict | None = None  # with several splits: each one's recomputed fingerprint
    sources_found: int = 0  # sources of the dataset's images read again; compared_with_sources of them pixel for pixel
    lossless: bool = True  # whether the decoded images are the encoded pixels, and so can be compared

    @property
    def ok(self) -> bool:
        return not self.problems and not self.num_problems

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("against")
        if d["splits"] is None:
            d.pop("splits")
        return {**d, "ok": self.ok}

    def message(self) -> str:
        head = f"{self.dataset}: {self.num_examples} examples in {self.num_shards} shard(s) verified"
        if not self.against:
            return head
        if self.lossless:
            return head + f", {self.compared_with_sources} equal to their sources bit for bit"
        # A lossy dataset's decoded images are not the pixels encoded: say what was checked, and claim no more.
        fp = " (their pixels give the manifest's fingerprint)" if (self.fingerprint or {}).get(
            "sources_pixels_sha256") else ""
        return (head + f", {self.sources_found} sources found with matching shapes{fp}, not compared with the "
                "decoded images: the noise is lossy")


@dataclass
class InfoResult(Result):
    """`info` prints its whole summary, not one line."""

    command = "info"
    summary: dict = field(default_factory=dict)
    text: str = ""

    def to_dict(self) -> dict:
        return dict(self.summary)

    def stdout_text(self) -> str:
        return self.text
