"""The node plan (``PLAN``): each rank's reads laid out so that the ranks of one node, together,
read the file as one forward sweep of long runs. A pure function, no data needed.

Used when one reader per node serves the node's ranks (:mod:`imagenet_seq.read.node_reader`);
today's per-rank plan (:mod:`.order`) stays the plan of every other job. Same guarantees as
:mod:`.order`, every epoch: ranks are disjoint; train shares are ``N // W`` records on every
rank of the job (equal batch counts on every node); together they cover the split except a
tail of ``N % W``; each rank's train set differs from its previous epoch's (``W >= 2``; the
same redraw rule); val slices are today's, every record once.

Nodes are consecutive blocks of ``L`` = ``local_world_size`` global ranks (torchrun's layout:
``RANK = GROUP_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK``); ``L`` divides ``W`` and is the same on
every node (it is part of the plan: ranks of one job must agree on it).

Train, shuffled: the split is cut into *node chunks* of ``U = L * c`` consecutive records
(``c`` the per-rank chunk of :func:`.order.effective_chunk_size`, 1024 on ImageNet: a node
chunk of 8 ranks is ~900 MB), permuted and rotated with ``(seed, epoch)`` as :mod:`.order`
permutes chunks, and the sequence is cut into node slices of ``L * (N // W)`` records, node
``k`` taking slice ``k``. Inside its slice, a node's ranks take *blocks* of ``BLOCK_RECORDS``
consecutive positions in turn (local rank ``i`` the ``i``-th block of every round of ``L``
blocks; a last partial round is cut into ``L`` equal pieces). So each rank reads ``c`` records
from every node chunk, as blocks, and the node reader, sweeping its slice in order, reads each
node chunk front to back and hands every rank a block each ``L`` blocks.

Why blocks and not one sub-piece per rank (rank ``i`` the ``i``-th ``c`` records of a node
chunk): a sweep fills rank 0's sub-piece, then rank 1's, ...; every rank must hold nearly a
whole sub-piece (~113 MB on ImageNet) to keep consuming while the reader serves the other
``L - 1``, and the last rank waits ``(L - 1) / L`` of a node chunk for its first record. With
blocks, a rank needs about two blocks in its ring (~7 MB) and all ranks start at once; the
disk still sees one forward run per node chunk (one seek per ~900 MB instead of ~113 MB).

Train, not shuffled: the same slices and blocks over the file in file order: the same shares
every epoch, each rank's records in file order.

Val: every rank reads today's slice (:func:`.order.read_spans`), so val is the same with the
node reader or without. The sweep visits the node's ranks in turn, ``VAL_PIECE_RECORDS`` of each
rank's slice at a time (one seek per piece; a small share of an epoch).

Shares change every epoch: as in :mod:`.order`, a draw that gives any rank of the job its
previous epoch's set is drawn again, at most :data:`.order.MAX_REDRAWS` times, then the previous
epoch's shares move one rank along within each node (one node along when ``L == 1``), so a
node's union stays one node slice. Epoch ``e`` depends on ``e - 1``; the chain is cached and
cheap (a few lookups per rank and epoch: ImageNet's shape, 8 ranks, epoch 999 in ~0.1 s).
"""
from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from imagenet_seq.plan import order
from imagenet_seq.plan.order import Span, merge_spans  # noqa: F401 - also this module's
from imagenet_seq.plan.shuffle import buffered_shuffle

__all__ = ["PLAN", "BLOCK_RECORDS", "VAL_PIECE_RECORDS", "Piece", "NodePlan", "EpochSpans",
           "node_plan", "rank_spans", "epoch_spans", "epoch_order", "check_layout", "merge_spans"]

#: The name a resume state carries: a state written under another plan cannot resume here.
PLAN = "node-1"
#: Records a rank takes in turn inside its node's slice (~3.5 MB of ImageNet): a rank's ring
#: holds several, so every rank keeps consuming while the reader serves the others.
BLOCK_RECORDS = 32
#: Records of one rank's val slice the node sweep reads before the next rank's (~14 MB).
VAL_PIECE_RECORDS = 128

Piece = Tuple[int, int, int]  # (first record, count, local rank): one contiguous read


class EpochSpans(list):
    """A rank's spans of one epoch from ``position`` on (a list of ``(start, count)``), tagged
    with where they come from, so a node client knows which sweep they belong to."""

    def __init__(self, spans: Sequence[Span], epoch: int, position: int = 0):
        super().__init__(spans)
        self.epoch, self.position = epoch, position


def check_layout(world_size: int, local_ranks: range) -> None:
    """ValueError unless ``local_ranks`` is one node of a job of uniform nodes."""
    n = len(local_ranks)
    if n < 1 or local_ranks.step != 1 or world_size % n or local_ranks.start % n or \
            local_ranks.stop > world_size:
        raise ValueError(
            f"local_ranks={local_ranks!r} with world_size={world_size}; the node plan needs "
            "nodes of the same number of consecutive ranks (torchrun's layout: node k holds "
            "ranks k*L .. k*L+L-1, L dividing world_size); turn the node reader off "
            "(IMAGENET_SEQ_NODE_READER=0) for other layouts")


@dataclass(frozen=True)
class NodePlan:
    """One node's epoch. ``spans[i]``: local rank ``i``'s reads in its reading order;
    ``sweep``: every piece of every local rank in the order the node reader reads them (each
    rank's pieces appear in its own reading order)."""

    epoch: int
    local_ranks: range
    spans: Tuple[Tuple[Span, ...], ...]
    sweep: Tuple[Piece, ...]

    def pieces(self, local: int) -> List[Tuple[int, int, int]]:
        """Local rank ``local``'s pieces as ``(start, count, sweep index)``, in its order."""
        return [(s, c, k) for k, (s, c, r) in enumerate(self.sweep) if r == local]

    def node_chunks(self) -> List[Span]:
        """The sweep as the disk sees it: maximal runs of pieces that continue each other."""
        return merge_spans([(s, c) for s, c, _ in self.sweep])


# ---------------------------------------------------------------------------------------------
# one draw: permuted, rotated node chunks; positions <-> records, and who owns a position
class _Draw:
    def __init__(self, n: int, unit: int, perm: np.ndarray, offset: int):
        self.n, self.unit, self.offset = n, unit, offset
        self.perm = perm
        sizes = np.full(len(perm), unit, np.int64)
        sizes[perm == len(perm) - 1] = n - (len(perm) - 1) * unit  # the short last unit
        self.cum = np.concatenate(([0], np.cumsum(sizes)))  # sequence start of each unit
        self.inv = np.argsort(perm)

    def record_at(self, p: int) -> int:
        pu = (p + self.offset) % self.n
        j = int(np.searchsorted(self.cum, pu, "right")) - 1
        return int(self.perm[j]) * self.unit + pu - int(self.cum[j])

    def position_of(self, x: int) -> int:
        u = x // self.unit
        return (int(self.cum[self.inv[u]]) + x - u * self.unit - self.offset) % self.n

    def spans(self, lo: int, hi: int) -> List[Span]:
        """Positions ``[lo, hi)`` as file spans, in sequence order."""
        out, p = [], lo
        while p < hi:
            pu = (p + self.offset) % self.n
            j = int(np.searchsorted(self.cum, pu, "right")) - 1
            run = min(hi - p, int(self.cum[j + 1]) - pu)
            out.append((int(self.perm[j]) * self.unit + pu - int(self.cum[j]), run))
            p += run
        return out


@functools.lru_cache(maxsize=64)
def _draw(n: int, seed: int, epoch: int, k: int, world: int, unit: int) -> _Draw:
    rng = np.random.default_rng([seed, epoch, k, 0x4E4F4445])  # "NODE": not order's draws
    perm = rng.permutation(-(-n // unit))
    return _Draw(n, unit, perm, int(rng.integers(n)) if world > 1 else 0)


@functools.lru_cache(maxsize=8)
def _file_order(n: int) -> _Draw:
    return _Draw(n, n, np.zeros(1, np.int64), 0)


@dataclass(frozen=True)
class _Layout:
    """How positions of the sequence map to ranks: node slices, then blocks in turn."""

    n: int
    world: int
    local: int  # L
    block: int

    @property
    def share(self) -> int:
        return self.n // self.world

    def owner(self, p: int) -> int:
        """The global rank whose share holds sequence position ``p`` (-1: the tail)."""
        share, L = self.share, self.local
        if p >= self.world * share:
            return -1
        node, q = divmod(p, L * share)
        return node * L + self._local_owner(q)

    def _local_owner(self, q: int) -> int:
        full = (self.share // self.block) * self.local * self.block
        if q < full:
            return (q // self.block) % self.local
        return (q - full) // (self.share - full // self.local)

    def samples(self, rank: int, k: int = 8) -> List[int]:
        """Up to ``k`` positions spread over ``rank``'s share (first records of its blocks)."""
        node, i = divmod(rank, self.local)
        L, b, share = self.local, self.block, self.share
        lo, rounds = node * L * share, share // b
        if not rounds:
            return [lo + i * share]
        return [lo + j * L * b + i * b for j in sorted({rounds * m // k for m in range(k)})]

    def cuts(self, node: int) -> List[Tuple[int, int, int]]:
        """Node ``node``'s slice as ``(position, count, local owner)`` blocks, in order."""
        L, b, share = self.local, self.block, self.share
        lo = node * L * share
        rounds = share // b
        out = [(lo + j * b, b, j % L) for j in range(rounds * L)]
        rem = share - rounds * b
        if rem:
            base = lo + rounds * L * b
            out += [(base + i * rem, rem, i) for i in range(L)]
        return out

    def positions(self, rank: int) -> List[Span]:
        node, i = divmod(rank, self.local)
        return [(p, c) for p, c, r in self.cuts(node) if r == i]


@dataclass(frozen=True)
class _Choice:
    """Epoch plan = draw ``k`` of epoch ``base`` with every rank reading the share of the rank
    ``shift`` places along (within its node; along the job when ``L == 1``)."""

    base: int
    k: int
    shift: int


def _along(layout: _Layout, rank: int, s: int) -> int:
    if layout.local == 1:
        return (rank + s) % layout.world
    node, i = divmod(rank, layout.local)
    return node * layout.local + (i + s) % layout.local


def _rank_set(d: _Draw, layout: _Layout, choice: _Choice, rank: int) -> Tuple[Span, ...]:
    base = _along(layout, rank, choice.shift)
    spans = [s for p, c in layout.positions(base) for s in d.spans(p, p + c)]
    return tuple(merge_spans(sorted(spans)))


def _collides(key: tuple, layout: _Layout, cand: _Choice, prev: _Choice) -> bool:
    """Whether some rank would read, under ``cand``, the set it read under ``prev``."""
    n, seed, world, unit, _ = key
    dc, dp = _draw(n, seed, cand.base, cand.k, world, unit), \
        _draw(n, seed, prev.base, prev.k, world, unit)
    for r in range(world):
        for p in layout.samples(_along(layout, r, cand.shift)):
            owner = layout.owner(dp.position_of(dc.record_at(p)))
            if owner < 0 or _along(layout, owner, -prev.shift) != r:
                break  # a record of its share was in the tail or another rank's: sets differ
        else:  # rare (tiny splits): compare the whole sets
            if _rank_set(dc, layout, cand, r) == _rank_set(dp, layout, prev, r):
                return True
    return False


_chains: "OrderedDict[tuple, List[_Choice]]" = OrderedDict()
_chains_lock = threading.Lock()


def _choice(key: tuple, layout: _Layout, epoch: int) -> _Choice:
    """The draw (and shift) of ``epoch``: the redraw rule of the module docstring."""
    with _chains_lock:
        chain = list(_chains.get(key, ()))
    for e in range(len(chain), epoch + 1):
        choice = _Choice(e, 0, 0)
        if e and layout.world > 1:
            prev = chain[e - 1]
            for k in range(order.MAX_REDRAWS + 1):
                choice = _Choice(e, k, 0)
                if not _collides(key, layout, choice, prev):
                    break
            else:
                choice = _Choice(prev.base, prev.k, prev.shift + 1)
        chain.append(choice)
    with _chains_lock:
        if len(chain) > len(_chains.get(key, ())):
            _chains[key] = chain
        _chains.move_to_end(key)
        while len(_chains) > 32:
            _chains.popitem(last=False)
    return chain[epoch]


# ---------------------------------------------------------------------------------------------
def _checked(num_records: int, mode: str, epoch: int, world_size: int, local_ranks: range,
             seed: int, chunk_size: Optional[int]) -> None:
    check_layout(world_size, local_ranks)
    order.rank_records(num_records, mode, local_ranks.start, world_size)  # mode, ranks, size
    if seed < 0:
        raise ValueError(f"seed={seed}; expected a non-negative integer")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; expected >= 1 records")
    if epoch < 0:
        raise ValueError(f"epoch={epoch}; expected a non-negative integer")


@functools.lru_cache(maxsize=16)
def _node_plan(num_records: int, mode: str, seed: int, epoch: int, world_size: int,
               first: int, local: int, shuffle: bool, chunk_size: Optional[int]) -> NodePlan:
    ranks = range(first, first + local)
    if mode == "val":
        per = [order.read_spans(num_records, "val", seed=seed, epoch=epoch, rank=r,
                                world_size=world_size, shuffle=shuffle, chunk_size=chunk_size)
               for r in ranks]
        pieces = [[(s + o, min(VAL_PIECE_RECORDS, c - o)) for s, c in spans
                   for o in range(0, c, VAL_PIECE_RECORDS)] for spans in per]
        sweep = [(s, c, i) for j in range(max(map(len, pieces))) for i in range(local)
                 if j < len(pieces[i]) for s, c in [pieces[i][j]]]
        return NodePlan(epoch, ranks, tuple(tuple(s) for s in per), tuple(sweep))
    layout = _Layout(num_records, world_size, local, BLOCK_RECORDS)
    if shuffle:
        unit = local * order.effective_chunk_size(num_records, world_size, chunk_size)
        key = (num_records, seed, world_size, unit, local)
        choice = _choice(key, layout, epoch)
        d = _draw(num_records, seed, choice.base, choice.k, world_size, unit)
    else:
        choice, d = _Choice(epoch, 0, 0), _file_order(num_records)
    base_node = _along(layout, first, choice.shift) // local
    sweep = _cut_sweep(d, layout, base_node, choice.shift)
    per_rank: List[List[Span]] = [[] for _ in ranks]
    for s, c, i in sweep:
        per_rank[i].append((s, c))
    return NodePlan(epoch, ranks, tuple(tuple(merge_spans(x)) for x in per_rank), tuple(sweep))


def _cut_sweep(d: _Draw, layout: _Layout, node: int, shift: int) -> List[Piece]:
    """Node ``node``'s slice of draw ``d`` as pieces: its file spans cut at block boundaries,
    each labelled with the local rank that reads it (one walk over both lists)."""
    L = layout.local
    blocks = layout.cuts(node)
    if not blocks:
        return []
    spans = d.spans(blocks[0][0], blocks[-1][0] + blocks[-1][1])
    out: List[Piece] = []
    k, (start, left) = 0, spans[0]
    for p, c, owner in blocks:
        reader = (owner - shift) % L if L > 1 else 0
        while c:
            if not left:
                k += 1
                start, left = spans[k]
            take = min(c, left)
            out.append((start, take, reader))
            start, left, c = start + take, left - take, c - take
    return out


def node_plan(num_records: int, mode: str = "train", *, seed: int = 0, epoch: int = 0,
              world_size: int = 1, local_ranks: Optional[range] = None, shuffle: bool = True,
              chunk_size: Optional[int] = order.DEFAULT_CHUNK_RECORDS) -> NodePlan:
    """One node's epoch: every local rank's reads and the node reader's sweep.

    Args:
        num_records, mode, seed, epoch, shuffle, chunk_size: as :func:`.order.read_spans`
            (``chunk_size`` is the per-rank chunk; a node chunk is ``len(local_ranks)`` of them).
        world_size: ranks in the job.
        local_ranks: this node's global ranks, ``range(k * L, k * L + L)``; default: all.

    Returns:
        A :class:`NodePlan` (cached: equal arguments give the same object; never mutate it).
    """
    local_ranks = range(world_size) if local_ranks is None else local_ranks
    _checked(num_records, mode, epoch, world_size, local_ranks, seed, chunk_size)
    return _node_plan(num_records, mode, seed, epoch, world_size, local_ranks.start,
                      len(local_ranks), shuffle, chunk_size)


def rank_spans(num_records: int, mode: str = "train", *, seed: int = 0, epoch: int = 0,
               rank: int = 0, world_size: int = 1, local_world_size: int = 1,
               shuffle: bool = True,
               chunk_size: Optional[int] = order.DEFAULT_CHUNK_RECORDS) -> List[Span]:
    """Rank ``rank``'s reads in ``epoch`` under the node plan (its reading order)."""
    if local_world_size < 1:
        raise ValueError(f"local_world_size={local_world_size}; expected >= 1")
    first = rank - rank % local_world_size
    plan = node_plan(num_records, mode, seed=seed, epoch=epoch, world_size=world_size,
                     local_ranks=range(first, first + local_world_size), shuffle=shuffle,
                     chunk_size=chunk_size)
    return list(plan.spans[rank - first])


def epoch_spans(num_records: int, mode: str = "train", *, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, local_world_size: int = 1,
                shuffle: bool = True, chunk_size: Optional[int] = order.DEFAULT_CHUNK_RECORDS,
                position: int = 0) -> EpochSpans:
    """:func:`rank_spans` from input position ``position`` on (a resume), tagged for a node
    client (:class:`EpochSpans`): what a Loader's plan stage hands its reader."""
    spans = rank_spans(num_records, mode, seed=seed, epoch=epoch, rank=rank,
                       world_size=world_size, local_world_size=local_world_size,
                       shuffle=shuffle, chunk_size=chunk_size)
    return EpochSpans(order.slice_spans(spans, position, sum(c for _, c in spans)), epoch,
                      position)


def epoch_order(num_records: int, mode: str = "train", *, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, local_world_size: int = 1,
                shuffle: bool = True, chunk_size: Optional[int] = order.DEFAULT_CHUNK_RECORDS,
                buffer_size: int = 0) -> np.ndarray:
    """Records in the order rank ``rank`` yields them (the shuffle buffer as in :mod:`.order`)."""
    spans = rank_spans(num_records, mode, seed=seed, epoch=epoch, rank=rank,
                       world_size=world_size, local_world_size=local_world_size,
                       shuffle=shuffle, chunk_size=chunk_size)
    stream = np.concatenate([np.arange(s, s + c) for s, c in spans] or
                            [np.empty(0, np.int64)]).astype(np.int64)
    if not shuffle or buffer_size <= 1:
        return stream
    rng = order.shuffle_rng(seed, epoch, rank)
    return np.fromiter(buffered_shuffle(stream.tolist(), buffer_size, rng), np.int64,
                       count=len(stream))
