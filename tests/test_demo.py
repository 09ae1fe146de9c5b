"""imagenet-seq-demo: the README's first command, end to end at small sizes."""
import json
import os
import re
import subprocess
import sys

import pytest

from imagenet_seq.tools import demo

SMALL = ["--classes", "2", "--train-per-class", "8", "--val-per-class", "3", "-b", "4", "-j", "1",
         "--image-size", "32"]


def test_full_run_hours():
    assert demo.full_run_hours(1000.0) == pytest.approx(1_281_167 * 90 / 1000.0 / 3600)
    assert demo.full_run_hours(0.0) == float("inf")


def test_find_example_in_checkout_and_errors(tmp_path):
    path = demo.find_example()
    assert path.endswith(os.path.join("examples", "imagenet", "main.py")) and os.path.isfile(path)
    assert demo.find_example(os.path.dirname(path)) == os.path.join(os.path.dirname(path),
                                                                    "main.py")
    with pytest.raises(FileNotFoundError, match="examples/imagenet/main.py"):
        demo.find_example(str(tmp_path / "nope.py"))


def test_missing_example_exits_2(tmp_path, capsys):
    missing = str(tmp_path / "main.py")
    assert demo.main(SMALL + ["--workdir", str(tmp_path), "--example", missing]) == 2
    err = capsys.readouterr().err
    assert missing in err and "checkout" in err


def test_more_classes_than_photographs_exits_2_naming_the_limit(tmp_path, capsys):
    from imagenet_seq.tools.sample import PHOTOS

    n = len(PHOTOS) + 2
    assert demo.main(SMALL[2:] + ["--classes", str(n), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"num_classes={n}" in err and f"at most {len(PHOTOS)}" in err


def test_bad_size_exits_nonzero():
    with pytest.raises(SystemExit) as e:
        demo.main(["--train-per-class", "0"])
    assert e.value.code != 0


def test_demo_json(tmp_path, capsys):
    assert demo.main(SMALL + ["--workdir", str(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out)  # stdout holds the one JSON object; progress went to stderr
    assert (r["classes"], r["train_images"], r["val_images"]) == (2, 16, 6)
    assert r["train_img_per_s"] > 0
    assert r["full_imagenet_hours"] == pytest.approx(demo.full_run_hours(r["train_img_per_s"]))
    assert 0.0 <= r["val_top1"] <= r["val_top5"] <= 100.0
    for f in ("lmdb/ILSVRC-train.lmdb", "lmdb/ILSVRC-val.lmdb", "run/checkpoint.pth"):
        assert os.path.isfile(tmp_path / f), f


@pytest.mark.slow
def test_demo_console_run(tmp_path):
    """As a user runs it (python -m == the imagenet-seq-demo console script), human output."""
    r = subprocess.run([sys.executable, "-m", "imagenet_seq.tools.demo", "--workdir", str(tmp_path)]
                       + SMALL, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for step in ("1/4", "2/4 python preprocess_sequential.py", "3/4 python examples/imagenet",
                 "4/4 python examples/imagenet", "--evaluate --resume"):
        assert step in r.stdout
    assert "images/s" in r.stdout and "1,281,167 images x 90 epochs at this rate:" in r.stdout
    assert "hours" in r.stdout and "Epoch 1/1 done" in r.stdout
    assert "converted: of those, stored changed" in r.stdout  # the table's columns explained
    assert r.stdout.startswith("runtime: imagenet_seq ")  # the runtime report's summary line
    # one throughput per run: the result quotes the epoch line's figure
    epoch = re.search(r"Epoch 1/1 done in \S+: [\d,]+ train images at ([\d,]+) img/s", r.stdout)
    result = re.search(r"training throughput +([\d,]+) images/s", r.stdout)
    assert epoch and result and epoch.group(1) == result.group(1)
    rates = set(re.findall(r"([\d,]+) img/s", r.stdout)) | {result.group(1)}
    assert rates == {epoch.group(1)}, rates  # the progress line's too
