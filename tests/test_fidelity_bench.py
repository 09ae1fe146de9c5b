"""benchmarks/fidelity.py: its statistics, and one tiny end-to-end run of the real script."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def test_interval_is_the_t_interval():
    pytest.importorskip("scipy")
    from fidelity_report import interval

    iv = interval([1.0, 2.0, 3.0, 4.0, 5.0])
    sd = math.sqrt(2.5)
    assert iv["mean"] == 3.0 and iv["sd"] == pytest.approx(sd)
    # t(0.975, 4) = 2.7764: the half-width of a 95 % interval over 5 seeds
    assert iv["hi"] - 3.0 == pytest.approx(2.7764 * sd / math.sqrt(5), rel=1e-4)
    assert iv["lo"] == pytest.approx(6.0 - iv["hi"])


def test_summary_pairs_models_by_seed():
    pytest.importorskip("scipy")
    from fidelity_report import summarise

    runs = {"torchvision": {"0": {"tv_val": 50.0, "ours_val": 50.0, "agree": 100.0},
                            "1": {"tv_val": 60.0, "ours_val": 59.0, "agree": 98.0}},
            "loader": {"0": {"tv_val": 51.0, "ours_val": 51.5, "agree": 99.0},
                       "1": {"tv_val": 62.0, "ours_val": 62.0, "agree": 100.0}}}
    s = summarise(runs, [0, 1])
    assert s["loader"]["paired_gap"]["mean"] == pytest.approx(1.5)  # (1 + 2) / 2, not 51.5-55
    assert s["torchvision"]["val_gap"]["mean"] == pytest.approx(0.5)
    assert "paired_gap" not in s["torchvision"]


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
    """The real script on 60 digits, 2 seeds, 1 epoch: data, training through torchvision, the
    Loader and the class-order ablation, scoring through both val pipelines, json + markdown."""
    pytest.importorskip("sklearn")
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or built for another torch
        pytest.skip("needs torchvision (CI installs torch==2.14.1 torchvision==0.29.1)")
    res = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "fidelity.py"), "--seeds", "2",
         "--epochs", "1", "--limit", "60", "--configs", "torchvision,loader,class_order",
         "--out", str(tmp_path / "data"), "--results", str(res)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((tmp_path / "res.json").read_text())
    for config in ("torchvision", "loader", "class_order"):
        assert set(state["runs"][config]) == {"0", "1"}
        for r in state["runs"][config].values():
            assert 0 <= r["tv_val"] <= 100 and 0 <= r["ours_val"] <= 100
    gap = state["summary"]["loader"]["paired_gap"]
    assert gap["n"] == 2 and gap["lo"] <= gap["mean"] <= gap["hi"]
    assert "| class_order | 2 |" in (tmp_path / "res.md").read_text()
