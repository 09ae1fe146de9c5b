"""The Loader on real LMDB files: every configuration through the shared invariant helper."""
import os
import shutil

import numpy as np
import pytest
import torch

from imagenet_seq import format as fmt
from imagenet_seq.data import ImagenetLoader, Loader, RecordError, to_device
from imagenet_seq.decode.transforms import PILTransform, ValTransform
from imagenet_seq.read.reader import SplitReader
from conftest import copy_with_format_version
from damaged import write_broken_lmdb
from invariants import check_epochs, check_shards, run_epoch

SMALL = dict(batch_size=5, chunk_size=4, buffer_size=8)


# a hang fails the one test with its stacks (pytest-timeout; see conftest.py)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def labels(sample_lmdb):
    return {s: SplitReader(sample_lmdb, s).labels for s in ("train", "val")}


def read_records(root, split):
    env = fmt.open_env(fmt.find_split(root, split))
    with env.begin() as txn:
        meta = fmt.read_metadata(txn, split)
        out = []
        for i in range(meta.num_records):
            jpeg, label = fmt.decode_record(txn.get(fmt.record_key(i)))
            out.append((bytes(jpeg), label))
    env.close()
    return out


def tiny_tensor(img):
    """Stands in for a torchvision transform: PIL image -> float CHW tensor."""
    arr = np.asarray(img.resize((16, 12)), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)


@pytest.mark.parametrize("workers,wtype", [(0, "process"), (1, "process"), (2, "process"),
                                           (1, "thread"), (2, "thread")])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_train_epochs(sample_lmdb, labels, workers, wtype, shuffle, drop_last):
    check_epochs(lambda: Loader(sample_lmdb, "train", num_workers=workers, worker_type=wtype,
                                shuffle=shuffle, drop_last=drop_last, seed=3, **SMALL),
                 labels["train"])


@pytest.mark.parametrize("workers,wtype", [(0, "process"), (2, "process"), (2, "thread")])
@pytest.mark.parametrize("drop_last", [False, True])
def test_val_epochs(sample_lmdb, labels, workers, wtype, drop_last):
    check_epochs(lambda: Loader(sample_lmdb, "val", num_workers=workers, worker_type=wtype,
                                drop_last=drop_last, batch_size=5), labels["val"])


def test_default_buffer_and_chunk(sample_lmdb, labels):
    check_epochs(lambda: Loader(sample_lmdb, "train", batch_size=7, num_workers=1),
                 labels["train"])


@pytest.mark.parametrize("workers", [0, 2])
def test_pil_transform_path(sample_lmdb, labels, workers):
    make = lambda: Loader(sample_lmdb, "train", tiny_tensor, num_workers=workers, **SMALL)  # noqa
    check_epochs(make, labels["train"])
    images, targets = next(iter(make()))
    assert images.dtype == torch.float32 and images.shape == (5, 3, 12, 16)
    assert targets.dtype == torch.int64
    # the original tool's call: third positional argument, old class name
    old = ImagenetLoader(sample_lmdb, "val", PILTransform(tiny_tensor), batch_size=4,
                         num_workers=1, shuffle=False)
    assert [tuple(x.shape) for x, _ in old] == [(4, 3, 12, 16)] * 3


@pytest.mark.parametrize("workers,wtype", [(0, "process"), (2, "process"), (2, "thread")])
def test_val_pixels_equal_reference(sample_lmdb, workers, wtype):
    records = read_records(sample_lmdb, "val")
    ref = ValTransform(224, 256)
    loader = Loader(sample_lmdb, "val", batch_size=5, num_workers=workers, worker_type=wtype)
    got = torch.cat([x for x, _ in loader])
    assert got.shape == (len(records), 3, 224, 224) and got.dtype == torch.uint8
    for i, (jpeg, _) in enumerate(records):
        assert np.array_equal(got[i].permute(1, 2, 0).numpy(), ref(jpeg)), f"record {i}"


def test_train_output_independent_of_workers(sample_lmdb):
    def epoch(**kw):
        ld = Loader(sample_lmdb, "train", image_size=64, **SMALL, **kw)
        ld.set_epoch(2)
        return torch.cat([x.contiguous() for x, _ in ld])

    base = epoch(num_workers=0)
    assert torch.equal(base, epoch(num_workers=2))
    assert torch.equal(base, epoch(num_workers=2, worker_type="thread"))
    cl = epoch(num_workers=1, channels_last=True)
    assert torch.equal(base, cl.contiguous())


def test_channels_last_and_to_device(sample_lmdb):
    ld = Loader(sample_lmdb, "val", batch_size=4, num_workers=1, channels_last=True)
    x, y = next(iter(ld))
    assert x.shape == (4, 3, 224, 224) and x.is_contiguous(memory_format=torch.channels_last)
    xf, yf = to_device(x, y, "cpu", channels_last=True)
    assert xf.dtype == torch.float32 and xf.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(xf, (x.float() / 255 - mean) / std, atol=1e-5)
    dev = Loader(sample_lmdb, "val", batch_size=4, num_workers=0, device="cpu")
    xd, yd = next(iter(dev))
    assert torch.allclose(xd, (x.float() / 255 - mean) / std, atol=1e-5)
    assert torch.equal(yd, y)


def test_break_then_new_epoch(sample_lmdb, labels):
    import psutil

    ld = Loader(sample_lmdb, "train", num_workers=2, worker_type="process", **SMALL)
    for k, _ in enumerate(ld):
        if k == 1:
            break
    live = lambda: [p.pid for p in psutil.Process().children()  # noqa: E731
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    workers = live()
    assert len(workers) == 2  # persistent: they stay for the next pass
    recs, tgts, _ = run_epoch(ld, 5)
    from invariants import check_epoch
    check_epoch(ld, recs, tgts, labels["train"])
    assert live() == workers  # the same processes served the next epoch: no fork per epoch
    ld.close()
    assert not live()


def test_epoch_advances_without_set_epoch(sample_lmdb):
    ld = Loader(sample_lmdb, "train", num_workers=0, **SMALL)
    first = [ld.last_batch_records.copy() for _ in ld]
    second = [ld.last_batch_records.copy() for _ in ld]
    assert ld.epoch == 2
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    ld.set_epoch(0)
    again = [ld.last_batch_records.copy() for _ in ld]
    assert np.array_equal(np.concatenate(first), np.concatenate(again))


def test_an_iterator_made_and_dropped_consumes_no_epoch(sample_lmdb):
    """Lightning's pattern: iter(), iter(), set_epoch(0), then the second is iterated."""
    ld = Loader(sample_lmdb, "train", num_workers=1, **SMALL)
    a, b = iter(ld), iter(ld)
    ld.set_epoch(0)
    got = []
    for _ in b:
        got.append(ld.last_batch_records.copy())
    assert np.array_equal(np.concatenate(got), ld.epoch_order(0))
    del a  # never started: nothing to stop, nothing consumed
    # without set_epoch: unstarted iterators take no number either
    auto = Loader(sample_lmdb, "train", num_workers=0, **SMALL)
    for _ in range(3):
        iter(auto)
    first = [auto.last_batch_records.copy() for _ in auto]
    assert np.array_equal(np.concatenate(first), auto.epoch_order(0)) and auto.epoch == 1
    c = iter(auto)
    c.close()  # closed before it started: it never starts
    assert list(c) == [] and auto.epoch == 1
    ld.close()


def test_memory_bound(sample_lmdb):
    ld = Loader(sample_lmdb, "train", batch_size=8, num_workers=2, buffer_size=10)
    mean = ld.meta.total_bytes / ld.dataset_size
    m = ld.memory_bound()
    assert m["shuffle_buffer"] == int(10 * mean)
    assert m["in_flight"] == 4 * (int(8 * mean) + 8 * 3 * 224 * 224)
    assert m["total"] == m["shuffle_buffer"] + m["in_flight"]


def test_attributes(sample_lmdb):
    ld = Loader(sample_lmdb, "train", batch_size=5, num_workers=0, rank=1, world_size=3)
    assert ld.dataset_size == 48 and ld.num_records == 16 and len(ld) == 4
    assert ld.classes == ld.meta.classes and len(ld.classes) == 4
    assert (ld.rank, ld.world_size) == (1, 3)
    dl = Loader(sample_lmdb, "train", batch_size=5, num_workers=0, drop_last=True)
    assert len(dl) == 9 and dl.num_records == 45


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("mode", ["train", "val"])
def test_explicit_rank_shards(sample_lmdb, labels, world, mode):
    check_shards(lambda r, w: Loader(sample_lmdb, mode, rank=r, world_size=w, num_workers=0,
                                     **SMALL), world, labels[mode])


def test_raw_batch_decoder(sample_lmdb, labels):
    records = read_records(sample_lmdb, "train")
    calls = []

    def fake(jpegs, lab):
        calls.append(len(jpegs))
        return torch.tensor([len(j) for j in jpegs]), torch.from_numpy(np.asarray(lab))

    ld = Loader(sample_lmdb, "train", decoder=fake, **SMALL)
    check_epochs(lambda: Loader(sample_lmdb, "train", decoder=fake, **SMALL), labels["train"])
    for sizes, _ in ld:
        recs = ld.last_batch_records
        assert sizes.tolist() == [len(records[r][0]) for r in recs]
    assert calls and max(calls) == 5


@pytest.mark.parametrize("workers,wtype", [(0, "process"), (2, "process"), (2, "thread")])
def test_broken_record_raises_with_key(sample_lmdb, tmp_path, workers, wtype):
    root = write_broken_lmdb(sample_lmdb, str(tmp_path / "broken"))
    ld = Loader(root, "train", num_workers=workers, worker_type=wtype, **SMALL)
    with pytest.raises(RecordError, match="00000007") as info:
        for _ in ld:
            pass
    assert info.value.key == b"00000007"
    ok = Loader(root, "train", num_workers=workers, worker_type=wtype, skip_broken=True,
                **SMALL)
    seen = []
    for x, y in ok:
        assert len(x) == len(y) == len(ok.last_batch_records)
        seen.extend(ok.last_batch_records.tolist())
    assert sorted(seen) == [i for i in range(48) if i != 7]
    assert ok.skipped == 1 and ok.skipped_records[0][0] == 7


def test_legacy_tensorpack_lmdb(sample_lmdb, tmp_path):
    from tensorpack.dataflow import DataFromList, LMDBSerializer

    records = read_records(sample_lmdb, "val")
    dps = [[np.frombuffer(j, np.uint8), int(lab)] for j, lab in records]
    LMDBSerializer.save(DataFromList(dps, shuffle=False), str(tmp_path / "ILSVRC-val.lmdb"))
    ld = Loader(str(tmp_path), "val", batch_size=5, num_workers=1)
    assert ld.meta.legacy and ld.dataset_size == len(records)
    check_epochs(lambda: Loader(str(tmp_path), "val", batch_size=5, num_workers=1),
                 np.array([lab for _, lab in records]))
    ref = ValTransform()
    got = torch.cat([x for x, _ in ld])
    assert np.array_equal(got[3].permute(1, 2, 0).numpy(), ref(records[3][0]))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(mode="test"), ValueError, "mode='test'"),
    (dict(worker_type="fiber"), ValueError, "worker_type='fiber'"),
    (dict(decoder="gpu"), ValueError, "decoder='gpu'"),
    (dict(batch_size=0), ValueError, "batch_size=0"),
    (dict(num_workers=-1), ValueError, "num_workers=-1"),
    (dict(rank=2, world_size=2), ValueError, "rank=2 with world_size=2"),
    (dict(rank=1), ValueError, "pass both"),
    (dict(rank=0, world_size=49), ValueError, "world_size=49 is larger than the 48 records"),
    (dict(distributed=True), RuntimeError, "init_process_group"),
    (dict(transform=42), TypeError, "not callable"),
    (dict(buffer_size=-1), ValueError, "buffer_size=-1"),
])
def test_bad_arguments(sample_lmdb, kwargs, exc, match):
    kwargs = dict(kwargs)
    mode = kwargs.pop("mode", "train")
    with pytest.raises(exc, match=match):
        Loader(sample_lmdb, mode, **kwargs)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Loader(str(tmp_path / "nope"), "train")
    (tmp_path / "other.lmdb").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="found: other.lmdb.*preprocess_sequential"):
        Loader(str(tmp_path), "train")


def test_version_mismatch(sample_lmdb, tmp_path):
    root = str(tmp_path / "v")
    os.makedirs(root)
    path = os.path.join(root, fmt.split_filename("val"))
    copy_with_format_version(fmt.find_split(sample_lmdb, "val"), path, 99)
    with pytest.raises(ValueError, match="version 99"):
        Loader(root, "val")


def test_rank_from_initialised_process_group(sample_lmdb, tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ld = Loader(sample_lmdb, "train", num_workers=0, distributed=True, **SMALL)
        assert (ld.rank, ld.world_size) == (0, 1) and len(ld) == 10
        auto = Loader(sample_lmdb, "val", num_workers=0, batch_size=5)
        assert (auto.rank, auto.world_size) == (0, 1)
        off = Loader(sample_lmdb, "val", num_workers=0, distributed=False, batch_size=5)
        assert off.world_size == 1
    finally:
        dist.destroy_process_group()


def test_dali_decoder_is_imported_lazily(sample_lmdb):
    import sys

    ld = Loader(sample_lmdb, "val", decoder="dali", batch_size=4)
    assert "imagenet_seq.decode.dali" not in sys.modules or ld._passes.decode is None
    assert ld._passes.decode is None and len(ld) == 3


def test_two_loaders_of_one_split_in_one_process(sample_lmdb):
    """LMDB opens a file once per process: readers share one environment, reference-counted."""
    a = Loader(sample_lmdb, "val", batch_size=5, num_workers=0)
    b = Loader(sample_lmdb, "val", batch_size=7, num_workers=0)
    it = iter(a)
    first = next(it)
    n_b = sum(len(t) for _, t in b)  # b runs a whole epoch while a is mid-epoch
    rest = sum(len(t) for _, t in it)
    assert n_b == len(first[1]) + rest == a.dataset_size


def test_a_second_pass_stops_the_first_which_then_says_so(sample_lmdb):
    from imagenet_seq.loader.epoch import Superseded

    ld = Loader(sample_lmdb, "train", num_workers=1, **SMALL)
    with pytest.raises(Superseded, match=r"newer iter\(loader\).*second Loader"):
        list(zip(ld, ld))
    outer = []
    with pytest.raises(Superseded, match="after 1 of 10 batches"):
        for x, _ in ld:
            outer.append(x)
            inner = sum(len(y) for _, y in ld)  # the inner pass is whole
            assert inner == 48
    assert len(outer) == 1
    it = iter(ld)  # an explicit close ends a pass: StopIteration, as documented
    next(it)
    ld.close()
    assert list(it) == []
    assert sum(len(y) for _, y in ld) == 48  # and the Loader goes on as before


def test_file_problems_name_the_file_and_the_fix(sample_lmdb, tmp_path):
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "ILSVRC-train.lmdb").write_bytes(b"")
    with pytest.raises(fmt.DamagedFile, match=r"ILSVRC-train.lmdb is 0 bytes.*re-copy"):
        Loader(str(tmp_path / "zero"), "train")
    (tmp_path / "dir" / "ILSVRC-train.lmdb").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"is a folder \(empty\), not an LMDB file"):
        Loader(str(tmp_path / "dir"), "train")
    val = fmt.find_split(sample_lmdb, "val")
    with pytest.raises(ValueError, match=r"holds the 'val' split.*mode='val'.*check_split"):
        Loader(val, "train")
    assert Loader(val, "train", check_split=False, num_workers=0).dataset_size == 12
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    src = fmt.find_split(sample_lmdb, "train")
    size = os.path.getsize(src)
    with open(src, "rb") as f, open(trunc / "ILSVRC-train.lmdb", "wb") as g:
        g.write(f.read(size // 2))
    with pytest.raises(fmt.DamagedFile, match=rf"is {size // 2:,} bytes but its LMDB header "
                                              rf"says .*\({size:,} bytes\).*re-copy"):
        Loader(str(trunc), "train")


def test_a_label_changed_in_place_names_the_real_remedy(sample_lmdb, tmp_path):
    from imagenet_seq.format import offsets

    root = tmp_path / "lab"
    root.mkdir()
    path = str(root / "ILSVRC-train.lmdb")
    shutil.copy(fmt.find_split(sample_lmdb, "train"), path)
    env = fmt.open_env(path)
    offs, _ = offsets.read(env, 48, path)
    env.close()
    labels = SplitReader(str(root), "train").labels
    for value, match in [((int(labels[5]) + 1) % 4, r"00000005.*changed after conversion"),
                         (999, r"00000005.*label 999")]:
        with open(path, "r+b") as f:  # in place: no LMDB transaction, the index stays current
            f.seek(int(offs[5]))
            f.write(fmt.RECORD_HEADER.pack(value))
        for _ in range(2):  # the advice is verify + re-copy, not --rebuild (which changes nothing)
            with pytest.raises(RecordError, match=match + r".*imagenet-seq-verify.*re-copy") as e:
                for _ in Loader(str(root), "train", num_workers=0, skip_broken=True, **SMALL):
                    pass
            assert "--rebuild" not in str(e.value) and e.value.key == b"00000005"
            assert offsets.main([path, "--rebuild"]) == 0
