"""A few real processes: the installed entry points, streams, start-up cost."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import photo, save

ENV = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}


def run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "logitify_cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


def run_code(code, timeout):
    """stdout of `python -c code`, which must exit 0."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_help_does_not_import_tensorflow():
    code = ("import sys\nfrom logitify_cli.cli import main\n"
            "for args in (['--help'], ['encode', '--help'], ['decode', '--help'], ['--version']):\n"
            "    try:\n        main(args)\n    except SystemExit as e:\n        assert e.code == 0, (args, e.code)\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
            "print('clean')\n")
    assert run_code(code, timeout=60).strip().endswith("clean")


def test_tensorflow_loads_without_keras_and_keras_still_imports_after():
    """The command line's import skips Keras; a program importing Keras afterwards gets it whole."""
    code = ("import gc, sys\nfrom logitify_cli import _tf\n_tf.own_process = True\n_tf.tf()\n"
            "assert 'keras' not in sys.modules, 'keras was imported'\n"
            "import keras\nfrom keras import layers\nassert _tf.tf().keras.layers.Dense is layers.Dense\n"
            "print('ok')\n")
    assert run_code(code, timeout=120).strip().endswith("ok")


def test_a_library_import_leaves_the_callers_process_alone():
    """Collector, Keras and environment: as a plain `import tensorflow` would leave them."""
    code = ("import gc, os, sys\nfrom logitify_cli._tf import tf\ntf()\n"
            "assert gc.isenabled() and gc.get_freeze_count() == 0, gc.get_freeze_count()\n"
            "assert 'TF_ENABLE_ONEDNN_OPTS' not in os.environ and 'TF_CPP_MIN_LOG_LEVEL' not in os.environ\n"
            "print('ok')\n")
    assert run_code(code, timeout=120).strip().endswith("ok")


def test_the_command_line_freezes_what_tensorflow_built_and_collects_after(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(3):
        save(tmp_path / "in" / f"{i}.png", photo(np.random.default_rng(i), 8, 8))

    def encode_then_count(out, before="", own=True, after=""):
        # Every library is loaded with symbols bound at once: lazily bound,
        # an extension module first loaded during TensorFlow's import took
        # TensorFlow's BoringSSL for its OpenSSL and crashed the process.
        code = (f"import gc, os, sys\n{before}from logitify_cli.cli import main\nflags = sys.getdlopenflags()\n"
                f"from logitify_cli import _tf\n_tf.own_process = {own}  # as the console script sets it\n"
                "seen = []\nset_flags = sys.setdlopenflags\n"
                "sys.setdlopenflags = lambda f: (seen.append(f), set_flags(f))\n"
                f"try:\n    main(['encode', {str(tmp_path / 'in')!r}, '-o', {str(tmp_path / out)!r}, '-q'])\n"
                "except SystemExit as e:\n    assert not e.code, e.code\n"
                "assert gc.isenabled() and sys.getdlopenflags() == flags\n"
                f"assert all(f & os.RTLD_NOW for f in seen), seen\n{after}print(gc.get_freeze_count())\n")
        frozen = int(run_code(code, timeout=120).split()[-1])
        assert (tmp_path / out / "manifest.json").exists()
        return frozen

    assert encode_then_count("out") > 100_000  # TensorFlow's own objects, out of every later collection
    # A program that loaded TensorFlow itself and then runs a command keeps its heap as it was.
    assert encode_then_count("out2", before="import tensorflow\n") == 0
    # main() called by a program of its own leaves the program's collector alone (the console script
    # alone says the process is the command's), and so its TensorFlow options and environment.
    env = "assert 'TF_ENABLE_ONEDNN_OPTS' not in os.environ\n"
    assert encode_then_count("out3", own=False, after=env) == 0


POOL_CODE = """
import os, sys{tf}
from logitify_cli.errors import LogitifyError
from logitify_cli.pool import OrderedPool, can_fork
print("fork" if can_fork() else "spawn")
with OrderedPool(2) as pool:
    assert list(pool.imap(abs, [(i, -i) for i in range(20)], window=3)) == [(i, i) for i in range(20)]
with OrderedPool(2) as pool:
    jobs = [("job 0", 0), ("job 1", 0), ("job 2", 0)]
    try:
        list(pool.imap(os._exit, jobs, describe=lambda meta: meta))
    except LogitifyError as e:
        print(e)
"""


def test_workers_fork_only_without_tensorflow_and_a_dead_worker_is_an_error():
    """Forked (fresh process) and spawned (TensorFlow loaded) pools: same order, same clear error."""
    for tf_line, method in (("", "fork"), ("\nfrom logitify_cli._tf import tf; tf()", "spawn")):
        out = run_code(POOL_CODE.format(tf=tf_line), timeout=120).splitlines()
        assert out[0] == method if sys.platform.startswith("linux") else out[0] == "spawn"
        assert "a worker process died while working on job 0" in out[1]


LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked only on Linux")

ORPHAN_CODE = """
import os, signal, threading
from logitify_cli.pool import OrderedPool, can_fork
box = {{}}

def start():  # spawned workers are started by whichever thread submits first: here one that then ends
    box["pool"] = pool = OrderedPool(2)
    pool.pool.submit(int).result()

if {spawn}:
    stay = threading.Event()
    threading.Thread(target=stay.wait, daemon=True).start()  # a second thread: workers are spawned, not forked
    assert not can_fork()
    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
else:
    start()
pool = box["pool"]
pool.pool.submit(int).result()
print(*pool.pool._processes, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

SIGTERM_CODE = """
import os, signal
from multiprocessing.connection import wait
from logitify_cli.pool import OrderedPool
def stop(signum, frame):  # the CLI's own SIGTERM handler, which a forked worker inherits
    raise KeyboardInterrupt
signal.signal(signal.SIGTERM, stop)
gate, opener = os.pipe()
forks = []
os.register_at_fork(before=lambda: forks.append(1),  # the second worker waits at its start until told
                    after_in_child=lambda: len(forks) == 2 and os.read(gate, 1))
pool = OrderedPool(2)
executor, manager = pool.pool, pool.pool._executor_manager_thread
first = executor._processes[executor.submit(os.getpid).result()]  # only the first can answer
second, = (p for p in executor._processes.values() if p is not first)
os.kill(first.pid, signal.SIGTERM)
print(bool(wait([first.sentinel], 10)), flush=True)
os.kill(second.pid, signal.SIGTERM)  # still starting, as the executor's or close()'s SIGTERM may find it
os.write(opener, b"!")
stopped = bool(wait([second.sentinel], 10))
print(stopped, flush=True)
if not stopped:
    second.kill()  # else the executor waits for it, forever
pool.close(cancel=True)  # returns once the executor's thread has reaped both: their exit codes are settled
print(first.exitcode, second.exitcode, manager.is_alive(), flush=True)
"""


@LINUX_ONLY
@pytest.mark.parametrize("spawn", [False, True])
def test_workers_die_with_their_parent(tmp_path, spawn):
    """A killed run must not leave decoders behind, blocked forever on pipes they hold themselves: forked
    workers, and spawned ones (after TensorFlow loaded), started from a thread that has ended since."""
    out = tmp_path / "pids"
    with open(out, "w") as f:  # a file, not a pipe: surviving workers would hold a pipe open
        r = subprocess.run([sys.executable, "-c", ORPHAN_CODE.format(spawn=spawn)], stdout=f,
                           stderr=subprocess.DEVNULL, env=ENV, timeout=60)
    assert r.returncode == -9
    pids = [int(p) for p in out.read_text().split()]
    assert len(pids) == 2 or (spawn and pids)  # (a spawned pool starts its workers as work comes)

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    while any(map(alive, pids)) and time.time() < deadline:
        time.sleep(0.1)
    survivors = [p for p in pids if alive(p)]
    for p in survivors:  # leave nothing behind even when failing
        os.kill(p, 9)
    assert not survivors, "workers outlived the killed main process"


@LINUX_ONLY
def test_a_forked_worker_stops_quietly_on_sigterm():
    """Past its initializer or still starting: SIGTERM stops it, with nothing on stderr, nothing left waiting.

    A worker that ran the CLI's handler instead would print a KeyboardInterrupt and, if the killed
    one held the task queue's lock, wait on it forever, and the executor's thread with it.
    The second worker is held at its start by a pipe, not by luck; exit codes are read after
    close(cancel=True), which returns once the executor's thread (it reaps the workers too) has ended.
    """
    r = subprocess.run([sys.executable, "-c", SIGTERM_CODE], capture_output=True, text=True, env=ENV, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.split() == ["True", "True", "-15", "-15", "False"]


def test_real_run_has_clean_streams(tmp_path, rng):
    for i in range(4):
        save(str(tmp_path / "in" / f"{i}.png"), photo(rng, 8, 8))
    r = run("encode", tmp_path / "in", "-o", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # exactly one JSON object, nothing else
    assert summary["num_examples"] == 4 and summary["ok"] is True
    # No TensorFlow start-up lines reach the user.
    for marker in ("oneDNN", "cuda", "I0000", "W0000", "absl", "tensorflow"):
        assert marker not in r.stderr, r.stderr
    r = run("decode", tmp_path / "out", "-o", tmp_path / "back", "-q")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert sorted(os.listdir(tmp_path / "back")) == [f"{i}.png" for i in range(4)]
    # A write error stops the pool: one line, nothing from its ending. An immutable file refuses
    # even root; where chattr is not to be had, a refused key (a folder in a file's place) stands in.
    back = tmp_path / "back"
    if subprocess.run(["chattr", "+i", str(back / "2.png")], capture_output=True).returncode == 0:
        try:
            r = run("decode", tmp_path / "out", "-o", back, "--overwrite", "-q")
        finally:
            subprocess.run(["chattr", "-i", str(back / "2.png")], check=True)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "cannot write" in r.stderr, r.stderr
    os.remove(back / "2.png")
    os.mkdir(back / "2.png")
    r = run("decode", tmp_path / "out", "-o", back, "--overwrite", "-q")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "refused" in r.stderr, r.stderr
    r = run("encode", tmp_path / "in", "-o", tmp_path / "out2", "--alpha", "2")
    assert r.returncode == 2 and "alpha" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_answer_stdout_cannot_take_is_one_line_not_a_traceback(tmp_path):
    """A full disk or a closed stdout loses the command's answer: say so, exit 1."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        save(src / f"{i}.png", photo(np.random.default_rng(i), 8, 8))
    assert run("encode", str(src), "-o", str(tmp_path / "ds"), "-q").returncode == 0
    for args in (["info", str(tmp_path / "ds")], ["info", str(tmp_path / "ds"), "--json"]):
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "logitify_cli", *args], stdout=full, stderr=subprocess.PIPE,
                               text=True, env=ENV, timeout=120)
        assert r.returncode == 1 and "cannot write to standard output" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        r = subprocess.run([sys.executable, "-m", "logitify_cli", *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, env=ENV, timeout=120,
                           preexec_fn=lambda: os.close(1))
        assert r.returncode == 1 and "standard output is closed" in r.stderr, r.stderr
    # A reader gone before the answer (| true): the end of a pipe, as SIGPIPE would make it; encode loads
    # TensorFlow, whose fast exit flushes the streams again.
    for args in (["info", str(tmp_path / "ds"), "--json"],
                 ["encode", str(src), "-o", str(tmp_path / "again"), "--json"]):
        read, write = os.pipe()
        os.close(read)
        try:
            r = subprocess.run([sys.executable, "-m", "logitify_cli", *args], stdout=write, stderr=subprocess.PIPE,
                               text=True, env=ENV, timeout=120)
        finally:
            os.close(write)
        assert r.returncode == 141 and "Traceback" not in r.stderr, r.stderr


def test_a_command_run_in_process_puts_back_what_it_set(tmp_path):
    """SIGTERM's handler and the TensorFlow import mode belong to the host program again after a command."""
    (tmp_path / "in").mkdir()
    save(tmp_path / "in" / "a.png", photo(np.random.default_rng(0), 8, 8))
    code = (f"import signal, sys\nfrom logitify_cli import _tf\nfrom logitify_cli.cli import main\n"
            "mine = lambda s, f: None\nsignal.signal(signal.SIGTERM, mine)\n"
            f"try:\n    main(['info', {str(tmp_path / 'missing')!r}])\nexcept SystemExit as e:\n    assert e.code == 1\n"
            "assert signal.getsignal(signal.SIGTERM) is mine and not _tf.own_process\n"
            # The host's TensorFlow, imported by a command, has its API whole (the console script's defers some).
            f"try:\n    main(['encode', {str(tmp_path / 'in')!r}, '-o', {str(tmp_path / 'out')!r}, '-q'])\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "assert 'tensorflow' in sys.modules\n"
            "assert not [n for n, m in sys.modules.items() if type(m).__name__ == '_Deferred']\nprint('ok')\n")
    assert run_code(code, timeout=120).strip().endswith("ok")
    if os.path.exists("/dev/full"):  # a stdout that failed is reported, and the host's fd 1 is left as it was
        code = (f"import os, sys\nfrom logitify_cli.cli import main\nfull = os.open('/dev/full', os.O_WRONLY)\n"
                "os.dup2(full, 1)\n"
                f"try:\n    main(['info', {str(tmp_path / 'missing')!r}, '--json'])\nexcept SystemExit as e:\n"
                "    assert e.code == 1, e.code\n"
                "assert os.readlink('/proc/self/fd/1') == '/dev/full'\nprint('kept', file=sys.stderr)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
        assert "kept" in r.stderr and "cannot write to standard output" in r.stderr, r.stderr


def test_the_transforms_bits_do_not_depend_on_how_tensorflow_was_imported():
    """The command line imports TensorFlow with oneDNN and Grappler's arithmetic rewrites off, a library
    caller with their own settings (here both on): the same logits, log-dets and inverse, bit for bit."""
    code = ("import hashlib, sys\nimport numpy as np\nfrom logitify_cli import _tf\n"
            "_tf.own_process = _tf.defer_api = sys.argv[1] == 'cli'\ntf = _tf.tf()\n"
            "from logitify_cli.transform import LogitTransform, TransformParams, image_seeds\n"
            "images = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)\n"
            "seeds, h = image_seeds(0, [str(i) for i in range(32)]), hashlib.sha256()\n"
            "for noise in ('uniform', 'gaussian', 'none'):\n"
            "    for alpha, c, bits in ((1e-6, 0.01, 8), (0.05, 1.0, 8), (0.5, 3.0, 5), (0.999, 1.0, 1)):\n"
            "        t = LogitTransform(TransformParams(alpha, c, noise, bits), (8, 8, 3))\n"
            "        y, logdet = t.forward(images, seeds)\n"
            "        h.update(y.tobytes() + logdet.tobytes() + np.asarray(t.inverse(y)).tobytes())\n"
            "print(h.hexdigest())\n")
    digests = []
    for mode, env in (("cli", ENV), ("library", {**ENV, "TF_ENABLE_ONEDNN_OPTS": "1"})):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        digests.append(r.stdout.split()[-1])
    assert digests[0] == digests[1]


API_CODE = """
import hashlib, os, sys, threading, types
from logitify_cli import _tf
_tf.own_process = _tf.defer_api = sys.argv[1] == 'cli'
tf = _tf.tf()
deferred = sorted(n for n, m in sys.modules.items() if type(m).__name__ == '_Deferred')
# Many threads ask for the same deferred packages at once: each must see them whole.
seen, errors = [], []
def look():
    try:
        from tensorflow.core.example.example_pb2 import Example  # what records.parse_example reads with
        seen.append((tf.nn.softplus is tf.math.softplus, tf.compat.v1.placeholder.__name__,
                     tf.distribute.MirroredStrategy.__name__, tf.train.Example is Example,
                     tf.distribute.experimental.MultiWorkerMirroredStrategy.__name__,
                     tf.lite.experimental.Analyzer.__name__))
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=look) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors and len(set(seen)) == 1, (errors, set(seen))
def walk():
    # Every API package reachable from tf (tf.distribute.experimental, tf.compat.v1.nn, ...), once, by path.
    found, todo, out = set(), [('tf', tf)], []
    while todo:
        path, m = todo.pop()
        if id(m) in found:
            continue
        found.add(id(m))
        names = sorted(dir(m))  # dir() loads a deferred package
        out.append((path, m, [n for n in names if not n.startswith('_')]))
        for n in names:  # tf.__internal__ too
            v = getattr(m, n, None)
            # tf.experimental is tensorflow.experimental once Keras has imported it so: by its file, not name
            if isinstance(v, types.ModuleType) and os.path.join('_api', 'v2', '') in str(vars(v).get('__file__')):
                todo.append((path + '.' + n, v))
    return sorted(out, key=lambda x: x[0])
walk()  # loads them all before any is listed, as a plain import does
listed = walk()
left = [n for n, m in sys.modules.items() if type(m).__name__ == '_Deferred']
assert not left, left
for name in deferred:  # a loaded package is bound in its parent, as an import binds it
    parent, _, attr = name.rpartition('.')
    assert getattr(sys.modules[parent], attr) is sys.modules[name], name
h = hashlib.sha256()
for path, m, names in listed:
    h.update(path.encode() + b'=' + ','.join(names).encode() + b';')
print(len(deferred), len(listed), h.hexdigest())
"""


def test_the_command_lines_import_defers_unused_api_packages_and_each_is_whole_when_used():
    """The console script puts off TensorFlow's API packages it does not use; looked up (from 8 threads at
    once), each holds the same names as after a plain import, down to the nested ones (tf.compat.v1.nn)."""
    out = {}
    for mode in ("cli", "library"):
        r = subprocess.run([sys.executable, "-c", API_CODE, mode], capture_output=True, text=True, env=ENV,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        out[mode] = r.stdout.split()
    deferred, packages, digest = out["cli"]
    assert int(deferred) >= 20 and out["library"][0] == "0"
    assert (packages, digest) == tuple(out["library"][1:])


SPAWN_MASK_CODE = """
import functools, signal
import tensorflow  # once TensorFlow is loaded, workers are spawned, not forked
from logitify_cli.pool import OrderedPool
with OrderedPool(2) as pool:
    assert pool._spawning
    masks = [r for _, r in pool.imap(functools.partial(signal.pthread_sigmask, signal.SIG_BLOCK),
                                     [(None, []) for _ in range(4)])]
    handlers = [r for _, r in pool.imap(signal.getsignal, [(None, signal.SIGINT) for _ in range(4)])]
assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set(), 'the caller mask is back'
print(all(m == set() for m in masks), all(h == signal.SIG_IGN for h in handlers))
"""


@LINUX_ONLY
def test_spawned_workers_start_with_stops_held_until_their_init():
    """Spawned after TensorFlow, a worker's start is shielded from Ctrl-C; its init lets the signals through."""
    out = run_code(SPAWN_MASK_CODE, timeout=180)
    assert out.strip().splitlines()[-1] == "True True", out


LATE_STOP = """
import os, signal, sys, threading, time
from logitify_cli.cli import entry
STOP = getattr(signal, sys.argv.pop(1))

def late():  # a thread still running when the command is done: the teardown waits for it
    while threading.main_thread().is_alive():
        time.sleep(0.002)
    os.kill(os.getpid(), STOP)  # the stop lands as the interpreter tears down
    time.sleep(2)

threading.Thread(target=late).start()
entry(sys.argv[1:])
"""


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("args, status", [(["--version"], 0), (["decode", "/no/such/dataset", "-o", "x"], 1)])
def test_a_stop_after_the_command_is_done_keeps_its_status_and_says_nothing(stop, args, status):
    """Ctrl-C or SIGTERM while the process exits: the command's own status, no 'Exception ignored' lines."""
    r = subprocess.run([sys.executable, "-c", LATE_STOP, stop, *args], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert r.returncode == status, (r.returncode, r.stderr)
    assert "Exception" not in r.stderr and "Traceback" not in r.stderr, r.stderr


EARLY_STOP = """
import os, signal, sys
import click
from logitify_cli import cli

real = click.Group.make_context

def stopped_while_parsing(self, *args, **kwargs):  # Ctrl-C (or SIGTERM) lands while click reads the arguments
    os.kill(os.getpid(), getattr(signal, os.environ.get("STOP", "SIGINT")))
    return real(self, *args, **kwargs)

click.Group.make_context = stopped_while_parsing
cli.entry(sys.argv[1:])
"""


def test_a_ctrl_c_while_the_arguments_are_read_is_an_interruption_not_an_abort():
    """click turns a Ctrl-C during its own parsing into 'Aborted!' and exit 1; the CLI says it was stopped."""
    r = subprocess.run([sys.executable, "-c", EARLY_STOP, "info", "/no/such/dataset"], capture_output=True,
                       text=True, env=ENV, timeout=60)
    assert r.returncode == 130 and r.stderr.strip() == "logitify: interrupted", (r.returncode, r.stderr)
    assert r.stdout == ""
    # With --json (or its variable) the answer is still one object; SIGTERM is a stop too, with its status.
    for extra, env, stop in ((["--json"], {}, "SIGTERM"), ([], {"LOGITIFY_INFO_JSON": "1"}, "SIGINT")):
        r = subprocess.run([sys.executable, "-c", EARLY_STOP, "info", "/no/such/dataset", *extra], capture_output=True,
                           text=True, env={**ENV, **env, "STOP": stop}, timeout=60)
        assert r.returncode == 128 + getattr(signal, stop), (r.returncode, r.stderr)
        assert json.loads(r.stdout) == {"ok": False, "error": "interrupted", "signal": stop}, r.stdout


STOP_WHILE_LOADING = """
import importlib.abc, os, signal, sys
STOP = getattr(signal, os.environ["STOP"])

class StopAtClick(importlib.abc.MetaPathFinder):  # the stop lands while the command line's modules load
    def find_spec(self, name, path, target=None):
        if name == "click":
            os.kill(os.getpid(), STOP)
        return None

sys.meta_path.insert(0, StopAtClick())
sys.argv = ["logitify", *sys.argv[1:]]
from logitify_cli.console import entry
entry()
"""


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_stop_while_the_console_script_loads_is_quiet(stop):
    """Ctrl-C or SIGTERM before click is even imported: one line and the stop's status, not a traceback."""
    for extra, env in (([], {}), (["--json"], {}), ([], {"LOGITIFY_INFO_JSON": "yes"})):
        r = subprocess.run([sys.executable, "-c", STOP_WHILE_LOADING, "info", "/no/such/dataset", *extra],
                           capture_output=True, text=True, env={**ENV, **env, "STOP": stop}, timeout=60)
        assert r.returncode == 128 + getattr(signal, stop), (r.returncode, r.stderr)
        assert r.stderr == "logitify: interrupted\n", r.stderr
        if extra or env:
            assert json.loads(r.stdout) == {"ok": False, "error": "interrupted", "signal": stop}, r.stdout
        else:
            assert r.stdout == ""


def test_a_reader_that_leaves_during_a_long_answer_is_exit_141_not_a_cut_answer(tmp_path, rng):
    """`logitify encode ... --json | head -c 100`: the reader leaves while the answer (127 kB here, with 2,000
    files skipped) is half written. Python's buffered stdout took the partial write as whole and the run
    exited 0 with the rest dropped; a reader that leaves is SIGPIPE's status, 141."""
    src = tmp_path / "src"
    save(str(src / "a.png"), photo(rng, 4, 4))
    for i in range(2000):
        (src / f"empty-{i}.png").write_bytes(b"")
    p = subprocess.Popen([sys.executable, "-m", "logitify_cli", "encode", str(src), "-o", str(tmp_path / "o"),
                          "--json", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert p.stdout.read(100).startswith(b'{"ok": true')  # the answer has begun: the rest is on its way
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141, (p.returncode, err)
    assert b"Traceback" not in err


def test_a_stop_the_caller_ignores_stays_ignored_and_alias_variables_are_their_commands():
    """A script's `logitify ... &` starts with SIGINT ignored: a Ctrl-C meant for the script does not stop
    the run, while it loads or after. And LOGITIFY_DECODE_JSON is what `invert` reads, stopped early or not."""
    from logitify_cli import cli, console

    assert console.COMMANDS == {alias: command.name for alias, command in cli.main.commands.items()}
    r = subprocess.run([sys.executable, "-c", STOP_WHILE_LOADING, "info", "/no/such/dataset"], capture_output=True,
                       text=True, env={**ENV, "STOP": "SIGINT"}, timeout=60,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert r.returncode == 1 and "interrupted" not in r.stderr and "/no/such/dataset" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-c", STOP_WHILE_LOADING, "invert", "/no/such/dataset", "-o", "x"],
                       capture_output=True, text=True, env={**ENV, "STOP": "SIGTERM", "LOGITIFY_DECODE_JSON": "1"},
                       timeout=60)
    assert r.returncode == 143 and json.loads(r.stdout)["signal"] == "SIGTERM", (r.returncode, r.stdout, r.stderr)


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["encode", "--help"]])
def test_help_and_version_to_a_stdout_that_cannot_take_them(args, tmp_path):
    """click writes these itself: a full disk is one line and exit 1, a reader already gone is 141."""
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "logitify_cli", *args], stdout=full, stderr=subprocess.PIPE,
                           text=True, env=ENV, timeout=60)
    assert r.returncode == 1 and r.stderr == "logitify: error: cannot write to standard output: No space left on device\n"
    p = subprocess.Popen([sys.executable, "-m", "logitify_cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV)
    p.stdout.close()  # the reader leaves before the first line is written
    _, err = p.communicate(timeout=60)
    assert p.returncode == 141 and err == b"", (p.returncode, err)
    r = subprocess.run([sys.executable, "-m", "logitify_cli", *args], stderr=subprocess.PIPE, text=True, env=ENV,
                       timeout=60, preexec_fn=lambda: os.close(1))  # `>&-`: no stdout at all
    assert r.returncode == 1 and r.stderr == "logitify: error: cannot write to standard output: standard output is closed\n"


def test_a_file_size_limit_names_the_file_and_leaves_nothing_in_the_way(tmp_path, rng):
    """Under `ulimit -f`, a TFRecord encode said TensorFlow's 'OutOfRangeError: /proc/self/fd/17' and left a
    journal that refused the next run, and an npz decode said a bare OSError: each names its file now."""
    import resource

    src = tmp_path / "src"
    for i in range(12):
        save(str(src / f"{i}.png"), rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))

    def run(*args, limit=True):
        return subprocess.run([sys.executable, "-m", "logitify_cli", *map(str, args)], capture_output=True, text=True,
                              env=ENV, timeout=120, preexec_fn=limited if limit else None)

    out = tmp_path / "o"
    r = run("encode", src, "-o", out, "-f", "tfrecord")
    assert r.returncode == 1 and r.stderr.endswith("cannot write logitify-train.tfrecord-00000-of-00001: File too large\n")
    assert not out.exists()  # nothing kept: no journal, nor the folder the run made
    assert run("encode", src, "-o", out, "-f", "tfrecord", limit=False).returncode == 0  # no journal in the way
    r = run("decode", out, "-o", tmp_path / "d", "-f", "npz")
    assert r.returncode == 1 and r.stderr == "logitify: error: cannot write images-00000-of-00001.npz: File too large\n"
    assert not (tmp_path / "d").exists()
