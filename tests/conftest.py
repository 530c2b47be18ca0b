import os
import signal
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# A suite started in the background (`cmd &` in a script, nohup) inherits Ctrl-C ignored, and so would
# every command-line process the tests stop with SIGINT. A handled signal is reset to the default in
# the processes this one starts, which then take Ctrl-C as a user's terminal would give it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

sys.path.insert(0, os.path.dirname(__file__))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest_plugins = ["s3server"]  # a real S3-compatible server on loopback, for the bucket tests
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True,
                          derandomize=bool(os.environ.get("CI")))
settings.load_profile("ci")


def photo(rng, h, w, c=3):
    """A smooth, noisy, photo-like uint8 image with the full 0..255 range used."""
    y = np.linspace(0, 1, h)[:, None, None]
    x = np.linspace(0, 1, w)[None, :, None]
    base = rng.uniform(0, 255, c) * (1 - y) + rng.uniform(0, 255, c) * x
    img = base + rng.normal(0, 20, (h, w, c))
    img[0, 0] = 0
    img[-1, -1] = 255
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def save(path, arr, **kw):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
    Image.fromarray(a).save(path, **kw)
    return path


def small_pngs(folder, rng, n: int):
    """`folder` holding n photo-like 8x8 PNGs named 0.png, 1.png, ...; returns it."""
    for i in range(n):
        save(str(folder / f"{i}.png"), photo(rng, 8, 8))
    return folder


@pytest.fixture
def image_folder(tmp_path, rng):
    """Two class folders of 32x24 RGB PNGs; returns (folder, {key: array})."""
    root = tmp_path / "images"
    truth = {}
    for cls, n in (("cats", 7), ("dogs", 6)):
        for i in range(n):
            arr = photo(rng, 24, 32)
            key = f"{cls}/{cls[:-1]}_{i:02d}.png"
            save(str(root / key), arr)
            truth[key] = arr
    return root, truth


@pytest.fixture
def dataset(cli, image_folder, tmp_path):
    """image_folder encoded in shards of 5: (source folder, {key: pixels}, dataset folder)."""
    src, truth = image_folder
    out = tmp_path / "ds"
    r = cli("encode", src, "-o", out, "--shard-size", "5")
    assert r.exit_code == 0, r.output
    return src, truth, out


@pytest.fixture
def cli():
    """Invoke the CLI in-process; returns the click Result."""
    from click.testing import CliRunner

    from logitify_cli.cli import main

    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


def damage(data: bytes, at, byte: int, how: str) -> bytes:
    """`data` with one byte flipped, cut there, or extended: at an index (int) or a fraction of the length (float)."""
    from hypothesis import assume

    i = min(len(data) - 1, at if isinstance(at, int) else int(at * len(data)))
    if how == "flip":
        assume(data[i] != byte)
        return data[:i] + bytes([byte]) + data[i + 1:]
    if how == "cut":
        return data[:i]
    return data + bytes([byte]) * i


def fail_third_shard(monkeypatch, error, partial=False, split="train"):
    """Make the write of a split's third npz shard (index 2) raise `error`; returns the real method."""
    from logitify_cli.formats.npz import NpzShardWriter

    real = NpzShardWriter._finish

    def failing(self):
        if self.file.startswith(f"{split}-00002-"):
            if partial:
                with open(self.tmp, "ab") as f:
                    f.write(b"partial")
            raise error
        return real(self)

    monkeypatch.setattr(NpzShardWriter, "_finish", failing)
    return real
