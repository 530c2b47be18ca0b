"""Errors the CLI turns into one clear line and an exit code.

Each carries what a caller may need as named fields, never in `args`:
`message` (the line shown), `result` (a partial result object the command
still reports, e.g. a verify summary with its problems) and `notes` (warnings
gathered before the failure, printed ahead of the error).
"""
from __future__ import annotations


class LogitifyError(Exception):
    """The run failed for a reason the user can act on (exit 1)."""

    exit_code = 1

    def __init__(self, message: str, *, result=None, notes=()):
        super().__init__(message)
        self.message = message
        self.result = result
        self.notes = list(notes)

    def __reduce__(self):
        """Pickled with its fields, whatever its class's __init__ takes: it may come from a worker process."""
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls, args, fields):
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(fields)
    return error


class UsageError(LogitifyError):
    """The command was asked for something it cannot do as asked (exit 2)."""

    exit_code = 2


class AlphaOutOfRange(UsageError):
    """An alpha that names no squeeze in the convention it was given in (a RealNVP alpha of 0.5 or more)."""

    def __init__(self, message: str, *, alpha: float, convention: str, low: float, high: float):
        super().__init__(message)
        self.alpha = alpha
        self.convention = convention
        self.low = low
        self.high = high


class SplitFailed(LogitifyError):
    """One split of a TFDS folder's run failed (`cause`); the splits before it (`kept`) are written and stay.

    `rest` is what --tfds-split takes to make the others; the exit code and
    notes are the cause's.
    """

    def __init__(self, cause: LogitifyError, *, split: str, kept: list, rest: list):
        text = f"split {split}: {cause.message}"
        if kept:
            text += (f" (the split(s) {', '.join(kept)} before it are written and kept; make the rest with "
                     f"--tfds-split {','.join(rest)})")
        super().__init__(text, result=cause.result, notes=cause.notes)
        self.cause, self.split, self.kept, self.rest = cause, split, list(kept), list(rest)
        self.exit_code = cause.exit_code


class NoCredentials(LogitifyError):
    """Paths in a bucket, and no credentials for its store anywhere boto3 looks."""

    def __init__(self, scheme: str, reason: str | None = None):
        what = f"cannot find credentials for {scheme}:// paths ({reason})" if reason else \
            f"no credentials for {scheme}:// paths"
        super().__init__(f"{what}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "(or AWS_PROFILE, or ~/.aws/credentials), or pass Beam's --s3_access_key_id and "
                         "--s3_secret_access_key after `--` with --runner beam")
        self.scheme, self.reason = scheme, reason


class OutputInUse(LogitifyError):
    """Another run holds the output folder's lock."""

    def __init__(self, message: str, *, folder: str, pid: int | None):
        super().__init__(message)
        self.folder = folder
        self.pid = pid


class ForeignFile(LogitifyError):
    """The output folder holds a file logitify did not write and would have to replace or remove."""

    def __init__(self, message: str, *, folder: str, file: str):
        super().__init__(message)
        self.folder = folder
        self.file = file


class TfdsMetadataError(LogitifyError):
    """A prepared TFDS folder's metadata cannot be used: `file` says which file, `problem` what is wrong."""

    def __init__(self, file: str, problem: str):
        super().__init__(f"{file}: {problem}")
        self.file = file
        self.problem = problem


class FeatureChoice(UsageError):
    """A TFDS dataset leaves open which feature to take: `option` chooses among `features`."""

    def __init__(self, message: str, *, option: str, features: list):
        super().__init__(message)
        self.option = option
        self.features = list(features)


class WriteError(LogitifyError):
    """A write failed: `what` was being written, `errno` and `reason` say why (a full disk says so)."""

    def __init__(self, what: str, errno: int | None, reason: str):
        super().__init__(f"cannot write {what}: {reason}")
        self.what, self.errno, self.reason = what, errno, reason


def write_error(e: OSError, what: str) -> WriteError:
    """A failed write as one clear line (a full disk says so)."""
    import errno

    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason = "no space left on device"
    return WriteError(what, e.errno, reason)


class ShardError(LogitifyError):
    """A shard cannot be read as its manifest says: `file` names it, `problem` says what is wrong."""

    def __init__(self, file: str, problem: str, message: str | None = None):
        super().__init__(message or f"shard {file}: {problem}")
        self.file, self.problem = file, problem


class SplitMismatch(LogitifyError):
    """A run would add a split that does not share the dataset's transform, shape, format, geometry or classes."""

    def __init__(self, message: str, *, field: str, dataset, run):
        super().__init__(message)
        self.field = field
        self.dataset = dataset
        self.run = run
