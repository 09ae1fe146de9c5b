"""Per-record metadata as views of the file (issue 26, item 7): ``__labels__``, ``__crc__`` and
``__offsets__`` are mapped from the LMDB file, not copied per process, so the ranks of a node
share one copy; a pickled reader maps them again on the far side; a file changed in between is
named; without a known map base they are copies, read the same way."""
import os
import pickle
import zlib

import numpy as np
import pytest

from imagenet_seq import format as fmt
from imagenet_seq.format import checksums, mapped, offsets
from imagenet_seq.read.reader import SplitReader
from shard_files import write_shards


def _copies(path):
    """labels, checksums, offsets, lengths as copies (a transaction without buffers)."""
    env = fmt.open_env(path)
    try:
        with env.begin() as txn:
            meta = fmt.read_metadata(txn, path)
            labels = np.frombuffer(txn.get(fmt.LABELS_KEY), "<i4")
            crcs = [zlib.crc32(txn.get(fmt.record_key(i))) for i in range(meta.num_records)]
            raw = txn.get(offsets.OFFSETS_KEY)
        offs, lens = offsets.decode(raw, meta.num_records, env.info()["last_txnid"], path)
    finally:
        env.close()
    return labels, np.array(crcs, "<u4"), offs, lens


def _file_of(arr):
    region = mapped.where(arr)
    return None if region is None else region.path


def test_labels_checksums_and_index_are_views_of_the_file(sample_lmdb):
    r = SplitReader(sample_lmdb, "train")
    path = os.path.realpath(r.path)
    labels, crcs, offs, lens = _copies(r.path)
    r.reset_state()
    try:
        got = {"labels": r.labels, "checksums": r.checksums, "offsets": r.files[0]._index[0],
               "lengths": r.files[0]._index[1]}
        for name, arr in got.items():
            assert _file_of(arr) == path, name  # the file's pages, not this process's memory
            assert not arr.flags.writeable, name
        assert got["labels"].tolist() == labels.tolist()
        assert got["checksums"].tolist() == crcs.tolist()
        assert got["offsets"].tolist() == offs.tolist()
        assert got["lengths"].tolist() == lens.tolist()
        # where() finds a slice's own place in the file too
        region = mapped.where(got["labels"][5:9])
        assert region.offset == mapped.where(got["labels"]).offset + 20 and region.length == 16
    finally:
        r.close()


def test_shards_keep_their_own_views_and_join_only_when_asked(sample_lmdb, tmp_path):
    root = str(tmp_path / "k3")
    write_shards(sample_lmdb, root, "train", 3)
    r = SplitReader(root, "train")
    one = SplitReader(sample_lmdb, "train")
    for f in r.files:
        assert _file_of(f.labels) == os.path.realpath(f.path)
        assert _file_of(f.checksums) == os.path.realpath(f.path)
    assert r._joined_arrays == {}  # nothing joined (copied) until asked for
    assert r.labels.tolist() == one.labels.tolist()
    assert r.checksums.tolist() == one.checksums.tolist()
    try:
        assert [label for _, _, label in r.read_all()] == one.labels.tolist()
    finally:
        r.close()


@pytest.mark.parametrize("sharded", [False, True])
def test_a_pickled_reader_maps_the_same_bytes_again(sample_lmdb, tmp_path, sharded):
    root = sample_lmdb
    if sharded:
        root = str(tmp_path / "k3")
        write_shards(sample_lmdb, root, "train", 3)
    r = SplitReader(root, "train")
    back = pickle.loads(pickle.dumps(r))
    for f, g in zip(r.files, back.files):
        for name in ("labels", "checksums"):
            a, b = getattr(f, name), getattr(g, name)
            assert b is not a and mapped.where(b) == mapped.where(a), name
            assert b.tolist() == a.tolist()
    assert [x[2] for x in back.read_all()] == r.labels.tolist()
    back.close()


def test_a_file_changed_before_unpickling_is_named(sample_lmdb, tmp_path):
    root = str(tmp_path / "copy")
    os.makedirs(root)
    path = os.path.join(root, fmt.split_filename("train"))
    with open(os.path.join(sample_lmdb, fmt.split_filename("train")), "rb") as src:
        open(path, "wb").write(src.read())
    data = pickle.dumps(SplitReader(root, "train"))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # written to since
    with pytest.raises(fmt.DamagedFile) as e:
        pickle.loads(data)
    assert path in str(e.value) and "changed since its reader was made" in str(e.value)


def test_without_a_known_map_base_they_are_copies_read_the_same(sample_lmdb, monkeypatch):
    want = SplitReader(sample_lmdb, "train")
    monkeypatch.setattr(mapped, "map_base", lambda path: None)
    r = SplitReader(sample_lmdb, "train")
    assert mapped.where(r.labels) is None and mapped.where(r.checksums) is None
    assert r.labels.tolist() == want.labels.tolist()
    assert r.checksums.tolist() == want.checksums.tolist()
    env = fmt.open_env(r.path)
    try:
        with env.begin(buffers=True) as txn:
            assert isinstance(mapped.get(txn, fmt.LABELS_KEY, r.path), bytes)
            assert checksums.read(txn, len(r), r.path).tolist() == want.checksums.tolist()
    finally:
        env.close()
    back = pickle.loads(pickle.dumps(r))
    try:
        assert [x[2] for x in back.read_all()] == want.labels.tolist()
    finally:
        back.close()  # the shared environment: other tests open the file themselves
