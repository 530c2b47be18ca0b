"""The moto fixture is a real S3 endpoint, and Beam reaches it from the test
process, from multi_processing DirectRunner workers and from a subprocess."""
import json
import os
import subprocess
import sys

import pytest


MiB = 1 << 20


def test_server_runs_on_loopback_and_helpers_round_trip(s3_server, s3_bucket, tmp_path):
    assert s3_server.endpoint.startswith("http://127.0.0.1:")
    assert s3_server.proc.poll() is None
    src = tmp_path / "src"
    files = {"a.bin": os.urandom(100), "cats/1.png": b"\x89PNG one", "cats/deep/2.png": b"\x89PNG two"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    keys = s3_server.upload_folder(src, s3_bucket, "in/")
    assert keys == sorted(f"in/{rel}" for rel in files)
    assert s3_server.list_keys(s3_bucket) == keys
    assert s3_server.list_keys(s3_bucket, "in/cats/") == ["in/cats/1.png", "in/cats/deep/2.png"]
    assert s3_server.list_keys(s3_bucket, "nothing/") == []
    got = s3_server.download_prefix(s3_bucket, "in", tmp_path / "back")
    assert sorted(p.relative_to(tmp_path / "back").as_posix() for p in got) == sorted(files)
    for rel, data in files.items():
        assert (tmp_path / "back" / rel).read_bytes() == data


def test_beam_filesystems_in_the_test_process(beam_s3, s3_server, s3_bucket):
    fs = beam_s3
    url = s3_server.url

    def write(key, data):
        with fs.create(url(s3_bucket, key)) as f:
            f.write(data)

    def read(key):
        with fs.open(url(s3_bucket, key)) as f:
            return f.read()

    def match(pattern):
        return sorted((m.path, m.size_in_bytes) for m in fs.match([url(s3_bucket, pattern)])[0].metadata_list)

    big = os.urandom(6 * MiB + 123)  # over Beam's 5 MiB part size: a two-part multipart upload
    write("d/small.txt", b"small")
    write("d/sub/big.bin", big)
    assert read("d/small.txt") == b"small" and read("d/sub/big.bin") == big
    assert s3_server.read(s3_bucket, "d/sub/big.bin") == big  # the bytes really are on the server
    assert match("d/**") == [(url(s3_bucket, "d/small.txt"), 5), (url(s3_bucket, "d/sub/big.bin"), len(big))]
    assert match("d/*") == [(url(s3_bucket, "d/small.txt"), 5)]  # * stays within one "folder"
    assert match("nothing/**") == []  # an empty prefix matches nothing, without an error
    assert fs.exists(url(s3_bucket, "d/small.txt")) and not fs.exists(url(s3_bucket, "d/none"))
    with pytest.raises(FileNotFoundError):
        read("d/none")

    fs.copy([url(s3_bucket, "d/sub/big.bin")], [url(s3_bucket, "e/big.bin")])
    fs.rename([url(s3_bucket, "d/small.txt")], [url(s3_bucket, "e/small.txt")])
    assert s3_server.list_keys(s3_bucket) == ["d/sub/big.bin", "e/big.bin", "e/small.txt"]
    assert read("e/big.bin") == big
    fs.delete([url(s3_bucket, "d/")])  # a trailing slash deletes everything under the prefix
    fs.delete([url(s3_bucket, "e/small.txt")])
    assert s3_server.list_keys(s3_bucket) == ["e/big.bin"]


def test_multiprocessing_pipeline_reads_and_writes(beam_s3, s3_server, s3_bucket, tmp_path, monkeypatch):
    """Workers are separate processes that get the S3 options only through the pipeline."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # Beam's job service leaves temp folders
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)  # so the endpoint can come from nowhere but the options
    names = [f"item-{i}.txt" for i in range(6)]
    for n in names:
        s3_server.write(s3_bucket, f"in/{n}", f"hello {n}".encode())
    bucket, launcher = s3_bucket, os.getpid()

    def shout(name):
        import os

        from apache_beam.io.filesystems import FileSystems
        from apache_beam.options.pipeline_options import S3Options

        with FileSystems.open(f"s3://{bucket}/in/{name}") as f:
            data = f.read()
        seen = FileSystems._pipeline_options.view_as(S3Options).s3_endpoint_url
        with FileSystems.create(f"s3://{bucket}/out/{name}") as f:
            f.write(json.dumps({"text": data.decode().upper(), "pid": os.getpid(), "endpoint": seen}).encode())
        return name

    args = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2",
            "--default_sdk_harness_log_level=ERROR", *s3_server.beam_args]
    with beam.Pipeline(options=PipelineOptions(args)) as p:
        _ = p | beam.Create(names, reshuffle=False) | beam.Reshuffle() | beam.Map(shout)

    assert s3_server.list_keys(s3_bucket, "out/") == [f"out/{n}" for n in sorted(names)]
    outs = [json.loads(s3_server.read(s3_bucket, f"out/{n}")) for n in names]
    assert [o["text"] for o in outs] == [f"HELLO {n.upper()}" for n in names]
    assert {o["endpoint"] for o in outs} == {s3_server.endpoint}
    assert launcher not in {o["pid"] for o in outs}  # the work ran in worker processes
    # and the launcher's FileSystems reads what the workers wrote (beam_s3 restores it after the test)
    with beam_s3.open(s3_server.url(s3_bucket, f"out/{names[0]}")) as f:
        assert json.loads(f.read())["pid"] == outs[0]["pid"]


def test_subprocess_env_points_boto3_and_beam_at_the_server(s3_server, s3_bucket):
    pytest.importorskip("apache_beam")
    s3_server.write(s3_bucket, "in/x.txt", b"from the fixture")
    script = (
        "import sys\n"
        "from apache_beam.io.filesystems import FileSystems\n"
        "from apache_beam.options.pipeline_options import PipelineOptions\n"
        "FileSystems.set_options(PipelineOptions([]))  # no s3 options: the environment decides\n"
        "b = sys.argv[1]\n"
        "with FileSystems.open(f's3://{b}/in/x.txt') as f: data = f.read()\n"
        "with FileSystems.create(f's3://{b}/out/x.txt') as f: f.write(data + b' and back')\n")
    r = subprocess.run([sys.executable, "-c", script, s3_bucket], env=s3_server.subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert s3_server.read(s3_bucket, "out/x.txt") == b"from the fixture and back"
