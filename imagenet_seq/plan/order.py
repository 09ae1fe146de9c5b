"""The epoch plan: which records a rank reads, in which order. A pure function, no data needed.

Train (``shuffle=True``): the file is cut into chunks of consecutive records (the *effective*
chunk, below); the chunks are permuted with ``(seed, epoch)`` -- the same permutation on every
rank. With ``world_size >= 2`` the permuted sequence is then rotated by a random record offset
(also drawn from ``(seed, epoch)``) and cut into ``world_size`` equal contiguous slices of
``N // world_size`` records; the ``N % world_size`` records after the last slice are this epoch's
tail. Rank ``r`` reads slice ``r`` chunk by chunk (each chunk one forward cursor walk: the long
sequential reads a disk serves at full speed; the rotation cuts at most one more chunk), then a
shuffle buffer of ``buffer_size`` records (:mod:`imagenet_seq.plan.shuffle`, seeded by
``(seed, epoch, rank)``) mixes the stream. Hence, every epoch: ranks are disjoint; together they
cover the file except a tail of ``N % world_size`` records (a different tail every epoch); every
rank gets exactly the same number of records (so the same number of batches: unequal counts
hang DDP).

Shares change every epoch. With ``world_size >= 2``, rank ``r``'s set of records in epoch
``e + 1`` always differs from its set in epoch ``e`` -- for every rank, at every size
(``N >= world_size``; with ``N >= 2 * world_size`` each share has at least 2 records), at every
chunk size: when a draw would give some rank the set it had in the previous epoch, the epoch is
drawn again (``k = 1, 2, ...`` in the randomness, at most :data:`MAX_REDRAWS` times; in practice
only on splits of a few records per rank), and if every redraw collides the previous epoch's
shares move one rank down (rank ``r`` reads what rank ``r + 1`` read). So epoch ``e``'s plan
depends on epoch ``e - 1``'s: the first call for epoch ``e`` in a process computes epochs
``0 .. e`` (ImageNet's shape, 8 ranks: 0.6 s for epoch 99, 1.4 s on a loaded machine; 10,000
records, 8 ranks: 2.4 s for epoch 999); later calls are cached. It stays a pure function of
the arguments: the same plan whatever was computed before. (``world_size == 1``: the share is
the whole split; only its order changes, and the plan is the chunk permutation alone, as
before.)

Effective chunk (the rule), for the default ``chunk_size`` (``None`` or
:data:`DEFAULT_CHUNK_RECORDS`): ``min(1024, max(1, N // (world_size * MIN_CHUNKS_PER_RANK)))``
with :data:`MIN_CHUNKS_PER_RANK` = 32. Large splits keep the disk-friendly 1024-record chunks
(~113 MB of ImageNet) whenever ``N >= 32 * 1024 * world_size``, e.g. ImageNet's 1.28 M records
up to 39 ranks; a smaller split gets smaller chunks, so every rank's slice holds at least ~32
chunks from all over the file (on a split this small that costs ~32 seeks per rank and epoch).
Without this a small split is one or a few chunks (117 records: one chunk, so rank 0 of 2 read
records ``[0, 58)`` in every epoch), and records that share a chunk share a rank in every epoch:
co-batch repetition between epochs on a 10,000-record split with 8 ranks was 1.1-1.6 % at batch
32, 2.3-3.2 % at batch 64. Any other ``chunk_size`` is used as given (the user chose the reads);
shares still change every epoch with it (the rotation and the redraws above: no chunk size,
not even one chunk for the whole split, freezes them), but a large chunk on a small split keeps
neighbours together and raises co-batch repetition. (The Loader passes its default as the number
1024, so an explicit ``chunk_size=1024`` also means "automatic".) Measured with the default chunk
and buffers on a 10,000-record split (``benchmarks/results/shuffle.md``): co-batch repetition
0.33 % (1 rank) and 0.39 % (8 ranks) at batch 32, 0.63 % and 0.76 % at batch 64, worst of five
epoch pairs 0.65 % / 0.76 % (a full shuffle: 0.31 % and 0.63 %; at batch 256 a full shuffle of
10,000 records already gives 2.55 %).

Train (``shuffle=False``): file order (the file itself was written in a seeded random order),
sliced the same way without rotation: the same shares every epoch, by request.

Val: rank ``r`` reads the contiguous slice ``[r*N//W, (r+1)*N//W)`` in file order; every record
is read by exactly one rank, nothing is padded; slices differ by at most one record.
"""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import numpy as np

from imagenet_seq.format import SPLITS
from imagenet_seq.plan.shuffle import buffered_shuffle

__all__ = ["DEFAULT_CHUNK_RECORDS", "MIN_CHUNKS_PER_RANK", "MAX_REDRAWS", "Span", "check",
           "merge_spans",
           "rank_records", "num_batches", "effective_chunk_size", "shuffle_rng", "slice_spans",
           "read_spans", "epoch_order"]

#: Records per chunk: 1024 ImageNet records ~ 113 MB, one seek per ~0.75 s of HDD streaming.
#: Measured on the emulated HDD (benchmarks/results/slow_disk.md, 64 MB read-ahead): 1/2/4 ranks
#: keep 82/76/63 % of the disk's bandwidth vs 71/62/57 % with 256-record chunks, at the same
#: shuffle quality (benchmarks/results/shuffle.md). Automatic on small splits: effective_chunk_size.
DEFAULT_CHUNK_RECORDS = 1024
#: Fewest chunks per rank before the default chunk shrinks (small splits; module docstring).
MIN_CHUNKS_PER_RANK = 32
#: Redraws of an epoch whose draw gives some rank its previous epoch's set, before the fallback.
MAX_REDRAWS = 32

Span = Tuple[int, int]  # (first record, count): one contiguous forward read
Shares = Sequence[Sequence[Span]]  # per rank, in reading order


def _check(num_records: int, mode: str, rank: int, world_size: int, seed: int) -> None:
    if mode not in SPLITS:
        raise ValueError(f"mode={mode!r}; expected one of 'train', 'val'")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} with world_size={world_size}; expected "
                         f"0 <= rank < world_size")
    if world_size > num_records:
        raise ValueError(f"world_size={world_size} is larger than the {num_records} records of "
                         "this split; use fewer ranks or a larger dataset")
    if seed < 0:
        raise ValueError(f"seed={seed}; expected a non-negative integer")


def check(num_records: int, mode: str, rank: int = 0, world_size: int = 1, seed: int = 0,
          chunk_size: Optional[int] = DEFAULT_CHUNK_RECORDS) -> None:
    """ValueError naming the first argument of a plan that cannot be: the mode, a rank outside
    ``0..world_size-1``, more ranks than records, a negative seed, a chunk below 1 record."""
    _check(num_records, mode, rank, world_size, seed)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; expected >= 1 records")


def rank_records(num_records: int, mode: str, rank: int = 0, world_size: int = 1) -> int:
    """Records rank ``rank`` reads per epoch (train: ``N // W`` on every rank; val: its slice)."""
    _check(num_records, mode, rank, world_size, 0)
    if mode == "train":
        return num_records // world_size
    return (rank + 1) * num_records // world_size - rank * num_records // world_size


def num_batches(count: int, batch_size: int, drop_last: bool) -> int:
    """Batches from ``count`` records: ``ceil`` (last batch partial) or ``floor`` (dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    return count // batch_size if drop_last else -(-count // batch_size)


def effective_chunk_size(num_records: int, world_size: int = 1,
                         chunk_size: Optional[int] = DEFAULT_CHUNK_RECORDS) -> int:
    """Records per chunk that a shuffled train epoch really uses.

    The default (``None`` or :data:`DEFAULT_CHUNK_RECORDS`) is automatic:
    ``min(1024, max(1, num_records // (world_size * MIN_CHUNKS_PER_RANK)))``, i.e. 1024 on large
    splits, smaller chunks where a rank's slice would hold fewer than
    :data:`MIN_CHUNKS_PER_RANK` of them. Any other value is returned as given.
    """
    if chunk_size is None or chunk_size == DEFAULT_CHUNK_RECORDS:
        per_rank = num_records // (max(1, world_size) * MIN_CHUNKS_PER_RANK)
        return max(1, min(DEFAULT_CHUNK_RECORDS, per_rank))
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; expected >= 1 records")
    return int(chunk_size)


def _chunk_rng(seed: int, epoch: int, draw: int = 0) -> np.random.Generator:
    if draw == 0:
        return np.random.default_rng([seed, epoch, 0x43484E4B])  # same on every rank
    return np.random.default_rng([seed, epoch, draw, 0x52445257])


def shuffle_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """The shuffle buffer's randomness for one rank and epoch."""
    return np.random.default_rng([seed, epoch, rank, 0x42554646])


def _chunks(start: int, stop: int, chunk_size: int) -> List[Span]:
    return [(s, min(chunk_size, stop - s)) for s in range(start, stop, chunk_size)]


def slice_spans(spans: Sequence[Span], begin: int, end: int) -> List[Span]:
    """Positions ``[begin, end)`` of the record sequence ``spans`` describe, as spans."""
    out, pos = [], 0
    for start, count in spans:
        lo, hi = max(begin, pos), min(end, pos + count)
        if lo < hi:
            out.append((start + lo - pos, hi - lo))
        pos += count
        if pos >= end:
            break
    return out


def _cut(spans: List[Span], share: int, world_size: int) -> Shares:
    """The first ``world_size * share`` records of the sequence, as ``world_size`` slices."""
    out: Shares = [[] for _ in range(world_size)]
    r, room = 0, share
    for start, count in spans:
        while count and r < world_size:
            take = min(count, room)
            out[r].append((start, take))
            start, count, room = start + take, count - take, room - take
            if room == 0:
                r, room = r + 1, share
        if r == world_size:
            break
    return out


@functools.lru_cache(maxsize=32)
def _draw(num_records: int, seed: int, epoch: int, draw: int, world_size: int,
          chunk: int) -> Shares:
    """One candidate plan of a shuffled train epoch: every rank's slice, in reading order.

    Cached (the ranks of one process, ``read_spans`` then ``epoch_order``): never mutate it.
    """
    rng = _chunk_rng(seed, epoch, draw)
    chunks = _chunks(0, num_records, chunk)
    seq = [chunks[i] for i in rng.permutation(len(chunks))]
    if world_size > 1:
        offset = int(rng.integers(num_records))
        seq = slice_spans(seq, offset, num_records) + slice_spans(seq, 0, offset)
    return tuple(tuple(s) for s in _cut(seq, num_records // world_size, world_size))


def _as_set(spans: Sequence[Span]) -> Tuple[Span, ...]:
    """A canonical form of the records the spans cover (equal iff the record sets are)."""
    return tuple(merge_spans(sorted(spans)))


# (num_records, seed, world_size, chunk) -> the draw chosen for epochs 0, 1, ... (-1: fallback)
_draws: "OrderedDict[tuple, List[int]]" = OrderedDict()
_draws_lock = threading.Lock()
_DRAWS_KEYS = 64


def _plan_of(key: tuple, draws: List[int], epoch: int) -> Shares:
    n, seed, world, chunk = key
    first = epoch
    while draws[first] < 0:  # fallback epochs: the previous epoch's shares, one rank down
        first -= 1
    shares = _draw(n, seed, first, draws[first], world, chunk)
    shift = epoch - first
    return [shares[(r + shift) % world] for r in range(world)]


def _choose(key: tuple, epoch: int, prev: Optional[Shares]) -> Tuple[int, Shares]:
    n, seed, world, chunk = key
    first = _draw(n, seed, epoch, 0, world, chunk)
    if prev is None:
        return 0, first
    before = [_as_set(s) for s in prev]
    for k in range(MAX_REDRAWS + 1):
        cand = first if k == 0 else _draw(n, seed, epoch, k, world, chunk)
        if all(_as_set(cand[r]) != before[r] for r in range(world)):
            return k, cand
    return -1, [prev[(r + 1) % world] for r in range(world)]


def _train_shares(num_records: int, seed: int, epoch: int, world_size: int,
                  chunk: int) -> Shares:
    """Every rank's slice of a shuffled train epoch (the redraw rule of the module docstring)."""
    if world_size == 1:
        return _draw(num_records, seed, epoch, 0, 1, chunk)
    key = (num_records, seed, world_size, chunk)
    with _draws_lock:
        draws = list(_draws.get(key, ()))
    if epoch < len(draws):
        return _plan_of(key, draws, epoch)
    prev = _plan_of(key, draws, len(draws) - 1) if draws else None
    for e in range(len(draws), epoch + 1):
        k, prev = _choose(key, e, prev)
        draws.append(k)
    with _draws_lock:
        if len(draws) > len(_draws.get(key, ())):
            _draws[key] = draws
        _draws.move_to_end(key)
        while len(_draws) > _DRAWS_KEYS:
            _draws.popitem(last=False)
    assert prev is not None
    return prev


def read_spans(num_records: int, mode: str = "train", *, seed: int = 0, epoch: int = 0,
               rank: int = 0, world_size: int = 1, shuffle: bool = True,
               chunk_size: Optional[int] = DEFAULT_CHUNK_RECORDS) -> List[Span]:
    """The contiguous reads of one rank in one epoch, in reading order.

    Args:
        num_records: records in the split.
        mode: ``'train'`` (equal shares, tail < world_size dropped) or ``'val'`` (slices).
        seed, epoch: the randomness; the same values give the same spans.
        rank, world_size: this rank's place in the job.
        shuffle: permute chunks (train default) or keep file order.
        chunk_size: records per chunk (one contiguous read when chunks are permuted); the
            default (``None`` or 1024) is automatic in shuffled train epochs
            (:func:`effective_chunk_size`: 1024 on large splits, smaller on small ones).

    Returns:
        ``[(start, count), ...]``: read each with one forward cursor walk.
    """
    check(num_records, mode, rank, world_size, seed, chunk_size)
    if epoch < 0:
        raise ValueError(f"epoch={epoch}; expected a non-negative integer")
    if mode == "val":
        lo, hi = rank * num_records // world_size, (rank + 1) * num_records // world_size
        spans = _chunks(lo, hi, chunk_size or DEFAULT_CHUNK_RECORDS)
        if shuffle:
            spans = [spans[i] for i in _chunk_rng(seed, epoch).permutation(len(spans))]
        return merge_spans(spans)
    share = num_records // world_size
    if not shuffle:
        return merge_spans(slice_spans([(0, num_records)], rank * share, (rank + 1) * share))
    chunk = effective_chunk_size(num_records, world_size, chunk_size)
    return merge_spans(_train_shares(num_records, seed, epoch, world_size, chunk)[rank])


def merge_spans(spans: Sequence[Span]) -> List[Span]:
    """Join spans that continue each other (fewer, longer reads)."""
    out: List[Span] = []
    for start, count in spans:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + count)
        else:
            out.append((start, count))
    return out


def epoch_order(num_records: int, mode: str = "train", *, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, shuffle: bool = True,
                chunk_size: Optional[int] = DEFAULT_CHUNK_RECORDS,
                buffer_size: int = 0) -> np.ndarray:
    """Record indices in the order rank ``rank`` yields them in ``epoch`` (before batching).

    This is exactly the Loader's order for the same arguments (same code path), computed
    without reading the file; ``buffer_size`` applies only when ``shuffle``.
    """
    spans = read_spans(num_records, mode, seed=seed, epoch=epoch, rank=rank,
                       world_size=world_size, shuffle=shuffle, chunk_size=chunk_size)
    stream = np.concatenate([np.arange(s, s + c) for s, c in spans]) if spans else \
        np.empty(0, np.int64)
    if not shuffle or buffer_size <= 1:
        return stream.astype(np.int64)
    rng = shuffle_rng(seed, epoch, rank)
    return np.fromiter(buffered_shuffle(stream.tolist(), buffer_size, rng), np.int64,
                       count=len(stream))
