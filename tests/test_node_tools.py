"""The node reader in the tools: ``imagenet-seq-bench --ranks N`` (per-rank readers against
the node reader, real rank processes on a tiny split: the output's structure, no timing) and
``imagenet-seq-diagnose`` planning the node plan when the Loader would; the rank-window
arithmetic the benchmarks share."""
import json

import pytest

from imagenet_seq.data import Loader
from imagenet_seq.loader import loader as loader_module
from imagenet_seq.read.reader import SplitReader
from imagenet_seq.tools import bench, bench_ranks, bench_report, diagnostics

from node_procs import Direct

pytestmark = pytest.mark.timeout(600)


def run_json(argv, capsys):
    rc = bench.main(argv + ["--json"])
    out = capsys.readouterr()
    return rc, json.loads(out.out), out.err


def test_bench_ranks_measures_both_readers_and_says_which_is_faster(sample_lmdb, capsys,
                                                                    monkeypatch):
    monkeypatch.delenv("IMAGENET_SEQ_NODE_READER", raising=False)
    rc, r, err = run_json([sample_lmdb, "--ranks", "2", "--seconds", "1", "--epochs", "10"],
                          capsys)
    assert rc == 0, err
    assert "pipeline" not in r and "stream" in r  # the disk's one-reader rate beside them
    assert any("pipeline: not measured with --ranks" in n for n in r["notes"])
    ranks = r["ranks"]
    assert ranks["ranks"] == 2 and set(ranks["rows"]) == {"per-rank", "node"}
    for how, row in ranks["rows"].items():
        assert "error" not in row, row
        assert row["how"] == how and row["ranks"] == 2
        assert len(row["per_rank_mb_per_s"]) == 2
        assert row["mb_per_s"] > 0 and row["images"] > 0  # every rank read in the window
        assert row["ranks_x_slowest_mb_per_s"] == pytest.approx(
            2 * min(row["per_rank_mb_per_s"]))
        assert row["hours"] == pytest.approx(
            48 * 10 / row["ranks_x_slowest_images_per_s"] / 3600)
        assert isinstance(row["page_cache_evicted"], bool)
    a, b = (ranks["rows"][h]["ranks_x_slowest_mb_per_s"] for h in ("per-rank", "node"))
    assert ranks["ratio"] == pytest.approx(b / a)
    assert ranks["faster"] == ("same" if abs(b / a - 1) < bench_ranks.SAME_WITHIN else
                               "node" if b > a else "per-rank")
    table = bench_report.format_table(r)
    lines = table.splitlines()
    assert any(x.startswith("per-rank readers ") for x in lines)
    assert any(x.startswith("node reader ") for x in lines)
    verdict = [x for x in lines if x.startswith("verdict: ")]
    assert len(verdict) == 1 and "IMAGENET_SEQ_NODE_READER=0" in verdict[0]
    assert "2 ranks on this machine" in table


def test_bench_ranks_without_offsets_index_measures_per_rank_and_says_why(
        sample_lmdb_no_index, capsys):
    rc, r, err = run_json([sample_lmdb_no_index, "--ranks", "2", "--seconds", "0.5"], capsys)
    assert rc == 0, err
    ranks = r["ranks"]
    assert set(ranks["rows"]) == {"per-rank"} and "faster" not in ranks
    assert "no offsets index" in ranks["node_missing"] and "--rebuild" in ranks["node_missing"]
    table = bench_report.format_table(r)
    assert "node reader: not measured: " in table and "verdict: not determined" in table


@pytest.mark.parametrize("ranks", ["1", "0"])
def test_bench_ranks_needs_two(sample_lmdb, capsys, ranks):
    assert bench.main([sample_lmdb, "--ranks", ranks, "--seconds", "1"]) == 2
    assert f"--ranks={ranks}; expected >= 2" in capsys.readouterr().err


def test_rank_window_arithmetic():
    a = dict(samples=[(0.0, 0, 0), (1.0, 100, 10), (2.0, 300, 30)], t_start=0.0, t_end=2.0)
    b = dict(samples=[(0.5, 0, 0), (2.5, 200, 20)], t_start=0.5, t_end=2.5)
    assert bench_ranks.bytes_at(a["samples"], -1) == 0.0
    assert bench_ranks.bytes_at(a["samples"], 1.5) == 200.0
    assert bench_ranks.bytes_at(a["samples"], 1.5, column=2) == 20.0
    assert bench_ranks.bytes_at(a["samples"], 9) == 300.0
    got = bench_ranks.window([a, b], 1.0, 2.0)
    assert got == {"bytes": [200.0, 100.0], "records": [20.0, 10.0]}
    # both read from 0.5 (+ warm-up 0.5) to 2.0; (time, bytes) samples (slow_disk.py's) do
    for parts in ([a, b], [dict(p, samples=[x[:2] for x in p["samples"]]) for p in (a, b)]):
        w = bench_ranks.all_ranks_window(parts, warmup=0.5)
        assert w["seconds"] == 1.0 and w["mb_per_s"] == pytest.approx(300 / 1e6)
        assert bench_ranks.all_ranks_window(parts, warmup=5) == {}


# ------------------------------------------------------------------------------ diagnostics
def _loader_report(root, monkeypatch, node_reader):
    """What a Loader of rank 0 of 4 (2 per machine, torchrun's variable) plans, without a
    reader process (the node client is the rank's own reader here: only the plan matters)."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(loader_module, "_node_client", lambda settings, reader: Direct(reader))
    ld = Loader(root, "train", batch_size=8, rank=0, world_size=4, chunk_size=4, buffer_size=8,
                node_reader=node_reader, num_workers=0)
    try:
        return diagnostics.loader_report(ld, quiet=True)
    finally:
        ld.close()


ARGS = ["--world-size", "4", "--batch-size", "8", "--chunk-size", "4", "--buffer-size", "8",
        "--json"]


def test_diagnose_plans_the_node_plan_when_the_loader_would(sample_lmdb, capsys, monkeypatch):
    monkeypatch.delenv("IMAGENET_SEQ_NODE_READER", raising=False)
    want = _loader_report(sample_lmdb, monkeypatch, None).as_dict()
    assert want["plan"] == "node-1" and want["node_ranks"] == 2
    # under torchrun's LOCAL_WORLD_SIZE=2 (still set): automatic, as the Loader
    assert diagnostics.main([sample_lmdb] + ARGS) == 0
    got = json.loads(capsys.readouterr().out)
    assert {k: got[k] for k in want} == want
    assert "node plan" in got["plan_note"] and "IMAGENET_SEQ_NODE_READER=0" in got["plan_note"]
    # the same figures asked for outside torchrun
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert diagnostics.main([sample_lmdb] + ARGS + ["--node-reader", "on",
                                                    "--ranks-per-machine", "2"]) == 0
    assert {k: v for k, v in json.loads(capsys.readouterr().out).items() if k in want} == want
    # and the table says which plan
    assert diagnostics.main([sample_lmdb] + ARGS[:-1] + ["--node-reader", "on",
                                                         "--ranks-per-machine", "2"]) == 0
    out = capsys.readouterr().out
    assert "plan node-1 (one node reader per 2 ranks)" in out


def test_diagnose_per_rank_plan_otherwise(sample_lmdb, capsys, monkeypatch):
    monkeypatch.delenv("IMAGENET_SEQ_NODE_READER", raising=False)
    want = _loader_report(sample_lmdb, monkeypatch, False).as_dict()
    assert want["plan"] == "rank-1" and want["node_ranks"] == 0
    monkeypatch.setenv("IMAGENET_SEQ_NODE_READER", "0")  # torchrun's variable, but turned off
    assert diagnostics.main([sample_lmdb] + ARGS) == 0
    got = json.loads(capsys.readouterr().out)
    assert {k: got[k] for k in want} == want
    monkeypatch.delenv("IMAGENET_SEQ_NODE_READER")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # outside torchrun: per-rank, and the note says
    assert diagnostics.main([sample_lmdb] + ARGS) == 0  # how to see the node plan
    got = json.loads(capsys.readouterr().out)
    assert got["plan"] == "rank-1" and "--node-reader on shows it" in got["plan_note"]
    labels = SplitReader(sample_lmdb, "train").labels
    assert got["repetition"] == diagnostics.shuffle_report(
        labels, batch_size=8, world_size=4, chunk_size=4, buffer_size=8).repetition


@pytest.mark.parametrize("argv,match", [
    (["--node-reader", "on", "--world-size", "3", "--ranks-per-machine", "2"], "world_size=3"),
    (["--node-reader", "on", "--world-size", "2", "--ranks-per-machine", "1"],
     "--node-reader on with 1 rank per machine"),
    (["--ranks-per-machine", "0"], "--ranks-per-machine=0"),
])
def test_diagnose_node_plan_bad_layouts_exit_2(sample_lmdb, capsys, monkeypatch, argv, match):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert diagnostics.main([sample_lmdb] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagenet-seq-diagnose: error:") and match in err
