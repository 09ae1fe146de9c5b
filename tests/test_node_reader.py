"""The node reader (issue 24): exactness against per-rank reads, faults, nothing left behind.

Ranks are real processes (tests/node_ranks.py); the reader is the real process a rank starts.
No timing thresholds: every wait has a limit only so that a hang fails the test.
"""
import gc
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from imagenet_seq import format as fmt
from imagenet_seq.format import offsets
from imagenet_seq.plan import node, order
from imagenet_seq.read import ring as rings
from imagenet_seq.read import rendezvous, sweep, wire
from imagenet_seq.read.node_client import NodeClient, NodeReaderError, enabled
from imagenet_seq.read.reader import SplitReader

import node_procs
from node_procs import (ENV, LIMIT_S, finish, left_behind, our_names, sample_lmdb, shm, start,
                        state, wait_file, wait_gone)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """400 small train records (blocks of the node plan are 32 records: several per rank)."""
    return sample_lmdb(tmp_path_factory, "node", train_per_class=100, val_per_class=9,
                       num_classes=4, seed=3, size=(64, 48), quality=80)


def direct(root, mode, rank, world, local, epoch, position=0, chunk=None):
    reader = SplitReader(root, mode)
    spans = node.rank_spans(len(reader), mode, seed=7, epoch=epoch, rank=rank, world_size=world,
                            local_world_size=local, chunk_size=chunk)
    spans = order.slice_spans(spans, position, sum(c for _, c in spans))
    items = list(reader.read_spans(spans))
    reader.close()
    return dict(records=[i for i, _, _ in items], labels=[lb for _, _, lb in items],
                digests=[hashlib.sha1(b).hexdigest()[:16] for _, b, _ in items])


def wait_progress(outs, records=8):
    node_procs.wait_progress(outs, records)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world,local,args", [
    (2, 2, ["--epochs", "0", "1"]),
    (3, 3, ["--epochs", "2", "--chunk-size", "5"]),
    (4, 2, ["--epochs", "1"]),  # two nodes on one machine: two readers
    (2, 2, ["--epochs", "0", "--position", "37"]),  # a resumed epoch
    (3, 3, ["--epochs", "0", "--ring-bytes", "8192"]),  # full rings; records sent whole
    (2, 2, ["--epochs", "0", "--mode", "val"]),
])
def test_records_and_bytes_equal_per_rank_reads(many, tmp_path, world, local, args):
    names, dev_shm = our_names(), shm()
    procs = start(many, tmp_path, world, local, f"exact-{world}-{local}-{len(args)}", args=args)
    results = finish(procs)
    mode = args[args.index("--mode") + 1] if "--mode" in args else "train"
    chunk = int(args[args.index("--chunk-size") + 1]) if "--chunk-size" in args else None
    pos = int(args[args.index("--position") + 1]) if "--position" in args else 0
    seen = {}
    for r, res in results.items():
        assert res["error"] is None, res
        for e, got in res["epochs"].items():
            want = direct(many, mode, r, world, local, int(e), pos, chunk)
            assert got["records"] == want["records"]
            assert got["digests"] == want["digests"] and got["labels"] == want["labels"]
            seen.setdefault(e, []).extend(got["records"])
        wait_gone(res["reader_pid"])
    for recs in seen.values():  # ranks disjoint in every epoch
        assert len(set(recs)) == len(recs) > 0
    assert not left_behind(names, dev_shm)  # nothing left behind


def test_a_slow_rank_gets_its_records_and_so_do_the_others(many, tmp_path):
    """A rank in long steps fills its ring and the reader waits for it: order and bytes stay
    exact on every rank (no timing asserted)."""
    procs = start(many, tmp_path, 2, 2, "slow", ranks=[0],
                  args=["--epochs", "0", "--ring-bytes", "16384", "--sleep", "0.01"])
    procs.update(start(many, tmp_path, 2, 2, "slow", ranks=[1],
                       args=["--epochs", "0", "--ring-bytes", "16384"]))
    for r, res in finish(procs).items():
        assert res["error"] is None
        assert res["epochs"]["0"]["digests"] == direct(many, "train", r, 2, 2, 0)["digests"]


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """100 train records of tens of KB: whole-record sends fill a socket's buffer."""
    return sample_lmdb(tmp_path_factory, "node_large", train_per_class=25, val_per_class=2,
                       num_classes=4, seed=5, size=(320, 240), quality=95)


@pytest.mark.parametrize("data,stop_after,ring,linger", [
    ("many", None, None, 0), ("many", 5, None, 0), ("many", 5, 8192, 0),
    ("large", 1, 4096, 0.5),
])
def test_a_rank_that_finishes_early_and_says_goodbye_leaves_the_others_reading(
        request, tmp_path, data, stop_after, ring, linger):
    """A rank that closes while the reader sends it a record or its DONE is not dead: the
    others read on, exact, and nobody gets an error (issue 24 benchmark finding)."""
    many = request.getfixturevalue(data)
    names, dev_shm = our_names(), shm()
    job = f"early-{data}-{stop_after}-{ring}"
    ring_args = [] if ring is None else ["--ring-bytes", str(ring)]
    first = ["--epochs", "0", "--linger", str(linger)] + ring_args + (
        [] if stop_after is None else ["--stop-after", str(stop_after)])
    procs = start(many, tmp_path, 3, 3, job, ranks=[0], args=first)
    procs.update(start(many, tmp_path, 3, 3, job, ranks=[1, 2],
                       args=["--epochs", "0", "1", "2", "--sleep", "0.002"] + ring_args))
    results = finish(procs)
    for r, res in results.items():
        assert res["error"] is None, res
        assert "stops" not in res["stderr"], res["stderr"]
        if r == 0:
            continue
        for e, got in res["epochs"].items():
            assert got["digests"] == direct(many, "train", r, 3, 3, int(e))["digests"]
    wait_gone(results[1]["reader_pid"])
    assert not left_behind(names, dev_shm)


def test_a_goodbye_during_a_blocked_send_is_not_a_death(large, tmp_path, monkeypatch):
    """Deterministic: rank 0 (here, in the test) stops draining its socket, so the reader is
    inside a send of a whole record to it; rank 0 says BYE and closes. The send fails, the
    reader must see the goodbye, drop rank 0 and keep serving ranks 1 and 2 to the end."""
    names, dev_shm = our_names(), shm()
    job = "bye-in-send"
    reader = SplitReader(large, "train")
    client = NodeClient(reader, rank=0, world_size=3, local_world_size=3, seed=7, job=job,
                        chunk_size=None, ring_bytes=4096, connect_timeout=60)
    procs = start(large, tmp_path, 3, 3, job, ranks=[1, 2],
                  args=["--epochs", "0", "1", "2", "3", "4", "5", "--sleep", "0.03",
                        "--ring-bytes", "4096"])
    link = client._link
    hold, real = threading.Event(), wire.recv
    monkeypatch.setattr(wire, "recv", lambda sock: (hold.wait(), real(sock))[1])
    spans = node.epoch_spans(len(reader), "train", seed=7, epoch=0, rank=0, world_size=3,
                             local_world_size=3)
    pieces = client._pieces(spans)
    link.send(wire.READ, {"req": 99}, pieces)
    time.sleep(1.0)  # the reader is now blocked sending rank 0 its records (tens of KB each)
    with link.send_lock:
        wire.send(link.sock, wire.BYE)
    link.sock.shutdown(socket.SHUT_RDWR)
    hold.set()
    monkeypatch.setattr(wire, "recv", real)
    client.shutdown()
    results = finish(procs)
    for r, res in results.items():
        assert res["error"] is None, res
        assert "stops" not in res["stderr"], res["stderr"]
        assert len(res["epochs"]) == 6
        for e, got in res["epochs"].items():
            assert got["digests"] == direct(large, "train", r, 3, 3, int(e))["digests"]
    wait_gone(results[1]["reader_pid"])
    assert not left_behind(names, dev_shm)


@pytest.mark.parametrize("victim", [0, 1])
def test_kill_9_of_a_rank_is_named_to_the_others(many, tmp_path, victim):
    names, dev_shm = our_names(), shm()
    procs = start(many, tmp_path, 3, 3, f"kill-rank-{victim}",
                  args=["--forever", "--sleep", "0.005", "--epochs", "0", "1"])
    wait_progress([out for _, out in procs.values()])
    reader = int(wait_file(procs[0][1] + ".pid"))
    p, _ = procs.pop(victim)
    os.kill(p.pid, signal.SIGKILL)
    killed_at = time.time()
    p.wait(timeout=LIMIT_S)
    results = finish(procs)
    for r, res in results.items():
        err = res["error"]
        assert err is not None and err["type"] == "NodeReaderError", res
        assert f"local rank {victim} (rank {victim}, pid {p.pid})" in err["message"]
        assert "without closing" in err["message"]
        print(f"rank {r} told {err['at'] - killed_at:.2f} s after the kill")
    wait_gone(reader)
    assert not left_behind(names, dev_shm)


def test_kill_9_of_the_reader_is_named_to_every_rank(many, tmp_path):
    names, dev_shm = our_names(), shm()
    procs = start(many, tmp_path, 3, 3, "kill-reader",
                  args=["--forever", "--sleep", "0.005", "--epochs", "0", "1"])
    wait_progress([out for _, out in procs.values()])
    reader = int(wait_file(procs[0][1] + ".pid"))
    os.kill(reader, signal.SIGKILL)
    killed_at = time.time()
    for r, res in finish(procs).items():
        err = res["error"]
        assert err is not None and err["type"] == "NodeReaderError", res
        assert f"node reader (pid {reader})" in err["message"] and "killed?" in err["message"]
        print(f"rank {r} told {err['at'] - killed_at:.2f} s after the kill")
    wait_gone(reader)
    assert not left_behind(names, dev_shm)


def test_a_forked_child_does_not_hide_a_killed_rank(many, tmp_path):
    """The rank's forked children (decode workers) inherit its socket; they drop it at fork,
    so the reader still sees the rank's death."""
    procs = start(many, tmp_path, 2, 2, "fork", ranks=[1],
                  args=["--forever", "--sleep", "0.005"])
    procs.update(start(many, tmp_path, 2, 2, "fork", ranks=[0],
                       args=["--forever", "--sleep", "0.005", "--fork-child"]))
    wait_progress([out for _, out in procs.values()])
    child = int(wait_file(procs[0][1] + ".child"))
    try:
        p, _ = procs.pop(0)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=LIMIT_S)
        res = finish(procs)[1]
        assert res["error"] is not None and f"pid {p.pid}" in res["error"]["message"]
        assert state(child) not in (None, "Z")  # the child lived on: not what told the reader
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_dead_job_leaves_nothing_and_the_job_restarts(many, tmp_path):
    names, dev_shm = our_names(), shm()
    procs = start(many, tmp_path, 2, 2, "restart", args=["--forever", "--sleep", "0.005"])
    wait_progress([out for _, out in procs.values()])
    reader = int(wait_file(procs[0][1] + ".pid"))
    for p, _ in procs.values():
        os.kill(p.pid, signal.SIGKILL)
    for p, _ in procs.values():
        p.wait(timeout=LIMIT_S)
    wait_gone(reader)  # no orphan: the reader saw its ranks go and left
    assert not left_behind(names, dev_shm)
    again = finish(start(many, tmp_path, 2, 2, "restart", args=["--epochs", "0"]))
    for r, res in again.items():
        assert res["error"] is None and res["reader_pid"] != reader
        assert res["epochs"]["0"]["digests"] == direct(many, "train", r, 2, 2, 0)["digests"]


def test_a_live_job_is_never_disturbed(many, tmp_path):
    """A second job that (wrongly) shares the first one's key is refused, naming the rank
    already connected; a job with its own key runs beside it; the first one stays exact."""
    first = start(many, tmp_path, 2, 2, "live", args=["--epochs", "0", "1", "--sleep", "0.01"])
    wait_progress([out for _, out in first.values()])
    (tmp_path / "x").mkdir()
    intruder = finish(start(many, tmp_path / "x", 2, 2, "live", ranks=[1], args=["--epochs", "0"]))
    err = intruder[1]["error"]
    assert err is not None and "local rank 1 is already connected" in err["message"]
    other = finish(start(many, tmp_path, 2, 2, "live-other", args=["--epochs", "0"]))
    for res in other.values():
        assert res["error"] is None
    for r, res in finish(first).items():
        assert res["error"] is None
        for e in ("0", "1"):
            assert res["epochs"][e]["digests"] == \
                direct(many, "train", r, 2, 2, int(e))["digests"]


def test_ranks_that_disagree_on_the_plan_are_refused(many, tmp_path):
    first = start(many, tmp_path, 2, 2, "disagree", ranks=[0],
                  args=["--forever", "--sleep", "0.01"])
    wait_progress([out for _, out in first.values()])
    res = finish(start(many, tmp_path, 2, 2, "disagree", ranks=[1], args=["--seed", "8"]))[1]
    assert res["error"] is not None and "'seed': 8" in res["error"]["message"]
    p, _ = first[0]
    p.kill()
    p.wait(timeout=LIMIT_S)


def _damaged_label_copy(src, dst, bad):
    os.makedirs(dst, exist_ok=True)
    path = os.path.join(dst, fmt.split_filename("train"))
    with open(fmt.find_split(src, "train"), "rb") as f, open(path, "wb") as g:
        g.write(f.read())
    env = fmt.open_env(path, readonly=False)
    with env.begin(write=True) as txn:
        view, label = fmt.decode_record(txn.get(fmt.record_key(bad)))
        txn.put(fmt.record_key(bad), fmt.encode_record((label + 1) % 4, bytes(view)))
    env.close()
    offsets.add_to(path, rebuild=True)
    return dst


def test_a_damaged_record_fails_its_rank_with_its_error_and_tells_the_others(many, tmp_path):
    owner_spans = node.rank_spans(400, seed=7, epoch=0, rank=1, world_size=2,
                                  local_world_size=2)
    bad = owner_spans[1][0]  # a record rank 1 reads, not its first
    root = _damaged_label_copy(many, str(tmp_path / "damaged"), bad)
    results = finish(start(root, tmp_path, 2, 2, "damaged", args=["--epochs", "0"]))
    assert results[1]["error"]["type"] == "RecordError"
    assert f"index {bad}" in results[1]["error"]["message"]
    err = results[0]["error"]  # rank 0 may have had all its records before the reader failed
    if err is None:
        assert results[0]["epochs"]["0"]["digests"] == direct(root, "train", 0, 2, 2, 0)["digests"]
    else:
        assert err["type"] == "NodeReaderError" and "RecordError" in err["message"]
    wait_gone(results[1]["reader_pid"])


def test_a_rank_that_arrives_after_the_fault_hears_it(many, tmp_path):
    """Rank 1 meets its damaged record and is done before rank 0 connects: rank 0 is told
    (not served by a fresh reader as if nothing happened, nor left with "ended without a
    word"); then the reader is gone and nothing is left behind."""
    names, dev_shm = our_names(), shm()
    bad = node.rank_spans(400, seed=7, epoch=0, rank=1, world_size=2, local_world_size=2)[1][0]
    root = _damaged_label_copy(many, str(tmp_path / "damaged"), bad)
    first = finish(start(root, tmp_path, 2, 2, "late", ranks=[1], args=["--epochs", "0"]))[1]
    assert first["error"]["type"] == "RecordError" and f"index {bad}" in first["error"]["message"]
    assert state(first["reader_pid"]) not in (None, "Z")  # it waits for local rank 0
    late = finish(start(root, tmp_path, 2, 2, "late", ranks=[0], args=["--epochs", "0"]))[0]
    err = late["error"]
    assert err is not None and err["type"] == "NodeReaderError", late
    assert "RecordError" in err["message"] and f"index {bad}" in err["message"]
    wait_gone(first["reader_pid"])
    assert not left_behind(names, dev_shm)


# ------------------------------------------------------------------------- in this process
def test_client_reads_plan_spans_through_the_reader_and_others_directly(many):
    reader = SplitReader(many, "train")
    client = NodeClient(reader, rank=0, world_size=1, local_world_size=1, seed=7,
                        job=f"inproc-{os.getpid()}", connect_timeout=60)
    try:
        assert client.path == reader.path and len(client) == 400
        assert client.labels is reader.labels
        spans = node.rank_spans(400, seed=7, epoch=3, world_size=1, local_world_size=1)
        got = list(client.read_spans(node.EpochSpans(spans, 3)))
        assert [(i, b, lb) for i, b, lb in got] == list(reader.read_spans(spans))
        assert list(client.read_spans([(5, 3)])) == list(reader.read_range(5, 3))
        assert list(client.read_spans(node.epoch_spans(400, seed=7, epoch=3,
                                                       position=400))) == []
        with pytest.raises(ValueError, match="not rank 0's node plan"):
            next(client.read_spans(node.EpochSpans(spans, 4)))
        # a read abandoned half way, then another: the second is whole and exact
        it = client.read_spans(node.EpochSpans(spans, 3))
        assert next(it)[0] == spans[0][0]
        stop = threading.Event()
        part = client.read_spans(node.EpochSpans(spans, 3), stop)
        first = [next(part) for _ in range(10)]
        stop.set()
        assert len(first) + len(list(part)) < 400
        with pytest.raises(NodeReaderError, match="superseded"):
            next(it)
        again = [i for i, _, _ in client.read_spans(node.EpochSpans(spans, 3))]
        assert again == [i for s, c in spans for i in range(s, s + c)]
        pid = client.reader_pid
        with open(f"/proc/{pid}/maps") as f:  # the ring: an anonymous memfd, no named file
            maps = f.read()
        assert "memfd:imagenet_seq-ring-0 (deleted)" in maps and "/dev/shm" not in maps
    finally:
        client.shutdown()
    wait_gone(pid)


def test_a_failed_reader_waits_for_late_ranks_only_while_their_launcher_runs():
    from imagenet_seq.read.node_linger import launcher_alive

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(timeout=LIMIT_S)
    me = rendezvous._start_time(os.getpid())
    assert launcher_alive([os.getpid(), me]) and launcher_alive(None)
    assert not launcher_alive([os.getpid(), me + "0"])  # the pid, reused by another process
    assert not launcher_alive([done.pid, me])


def test_two_loaders_of_one_rank_and_on_fault(many, monkeypatch):
    """Two clients of one process (two Loaders of one file) share the reader; killing the
    reader reaches ``on_fault`` at once, from the receiving thread."""
    monkeypatch.setenv("IMAGENET_SEQ_FAULT_GRACE_S", "off")  # never end pytest's process
    reader = SplitReader(many, "train")
    faults, told = [], threading.Event()

    def on_fault(e):
        faults.append(e)
        told.set()

    kw = dict(rank=0, world_size=1, local_world_size=1, seed=7, job=f"two-{os.getpid()}",
              connect_timeout=60)
    a = NodeClient(reader, on_fault=on_fault, **kw)
    b = NodeClient(reader, **kw)
    try:
        assert a.reader_pid == b.reader_pid
        spans = node.rank_spans(400, seed=7, epoch=0)
        ia, ib = a.read_spans(node.EpochSpans(spans, 0)), b.read_spans(node.EpochSpans(spans, 0))
        got = [(next(ia)[0], next(ib)[0]) for _ in range(50)]
        assert [x for x, _ in got] == [x for _, x in got] == \
            [i for s, c in spans for i in range(s, s + c)][:50]
        os.kill(a.reader_pid, signal.SIGKILL)
        assert told.wait(LIMIT_S)
        assert isinstance(faults[0], NodeReaderError) and "killed?" in str(faults[0])
        with pytest.raises(NodeReaderError, match=f"pid {a.reader_pid}"):
            list(ia)
        with pytest.raises(NodeReaderError):
            list(ib)
    finally:
        a.shutdown()
        b.shutdown()
    wait_gone(a.reader_pid)


def test_close_is_per_pass_and_a_dropped_client_says_goodbye(many):
    """``close()`` is SplitReader's (the Loader calls it after every pass): reads go on. A
    client nobody holds is collected and leaves like a closed one -- its reader serves the
    process's other client on instead of reporting a dead rank."""
    reader = SplitReader(many, "train")
    kw = dict(rank=0, world_size=1, local_world_size=1, seed=7, job=f"gc-{os.getpid()}",
              connect_timeout=60)
    keep, drop = NodeClient(reader, **kw), NodeClient(reader, **kw)
    try:
        spans = node.epoch_spans(400, seed=7, epoch=1)
        want = [i for s, c in spans for i in range(s, s + c)]
        assert [i for i, _, _ in keep.read_spans(spans)] == want
        keep.close()
        assert [i for i, _, _ in drop.read_spans(spans)] == want
        del drop
        gc.collect()
        assert [i for i, _, _ in keep.read_spans(spans)] == want
        assert keep.error is None
    finally:
        keep.shutdown()
    wait_gone(keep.reader_pid)


def test_a_rank_that_stops_reading_holds_nobody_up_while_its_ring_has_room(many, tmp_path):
    """Rank 1 takes one record and sleeps; all of its share fits its ring (the default 32 MB),
    so rank 0 reads its whole epoch (a hang here would fail the test by its time limit)."""
    procs = start(many, tmp_path, 2, 2, "stalled", ranks=[1], args=["--sleep", "600"])
    try:
        res = finish(start(many, tmp_path, 2, 2, "stalled", ranks=[0]))[0]
        assert res["error"] is None
        assert res["epochs"]["0"]["digests"] == direct(many, "train", 0, 2, 2, 0)["digests"]
    finally:
        procs[1][0].kill()
        procs[1][0].wait(timeout=LIMIT_S)


def test_job_key_is_shared_by_siblings_and_not_by_other_jobs():
    code = "from imagenet_seq.read.rendezvous import job_key; print(job_key())"
    keys = [subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                           text=True, timeout=LIMIT_S, check=True).stdout for _ in range(2)]
    assert keys[0] == keys[1] and keys[0].startswith(f"{os.getpid()}/")
    assert rendezvous.job_key() != keys[0].strip()  # this process's launcher is another job
    other = dict(ENV, TORCHELASTIC_RESTART_COUNT="1")  # a restarted torchrun job: a new key
    again = subprocess.run([sys.executable, "-c", code], env=other, capture_output=True,
                           text=True, timeout=LIMIT_S, check=True).stdout
    assert again != keys[0]


def test_a_file_without_offsets_index_is_refused_with_the_way_out(sample_lmdb_no_index):
    reader = SplitReader(sample_lmdb_no_index, "train")
    with pytest.raises(ValueError, match="no offsets index.*--rebuild.*NODE_READER=0"):
        NodeClient(reader, rank=0, world_size=2, local_world_size=2, job="no-index")


def test_off_switch(monkeypatch):
    monkeypatch.delenv("IMAGENET_SEQ_NODE_READER", raising=False)
    assert enabled(8) and not enabled(1)
    assert not enabled(8, requested=False) and enabled(8, requested=True)
    monkeypatch.setenv("IMAGENET_SEQ_NODE_READER", "0")
    assert not enabled(8) and enabled(8, requested=True)


def test_ring_places_records_whole_and_waits_for_room():
    ring = rings.Ring(4096)
    assert ring.place(3000) == 0 and ring.place(1000) == 3000
    assert ring.place(200) is None  # 96 bytes left at the end, and no room at the start
    ring.free(3000)
    assert ring.place(200) == 4096  # skipped the end: the next turn's start
    assert ring.used() == 4096 + 200 - 3000
    assert ring.fits(1024) and not ring.fits(1025)
    with pytest.raises(ValueError, match="free up to 9999"):
        ring.free(9999)
    fd, mem = rings.create(8192)
    mem[10:13] = b"abc"
    view = rings.attach(os.dup(fd), 8192)
    assert view[10:13] == b"abc"
    os.close(fd)


def test_wire_frames_and_fds():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    refs = np.zeros(2, wire.REFS)
    refs["record"] = [4, 9]
    wire.send(a, wire.ITEMS, {"req": 3}, refs, fds=[r])
    kind, head, payload, fds = wire.recv(b)
    assert kind == wire.ITEMS and head == {"req": 3} and len(fds) == 1
    assert np.frombuffer(payload, wire.REFS)["record"].tolist() == [4, 9]
    for fd in fds + [r, w]:
        os.close(fd)
    a.sendall(b"XXXX" + bytes(8))
    with pytest.raises(ValueError, match="not a node reader message"):
        wire.recv(b)
    a.close()
    with pytest.raises(wire.Closed):
        wire.recv(b)
    b.close()


def test_sweep_merges_requests_by_key_keeping_each_ranks_order():
    def req(owner, pieces):
        return sweep.Request(owner, 1, np.array(pieces, dtype=np.int64).reshape(-1, 3))

    a = req("a", [(0, 4, sweep.key(0, 0)), (8, 4, sweep.key(0, 2)), (50, 2, sweep.key(1, 0))])
    b = req("b", [(4, 4, sweep.key(0, 1)), (12, 4, sweep.key(0, 3))])
    got = [(q.owner, s, c) for q, s, c in sweep.merge([a, b])]
    assert got == [("a", 0, 4), ("b", 4, 4), ("a", 8, 4), ("b", 12, 4), ("a", 50, 2)]
    a.delivered = 6  # half way through its second piece: the rest of it comes first
    assert [(q.owner, s, c) for q, s, c in sweep.merge([a, b])][:2] == [("b", 4, 4),
                                                                         ("a", 10, 2)]
    b.delivered = b.total
    assert a.at_piece_end() is False and a.holds(51) and not a.holds(4)
    assert [q.owner for q, _, _ in sweep.merge([a, b])] == ["a", "a"]
    late = req("c", [(100, 1, sweep.key(0, 0))])  # behind the others: served first
    assert sweep.merge([a, late])[0][0] is late
    assert sweep.check_pieces(np.array([[0, 1, 5], [3, 1, 4]]), 10) == \
        "pieces whose sweep keys go backwards"
    assert "outside 0..10" in sweep.check_pieces(np.array([[9, 2, 0]]), 10)
    assert sweep.check_pieces(np.array([[9, 1, 0]]), 10) is None
