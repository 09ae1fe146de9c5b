"""A node reader's fault reaches a rank that never asks for its next batch (issue 24, item 4):
ranks blocked in a DDP collective end themselves, naming the dead rank or reader, leaving no
process and no shared memory behind (imagenet_seq.read.node_fault).

Real processes: Loader ranks with a gloo process group (tests/node_loader_ranks.py), the real
reader. No timing thresholds: every wait has a limit only so that a hang fails the test; the
grace period is shortened to keep the tests short.
"""
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from imagenet_seq.read import node_fault
from imagenet_seq.read.node_client import NodeClient
from imagenet_seq.read.reader import SplitReader

from node_procs import (ENV, LIMIT_S, finish, launch, left_behind, our_names, sample_lmdb, shm,
                        start, state, wait_file, wait_gone, wait_progress)

pytestmark = pytest.mark.timeout(600)
GRACE = "2"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sample_lmdb(tmp_path_factory, "node_faults", train_per_class=50, val_per_class=5,
                       num_classes=3, seed=4, size=(40, 32), quality=80)


@pytest.fixture(scope="module")
def store():
    """The TCPStore the ranks' ``--block store`` waits on (nobody sets the key)."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(hours=1))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs, timeout=LIMIT_S):
    """Every rank's exit status and stderr; a rank still running after ``timeout`` has hung
    (all are killed, the test fails)."""
    out = {}
    for r, (p, path) in procs.items():
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs.values():
                q.kill()
            raise AssertionError(f"rank {r} (pid {p.pid}) still runs {timeout} s after the "
                                 f"fault: {open(path + '.err').read()[-3000:]}")
        out[r] = (p.returncode, open(path + ".err").read())
    return out


@pytest.mark.parametrize("victim,blocks", [
    ("rank", ["store", "store", "store"]),  # NCCL-like: nothing but the fault watch ends them
    ("rank", ["allreduce", "sleep", "allreduce"]),  # gloo notices the dead peer itself too
    ("reader", ["sleep", "allreduce", "allreduce"]),  # a long step; the others wait for it
])
def test_a_fault_ends_ranks_blocked_in_a_collective(data, store, tmp_path, victim, blocks):
    names, dev_shm = our_names(), shm()
    tag = f"ddp-{victim}-{'-'.join(blocks)}"
    extra = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                 BLOCK_STORE_PORT=str(store.port), IMAGENET_SEQ_FAULT_GRACE_S=GRACE)
    procs = launch(data, tmp_path, 3, 3, tag,
                   ["--forever", "--epochs", "0", "1", "--ddp", "--block-after", "3", "--child",
                    "--workers", "process"], extra=extra,
                   per_rank={r: ["--block", b] for r, b in enumerate(blocks)})
    blocked = {}
    try:
        blocked.update({r: json.loads(wait_file(out + ".blocked"))
                        for r, (_, out) in procs.items()})
        _fault_and_check(procs, blocked, victim, blocks, names, dev_shm)
    finally:  # a failed test leaves no process: the ranks, and what was below each
        for p, _ in procs.values():
            p.kill()
        for b in blocked.values():
            for pid in b["below"]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _fault_and_check(procs, blocked, victim, blocks, names, dev_shm):
    reader = blocked[0]["reader_pid"]
    assert reader is not None and {b["reader_pid"] for b in blocked.values()} == {reader}
    for b in blocked.values():
        assert len(b["below"]) >= 2  # its sleep child and its decode worker (at least)
    time.sleep(0.5)  # the blocking calls are entered
    if victim == "rank":
        p, _ = procs[1]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=LIMIT_S)
        named = f"local rank 1 (rank 1, pid {p.pid})"
    else:
        os.kill(reader, signal.SIGKILL)
        named = f"node reader (pid {reader})"
    killed = time.monotonic()
    ended = _wait_all({r: x for r, x in procs.items() if victim != "rank" or r != 1})
    print(f"{victim} killed; every other rank ended {time.monotonic() - killed:.1f} s later")
    for r, (status, err) in ended.items():
        watched = blocks[r] in ("store", "sleep")  # only the fault watch can end these
        if watched:
            assert status == node_fault.EXIT_STATUS, (r, status, err[-3000:])
            assert "ending this process" in err and named in err, err[-3000:]
            assert not os.path.exists(procs[r][1])  # it never got back to write its results
        else:  # gloo's error may end it first (its message names an address, not a rank)
            assert status is not None, err
            print(f"rank {r}: status {status}, ended by "
                  f"{'the fault watch' if 'ending this process' in err else 'its own error'}")
        if victim == "reader" or watched:  # told at once, while nothing else could end it
            assert f"imagenet_seq: local rank {r} (rank {r}), pid {blocked[r]['pid']}: " \
                   "NodeReaderError" in err and named in err, err[-3000:]
        for pid in blocked[r]["below"]:  # decode workers, the sleep child: none orphaned
            if watched or pid != blocked[r]["child"]:  # (a loop that ends itself: its own)
                wait_gone(pid, timeout=30)
    wait_gone(reader)
    assert not left_behind(names, dev_shm)


def test_a_loop_that_takes_the_error_is_not_ended(data, tmp_path):
    """The error reaches the next batch (through the Loader's reading thread) and the training
    loop takes it: the loop decides what follows, even past the grace period."""
    procs = launch(data, tmp_path, 3, 3, "taken", ["--forever", "--epochs", "0", "1",
                                                   "--linger", "7"],
                   extra={"IMAGENET_SEQ_FAULT_GRACE_S": "5"})
    wait_progress([out for _, out in procs.values()], 2)
    p, _ = procs.pop(2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=LIMIT_S)
    for r, res in finish(procs).items():
        assert res["status"] == 0 and "ending this process" not in res["stderr"], res
        assert f"local rank 2 (rank 2, pid {p.pid})" in res["error"]["message"]
        assert f"local rank 2 (rank 2, pid {p.pid})" in res["stderr"]  # told at once as well


def test_a_direct_reader_that_takes_the_error_is_not_ended(data, tmp_path):
    """The same for a NodeClient read in the loop's own thread (no Loader)."""
    env = dict(ENV, IMAGENET_SEQ_FAULT_GRACE_S="5")
    procs = start(data, tmp_path, 2, 2, "direct-taken",
                  args=["--forever", "--sleep", "0.005", "--linger", "7"], env=env)
    wait_progress([out for _, out in procs.values()], 8)
    reader = int(wait_file(procs[0][1] + ".pid"))
    os.kill(reader, signal.SIGKILL)
    for r, res in finish(procs).items():
        assert res["status"] == 0 and "ending this process" not in res["stderr"], res
        assert f"node reader (pid {reader})" in res["error"]["message"]


_ENDS = """
import subprocess, sys, time
from imagenet_seq.read import node_fault
from imagenet_seq.read.wire import NodeReaderError
child = subprocess.Popen(["sleep", "600"])
print(child.pid, flush=True)
node_fault.fault(NodeReaderError("local rank 3 (rank 7, pid 1) ended without closing"),
                 "local rank 0 (rank 4), pid 2", float(sys.argv[1]))
time.sleep(120)
print("not ended", flush=True)
"""


@pytest.mark.parametrize("grace", ["0", "0.5"])
def test_the_fault_watch_ends_children_then_the_process(tmp_path, grace):
    err_file = tmp_path / "torchelastic_error.json"
    proc = subprocess.run([sys.executable, "-c", _ENDS, grace], capture_output=True, text=True,
                          timeout=LIMIT_S, env=dict(ENV, TORCHELASTIC_ERROR_FILE=str(err_file)))
    assert proc.returncode == node_fault.EXIT_STATUS, proc.stderr
    child = int(proc.stdout.split()[0])
    assert "not ended" not in proc.stdout
    wait_gone(child, timeout=30)
    first, last = proc.stderr.strip().splitlines()[-2:]
    assert first.startswith("imagenet_seq: local rank 0 (rank 4), pid 2: NodeReaderError: "
                            "local rank 3 (rank 7, pid 1)")
    assert f"if the training loop has not taken it in {float(grace):g} s" in first
    assert "ending this process (status 1)" in last and "rank 7" in last
    recorded = json.loads(err_file.read_text())["message"]
    assert recorded["message"].startswith("NodeReaderError: local rank 3 (rank 7, pid 1)")


def test_the_grace_period_setting(monkeypatch, data):
    assert node_fault.grace_s({}) == node_fault.DEFAULT_GRACE_S == 10.0
    assert node_fault.grace_s({node_fault.GRACE_ENV: " 2.5 "}) == 2.5
    assert node_fault.grace_s({node_fault.GRACE_ENV: "0"}) == 0.0
    for off in ("off", "OFF", "none", "inf"):
        assert node_fault.grace_s({node_fault.GRACE_ENV: off}) is None
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(ValueError, match=f"IMAGENET_SEQ_FAULT_GRACE_S='{bad}'.*'off'"):
            node_fault.grace_s({node_fault.GRACE_ENV: bad})
    monkeypatch.setenv(node_fault.GRACE_ENV, "soon")  # a client refuses it before connecting
    with pytest.raises(ValueError, match="IMAGENET_SEQ_FAULT_GRACE_S='soon'"):
        NodeClient(SplitReader(data, "train"), rank=0, world_size=2, local_world_size=2,
                   job=f"grace-{os.getpid()}")


_TAKEN = """
import threading, time
from imagenet_seq.read import node_fault
from imagenet_seq.read.wire import NodeReaderError
a, b, other = NodeReaderError("a"), NodeReaderError("b"), RuntimeError("x")
node_fault.fault(a, "one", 1.0)
node_fault.fault(b, "two", 1.0)
assert node_fault.pending() is a
node_fault.taken(other)  # not a fault of the node reader
t = threading.Thread(target=node_fault.raised, args=(a,), name="imagenet_seq-reader")
t.start(); t.join()  # the Loader's reading thread hands it on: not taken there
assert node_fault.pending() is a
try:
    raise RuntimeError("reading failed") from b  # as the Loader's next batch raises it
except RuntimeError as e:
    node_fault.taken(e)
assert node_fault.pending() is None
node_fault.fault(NodeReaderError("c"), "three", 0.2)  # after one was taken: only said
time.sleep(1.5)
print("alive", flush=True)
"""


def test_taken_follows_the_cause_and_stands_every_watch_down(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _TAKEN], capture_output=True, text=True,
                          timeout=LIMIT_S, env=ENV)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and "the training loop has taken an earlier error" in lines[2]


def test_descendants_lists_the_whole_tree():
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                             "p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); "
                             "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=ENV)
    grandchild = int(proc.stdout.readline())
    try:
        below = node_fault.descendants()
        assert proc.pid in below and grandchild in below
        assert below.index(proc.pid) < below.index(grandchild)
        assert node_fault.descendants(proc.pid) == [grandchild]
    finally:
        proc.kill()
        proc.wait(timeout=LIMIT_S)
        try:
            os.kill(grandchild, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert state(proc.pid) is None
