"""A failed node reader's last duty: answer the local ranks that had not connected yet.

Ranks of a node start at different times; a fast rank can meet a damaged record (or die)
before a slow one has connected. Were the reader to exit at once, the slow rank would find no
reader and start a fresh one, reading on as if nothing had happened, or find the reader it
started gone with the reason lost. So after telling its connected ranks
(:mod:`.node_reader`), the reader keeps listening -- serving nothing, its rings and file
closed -- and answers each ``HELLO`` with the same ``FAIL`` (:func:`linger`), until every
local rank has been answered once, the job's launcher is gone (no rank comes after it), or the
time a rank may take to connect has passed.
"""
from __future__ import annotations

import os
import selectors
import socket
import time
from typing import Optional, Sequence

from imagenet_seq.read import wire

__all__ = ["heard", "everyone", "launcher_alive", "linger"]

_HELLO_S = 10.0  # a late connection must say who it is within this


def heard(seen: set, hello: dict, local_world: int) -> None:
    """Note that the local rank of ``hello`` (of a node of ``local_world`` ranks) has had its
    answer -- welcomed, refused or told of a fault."""
    local = int(hello["local"])
    if int(hello["local_world_size"]) == local_world and 0 <= local < local_world:
        seen.add(local)


def everyone(seen: set, local_world: int) -> bool:
    """Whether every local rank has been answered."""
    return seen >= set(range(local_world))


def launcher_alive(launcher: Optional[Sequence]) -> bool:
    """Whether the process that launched the ranks (torchrun's agent, ``mp.spawn``'s parent)
    still runs: ``launcher`` is ``[pid, start time in ticks]`` (None: unknown, assumed alive)."""
    if not launcher:
        return True
    pid, started = launcher
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19] == started
    except (OSError, IndexError):
        return False


def linger(listener: socket.socket, answer: dict, seen: set, local_world: int,
           timeout: float, launcher: Optional[Sequence]) -> None:
    """Answer every ``HELLO`` on ``listener`` with ``FAIL`` ``answer`` until every local rank
    has been answered (``seen``), the launcher is gone, or ``timeout`` seconds have passed."""
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while not everyone(seen, local_world) and time.monotonic() < deadline and \
            launcher_alive(launcher):
        if sel.select(timeout=0.2):
            _answer(listener.accept()[0], answer, seen, local_world)
    sel.close()


def _answer(conn: socket.socket, answer: dict, seen: set, local_world: int) -> None:
    try:
        if wire.peer_uid(conn) != os.getuid():
            return  # abstract names are not private
        conn.settimeout(_HELLO_S)
        kind, hello, _, fds = wire.recv(conn)
        for fd in fds:
            os.close(fd)
        if kind == wire.HELLO:
            wire.send(conn, wire.FAIL, answer)
            heard(seen, hello, local_world)
    except (OSError, ValueError, KeyError, TypeError, wire.Closed):
        pass
    finally:
        conn.close()
