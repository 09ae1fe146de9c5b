"""benchmarks/node_reader.py in its tiny mode (every row, both devices), and the emulator's
request log it counts the device's window from."""
import json
import os
import subprocess
import sys
import threading

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import slowfs  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def _need_fuse():
    reason = slowfs.fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE unavailable: {reason}")


@pytest.mark.fuse
def test_request_log_is_whole_under_concurrent_reads(tmp_path, monkeypatch):
    _need_fuse()
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(6 << 20)
    (src / "f").write_bytes(payload)
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("SLOWFS_TRACE", str(trace))
    got = {}

    def read(k):
        with open(os.path.join(mnt, "f"), "rb") as f:
            f.seek(k << 20)
            got[k] = f.read(1 << 20)
    mnt = str(tmp_path / "mnt")
    with slowfs.mounted(str(src), mnt, "hdd", ["--mb-per-s", "200"]) as stats:
        threads = [threading.Thread(target=read, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert b"".join(got[k] for k in range(6)) == payload
    lines = trace.read_bytes().decode("ascii").splitlines()  # no foreign bytes in it
    assert len(lines) == stats["requests"] > 0  # nothing of it lost at unmount
    rows = [line.split(" ") for line in lines]
    # arrival, done, offset, size, the kernel's request id, path
    assert all(len(r) == 6 and r[5] == "/f" and float(r[1]) >= float(r[0]) for r in rows)
    assert len({r[4] for r in rows}) == len(rows)  # one request id each
    assert sum(int(r[3]) for r in rows) == stats["bytes"]


@pytest.mark.fuse
@pytest.mark.slow
def test_tiny_run_has_every_row(tmp_path):
    _need_fuse()
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "node_reader.py"), "--tiny",
         "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "node_reader.json").read_text())
    assert result["failed"] == []
    rows = {(r["device"], r["reader"], r["ranks"]): r for r in result["rows"]}
    want = {(d, "dd", 0) for d in ("hdd", "nfs")} | {
        (d, how, n) for d in ("hdd", "nfs") for how in ("per-rank", "node") for n in (1, 2, 4, 8)}
    assert set(rows) == want
    for key, r in rows.items():
        assert r["mb_per_s"] >= 0 and r["device_mb_per_s"] >= 0, key
        assert "share_of_dd" in r, key
        assert r["device_stats"]["bytes"] > 0, key  # the reads went through the emulator
        if key[1] != "dd":
            assert len(r["per_rank_mb_per_s"]) == key[2], key
            assert r["reader_cpu_s_per_mb"] >= 0 and r["total_cpu_s_per_mb"] >= 0, key
        if key[1] == "node":
            assert r["node_reader_processes"] == 1, key  # every rank used the one reader
    table = (out / "node_reader.md").read_text()
    for how in ("node reader", "per-rank readers"):  # one row per device
        assert table.count(f"| 8 | {how} | ") == 2, table
    # no failed row or device (the commit subject in the header may say anything)
    assert "## Goals (issue 24)" in table and "## Failed" not in table
    assert "| failed |" not in table and "`dd`: failed." not in table
