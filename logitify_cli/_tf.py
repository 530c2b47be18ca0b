"""The one place TensorFlow is imported, late, and for the command line quietly.

TensorFlow's import costs seconds and prints start-up lines from C++ before
its own log level applies, so the CLI imports it only when a command needs it,
with the process's stderr file descriptor pointed elsewhere meanwhile. A
library caller's import changes nothing in their process.

The import happens once, under a lock: two threads redirecting fd 2 at the
same time would each save the other's redirection and leave stderr pointing
at a closed temporary file for the rest of the run.
"""
from __future__ import annotations

import gc
import os
import sys
import tempfile
import threading

_tf = None
verbose = False
# Set by the command line, which owns its process. TensorFlow's import makes
# some 400,000 objects that live as long as the process; the cyclic garbage
# collector walked them all four times during the import and again in later
# collections, 0.3-0.45 s of CPU on every run. With this set, the import
# runs with that collector paused, and what exists after it is frozen out of
# later collections (gc.freeze). A library caller's collector is left alone.
# Python's RTLD_NOW is kept: with lazy binding, an extension module first
# loaded during the import (hashlib's OpenSSL calls) bound to the BoringSSL
# that TensorFlow exports and crashed the process.
own_process = False
_KERAS_EAGER = "keras.src.optimizers"
_lock = threading.RLock()


def loaded() -> bool:
    """Whether TensorFlow has been imported through tf() in this process."""
    return _tf is not None


def tf():
    """Return the tensorflow module, importing it on first use (other threads wait)."""
    if _tf is not None:
        return _tf
    with _lock:
        if _tf is not None:
            return _tf
        return _import()


def _import():
    global _tf
    if not own_process:
        # A library caller's process: TensorFlow is imported as the caller's
        # own import would be, with their log level, oneDNN choice, Keras and
        # optimizer options. The transform's bits do not depend on them (its
        # functions are compiled by XLA; tests/test_subprocess.py checks).
        import tensorflow as module

        _tf = module
        return module
    # TensorFlow's C++ logging reads its level once, early in the import.
    # Unless verbose it is 3 whatever the environment says (a user's 0 made
    # XLA's start-up lines appear); the user's own value is put back after.
    user_level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    else:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # oneDNN rewrites can reorder float sums; we want bit-stable output.
    # Left set: TensorFlow may consult it after the import.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    # TensorFlow's __init__ imports keras.src.optimizers eagerly, only to
    # register Keras optimizers for SavedModel loading, and tolerates an
    # ImportError there. Keras (and the matplotlib and IPython it pulls in)
    # is about 0.9 s of every run and unused here, so that one import is
    # halted, then unblocked so a program importing Keras later gets it whole.
    blocked = _KERAS_EAGER not in sys.modules and "keras" not in sys.modules
    if blocked:
        sys.modules[_KERAS_EAGER] = None
    # Only an import that happens here: a program that loaded TensorFlow
    # itself and then runs a command keeps its heap as it was.
    ours = "tensorflow" not in sys.modules
    paused = ours and gc.isenabled()
    if paused:
        gc.disable()
    try:
        if verbose:
            import tensorflow as module
        else:
            module = _quiet_import()
    finally:
        if paused:
            gc.freeze()
            gc.enable()
        if blocked and sys.modules.get(_KERAS_EAGER, 0) is None:
            del sys.modules[_KERAS_EAGER]
        if user_level is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = user_level
    if not verbose:
        module.get_logger().setLevel("ERROR")
    # Grappler's arithmetic rewrites reassociate float sums such as
    # (a - k) + b into (a + b) - k, which cancels; the transform's numerics
    # are written out as intended and must run as written.
    module.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    _tf = module
    return module


def _quiet_import():
    """Import TensorFlow with fd 2 on a temporary file; fd 2 is back before this returns or raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile(mode="w+b") as capture:
            os.dup2(capture.fileno(), 2)
            try:
                import tensorflow as module
            except Exception:  # a broken install: show what TensorFlow said (not on Ctrl-C)
                os.dup2(saved, 2)
                capture.seek(0)
                sys.stderr.write(capture.read().decode("utf-8", "replace"))
                raise
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
    return module
