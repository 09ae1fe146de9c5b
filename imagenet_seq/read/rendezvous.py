"""How the ranks of a node find their node reader, and whether they use one at all.

Every local rank of one job, node and file computes the same name (:func:`reader_key`: the
user, the job key, the node's first rank, the file's device and inode) and connects to the
abstract Unix socket of that name (:func:`.wire.address`). A rank that finds nobody listening
tries to bind a second name, ``<key>/start``: one process at a time can, and that one starts
the reader (``python -m imagenet_seq.read.node_reader``) and holds the name until it is
connected; the others retry. So the reader does not depend on any particular rank (rank 0 may
be late, or busy), and exactly one starts.

Why abstract sockets and not files, ``/dev/shm`` names or ``torch.distributed``: an abstract
name disappears with the last process holding it, so a killed job leaves nothing behind and
there is nothing to clean up; and the rendezvous works whether or not a process group exists
(and costs no collective in a Loader's constructor, which ranks may reach at different times).
Both ends check the other's user id (``SO_PEERCRED``): abstract names are not private.

Why a job key: two jobs on one node reading one file must not share a reader. :func:`job_key`
is the launcher's pid and start time (torchrun's agent, ``mp.spawn``'s parent and
``slurmstepd`` are every local rank's parent) plus the launchers' own ids; a restarted job gets
a new key. A second job that still collides (same key) is refused by the reader, naming the
rank already connected: a live job is never disturbed.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Tuple

from imagenet_seq.read import ring as rings
from imagenet_seq.read import wire
from imagenet_seq.read.node_reader import EXIT_IN_USE
from imagenet_seq.read.wire import NodeReaderError

__all__ = ["enabled", "job_key", "reader_key", "connect", "CONNECT_TIMEOUT_S"]

#: How long a rank waits for the node's reader to listen (other ranks may start late).
CONNECT_TIMEOUT_S = 120.0
_OFF = "IMAGENET_SEQ_NODE_READER=0 reads without it"


def enabled(local_world_size: int, requested: Optional[bool] = None) -> bool:
    """Whether a Loader reads through a node reader: ``requested`` (an argument) wins, then
    ``IMAGENET_SEQ_NODE_READER`` (``0``: per-rank readers, as before); never for one rank."""
    if local_world_size < 2:
        return False
    if requested is not None:
        return bool(requested)
    return os.environ.get("IMAGENET_SEQ_NODE_READER", "1") != "0"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22: start time in ticks
    except (OSError, IndexError):
        return "?"


def job_key() -> str:
    """This job on this machine, the same in every local rank (see the module docstring)."""
    ppid = os.getppid()
    return "/".join([str(ppid), _start_time(ppid)] + [
        os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                                        "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
                                        "SLURM_STEP_ID")])


def reader_key(job: str, first_rank: int, path: str) -> str:
    """The socket name of the reader of ``path`` for the node whose first rank is given."""
    st = os.stat(path)
    ident = dict(uid=os.getuid(), job=job, node=first_rank, file=[st.st_dev, st.st_ino])
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def connect(key: str, hello: dict, start: dict, timeout: float = CONNECT_TIMEOUT_S):
    """Connect to reader ``key`` (starting it if nobody does), say ``hello``.

    Args:
        key: :func:`reader_key`.
        hello: who this rank is (``local``, ``rank``, ``pid``, ``local_world_size``, ``path``,
            ``file``, ``plan``): the reader refuses a rank that does not fit its node.
        start: the reader's configuration (``path``, ``split``, ``local_world_size``,
            ``ring_bytes``), used if this rank is the one that starts it.

    Returns:
        ``(socket, ring map, reader pid, started process or None)``.

    Raises:
        NodeReaderError: refused (naming why), the started reader died, or nobody listened
            within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    starter: Optional[socket.socket] = None
    proc: Optional[subprocess.Popen] = None
    try:
        while True:
            got = _try_connect(key, hello)
            if got is not None:
                sock, ring, pid = got
                return sock, ring, pid, proc
            if proc is None and starter is None:
                starter = _start_right(key)
                if starter is not None:
                    ppid = os.getppid()  # the launcher: no late rank comes once it is gone
                    proc = _spawn(dict(start, key=key, parent=os.getpid(),
                                       launcher=[ppid, _start_time(ppid)],
                                       connect_timeout=CONNECT_TIMEOUT_S))
            if proc is not None and proc.poll() == 0:
                # it served the ranks that came and left before this one connected (a short
                # share, a rank slow to start): start another for this rank
                proc = None
                if starter is not None:
                    starter.close()
                    starter = None
            if proc is not None and proc.poll() not in (None, EXIT_IN_USE):
                raise NodeReaderError(
                    f"the node reader this rank started (pid {proc.pid}) for {hello['path']} "
                    f"exited with status {proc.returncode} before it listened; its error is "
                    f"above on this process's stderr; {_OFF}")
            if time.monotonic() > deadline:
                raise NodeReaderError(
                    f"no node reader for {hello['path']} after {timeout:.0f} s (local rank "
                    f"{hello['local']} of {hello['local_world_size']}): a local rank starts "
                    f"it when it creates its Loader; does every local rank create this "
                    f"Loader? {_OFF}")
            time.sleep(0.02)
    finally:
        if starter is not None:
            starter.close()


def _try_connect(key: str, hello: dict) -> Optional[Tuple[socket.socket, object, int]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(wire.address(key))
        if wire.peer_uid(sock) != os.getuid():
            raise NodeReaderError(f"another user's process listens on this job's node reader "
                                  f"name ({key}); {_OFF}")
        wire.send(sock, wire.HELLO, hello)
        kind, head, _, fds = wire.recv(sock)
    except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError, wire.Closed):
        sock.close()  # nobody listens yet (or a reader was exiting): start one, or wait
        return None
    except BaseException:
        sock.close()
        raise
    if kind == wire.WELCOME and len(fds) == 1:
        return sock, rings.attach(fds[0], int(head["ring_bytes"])), int(head["pid"])
    sock.close()
    for fd in fds:
        os.close(fd)
    raise NodeReaderError(head.get("message", f"the node reader answered {kind!r}"))


def _start_right(key: str) -> Optional[socket.socket]:
    """The right to start the reader: bound by one process at a time (None: another has it)."""
    starter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        starter.bind(wire.address(key + "/start"))
    except OSError:
        starter.close()
        return None
    return starter


def _spawn(cfg: dict) -> subprocess.Popen:
    # a fresh interpreter (no CUDA, no trainer threads) that imports this very package
    home = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [home] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagenet_seq.read.node_reader", json.dumps(cfg)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True, env=env)
    threading.Thread(target=proc.wait, daemon=True,  # reaped when it ends
                     name="imagenet_seq-node-reader-wait").start()
    return proc
