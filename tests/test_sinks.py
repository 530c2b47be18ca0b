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
    w = HashingWriter(str(path))
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
    w = HashingWriter("/dev/full")
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
