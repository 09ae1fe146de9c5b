"""A slow-device emulator: a read-only FUSE mirror of a folder served at a modelled HDD/NFS speed.

Usage (foreground; unmount with ``fusermount3 -u MOUNTPOINT`` or Ctrl-C)::

    python benchmarks/slowfs.py /data/lmdb /mnt/slow --device hdd [--seek-ms 8.0 ...]

From Python, :func:`mounted` starts the emulator in a child process, waits for the mount and
always unmounts it (and reaps the child) on exit, even when the body raises.

The cost models are pure classes (no FUSE, no clock): ``schedule(key, offset, size, now)``
returns the time the request completes, so they are unit-tested with made-up times. The FUSE
layer calls them under one lock and sleeps until the returned time, so the device's timeline,
not Python's speed, sets the throughput (the real read of the backing file overlaps the sleep).

Order of arrival (``--order``): the kernel numbers FUSE requests in the order it queues them,
as a block device receives its requests; the daemon's threads then race to Python, and a burst
of queued requests (read-ahead hinted with ``posix_fadvise``) reaches the models shuffled by a
few places. By default the models see the kernel's order (its request ids, read from libfuse);
``--order arrival`` keeps the order the threads got there. ``SLOWFS_TRACE=FILE`` logs one line
per read: ``arrival done offset size kernel_id path`` (times: ``time.monotonic()``; id -1 when
unknown).

Figures and their sources:

* HDD (7,200 rpm desktop/NAS drive, e.g. WD Red / Seagate IronWolf / Barracuda data sheets):
  average seek ~8 ms (read), average rotational latency = half a revolution at 7,200 rpm =
  60 s / 7,200 / 2 = 4.17 ms, sustained transfer ~150 MB/s (outer tracks ~200, inner ~100).
  One actuator: requests are served one at a time. A request starting at (or within
  ``near_bytes`` of) where the head is costs transfer only (the drive's track cache and
  read-ahead absorb small reordering of the kernel's readahead requests); any other request
  costs seek + rotation first. Metadata (open, stat) is assumed cached (optimistic for folders).
* HDD, arrival order (``--device hdd-fifo``, :class:`ArrivalHDDModel`): the same figures, but
  the pessimistic case: requests are served strictly in the order they arrive (the order the
  kernel queued them; no elevator, no NCQ), and any backward move or forward move beyond ``near_bytes`` (64 KiB) costs seek +
  rotation, the track cache included. Optionally layout-aware (``base``: where each file lies
  on the platter). A read-ahead that is only fast because the drive reorders it shows here.
* NFS over 1 GbE: 1 Gbit/s = 125 MB/s raw, ~110-117 MB/s of payload after Ethernet/IP/TCP/RPC
  headers (the figure commonly measured with ``dd`` over NFSv3/v4 on 1 GbE); per-request round
  trip ~0.2-0.5 ms on a LAN plus the server's storage (the original tool's "shared SSD NFS").
  Up to ``in_flight`` requests overlap (the Linux client keeps many RPC slots; readahead issues
  several requests at once); payload of all requests shares the one link. ``open`` costs one
  round trip (close-to-open consistency: the client revalidates attributes with GETATTR).
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import errno
import heapq
import json
import os
import subprocess
import sys
import threading
import time
from typing import Dict, Iterator, List, Optional

MB = 1_000_000
MAX_BACKGROUND = 1024  # FUSE readahead requests queued before the kernel drops more
LOOKAHEAD_S = 0.002  # work the emulated device commits to ahead of time (see _dispatch)


class HDDModel:
    """One actuator, seek + rotation on every non-contiguous request, fixed transfer rate.

    Args:
        seek_ms: average seek time.
        rotation_ms: average rotational latency (half a revolution).
        mb_per_s: sustained transfer rate (10^6 bytes/s).
        near_bytes: a request starting within this distance of the head (same file) needs no
            seek; a forward gap is paid as transfer (the platter still has to pass under the head).
    """

    name = "hdd"

    def __init__(self, seek_ms: float = 8.0, rotation_ms: float = 4.17, mb_per_s: float = 150.0,
                 near_bytes: int = 1 << 20, fifo_batch: int = 16):
        if seek_ms < 0 or rotation_ms < 0 or mb_per_s <= 0 or near_bytes < 0 or fifo_batch < 1:
            raise ValueError(f"HDD parameters seek_ms={seek_ms}, rotation_ms={rotation_ms}, "
                             f"mb_per_s={mb_per_s}, near_bytes={near_bytes}, fifo_batch="
                             f"{fifo_batch}; expected seek/rotation >= 0, mb_per_s > 0, "
                             "near_bytes >= 0, fifo_batch >= 1")
        self.fifo_batch = fifo_batch
        self.seek_s = seek_ms / 1000.0
        self.rotation_s = rotation_ms / 1000.0
        self.bytes_per_s = mb_per_s * MB
        self.near_bytes = near_bytes
        self.busy_until = 0.0
        self.head: Optional[tuple] = None  # (file key, byte offset under the head)
        self.streak = 0  # requests served in a row from near the head (see pick)
        self.seeks = 0
        self.requests = 0
        self.bytes = 0
        self.busy_s = 0.0

    @property
    def bandwidth(self) -> float:
        """Peak transfer rate in bytes/s (what a perfectly sequential reader gets)."""
        return self.bytes_per_s

    def open(self, key, now: float) -> float:
        """Completion time of opening ``key`` at ``now`` (metadata assumed cached: no cost)."""
        return now

    def schedule(self, key, offset: int, size: int, now: float) -> float:
        """Queue a read of ``size`` bytes at ``offset`` of file ``key``; return its completion time."""
        cost = 0.0
        gap = 0
        if self.head is not None and self.head[0] == key:
            gap = offset - self.head[1]
        if self.head is None or self.head[0] != key or abs(gap) > self.near_bytes:
            cost += self.seek_s + self.rotation_s
            self.seeks += 1
            new_head = offset + size
        else:
            # near the head: pay any forward gap as transfer; a request just behind the head
            # (readahead requests served out of order) comes from the drive's track cache
            cost += max(gap, 0) / self.bytes_per_s
            new_head = max(self.head[1], offset + size)
        cost += size / self.bytes_per_s
        start = max(now, self.busy_until)
        self.busy_until = start + cost
        self.busy_s += cost
        self.head = (key, new_head)
        self.requests += 1
        self.bytes += size
        return self.busy_until

    def pick(self, pending: List[tuple], now: float, expire_s: float = 0.5,
             fifo_batch: Optional[int] = None) -> int:
        """Which queued request the drive serves next: index into ``pending``.

        ``pending`` holds ``(key, offset, size, arrival_time)``. Like the kernel's mq-deadline
        scheduler in front of the drive's command queue: keep serving the request nearest at
        or after the head (no seek) for up to ``fifo_batch`` requests in a row; then, if the
        oldest request has waited past ``expire_s`` (mq-deadline's read_expire, 500 ms), serve
        it and start a new run there; with nothing near the head, serve the oldest.
        """
        fifo_batch = self.fifo_batch if fifo_batch is None else fifo_batch
        oldest = min(range(len(pending)), key=lambda i: pending[i][3])
        near = None
        if self.head is not None:
            key, pos = self.head
            best_d = None
            for i, (k, off, _, _) in enumerate(pending):
                if k == key and abs(off - pos) <= self.near_bytes:
                    d = off - pos if off >= pos else self.near_bytes + (pos - off)  # forward first
                    if best_d is None or d < best_d:
                        near, best_d = i, d
        expired = now - pending[oldest][3] > expire_s
        if near is not None and (self.streak < fifo_batch or not expired):
            self.streak += 1
            return near
        self.streak = 1
        return oldest

    def stats(self) -> Dict[str, float]:
        return {"device": self.name, "requests": self.requests, "bytes": self.bytes,
                "seeks": self.seeks, "busy_s": self.busy_s}


class ArrivalHDDModel(HDDModel):
    """The pessimistic HDD: requests served strictly in arrival order, and every move of the head
    but a short forward one is a positioning (seek + rotation).

    Where :class:`HDDModel` lets the drive pick the queued request nearest the head (the kernel's
    elevator and NCQ) and serves a request just behind the head from the track cache, this one
    never reorders: a request that arrives behind the head, or more than ``near_bytes`` ahead of
    it, pays seek + rotation even when the request the head wanted arrives a microsecond later.
    A real drive reorders only what is queued together; two readers that take turns submitting
    one file each get close to this model, not the other. A forward gap within ``near_bytes``
    is paid as transfer (the platter passes under the head).

    Args:
        seek_ms, rotation_ms, mb_per_s: as :class:`HDDModel`.
        near_bytes: the forward distance still read without positioning (default 64 KiB: less
            than one ImageNet file, ~110 KB, so skipping a file is a positioning; a 4 KiB block
            alignment or a tar header between two files is not).
        base: the layout: file key -> byte offset of the file on the platter, so files read in
            layout order are one stream; without it each file is its own region and moving to
            another file is a positioning. A key not in ``base`` lies far from every file.
    """

    name = "hdd-fifo"

    def __init__(self, seek_ms: float = 8.0, rotation_ms: float = 4.17, mb_per_s: float = 150.0,
                 near_bytes: int = 64 << 10, base: Optional[Dict[str, int]] = None):
        super().__init__(seek_ms, rotation_ms, mb_per_s, near_bytes)
        self.base = base
        self.far = max(base.values(), default=0) + (1 << 40) if base else 0

    def _at(self, key, offset: int) -> tuple:
        if self.base is None:
            return key, offset
        return "disk", self.base.get(key, self.far) + offset

    def schedule(self, key, offset: int, size: int, now: float) -> float:
        key, pos = self._at(key, offset)
        gap = pos - self.head[1] if self.head is not None and self.head[0] == key else -1
        if 0 <= gap <= self.near_bytes:
            cost = gap / self.bytes_per_s
        else:  # backward, far forward, another file without a layout, or the first request
            cost = self.seek_s + self.rotation_s
            self.seeks += 1
        cost += size / self.bytes_per_s
        start = max(now, self.busy_until)
        self.busy_until = start + cost
        self.busy_s += cost
        self.head = (key, pos + size)
        self.requests += 1
        self.bytes += size
        return self.busy_until

    def pick(self, pending: List[tuple], now: float, **kw) -> int:
        """The oldest request (``pending`` holds ``(key, offset, size, arrival_time)``): no
        reordering, whatever lies near the head."""
        return min(range(len(pending)), key=lambda i: pending[i][3])


class NFSModel:
    """Per-request round trip, a shared link, up to ``in_flight`` requests outstanding.

    A request waits for a free slot, spends one round trip (request out, server storage, first
    byte back), then its payload crosses the link, which carries one payload at a time.

    Args:
        rtt_ms: round trip per request, including the server's storage access.
        mb_per_s: payload bandwidth of the link (10^6 bytes/s).
        in_flight: requests outstanding at once.
        open_rtts: round trips charged per ``open`` (GETATTR for close-to-open consistency).
    """

    name = "nfs"

    def __init__(self, rtt_ms: float = 0.5, mb_per_s: float = 110.0, in_flight: int = 8,
                 open_rtts: int = 1):
        if rtt_ms < 0 or mb_per_s <= 0 or in_flight < 1 or open_rtts < 0:
            raise ValueError(f"NFS parameters rtt_ms={rtt_ms}, mb_per_s={mb_per_s}, "
                             f"in_flight={in_flight}, open_rtts={open_rtts}; expected rtt >= 0, "
                             "mb_per_s > 0, in_flight >= 1, open_rtts >= 0")
        self.rtt_s = rtt_ms / 1000.0
        self.bytes_per_s = mb_per_s * MB
        self.in_flight = in_flight
        self.open_rtts = open_rtts
        self.slots: List[float] = [0.0] * in_flight  # min-heap of times each slot frees up
        self.link_free = 0.0
        self.requests = 0
        self.bytes = 0
        self.opens = 0

    @property
    def bandwidth(self) -> float:
        return self.bytes_per_s

    def _take_slot(self, now: float) -> float:
        return max(now, heapq.heappop(self.slots))

    def open(self, key, now: float) -> float:
        self.opens += 1
        start = self._take_slot(now)
        done = start + self.open_rtts * self.rtt_s
        heapq.heappush(self.slots, done)
        return done

    def schedule(self, key, offset: int, size: int, now: float) -> float:
        start = self._take_slot(now)
        done = max(start + self.rtt_s, self.link_free) + size / self.bytes_per_s
        self.link_free = done
        heapq.heappush(self.slots, done)
        self.requests += 1
        self.bytes += size
        return done

    def pick(self, pending: List[tuple], now: float) -> int:
        """Requests go out in arrival order."""
        return min(range(len(pending)), key=lambda i: pending[i][3])

    def stats(self) -> Dict[str, float]:
        return {"device": self.name, "requests": self.requests, "bytes": self.bytes,
                "opens": self.opens}


NEAR_KB = {"hdd": 1024, "hdd-fifo": 64}  # --near-kb's default per model
ORDERS = ("kernel", "arrival")  # --order: what "the order requests arrive in" means


def make_model(args: argparse.Namespace):
    """The model named by ``--device`` with the command line's parameters."""
    near = (args.near_kb if args.near_kb is not None else NEAR_KB.get(args.device, 0)) * 1024
    if args.device == "hdd":
        return HDDModel(args.seek_ms, args.rotation_ms, args.mb_per_s or 150.0, near,
                        args.fifo_batch)
    if args.device == "hdd-fifo":
        return ArrivalHDDModel(args.seek_ms, args.rotation_ms, args.mb_per_s or 150.0, near)
    return NFSModel(args.rtt_ms, args.mb_per_s or 110.0, args.in_flight, args.open_rtts)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("hdd", "hdd-fifo", "nfs"), default="hdd",
                   help="hdd: the drive reorders queued requests (elevator + NCQ) and reads "
                        "small backward moves from its track cache; hdd-fifo: the pessimistic "
                        "HDD, strictly arrival order, any backward or far move a seek; nfs: "
                        "1 GbE NFS")
    p.add_argument("--mb-per-s", type=float, default=None,
                   help="transfer rate, 10^6 B/s (default: hdd 150, nfs 110)")
    p.add_argument("--seek-ms", type=float, default=8.0, help="hdd: average seek")
    p.add_argument("--rotation-ms", type=float, default=4.17,
                   help="hdd: average rotational latency (7,200 rpm: 4.17)")
    p.add_argument("--near-kb", type=int, default=None,
                   help="hdd, hdd-fifo: distance from the head still served without a seek "
                        "(default: hdd 1024, either way; hdd-fifo 64, forward only)")
    p.add_argument("--fifo-batch", type=int, default=16,
                   help="hdd: requests served in a row near the head before an expired one "
                        "(mq-deadline's fifo_batch; here each request is <= 128 KiB, FUSE's "
                        "max_read, where a block device merges up to max_sectors_kb)")
    p.add_argument("--rtt-ms", type=float, default=0.5, help="nfs: round trip per request")
    p.add_argument("--in-flight", type=int, default=8, help="nfs: requests outstanding at once")
    p.add_argument("--open-rtts", type=int, default=1, help="nfs: round trips per open")
    p.add_argument("--queue-depth", type=int, default=64,
                   help="requests the device sees at once to reorder (libfuse threads)")
    p.add_argument("--order", choices=ORDERS, default="kernel",
                   help="the order requests reach the device in: kernel (default): the order "
                        "the kernel queued them (its FUSE request ids), as a block device gets "
                        "them; arrival: the order the emulator's threads reached Python in "
                        "(a burst of queued requests comes shuffled)")


def _operations(source: str, model, queue_depth: int = 64, order: str = "kernel"):
    import mfusepy as fuse

    if order not in ORDERS:
        raise ValueError(f"order={order!r}; expected one of {', '.join(ORDERS)}")
    kernel_id = _kernel_request_id(fuse)  # logged either way; the order key only for kernel
    by_kernel = order == "kernel"
    trace_path = os.environ.get("SLOWFS_TRACE")  # debugging: one line per read request
    trace = open(trace_path, "w", buffering=1 << 16) if trace_path else None

    class SlowMirror(fuse.Operations):
        """Read-only mirror of ``source``; every read waits for the device model."""

        use_ns = True

        def __init__(self):
            # no attribute may share a name with a FUSE operation (e.g. `lock`): mfusepy would
            # register it as that operation
            self.cond = threading.Condition()
            self.pending: List[list] = []
            self.arrivals = 0
            self.stopped = False
            self.device = None

        def destroy(self, path):
            self.stopped = True
            if trace is not None:
                trace.flush()  # nothing closes it at exit: the buffered tail would be lost

        def init_with_config(self, conn, config):
            # FUSE passes 12 background requests to the daemon at a time and silently drops
            # readahead (posix_fadvise WILLNEED too) once 9 are queued; a block device makes
            # the submitter wait instead of dropping. So: allow 128 MiB of readahead queued.
            if conn is not None:
                conn.max_background = MAX_BACKGROUND
                conn.congestion_threshold = MAX_BACKGROUND  # libfuse caps it at max_background
            self.device = threading.Thread(target=self._dispatch, daemon=True, name="device")
            self.device.start()

        def _full(self, path: str) -> str:
            return os.path.join(source, path.lstrip("/"))

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(self._full(path))
            except OSError as e:
                raise fuse.FuseOSError(e.errno)
            d = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_size", "st_uid",
                                              "st_gid", "st_atime_ns", "st_mtime_ns",
                                              "st_ctime_ns")}
            d["st_mode"] &= ~0o222  # read-only
            for k in ("st_atime", "st_mtime", "st_ctime"):
                d[k] = d.pop(k + "_ns")
            return d

        def readdir(self, path, fh):
            return [".", ".."] + os.listdir(self._full(path))

        def open(self, path, flags):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
                raise fuse.FuseOSError(errno.EROFS)
            fd = os.open(self._full(path), os.O_RDONLY)
            with self.cond:
                done = model.open(path, time.monotonic())
            _sleep_until(done)
            return fd

        def read(self, path, size, offset, fh):
            # queued on arrival, before the backing read (which overlaps the device's time):
            # the order of arrival is what the arrival-order model serves
            n = max(0, min(size, os.fstat(fh).st_size - offset))
            uid = kernel_id()
            with self.cond:
                # [path, offset, size, arrival, done, (kernel id, arrival count)]; pending is
                # kept in the kernel's order (--order arrival: in the order of arrival)
                self.arrivals += 1
                req = [path, offset, n, time.monotonic(), None,
                       (uid if by_kernel else -1, self.arrivals)]
                bisect.insort(self.pending, req, key=lambda r: r[5])
                self.cond.notify_all()
            data = os.pread(fh, n, offset)
            with self.cond:
                while req[4] is None:
                    self.cond.wait()
                if trace is not None:  # under the lock: a text file is not thread-safe
                    trace.write(f"{req[3]:.6f} {req[4]:.6f} {offset} {n} {uid} {path}\n")
            _sleep_until(req[4])
            return data

        def _dispatch(self):
            """The device: takes queued requests in the model's order, a little ahead of time."""
            while not self.stopped:
                with self.cond:
                    while not self.pending and not self.stopped:
                        self.cond.wait(0.1)
                    if self.stopped:
                        return
                    now = time.monotonic()
                    # keep only LOOKAHEAD_S of work committed, so later arrivals can still be
                    # reordered (NCQ), yet the device never idles on Python's latency
                    ahead = getattr(model, "busy_until", 0.0) - now
                    if ahead <= LOOKAHEAD_S:
                        i = model.pick(_in_queue_order(self.pending), now)
                        req = self.pending.pop(i)
                        req[4] = model.schedule(req[0], req[1], req[2], now)
                        self.cond.notify_all()
                        continue
                time.sleep(ahead - LOOKAHEAD_S)

        def release(self, path, fh):
            os.close(fh)
            return 0

        def statfs(self, path):
            st = os.statvfs(source)
            return {k: getattr(st, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree",
                                                 "f_bavail", "f_files", "f_ffree", "f_namemax")}

    return fuse, SlowMirror()


def _in_queue_order(pending: List[list]) -> List[tuple]:
    """What the models see of ``pending`` (requests in the kernel's order): ``(key, offset,
    size, queued)``, where ``queued`` is no later than the arrival of any request the kernel
    queued after it (the minimum of the arrivals from it on): a request that lost the race to
    Python to one queued after it still counts as the older. Models serve the oldest first
    (the first of equals: the kernel's first), and mq-deadline's expiry of :class:`HDDModel`
    counts from it."""
    out, first = [], float("inf")
    for r in reversed(pending):
        first = min(first, r[3])
        out.append((r[0], r[1], r[2], first))
    out.reverse()
    return out


def _kernel_request_id(fuse):
    """A function giving the kernel's id (``unique``) of the FUSE request the calling thread
    serves, or -1 where it cannot be read. The kernel numbers requests in the order it queues
    them for the daemon; the daemon's threads then race to Python, so the order reads reach
    the model in is not always that one (see ``--order``).

    libfuse's high-level API does not expose the id: it is read from libfuse's private
    ``struct fuse_context_i { struct fuse_context ctx; fuse_req_t req; }`` (what
    ``fuse_get_context()`` points into) and ``struct fuse_req { struct fuse_session *se;
    uint64_t unique; ... }``, the layout of libfuse 3.x on 64-bit Linux (elsewhere: -1, and
    the emulator serves requests in the order they reach Python). The first id read must look
    like the kernel's (even: it counts in steps of 2; not 0), or none is used."""
    import ctypes

    lib = getattr(fuse, "_libfuse", None)
    ctx_t = getattr(fuse, "fuse_context", None)
    if lib is None or ctx_t is None or getattr(fuse, "fuse_version_major", 0) != 3 or \
            ctypes.sizeof(ctypes.c_void_p) != 8 or ctypes.sizeof(ctx_t) != 40 or \
            not sys.platform.startswith("linux"):
        return lambda: -1
    get = lib.fuse_get_context
    usable: List[bool] = []  # decided by the first id read

    def kernel_id() -> int:
        if usable == [False]:
            return -1
        ctx = get()
        req = ctypes.c_void_p.from_address(ctypes.addressof(ctx.contents) + 40).value \
            if ctx else None
        uid = ctypes.c_uint64.from_address(req + 8).value if req else -1
        if not usable:
            usable.append(0 < uid < 1 << 62 and uid % 2 == 0)
        return uid if usable[0] else -1
    return kernel_id


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def serve(source: str, mountpoint: str, model, stats_path: Optional[str] = None,
          queue_depth: int = 64, order: str = "kernel") -> None:
    """Mount and serve until unmounted (blocks). Writes the model's counters to ``stats_path``."""
    fuse, ops = _operations(source, model, queue_depth, order)
    # kernel_cache off: every open drops the file's pages, so a fresh open reads the device;
    # auto_cache off for the same reason. ro: a mirror for reading only.
    # one libfuse thread per queued request: the device (see _dispatch) must see the whole queue
    # to reorder it like a disk; libfuse's default of 10 threads would hide all but 10
    fuse.FUSE(ops, mountpoint, foreground=True, ro=True, fsname="slowfs", subtype=model.name,
              max_threads=queue_depth)
    if stats_path:
        with open(stats_path, "w") as f:
            json.dump(model.stats(), f)


def _die_with_parent() -> None:
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the emulator never outlives its caller


def fuse_unavailable_reason() -> Optional[str]:
    """Why a FUSE mount cannot work here, or None when it might."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE kernel module / not passed into the container)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if not any(os.access(os.path.join(d, "fusermount3"), os.X_OK)
               for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)):
        return "fusermount3 not found (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"the mfusepy binding cannot load ({e}); pip install mfusepy"
    return None


def unmount(mountpoint: str) -> None:
    """``fusermount3 -u``, falling back to a lazy unmount when the mount is busy."""
    if subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True).returncode != 0:
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


@contextlib.contextmanager
def mounted(source: str, mountpoint: str, device: str = "hdd", extra_args: List[str] = (),
            timeout: float = 20.0) -> Iterator[Dict[str, float]]:
    """Mount ``source`` at ``mountpoint`` through the emulator for the ``with`` body.

    Yields a dict that, after the body, holds the model's counters (requests, bytes, seeks, ...).
    A fresh mount starts with an empty page cache for its files, so each body reads cold.

    Raises:
        RuntimeError: the mount did not come up within ``timeout`` (stderr of the emulator).
    """
    stats_path = mountpoint.rstrip("/") + ".stats.json"
    cmd = [sys.executable, os.path.abspath(__file__), source, mountpoint, "--device", device,
           "--stats", stats_path, *extra_args]
    with serving(cmd, mountpoint, stats_path, timeout) as stats:
        yield stats


@contextlib.contextmanager
def serving(cmd: List[str], mountpoint: str, stats_path: str,
            timeout: float = 20.0) -> Iterator[Dict[str, float]]:
    """Run the FUSE server ``cmd`` (one that mounts ``mountpoint`` and writes its counters to
    ``stats_path`` as JSON when unmounted) for the ``with`` body: wait for the mount, then
    unmount, reap the server and yield its counters. :func:`mounted` runs this module's server;
    a benchmark with its own server (another layout model) passes its command."""
    os.makedirs(mountpoint, exist_ok=True)
    if os.path.exists(stats_path):
        os.remove(stats_path)
    # stderr to a file, not a pipe: a pipe nobody reads fills up and stalls the filesystem
    log_path = mountpoint.rstrip("/") + ".log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                            preexec_fn=_die_with_parent)
    stats: Dict[str, float] = {}
    try:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None:
                with open(log_path, "rb") as f:
                    err = f.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"slowfs exited with {proc.returncode} before mounting "
                                   f"{mountpoint}: {err}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"slowfs did not mount {mountpoint} within {timeout} s")
            time.sleep(0.02)
        yield stats
    finally:
        unmount(mountpoint)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if os.path.exists(stats_path):
            with open(stats_path) as f:
                stats.update(json.load(f))
            os.remove(stats_path)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="folder to mirror (read-only)")
    p.add_argument("mountpoint")
    p.add_argument("--stats", help="write the device counters (JSON) here after unmount")
    add_model_args(p)
    args = p.parse_args(argv)
    if not os.path.isdir(args.source):
        p.error(f"source={args.source!r} is not a folder")
    try:
        model = make_model(args)
    except ValueError as e:
        p.error(str(e))
    if args.queue_depth < 1:
        p.error(f"--queue-depth={args.queue_depth}; expected >= 1")
    serve(os.path.abspath(args.source), args.mountpoint, model, args.stats, args.queue_depth,
          args.order)
    return 0


if __name__ == "__main__":
    sys.exit(main())
