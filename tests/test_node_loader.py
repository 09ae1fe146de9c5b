"""The Loader with one reader per node (issue 24): real rank processes (tests/node_loader_ranks.py,
launched with torchrun's environment: RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK), real
LMDBs, the real reader process. No timing thresholds: every wait has a limit only so that a
hang fails the test.
"""
import json
import logging
import os
import signal

import pytest

from imagenet_seq.data import Loader
from imagenet_seq.loader import loader as loader_module

import node_procs
from node_procs import LIMIT_S, Direct, finish, launch, sample_lmdb, shm
from node_procs import wait_gone as gone

pytestmark = pytest.mark.timeout(600)
N_TRAIN = 150  # 150 % 4: a tail


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sample_lmdb(tmp_path_factory, "node_loader", train_per_class=50, val_per_class=5,
                       num_classes=3, seed=4, size=(40, 32), quality=80)


def reference(root, monkeypatch, mode, world, local, rank, epochs, node=True):
    """Batches (records, targets, pixel digests) of one rank, read in this process."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    monkeypatch.setattr(loader_module, "_node_client", lambda settings, reader: Direct(reader))
    ld = Loader(root, mode, batch_size=4, num_workers=1, worker_type="thread", image_size=16,
                resize_size=16, seed=3, chunk_size=4, buffer_size=8, rank=rank,
                world_size=world, node_reader=node)
    assert ld.settings.order.node_reader is node
    out = {}
    for e in epochs:
        ld.set_epoch(e)
        got = node_procs.new_epoch()
        for images, targets in ld:
            node_procs.add_batch(got, ld, images, targets)
        out[str(e)] = got
    ld.close()
    return out


def check_epochs(results, world, mode="train", n=N_TRAIN):
    """Every record once per epoch across the ranks, equal batch counts (train)."""
    epochs = results[0]["epochs"].keys()
    for e in epochs:
        recs = [x for r in results.values() for b in r["epochs"][e]["records"] for x in b]
        assert len(recs) == len(set(recs))
        if mode == "train":
            assert n - world < len(recs) <= n
            assert len({len(r["epochs"][e]["records"]) for r in results.values()}) == 1
        else:
            assert len(recs) == n


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world,local,mode", [(2, 2, "train"), (4, 4, "train"),
                                              (4, 2, "train"), (3, 3, "val")])
def test_node_reader_yields_the_per_rank_batches_of_the_node_plan(data, tmp_path, monkeypatch,
                                                                   world, local, mode):
    before = shm()
    epochs = ["0", "1"] if mode == "train" else ["0"]
    res = finish(launch(data, tmp_path, world, local, f"same-{world}-{local}-{mode}",
                        ["--mode", mode, "--epochs"] + epochs))
    for r, got in res.items():
        assert got["error"] is None, got
        assert got["node_reader"] is True and got["plan"] == "node-1"
        assert got["reader_pid"] is not None
        want = reference(data, monkeypatch, mode, world, local, r, [int(e) for e in epochs])
        assert got["epochs"] == want
    check_epochs(res, world, mode, N_TRAIN if mode == "train" else 15)
    for got in res.values():
        gone(got["reader_pid"])
    assert shm() <= before


def test_mid_epoch_resume_on_the_same_world_size_is_exact(data, tmp_path):
    first = finish(launch(data, tmp_path, 3, 3, "resume-a", ["--epochs", "1",
                                                              "--save-after", "2"]))
    per_rank = {}
    for r, got in first.items():
        assert got["error"] is None and got["state"]["batches"] == 2
        assert got["state"]["plan"] == "node-1" and got["state"]["local_world_size"] == 3
        path = tmp_path / f"state{r}.json"
        path.write_text(json.dumps(got["state"]))
        per_rank[r] = ["--resume", str(path)]
    second = finish(launch(data, tmp_path, 3, 3, "resume-b", per_rank=per_rank))
    for r, got in second.items():
        assert got["error"] is None, got
        whole, rest = first[r]["epochs"]["1"], got["epochs"]["1"]
        assert rest == {k: v[2:] for k, v in whole.items()}


def wait_progress(outs, batches=2):
    """Until every rank has read ``batches`` (so every rank is connected to the reader)."""
    node_procs.wait_progress(outs, batches)


@pytest.mark.parametrize("victim", [0, 2])
def test_kill_9_of_a_rank_is_named_to_the_others_and_nothing_is_left(data, tmp_path, victim):
    before = shm()
    procs = launch(data, tmp_path, 3, 3, f"kill-{victim}", ["--forever", "--epochs", "0", "1"])
    wait_progress([out for _, out in procs.values()])
    p, _ = procs.pop(victim)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=LIMIT_S)
    res = finish(procs)
    readers = set()
    for r, got in res.items():
        err = got["error"]
        assert err is not None, got
        assert f"local rank {victim} (rank {victim}, pid {p.pid})" in err["message"], err
        readers.add(got["reader_pid"])
    assert len(readers) == 1
    gone(readers.pop())
    assert shm() <= before


@pytest.mark.parametrize("how", ["env", "argument"])
def test_the_off_switch_gives_todays_plan_and_per_rank_reading(data, tmp_path, monkeypatch,
                                                              how):
    args, extra = ["--epochs", "0"], {}
    if how == "env":
        extra["IMAGENET_SEQ_NODE_READER"] = "0"
    else:
        args += ["--node-reader", "off"]
    res = finish(launch(data, tmp_path, 2, 2, f"off-{how}", args, extra=extra))
    for r, got in res.items():
        assert got["error"] is None, got
        assert got["node_reader"] is False and got["plan"] == "rank-1"
        assert got["reader_pid"] is None
        assert got["epochs"] == reference(data, monkeypatch, "train", 2, 2, r, [0], node=False)
    check_epochs(res, 2)


def _state(root, monkeypatch, node, local=2, batches=1):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    monkeypatch.setattr(loader_module, "_node_client", lambda settings, reader: Direct(reader))
    ld = Loader(root, "train", batch_size=4, rank=0, world_size=4, node_reader=node,
                num_workers=0)
    sd = ld.state_dict()
    ld.close()
    sd["batches"] = batches
    return sd


def test_a_state_resumes_only_under_its_plan(data, monkeypatch):
    node_state = _state(data, monkeypatch, True)
    today = Loader(data, "train", batch_size=4, rank=0, world_size=4, node_reader=False,
                   num_workers=0)
    with pytest.raises(ValueError) as e:
        today.load_state_dict(node_state)
    msg = str(e.value)
    assert "node-1 (local_world_size=2)" in msg and "rank-1" in msg
    assert "node_reader" in msg and "set_epoch(epoch + 1)" in msg
    # a state without a plan (saved before it existed) is today's plan
    old = dict(_state(data, monkeypatch, False))
    del old["plan"], old["local_world_size"]
    today.load_state_dict(old)
    node = Loader(data, "train", batch_size=4, rank=0, world_size=4, node_reader=True,
                  num_workers=0)
    with pytest.raises(ValueError, match="rank-1"):
        node.load_state_dict(old)
    # other nodes' size: refused; at an epoch boundary any plan loads
    with pytest.raises(ValueError, match="local_world_size=4"):
        node.load_state_dict(_state(data, monkeypatch, True, local=4))
    node.load_state_dict(dict(node_state, batches=0))
    node.load_state_dict(dict(old, batches=0))
    today.close()
    node.close()


def test_an_uneven_layout_or_no_index_falls_back_with_one_line(data, sample_lmdb_no_index,
                                                              monkeypatch, caplog):
    monkeypatch.setattr(loader_module, "_node_client", lambda settings, reader: Direct(reader))
    kw = dict(batch_size=4, num_workers=0, rank=1, world_size=4)
    cases = [({"LOCAL_WORLD_SIZE": "3"}, data, "does not divide"),
             ({"LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}, data, "GROUP_RANK=1"),
             ({"LOCAL_WORLD_SIZE": "2"}, sample_lmdb_no_index, "offsets index")]
    for env, root, why in cases:
        for k in ("LOCAL_WORLD_SIZE", "GROUP_RANK"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ld = Loader(root, "train", **kw)
        assert ld.settings.order.node_reader is False and ld.plan.name == "rank-1"
        lines = [r.getMessage() for r in caplog.records if "node's" in r.getMessage()]
        assert len(lines) == 1 and why in lines[0], lines
        ld.close()
        with pytest.raises(ValueError, match=why):
            Loader(root, "train", node_reader=True, **kw)
    # the layout is right: on by default; off by the variable or the argument
    monkeypatch.delenv("GROUP_RANK", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert Loader(data, "train", **kw).settings.order.node_reader is True
    assert Loader(data, "train", node_reader=False, **kw).settings.order.node_reader is False
    monkeypatch.setenv("IMAGENET_SEQ_NODE_READER", "0")
    assert Loader(data, "train", **kw).settings.order.node_reader is False
    assert Loader(data, "train", node_reader=True, **kw).settings.order.node_reader is True
    # no launcher's LOCAL_WORLD_SIZE (explicit ranks): today's plan unless asked
    monkeypatch.delenv("IMAGENET_SEQ_NODE_READER")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert Loader(data, "train", **kw).settings.order.node_reader is False
    with pytest.raises(ValueError, match="node_reader="):
        Loader(data, "train", node_reader="yes", **kw)


def test_close_says_goodbye_and_a_later_pass_connects_again(data, monkeypatch):
    """One rank of two (the other never comes: the reader serves it alone)."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"close-{os.getpid()}")
    ld = Loader(data, "train", batch_size=4, num_workers=0, rank=0, world_size=2, seed=3,
                chunk_size=4, buffer_size=8)
    assert ld.settings.order.node_reader is True
    first_client = ld.reader
    ld.set_epoch(1)
    a = [[int(r) for r in ld.last_batch_records] for _ in ld]
    ld.close()
    with pytest.raises(Exception, match="shut down"):
        list(first_client.read_spans(ld.plan.spans(1)))
    gone(first_client.reader_pid)  # its last rank said goodbye: the reader exited
    b = [[int(r) for r in ld.last_batch_records] for _ in ld]  # epoch 1 again: connects anew
    assert ld.reader is not first_client and a == b and len(a) == len(ld)
    assert [x for batch in a for x in batch] == [int(i) for i in ld.epoch_order(1)]
    ld.close()
    gone(ld.reader.reader_pid)
