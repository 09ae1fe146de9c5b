"""Rank and world size for the Loader: explicit arguments, or the initialised process group.

torchrun (``env://``) users call ``torch.distributed.init_process_group`` and then create the
Loader; it finds its rank there. Tests and custom launchers pass ``rank=`` and ``world_size=``.
The only place that asks the environment (``LOCAL_WORLD_SIZE``) and ``torch.distributed``:
called once, when a Loader resolves its settings (:func:`imagenet_seq.loader.config.resolve`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["RankInfo", "resolve_rank", "local_world_size", "node_layout"]


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of ranks reading the dataset.
        local_world_size: ranks on this node (``LOCAL_WORLD_SIZE`` from torchrun, else
            ``world_size``: the safe assumption for memory budgets shared by one machine).
    """

    rank: int
    world_size: int
    local_world_size: int


def local_world_size(world_size: int) -> int:
    """Ranks on this node: ``LOCAL_WORLD_SIZE`` (torchrun) when it is a number in
    ``1..world_size``, else ``world_size``.

    A job that spawns its own ranks under torchrun (PyTorch's ImageNet example with
    ``--multiprocessing-distributed``: one torchrun process per node, then one spawned rank
    per GPU) keeps torchrun's ``LOCAL_WORLD_SIZE=1`` and ``WORLD_SIZE`` = nodes in every rank,
    while its process group has ``world_size`` ranks: the node then runs
    ``LOCAL_WORLD_SIZE * world_size / WORLD_SIZE`` of them, not 1 (each would otherwise take
    the whole machine's shuffle memory)."""
    value = _env_int("LOCAL_WORLD_SIZE")
    if value is None or not 1 <= value <= world_size:
        return world_size
    launched = _env_int("WORLD_SIZE")
    if launched and launched != world_size and world_size % launched == 0:
        value = min(world_size, value * (world_size // launched))
    return value


def _env_int(name: str) -> Optional[int]:
    try:
        return int(os.environ.get(name, ""))
    except ValueError:
        return None


def resolve_rank(rank: Optional[int] = None, world_size: Optional[int] = None,
                 distributed: Optional[bool] = None) -> RankInfo:
    """Decide (rank, world_size) for one Loader.

    Args:
        rank: explicit global rank; give it together with ``world_size``.
        world_size: explicit number of ranks.
        distributed: ``None`` (default) uses the process group when one is initialised and a
            single rank otherwise; ``True`` requires an initialised process group; ``False``
            ignores it (each process reads the whole dataset).

    Raises:
        ValueError: only one of rank/world_size given, or ``rank`` outside ``0..world_size-1``.
        RuntimeError: ``distributed=True`` without an initialised ``torch.distributed`` group.
    """
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError(f"rank={rank!r}, world_size={world_size!r}: pass both (e.g. "
                             "rank=int(os.environ['RANK']), world_size=int(os.environ["
                             "'WORLD_SIZE'])) or neither to take them from torch.distributed")
        return _checked(int(rank), int(world_size))
    if distributed is False:
        return RankInfo(0, 1, 1)
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if distributed and not initialised:
        raise RuntimeError(
            "distributed=True but torch.distributed has no initialised process group; call "
            "torch.distributed.init_process_group(...) (torchrun sets env:// up) before creating "
            "the Loader, or pass rank= and world_size= explicitly")
    if not initialised:
        return RankInfo(0, 1, 1)
    return _checked(dist.get_rank(), dist.get_world_size())


def _checked(rank: int, world_size: int) -> RankInfo:
    if world_size < 1:
        raise ValueError(f"world_size={world_size}; expected >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} with world_size={world_size}; expected "
                         f"0 <= rank < {world_size}")
    return RankInfo(rank, world_size, local_world_size(world_size))


def node_layout(ranks: RankInfo, requested: Optional[bool]) -> Tuple[bool, Optional[str]]:
    """Whether this rank reads through one reader per node (issue 24), and if not, why not
    (None: off by choice, or nothing to share): ``(on, why_not)``.

    ``requested`` (the Loader's ``node_reader``): ``False`` off; ``True`` on, or ValueError
    saying why it cannot be; ``None`` (automatic) on when the launcher says how many ranks
    this node runs (``LOCAL_WORLD_SIZE`` > 1, torchrun) and ``IMAGENET_SEQ_NODE_READER`` is
    not ``0``. The layout must be torchrun's: nodes of ``L`` consecutive ranks, ``L``
    dividing the world size, and ``rank // L`` equal to ``GROUP_RANK`` where that is set.
    """
    from imagenet_seq.read import rendezvous

    if requested is False:
        return False, None
    n = ranks.local_world_size
    if requested is None and (_env_int("LOCAL_WORLD_SIZE") is None or
                              not rendezvous.enabled(n)):
        return False, None
    why = None
    if n < 2:
        why = f"this node runs one rank (local_world_size={n}): nothing to share"
    elif ranks.world_size % n:
        why = (f"LOCAL_WORLD_SIZE={n} does not divide world_size={ranks.world_size} (nodes of "
               "different sizes)")
    else:
        group = _env_int("GROUP_RANK")
        if group is not None and ranks.rank // n != group:
            why = (f"rank {ranks.rank} // LOCAL_WORLD_SIZE {n} = {ranks.rank // n}, but "
                   f"GROUP_RANK={group} (ranks are not laid out as consecutive blocks per "
                   "node)")
    if why is not None and requested:
        raise ValueError(f"node_reader=True, but {why}; pass node_reader=None (automatic: "
                         "per-rank readers here) or False")
    return why is None, why
