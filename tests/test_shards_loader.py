"""A sharded split read by the Loader (issue 26, item 3): K shard files + a manifest give
exactly the batches the one file with the same records gives -- records, targets, pixels, epochs,
DDP shares, resume -- with one reader per device group; missing, truncated and foreign shards are
named. The shards are made from conftest's converted split by ``shard_files.py`` (the test
stand-in for the converter's ``--shards``)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from invariants import check_epochs, check_shards, run_epoch  # noqa: E402
from shard_files import write_shards, write_split_shards  # noqa: E402

from imagenet_seq import format as fmt  # noqa: E402
from imagenet_seq.data import Loader  # noqa: E402
from imagenet_seq.format import manifest  # noqa: E402
from imagenet_seq.read import devices  # noqa: E402
from imagenet_seq.read.reader import SplitReader  # noqa: E402

# chunks of 5 records: shard boundaries fall inside chunks, chunks of every shard interleave
SMALL = dict(batch_size=5, num_workers=1, image_size=32, resize_size=36, chunk_size=5,
             buffer_size=8)
KS = (1, 3, 7)


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    for key in (devices.SHARD_DEVICES_ENV, "LOCAL_WORLD_SIZE", "IMAGENET_SEQ_NODE_READER"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def sharded(sample_lmdb, tmp_path_factory):
    """``{k: folder}``: the sample split (train and val) as k shards with a manifest."""
    base = tmp_path_factory.mktemp("shards")
    return {k: write_split_shards(sample_lmdb, str(base / f"k{k}"), k) for k in KS}


def _copy(root, dst):
    """A copy of a sharded folder whose manifest names its own shards ("." folders)."""
    shutil.copytree(root, dst)
    return str(dst)


def _shard(root, split, j, k):
    return os.path.join(root, manifest.shard_filename(split, j, k))


def _epochs(loader, epochs):
    """Per epoch: (records, targets, images) of every batch, flattened."""
    out = []
    for e in epochs:
        recs, tgts, imgs = run_epoch(loader, e, keep_images=True)
        out.append((np.concatenate(recs), np.concatenate(tgts), torch.cat(imgs)))
    loader.close()
    return out


def _same(a, b):
    for (ra, ta, ia), (rb, tb, ib) in zip(a, b):
        assert np.array_equal(ra, rb), "records differ"
        assert np.array_equal(ta, tb), "targets differ"
        assert torch.equal(ia, ib), "pixels differ"


# ------------------------------------------------------------------------------ the reader
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_the_reader_gives_the_files_records_labels_and_totals(sample_lmdb, sharded, k, split):
    one, many = SplitReader(sample_lmdb, split), SplitReader(sharded[k], split)
    try:
        assert many.path == os.path.join(sharded[k], manifest.manifest_filename(split))
        assert len(many.files) == k and many.paths == [_shard(sharded[k], split, j, k)
                                                       for j in range(k)]
        assert len(many) == len(one)
        for field in ("split", "classes", "class_counts", "num_records", "total_bytes",
                      "order", "options", "skipped", "version"):
            assert getattr(many.meta, field) == getattr(one.meta, field), field
        assert np.array_equal(many.labels, one.labels)
        assert np.array_equal(many.checksums, one.checksums)
        assert many.indexed and many.devices == [list(range(k))]  # one disk: one reader
        n = len(one)
        spans = [(n - 4, 4), (1, n // 2), (n // 3, 3), (0, 1), (5, 0)]
        assert list(many.read_spans(spans)) == list(one.read_spans(spans))
        assert list(many.read_range(2, n - 3)) == list(one.read_range(2, n - 3))
        assert list(many.read_all()) == list(one.read_all())
        with pytest.raises(IndexError, match=f"outside 0..{n}"):
            list(many.read_spans([(n - 1, 2)]))
    finally:
        one.close()
        many.close()


def test_shards_without_the_offsets_index_read_through_the_btree(sample_lmdb, tmp_path):
    root = str(tmp_path / "k3")
    write_shards(sample_lmdb, root, "train", 3, index=False)
    one, many = SplitReader(sample_lmdb, "train"), SplitReader(root, "train")
    try:
        assert not many.indexed
        spans = [(40, 8), (3, 20), (0, 3)]
        assert list(many.read_spans(spans)) == list(one.read_spans(spans))
    finally:
        one.close()
        many.close()


# ------------------------------------------------------------------------------ the Loader
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("mode", ["train", "val"])
def test_the_loader_over_shards_yields_what_the_file_yields(sample_lmdb, sharded, k, mode):
    epochs = (0, 1) if mode == "train" else (0,)
    want = _epochs(Loader(sample_lmdb, mode, **SMALL), epochs)
    got = _epochs(Loader(sharded[k], mode, **SMALL), epochs)
    _same(want, got)
    if mode == "train":
        assert not np.array_equal(got[0][0], got[1][0])  # shuffled: epochs differ


def test_the_dataset_face_reads_single_records_of_shards(sample_lmdb, sharded):
    one, many = Loader(sample_lmdb, "val", **SMALL), Loader(sharded[7], "val", **SMALL)
    for i in (0, 5, len(one.dataset) - 1):
        a, b = one.dataset[i], many.dataset[i]
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
    one.close()
    many.close()


@pytest.mark.parametrize("mode", ["train", "val"])
def test_exact_epochs_and_rank_shares_over_shards(sample_lmdb, sharded, mode):
    labels = SplitReader(sample_lmdb, mode).labels
    root = sharded[7]
    check_epochs(lambda: Loader(root, mode, **SMALL), labels)
    shares = check_shards(lambda r, w: Loader(root, mode, rank=r, world_size=w, **SMALL), 2,
                          labels)
    file_shares = check_shards(lambda r, w: Loader(sample_lmdb, mode, rank=r, world_size=w,
                                                   **SMALL), 2, labels)
    for e in shares:
        for a, b in zip(shares[e], file_shares[e]):
            assert np.array_equal(a, b)


def test_mid_epoch_resume_over_shards_equals_the_uninterrupted_epoch(sharded):
    root = sharded[3]
    full = Loader(root, "train", **SMALL)
    recs, tgts, imgs = run_epoch(full, 1, keep_images=True)
    full.close()
    cut = 3
    ld = Loader(root, "train", **SMALL)
    ld.set_epoch(1)
    it = iter(ld)
    for _ in range(cut):
        next(it)
    state = json.loads(json.dumps(ld.state_dict()))
    ld.close()
    assert state["path"] == os.path.join(root, manifest.manifest_filename("train"))
    again = Loader(root, "train", **SMALL)
    again.load_state_dict(state)
    rest, rest_t, rest_i = run_epoch(again, 1, keep_images=True)
    again.close()
    assert np.array_equal(np.concatenate(rest), np.concatenate(recs[cut:]))
    assert np.array_equal(np.concatenate(rest_t), np.concatenate(tgts[cut:]))
    assert torch.equal(torch.cat(rest_i), torch.cat(imgs[cut:]))


def test_a_state_of_the_one_file_resumes_over_its_shards(sample_lmdb, sharded):
    """The state's fingerprint is the split's metadata, which the manifest's totals repeat:
    the same records as shards resume where the one file's run stopped."""
    ld = Loader(sample_lmdb, "train", **SMALL)
    ld.set_epoch(1)
    it = iter(ld)
    for _ in range(2):
        next(it)
    state = ld.state_dict()
    rest_file = []
    for _ in it:
        rest_file.append(np.asarray(ld.last_batch_records))
    ld.close()
    again = Loader(sharded[7], "train", **SMALL)
    again.load_state_dict(state)
    rest, _, _ = run_epoch(again, 1)
    again.close()
    assert np.array_equal(np.concatenate(rest), np.concatenate(rest_file))


@pytest.mark.slow
def test_the_converters_shards_read_as_the_one_file(sample_tree, sample_lmdb, tmp_path):
    """preprocess_sequential.py --shards 3 --shard-dirs: the Loader reads them as the one
    file, one reader per folder with shard_devices='folder'."""
    from imagenet_seq.convert.cli import main as preprocess

    out, disk2 = tmp_path / "out", tmp_path / "disk2"
    disk2.mkdir()
    assert preprocess([sample_tree[0], str(out), "--workers", "0", "--no-progress",
                       "--shards", "3", "--shard-dirs", str(disk2)]) == 0
    for mode, epochs in (("train", (0, 1)), ("val", (0,))):
        ld = Loader(str(out), mode, shard_devices="folder", **SMALL)
        assert len(ld.reader.files) == 3 and len(ld.reader.devices) == 2
        _same(_epochs(Loader(sample_lmdb, mode, **SMALL), epochs), _epochs(ld, epochs))


# ------------------------------------------------------------------- shards missing or wrong
def test_a_missing_shard_is_named_with_the_way_out(sharded, tmp_path):
    root = _copy(sharded[3], tmp_path / "k3")
    gone = _shard(root, "train", 1, 3)
    os.remove(gone)
    with pytest.raises(FileNotFoundError) as e:
        Loader(root, "train", **SMALL)
    msg = str(e.value)
    assert os.path.basename(gone) in msg and "shard 1 of 3" in msg and "shard_dirs" in msg


def test_a_truncated_shard_is_named(sharded, tmp_path):
    root = _copy(sharded[3], tmp_path / "k3")
    bad = _shard(root, "train", 2, 3)
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    with pytest.raises(fmt.DamagedFile, match=bad):
        Loader(root, "train", **SMALL)


def test_a_shard_truncated_after_the_loader_was_made_is_named(sharded, tmp_path):
    root = _copy(sharded[3], tmp_path / "k3")
    ld = Loader(root, "train", **SMALL)
    bad = _shard(root, "train", 1, 3)
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) - 300_000)
    with pytest.raises(fmt.DamagedFile, match=bad):
        for _ in ld:
            pass
    ld.close()


def test_a_shard_of_another_conversion_is_named(sample_lmdb, sharded, tmp_path):
    root = _copy(sharded[3], tmp_path / "k3")
    other = str(tmp_path / "other")
    write_shards(sample_lmdb, other, "train", 3, split_id="another-conversion")
    shutil.copy(_shard(other, "train", 1, 3), _shard(root, "train", 1, 3))  # same size
    with pytest.raises(fmt.DamagedFile) as e:
        Loader(root, "train", **SMALL)
    msg = str(e.value)
    assert _shard(root, "train", 1, 3) in msg and "another conversion" in msg
    assert "'another-conversion'" in msg and "copy shard 1" in msg


def test_a_shard_changed_after_conversion_is_named(sharded, tmp_path):
    root = _copy(sharded[3], tmp_path / "k3")
    bad = _shard(root, "train", 0, 3)
    path = os.path.join(root, manifest.manifest_filename("train"))
    doc = json.load(open(path))
    doc["shards"][0]["file_bytes"] = 0  # an edit that keeps the size is what is tested
    json.dump(doc, open(path, "w"))
    env = fmt.open_env(bad, readonly=False, lock=False)
    with env.begin(write=True) as txn:
        labels = np.frombuffer(bytes(txn.get(fmt.LABELS_KEY)), "<i4").copy()
        labels[0] = (labels[0] + 1) % 4
        txn.put(fmt.LABELS_KEY, labels.tobytes())
    env.close()
    with pytest.raises(fmt.DamagedFile, match="changed or replaced") as e:
        Loader(root, "train", **SMALL)
    assert bad in str(e.value)


def test_a_damaged_record_in_a_shard_fails_its_checksum(sharded, tmp_path):
    """verify=True checks each record against the joined checksums: a byte flipped inside a
    JPEG of shard 1 is a RecordError for that record's index in the split."""
    root = _copy(sharded[3], tmp_path / "k3")
    reader = SplitReader(root, "train")
    shard = reader.files[1]
    shard._open()
    local = 3
    off, n = int(shard._index[0][local]), int(shard._index[1][local])
    reader.close()
    with open(shard.path, "r+b") as f:
        f.seek(off + n // 2)
        byte = f.read(1)
        f.seek(off + n // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    ld = Loader(root, "train", verify=True, **SMALL)
    with pytest.raises(fmt.RecordError) as e:
        for _ in ld:
            pass
    ld.close()
    assert e.value.index == shard.first + local
    assert f"index {shard.first + local}" in str(e.value) and "checksum" in str(e.value)
    # the shard file and its own record key are named, and the verify command for that file
    assert f"record {b'%08d' % local!r} of {shard.path}" in str(e.value)
    assert f"imagenet-seq-verify {shard.path}`" in str(e.value)


def test_a_shard_in_the_wrong_place_is_named(sharded, tmp_path):
    root = _copy(sharded[3], tmp_path / "k3")
    a, b = _shard(root, "train", 0, 3), _shard(root, "train", 1, 3)
    # same records count and size would be needed to get past the manifest's size check:
    # swap the names of two shards whose sizes the manifest does not record
    path = os.path.join(root, manifest.manifest_filename("train"))
    doc = json.load(open(path))
    for row in doc["shards"]:
        row["file_bytes"] = 0
    json.dump(doc, open(path, "w"))
    os.rename(a, a + ".tmp")
    os.rename(b, a)
    os.rename(a + ".tmp", b)
    with pytest.raises(fmt.DamagedFile, match="says it is shard 1 of 3") as e:
        Loader(root, "train", **SMALL)
    assert a in str(e.value)


def test_shard_dirs_finds_a_moved_shard(sample_lmdb, sharded, tmp_path):
    root = _copy(sharded[3], tmp_path / "k3")
    moved = tmp_path / "disk2"
    moved.mkdir()
    shutil.move(_shard(root, "train", 2, 3), str(moved))
    with pytest.raises(FileNotFoundError, match="shard 2 of 3"):
        Loader(root, "train", **SMALL)
    with pytest.raises(ValueError, match="not a folder"):
        Loader(root, "train", shard_dirs=[str(tmp_path / "nowhere")], **SMALL)
    ld = Loader(root, "train", shard_dirs=[str(moved)], **SMALL)
    assert ld.settings.data.shard_dirs == (str(moved),) and ld.settings.data.shards == 3
    assert ld.reader.paths[2] == str(moved / manifest.shard_filename("train", 2, 3))
    _same(_epochs(Loader(sample_lmdb, "train", **SMALL), (0,)), _epochs(ld, (0,)))


# ------------------------------------------------------------------------- device groups
def test_grouping_rules_and_their_errors(tmp_path):
    paths = [str(tmp_path / d / "s") for d in ("a", "b", "a", "b")]
    for p in paths:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "w").close()
    assert devices.group_shards(paths) == [[0, 1, 2, 3]]  # one filesystem
    assert devices.group_shards(paths, "folder") == [[0, 2], [1, 3]]
    assert devices.group_shards(paths, "one") == [[0, 1, 2, 3]]
    assert devices.group_shards(paths, ("x", "y", "y", "x")) == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match="gives 2 labels for 4 shards"):
        devices.group_shards(paths, (0, 1))
    for typo in ("disk", "disk,", ""):
        with pytest.raises(ValueError, match=f"shard_devices='{typo}'"):
            devices.check_grouping(typo)
    with pytest.raises(ValueError, match="shard_devices=5"):
        devices.check_grouping(5)
    os.environ[devices.SHARD_DEVICES_ENV] = "0,1,1,0"
    try:
        assert devices.group_shards(paths) == [[0, 3], [1, 2]]
        assert devices.group_shards(paths, "one") == [[0, 1, 2, 3]]  # the argument wins
        os.environ[devices.SHARD_DEVICES_ENV] = "0,1"
        with pytest.raises(ValueError, match=devices.SHARD_DEVICES_ENV):
            devices.group_shards(paths)
    finally:
        del os.environ[devices.SHARD_DEVICES_ENV]


@pytest.mark.parametrize("mode", ["train", "val"])
def test_two_device_groups_each_read_only_their_own_shards(sample_lmdb, sharded, mode):
    k, labels = 7, ["d0", "d1", "d1", "d0", "d1", "d0", "d0"]
    ld = Loader(sharded[k], mode, shard_devices=labels, verify=True, **SMALL)
    reader = ld.reader
    assert ld.settings.data.shard_devices == tuple(labels)
    assert reader.devices == [[0, 3, 5, 6], [1, 2, 4]]
    epochs = (0, 1) if mode == "train" else (0,)
    _same(_epochs(Loader(sample_lmdb, mode, **SMALL), epochs), _epochs(ld, epochs))
    for group, covered in zip(reader.devices, reader.covered):
        assert set(covered) == set(group), "a group's read-ahead read another group's shard"
        assert all(covered[j] > 0 for j in group)
    # every byte a shard's records occupy was read by its group
    for j, f in enumerate(reader.files):
        f._open()
        offs, lens = f._index
        need = int(lens[offs >= 0].sum())
        assert reader.covered[reader._group_of[j]][j] >= need
    ld.close()


@pytest.mark.parametrize("depth,window", [(16 << 10, 16 << 10), (16 << 10, 200 << 10),
                                          (64 << 10, 1 << 20)])
def test_small_windows_and_bursts_return_every_record(sample_lmdb, sharded, monkeypatch, depth,
                                                      window):
    """Windows far below the data (and nothing found in the page cache: every byte goes
    through a burst), one and two device groups: the records are the file's."""
    from imagenet_seq.read import readahead

    monkeypatch.setattr(readahead, "PREFETCH_BYTES", depth)
    monkeypatch.setattr(readahead, "DEVICE_AHEAD_BYTES", window)
    monkeypatch.setattr(readahead, "_resident", lambda addr, length: False)
    one = SplitReader(sample_lmdb, "train")
    n = len(one)
    spans = [(n - 7, 7), (0, n // 2), (n // 2, n - n // 2 - 7)]
    want = list(one.read_spans(spans))
    one.close()
    for grouping in ("one", [0, 1, 1, 0, 1, 0, 0]):
        many = SplitReader(sharded[7], "train", shard_devices=grouping)
        assert list(many.read_spans(spans)) == want
        sizes = [int(f._index[1][f._index[0] >= 0].sum()) for f in many.files]
        for group, covered in zip(many.devices, many.covered):
            assert set(covered) == set(group)
            assert all(covered[j] >= sizes[j] for j in group)
        many.close()


def test_the_environment_groups_shards_by_folder(sample_lmdb, tmp_path, monkeypatch):
    root = str(tmp_path / "k4")
    folders = [str(tmp_path / "disk_a"), str(tmp_path / "disk_b")]
    write_shards(sample_lmdb, root, "train", 4, folders=folders)
    monkeypatch.setenv(devices.SHARD_DEVICES_ENV, "folder")
    ld = Loader(root, "train", **SMALL)
    assert ld.reader.devices == [[0, 2], [1, 3]]
    _same(_epochs(Loader(sample_lmdb, "train", **SMALL), (0,)), _epochs(ld, (0,)))


@pytest.mark.fuse
@pytest.mark.slow
def test_two_real_devices_each_read_by_their_own_reader(sample_lmdb, tmp_path):
    """Two FUSE mounts (two ``st_dev``): grouped by device without any override, each
    group's read-ahead reads its own shards, each emulated disk serves reads, and the batches
    are the one file's. (That the two readers make two disks faster than one is measured by
    benchmarks/multi_disk.py: a test on a few MB cannot tell.)"""
    import slowfs

    reason = slowfs.fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE unavailable: {reason}")
    src = [str(tmp_path / "src_a"), str(tmp_path / "src_b")]
    mnt = [str(tmp_path / "mnt_a"), str(tmp_path / "mnt_b")]
    root = str(tmp_path / "manifest")
    path = write_shards(sample_lmdb, root, "train", 4, folders=src)
    doc = json.load(open(path))
    real = [os.path.realpath(s) for s in src]
    for row in doc["shards"]:  # the disks are mounted elsewhere now: at mnt_a, mnt_b
        row["folder"] = mnt[real.index(row["folder"])]
    json.dump(doc, open(path, "w"))
    disk = ["--mb-per-s", "2000", "--seek-ms", "0", "--rotation-ms", "0"]
    want = _epochs(Loader(sample_lmdb, "train", **SMALL), (0,))
    with slowfs.mounted(src[0], mnt[0], "hdd", disk) as stats_a, \
            slowfs.mounted(src[1], mnt[1], "hdd", disk) as stats_b:
        assert os.stat(mnt[0]).st_dev != os.stat(mnt[1]).st_dev
        ld = Loader(root, "train", **SMALL)
        reader = ld.reader
        assert reader.devices == [[0, 2], [1, 3]]  # by st_dev, no override
        assert reader.paths[:2] == [os.path.join(m, manifest.shard_filename("train", j, 4))
                                    for j, m in enumerate(mnt)]
        got = _epochs(ld, (0,))
        covered = [dict(c) for c in reader.covered]
        reader.close()
        del ld, reader  # its files stay mapped while it lives (format/mapped.py): unmount
    _same(want, got)
    assert set(covered[0]) == {0, 2} and set(covered[1]) == {1, 3}
    assert min(covered[0].values()) > 0 and min(covered[1].values()) > 0
    assert stats_a["bytes"] > 0 and stats_b["bytes"] > 0


def test_the_node_reader_reads_moved_shards_in_device_groups(sample_lmdb, sharded, tmp_path,
                                                            monkeypatch):
    """One rank of two under torchrun's environment: its node reader (a process of its own)
    finds the moved shard through the rank's shard_dirs and groups the shards as asked."""
    root = _copy(sharded[3], tmp_path / "k3")
    moved = tmp_path / "disk2"
    moved.mkdir()
    shutil.move(_shard(root, "train", 1, 3), str(moved))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    kw = dict(SMALL, rank=0, world_size=2, num_workers=0)
    got = {}
    for name, where, extra in (("file", sample_lmdb, {}),
                               ("shards", root, dict(shard_dirs=[str(moved)],
                                                     shard_devices=[0, 1, 0]))):
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"shards-{name}-{os.getpid()}")
        ld = Loader(where, "train", **kw, **extra)
        assert ld.settings.order.node_reader is True
        got[name] = _epochs(ld, (0, 1))
    _same(got["file"], got["shards"])


# ------------------------------------------------------------------- DDP with real processes
def _torchrun(root, out, env_extra=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}",
           os.path.join(HERE, "ddp_ranks.py"), root, str(out), "--epochs", "2",
           "--batch-size", "4", "--workers", "1", "--chunk-size", "5"]
    os.makedirs(out, exist_ok=True)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.load(open(os.path.join(out, f"rank{k}.json"))) for k in range(2)]


_COMPARED = ("train_len", "train_batches", "train_keys", "train_labels", "train_num_records",
             "val_len", "val_keys", "val_labels", "resume_state", "resume_rest_keys",
             "node_reader", "all_reduce")


@pytest.mark.slow
@pytest.mark.parametrize("node_reader", ["1", "0"])
def test_ddp_shares_over_shards_equal_the_one_files(sample_lmdb, sharded, tmp_path,
                                                    node_reader):
    env = {"IMAGENET_SEQ_NODE_READER": node_reader}
    want = _torchrun(sample_lmdb, tmp_path / "one", env)
    got = _torchrun(sharded[3], tmp_path / "k3", env)
    assert [d["node_reader"] for d in got] == [node_reader == "1"] * 2
    for w, g in zip(want, got):
        for key in _COMPARED:
            assert g[key] == w[key], key
    keys = [set(d["train_keys"][0]) for d in got]
    assert not keys[0] & keys[1] and len(keys[0]) == len(keys[1])


@pytest.mark.fuse
@pytest.mark.slow
def test_the_multi_disk_benchmark_runs(tmp_path):
    import multi_disk
    import slowfs

    reason = slowfs.fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE unavailable: {reason}")
    out = tmp_path / "out"
    assert multi_disk.main(["--tiny", "--workdir", str(tmp_path / "work"),
                            "--out", str(out)]) == 0
    result = json.load(open(out / "multi_disk.json"))
    rows = result["rows"]
    assert [(r["variant"], r["layout"]) for r in rows] == [
        (v, layout) for v in ("defaults", "scaled") for _, layout, _ in multi_disk.ROWS]
    assert [len(r["devices"]) for r in rows] == [1, 2, 1] * 2  # one reader per device
    n = rows[0]["records"]
    assert all(r["images"] == n for r in rows)  # a whole epoch each
    assert "| 2 shards, 2 HDDs | 2 |" in open(out / "multi_disk.md").read()
