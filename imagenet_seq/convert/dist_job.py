"""The processes of a distributed conversion (``torchrun ... -m imagenet_seq.convert``) and how
they wait for, watch and tell each other.

torch.distributed gives the rank, the world size and the job's key-value store (the TCPStore
``init_process_group("gloo")`` connects to; torchrun's agent hosts it). Everything else goes
through that store, polled by Python, never a C++ collective a process could hang in:

* :meth:`DistJob.barrier` waits until every rank has reached the same named point;
* a watcher thread beats (``beat/<rank>`` every :data:`BEAT_S`), publishes this rank's
  progress, and looks at the others: an error one of them published (:meth:`DistJob.fail`:
  a full disk, a bad archive, with its message) or a rank whose beat stopped for
  ``IMAGENET_SEQ_DIST_GRACE_S`` seconds (default :data:`GRACE_S`: killed, its node gone)
  stops this process at once with :class:`PeerFailed` naming the rank (delivered as a
  signal to the main thread, so a read or a write in progress is interrupted too);
* rank 0 shows the whole job's progress (images/s, MB/s, ETA over every rank).

Nothing waits without a bound: ``init_process_group`` gives up after
``IMAGENET_SEQ_DIST_TIMEOUT_S`` (default 600 s: every process must have started by then); a
barrier waits as long as every rank is alive (a pass may take hours), no longer.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from datetime import timedelta
from typing import Callable, Dict, List, Optional

__all__ = ["GRACE_S", "BEAT_S", "PeerFailed", "is_distributed", "DistJob"]

GRACE_S = 15.0
BEAT_S = 1.0
_PREFIX = "imagenet_seq/"
_WAKE = signal.SIGUSR2  # the watcher's signal to its own main thread


class PeerFailed(KeyboardInterrupt):
    """Another rank failed (or this one was told to stop): the conversion stops everywhere;
    what every rank committed is kept for ``--resume``."""


def is_distributed() -> bool:
    """Launched by torchrun (or anything setting its variables) with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}; expected seconds, e.g. {default:g}") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r}; expected seconds above 0")
    return value


class DistJob:
    """This process's place in the job: ``rank``, ``world``, the store, the watcher."""

    def __init__(self):
        import torch.distributed as dist
        self.grace = _env_float("IMAGENET_SEQ_DIST_GRACE_S", GRACE_S)
        timeout = _env_float("IMAGENET_SEQ_DIST_TIMEOUT_S", 600.0)
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.host = socket.gethostname()
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        self._dist = dist
        self.store = dist.distributed_c10d._get_default_store()
        self.failed: Optional[str] = None  # why this process must stop (another rank's fault)
        self.counts: Dict[str, object] = {"phase": "start", "images": 0, "bytes": 0}
        self.show: Optional[Callable[[List[dict]], None]] = None  # rank 0's progress display
        self._stop = threading.Event()
        self._old = signal.signal(_WAKE, self._wake) \
            if threading.current_thread() is threading.main_thread() else None
        self._main = os.getpid()
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name="imagenet_seq-dist-watch")
        self._thread.start()

    # -- telling the others
    def fail(self, message: str) -> None:
        """Publish this rank's error: every other rank stops within a beat, naming it."""
        text = f"rank {self.rank} ({self.host}, pid {os.getpid()}): {message}"
        try:
            self.store.compare_set(_PREFIX + "error", "", text)
        except Exception:  # the store is gone too: the launcher reports the exit
            pass

    def error(self) -> Optional[str]:
        """The first error a rank published, if any."""
        try:
            if self.store.check([_PREFIX + "error"]):
                return self.store.get(_PREFIX + "error").decode()
        except Exception:
            return None
        return None

    def barrier(self, name: str) -> None:
        """Return once every rank called ``barrier(name)``; :class:`PeerFailed` as soon as a
        rank fails or stops beating."""
        key = _PREFIX + "at/" + name
        self.store.add(key, 1)
        while True:
            if self.failed:
                raise PeerFailed(self.failed)
            if self.store.add(key, 0) >= self.world:
                return
            time.sleep(0.05)

    # -- the watcher
    def _wake(self, signum, frame):
        if self.failed:
            raise PeerFailed(self.failed)

    def _stopped(self, why: str) -> None:
        self.failed = why
        if self._old is not None:
            os.kill(self._main, _WAKE)

    def _watch(self) -> None:
        seen: Dict[int, tuple] = {}  # rank -> (beat, when it last changed)
        beats = [_PREFIX + f"beat/{r}" for r in range(self.world)]
        progs = [_PREFIX + f"prog/{r}" for r in range(self.world)]
        start = time.monotonic()
        while not self._stop.wait(BEAT_S):
            try:
                self.store.add(beats[self.rank], 1)
                self.store.set(progs[self.rank], json.dumps(self.counts))
                err = self.error()
                if err is not None and not err.startswith(f"rank {self.rank} ("):
                    self._stopped(f"stopped because {err}")
                    return
                now = time.monotonic()
                have = [r for r in range(self.world) if r != self.rank]
                for r, raw in zip(have, self.store.multi_get([beats[r] for r in have])
                                  if self.store.check([beats[r] for r in have]) else
                                  [None] * len(have)):
                    beat = int(raw) if raw else 0
                    last = seen.get(r)
                    if last is None or last[0] != beat:
                        seen[r] = (beat, now)
                    elif now - last[1] > self.grace and now - start > self.grace:
                        self._stopped(
                            f"stopped because rank {r} stopped answering: no sign of life "
                            f"for {self.grace:g} s (killed, or its node is gone; "
                            "IMAGENET_SEQ_DIST_GRACE_S sets the wait)")
                        return
                if self.show is not None:
                    got = self.store.multi_get(progs) if self.store.check(progs) else []
                    self.show([json.loads(g) for g in got])
            except Exception as e:  # the store (torchrun's agent, or rank 0's node) is gone
                if self._stop.is_set():
                    return
                self._stopped(f"stopped because the job's store is gone ({e}): the launcher "
                              "or the node of rank 0 failed")
                return

    def close(self) -> None:
        """Stop the watcher; leave the process group (a clean exit for torchrun)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self._old is not None:
            signal.signal(_WAKE, self._old)
        try:
            self._dist.destroy_process_group()
        except Exception:
            pass

