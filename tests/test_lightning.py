"""ImagenetSeqDataModule with a real lightning.Trainer on the CPU: 1 process, 2 DDP processes
(gloo), epochs set by Lightning through loader.sampler, prepare_data idempotent, mid-epoch
resume through Lightning's checkpoint (when the Loader has state_dict), the ImportError."""
import json
import os
import signal
import subprocess
import sys

import pytest
from import_errors import import_error

pytest.importorskip("lightning")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "lightning_fit.py")
N_TRAIN, N_VAL = 48, 12  # sample_lmdb: 4 classes x 12 / x 3


def fit(lmdb, out, *args, timeout=400, expect_rc=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, SCRIPT, lmdb, str(out)] + [str(a) for a in args],
                       capture_output=True, text=True, timeout=timeout, env=env,
                       start_new_session=True)
    assert r.returncode == expect_rc, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def load(out, tag, rank):
    with open(os.path.join(out, f"{tag}_rank{rank}.json")) as f:
        return json.load(f)


def assert_epochs_are_the_loaders(d, epochs):
    """Lightning's epoch e consumed exactly the Loader's epoch e: batch for batch (pixel and
    target hashes), each epoch a permutation of this rank's share in epoch_order(e)."""
    assert d["epochs_set"] == list(range(epochs))  # Lightning's set_epoch reached the Loader
    ref = d["reference"]
    for e in range(epochs):
        r = ref[str(e)]
        assert r["records"] == r["epoch_order"]  # the fresh Loader's batches are epoch_order(e)
        assert d["seen"][str(e)] == r["hashes"], f"Lightning's epoch {e} is not the Loader's"
        assert len(d["seen"][str(e)]) == d["len"]
    for e in range(1, epochs):  # another order every epoch: no epoch repeated
        assert ref[str(e)]["records"] != ref[str(e - 1)]["records"]
        assert d["seen"][str(e)] != d["seen"][str(e - 1)]


def test_fit_one_process_trains_each_epoch_once(sample_lmdb, tmp_path):
    fit(sample_lmdb, tmp_path, "--devices", 1, "--epochs", 3)
    d = load(tmp_path, "run", 0)
    assert (d["loader_rank"], d["loader_world"]) == (0, 1)
    assert_epochs_are_the_loaders(d, 3)
    for e in range(3):
        assert sorted(d["reference"][str(e)]["records"]) == list(range(N_TRAIN))
    assert d["len"] == N_TRAIN // 4
    assert d["val_seen"] == d["val_reference"]["hashes"] * 3  # every val pass whole, in order


@pytest.mark.slow
def test_fit_ddp_two_processes_trains_each_epoch_once(sample_lmdb, tmp_path):
    fit(sample_lmdb, tmp_path, "--devices", 2, "--epochs", 3)
    ranks = [load(tmp_path, "run", r) for r in (0, 1)]
    for r, d in enumerate(ranks):
        assert (d["loader_rank"], d["loader_world"], d["world"]) == (r, 2, 2)
        assert_epochs_are_the_loaders(d, 3)
    for e in ("0", "1", "2"):
        a, b = (d["reference"][e]["records"] for d in ranks)
        assert len(a) == len(b) == N_TRAIN // 2 and not set(a) & set(b)
    # val: every image once across the ranks, in every val pass
    vals = [d["val_reference"]["records"] for d in ranks]
    assert sorted(vals[0] + vals[1]) == list(range(N_VAL))
    for d in ranks:
        assert d["val_seen"] == d["val_reference"]["hashes"] * 3


def test_mid_epoch_resume_through_lightning_checkpoint(sample_lmdb, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir()
    part.mkdir()
    fit(sample_lmdb, full, "--epochs", 2, "--tag", "full")
    # checkpoint after step 5 of 12, killed (SIGKILL) at the start of step 7: Lightning had
    # fetched batches beyond the checkpoint, and none of it was saved
    fit(sample_lmdb, part, "--epochs", 2, "--ckpt-every", 5, "--kill-at-step", 7,
        "--tag", "a", expect_rc=-signal.SIGKILL)
    ckpt = part / "ckpt" / "epoch=0-step=5.ckpt"
    assert ckpt.exists(), os.listdir(part / "ckpt")
    fit(sample_lmdb, part, "--epochs", 2, "--resume", ckpt, "--tag", "b")
    want = load(full, "full", 0)["seen"]
    rest = load(part, "b", 0)["seen"]
    assert len(rest["0"]) == len(want["0"]) - 5
    assert rest["0"] == want["0"][5:]  # the same batches, in order, none twice, none lost
    assert rest["1"] == want["1"]


@pytest.mark.slow
def test_mid_epoch_resume_under_ddp_gives_each_rank_its_own_state(sample_lmdb, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir()
    part.mkdir()
    fit(sample_lmdb, full, "--devices", 2, "--epochs", 2, "--tag", "full")
    # 6 steps per epoch per rank: checkpoint after step 2, every rank killed at step 4
    r = fit(sample_lmdb, part, "--devices", 2, "--epochs", 2, "--ckpt-every", 2,
            "--kill-at-step", 4, "--tag", "a", expect_rc=-signal.SIGKILL, timeout=400)
    ckpt = part / "ckpt" / "epoch=0-step=2.ckpt"
    assert ckpt.exists(), os.listdir(part / "ckpt")
    fit(sample_lmdb, part, "--devices", 2, "--epochs", 2, "--resume", ckpt, "--tag", "b")
    for rank in (0, 1):
        want = load(full, "full", rank)["seen"]
        rest = load(part, "b", rank)["seen"]
        assert rest["0"] == want["0"][2:], f"rank {rank} resumed elsewhere"
        assert rest["1"] == want["1"]


def test_a_ddp_checkpoint_on_another_world_size_is_refused_by_name(sample_lmdb):
    from imagenet_seq.data import Loader
    from imagenet_seq.integrations.lightning import _RANKS_KEY, _this_ranks

    ld = Loader(sample_lmdb, "train", batch_size=4, num_workers=0)
    mid = [dict(ld.state_dict(), batches=2, rank=r, world_size=2) for r in (0, 1)]
    with pytest.raises(ValueError, match=r"mid-epoch loader states of 2 ranks.*this run has 1"):
        _this_ranks({_RANKS_KEY: mid, "world_size": 2}, ld)
    boundary = [dict(ld.state_dict(), rank=r, world_size=2) for r in (0, 1)]
    assert _this_ranks({_RANKS_KEY: boundary, "world_size": 2}, ld)["batches"] == 0
    ld.load_state_dict(_this_ranks({_RANKS_KEY: boundary, "world_size": 2}, ld))


def test_prepare_data_converts_once(sample_tree, tmp_path):
    from imagenet_seq.integrations.lightning import ImagenetSeqDataModule

    out = tmp_path / "lmdb"
    dm = ImagenetSeqDataModule(str(out), image_folder=sample_tree[0], convert_workers=0,
                               batch_size=4, num_workers=0)
    dm.prepare_data()
    stamp = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)}
    dm.prepare_data()  # idempotent: nothing rewritten
    assert {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)} == stamp
    dm.setup("fit")  # no trainer: one rank
    assert len(dm.train_dataloader()) == N_TRAIN // 4 and len(dm.val_dataloader()) == 3
    dm.teardown("fit")
    with pytest.raises(FileNotFoundError, match="image_folder"):
        ImagenetSeqDataModule(str(tmp_path / "empty")).prepare_data()
    with pytest.raises(ValueError, match="rank"):
        ImagenetSeqDataModule(str(out), rank=0)
    with pytest.raises(ValueError, match="image_size=12"):
        ImagenetSeqDataModule(str(out), image_size=12)


def test_missing_or_old_lightning_names_pip_line():
    out, both = import_error("import sys; sys.modules['lightning'] = None",
                             "imagenet_seq.integrations.lightning", timeout=60)
    assert 'pip install "imagenet_seq[lightning]"' in out, both
    out, both = import_error("import lightning; lightning.__version__ = '1.9.0'",
                             "imagenet_seq.integrations.lightning")
    assert "found 1.9.0" in out and '[lightning]" --upgrade' in out, both
