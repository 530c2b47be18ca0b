"""The Beam runner gives the very shards of the local runner (DirectRunner, 2 processes)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import photo, save

pytest.importorskip("apache_beam")

BEAM = ["--runner", "beam", "--", "--runner=DirectRunner", "--direct_running_mode=multi_processing",
        "--direct_num_workers=2"]
# The same runner in this process: for runs whose point is not the worker processes (each such run
# starts two interpreters that import TensorFlow, seconds of the suite's time).
BEAM_HERE = ["--runner", "beam", "--", "--runner=DirectRunner", "--direct_running_mode=in_memory"]
# One worker process: for runs whose point is what crosses from a worker process to the launcher.
BEAM_ONE = BEAM[:-1] + ["--direct_num_workers=1"]


def manifest(out):
    m = json.loads((out / "manifest.json").read_text())
    for split in [m, *m.get("splits", {}).values()]:
        split.pop("stats", None)
    return m


def hashes(out):
    m = manifest(out)
    return {s["file"]: hashlib.sha256((out / s["file"]).read_bytes()).hexdigest()
            for split in m.get("splits", {"": m}).values() for s in split["shards"]}


def test_beam_encode_equals_local_and_decodes_exactly(cli, image_folder, tmp_path, rng, monkeypatch, capfd):
    src, truth = image_folder
    system_tmp = tmp_path / "system-tmp"  # Beam leaves folders in the temp dir unless we clean up after it
    system_tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(system_tmp))
    (src / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (src / "cats" / "empty.jpg").write_bytes(b"")
    for fmt, runner in (("npz", BEAM), ("tfrecord", BEAM_HERE)):
        local, beam = tmp_path / f"local-{fmt}", tmp_path / f"beam-{fmt}"
        assert cli("encode", src, "-o", local, "-f", fmt, "--shard-size", "4").exit_code == 0
        capfd.readouterr()  # what this process said so far (it imports TensorFlow as a library caller does)
        r = cli("encode", src, "-o", beam, "-f", fmt, "--shard-size", "4", "--json", *runner)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout.strip().splitlines()[-1])["num_examples"] == len(truth)
        if runner is BEAM:  # worker processes, which write to this process's own stderr: none of TensorFlow's lines
            said = capfd.readouterr().err
            assert not [line for line in said.splitlines() if "tensorflow" in line.lower() or "I0000" in line
                        or "absl" in line or "XLA" in line], said
        assert manifest(beam) == manifest(local)
        assert hashes(beam) == hashes(local)
        assert {s["source"] for s in manifest(beam)["skipped"]} == {"dogs/broken.png", "cats/empty.jpg"}
        assert not list(beam.glob(".*receipt*"))
        if fmt == "tfrecord":  # a second run adds a split to the finished dataset, the same in both runners
            for out, extra in ((local, []), (beam, BEAM_HERE)):
                r = cli("encode", src / "dogs", "-o", out, "-f", fmt, "--split", "test", "--shard-size", "4", *extra)
                assert r.exit_code == 1 and "classes are" in r.stderr  # no classes in a flat folder: refused
            alpha = cli("encode", src, "-o", beam, "-f", fmt, "--split", "test", "--alpha", "0.1", *BEAM_HERE)
            assert alpha.exit_code == 1 and "alpha is 0.05 there, 0.1 in this run" in alpha.stderr
            for out, extra in ((local, []), (beam, BEAM_HERE)):
                r = cli("encode", src, "-o", out, "-f", fmt, "--split", "test", "--shard-size", "4", *extra)
                assert r.exit_code == 0, r.output
            assert sorted(manifest(beam)["splits"]) == ["test", "train"]
            assert manifest(beam) == manifest(local) and hashes(beam) == hashes(local)
    r = cli("decode", tmp_path / "beam-npz", "-o", tmp_path / "back", *BEAM)
    assert r.exit_code == 0, r.output
    for key, arr in truth.items():
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "back" / key)), arr)
    assert not list(system_tmp.iterdir())


def test_beam_decode_names_files_as_the_local_runner(cli, tmp_path, rng):
    """Keys that compete for one PNG (a.bmp, a.jpg, a.png) in shards of one: each Beam worker names
    its shard's files knowing the keys of the others, so both runners make the same files, and a
    second run with --overwrite replaces each with its own image, never one image with another."""
    src = tmp_path / "src"
    for name in ("a.bmp", "a.jpg", "a.png", "a.png.png", "b.bmp"):
        save(str(src / name), photo(rng, 6, 6), **({"quality": 95} if name.endswith(".jpg") else {}))
    enc = tmp_path / "enc"
    assert cli("encode", src, "-o", enc, "--shard-size", "1").exit_code == 0

    def tree(folder):
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    local, beam = tmp_path / "local", tmp_path / "beam"
    assert cli("decode", enc, "-o", local).exit_code == 0
    assert sorted(tree(local)) == ["a.jpg.png", "a.png", "a.png.png", "a.png.png.png", "b.png"]
    for extra in (BEAM, ["--overwrite", *BEAM_HERE]):
        r = cli("decode", enc, "-o", beam, *extra)
        assert r.exit_code == 0, r.output
        assert tree(beam) == tree(local)
    for key in ("a.bmp", "a.png"):  # and each file holds its own key's image
        back = np.asarray(Image.open(local / ("a.png" if key == "a.bmp" else "a.png.png")))
        np.testing.assert_array_equal(back, np.asarray(Image.open(src / key)))


def test_files_and_folders_that_want_one_name_and_names_at_the_limit_decode_alike(cli, tmp_path, rng):
    """b.tif after the folder b.png/, k/b.jpg before the folder k/b.png/, two names of 255 bytes, a name that
    is not UTF-8: whatever encode accepts decodes, to the same tree with either runner, each file its own
    key's image."""
    src = tmp_path / "src"
    names = ["b.tif", "b.png/c.png", "k/b.jpg", "k/b.png/c.png", "k/b.png/d.bmp",
             "x" * 251 + ".bmp", "x" * 251 + ".png", os.fsdecode(b"\xffz.png")]  # a name that is not UTF-8
    for name in names:
        save(str(src / name), photo(rng, 6, 6), **({"quality": 95} if name.endswith(".jpg") else {}))
    enc = tmp_path / "enc"
    assert cli("encode", src, "-o", enc, "--shard-size", "2").exit_code == 0

    def tree(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    local, beam = tmp_path / "local", tmp_path / "beam"
    r = cli("decode", enc, "-o", local, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["num_images"] == len(names), r.output
    made = tree(local)
    assert len(made) == len(names) and {"b.tif.png", "b.png/c.png", "k/b.png", "x" * 251 + ".png"} <= set(made)
    r = cli("decode", enc, "-o", beam, *BEAM_HERE)
    assert r.exit_code == 0, r.output
    assert tree(beam) == made
    back = {}
    for rel in made:
        back[rel] = np.asarray(Image.open(local / rel).convert("RGB"))
    assert sorted(a.tobytes() for a in back.values()) == sorted(
        np.asarray(Image.open(src / name).convert("RGB")).tobytes() for name in names)
    np.testing.assert_array_equal(back["k/b.png"], np.asarray(Image.open(src / "k/b.jpg")))


def test_beam_names_colour_images_a_grey_guess_missed(cli, tmp_path, rng):
    src = tmp_path / "grey"
    for i in range(130):  # the spread sample misses the second input
        save(str(src / f"g{i:03d}.png"), photo(rng, 4, 4)[:, :, 0])
    save(str(src / "g000a.png"), photo(rng, 4, 4))
    got = [json.loads(cli("encode", src, "-o", tmp_path / f"o{i}", "--shard-size", "50", "--json", *extra).stdout)
           for i, extra in enumerate(([], BEAM_HERE))]
    assert got[0]["warnings"] == got[1]["warnings"] and "1 colour image(s) were made grey (g000a.png)" in \
        got[1]["warnings"][0]


def test_a_beam_run_puts_back_the_callers_filesystems_options(cli, tmp_path, rng):
    """Beam's FileSystems options are process-wide: a run sets its own, and the caller's come back after."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    save(str(tmp_path / "src" / "a.png"), photo(rng, 4, 4))
    mine = PipelineOptions(["--s3_endpoint_url=http://127.0.0.1:9"])
    FileSystems.set_options(mine)
    try:
        assert cli("encode", tmp_path / "src", "-o", tmp_path / "o", *BEAM_HERE).exit_code == 0
        assert FileSystems._pipeline_options is mine
        assert cli("decode", tmp_path / "o", "-o", tmp_path / "back", *BEAM_HERE).exit_code == 0
        assert FileSystems._pipeline_options is mine
    finally:
        FileSystems._pipeline_options = None


def test_beam_tfrecord_source(cli, tmp_path, rng):
    import io

    import tensorflow as tf

    path = tmp_path / "in.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
        for i in range(5):
            buf = io.BytesIO()
            Image.fromarray(photo(rng, 8, 8)).save(buf, "PNG")
            feats = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buf.getvalue()])),
                     "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    hold = ["--holdout", "0.4:test"]  # both splits from one plan, in one pipeline
    assert cli("encode", path, "-o", tmp_path / "l", "--shard-size", "2", *hold).exit_code == 0
    r = cli("encode", path, "-o", tmp_path / "b", "--shard-size", "2", *hold, *BEAM_HERE)
    assert r.exit_code == 0, r.output
    m = manifest(tmp_path / "b")
    counts = {n: s["num_examples"] for n, s in m["splits"].items()}
    assert sorted(counts) == ["test", "train"] and min(counts.values()) > 0 and sum(counts.values()) == 5
    assert m == manifest(tmp_path / "l") and hashes(tmp_path / "b") == hashes(tmp_path / "l")


def test_beam_options_only_with_beam(cli, image_folder, tmp_path):
    src, _ = image_folder
    r = cli("encode", src, "-o", tmp_path / "o", "--", "--runner=DirectRunner")
    assert r.exit_code == 2 and "--runner beam" in r.stderr
    r = cli("encode", src, "-o", tmp_path / "o", "--workers", "2", "--runner", "beam")
    assert r.exit_code == 2 and "direct_num_workers" in r.stderr


def test_bucket_listing_ends_like_local_discovery(tmp_path, rng):
    """Discovery through Beam's FileSystems (run here on local folders) keys, sorts,
    numbers classes and refuses a key two folders share, as discovery of a folder does."""
    from logitify_cli.errors import LogitifyError
    from logitify_cli.sources import BucketPrefix, discover, inventory

    for rel in ("a/dogs/1.png", "a/cats/2.png", "a/cats/1.png", "b/cats/1.png"):
        save(str(tmp_path / rel), photo(rng, 4, 4))
    got, want = inventory(*BucketPrefix(str(tmp_path / "a")).items()), discover([str(tmp_path / "a")])
    assert [(it.key, it.label, it.path) for it in got.items] == [(it.key, it.label, it.path) for it in want.items]
    assert got.classes == want.classes == ["cats", "dogs"]
    both = [x for folder in ("a", "b") for x in BucketPrefix(str(tmp_path / folder)).items()[0]]
    with pytest.raises(LogitifyError, match="share the key 'cats/1.png'"):
        inventory(both, [])


def _ended(p, timeout, failure):
    """p's (stdout, stderr); a run that has not ended in `timeout` seconds is killed, workers too, and fails."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _descendants(p.pid) | {p.pid}:
            os.kill(pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(failure)


def _descendants(pid):
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = {int(k) for k in f.read().split()} - found
                found |= kids
                todo.extend(kids)
        except OSError:
            continue
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads Linux's /proc")
def test_sigterm_to_the_launcher_alone_ends_a_run_with_worker_processes(tmp_path, rng):
    """A scheduler stops the job's process, not its Beam workers: the run ends them and stops, where it
    waited forever for workers that never heard of the stop (and they outlived it)."""
    for i in range(300):
        save(str(tmp_path / "src" / f"{i:03d}.png"), photo(rng, 8, 8))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    p = subprocess.Popen([sys.executable, "-m", "logitify_cli", "encode", str(tmp_path / "src"), "-o",
                          str(tmp_path / "o"), "--shard-size", "10", "--json", *BEAM], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=env)
    deadline, workers = time.time() + 120, set()
    while time.time() < deadline and p.poll() is None and not workers:
        workers = {w for w in _descendants(p.pid) if b"sdk_worker" in _cmdline(w)}
        time.sleep(0.05)
    if not workers:
        p.kill()
        p.communicate()
        pytest.skip("the run ended before its worker processes were seen")
    p.send_signal(signal.SIGTERM)
    out, _ = _ended(p, 90, "the run did not end after SIGTERM")
    assert p.returncode == 143 and json.loads(out)["signal"] == "SIGTERM", (p.returncode, out)
    time.sleep(0.5)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and b"sdk_worker" in _cmdline(w)]


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads Linux's /proc")
def test_a_stop_ends_only_the_beam_workers_the_run_started_and_only_when_it_stops_the_run():
    from logitify_cli.beam_runner import _workers_stopped_first

    def start(*tag):
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *tag])

    earlier = start("apache_beam.runners.worker")  # there before the run: not the run's
    worker = other = started = earlier
    try:
        before = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with _workers_stopped_first():
            worker, other = start("apache_beam.runners.worker"), start()
            os.kill(os.getpid(), signal.SIGINT)  # ignored by the caller: the run goes on, nothing is ended
            time.sleep(0.3)
            assert worker.poll() is None and other.poll() is None
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt):
            with _workers_stopped_first():
                started = start("apache_beam.runners.worker")
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        assert started.wait(5) is not None  # this run's worker is ended; no other process is
        assert worker.poll() is None and other.poll() is None and earlier.poll() is None
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
        for p in (earlier, worker, other, started):
            p.kill()
            p.wait()


def test_a_beam_worker_holds_the_folder_to_the_launchers_only_on_the_launchers_host():
    """Device and inode numbers are a mount's: a worker on another machine (a folder shared over the network)
    takes the folder as it finds it, one on the launcher's machine writes into the folder the launcher locked."""
    import socket

    from logitify_cli.beam_runner import _decode_shard_fn

    make = _decode_shard_fn()
    here = make("ds", "out", "png", 1, "auto", False, [], "train", (socket.gethostname(), (1, 2)))
    there = make("ds", "out", "png", 1, "auto", False, [], "train", ("another-host", (1, 2)))
    unset = make("ds", "out", "png", 1, "auto", False, [], "train")
    assert here._identity() == (1, 2) and there._identity() is None and unset._identity() is None


@pytest.mark.parametrize("runner", ["here", "workers"])
def test_a_failed_shard_is_said_in_one_line_without_beams_step_name(cli, tmp_path, rng, capfd, runner):
    """--on-error fail in a worker: the command's error is the worker's own line, as the local runner says it,
    and a worker process prints no traceback of it."""
    src = tmp_path / "src"
    for i in range(6):
        save(str(src / f"{i}.png"), photo(rng, 8, 8))
    data = (src / "3.png").read_bytes()
    (src / "3.png").write_bytes(data[:len(data) // 2])
    local = cli("encode", src, "-o", tmp_path / "local", "--on-error", "fail")
    r = cli("encode", src, "-o", tmp_path / "beam", "--on-error", "fail", *(BEAM_HERE if runner == "here" else BEAM_ONE))
    assert local.exit_code == r.exit_code == 1
    said = local.stderr.strip().splitlines()[-1].split("error: ", 1)[1]
    assert said.startswith("cannot read 3.png:") and said.endswith("(--on-error fail)")
    last = r.stderr.strip().splitlines()[-1]
    assert last.endswith(said) and "while running" not in last, r.stderr
    printed = capfd.readouterr().err  # what the worker processes wrote to the terminal
    assert "Traceback" not in printed and said not in printed, printed


class _Stop(KeyboardInterrupt):
    signum = 15  # as the CLI's SIGTERM arrives


def test_a_stop_inside_a_pipeline_in_this_process_is_a_stop_not_a_failure():
    """Ctrl-C (or the CLI's SIGTERM) landing while a runner in this process runs a DoFn comes back wrapped in
    Beam's RuntimeError: it is raised as the stop it is (exit 130/143), not 'the Beam pipeline failed'."""
    from logitify_cli.beam_runner import _beam, _options, _run

    beam, _ = _beam()

    class Stopping(beam.DoFn):
        def process(self, x):
            raise _Stop()

    with pytest.raises(_Stop):
        _run(lambda p: p | beam.Create([1]) | beam.ParDo(Stopping()),
             _options(["--runner=DirectRunner", "--direct_running_mode=in_memory"]))


@pytest.mark.parametrize("runner", ["here", "workers"])
def test_a_workers_error_reaches_the_caller_with_its_class_and_fields(tmp_path, rng, runner):
    """A damaged shard fails a Beam decode with the ShardError the local runner raises, its file and problem
    set, whether the worker ran in this process or in another (whose failure Beam hands over as text)."""
    from logitify_cli.beam_runner import decode_beam
    from logitify_cli.decode_run import run_decode
    from logitify_cli.encode_run import run_encode
    from logitify_cli.errors import ShardError
    from logitify_cli.planner import EncodeOptions
    from logitify_cli.report import Reporter

    src = tmp_path / "src"
    for i in range(6):
        save(str(src / f"{i}.png"), photo(rng, 8, 8))
    ds = tmp_path / "ds"
    run_encode(EncodeOptions(sources=[str(src)], out=str(ds), shard_size=3), Reporter(quiet=True))
    shard = ds / "train-00001-of-00002.npz"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # inside the logits: the zip's CRC no longer holds
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError) as local:
        run_decode(str(ds), str(tmp_path / "local"))
    args = BEAM_HERE[3:] if runner == "here" else BEAM_ONE[3:]
    with pytest.raises(ShardError) as beam:
        decode_beam(str(ds), str(tmp_path / "beam"), "png", beam_args=args, report=Reporter(quiet=True))
    # The local runner checks the shard's sha256 first; Beam's first step reads its keys, and meets the zip's CRC
    assert local.value.file == beam.value.file == "train-00001-of-00002.npz"
    assert beam.value.problem == "unreadable (Bad CRC-32 for file 'logits.npy')"
    assert str(beam.value) == f"shard {beam.value.file}: {beam.value.problem}" and beam.value.exit_code == 1
    assert not getattr(beam.value, "__notes__", None)
    assert not (tmp_path / "beam").exists()  # failed before writing an image: the folder it made is gone


def test_a_carried_error_line_rebuilds_only_logitifys_own_errors():
    """The line a worker adds to its failure is read back into the error class it names, and nothing else:
    a line with another marker (an input's name can hold any text), another class, bad JSON or fields of the
    wrong kind gives None; the exit code and result are never taken from it."""
    from logitify_cli.beam_runner import _carried_error, _carry_line, _carry_marker
    from logitify_cli.errors import LogitifyError, WriteError

    marker = _carry_marker()
    line = _carry_line(WriteError("shard x", 28, "no space left on device"), marker)
    back = _carried_error(f"Traceback ...\nWriteError: cannot write shard x\n{line} [while running 'X']\n\nDuring ...",
                          marker)
    assert type(back) is WriteError and (back.what, back.errno, back.reason) == ("shard x", 28, "no space left on device")
    assert back.exit_code == 1 and str(back) == "cannot write shard x: no space left on device"
    assert back.result is None and back.notes == []
    partial = _carried_error(_carry_line(LogitifyError("p", result=object(), notes=["n"]), marker), marker)
    assert (partial.message, partial.result, partial.notes) == ("p", None, ["n"])
    forged = '{"class": "LogitifyError", "args": ["ok"], "fields": {"message": "ok", "exit_code": 0}}'
    assert _carried_error(marker + forged, marker).exit_code == 1
    for planted in ('{"class": "Popen", "args": ["x"], "fields": {"message": "x"}}',
                    '{"class": "Exception", "args": ["x"], "fields": {"message": "x"}}',
                    '{"class": "WriteError", "args": "x", "fields": {"message": "x"}}',
                    '{"class": "WriteError", "args": ["x"], "fields": {"notes": 3, "message": "x"}}',
                    '{"class": "WriteError", "args": ["x"], "fields": {"notes": [3], "message": "x"}}',
                    '{"class": "WriteError", "args": ["x"], "fields": []}', '{"class": ', "[1, 2]"):
        assert _carried_error(marker + planted, marker) is None, planted
    assert _carried_error("logitify-error-json: " + forged, marker) is None
    assert _carried_error(_carry_line(WriteError("a", 1, "b"), "logitify-error-00: "), marker) is None


def test_an_input_named_like_a_carried_error_cannot_choose_the_commands_error(cli, tmp_path, rng):
    """An unreadable input whose name holds a line like a worker's carried error (a file name may hold any
    text but / and NUL): the command still fails with its own error, in a worker process too."""
    src = tmp_path / "src"
    for i in range(3):
        save(str(src / f"{i}.png"), photo(rng, 8, 8))
    forged = '{"class": "LogitifyError", "args": ["ok"], "fields": {"message": "forged", "notes": ["forged"]}}'
    name = "x\nlogitify-error-json: " + forged + "\n.png"
    (src / name).write_bytes((src / "0.png").read_bytes()[:40])
    r = cli("encode", src, "-o", tmp_path / "o", "--on-error", "fail", *BEAM_ONE)
    lines = r.stderr.splitlines()
    assert r.exit_code == 1 and lines[-1].startswith("logitify: error: cannot read x\\nlogitify-error-json: "), r.stderr
    assert lines[-1].endswith(".png: not an image Pillow can read (--on-error fail)"), r.stderr
    assert "logitify: forged" not in lines and "logitify: error: forged" not in lines


def test_a_failed_beam_encode_leaves_nothing_when_it_wrote_nothing(cli, tmp_path, rng):
    """A Beam run that fails before any shard leaves neither its journal nor the folders it made, so the
    corrected command needs no flag; one that left shards keeps its journal, and --overwrite takes them back."""
    src = tmp_path / "src"
    for i in range(6):
        save(str(src / f"{i}.png"), photo(rng, 8, 8))
    (src / "3.png").write_bytes((src / "3.png").read_bytes()[:40])
    out = tmp_path / "new" / "o"
    r = cli("encode", src, "-o", out, "--on-error", "fail", *BEAM_HERE)
    assert r.exit_code == 1 and "cannot read 3.png" in r.stderr, r.output
    assert not (tmp_path / "new").exists()
    r = cli("encode", src, "-o", out, "--on-error", "fail", "--shard-size", "2", *BEAM_HERE)
    assert r.exit_code == 1
    left = sorted(os.listdir(out))
    assert ".logitify-journal.jsonl" in left and [n for n in left if n.endswith(".npz")], left
    r = cli("encode", src, "-o", out, "--shard-size", "2", *BEAM_HERE)  # the advice is one Beam can take
    assert r.exit_code == 1 and "pass --overwrite" in r.stderr and "--resume" not in r.stderr, r.stderr
    (out / "notes.txt").write_text("mine")
    r = cli("encode", src, "-o", out, "--shard-size", "2", "--overwrite", *BEAM_HERE)
    assert r.exit_code == 1 and "notes.txt, which logitify did not write; --overwrite touches only" in r.stderr
    assert "--resume" not in r.stderr, r.stderr
    (out / "notes.txt").unlink()
    assert cli("encode", src, "-o", out, "--shard-size", "2", "--overwrite", *BEAM_HERE).exit_code == 0


def test_a_workers_error_naming_a_file_that_is_not_utf8_comes_back(tmp_path, rng):
    """A key from a file name that is not UTF-8 (a lone surrogate in Python) in a worker process's error:
    Beam sends the failure as UTF-8 and could not, so the worker never reported and the run waited for good.
    The command fails with its own line, the name escaped."""
    src = tmp_path / "src"
    for i in range(3):
        save(str(src / f"{i}.png"), photo(rng, 8, 8))
    with open(os.path.join(os.fsencode(src), b"z\xff.png"), "wb") as f:
        f.write((src / "0.png").read_bytes()[:40])
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    p = subprocess.Popen([sys.executable, "-m", "logitify_cli", "encode", str(src), "-o", str(tmp_path / "o"),
                          "--on-error", "fail", *BEAM_ONE], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=env)
    _, err = _ended(p, 240, "the run did not end")
    assert p.returncode == 1 and err.splitlines()[-1].startswith("logitify: error: cannot read z\\udcff.png: "), err
    assert "Traceback" not in err, err


def test_an_error_in_a_workers_setup_comes_back_as_the_local_runners(cli, tmp_path, rng, capfd):
    """--device gpu without a GPU fails in each worker's setup (before any shard): a worker process's error
    there reaches the command with its class (its exit code) and line, as the local runner gives them, and
    no traceback of it is printed."""
    src = tmp_path / "src"
    for i in range(3):
        save(str(src / f"{i}.png"), photo(rng, 8, 8))
    assert cli("encode", src, "-o", tmp_path / "ds").exit_code == 0
    local = cli("decode", tmp_path / "ds", "-o", tmp_path / "local", "--device", "gpu")
    if local.exit_code == 0:
        pytest.skip("TensorFlow sees a GPU here")
    capfd.readouterr()
    r = cli("decode", tmp_path / "ds", "-o", tmp_path / "beam", "--device", "gpu", *BEAM_ONE)
    assert (r.exit_code, r.stderr.splitlines()[-1]) == (local.exit_code, local.stderr.splitlines()[-1]), r.stderr
    assert "Traceback" not in capfd.readouterr().err
    assert not (tmp_path / "beam").exists()


@pytest.mark.parametrize("own", [True, False])
def test_a_worker_process_that_aborts_is_one_line_for_the_command_line(monkeypatch, capsys, own):
    """Beam's thread that waits on a worker process raises when the process ends with a failure's exit code
    (seen now and then: 134, an abort as a failed run's worker shuts down), and Python printed that thread's
    traceback amid the command's own lines. The console script says it in one line; a program keeps its
    own threads' error hook, and the hook is the caller's again after the run."""
    import threading
    import types

    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.local_job_service import SubprocessSdkWorker

    from logitify_cli import _tf
    from logitify_cli.beam_runner import _quiet_beam

    monkeypatch.setattr(_tf, "own_process", own)
    monkeypatch.setattr(_tf, "verbose", False)
    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_type))  # the caller's hook
    before = threading.excepthook
    info = types.SimpleNamespace(provision_info=beam_provision_api_pb2.ProvisionInfo())

    def worker_ends(command):
        t = threading.Thread(target=SubprocessSdkWorker(command, "localhost:1", info).run, name="run_worker")
        t.start()
        t.join()

    with _quiet_beam() as quiet:
        worker_ends(b"exit 134")
        worker_ends(b"kill -KILL $$")
        other = threading.Thread(target=lambda: 1 / 0)  # any other thread's error goes where it went
        other.start()
        other.join()
        quiet.stopping.set()  # a stopped run ends its workers itself: nothing to say of them
        worker_ends(b"kill -TERM $$")
    assert threading.excepthook is before
    err = capsys.readouterr().err
    if own:
        assert err == ("logitify: a Beam worker process ended with exit code 134\n"
                       "logitify: a Beam worker process was ended by signal SIGKILL\n"), err
        assert seen == [ZeroDivisionError]
    else:
        assert err == "" and seen == [RuntimeError, RuntimeError, ZeroDivisionError, RuntimeError]


def test_a_workers_error_is_always_one_beam_can_send():
    """Beam sends a worker's traceback as UTF-8, and a worker whose error named a file that is not UTF-8 never
    reported it (the launcher waited for good). Such a name in an error's args or notes is escaped (in this
    process the error gets them back as raised); an error raised during another that names one loses that
    other; one whose text is not its args becomes its own line, escaped; the rest pass untouched."""
    import traceback

    from logitify_cli.beam_runner import _carry_marker, _error_carried
    from logitify_cli.errors import WriteError

    def sent(e):
        return "".join(traceback.format_exception(e)).encode("utf-8").decode("utf-8")

    class Odd(Exception):
        def __str__(self):  # text that is not its args
            return "no such label in z\udcff.png"

    marker = _carry_marker()
    with pytest.raises(ValueError) as other:
        with _error_carried(marker):
            raise ValueError("no such label in z\udcff.png")
    assert str(other.value) == "no such label in z\\udcff.png" and sent(other.value)
    with pytest.raises(RuntimeError) as other:
        with _error_carried(marker):
            raise Odd()
    assert str(other.value).endswith("Odd: no such label in z\\udcff.png") and sent(other.value)
    with pytest.raises(WriteError) as ours:
        with _error_carried(marker):
            try:
                raise ValueError("no such label in z\udcff.png")
            except ValueError:
                raise WriteError("image z\udcff.png", 28, "no space left on device")
    assert "During handling" not in sent(ours.value) and marker in sent(ours.value)
    from pathlib import PurePosixPath

    from logitify_cli.beam_runner import _uncarried
    from logitify_cli.errors import LogitifyError

    for raised in (LogitifyError(PurePosixPath("z\udcff.png")), LogitifyError("cannot read z\udcff.png")):
        raised.add_note("while reading z\udcff.png")
        args, notes = raised.args, list(raised.__notes__)
        with pytest.raises(LogitifyError) as ours:
            with _error_carried(marker):
                raise raised
        assert ours.value is raised and "z\\udcff.png" in sent(raised)
        assert _uncarried(raised, marker).args == args and raised.__notes__ == notes  # as raised, in this process
    class Named(Exception):
        def __str__(self):  # needs its arg as it was given
            return f"cannot use {self.args[0].name}"

    class Fixed(Exception):
        args = property(lambda self: ("z\udcff.png",))  # args that cannot be set

        def __str__(self):
            return self.args[0]

    for odd in (Named(PurePosixPath("z\udcff.png")), Fixed()):
        with pytest.raises(RuntimeError) as other:
            with _error_carried(marker):
                raise odd
        assert sent(other.value) and "z\\udcff.png" in str(other.value), str(other.value)
    class FixedOurs(LogitifyError):
        args = property(lambda self: ("cannot read z\udcff.png",))

        def __str__(self):
            return self.args[0]

    with pytest.raises(RuntimeError) as other:  # one of ours in that state: its carried line goes along
        with _error_carried(marker):
            raise FixedOurs("x")
    assert sent(other.value) and [n for n in other.value.__notes__ if n.startswith(marker)]
    named = OSError(28, "No space left on device", "z\udcff.png")  # its text holds the name's repr: sent as it is
    with pytest.raises(OSError) as kept:
        with _error_carried(marker):
            raise named
    assert kept.value is named and sent(named)
    plain = ValueError("bad \u00e9")
    with pytest.raises(ValueError) as kept:
        with _error_carried(marker):
            raise plain
    assert kept.value is plain and not getattr(plain, "__notes__", None)
