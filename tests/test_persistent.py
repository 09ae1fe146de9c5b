"""Persistent decode workers (issue 13, item 3) and set_image_size.

Pools live as long as the Loader: one fork per Loader, the epoch and the output size travel
with every batch; ``close()``, ``with`` and garbage collection end them; a ``break`` mid-epoch
followed by the next epoch, 20 times, leaves no extra thread, process or shared memory.
"""
import gc
import os
import subprocess
import sys
import threading

import numpy as np
import psutil
import pytest
import torch

from imagenet_seq.data import Loader
from imagenet_seq.decode.transforms import PILTransform

SMALL = dict(batch_size=5, chunk_size=4, buffer_size=8)


# a hang fails the one test with its stacks (pytest-timeout; see conftest.py)
pytestmark = pytest.mark.timeout(300)


def children():
    return sorted(p.pid for p in psutil.Process().children()
                  if p.is_running() and p.status() != psutil.STATUS_ZOMBIE)


def shm_files():
    """/dev/shm files this process or its workers hold (open or mapped); other programs'
    files come and go on a shared machine and are none of this test's business."""
    held = set()
    for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            paths = [f.path for f in proc.open_files()]
            paths += [m.path for m in proc.memory_maps(grouped=False)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        held.update(p for p in paths if p.startswith("/dev/shm/"))
    return held


def threads():
    return sorted(t.name for t in threading.enumerate())


def maps():
    """Shared mappings of this process (the process pool's rings are anonymous MAP_SHARED)."""
    return sum(1 for m in psutil.Process().memory_maps(grouped=False) if "s" in m.perms[3:])


@pytest.mark.parametrize("wtype", ["process", "thread"])
def test_twenty_breaks_leave_nothing_behind(sample_lmdb, wtype):
    """In a process of its own: the children, threads and mappings counted are this Loader's
    alone, not what earlier tests (or their dying workers) left in the pytest process."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from test_persistent import twenty_breaks; twenty_breaks(sys.argv[2], sys.argv[3])")
    r = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), sample_lmdb,
                        wtype], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ok: 20 breaks" in r.stdout


def twenty_breaks(sample_lmdb, wtype):
    ld = Loader(sample_lmdb, "train", num_workers=2, worker_type=wtype, **SMALL)
    next(iter(ld))  # workers up
    procs, names, shm = children(), threads(), shm_files()
    n_maps = maps()
    for epoch in range(20):
        ld.set_epoch(epoch)
        for k, _ in enumerate(ld):
            if k == 2:
                break
        gc.collect()
        assert children() == procs, f"round {epoch}: processes {children()} vs {procs}"
        assert threads() == names, f"round {epoch}: threads {threads()} vs {names}"
        assert maps() <= n_maps and shm_files() <= shm, f"round {epoch}: shared memory"
    # a last full epoch: the workers still serve it correctly after 20 breaks
    ld.set_epoch(20)
    n = sum(len(y) for _, y in ld)
    assert n == ld.num_records
    assert children() == procs
    # only the reader reading ahead into epoch 21 (overlap_epochs) is new
    assert set(threads()) - set(names) <= {"imagenet_seq-reader", "imagenet_seq-readahead"}
    assert shm_files() <= shm
    ld.close()
    assert children() == []
    assert set(threads()) <= set(names)
    assert maps() <= n_maps  # the pool's rings (and the LMDB map) are gone with close()
    if wtype == "thread":
        assert not [t for t in threading.enumerate() if t.name.startswith("imagenet_seq-decode")]
    print("ok: 20 breaks")


def test_one_fork_per_loader(sample_lmdb):
    ld = Loader(sample_lmdb, "train", num_workers=2, worker_type="process", **SMALL)
    pids = None
    for epoch in range(3):
        ld.set_epoch(epoch)
        for _ in ld:
            if pids is None:
                pids = children()
        assert children() == pids
    assert ld._passes.decode.forks == 1
    ld.close()


def test_context_manager_and_gc_end_the_workers(sample_lmdb):
    with Loader(sample_lmdb, "train", num_workers=2, worker_type="process", **SMALL) as ld:
        next(iter(ld))
        assert len(children()) == 2
    assert children() == []
    ld = Loader(sample_lmdb, "train", num_workers=2, worker_type="process", **SMALL)
    for _ in ld:
        pass
    assert len(children()) == 2
    del ld
    gc.collect()
    assert children() == []


def test_a_loader_reopens_after_close(sample_lmdb):
    ld = Loader(sample_lmdb, "train", num_workers=2, worker_type="process", **SMALL)
    a = [y.clone() for _, y in ld]
    ld.close()
    ld.set_epoch(0)
    b = [y.clone() for _, y in ld]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    ld.close()


@pytest.mark.parametrize("workers,wtype", [(0, "thread"), (2, "thread"), (2, "process")])
def test_set_image_size_applies_to_the_next_pass(sample_lmdb, workers, wtype):
    ld = Loader(sample_lmdb, "train", num_workers=workers, worker_type=wtype, image_size=32,
                **SMALL)
    pids = children()
    x, _ = next(iter(ld))
    assert x.shape[-1] == 32
    pids = children()
    for size in (48, 24, 32):  # larger than the rings were made for, smaller, back
        ld.set_image_size(size)
        ld.set_epoch(1)
        shapes = {tuple(x.shape[1:]) for x, _ in ld}
        assert shapes == {(3, size, size)}
        assert children() == pids  # the same workers
    # the pixels at a size are those of a Loader built for that size
    ld.set_image_size(48)
    ld.set_epoch(2)
    got = [x for x, _ in ld]
    ref = Loader(sample_lmdb, "train", num_workers=0, image_size=48, **SMALL)
    ref.set_epoch(2)
    want = [x for x, _ in ref]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    ld.close()


def test_set_image_size_bad_input(sample_lmdb):
    ld = Loader(sample_lmdb, "val", num_workers=0, batch_size=4)
    for bad in (15, 0, -3, 2.5, "224", True):
        with pytest.raises(ValueError, match=f"set_image_size\\({bad!r}\\)"):
            ld.set_image_size(bad)
    ld.set_image_size(112)  # val keeps the 256/224 ratio
    x, _ = next(iter(ld))
    assert x.shape[-2:] == (112, 112)
    pil = Loader(sample_lmdb, "val", num_workers=0, batch_size=4,
                 transform=PILTransform(lambda im: np.asarray(im.resize((8, 8)))))
    with pytest.raises(TypeError, match="decides its own output size"):
        pil.set_image_size(64)
    call = Loader(sample_lmdb, "val", num_workers=0, batch_size=4,
                  decoder=lambda j, l: (torch.zeros(len(j), 3, 8, 8, dtype=torch.uint8),
                                        torch.as_tensor(l)))
    with pytest.raises(TypeError, match="decides its own output size"):
        call.set_image_size(64)


def _epochs(ld, plan):
    out = []
    for epoch, size in plan:
        if size is not None:
            ld.set_image_size(size)
        if epoch is not None:
            ld.set_epoch(epoch)
        out.append([(ld.last_batch_records.copy(), x.clone()) for x, _ in ld])
    return out


@pytest.mark.parametrize("wtype", ["thread", "process"])
def test_overlapped_epochs_give_the_same_batches(sample_lmdb, wtype):
    """Epochs back to back (the next epoch read, shuffled and decoded during this one's tail)
    yield exactly what separate passes yield; a different next epoch, a resize or a resume
    drops what was read ahead."""
    kw = dict(num_workers=2, worker_type=wtype, image_size=32, **SMALL)
    plan = [(None, None), (None, None), (5, None), (6, 40), (7, None), (None, None)]
    with Loader(sample_lmdb, "train", overlap_epochs=True, **kw) as on, \
            Loader(sample_lmdb, "train", overlap_epochs=False, **kw) as off:
        got, want = _epochs(on, plan), _epochs(off, plan)
        assert off._passes.carry[0] is None
        assert on._passes.carry[0] is not None  # reading on into the next epoch
    for e, (a, b) in enumerate(zip(got, want)):
        assert len(a) == len(b) == len(on)
        for (r1, x1), (r2, x2) in zip(a, b):
            assert np.array_equal(r1, r2) and torch.equal(x1, x2), f"pass {e}"


def test_the_next_pass_adopts_the_read_ahead(sample_lmdb):
    ld = Loader(sample_lmdb, "train", num_workers=2, **SMALL)
    for _ in ld:
        pass
    feeder, seg = ld._passes.carry[0]
    assert seg.epoch == 0
    it = iter(ld)  # epoch 1 (automatic numbering), adopted at its first batch
    assert ld._passes.carry[0] is not None  # iter() alone decides nothing
    first = next(it)
    p = it.started
    assert p._feeder is feeder and p.base == len(ld) and p.epoch == 1
    assert ld._passes.carry[0] is None
    assert len(first[1]) + sum(len(y) for _, y in it) == ld.num_records
    ld.close()
    assert ld._passes.carry[0] is None and not feeder.thread.is_alive()


def test_overlap_defaults_to_loaders_with_a_shuffle_buffer(sample_lmdb):
    assert Loader(sample_lmdb, "train", num_workers=0, **SMALL).overlap_epochs
    assert not Loader(sample_lmdb, "val", num_workers=0, batch_size=4).overlap_epochs
    assert not Loader(sample_lmdb, "train", num_workers=0, shuffle=False).overlap_epochs
    assert Loader(sample_lmdb, "val", num_workers=0, batch_size=4,
                  overlap_epochs=True).overlap_epochs
    val = Loader(sample_lmdb, "val", num_workers=0, batch_size=4)
    for _ in val:
        pass
    assert val._passes.carry[0] is None  # nothing left open between val passes
