"""``imagenet-seq-bench ROOT --advise`` through the real CLI: behind the FUSE slow-disk
emulator (the disk must be named the limit and no prediction may beat it), its table, its JSON,
and bad input (clear messages, exit 2, no traceback)."""
import json
import os
import subprocess
import sys

import pytest

from imagenet_seq.tools import bench

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = [sys.executable, "-m", "imagenet_seq.tools.bench"]
MB_PER_S = 4.0  # the emulated HDD: ~45 images/s of these ~90 KB JPEGs; the CPU decodes more
ROW_KEYS = {"section", "choice", "max_size", "quality", "workers", "worker_type", "ranks",
            "mean_record_kb", "cpu_images_per_s", "disk_images_per_s", "epoch_s", "hours",
            "disk_epoch_s", "cpu_epoch_s", "device_floor_s", "fill_s", "limit",
            "buffer_records", "memory_gb", "conversion_hours"}


def _split(root, per_class):
    """ImageNet-like 500x375 JPEGs (8 classes x ``per_class``) converted by preprocess."""
    from imagenet_seq.convert.cli import main as preprocess
    from imagenet_seq.tools.sample import make_sample_imagefolder

    src = os.path.join(root, "src")
    make_sample_imagefolder(src, train_per_class=per_class, val_per_class=0)
    out = os.path.join(root, "lmdb")
    assert preprocess([src, out, "--splits", "train", "--workers", "0", "--no-progress"]) == 0
    return src, out


def _advise(argv, timeout=240):
    out = subprocess.run(BENCH + argv + ["--advise"], capture_output=True, text=True,
                         timeout=timeout)
    return out


@pytest.fixture(scope="module")
def split64(tmp_path_factory):
    return _split(str(tmp_path_factory.mktemp("advise")), 8)


@pytest.fixture(scope="module")
def behind_hdd(split64, tmp_path_factory):
    """--advise --json (and --plot) on the split behind the emulated HDD."""
    sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
    import slowfs

    reason = slowfs.fuse_unavailable_reason()
    if reason:
        pytest.skip(f"FUSE unavailable: {reason}")
    tmp = tmp_path_factory.mktemp("advise_hdd")
    mnt, plot = str(tmp / "mnt"), str(tmp / "advice.png")
    with slowfs.mounted(split64[1], mnt, "hdd", ["--mb-per-s", str(MB_PER_S)]) as stats:
        out = _advise([mnt, "--seconds", "3", "--epochs", "90", "--workers", "2", "--json"]
                      + (["--plot", plot] if _has_matplotlib() else []))
    assert out.returncode == 0, out.stderr[-3000:]
    assert stats["bytes"] > 0  # the reads went through the emulated device
    return json.loads(out.stdout), plot


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.fuse
@pytest.mark.slow
def test_the_emulated_hdd_limits_and_no_prediction_beats_it(behind_hdd):
    r, _ = behind_hdd
    disk = r["measured"]["disk"]
    assert disk["page_cache_evicted"] is True
    assert disk["mb_per_s"] <= 1.15 * MB_PER_S  # the measured rate is the device's
    assert r["measured"]["far_move"]["far_move_ms"] > 5  # 8 ms seek + 4.17 ms rotation
    as_is = r["rows"][0]
    assert as_is["choice"] == "stored as is" and as_is["limit"] == "disk"
    for row in r["rows"]:
        # never faster than the disk's measured rate, nor than the emulated device's
        floor = r["records"] * row["mean_record_kb"] * 1e3 / (disk["mb_per_s"] * 1e6)
        assert row["epoch_s"] >= floor * 0.999, row
        assert row["epoch_s"] >= r["records"] * row["mean_record_kb"] * 1e3 / \
            (MB_PER_S * 1e6) * 0.85, row
        assert row["hours"] == pytest.approx(row["epoch_s"] * 90 / 3600)
    # 500x375 images: --max-size 500 keeps them, 320 re-encodes every one smaller
    sizes = {row["max_size"]: row for row in r["rows"] if row["section"] == "size"}
    assert sizes[500]["mean_record_kb"] == pytest.approx(as_is["mean_record_kb"], rel=0.01)
    assert sizes[320]["mean_record_kb"] < 0.7 * as_is["mean_record_kb"]
    assert sizes[320]["epoch_s"] < as_is["epoch_s"]  # the disk moves fewer bytes
    # a 64-record split is small: said, with what the figures rest on
    assert r["rests_on"]["small"] is True
    assert any("a small split: 64 records" in w for w in r["warnings"])


@pytest.mark.fuse
@pytest.mark.slow
def test_json_schema(behind_hdd):
    r, plot = behind_hdd
    assert {"path", "split", "records", "epochs", "world_size", "workers", "batch_size",
            "runtime", "gpu", "warnings", "notes", "measured", "mean_record_kb", "rests_on",
            "rows", "recommendation"} <= set(r)
    assert r["records"] == 64 and r["epochs"] == 90 and r["gpu"] == "unknown"
    m = r["measured"]
    assert {"disk", "plan_read", "far_move", "cpu", "sizes"} <= set(m) and "source" not in m
    assert m["plan_read"]["whole_epoch"] is True and m["plan_read"]["images"] == 64
    assert {"mb_per_s", "images", "seconds", "page_cache_evicted", "method"} <= set(m["disk"])
    cpu = m["cpu"]
    for key in ("one_worker", "one_worker_no_crop_decode", "threads", "processes"):
        assert cpu[key]["images_per_s"] > 0 and cpu[key]["images"] > 0
    assert cpu["threads"]["workers"] == cpu["processes"]["workers"] == 2
    for n in ("500", "400", "320"):
        s = m["sizes"][n]
        assert s["quality"] == 90 and 0 < s["bytes_ratio"] <= 1.05 and s["decode_ratio"] > 0
    assert [row["section"] for row in r["rows"]][:4] == ["size"] * 4
    assert {row["section"] for row in r["rows"]} == {"size", "workers"}  # --world-size 1
    for row in r["rows"]:
        assert set(row) == ROW_KEYS
        assert row["limit"] in ("disk", "CPU") and row["conversion_hours"] is None
        assert row["memory_gb"] > 0
    rec = r["recommendation"]
    assert ROW_KEYS | {"saves_hours"} <= set(rec)
    assert rec["workers"] >= 1 and rec["epoch_s"] >= rec["device_floor_s"]
    if _has_matplotlib():
        with open(plot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_table_with_ranks_and_source(split64):
    src, lmdb = split64
    ncpu = len(os.sched_getaffinity(0))
    out = _advise([lmdb, "--seconds", "1", "--epochs", "10", "--world-size", str(ncpu),
                   "--source", src])
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "Traceback" not in out.stderr
    lines = text.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith("choice"))
    assert lines[head].split() == ["choice", "epoch", "10", "epochs", "convert", "memory",
                                   "limit"]
    body = lines[head + 2:]
    for section in ("how the set is stored", "decode workers", "ranks on this machine"):
        assert any(x.startswith(section) for x in body), section
    for choice in ("stored as is", "--max-size 500 --quality 90", "--max-size 400 --quality 90",
                   "--max-size 320 --quality 90", "worker process"):
        row = next(x for x in body if choice in x)
        assert row.rstrip().endswith(("disk", "CPU")), row
    # with --source every size row has conversion hours
    for x in body[:5]:
        if "stored as is" in x or "--max-size" in x:
            assert " - " not in x, x
    if ncpu > 1:
        assert any(f"{ncpu} ranks" in x for x in body)
    assert "measured:" in text and "source: " + src in text
    rec = next(x for x in lines if x.startswith("recommendation: "))
    assert "per epoch" in rec and "limited by the" in rec
    assert any(x.strip().startswith("Loader(") for x in lines)
    if "--max-size" in rec:  # a re-encode recommended: the cost in pixels said plainly
        assert "no longer gives torchvision's pixels" in text
        assert any(x.strip().startswith(f"imagenet-seq-preprocess {src}") for x in lines)
    assert "WARNING: a small split: 64 records" in text
    assert "GPU is not measured" in text


# --- bad input: exit 2, a message naming the value and the fix, never a traceback ----------
def test_root_without_a_split(tmp_path, capsys):
    assert bench.main([str(tmp_path), "--advise"]) == 2
    err = capsys.readouterr().err
    assert "not an LMDB folder written by imagenet-seq-preprocess" in err
    assert "ILSVRC-train.lmdb" in err and str(tmp_path) in err


def test_world_size_above_the_cpus(split64, capsys):
    n = len(os.sched_getaffinity(0))
    assert bench.main([split64[1], "--advise", "--world-size", str(n + 1)]) == 2
    err = capsys.readouterr().err
    assert f"--world-size={n + 1} is above this machine's {n} CPU" in err
    assert f"--world-size {n} or less" in err
    assert bench.main([split64[1], "--advise", "--world-size", "0"]) == 2
    assert "--world-size=0" in capsys.readouterr().err


def test_split_too_small_to_measure(tmp_path):
    _, lmdb = _split(str(tmp_path), 1)  # 8 records
    out = _advise([lmdb, "--seconds", "1"], timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "holds 8 record(s)" in out.stderr and "at least 32" in out.stderr
    assert "convert more images" in out.stderr


def test_unreadable_disk(split64, monkeypatch, capsys):
    import errno

    from imagenet_seq.read.shard_file import ShardFile

    def broken(self, start, count):
        raise OSError(errno.EIO, "Input/output error")
        yield

    monkeypatch.setattr(ShardFile, "read_range", broken)
    assert bench.main([split64[1], "--advise", "--seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert "reading" in err and "failed: [Errno 5] Input/output error" in err
    assert "check the disk" in err


def test_source_not_a_folder(split64, tmp_path, capsys):
    # said before any measuring (a minute), not after
    assert bench.main([split64[1], "--advise", "--source", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert f"--source {str(tmp_path / 'nope')!r} is not a folder" in err


def test_source_without_images(tmp_path):
    from imagenet_seq.tools.advise_measure import measure_source
    from imagenet_seq.tools.bench_measure import BenchError

    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("x")
    with pytest.raises(BenchError, match="holds no images"):
        measure_source(str(tmp_path), 1.0)


# --- the model alone (no I/O): the epoch is never below the device, and its two regimes ------
def test_epoch_model():
    from imagenet_seq.tools.advise_model import epoch_seconds

    # 1000 records of 100 KB at 10 MB/s: 10 s of disk; CPU 1000 img/s: 1 s
    big = epoch_seconds(1000, 100e3, 10e6, 0.0, 1000.0, buffer=100, chunks=1)
    assert big["limit"] == "disk" and big["device_floor_s"] == pytest.approx(10.0)
    assert big["epoch_s"] == pytest.approx(10.0 + 100 / 1000)  # the buffer's decode after
    # a split that fits the buffer is read whole, then decoded: the sum
    fits = epoch_seconds(1000, 100e3, 10e6, 0.0, 1000.0, buffer=5000, chunks=1)
    assert fits["epoch_s"] == pytest.approx(11.0)
    # CPU-bound: the fill (its share of the disk time) then decoding everything
    cpu = epoch_seconds(1000, 100e3, 100e6, 0.0, 100.0, buffer=100, chunks=1)
    assert cpu["limit"] == "CPU" and cpu["epoch_s"] == pytest.approx(0.1 + 10.0)
    # far moves: one per chunk, added to the disk's time, never below the floor
    far = epoch_seconds(1000, 100e3, 10e6, 0.012, 1e9, buffer=0, chunks=32)
    assert far["epoch_s"] == pytest.approx(10.0 + 32 * 0.012)
    assert far["epoch_s"] >= far["device_floor_s"]
