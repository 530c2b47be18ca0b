"""Where TensorFlow runs: --device auto|cpu|gpu as a device string, or a clear error."""
from __future__ import annotations

from .errors import LogitifyError


def resolve_device(device: str):
    from ._tf import tf as _tf

    tf = _tf()
    gpus = tf.config.list_physical_devices("GPU")
    if device == "gpu":
        if not gpus:
            raise LogitifyError("--device gpu: TensorFlow sees no GPU on this machine (try --device auto)")
        return "/GPU:0"
    if device == "cpu":
        return "/CPU:0"
    return "/GPU:0" if gpus else "/CPU:0"
