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
import importlib.util
import os
import sys
import tempfile
import threading
import types

_tf = None
verbose = False
# Set by the console script (cli.entry), which owns its process. TensorFlow's import makes
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
# TensorFlow's __init__ runs all 44 packages of its public API (tf.compat,
# tf.nn, tf.train, tf.saved_model, ...), which import some 850 modules the
# command never touches: 0.5-1.4 s of CPU on every run. Set by the console
# script, whose process runs nothing else after the command: packages not
# named here are put in sys.modules as stand-ins whose body runs at their
# first attribute lookup, so `tf` is still whole. Those named are what
# logitify uses (and bitwise, which TensorFlow's __init__ reads): they load
# as usual, so no deferred body runs in our own threads. A program that runs
# a command in its own process gets TensorFlow's API whole at import.
defer_api = False

_EAGER_API = frozenset({"bitwise", "config", "data", "dtypes", "errors", "image", "io", "math", "random"})
_lock = threading.RLock()
_api_lock = threading.RLock()
_loading: set = set()


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


def tf_quietly():
    """tf(), with the import's start-up lines held back (unless verbose): for a Beam worker.

    A worker runs logitify's shards only, and its stderr is often the
    user's terminal: TensorFlow's C++ start-up lines from each worker were
    all that a run without --verbose printed there. Nothing else about the
    import changes (a worker is imported into as a library caller's is).
    """
    if _tf is not None or own_process or verbose:
        return tf()
    with _lock:
        if _tf is not None:
            return _tf
        return _import(quiet=True)


def _import(quiet: bool = False):
    global _tf
    if quiet:
        user_level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        try:
            module = _quiet_import()
        finally:
            if user_level is None:
                os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
            else:
                os.environ["TF_CPP_MIN_LOG_LEVEL"] = user_level
        module.get_logger().setLevel("ERROR")
        _tf = module
        return module
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
    stand_ins = []
    try:
        if ours and defer_api:
            _defer_api(stand_ins)
        if verbose:
            import tensorflow as module
        else:
            module = _quiet_import()
    finally:
        if paused:
            gc.freeze()
            gc.enable()
        if "tensorflow" not in sys.modules:  # the import failed: a later one starts clean
            for name, stand_in in stand_ins:
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]
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


class _Deferred(types.ModuleType):
    """A package of TensorFlow's API whose body runs at its first attribute lookup, once, in any thread."""

    def __getattr__(self, attr):
        _Deferred._load(self)  # not self._load: another thread may have made this a plain module meanwhile
        if type(self) is _Deferred:  # looked up by its own body as it runs, as a half-imported module would be
            raise AttributeError(f"partially initialized module {self.__name__!r} has no attribute {attr!r}")
        return getattr(self, attr)

    def __dir__(self):
        _Deferred._load(self)
        return sorted(self.__dict__)

    def _load(self):
        with _api_lock:
            if type(self) is _Deferred and id(self) not in _loading:
                _loading.add(id(self))
                try:
                    self.__spec__.loader.exec_module(self)
                    self.__class__ = types.ModuleType
                    parent = sys.modules.get(self.__name__.rpartition(".")[0])
                    if parent is not None:  # as an import binds a package in its parent
                        setattr(parent, self.__name__.rpartition(".")[2], self)
                finally:
                    _loading.discard(id(self))


def _defer_api(out: list) -> None:
    """Put stand-ins in sys.modules for TensorFlow's API packages outside _EAGER_API; each (name, stand-in) into `out`.

    Found from TensorFlow's install without importing it; an install laid
    out otherwise gets no stand-ins, and so the usual import.
    """
    found = importlib.util.find_spec("tensorflow")
    if found is None or not found.submodule_search_locations:
        return
    root = list(found.submodule_search_locations)[0]
    api = os.path.join(root, "_api", "v2")
    try:
        entries = sorted(os.listdir(api))
    except OSError:
        return
    for entry in entries:
        name = f"tensorflow._api.v2.{entry}"
        folder = os.path.join(api, entry)
        init = os.path.join(folder, "__init__.py")
        if entry in _EAGER_API or not entry.isidentifier() or name in sys.modules or not os.path.isfile(init):
            continue
        if any(os.path.exists(os.path.join(root, entry + end)) for end in ("", ".py")):
            # tf.distribute is also a folder of TensorFlow's own, whose code imports tensorflow.distribute.*
            # (which binds that folder as tf.distribute, until the API package is bound over it) and
            # reads it back as an attribute of tf: such a package is imported as TensorFlow orders it.
            continue
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        module.__class__ = _Deferred
        sys.modules[name] = module
        out.append((name, module))


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
