"""The two passes of a split's conversion (``writer`` runs them and owns the .partial's state).

Pass 1 (``pass1.read_pass``): ONE sweep over the sources (a folder's files in on-disk order,
an archive front to back), worker processes validate + normalise (``workers``), the records
fill a run buffer that is sorted by write key (``write_order.sort_key``) and written as one
sequential temporary file (``sort_runs``) by a thread (:class:`RunWriter`) while reading goes
on into the next run; each run is fsync'd, then listed in ``__progress__`` with the sweep's
cursor (how far the sweep got: no list over the files) and the skip records, in one
transaction. Pass 2 (:func:`merge_pass`): the runs merged by key into the LMDB (or the
shards, one after the other: ``shard_sink``), the merge order being the record index, each
commit storing the byte offset reached in every run. What the two need in space is checked
beforehand (``space``).
"""
from __future__ import annotations

import gc
import json
import os
import threading
from typing import Optional

from imagenet_seq.format import checksums
from imagenet_seq import format as fmt
# pass 1 (``pass1``) reaches Workers and results through this module (tests patch them here)
from imagenet_seq.convert.workers import WINDOW, Workers, WorkerError, results  # noqa: F401
from imagenet_seq.convert.scan import ScanLimit
from imagenet_seq.malloc import trim
from imagenet_seq.convert.sort_runs import RunBuffer, merge
from imagenet_seq.convert.source_reader import CHUNK_BYTES, QUEUE_CHUNKS

__all__ = ["COMMIT_RECORDS", "COMMIT_BYTES", "DEFAULT_MEMORY", "RUN_RECORDS", "MAX_RUNS",
           "ConversionError", "PROCESS_BYTES", "WORKER_BYTES", "PER_IMAGE_BYTES",
           "PER_RECORD_BYTES", "MIN_BUFFER",
           "fixed_bytes", "buffer_bytes", "scan_limit", "most_images", "least_memory_mb",
           "prepare_runs",
           "RunWriter", "settle_item", "merge_pass"]

COMMIT_RECORDS = 2000
COMMIT_BYTES = 64 << 20  # dirty pages of one transaction live in memory: bounds RSS
DEFAULT_MEMORY = 2_000_000_000
RUN_RECORDS: Optional[int] = None  # tests: runs of a few records, to cut a tiny split in many
MAX_RUNS = 500  # each is open during the merge (file descriptors; ulimit -n is often 1024)


class ConversionError(RuntimeError):
    """The conversion cannot go on; the message names the file or value and the fix."""


# Measured (benchmarks/convert_order.py, peak of RSS minus shared pages): the converter's own
# process ~64 MB with its libraries, each worker ~40 MB; a FOLDER's file list, its read order
# and the reader's item list ~600 bytes per image (Python tuples and strings). An archive has
# no per-image list (one sweep: ``pass1``); what grows with it is the label of each record of
# the shard being written (4 bytes, kept until that shard's last transaction), the shard's
# last steps (its offsets index: ``offsets.write`` peaks at 36 bytes per record of numpy
# arrays and bytes, measured with tracemalloc at 2 M records, + 12 bytes of LMDB's copy of
# the value; the labels' and checksums' arrays come before it and are smaller) and the
# sweep's state (class names, the paths of skipped files), small beside them. At 14 M records
# in one shard that last step alone is ~0.7 GB (benchmarks/results/convert_memory.md). The
# sweep itself holds a 1 MiB read piece (``tar_sweep.PIECE``: within PROCESS_BYTES' margin over
# the 64 MB measured) and its queue (``QUEUE_CHUNKS`` chunks, as a folder's reader).
PROCESS_BYTES = 80_000_000
WORKER_BYTES = 50_000_000
PER_IMAGE_BYTES = 600  # a folder's images (its scan)
PER_RECORD_BYTES = 52  # the records of the shard being written (labels + its index), any source
MIN_BUFFER = 64_000_000


def fixed_bytes(workers: int, images: int = 0, records: int = 0) -> int:
    """Memory besides the run / merge buffers: the processes themselves, one uncommitted
    transaction, the reader's queue, the chunks in flight to and from the workers
    (``convert_workers.WINDOW`` each), a folder's per-image lists (``images``: 0 for an
    archive) and the labels of the largest shard's ``records``."""
    return (PROCESS_BYTES + COMMIT_BYTES + QUEUE_CHUNKS * CHUNK_BYTES
            + max(1, workers) * (WORKER_BYTES + WINDOW * CHUNK_BYTES) + images * PER_IMAGE_BYTES
            + records * PER_RECORD_BYTES)


def least_memory_mb(workers: int, images: int = 0, records: int = 0) -> int:
    """The smallest ``--memory-mb`` for ``workers``, a folder's ``images`` and a shard of
    ``records``: the fixed part plus the smallest buffer (``MIN_BUFFER``)."""
    return (fixed_bytes(workers, images, records) + MIN_BUFFER) // 1_000_000 + 1


def scan_limit(memory: int, workers: int) -> ScanLimit:
    """The limit a folder's scans keep within ``memory`` (``--memory-mb``, bytes)."""
    return ScanLimit(memory, workers, most_images(memory, workers),
                     lambda n: least_memory_mb(workers, n), PER_IMAGE_BYTES)


def most_images(memory: int, workers: int) -> int:
    """The most images a folder's file list may hold within ``memory`` (bytes), beside the
    fixed part and the smallest buffer; 0 when ``memory`` is below even that."""
    return max(0, (memory - fixed_bytes(workers) - MIN_BUFFER) // PER_IMAGE_BYTES)


def buffer_bytes(memory: int, workers: int, images: int = 0, records: int = 0) -> int:
    """Run buffer (pass 1) = merge read buffers (pass 2): what ``memory`` leaves.

    Raises:
        ValueError: ``memory`` too small for the fixed part plus a 64 MB buffer.
    """
    rest = memory - fixed_bytes(workers, images, records)
    if rest < MIN_BUFFER:
        need = least_memory_mb(workers, images, records)
        raise ValueError(
            f"--memory-mb {memory // 1_000_000}; expected at least {need} with "
            f"--workers {workers}{f' and {images} images' if images else ''} "
            f"(processes, queues and file list: "
            f"{fixed_bytes(workers, images, records) // 1_000_000} MB)"
            + (f"; a folder's file list takes ~{PER_IMAGE_BYTES} bytes per image: pass "
               f"--memory-mb {need} or more, or convert from a tar of the folder or WebDataset "
               "shards, which keep no per-image list" if images else ""))
    return rest


def prepare_runs(run_dir: str, state: dict, partial: str, keys: bool = False) -> None:
    """Runs the resume state lists must be whole; any other file in ``run_dir`` is a run
    written after the last commit (or cut short): deleted, its records are read again.
    ``keys``: the listed runs' keys files (``<run>.keys``, written before the run) are kept."""
    os.makedirs(run_dir, exist_ok=True)
    listed = {name: size for name, _, size in state["runs"]}
    for name in os.listdir(run_dir):
        if name not in listed and not (keys and name.endswith(".keys")
                                       and name[:-len(".keys")] in listed):
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
        self.keys_path: Optional[str] = None  # its keys file too (a distributed conversion)
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

        def write():
            try:
                self._out.append((run, None, run.write(run.path) if run.keys_path is None
                                  else run.write(run.path, run.keys_path)))
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


def settle_item(decide, key: bytes, seq: int, origin: int, raw: int, replaced: bool,
                before: list) -> tuple:
    """One merged item's fate (``decide``: ``settle.decider``): (label to store or None,
    its report row or None). ``before``: [key, origin] of the item merged just before,
    updated here (a name met twice: the two are merged one after the other)."""
    rel = key[8:].decode("utf-8", "surrogateescape")  # write_order.sort_key
    label, why = decide(rel, raw, seq, origin, replaced,
                        before[1] if before[0] == key else None)
    before[:] = [key, origin]
    if why is None:
        return label, None
    row = {"path": rel, "reason": why, "seq": seq, "note": True}
    if label is not None:  # stored: a marker that earlier rows were replaced
        row["marker"] = True
    return label, row


def merge_pass(sink, state, run_dir, opts, progress, start_progress, images: int,
               decide, records: int = 0, stop: Optional[int] = None) -> None:
    """Pass 2: the runs merged by (key, sequence) into the shards, one after the other; the
    merge order is the record index.

    ``decide(rel, label, seq, origin, replaced, prev)`` -> (label to store, None) or (None,
    the report row's reason); ``prev``: the origin of the record merged just before when its
    key is the same (a name met before), else None: the labels a sweep could not know
    before its end (a tar's classes) and the copies an archive replaced (a name met again
    later, a nested tar replaced by a later one of its name) are settled here.

    ``sink`` (``shards.ShardSink``) is the shard being written: merged items before
    ``sink.end`` (counted over every run record, dropped copies included) go into
    ``sink.env``; the first one past it ends that shard (the next shard's ``.partial`` made
    first, then this shard's final transaction, then ``seal``). Every commit stores the
    runs' offsets with its records (a resume continues from them). ``records``: the most
    records of one shard (their labels are held: ``PER_RECORD_BYTES`` each). ``stop``: the
    merge position to end at (a distributed conversion writes one shard: ``dist_split``);
    the runs' offsets in ``state`` then start at that shard's first item."""
    state["phase"] = "merge"
    # pass 1's freed records sit on CPython's free lists, keeping its arenas mapped (809 MB
    # at the merge's start at 1.28 M small images, 43 MB after a collection): returned first
    gc.collect()
    trim()
    state.setdefault("offsets", [0] * len(state["runs"]))
    state.setdefault("merged", state.get("written", 0))
    total = sum(r[1] for r in state["runs"]) if stop is None else stop
    if start_progress:
        start_progress(total, state["merged"], "merge")
    crcs = checksums.Log(sink.local(state["written"]))  # records before it: committed
    paths = [os.path.join(run_dir, r[0]) for r in state["runs"]]
    sink.load_labels()
    # the labels of the shard being written are held until its last transaction
    merge_bytes = max(1, buffer_bytes(opts.memory, opts.workers, images)
                      - records * PER_RECORD_BYTES)  # read_buffer: a floor per run
    txn = sink.env.begin(write=True)
    pending_n = pending_b = 0
    # key and origin of the item merged last (kept in the state: a resume between two copies
    # of a name still knows the first)
    last = state.get("last_merged")
    before = [bytes.fromhex(last[0]), last[1]] if last else [None, None]

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

    items = merge(paths, state["offsets"], merge_bytes)
    try:
        for key, seq, origin, payload, i, after, replaced in items:
            if stop is not None and state["merged"] >= stop:
                break  # the next shard's first item
            while state["merged"] >= sink.end:  # a shard whose images were all dropped: empty
                payload = bytes(payload)  # one record's copy: its read buffer outlives nothing
                end_shard()
            state["merged"] += 1
            state["offsets"][i] = after
            (raw,) = fmt.RECORD_HEADER.unpack_from(payload, 0)
            label, row = settle_item(decide, key, seq, origin, raw, replaced, before)
            state["last_merged"] = [key.hex(), origin]
            if row is not None:
                txn.put(fmt.skip_key(state["skipped"]), json.dumps(row).encode())
                state["skipped"] += 1
            if label is None:
                nbytes = 0
            else:
                if label != raw:  # settled here (a tar's classes): the header rewritten
                    if not isinstance(payload, bytearray) and (
                            not isinstance(payload, memoryview) or payload.readonly):
                        payload = bytearray(payload)
                    fmt.RECORD_HEADER.pack_into(payload, 0, label)
                txn.put(fmt.record_key(sink.local(state["written"])), payload)
                crcs.add(payload)  # checksum while the bytes are in hand (checksums.py)
                sink.labels.append(label)
                state["written"] += 1
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
        if state["merged"] != total:
            raise ConversionError(f"internal: merged {state['merged']} of {total} records; "
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
        items.close()
        if txn is not None:
            txn.abort()
