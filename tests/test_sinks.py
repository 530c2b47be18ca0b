"""The shard writer's hashing file: the sha256 in a manifest is the file's."""
import errno
import hashlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitify_cli.formats.npz import HashingWriter

BIG = HashingWriter.PARALLEL_BYTES


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 100, BIG - 1, BIG, BIG + 7, 3 * BIG]), max_size=6),
       seed=st.integers(0, 2**32 - 1))
def test_hashes_and_writes_the_same_bytes_in_order(tmp_path_factory, sizes, seed):
    rng = np.random.default_rng(seed)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    path = tmp_path_factory.mktemp("w") / "f.bin"
    w = HashingWriter(os.open(path, os.O_WRONLY | os.O_CREAT))
    for i, c in enumerate(chunks):  # numpy buffers and bytes, as zipfile hands them over
        assert w.write(c.data if i % 2 else c.tobytes()) == c.size
    assert w.tell() == sum(sizes)
    w.close()
    data = path.read_bytes()
    assert data == b"".join(c.tobytes() for c in chunks)
    assert w.sha256.hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("size", [100, 2 * BIG])
def test_a_failed_write_raises(size):
    w = HashingWriter(os.open("/dev/full", os.O_WRONLY))
    with pytest.raises(OSError) as e:
        w.write(b"x" * size)
        w.flush()
    assert e.value.errno == errno.ENOSPC
    try:
        w.close()
    except OSError:
        pass


@settings(max_examples=60)
@given(h=st.integers(1, 40), w=st.integers(1, 40), c=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 2**32 - 1))
def test_decode_pngs_read_back_as_their_pixels(h, w, c, seed):
    """decode's own PNG writer: Pillow reads back every pixel, in the mode the channels say."""
    import io as _io

    from PIL import Image as _Image

    from logitify_cli.outputs import png_bytes

    arr = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    img = _Image.open(_io.BytesIO(png_bytes(arr)))
    assert img.mode == {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[c]
    back = np.asarray(img)
    assert np.array_equal(back.reshape(h, w, c), arr)


@pytest.mark.parametrize("fmt", ["npz", "tfrecord"])
def test_a_shard_is_never_written_through_a_link_at_its_temporary_name(tmp_path, fmt, monkeypatch):
    """Someone who can write the output folder puts a link at a run's temporary shard name, before the
    writer opens it or while it writes: the file outside stays as it was, and no link becomes a shard."""
    from logitify_cli import fs
    from logitify_cli.errors import LogitifyError
    from logitify_cli.formats import get
    from logitify_cli.formats.base import temp_name

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"someone's file")
    out = tmp_path / "out"
    out.mkdir()
    f = get(fmt)
    name = f.shard_file("d", "train", 0, 1)
    logits = np.ones((2, 4, 4, 3), np.float32)

    os.symlink(victim, temp_name(str(out / name)))
    w = f.writer(str(out), name, (4, 4, 3), 2, False)
    w.add(["a", "b"], [-1, -1], logits, np.zeros(2, np.float32))
    w.close()
    assert victim.read_bytes() == b"someone's file"
    assert os.path.isfile(out / name) and not os.path.islink(out / name)

    w = f.writer(str(out), name, (4, 4, 3), 2, False)
    os.unlink(w.tmp)
    os.symlink(victim, w.tmp)
    w.add(["a", "b"], [-1, -1], logits, np.zeros(2, np.float32))
    with pytest.raises(LogitifyError, match="replaced while it was written"):
        w.close()
    assert victim.read_bytes() == b"someone's file" and not os.path.lexists(w.tmp)

    # The link appears between the file's making and its opening by the format's library (TensorFlow's
    # TFRecordWriter opens by name): the library writes the file that was made, not the link.
    real = fs.create_new

    def create_then_swap(tmp):
        fd = real(tmp)
        os.unlink(tmp)
        os.symlink(victim, tmp)
        return fd

    monkeypatch.setattr(fs, "create_new", create_then_swap)
    w = f.writer(str(out), name, (4, 4, 3), 2, False)
    w.add(["a", "b"], [-1, -1], logits, np.zeros(2, np.float32))
    with pytest.raises(LogitifyError, match="replaced while it was written"):
        w.close()
    assert victim.read_bytes() == b"someone's file" and not os.path.lexists(w.tmp)
