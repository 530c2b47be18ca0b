"""Fresh dequantization noise from stored shards: every epoch its own draw, K draws for evaluation.

A lossless dataset's logits give every level back exactly (the float64 tanh
inverse `decode` uses), and its keys give each image's seed words. So an
epoch's logits are: inverse(stored logits) -> levels, then the very forward
program `encode` runs, with the image's seed words re-keyed by the epoch
(`rekey_seeds_*`, epoch 0 = the words encode used, so epoch 0 is the stored
shards bit for bit). Evaluation draws are re-keyed in a domain of their own.

Slices of a shard (at most one compiled batch each) come from the format's
tf_dataset as they are read; per slice, the seed words are computed in NumPy
from the key bytes (blake2b, the words `image_seeds` gives), and the
re-keying, inverse and forward run in the graph on the slice padded to the
fixed batch (one compiled program, made once per process). Nothing depends
on batch size, shuffling, interleave order or which reader reads which shard.
"""
from __future__ import annotations

import functools

from .dataset import whole_number
from .errors import LogitifyError
from .transform import DRAW_DOMAIN, EPOCH_DOMAIN, LogitTransform, key_seeds, rekey_seeds_tf

BATCH = 512  # images (or images x draws) per compiled call


def check_refreshable(params, where: str = "this dataset") -> None:
    """LogitifyError unless the stored logits give every level back exactly (and there is noise to redraw).

    The rule is TransformParams.lossless; what is said here is why it fails.
    """
    if not params.lossless and params.noise == "gaussian":
        raise LogitifyError(
            f"{where} cannot take fresh noise: it was encoded with gaussian noise, which is centred on each "
            "level and spills into its neighbours, so the stored logits do not give the levels back exactly "
            "(re-encode with --noise uniform)")
    if not params.lossless:
        raise LogitifyError(
            f"{where} cannot take fresh noise: its corruption level {params.corruption_level:g} is above 1, "
            "so the intervals [k, k+c) of neighbouring levels overlap and the stored logits do not give the "
            "levels back exactly (re-encode with --corruption-level 1 or less)")
    if params.noise == "none":
        raise LogitifyError(
            f"{where} cannot take fresh noise: it was encoded with --noise none, so there is no noise to "
            "redraw and every epoch would equal the stored one (re-encode with --noise uniform)")


def _select_shards(ds, shards):
    if shards is None:
        return list(ds.shards)
    if isinstance(shards, str) or whole_number(shards) is not None:  # one shard, by name or index
        shards = [shards]
    try:
        shards = list(shards)
    except TypeError:
        raise LogitifyError(f"shards must be a list of shard indices or file names, got {shards!r}") from None
    by_name = {s.file: s for s in ds.shards}
    out = []
    for s in shards:
        i = whole_number(s)
        if i is not None:
            if not 0 <= i < len(ds.shards):
                raise LogitifyError(f"{ds.path}: no shard {i} in this split (its shards are 0 to {len(ds.shards) - 1})")
            out.append(ds.shards[i])
        elif isinstance(s, str) and s in by_name:
            out.append(by_name[s])
        elif getattr(s, "file", None) in by_name:
            out.append(by_name[s.file])
        else:
            raise LogitifyError(f"{ds.path}: no shard {s!r} in this dataset")
    return out


def _slices(ds, shards, fields, rows):
    """Dicts of [n, ...] tensors (n <= rows) with the given fields, as the dataset's format hands them over."""
    files = {ds.shard_path(s): s.num_examples for s in shards}
    return ds.format.tf_slices(files, ds.shape, ds.manifest.compressed, fields, rows)


def _programs(params, shape):
    """(forward, inverse) graph functions for (params, shape), made once while among the last used.

    Every epoch's dataset then calls the same functions, and XLA compiles
    them once, not once per call of load(). The last few pairs are kept,
    so a process that loads many datasets does not hold every program.
    """
    return _kept_programs(params, tuple(shape))


@functools.lru_cache(maxsize=8)
def _kept_programs(params, shape):
    return LogitTransform(params, shape).graph_functions()


def fresh_dataset(ds, epoch: int = 0, epochs: int | None = None, draws: int | None = None,
                  with_keys: bool = False, with_labels: bool = False, shards=None, batch_size: int = BATCH):
    """tf.data.Dataset like LogitDataset.as_tf_dataset, with the noise redrawn in the graph.

    epoch E (and epochs=N: E, E+1, ..., E+N-1 in a row), or draws=K: per image
    logits [K,H,W,C] and log-dets [K], keyed by draw index, apart from every
    epoch's noise. `shards` (indices or file names) reads only those shards,
    for one reader of several; values never depend on the split.
    """
    from ._tf import tf as _tf

    tf = _tf()
    check_refreshable(ds.params, ds.path)
    ds.refuse_remote_for_tf()
    given = epoch, epochs, draws
    epoch, epochs, draws = (whole_number(v) for v in given)  # None where a value given is no integer
    if epoch is None or epoch < 0 or epoch >= 1 << 32:
        raise LogitifyError(f"epoch must be an integer from 0 to 2**32-1, got {given[0]!r}")
    if given[1] is not None and (epochs is None or epochs < 1 or epoch + epochs > 1 << 32):
        raise LogitifyError(f"epochs must be a positive integer (epoch + epochs <= 2**32), got {given[1]!r}")
    if given[2] is not None:
        if draws is None or draws < 1:
            raise LogitifyError(f"draws must be a positive integer, got {given[2]!r}")
        if epoch or epochs is not None:
            raise LogitifyError("draws are for evaluation and have their own noise: give draws or epoch/epochs, "
                                "not both")
    h, w, c = ds.shape
    forward, inverse = _programs(ds.params, ds.shape)
    k = draws or 1
    rows = max(1, int(batch_size) // k)
    seed = ds.params.seed
    fields = ("logits", "key") + (("label",) if with_labels else ())
    # Slices of at most `rows` examples, each padded to `rows` in the graph: one compiled
    # program, and no re-batching of single images before it.
    source = _slices(ds, _select_shards(ds, shards), fields, rows)

    def pick(ex, y, logdet):
        out = (y, logdet)
        if with_keys:
            out += (ex["key"],)
        if with_labels:
            out += (ex["label"],)
        return out

    def seed_words(keys):
        return key_seeds(seed, keys)

    def padded(ex):
        # The seed words encode used (blake2b of each key), once per slice in NumPy.
        seeds = tf.numpy_function(seed_words, [ex["key"]], tf.uint32, stateful=False)
        n = tf.shape(ex["logits"])[0]
        y = tf.pad(ex["logits"], [[0, rows - n], [0, 0], [0, 0], [0, 0]])
        s = tf.reshape(tf.pad(seeds, [[0, rows - n], [0, 0]]), [rows, 2])
        return n, inverse(y), s

    def renoise(ex, e):
        n, images, seeds = padded(ex)
        y, logdet = forward(images, rekey_seeds_tf(tf, seeds, e, EPOCH_DOMAIN))
        return pick(ex, y[:n], logdet[:n])

    def draw(ex):
        n, images, seeds = padded(ex)
        images = tf.repeat(images, k, axis=0)
        index = tf.tile(tf.range(k, dtype=tf.int64), [rows])
        y, logdet = forward(images, rekey_seeds_tf(tf, tf.repeat(seeds, k, axis=0), index, DRAW_DOMAIN))
        return pick(ex, tf.reshape(y, [rows, k, h, w, c])[:n], tf.reshape(logdet, [rows, k])[:n])

    if draws is not None:
        out = source.map(draw, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    elif epochs is None:
        out = source.map(lambda ex: renoise(ex, tf.constant(epoch, tf.int64)),
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        out = tf.data.Dataset.range(epoch, epoch + epochs).flat_map(
            lambda e: source.map(lambda ex: renoise(ex, e), num_parallel_calls=tf.data.AUTOTUNE,
                                 deterministic=True))
    return out.unbatch()
