"""RealNVP's alpha is this tool's alpha doubled: both spellings write the same shards."""
import json

import pytest

from logitify_cli.conventions import alpha_equivalents, tool_alpha


@pytest.mark.parametrize("fmt", ["npz", "tfrecord"])
def test_realnvp_alpha_writes_the_same_shards(image_folder, tmp_path, cli, fmt):
    root, _ = image_folder
    a = tmp_path / "ours"
    b = tmp_path / "realnvp"
    assert cli("encode", root, "-o", a, "-f", fmt, "--alpha", "0.1", "-q").exit_code == 0
    assert cli("encode", root, "-o", b, "-f", fmt, "--alpha-convention", "realnvp", "--alpha", "0.05",
               "-q").exit_code == 0
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    assert ma["transform"] == mb["transform"] and mb["transform"]["alpha"] == 0.1
    assert mb["alpha_conventions"] == {"tfgenzoo": 0.1, "realnvp": 0.05}


def test_realnvp_alpha_must_leave_room(image_folder, tmp_path, cli):
    root, _ = image_folder
    r = cli("encode", root, "-o", tmp_path / "x", "--alpha-convention", "realnvp", "--alpha", "0.5")
    assert r.exit_code == 2 and "(0, 0.5)" in r.output


def test_doubling_is_exact():
    for a in (0.05, 1e-6, 0.3, 0.499999, 0.123456789):
        assert tool_alpha(a, "realnvp") / 2 == a and alpha_equivalents(tool_alpha(a, "realnvp"))["realnvp"] == a
