"""The slow-device emulator: cost models without FUSE, and one FUSE round trip where FUSE works."""
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import slowfs  # noqa: E402
from slowfs import ArrivalHDDModel, HDDModel, NFSModel  # noqa: E402

KB = 1024


def test_hdd_sequential_requests_pay_one_seek():
    m = HDDModel(seek_ms=8, rotation_ms=4, mb_per_s=100)
    t = 0.0
    for i in range(100):
        t = m.schedule("a", i * 100_000, 100_000, now=0.0)
    assert m.seeks == 1
    # 10 MB at 100 MB/s + one seek and rotation
    assert t == pytest.approx(0.1 + 0.012)


def test_hdd_random_requests_pay_seek_each_time():
    m = HDDModel(seek_ms=8, rotation_ms=4, mb_per_s=100, near_bytes=1 << 20)
    t = 0.0
    for i in range(10):
        t = m.schedule("a", (i * 7919 % 10) * (50 << 20), 110_000, now=0.0)
    assert m.seeks == 10
    assert t == pytest.approx(10 * (0.012 + 0.0011))


def test_hdd_another_file_is_a_seek_and_small_reordering_is_not():
    m = HDDModel(seek_ms=8, rotation_ms=4, mb_per_s=100, near_bytes=512 * KB)
    m.schedule("a", 0, 128 * KB, 0.0)
    m.schedule("a", 256 * KB, 128 * KB, 0.0)  # skips 128 KiB forward: paid as transfer
    m.schedule("a", 128 * KB, 128 * KB, 0.0)  # just behind the head: track cache
    m.schedule("a", 384 * KB, 128 * KB, 0.0)  # head stayed at 384 KiB: contiguous
    assert m.seeks == 1
    expected = 0.012 + (128 * KB * 5) / 100e6
    assert m.busy_until == pytest.approx(expected)
    m.schedule("b", 512 * KB, 128 * KB, 0.0)  # same offset range, other file
    assert m.seeks == 2


def test_hdd_one_actuator_serialises_and_idles():
    m = HDDModel(seek_ms=10, rotation_ms=0, mb_per_s=100)
    assert m.schedule("a", 0, 1_000_000, now=0.0) == pytest.approx(0.02)
    # arrives while the first is in service: waits
    assert m.schedule("b", 0, 1_000_000, now=0.005) == pytest.approx(0.04)
    # arrives when the disk is idle: starts at once
    assert m.schedule("c", 0, 1_000_000, now=1.0) == pytest.approx(1.02)
    assert m.open("c", 2.0) == 2.0


def test_nfs_overlaps_round_trips_but_shares_the_link():
    m = NFSModel(rtt_ms=1, mb_per_s=100, in_flight=4)
    ends = [m.schedule("a", i * 10_000, 10_000, now=0.0) for i in range(4)]
    # all four round trips overlap; payloads (0.1 ms each) follow one another on the link
    assert ends == pytest.approx([0.0011, 0.0012, 0.0013, 0.0014])
    # a fifth waits for a free slot (the first frees at 1.1 ms)
    assert m.schedule("a", 40_000, 10_000, 0.0) == pytest.approx(0.0011 + 0.0011)


def test_nfs_large_requests_reach_link_bandwidth_small_ones_do_not():
    big = NFSModel(rtt_ms=0.5, mb_per_s=110, in_flight=8)
    t = max(big.schedule("a", i << 20, 1 << 20, 0.0) for i in range(200))
    assert (200 << 20) / t / 1e6 == pytest.approx(110, rel=0.01)
    one = NFSModel(rtt_ms=0.5, mb_per_s=110, in_flight=1)  # synchronous small reads
    t = max(one.schedule("a", i * 4096, 4096, 0.0) for i in range(200))
    assert 200 * 4096 / t / 1e6 < 10
    assert one.open("x", 5.0) == pytest.approx(5.0005)


@pytest.mark.parametrize("kw", [dict(mb_per_s=0), dict(seek_ms=-1)])
def test_hdd_bad_parameters_name_the_value(kw):
    with pytest.raises(ValueError, match="mb_per_s=|seek_ms="):
        HDDModel(**kw)


def test_nfs_bad_parameters():
    with pytest.raises(ValueError, match="in_flight=0"):
        NFSModel(in_flight=0)


@pytest.mark.fuse
def test_fuse_round_trip(tmp_path):
    reason = slowfs.fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE unavailable: {reason}")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    payload = os.urandom(3 << 20)
    (src / "sub" / "a.bin").write_bytes(payload)
    (src / "b.txt").write_text("hello")
    mnt = str(tmp_path / "mnt")
    args = ["--seek-ms", "20", "--rotation-ms", "0", "--mb-per-s", "100"]
    try:
        with slowfs.mounted(str(src), mnt, "hdd", args) as stats:
            assert os.path.ismount(mnt)
            assert sorted(os.listdir(mnt)) == ["b.txt", "sub"]
            t0 = time.monotonic()
            with open(os.path.join(mnt, "sub", "a.bin"), "rb") as f:
                assert f.read() == payload
            elapsed = time.monotonic() - t0
            with pytest.raises(OSError):
                open(os.path.join(mnt, "b.txt"), "w")
            raise KeyError("body fails")  # the mount must still go away
    except KeyError:
        pass
    else:
        pytest.fail("the body's exception was swallowed")
    assert not os.path.ismount(mnt)
    assert stats["bytes"] == len(payload)
    assert stats["seeks"] >= 1
    # the modelled time (20 ms + 3 MiB at 100 MB/s = 51 ms) is a lower bound of the read
    assert elapsed >= 0.02 + len(payload) / 100e6 - 0.005


def test_hdd_elevator_serves_the_stream_under_the_head_then_the_oldest():
    m = HDDModel(near_bytes=1 << 20)
    m.schedule("a", 0, 128 * KB, 0.0)  # head now at ("a", 128 KiB)
    pending = [("b", 0, 128 * KB, 0.00), ("a", 50 << 20, 128 * KB, 0.01),
               ("a", 256 * KB, 128 * KB, 0.02), ("a", 128 * KB, 128 * KB, 0.03)]
    assert m.pick(pending, now=0.05) == 3  # exactly at the head
    del pending[3]
    assert m.pick(pending, now=0.05) == 2  # 128 KiB ahead: still no seek
    del pending[2]
    assert m.pick(pending, now=0.05) == 0  # nothing near: the oldest
    # a request waiting past the deadline goes first once the current run is 16 long
    late = [("a", 128 * KB, 128 * KB, 0.9), ("b", 0, 128 * KB, 0.0)]
    m.streak = 0
    assert [m.pick(late, now=1.0) for _ in range(16)] == [0] * 16
    assert m.pick(late, now=1.0) == 1
    assert NFSModel().pick(late, now=1.0) == 1  # NFS: arrival order
    wide = HDDModel(fifo_batch=40)  # --fifo-batch: longer runs before the expired request
    wide.schedule("a", 0, 128 * KB, 0.0)
    assert [wide.pick(late, now=1.0) for _ in range(40)] == [0] * 40
    assert wide.pick(late, now=1.0) == 1
    with pytest.raises(ValueError, match="fifo_batch=0"):
        HDDModel(fifo_batch=0)


# --- the arrival-order HDD (hdd-fifo): no reordering, any backward or far move a seek --------
LAYOUT = {"/a": 0, "/b": 100_000, "/c": 200_000, "/far": 500 << 20}  # files back to back


def test_fifo_sequential_reads_cost_transfer_only():
    m = ArrivalHDDModel(seek_ms=8, rotation_ms=4, mb_per_s=100, base=LAYOUT)
    t = [m.schedule(k, 0, 100_000, now=0.0) for k in ("/a", "/b", "/c")]
    t.append(m.schedule("/c", 100_000, 50_000, now=0.0))  # the next piece of /c: contiguous
    assert m.seeks == 1  # the first request only
    assert t == pytest.approx([0.012 + 0.001, 0.014, 0.015, 0.0155])
    # a forward gap within the near window (64 KiB) is paid as transfer, not a seek
    m.schedule("/far", 0, 10_000, now=1.0)
    m.schedule("/far", 10_000 + 60_000, 10_000, now=1.0)
    assert m.seeks == 2 and m.busy_until == pytest.approx(1.0 + 0.012 + 0.0002 + 0.0006)


def test_fifo_backward_and_far_moves_cost_a_seek():
    m = ArrivalHDDModel(seek_ms=8, rotation_ms=4, mb_per_s=100, base=LAYOUT)
    m.schedule("/b", 0, 100_000, now=0.0)
    m.schedule("/a", 0, 100_000, now=0.0)  # backward: the neighbour before, a whole seek
    assert m.seeks == 2
    m.schedule("/a", 50_000, 4096, now=0.0)  # backward within the same file: a seek too
    assert m.seeks == 3
    m.schedule("/b", 0, 100_000, now=0.0)  # 45,904 B past the head: within 64 KiB, no seek
    assert m.seeks == 3
    m.schedule("/c", 100_000, 1000, now=0.0)  # 100 KB forward: beyond the near window
    assert m.seeks == 4
    assert m.busy_until == pytest.approx(4 * 0.012 + (3 * 100_000 + 4096 + 45_904 + 1000)
                                         / 100e6)
    # the HDD model takes the same backward step from its track cache
    h = HDDModel(seek_ms=8, rotation_ms=4, mb_per_s=100)
    h.schedule("a", 100_000, 100_000, 0.0)
    h.schedule("a", 0, 100_000, 0.0)
    assert h.seeks == 1


def test_fifo_two_interleaved_streams_seek_at_every_switch():
    m = ArrivalHDDModel(seek_ms=8, rotation_ms=4, mb_per_s=100)  # no layout: files apart
    for i in range(10):
        m.schedule("x", i * 131072, 131072, now=0.0)
        m.schedule("y", i * 131072, 131072, now=0.0)
    assert m.seeks == 20
    one = ArrivalHDDModel(seek_ms=8, rotation_ms=4, mb_per_s=100)
    for k in ("x", "y"):  # the same requests, one stream after the other
        for i in range(10):
            one.schedule(k, i * 131072, 131072, now=0.0)
    assert one.seeks == 2
    assert m.busy_until - one.busy_until == pytest.approx(18 * 0.012)


def test_fifo_serves_in_arrival_order_never_the_nearest():
    m = ArrivalHDDModel(base=LAYOUT)
    m.schedule("/a", 0, 100_000, 0.0)  # head at the end of /a, /b is next on the platter
    pending = [("/c", 0, 100_000, 0.010), ("/b", 0, 100_000, 0.011), ("/far", 0, 10, 0.002)]
    assert m.pick(pending, now=0.02) == 2  # the oldest, far away
    del pending[2]
    assert m.pick(pending, now=0.02) == 0  # /c before /b: it came first
    assert HDDModel().pick([("a", 0, 10, 0.0), ("b", 0, 10, 0.0)], 0.0) in (0, 1)


def test_fifo_is_selected_by_device_and_keeps_the_other_defaults():
    import argparse

    p = argparse.ArgumentParser()
    slowfs.add_model_args(p)
    fifo = slowfs.make_model(p.parse_args(["--device", "hdd-fifo"]))
    assert isinstance(fifo, ArrivalHDDModel) and fifo.name == "hdd-fifo"
    assert fifo.near_bytes == 64 * KB and fifo.seek_s == 0.008
    assert slowfs.make_model(p.parse_args(["--device", "hdd-fifo", "--near-kb", "8"])
                             ).near_bytes == 8 * KB
    hdd = slowfs.make_model(p.parse_args([]))  # the default device and near window: unchanged
    assert type(hdd) is HDDModel and hdd.near_bytes == 1024 * KB and hdd.fifo_batch == 16
    assert isinstance(slowfs.make_model(p.parse_args(["--device", "nfs"])), NFSModel)
    with pytest.raises(ValueError, match="near_bytes=-1"):
        ArrivalHDDModel(near_bytes=-1)


@pytest.mark.fuse
def test_fuse_fifo_counts_backward_and_far_moves(tmp_path):
    """Through the mount: one thread's uncached 4 KiB reads (POSIX_FADV_RANDOM: no kernel
    readahead) reach the model one at a time; backward and far moves are the seeks."""
    reason = slowfs.fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE unavailable: {reason}")
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(4 << 20)
    (src / "a.bin").write_bytes(payload)
    mnt = str(tmp_path / "mnt")
    with slowfs.mounted(str(src), mnt, "hdd-fifo", ["--seek-ms", "1", "--rotation-ms", "0"]
                        ) as stats:
        fd = os.open(os.path.join(mnt, "a.bin"), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            at = [1 << 20, 0, 2 << 20, (2 << 20) + 4096, (2 << 20) + 8192]
            got = [os.pread(fd, 4096, off) for off in at]
        finally:
            os.close(fd)
    assert got == [payload[off:off + 4096] for off in at]
    assert stats["device"] == "hdd-fifo" and stats["requests"] == 5
    assert stats["seeks"] == 3  # the first, back to 0, forward 2 MiB; then contiguous


def test_models_serve_the_kernels_order_when_threads_reach_python_out_of_order():
    # pending as the emulator keeps it, in the kernel's order (ids 2, 4, 6): id 4 reached
    # Python first, id 2 last; each counts as queued no later than any the kernel queued after
    pending = [["/f", 0, 10, 0.30, None, (2, 3)], ["/f", 10, 10, 0.10, None, (4, 1)],
               ["/f", 20, 10, 0.20, None, (6, 2)]]
    seen = slowfs._in_queue_order(pending)
    assert seen == [("/f", 0, 10, 0.10), ("/f", 10, 10, 0.10), ("/f", 20, 10, 0.20)]
    for model in (ArrivalHDDModel(), NFSModel(), HDDModel()):
        assert model.pick(seen, now=0.4) == 0, model.name  # the kernel's first, not Python's
    m = ArrivalHDDModel(seek_ms=8, rotation_ms=4, mb_per_s=100)
    while pending:
        r = pending.pop(m.pick(slowfs._in_queue_order(pending), now=0.4))
        m.schedule(r[0], r[1], r[2], now=0.4)
    assert m.seeks == 1  # one stream
    assert slowfs._in_queue_order([]) == []


def test_order_option_defaults_to_the_kernels():
    import argparse

    p = argparse.ArgumentParser()
    slowfs.add_model_args(p)
    assert p.parse_args([]).order == "kernel"
    assert p.parse_args(["--order", "arrival"]).order == "arrival"
    with pytest.raises(SystemExit):
        p.parse_args(["--order", "elevator"])


@pytest.mark.fuse
def test_fuse_fifo_serves_hinted_read_ahead_in_the_kernels_order(tmp_path, monkeypatch):
    """Read-ahead hinted in order as ``read/readahead.py`` does (``posix_fadvise(WILLNEED)``,
    128 KiB a call): the kernel queues every request at once, numbered in the hints' order;
    the emulator's threads reach Python in another order, yet hdd-fifo serves the kernel's:
    one stream, not a positioning per swapped neighbour."""
    reason = slowfs.fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE unavailable: {reason}")
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(4 << 20)  # 32 requests: with --order arrival, 16-23 positionings
    (src / "a.bin").write_bytes(payload)
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("SLOWFS_TRACE", str(trace))
    mnt = str(tmp_path / "mnt")
    # a slow device (65 ms per request): every hinted request reaches Python long before the
    # device is ready for it, whatever the machine's load
    with slowfs.mounted(str(src), mnt, "hdd-fifo",
                        ["--seek-ms", "1", "--rotation-ms", "0", "--mb-per-s", "2"]) as stats:
        fd = os.open(os.path.join(mnt, "a.bin"), os.O_RDONLY)
        try:
            for off in range(0, len(payload), 128 * KB):
                os.posix_fadvise(fd, off, 128 * KB, os.POSIX_FADV_WILLNEED)
            got = os.pread(fd, len(payload), 0)  # waits for the hinted reads
        finally:
            os.close(fd)
    assert got == payload
    rows = [line.split(" ") for line in trace.read_text().splitlines()]
    assert len(rows) == stats["requests"] == 32 and all(r[5] == "/a.bin" for r in rows)
    ids = [int(r[4]) for r in rows]
    assert len(set(ids)) == 32 and min(ids) > 0
    # the kernel numbered the requests in the order of the hints
    by_id = sorted(rows, key=lambda r: int(r[4]))
    assert [int(r[2]) for r in by_id] == list(range(0, len(payload), 128 * KB))
    # served (completion order) in that order but perhaps the first: the device was idle when
    # the first request reached Python, and took it at once (at most 3 positionings then)
    served = [int(r[2]) for r in sorted(rows, key=lambda r: float(r[1]))]
    assert served[1:] == sorted(served[1:]) or served[2:] == sorted(served[2:])
    assert stats["seeks"] <= 3


def test_trace_summary_tells_the_emulators_swaps_from_the_readers_moves(tmp_path):
    import slowfs_trace

    log = tmp_path / "trace.txt"
    # the kernel queued 0, 128, 256, 384 KiB (ids 10..16), then 50 MiB on (id 18); the device
    # served 128 KiB before 0: two positionings as served that the kernel's order has not
    rows = [(0.0, 0.02, 128 * KB, 12), (0.0, 0.03, 0, 10), (0.0, 0.04, 256 * KB, 14),
            (0.0, 0.05, 384 * KB, 16), (0.1, 0.2, 50 << 20, 18)]
    log.write_text("".join(f"{a} {d} {off} {128 * KB} {uid} /my file\n"
                           for a, d, off, uid in rows))
    s = slowfs_trace.summary(slowfs_trace.load(str(log)), 64 * KB)
    assert s["requests"] == 5 and s["served_out_of_kernel_order"] == 1
    assert s["served"]["positionings"] == 4 and s["served"]["backward"] == 1
    assert s["kernel_order"]["positionings"] == 2 and s["kernel_order"]["forward_far"] == 1
    # a window by completion time; a log without ids (older slowfs) has no kernel order
    assert slowfs_trace.summary(slowfs_trace.load(str(log), (0.025, 0.1)), 64 * KB
                                )["requests"] == 3
    old = tmp_path / "old.txt"
    old.write_text("0.0 0.1 0 4096 /a b\n")
    assert slowfs_trace.load(str(old))[0][4:] == (-1, "/a b")
    assert "kernel_order" not in slowfs_trace.summary(slowfs_trace.load(str(old)), 64 * KB)


# --- slow_disk.py plumbing (no FUSE needed) --------------------------------------------------
def test_measure_sets_prefetch_bytes_in_the_measuring_process(sample_lmdb):
    import json
    import subprocess

    lmdb_file = os.path.join(str(sample_lmdb), "ILSVRC-train.lmdb")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "slow_disk.py")
    got = {}
    for mb in (None, 32):
        cmd = [sys.executable, script, "_measure", "stream", lmdb_file, "5", "0"]
        cmd += [] if mb is None else [f"--prefetch-mb={mb}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
        got[mb] = json.loads(line[7:])
        assert got[mb]["images"] == 48  # the whole sample split, streamed once
    from imagenet_seq.read import readahead

    assert got[None]["prefetch_bytes"] == readahead.PREFETCH_BYTES
    assert got[32]["prefetch_bytes"] == 32 << 20


def _fake(kind, device, mb_per_s, ranks=0, prefetch_mb=16, chunk=256):
    return dict(kind=kind, device=device, ranks=ranks, prefetch_mb=prefetch_mb, chunk_size=chunk,
                images=1000, bytes=int(mb_per_s * 1e7), seconds=10.0, images_per_s=mb_per_s * 10,
                mb_per_s=mb_per_s, hours_imagenet=1e4 / mb_per_s,
                device_stats={"requests": 10, "seeks": 2} if device == "hdd" else {"requests": 9})


def test_report_marks_targets_and_tabulates_settings(tmp_path):
    import argparse

    import slow_disk_report as rep

    res = [_fake("folder", "hdd", 3), _fake("loader", "hdd", 60), _fake("stream", "hdd", 140),
           _fake("stream", "nfs", 100), _fake("rank", "hdd", 80, ranks=4),
           _fake("rank", "hdd", 130, ranks=4, prefetch_mb=64, chunk=1024),
           _fake("rank", "hdd", 120, ranks=2, prefetch_mb=64, chunk=1024)]
    args = argparse.Namespace(out=str(tmp_path), argv=["--seconds", "1"], devices=["hdd", "nfs"],
                              bandwidth={"hdd": 150e6, "nfs": 110e6}, prefetch_mb=[16, 64],
                              chunk_size=[256, 1024])
    got = {what: (value, ok) for what, value, ok in rep.targets(res, args)}
    stream = got["raw streaming >= 90 % of the emulated HDD's bandwidth"]
    assert stream[0].startswith("93.3 %") and stream[1]
    full = [v for k, v in got.items() if k.startswith("full pipeline")][0]
    assert full[0].startswith("20.0x") and not full[1]
    four = {k: v for k, v in got.items() if k.startswith("4 ranks")}
    assert four["4 ranks on one emulated HDD >= 80 % of its bandwidth"] == ("53.3 % (80.0 MB/s)",
                                                                           False)
    assert four["4 ranks on one emulated HDD >= 80 % of its bandwidth "
                "[read-ahead 64 MB, chunk 1024 records]"][1]
    md = open(rep.write_report(res, args, {"machine": "test"})).read()
    assert "| emulated HDD (7,200 rpm) | 3,333 h | 167 h | 71 h |" in md  # no "original" run
    assert "| emulated NFS (1 GbE) | - | - | 100 h |" in md
    assert "(MISSED)" in md and "(met)" in md
    assert "| 64 MB | 1024 (" in md and "| 80 % | 87 % |" in md


def test_report_merges_repeated_runs_into_their_mean(tmp_path):
    import json

    import slow_disk_report as rep

    args = {"argv": ["--seconds", "1"], "devices": ["hdd"], "bandwidth": {"hdd": 150e6},
            "prefetch_mb": [16], "chunk_size": [256]}
    paths = []
    for i, mb in enumerate((120, 150)):
        paths.append(str(tmp_path / f"run{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump({"results": [_fake("stream", "hdd", mb)], "args": args,
                       "setup": {"load average": str(i), "machine": "m"}}, f)
    assert rep.main(paths + ["--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "slow_disk.md").read_text()
    assert "**90.0 % (135.0 of 150 MB/s; mean of 2 runs: 80 %, 100 %)** (met)" in md
    assert "- load average: run 1: 0; run 2: 1" in md and "- machine: m" in md
    merged = json.loads((tmp_path / "out" / "slow_disk.json").read_text())
    assert [r["run"] for r in merged["results"]] == [1, 2]
    assert rep.main([str(tmp_path / "missing.json")]) == 2
