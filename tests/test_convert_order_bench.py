"""benchmarks/convert_order.py: the emulated disk's file layout, and one conversion through it."""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import convert_order  # noqa: E402
import slowfs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layout_model_charges_seeks_only_out_of_layout_order():
    mb = 1 << 20
    base = {"/a": 0, "/b": 2 * mb, "/c": 4 * mb}  # 2 MiB files, back to back

    def seeks(order):
        m = convert_order.LayoutHDD(base, seek_ms=8, rotation_ms=4, mb_per_s=100,
                                    near_bytes=mb)
        for k in order:
            m.schedule(k, 0, mb, 0.0)
            m.schedule(k, mb, mb, 0.0)
        return m.seeks
    assert seeks(["/a", "/b", "/c"]) == 1  # one stream: files back to back
    assert seeks(["/c", "/a", "/b"]) == 2  # back to /a is a seek; /b follows /a
    assert seeks(["/b", "/a", "/c"]) == 3


def test_layout_follows_creation_order(tmp_path):
    for name in ("z", "a", "m"):
        (tmp_path / name).write_bytes(b"x" * 5000)
    base = convert_order.layout(str(tmp_path))
    assert base == {"/z": 0, "/a": 8192, "/m": 16384}


@pytest.mark.fuse
def test_disk_order_through_the_emulator_is_one_stream(tmp_path):
    reason = slowfs.fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)
    data = convert_order.make_data(str(tmp_path), 16)
    lay = str(tmp_path / "layout.json")
    with open(lay, "w") as f:
        json.dump(convert_order.layout(data), f)
    mnt = str(tmp_path / "mnt")
    rows = {}
    for order in ("auto", "name"):
        with convert_order.mounted(data, mnt, lay) as stats:
            out = str(tmp_path / f"out_{order}")
            r = subprocess.run([sys.executable, "preprocess_sequential.py",
                                os.path.join(mnt, "tree"), out, "--splits", "train",
                                "--workers", "0", "--read-order", order, "--json",
                                "--no-progress"], cwd=REPO, capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 0, r.stderr
            rows[order] = json.loads(r.stdout)["train"]
        rows[order]["seeks"] = stats["seeks"]
    assert rows["auto"]["read_order"] == "inode"  # FUSE has no FIEMAP; inodes pass through
    assert rows["auto"]["seeks"] <= 2 < rows["name"]["seeks"]
