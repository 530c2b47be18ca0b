"""A real S3-compatible server on loopback for the tests: moto in server mode.

`s3_server` (session) starts `python -m moto.server` as a child process on
127.0.0.1 with a port the kernel picks, waits until it answers HTTP, and
stops it by its PID at the end of the session. Tests reach it three ways:

- Beam pipelines: pass `s3_server.beam_args` with the pipeline's options;
  Beam hands them to every worker (multi_processing DirectRunner included).
- Beam's FileSystems in the test process, outside a pipeline: the
  `beam_s3` fixture calls `FileSystems.set_options(PipelineOptions(beam_args))`
  and puts back what was there after the test (a Pipeline's constructor
  replaces that process-wide setting too). Without any options set,
  FileSystems refuses s3:// paths ("Must provide one of client or options").
- Subprocesses (the CLI, a script): `s3_server.subprocess_env()`, which
  points boto3, and so Beam, at the server through AWS_ENDPOINT_URL_S3 and
  test credentials. Beam still needs some options object set in that process
  (`FileSystems.set_options(PipelineOptions([]))` is enough then).

The helpers (`create_bucket`, `upload_folder`, `list_keys`, `read`, `write`,
`download_prefix`) use boto3 directly, so a test can arrange and check a
bucket without going through the code under test.

The server keeps everything in memory and dies with the test run: it is
started with PR_SET_PDEATHSIG on Linux, so even a killed pytest leaves no
server behind.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"  # the one region where CreateBucket needs no LocationConstraint
START_TIMEOUT = 60.0

# The child sets its own parent-death signal, then runs moto's server. If the
# parent is already gone by then, it exits instead of living on as an orphan.
_BOOT = """\
import os, signal, sys
parent = int(sys.argv[1])
if sys.platform.startswith("linux"):
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
if os.getppid() != parent:
    sys.exit(0)
from moto.server import main
main(sys.argv[2:])
"""

# Safety for the whole session, set in this process and in subprocesses:
# never ask an instance-metadata address for credentials (it is not on
# loopback), and never send loopback traffic through a proxy.
_SAFETY_ENV = {"AWS_EC2_METADATA_DISABLED": "true"}
_NO_PROXY = ("127.0.0.1", "localhost")


def _no_proxy_value(current: str | None) -> str:
    parts = [p for p in (current or "").split(",") if p]
    return ",".join(parts + [h for h in _NO_PROXY if h not in parts])


class S3Server:
    """A running moto server and how to reach it."""

    def __init__(self, proc: subprocess.Popen, endpoint: str, log_path: Path, startup_seconds: float):
        self.proc = proc
        self.endpoint = endpoint
        self.log_path = log_path
        self.startup_seconds = startup_seconds
        self._client = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def beam_args(self) -> list[str]:
        """Beam pipeline options (S3Options) that send s3:// paths to this server.

        Neither --s3_verify nor --s3_disable_ssl is needed: the endpoint's
        http:// scheme wins over boto3's use_ssl.
        """
        return [f"--s3_endpoint_url={self.endpoint}", f"--s3_access_key_id={ACCESS_KEY}",
                f"--s3_secret_access_key={SECRET_KEY}", f"--s3_region_name={REGION}"]

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and Beam through it) at this server."""
        empty = str(self.log_path.parent / "no-aws-config")  # a developer's ~/.aws never leaks in
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": empty, "AWS_SHARED_CREDENTIALS_FILE": empty, **_SAFETY_ENV,
                "NO_PROXY": _no_proxy_value(os.environ.get("NO_PROXY")),
                "no_proxy": _no_proxy_value(os.environ.get("no_proxy"))}

    def subprocess_env(self, base: dict | None = None) -> dict[str, str]:
        """`base` (default os.environ) with `env` on top and any other AWS identity removed."""
        out = {k: v for k, v in (os.environ if base is None else base).items()
               if k not in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL")}
        out.update(self.env)
        return out

    # -- boto3 helpers, independent of the code under test ----------------------------------

    @property
    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint, region_name=REGION,
                aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        return self._client

    @staticmethod
    def url(bucket: str, key: str = "") -> str:
        return f"s3://{bucket}/{key}"

    def create_bucket(self, name: str | None = None) -> str:
        """A new bucket (names are 3-63 lower-case characters); returns its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def write(self, bucket: str, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def read(self, bucket: str, key: str) -> bytes:
        return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def upload_folder(self, folder, bucket: str, prefix: str = "") -> list[str]:
        """Every file under `folder` to `prefix/<relative path>`; returns the keys, sorted."""
        folder = Path(folder)
        prefix = prefix.strip("/")
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            key = f"{prefix}/{rel}" if prefix else rel
            self.write(bucket, key, path.read_bytes())
            keys.append(key)
        return keys

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under `prefix` (recursive), sorted; [] for an empty prefix."""
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return sorted(keys)

    def download_prefix(self, bucket: str, prefix: str, dest) -> list[Path]:
        """Every object under `prefix` to `dest/<key relative to prefix>`; returns the paths."""
        dest = Path(dest)
        base = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        out = []
        for key in self.list_keys(bucket, base):
            rel = key[len(base):]
            if not rel or rel.endswith("/"):  # a "folder" marker key
                continue
            path = dest / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.read(bucket, key))
            out.append(path)
        return out

    # -- lifetime -------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to this PID only
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def moto_missing() -> str | None:
    """Why the server cannot start here, or None."""
    for module, package in (("moto", "moto[server]"), ("flask", "moto[server]"), ("flask_cors", "moto[server]"),
                            ("boto3", "boto3")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install -e '.[test]')"
    return None


def start_server(workdir: Path, timeout: float = START_TIMEOUT) -> S3Server:
    """Start moto on 127.0.0.1 with a port the kernel picks; return once it answers HTTP."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "moto.log"
    t0 = time.monotonic()
    env = {**os.environ, **_SAFETY_ENV, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:  # a file, not a pipe: werkzeug logs every request
        proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(os.getpid()), "-H", "127.0.0.1", "-p", "0"],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=workdir)
    server = S3Server(proc, "", log_path, 0.0)
    try:
        port = None
        deadline = t0 + timeout
        while port is None:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {proc.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not report its port in {timeout:.0f} s:\n{server.log_tail()}")
            m = re.search(r"Running on http://127\.0\.0\.1:(\d+)", log_path.read_text(errors="replace"))
            if m:
                port = int(m.group(1))
            else:
                time.sleep(0.05)
        server.endpoint = f"http://127.0.0.1:{port}"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        while True:
            try:
                with opener.open(server.endpoint + "/", timeout=5) as r:
                    r.read()
                break
            except urllib.error.HTTPError:  # an HTTP answer of any status: it is serving
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on port {port} does not answer:\n{server.log_tail()}")
                time.sleep(0.05)
    except BaseException:
        server.stop()
        raise
    server.startup_seconds = time.monotonic() - t0
    return server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on loopback for the whole session (skipped if moto is not installed)."""
    why = moto_missing()
    if why:
        pytest.skip(why)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _SAFETY_ENV.items():
            mp.setenv(k, v)
        for k in ("NO_PROXY", "no_proxy"):
            mp.setenv(k, _no_proxy_value(os.environ.get(k)))
        server = start_server(tmp_path_factory.mktemp("moto"))
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket for one test; its name."""
    return s3_server.create_bucket()


@pytest.fixture
def beam_s3(s3_server):
    """Beam's FileSystems in this process pointed at the server; the previous setting back after."""
    pytest.importorskip("apache_beam")
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    before = FileSystems._pipeline_options
    FileSystems.set_options(PipelineOptions(s3_server.beam_args))
    try:
        yield FileSystems
    finally:
        FileSystems.set_options(before)
