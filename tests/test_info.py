"""The runtime report (imagenet-seq-info, python -m imagenet_seq) and the crop-decode fallback
warning."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from imagenet_seq.decode import transforms
from imagenet_seq.tools import info
from imagenet_seq.tools.sample import PHOTOS, make_sample_imagefolder


def test_report_names_each_optional_part_and_the_defaults():
    r = info.runtime_report()
    assert r["versions"]["torch"] and r["versions"]["imagenet_seq"]
    for part in ("crop_decode", "prctl", "dali", "cuda"):
        assert isinstance(r[part]["on"], bool) and r[part]["why"]
    assert r["crop_decode"]["on"] == (transforms._jpegcrop is not None)
    assert r["cpus"] >= 1 and r["default_workers"] >= 1
    # 2 GiB per machine at 110 KB per record: ~19,500 records (README, Memory)
    assert r["default_buffer_records_imagenet"] == (2 << 30) // 110_000
    text = info.format_report(r)
    for word in ("crop decode", "prctl", "DALI", "CUDA", "num_workers=", "shuffle buffer"):
        assert word in text
    line = info.summary_line(r)
    assert "\n" not in line and f"{r['cpus']} CPUs" in line and "crop decode" in line


def test_crop_decode_off_says_why_and_how_to_fix(monkeypatch):
    monkeypatch.setattr(transforms, "_jpegcrop", None)
    monkeypatch.setattr(transforms, "JPEGCROP_ERROR", "No module named '_jpegcrop'")
    r = info.runtime_report()
    assert r["crop_decode"]["on"] is False
    assert "libjpeg62-turbo-dev" in r["crop_decode"]["why"]
    assert "No module named" in r["crop_decode"]["why"]
    assert "crop decode OFF" in info.summary_line(r)


@pytest.mark.parametrize("cmd", [["-m", "imagenet_seq"], ["-m", "imagenet_seq.tools.info"]])
def test_module_entry_points_print_the_report(cmd):
    out = subprocess.run([sys.executable] + cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "crop decode" in out.stdout and "Loader defaults" in out.stdout
    js = subprocess.run([sys.executable] + cmd + ["--json"], capture_output=True, text=True,
                        timeout=120)
    assert json.loads(js.stdout)["versions"]["imagenet_seq"]


def test_fallback_warns_once_per_process(monkeypatch):
    monkeypatch.setattr(transforms, "_jpegcrop", None)
    monkeypatch.setattr(transforms, "JPEGCROP_ERROR", "not built")
    monkeypatch.setattr(transforms, "_fallback_warned", False)
    with pytest.warns(RuntimeWarning, match="crop-decode extension.*libjpeg62-turbo-dev") as rec:
        transforms.TrainTransform(32)
        transforms.TrainTransform(64)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transforms.TrainTransform(32)  # already said: silent
        transforms.TrainTransform(32, crop_decode=False)
        transforms.ValTransform(32, 40)


def test_no_warning_when_the_extension_is_built():
    if transforms._jpegcrop is None:
        pytest.skip("crop-decode extension not built here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = transforms.TrainTransform(32)
    from imagenet_seq.tools.sample import imagenet_like_jpeg

    photo = np.full((375, 500, 3), 128, np.uint8)
    assert t(imagenet_like_jpeg(photo, np.random.default_rng(0)),
             np.random.default_rng(1)).shape == (32, 32, 3)


def test_sample_refuses_more_classes_than_photographs(tmp_path):
    with pytest.raises(ValueError, match=f"num_classes={len(PHOTOS) + 2}.*at most"):
        make_sample_imagefolder(str(tmp_path / "a"), 1, 1, num_classes=len(PHOTOS) + 2)
    assert not os.path.exists(tmp_path / "a" / "train")  # refused before writing anything
    classes = make_sample_imagefolder(str(tmp_path / "b"), 1, 0, num_classes=len(PHOTOS) + 1,
                                      repeat_photos=True)
    assert len(classes) == len(PHOTOS) + 1
    assert classes[-1].split("_", 1)[1] == classes[0].split("_", 1)[1]  # the same photograph
