"""Converter read order and external sort: sources read once in on-disk order by one reader,
records sorted through temporary runs, output identical whatever the read order or run size."""
import os
import random
import shutil
import threading
import time

import numpy as np
import pytest

from imagenet_seq.convert import passes as convert_passes
from imagenet_seq.convert import disk_order
from imagenet_seq.convert import sort_runs
from imagenet_seq.convert import source_reader
from imagenet_seq.convert.cli import main
from imagenet_seq.read.reader import SplitReader
from imagenet_seq.tools.sample import make_sample_imagefolder
from run_faults import fail_nth_run_write


def records(out, split="train"):
    r = SplitReader(out, split)
    try:
        return [(bytes(j), int(lab)) for _, j, lab in r.read_all()], r.meta.options
    finally:
        r.close()


@pytest.fixture(scope="module")
def shuffled_tree(tmp_path_factory):
    """An ImageFolder tree whose files were created in a random order: inode (creation) order
    differs from name order, as after extracting an archive that is not sorted."""
    src = str(tmp_path_factory.mktemp("src") / "in")
    classes = make_sample_imagefolder(src, train_per_class=9, val_per_class=3, num_classes=3,
                                      size=(64, 48))
    root = str(tmp_path_factory.mktemp("shuffled") / "in")
    files = []
    for d, _, fs in os.walk(src):
        rel = os.path.relpath(d, src)
        os.makedirs(os.path.join(root, rel), exist_ok=True)
        files += [os.path.join(rel, f) for f in fs]
    random.Random(5).shuffle(files)
    for f in files:
        shutil.copyfile(os.path.join(src, f), os.path.join(root, f))
    return root, classes


@pytest.fixture(scope="module")
def reference(shuffled_tree, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "out")
    assert main([shuffled_tree[0], out, "--workers", "0", "--read-order", "name",
                 "--no-progress"]) == 0
    return out


# ---------------------------------------------------------------- pure parts

def test_disk_order_methods(shuffled_tree):
    root, classes = shuffled_tree
    d = os.path.join(root, "train")
    rels = sorted(os.path.join(c, f) for c in classes for f in os.listdir(os.path.join(d, c)))
    inodes = [os.stat(os.path.join(d, r)).st_ino for r in rels]
    assert disk_order.disk_order(d, rels, inodes, "name") == (list(range(len(rels))), "name")
    by_ino, how = disk_order.disk_order(d, rels, inodes, "inode")
    assert how == "inode" and [inodes[i] for i in by_ino] == sorted(inodes)
    assert by_ino != list(range(len(rels)))  # the fixture's point: creation != name order
    auto, how = disk_order.disk_order(d, rels, inodes, "auto")
    assert how in ("fiemap", "inode") and sorted(auto) == list(range(len(rels)))
    with pytest.raises(ValueError, match="'sideways'"):
        disk_order.disk_order(d, rels, inodes, "sideways")


def test_fiemap_orders_by_physical_offset(tmp_path):
    paths = []
    for i in range(4):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(20000))
        paths.append(str(p))
    os.sync()  # delayed allocation: no physical block before writeback
    try:
        phys = [disk_order.first_extent(p) for p in paths]
    except OSError as e:
        pytest.skip(f"no FIEMAP on this filesystem ({e})")
    order, how = disk_order.disk_order(str(tmp_path), [os.path.basename(p) for p in paths],
                                       [os.stat(p).st_ino for p in paths], "auto")
    assert how == "fiemap"
    assert [phys[i] for i in order] == sorted(phys)


def test_runs_merge_in_position_order_and_resume_from_offsets(tmp_path):
    rng = np.random.default_rng(0)
    positions = rng.permutation(200)
    payloads = {int(p): os.urandom(int(rng.integers(0, 3000))) for p in positions}
    paths = []
    run = sort_runs.RunBuffer(max_bytes=1 << 30, max_records=37)
    for p in positions:  # read order: random; key = the write position's bytes
        run.add(int(p).to_bytes(8, "big"), int(p), payloads[int(p)])
        if run.full():
            paths.append(str(tmp_path / f"run{len(paths)}"))
            assert run.write(paths[-1])[0] == 37
    paths.append(str(tmp_path / f"run{len(paths)}"))
    run.write(paths[-1])
    assert len(paths) == 6 and not run.items
    # records are views into reused read buffers, valid until the next one: copied here
    got = [(seq, bytes(data), i, after)
           for _, seq, _, data, i, after, _ in sort_runs.merge(paths, [0] * len(paths),
                                                               merge_bytes=1000)]
    assert [g[0] for g in got] == list(range(200))
    assert all(payloads[pos] == data for pos, data, _, _ in got)
    # resume after 77 records: the offsets a commit would have stored
    offsets = [0] * len(paths)
    for _, _, i, after in got[:77]:
        offsets[i] = after
    rest = list(sort_runs.merge(paths, offsets, merge_bytes=1 << 20))
    assert [g[1] for g in rest] == list(range(77, 200))
    # a run cut short is named, never a wrong record
    with open(paths[0], "r+b") as f:
        f.truncate(os.path.getsize(paths[0]) - 5)
    with pytest.raises(ValueError, match="run0 ends inside"):
        list(sort_runs.merge(paths, [0] * len(paths), merge_bytes=1000))


@pytest.mark.parametrize("buffer_bytes", [1, 7, 100, 2999, 3011, 5000, 1 << 20])
def test_run_reader_record_valid_until_the_call_after_next(buffer_bytes, tmp_path):
    """The read buffers are reused: a record handed out stays intact through the next call
    (the merge yields it after advancing its run once), whatever the record / buffer sizes,
    also when one call refills twice (a header, then a record bigger than the buffer)."""
    rng = np.random.default_rng(1)
    recs = [(p, os.urandom(int(rng.integers(0, 3000)))) for p in range(300)]
    run = sort_runs.RunBuffer(max_bytes=1 << 30)
    for p, data in recs:
        run.add(p.to_bytes(8, "big"), p, data)
    path = str(tmp_path / "run")
    run.write(path)
    reader, out, prev = sort_runs.RunReader(path, 0, buffer_bytes), [], None
    while True:
        got = reader.next()
        if prev is not None:
            assert bytes(prev[0]) == prev[1]
        if got is None:
            break
        out.append((got[1], bytes(got[3])))
        prev = (got[3], bytes(got[3]))
    reader.close()
    assert out == recs


def test_reader_chunks_in_given_order_and_stops(tmp_path, monkeypatch):
    for i in range(10):
        (tmp_path / f"{i}.JPEG").write_bytes(bytes([i]) * (i + 1))
    items = [(i, f"{i}.JPEG", 0) for i in (3, 1, 4, 0, 9, 2, 6, 5, 8, 7)]
    monkeypatch.setattr(source_reader, "CHUNK", 4)
    r = source_reader.Reader(str(tmp_path), items)
    got = [it for chunk in r for it in chunk]
    assert [g[0] for g in got] == [i for i, _, _ in items]
    assert all(g[3] == bytes([g[0]]) * (g[0] + 1) for g in got)
    # missing file: a verdict for the report, not an exception
    (tmp_path / "3.JPEG").unlink()
    os.symlink(str(tmp_path / "gone"), tmp_path / "3.JPEG")
    first = next(iter(source_reader.Reader(str(tmp_path), items)))
    assert first[0][3][0] == "skip" and "dangling" in first[0][3][1]
    # close() stops a reader whose consumer went away (bounded queue full)
    monkeypatch.setattr(source_reader, "QUEUE_CHUNKS", 1)
    r = source_reader.Reader(str(tmp_path), items * 50)
    r.close()
    r._thread.join(timeout=5)
    assert not r._thread.is_alive()


def test_reader_error_reaches_the_consumer(tmp_path, monkeypatch):
    def boom(split_dir, rel):
        raise MemoryError("no room")
    monkeypatch.setattr(source_reader, "read_one", boom)
    r = source_reader.Reader(str(tmp_path), [(0, "a.JPEG", 0)])
    with pytest.raises(MemoryError):
        list(r)


# ---------------------------------------------------------------- the converter

@pytest.mark.parametrize("depth", [1, 2, 8, None])
def test_sources_read_once_in_disk_order_by_one_reader(depth, shuffled_tree, monkeypatch,
                                                       tmp_path):
    """One reader visits the files in on-disk (here: inode) order, one at a time, whatever the
    ``--read-ahead`` window (which only hints the next files to the kernel, in the same order:
    tests/test_source_prefetch.py)."""
    root, classes = shuffled_tree
    seen = []
    real = source_reader.read_source
    lock = threading.Lock()

    def spy(path):
        with lock:
            seen.append((path, threading.current_thread().name))
        return real(path)
    monkeypatch.setattr(source_reader, "read_source", spy)
    out = str(tmp_path / "out")
    assert main([root, out, "--splits", "train", "--workers", "2", "--read-order", "inode",
                 "--no-progress", *(["--read-ahead", str(depth)] if depth else [])]) == 0
    paths = [p for p, _ in seen]
    assert len(paths) == len(set(paths)) == 27  # each file read exactly once
    assert {t for _, t in seen} == {"imagenet_seq-source-reader"}  # by the one reader
    inodes = [os.stat(p).st_ino for p in paths]
    assert inodes == sorted(inodes)
    assert paths != sorted(paths)


@pytest.mark.parametrize("read_order, run_records, workers",
                         [("inode", None, "0"), ("auto", 5, "2"), ("name", 1, "2")])
def test_output_independent_of_read_order_and_runs(read_order, run_records, workers,
                                                   shuffled_tree, reference, monkeypatch,
                                                   tmp_path):
    """The records and their order are the plan's (seeded permutation / sorted), whatever
    order the sources were read in and however many runs the sort used."""
    monkeypatch.setattr(convert_passes, "RUN_RECORDS", run_records)
    out = str(tmp_path / "out")
    assert main([shuffled_tree[0], out, "--workers", workers, "--read-order", read_order,
                 "--no-progress", "--json"]) == 0
    for split in ("train", "val"):
        assert records(out, split) == records(reference, split)
    assert not [f for f in os.listdir(out) if f.endswith(".runs")]  # temporary runs deleted


def test_tmp_folder_holds_the_runs(shuffled_tree, reference, monkeypatch, tmp_path, capsys):
    tmp = tmp_path / "scratch"
    tmp.mkdir()
    seen = []
    real = sort_runs.RunBuffer.write

    def spy(self, path):
        seen.append(path)
        return real(self, path)
    monkeypatch.setattr(sort_runs.RunBuffer, "write", spy)
    monkeypatch.setattr(convert_passes, "RUN_RECORDS", 10)
    out = str(tmp_path / "out")
    assert main([shuffled_tree[0], out, "--splits", "train", "--workers", "0", "--tmp",
                 str(tmp), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert len(seen) == 3 and all(p.startswith(str(tmp)) for p in seen)
    assert "temporary runs" in err and str(tmp) in err and "GB free" in err  # stated first
    assert os.listdir(tmp) == []  # deleted at the end
    assert records(out) == records(reference)


def test_too_little_temporary_space_is_refused_before_reading(shuffled_tree, monkeypatch,
                                                              tmp_path, capsys):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=10_000))
    read = []
    monkeypatch.setattr(source_reader, "read_source", lambda p: read.append(p))
    out = str(tmp_path / "out")
    assert main([shuffled_tree[0], out, "--splits", "train", "--workers", "0",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "too little temporary space" in err and "--tmp DIR" in err and out in err, err
    assert read == []


@pytest.mark.parametrize("argv, msg", [
    (["--memory-mb", "100", "--workers", "2"], "--memory-mb 100; expected at least 362 with "
                                               "--workers 2 (processes, queues and file list: "
                                               "297 MB)"),
    (["--memory-mb", "600", "--workers", "64"], "expected at least 3982 with --workers 64"),
    (["--tmp", "/nonexistent/scratch"], "--tmp '/nonexistent/scratch' is not a folder")])
def test_bad_options(argv, msg, shuffled_tree, tmp_path, capsys):
    assert main([shuffled_tree[0], str(tmp_path / "o"), "--no-progress", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_resume_with_another_tmp_is_named(shuffled_tree, monkeypatch, tmp_path, capsys):
    """Killed in pass 1 (here: a run write fails), resumed with another --tmp: the error
    names the folder that holds the runs; with it, the resume finishes."""
    monkeypatch.setattr(convert_passes, "RUN_RECORDS", 4)
    calls = fail_nth_run_write(monkeypatch, 3, OSError(28, "No space left on device"))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    out = str(tmp_path / "out")
    args = [shuffled_tree[0], out, "--splits", "train", "--workers", "0", "--no-progress"]
    assert main(args + ["--tmp", str(a)]) == 1
    err = capsys.readouterr().err
    assert "temporary run" in err and "No space left" in err and "--resume" in err, err
    assert main(args + ["--tmp", str(b), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"--tmp {a}" in err, err
    assert main(args + ["--tmp", str(a), "--resume"]) == 0
    assert len(calls) == 3 + 7 - 2  # the two committed runs are kept, not rewritten


def test_runs_are_written_while_reading_goes_on_and_count_once_on_disk(
        shuffled_tree, reference, monkeypatch, tmp_path, capsys):
    """Pass 1 writes a full run in a thread while the reader fills the next one; the resume
    state counts a run's records only once the run is on disk. Here the second run's write
    waits until records of the third have arrived, then fails: the state committed lists one
    run and counts exactly its records, and --resume ends with the clean run's records."""
    import json

    import lmdb

    from imagenet_seq import format as fmt

    monkeypatch.setattr(convert_passes, "RUN_RECORDS", 4)
    added = [0]
    real_add = sort_runs.RunBuffer.add

    def add(self, *args):
        added[0] += 1
        return real_add(self, *args)

    def reading_goes_on():
        deadline = time.monotonic() + 20
        while added[0] < 2 * 4 + 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the main thread must go on reading meanwhile
        assert added[0] >= 2 * 4 + 2, "reading stopped while a run was written"
    monkeypatch.setattr(sort_runs.RunBuffer, "add", add)
    fail_nth_run_write(monkeypatch, 2, OSError(28, "No space left on device"), reading_goes_on)
    out = str(tmp_path / "out")
    args = [shuffled_tree[0], out, "--splits", "train", "--workers", "0", "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "No space left" in err and "--resume" in err, err
    env = lmdb.open(os.path.join(out, "ILSVRC-train.lmdb.partial"), subdir=False,
                    readonly=True, lock=False)
    with env.begin() as txn:
        state = json.loads(txn.get(fmt.PROGRESS_KEY))
    env.close()
    assert [r[1] for r in state["runs"]] == [4]
    assert state["sweep"]["seq"] >= 4  # the sweep's cursor: past the 4 records on disk
    assert main(args + ["--resume"]) == 0
    assert records(out) == records(reference)


def test_run_being_filled_and_run_being_written_share_the_budget(shuffled_tree, reference,
                                                                  monkeypatch, tmp_path):
    """With a run disk slower than the reader, the run being filled and what the one being
    written still holds never exceed the budget together (reading waits), and the runs are
    not cut smaller for it: each but the last reaches the budget."""
    import weakref

    budget = 20_000
    monkeypatch.setattr(convert_passes, "buffer_bytes", lambda memory, workers, images: budget)
    live, peaks, sizes = weakref.WeakSet(), [], []
    real_init, real_add, real_write = (sort_runs.RunBuffer.__init__, sort_runs.RunBuffer.add,
                                       sort_runs.RunBuffer.write)
    real_write_all = sort_runs._write_all

    def init(self, *a, **k):
        real_init(self, *a, **k)
        live.add(self)

    def add(self, key, seq, payload, prefix=b"", origin=sort_runs.NO_ORIGIN):
        real_add(self, key, seq, payload, prefix, origin)
        peaks.append((sum(r.nbytes for r in list(live)), len(prefix) + len(payload)))

    def write(self, path):
        sizes.append(self.nbytes)
        return real_write(self, path)

    def slow_write_all(fd, parts, total):
        time.sleep(0.3)  # a slow run disk: the reader gets ahead
        return real_write_all(fd, parts, total)
    monkeypatch.setattr(sort_runs.RunBuffer, "__init__", init)
    monkeypatch.setattr(sort_runs.RunBuffer, "add", add)
    monkeypatch.setattr(sort_runs.RunBuffer, "write", write)
    monkeypatch.setattr(sort_runs, "_write_all", slow_write_all)
    out = str(tmp_path / "out")
    assert main([shuffled_tree[0], out, "--splits", "train", "--workers", "0",
                 "--no-progress"]) == 0
    # the check follows each record, and a full run ends one record past the budget: within
    # two records of it (those bytes were already in memory, in the chunks from the workers)
    slack = 2 * (max(size for _, size in peaks) + sort_runs.PER_RECORD_OVERHEAD)
    assert all(total <= budget + slack for total, _ in peaks), peaks
    assert max(total for total, _ in peaks) > budget // 2  # two runs did coexist
    assert len(sizes) >= 3 and all(s >= budget for s in sizes[:-1]), sizes
    assert records(out) == records(reference)


def test_workers_send_back_only_what_changed():
    """A JPEG stored as it is comes back from a worker as a verdict (its bytes stay with the
    reader); one that was changed (EXIF removed) comes back with its new bytes. ``results``
    hands the writer the JPEG to store either way."""
    import cv2

    from imagenet_seq.convert.workers import process_chunk, results

    img = np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)
    plain = cv2.imencode(".jpg", img)[1].tobytes()
    exif = (plain[:2] + b"\xff\xe1\x00\x10Exif\x00\x00" + b"\x00" * 8 + plain[2:])
    outs = process_chunk("", [("a.jpg", 3, plain), ("b.jpg", 4, exif)], None, 95)
    assert outs[0] == ("ok", None, None)
    assert outs[1] == ("ok", plain, "EXIF removed")
    got = list(results("", [[(7, "a.jpg", 3, plain), (9, "b.jpg", 4, exif)]], None, 95, None))
    assert got == [(7, "ok", plain, None), (9, "ok", plain, "EXIF removed")]
    assert got[0][2] is plain  # not copied


def test_too_many_runs_is_refused_before_reading(shuffled_tree, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(convert_passes, "MAX_RUNS", 2)
    monkeypatch.setattr(convert_passes, "buffer_bytes", lambda memory, workers, images: 1000)
    read = []
    monkeypatch.setattr(source_reader, "read_source", lambda p: read.append(p))
    assert main([shuffled_tree[0], str(tmp_path / "o"), "--splits", "train", "--workers", "0",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "more than the 2 one merge reads at once; pass --memory-mb" in err, err
    assert read == []


def test_full_size_images_with_workers_do_not_deadlock(tmp_path):
    """Chunks of ~1 MiB of real-size JPEGs (more than a pipe holds) go to busy workers while
    they send ~1 MiB of results back: the sends must not block the writer (they did: a hang)."""
    import subprocess
    import sys

    root = str(tmp_path / "in")
    make_sample_imagefolder(root, train_per_class=12, val_per_class=1, num_classes=4)
    code = ("import sys; from imagenet_seq.convert.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    try:
        r = subprocess.run([sys.executable, "-c", code, root, str(tmp_path / "o"), "--splits",
                            "train", "--workers", "2", "--no-progress", "--json"],
                           capture_output=True, text=True, timeout=60,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        pytest.fail("the converter hung with full-size images and 2 workers")
    assert r.returncode == 0, r.stderr
    assert '"images": 48' in r.stdout


@pytest.mark.parametrize("bad", ["0", "-3", "1000"])
def test_read_ahead_out_of_range_is_refused(bad, shuffled_tree, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main([shuffled_tree[0], out, "--read-ahead", bad, "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert f"--read-ahead {bad}" in err and "expected 1..256" in err
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.lmdb"))
