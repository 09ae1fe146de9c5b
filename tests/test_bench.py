"""imagenet-seq-bench driven through main(argv) on tiny real LMDBs."""
import json
import os

import pytest

from imagenet_seq.tools import bench
from imagenet_seq.read import evict
from imagenet_seq import format as fmt


def run_json(argv, capsys):
    rc = bench.main(argv + ["--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def fake(name, images, nbytes, seconds, evicted=True):
    return bench.Measurement(name, images=images, bytes=nbytes, seconds=seconds,
                             evicted=evicted, note="injected")


def test_projection_arithmetic_against_injected_rates(sample_lmdb, sample_tree, monkeypatch,
                                                      capsys):
    # stream 1000 img/s, pipeline 500 img/s, folder 20 img/s: the hours follow from the record
    # count in the metadata (48) and --epochs
    monkeypatch.setattr(bench, "measure_stream",
                        lambda reader, s, p: fake("stream", 10_000, 10**9, 10.0))
    monkeypatch.setattr(bench, "measure_pipeline",
                        lambda *a, **k: fake("pipeline", 5_000, 5 * 10**8, 10.0))
    monkeypatch.setattr(bench, "measure_folder",
                        lambda files, s, w, **k: fake("folder", 200, 2 * 10**7, 10.0))
    rc, r = run_json([sample_lmdb, "--epochs", "90", "--seconds", "10", "--folder",
                      os.path.join(sample_tree[0], "train")], capsys)
    assert rc == 0
    assert r["records"] == 48 and r["epochs"] == 90
    assert r["stream"]["images_per_s"] == pytest.approx(1000)
    assert r["stream"]["mb_per_s"] == pytest.approx(100)
    assert r["stream"]["hours"] == pytest.approx(48 * 90 / 1000 / 3600)
    assert r["pipeline"]["hours"] == pytest.approx(48 * 90 / 500 / 3600)
    assert r["folder"]["hours"] == pytest.approx(48 * 90 / 20 / 3600)
    assert r["pipeline"]["epoch_s"] == pytest.approx(48 / 500)
    assert r["speedup"] == pytest.approx(25)
    assert r["limit_stage"] == "cpu"  # 500 of 1000 img/s: decode limits, not the disk
    assert r["page_cache_evicted"] is True


def test_disk_bound_when_pipeline_keeps_up(sample_lmdb, monkeypatch, capsys):
    monkeypatch.setattr(bench, "measure_stream",
                        lambda reader, s, p: fake("stream", 1000, 10**8, 10.0))
    monkeypatch.setattr(bench, "measure_pipeline",
                        lambda *a, **k: fake("pipeline", 950, 95 * 10**6, 10.0, evicted=False))
    rc, r = run_json([sample_lmdb, "--epochs", "1", "--seconds", "10"], capsys)
    assert rc == 0 and r["limit_stage"] == "disk"
    assert r["page_cache_evicted"] is False  # one measurement could not evict: say so
    assert "folder" not in r and "speedup" not in r


def test_real_stream_measurement_evicts_and_reads_every_record(sample_lmdb, monkeypatch, capsys):
    calls = []
    real = bench.evict

    def spy(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(bench, "evict", spy)
    rc, r = run_json([sample_lmdb, "--seconds", "30", "--skip-pipeline", "--epochs", "2"], capsys)
    assert rc == 0
    assert calls == [fmt.find_split(sample_lmdb, "train")]
    # the tiny file ends long before 30 s: every record was streamed once
    assert r["stream"]["images"] == 48
    total = json.loads(_meta_json(sample_lmdb))["total_bytes"]
    assert r["stream"]["mb_per_s"] == pytest.approx(total / 1e6 / r["stream"]["seconds"])
    assert r["stream"]["hours"] == pytest.approx(48 * 2 / r["stream"]["images_per_s"] / 3600)
    assert isinstance(r["page_cache_evicted"], bool)
    assert r["offsets_index"] is True
    assert not any("offsets index" in n for n in r["notes"])


def test_bench_names_a_missing_offsets_index(sample_lmdb_no_index, capsys):
    rc, r = run_json([sample_lmdb_no_index, "--seconds", "5", "--skip-pipeline"], capsys)
    assert rc == 0 and r["offsets_index"] is False and r["stream"]["images"] == 48
    assert any("python -m imagenet_seq.format.offsets" in n for n in r["notes"])


def _meta_json(root):
    env = fmt.open_env(fmt.find_split(root, "train"))
    try:
        with env.begin() as txn:
            return bytes(txn.get(fmt.META_KEY))
    finally:
        env.close()


def test_full_pipeline_on_real_loader(sample_lmdb, capsys):
    pytest.importorskip("imagenet_seq.data", reason="the Loader (imagenet_seq.data) is not there")
    rc, r = run_json([sample_lmdb, "--seconds", "5", "--batch-size", "8", "--workers", "1"],
                     capsys)
    assert rc == 0
    assert 0 < r["pipeline"]["images"] <= 48
    assert r["pipeline"]["images_per_s"] > 0 and r["limit_stage"] in ("disk", "cpu")


def test_folder_measurement_and_table(sample_lmdb, sample_tree, tmp_path, capsys):
    folder = os.path.join(sample_tree[0], "train")
    plot = str(tmp_path / "b.png")
    argv = [sample_lmdb, "--seconds", "20", "--skip-pipeline", "--folder", folder, "--workers", "2"]
    if _has_matplotlib():
        argv += ["--plot", plot]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "raw record stream" in out and "ImageFolder files" in out
    assert "speed-up of the raw LMDB stream over folders" in out
    if _has_matplotlib():
        with open(plot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_ctrl_c_prints_what_was_measured(sample_lmdb, monkeypatch, capsys):
    from imagenet_seq.read.reader import SplitReader

    real = SplitReader.read_range

    def interrupted(self, start, count):
        for n, rec in enumerate(real(self, start, count)):
            if n == 20:
                raise KeyboardInterrupt
            yield rec

    monkeypatch.setattr(SplitReader, "read_range", interrupted)
    rc = bench.main([sample_lmdb, "--seconds", "30"])
    out = capsys.readouterr().out
    assert rc == 130
    assert "raw record stream" in out and "(interrupted)" in out
    assert "full Loader pipeline" not in out


@pytest.mark.parametrize("extra, needle", [
    (["--seconds", "0"], "--seconds=0.0"),
    (["--seconds", "-3"], "--seconds=-3.0"),
    (["--epochs", "0"], "--epochs=0"),
])
def test_bad_numbers(sample_lmdb, extra, needle, capsys):
    assert bench.main([sample_lmdb] + extra) == 2
    assert needle in capsys.readouterr().err


def test_not_an_lmdb(sample_tree, tmp_path, capsys):
    assert bench.main([sample_tree[0], "--seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert "not an LMDB folder written by imagenet-seq-preprocess" in err
    assert "ILSVRC-train.lmdb" in err
    junk = tmp_path / "ILSVRC-train.lmdb"
    junk.write_bytes(b"this is not an lmdb file" * 100)
    assert bench.main([str(tmp_path), "--seconds", "1"]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_empty_split(tmp_path, capsys):
    path = str(tmp_path / "ILSVRC-train.lmdb")
    env = fmt.open_env(path, readonly=False)
    meta = fmt.Metadata(split="train", classes=[], class_counts=[], num_records=0,
                        total_bytes=0, order="random")
    with env.begin(write=True) as txn:
        txn.put(fmt.META_KEY, meta.to_json())
    env.close()
    assert bench.main([str(tmp_path), "--seconds", "1"]) == 2
    assert "holds no records" in capsys.readouterr().err


def test_folder_without_images(sample_lmdb, tmp_path, capsys):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("x")
    assert bench.main([sample_lmdb, "--folder", str(tmp_path), "--seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds no images" in err and str(tmp_path) in err
    assert bench.main([sample_lmdb, "--folder", str(tmp_path / "nope"), "--seconds", "1"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_evict_drops_a_written_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(4 << 20))
    with open(p, "rb") as f:
        f.read()
    ok, note = evict.evict(str(p))
    frac = evict.cached_fraction(str(p))
    if frac is None:
        pytest.skip("mincore unavailable: eviction cannot be verified here")
    assert ok, note
    assert frac <= 0.01 and "verified" in note
