"""A rank's ring: shared memory the node reader writes JPEG bytes into and the rank copies out.

One ring per rank, one writer (the node reader) and one reader (the rank). The memory is an
anonymous ``memfd`` handed to the rank over its socket: it has no name in ``/dev/shm`` or
anywhere else, so no crash can leave a segment behind -- the kernel frees it with the last
process that maps it.

Positions are absolute byte counts (they only grow); a record lies at ``pos % size`` in one
piece: one that would run past the end starts at the next turn instead (the few bytes skipped
are freed with it). The writer knows ``head`` (bytes placed) and ``tail`` (bytes the rank said
it copied out, :data:`imagenet_seq.read.wire.FREE`); a record fits when ``head' + n - tail <=
size``. Nothing but bytes is shared: where each record lies travels in the socket messages, so
neither side reads a counter the other is writing.
"""
from __future__ import annotations

import mmap
import os
from typing import Optional

__all__ = ["RING_BYTES", "Ring", "create", "attach"]

#: Bytes of one rank's ring (~290 ImageNet records, ~9 blocks of the node plan). A node of
#: ``L`` ranks holds ``L * RING_BYTES`` of JPEGs in rings plus its reader's read-ahead
#: (``PREFETCH_BYTES``, 64 MB): 320 MB for 8 ranks, where 8 per-rank readers held 512 MB.
RING_BYTES = 32 << 20


class Ring:
    """The writer's account of one ring (no memory: :func:`create` makes that)."""

    def __init__(self, size: int):
        if size < 4096:
            raise ValueError(f"ring size={size}; expected >= 4096 bytes")
        self.size = size
        self.head = 0  # bytes placed (absolute)
        self.tail = 0  # bytes the rank copied out (absolute)

    def fits(self, n: int) -> bool:
        """Whether a record of ``n`` bytes goes through the ring at all (else: send it whole)."""
        return n <= self.size // 4

    def place(self, n: int) -> Optional[int]:
        """The absolute position for ``n`` more bytes, or None while the ring is too full."""
        pos = self.head
        if pos % self.size + n > self.size:
            pos += self.size - pos % self.size  # to the start of the next turn
        if pos + n - self.tail > self.size:
            return None
        self.head = pos + n
        return pos

    def free(self, upto: int) -> None:
        """The rank copied out everything before ``upto``."""
        if upto > self.head:
            raise ValueError(f"free up to {upto}, but only {self.head} bytes were placed")
        self.tail = max(self.tail, upto)

    def used(self) -> int:
        return self.head - self.tail


def create(size: int, name: str = "imagenet_seq-ring") -> "tuple[int, mmap.mmap]":
    """A new ring's memory: ``(fd, map)``; pass ``fd`` to the rank, close it afterwards."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


def attach(fd: int, size: int) -> mmap.mmap:
    """The rank's map of a ring it was handed (read-only); closes ``fd``."""
    try:
        if os.fstat(fd).st_size != size:
            raise ValueError(f"ring fd {fd} is {os.fstat(fd).st_size} bytes, expected {size}")
        return mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
