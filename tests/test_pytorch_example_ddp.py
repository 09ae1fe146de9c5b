"""The official PyTorch ImageNet example's DDP data code on the Loader, 2 real torchrun ranks
(gloo): ``train_sampler.set_epoch``, ``len(val_loader.sampler)``, ``len(val_loader.dataset)``
and the auxiliary val loader over ``Subset(val_loader.dataset, ...)``
(tests/pytorch_example_ddp.py reproduces those lines), plus the faces in one process."""
import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_ddp import N_TRAIN, N_VAL, WORLD, colour_lmdb, torchrun  # noqa: E402,F401 - fixture

SCRIPT = os.path.join(HERE, "pytorch_example_ddp.py")


@pytest.mark.slow
@pytest.mark.parametrize("transform", ["torchvision", "fast"])
def test_example_ddp_data_code_under_torchrun(colour_lmdb, tmp_path, transform):  # noqa: F811
    if transform == "torchvision":
        pytest.importorskip("torchvision")
    root, truth = colour_lmdb
    epochs = 2
    r = torchrun([SCRIPT, root, str(tmp_path), "--epochs", str(epochs), "-b", "4", "-j", "1",
                  "--transform", transform], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{k}.json")) for k in range(WORLD)]
    for d in ranks:
        assert d["all_reduce"] == WORLD
        # DistributedSampler-like lengths: train N // W; val ceil(N / W) (the largest share)
        assert d["sampler_len"] == {"train": N_TRAIN // WORLD, "val": -(-N_VAL // WORLD)}
        assert d["dataset_len"] == {"train": N_TRAIN, "val": N_VAL}
        # train_sampler.set_epoch(epoch) set the Loader's epoch
        assert d["epochs_seen"] == list(range(epochs))
        # the example's leftover check is false: no auxiliary loader, no image twice
        assert d["aux_built"] == [False] * epochs
        assert d["progress_len"] == -(-len(d["val_records"][0]) // 4)
        # top1.all_reduce() counted every val image exactly once
        assert d["val_count"] == [N_VAL] * epochs
        # the auxiliary loader's machinery (Subset + DataLoader workers) gives the same pixels
        assert d["forced_aux_equal"] and all(d["forced_aux_equal"])
    for e in range(epochs):
        assert ranks[0]["train_batches"][e] == ranks[1]["train_batches"][e]
        a, b = (set(d["train_records"][e]) for d in ranks)
        assert not a & b and len(a) == len(b) == N_TRAIN // WORLD
        val = ranks[0]["val_records"][e] + ranks[1]["val_records"][e]
        assert sorted(val) == list(range(N_VAL))
    # the epoch set through the sampler changed the order
    assert ranks[0]["train_records"][0] != ranks[0]["train_records"][1]


def test_faces_in_one_process(colour_lmdb):  # noqa: F811
    """sampler/dataset without a process group: lengths, set_epoch, iteration, pixels."""
    from imagenet_seq.data import Loader

    root, _ = colour_lmdb
    for rank in range(WORLD):
        train = Loader(root, "train", batch_size=4, num_workers=0, image_size=16,
                       resize_size=16, rank=rank, world_size=WORLD)
        val = Loader(root, "val", batch_size=4, num_workers=0, image_size=16, resize_size=16,
                     rank=rank, world_size=WORLD)
        s = train.sampler
        assert (s.num_replicas, s.rank, s.shuffle, s.seed, s.drop_last) == (WORLD, rank, True,
                                                                          0, False)
        s.set_epoch(5)
        assert train.epoch == 5 == s.epoch
        assert list(s) == train.epoch_order(5).tolist()
        assert len(s) == N_TRAIN // WORLD == len(list(s))
        assert len(val.sampler) * WORLD >= len(val.dataset) == N_VAL
        assert len(list(val.sampler)) == val.num_records
        # dataset[i] = the Loader's pixels for record i (train: this epoch's augmentation)
        ds = train.dataset
        images, _ = next(iter(train))
        recs = train.last_batch_records.tolist()
        for k, rec in enumerate(recs):
            im, target = ds[rec]
            assert torch.equal(im, images[k]) and isinstance(target, int)
        assert torch.equal(ds[-1][0], ds[N_TRAIN - 1][0])
        with pytest.raises(IndexError, match="outside the 51 records"):
            ds[N_TRAIN]
        with pytest.raises(TypeError, match="expected an int"):
            ds["a"]
        train.close()
