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
