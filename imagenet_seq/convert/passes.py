"""The two passes of a split's conversion (``writer`` runs them and owns the .partial's state).

Pass 1 (:func:`read_pass`): ONE reader thread reads the files not yet done in on-disk order
(``source_reader``), worker processes validate + normalise (``convert_workers``), the records
fill a run buffer that is sorted by plan position and written as one sequential temporary file
(``sort_runs``) by a thread (:class:`RunWriter`) while reading goes on into the next run; each
run is fsync'd, then listed in ``__progress__`` with the bitmap of plan positions done (its
records count only from then on) and the skip records, in one transaction. Pass 2
(:func:`merge_pass`): the runs merged by position into the LMDB (or the shards, one after the
other: ``shard_sink``), each commit storing the byte offset reached in every run. What the two
need in space is checked beforehand (``space``).
"""
from __future__ import annotations

import base64
import json
import os
import threading
from typing import Optional

import numpy as np

from imagenet_seq.format import checksums
from imagenet_seq import format as fmt
from imagenet_seq.convert.workers import WINDOW, Workers, WorkerError, results
from imagenet_seq.malloc import trim
from imagenet_seq.convert.sort_runs import RunBuffer, merge
from imagenet_seq.convert.source_reader import CHUNK_BYTES, QUEUE_CHUNKS, Reader

__all__ = ["COMMIT_RECORDS", "COMMIT_BYTES", "DEFAULT_MEMORY", "RUN_RECORDS", "MAX_RUNS",
           "ConversionError", "PROCESS_BYTES", "WORKER_BYTES", "PER_IMAGE_BYTES", "MIN_BUFFER",
           "fixed_bytes", "buffer_bytes", "pack", "unpack", "prepare_runs",
           "RunWriter", "read_pass", "merge_pass"]

COMMIT_RECORDS = 2000
COMMIT_BYTES = 64 << 20  # dirty pages of one transaction live in memory: bounds RSS
DEFAULT_MEMORY = 2_000_000_000
RUN_RECORDS: Optional[int] = None  # tests: runs of a few records, to cut a tiny split in many
MAX_RUNS = 500  # each is open during the merge (file descriptors; ulimit -n is often 1024)


class ConversionError(RuntimeError):
    """The conversion cannot go on; the message names the file or value and the fix."""


# Measured (benchmarks/convert_order.py, peak of RSS minus shared pages): the converter's own
# process ~64 MB with its libraries, each worker ~40 MB; the file list, its read order and the
# reader's item list ~600 bytes per image (Python tuples and strings).
PROCESS_BYTES = 80_000_000
WORKER_BYTES = 50_000_000
PER_IMAGE_BYTES = 600
MIN_BUFFER = 64_000_000


def fixed_bytes(workers: int, images: int = 0) -> int:
    """Memory besides the run / merge buffers: the processes themselves, one uncommitted
    transaction, the reader's queue, the chunks in flight to and from the workers
    (``convert_workers.WINDOW`` each) and the per-image lists."""
    return (PROCESS_BYTES + COMMIT_BYTES + QUEUE_CHUNKS * CHUNK_BYTES
            + max(1, workers) * (WORKER_BYTES + WINDOW * CHUNK_BYTES) + images * PER_IMAGE_BYTES)


def buffer_bytes(memory: int, workers: int, images: int = 0) -> int:
    """Run buffer (pass 1) = merge read buffers (pass 2): what ``memory`` leaves.

    Raises:
        ValueError: ``memory`` too small for the fixed part plus a 64 MB buffer.
    """
    rest = memory - fixed_bytes(workers, images)
    if rest < MIN_BUFFER:
        need = (fixed_bytes(workers, images) + MIN_BUFFER) // 1_000_000 + 1
        raise ValueError(f"--memory-mb {memory // 1_000_000}; expected at least {need} with "
                         f"--workers {workers}{f' and {images} images' if images else ''} "
                         f"(processes, queues and file list: "
                         f"{fixed_bytes(workers, images) // 1_000_000} MB)")
    return rest


def pack(done: np.ndarray) -> str:
    return base64.b64encode(np.packbits(done).tobytes()).decode()


def unpack(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8), count=n).astype(bool)


def prepare_runs(run_dir: str, state: dict, partial: str) -> None:
    """Runs the resume state lists must be whole; any other file in ``run_dir`` is a run
    written after the last commit (or cut short): deleted, its records are read again."""
    os.makedirs(run_dir, exist_ok=True)
    listed = {name: size for name, _, size in state["runs"]}
    for name in os.listdir(run_dir):
        if name not in listed:
            os.remove(os.path.join(run_dir, name))
    for name, size in listed.items():
        path = os.path.join(run_dir, name)
        got = os.path.getsize(path) if os.path.exists(path) else None
        if got != size:
            raise ConversionError(
                f"{path} is {'missing' if got is None else f'{got} bytes, not {size}'}: the "
                f"temporary runs of {partial} were changed; pass --overwrite to start over")


class _Run(RunBuffer):
    """A run being gathered, with what its records add to the resume state once it is on
    disk (until then a kill loses them, so the state must not count them)."""

    def __init__(self, max_bytes: int, max_records: Optional[int], classes: int):
        super().__init__(max_bytes, max_records)
        self.path: Optional[str] = None  # its file, once handed to the RunWriter
        self.class_counts = [0] * classes
        self.bytes = self.converted = 0


class RunWriter:
    """Writes a full run in a thread while pass 1 goes on reading into the next one: the
    source disk does not idle while a run is written and fsync'd (~6 s per 0.9 GB run on an
    HDD, ~170 times for ImageNet). The memory bound holds for both together: the write
    releases records as they reach the file (``RunBuffer.write``), and the run being filled is
    full when it and the rest of the one being written reach the budget. One write at a time;
    :meth:`wait` returns the finished run or raises its OSError."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._out: list = []
        self._run: Optional[_Run] = None
        self.path: Optional[str] = None  # of the run written last (named in its error)

    def pending_bytes(self) -> int:
        """Bytes the run being written still holds (0 when none is)."""
        run = self._run
        return run.nbytes if run is not None else 0

    def start(self, run: _Run) -> None:
        """Write ``run`` to ``run.path``."""
        assert self._thread is None, "wait() for the previous run first"
        self._run, self.path = run, run.path
        positions = [item[0] for item in run.items]

        def write():
            try:
                self._out.append((run, positions, run.write(run.path)))
            except BaseException as e:  # OSError (full disk), MemoryError: the caller's
                self._out.append(e)
            # the records were allocated by the reader's and the main thread (their malloc
            # arenas): give them back, or the next runs / the merge pile on top (+140 MB)
            trim()
        self._thread = threading.Thread(target=write, daemon=True,
                                        name="imagenet_seq-convert-run-writer")
        self._thread.start()

    def busy(self) -> bool:
        return self._thread is not None

    def wait(self, timeout: Optional[float] = None):
        """(run, its positions, (records, bytes)) of the write in flight, None if none or
        still running at ``timeout``. Raises what the write raised."""
        if self._thread is None:
            return None
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        self._thread = self._run = None
        got = self._out.pop()
        if isinstance(got, BaseException):
            raise got
        return got


def read_pass(env, source, plan, read_order, state, run_dir, opts, res, progress,
               start_progress) -> None:
    """Pass 1: every plan position not yet done, read in ``read_order``, into sorted runs."""
    done = unpack(state["done"], len(plan))
    todo = [p for p in read_order if not done[p]]
    if start_progress:
        start_progress(len(plan), len(plan) - len(todo), "read")
    run_bytes = buffer_bytes(opts.memory, opts.workers, len(plan))  # filling + writing
    classes = len(state["class_counts"])
    run = _Run(run_bytes, RUN_RECORDS, classes)
    writer = RunWriter()
    workers = Workers(opts.workers) if opts.workers > 0 and todo else None
    reader = (Reader(source, [(p, plan[p][0], plan[p][1]) for p in todo], opts.read_ahead)
              if todo else None)
    txn = env.begin(write=True)
    pending = 0

    def commit(written=None):
        """The progress record, with the run just written (if any), in one transaction."""
        nonlocal txn, pending
        if written is not None:
            done_run, positions, (n, size) = written
            state["runs"].append([os.path.basename(done_run.path), n, size])
            done[positions] = True
            for k, c in enumerate(done_run.class_counts):
                state["class_counts"][k] += c
            state["bytes"] += done_run.bytes
            state["converted"] += done_run.converted
        state["done"] = pack(done)
        txn.put(fmt.PROGRESS_KEY, json.dumps(state).encode())
        txn.commit()
        txn = env.begin(write=True)
        pending = 0

    def finish_write(timeout=None) -> bool:
        """Commit the run in flight once written; False if it is still being written."""
        if not writer.busy():
            return True
        try:
            got = writer.wait(timeout)
        except OSError as e:
            raise ConversionError(
                f"cannot write the temporary run {writer.path}: {e.strerror or e}; free "
                f"space in {run_dir} (or pass --tmp DIR on a disk with room), then run again "
                "with --resume") from None
        if got is None:
            return False
        commit(got)
        return True

    def hand_over():
        nonlocal run
        finish_write()  # one write at a time: the memory bound holds two runs
        run.path = os.path.join(run_dir, f"run-{len(state['runs']):05d}")
        writer.start(run)
        run = _Run(run_bytes, RUN_RECORDS, classes)

    try:
        for pos, status, payload, note in (results(source.describe(""), reader, opts.max_size,
                                                   opts.quality, workers) if todo else ()):
            rel, label = plan[pos]
            nbytes = 0
            if status == "error":
                raise ConversionError(payload)
            if status == "skip":
                if opts.strict:
                    raise ConversionError(
                        f"{source.describe(rel)}: {payload} (--strict stops at the "
                        "first broken file; remove or fix it, or run without --strict to "
                        "skip and report it)")
                txn.put(fmt.skip_key(state["skipped"]),
                        json.dumps({"path": rel, "reason": payload, "pos": pos}).encode())
                state["skipped"] += 1
                res.skipped.append((rel, payload))
                done[pos] = True  # its record is in this transaction
                pending += 1
            else:  # payload: the JPEG to store; the run writes the record header before it
                run.add(pos, payload, fmt.RECORD_HEADER.pack(label))
                run.class_counts[label] += 1
                nbytes = len(payload)
                run.bytes += nbytes
                run.converted += note is not None
            if progress:
                progress(1, nbytes, state["skipped"])
            if run.full():
                hand_over()
            elif writer.busy():
                # the memory bound: wait for the write when the run being filled and what the
                # one being written still holds reach it (reading faster than the run disk);
                # otherwise commit the written run as soon as it is on disk
                finish_write(None if run.nbytes + writer.pending_bytes() >= run_bytes else 0)
        if run.items:
            hand_over()
        finish_write()
        if pending:
            commit()
    except WorkerError as e:
        raise ConversionError(str(e)) from None
    finally:
        if workers is not None:
            workers.close()  # first: kill, never wait for their cooperation
        if reader is not None:
            reader.close()
        if txn is not None:
            txn.abort()  # a no-op after the last checkpoint's fresh transaction
    if not done.all():
        raise ConversionError(f"internal: {int((~done).sum())} images not read; run again "
                              "with --resume")


def merge_pass(sink, state, run_dir, opts, progress, start_progress, images: int) -> None:
    """Pass 2: the runs merged by plan position into the shards, one after the other.

    ``sink`` (``shards.ShardSink``) is the shard being written: records of plan positions
    before ``sink.end`` go into ``sink.env``; the first one past it ends that shard
    (``sink.hand_over`` the progress to the next shard, then this shard's final transaction:
    checksums, ``sink.finish``; then ``sink.seal``) and goes into the next. Every commit
    stores the runs' offsets with its records (a resume continues from them)."""
    state.pop("done", None)  # pass 1 is over: no need to carry the bitmap in every commit
    state["phase"] = "merge"
    state.setdefault("offsets", [0] * len(state["runs"]))
    total = sum(r[1] for r in state["runs"])
    if start_progress:
        start_progress(total, state["written"], "merge")
    crcs = checksums.Log(sink.local(state["written"]))  # records before it: committed
    paths = [os.path.join(run_dir, r[0]) for r in state["runs"]]
    txn = sink.env.begin(write=True)
    pending_n = pending_b = 0

    def end_shard():
        """The shard's last transaction (a kill leaves either its progress or its
        metadata), then the next shard's first."""
        nonlocal txn, crcs, pending_n, pending_b
        if not sink.last:
            sink.hand_over(txn)
        crcs.finish(txn, sink.local(state["written"]))
        sink.finish(txn)
        txn.commit()
        txn = None
        sink.seal()
        if sink.env is not None:
            crcs = checksums.Log(0)
            txn = sink.env.begin(write=True)
            pending_n = pending_b = 0

    try:
        for pos, payload, i, after in merge(paths, state["offsets"],
                                            buffer_bytes(opts.memory, opts.workers, images)):
            if pos >= sink.end:
                payload = bytes(payload)  # one record's copy: its read buffer outlives nothing
                while pos >= sink.end:  # a shard whose images were all skipped: empty
                    end_shard()
            txn.put(fmt.record_key(sink.local(state["written"])), payload)
            crcs.add(payload)  # checksum while the bytes are in hand (checksums.py)
            state["written"] += 1
            state["offsets"][i] = after
            nbytes = len(payload) - fmt.RECORD_HEADER.size
            state["shard"]["bytes"] += nbytes
            pending_n += 1
            pending_b += nbytes
            if progress:
                progress(1, nbytes, state["skipped"])
            if pending_n >= COMMIT_RECORDS or pending_b >= COMMIT_BYTES:
                txn.put(fmt.PROGRESS_KEY, json.dumps(state).encode())
                crcs.commit(txn)  # with their records: a resume keeps them
                txn.commit()
                txn = sink.env.begin(write=True)
                pending_n = pending_b = 0
        if state["written"] != total:
            raise ConversionError(f"internal: merged {state['written']} of {total} records; "
                                  "run again with --overwrite")
        while txn is not None:  # this shard and any (empty) after it
            end_shard()
    except ValueError as e:  # a run cut short (sort_runs.RunReader)
        if isinstance(e, fmt.DamagedFile):
            raise
        raise ConversionError(f"{e}: the temporary runs of "
                              f"{sink.layout.partial(sink.index)} were changed; pass "
                              "--overwrite to start over") from None
    finally:
        if txn is not None:
            txn.abort()
