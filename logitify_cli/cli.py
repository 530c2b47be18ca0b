"""The command line: thin click commands over the runners.

Only click is imported at module level, so `logitify --help` is instant; the
runners (and TensorFlow behind them) are imported when a command runs.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import functools
import json
import os
import signal
import sys

import click

from . import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _size(ctx, param, value):
    if value is None:
        return None
    text = value.lower().replace("×", "x")
    try:
        h, w = (int(v) for v in text.split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not HxW, e.g. 32x32") from None
    if not (0 < h <= 65535 and 0 < w <= 65535):
        raise click.BadParameter(f"{value!r}: both sizes must be between 1 and 65535")
    return h, w


def _split_name(value):
    from .manifest import SPLIT_NAME

    if value is not None and not SPLIT_NAME.match(value):
        raise click.BadParameter(f"{value!r}: a split name is letters, digits and _ (at most 64)")
    return value


def _dataset_name(ctx, param, value):
    """--name starts every TFRecord shard's file name: it must stay one name inside the output folder."""
    from .planner import dataset_name_problem

    problem = dataset_name_problem(value)
    if problem:
        raise click.BadParameter(f"{value!r}: {problem}")
    return value


def _crop(ctx, param, value):
    if value is None:
        return None
    try:
        top, left, h, w = (int(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not TOP,LEFT,HEIGHT,WIDTH, e.g. 40,15,148,148") from None
    if top < 0 or left < 0 or not (0 < h <= 65535 and 0 < w <= 65535):
        raise click.BadParameter(f"{value!r}: TOP and LEFT must be 0 or more, HEIGHT and WIDTH from 1 to 65535")
    return top, left, h, w


# The names of --filter and --resize-mode, without importing Pillow for --help.
FILTER_NAMES = ["box", "bilinear", "bicubic", "lanczos", "hamming", "nearest"]
RESIZE_MODE_NAMES = ["stretch", "center-crop", "border"]


class RegistryChoice(click.Choice):
    """A choice among a registry's names, read when asked (a format registered later is offered too)."""

    def __init__(self, names):
        self._names = names
        super().__init__([])

    @property
    def choices(self):
        return tuple(self._names())

    @choices.setter
    def choices(self, value):
        pass


def _shard_formats():
    from .formats import names

    return names()


def _preset_names():
    from .presets import names

    return names()


def _image_outputs():
    from .outputs import IMAGE_OUTPUTS

    return list(IMAGE_OUTPUTS)


class JsonCommand(click.Command):
    """With --json, a usage error is also the one JSON object on stdout, as every other outcome is."""

    def make_context(self, info_name, args, parent=None, **extra):
        ours = args[:args.index("--")] if "--" in args else list(args)  # click consumes args as it parses
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            if "--json" in ours or self._json_from_environment():
                click.echo(json.dumps({"ok": False, "error": e.format_message()}))
            from .report import printable

            for note in unread_environment():  # a variable meant for this run may be why it failed
                click.echo(f"logitify: {printable(note)}", err=True)
            raise

    def _json_from_environment(self) -> bool:
        """--json given in the environment, read from the variables click reads it from, in their order."""
        for param in self.params:
            if param.name == "as_json":
                for name in param.envvar or ():
                    value = os.environ.get(name, "").strip()
                    if value:
                        try:
                            return click.BOOL.convert(value, None, None)
                        except click.BadParameter:  # click says so itself, as the usage error being answered
                            return False
        return False


class BeamArgsCommand(JsonCommand):
    """Everything after a bare `--` is handed to Apache Beam as pipeline options."""

    def parse_args(self, ctx, args):
        if "--" in args:
            i = args.index("--")
            ctx.meta["beam_args"] = list(args[i + 1:])
            args = args[:i]
        return super().parse_args(ctx, args)


def _source_paths(given, null_sep: bool, listed_must_exist: bool = False) -> list:
    """Source paths as given, '-' standing for the paths listed on stdin (one a line, or NUL-separated).

    Encode skips a listed path that has gone, with its reason (a list from
    find may go stale); verify refuses it, or every key it held reads as missing.
    """
    from .errors import UsageError
    from .sources import read_path_list

    paths = []
    for s in given:
        if s == "-":
            listed = read_path_list(sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin, null_sep)
            paths.extend(map(_named_source, listed) if listed_must_exist else listed)
        else:
            paths.append(_named_source(s))
    if given and not paths:
        raise UsageError("no source paths (stdin was empty)")
    return paths


def _named_source(path: str) -> str:
    """A source path as given, refused at once if it names nothing: else every key it held reads as missing."""
    from .errors import UsageError

    if "://" not in path and not os.path.lexists(path):  # a bucket prefix is listed later, by its store
        raise UsageError(f"no such file or directory: {path}")
    return path


def stream_options(f):
    """--json, -q, --progress/--no-progress, --verbose: shared by every command that runs."""
    f = click.option("--verbose", is_flag=True, help="Show tracebacks and TensorFlow's own log lines.")(f)
    f = click.option("--progress/--no-progress", default=None,
                     help="Force the progress bar on stderr on or off [shown when stderr is a terminal].")(f)
    f = click.option("-q", "--quiet", is_flag=True,
                     help="Nothing on stderr on success: no progress, no warnings, no closing line (what a "
                          "command answers on stdout, as info's summary, still comes).")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object on stdout, nothing else.")(f)
    return f


@contextlib.contextmanager
def _private_temp():
    """A temp root of our own for a Beam run, removed after it.

    Beam's local job service and stager make temp folders they never remove
    (several per run). The CLI owns its process, so it points tempfile at a
    folder of its own for the run and puts the old value back; the library
    functions themselves leave tempfile alone.
    """
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="logitify-beam-")
    before = tempfile.tempdir
    tempfile.tempdir = root
    try:
        yield root
    finally:
        tempfile.tempdir = before
        shutil.rmtree(root, ignore_errors=True)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so the same cleanup runs;
    the exit status still says which signal stopped the run (143, not 130)."""

    signum = int(signal.SIGTERM)


@contextlib.contextmanager
def _command_owns_process(verbose: bool):
    """For the command's run: SIGTERM (a scheduler stopping the job) cleans up like Ctrl-C, and
    --verbose shows TensorFlow's log lines where the console script imports it. Both are put
    back after, for a program that runs a command in its own process; that program's
    TensorFlow is imported as its own import would be (entry() alone imports it quietly)."""
    from . import _tf

    def handler(signum, frame):
        raise _Terminated()

    before = _tf.verbose
    _tf.verbose = verbose
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. embedded use)
        previous = None
    try:
        yield
    finally:
        _tf.verbose = before
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _answer_anyway(answer: dict) -> None:
    """--json's object for a run that ends without a result; a stdout that cannot take it changes no exit code."""
    try:
        _write_out(json.dumps(answer))
    except _StdoutLost:
        _quiet_stdout()


class _StdoutLost(Exception):
    """The command's answer could not be written (its cause says why); raised only by _write_out."""


_answered = []  # set once the command's answer went to stdout: a stop after it adds no second one
_ran = []  # set once a command began: an OSError out of it (--verbose) is its own, not click's output failing


def _write_out(text: str) -> None:
    """The command's answer on stdout; a stdout that cannot take it is an error, not a traceback."""
    _answered.append(True)  # before it is written: a stop halfway through must not start another
    try:
        if sys.stdout is None:  # closed by the caller (>&-): the answer would be lost silently
            raise OSError(errno.EBADF, "standard output is closed")
        fd = _stdout_fd() if _CONSOLE and sys.stdout is sys.__stdout__ else None
        if fd is None:  # a stdout of the caller's (an in-process runner's capture, a notebook's stream)
            click.echo(text)
            sys.stdout.flush()
            return
        # Written by the descriptor, to the last byte: when a reader such as `head` leaves
        # during a long write, the partial write(2) that follows was taken as complete by
        # Python's buffered stdout, which then dropped the rest and exited 0.
        sys.stdout.flush()
        data = memoryview((text + "\n").encode(sys.stdout.encoding or "utf-8", sys.stdout.errors or "strict"))
        while data:
            data = data[os.write(fd, data):]
    except OSError as e:
        raise _StdoutLost() from e


def _stdout_fd():
    """sys.stdout's file descriptor, or None where it has none."""
    try:
        return sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return None


_CONSOLE = False  # set by entry(): the console script owns its process, and so its stdout


def _stdout_failed(e: OSError) -> int:
    """The status of a run whose stdout failed: 141 when its reader left (`logitify info ... | head`, as with
    SIGPIPE), else 1 and the reason on stderr. What is still buffered for it goes nowhere."""
    gone = isinstance(e, BrokenPipeError)
    if not gone:
        click.echo(f"logitify: error: cannot write to standard output: {e.strerror or e}", err=True)
    _quiet_stdout()
    return 141 if gone else 1


def _quiet_stdout() -> None:
    """What is still buffered for a stdout that failed goes nowhere, so the exit flush cannot fail again.

    Only for the console script: a program running a command in its own
    process keeps its file descriptor 1 as it is.
    """
    if not _CONSOLE:
        return
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # None, or not a file (in-process runners): nothing to flush
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def run_command(fn=None, *, interrupted="interrupted"):
    """Turn a command body returning a Result into streams and exit codes.

    Every command goes through here: a LogitifyError is one line on stderr
    (with --json, also an object on stdout), anything unexpected is one line
    too unless --verbose, and data printed from files is escaped.
    """

    if fn is None:  # @run_command(interrupted=...): what Ctrl-C leaves behind, said by the command that knows
        return functools.partial(run_command, interrupted=interrupted)

    @functools.wraps(fn)
    def wrapper(*args, verbose=False, **kwargs):
        _ran[:] = [True]
        with _command_owns_process(verbose):
            try:
                _run(*args, verbose=verbose, **kwargs)
            except _StdoutLost as lost:
                sys.exit(_stdout_failed(lost.__cause__))

    def _run(*args, as_json=False, quiet=False, progress=None, verbose=False, **kwargs):
        from .errors import LogitifyError

        try:
            from .report import Reporter, printable  # NumPy and Pillow: a Ctrl-C may land here too

            report = Reporter(quiet=quiet, progress=progress)
            for note in unread_environment():
                report.warn(note)
            result = fn(*args, report=report, **kwargs)
        except LogitifyError as e:
            from .report import Reporter, printable

            for note in e.notes:
                Reporter(quiet=quiet).warn(note)
            click.echo(f"logitify: error: {printable(e.message)}", err=True)
            if as_json:
                out = {"ok": False, "error": e.message}
                if e.result is not None:
                    out.update(e.result.to_dict())
                    out["ok"] = False
                _write_out(json.dumps(out, default=str))
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            said = interrupted(kwargs) if callable(interrupted) else interrupted
            click.echo(f"logitify: {said}", err=True)
            signum = getattr(e, "signum", int(signal.SIGINT))
            if as_json:  # a pipeline reading the answer gets one, stopped or not
                _answer_anyway({"ok": False, "error": said, "signal": signal.Signals(signum).name})
            # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
            sys.exit(128 + signum)
        except click.exceptions.Exit:
            raise
        except Exception as e:  # a bug or an environment problem: one line, traceback on --verbose
            from .report import printable

            line = f"{type(e).__name__}: {printable(e)}"
            if as_json:
                _answer_anyway({"ok": False, "error": line})
            if verbose:
                raise
            click.echo(f"logitify: error: {line} (run with --verbose for details)", err=True)
            sys.exit(1)
        if as_json:
            _write_out(json.dumps({"ok": result.exit_code == 0, **result.to_dict()}, default=str))
        else:
            text = result.stdout_text()
            if text:
                _write_out(text)
            if not quiet and result.message():
                click.echo(printable(result.message()), err=True)
        sys.exit(result.exit_code)

    return wrapper


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="logitify")
def main():
    """Dequantize and logit image datasets for normalizing flows (TFGENZOO's LogitifyImage).

    \b
    Example:
      logitify encode sample_images -o out/       # images -> logits + log-dets
      logitify decode out/ -o restored/           # and back, bit for bit
    """


def _left_nothing(options: dict) -> bool:
    """A stopped run whose local output folder is gone: it made the folder and took it back, empty.

    Not through `..` after a name: `new/../there` names a folder that was
    there, and is gone after the run only because the run took back the
    `new` it made (a leading `../` climbs only through folders that were).
    """
    from pathlib import PurePath

    from .fs import is_remote

    out = options.get("out")
    if not out or is_remote(out) or os.path.lexists(out):
        return False
    parts = list(PurePath(out).parts)
    while parts and (parts[0] == ".." or parts[0] == PurePath(out).anchor):
        parts.pop(0)
    return ".." not in parts


_NOTHING_WRITTEN = "interrupted before anything was written; run the same command again"


def _encode_interrupted(options: dict) -> str:
    """What a stopped encode leaves, and how to go on: --resume is the local runner's."""
    if _left_nothing(options):
        return _NOTHING_WRITTEN
    if options.get("runner") != "beam":
        return "interrupted; whole shards are kept, run again with --resume to finish"
    # A Beam run journals no shard as it ends (its receipts are the launcher's): nothing is kept to resume.
    return "interrupted; run the same command again with --overwrite (a Beam run makes every shard)"


@main.command(cls=BeamArgsCommand, context_settings=CONTEXT)
@click.argument("sources", nargs=-1, required=True, metavar="SOURCES... [-- BEAM_OPTIONS...]")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("-f", "--format", "fmt", type=RegistryChoice(_shard_formats), default="npz", show_default=True,
              help="Shard format.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Squeeze [0,1] into (alpha/2, 1-alpha/2) before the logit.")
@click.option("--alpha-convention", type=click.Choice(["tfgenzoo", "realnvp"]), default="tfgenzoo", show_default=True,
              help="How --alpha is meant: tfgenzoo (alpha/2, 1-alpha/2) or realnvp (alpha, 1-alpha), i.e. 2x ours.")
@click.option("--corruption-level", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="Scale c of the dequantization noise.")
@click.option("--noise", type=click.Choice(["uniform", "gaussian", "none"]), default="uniform", show_default=True,
              help="Dequantization noise; gaussian is lossy.")
@click.option("--bits", type=click.IntRange(1, 8), default=8, show_default=True, help="Bits per channel kept (Glow's n_bits_x).")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed; noise depends on it and the image key only.")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True, help="Images per TensorFlow batch.")
@click.option("--shard-size", type=click.IntRange(1), default=None, help="Images per shard [about 256 MB of logits].")
@click.option("--size", callback=_size, metavar="HxW",
              help="Resize every image to HxW (see --resize-mode, --filter); without it all must share one size.")
@click.option("--resize-mode", type=click.Choice(RESIZE_MODE_NAMES), default=None,
              help="How --size treats another aspect ratio: stretch it, take the largest centred window "
                   "of the target's aspect ratio, or fit inside and pad with black [stretch].")
@click.option("--crop", callback=_crop, metavar="TOP,LEFT,HEIGHT,WIDTH",
              help="Take this fixed window of every image first (before any resize); smaller images are skipped.")
@click.option("--filter", "resample", type=click.Choice(FILTER_NAMES), default=None,
              help="Pillow's resampling filter for --size [bicubic].")
@click.option("--jpeg-draft", is_flag=True, default=False,
              help="Read JPEGs at 1/2, 1/4 or 1/8 scale in libjpeg (Pillow's draft) before the --size "
                   "resize: faster, other pixels; recorded in the manifest. Needs --size, not --crop.")
@click.option("--channels", type=click.Choice(["1", "3", "4"]), default=None,
              help="Output channels [3, or 1 when the first image, 64 files spread over the inputs and the "
                   "first 64 records are grayscale; colour images that sample missed are then named].")
@click.option("--preset", type=RegistryChoice(_preset_names), default=None,
              help="A standard set's published recipe: size, crop, filter, bits, channels, as its project's "
                   "code makes it (README: Presets). Options given as well win, with a warning, and the "
                   "manifest records them.")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="Where TensorFlow runs the transform.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Processes that read images [all cores; at most 4 a core].")
@click.option("--compress", is_flag=True, help="Deflate npz shards / GZIP TFRecord shards.")
@click.option("--compression", type=click.Choice(["auto", "gzip", "none"]), default="auto", show_default=True,
              help="Compression of TFRecord inputs (auto detects GZIP).")
@click.option("--image-key", default=None,
              help="Feature holding encoded images in TFRecord inputs [image; a TFDS folder's Image feature].")
@click.option("--label-key", default=None,
              help="int64 label feature in TFRecord inputs [label; a TFDS folder's ClassLabel].")
@click.option("--tfds-split", default=None, metavar="NAME[,NAME]",
              help="The splits of a prepared TFDS folder to encode [all of them].")
@click.option("--name", default="logitify", show_default=True, callback=_dataset_name,
              help="Dataset name (TFRecord shard names, TFDS metadata).")
@click.option("--split", default=None, callback=lambda c, p, v: _split_name(v),
              help="Split to make [train; a TFDS folder's splits keep their names]; into a folder holding "
                   "a dataset of other splits, it adds this one "
                   "(with --overwrite it replaces only this one).")
@click.option("--holdout", metavar="FRACTION:NAME", default=None,
              help="Send this share of the inputs to a second split, by a hash of (seed, key), e.g. 0.1:test.")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="What an unreadable input does: skipped and listed, or stops the run.")
@click.option("--max-pixels", type=click.IntRange(1), default=None,
              help="Refuse larger images as decompression bombs [89478485, Pillow's limit].")
@click.option("--resume", is_flag=True, help="Finish a run that was interrupted, keeping its whole shards.")
@click.option("--overwrite", is_flag=True, help="Replace what logitify wrote in the output folder before.")
@click.option("--runner", type=click.Choice(["local", "beam"]), default="local", show_default=True,
              help="Run here, or as an Apache Beam pipeline.")
@click.option("--null", "null_sep", is_flag=True, help="With '-': paths on stdin are NUL-separated (find -print0).")
@stream_options
@run_command(interrupted=_encode_interrupted)
def encode(sources, out, fmt, alpha, alpha_convention, corruption_level, noise, bits, seed, batch_size, shard_size, size,
           resize_mode, crop, resample, jpeg_draft, channels, preset, device, workers, compress, compression, image_key,
           label_key, tfds_split, name, split, holdout, on_error, max_pixels, resume, overwrite, runner, null_sep, report):
    """Encode images into shards of logits and log-dets.

    SOURCES are image files, folders (searched recursively; sub-folders are
    classes), TFRecord files of tf.train.Example, a prepared TFDS dataset
    folder, bucket prefixes (gs://, s3://; as folders are), or '-' to read
    paths from stdin.

    \b
    Examples:
      logitify encode photos/ -o out/
      logitify encode train.tfrecord-0000*-of-00010 -o out/ -f tfrecord --size 64x64
      logitify encode celeba/ -o out/ --crop 40,15,148,148 --size 64x64 --filter box
      logitify encode imagenet/train/ -o out/ --preset imagenet64
      logitify encode ~/tensorflow_datasets/cifar10 -o out/      # every split, named as there
      find photos -name '*.png' -print0 | logitify encode - --null -o out/ --json
      logitify encode photos/ -o out/ --runner beam -- --runner=FlinkRunner --flink_master=HOST:8081
    """
    from .errors import UsageError
    from .planner import EncodeOptions
    from .transform import TransformParams

    if resume and overwrite:
        # One set for every run in the environment, the other given here: the command line wins.
        source = click.get_current_context().get_parameter_source
        from_env = {n for n in ("resume", "overwrite") if source(n) == click.core.ParameterSource.ENVIRONMENT}
        if from_env == {"resume"}:
            resume = False
        elif from_env == {"overwrite"}:
            overwrite = False
        elif from_env:
            raise UsageError("--resume and --overwrite exclude each other, and both are set in the environment "
                             f"({', '.join(sorted(_set_variables('resume', 'overwrite')))}): unset one")
        else:
            raise UsageError("--resume and --overwrite exclude each other")
    if holdout is not None:
        from .splits import parse_holdout

        holdout = parse_holdout(holdout)
    recipe = None
    said = []  # warnings given before the run, which the result's warnings (--json) carry too

    def warn(message: str) -> None:
        said.append(message)
        report.warn(message)

    if preset:
        from .presets import resolve

        ctx = click.get_current_context()
        given = {"size": size, "crop": crop, "resize_mode": resize_mode, "filter": resample, "bits": bits,
                 "channels": int(channels) if channels else None}
        params = {"filter": "resample"}
        given = {k: v for k, v in given.items()
                 if ctx.get_parameter_source(params.get(k, k)) not in (None, click.core.ParameterSource.DEFAULT)}
        values, recipe = resolve(preset, given, warn)
        size, crop, resize_mode, resample, bits, channels = (values[k] for k in (
            "size", "crop", "resize_mode", "filter", "bits", "channels"))
        if jpeg_draft:  # never part of a recipe: other pixels than any published set's
            recipe["deviations"].append({"option": "jpeg_draft", "preset": False, "given": True})
            warn(f"--jpeg-draft gives other pixels than preset {preset}'s recipe: this dataset is not "
                 f"{preset} as published, and its manifest says so")
    if size is None and (resize_mode or resample):
        raise UsageError(f"--{'resize-mode' if resize_mode else 'filter'} says how --size resizes; "
                         "without --size nothing is resized")
    if jpeg_draft and (size is None or crop is not None):
        from .planner import JPEG_DRAFT_NEEDS

        raise UsageError(JPEG_DRAFT_NEEDS)
    from .conventions import tool_alpha

    alpha = tool_alpha(alpha, alpha_convention)
    paths = _source_paths(sources, null_sep)
    try:  # what click's ranges let through (nan, inf, values float32 cannot carry) is a usage error too
        params = TransformParams(alpha=alpha, corruption_level=corruption_level, noise=noise, bits=bits, seed=seed)
        params.check_float32()
    except ValueError as e:
        raise UsageError(f"{e} (--alpha, --corruption-level)") from None
    opts = EncodeOptions(
        sources=paths, out=out, format=fmt,
        params=params,
        batch_size=batch_size, shard_size=shard_size, size=size, channels=int(channels) if channels else None,
        device=device, workers=workers, compress=compress,
        compression=None if compression == "auto" else compression, image_key=image_key, label_key=label_key,
        tfds_split=tfds_split, name=name, split=split, holdout=holdout, on_error=on_error, resume=resume,
        overwrite=overwrite,
        resize_mode=resize_mode or "stretch", crop=crop, filter=resample or "bicubic", jpeg_draft=jpeg_draft,
        exif=recipe is None or recipe["recipe"]["exif_orientation"], preset=recipe,
    )
    if max_pixels:
        opts.max_pixels = max_pixels
    beam_args = click.get_current_context().meta.get("beam_args", [])
    if runner == "beam":
        from .beam_runner import encode_beam

        if workers is not None:
            raise UsageError("--workers is for the local runner; Beam's own options set its parallelism "
                             "(e.g. -- --direct_num_workers=4, or your engine's worker count)")

        with _private_temp():
            result = encode_beam(opts, report, beam_args)
    else:
        if beam_args:
            raise UsageError("options after '--' are for --runner beam")
        from .encode_run import run_encode

        result = run_encode(opts, report)
    result.warnings[:0] = said
    return result


@click.command(cls=BeamArgsCommand, context_settings=CONTEXT)
@click.argument("dataset", type=click.Path(), metavar="DATASET [-- BEAM_OPTIONS...]")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Folder for the images.")
@click.option("-f", "--format", "fmt", type=RegistryChoice(_image_outputs), default="png", show_default=True,
              help="Lossless PNGs at each key, or uint8 npz arrays per shard.")
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True,
              help="Images per TensorFlow batch with --device gpu (the CPU's inverse works a slice of a shard at a time).")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Processes writing the images [all cores; at most 4 a core].")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="gpu: the inverse runs in TensorFlow on the GPU. auto and cpu: in NumPy on the CPU "
                   "(the same bytes, without TensorFlow's start-up).")
@click.option("--overwrite", is_flag=True, help="Write into a folder that is not empty.")
@click.option("--runner", type=click.Choice(["local", "beam"]), default="local", show_default=True,
              help="Run here, or as an Apache Beam pipeline (one shard per unit of work).")
@click.option("--split", default=None, help="Decode this split only [all; several go to OUT/SPLIT/].")
@stream_options
@run_command(interrupted=lambda options: _NOTHING_WRITTEN if _left_nothing(options) else
             "interrupted; any images already written are kept, each whole: decode again with --overwrite to finish")
def decode(dataset, out, fmt, batch_size, workers, device, overwrite, runner, split, report):
    """Give the images back from an encoded DATASET (alias: invert).

    Every transform parameter is read from the manifest. Keys become paths
    under the output folder ('.png' for the extension); none can leave it.

    \b
    Example:
      logitify decode out/ -o restored/
    """
    from .errors import UsageError

    beam_args = click.get_current_context().meta.get("beam_args", [])
    if runner == "beam":
        from .beam_runner import decode_beam

        if workers is not None:
            raise UsageError("--workers is for the local runner; Beam's own options set its parallelism "
                             "(e.g. -- --direct_num_workers=4, or your engine's worker count)")

        with _private_temp():
            return decode_beam(dataset, out, fmt, batch_size=batch_size, device=device, overwrite=overwrite,
                               report=report, beam_args=beam_args, split=split)
    if beam_args:
        raise UsageError("options after '--' are for --runner beam")
    from .decode_run import run_decode

    return run_decode(dataset, out, fmt=fmt, batch_size=batch_size, workers=workers, device=device,
                      overwrite=overwrite, report=report, split=split)


main.add_command(decode, "decode")
invert = copy.copy(decode)  # the same command under its other name, listed as what it is
invert.short_help = "The same as decode (its other name)."
main.add_command(invert, "invert")


@main.command(cls=JsonCommand, context_settings=CONTEXT)
@click.argument("dataset", type=click.Path())
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw decoded samples per class and histograms of logits and log-dets to this file "
                   "(.png, .pdf, .svg or .jpg).")
@click.option("--split", default=None, help="Summarize this split only [every split].")
@stream_options
@run_command
def info(dataset, plot_path, split, report):
    """Summarize an encoded DATASET: counts, classes, parameters, statistics.

    \b
    Examples:
      logitify info out/
      logitify info out/ --json | jq .logdet
      logitify info out/ --plot out.png
    """
    from .info import info as run_info

    return run_info(dataset, plot_path, report=report, split=split)


@main.command(cls=JsonCommand, context_settings=CONTEXT)
@click.argument("dataset", type=click.Path())
@click.argument("more_sources", nargs=-1, metavar="")
@click.option("--against", multiple=True, metavar="SOURCES...",
              help="Also decode and compare with these sources (files, folders, TFRecords) bit for bit "
                   "(a lossy dataset: their shapes, and their pixels with its fingerprint).")
@click.option("--split", default=None, help="Verify this split only [every split; --against needs one].")
@click.option("--null", "null_sep", is_flag=True, help="With --against -: paths on stdin are NUL-separated.")
@stream_options
@run_command
def verify(dataset, more_sources, against, split, null_sep, report):
    """Check an encoded DATASET: shards, sha256, counts, shapes, finite logits, log-dets, labels.

    With --against, every image is decoded and compared with its source.
    Exit 0 when all holds, 1 naming each failing shard or key.

    \b
    Examples:
      logitify verify out/
      logitify verify out/ --against photos/
    """
    from .errors import UsageError
    from .verify import verify as run_verify

    if more_sources and not against:
        raise UsageError(f"unexpected argument {more_sources[0]!r} (sources to compare go after --against)")
    sources = _source_paths(list(against) + list(more_sources), null_sep, listed_must_exist=True)
    return run_verify(dataset, against=sources, report=report, split=split)


# Options whose meaning differs between commands (encode's --format is a shard format, decode's an image
# format): from the environment only under the command's own name, never one name for all.
PER_COMMAND_ENV = frozenset({"output", "format"})
ENV_NAMES: set = set()  # every name an option is read from, filled by _environment_names


class _Switch(click.types.BoolParamType):
    """A flag's value from the environment, with a message that lists what it takes (click's begins ', 0')."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r} is not a valid boolean: use 1 or 0, true or false, yes or no, on or off "
                      "(empty is off)", param, ctx)


def _environment_names(group) -> None:
    """Each option from the environment: LOGITIFY_<COMMAND>_<OPTION>, or LOGITIFY_<OPTION> for any command.

    Named after the long flag (--shard-size: LOGITIFY_SHARD_SIZE), not
    click's parameter name (which is not what the help shows); the
    command's own name wins, and the command line wins over both.
    """
    for cmd in set(group.commands.values()):
        for param in cmd.params:
            longs = [o for o in param.opts if o.startswith("--")] if isinstance(param, click.Option) else []
            if not longs:
                continue
            option = longs[0][2:].replace("-", "_").upper()
            names = [f"LOGITIFY_{cmd.name.upper()}_{option}"]
            if option.lower() not in PER_COMMAND_ENV:
                names.append(f"LOGITIFY_{option}")
            param.envvar = names
            ENV_NAMES.update(names)
            if getattr(param, "is_flag", False) and isinstance(param.type, click.types.BoolParamType):
                param.type = _Switch()


_environment_names(main)


def _set_variables(*names) -> list:
    """The environment variables the running command took these options from (click reads the first set)."""
    out = []
    for param in click.get_current_context().command.params:
        if param.name in names:
            out += [v for v in (param.envvar or ()) if os.environ.get(v)][:1]
    return out


def unread_environment() -> list:
    """A line for each LOGITIFY_ variable that names no option: set, it would be ignored without a word."""
    # The names options were read from before they followed the flags.
    renamed = {"OUT": "OUTPUT", "FMT": "FORMAT", "AS_JSON": "JSON", "NULL_SEP": "NULL", "RESAMPLE": "FILTER",
               "PLOT_PATH": "PLOT"}
    notes = []
    for name in sorted(k for k in os.environ if k.startswith("LOGITIFY_") and k not in ENV_NAMES):
        option, named = name[len("LOGITIFY_"):], None
        for alias, command in main.commands.items():  # invert is decode's alias: decode's names
            if option.startswith(f"{alias.upper()}_"):
                option, named = option[len(alias) + 1:], f"{command.name.upper()}_"
        option = renamed.get(option, option)
        if named and f"LOGITIFY_{named}{option}" in ENV_NAMES:  # invert reads decode's names
            instead = [f"LOGITIFY_{named}{option}"]
        elif f"LOGITIFY_{option}" in ENV_NAMES:
            instead = [f"LOGITIFY_{option}"]
        else:
            instead = sorted(n for n in ENV_NAMES if n.endswith(f"_{option}") and n.count("_") == option.count("_") + 2)
        notes.append(f"environment variable {name} names no option and is not read"
                     + (f"; use {' or '.join(instead)}" if instead else
                        " (names follow the long flags: LOGITIFY_<OPTION> or LOGITIFY_<COMMAND>_<OPTION>)"))
    return notes


def _asked_for_json(args) -> bool:
    """Whether a command line stopped before click had read it asked for --json (flag or variable)."""
    from .console import asked_for_json

    return asked_for_json(list(args), {alias: command.name for alias, command in main.commands.items()})


def entry(argv=None):
    """The console script: main(), then a fast exit once TensorFlow is loaded.

    Every file is closed and every worker joined by the time a command
    returns; what is left is TensorFlow's interpreter teardown, which costs
    more than half a second and does nothing for the user.
    """
    # NumPy's OpenBLAS keeps a thread per core, and one BLAS call made while
    # TensorFlow imports set it spinning: 0.1 s of CPU a run, for nothing
    # (logitify computes nothing with BLAS). One thread has none to spin.
    # Set before NumPy loads; a user's own setting is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    global _CONSOLE
    _CONSOLE = True
    from . import _tf

    # This process runs nothing else after the command: TensorFlow is imported quietly, its heap frozen
    # out of later collections, and the API packages the command does not use can wait (see _tf).
    _tf.own_process = _tf.defer_api = True

    def terminated(signum, frame):  # from here on a scheduler's SIGTERM stops the run as Ctrl-C does
        raise _Terminated()

    from .console import is_early

    ignored = {stop for stop in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(stop) == signal.SIG_IGN}
    if signal.SIGTERM not in ignored:
        signal.signal(signal.SIGTERM, terminated)
    if is_early(signal.getsignal(signal.SIGINT)):  # console.py's early handler ends here
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _answered.clear()
    _ran.clear()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = main(args=list(args), prog_name="logitify", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0  # --help and --version: click's Exit
        if sys.stdout is not None:
            sys.stdout.flush()  # what click wrote for --help or --version meets a closed or full stdout here
        elif not _ran:  # --help or --version with stdout closed (>&-): click wrote nothing, and said nothing
            raise OSError(errno.EBADF, "standard output is closed")
    except SystemExit as e:
        code = e.code
        if isinstance(sys.stdout, click.utils.PacifyFlushWrapper):  # click's own exit 1 for a reader gone (EPIPE)
            code = 141
    except click.exceptions.Abort as e:  # a stop before the command's own handling began (click's parsing)
        stop = e.__cause__
        if isinstance(stop, KeyboardInterrupt):
            click.echo("logitify: interrupted", err=True)
            signum = getattr(stop, "signum", int(signal.SIGINT))
            if _asked_for_json(args) and not _answered:
                _answer_anyway({"ok": False, "error": "interrupted", "signal": signal.Signals(signum).name})
            code = 128 + signum
        else:  # end of input at a prompt: click's own word
            click.echo("Aborted!", err=True)
            code = 1
    except click.ClickException as e:  # a usage error
        e.show()
        code = e.exit_code
    except OSError as e:  # --help or --version, whose text click writes itself, to a stdout that cannot take it
        if _ran:  # a command's own error, raised for --verbose's traceback
            raise
        code = _stdout_failed(e)
    except KeyboardInterrupt as e:  # a second stop while the first one's exit unwound: its line is already out
        code = 128 + getattr(e, "signum", int(signal.SIGINT))
    status = code if isinstance(code, int) else (0 if code is None else 1)

    def settled(signum, frame):
        # The run is over and its status decided: a stop during the interpreter's teardown
        # (joining threads, atexit) ends the exit at once, instead of a traceback and another status.
        _flush_streams()
        os._exit(status)

    for stop in {signal.SIGINT, signal.SIGTERM} - ignored:
        signal.signal(stop, settled)
    if not _tf.loaded():
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
    _flush_streams()
    os._exit(status)


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: closed by the caller
                stream.flush()
        except (OSError, ValueError, RuntimeError):  # a closed pipe downstream; a flush it interrupted
            pass


if __name__ == "__main__":
    entry()
