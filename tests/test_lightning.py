"""ImagenetSeqDataModule with a real lightning.Trainer on the CPU: 1 process, 2 DDP processes
(gloo), epochs set by Lightning through loader.sampler, prepare_data idempotent, mid-epoch
resume through Lightning's checkpoint (when the Loader has state_dict), the ImportError."""
import json
import os
import subprocess
import sys

import pytest
from import_errors import import_error

pytest.importorskip("lightning")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "lightning_fit.py")
N_TRAIN, N_VAL = 48, 12  # sample_lmdb: 4 classes x 12 / x 3


def fit(lmdb, out, *args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, SCRIPT, lmdb, str(out)] + [str(a) for a in args],
                       capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def load(out, tag, rank):
    with open(os.path.join(out, f"{tag}_rank{rank}.json")) as f:
        return json.load(f)


def test_fit_one_process(sample_lmdb, tmp_path):
    fit(sample_lmdb, tmp_path, "--devices", 1, "--epochs", 2)
    d = load(tmp_path, "run", 0)
    assert (d["loader_rank"], d["loader_world"]) == (0, 1)
    assert d["epochs_set"] == [0, 1]  # Lightning's set_epoch reached the Loader
    epochs = [sum(d["seen"][str(e)], []) for e in range(2)]
    for recs in epochs:
        assert sorted(recs) == list(range(N_TRAIN))  # every record once per epoch
    assert epochs[0] != epochs[1]  # another order each epoch
    assert len(d["seen"]["0"]) == d["len"] == N_TRAIN // 4


@pytest.mark.slow
def test_fit_ddp_two_processes(sample_lmdb, tmp_path):
    fit(sample_lmdb, tmp_path, "--devices", 2, "--epochs", 2)
    ranks = [load(tmp_path, "run", r) for r in (0, 1)]
    for r, d in enumerate(ranks):
        assert (d["loader_rank"], d["loader_world"], d["world"]) == (r, 2, 2)
        assert d["epochs_set"] == [0, 1]
    for e in ("0", "1"):
        a, b = (sum(d["seen"][e], []) for d in ranks)
        assert len(a) == len(b) == N_TRAIN // 2 and not set(a) & set(b)
        assert len(ranks[0]["seen"][e]) == len(ranks[1]["seen"][e])
    # val: every image once across the ranks (each val pass)
    passes = [sum(d["val_seen"], []) for d in ranks]
    assert sorted(passes[0] + passes[1]) == sorted(list(range(N_VAL)) * 2)  # 2 epochs


def test_mid_epoch_resume_through_lightning_checkpoint(sample_lmdb, tmp_path):
    from imagenet_seq.data import Loader

    if not hasattr(Loader, "load_state_dict"):
        pytest.skip("this Loader has no state_dict yet")
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir()
    part.mkdir()
    fit(sample_lmdb, full, "--epochs", 1, "--tag", "full")
    # stop after 5 of 12 steps, checkpoint there (Lightning had already fetched batch 6)
    fit(sample_lmdb, part, "--epochs", 1, "--max-steps", 5, "--ckpt-every", 5, "--tag", "a")
    ckpt = part / "ckpt" / "epoch=0-step=5.ckpt"
    assert ckpt.exists(), os.listdir(part / "ckpt")
    fit(sample_lmdb, part, "--epochs", 1, "--resume", ckpt, "--tag", "b")
    want = load(full, "full", 0)["seen"]["0"]
    first = load(part, "a", 0)["seen"]["0"]
    rest = load(part, "b", 0)["seen"]["0"]
    assert len(first) == 5 and len(rest) == len(want) - 5
    assert first + rest == want  # the same batches, in order, none twice, none lost


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
