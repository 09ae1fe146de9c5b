"""The process pool: N forked decode processes, shared-memory rings, results in batch order.

Raw JPEG bytes travel in one shared-memory slot per batch, decoded images come back in
another (no pickling of pixels). Workers get ``PR_SET_PDEATHSIG=SIGKILL`` so they die with the
trainer even after ``kill -9``. The kernel sends it when the *thread* that forked a worker
ends, so every worker is forked by one thread that lives as long as the process
(:func:`start_processes`), not by whichever thread called ``iter(loader)``. The processes
live as long as the pool (a Loader's): each batch carries its epoch, output size and pass.
"""
from __future__ import annotations

import ctypes
import gc
import mmap
import os
import queue
import signal
import threading
import traceback
from dataclasses import replace
from time import monotonic as _monotonic
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from imagenet_seq.decode.batch import DecodedBatch, DecodeSpec, RawBatch, RecordError, decode_batch

__all__ = ["SlotRing", "set_pdeathsig", "start_processes", "ProcessPool"]

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5


class SlotRing:
    """Fixed shared-memory slots made before the workers fork (they inherit the mapping).

    An anonymous ``MAP_SHARED`` mapping: no file, no name, nothing left behind after
    ``kill -9``. ``touch`` bytes at the start of every slot are written once at creation, so
    the memory a pool uses in steady state is there from its first batch (flat from epoch 1,
    instead of growing as batches cycle through the slots); the rest of a slot costs memory
    only once a batch needs it.
    """

    def __init__(self, slots: int, slot_bytes: int, touch: Optional[int] = None):
        self.slots, self.slot_bytes = slots, max(1, int(slot_bytes))
        self._mm = mmap.mmap(-1, self.slots * self.slot_bytes)
        self._view = np.frombuffer(self._mm, np.uint8)
        touch = self.slot_bytes if touch is None else min(self.slot_bytes, max(0, int(touch)))
        if touch:
            self._view.reshape(self.slots, self.slot_bytes)[:, :touch] = 0

    def slot(self, k: int) -> np.ndarray:
        return self._view[k * self.slot_bytes:(k + 1) * self.slot_bytes]

    def release(self) -> None:
        """Unmap now (not when a reference cycle is collected); views still held keep it."""
        self._view = np.empty(0, np.uint8)
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view: freed with the last one
            pass


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only)."""
    try:
        import prctl  # python-prctl

        prctl.set_pdeathsig(sig)
        return
    except ImportError:
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: rely on the parent's shutdown
        pass


class _Forker:
    """One daemon thread of this process that starts worker processes for any caller."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        threading.Thread(target=self._run, daemon=True, name="imagenet_seq-forker").start()

    def _run(self) -> None:
        while True:
            fn, done, out = self.jobs.get()
            try:
                out.append(fn())
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                out.append(e)
            done.set()

    def call(self, fn: Callable[[], Any]) -> Any:
        done, out = threading.Event(), []
        self.jobs.put((fn, done, out))
        done.wait()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]


_forker: Optional[_Forker] = None
_forker_lock = threading.Lock()


def start_processes(procs) -> None:
    """Start ``procs`` from this process's forker thread, which lives until the process ends:
    ``PR_SET_PDEATHSIG`` then fires when the trainer process dies (``kill -9`` included), not
    when the thread that asked for the workers ends."""
    global _forker
    # objects that are garbage but not yet collected must die here, not in a child: a child's
    # collector would run their finalisers without the threads they belong to (a dropped DALI
    # pipeline's __del__ then segfaults the worker at its first collection)
    gc.collect()
    with _forker_lock:
        if _forker is None or _forker.pid != os.getpid():  # a forked child needs its own
            _forker = _Forker()
    _forker.call(lambda: [p.start() for p in procs])


def _state(pid: int) -> str:
    """A process's state letter from /proc (``T``: stopped), or ``?``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _worker_main(in_q, out_q, spec: DecodeSpec, parent: int, rings, batch_size: int,
                 current) -> None:
    set_pdeathsig()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    spec.shared = True
    in_ring, out_ring = rings
    while True:
        raw = in_q.get()
        if raw is None:
            break
        if raw.run != current.value:  # a pass that ended (a `break`): answer, do not decode
            out_q.put(("stale", raw.run, raw.index))
            continue
        try:
            slot = raw.index % in_ring.slots
            if raw.slot >= 0:
                raw.data = in_ring.slot(raw.slot)[: raw.offsets[-1]]
            out, shape = None, spec.out_shape(batch_size, raw.image_size)
            if shape is not None and int(np.prod(shape)) <= out_ring.slot_bytes:
                out = torch.from_numpy(out_ring.slot(slot)[:int(np.prod(shape))]).view(shape)
            res = decode_batch(raw, spec, out)
            if out is not None:  # pixels stay in the ring
                res.images = ("slot", slot, len(res.targets), shape)
            res.targets = res.targets.numpy()  # a torch tensor would get its own shm file
            out_q.put(("ok", raw.run, res))
        except RecordError as e:
            out_q.put(("record", raw.run, raw.index, str(e), e.key, e.index))
        except BaseException as e:  # noqa: BLE001 - every failure reaches the parent
            out_q.put(("error", raw.run, raw.index,
                       f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        del raw


class ProcessPool:
    """``num_workers`` forked decode processes fed through one queue; results reordered.

    The processes live until ``close()`` (one fork per Loader, not per epoch); every batch
    carries its epoch, output size and pass number (``raw.run``). Batch ``i`` uses input and
    output slot ``i % slots`` of two shared rings, so at most ``slots`` batches may be in
    flight (the Loader's ``prefetch``). JPEG bytes and pixels never go through a pipe; only
    small descriptors do. Batches too large for a slot (a larger ``image_size`` than the rings
    were made for included), and transforms of unknown output size, fall back to pickling
    (torch shared-memory tensors).

    Args:
        spec: the per-record work.
        num_workers: processes.
        slots: batches in flight.
        batch_size: largest batch (sizes the output slots).
        in_slot_bytes: JPEG bytes one input slot holds.
        in_touch_bytes: bytes of each input slot to allocate at once (a typical batch).
        pin_memory: copy decoded batches out of the ring into pinned memory.
    """

    def __init__(self, spec: DecodeSpec, num_workers: int, slots: int = 4,
                 batch_size: int = 256, in_slot_bytes: int = 64 << 20, pin_memory: bool = False,
                 in_touch_bytes: int = 0):
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("fork")
        self._in = ctx.Queue()
        self._out = ctx.Queue()
        self._current = ctx.Value("q", 0, lock=False)  # the pass workers decode for
        self._ready: Dict[int, DecodedBatch] = {}
        self._closed = False
        self.broken = False
        self.pin_memory = pin_memory
        self.channels_last = spec.channels_last
        self.run = 0
        # answers still to come (any pass) = submitted - answered; one counter per thread
        self.submitted = self.answered = 0
        out_shape = spec.out_shape(batch_size)
        out_bytes = int(np.prod(out_shape)) if out_shape else 1
        self.in_ring = SlotRing(slots, in_slot_bytes, touch=in_touch_bytes)
        self.out_ring = SlotRing(slots, out_bytes)
        args = (self._in, self._out, spec, os.getpid(), (self.in_ring, self.out_ring),
                batch_size, self._current)
        self.procs = [ctx.Process(target=_worker_main, args=args,
                                  name=f"imagenet_seq-decode-{k}", daemon=True)
                      for k in range(num_workers)]
        start_processes(self.procs)

    def describe(self) -> str:
        """What the workers are doing, for a stall report."""
        stopped = [f"{p.name} (pid {p.pid})" for p in self.procs if _state(p.pid) in "tT"]
        if stopped:
            return (f"decode worker {', '.join(stopped)} is stopped (SIGSTOP, or a debugger); "
                    "resume it with `kill -CONT <pid>`")
        return f"{len(self.procs)} decode processes alive but no batch came back"

    def input_slot(self, index: int) -> Optional[Tuple[np.ndarray, int]]:
        """Where batch ``index``'s bytes go: (slot view, slot number)."""
        k = index % self.in_ring.slots
        return self.in_ring.slot(k), k

    def submit(self, raw: RawBatch) -> None:
        if raw.run != self.run:  # the first batch of a new pass
            self.run = self._current.value = raw.run
        if raw.slot >= 0:
            raw = replace(raw, data=None)  # the bytes are in the ring already
        self.submitted += 1
        self._in.put(raw)

    def _materialise(self, res: DecodedBatch) -> DecodedBatch:
        res.targets = torch.from_numpy(res.targets)
        if self.pin_memory:
            res.targets = res.targets.pin_memory()
        if isinstance(res.images, tuple):  # ("slot", k, n, shape): copy out, the slot is reused
            _, k, n, shape = res.images
            ring = torch.from_numpy(self.out_ring.slot(k)[:int(np.prod(shape))]).view(shape)[:n]
            images = torch.empty(ring.shape, dtype=torch.uint8, pin_memory=self.pin_memory)
            # one plain memcpy: torch's copy_ splits it over OpenMP threads that then spin
            np.copyto(images.numpy(), ring.numpy())
            res.images = images.permute(0, 3, 1, 2) if self.channels_last else images
        return res

    def _dead(self) -> None:
        for p in self.procs:
            if p.exitcode is not None:
                self.broken = True
                raise RuntimeError(
                    f"decode worker {p.name} (pid {p.pid}) died with exit code "
                    f"{p.exitcode} (killed, or out of memory?)")

    def get(self, index: int, check: Callable[[], None] = lambda: None) -> DecodedBatch:
        while index not in self._ready:
            try:
                msg = self._out.get(timeout=_POLL_S)
            except queue.Empty:
                check()
                self._dead()
                continue
            self.answered += 1
            if msg[1] != self.run or msg[0] == "stale":
                continue  # an answer for a pass that ended
            if msg[0] == "ok":
                self._ready[msg[2].index] = msg[2]
            elif msg[0] == "record":
                raise RecordError(msg[3], msg[4], msg[5])
            else:
                raise RuntimeError(f"decode worker failed on batch {msg[2]}: {msg[3]}")
        return self._materialise(self._ready.pop(index))

    def reset(self, timeout: float = 10.0) -> None:
        """End the current pass: the workers skip its queued batches, and this returns once
        every batch in flight has answered, so the next pass may reuse the ring slots. A
        worker that is stopped, dead or does not answer within ``timeout`` marks the pool
        ``broken`` (the caller replaces it)."""
        self._ready.clear()
        self._current.value = self.run = self.run + 1  # queued batches are now stale
        deadline = _monotonic() + timeout
        while self.submitted > self.answered and not self.broken:
            try:
                self._out.get(timeout=0.05)
                self.answered += 1
            except queue.Empty:
                if _monotonic() > deadline or any(
                        p.exitcode is not None or _state(p.pid) in "tTZ" for p in self.procs):
                    self.broken = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready.clear()
        # Workers hold nothing worth finishing: stop them now rather than after queued batches.
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=2.0)
        for q in (self._in, self._out):
            q.cancel_join_thread()
            q.close()
        if not any(p.is_alive() for p in self.procs):  # nobody writes into the rings now
            self.in_ring.release()
            self.out_ring.release()
