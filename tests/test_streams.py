"""Streams for shell pipelines: JSON on stdout only, progress on stderr, -q, env."""
import json

import pytest


def test_json_summaries_are_one_object(cli, image_folder, tmp_path):
    src, truth = image_folder
    r = cli("encode", src, "-o", tmp_path / "o", "--json", "--no-progress")
    s = json.loads(r.stdout)
    assert s["ok"] and s["num_examples"] == len(truth) and s["skipped"] == [] and s["images_per_second"] > 0
    assert r.stdout.count("\n") == 1
    r = cli("decode", tmp_path / "o", "-o", tmp_path / "b", "--json")
    s = json.loads(r.stdout)
    assert s["num_images"] == len(truth) and "seconds" in s and r.stdout.count("\n") == 1
    r = cli("verify", tmp_path / "o", "--json")
    assert json.loads(r.stdout)["ok"] is True and r.stdout.count("\n") == 1
    r = cli("encode", src, "-o", tmp_path / "o", "--json")  # refused: output exists
    assert r.exit_code == 1 and json.loads(r.stdout)["ok"] is False


def test_progress_goes_to_stderr_and_quiet_is_silent(cli, image_folder, tmp_path):
    src, _ = image_folder
    r = cli("encode", src, "-o", tmp_path / "o", "--progress")
    assert r.exit_code == 0 and r.stdout == ""
    assert "encode" in r.stderr and "img" in r.stderr and "100%" in r.stderr
    r = cli("decode", tmp_path / "o", "-o", tmp_path / "b", "--progress")
    assert "decode" in r.stderr and r.stdout == ""
    r = cli("encode", src, "-o", tmp_path / "q", "-q", "--progress")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""
    r = cli("verify", tmp_path / "q", "-q")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""
    r = cli("encode", src, "-o", tmp_path / "n", "--no-progress")
    assert "100%" not in r.stderr and "encoded 13 images" in r.stderr  # one closing line


def test_options_from_environment(cli, image_folder, tmp_path, monkeypatch):
    src, _ = image_folder
    monkeypatch.setenv("LOGITIFY_ALPHA", "0.2")
    monkeypatch.setenv("LOGITIFY_SHARD_SIZE", "4")
    r = cli("encode", src, "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["transform"]["alpha"] == 0.2 and len(m["shards"]) == 4
    monkeypatch.setenv("LOGITIFY_ALPHA", "7")
    assert cli("encode", src, "-o", tmp_path / "p").exit_code == 2


def test_environment_names_follow_the_flags_and_the_command(cli, image_folder, tmp_path, monkeypatch):
    """LOGITIFY_<OPTION> as --help spells the option; LOGITIFY_<COMMAND>_<OPTION> wins; --output, --format and
    --batch-size, which mean other things in other commands, only under the command's name."""
    src, _ = image_folder
    for name, value in {"LOGITIFY_ALPHA": "0.2", "LOGITIFY_ENCODE_ALPHA": "0.3", "LOGITIFY_FILTER": "box",
                        "LOGITIFY_SIZE": "8x8", "LOGITIFY_JSON": "1", "LOGITIFY_ENCODE_FORMAT": "tfrecord",
                        "LOGITIFY_ENCODE_OUTPUT": str(tmp_path / "o"), "LOGITIFY_FORMAT": "nonsense",
                        "LOGITIFY_OUTPUT": str(tmp_path / "nowhere")}.items():
        monkeypatch.setenv(name, value)
    r = cli("encode", src)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["format"] == "tfrecord"
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["transform"]["alpha"] == 0.3 and m["source"]["filter"] == "box" and m["shape"][:2] == [8, 8]
    r = cli("decode", tmp_path / "o", "-o", tmp_path / "back")  # encode's format and output are not decode's
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["format"] == "png" and not (tmp_path / "nowhere").exists()
    monkeypatch.setenv("LOGITIFY_DECODE_FORMAT", "npz")
    assert json.loads(cli("invert", tmp_path / "o", "-o", tmp_path / "back2").stdout)["format"] == "npz"


def test_a_flag_on_the_command_line_wins_over_its_opposite_from_the_environment(cli, image_folder, tmp_path,
                                                                                monkeypatch):
    """LOGITIFY_RESUME=1 for a whole job, and one run told --overwrite: neither flag has a --no- form to undo it."""
    src, _ = image_folder
    out = tmp_path / "o"
    assert cli("encode", src, "-o", out, "--shard-size", "4").exit_code == 0
    monkeypatch.setenv("LOGITIFY_RESUME", "1")
    r = cli("encode", src, "-o", out, "--overwrite", "--json")  # a fresh run: resume would keep every shard
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_shards"] == 0, r.output
    r = cli("encode", src, "-o", out, "--resume", "--overwrite")
    assert r.exit_code == 2 and "exclude each other" in r.stderr
    monkeypatch.delenv("LOGITIFY_RESUME")
    monkeypatch.setenv("LOGITIFY_OVERWRITE", "1")
    r = cli("encode", src, "-o", out, "--resume", "--json")  # a finished run: every shard kept, nothing rewritten
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["resumed_shards"] == json.loads(r.stdout)["num_shards"] == 1
    monkeypatch.setenv("LOGITIFY_ENCODE_RESUME", "1")
    r = cli("encode", src, "-o", out)  # both from the environment: no way to tell which is meant
    assert r.exit_code == 2 and "(LOGITIFY_ENCODE_RESUME, LOGITIFY_OVERWRITE): unset one" in r.stderr, r.stderr


@pytest.mark.parametrize("cmd", ["encode", "decode", "invert", "info", "verify"])
def test_every_command_has_help_with_an_example(cli, cmd):
    r = cli(cmd, "--help")
    assert r.exit_code == 0 and "Usage: " in r.stdout and "Example" in r.stdout


def test_version(cli):
    from logitify_cli import __version__

    r = cli("--version")
    assert r.exit_code == 0 and __version__ in r.stdout


def test_ctrl_c_says_what_each_command_leaves_behind(cli, dataset, tmp_path, monkeypatch):
    """Only encode can be resumed: decode and verify must not send the user to a --resume they lack."""
    from logitify_cli import decode_run, encode_run, verify

    src, _, out = dataset

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for module, name in ((encode_run, "run_encode"), (decode_run, "run_decode"), (verify, "verify")):
        monkeypatch.setattr(module, name, interrupted)
    (tmp_path / "e").mkdir()  # a stopped run leaves its folder when something is in it, or it was there before
    (tmp_path / "d").mkdir()
    r = cli("encode", src, "-o", tmp_path / "e")
    assert r.exit_code == 130 and "interrupted" in r.stderr and "--resume" in r.stderr
    r = cli("decode", out, "-o", tmp_path / "d")
    assert r.exit_code == 130 and "any images already written are kept" in r.stderr and "--resume" not in r.stderr
    r = cli("verify", out)
    assert r.exit_code == 130 and r.stderr.strip() == "logitify: interrupted"
    # A run that took back the folder it made wrote nothing: no flag is needed to run it again.
    nothing = "logitify: interrupted before anything was written; run the same command again"
    for command, what in (("encode", src), ("decode", out)):
        r = cli(command, what, "-o", tmp_path / "new" / "x")
        assert r.exit_code == 130 and r.stderr.strip() == nothing, r.stderr
    # A leading ../ climbs through folders that were there; new/../x may name one that was (see test_resilience).
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    r = cli("encode", src, "-o", "../../" + tmp_path.name + "/newer")
    assert r.exit_code == 130 and r.stderr.strip() == nothing, r.stderr
    r = cli("encode", src, "-o", "../new/../newer")
    assert r.exit_code == 130 and "--resume" in r.stderr, r.stderr
    # A pipeline reading --json gets its one object, stopped or not (SIGTERM arrives as _Terminated).
    from logitify_cli.cli import _Terminated

    r = cli("encode", src, "-o", tmp_path / "e", "--json")
    assert r.exit_code == 130 and json.loads(r.stdout) == {
        "ok": False, "signal": "SIGINT", "error": "interrupted; whole shards are kept, run again with --resume to finish"}
    monkeypatch.setattr(verify, "verify", lambda *a, **k: (_ for _ in ()).throw(_Terminated()))
    r = cli("verify", out, "--json")
    assert r.exit_code == 143 and json.loads(r.stdout) == {"ok": False, "signal": "SIGTERM", "error": "interrupted"}
    monkeypatch.setattr(verify, "verify", lambda *a, **k: 1 / 0)
    r = cli("verify", out, "--json")
    assert r.exit_code == 1 and json.loads(r.stdout) == {"ok": False, "error": "ZeroDivisionError: division by zero"}
    # A Beam run has no --resume: --overwrite takes a folder or a bucket back.
    pytest.importorskip("apache_beam")
    from logitify_cli import beam_runner

    monkeypatch.setattr(beam_runner, "encode_beam", interrupted)
    r = cli("encode", src, "-o", tmp_path / "e", "--runner", "beam")
    assert r.exit_code == 130 and "--overwrite" in r.stderr and "--resume" not in r.stderr, r.stderr
    r = cli("encode", src, "-o", "s3://bucket/e", "--runner", "beam")
    assert r.exit_code == 130 and "--overwrite" in r.stderr and "--resume" not in r.stderr, r.stderr
    r = cli("encode", src, "-o", tmp_path / "new" / "x", "--runner", "beam")
    assert r.exit_code == 130 and r.stderr.strip() == nothing, r.stderr


def test_a_pool_starts_at_most_a_few_workers_per_core():
    """--workers 1000 forked a thousand processes for a few hundred images; a core keeps at most PER_CORE busy."""
    from logitify_cli.pool import PER_CORE, OrderedPool, default_workers

    with OrderedPool(1000) as pool:
        assert pool.workers == min(1000, PER_CORE * default_workers())
        assert [r for _, r in pool.imap(abs, [(None, -i) for i in range(20)])] == list(range(20))


def test_a_logitify_variable_that_names_no_option_is_said_not_ignored(cli, image_folder, tmp_path, monkeypatch):
    src, _ = image_folder
    monkeypatch.setenv("LOGITIFY_FMT", "tfrecord")  # the name click once took from the parameter
    r = cli("encode", src, "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "LOGITIFY_FMT names no option and is not read; use LOGITIFY_DECODE_FORMAT or LOGITIFY_ENCODE_FORMAT" \
        in r.stderr
    monkeypatch.setenv("LOGITIFY_INVERT_FORMAT", "npz")  # invert reads decode's names
    assert "LOGITIFY_INVERT_FORMAT names no option and is not read; use LOGITIFY_DECODE_FORMAT\n" in \
        cli("info", tmp_path / "o").stderr.replace("logitify: ", "")
    monkeypatch.delenv("LOGITIFY_INVERT_FORMAT")
    r = cli("encode", src)  # no -o: a usage error, perhaps because the variable was meant to give it
    assert r.exit_code == 2 and "LOGITIFY_FMT names no option" in r.stderr and "--output" in r.stderr, r.stderr
    monkeypatch.delenv("LOGITIFY_FMT")
    monkeypatch.setenv("LOGITIFY_BATCH_SIZE", "abc")  # --batch-size is one name for every command
    assert cli("encode", src, "-o", tmp_path / "p").exit_code == 2
    monkeypatch.delenv("LOGITIFY_BATCH_SIZE")
    monkeypatch.setenv("LOGITIFY_JSON", "maybe")
    r = cli("info", tmp_path / "o")
    assert r.exit_code == 2 and "'maybe' is not a valid boolean: use 1 or 0, true or false" in r.stderr, r.stderr
    for value, as_json in (("yes", True), ("off", False), ("", False)):
        monkeypatch.setenv("LOGITIFY_JSON", value)
        r = cli("info", tmp_path / "o")
        assert r.exit_code == 0 and r.stdout.startswith("{") == as_json, (value, r.output)


def test_json_from_the_environment_also_answers_a_usage_error_on_stdout(cli, image_folder, tmp_path, monkeypatch):
    src, _ = image_folder
    monkeypatch.setenv("LOGITIFY_JSON", "1")
    r = cli("encode", src, "-o", tmp_path / "o", "--bogus")
    got = json.loads(r.stdout)
    assert r.exit_code == 2 and got["ok"] is False and "--bogus" in got["error"], r.stdout
