"""imagenet-seq-diagnose and loader_report on a real converted split (labels from the file)."""
import io
import json
import subprocess
import sys

import pytest

from imagenet_seq.read.reader import SplitReader
from imagenet_seq.tools import diagnostics


def test_cli_table_for_train_with_ranks(sample_lmdb, capsys):
    argv = [sample_lmdb, "--split", "train", "--world-size", "2", "--batch-size", "8",
            "--chunk-size", "4", "--buffer-size", "8"]
    assert diagnostics.main(argv) == 0
    out = capsys.readouterr().out
    assert "ILSVRC-train.lmdb (train)" in out
    assert "48 records, batch 8, world size 2, chunk 4, buffer 8 records per rank" in out
    labels = SplitReader(sample_lmdb, "train").labels
    rep = diagnostics.shuffle_report(labels, batch_size=8, world_size=2, chunk_size=4,
                                     buffer_size=8)
    row = [x for x in out.splitlines() if x.startswith("distinct labels per batch")][0]
    assert f"{rep.distinct_labels:.2f}" in row and f"{rep.diversity_ratio:.4f}" in row
    row = [x for x in out.splitlines() if x.startswith("co-batch repetition, epoch 0 -> 1")][0]
    assert f"{100 * rep.repetition:.3f}%" in row
    assert "note: " in out


def test_cli_val_explains_full_repetition(sample_lmdb, capsys):
    assert diagnostics.main([sample_lmdb, "--split", "val", "--batch-size", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["repetition"] == 1.0 and r["mode"] == "val" and r["buffer_size"] == 0
    assert "file order" in r["note"] and "expected" in r["note"]


def test_cli_default_buffer_is_the_loaders(sample_lmdb, capsys):
    from imagenet_seq.data import Loader

    assert diagnostics.main([sample_lmdb, "--json", "--batch-size", "8"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["buffer_size"] == Loader(sample_lmdb, "train", batch_size=8).buffer_size


def test_cli_plot_writes_a_png(sample_lmdb, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "d.png"
    assert diagnostics.main([sample_lmdb, "--batch-size", "8", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--batch-size", "0"], "--batch-size=0"),
    (["--world-size", "0"], "--world-size=0"),
    (["--world-size", "100"], "world_size"),
])
def test_cli_bad_values_exit_2_naming_them(sample_lmdb, capsys, argv, match):
    assert diagnostics.main([sample_lmdb] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagenet-seq-diagnose: error:") and match in err


def test_cli_missing_folder_exits_2(tmp_path, capsys):
    assert diagnostics.main([str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_python_m_runs_the_cli(sample_lmdb):
    out = subprocess.run([sys.executable, "-m", "imagenet_seq.tools.diagnostics", sample_lmdb,
                          "--batch-size", "8"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "distinct labels per batch" in out.stdout


def test_loader_report_prints_and_returns(sample_lmdb, capsys):
    from imagenet_seq.data import Loader

    ld = Loader(sample_lmdb, "val", batch_size=4, num_workers=0)
    rep = diagnostics.loader_report(ld)
    out = capsys.readouterr().out
    assert rep.repetition == 1.0 and "co-batch repetition" in out and "file order" in out
    buf = io.StringIO()
    assert diagnostics.loader_report(ld, file=buf) == rep and "distinct labels" in buf.getvalue()
    diagnostics.loader_report(ld, quiet=True)
    assert capsys.readouterr().out == ""
