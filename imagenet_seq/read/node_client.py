"""A rank's side of the node reader: a drop-in for :class:`~imagenet_seq.read.reader.SplitReader`
whose node-plan reads come from the node's one reader (:mod:`.node_reader`) through shared memory.

``NodeClient(split_reader, ...)`` answers everything a ``SplitReader`` does (``path``, ``meta``,
``labels``, ``checksums``, ``read_range`` ...) from the wrapped reader; ``read_spans(spans,
stop)`` yields the same ``(record, jpeg bytes, label)`` items in the same order:

* spans the node plan gave (:class:`~imagenet_seq.plan.node.EpochSpans`, which carry their
  epoch and position) go through the node reader: the client turns them into its pieces of the
  node sweep, keyed by ``(epoch, place in the sweep)``, and copies each record out of its ring
  as it yields it;
* any other spans (a resumed shuffle buffer's few records, a dataset's ``__getitem__``) are
  read directly with the wrapped reader.

Rendezvous: every local rank of one job, node and file computes the same abstract socket name
from the job key (:func:`job_key`: the launcher's pid and start time, torchrun's run id and
restart count, SLURM's job and step), the node's first rank and the file's device and inode. A
rank that cannot connect and wins the right to start one (a second abstract name, bound by one
process at a time) starts the reader; the others retry until it listens. No files: nothing is
left behind whatever dies, and a restarted job (a new key) never meets a live job's reader.

Faults: the reader's ``FAIL`` (another rank died, a damaged record) or its socket closing (the
reader died) is raised by the next ``read_spans`` step -- within ``POLL_S`` while a read is in
progress -- and passed to ``on_fault`` at once from the client's receiving thread.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import weakref
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from imagenet_seq import format as fmt
from imagenet_seq.format import offsets as offsets_index
from imagenet_seq.plan import node as node_plan
from imagenet_seq.plan.order import DEFAULT_CHUNK_RECORDS
from imagenet_seq.read import ring as rings
from imagenet_seq.read import wire
from imagenet_seq.read.node_reader import EXIT_IN_USE

__all__ = ["NodeClient", "NodeReaderError", "enabled", "job_key", "CONNECT_TIMEOUT_S"]

Item = Tuple[int, bytes, int]
#: How long a rank waits for the node's reader to listen (other ranks may start late).
CONNECT_TIMEOUT_S = 120.0
POLL_S = 0.1  # a waiting read checks its stop event this often
_SUPERSEDED = ("this read was superseded by a newer one on the same node client (a Loader "
               "reads one pass at a time)")
_ERRORS = {"DamagedFile": fmt.DamagedFile, "StaleOffsets": offsets_index.StaleOffsets}


class NodeReaderError(RuntimeError):
    """The node reader, or another rank of the node, failed; the message says which."""


def enabled(local_world_size: int, requested: Optional[bool] = None) -> bool:
    """Whether a Loader should read through a node reader: ``requested`` (an argument) wins,
    then ``IMAGENET_SEQ_NODE_READER`` (``0``: per-rank readers as before); never for a node
    of one rank."""
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
    """This job on this machine, the same in every local rank: the launcher (torchrun's agent,
    ``mp.spawn``'s parent, ``slurmstepd``) is every local rank's parent; its pid with its start
    time is unique on the machine, and the launchers' own ids are added where set."""
    ppid = os.getppid()
    parts = [str(ppid), _start_time(ppid)] + [
        os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                                        "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
                                        "SLURM_STEP_ID")]
    return "/".join(parts)


_clients: "weakref.WeakSet[NodeClient]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for c in list(_clients):  # a forked child must not hold its parent's connection open
        c._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_all() -> None:
    for c in list(_clients):
        c.close()


class NodeClient:
    """One rank's connection to its node's reader (see the module docstring).

    Args:
        reader: this rank's :class:`SplitReader` (metadata, and reads outside the node plan).
        num_records, mode, seed, shuffle, chunk_size: the plan's arguments (as the Loader's).
        rank, world_size: this rank's place in the job.
        local_world_size: ranks on this node (consecutive global ranks, torchrun's layout).
        job: the job key (default :func:`job_key`); ranks of one job must agree on it.
        ring_bytes: this rank's ring (the node holds ``local_world_size`` of them).
        on_fault: called with the error, from the receiving thread, when the reader reports a
            failure or dies (e.g. to stop a step blocked in a collective).
        connect_timeout: seconds to wait for the reader to listen.
    """

    def __init__(self, reader, *, rank: int, world_size: int, local_world_size: int,
                 seed: int = 0, shuffle: bool = True,
                 chunk_size: Optional[int] = DEFAULT_CHUNK_RECORDS, job: Optional[str] = None,
                 ring_bytes: int = rings.RING_BYTES,
                 on_fault: Optional[Callable[[BaseException], None]] = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        self.split_reader = reader
        first = rank - rank % local_world_size
        self.local_ranks = range(first, first + local_world_size)
        node_plan.check_layout(world_size, self.local_ranks)
        self.local, self.rank, self.world_size = rank - first, rank, world_size
        self.plan_args = dict(num_records=len(reader), mode=reader.split, seed=seed,
                              world_size=world_size, shuffle=bool(shuffle),
                              chunk_size=chunk_size, local_world_size=local_world_size,
                              plan=node_plan.PLAN)
        self.on_fault = on_fault
        self.error: Optional[BaseException] = None
        self._queue: "queue.Queue" = queue.Queue()
        self._send_lock = threading.Lock()
        self._req = 0
        self._current = -1  # the request a generator is reading
        self._freed = self._sent_free = 0
        self._closed = False
        self._proc: Optional[subprocess.Popen] = None
        st = self._stat = os.stat(reader.path)
        ident = dict(uid=os.getuid(), job=job if job is not None else job_key(),
                     node=first, file=[st.st_dev, st.st_ino])
        self.key = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
        self._sock, self.ring, self.reader_pid = self._connect(ring_bytes, connect_timeout)
        self._receiver = threading.Thread(target=self._receive, daemon=True,
                                          name="imagenet_seq-node-client")
        self._receiver.start()
        _clients.add(self)

    # ------------------------------------------------------------------ SplitReader's face
    def __getattr__(self, name):  # path, meta, labels, checksums, read_range, __len__ ...
        if name.startswith("__") or name == "split_reader":
            raise AttributeError(name)
        return getattr(self.split_reader, name)

    def __len__(self) -> int:
        return len(self.split_reader)

    def read_spans(self, spans: Sequence[Tuple[int, int]],
                   stop: Optional[threading.Event] = None) -> Iterator[Item]:
        """The records of ``spans`` in order, like ``SplitReader.read_spans``: through the
        node reader for node-plan spans, directly otherwise. Starting a read supersedes the
        one before (a Loader reads one pass at a time)."""
        if isinstance(spans, node_plan.EpochSpans):
            return self._read_node(spans, stop)
        return self.split_reader.read_spans(spans, stop)

    # --------------------------------------------------------------------------- connect
    def _hello(self) -> dict:
        return dict(local=self.local, rank=self.rank, pid=os.getpid(),
                    local_world_size=len(self.local_ranks), path=self.split_reader.path,
                    file=[self._stat.st_dev, self._stat.st_ino],
                    plan=self.plan_args)

    def _connect(self, ring_bytes: int, timeout: float):
        deadline = time.monotonic() + timeout
        starter: Optional[socket.socket] = None
        try:
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(wire.address(self.key))
                    if wire.peer_uid(sock) != os.getuid():
                        sock.close()
                        raise NodeReaderError(
                            f"another user's process listens on this job's node reader name "
                            f"({self.key}); IMAGENET_SEQ_NODE_READER=0 reads without it")
                    wire.send(sock, wire.HELLO, self._hello())
                    kind, head, _, fds = wire.recv(sock)
                except (ConnectionRefusedError, FileNotFoundError, wire.Closed,
                        ConnectionResetError):
                    sock.close()  # none listens yet (or one was exiting): start one, or wait
                else:
                    if kind == wire.WELCOME and len(fds) == 1:
                        return sock, rings.attach(fds[0], int(head["ring_bytes"])), \
                            int(head["pid"])
                    sock.close()
                    for fd in fds:
                        os.close(fd)
                    raise NodeReaderError(head.get("message", f"unexpected {kind!r}"))
                if self._proc is None and starter is None:
                    starter = self._try_start(ring_bytes)
                if self._proc is not None and self._proc.poll() not in (None, EXIT_IN_USE):
                    raise NodeReaderError(
                        f"the node reader this rank started (pid {self._proc.pid}) for "
                        f"{self.split_reader.path} exited with status {self._proc.returncode} "
                        "before it listened; its error is above on this process's stderr; "
                        "IMAGENET_SEQ_NODE_READER=0 reads without it")
                if time.monotonic() > deadline:
                    raise NodeReaderError(
                        f"no node reader for {self.split_reader.path} after {timeout:.0f} s "
                        f"(local rank {self.local} of {len(self.local_ranks)}): a local rank "
                        "starts it when it creates its Loader; does every local rank create "
                        "this Loader? IMAGENET_SEQ_NODE_READER=0 reads without it")
                time.sleep(0.02)
        finally:
            if starter is not None:
                starter.close()

    def _try_start(self, ring_bytes: int) -> Optional[socket.socket]:
        """Start the reader if this process wins the start right (an abstract name only one
        process can bind); returns the bound name, held until this rank is connected."""
        starter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            starter.bind(wire.address(self.key + "/start"))
        except OSError:
            starter.close()
            return None
        cfg = dict(key=self.key, path=self.split_reader.path, split=self.split_reader.split,
                   local_world_size=len(self.local_ranks), ring_bytes=ring_bytes,
                   parent=os.getpid(), connect_timeout=CONNECT_TIMEOUT_S)
        # the reader imports this very package, wherever this process found it
        home = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [home] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "imagenet_seq.read.node_reader", json.dumps(cfg)],
            stdin=subprocess.DEVNULL, close_fds=True, env=env)
        threading.Thread(target=self._proc.wait, daemon=True,  # reaped when it ends
                         name="imagenet_seq-node-reader-wait").start()
        return starter

    # --------------------------------------------------------------------------- receive
    def _receive(self) -> None:
        try:
            while True:
                kind, head, payload, fds = wire.recv(self._sock)
                for fd in fds:
                    os.close(fd)
                if kind == wire.FAIL:
                    self.error = _error_from(head)
                    break
                self._queue.put((kind, head, payload))
        except (wire.Closed, OSError, ValueError) as e:
            if not self._closed:
                self.error = NodeReaderError(
                    f"the node reader (pid {self.reader_pid}) for {self.split_reader.path} "
                    f"ended without a word ({type(e).__name__}: killed?); local rank "
                    f"{self.local} (rank {self.rank}) cannot read on")
        finally:
            self._queue.put(None)
        if self.error is not None and self.on_fault is not None and not self._closed:
            self.on_fault(self.error)

    def _next(self, stop: Optional[threading.Event]):
        """The next message, or None once ``stop`` is set; raises the reader's error."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                msg = self._queue.get_nowait()
            except queue.Empty:
                self._flush_free(force=True)  # before waiting: the reader may wait for room
                try:
                    msg = self._queue.get(timeout=POLL_S)
                except queue.Empty:
                    msg = ()
            if msg is None:
                self._queue.put(None)
                raise self.error or NodeReaderError("the node client is closed")
            if msg:
                return msg
            if stop is not None and stop.is_set():
                return None

    def _free(self, upto: int) -> None:
        self._freed = max(self._freed, upto)
        self._flush_free()

    def _flush_free(self, force: bool = False) -> None:
        if self._freed > self._sent_free and (
                force or self._freed - self._sent_free >= len(self.ring) // 8):
            self._sent_free = self._freed
            self._send(wire.FREE, {"upto": self._freed})

    def _send(self, kind: bytes, head: dict, payload=b"") -> None:
        with self._send_lock:
            try:
                wire.send(self._sock, kind, head, payload)
            except OSError as e:
                # the reader may have said why before it went: its FAIL is still to be read
                if threading.current_thread() is not self._receiver:
                    self._receiver.join(timeout=5.0)
                if self.error is None:
                    self.error = NodeReaderError(
                        f"the node reader (pid {self.reader_pid}) for "
                        f"{self.split_reader.path} is gone ({type(e).__name__})")
                raise self.error from None

    # ------------------------------------------------------------------------------ read
    def _pieces(self, spans: node_plan.EpochSpans) -> np.ndarray:
        a = self.plan_args
        plan = node_plan.node_plan(a["num_records"], a["mode"], seed=a["seed"],
                                   epoch=spans.epoch, world_size=a["world_size"],
                                   local_ranks=self.local_ranks, shuffle=a["shuffle"],
                                   chunk_size=a["chunk_size"])
        out, skip = [], spans.position
        for start, count, index in plan.pieces(self.local):
            if skip >= count:
                skip -= count
                continue
            out.append((start + skip, count - skip, (spans.epoch << 32) | index))
            skip = 0
        got = node_plan._merge([(s, c) for s, c, _ in out])
        if got != node_plan._merge(list(spans)):
            raise ValueError(
                f"spans for epoch {spans.epoch} from position {spans.position} are not rank "
                f"{self.rank}'s node plan {node_plan.PLAN} with {self.plan_args}; build them "
                "with the same arguments as this client")
        return np.array(out, dtype="<i8").reshape(-1, 3)

    def _read_node(self, spans: node_plan.EpochSpans,
                   stop: Optional[threading.Event]) -> Iterator[Item]:
        if self._closed:
            raise NodeReaderError("read_spans on a closed node client")
        if self.error is not None:
            raise self.error
        pieces = self._pieces(spans)
        self._req += 1
        req = self._current = self._req
        self._send(wire.READ, {"req": req}, pieces)
        finished = False
        try:
            while True:
                msg = self._next(stop)
                if msg is None:
                    return
                if self._current != req:
                    raise NodeReaderError(_SUPERSEDED)
                kind, head, payload = msg
                mine = head.get("req") == req
                if kind == wire.ITEMS:
                    refs = np.frombuffer(payload, wire.REFS)
                    for k in range(len(refs)):
                        record, label, n, pos = (int(v) for v in refs[k])
                        if mine:
                            at = pos % len(self.ring)
                            data = self.ring[at:at + n]
                        self._free(pos + n)
                        if mine:
                            yield record, data, label
                            if self._current != req:
                                raise NodeReaderError(_SUPERSEDED)
                            if stop is not None and stop.is_set():
                                self._skip(refs[k + 1:])
                                return
                elif kind == wire.BIG and mine:
                    yield int(head["record"]), bytes(payload), int(head["label"])
                elif kind == wire.DONE and mine:
                    finished = True
                    return
        finally:
            if not finished and not self._closed and self.error is None:
                try:
                    self._send(wire.CANCEL, {"req": req})
                except NodeReaderError:
                    pass
            if self._current == req:
                self._current = -1

    def _skip(self, refs: np.ndarray) -> None:
        if len(refs):
            self._free(int(refs[-1]["pos"] + refs[-1]["nbytes"]))

    # ----------------------------------------------------------------------------- close
    def close(self) -> None:
        """Say goodbye (the reader serves the other ranks on, and exits after the last)."""
        if self._closed:
            return
        self._closed = True
        _clients.discard(self)
        try:
            with self._send_lock:
                wire.send(self._sock, wire.BYE)
        except OSError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._receiver.join(timeout=5.0)
        try:
            self.ring.close()
        except BufferError:
            pass

    def _forked(self) -> None:
        """In a forked child: drop the inherited connection without touching the parent's."""
        self._closed = True
        self.error = NodeReaderError("a node client cannot be used in a forked child; create "
                                     "the Loader in the child, or read without the node reader")
        try:
            os.close(self._sock.detach())
        except OSError:
            pass


def _error_from(head: dict) -> BaseException:
    """The reader's error as this process's exception: a record's error keeps its type."""
    name, message = head.get("error", ""), head.get("message", "")
    if name == "RecordError":
        return fmt.RecordError(message, bytes.fromhex(head.get("key", "")),
                               int(head.get("index", -1)))
    if name in _ERRORS:
        return _ERRORS[name](message)
    return NodeReaderError(message)
