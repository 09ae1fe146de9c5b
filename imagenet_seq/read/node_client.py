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

Finding the reader (and starting it): :mod:`.rendezvous`.

Faults: the reader's ``FAIL`` (another rank died, a damaged record) or its socket closing (the
reader died) is raised by the next ``read_spans`` step -- within ``POLL_S`` while a read is in
progress -- and, at once from the client's receiving thread, written to stderr and passed to
``on_fault``; a process whose training loop does not take the error within the grace period
(``IMAGENET_SEQ_FAULT_GRACE_S``, a loop blocked in a collective) ends itself
(:mod:`.node_fault`).
"""
from __future__ import annotations

import atexit
import os
import queue
import socket
import threading
import weakref
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from imagenet_seq import format as fmt
from imagenet_seq.format import offsets as offsets_index
from imagenet_seq.plan import node as node_plan
from imagenet_seq.plan.order import DEFAULT_CHUNK_RECORDS
from imagenet_seq.read import node_fault, rendezvous
from imagenet_seq.read import ring as rings
from imagenet_seq.read import sweep, wire
from imagenet_seq.read.rendezvous import CONNECT_TIMEOUT_S, enabled, job_key
from imagenet_seq.read.wire import NodeReaderError

__all__ = ["NodeClient", "NodeReaderError", "enabled", "job_key"]

Item = Tuple[int, bytes, int]
POLL_S = 0.1  # a waiting read checks its stop event this often
_SUPERSEDED = ("this read was superseded by a newer one on the same node client (a Loader "
               "reads one pass at a time)")
_ERRORS = {"DamagedFile": fmt.DamagedFile, "StaleOffsets": offsets_index.StaleOffsets}

_clients: "weakref.WeakSet[NodeClient]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for c in list(_clients):  # a forked child must not hold its parent's connection open
        c._link.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _shutdown_all() -> None:
    for c in list(_clients):
        c.shutdown()


class _Link:
    """The connection and what its receiving thread shares with the reads. The thread holds
    this, not the client, so a client nobody uses any more is collected (and says goodbye)."""

    def __init__(self, sock: socket.socket, reader_pid: int, who: str, path: str,
                 on_fault: Optional[Callable[[BaseException], None]], grace: Optional[float]):
        self.sock, self.reader_pid, self.who, self.path = sock, reader_pid, who, path
        self.on_fault, self.grace = on_fault, grace
        self.error: Optional[BaseException] = None
        self.closed = False
        self.queue: "queue.Queue" = queue.Queue()
        self.send_lock = threading.Lock()
        self.thread = threading.Thread(target=self._receive, daemon=True,
                                       name="imagenet_seq-node-client")
        self.thread.start()

    def _receive(self) -> None:
        try:
            while True:
                kind, head, payload, fds = wire.recv(self.sock)
                for fd in fds:
                    os.close(fd)
                if kind == wire.FAIL:
                    self.error = _error_from(head)
                    break
                self.queue.put((kind, head, payload))
        except (wire.Closed, OSError, ValueError) as e:
            if not self.closed:
                self.error = NodeReaderError(
                    f"the node reader (pid {self.reader_pid}) for {self.path} ended without a "
                    f"word ({type(e).__name__}: killed?); {self.who} cannot read on")
        finally:
            self.queue.put(None)
        if self.error is not None and not self.closed:
            node_fault.fault(self.error, f"{self.who}, pid {os.getpid()}", self.grace)
            if self.on_fault is not None:
                self.on_fault(self.error)

    def next(self, stop: Optional[threading.Event], before_wait: Callable[[], None]):
        """The next message, or None once ``stop`` is set; raises the reader's error."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                msg = self.queue.get_nowait()
            except queue.Empty:
                before_wait()
                try:
                    msg = self.queue.get(timeout=POLL_S)
                except queue.Empty:
                    msg = ()
            if msg is None:
                self.queue.put(None)
                raise self.error or NodeReaderError("the node client was shut down")
            if msg:
                return msg
            if stop is not None and stop.is_set():
                return None

    def send(self, kind: bytes, head: Optional[dict] = None, payload=b"") -> None:
        try:
            with self.send_lock:
                wire.send(self.sock, kind, head, payload)
        except OSError as e:
            # the reader may have said why before it went: its FAIL is still to be read
            if threading.current_thread() is not self.thread:
                self.thread.join(timeout=5.0)
            if self.error is None:
                self.error = NodeReaderError(f"the node reader (pid {self.reader_pid}) for "
                                             f"{self.path} is gone ({type(e).__name__})")
            raise self.error from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with self.send_lock:
                wire.send(self.sock, wire.BYE)
        except OSError:
            pass
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=5.0)

    def forked(self) -> None:
        """In a forked child: drop the inherited connection without touching the parent's."""
        self.closed = True
        self.error = NodeReaderError("a node client cannot be used in a forked child; create "
                                     "the Loader in the child, or read without the node reader")
        try:
            os.close(self.sock.detach())
        except OSError:
            pass


class NodeClient:
    """One rank's connection to its node's reader (see the module docstring).

    ``close()`` is ``SplitReader.close()`` (a Loader calls it after each pass: it drops the
    file's descriptors, reopened on the next read); ``shutdown()`` says goodbye to the reader
    (it serves the other ranks on and exits after the last); a collected client, and every
    client at interpreter exit, shuts down by itself.

    Args:
        reader: this rank's :class:`SplitReader` (metadata, and reads outside the node plan).
        seed, shuffle, chunk_size: the plan's arguments (as the Loader's).
        rank, world_size: this rank's place in the job.
        local_world_size: ranks on this node (consecutive global ranks, torchrun's layout).
        job: the job key (default :func:`job_key`); ranks of one job must agree on it.
        ring_bytes: this rank's ring (the node holds ``local_world_size`` of them).
        on_fault: called with the error, from the receiving thread, when the reader reports a
            failure or dies (after the line on stderr; :mod:`.node_fault` ends the process if
            the training loop does not take the error in time).
        connect_timeout: seconds to wait for the reader to listen.

    Raises:
        ValueError: no offsets index in the file, a layout that is not torchrun's, or a bad
            ``IMAGENET_SEQ_FAULT_GRACE_S``.
    """

    def __init__(self, reader, *, rank: int, world_size: int, local_world_size: int,
                 seed: int = 0, shuffle: bool = True,
                 chunk_size: Optional[int] = DEFAULT_CHUNK_RECORDS, job: Optional[str] = None,
                 ring_bytes: int = rings.RING_BYTES,
                 on_fault: Optional[Callable[[BaseException], None]] = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        self.split_reader = reader
        if not reader.indexed:  # without it every small piece would be a B-tree walk of its own
            raise ValueError(
                f"{reader.path} has no offsets index (a file of the original tool, or of an "
                "old preprocess): the node reader needs it; add it with "
                f"`{offsets_index.rebuild_command(reader.path)}` (writes into the file), or "
                "read without the node reader: IMAGENET_SEQ_NODE_READER=0")
        grace = node_fault.grace_s()  # a bad value fails here, not at the first fault
        first = rank - rank % local_world_size
        self.local_ranks = range(first, first + local_world_size)
        node_plan.check_layout(world_size, self.local_ranks)
        self.local, self.rank, self.world_size = rank - first, rank, world_size
        self.plan_args = dict(num_records=len(reader), mode=reader.split, seed=seed,
                              world_size=world_size, shuffle=bool(shuffle),
                              chunk_size=chunk_size, local_world_size=local_world_size,
                              plan=node_plan.PLAN)
        self._req = 0
        self._current = -1  # the request a generator is reading
        self._freed = self._sent_free = 0
        st = os.stat(reader.path)
        self.key = rendezvous.reader_key(job if job is not None else job_key(), first,
                                         reader.path)
        hello = dict(local=self.local, rank=rank, pid=os.getpid(),
                     local_world_size=local_world_size, path=reader.path,
                     file=[st.st_dev, st.st_ino], plan=self.plan_args)
        start = dict(path=reader.path, split=reader.split, local_world_size=local_world_size,
                     ring_bytes=ring_bytes,
                     # a sharded split: its shards found and grouped as this rank's reader does
                     shard_dirs=list(getattr(reader, "shard_dirs", ())),
                     shard_devices=getattr(reader, "shard_devices", None))
        sock, self.ring, self.reader_pid, self._proc = rendezvous.connect(
            self.key, hello, start, connect_timeout)
        self._link = _Link(sock, self.reader_pid, f"local rank {self.local} (rank {rank})",
                           reader.path, on_fault, grace)
        _clients.add(self)

    # ------------------------------------------------------------------ SplitReader's face
    def __getattr__(self, name):  # path, meta, labels, checksums, read_range, ...
        if name.startswith("__") or name in ("split_reader", "_link"):
            raise AttributeError(name)
        return getattr(self.split_reader, name)

    def __len__(self) -> int:
        return len(self.split_reader)

    @property
    def error(self) -> Optional[BaseException]:
        """The reader's failure (another rank died, the reader died, a damaged record)."""
        return self._link.error

    def read_spans(self, spans: Sequence[Tuple[int, int]],
                   stop: Optional[threading.Event] = None) -> Iterator[Item]:
        """The records of ``spans`` in order, like ``SplitReader.read_spans``: through the
        node reader for node-plan spans, directly otherwise. Starting a read supersedes the
        one before (a Loader reads one pass at a time)."""
        if isinstance(spans, node_plan.EpochSpans):
            return self._taking(self._read_node(spans, stop))
        return self.split_reader.read_spans(spans, stop)

    def close(self) -> None:
        """As ``SplitReader.close()``: the file's descriptors go; the reader stays."""
        self.split_reader.close()

    def shutdown(self) -> None:
        """Say goodbye to the reader (idempotent); reads through it raise afterwards."""
        _clients.discard(self)
        self._link.close()
        self.split_reader.close()
        try:
            self.ring.close()
        except BufferError:
            pass

    def __del__(self):
        link = self.__dict__.get("_link")
        if link is not None and not link.closed:
            link.close()

    # ------------------------------------------------------------------------------ read
    @staticmethod
    def _taking(items: Iterator[Item]) -> Iterator[Item]:
        """``items``; an error leaving them in the training loop's own thread is taken (the
        Loader's reading thread hands it on to the loop's next batch, which takes it)."""
        try:
            yield from items
        except Exception as e:
            node_fault.raised(e)
            raise

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
            out.append((start + skip, count - skip, sweep.key(spans.epoch, index)))
            skip = 0
        got = node_plan.merge_spans([(s, c) for s, c, _ in out])
        if got != node_plan.merge_spans(list(spans)):
            raise ValueError(
                f"spans for epoch {spans.epoch} from position {spans.position} are not rank "
                f"{self.rank}'s node plan {node_plan.PLAN} with {self.plan_args}; build them "
                "with the same arguments as this client")
        return np.array(out, dtype="<i8").reshape(-1, 3)

    def _read_node(self, spans: node_plan.EpochSpans,
                   stop: Optional[threading.Event]) -> Iterator[Item]:
        link = self._link
        if link.error is not None:
            raise link.error
        if link.closed:
            raise NodeReaderError("read_spans on a node client that was shut down")
        pieces = self._pieces(spans)
        self._req += 1
        req = self._current = self._req
        link.send(wire.READ, {"req": req}, pieces)
        finished = False
        try:
            while True:
                msg = link.next(stop, self._flush_free)
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
            if not finished and not link.closed and link.error is None:
                try:
                    link.send(wire.CANCEL, {"req": req})
                except NodeReaderError:
                    pass
            if self._current == req:
                self._current = -1

    def _skip(self, refs: np.ndarray) -> None:
        if len(refs):
            self._free(int(refs[-1]["pos"] + refs[-1]["nbytes"]))

    def _free(self, upto: int) -> None:
        self._freed = max(self._freed, upto)
        if self._freed - self._sent_free >= len(self.ring) // 8:
            self._flush_free()

    def _flush_free(self) -> None:
        """Tell the reader what was copied out (before waiting: it may wait for room)."""
        if self._freed > self._sent_free and not self._link.closed:
            self._sent_free = self._freed
            self._link.send(wire.FREE, {"upto": self._freed})


def _error_from(head: dict) -> BaseException:
    """The reader's error as this process's exception: a record's error keeps its type."""
    name, message = head.get("error", ""), head.get("message", "")
    if name == "RecordError":
        return fmt.RecordError(message, bytes.fromhex(head.get("key", "")),
                               int(head.get("index", -1)))
    if name in _ERRORS:
        return _ERRORS[name](message)
    return NodeReaderError(message)
