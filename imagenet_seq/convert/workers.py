"""The converter's worker processes: validate + normalise chunks of source images' bytes.

The bytes come from ONE reader (``source_reader``), in on-disk order: workers never touch the
source disk, so their parallelism cannot turn its sequential reads into seeks.

Why not ``multiprocessing.Pool``: its task-handler thread blocks putting into a full queue once
the workers are gone, and ``Pool.terminate()`` joins that thread, so an error path (``--strict``,
a full disk) could hang forever. Here the writer's thread decides all feeding, one pipe per
worker, at most ``AHEAD`` chunks queued per worker; a sender thread per worker does the
(possibly blocking) sends, so the writer never waits on a busy worker. It waits on the result
pipes and the processes' sentinels together, so a dead worker is an error, not a hang.
Shutdown is SIGKILL + reap: the senders end with EPIPE once their worker is dead, so every
exit path ends in well under a second whatever the workers are doing.

Results come back in the order read; at most ``workers * WINDOW`` chunks are in flight or
waiting to be written (memory bound: that many chunks of at most ``source_reader.CHUNK_BYTES``
of source bytes, and their records).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import traceback
from collections import deque
from multiprocessing.connection import wait
from typing import Iterable, Iterator, List, Optional, Tuple

from imagenet_seq.convert.images import BrokenImage, normalise
from imagenet_seq.malloc import keep_decode_buffers

__all__ = ["AHEAD", "WINDOW", "Item", "Outcome", "WorkerError", "process_chunk", "Workers",
           "results"]

AHEAD = 2  # chunks queued per worker: one being processed, one ready to start
WINDOW = 8  # chunks per worker between the oldest unwritten one and the newest sent

Item = Tuple[str, int, object]  # (path relative to the split folder, label, bytes or verdict)
Outcome = Tuple[str, object, Optional[str]]  # (status 'ok'|'skip'|'error', payload, note)


class WorkerError(RuntimeError):
    """A worker died or failed; the message names the chunk's first file and the way out."""


def process_chunk(split_dir: str, items: List[Item], max_size: Optional[int],
                  quality: int) -> List[Outcome]:
    """Validate + normalise ``items`` (bytes read by ``source_reader``): one outcome per item.

    'ok' carries the JPEG to store, or None where it is the source bytes unchanged (most
    images: the caller still holds them, so they do not travel back through the pipe, ~90 KB
    and two copies saved per image); 'skip' the reason for the report (broken image, not a
    regular file), 'error' a message that stops the conversion (a file that exists but cannot
    be read: fixing it and resuming beats silently losing it).
    """
    out: List[Outcome] = []
    for rel, label, data in items:
        if not isinstance(data, bytes):  # the reader's verdict: ('skip'|'error', message)
            out.append((data[0], data[1], None))
            continue
        try:
            jpeg, note = normalise(data, max_size=max_size, quality=quality)
            out.append(("ok", None if jpeg is data else jpeg, note))
        except BrokenImage as e:
            out.append(("skip", str(e), None))
    return out


def _serve(conn, inherited) -> None:
    """Worker loop: chunk in, outcomes out, until ``None`` or the writer is gone."""
    for c in inherited:  # other workers' writer-side pipe ends: keep EOF detection working
        c.close()
    # Ctrl-C reaches the whole process group: the writer handles it and kills the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the writer's handler is not for workers
    # malloc tuned for image buffers (see .malloc). No OpenCV call here: after a fork, OpenCV's
    # thread pool (started by the parent) can deadlock on its lock (seen with cv2.setNumThreads).
    keep_decode_buffers()
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            cid, args = task
            try:
                result = ("done", process_chunk(*args))
            except BaseException:  # a bug, or memory: the writer reports it and stops
                result = ("crash", traceback.format_exc(limit=4))
            conn.send((cid, result))
    except (EOFError, OSError):  # the writer died (kill -9): nobody to report to, leave quietly
        return


def _send_all(conn, q) -> None:
    """Sender thread: jobs from ``q`` to one worker until ``None`` or the worker is gone."""
    while True:
        job = q.get()
        if job is None:
            return
        try:
            conn.send(job)
        except (OSError, ValueError):  # worker dead (EPIPE) or pipe closed: the writer sees it
            return


class Workers:
    """``n`` forked worker processes; use as a context manager (exit kills them).

    Fork: workers inherit imports. They never touch the writer's LMDB handle.
    """

    def __init__(self, n: int):
        ctx = mp.get_context("fork")
        self.conns, self.procs, self.feeds, self.senders = [], [], [], []
        try:
            for _ in range(n):
                mine, theirs = ctx.Pipe(duplex=True)
                p = ctx.Process(target=_serve, args=(theirs, list(self.conns) + [mine]),
                                daemon=True, name="imagenet_seq-convert")
                p.start()
                theirs.close()
                self.conns.append(mine)
                self.procs.append(p)
            # A chunk carries ~1 MiB of image bytes, more than a pipe holds: sent from the
            # writer's thread, it would block while the worker blocks sending its results
            # back (deadlock). One sender thread per worker sends; the writer only queues.
            # Started after the last fork: no child inherits a thread's half-held lock.
            for conn in self.conns:
                q: "queue.SimpleQueue" = queue.SimpleQueue()
                t = threading.Thread(target=_send_all, args=(conn, q), daemon=True,
                                     name="imagenet_seq-convert-feed")
                t.start()
                self.feeds.append(q)
                self.senders.append(t)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill and reap every worker at once: nothing here waits on a worker's cooperation."""
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for q in self.feeds:
            q.put(None)
        for p in self.procs:
            p.join(timeout=5)  # SIGKILL cannot be ignored: this is a reap, not a wait
        # a sender blocked in a write gets EPIPE now that its worker is dead; only then may
        # the pipe be closed (a thread writing to a closed, reused fd number would write into
        # whatever file got that number)
        for t in self.senders:
            t.join(timeout=5)
        if any(t.is_alive() for t in self.senders):
            self.procs, self.feeds, self.senders = [], [], []
            return  # leak the pipes rather than risk that write (the process is ending)
        for c in self.conns:
            c.close()
        self.procs, self.conns, self.feeds, self.senders = [], [], [], []

    def map_ordered(self, jobs: Iterable[tuple]) -> Iterator[List[Outcome]]:
        """``process_chunk(*job)`` for each job, yielded in job order.

        Raises:
            WorkerError: a worker died (killed, out of memory) or raised.
        """
        n = len(self.procs)
        jobs = enumerate(jobs)
        queued = [deque() for _ in range(n)]  # (chunk id, first path) per worker
        done, next_out, sent, exhausted = {}, 0, 0, False
        while True:
            while not exhausted and sent - next_out < n * WINDOW:
                w = min(range(n), key=lambda k: len(queued[k]))
                if len(queued[w]) >= AHEAD:
                    break
                try:
                    cid, args = next(jobs)
                except StopIteration:
                    exhausted = True
                    break
                first = os.path.join(args[0], args[1][0][0]) if args[1] else "?"
                self.feeds[w].put((cid, args))  # a dead worker shows as its sentinel below
                queued[w].append((cid, first))
                sent += 1
            if next_out in done:
                yield done.pop(next_out)
                next_out += 1
                continue
            if exhausted and next_out == sent:
                return
            busy = [w for w in range(n) if queued[w]]
            ready = wait([self.conns[w] for w in busy] + [self.procs[w].sentinel for w in busy])
            for w in busy:
                if self.conns[w] in ready:
                    try:
                        cid, (kind, payload) = self.conns[w].recv()
                    except (EOFError, OSError):
                        self._died(w, queued[w][0][1])
                    first = queued[w].popleft()[1]
                    if kind == "crash":
                        raise WorkerError(f"a converter worker failed on the chunk starting at "
                                          f"{first}:\n{payload}")
                    done[cid] = payload
                elif self.procs[w].sentinel in ready:
                    self._died(w, queued[w][0][1])

    def _died(self, w: int, first: str):
        p = self.procs[w]
        p.join(timeout=1)
        code = p.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise WorkerError(
            f"a converter worker died ({how}: killed, or out of memory?) while reading the "
            f"chunk starting at {first}; run again with --resume (fewer --workers if memory "
            "is short)")


def results(split_dir: str, chunks: Iterable[list], max_size: Optional[int], quality: int,
            workers: Optional[Workers]) -> Iterator[Tuple[int, str, object, Optional[str]]]:
    """(plan position, status, payload, note) for each item of ``chunks`` (``source_reader``
    chunks of (position, rel, label, bytes)), in the order they were read; an 'ok' payload is
    always the JPEG to store (the record without its header)."""
    sent: deque = deque()  # the chunks in flight: their bytes are the records of unchanged images

    def jobs():
        for chunk in chunks:
            sent.append(chunk)
            yield (split_dir, [c[1:] for c in chunk], max_size, quality)
    outs = (process_chunk(*j) for j in jobs()) if workers is None else workers.map_ordered(jobs())
    for outcomes in outs:
        for (pos, _, label, data), (status, payload, note) in zip(sent.popleft(), outcomes):
            yield pos, status, data if status == "ok" and payload is None else payload, note
