"""The slow-device emulator: cost models without FUSE, and one FUSE round trip where FUSE works."""
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import slowfs  # noqa: E402
from slowfs import HDDModel, NFSModel  # noqa: E402

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
