"""Exact mid-epoch resume (issue 13, item 4): ``state_dict`` / ``load_state_dict``.

After a resume from batch k of epoch e the Loader yields exactly the batches of the
uninterrupted run from k on (records, labels, augmented pixels, boundaries), decodes nothing
of the consumed part and reads again at most ``buffer_size`` records.
"""
import json

import numpy as np
import pytest
import torch

from imagenet_seq.data import Loader
from imagenet_seq.decode import batch as batch_mod
from imagenet_seq.read.reader import SplitReader

SMALL = dict(batch_size=5, chunk_size=4, buffer_size=8, seed=3)


# a hang fails the one test with its stacks (pytest-timeout; see conftest.py)
pytestmark = pytest.mark.timeout(300)


def epoch_batches(ld):
    return [(ld.last_batch_records.copy(), y.clone(), x.clone()) for x, y in ld]


def same(a, b):
    assert len(a) == len(b)
    for k, ((r1, y1, x1), (r2, y2, x2)) in enumerate(zip(a, b)):
        assert np.array_equal(r1, r2), f"batch {k}: records {r1} vs {r2}"
        assert torch.equal(y1, y2) and torch.equal(x1, x2), f"batch {k}: targets/pixels"


def state_after(make, epoch, k):
    a = make()
    a.set_epoch(epoch)
    it = iter(a)
    for _ in range(k):
        next(it)
    sd = a.state_dict()
    a.close()
    return json.loads(json.dumps(sd))  # what a checkpoint holds survives JSON too


@pytest.mark.parametrize("workers,wtype", [(0, "thread"), (2, "thread"), (2, "process")])
@pytest.mark.parametrize("shuffle,drop_last", [(True, False), (True, True), (False, False)])
def test_resume_at_every_batch_gives_the_same_batches(sample_lmdb, workers, wtype, shuffle,
                                                      drop_last):
    make = lambda: Loader(sample_lmdb, "train", num_workers=workers, worker_type=wtype,  # noqa
                          shuffle=shuffle, drop_last=drop_last, **SMALL)
    ref = make()
    ref.set_epoch(2)
    full = epoch_batches(ref)
    ref.close()
    for k in range(len(full)):
        sd = state_after(make, 2, k)
        assert (sd["epoch"], sd["batches"]) == (2, k)
        b = make()
        b.load_state_dict(sd)
        b.set_epoch(2)  # a training loop's set_epoch of the saved epoch keeps the position
        same(epoch_batches(b), full[k:])
        b.close()


def test_state_at_the_end_of_an_epoch_is_the_next_epoch(sample_lmdb):
    ld = Loader(sample_lmdb, "train", num_workers=0, **SMALL)
    ld.set_epoch(4)
    for _ in ld:
        pass
    sd = ld.state_dict()
    assert (sd["epoch"], sd["batches"]) == (5, 0)
    auto = Loader(sample_lmdb, "train", num_workers=0, **SMALL)  # no set_epoch: 0, 1, 2, ...
    for _ in auto:
        pass
    sd = auto.state_dict()
    assert (sd["epoch"], sd["batches"]) == (1, 0)
    it = iter(auto)
    next(it)
    sd = auto.state_dict()
    assert (sd["epoch"], sd["batches"]) == (1, 1)
    fresh = Loader(sample_lmdb, "train", num_workers=0, **SMALL)
    fresh.load_state_dict(sd)
    rest = epoch_batches(fresh)
    ref = Loader(sample_lmdb, "train", num_workers=0, **SMALL)
    ref.set_epoch(1)
    same(rest, epoch_batches(ref)[1:])
    # the next iteration without set_epoch is epoch 2
    assert fresh.state_dict()["epoch"] == 2


def test_resume_reads_only_the_buffer_and_decodes_nothing_consumed(sample_lmdb, monkeypatch):
    # overlap_epochs=False: count only the resumed epoch's reads, not epoch 2's read-ahead
    make = lambda: Loader(sample_lmdb, "train", num_workers=0, overlap_epochs=False,  # noqa
                          **SMALL)
    sd = state_after(make, 1, 4)
    read, decoded = [], []
    real_spans = SplitReader.read_spans
    real_decode = batch_mod.decode_batch

    def spy_spans(self, spans, stop=None):
        for item in real_spans(self, spans, stop):
            read.append(item[0])
            yield item

    def spy_decode(raw, spec, out=None):
        decoded.extend(raw.records.tolist())
        return real_decode(raw, spec, out)

    monkeypatch.setattr(SplitReader, "read_spans", spy_spans)
    monkeypatch.setattr("imagenet_seq.decode.stage.decode_batch", spy_decode)
    b = make()
    b.load_state_dict(sd)
    got = [b.last_batch_records.copy() for _ in b]
    ref = make()
    ref.set_epoch(1)
    order = ref.epoch_order()
    consumed = order[:4 * 5]
    assert not set(decoded) & set(consumed.tolist())
    assert sorted(decoded) == sorted(order[20:].tolist())
    assert np.concatenate(got).tolist() == order[20:].tolist()
    # read: the rest of the stream plus at most buffer_size records read again
    n = len(order)
    assert len(read) <= (n - 20) + 8, (len(read), n)
    assert len(read) == len(set(read))


def test_ddp_ranks_resume_their_own_state_and_another_world_size_is_refused(sample_lmdb):
    def make(rank, world=2):
        return Loader(sample_lmdb, "train", num_workers=0, rank=rank, world_size=world, **SMALL)

    states = [state_after(lambda r=r: make(r), 3, 2) for r in (0, 1)]
    for r in (0, 1):
        ref = make(r)
        ref.set_epoch(3)
        full = epoch_batches(ref)
        b = make(r)
        b.load_state_dict(states[r])
        same(epoch_batches(b), full[2:])
    with pytest.raises(ValueError, match=r"rank differs: the state has 0, this Loader has 1.*"
                                         r"each rank the state that rank saved"):
        make(1).load_state_dict(states[0])
    with pytest.raises(ValueError, match=r"world_size differs: the state has 2, this Loader "
                                         r"has 1.*set_epoch\(epoch \+ 1\)"):
        make(0, 1).load_state_dict(states[0])
    # at an epoch boundary the world size may change: the next epoch is planned for it
    boundary = state_after(lambda: make(0), 3, 0)
    one = make(0, 1)
    one.load_state_dict(boundary)
    recs = np.concatenate([one.last_batch_records.copy() for _ in one])
    assert sorted(recs.tolist()) == list(range(48))


def test_bad_states_name_the_field_both_values_and_the_way_out(sample_lmdb):
    make = lambda **kw: Loader(sample_lmdb, "train", num_workers=0,  # noqa: E731
                               **{**SMALL, **kw})
    sd = state_after(make, 1, 2)
    cases = [
        (dict(seed=4), r"seed differs: the state has 3, this Loader has 4; create the Loader "
                       r"with the seed"),
        (dict(batch_size=6), r"batch_size differs: the state has 5, this Loader has 6"),
        (dict(buffer_size=9), r"buffer_size differs: the state has 8, this Loader has 9"),
        (dict(chunk_size=8), r"chunk_size differs"),
        (dict(drop_last=True), r"drop_last differs"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            make(**kw).load_state_dict(sd)
    val = Loader(sample_lmdb, "val", num_workers=0, batch_size=5, seed=3)
    with pytest.raises(ValueError, match=r"differs: the state has .*this Loader has"):
        val.load_state_dict(sd)
    for key, value, msg in [
            ("num_records", 47, r"num_records differs: the state has 47 \(saved from .*\), "
                                r"this Loader has 48"),
            ("format_version", 99, r"format_version differs: the state has 99"),
            ("fingerprint", "0" * 16, r"fingerprint differs.*file it was saved from"),
            ("version", 7, r"state version 7 is unknown"),
            ("batches", 99, r"batches=99; expected .*<= 10"),
    ]:
        bad = dict(sd, **{key: value})
        with pytest.raises(ValueError, match=msg):
            make().load_state_dict(bad)
    with pytest.raises(ValueError, match=r"batches='3'; expected an int"):
        make().load_state_dict(dict(sd, batches="3"))
    with pytest.raises(ValueError, match=r"epoch=-1"):
        make().load_state_dict(dict(sd, epoch=-1))
    with pytest.raises(ValueError, match="without a 'version' key"):
        make().load_state_dict({"epoch": 1})
    with pytest.raises(ValueError, match=r"lacks \['seed'\]"):
        make().load_state_dict({k: v for k, v in sd.items() if k != "seed"})
    # loaded into a Loader that is iterating: a clear error, not a silent mix
    busy = make()
    busy.set_epoch(1)
    it = iter(busy)
    next(it)
    with pytest.raises(RuntimeError, match=r"load_state_dict while a pass .* is running.*"
                                           r"before iter\(loader\)"):
        busy.load_state_dict(sd)
    for _ in it:
        pass
    busy.load_state_dict(sd)  # finished: fine
    busy.close()


def test_set_epoch_of_another_epoch_drops_the_resume(sample_lmdb):
    make = lambda: Loader(sample_lmdb, "train", num_workers=0, **SMALL)  # noqa: E731
    sd = state_after(make, 1, 3)
    b = make()
    b.load_state_dict(sd)
    b.set_epoch(2)
    assert len(list(b)) == len(b)


def test_image_size_and_skip_count_are_restored(sample_lmdb):
    make = lambda: Loader(sample_lmdb, "train", num_workers=0, image_size=32,  # noqa: E731
                          **SMALL)
    a = make()
    a.set_image_size(40)
    a.set_epoch(1)
    it = iter(a)
    next(it)
    sd = a.state_dict()
    a.close()
    assert sd["image_size"] == 40
    b = make()
    b.load_state_dict(sd)
    x, _ = next(iter(b))
    assert x.shape[-1] == 40
