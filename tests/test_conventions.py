"""RealNVP's alpha is this tool's alpha doubled: both spellings write the same shards, and info shows both."""
import json

import pytest
from hypothesis import given, strategies as st

from logitify_cli.conventions import alpha_equivalents, tool_alpha
from logitify_cli.errors import AlphaOutOfRange, UsageError


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
    for s in ma["shards"]:  # the files themselves, not only what the manifests say of them
        assert (a / s["file"]).read_bytes() == (b / s["file"]).read_bytes()
    assert ma["transform"] == mb["transform"] and mb["transform"]["alpha"] == 0.1
    assert ma["alpha_conventions"] == mb["alpha_conventions"] == {"tfgenzoo": 0.1, "realnvp": 0.05}

    # info gives the dataset's alpha in both conventions, and the interval it squeezes into
    r = cli("info", b, "--json")
    s = json.loads(r.stdout)
    assert s["alpha_conventions"] == {"tfgenzoo": 0.1, "realnvp": 0.05}
    assert s["squeeze"] == [0.05, 0.95]
    text = cli("info", b).stdout
    assert "alpha        tfgenzoo 0.1, realnvp 0.05  (p in [0.05, 0.95])" in text


@pytest.mark.parametrize("alpha", ["0.5", "0.7", "0.999"])
def test_realnvp_alpha_must_leave_room(image_folder, tmp_path, cli, alpha):
    root, _ = image_folder
    r = cli("encode", root, "-o", tmp_path / "x", "--alpha-convention", "realnvp", "--alpha", alpha)
    assert r.exit_code == 2 and "(0, 0.5)" in r.output and "[alpha, 1-alpha]" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "x").exists()


def test_an_alpha_outside_its_convention_is_a_named_usage_error():
    with pytest.raises(AlphaOutOfRange) as e:
        tool_alpha(0.5, "realnvp")
    assert isinstance(e.value, UsageError) and e.value.exit_code == 2
    assert (e.value.alpha, e.value.convention, e.value.low, e.value.high) == (0.5, "realnvp", 0.0, 0.5)
    with pytest.raises(AlphaOutOfRange):
        tool_alpha(1.0, "tfgenzoo")
    with pytest.raises(UsageError, match="glow"):
        tool_alpha(0.1, "glow")


@given(st.floats(1e-9, 0.5, exclude_max=True))
def test_doubling_is_exact(a):
    """Both spellings name the same squeeze, bit for bit: RealNVP's [a, 1-a] is this tool's [alpha/2, 1-alpha/2]."""
    ours = tool_alpha(a, "realnvp")
    assert ours / 2 == a and alpha_equivalents(ours)["realnvp"] == a


def test_a_manifest_whose_alpha_conventions_lie_is_refused(image_folder, tmp_path, cli):
    root, _ = image_folder
    out = tmp_path / "ds"
    assert cli("encode", root, "-o", out, "--alpha", "0.1", "-q").exit_code == 0
    m = json.loads((out / "manifest.json").read_text())
    m["alpha_conventions"]["realnvp"] = 0.1
    (out / "manifest.json").write_text(json.dumps(m))
    r = cli("info", out)
    assert r.exit_code == 1 and "alpha_conventions" in r.output
