"""The npz reader: stored logits read straight into aligned slices, and still refused when altered."""
import io
import zipfile

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from logitify_cli.errors import LogitifyError
from logitify_cli.formats.npz import NpzFormat


def arrays(rng, n, shape):
    return {"logits": rng.standard_normal((n, *shape)).astype("<f4"),
            "logdet": rng.standard_normal(n).astype("<f4"),
            "keys": np.array([f"k/{i}é.png" for i in range(n)]) if n else np.zeros(0, "<U1"),
            "labels": rng.integers(-1, 5, n).astype("<i8")}


def write(path, a, how):
    if how == "savez":  # NumPy's own writer: sizes in the local headers
        np.savez(path, **a)
    else:  # logitify's writer: streamed entries with data descriptors
        w = NpzFormat().writer(str(path.parent), path.name, a["logits"].shape[1:], len(a["keys"]), False)
        w.add(list(a["keys"]), a["labels"], a["logits"], a["logdet"])
        w.close()


def logits_span(data: bytes):
    """(start, end) of the logits member's bytes in the zip file."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo("logits.npy")
    h = info.header_offset
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little")
    return start, start + info.file_size


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), shape=st.sampled_from([(1, 1, 1), (3, 5, 3), (24, 24, 4)]),
       rows=st.integers(1, 50), how=st.sampled_from(["savez", "writer"]), seed=st.integers(0, 2**32 - 1))
@example(n=0, shape=(3, 5, 3), rows=1, how="writer", seed=0)  # an empty shard: the writer gets an empty batch
def test_stored_shards_read_as_numpy_reads_them_in_aligned_slices(tmp_path_factory, n, shape, rows, how, seed):
    path = tmp_path_factory.mktemp("npz") / "s.npz"
    a = arrays(np.random.default_rng(seed), n, shape)
    write(path, a, how)
    chunks = list(NpzFormat().read_chunks(str(path), shape, n, False, rows=rows))
    assert [len(c["keys"]) for c in chunks] == [min(rows, n - i) for i in range(0, n, rows)]
    for c in chunks:
        assert c["logits"].ctypes.data % 64 == 0 and c["logits"].dtype == np.float32
    with np.load(path, allow_pickle=False) as z:
        for f in a:
            got = np.concatenate([c[f] for c in chunks]) if chunks else np.zeros((0,) + z[f].shape[1:], z[f].dtype)
            assert np.array_equal(got, z[f]) and np.array_equal(got, a[f])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), how=st.sampled_from(["savez", "writer"]), rows=st.sampled_from([1, 3, 100]))
def test_any_altered_logits_byte_is_refused(tmp_path_factory, data, how, rows):
    """The loader does not re-hash shards: the zip's CRC-32 is what stands between a flipped bit and a model."""
    folder = tmp_path_factory.mktemp("npz")
    n, shape = 7, (16, 16, 3)  # larger than zipfile's read-ahead, which would check a small member's CRC itself
    a = arrays(np.random.default_rng(0), n, shape)
    write(folder / "s.npz", a, how)
    raw = bytearray((folder / "s.npz").read_bytes())
    start, end = logits_span(bytes(raw))
    i = data.draw(st.integers(start, end - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    (folder / "s.npz").write_bytes(bytes(raw))
    with pytest.raises(LogitifyError, match="s.npz"):
        for _ in NpzFormat().read_chunks(str(folder / "s.npz"), shape, n, False, rows=rows):
            pass


def test_bytes_past_the_arrays_count_in_the_crc(tmp_path):
    """A logits member longer than its array is read to its end for the CRC, and refused if that tail was altered."""
    shape = (32, 32, 1)  # larger than zipfile's read-ahead
    a = arrays(np.random.default_rng(1), 3, shape)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a["logits"], allow_pickle=False)
    member = buf.getvalue() + b"tail"
    for altered in (False, True):
        path = tmp_path / f"s{altered}.npz"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("logits.npy", member)
            for f in ("logdet", "keys", "labels"):
                b = io.BytesIO()
                np.lib.format.write_array(b, a[f], allow_pickle=False)
                z.writestr(f + ".npy", b.getvalue())
        if altered:
            raw = bytearray(path.read_bytes())
            at = logits_span(bytes(raw))[1] - 1
            raw[at] ^= 1
            path.write_bytes(bytes(raw))
            with pytest.raises(LogitifyError, match="CRC") as caught:
                list(NpzFormat().read_chunks(str(path), shape, 3, False))
            # Named fields, kept across a process boundary (a Beam worker's error reaches the launcher whole).
            import pickle

            from logitify_cli.errors import ShardError

            back = pickle.loads(pickle.dumps(caught.value))
            assert isinstance(back, ShardError) and (back.file, back.message) == (path.name, caught.value.message)
            assert "CRC" in back.problem and back.message == f"shard {path.name}: {back.problem}"
        else:
            got = np.concatenate([c["logits"] for c in NpzFormat().read_chunks(str(path), shape, 3, False, rows=2)])
            assert np.array_equal(got, a["logits"])


def test_a_header_numpy_cannot_tokenize_is_refused_not_raised():
    """A newline inside the .npy header dict makes NumPy's tokenizer raise TokenError: still a refusal by name."""
    import io

    import pytest

    from logitify_cli.errors import LogitifyError
    from logitify_cli.formats.npz import _npy_header

    buf = io.BytesIO()
    np.save(buf, np.zeros((7, 16, 16, 3), "<f4"))
    bad = bytearray(buf.getvalue())
    bad[10] = ord("\n")
    with pytest.raises(LogitifyError, match="logits is not a NumPy array"):
        _npy_header(io.BytesIO(bytes(bad)), "s.npz", "logits")


@pytest.mark.parametrize("compress", [False, True])
def test_the_piece_size_of_the_logits_write_never_changes_a_shard(tmp_path, monkeypatch, compress):
    """Logits go into the zip a piece at a time (for the cache's sake): any piece size, the same bytes.

    Batches of several MiB (more than one piece) and read-only arrays, as
    the transform hands them over, beside a shard short of examples (which
    is written again from its draft).
    """
    from logitify_cli.formats import npz

    rng = np.random.default_rng(4)
    shape = (64, 64, 3)  # 48 KiB of logits an image: a batch of 60 is 2.8 MiB
    a = arrays(rng, 100, shape)
    batches = [slice(0, 60), slice(60, 61), slice(61, 61), slice(61, 100)]

    def shard(piece, expected):
        monkeypatch.setattr(npz, "WRITE_PIECE", piece)
        folder = tmp_path / f"{piece}-{expected}"
        folder.mkdir()
        w = NpzFormat().writer(str(folder), "s.npz", shape, expected, compress)
        for b in batches:
            logits = a["logits"][b]
            logits.flags.writeable = False
            w.add(list(a["keys"][b]), a["labels"][b], logits, a["logdet"][b])
        w.close()
        return (folder / "s.npz").read_bytes()

    for expected in (100, 130):
        whole = shard(1 << 30, expected)
        assert shard(1 << 20, expected) == whole and shard(4093, expected) == whole
        with np.load(io.BytesIO(whole), allow_pickle=False) as z:
            assert np.array_equal(z["logits"], a["logits"]) and list(z["keys"]) == list(a["keys"])


@pytest.mark.parametrize("n", [3, 20])
def test_logits_of_another_dtype_are_named_so_whatever_their_size(tmp_path, n):
    """float64 logits take twice the bytes the manifest allows: the header's dtype is what is wrong, and said."""
    a = arrays(np.random.default_rng(0), n, (8, 8, 3))
    a["logits"] = a["logits"].astype("<f8")
    np.savez(tmp_path / "s.npz", **a)
    with pytest.raises(LogitifyError, match=r"logits are float64 \[" + str(n) + r", 8, 8, 3\], expected float32"):
        list(NpzFormat().read_chunks(str(tmp_path / "s.npz"), (8, 8, 3), n, False))
