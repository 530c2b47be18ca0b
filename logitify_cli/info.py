"""`logitify info`: what a dataset holds, in numbers and in one picture.

Statistics are gathered a slice at a time, in float64 blocks of at most
BLOCK_VALUES, and come out the same whatever the slices (the sums run in
fixed places of the stream, the histograms' random sample is drawn at
fixed places of it too); the histograms keep a sample of fixed size, the plot at
most PLOT_CLASSES classes of small thumbnails, and labels are counted one by
one up to LABELS_COUNTED: memory stays flat whatever the dataset claims.
"""
from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np

from . import fs
from .conventions import alpha_equivalents, squeeze_interval
from .dataset import LogitDataset, split_names
from .errors import LogitifyError, UsageError
from .report import QUIET, printable
from .results import InfoResult

SAMPLES_PER_CLASS = 8
PLOT_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", ".jpg": "jpg", ".jpeg": "jpg"}
HIST_VALUES = 1_000_000
BLOCK_VALUES = 1 << 20  # float64 temporaries of 8 MB at most
PLOT_CLASSES = 16  # rows of samples in the plot
THUMB_SIDE = 256  # samples are kept (and drawn) at most this many pixels a side
SAMPLER_DRAWS = 1 << 16  # places of the histograms' samples drawn at a time
LABELS_COUNTED = 10_000  # distinct labels counted one by one; the rest together
OTHER_LABELS = "(other labels)"


class _Running:
    """min, max, mean and std over many arrays, in float64, the same however the arrays are sliced.

    The values count as one stream, summed in runs of SUM_RUN at fixed
    places in it (a short run is carried over to the next slice), each run
    by NumPy's pairwise sum and the runs one after the other: the sums
    depend on the values alone, not on where slices begin and end.
    """

    SUM_RUN = 1 << 16

    def __init__(self):
        self.n, self.s, self.ss = 0, 0.0, 0.0
        self.non_finite = 0
        self.lo, self.hi = math.inf, -math.inf
        self._carry = np.zeros(0, np.float64)

    def add(self, a):
        a = a.reshape(-1)
        for start in range(0, a.size, BLOCK_VALUES):
            part = a[start:start + BLOCK_VALUES]
            ok = np.isfinite(part)
            good = int(ok.sum())
            if good < part.size:  # a non-finite value counts as 0 in the sums, to keep the runs in place
                if good:
                    self.lo = min(self.lo, float(part[ok].min()))
                    self.hi = max(self.hi, float(part[ok].max()))
                part = np.where(ok, part, 0)
            elif good:
                self.lo = min(self.lo, float(part.min()))
                self.hi = max(self.hi, float(part.max()))
            self.n += good
            self.non_finite += part.size - good
            p64 = part.astype(np.float64)
            if self._carry.size:
                p64 = np.concatenate([self._carry, p64])
            whole = p64.size - p64.size % self.SUM_RUN
            for r in range(0, whole, self.SUM_RUN):
                self._fold(p64[r:r + self.SUM_RUN])
            self._carry = p64[whole:].copy()

    def _fold(self, run):
        self.s += float(run.sum())
        self.ss += float((run * run).sum())

    def result(self):
        if self._carry.size:
            self._fold(self._carry)
            self._carry = np.zeros(0, np.float64)
        if not self.n:
            return {"count": 0, "min": None, "max": None, "mean": None, "std": None, "non_finite": self.non_finite}
        mean = self.s / self.n
        var = max(0.0, self.ss / self.n - mean * mean)
        return {"count": self.n, "min": self.lo, "max": self.hi, "mean": mean, "std": math.sqrt(var),
                "non_finite": self.non_finite}


class _Sampler:
    """About `rate` of a stream of values, at places drawn once from a seeded generator.

    The places are a Bernoulli process over the stream's positions (gaps
    drawn SAMPLER_DRAWS at a time), so the sample is the same whatever the
    slices the stream comes in, and costs time in proportion to its size.
    """

    def __init__(self, rate: float, seed: int):
        self.rate = rate
        self._rng = np.random.default_rng(seed)
        self._places = np.zeros(0, np.int64)
        self._end = 0  # the stream's positions before this one have their places drawn
        self._pos = 0  # values seen

    def take(self, values) -> np.ndarray:
        """The sampled finite values among the next ones of the stream."""
        values = values.reshape(-1)
        start, stop = self._pos, self._pos + values.size
        self._pos = stop
        if self.rate >= 1.0:
            return values[np.isfinite(values)].copy()
        while self._end < stop:
            gaps = self._rng.geometric(self.rate, SAMPLER_DRAWS)
            places = self._end - 1 + np.cumsum(gaps)
            self._end = int(places[-1]) + 1
            self._places = np.concatenate([self._places, places])
        i = int(np.searchsorted(self._places, stop))
        picked, self._places = self._places[:i], self._places[i:]
        out = values[picked - start]
        return out[np.isfinite(out)]


def _thumb(y: np.ndarray) -> np.ndarray:
    """A copy of one image's logits, every s-th pixel, so it is at most THUMB_SIDE a side."""
    s = max(1, -(-max(y.shape[0], y.shape[1]) // THUMB_SIDE))
    return y[::s, ::s].copy()


def gather(path: str, want_samples: bool = False, check: bool = True, report=QUIET, split: str | None = None):
    """(dataset, summary dict, samples {label: [(key, logits)]}, logit sample, log-det sample) of one split."""
    ds = LogitDataset(path, split)
    m = ds.manifest
    logits_stats, logdet_stats = _Running(), _Running()
    counts, other = {}, 0
    samples = {}
    hist, logdets = [], []
    value_sample = _Sampler(min(1.0, HIST_VALUES / max(1, m.num_examples * m.dims)), 0)
    logdet_sample = _Sampler(min(1.0, HIST_VALUES / max(1, m.num_examples)), 1)
    shards_out = []
    with report.bar(ds.num_examples, "info") as bar:
        for shard in ds.shards:
            for a in ds.iter_chunks(shard, check=check):
                logits_stats.add(a["logits"])
                logdet_stats.add(a["logdet"])
                labs, n = np.unique(a["labels"], return_counts=True)
                for lab, k in zip(labs.tolist(), n.tolist()):
                    if lab in counts or len(counts) < LABELS_COUNTED:
                        counts[lab] = counts.get(lab, 0) + k
                    else:
                        other += k
                if want_samples:
                    logdets.append(logdet_sample.take(a["logdet"]))
                    hist.append(value_sample.take(a["logits"]))
                    full = len(samples) >= PLOT_CLASSES and all(len(b) >= SAMPLES_PER_CLASS for b in samples.values())
                    for key, lab, y in ([] if full else zip(a["keys"], a["labels"].tolist(), a["logits"])):
                        if lab not in samples and len(samples) >= PLOT_CLASSES:
                            continue
                        bucket = samples.setdefault(lab, [])
                        if len(bucket) < SAMPLES_PER_CLASS:
                            bucket.append((str(key), _thumb(y)))
                bar.update(len(a["keys"]))
                del a  # before the next slice is read
            shards_out.append({**shard.to_dict(), "bytes": _size(ds, shard)})
    classes = m.classes
    class_counts = {}
    for lab, n in sorted(counts.items()):
        name = classes[lab] if classes and 0 <= lab < len(classes) else ("(no label)" if lab == -1 else str(lab))
        class_counts[name] = n
    if other:
        class_counts[OTHER_LABELS] = other
    dims = m.dims
    ld = logdet_stats.result()
    bad = [f"{x.non_finite} {what}" for x, what in ((logits_stats, "logit value(s)"), (logdet_stats, "log-det(s)"))
           if x.non_finite]
    if bad:
        report.warn(f"{' and '.join(bad)} are not finite numbers and are left out of these statistics: the "
                    "dataset is damaged (logitify verify names the images)")
    summary = {
        "command": "info",
        "dataset": path,
        "format": m.format,
        "name": m.name,
        "split": m.split,
        "num_examples": m.num_examples,
        "shape": list(m.shape),
        "dims": dims,
        "classes": classes,
        "class_counts": class_counts,
        "transform": m.transform,
        "alpha_conventions": alpha_equivalents(m.params.alpha),
        "squeeze": list(squeeze_interval(m.params.alpha)),
        "lossless": ds.params.lossless,
        "bpd_offset_nats": m.logdet["bpd_offset_nats"],
        "logits": logits_stats.result(),
        "logdet": ld,
        "logdet_per_dim_mean": ld["mean"] / dims if ld["mean"] is not None else None,
        "shards": shards_out,
        "total_bytes": None if any(s["bytes"] is None for s in shards_out) else sum(s["bytes"] for s in shards_out),
        "skipped": m.skipped,
        "tool_version": m.tool_version,
        "geometry": {**{k: m.source.get(k) for k in ("size", "resize_mode", "crop", "filter")},
                     **({"exif_orientation": False} if m.source.get("exif_orientation") is False else {}),
                     **({"jpeg_draft": True} if m.source.get("jpeg_draft") is True else {})},
        "preset": m.preset,
        "fingerprint": m.fingerprint,
        "tfds": m.source.get("tfds") if isinstance(m.source.get("tfds"), dict) else None,
    }
    h = np.concatenate(hist) if hist else np.zeros(0, np.float32)
    lds = np.concatenate(logdets) if logdets else np.zeros(0, np.float32)
    return ds, summary, samples, h, lds


def _size(ds, shard) -> int | None:
    """The shard's bytes, here or in a bucket; None where it cannot be asked."""
    try:
        return fs.size(ds.shard_path(shard))
    except Exception:  # a store's own error (Beam wraps them): the size is only a figure here
        return None


def _fmt(x):
    return "-" if x is None else f"{x:.6g}"


def _geometry_text(g: dict) -> str:
    """How the images were sized, in one line."""
    parts = []
    if g.get("crop"):
        top, left, h, w = g["crop"]
        parts.append(f"crop {w}x{h} at top {top}, left {left}")
    if g.get("size"):
        h, w = g["size"]
        parts.append(f"resized to {w}x{h} ({g.get('resize_mode') or 'stretch'}, filter {g.get('filter') or 'bicubic'}"
                     + (", JPEGs from libjpeg's draft scale" if g.get("jpeg_draft") else "") + ")")
    text = ", then ".join(parts) or "as read (no crop, no resize)"
    return text + ("; EXIF orientation not applied" if g.get("exif_orientation") is False else "")


def _preset_lines(p: dict) -> list:
    """The preset, its sources and how the dataset departs from it."""
    lines = [f"preset       {p['name']}: {p.get('title', '')}"]
    for what, where in (p.get("sources") or {}).items():
        lines.append(f"  source     {what}: {where}")
    if p.get("exact"):
        lines.append(f"  exact      {p['exact']}")
    devs = p.get("deviations") or []
    for d in devs:
        lines.append(f"  deviation  --{str(d.get('option')).replace('_', '-')} {d.get('given')!r} "
                     f"instead of the preset's {d.get('preset')!r}")
    if not devs:
        lines.append("  deviation  none")
    return lines


def render(summary: dict) -> str:
    s = summary
    t = s["transform"]
    lines = [
        f"dataset      {s['dataset']}  ({s['format']}, name {s['name']}, split {s['split']})",
        f"examples     {s['num_examples']}   shape {'x'.join(map(str, s['shape']))}  (D = {s['dims']})",
        f"transform    alpha {t['alpha']}  corruption level {t['corruption_level']}  noise {t['noise']}"
        f"  bits {t['bits']}  seed {t['seed']}  ({'lossless' if s['lossless'] else 'lossy'})",
        "alpha        " + ", ".join(f"{k} {v:.10g}" for k, v in s["alpha_conventions"].items())
        + "  (p in [{:.10g}, {:.10g}])".format(*s["squeeze"]),
        f"bits/dim     offset {s['bpd_offset_nats']:.6g} nats: bpd = -(log p(y) + logdet - offset) / (D ln 2)",
        "logits       " + "  ".join(f"{k} {_fmt(s['logits'][k])}" for k in ("min", "max", "mean", "std")),
        "logdet       " + "  ".join(f"{k} {_fmt(s['logdet'][k])}" for k in ("min", "max", "mean", "std")),
    ]
    lines.append("geometry     " + _geometry_text(s.get("geometry") or {}))
    if s.get("preset"):
        lines += _preset_lines(s["preset"])
    fp = s.get("fingerprint")
    if fp:
        lines += [f"fingerprint  pixels sha256 {fp['pixels_sha256']}", f"             keys sha256 {fp['keys_sha256']}"]
    else:
        lines.append("fingerprint  none (made before logitify recorded one)")
    tf = s.get("tfds")
    if tf:
        promised = tf.get("num_examples_promised")
        lines.append(f"tfds         {tf.get('dataset')} {tf.get('version')}, split {tf.get('split')}: "
                     f"{tf.get('num_examples_found')} examples"
                     + ("" if promised is None else
                        " as dataset_info.json promises" if promised == tf.get("num_examples_found") else
                        f", dataset_info.json promises {promised}"))
    if s["class_counts"]:
        lines.append("classes      " + ", ".join(f"{k}: {v}" for k, v in s["class_counts"].items()))
    total = "?" if s["total_bytes"] is None else f"{s['total_bytes'] / 1e6:.1f}"
    lines.append(f"shards       {len(s['shards'])}, {total} MB")
    for sh in s["shards"]:
        size = "?" if sh["bytes"] is None else f"{sh['bytes'] / 1e6:.2f}"
        lines.append(f"  {sh['file']}  {sh['num_examples']} examples  {size} MB  sha256 {sh['sha256'][:16]}")
    lines.append(f"skipped      {len(s['skipped'])}")
    for sk in s["skipped"]:
        lines.append(f"  {sk['source']}: {sk['reason']}")
    return "\n".join(printable(line) for line in lines)


def _histogram(ax, values, bins: int, color: str) -> None:
    """A histogram that any finite sample can have: in float64, over a range of non-zero width."""
    values = np.asarray(values, np.float64)
    if not values.size:
        return
    lo, hi = float(values.min()), float(values.max())
    if not hi - lo > max(abs(lo), abs(hi)) * 1e-9:  # one value (or nearly): a range around it
        pad = max(0.5, abs(hi) * 1e-6)
        lo, hi = lo - pad, hi + pad
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    ax.stairs(counts, edges, fill=True, color=color)


def plot(ds: LogitDataset, summary: dict, samples: dict, hist: np.ndarray, logdets: np.ndarray, path: str) -> None:
    """Decoded samples per class, the logit histogram, the log-det histogram.

    Text from the manifest is drawn escaped and as plain text (no '$...$'
    mathematics), and matplotlib's own warnings stay quiet.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LogitifyError("--plot needs matplotlib: pip install 'logitify[plot]'") from None
    plain = {"parse_math": False}
    labels = sorted(samples)
    classes = summary["classes"] or []
    rows = max(1, len(labels))
    cols = SAMPLES_PER_CLASS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig = plt.figure(figsize=(12, 2.0 + 1.3 * rows + 3.2), dpi=100)
        try:
            grid = fig.add_gridspec(rows + 2, cols, height_ratios=[1.3] * rows + [0.25, 3.2], hspace=0.35)
            t = summary["transform"]
            fig.suptitle(printable(
                f"{summary['name']} / {summary['split']}: {summary['num_examples']} images "
                f"{'x'.join(map(str, summary['shape']))} - alpha {t['alpha']}, c {t['corruption_level']}, "
                f"noise {t['noise']}, bits {t['bits']}, seed {t['seed']}"), fontsize=11, **plain)
            for r, lab in enumerate(labels):
                items = samples[lab]
                imgs = ds.inverse(np.nan_to_num(np.stack([y for _, y in items]), posinf=30.0, neginf=-30.0)) if items else []
                name = classes[lab] if 0 <= lab < len(classes) else ("no label" if lab == -1 else str(lab))
                for c in range(cols):
                    ax = fig.add_subplot(grid[r, c])
                    ax.set_xticks([])
                    ax.set_yticks([])
                    for sp in ax.spines.values():
                        sp.set_visible(False)
                    if c < len(imgs):
                        img = imgs[c]
                        ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                                  vmin=0, vmax=255, interpolation="nearest")
                    if c == 0:
                        ax.set_ylabel(printable(name)[:40], rotation=0, ha="right", va="center", fontsize=9, **plain)
            ax1 = fig.add_subplot(grid[rows + 1, : cols // 2])
            _histogram(ax1, hist, 100, "#3b75af")
            ax1.set_title(f"logits (mean {_fmt(summary['logits']['mean'])}, std {_fmt(summary['logits']['std'])})",
                          fontsize=10, **plain)
            ax1.set_xlabel("y")
            ax1.set_ylabel("count")
            ax2 = fig.add_subplot(grid[rows + 1, cols // 2:])
            _histogram(ax2, logdets, min(60, max(10, len(logdets) // 4)), "#c8553d")
            ax2.set_title(f"log-det per image (TFGENZOO convention, D = {summary['dims']})", fontsize=10, **plain)
            ax2.set_xlabel("logdet (nats)")
            image = io.BytesIO()
            fig.savefig(image, format=PLOT_FORMATS[os.path.splitext(path)[1].lower()])
            # Through a temporary name and a rename: a link at `path` is replaced, not written through.
            fs.write_bytes(path, image.getvalue())
        except OSError as e:
            raise LogitifyError(f"cannot write {path}: {e.strerror or e}") from None
        finally:
            plt.close(fig)


def info(path: str, plot_path: str | None = None, report=QUIET, split: str | None = None) -> InfoResult:
    """One split's summary (the only one, or the one named), or with several splits each one's under `splits`."""
    if plot_path and os.path.splitext(plot_path)[1].lower() not in PLOT_FORMATS:
        raise UsageError(f"--plot {plot_path}: name a file ending in {', '.join(PLOT_FORMATS)}")
    if plot_path and os.path.isdir(plot_path):
        raise UsageError(f"--plot {plot_path} is a folder: name a file")
    names = split_names(path) if split is None else [split]
    if len(names) > 1:
        if plot_path:
            raise UsageError(f"{path} has the splits {', '.join(names)}: --plot draws one; name it with --split")
        parts = {n: gather(path, report=report, split=n) for n in names}
        per = {n: part[1] for n, part in parts.items()}
        first = per[names[0]]
        wide = ("format", "name", "shape", "dims", "classes", "transform", "lossless", "bpd_offset_nats",
                "geometry", "tool_version")
        summary = {"command": "info", "dataset": path, **{k: first[k] for k in wide},
                   "num_examples": sum(p["num_examples"] for p in per.values()),
                   "split_names": names, "splits": per,
                   "manifest": parts[names[0]][0].manifest.to_dict()}
        text = "\n\n".join(render(per[n]) for n in names)
        return InfoResult(summary=summary, text=text)
    ds, summary, samples, hist, logdets = gather(path, want_samples=plot_path is not None, report=report,
                                                 split=names[0])
    if plot_path:
        plot(ds, summary, samples, hist, logdets, plot_path)
        summary["plot"] = plot_path
    summary["manifest"] = ds.manifest.to_dict()
    text = render(summary) + (f"\nplot         {printable(plot_path)}" if plot_path else "")
    return InfoResult(summary=summary, text=text)
