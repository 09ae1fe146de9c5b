"""The epoch plan is a pure function: checked without reading any data."""
import numpy as np
import pytest

from imagenet_seq.plan import order


def flat(spans):
    return [i for s, c in spans for i in range(s, s + c)]


@pytest.mark.parametrize("n,chunk", [(1, 1), (10, 3), (48, 4), (100, 256), (1000, 7)])
def test_single_rank_train_is_permutation_of_whole_file(n, chunk):
    spans = order.read_spans(n, "train", seed=3, epoch=1, chunk_size=chunk)
    assert sorted(flat(spans)) == list(range(n))
    assert all(c >= 1 for _, c in spans)


def test_chunks_are_contiguous_reads_and_permuted():
    spans = order.read_spans(1000, "train", seed=0, epoch=0, chunk_size=10)
    assert all(c % 10 == 0 for _, c in spans)  # whole chunks (merged when adjacent)
    assert [s for s, _ in spans] != sorted(s for s, _ in spans)


def test_pure_function_of_seed_and_epoch():
    a = order.epoch_order(500, seed=1, epoch=2, chunk_size=8, buffer_size=50)
    b = order.epoch_order(500, seed=1, epoch=2, chunk_size=8, buffer_size=50)
    c = order.epoch_order(500, seed=1, epoch=3, chunk_size=8, buffer_size=50)
    d = order.epoch_order(500, seed=2, epoch=2, chunk_size=8, buffer_size=50)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert sorted(a.tolist()) == list(range(500))


def test_no_shuffle_is_file_order():
    assert order.read_spans(100, "train", shuffle=False) == [(0, 100)]
    assert list(order.epoch_order(100, shuffle=False, buffer_size=10)) == list(range(100))


@pytest.mark.parametrize("n,w,chunk", [(48, 2, 4), (49, 3, 4), (1000, 8, 16), (10, 10, 3),
                                       (1001, 4, 1000), (37, 5, 1)])
def test_ddp_train_shards(n, w, chunk):
    for epoch in range(3):
        shards = [flat(order.read_spans(n, "train", seed=0, epoch=epoch, rank=r, world_size=w,
                                        chunk_size=chunk)) for r in range(w)]
        assert len({len(s) for s in shards}) == 1  # equal shares: equal batch counts
        allrec = [i for s in shards for i in s]
        assert len(set(allrec)) == len(allrec)  # disjoint
        assert n - len(allrec) == n % w < w  # union = dataset minus a tail < world_size


def test_ddp_assignment_changes_with_epoch():
    a = set(flat(order.read_spans(1000, "train", epoch=0, rank=0, world_size=4, chunk_size=10)))
    b = set(flat(order.read_spans(1000, "train", epoch=1, rank=0, world_size=4, chunk_size=10)))
    assert a != b


def test_ddp_ranks_keep_long_reads():
    spans = order.read_spans(100_000, "train", rank=1, world_size=4, chunk_size=256)
    counts = [c for _, c in spans]
    # only the two slice ends may cut a chunk
    assert sum(c < 256 for c in counts) <= 2


@pytest.mark.parametrize("n,w", [(12, 1), (12, 5), (50_000, 8), (7, 7)])
def test_val_slices_cover_each_record_once_in_file_order(n, w):
    shards = [flat(order.read_spans(n, "val", rank=r, world_size=w, shuffle=False))
              for r in range(w)]
    assert [i for s in shards for i in s] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_rank_records_and_batches():
    assert order.rank_records(10, "train", 0, 3) == 3
    assert [order.rank_records(10, "val", r, 3) for r in range(3)] == [3, 3, 4]
    assert order.num_batches(10, 4, False) == 3
    assert order.num_batches(10, 4, True) == 2
    assert order.num_batches(8, 4, False) == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=2, world_size=2), "rank=2 with world_size=2"),
    (dict(rank=-1, world_size=2), "rank=-1"),
    (dict(rank=0, world_size=11), "world_size=11 is larger than the 10 records"),
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(seed=-1), "seed=-1"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        order.read_spans(10, "train", **kwargs)


def test_bad_mode_and_batch():
    with pytest.raises(ValueError, match="mode='test'"):
        order.read_spans(10, "test")
    with pytest.raises(ValueError, match="batch_size=0"):
        order.num_batches(10, 0, False)
