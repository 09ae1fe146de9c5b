"""The converter's memory bound (issue 26, item 7): the accounting in ``passes``, a folder's
scan refused before its file list outgrows ``--memory-mb`` (``scan.ScanLimit``), and
``benchmarks/convert_memory.py`` producing its report."""
import json
import os
import subprocess
import sys

import pytest

from imagenet_seq.convert import cli, passes
from imagenet_seq.convert.scan import ScanError, scan_split
from imagenet_seq.tools.sample import make_sample_imagefolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks", "convert_memory.py")


def _tree(root, per_class, classes=3, val_per_class=0):
    """Files named as images (a scan reads no data): ``per_class`` in each of ``classes``."""
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d, exist_ok=True)
            for k in range(n):
                with open(os.path.join(d, f"{k}.jpg"), "wb") as f:
                    f.write(b"x")
    return [f"c{c}" for c in range(classes)]


def _memory_for(files, workers=1):
    """A --memory-mb in bytes that leaves room for exactly ``files`` listed files."""
    return passes.fixed_bytes(workers) + passes.MIN_BUFFER + files * passes.PER_IMAGE_BYTES


# -- accounting ------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1, 2, 16])
def test_fixed_part_grows_by_the_per_image_and_per_record_cost(workers):
    base = passes.fixed_bytes(workers)
    assert passes.fixed_bytes(workers, images=1000) - base == 1000 * passes.PER_IMAGE_BYTES
    assert passes.fixed_bytes(workers, records=1000) - base == 1000 * passes.PER_RECORD_BYTES
    assert passes.fixed_bytes(workers + 1) - base == (
        passes.WORKER_BYTES + passes.WINDOW * passes.CHUNK_BYTES) * (workers > 0)


@pytest.mark.parametrize("memory_mb, workers", [(2000, 2), (1000, 2), (400, 1), (8000, 16)])
def test_most_images_is_the_largest_count_the_buffer_allows(memory_mb, workers):
    memory = memory_mb * 1_000_000
    most = passes.most_images(memory, workers)
    assert most > 0
    assert passes.buffer_bytes(memory, workers, most) >= passes.MIN_BUFFER
    with pytest.raises(ValueError) as e:
        passes.buffer_bytes(memory, workers, most + 1)
    msg = str(e.value)
    need = passes.least_memory_mb(workers, most + 1)
    assert f"expected at least {need} with --workers {workers} and {most + 1} images" in msg
    assert "tar" in msg and "WebDataset" in msg, msg
    # the minimum named is enough, and one MB less is not
    assert passes.buffer_bytes(need * 1_000_000, workers, most + 1) >= passes.MIN_BUFFER
    with pytest.raises(ValueError):
        passes.buffer_bytes((need - 1) * 1_000_000, workers, most + 1)


def test_most_images_is_zero_below_the_fixed_part():
    assert passes.most_images(100_000_000, 2) == 0
    assert passes.least_memory_mb(2) == 362  # the up-front refusal's minimum (test_convert_order)


def test_an_archive_is_refused_without_the_folder_advice():
    """No images (an archive): the message names the minimum only."""
    with pytest.raises(ValueError) as e:
        passes.buffer_bytes(100_000_000, 2)
    assert "WebDataset" not in str(e.value) and "expected at least 362" in str(e.value)


# -- the scan's limit ------------------------------------------------------------------------
def test_a_scan_within_the_limit_lists_every_file(tmp_path):
    root = str(tmp_path / "in")
    classes = _tree(root, 10)
    limit = passes.scan_limit(_memory_for(30), 1)
    assert limit.most == 30
    scan = scan_split(root, "train", classes, limit=limit)
    assert len(scan.entries) == 30 and limit.listed == 30


def test_a_scan_past_the_limit_stops_naming_the_count_and_the_ways_out(tmp_path):
    root = str(tmp_path / "in")
    classes = _tree(root, 10)
    memory = _memory_for(25)
    with pytest.raises(ScanError) as e:
        scan_split(root, "train", classes, limit=passes.scan_limit(memory, 1))
    msg = str(e.value)
    assert msg.startswith(os.path.join(root, "train")), msg
    assert "stopped at 26 files" in msg, msg  # stops at the first file past the room
    assert f"--memory-mb {memory // 1_000_000} with --workers 1" in msg, msg
    assert f"need --memory-mb {passes.least_memory_mb(1, 26)} or more" in msg, msg
    assert "grows" in msg and "tar -cf" in msg and "WebDataset shards" in msg, msg


def test_the_limit_counts_every_split_of_the_conversion(tmp_path):
    """train's list is still held while val is scanned: one limit for both."""
    root = str(tmp_path / "in")
    classes = _tree(root, 10, val_per_class=4)
    limit = passes.scan_limit(_memory_for(35), 1)
    assert len(scan_split(root, "train", classes, limit=limit).entries) == 30
    with pytest.raises(ScanError, match="stopped at 36 files"):
        scan_split(root, "val", classes, limit=limit)
    # without a limit (a library caller) nothing is refused
    assert len(scan_split(root, "val", classes).entries) == 12


def test_files_that_are_not_images_count_too(tmp_path):
    """Every file the walk lists is held until the scan ends, images or not."""
    root = str(tmp_path / "in")
    classes = _tree(root, 5)
    for k in range(10):
        with open(os.path.join(root, "train", "c0", f"notes{k}.txt"), "w") as f:
            f.write("x")
    with pytest.raises(ScanError, match="stopped at 21 files"):
        scan_split(root, "train", classes, limit=passes.scan_limit(_memory_for(20), 1))


# -- through the real CLI --------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_the_cli_refuses_a_folder_too_large_for_memory_mb_before_writing(tmp_path, monkeypatch,
                                                                         capsys):
    """A folder whose file list alone passes --memory-mb: a clear error, a non-zero exit,
    nothing written (no .lmdb, no .partial, no runs)."""
    src = str(tmp_path / "src")
    make_sample_imagefolder(src, train_per_class=12, val_per_class=3, num_classes=4, seed=1,
                            size=(32, 24))
    # a per-image cost that makes 48 + 12 images too many for 1000 MB
    monkeypatch.setattr(passes, "PER_IMAGE_BYTES", 20_000_000)
    out = str(tmp_path / "out")
    rc = cli.main([src, out, "--memory-mb", "1000", "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "error:" in err and "stopped at" in err and "files" in err, err
    assert "--memory-mb" in err and "WebDataset" in err and "tar -cf" in err, err
    left = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs] \
        if os.path.exists(out) else []
    assert left == [], left


@pytest.mark.timeout(120)
def test_the_cli_converts_a_folder_the_limit_allows(tmp_path):
    """The limit refuses only what does not fit: a small folder converts at a small bound."""
    src = str(tmp_path / "src")
    make_sample_imagefolder(src, train_per_class=6, val_per_class=2, num_classes=3, seed=2,
                            size=(32, 24))
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, os.path.join(REPO, "preprocess_sequential.py"), src, out,
                        "--memory-mb", "400", "--workers", "1", "--no-progress", "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["train"]["images"] == 18 and got["val"]["images"] == 6


# -- the benchmark ---------------------------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("form", ["tar", "wds", "folder"])
def test_the_benchmark_reports_peaks_per_pass(form, tmp_path):
    """A tiny run of benchmarks/convert_memory.py: its JSON rows and markdown table (no
    figures checked: they depend on the machine)."""
    out = tmp_path / "rows.json"
    md = tmp_path / "table.md"
    r = subprocess.run([sys.executable, BENCH, "--images", "2000", "--classes", "50", "--form",
                        form, "--shard-images", "700", "--memory-mb", "500,400", "--workers",
                        "1", "--interval", "0.05", "--workdir", str(tmp_path / "work"),
                        "--json", str(out), "--md", str(md)],
                       cwd=REPO, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())
    assert sorted(row["memory_mb"] for row in rows) == [400, 500]
    for row in rows:
        assert row["form"] == form and row["images"] == 2000 and row["images_written"] == 2000
        assert {"read", "merge"} <= set(row["peaks"]), row["peaks"]
        for phase in ("read", "merge"):
            peak = row["peaks"][phase]
            assert 0 < peak["main_pss_anon"] <= peak["pss_anon"] <= peak["anonymous"]
            assert peak["at_peak"]["main"] > 0
        assert row["samples"] > 0 and row["wall_s"] > 0 and row["commit"]
        assert "buffers <=" in row["notice"]
    text = md.read_text()
    assert f"| {form} | 2,000 | 50 | 500 | 1 |" in text and "--memory-mb 400" in text
    assert not os.path.exists(tmp_path / "work")  # removed without --keep


def test_the_benchmark_tar_is_what_tarfile_reads(tmp_path):
    """The streaming writer's headers: tarfile lists the names, sizes and bytes written."""
    import tarfile

    sys.path.insert(0, os.path.dirname(BENCH))
    try:
        import convert_memory as cm
    finally:
        sys.path.remove(os.path.dirname(BENCH))
    pool = cm.jpeg_pool(8)
    path = cm.make_tar(str(tmp_path), 20, 3, pool)
    with tarfile.open(path) as tf:
        members = tf.getmembers()
        assert [m.name for m in members][:3] == ["train/n00000000/n00000000_0.JPEG",
                                                  "train/n00000000/n00000000_1.JPEG",
                                                  "train/n00000000/n00000000_2.JPEG"]
        assert len(members) == 20 and len({m.name for m in members}) == 20
        assert tf.extractfile(members[7]).read() == pool[7]  # pool reused from 8 on
    assert os.path.getsize(path) == 20 * 1024 + 1024  # one header + one data block each
