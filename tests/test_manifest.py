"""The shard manifest (format/manifest.py): ranges, round trip, lookup, and what a user who
moved, lost or truncated a shard is told."""
import json
import os

import lmdb
import pytest

from imagenet_seq import format as fmt
from imagenet_seq.format import manifest as mf

TOTALS = {"num_records": 10, "total_bytes": 1000, "classes": ["a", "b"],
          "class_counts": [4, 6], "order": "random", "options": {"seed": 0}, "skipped": 0}


def _shards(tmp_path, folders):
    """Three fake shard files (any bytes: the manifest checks sizes, not content)."""
    out = []
    for j, ((first, n), folder) in enumerate(zip(mf.shard_ranges(10, 3), folders)):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, mf.shard_filename("train", j, 3))
        with open(path, "wb") as f:
            f.write(b"x" * (100 + j))
        out.append(mf.Shard(j, path, first, n, n * 100, 100 + j, f"sum{j}"))
    return out


def test_ranges_and_counts():
    assert mf.shard_ranges(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert mf.shard_ranges(2, 3) == [(0, 1), (1, 1), (2, 0)]
    assert sum(n for _, n in mf.shard_ranges(1_281_167, 7)) == 1_281_167
    assert mf.shard_count(250e9, 100) == 3 and mf.shard_count(1, 100) == 1
    with pytest.raises(ValueError, match="shard-gb 0"):
        mf.shard_count(10, 0)
    with pytest.raises(ValueError, match="shards=0"):
        mf.shard_ranges(10, 0)
    assert mf.shard_filename("train", 2, 7) == "ILSVRC-train-00002-of-00007.lmdb"


def test_round_trip_locate_and_cut(tmp_path):
    out, disk2 = str(tmp_path / "out"), str(tmp_path / "disk2")
    shards = _shards(tmp_path, [out, disk2, out])
    mf.write_manifest(out, "train", "id1", TOTALS, shards)
    doc = json.load(open(os.path.join(out, mf.manifest_filename("train"))))
    assert [r["folder"] for r in doc["shards"]] == [".", os.path.realpath(disk2), "."]
    split = mf.open_split(out, "train")
    assert split.num_records == 10 and split.totals["split_id"] == "id1"
    assert split.paths == [s.path for s in shards]
    assert [split.locate(i) for i in (0, 3, 4, 6, 7, 9)] == \
        [(0, 0), (0, 3), (1, 0), (1, 2), (2, 0), (2, 2)]
    with pytest.raises(IndexError):
        split.locate(10)
    assert split.cut([(2, 6), (9, 1)]) == [(0, 2, 2), (1, 0, 3), (2, 0, 1), (2, 2, 1)]
    # the manifest file itself may be named
    assert mf.open_split(os.path.join(out, mf.manifest_filename("train")), "train").paths == \
        split.paths


def test_moved_missing_and_truncated_shard(tmp_path):
    out, disk2, moved = (str(tmp_path / d) for d in ("out", "disk2", "moved"))
    shards = _shards(tmp_path, [out, disk2, out])
    mf.write_manifest(out, "train", "id1", TOTALS, shards)
    os.makedirs(moved)
    os.rename(shards[1].path, os.path.join(moved, os.path.basename(shards[1].path)))
    with pytest.raises(FileNotFoundError) as e:
        mf.open_split(out, "train")
    assert "shard 1 of 3" in str(e.value) and "ILSVRC-train-00001-of-00003.lmdb" in str(e.value)
    assert "shard_dirs" in str(e.value)
    split = mf.open_split(out, "train", shard_dirs=[moved])
    assert split.shards[1].path == os.path.join(moved, "ILSVRC-train-00001-of-00003.lmdb")
    with open(shards[2].path, "r+b") as f:
        f.truncate(50)
    with pytest.raises(fmt.DamagedFile, match="50 bytes.*recorded 102"):
        mf.open_split(out, "train", shard_dirs=[moved])


def test_bad_manifests(tmp_path):
    out = str(tmp_path)
    path = os.path.join(out, mf.manifest_filename("train"))
    open(path, "w").write("{not json")
    with pytest.raises(fmt.DamagedFile, match="not valid JSON"):
        mf.open_split(out, "train")
    shards = _shards(tmp_path, [out] * 3)
    mf.write_manifest(out, "train", "id1", TOTALS, shards)
    doc = json.load(open(path))
    doc["version"] = 99
    json.dump(doc, open(path, "w"))
    with pytest.raises(ValueError, match="manifest version 99"):
        mf.open_split(out, "train")
    doc["version"] = mf.MANIFEST_VERSION
    doc["shards"][1]["first"] = 5
    json.dump(doc, open(path, "w"))
    with pytest.raises(fmt.DamagedFile, match="inconsistent.*shard 1 starts at 5"):
        mf.open_split(out, "train")
    doc["shards"][1]["first"] = 4
    json.dump(doc, open(path, "w"))
    with pytest.raises(ValueError, match="describes the 'train' split.*mode='val'"):
        mf.open_split(path, "val")


def test_one_file_is_a_one_shard_split(sample_lmdb):
    split = mf.open_split(sample_lmdb, "train")
    assert split.manifest is None and len(split.shards) == 1
    path = os.path.join(sample_lmdb, fmt.split_filename("train"))
    assert split.paths == [path]
    env = lmdb.open(path, subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        n = fmt.read_metadata(txn, path).num_records
        assert len(mf.shard_checksum(txn)) == 40
    env.close()
    assert split.num_records == n and split.locate(n - 1) == (0, n - 1)
