"""Decode workers never outlive the trainer, and their failures never turn into hangs.

Each leak test runs a real trainer in a subprocess; the trainer writes its worker pids to a
file; after the trainer ends (normally, by exception, by Ctrl-C or by ``kill -9``) every worker
must be gone within 5 s.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from imagenet_seq.decode import batch
from imagenet_seq.decode import workers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAINER = textwrap.dedent("""
    import os, sys, time, psutil
    from imagenet_seq.data import Loader
    root, pidfile, how = sys.argv[1], sys.argv[2], sys.argv[3]
    ld = Loader(root, "train", batch_size=4, num_workers=2, chunk_size=4, buffer_size=8,
                worker_type="process")
    if how == "thread":  # the iterator (and its workers) made by a thread that then ends
        import threading
        box = []
        def start():  # the pass starts (workers fork) at its first batch, in this thread
            it = iter(ld)
            next(it)
            box.append(it)
        t = threading.Thread(target=start)
        t.start()
        t.join()
        it = box[0]
    else:
        it = iter(ld)
        next(it)
    with open(pidfile + ".tmp", "w") as f:
        f.write(" ".join(str(p.pid) for p in psutil.Process().children()))
    os.rename(pidfile + ".tmp", pidfile)
    if how == "break":
        for k, _ in enumerate(it):
            if k == 1:
                break
        del it
        print("children after break:", len(psutil.Process().children()), flush=True)
        ld.close()
        print("children after close:", len(psutil.Process().children()), flush=True)
        sys.exit(0)
    if how == "exception":
        raise RuntimeError("trainer crashed mid-epoch")
    time.sleep(60)  # Ctrl-C / kill -9 arrive here, workers busy or idle
""")


# a hang fails the one test with its stacks (pytest-timeout; see conftest.py)
pytestmark = pytest.mark.timeout(300)


def start_trainer(sample_lmdb, tmp_path, how):
    pidfile = str(tmp_path / "pids")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, sample_lmdb, pidfile, how],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not os.path.exists(pidfile):
        assert proc.poll() is None or os.path.exists(pidfile), proc.communicate()
        assert time.time() < deadline, "trainer never started its workers"
        time.sleep(0.05)
    pids = [int(p) for p in open(pidfile).read().split()]
    assert len(pids) >= 2, f"expected 2 decode workers, found {pids}"
    return proc, pids


def alive(pids):
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def assert_gone(pids, within=5.0):
    deadline = time.time() + within
    while alive(pids) and time.time() < deadline:
        time.sleep(0.05)
    left = alive(pids)
    for pid in left:  # do not leave them behind for the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived the trainer by {within} s"


def test_break_stops_workers(sample_lmdb, tmp_path):
    proc, pids = start_trainer(sample_lmdb, tmp_path, "break")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # persistent workers: a break keeps them for the next pass; close() ends them
    assert "children after break: 2" in out and "children after close: 0" in out
    assert_gone(pids)


def test_exception_in_trainer(sample_lmdb, tmp_path):
    proc, pids = start_trainer(sample_lmdb, tmp_path, "exception")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "trainer crashed mid-epoch" in err
    assert_gone(pids)


def test_ctrl_c(sample_lmdb, tmp_path):
    proc, pids = start_trainer(sample_lmdb, tmp_path, "sleep")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in err
    assert_gone(pids)


def test_kill_9_of_the_trainer(sample_lmdb, tmp_path):
    proc, pids = start_trainer(sample_lmdb, tmp_path, "sleep")
    proc.kill()
    proc.wait(timeout=30)
    assert_gone(pids)  # PR_SET_PDEATHSIG: nobody else would stop them


def _raw(n=3):
    items = [(i, b"\xff\xd8" + bytes([i]) * 10, i % 2) for i in range(n)]
    return batch.pack_batch(0, items)


def _fail_on_second(jpeg, rng):
    if bytes(jpeg)[2] == 1:
        raise ValueError("bad bytes")
    return np.zeros((4, 4, 3), np.uint8)


def _crash(jpeg, rng):
    os._exit(3)


def test_record_error_names_key_in_every_pool():
    spec = batch.DecodeSpec(_fail_on_second, source="x.lmdb")
    pools = [workers.InlinePool(lambda r: batch.decode_batch(r, spec)),
             workers.ThreadPool(spec, 2), workers.ProcessPool(spec, 2)]
    for pool in pools:
        try:
            pool.submit(_raw())
            with pytest.raises(batch.RecordError, match="00000001.*x.lmdb.*bad bytes"):
                pool.get(0)
        finally:
            pool.close()


def test_skip_broken_counts():
    spec = batch.DecodeSpec(_fail_on_second, skip_broken=True)
    out = batch.decode_batch(_raw(), spec)
    assert out.records.tolist() == [0, 2] and out.targets.tolist() == [0, 0]
    assert out.images.shape == (2, 3, 4, 4) and out.skipped[0][0] == 1


def test_dead_worker_is_an_error_not_a_hang():
    pool = workers.ProcessPool(batch.DecodeSpec(_crash), 1)
    try:
        pool.submit(_raw())
        with pytest.raises(RuntimeError, match="died with exit code 3"):
            pool.get(0)
    finally:
        pool.close()


def test_results_come_back_in_batch_order():
    spec = batch.DecodeSpec(lambda j, r: np.full((2, 2, 3), bytes(j)[2], np.uint8))
    pool = workers.ProcessPool(spec, 2, slots=6)  # 6 batches in flight at once
    try:
        batches = []
        for b in range(6):
            items = [(10 * b + k, b"\xff\xd8" + bytes([10 * b + k]), b) for k in range(3)]
            pool.submit(batch.pack_batch(b, items, *pool.input_slot(b)))
        for b in range(6):
            got = pool.get(b)
            batches.append(got.images[:, 0, 0, 0].tolist())
            assert got.index == b and got.targets.tolist() == [b] * 3
        assert batches == [[10 * b + k for k in range(3)] for b in range(6)]
    finally:
        pool.close()


def test_augment_rng_is_a_function_of_record():
    a = batch.augment_rng(1, 2, 3).random(4)
    assert np.array_equal(a, batch.augment_rng(1, 2, 3).random(4))
    assert not np.array_equal(a, batch.augment_rng(1, 3, 3).random(4))
    assert not np.array_equal(a, batch.augment_rng(1, 2, 4).random(4))


def test_pdeathsig_is_set_in_the_child():
    prctl = pytest.importorskip("prctl")
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        workers.set_pdeathsig(signal.SIGTERM)
        os.write(w, str(int(prctl.get_pdeathsig())).encode())
        os._exit(0)
    os.waitpid(child, 0)
    assert int(os.read(r, 16)) == signal.SIGTERM


def test_workers_outlive_the_thread_that_started_them(sample_lmdb, tmp_path):
    # PR_SET_PDEATHSIG fires when the forking *thread* ends: workers are forked by a thread
    # that lives as long as the process, so they survive the helper thread and still die
    # with the trainer after kill -9
    proc, pids = start_trainer(sample_lmdb, tmp_path, "thread")
    time.sleep(1.0)
    assert alive(pids) == pids, "workers died with the thread that started the iterator"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_gone(pids)


def test_an_epoch_from_a_short_lived_thread_is_complete(sample_lmdb):
    from imagenet_seq.data import Loader
    import threading

    ld = Loader(sample_lmdb, "train", batch_size=4, num_workers=2, worker_type="process")
    box = []

    def start():  # the pass starts (workers fork) at its first batch, in this thread
        it = iter(ld)
        box.append((len(next(it)[1]), it))
    t = threading.Thread(target=start)
    t.start()
    t.join()
    time.sleep(0.5)
    first, it = box[0]
    assert first + sum(len(y) for _, y in it) == 48


def test_a_stopped_worker_is_a_stall_error_not_a_hang(sample_lmdb):
    from imagenet_seq.data import Loader

    ld = Loader(sample_lmdb, "train", batch_size=4, num_workers=2, worker_type="process",
                prefetch=2, stall_timeout=2)
    it = iter(ld)
    next(it)
    pids = [p.pid for p in ld._passes.decode.pool.procs]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    t0 = time.time()
    try:
        with pytest.raises(RuntimeError, match=r"no batch for \d+ s.*is stopped.*kill -CONT.*"
                                               r"stall_timeout"):
            for _ in it:
                pass
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert time.time() - t0 < 30
    with pytest.raises(ValueError, match="stall_timeout=0"):
        Loader(sample_lmdb, "train", stall_timeout=0)


def test_garbage_is_collected_before_workers_fork(sample_lmdb, tmp_path):
    """Uncollected garbage (e.g. a dropped DALI pipeline in a reference cycle) is finalised in
    the trainer before process workers fork, never in a worker, which lacks the threads such
    finalisers belong to (a DALI pipeline's __del__ segfaulted a worker that way)."""
    import gc

    from imagenet_seq.data import Loader

    log = str(tmp_path / "finalised")

    class Cycle:
        def __del__(self):
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")

    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
    gc.collect()  # the cycle survives (still referenced) into the oldest generation, where
    del a, b      # only a full collection finds it once it is garbage
    ld = Loader(sample_lmdb, "val", batch_size=4, num_workers=2, worker_type="process")
    with ld:
        next(iter(ld))
    with open(log) as f:
        pids = [int(line) for line in f]
    assert pids == [os.getpid()] * 2
