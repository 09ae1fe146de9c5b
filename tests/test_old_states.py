"""A state saved by the Loader before it was untangled (issue 25) loads into today's Loader
and resumes to the very batches the old code yielded after it.

``fixtures/old_states.json`` was written once by ``fixtures/make_old_states.py`` at the commit
it names, from the data conftest's ``sample_lmdb`` makes (the same tree, seed and conversion
arguments, recorded in the file); the steps it took (``replay``) are the ones these tests take. Each case holds the Loader arguments, the saved state and
the records, targets and a pixel digest of every batch that followed it.
"""
import json
import os

import numpy as np
import pytest
from fixtures.make_old_states import batches, replay

from imagenet_seq import format as fmt
from imagenet_seq.data import Loader
from imagenet_seq.loader.state import fingerprint
from imagenet_seq.read.reader import SplitReader

@pytest.fixture(scope="module")
def old_order_lmdb(sample_tree, tmp_path_factory):
    """conftest's sample_lmdb as the converter of the fixture's commit wrote it: train in the
    permutation of the sorted file list that ``plan_order`` was then (the one part of the
    conversion that changed since: ``convert/write_order.py``)."""
    from imagenet_seq.convert import writer
    from imagenet_seq.convert.cli import main

    def permutation_order(scan, split, seed):
        if split == "train":
            perm = np.random.default_rng(seed).permutation(len(scan.entries))
            return [scan.entries[i] for i in perm]
        return list(scan.entries)

    out = str(tmp_path_factory.mktemp("lmdb_old_order"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(writer, "plan_order", permutation_order)
        assert main([sample_tree[0], out] + OLD["convert_args"]) == 0
    return out


FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "old_states.json")
with open(FIXTURE) as _f:
    OLD = json.load(_f)


def test_the_fixture_was_made_from_the_sample_data():
    assert OLD["sample_tree"] == dict(train_per_class=12, val_per_class=3, num_classes=4, seed=1)
    assert OLD["convert_args"] == ["--workers", "0", "--no-progress"]
    assert len(OLD["cases"]) == 4


@pytest.mark.parametrize("case", OLD["cases"], ids=[c["name"] for c in OLD["cases"]])
def test_an_old_state_resumes_to_the_old_batches(old_order_lmdb, case):
    state = dict(case["state"])
    reader = SplitReader(old_order_lmdb, case["mode"])
    same_bytes = fingerprint(reader.meta) == state["fingerprint"]
    reader.close()
    if not same_bytes:
        # another JPEG encoder wrote other bytes for the same sample photos: the file is not
        # the one the state came from, so only the order (records, labels) can be compared
        state["fingerprint"] = fingerprint(SplitReader(old_order_lmdb, case["mode"]).meta)
    ld = Loader(old_order_lmdb, case["mode"], num_workers=OLD["num_workers"], **case["kwargs"])
    ld.load_state_dict(state)
    assert ld.state_dict()["epoch"] == state["epoch"]
    got = batches(ld, iter(ld))
    ld.close()
    want = case["next_batches"]
    assert [g["records"] for g in got] == [w["records"] for w in want]
    assert [g["targets"] for g in got] == [w["targets"] for w in want]
    if same_bytes:
        assert [g["pixels_sha256"] for g in got] == [w["pixels_sha256"] for w in want]
    # and the state saved now, at the end, is the one the old code saved there
    assert ld.state_dict()["batches"] == 0
    assert ld.state_dict()["format_version"] == fmt.FORMAT_VERSION


@pytest.mark.parametrize("case", OLD["cases"], ids=[c["name"] for c in OLD["cases"]])
def test_the_same_steps_save_the_same_state_as_before(old_order_lmdb, case):
    ld = Loader(old_order_lmdb, case["mode"], num_workers=OLD["num_workers"], **case["kwargs"])
    it = replay(ld, case)
    now = ld.state_dict()
    del it
    ld.close()
    old = dict(case["state"])
    assert now["plan"] == "rank-1"  # today's plan: the node reader is off for these Loaders
    ignore = {"path", "plan", "local_world_size"} | (
        {"fingerprint"} if now["fingerprint"] != old["fingerprint"] else set())
    assert {k: v for k, v in now.items() if k not in ignore} == \
        {k: v for k, v in old.items() if k not in ignore}
