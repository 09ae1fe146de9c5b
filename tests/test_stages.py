"""Each stage of the loader alone, on plain lists (issue 13, item 1)."""
import threading

import numpy as np
import pytest
import torch

from imagenet_seq.decode.batch import DecodeSpec, pack_batch
from imagenet_seq.decode.stage import Decode
from imagenet_seq.loader.batcher import Batcher
from imagenet_seq.loader.finish import Finish
from imagenet_seq.plan import order
from imagenet_seq.plan.shuffle import ShuffleBuffer, buffered_shuffle
from imagenet_seq.plan.stage import Plan, merge_ids, slice_spans
from imagenet_seq.read.stage import read, read_records


def test_plan_is_the_order_module_and_slices_from_any_position():
    plan = Plan(100, "train", seed=2, rank=1, world_size=3, chunk_size=7, buffer_size=9)
    spans = plan.spans(4)
    assert spans == order.read_spans(100, "train", seed=2, epoch=4, rank=1, world_size=3,
                                     chunk_size=7)
    assert plan.epoch_order(4).tolist() == order.epoch_order(
        100, "train", seed=2, epoch=4, rank=1, world_size=3, chunk_size=7, buffer_size=9).tolist()
    assert plan.shuffled and plan.records == 33 and plan.for_rank(2).rank == 2
    ids = plan.ids(4)
    assert len(ids) == plan.length(4) == 33
    for pos in (0, 1, 7, 20, 33):
        tail = np.concatenate([np.arange(s, s + c) for s, c in plan.spans_from(4, pos)] or
                              [np.empty(0, np.int64)])
        assert tail.tolist() == ids[pos:].tolist()
    assert slice_spans([(10, 5), (0, 5)], 3, 7) == [(13, 2), (0, 2)]
    assert merge_ids([5, 3, 4, 9, 0]) == [(0, 1), (3, 3), (9, 1)]


class ListReader:
    """A reader over a plain list: record i is (i, bytes([i]), i % 3)."""

    def __init__(self, n):
        self.items = [(i, bytes([i % 256]), i % 3) for i in range(n)]
        self.spans_read = []

    def read_spans(self, spans, stop=None):
        self.spans_read.append(list(spans))
        for s, c in spans:
            for i in range(s, s + c):
                if stop is not None and stop.is_set():
                    return
                yield self.items[i]


def test_plan_is_checked_when_it_is_made():
    with pytest.raises(ValueError, match=r"world_size=5 is larger than the 4 records"):
        Plan(4, "train", rank=0, world_size=5)
    with pytest.raises(ValueError, match=r"chunk_size=0; expected >= 1"):
        Plan(10, "train", chunk_size=0)
    with pytest.raises(ValueError, match=r"mode='test'"):
        Plan(10, "test")


def test_read_stage_reads_in_order_and_stops():
    reader = ListReader(20)
    stop = threading.Event()
    assert [i for i, _, _ in read(reader, [(5, 3), (0, 2)], stop)] == [5, 6, 7, 0, 1]
    stop.set()
    assert list(read(reader, [(0, 5)], stop)) == []
    got = read_records(reader, [9, 3, 4, 10])
    assert sorted(got) == [3, 4, 9, 10] and reader.spans_read[-1] == [(3, 2), (9, 2)]


@pytest.mark.parametrize("n,size", [(50, 8), (50, 1), (50, 64), (1000, 100)])
def test_shuffle_stage_state_replays_from_ids(n, size):
    full = list(buffered_shuffle(range(n), size, np.random.default_rng(7)))
    for k in (0, 1, n // 2, max(0, n - size), n - 1, n):
        buf = ShuffleBuffer(size, np.random.default_rng(7))
        consumed = buf.fast_forward(list(range(n)), k)
        assert buf.emitted == k
        assert len(buf.pending_ids()) <= max(size, 0) or size <= 1
        buf.fill(lambda i: i)
        assert list(buf.run(range(consumed, n))) == full[k:]


def test_batch_stage_fixes_boundaries_by_position():
    assert list(Batcher(range(7), 3, 3)) == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6])]
    assert list(Batcher(range(7), 3, 2)) == [(0, [0, 1, 2]), (1, [3, 4, 5])]  # drop_last
    b = Batcher(range(3, 7), 3, 3, start=1)
    assert list(b) == [(1, [3, 4, 5]), (2, [6])] and b.next_index == 3


def _grey(jpeg, rng):
    return np.full((2, 2, 3), bytes(jpeg)[0], np.uint8)


def _decode_all(stage, raws):
    """One pass of the decode stage over a plain list: submit every batch, take them in order."""
    stage.begin()
    try:
        for raw in raws:
            stage.submit(raw)
        return [stage.get(raw.index) for raw in raws]
    finally:
        stage.end()


@pytest.mark.parametrize("workers,wtype", [(0, "thread"), (2, "thread"), (2, "process")])
def test_decode_stage_decodes_a_plain_list_in_order(workers, wtype):
    items = [(i, bytes([i]), i % 3) for i in range(10)]
    raws = [pack_batch(b, items[3 * b:3 * b + 3], epoch=1) for b in range(4)]
    stage = Decode(DecodeSpec(_grey), workers, wtype, batch_size=3, prefetch=4)
    try:
        for _ in range(2):  # the same workers for a second pass
            out = _decode_all(stage, raws)
            assert [d.index for d in out] == [0, 1, 2, 3]
            assert [d.images[:, 0, 0, 0].tolist() for d in out] == \
                [[3 * b + k for k in range(3) if 3 * b + k < 10] for b in range(4)]
    finally:
        stage.close()


def test_decode_stage_external_decoder_names_its_skips():
    def drop_odd(jpegs, labels):
        keep = [i for i, j in enumerate(jpegs) if j[0] % 2 == 0]
        imgs = torch.tensor([[jpegs[i][0]] for i in keep], dtype=torch.uint8)
        return imgs, torch.as_tensor(labels)[keep], [i for i in range(len(jpegs)) if i not in keep]

    items = [(i, bytes([i]), 0) for i in range(6)]
    stage = Decode(external=drop_odd)
    out = _decode_all(stage, [pack_batch(0, items)])[0]
    assert out.records.tolist() == [0, 2, 4]
    assert [r for r, _ in out.skipped] == [1, 3, 5]


def test_decode_stage_external_decoder_follows_the_image_size():
    class Sized:
        size = None

        def set_image_size(self, size):
            self.size = size

        def __call__(self, jpegs, labels):
            return torch.zeros((len(jpegs), 3, self.size, self.size), dtype=torch.uint8), \
                torch.as_tensor(labels)

    items = [(i, bytes([i]), 0) for i in range(4)]
    stage = Decode(external=Sized(), sized=True)
    raws = [pack_batch(0, items[:2], image_size=16), pack_batch(1, items[2:], image_size=24)]
    out = _decode_all(stage, raws)
    assert [d.images.shape[-1] for d in out] == [16, 24]


def test_finish_stage_counts_and_normalises():
    from imagenet_seq.decode.batch import DecodedBatch

    fin = Finish(device="cpu")
    res = DecodedBatch(0, torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), torch.tensor([1]),
                       np.array([4]), [(9, "broken")])
    x, y = fin(res)
    assert x.dtype == torch.float32 and fin.skipped == 1 and fin.last_batch_records.tolist() == [4]
    assert fin.state() == {"skipped": 1}
    fin.restore({"skipped": 5})
    assert fin.skipped == 5
