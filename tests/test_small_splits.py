"""Small splits (issue 13, item 6): every rank's share changes every epoch, at any size.

Order-level properties over many (N, world_size, chunk_size) combinations (the default,
automatic chunk and explicit ones, down to 1 and up to one chunk for the whole split), the
effective chunk rule, the co-batch repetition of a 10,000-record split, and the shares through
the real Loader on a 117-record LMDB made by the converter.
"""
from collections import OrderedDict

import numpy as np
import pytest

from imagenet_seq.plan import order
from imagenet_seq.tools import diagnostics

EPOCHS = 6


def records(spans):
    return [i for s, c in spans for i in range(s, s + c)]


def shares(n, w, epoch, chunk=order.DEFAULT_CHUNK_RECORDS, seed=0):
    return [records(order.read_spans(n, "train", seed=seed, epoch=epoch, rank=r, world_size=w,
                                     chunk_size=chunk)) for r in range(w)]


CASES = [(n, w) for n in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 50, 117, 118, 255, 1000, 1025,
                          4097, 10_000)
         for w in (1, 2, 3, 4, 5, 7, 8, 16) if n >= w]


@pytest.mark.parametrize("chunk", [order.DEFAULT_CHUNK_RECORDS, 1, 5, 10**7])
@pytest.mark.parametrize("n,w", CASES)
def test_guarantees_and_changing_shares(n, w, chunk):
    before = None
    for epoch in range(EPOCHS):
        got = shares(n, w, epoch, chunk)
        assert len({len(s) for s in got}) == 1 and len(got[0]) == n // w  # equal batch counts
        union = [i for s in got for i in s]
        assert len(set(union)) == len(union)  # exactly once, disjoint ranks
        assert len(union) == n - n % w  # union = dataset minus a tail of N % world_size
        assert set(union) <= set(range(n))
        if w >= 2 and before is not None:  # every rank's share changes from epoch to epoch
            for r in range(w):
                assert set(got[r]) != set(before[r]), (n, w, chunk, epoch, r)
        before = got


@pytest.mark.parametrize("n,w", [(117, 2), (4, 2), (2, 2), (10_000, 8), (50, 7)])
def test_pure_function_whatever_was_computed_before(n, w, monkeypatch):
    monkeypatch.setattr(order, "_draws", OrderedDict())
    forward = [shares(n, w, e) for e in range(EPOCHS)]
    for e in reversed(range(EPOCHS)):  # each epoch alone, from an empty cache
        monkeypatch.setattr(order, "_draws", OrderedDict())
        assert shares(n, w, e) == forward[e]
    if n > 4:
        assert shares(n, w, 3, seed=1) != forward[3]


def test_fallback_when_every_redraw_collides(monkeypatch):
    """The last resort (never needed in practice): the previous shares, one rank down."""
    monkeypatch.setattr(order, "_draws", OrderedDict())
    monkeypatch.setattr(order, "MAX_REDRAWS", -1)  # no draw accepted after epoch 0
    plans = [shares(9, 3, e) for e in range(4)]
    for e in range(1, 4):
        assert plans[e] == [plans[e - 1][(r + 1) % 3] for r in range(3)]
        assert all(set(plans[e][r]) != set(plans[e - 1][r]) for r in range(3))
    monkeypatch.setattr(order, "_draws", OrderedDict())
    assert shares(9, 3, 3) == plans[3]  # computed from scratch: the same plan


def test_117_records_two_ranks_default_chunks():
    """The issue's case: before, rank 0 read records [0, 58) in every epoch."""
    sets = [frozenset(shares(117, 2, e)[0]) for e in range(10)]
    assert frozenset(range(58)) not in sets[1:]
    assert all(a != b for a, b in zip(sets, sets[1:]))
    assert len(set(sets)) == len(sets)  # here: ten different shares
    tails = {frozenset(range(117)) - s - frozenset(shares(117, 2, e)[1])
             for e, s in enumerate(sets)}
    assert len(tails) > 1  # the one record left over differs too


def test_effective_chunk_rule():
    f = order.effective_chunk_size
    k = order.MIN_CHUNKS_PER_RANK
    assert f(1_281_167, 1) == f(1_281_167, 8) == 1024  # ImageNet keeps the disk-friendly chunks
    assert f(1024 * k * 8, 8) == 1024 and f(1024 * k * 8 - 1, 8) == 1023
    assert f(117, 2) == f(117, 2, None) == 1
    assert f(10_000, 8) == 10_000 // (8 * k) and f(10_000, 1) == 10_000 // k
    assert f(5, 4) == 1
    # any other explicit value is honoured, large or small
    assert f(117, 2, 1000) == 1000 and f(10**6, 1, 100) == 100 and f(117, 2, 5) == 5
    with pytest.raises(ValueError, match="chunk_size=0"):
        f(10, 1, 0)


def test_explicit_chunk_is_used_as_given():
    spans = order.read_spans(1000, "train", epoch=1, rank=0, world_size=2, chunk_size=100)
    assert sum(c % 100 != 0 for _, c in spans) <= 2  # whole 100-record chunks but the ends
    one_chunk = [order.read_spans(117, "train", epoch=e, world_size=2, chunk_size=10**6)
                 for e in range(4)]
    assert all(len(s) <= 2 for s in one_chunk)  # one contiguous run (two across the wrap)
    assert len({tuple(s) for s in one_chunk}) == 4  # and still a different share every epoch


def test_large_split_reads_stay_long():
    n, w = 1_281_167, 8
    for rank in (0, 3, 7):
        spans = order.read_spans(n, "train", epoch=2, rank=rank, world_size=w)
        counts = [c for _, c in spans]
        assert sum(counts) == n // w
        # whole 1024-record chunks except the two slice ends and the file's short last chunk
        assert sum(c % 1024 != 0 for c in counts) <= 3
        assert len(spans) <= n // w // 1024 + 3


@pytest.mark.parametrize("world,buffer", [(1, 19_522), (8, 2_440)])  # the default buffers
def test_small_split_cobatch_repetition_under_one_percent(world, buffer):
    labels = np.random.default_rng(0).permutation(np.arange(10_000) % 100)
    for epoch in range(3):
        rep = diagnostics.shuffle_report(labels, batch_size=64, world_size=world,
                                         buffer_size=buffer, epoch=epoch)
        assert rep.repetition < 0.01, rep


def test_val_and_unshuffled_train_unchanged():
    for w in (1, 2, 3):
        for r in range(w):
            assert order.read_spans(117, "val", rank=r, world_size=w, shuffle=False) == \
                [(r * 117 // w, (r + 1) * 117 // w - r * 117 // w)]
            assert order.read_spans(117, "train", epoch=3, rank=r, world_size=w,
                                    shuffle=False) == [(r * (117 // w), 117 // w)]


def test_bad_epoch():
    with pytest.raises(ValueError, match="epoch=-1"):
        order.read_spans(10, "train", epoch=-1)


# -- through the real Loader --------------------------------------------------------------------

@pytest.fixture(scope="module")
def lmdb_117(tmp_path_factory):
    """117 train records (3 classes x 39), converted by the converter."""
    from imagenet_seq.convert.cli import main as preprocess
    from imagenet_seq.tools.sample import make_sample_imagefolder

    src = tmp_path_factory.mktemp("tree117")
    make_sample_imagefolder(str(src), train_per_class=39, val_per_class=1, num_classes=3,
                            seed=2, size=(48, 40), quality=80)
    out = str(tmp_path_factory.mktemp("lmdb117"))
    assert preprocess([str(src), out, "--workers", "0", "--no-progress"]) == 0
    return out


def test_loader_two_ranks_shares_change_every_epoch(lmdb_117):
    from imagenet_seq.data import Loader

    loaders = [Loader(lmdb_117, "train", batch_size=16, num_workers=0, image_size=16,
                      resize_size=16, rank=r, world_size=2) for r in range(2)]
    assert loaders[0].dataset_size == 117 and loaders[0].chunk_size == 1024  # the default
    seen = []  # per epoch: the record ids each rank received
    for epoch in range(4):
        per_rank, batches = [], []
        for ld in loaders:
            ld.set_epoch(epoch)
            ids, n = [], 0
            for images, targets in ld:
                ids += [int(k) for k in ld.last_batch_records]
                n += 1
            assert ids == ld.epoch_order(epoch).tolist()  # the plan is what was read
            per_rank.append(ids)
            batches.append(n)
        assert batches[0] == batches[1] == len(loaders[0])
        assert len(per_rank[0]) == len(per_rank[1]) == 58
        assert not set(per_rank[0]) & set(per_rank[1])
        seen.append([set(ids) for ids in per_rank])
    assert seen[0][0] != set(range(58))
    for prev, cur in zip(seen, seen[1:]):
        assert prev[0] != cur[0] and prev[1] != cur[1]
    for ld in loaders:
        close = getattr(ld, "close", None)
        if close:
            close()
