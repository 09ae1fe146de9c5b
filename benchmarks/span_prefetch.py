"""The span-prefetch prototype measured by ``slow_disk.py`` as the "+prefetch" variants.

NOT part of the package: a proposal for :meth:`imagenet_seq.reader.SplitReader.read_range`.
"""
from __future__ import annotations

import os

# SplitReader.read_range that keeps a window of its span queued with posix_fadvise(WILLNEED)
# ahead of the cursor, so the disk sees one deep sequential queue per span instead of one
# 128 KiB mmap fault at a time.
PREFETCH_WINDOW = 16 << 20  # queued ahead of the cursor, refilled in bursts of half of it
PREFETCH_STEP = 128 << 10  # the kernel reads at most read_ahead_kb per WILLNEED call


def _map_base(path: str):
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    return None


def install_span_prefetch() -> None:
    import numpy as np

    from imagenet_seq import format as fmt
    from imagenet_seq.reader import SplitReader

    def read_range(self, start, count):
        if self._env is None:
            self.reset_state()
        if count <= 0:
            return
        if not hasattr(self, "_pf_fd"):
            self._pf_fd = os.open(self.path, os.O_RDONLY)
        mean = self.meta.total_bytes / max(1, self.meta.num_records) + 64
        base, queued, end = _map_base(self.path), None, None
        with self._env.begin(buffers=True) as txn:
            cur = txn.cursor()
            cur.set_key(fmt.record_key(start))
            for i in range(start, start + count):
                value = cur.value()
                if base is not None:
                    off = np.frombuffer(value, np.uint8).ctypes.data - base
                    if end is None:  # the span's bytes, estimated from the mean record size
                        queued, end = off, off + int((count + 2) * mean)
                    # refill in bursts: a burst sits together in the kernel's FIFO queue, so
                    # the disk serves it as one run even when other ranks queue theirs too
                    if queued - off < PREFETCH_WINDOW // 2:
                        target = min(off + PREFETCH_WINDOW, end)
                    else:
                        target = queued
                    while queued < target:
                        n = min(PREFETCH_STEP, end - queued)
                        os.posix_fadvise(self._pf_fd, queued, n, os.POSIX_FADV_WILLNEED)
                        queued += n
                view, label = fmt.decode_record(value)
                yield i, view.tobytes(), label
                if i + 1 < start + count:
                    cur.next()

    SplitReader.read_range = read_range
