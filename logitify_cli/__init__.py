"""logitify: dequantize-and-logit image datasets for normalizing flows.

The library side, for training code:

    import logitify_cli as lg
    ds = lg.load("out/")              # tf.data.Dataset of (logits, logdet)
    ds = lg.load("out/", noise="fresh", epoch=3)  # epoch 3's own dequantization noise
    for part in lg.iter_numpy("out/"):  # NumPy dicts, a slice of a shard at a time
        ...
    lg.LogitTransform(lg.TransformParams(), (32, 32, 3))  # the maths itself

Names are resolved lazily so that importing the package (and `--help`)
never imports TensorFlow.
"""

__version__ = "0.1.0"

_LAZY = {
    "TransformParams": ("transform", "TransformParams"),
    "LogitTransform": ("transform", "LogitTransform"),
    "image_seeds": ("transform", "image_seeds"),
    "LogitDataset": ("dataset", "LogitDataset"),
    "load": ("dataset", "load"),
    "iter_numpy": ("dataset", "iter_numpy"),
    "bits_per_dim": ("bpd", "bits_per_dim"),
    "iw_bits_per_dim": ("bpd", "iw_bits_per_dim"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
