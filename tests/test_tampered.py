"""Issue 22, items 6 and 8: tampered resume states, and a split changed after conversion.

Item 6: every field of a resume state is checked (name, value, what is allowed; a bool is not
an int), and the Loader's image_size / resize_size have an upper bound (4096).
Item 8: a label that differs from ``__labels__`` is an error on every read path (offsets index,
B-tree, LoaderDataset, tensorpack's LMDBSource), and the advice of the stale-index warning,
followed as printed, gives a full, correct epoch over a file whose records moved.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import warnings

import lmdb
import numpy as np
import pytest
import torch

from conftest import strip_offsets
from imagenet_seq import format as fmt
from imagenet_seq.data import Loader
from imagenet_seq.format import offsets
from imagenet_seq.loader.config import MAX_IMAGE_SIZE
from imagenet_seq.read.readahead import forward_runs
from imagenet_seq.read.reader import SplitReader

SMALL = dict(batch_size=5, seed=3, image_size=32, resize_size=40, num_workers=0,
             buffer_size=8, chunk_size=6)

# a hang fails the one test with its stacks (pytest-timeout; see conftest.py)
pytestmark = pytest.mark.timeout(300)


# -- item 6: resume states ----------------------------------------------------------------------

def _mid_epoch_state(root):
    a = Loader(root, "train", **SMALL)
    a.set_epoch(1)
    it = iter(a)
    for _ in range(2):
        next(it)
    sd = a.state_dict()
    a.close()
    assert sd["batches"] == 2
    return sd


TAMPERED = [  # (field, value, what the error must say is allowed)
    ("skipped", -7, "an int >= 0"),
    ("skipped", "abc", "an int >= 0"),
    ("skipped", 2.5, "an int >= 0"),
    ("skipped", True, "an int >= 0"),
    ("image_size", 100000, f"an int in 1..{MAX_IMAGE_SIZE}"),
    ("image_size", 0, f"an int in 1..{MAX_IMAGE_SIZE}"),
    ("image_size", True, f"an int in 1..{MAX_IMAGE_SIZE}"),
    ("epoch", True, "an int >= 0"),
    ("epoch", -1, "an int >= 0"),
    ("epoch", "1", "an int >= 0"),
    ("seed", True, "an int >= 0"),
    ("seed", 3.0, "an int >= 0"),
    ("batch_size", 0, "an int >= 1"),
    ("batch_size", "5", "an int >= 1"),
    ("drop_last", 0, "True or False"),
    ("shuffle", "yes", "True or False"),
    ("world_size", 0, "an int >= 1"),
    ("rank", 1, "an int in 0..0"),
    ("rank", -1, "an int in 0..0"),
    ("chunk_size", 0, "an int >= 1"),
    ("buffer_size", -1, "an int >= 0"),
    ("num_records", -48, "an int >= 0"),
    ("num_records", 48.0, "an int >= 0"),
    ("mode", "test", "one of 'train', 'val'"),
    ("mode", ["train"], "one of 'train', 'val'"),
    ("fingerprint", 12345, "a str"),
    ("path", None, "a str"),
    ("format_version", "1", "an int, or None"),
]


def test_every_tampered_field_is_named_with_its_value_and_range(sample_lmdb):
    sd = _mid_epoch_state(sample_lmdb)
    ld = Loader(sample_lmdb, "train", **SMALL)
    before = ld.state_dict()
    for key, value, allowed in TAMPERED:
        bad = dict(sd, **{key: value})
        with pytest.raises(ValueError) as e:
            ld.load_state_dict(bad)
        msg = str(e.value)
        assert f"{key}={value!r}; expected {allowed}" in msg, (key, value, msg)
        assert "state_dict()" in msg  # the way out
        assert ld.state_dict() == before, (key, value)  # nothing of it was applied
    # batches: after the fields that fix len(loader), its range is that length
    for value in (-7, 11, True, "3"):
        with pytest.raises(ValueError, match=rf"batches={value!r}; expected an int"):
            ld.load_state_dict(dict(sd, batches=value))
    with pytest.raises(ValueError, match=r"state version True is unknown"):
        ld.load_state_dict(dict(sd, version=True))
    with pytest.raises(ValueError, match=r"lacks \['skipped'\]"):
        ld.load_state_dict({k: v for k, v in sd.items() if k != "skipped"})
    # the Loader is unharmed: the real state still resumes, and the epoch completes
    ld.load_state_dict(sd)
    assert len(list(ld)) == len(ld) - 2
    ld.close()


def test_image_size_at_the_bound_loads_and_above_it_is_refused_before_any_allocation(
        sample_lmdb):
    sd = _mid_epoch_state(sample_lmdb)
    ld = Loader(sample_lmdb, "train", **SMALL)
    ld.load_state_dict(dict(sd, image_size=MAX_IMAGE_SIZE))
    assert ld.image_size == MAX_IMAGE_SIZE and ld.state_dict()["image_size"] == MAX_IMAGE_SIZE
    with pytest.raises(ValueError, match=rf"image_size={MAX_IMAGE_SIZE + 1}; expected an int "
                                         rf"in 1\.\.{MAX_IMAGE_SIZE}"):
        ld.load_state_dict(dict(sd, image_size=MAX_IMAGE_SIZE + 1))
    assert ld.image_size == MAX_IMAGE_SIZE  # the refused state changed nothing
    ld.close()


def test_a_loaders_own_state_loads_back_also_through_json(sample_lmdb):
    """Arguments of other int/bool types (numpy ints, 0/1 flags) are saved as int and bool."""
    kw = dict(SMALL, seed=np.int64(3), drop_last=0, batch_size=np.int32(5))
    a = Loader(sample_lmdb, "train", **kw)
    a.set_epoch(2)
    it = iter(a)
    first = [next(it) for _ in range(3)]
    sd = a.state_dict()
    rest = [y for _, y in it]
    a.close()
    assert type(sd["seed"]) is int and sd["drop_last"] is False and len(first) == 3
    b = Loader(sample_lmdb, "train", **kw)
    b.load_state_dict(json.loads(json.dumps(sd)))
    assert [y.tolist() for _, y in b] == [y.tolist() for y in rest]
    b.close()


@pytest.mark.parametrize("kw, msg", [
    (dict(image_size=100000), rf"image_size=100000; expected an int in 1\.\.{MAX_IMAGE_SIZE}"),
    (dict(image_size=MAX_IMAGE_SIZE + 1), rf"image_size={MAX_IMAGE_SIZE + 1}; expected"),
    (dict(image_size=True), r"image_size=True; expected an int"),
    (dict(image_size=224.0), r"image_size=224\.0; expected an int"),
    (dict(resize_size=10**6), rf"resize_size=1000000; expected an int in 1\.\.{MAX_IMAGE_SIZE}"),
    (dict(seed=True), r"seed=True; expected a non-negative integer"),
    (dict(batch_size=2.0), r"batch_size=2\.0; expected an int >= 1"),
])
def test_constructor_bounds_sizes(sample_lmdb, kw, msg):
    with pytest.raises(ValueError, match=msg):
        Loader(sample_lmdb, "val", **dict(SMALL, **kw))


def test_set_image_size_has_the_same_bound(sample_lmdb):
    ld = Loader(sample_lmdb, "val", **dict(SMALL, image_size=MAX_IMAGE_SIZE,
                                           resize_size=MAX_IMAGE_SIZE))
    assert ld.image_size == MAX_IMAGE_SIZE  # the bound itself is allowed
    for bad in (MAX_IMAGE_SIZE + 1, 100000, 15, True):
        with pytest.raises(ValueError, match=rf"set_image_size\({bad!r}\); expected an int in "
                                             rf"16\.\.{MAX_IMAGE_SIZE}"):
            ld.set_image_size(bad)
    ld.set_image_size(48)
    x, _ = next(iter(ld))
    assert x.shape[-1] == 48
    ld.close()


# -- item 8: a file changed after conversion ----------------------------------------------------

def _copy_train(src_root, dst_root):
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, fmt.split_filename("train"))
    shutil.copy(fmt.find_split(src_root, "train"), dst)
    return dst


def _rewrite(path, indices, relabel=()):
    """Put records ``indices`` again with lmdb directly, one transaction each (LMDB writes a
    rewritten value to new pages: the record moves); records in ``relabel`` get another label."""
    env = lmdb.open(path, subdir=False, map_size=1 << 30)
    try:
        for i in indices:
            with env.begin(write=True) as txn:
                value = bytes(txn.get(b"%08d" % i))
                label = int.from_bytes(value[:4], "little")
                if i in relabel:
                    label = (label + 1) % 4
                txn.put(b"%08d" % i, label.to_bytes(4, "little") + value[4:])
    finally:
        env.close()
    for extra in (path + "-lock",):
        if os.path.exists(extra):
            os.remove(extra)


def _index(path, n):
    env = fmt.acquire_env(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return offsets.read(env, n, path)
    finally:
        fmt.release_env(path)


def _epoch(root, **kw):
    """(record ids, targets, images) of one full epoch, in order."""
    ld = Loader(root, "train", **dict(SMALL, **kw))
    ids, targets, images = [], [], []
    for x, y in ld:
        ids.extend(ld.last_batch_records.tolist())
        targets.extend(y.tolist())
        images.append(x)
    ld.close()
    return ids, targets, torch.cat(images)


def _stale_warning(root, **kw):
    """Iterate one epoch; return the text of the stale-index warning it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _epoch(root, **kw)
    texts = [str(w.message) for w in caught if "Rebuild the index" in str(w.message)]
    assert texts, [str(w.message) for w in caught]
    return texts[0]


def _follow_advice(warning_text):
    """Run the command the warning prints, as printed (``python`` = this interpreter)."""
    command = warning_text.split("Rebuild the index: ", 1)[1].strip()
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "imagenet_seq.format.offsets", "--rebuild"], command
    done = subprocess.run([sys.executable] + argv[1:], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "offsets index rebuilt" in done.stdout


@pytest.mark.parametrize("kw", [dict(), dict(shuffle=False), dict(chunk_size=48)])
def test_rebuild_advice_after_records_moved_gives_a_full_correct_epoch(sample_lmdb, tmp_path,
                                                                        kw):
    clean_ids, clean_targets, clean_images = _epoch(sample_lmdb, **kw)
    labels = SplitReader(sample_lmdb, "train").labels
    root = str(tmp_path / "moved copy")  # a space: the printed advice must quote the path
    path = _copy_train(sample_lmdb, root)
    n = len(labels)
    before = _index(path, n)
    # the first record of every chunk of 6 (and of the one-span reads): moved, its span's
    # last record not
    _rewrite(path, range(0, n, 6))
    text = _stale_warning(root, **kw)  # read through the B-tree meanwhile: still correct
    _follow_advice(text)
    after = _index(path, n)
    assert after is not None  # the rebuilt index is used: no stale warning below
    assert (after[0][0::6] != before[0][0::6]).all()  # the records did move...
    assert (after[0][0::6] > after[0][5::6]).any()  # ...behind their span's last record
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, targets, images = _epoch(root, **kw)
    assert sorted(ids) == list(range(n))
    assert ids == clean_ids and targets == clean_targets
    assert targets == labels[ids].tolist()
    assert torch.equal(images, clean_images)


def _assert_label_error(call, index, label):
    with pytest.raises(fmt.RecordError) as e:
        call()
    msg = str(e.value)
    assert f"record b'{index:08d}' (index {index})" in msg
    assert f"has label {(label + 1) % 4}, but the file's __labels__ says {label}" in msg
    assert "imagenet-seq-verify" in msg
    assert e.value.index == index


def test_changed_label_is_an_error_on_every_read_path(sample_lmdb, tmp_path):
    labels = SplitReader(sample_lmdb, "train").labels
    k = 13
    root = str(tmp_path / "relabelled")
    path = _copy_train(sample_lmdb, root)
    _rewrite(path, [k, 30], relabel={k})
    no_index = strip_offsets(root, str(tmp_path / "no_index"))

    def paths():
        for kw in (dict(), dict(skip_broken=True), dict(num_workers=1, worker_type="process"),
                   dict(shuffle=False, chunk_size=48)):
            yield lambda kw=kw: _epoch(root, **kw)
        yield lambda: Loader(root, "train", **SMALL).dataset[k]
        yield lambda: list(SplitReader(root, "train").read_range(10, 8))

    # the B-tree path after the stale-index warning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in paths():
            _assert_label_error(call, k, int(labels[k]))
    # the B-tree path of a file without an index (no warning at all)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_label_error(lambda: _epoch(no_index), k, int(labels[k]))
        _assert_label_error(lambda: Loader(no_index, "train", **SMALL).dataset[k], k,
                            int(labels[k]))
    # the offsets index path, after following the advice: a clear error, not wrong labels
    _follow_advice(_stale_warning_or_error(root))
    assert _index(path, len(labels)) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in paths():
            _assert_label_error(call, k, int(labels[k]))
    # records next to it are served with their labels
    rec = Loader(root, "train", **SMALL).dataset
    assert [rec[i][1] for i in (k - 1, k + 1)] == [int(labels[k - 1]), int(labels[k + 1])]


def _stale_warning_or_error(root):
    """The stale-index warning a Loader gives before its epoch fails on a changed label."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(fmt.RecordError):
            _epoch(root)
    texts = [str(w.message) for w in caught if "Rebuild the index" in str(w.message)]
    assert texts
    return texts[0]


def test_lmdbsource_dataflow_checks_the_label(sample_lmdb, tmp_path):
    isdf = pytest.importorskip("imagenet_seq.dataflow")
    labels = SplitReader(sample_lmdb, "train").labels
    root = str(tmp_path / "relabelled")
    _rewrite(_copy_train(sample_lmdb, root), [7], relabel={7})
    for rebuilt in (False, True):
        if rebuilt:
            offsets.add_to(fmt.find_split(root, "train"), rebuild=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = isdf.LMDBSource(root, "train", shuffle=False)
            ds.reset_state()
            _assert_label_error(lambda: list(ds), 7, int(labels[7]))
            ds.close()


def test_forward_runs_split_where_records_go_back_or_jump():
    offs = np.array([0, 100, 200, 10_000_000, 300, 50, 400])
    lens = np.array([100, 100, 100, 100, 100, 40, 100], np.uint32)
    # 50 -> 400: forward and near, one run (the 310 bytes between are read along)
    assert forward_runs(offs, lens) == [(0, 300), (10_000_000, 10_000_100), (300, 400),
                                        (50, 500)]
    assert forward_runs(offs[:0], lens[:0]) == []
    gap = (1 << 20) + 1  # further than the read-ahead reads across
    assert forward_runs(np.array([0, 100 + gap]), np.array([100, 1], np.uint32)) == \
        [(0, 100), (100 + gap, 101 + gap)]
    assert forward_runs(np.array([0, 4196]), np.array([100, 1], np.uint32)) == [(0, 4197)]
