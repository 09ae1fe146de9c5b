"""The offsets index: written by preprocess, trusted only while it describes the file."""
import io
import os
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from imagenet_seq import format as fmt
from imagenet_seq.format import offsets
from imagenet_seq.read import reader
from imagenet_seq.convert.cli import main as preprocess

from conftest import strip_offsets


def _copy(src_root, dst_root, split="train"):
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, fmt.split_filename(split))
    shutil.copy(os.path.join(src_root, fmt.split_filename(split)), dst)
    return dst


def _records(path):
    env = fmt.open_env(path)
    try:
        with env.begin() as txn:
            meta = fmt.read_metadata(txn, path)
            return [bytes(txn.get(fmt.record_key(i))) for i in range(meta.num_records)]
    finally:
        env.close()


def _read_all(root, split="train"):
    r = reader.SplitReader(root, split)
    try:
        out = [(i, bytes(j), lab) for i, j, lab in r.read_all()]
        return out, r._index is not None
    finally:
        r.close()


@pytest.mark.parametrize("split", ["train", "val"])
def test_preprocess_writes_where_each_record_lies(sample_lmdb, split):
    path = fmt.find_split(sample_lmdb, split)
    env = fmt.open_env(path)
    try:
        with env.begin() as txn:
            meta = fmt.read_metadata(txn, path)
        offs, lens = offsets.read(env, meta.num_records, path)
    finally:
        env.close()
    assert (offs >= 0).all() and np.all(np.diff(offs) > 0)  # written in order, none in a leaf
    with open(path, "rb") as f:
        for i, value in enumerate(_records(path)):
            f.seek(offs[i])
            assert f.read(int(lens[i])) == value


def test_a_file_written_to_later_is_read_through_the_btree(sample_lmdb, tmp_path):
    path = _copy(sample_lmdb, str(tmp_path))
    env = fmt.open_env(path, readonly=False, lock=False)
    with env.begin(write=True) as txn:  # rewrite record 5: its value moves
        value = bytes(txn.get(fmt.record_key(5)))
        label = fmt.RECORD_HEADER.unpack_from(value)[0]
        jpeg = Image.new("RGB", (64, 48), (200, 10, 10))
        buf = io.BytesIO()
        jpeg.save(buf, "JPEG")
        txn.put(fmt.record_key(5), fmt.encode_record(label, buf.getvalue()))
    env.close()
    with pytest.warns(UserWarning, match=r"written to after its offsets index.*--rebuild"):
        got, indexed = _read_all(str(tmp_path))
    assert not indexed
    assert got[5][1] == buf.getvalue()  # the new value, not the old bytes the index points to
    assert offsets.main([str(tmp_path), "--rebuild"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, indexed = _read_all(str(tmp_path))
    assert indexed and again == got


def test_an_index_pointing_elsewhere_is_caught_per_record(sample_lmdb, tmp_path):
    path = _copy(sample_lmdb, str(tmp_path))
    env = fmt.open_env(path, readonly=False, lock=False)
    with env.begin() as txn:
        n = fmt.read_metadata(txn, path).num_records
        labels = fmt.read_labels(txn, fmt.read_metadata(txn, path))
    offs, lens = offsets.compute(env, path, n)
    other = int(np.flatnonzero(labels != labels[3])[0])
    offs[3], lens[3] = offs[other], lens[other]  # a current-looking index, wrong for record 3
    with env.begin(write=True) as txn:
        txn.put(offsets.OFFSETS_KEY, offsets.encode(env.stat()["psize"], txn.id(), offs, lens))
    env.close()
    r = reader.SplitReader(str(tmp_path), "train")
    try:
        with pytest.raises(offsets.StaleOffsets, match=r"record 3 .*--rebuild"):
            list(r.read_all())
    finally:
        r.close()


def test_small_values_inside_leaf_pages_are_read_through_the_btree(sample_lmdb, tmp_path):
    path = _copy(sample_lmdb, str(tmp_path))
    env = fmt.open_env(path, readonly=False, lock=False)
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 90, 0)).save(tiny, "JPEG")
    assert len(tiny.getvalue()) < 1000  # LMDB keeps values this small in the leaf page
    with env.begin(write=True) as txn:
        label = fmt.RECORD_HEADER.unpack_from(txn.get(fmt.record_key(2)))[0]
        txn.put(fmt.record_key(2), fmt.encode_record(label, tiny.getvalue()))
    env.close()
    assert offsets.add_to(path, rebuild=True).endswith("rebuilt (48 records)")
    got, indexed = _read_all(str(tmp_path))
    assert indexed
    assert got[2][1] == tiny.getvalue()
    assert [g[1] for g in got] == [v[4:] for v in _records(path)]
    env = fmt.open_env(path)
    try:
        offs, _ = offsets.read(env, len(got), path)
    finally:
        env.close()
    assert offs[2] == -1 and (np.delete(offs, 2) >= 0).all()


def test_cli_adds_the_index_to_older_conversions(sample_lmdb, tmp_path, capsys):
    root = strip_offsets(sample_lmdb, str(tmp_path / "old"))
    before, indexed = _read_all(root)
    assert not indexed
    assert offsets.main([root]) == 0
    out = capsys.readouterr().out
    assert out.count("offsets index added") == 2
    after, indexed = _read_all(root)
    assert indexed and after == before
    assert offsets.main([root]) == 0
    assert capsys.readouterr().out.count("already has an offsets index") == 2
    assert offsets.main([os.path.join(root, fmt.split_filename("val")), "--rebuild"]) == 0
    assert "rebuilt" in capsys.readouterr().out


def test_cli_bad_input(tmp_path, capsys):
    assert offsets.main([str(tmp_path)]) == 2
    assert "no ILSVRC-train.lmdb or ILSVRC-val.lmdb in" in capsys.readouterr().err
    from tensorpack.dataflow import DataFromList, LMDBSerializer

    LMDBSerializer.save(DataFromList([[np.zeros(4, np.uint8), 1]], shuffle=False),
                        str(tmp_path / "ILSVRC-val.lmdb"))
    assert offsets.main([str(tmp_path)]) == 1
    assert "written by the original tool" in capsys.readouterr().err


def test_resume_finishes_a_conversion_killed_before_its_index(sample_tree, tmp_path):
    out = str(tmp_path / "out")
    assert preprocess([sample_tree[0], out, "--splits", "train", "--workers", "0",
                       "--no-progress"]) == 0
    final = os.path.join(out, fmt.split_filename("train"))
    want, _ = _read_all(out)
    # the state a kill between the last commit and the index leaves: complete, not renamed
    stripped = strip_offsets(out, str(tmp_path / "stripped"))
    os.remove(final)
    shutil.move(os.path.join(stripped, fmt.split_filename("train")), final + ".partial")
    assert preprocess([sample_tree[0], out, "--splits", "train", "--workers", "0",
                       "--no-progress", "--resume"]) == 0
    assert not os.path.exists(final + ".partial")
    got, indexed = _read_all(out)
    assert indexed and got == want
    # the same state, resumed with another seed: refused, nothing renamed
    os.rename(final, final + ".partial")
    assert preprocess([sample_tree[0], out, "--splits", "train", "--workers", "0",
                       "--no-progress", "--resume", "--seed", "3"]) != 0
    assert os.path.exists(final + ".partial") and not os.path.exists(final)


def test_conversion_without_proc_maps_completes_without_the_index(sample_tree, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(offsets, "map_base", lambda path: None)
    out = str(tmp_path / "out")
    with pytest.warns(UserWarning, match="no offsets index written"):
        assert preprocess([sample_tree[0], out, "--splits", "val", "--workers", "0",
                           "--no-progress"]) == 0
    got, indexed = _read_all(out, "val")
    assert not indexed and len(got) == 12
