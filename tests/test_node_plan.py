"""The node plan (issue 24): a pure function, today's guarantees, and a forward node sweep."""
import numpy as np
import pytest
import torch

from imagenet_seq.plan import node, order
from invariants import check_epochs, check_shards


def flat(spans):
    return [i for s, c in spans for i in range(s, s + c)]


class PlanLoader:
    """What the invariant helper asks of a loader, from the node plan alone (no data): records
    in the order :func:`node.epoch_order` gives, batched; a record's label is ``record % 7``."""

    def __init__(self, n, mode, rank, world_size, local, shuffle=True, chunk_size=None,
                 batch_size=5, drop_last=False, buffer_size=0, seed=3):
        self.dataset_size, self.mode, self.rank, self.world_size = n, mode, rank, world_size
        self.local, self.shuffle, self.chunk_size, self.seed = local, shuffle, chunk_size, seed
        self.batch_size, self.drop_last, self.buffer_size = batch_size, drop_last, buffer_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def epoch_order(self, epoch):
        return node.epoch_order(self.dataset_size, self.mode, seed=self.seed, epoch=epoch,
                                rank=self.rank, world_size=self.world_size,
                                local_world_size=self.local, shuffle=self.shuffle,
                                chunk_size=self.chunk_size, buffer_size=self.buffer_size)

    def __len__(self):
        return order.num_batches(len(self.epoch_order(self.epoch)), self.batch_size,
                                 self.drop_last)

    def __iter__(self):
        recs = self.epoch_order(self.epoch)
        for k in range(len(self)):
            self.last_batch_records = recs[k * self.batch_size:(k + 1) * self.batch_size]
            yield (torch.zeros(len(self.last_batch_records), 1),
                   torch.as_tensor(self.last_batch_records % 7))


CONFIGS = [  # (n, world_size, local_world_size, chunk_size)
    (200, 2, 2, None), (203, 4, 2, None), (1000, 8, 4, 16), (1000, 8, 8, None),
    (97, 4, 4, None), (10, 10, 5, 3), (50, 2, 2, 1024), (1001, 4, 1, 7), (64, 1, 1, None),
    (3000, 6, 3, None), (12, 4, 4, 1),
]


@pytest.mark.parametrize("n,w,local,chunk", CONFIGS)
@pytest.mark.parametrize("mode,shuffle", [("train", True), ("train", False), ("val", True),
                                          ("val", False)])
def test_invariants_on_every_configuration(n, w, local, chunk, mode, shuffle):
    labels = np.arange(n) % 7
    kw = dict(shuffle=shuffle, chunk_size=chunk, buffer_size=17)
    if mode == "train" or not shuffle:  # (val slices stay put: the helper's shards-change
        check_shards(lambda r, ws: PlanLoader(n, mode, r, ws, local, **kw), w, labels,
                     epochs=(0, 1, 2))  # check is for shuffled train)
    for r in {0, w - 1}:
        check_epochs(lambda: PlanLoader(n, mode, r, w, local, **kw), labels, epochs=(3, 4))


@pytest.mark.parametrize("n,w,local,chunk", CONFIGS)
def test_every_rank_gets_a_new_share_every_epoch(n, w, local, chunk):
    """Not only rank 0 (what the helper checks): every rank, 12 epochs, tiny shares included
    (where the redraws and the move along the node are needed)."""
    if w == 1:
        return
    before = None
    for e in range(12):
        sets = [frozenset(flat(node.rank_spans(n, "train", seed=5, epoch=e, rank=r,
                                               world_size=w, local_world_size=local,
                                               chunk_size=chunk))) for r in range(w)]
        if before is not None:
            assert all(a != b for a, b in zip(sets, before)), f"epoch {e}: a rank kept its set"
        before = sets


@pytest.mark.parametrize("local", [1, 2])
def test_without_redraws_the_shares_move_along_the_node(monkeypatch, local):
    """One record per rank: many draws collide. With no redraws allowed, every collision takes
    the fallback: the previous shares move one rank along the node (along the job when a node
    has one rank), so each rank still gets a new record and a node keeps its slice."""
    monkeypatch.setattr(order, "MAX_REDRAWS", 0)
    monkeypatch.setattr(node, "_chains", type(node._chains)())
    node._node_plan.cache_clear()
    before, moved = None, 0
    for e in range(30):
        plans = [node.node_plan(4, "train", seed=0, epoch=e, world_size=4,
                                local_ranks=range(k, k + local), chunk_size=1)
                 for k in range(0, 4, local)]
        got = [flat(s) for p in plans for s in p.spans]
        assert sorted(sum(got, [])) == [0, 1, 2, 3] and all(len(g) == 1 for g in got)
        if before is not None:
            assert all(a != b for a, b in zip(got, before))
            if local == 2 and got == [before[1], before[0], before[3], before[2]]:
                moved += 1
        before = got
    assert any(c.shift for chain in node._chains.values() for c in chain)
    assert local == 1 or moved
    node._node_plan.cache_clear()


@pytest.mark.parametrize("n,w,local,chunk", CONFIGS)
@pytest.mark.parametrize("mode,shuffle", [("train", True), ("train", False), ("val", False)])
def test_sweep_delivers_each_rank_its_own_order(n, w, local, chunk, mode, shuffle):
    for k in range(w // local):
        p = node.node_plan(n, mode, seed=1, epoch=2, world_size=w,
                           local_ranks=range(k * local, (k + 1) * local), shuffle=shuffle,
                           chunk_size=chunk)
        assert sorted(flat([(s, c) for s, c, _ in p.sweep])) == \
            sorted(i for spans in p.spans for i in flat(spans))
        for i in range(local):
            assert flat([(s, c) for s, c, r in p.sweep if r == i]) == flat(p.spans[i])
            assert flat([(s, c) for s, c, _ in p.pieces(i)]) == flat(p.spans[i])
            assert p.spans[i] == tuple(node.rank_spans(
                n, mode, seed=1, epoch=2, rank=k * local + i, world_size=w,
                local_world_size=local, shuffle=shuffle, chunk_size=chunk))


@pytest.mark.parametrize("n,w,local,chunk", [(100_000, 8, 8, None), (100_000, 8, 4, None),
                                             (50_000, 4, 2, 64), (20_000, 2, 2, 100)])
def test_train_sweep_is_forward_runs_of_whole_node_chunks(n, w, local, chunk):
    c = order.effective_chunk_size(n, w, chunk)
    unit = local * c
    for k in range(w // local):
        for e in range(3):
            p = node.node_plan(n, "train", seed=2, epoch=e, world_size=w,
                               local_ranks=range(k * local, (k + 1) * local), chunk_size=chunk)
            runs = p.node_chunks()
            total = sum(cnt for _, cnt in runs)
            assert total == local * (n // w)
            # each node chunk is read front to back in one run: the slice's node chunks, plus
            # at most 2 cut by the slice's ends and 1 by the rotation
            assert len(runs) <= -(-total // unit) + 3, (len(runs), total, unit)
            assert sorted(runs) == sorted(set(runs))
            # ranks take turns every block: no rank waits more than L blocks for its next
            owners = np.concatenate([np.full(cnt, r) for _, cnt, r in p.sweep])
            for i in range(local):
                pos = np.flatnonzero(owners == i)
                gaps = np.diff(pos)
                assert gaps.max(initial=1) <= (local - 1) * node.BLOCK_RECORDS + 1


def test_val_is_todays_plan_and_the_sweep_takes_turns():
    for shuffle in (False, True):
        p = node.node_plan(1000, "val", seed=4, epoch=1, world_size=4, local_ranks=range(2, 4),
                           shuffle=shuffle)
        for i, r in enumerate(range(2, 4)):
            assert list(p.spans[i]) == order.read_spans(1000, "val", seed=4, epoch=1, rank=r,
                                                        world_size=4, shuffle=shuffle)
        assert [r for _, _, r in p.sweep][:4] == [0, 1, 0, 1]
        assert max(c for _, c, _ in p.sweep) <= node.VAL_PIECE_RECORDS


def test_one_rank_node_of_one_rank_job():
    p = node.node_plan(100, "train", seed=0, epoch=0, world_size=1, chunk_size=10)
    assert sorted(flat(p.spans[0])) == list(range(100))
    assert len(p.node_chunks()) == len(order.merge_spans(list(p.spans[0])))


def test_pure_function_whatever_was_computed_before():
    kw = dict(seed=9, world_size=8, local_ranks=range(4, 8), chunk_size=3)
    late = node.node_plan(300, "train", epoch=7, **kw)
    node._chains.clear()
    node._node_plan.cache_clear()
    node._draw.cache_clear()
    for e in (3, 0, 9):
        node.node_plan(300, "train", epoch=e, **dict(kw, local_ranks=range(0, 4)))
    again = node.node_plan(300, "train", epoch=7, **kw)
    assert again == late and again is not late
    a = node.epoch_order(300, seed=9, epoch=7, rank=5, world_size=8, local_world_size=4,
                         chunk_size=3, buffer_size=20)
    assert sorted(a.tolist()) == sorted(flat(late.spans[1]))
    other = node.node_plan(300, "train", epoch=7, **dict(kw, seed=10))
    assert other.spans != late.spans


def test_differs_from_todays_plan_and_is_named():
    assert node.PLAN == "node-1"
    ours = node.rank_spans(10_000, seed=0, epoch=0, rank=1, world_size=4, local_world_size=4)
    assert ours != order.read_spans(10_000, seed=0, epoch=0, rank=1, world_size=4)


def test_epoch_spans_carry_their_place():
    s = node.EpochSpans([(3, 4), (10, 2)], epoch=5, position=7)
    assert s == [(3, 4), (10, 2)] and s.epoch == 5 and s.position == 7
    kw = dict(seed=1, epoch=2, rank=3, world_size=4, local_world_size=2, chunk_size=5)
    whole = flat(node.rank_spans(500, **kw))
    for pos in (0, 1, 31, 32, 125):
        tail = node.epoch_spans(500, position=pos, **kw)
        assert flat(tail) == whole[pos:] and (tail.epoch, tail.position) == (2, pos)


@pytest.mark.parametrize("kwargs,match", [
    (dict(world_size=4, local_ranks=range(0, 3)), "local_ranks"),
    (dict(world_size=4, local_ranks=range(1, 3)), "local_ranks"),
    (dict(world_size=4, local_ranks=range(0, 4, 2)), "local_ranks"),
    (dict(world_size=4, local_ranks=range(4, 6)), "local_ranks"),
    (dict(world_size=200, local_ranks=range(2)), "world_size=200"),
    (dict(world_size=2, local_ranks=range(2), seed=-1), "seed=-1"),
    (dict(world_size=2, local_ranks=range(2), chunk_size=0), "chunk_size=0"),
    (dict(world_size=2, local_ranks=range(2), epoch=-1), "epoch=-1"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        node.node_plan(100, "train", **kwargs)
    with pytest.raises(ValueError, match="mode='test'"):
        node.node_plan(100, "test")
