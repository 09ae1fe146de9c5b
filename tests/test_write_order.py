"""The train write order is a seeded hash of each relative path (convert/write_order.py):
computable per record, so sources that differ by a few files keep the others' relative order."""
import os
import shutil

import pytest

from imagenet_seq.convert.cli import main
from imagenet_seq.convert.write_order import train_key, write_order
from imagenet_seq.read.reader import SplitReader


def _records(out, split="train"):
    r = SplitReader(out, split)
    try:
        return [(lab, bytes(b)) for _, b, lab in r.read_spans([(0, len(r))])]
    finally:
        r.close()


def test_keys_depend_on_path_and_seed_only():
    assert train_key("n01/a.JPEG", 0) == train_key("n01/a.JPEG", 0)
    assert train_key("n01/a.JPEG", 0) != train_key("n01/a.JPEG", 1)
    assert train_key("n01/a.JPEG", 0) != train_key("n01/b.JPEG", 0)
    assert len(train_key("x", -(1 << 80))) == 8  # any int seed
    entries = [(f"c{i % 3}/f{i}.jpg", i % 3) for i in range(50)]
    order = write_order(entries, "train", 7)
    assert sorted(order) == sorted(entries) and order != sorted(entries)
    assert write_order(list(reversed(entries)), "train", 7) == order  # input order irrelevant
    assert write_order(entries, "val", 7) == sorted(entries)
    keys = [train_key(rel, 7) for rel, _ in order]
    assert keys == sorted(keys)


@pytest.mark.timeout(600)
def test_dropping_files_keeps_the_others_in_order(sample_tree, tmp_path):
    tree = sample_tree[0]
    full = str(tmp_path / "full")
    assert main([tree, full, "--splits", "train", "--workers", "0",
                 "--no-progress"]) == 0
    fewer_src = str(tmp_path / "src")  # a copy of the tree without three train files
    shutil.copytree(tree, fewer_src)
    gone = []
    for cls in sorted(os.listdir(os.path.join(fewer_src, "train")))[:3]:
        d = os.path.join(fewer_src, "train", cls)
        name = sorted(f for f in os.listdir(d) if not f.startswith("."))[0]
        with open(os.path.join(d, name), "rb") as f:
            gone.append(f.read())
        os.remove(os.path.join(d, name))
    fewer = str(tmp_path / "fewer")
    assert main([fewer_src, fewer, "--splits", "train", "--workers", "0",
                 "--no-progress"]) == 0
    a, b = _records(full), _records(fewer)
    assert len(b) == len(a) - 3
    assert [r for r in a if r[1] not in gone] == b
