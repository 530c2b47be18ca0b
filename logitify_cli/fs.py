"""Files on this machine or in a bucket: one small interface for both.

Local paths use the os module. Paths with a scheme (s3://, gs://, ...) go
through Apache Beam's FileSystems, so any store Beam has a plugin for works
where its extra is installed (apache-beam[aws] for s3://, [gcp] for gs://).
The runners and sources call these functions and never branch on the scheme.
"""
from __future__ import annotations

import contextlib

import os
import shutil
import sys

from .errors import LogitifyError, NoCredentials, UsageError


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


class quiet_root_logger:
    """Beam speaks through the root logger while it loads and while it parses options.

    Its import warns that Google's optional clients are missing, and its
    options call logging.basicConfig(), which installs a stderr handler for
    the whole process. Within this block (unless --verbose) records logged on
    the root logger itself are dropped, and a handler is present, so
    basicConfig() adds none. The root logger is as it was afterwards.
    """

    def __enter__(self):
        import logging

        from . import _tf

        self.root = logging.getLogger()
        self.guard, self.drop = logging.NullHandler(), (lambda record: False)
        self.active = not _tf.verbose
        if self.active:
            self.root.addHandler(self.guard)
            self.root.addFilter(self.drop)
        return self

    def __exit__(self, *exc):
        if self.active:
            self.root.removeHandler(self.guard)
            self.root.removeFilter(self.drop)


def load_beam() -> bool:
    """Import Apache Beam's FileSystems (False if Beam is not installed), quietly (see quiet_root_logger)."""
    import importlib
    import sys

    if "apache_beam.io.filesystems" in sys.modules:
        return True
    with quiet_root_logger():
        try:
            importlib.import_module("apache_beam.io.filesystems")
        except ImportError:
            return False
    return True


def _fs(path: str | None = None):
    """Beam's FileSystems, given default options if nobody has set any.

    Without options set, Beam refuses every s3:// path; the defaults let
    boto3's own configuration (AWS_ENDPOINT_URL, credentials files) apply to
    commands that take no Beam options, such as verify and info. Options the
    caller (or `configure`) set are theirs, and kept.
    """
    if not load_beam():
        raise UsageError("paths in buckets (s3://, gs://) need Apache Beam: pip install 'logitify[beam]'")
    from apache_beam.io.filesystems import FileSystems

    if getattr(FileSystems, "_pipeline_options", None) is None:
        from apache_beam.options.pipeline_options import PipelineOptions

        with quiet_root_logger():
            FileSystems.set_options(PipelineOptions([]))
    if path is not None and str(path).startswith("s3://"):
        return _s3_store(FileSystems._pipeline_options, str(path))
    return FileSystems


_s3_kept = (None, None, None)  # (process id, options, the S3 file system made for them there)


def _s3_store(options, path: str = ""):
    """Beam's S3 file system, with one boto3 client for as long as the options (and process) stay the same.

    Beam's own makes a new boto3 client for every call (open, list, exists),
    0.1-0.7 s of CPU each: a decode writing one object per image into a
    bucket spent most of its time there. This instance answers the same
    calls as FileSystems does, each through its own S3IO and Beam client
    wrapper (which hold a download's state), all around the one boto3
    client, which is safe to share between threads. Its methods are replaced
    on the instance: a subclass would be one more file system Beam finds for
    s3://, and Beam refuses two.
    """
    global _s3_kept
    pid, kept_options, store = _s3_kept
    if store is None or kept_options is not options or pid != os.getpid():
        _require_s3_credentials(options)  # before any client: once per set of options, like the client
        store = _kept_client_s3(options)
        _reachable(store, path)
        _s3_kept = (os.getpid(), options, store)
    return store


def _reachable(store, path: str) -> None:
    """Fail at once where Beam would retry for minutes: an S3 endpoint that cannot be connected to.

    One HEAD of the path's bucket, through the client just made: any answer
    (found, forbidden, missing) means the endpoint is there.
    """
    try:
        from botocore.exceptions import ConnectionError as NoConnection
    except ImportError:
        return
    bucket = path.split("://", 1)[-1].split("/", 1)[0]
    if not bucket:
        return
    try:
        store._kept.client.head_bucket(Bucket=bucket)
    except NoConnection as e:
        raise LogitifyError(f"cannot connect to the S3 endpoint for {path[:200]}: {_first_line(e)}") from None
    except Exception:  # an answer: the endpoint is there, and Beam reports what it says
        pass


def _kept_client_s3(options, client=None):
    """The file system of _s3_store; `client` stands in for boto3's low-level client (tests)."""
    import copy
    import types

    from apache_beam.io.aws import s3io
    from apache_beam.io.aws.clients.s3 import boto3_client
    from apache_beam.io.aws.s3filesystem import S3FileSystem
    from apache_beam.io.filesystem import BeamIOError, CompressedFile, CompressionTypes, FileMetadata, FileSystem

    store, base = S3FileSystem(options), boto3_client.Client(options)
    if client is not None:
        base.client = client

    def io():  # a wrapper of its own (a download's position lives there), the boto3 client shared
        return s3io.S3IO(client=copy.copy(base))

    def _list(self, dir_or_prefix):
        try:
            for path, (size, updated) in io().list_files(dir_or_prefix, with_metadata=True):
                yield FileMetadata(path, size, updated)
        except Exception as e:
            raise BeamIOError("List operation failed", {dir_or_prefix: e})

    def _path_open(self, path, mode, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        compression_type = FileSystem._get_compression_type(path, compression_type)
        mime_type = CompressionTypes.mime_type(compression_type, mime_type)
        raw = io().open(path, mode, mime_type=mime_type)
        return raw if compression_type == CompressionTypes.UNCOMPRESSED else \
            CompressedFile(raw, compression_type=compression_type)

    def exists(self, path):
        try:
            return io().exists(path)
        except Exception as e:
            raise BeamIOError("exists() operation failed", {path: e})

    def size(self, path):
        try:
            return io().size(path)
        except Exception as e:
            raise BeamIOError("size() operation failed", {path: e})

    def metadata(self, path):
        try:
            found = io()._status(path)
            return FileMetadata(path, found["size"], found["last_updated"])
        except Exception as e:
            raise BeamIOError("Metadata operation failed", {path: e})

    def delete(self, paths):
        failed = {p: err for p, err in io().delete_paths(paths).items() if err is not None}
        if failed:
            raise BeamIOError("Delete operation failed", failed)

    for fn in (_list, _path_open, exists, size, metadata, delete):
        setattr(store, fn.__name__, types.MethodType(fn, store))
    store._kept = base
    return store


def _require_s3_credentials(options) -> None:
    """Fail at once where Beam would retry for minutes: no AWS credentials anywhere for s3:// paths.

    Beam counts "Unable to locate credentials" as a passing fault and backs
    off seven times (about eight minutes) before giving up.
    """
    try:
        from apache_beam.options.pipeline_options import S3Options

        given = bool(options.view_as(S3Options).s3_access_key_id)
    except Exception:  # options of another kind: Beam's own checks apply
        given = True
    if not given:
        try:
            import boto3
        except ImportError:  # Beam's own error names the extra to install
            return
        try:
            found = boto3.session.Session().get_credentials()
        except Exception as e:  # a profile that is not there, a broken config file
            raise NoCredentials("s3", _first_line(e)) from None
        if found is None:
            raise NoCredentials("s3")


@contextlib.contextmanager
def options_kept():
    """Beam's FileSystems options as they were before the block (None if Beam was not loaded yet)."""
    import sys

    loaded = "apache_beam.io.filesystems" in sys.modules
    before = getattr(sys.modules["apache_beam.io.filesystems"].FileSystems, "_pipeline_options", None) \
        if loaded else None
    try:
        yield
    finally:
        module = sys.modules.get("apache_beam.io.filesystems")
        if module is not None:
            module.FileSystems._pipeline_options = before  # set_options refuses None; the attribute is the state


def configure(options) -> None:
    """Hand Beam's pipeline options (endpoints, credentials) to FileSystems in this process.

    Workers get them with the pipeline; the launcher lists and reads buckets
    itself (discovery, the probe, receipts, the manifest) and needs them too.
    """
    _fs().set_options(options)  # the S3 client kept for the options before is made again for these


def join(base: str, name: str) -> str:
    if is_remote(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path)


def open_read(path: str):
    """A binary file object, read as stored (no decompression by file extension)."""
    if not is_remote(path):
        return open(path, "rb")
    store = _fs(path)
    from apache_beam.io.filesystem import CompressionTypes

    try:
        return store.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    except Exception as e:  # Beam wraps every store's errors in its own
        raise OSError(f"cannot open {path}: {_first_line(e)}") from None


def read_bytes(path: str, limit: int | None = None) -> bytes:
    with open_read(path) as f:
        return f.read() if limit is None else f.read(limit)


def create_new(tmp: str) -> int:
    """A write descriptor of a new, empty local file at this temporary name of ours, made here.

    What is at the name already (a leftover of a killed process that had our
    pid, or a link someone put there) is removed, never followed; the file
    is then made with O_EXCL and O_NOFOLLOW, so nothing is written through a
    link that appears meanwhile.
    """
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC, 0o644)


class Writeback:
    """Has the kernel start writing a file to disk as it grows, so the fsync that ends a shard waits for little.

    A shard is synced before it is renamed into place (a renamed shard is a
    whole one, even after a power cut). Left to that fsync, the 250-600 MB of
    a shard went to disk only then: 0.2-0.25 s with every reader and the
    transform waiting, once a shard. `wrote(n)` after each n bytes asks
    Linux (sync_file_range, SYNC_FILE_RANGE_WRITE) to start writing what is
    dirty every STEP bytes, without waiting for it. Elsewhere, or where the
    file system refuses, it does nothing: the fsync still makes it durable.
    """

    STEP = 32 << 20
    _call = None  # libc's sync_file_range, or False where there is none

    def __init__(self, fd: int):
        self.fd = fd
        self._since = 0

    def wrote(self, n: int) -> None:
        self._since += n
        if self._since >= self.STEP:
            self._since = 0
            self.start()

    def start(self) -> bool:
        """Start writing every dirty page of the file (not waiting); whether the kernel took the request."""
        call = Writeback._call
        if call is None:
            call = Writeback._call = _sync_file_range()
        if not call:
            return False
        return call(self.fd, 0, 0, 2) == 0  # offset 0, length 0: to the end; 2: SYNC_FILE_RANGE_WRITE


def _sync_file_range():
    """libc's sync_file_range with its argument types, or False (not Linux, no such call)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def fd_path(fd: int, path: str) -> str:
    """A name that opens the file behind fd, for a library that opens files only by name.

    On Linux, /proc/self/fd/N: the file we made, whatever has been put at its
    name since (a link there is not followed). Elsewhere the name itself.
    """
    proc = f"/proc/self/fd/{fd}"
    try:
        if os.path.samestat(os.stat(proc), os.fstat(fd)):
            return proc
    except OSError:
        pass
    return path


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole small file; locally through a temporary name and a rename."""
    if is_remote(path):
        store = _fs(path)
        from apache_beam.io.filesystem import CompressionTypes

        with store.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)
        return
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with os.fdopen(create_new(tmp), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces the name itself: a link at `path` is not followed
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def upload(local_path: str, path: str) -> None:
    """Copy a finished local file to `path` (a bucket or another local folder)."""
    if not is_remote(path):
        shutil.copyfile(local_path, path)
        return
    store = _fs(path)
    from apache_beam.io.filesystem import CompressionTypes

    with open(local_path, "rb") as src, store.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    found = _fs(path).match([path])[0].metadata_list
    if not found:
        raise FileNotFoundError(path)
    return found[0].size_in_bytes


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    return _fs(path).exists(path)


def delete(paths) -> None:
    paths = list(paths)
    remote = [p for p in paths if is_remote(p)]
    for p in paths:
        if not is_remote(p):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    by_scheme = {}
    for p in remote:
        by_scheme.setdefault(p.split("://", 1)[0], []).append(p)
    for group in by_scheme.values():
        _fs(group[0]).delete(group)


def listing(prefix: str):
    """(path, size) of every object under a bucket prefix (a "folder"), or of the object itself."""
    fs = _fs(prefix)
    base = prefix.rstrip("/")
    try:
        found = fs.match([base + "/**"])[0].metadata_list
        # One object named by the prefix itself; a bare bucket names none (and Beam
        # would retry that look-up for minutes).
        if not found and "/" in base.split("://", 1)[-1]:
            found = fs.match([base])[0].metadata_list
    except Exception as e:
        raise LogitifyError(f"cannot list {prefix}: {_first_line(e)}") from None
    return [(m.path, m.size_in_bytes) for m in found]


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
