"""`logitify info`: what a dataset holds, in numbers and in one picture."""
from __future__ import annotations

import math
import os

import numpy as np

from .dataset import LogitDataset
from .errors import LogitifyError
from .manifest import public

SAMPLES_PER_CLASS = 8
HIST_VALUES = 1_000_000


class _Running:
    """min, max, mean and std over many arrays, in float64."""

    def __init__(self):
        self.n, self.s, self.ss = 0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, a):
        if a.size == 0:
            return
        a64 = a.astype(np.float64, copy=False)
        self.n += a.size
        self.s += float(a64.sum())
        self.ss += float(np.square(a64).sum())
        self.lo = min(self.lo, float(a.min()))
        self.hi = max(self.hi, float(a.max()))

    def result(self):
        if not self.n:
            return {"count": 0, "min": None, "max": None, "mean": None, "std": None}
        mean = self.s / self.n
        var = max(0.0, self.ss / self.n - mean * mean)
        return {"count": self.n, "min": self.lo, "max": self.hi, "mean": mean, "std": math.sqrt(var)}


def gather(path: str, want_samples: bool = False, check: bool = True):
    """(summary dict, samples {label: [(key, logits)]}, logit sample, all log-dets)."""
    ds = LogitDataset(path)
    m = ds.manifest
    logits_stats, logdet_stats = _Running(), _Running()
    counts = {}
    samples = {}
    hist, logdets = [], []
    budget = HIST_VALUES
    rng = np.random.default_rng(0)
    shards_out = []
    for shard, a in ds.iter_shards(check=check):
        logits_stats.add(a["logits"])
        logdet_stats.add(a["logdet"])
        logdets.append(a["logdet"])
        for lab in a["labels"]:
            counts[int(lab)] = counts.get(int(lab), 0) + 1
        if want_samples:
            for key, lab, y in zip(a["keys"], a["labels"], a["logits"]):
                bucket = samples.setdefault(int(lab), [])
                if len(bucket) < SAMPLES_PER_CLASS:
                    bucket.append((str(key), y))
            flat = a["logits"].reshape(-1)
            if budget > 0 and flat.size:
                take = flat if flat.size <= budget else rng.choice(flat, budget, replace=False)
                hist.append(take)
                budget -= take.size
        shards_out.append({**shard, "bytes": os.path.getsize(ds.shard_path(shard))})
    classes = m.get("classes")
    class_counts = {}
    for lab, n in sorted(counts.items()):
        name = classes[lab] if classes and 0 <= lab < len(classes) else ("(no label)" if lab == -1 else str(lab))
        class_counts[name] = n
    dims = m["logdet"].get("dims") or int(np.prod(m["shape"]))
    ld = logdet_stats.result()
    summary = {
        "command": "info",
        "dataset": path,
        "format": m["format"],
        "name": m.get("name"),
        "split": m.get("split"),
        "num_examples": m["num_examples"],
        "shape": m["shape"],
        "dims": dims,
        "classes": classes,
        "class_counts": class_counts,
        "transform": m["transform"],
        "lossless": ds.params.lossless,
        "bpd_offset_nats": m["logdet"]["bpd_offset_nats"],
        "logits": logits_stats.result(),
        "logdet": ld,
        "logdet_per_dim_mean": ld["mean"] / dims if ld["mean"] is not None else None,
        "shards": shards_out,
        "total_bytes": sum(s["bytes"] for s in shards_out),
        "skipped": m.get("skipped", []),
        "tool_version": m.get("tool_version"),
    }
    h = np.concatenate(hist) if hist else np.zeros(0, np.float32)
    lds = np.concatenate(logdets) if logdets else np.zeros(0, np.float32)
    return ds, summary, samples, h, lds


def _fmt(x):
    return "-" if x is None else f"{x:.6g}"


def render(summary: dict) -> str:
    s = summary
    t = s["transform"]
    lines = [
        f"dataset      {s['dataset']}  ({s['format']}, name {s['name']}, split {s['split']})",
        f"examples     {s['num_examples']}   shape {'x'.join(map(str, s['shape']))}  (D = {s['dims']})",
        f"transform    alpha {t['alpha']}  corruption level {t['corruption_level']}  noise {t['noise']}"
        f"  bits {t['bits']}  seed {t['seed']}  ({'lossless' if s['lossless'] else 'lossy'})",
        f"bits/dim     offset {s['bpd_offset_nats']:.6g} nats: bpd = -(log p(y) + logdet - offset) / (D ln 2)",
        "logits       " + "  ".join(f"{k} {_fmt(s['logits'][k])}" for k in ("min", "max", "mean", "std")),
        "logdet       " + "  ".join(f"{k} {_fmt(s['logdet'][k])}" for k in ("min", "max", "mean", "std")),
    ]
    if s["class_counts"]:
        lines.append("classes      " + ", ".join(f"{k}: {v}" for k, v in s["class_counts"].items()))
    lines.append(f"shards       {len(s['shards'])}, {s['total_bytes'] / 1e6:.1f} MB")
    for sh in s["shards"]:
        lines.append(f"  {sh['file']}  {sh['num_examples']} examples  {sh['bytes'] / 1e6:.2f} MB  sha256 {sh['sha256'][:16]}")
    lines.append(f"skipped      {len(s['skipped'])}")
    for sk in s["skipped"]:
        lines.append(f"  {sk['source']}: {sk['reason']}")
    return "\n".join(lines)


def plot(ds: LogitDataset, summary: dict, samples: dict, hist: np.ndarray, logdets: np.ndarray, path: str) -> None:
    """Decoded samples per class, the logit histogram, the log-det histogram."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LogitifyError("--plot needs matplotlib: pip install 'logitify[plot]'") from None
    labels = sorted(samples)
    classes = summary["classes"] or []
    rows = max(1, len(labels))
    cols = SAMPLES_PER_CLASS
    fig = plt.figure(figsize=(12, 2.0 + 1.3 * rows + 3.2), dpi=100)
    grid = fig.add_gridspec(rows + 2, cols, height_ratios=[1.3] * rows + [0.25, 3.2], hspace=0.35)
    t = summary["transform"]
    fig.suptitle(
        f"{summary['name']} / {summary['split']}: {summary['num_examples']} images "
        f"{'x'.join(map(str, summary['shape']))} - alpha {t['alpha']}, c {t['corruption_level']}, "
        f"noise {t['noise']}, bits {t['bits']}, seed {t['seed']}", fontsize=11)
    for r, lab in enumerate(labels):
        items = samples[lab]
        imgs = ds.inverse(np.stack([y for _, y in items])) if items else []
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
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    ax1 = fig.add_subplot(grid[rows + 1, : cols // 2])
    ax1.hist(hist, bins=100, color="#3b75af")
    ax1.set_title(f"logits (mean {_fmt(summary['logits']['mean'])}, std {_fmt(summary['logits']['std'])})", fontsize=10)
    ax1.set_xlabel("y")
    ax1.set_ylabel("count")
    ax2 = fig.add_subplot(grid[rows + 1, cols // 2:])
    ax2.hist(logdets, bins=min(60, max(10, len(logdets) // 4)), color="#c8553d")
    ax2.set_title(f"log-det per image (TFGENZOO convention, D = {summary['dims']})", fontsize=10)
    ax2.set_xlabel("logdet (nats)")
    try:
        fig.savefig(path)
    except OSError as e:
        raise LogitifyError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def info(path: str, plot_path: str | None = None) -> dict:
    ds, summary, samples, hist, logdets = gather(path, want_samples=plot_path is not None)
    if plot_path:
        plot(ds, summary, samples, hist, logdets, plot_path)
        summary["plot"] = plot_path
    summary["manifest"] = public(ds.manifest)
    return summary
