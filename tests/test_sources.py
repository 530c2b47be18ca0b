"""Sources: the compact item list gives back exactly the items it was made from."""
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import photo, save
from logitify_cli.sources import ORDER, Item, ItemList, discover

_text = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=40)


@st.composite
def items(draw):
    """Images from folders (with and without classes), single files and TFRecord records."""
    roots = draw(st.lists(_text.map(lambda t: "/data/" + t + "/"), min_size=1, max_size=3))
    classes = draw(st.lists(_text, min_size=1, max_size=4))
    out = []
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["folder", "file", "record"]))
        key = draw(_text)
        label = draw(st.integers(-1, 2**40))
        if kind == "folder":
            cls = draw(st.none() | st.sampled_from(classes))
            out.append(Item(key, key, draw(st.sampled_from(roots)), label=label, class_name=cls, relative=True))
        elif kind == "file":
            out.append(Item(key, key, "./" + key, label=label))
        else:
            name = draw(_text)
            index = draw(st.integers(0, 2**40))
            out.append(Item(name, f"{name}:{index}", "/tfr/" + name, index=index, label=label))
    out.sort(key=ORDER)
    return out


@settings(max_examples=200, deadline=None)
@given(items=items(), data=st.data())
def test_item_list_gives_back_every_item(items, data):
    stored = ItemList(items)
    assert len(stored) == len(items)
    assert list(stored) == items
    assert [stored[i] for i in range(len(items))] == items
    assert [it.path for it in stored] == [it.path for it in items]
    if items:
        assert stored[-1] == items[-1]
        a = data.draw(st.integers(0, len(items)))
        b = data.draw(st.integers(a, len(items)))
        assert stored[a:b] == items[a:b]
        picked = data.draw(st.lists(st.integers(0, len(items) - 1), max_size=10))
        assert list(stored.select(picked)) == [items[i] for i in picked]
    with pytest.raises(IndexError):
        stored[len(items)]


def test_discovered_items_point_at_the_files(tmp_path, rng):
    for rel in ("b/z.png", "a/deep/x.png", "loose.png", ".hidden.png", "a/._x.png", "a/notes.txt"):
        save(str(tmp_path / "src" / rel), photo(rng, 4, 4), format="PNG")
    inv = discover([str(tmp_path / "src")])
    assert isinstance(inv.items, ItemList)
    got = [(it.key, it.label, it.class_name) for it in inv.items]
    assert got == [("a/deep/x.png", 0, "a"), ("b/z.png", 1, "b"), ("loose.png", -1, None)]
    for it in inv.items:
        assert os.path.samefile(it.path, tmp_path / "src" / it.key)


@settings(max_examples=150, deadline=None)
@given(items=items(), run=st.integers(1, 7), data=st.data())
def test_sorted_runs_give_one_stable_sort_of_everything(items, run, data):
    """Discovery packs as it goes, in sorted runs merged at the end: the order of one stable sort."""
    from logitify_cli import sources

    found = data.draw(st.permutations(items))  # in the order a disk might list them
    runs = sources.SortedRuns()
    runs.RUN = run
    runs.extend(found)
    assert len(runs) == len(found)
    packed = runs.sorted()
    assert list(packed) == sorted(found, key=ORDER)
    assert list(packed.keys()) == [it.key for it in sorted(found, key=ORDER)]
    assert packed.class_names() == sorted({it.class_name for it in found if it.class_name is not None})


@settings(max_examples=100, deadline=None)
@given(items=items(), cut=st.lists(st.integers(0, 40), max_size=4))
def test_joined_lists_equal_the_list_of_everything(items, cut):
    bounds = sorted({0, len(items), *[min(c, len(items)) for c in cut]})
    parts = [ItemList(items[a:b]) for a, b in zip(bounds, bounds[1:])] or [ItemList([])]
    joined = ItemList.join(parts)
    assert list(joined) == items and len(joined) == len(items)
    if items:
        assert joined[len(items) // 2] == items[len(items) // 2]


def test_a_shared_key_is_found_among_many_whatever_the_runs(tmp_path, monkeypatch):
    """The duplicate check compares hashes first: two files keyed alike are still named, and only they."""
    from logitify_cli import sources
    from logitify_cli.errors import LogitifyError

    monkeypatch.setattr(sources.SortedRuns, "RUN", 5)
    many = [Item(f"k{i:03d}", f"k{i:03d}", "/a/", relative=True) for i in range(40)]
    inv = sources.inventory(list(reversed(many)), [])
    assert [it.key for it in inv.items] == [it.key for it in many]
    twin = Item("k017", "k017", "/b/", relative=True)
    with pytest.raises(LogitifyError, match=r"share the key 'k017' \(/a/k017 and /b/k017\)"):
        sources.inventory(many + [twin], [])


def test_a_folder_of_many_images_is_discovered_in_runs(tmp_path, rng, monkeypatch):
    """A folder walk hands its images over as found; runs of a few give the same inventory as one run."""
    from logitify_cli import sources

    for i in range(23):
        save(str(tmp_path / "src" / f"c{i % 3}" / f"{(i * 7) % 23:02d}.png"), photo(rng, 2, 2), format="PNG")
    save(str(tmp_path / "src" / "c1-loose.png"), photo(rng, 2, 2), format="PNG")
    whole = discover([str(tmp_path / "src")])
    monkeypatch.setattr(sources.SortedRuns, "RUN", 4)
    runs = discover([str(tmp_path / "src")])
    assert list(runs.items) == list(whole.items) and runs.classes == whole.classes == ["c0", "c1", "c2"]
    keys = [it.key for it in runs.items]
    assert keys == sorted(keys) and len(keys) == 24 and keys[:2] == ["c0/00.png", "c0/09.png"]
    assert ("c1-loose.png", -1) in [(it.key, it.label) for it in runs.items]


@settings(max_examples=300, deadline=None)
@given(total=st.integers(0, 3000), n=st.integers(1, 400), tail=st.integers(0, 2000), known=st.booleans(),
       weights=st.lists(st.integers(0, 50), min_size=1, max_size=7), cap=st.one_of(st.none(), st.integers(1, 300)))
def test_read_jobs_hold_every_input_once_in_order_and_shrink_at_the_end(total, n, tail, known, weights, cap):
    """What the readers are given: all inputs in order, jobs of n (n/8 for the last `tail` inputs), none heavier than needed."""
    from logitify_cli.pixels import chunks

    def weight(x):
        return weights[x % len(weights)]

    jobs = list(chunks(iter(range(total)), n, total if known else None, tail, weight, cap))
    assert [x for job in jobs for x in job] == list(range(total))
    small = max(1, n // 8)
    done = 0
    for job in jobs:
        size = n if not known or total - done > tail else small
        assert 0 < len(job) <= size
        heavy = cap is not None and sum(map(weight, job)) >= cap
        if job is not jobs[-1]:  # a job ends when it is full, or once it reaches the weight cap
            assert len(job) == size or heavy
        if cap is not None:  # and not an item later than that
            assert sum(map(weight, job[:-1])) < cap
        done += len(job)


def test_a_source_inside_another_source_is_refused(tmp_path, rng):
    """Keys are relative to each source: a folder inside another would give its images twice, under two keys."""
    from conftest import photo, save
    from logitify_cli.errors import UsageError
    from logitify_cli.sources import discover

    inner = tmp_path / "in" / "s1" / "objects"
    for i in range(3):
        save(str(inner / f"{i}.png"), photo(rng, 4, 4))
    save(str(tmp_path / "in" / "s1" / "top.png"), photo(rng, 4, 4))
    outer = tmp_path / "in" / "s1"
    for paths in ([outer, inner], [inner, outer], [outer, outer / "top.png"], [str(tmp_path / "in") + "/./s1", inner]):
        with pytest.raises(UsageError, match="inside"):
            discover([str(p) for p in paths])
    assert len(discover([str(inner), str(outer / "top.png")]).items) == 4  # side by side: each once
    # What the walk never takes may be named beside its folder: hidden entries, files without an image name.
    save(str(outer / ".extra" / "b.png"), photo(rng, 4, 4))
    (outer / "notes.raw").write_bytes(b"x")
    assert len(discover([str(outer), str(outer / ".extra" / "b.png")]).items) == 5
    discover([str(outer), str(outer / "notes.raw")])
    # A link to a folder is walked: a source reached through it is inside too.
    elsewhere = tmp_path / "elsewhere"
    save(str(elsewhere / "x.png"), photo(rng, 4, 4))
    os.symlink(elsewhere, outer / "link")
    with pytest.raises(UsageError, match="inside"):
        discover([str(outer), str(outer / "link" / "x.png")])
    # And a file named through a link to the folder itself.
    os.symlink(outer, tmp_path / "alias")
    with pytest.raises(UsageError, match="inside"):
        discover([str(outer), str(tmp_path / "alias" / "top.png")])
