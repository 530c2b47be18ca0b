"""Beam against an S3-compatible server (moto, a real process on loopback).

The same shards as a local run from and to a bucket, with workers in other
processes that cannot see the launcher's disk for their work; a remote
decode gives every image back; verify and info read a bucket; TFRecord
inputs in a bucket are encoded, not dropped.
"""
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import photo, save

pytest.importorskip("apache_beam")


def beam(s3_server, processes=False):
    """Beam's DirectRunner against the server: in worker processes, or (quicker) in this one."""
    mode = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"] if processes else \
        ["--direct_running_mode=in_memory"]
    return ["--runner", "beam", "--", "--runner=DirectRunner", *mode, *s3_server.beam_args]


def local_hashes(out):
    m = json.loads((out / "manifest.json").read_text())
    return {s["file"]: hashlib.sha256((out / s["file"]).read_bytes()).hexdigest() for s in m["shards"]}


def bucket_hashes(s3_server, bucket, prefix):
    m = json.loads(s3_server.read(bucket, f"{prefix}/manifest.json"))
    return m, {s["file"]: hashlib.sha256(s3_server.read(bucket, f"{prefix}/{s['file']}")).hexdigest()
               for s in m["shards"]}


def test_bucket_to_bucket_equals_local_and_decodes_back(cli, image_folder, tmp_path, s3_server, s3_bucket, beam_s3,
                                                         monkeypatch):
    src, truth = image_folder
    (src / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    s3_server.upload_folder(src, s3_bucket, "photos")
    local = tmp_path / "local"
    assert cli("encode", src, "-o", local, "--shard-size", "4").exit_code == 0
    out = f"s3://{s3_bucket}/out"
    r = cli("encode", f"s3://{s3_bucket}/photos", "-o", out, "--shard-size", "4", "--json",
            *beam(s3_server, processes=True))
    assert r.exit_code == 0, r.output
    m, hashes = bucket_hashes(s3_server, s3_bucket, "out")
    assert hashes == local_hashes(local)
    assert m["num_examples"] == len(truth) and m["classes"] == ["cats", "dogs"]
    assert [s["source"] for s in m["skipped"]] == ["dogs/broken.png"]
    assert not [k for k in s3_server.list_keys(s3_bucket, "out/") if "receipt" in k]
    # Decode from the bucket into the bucket, then check every image came back (in this process:
    # the local Beam test decodes in worker processes, and each such run costs seconds of the suite).
    from apache_beam.io.aws.clients.s3 import boto3_client

    made, real_init = [], boto3_client.Client.__init__
    monkeypatch.setattr(boto3_client.Client, "__init__", lambda self, *a, **k: made.append(1) or real_init(self, *a, **k))
    r = cli("decode", out, "-o", f"s3://{s3_bucket}/restored", *beam(s3_server))
    assert r.exit_code == 0, r.output
    # A client per set of options (the launcher's, each worker's), not per call: Beam alone made 40 here.
    assert len(made) < len(truth), f"{len(made)} S3 clients for {len(truth)} images"
    for key, arr in truth.items():
        got = np.asarray(Image.open(io.BytesIO(s3_server.read(s3_bucket, f"restored/{key}"))))
        np.testing.assert_array_equal(got, arr)
    # verify and info read a bucket through the same file systems, in either format (the TFRecord
    # one is put there by the server's own client: the Beam runner's writing is tested above).
    assert cli("encode", src, "-o", tmp_path / "records", "-f", "tfrecord", "--shard-size", "4").exit_code == 0
    s3_server.upload_folder(tmp_path / "records", s3_bucket, "out-tfrecord")
    r = cli("verify", f"s3://{s3_bucket}/out-tfrecord", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["num_examples"] == len(truth), r.output
    r = cli("info", out, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["class_counts"] == {"cats": 7, "dogs": 6}, r.output
    sizes = [len(s3_server.read(s3_bucket, f"out/{s['file']}")) for s in m["shards"]]
    assert [s["bytes"] for s in json.loads(r.stdout)["shards"]] == sizes
    assert json.loads(r.stdout)["total_bytes"] == sum(sizes)


def test_tfrecord_inputs_in_a_bucket_are_encoded(cli, tmp_path, rng, s3_server, s3_bucket, beam_s3):
    import tensorflow as tf

    path = tmp_path / "in" / "part.tfrecord"
    path.parent.mkdir()
    with tf.io.TFRecordWriter(str(path)) as w:
        for i in range(7):
            buf = io.BytesIO()
            Image.fromarray(photo(rng, 8, 8)).save(buf, "PNG")
            feats = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buf.getvalue()])),
                     "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2]))}
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    s3_server.upload_folder(path.parent, s3_bucket, "records")
    assert cli("encode", path, "-o", tmp_path / "local", "--shard-size", "3").exit_code == 0
    r = cli("encode", f"s3://{s3_bucket}/records", "-o", tmp_path / "beam", "--shard-size", "3", *beam(s3_server))
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "beam" / "manifest.json").read_text())
    assert m["num_examples"] == 7
    assert local_hashes(tmp_path / "beam") == local_hashes(tmp_path / "local")


def test_a_single_object_has_no_class_and_lg_load_says_it_needs_a_copy(cli, tmp_path, rng, s3_server, s3_bucket,
                                                                        beam_s3):
    import logitify_cli as lg
    from logitify_cli.errors import LogitifyError
    from logitify_cli.sources import discover

    save(str(tmp_path / "one.png"), photo(rng, 8, 8))
    s3_server.upload_folder(tmp_path, s3_bucket, "single")
    inv = discover([f"s3://{s3_bucket}/single/one.png"])
    assert [(it.key, it.label) for it in inv.items] == [("one.png", -1)] and inv.classes is None
    out = f"s3://{s3_bucket}/one-out"
    r = cli("encode", f"s3://{s3_bucket}/single/one.png", "-o", out, *beam(s3_server))
    assert r.exit_code == 0, r.output
    with pytest.raises(LogitifyError, match="local"):
        lg.load(out)


def test_no_credentials_is_one_clear_line_at_once(s3_server, s3_bucket, tmp_path):
    """Beam retries a missing-credentials error (or a dead endpoint) for about eight minutes; logitify says so at once.

    The same commands with credentials in the environment, or only in Beam's
    options, read the bucket (here a manifest that is not one).
    """
    import subprocess
    import sys
    import time

    s3_server.write(s3_bucket, "ds/manifest.json", b"{}")
    env = s3_server.subprocess_env()
    keep = ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_EC2_METADATA_DISABLED")
    bare = {k: v for k, v in env.items() if not k.startswith("AWS_") or k in keep}  # no role, token or container

    def run(*args, env):
        return subprocess.run([sys.executable, "-m", "logitify_cli", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=120)

    t0 = time.monotonic()
    r = run("info", f"s3://{s3_bucket}/ds", env=bare)
    assert r.returncode == 1 and time.monotonic() - t0 < 60, r.stderr
    assert r.stderr.strip().splitlines() == [
        "logitify: error: no credentials for s3:// paths: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
        "AWS_PROFILE, or ~/.aws/credentials), or pass Beam's --s3_access_key_id and --s3_secret_access_key "
        "after `--` with --runner beam"], r.stderr
    r = run("info", f"s3://{s3_bucket}/ds", env=env)
    assert r.returncode == 1 and "not a valid logitify manifest" in r.stderr, r.stderr
    # an endpoint nothing listens on: the same retries in Beam, the same one line here
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    t0 = time.monotonic()
    r = run("verify", f"s3://{s3_bucket}/ds", env={**env, "AWS_ENDPOINT_URL_S3": dead})
    assert r.returncode == 1 and time.monotonic() - t0 < 60, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"logitify: error: cannot connect to the S3 endpoint for s3://{s3_bucket}/ds/manifest.json: "
        f"Could not connect to the endpoint URL: \"{dead}/{s3_bucket}\""], r.stderr
    # decode reads the manifest (to list the splits) after taking the run's Beam options
    r = run("decode", f"s3://{s3_bucket}/ds", "-o", tmp_path / "back", *beam(s3_server), env=bare)
    assert r.returncode == 1 and "not a valid logitify manifest" in r.stderr, r.stderr


def test_threads_reading_through_the_kept_client_each_get_their_own_bytes():
    """Beam's in-process workers are threads: reads through the one kept S3 client must not cross.

    Beam's client wrapper keeps the current download in itself; shared by
    all reads, one thread read another's object (38 reads in 1,200). Here a
    stand-in for boto3's low-level client answers slowly, as a network does,
    so that reads overlap.
    """
    import datetime
    import os
    import random
    import threading
    import time

    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.options.pipeline_options import PipelineOptions

    from logitify_cli import fs

    objects = {f"k{i}": os.urandom(50_000 + i) for i in range(8)}

    class Body:
        def __init__(self, data):
            self.data, self.pos, self._raw_stream = data, 0, type("Raw", (), {"closed": False})()

        def read(self, n):
            time.sleep(random.uniform(0, 0.0005))
            out = self.data[self.pos:self.pos + n]
            self.pos += len(out)
            return out

        def close(self):
            self._raw_stream.closed = True

    class SlowS3:
        def head_object(self, Bucket, Key):
            return {"ETag": "e", "LastModified": datetime.datetime.now(), "ContentLength": len(objects[Key]),
                    "ContentType": "application/octet-stream"}

        def get_object(self, Bucket, Key, Range):
            time.sleep(random.uniform(0, 0.0005))
            return {"Body": Body(objects[Key][int(Range.split("=")[1].rstrip("-")):])}

    store = fs._kept_client_s3(PipelineOptions(["--s3_region_name=us-east-1", "--s3_access_key_id=k",
                                                "--s3_secret_access_key=s"]), client=SlowS3())
    wrong, errors = [], []

    def reader(seed):
        rnd = random.Random(seed)
        for _ in range(150):
            key = rnd.choice(sorted(objects))
            try:
                with store.open(f"s3://b/{key}", compression_type=CompressionTypes.UNCOMPRESSED) as f:
                    got = f.read()
            except Exception as e:  # collected, reported below
                errors.append(repr(e))
                continue
            if got != objects[key]:
                wrong.append(key)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and not errors, (len(wrong), errors[:3])


def test_object_keys_no_folder_could_hold_are_skipped_by_name(tmp_path, rng, s3_server, s3_bucket, beam_s3):
    """An object store's keys may hold '..' or '.' parts: such an image is listed as skipped, not passed over."""
    from logitify_cli.sources import discover

    buf = io.BytesIO()
    Image.fromarray(photo(rng, 8, 8)).save(buf, "PNG")
    for key in ("odd/a/b.png", "odd/a/../escape.png", "odd/a/./here.png", "odd/.hidden.png"):
        s3_server.write(s3_bucket, key, buf.getvalue())
    inv = discover([f"s3://{s3_bucket}/odd"])
    assert [it.key for it in inv.items] == ["a/b.png"]
    assert sorted(s["source"] for s in inv.skipped) == ["a/../escape.png", "a/./here.png"]
    assert all("'..' part" in s["reason"] for s in inv.skipped)


def test_a_bucket_dataset_with_other_splits_is_never_replaced(cli, image_folder, tmp_path, s3_server, s3_bucket, beam_s3):
    """In a bucket a run writes a whole dataset: with --overwrite it would drop the splits a run in a
    folder keeps, so a dataset there holding a split this run does not make is refused, untouched."""
    src, _ = image_folder
    two = tmp_path / "two"
    assert cli("encode", src, "-o", two, "--shard-size", "8").exit_code == 0
    assert cli("encode", src, "-o", two, "--split", "test", "--shard-size", "8").exit_code == 0
    s3_server.upload_folder(two, s3_bucket, "two")
    before = {k: s3_server.read(s3_bucket, k) for k in s3_server.list_keys(s3_bucket, "two/")}
    for split in ("train", "test"):
        r = cli("encode", src, "-o", f"s3://{s3_bucket}/two", "--split", split, "--overwrite", *beam(s3_server))
        other = "test" if split == "train" else "train"
        assert r.exit_code == 1 and f"split(s) {other}, which this run does not make" in r.stderr, r.output
    assert {k: s3_server.read(s3_bucket, k) for k in s3_server.list_keys(s3_bucket, "two/")} == before


def test_a_failed_run_into_a_bucket_is_taken_back_by_overwrite(cli, tmp_path, rng, s3_server, s3_bucket, beam_s3):
    """A Beam run that fails into a bucket leaves whole shards and its journal there; --overwrite takes them
    back as logitify's (a foreign object beside them still stops it), and a finished run leaves no journal."""
    src = tmp_path / "src"
    for i in range(12):
        save(str(src / f"{i:02d}.png"), photo(rng, 8, 8))
    good = (src / "07.png").read_bytes()
    (src / "07.png").write_bytes(good[:len(good) // 2])
    out = f"s3://{s3_bucket}/failed"
    r = cli("encode", src, "-o", out, "--shard-size", "4", "--on-error", "fail", *beam(s3_server))
    assert r.exit_code == 1 and "07.png" in r.stderr, r.output
    left = s3_server.list_keys(s3_bucket, "failed/")
    assert "failed/.logitify-journal.jsonl" in left and "failed/manifest.json" not in left
    (src / "07.png").write_bytes(good)
    s3_server.client.put_object(Bucket=s3_bucket, Key="failed/notes.txt", Body=b"mine")
    r = cli("encode", src, "-o", out, "--shard-size", "4", "--overwrite", *beam(s3_server))
    assert r.exit_code == 1 and "notes.txt, which logitify did not write" in r.stderr, r.output
    s3_server.client.delete_object(Bucket=s3_bucket, Key="failed/notes.txt")
    r = cli("encode", src, "-o", out, "--shard-size", "4", "--overwrite", *beam(s3_server))
    assert r.exit_code == 0, r.output
    m, _ = bucket_hashes(s3_server, s3_bucket, "failed")
    assert sorted(s3_server.list_keys(s3_bucket, "failed/")) == \
        sorted(["failed/manifest.json"] + [f"failed/{s['file']}" for s in m["shards"]])


def test_overwrite_in_a_bucket_trusts_a_manifest_or_journal_only_for_names_logitify_gives(
        cli, image_folder, tmp_path, s3_server, s3_bucket, beam_s3):
    """As in a folder: a journal object owns shard-shaped names only (never a manifest or TFDS metadata),
    a manifest only its format's names, and a receipt is logitify's only beside a name they own; anything
    else is someone's, and --overwrite stops."""
    src, _ = image_folder
    ds = tmp_path / "ds"
    assert cli("encode", src, "-o", ds).exit_code == 0
    m = json.loads((ds / "manifest.json").read_text())
    m["shards"][0]["file"] = "notes.txt"
    planted = {
        "journal": {".logitify-journal-x.jsonl": b'{"header": {"format": "tfrecord", "num_shards": 1, '
                                                  b'"name": "mnist", "split": "train"}}\n',
                    "dataset_info.json": b"{}", "features.json": b"{}", "manifest.json": b'{"mine": true}'},
        "deep": {".logitify-journal.jsonl": b"[" * 200000, "keep.txt": b"mine"},
        "manifest": {"manifest.json": json.dumps(m).encode(), "notes.txt": b"mine"},
        "receipt": {".notes.txt.receipt.json": b"{}"},
    }
    for prefix, objects in planted.items():
        for key, body in objects.items():
            s3_server.client.put_object(Bucket=s3_bucket, Key=f"{prefix}/{key}", Body=body)
        before = {k: s3_server.read(s3_bucket, k) for k in s3_server.list_keys(s3_bucket, f"{prefix}/")}
        r = cli("encode", src, "-o", f"s3://{s3_bucket}/{prefix}", "--overwrite", *beam(s3_server))
        assert r.exit_code == 1 and "which logitify did not write" in r.stderr, (prefix, r.output)
        assert {k: s3_server.read(s3_bucket, k) for k in s3_server.list_keys(s3_bucket, f"{prefix}/")} == before


SHARD = "x-00000-of-00001.npz"  # shard-shaped: what a journal of split x with one shard would own
_HEADER = json.dumps({"header": {"format": "npz", "num_shards": 1, "name": "logitify", "split": "x"}}).encode()
JOURNALS_THAT_SAY_NOTHING = {
    "not a journal name": {".logitify-journal-train.jsonl": _HEADER + b"\n"},  # train's is .logitify-journal.jsonl
    "a line cut short": {".logitify-journal-x.jsonl": _HEADER},
    "a byte order mark": {".logitify-journal-x.jsonl": b"\xef\xbb\xbf" + _HEADER + b"\n"},
    "NaN": {".logitify-journal-x.jsonl": _HEADER.replace(b'"logitify"', b"NaN") + b"\n"},
    "a header after the first line": {".logitify-journal-x.jsonl": b'{"note": 1}\n' + _HEADER + b"\n"},
}


@pytest.mark.parametrize("case", sorted(JOURNALS_THAT_SAY_NOTHING))
def test_a_folder_and_a_bucket_read_a_journal_alike(case, cli, image_folder, tmp_path, s3_server, s3_bucket, beam_s3):
    """One reading of a journal for both stores: one that owns nothing leaves a user's shard-shaped file
    someone's in a folder and in a bucket alike, and --overwrite stops in both, removing nothing."""
    src, _ = image_folder
    planted = {**JOURNALS_THAT_SAY_NOTHING[case], SHARD: b"mine"}
    out = tmp_path / "out"
    out.mkdir()
    for name, body in planted.items():
        (out / name).write_bytes(body)
    r = cli("encode", src, "-o", out, "--overwrite")
    assert r.exit_code == 1 and "which logitify did not write" in r.stderr, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == planted
    for name, body in planted.items():
        s3_server.write(s3_bucket, f"p/{name}", body)
    r = cli("encode", src, "-o", f"s3://{s3_bucket}/p", "--overwrite", *beam(s3_server))
    assert r.exit_code == 1 and "which logitify did not write" in r.stderr, r.output
    assert {k[2:]: s3_server.read(s3_bucket, k) for k in s3_server.list_keys(s3_bucket, "p/")} == planted
