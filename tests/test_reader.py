"""The sequential reader's read-ahead: bursts, turn-taking between readers of one disk."""
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from imagenet_seq.read import reader
from imagenet_seq.read import readahead


def _plain(path, start, count):
    """``(index, jpeg, label)`` of records by single lookups (no cursor, no read-ahead)."""
    from imagenet_seq import format as fmt

    env = fmt.acquire_env(path)
    try:
        with env.begin() as txn:
            out = []
            for i in range(start, start + count):
                view, label = fmt.decode_record(txn.get(fmt.record_key(i)))
                out.append((i, bytes(view), label))
            return out
    finally:
        fmt.release_env(path)


def _readahead_threads():
    return [t for t in threading.enumerate() if t.name == "imagenet_seq-readahead"]


@pytest.mark.parametrize("indexed", [True, False])
@pytest.mark.parametrize("cold", [True, False])
@pytest.mark.parametrize("prefetch", [64 << 10, 256 << 10, readahead.PREFETCH_BYTES])
def test_bursts_and_extensions_return_every_record(sample_lmdb, sample_lmdb_no_index,
                                                   monkeypatch, prefetch, cold, indexed):
    # a small window makes many bursts. Without the index, spans are estimated from the mean
    # record size, so spans of larger-than-mean records need extensions past the estimate.
    # cold: every byte counts as not in the page cache, so each burst takes the disk's turn
    monkeypatch.setattr(readahead, "PREFETCH_BYTES", prefetch)
    if cold:
        monkeypatch.setattr(readahead, "_resident", lambda addr, length: False)
    r = reader.SplitReader(sample_lmdb if indexed else sample_lmdb_no_index, "train")
    try:
        for start, count in [(0, len(r)), (5, 7), (len(r) - 3, 3), (10, 1)]:
            got = [(i, bytes(j), lab) for i, j, lab in r.read_range(start, count)]
            assert got == _plain(r.path, start, count)
        assert (r._index is not None) == indexed
    finally:
        r.close()


@pytest.mark.parametrize("indexed", [True, False])
@pytest.mark.parametrize("cold", [True, False])
@pytest.mark.parametrize("prefetch", [16 << 10, 96 << 10, readahead.PREFETCH_BYTES])
def test_read_spans_reads_ahead_across_spans(sample_lmdb, sample_lmdb_no_index, monkeypatch,
                                             prefetch, cold, indexed):
    # spans in a shuffled order, adjacent ones, one-record and empty ones, every record once:
    # with the index one read-ahead covers them all, bursts crossing from one span to the next
    monkeypatch.setattr(readahead, "PREFETCH_BYTES", prefetch)
    if cold:
        monkeypatch.setattr(readahead, "_resident", lambda addr, length: False)
    r = reader.SplitReader(sample_lmdb if indexed else sample_lmdb_no_index, "train")
    try:
        # after (30, 6) the span just before it in the file; (0, 10) + (10, 5) are contiguous
        spans = [(30, 6), (25, 5), (0, 10), (10, 5), (47, 1), (20, 0), (15, 10), (36, 11)]
        assert sorted(i for s, c in spans for i in range(s, s + c)) == list(range(len(r)))
        want = [rec for s, c in spans for rec in _plain(r.path, s, c)]
        got = [(i, bytes(j), lab) for i, j, lab in r.read_spans(spans)]
        assert got == want
        stop = threading.Event()
        it = r.read_spans(spans, stop)
        assert [next(it)[0] for _ in range(3)] == [30, 31, 32]
        stop.set()
        assert list(it) == []
        with pytest.raises(IndexError, match="outside"):
            list(r.read_spans([(0, 1), (40, 9)]))
    finally:
        r.close()
    deadline = time.monotonic() + 5
    while _readahead_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _readahead_threads()


def test_segments_merge_adjacent_spans_and_share_no_page(tmp_path):
    page = readahead._PAGE
    path = tmp_path / "f"
    path.write_bytes(b"x" * (20 * page))
    fd = os.open(path, os.O_RDONLY)
    try:
        pre = readahead.Prefetch(fd, 0, segments=[
            (page + 100, 3 * page),       # pages 1-2
            (3 * page, 4 * page + 10),    # contiguous: pages 3-4, same segment
            (4 * page + 20, 6 * page),    # starts in page 4, which the last one has: 5
            (5 * page + 8, 5 * page + 9),  # inside the last one: nothing new
            (10 * page, 11 * page),       # elsewhere: page 10
            (page, 2 * page)])            # back to page 1: read again (a later span)
        assert pre.seg_file == [page, 10 * page, page]
        assert pre.seg_pos == [0, 5 * page, 6 * page, 7 * page] and pre.end == 7 * page
        assert list(pre._pieces(0, pre.end)) == [(page, 5 * page), (10 * page, page),
                                                (page, page)]
        assert list(pre._pieces(4 * page + 5, 6 * page)) == [(5 * page + 5, page - 5),
                                                              (10 * page, page)]
    finally:
        os.close(fd)


def test_readahead_thread_ends_with_its_span(sample_lmdb):
    r = reader.SplitReader(sample_lmdb, "train")
    try:
        list(r.read_range(0, len(r)))
        it = r.read_range(0, len(r))
        next(it)
        assert _readahead_threads(), "a span being read has a read-ahead thread"
        it.close()  # `break` mid-span
        deadline = time.monotonic() + 5
        while _readahead_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _readahead_threads()
    finally:
        r.close()


def test_disk_turns_can_be_switched_off(sample_lmdb, monkeypatch):
    fd = os.open(os.path.join(sample_lmdb, "ILSVRC-train.lmdb"), os.O_RDONLY)
    try:
        lock = readahead.DiskLock.for_fd(fd)
        assert lock is not None
        lock.close()
        monkeypatch.setattr(readahead, "DISK_TURNS", False)
        assert readahead.DiskLock.for_fd(fd) is None
    finally:
        os.close(fd)


_HOLDER = textwrap.dedent("""
    import os, sys, time
    from imagenet_seq.read import readahead
    fd = os.open(sys.argv[1], os.O_RDONLY)
    lock = readahead.DiskLock.for_fd(fd)
    assert lock.acquire(lambda: False)
    print("held", flush=True)
    sys.stdin.readline()  # hold the turn until told
    lock.release()
    print("released", flush=True)
    assert lock.acquire(lambda: False)  # wants the next turn at once
    print("again", time.monotonic(), flush=True)
    lock.release()
""")


def test_turns_exclude_each_other_and_pass_to_a_waiter(sample_lmdb, tmp_path):
    path = os.path.join(sample_lmdb, "ILSVRC-train.lmdb")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        fd = os.open(path, os.O_RDONLY)
        lock = readahead.DiskLock.for_fd(fd)
        try:
            got = []
            t = threading.Thread(target=lambda: got.append(
                (lock.acquire(lambda: False), time.monotonic())))
            t.start()
            time.sleep(0.3)
            assert not got, "the turn is held by another process"
            holder.stdin.write("\n")
            holder.stdin.flush()
            t.join(10)
            assert got and got[0][0]
            mine = got[0][1]
            time.sleep(0.05)
            lock.release()
            out = holder.communicate(timeout=10)[0].split()
            assert out[0] == "released" and out[1] == "again"
            # the waiter had the turn before the holder's immediate second try
            assert float(out[2]) > mine
        finally:
            lock.close()
            os.close(fd)
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_frees_the_turn(sample_lmdb):
    path = os.path.join(sample_lmdb, "ILSVRC-train.lmdb")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    fd = os.open(path, os.O_RDONLY)
    lock = readahead.DiskLock.for_fd(fd)
    try:
        t0 = time.monotonic()
        assert lock.acquire(lambda: time.monotonic() - t0 > 5)
        lock.release()
    finally:
        lock.close()
        os.close(fd)


def test_resident_reports_the_page_cache(sample_lmdb):
    r = reader.SplitReader(sample_lmdb, "train")
    try:
        list(r.read_range(0, len(r)))  # maps the file and reads it all
        size = os.fstat(r._fd).st_size
        assert readahead._resident(r._base, size)
        assert readahead._resident(r._base, 0)
    finally:
        r.close()
