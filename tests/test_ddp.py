"""DDP end to end with real torchrun processes (gloo, CPU): the Loader's sharding seen from the
ranks, and examples/imagenet/main.py trained, checkpointed, resumed and evaluated on 2 ranks."""
import json
import os
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MAIN = os.path.join(REPO, "examples", "imagenet", "main.py")
sys.path.insert(0, HERE)
from ddp_ranks import colour_of  # noqa: E402

N_TRAIN, N_VAL, N_CLASSES = 51, 17, 4  # 51 % 2: a one-record tail; val 8 + 9
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=WORLD, timeout=240):
    """``python -m torch.distributed.run`` on localhost; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}"] + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


@pytest.fixture(scope="module")
def colour_lmdb(tmp_path_factory):
    """Solid-colour JPEGs whose colour encodes an id; label = id % 4; converted to LMDBs.

    Returns (lmdb folder, {split: {id: label}}).
    """
    from imagenet_seq.convert.cli import main as preprocess

    src = tmp_path_factory.mktemp("colour_tree")
    truth = {"train": {}, "val": {}}
    for split, n, offset in (("train", N_TRAIN, 0), ("val", N_VAL, 1000)):
        for k in range(n):
            i = offset + k
            label = i % N_CLASSES
            d = src / split / f"class{label}"
            d.mkdir(parents=True, exist_ok=True)
            img = np.empty((40, 48, 3), np.uint8)
            img[:] = colour_of(i)[::-1]  # BGR for cv2
            cv2.imwrite(str(d / f"{i:04d}.JPEG"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
            truth[split][i] = label
    out = str(tmp_path_factory.mktemp("colour_lmdb"))
    assert preprocess([str(src), out, "--workers", "0", "--no-progress"]) == 0
    return out, truth


@pytest.mark.slow
def test_ddp_loader_shards(colour_lmdb, tmp_path):
    root, truth = colour_lmdb
    epochs = 3
    r = torchrun([os.path.join(HERE, "ddp_ranks.py"), root, str(tmp_path), "--epochs",
                  str(epochs), "--batch-size", "4", "--workers", "1",
                  "--chunk-size", "5"])  # chunks of 5 records: ~10 chunks to permute
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{k}.json")) for k in range(WORLD)]
    for k, d in enumerate(ranks):
        assert (d["rank"], d["loader_rank"], d["loader_world_size"]) == (k, k, WORLD)
        assert d["dataset_size"] == N_TRAIN
        assert d["all_reduce"] == WORLD
        assert d["node_reader"] is True  # torchrun, 2 ranks on this node: one node reader
    train_sets = []
    for e in range(epochs):
        # every rank: the same number of batches, equal to len(loader)
        counts = {d["train_batches"][e] for d in ranks}
        assert len(counts) == 1, f"epoch {e}: unequal batch counts {counts}"
        assert all(d["train_len"][e] == d["train_batches"][e] for d in ranks)
        shards = [d["train_ids"][e] for d in ranks]
        for d, ids in zip(ranks, shards):
            assert len(ids) == len(set(ids)) == d["train_num_records"][e]
            assert set(ids) <= set(truth["train"])
            # labels travel with their images
            assert d["train_labels"][e] == [truth["train"][i] for i in ids]
        # disjoint, and the union is the dataset minus a tail smaller than world_size
        assert not set(shards[0]) & set(shards[1])
        union = set(shards[0]) | set(shards[1])
        assert N_TRAIN - WORLD < len(union) <= N_TRAIN
        train_sets.append([frozenset(s) for s in shards])
    # each rank resumed its own mid-epoch state (same process group): exactly the rest of its
    # last epoch
    for k, d in enumerate(ranks):
        st = d["resume_state"]
        assert (st["rank"], st["world_size"], st["epoch"]) == (k, WORLD, epochs - 1)
        done = st["batches"] * 4
        assert d["resume_rest_keys"] == d["train_keys"][epochs - 1][done:]
    # record keys (file positions) agree with the pixels: one fixed image per key
    key_to_id = {}
    for d in ranks:
        for e in range(epochs):
            assert len(d["train_keys"][e]) == len(d["train_ids"][e])
            for k, i in zip(d["train_keys"][e], d["train_ids"][e]):
                assert key_to_id.setdefault(k, i) == i
    assert set(key_to_id) <= set(range(N_TRAIN))
    # each rank reads long contiguous runs of the file: few breaks in its sorted key list
    for d in ranks:
        keys = sorted(d["train_keys"][0])
        breaks = sum(1 for a, b in zip(keys, keys[1:]) if b != a + 1)
        assert breaks < len(keys) // 2
    # the assignment changes with the epoch
    assert len({s[0] for s in train_sets}) > 1
    # val: every image exactly once across the ranks, no padding, labels right
    val_ids = ranks[0]["val_ids"] + ranks[1]["val_ids"]
    assert sorted(val_ids) == sorted(truth["val"])
    for d in ranks:
        assert d["val_labels"] == [truth["val"][i] for i in d["val_ids"]]
        # val is in file order and each rank's slice is contiguous
        assert d["val_keys"] == list(range(d["val_keys"][0], d["val_keys"][0] + len(d["val_keys"])))
        assert d["val_len"] == -(-len(d["val_ids"]) // 4)
    assert sorted(len(d["val_ids"]) for d in ranks) == [N_VAL // 2, N_VAL - N_VAL // 2]


SMALL = ["-a", "tiny", "-b", "8", "-j", "2", "--image-size", "32", "--resize-size", "40",
         "-p", "1", "--lr", "0.05"]


@pytest.mark.slow
def test_ddp_example_checkpoint_resume_evaluate(sample_lmdb, tmp_path):
    out = str(tmp_path / "run")
    r = torchrun([MAIN, sample_lmdb] + SMALL + ["--epochs", "1", "--output-dir", out])
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "2 rank(s) on cpu" in log and "batch 4 x 2" in log
    assert "Epoch 1/1 done" in log and "img/s" in log and "run ETA" in log
    # rank 0 alone prints: one summary line per epoch
    assert log.count("Epoch 1/1 done") == 1
    # val counted once across ranks: 4 classes x 3 images
    assert "on 12 images" in log
    assert os.path.isfile(os.path.join(out, "checkpoint.pth"))

    r = torchrun([MAIN, sample_lmdb] + SMALL + ["--epochs", "2", "--output-dir", out,
                                                 "--resume", out])
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "resumed" in log and "Epoch 2/2 done" in log and "Epoch 1/2" not in log

    import torch
    ck = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=False)
    assert ck["epoch"] == 2 and ck["arch"] == "tiny"

    r = torchrun([MAIN, sample_lmdb] + SMALL + ["--evaluate", "--resume", out])
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert " * val top1" in log and "on 12 images" in log


@pytest.mark.slow
def test_ddp_example_bad_resume_fails_fast(sample_lmdb, tmp_path):
    missing = str(tmp_path / "nope.pth")
    r = torchrun([MAIN, sample_lmdb] + SMALL + ["--resume", missing], timeout=120)
    assert r.returncode != 0
    assert missing in r.stderr and "drop --resume" in r.stderr
