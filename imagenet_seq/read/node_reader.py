"""The node reader: one process per job, node and file, reading for every local rank.

Started by the first local rank that finds none (:mod:`.rendezvous`) as
``python -m imagenet_seq.read.node_reader CONFIG_JSON`` -- a fresh interpreter: no CUDA, no
threads or locks copied from a trainer, its own GIL, so no rank's long step or busy Python slows
the disk down. It listens on an abstract Unix socket (:func:`.wire.address`); each rank
connects, says who it is (``HELLO``) and gets its ring (``WELCOME`` + a memfd, :mod:`.ring`).

A rank asks for records as pieces ``(start, count, key)`` (``READ``): the pieces of its node
plan (:mod:`imagenet_seq.plan.node`), keyed by ``(epoch, place in the node sweep)``. The
reader keeps one sweep (:mod:`.sweep`): every active request's remaining pieces in key order,
read with one :class:`~imagenet_seq.read.reader.SplitReader` (its checks, and its read-ahead
running through the whole sweep); each record's bytes are copied into its rank's ring and
announced in ``ITEMS`` messages (no pickling). A request that arrives or is cancelled changes
the sweep: the reader finishes the record in hand and plans the rest again (a rank joining
late is served first until it is back in step). Before a sweep starts from idle, the reader
waits up to ``GATHER_S`` for every connected rank's request.

Flow control: the reader waits only when the ring of the rank whose record comes next is full,
i.e. a rank that stops consuming holds the others up once they have emptied their own rings
(``RING_BYTES`` each). A record larger than a quarter of a ring goes whole in its message, and
only into an empty ring: a rank has at most its ring and one record on the way.

Faults: a rank's socket closing without ``BYE`` (killed: the kernel closes it) makes the reader
send ``FAIL`` naming it to every other rank and exit (a send that fails because the rank said
``BYE`` and closed meanwhile is no fault: the others are served on); a read error is sent to
every rank (the rank it was for gets the original error type) and the reader exits; when the
last rank says ``BYE`` the reader exits. Nothing outlives it: the socket name and the rings
are anonymous.

Who tells: a thread that finds a fault only records it (:meth:`NodeReader._fatal`); the
control loop, the thread that also welcomes ranks, sends every ``FAIL`` -- so no rank can be
welcomed after the others were told and then see the socket close "without a word", and
nothing follows a rank's ``FAIL``. Local ranks that have not connected yet are told when they
do (:mod:`.node_linger`); then the reader exits.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from imagenet_seq import format as fmt
from imagenet_seq.read import node_linger
from imagenet_seq.read import ring as rings
from imagenet_seq.read import sweep, wire
from imagenet_seq.read.reader import SplitReader

__all__ = ["NodeReader", "main", "FLUSH_ITEMS", "GATHER_S", "EXIT_IN_USE"]

#: Records announced per ``ITEMS`` message (sooner at the end of a piece, or before waiting).
FLUSH_ITEMS = 16
#: Exit status when another reader already serves this address (the client goes on).
EXIT_IN_USE = 3
#: Before a sweep starts, how long the reader waits for the other connected ranks' requests.
GATHER_S = 0.25
_HELLO_S = 10.0  # a connection must say who it is within this
_SEND_S = 60.0  # a rank that takes no message for this long is treated as gone
_BYE_S = 5.0  # after a failed send, how long the rank's BYE may take to be read


def _grouping(value):
    """A ``shard_devices`` back from JSON (labels arrive as a list)."""
    return tuple(value) if isinstance(value, list) else value


class _Failed(Exception):
    """The reader failed (``NodeReader.failure``): the thread that sees this stops serving."""


class _Rank:
    def __init__(self, sock: socket.socket, hello: dict, ring_bytes: int):
        self.sock, self.hello = sock, hello
        self.local, self.rank, self.pid = int(hello["local"]), int(hello["rank"]), \
            int(hello["pid"])
        self.send_lock = threading.Lock()
        self.ring = rings.Ring(ring_bytes)
        self.fd, self.mem = rings.create(ring_bytes, f"imagenet_seq-ring-{self.rank}")
        self.request: Optional[sweep.Request] = None
        self.pending: List[Tuple[int, int, int, int]] = []  # refs not yet announced
        self.pending_req = -1  # the request they belong to
        self.bye = False
        self.told = False  # its FAIL is sent: nothing more goes to it
        self.id = 0  # the reader numbers connections

    def name(self) -> str:
        return f"local rank {self.local} (rank {self.rank}, pid {self.pid})"

    def send(self, kind: bytes, head: Optional[dict] = None, payload=b"", fds=()) -> None:
        with self.send_lock:
            if self.told:
                raise _Failed()
            wire.send(self.sock, kind, head, payload, fds)


class _Gone(Exception):
    def __init__(self, rank: _Rank, error: OSError):
        super().__init__(str(error))
        self.rank, self.error = rank, error


class NodeReader:
    """Serves the ranks of one node (see the module docstring). ``cfg``: ``key`` (the socket
    name), ``path`` and ``split`` (the file, or a sharded split's manifest), ``shard_dirs``
    and ``shard_devices`` (optional: as the rank's ``SplitReader``), ``local_world_size``,
    ``ring_bytes``, ``parent`` (the starting rank's pid), ``connect_timeout``."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.local_world = int(cfg["local_world_size"])
        self.ring_bytes = int(cfg.get("ring_bytes", rings.RING_BYTES))
        # the rank's split: one file, or a manifest whose shards are found as the rank found
        # them (shard_dirs) and read one reader per device group (shard_devices)
        self.reader = SplitReader(cfg["path"], cfg["split"], check_split=False,
                                  shard_dirs=cfg.get("shard_dirs", ()),
                                  shard_devices=_grouping(cfg.get("shard_devices")))
        st = os.stat(self.reader.path)
        self.file_id = [st.st_dev, st.st_ino]
        self.ranks: Dict[int, _Rank] = {}  # by connection (a rank with two Loaders: two)
        self._next_id = 0
        self.plan_id: Optional[dict] = None  # what every rank must agree on
        self.cond = threading.Condition()
        self.version = 0  # bumped whenever the set of requests changes
        self.sel = selectors.DefaultSelector()
        self.listener: Optional[socket.socket] = None
        self.ever_connected = False
        self.seen: set = set()  # local ranks answered (welcomed, or refused)
        self.failure: Optional[dict] = None  # the first fault, told by the control loop
        self._wake, self._waker = socket.socketpair()  # a fault found by the sweep thread

    # ----------------------------------------------------------------------------- control
    def serve(self) -> int:
        self.listener = self._bind()
        if self.listener is None:
            return EXIT_IN_USE
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.sel.register(self._wake, selectors.EVENT_READ)
        self._sweeper = threading.Thread(target=self._sweep_thread, daemon=True,
                                         name="imagenet_seq-node-sweep")
        self._sweeper.start()
        start = time.monotonic()
        try:
            while True:
                if self.failure is not None:
                    raise _Failed()
                if not self.ever_connected:
                    if os.getppid() != int(self.cfg["parent"]) or \
                            time.monotonic() - start > float(self.cfg["connect_timeout"]):
                        return 0  # the rank that started us is gone, or nobody came
                for sel_key, _ in self.sel.select(timeout=0.2):
                    if sel_key.fileobj is self.listener:
                        self._accept()
                    elif sel_key.fileobj is not self._wake:  # the wake: a fault, seen above
                        self._on_message(sel_key.data)
                if self.ever_connected and not self.ranks and self.failure is None:
                    return 0
        except _Failed:
            self._tell_and_linger()
            return 1  # not reached: it exits

    def _bind(self) -> Optional[socket.socket]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 5.0  # a reader that is exiting frees the name soon
        while True:
            try:
                sock.bind(wire.address(self.cfg["key"]))
                sock.listen(64)
                return sock
            except OSError:
                if time.monotonic() > deadline:
                    sock.close()
                    return None
                time.sleep(0.05)

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            if wire.peer_uid(conn) != os.getuid():
                raise ValueError("another user's process")  # abstract names are not private
            conn.settimeout(_HELLO_S)
            kind, hello, _, fds = wire.recv(conn)
            for fd in fds:
                os.close(fd)
            if kind != wire.HELLO:
                raise ValueError(f"expected HELLO, got {kind!r}")
            problem = self._check_hello(hello)
            node_linger.heard(self.seen, hello, self.local_world)  # welcomed or refused
            if problem:
                wire.send(conn, wire.FAIL, {"error": "NodeReaderError", "message": problem})
                conn.close()
                return
            rank = _Rank(conn, hello, self.ring_bytes)
            conn.settimeout(_SEND_S)
            rank.send(wire.WELCOME, {"ring_bytes": self.ring_bytes, "pid": os.getpid()},
                      fds=[rank.fd])
            os.close(rank.fd)
        except (OSError, ValueError, KeyError, wire.Closed):
            conn.close()  # not a rank of ours, or one that died while saying hello
            return
        with self.cond:
            self._next_id += 1
            rank.id = self._next_id
            self.ranks[rank.id] = rank
        self.ever_connected = True
        self.sel.register(conn, selectors.EVENT_READ, rank)

    def _check_hello(self, hello: dict) -> Optional[str]:
        local, plan = int(hello["local"]), hello["plan"]
        if int(hello["local_world_size"]) != self.local_world or not 0 <= local < \
                self.local_world:
            return (f"local rank {local} of {hello['local_world_size']} asked a node reader of "
                    f"{self.local_world} ranks; every rank of a node must pass the same "
                    "local world size")
        if hello["file"] != self.file_id:
            return (f"this node reader reads {self.reader.path}, not {hello['path']}: the ranks "
                    "of one node must read the same file")
        other = next((r for r in self.ranks.values()
                      if r.local == local and r.pid != int(hello["pid"])), None)
        if other is not None:
            return (f"local rank {local} is already connected ({other.name()}): another job "
                    "on this node uses the same job key; give each job its own key (torchrun "
                    "does: TORCHELASTIC_RUN_ID), or turn the node reader off with "
                    "IMAGENET_SEQ_NODE_READER=0")
        if self.plan_id is None:
            self.plan_id = plan
        elif plan != self.plan_id:
            diff = sorted(k for k in set(plan) | set(self.plan_id)
                          if plan.get(k) != self.plan_id.get(k))
            return (f"local rank {local} plans its epochs with "
                    f"{ {k: plan.get(k) for k in diff} }, the node's other ranks with "
                    f"{ {k: self.plan_id.get(k) for k in diff} }: every rank of a job must "
                    "create its Loader with the same arguments")
        return None

    def _on_message(self, rank: _Rank) -> None:
        try:
            kind, head, payload, fds = wire.recv(rank.sock)
        except (wire.Closed, OSError, ValueError):
            if rank.bye:
                return
            self._fatal(f"{rank.name()} ended without closing its Loader (killed, or it "
                        "crashed); the node reader stops", skip=rank)
        for fd in fds:
            os.close(fd)
        if kind == wire.FREE:
            with self.cond:
                if int(head["upto"]) > rank.ring.head:
                    self._fatal(f"{rank.name()} freed ring bytes up to {head['upto']}, past "
                                f"the {rank.ring.head} placed; the node reader stops")
                rank.ring.free(int(head["upto"]))
                self.cond.notify_all()
        elif kind == wire.READ:
            pieces = np.frombuffer(payload, "<i8").reshape(-1, 3)
            problem = sweep.check_pieces(pieces, len(self.reader))
            if problem:
                self._fatal(f"{rank.name()} asked for {problem}; the node reader stops")
            with self.cond:
                if rank.request is not None:
                    rank.request.cancelled = True
                rank.request = sweep.Request(rank, int(head["req"]), pieces) \
                    if len(pieces) else None
                self.version += 1
                self.cond.notify_all()
            if not len(pieces):
                rank.send(wire.DONE, {"req": int(head["req"])})
        elif kind == wire.CANCEL:
            with self.cond:
                if rank.request is not None and rank.request.id == int(head["req"]):
                    rank.request.cancelled = True
                    self.version += 1
                    self.cond.notify_all()
        elif kind == wire.BYE:
            self.sel.unregister(rank.sock)
            with self.cond:
                rank.bye = True
                if rank.request is not None:
                    rank.request.cancelled = True
                del self.ranks[rank.id]
                self.version += 1
                self.cond.notify_all()
            rank.sock.close()
            if not self.ranks and self.listener is not None:
                self.sel.unregister(self.listener)
                self.listener.close()  # no new rank joins a reader about to exit
                self.listener = None

    def _fatal(self, message: str, skip: Optional[_Rank] = None, error: Optional[dict] = None,
               culprit: Optional[int] = None) -> None:
        """Record the fault (the first one counts) for the control loop to tell every rank
        (:meth:`_tell_and_linger`), and stop the calling thread's work: raises ``_Failed``."""
        with self.cond:
            if self.failure is None:
                self.failure = dict(message=message, skip=skip, error=error, culprit=culprit)
                sys.stderr.write(f"imagenet_seq node reader (pid {os.getpid()}): {message}\n")
                sys.stderr.flush()
                try:
                    self._waker.send(b"!")  # the control loop may be waiting in select
                except OSError:
                    pass
            self.cond.notify_all()
        raise _Failed()

    def _tell_and_linger(self) -> None:
        """(The control loop, after a fault.) ``FAIL`` to every connected rank (the rank of a
        damaged record gets its error, the others a ``NodeReaderError`` naming it); then the
        same answer to each local rank that connects late (see the module docstring); then
        exit (the kernel frees rings and sockets)."""
        f = self.failure
        told = {"error": "NodeReaderError", "message": f["message"]}
        self.sel.unregister(self._wake)
        with self.cond:
            ranks = list(self.ranks.values())
        for rank in ranks:
            try:
                self.sel.unregister(rank.sock)  # a rank's BYE or end is no news any more
            except (KeyError, ValueError):
                pass
            if rank is f["skip"]:
                continue
            head = dict(f["error"] or told)
            if f["culprit"] is not None and rank.local != f["culprit"]:
                head = told
            if rank.send_lock.acquire(timeout=5.0):
                try:
                    rank.told = True
                    rank.sock.settimeout(5.0)
                    wire.send(rank.sock, wire.FAIL, head)
                except OSError:
                    pass
                finally:
                    rank.send_lock.release()
        if self.listener is not None and not node_linger.everyone(self.seen, self.local_world):
            # waiting costs no memory: once the sweep has stopped, rings and file go
            self._sweeper.join(timeout=_BYE_S)
            if not self._sweeper.is_alive():
                for rank in ranks:
                    try:
                        rank.mem.close()
                    except (BufferError, ValueError):
                        pass
                    rank.sock.close()
                self.reader.close()
            node_linger.linger(self.listener, told, self.seen, self.local_world,
                               float(self.cfg["connect_timeout"]), self.cfg.get("launcher"))
        sys.stderr.flush()
        os._exit(1)

    # ------------------------------------------------------------------------------- sweep
    def _sweep_thread(self) -> None:
        try:
            while True:
                with self.cond:
                    self._gather()
                    plan = sweep.merge(sorted(self._active(),
                                              key=lambda q: (q.owner.local, q.owner.id)))
                    version = self.version
                try:
                    self._read(plan, version)
                except _Gone as e:
                    if not self._said_bye(e.rank):
                        self._fatal(f"{e.rank.name()} stopped taking messages ({e.error}); "
                                    "the node reader stops", skip=e.rank)
        except _Failed:
            return  # the control loop tells the ranks
        except BaseException as e:  # noqa: BLE001 - any failure ends the reader, told to all
            try:
                self._read_failed(e)
            except _Failed:
                return

    def _said_bye(self, rank: _Rank) -> bool:
        """After a send to ``rank`` failed: whether it said goodbye (it closed its Loader
        while a record or its DONE was on the way: the others are served on). Its request
        leaves the sweep; the control loop reads its last messages -- a ``BYE``, or a socket
        closed without one (killed: the control loop tells the others)."""
        with self.cond:
            if rank.request is not None:
                rank.request.cancelled = True
                self.version += 1
            deadline = time.monotonic() + _BYE_S
            while not rank.bye and self.failure is None and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            return rank.bye

    @staticmethod
    def _tell(rank: _Rank, kind: bytes, head: dict, payload=b"") -> None:
        try:
            rank.send(kind, head, payload)
        except OSError as e:
            raise _Gone(rank, e) from None

    def _gather(self) -> None:
        """Wait for a request; then, before the first read, up to ``GATHER_S`` for every
        connected rank's (ranks start an epoch at about the same time: one sweep from the
        start, rather than one rank's reads first and the others' catching up)."""
        while True:
            if self.failure is not None:
                raise _Failed()
            active = self._active()
            if not active:
                self.cond.wait()
                continue
            waited = time.monotonic() - min(q.t0 for q in active)
            if len(active) >= len(self.ranks) or waited >= GATHER_S:
                return
            self.cond.wait(GATHER_S - waited)

    def _active(self) -> List[sweep.Request]:
        return [r.request for r in self.ranks.values()
                if r.request is not None and not r.request.cancelled]

    def _read(self, plan: List[Tuple[sweep.Request, int, int]], version: int) -> None:
        items = self.reader.read_spans([(s, c) for _, s, c in plan])
        k, left = -1, 0
        try:
            for item in items:
                while not left:
                    k += 1
                    left = plan[k][2]
                left -= 1
                if not self._deliver(plan[k][0], item, version):
                    return
        finally:
            items.close()
            self._flush_all()

    def _deliver(self, req: sweep.Request, item: Tuple[int, bytes, int], version: int) -> bool:
        """Put one record into its rank's ring (waiting for room); False: plan again."""
        i, jpeg, label = item
        rank, n = req.owner, len(jpeg)
        if rank.pending_req != req.id:
            self._flush(rank)
            rank.pending_req = req.id
        big = not rank.ring.fits(n)
        while True:  # room: for a record in the ring, or (sent whole) an empty ring
            with self.cond:
                if self.failure is not None:
                    raise _Failed()
                if req.cancelled or self.version != version and rank.request is not req:
                    return False
                pos = None if big else rank.ring.place(n)
                room = rank.ring.used() == 0 if big else pos is not None
                if not room and not rank.pending:
                    self.cond.wait(0.5)
                    continue
            if room:
                break
            self._flush(rank)  # the rank must learn of what it has before it frees
        if big:  # at most one such record on its way to a rank: the ring bounds the rest
            self._flush(rank)
            self._tell(rank, wire.BIG, {"req": req.id, "record": int(i), "label": int(label)},
                       jpeg)
        else:
            at = pos % rank.ring.size
            rank.mem[at:at + n] = jpeg
            rank.pending.append((i, label, n, pos))
        req.delivered += 1
        if req.delivered == req.total:
            self._flush(rank)
            self._tell(rank, wire.DONE, {"req": req.id})
            with self.cond:
                if rank.request is req:
                    rank.request = None
            return self.version == version
        if len(rank.pending) >= FLUSH_ITEMS or req.at_piece_end():
            self._flush(rank)  # a piece ended: the rank gets its block now
        return self.version == version

    def _flush(self, rank: _Rank) -> None:
        if not rank.pending:
            return
        refs = np.array(rank.pending, dtype=wire.REFS)
        rank.pending = []
        try:
            rank.send(wire.ITEMS, {"req": rank.pending_req}, refs)
        except OSError:
            pass  # the control loop sees the rank gone and tells the others

    def _flush_all(self) -> None:
        for rank in list(self.ranks.values()):
            self._flush(rank)

    def _read_failed(self, e: BaseException) -> None:
        culprit = None
        head = {"error": type(e).__name__, "message": str(e)}
        if isinstance(e, fmt.RecordError):
            head.update(key=e.key.hex(), index=e.index)
            for rank in self.ranks.values():  # whose record it was, if a request holds it
                if rank.request is not None and rank.request.holds(e.index):
                    culprit = rank.local
        self._fatal(f"reading {self.reader.path} failed: {type(e).__name__}: {e}", error=head,
                    culprit=culprit)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the ranks; they tell us
    cfg = json.loads(argv[0])
    return NodeReader(cfg).serve()


if __name__ == "__main__":
    sys.exit(main())
