"""The converter's order-preserving read-ahead (convert/source_reader.py): one reader reads the
sources in read order while the next files are hinted to the kernel in the same order."""
import os
import random
import threading

import pytest

from imagenet_seq.convert import source_reader
from imagenet_seq.convert.source_reader import FolderSource, Reader

TIMEOUT = 60


def _fd_path(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


def _tree(root, n=24, seed=0):
    """``n`` files of different sizes in two class folders; items in a shuffled read order."""
    rnd = random.Random(seed)
    files = {}
    for i in range(n):
        rel = f"c{i % 2}/img{i:03d}.JPEG"
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        files[rel] = os.urandom(rnd.randrange(1, 5000))
        with open(os.path.join(root, rel), "wb") as f:
            f.write(files[rel])
    rels = sorted(files)
    rnd.shuffle(rels)
    return files, [(pos, rel, int(rel[1])) for pos, rel in enumerate(rels)]


def _read_all(reader):
    got, failed = [], []
    done = threading.Event()

    def consume():
        try:
            for chunk in reader:
                got.extend(chunk)
        except BaseException as e:
            failed.append(e)
        done.set()
    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert done.wait(TIMEOUT), "the reader hung"
    reader._thread.join(TIMEOUT)  # its last step, closing the source, follows the last chunk
    if failed:
        raise failed[0]
    return got


@pytest.fixture
def trace(monkeypatch):
    """Every hint (posix_fadvise WILLNEED) and every read (read_source) in the order they
    happen, with the thread that made them."""
    events = []
    lock = threading.Lock()
    real_advise, real_read = os.posix_fadvise, source_reader.read_source

    def advise(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            with lock:
                events.append(("hint", _fd_path(fd), offset, length,
                               threading.current_thread().name))
        return real_advise(fd, offset, length, advice)

    def read(path):
        with lock:
            events.append(("read", os.path.realpath(path), 0, 0,
                           threading.current_thread().name))
        return real_read(path)
    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(source_reader, "read_source", read)
    return events


def _check_window(events, order, depth, sizes, max_bytes):
    """Hints and reads both follow ``order`` (keys: path or (path, offset)); every file is
    hinted (whole, front to back) before it is read, the first one too (its request must not
    reach the disk behind those of the files after it); at most ``depth`` files (the one read
    next and ``depth - 1`` after it) and ``max_bytes`` are hinted and not yet read at any
    time."""
    reads = [e[1:3] for e in events if e[0] == "read"]
    assert [k for k in reads] == order
    hinted, first_hint = {}, {}
    unread, unread_bytes = [], 0
    for kind, path, off, n, _ in events:
        if kind == "hint":
            key = next(k for k in order if k[0] == path and k[1] <= off < k[1] + sizes[k])
            if key not in first_hint:
                first_hint[key] = len(first_hint)
                unread.append(key)
            assert off == key[1] + hinted.get(key, 0)  # the pieces front to back
            hinted[key] = hinted.get(key, 0) + n
            unread_bytes += n
        else:
            key = (path, off)
            if key in unread:
                assert unread[0] == key  # the oldest hinted file is the one read
                unread.pop(0)
                unread_bytes -= hinted[key]
        assert len(unread) <= depth
        assert unread_bytes <= max_bytes
    assert sorted(first_hint, key=first_hint.get) == order  # hinted in read order
    assert all(hinted[k] == sizes[k] for k in order)


@pytest.mark.parametrize("depth", [2, 5, None])
def test_folder_read_in_order_with_hints_ahead(depth, tmp_path, trace, monkeypatch):
    monkeypatch.setattr(source_reader, "HINT_PIECE", 1000)  # several pieces per file
    files, items = _tree(str(tmp_path))
    opens = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opens.append(p) or real_open(p, *a, **k))
    got = _read_all(Reader(str(tmp_path), items, read_ahead=depth))
    # each file opened once: the read goes through the descriptor the hint was given on (a
    # filesystem that drops a file's cache at open, FUSE without kernel_cache, keeps it)
    assert sorted(opens) == sorted(os.path.join(str(tmp_path), rel) for _, rel, _ in items)
    assert [(g[0], g[1], g[2]) for g in got] == items
    assert all(g[3] == files[g[1]] for g in got)
    depth = depth or FolderSource.read_ahead
    root = os.path.realpath(str(tmp_path))
    order = [(os.path.join(root, rel), 0) for _, rel, _ in items]
    sizes = {(os.path.join(root, rel), 0): len(files[rel]) for rel in files}
    _check_window(trace, order, depth, sizes, source_reader.READ_AHEAD_BYTES)
    assert {e[4] for e in trace} == {"imagenet_seq-source-reader"}  # one thread does it all
    assert sum(e[0] == "hint" for e in trace) > len(items)  # in pieces of HINT_PIECE


def test_read_ahead_1_reads_one_file_at_a_time_without_hints(tmp_path, trace):
    files, items = _tree(str(tmp_path))
    got = _read_all(Reader(str(tmp_path), items, read_ahead=1))
    assert [g[3] for g in got] == [files[rel] for _, rel, _ in items]
    assert [e[0] for e in trace] == ["read"] * len(items)


def test_byte_bound_and_a_file_larger_than_it(tmp_path, trace, monkeypatch):
    """At most READ_AHEAD_BYTES hinted and unread; a file larger than what is left of it is
    hinted in part and nothing after it is hinted until it is read (its rest, read on demand,
    then still reaches the disk before the files after it)."""
    monkeypatch.setattr(source_reader, "READ_AHEAD_BYTES", 10_000)
    sizes = [3000, 3000, 3000, 25_000, 3000, 3000, 3000, 3000]
    files = {}
    for i, n in enumerate(sizes):
        files[f"f{i}"] = os.urandom(n)
        (tmp_path / f"f{i}").write_bytes(files[f"f{i}"])
    items = [(i, f"f{i}", 0) for i in range(len(sizes))]
    got = _read_all(Reader(str(tmp_path), items, read_ahead=8))
    assert [g[3] for g in got] == [files[f"f{i}"] for i in range(len(sizes))]
    hints = [(os.path.basename(e[1]), e[2], e[3]) for e in trace if e[0] == "hint"]
    big = [h for h in hints if h[0] == "f3"]
    assert sum(n for _, _, n in big) == 10_000 - 9000  # what f0..f2 left of the bound
    events = [(e[0], os.path.basename(e[1])) for e in trace]
    # nothing after f3 is hinted before f3 is read; then the window goes on from f4
    assert events.index(("read", "f3")) < events.index(("hint", "f4"))
    assert events.index(("hint", "f4")) < events.index(("hint", "f5")) < events.index(
        ("read", "f4"))
    unread, unread_bytes = set(), 0
    for kind, path, _, n, _ in trace:
        name = os.path.basename(path)
        if kind == "hint":
            unread.add(name)
            unread_bytes += n
        elif name in unread:
            unread.discard(name)
            unread_bytes -= sum(h[2] for h in hints if h[0] == name)
        assert unread_bytes <= 10_000


def test_errors_are_reported_as_without_read_ahead(tmp_path, monkeypatch):
    """A vanished file, a dangling link, a FIFO in a file's place and an unreadable file give
    the same verdicts with the window as one file at a time, in read order, and the read-ahead
    never blocks on the FIFO."""
    import errno

    files, items = _tree(str(tmp_path), n=12)
    rels = [rel for _, rel, _ in items]
    os.remove(tmp_path / rels[2])  # vanished after the scan
    os.remove(tmp_path / rels[4])
    os.symlink(str(tmp_path / "nowhere"), tmp_path / rels[4])
    os.remove(tmp_path / rels[6])
    os.mkfifo(tmp_path / rels[6])
    bad = os.path.join(str(tmp_path), rels[8])
    real = source_reader.read_source

    def failing(path):
        if path == bad:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real(path)
    monkeypatch.setattr(source_reader, "read_source", failing)
    verdicts = {}
    for depth in (1, 6):
        got = _read_all(Reader(str(tmp_path), items, read_ahead=depth))
        assert [g[1] for g in got] == rels
        verdicts[depth] = [g[3] for g in got]
    assert verdicts[1] == verdicts[6]
    v = dict(zip(rels, verdicts[6]))
    assert v[rels[2]][0] == "error" and "cannot read" in v[rels[2]][1] and "--resume" in v[
        rels[2]][1]
    assert v[rels[4]][0] == "skip" and "dangling" in v[rels[4]][1]
    assert v[rels[6]][0] == "skip" and "FIFO" in v[rels[6]][1]
    assert v[rels[8]][0] == "error" and bad in v[rels[8]][1] and "Permission" in v[rels[8]][1]
    ok = [r for i, r in enumerate(rels) if i not in (2, 4, 6, 8)]
    assert all(v[r] == files[r] for r in ok)


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_no_descriptor_left_open(tmp_path, monkeypatch):
    """Files opened ahead are closed: read, never read (the consumer stopped), or taken by a
    patched read that failed; also with the same file twice in the window."""
    files, items = _tree(str(tmp_path))
    before = _open_fds()
    _read_all(Reader(str(tmp_path), items + items[:5], read_ahead=8))
    assert _open_fds() == before
    monkeypatch.setattr(source_reader, "QUEUE_CHUNKS", 1)
    monkeypatch.setattr(source_reader, "CHUNK", 1)
    r = Reader(str(tmp_path), items * 3, read_ahead=16)
    next(iter(r))
    r.close()
    r._thread.join(TIMEOUT)
    assert not r._thread.is_alive()
    assert _open_fds() == before

    def boom(path):
        raise MemoryError("no room")
    monkeypatch.setattr(source_reader, "read_source", boom)
    with pytest.raises(MemoryError):
        _read_all(Reader(str(tmp_path), items, read_ahead=8))
    assert _open_fds() == before


def test_without_posix_fadvise_files_are_read_one_at_a_time(tmp_path, monkeypatch):
    files, items = _tree(str(tmp_path))
    monkeypatch.delattr(os, "posix_fadvise")
    got = _read_all(Reader(str(tmp_path), items, read_ahead=8))
    assert [g[3] for g in got] == [files[rel] for _, rel, _ in items]


def test_converter_passes_read_ahead_through(sample_tree, tmp_path, trace):
    """The CLI's --read-ahead reaches the reader: 1 = no hints; 4 = hints, in read order."""
    from imagenet_seq.convert.cli import main

    root, _ = sample_tree
    for depth in ("1", "4"):
        del trace[:]
        assert main([root, str(tmp_path / depth), "--splits", "train", "--workers", "0",
                     "--read-ahead", depth, "--no-progress"]) == 0
        mine = [e for e in trace if e[1].startswith(os.path.realpath(root))]  # not the output
        reads = [e[1] for e in mine if e[0] == "read"]
        hints = [e[1] for e in mine if e[0] == "hint"]
        assert reads and len(set(reads)) == len(reads)
        if depth == "1":
            assert hints == []
        else:
            assert list(dict.fromkeys(hints)) == reads
