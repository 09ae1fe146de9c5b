"""Progressive resizing: Loader.set_image_size from the user's side (the batches of the next
epoch, bad sizes), the example's --progressive START:END schedule end to end."""
import importlib.util
import os

import pytest

from imagenet_seq.data import Loader

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "examples", "imagenet", "main.py")


def _example():
    spec = importlib.util.spec_from_file_location("imagenet_example_main_prog", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ex = _example()


def test_set_image_size_changes_the_next_epoch(sample_lmdb):
    train = Loader(sample_lmdb, "train", batch_size=16, num_workers=1, image_size=32)
    shapes = []
    for epoch, size in enumerate((32, 48, 64)):
        train.set_epoch(epoch)
        train.set_image_size(size)
        shapes.append({tuple(images.shape[1:]) for images, _ in train})
    assert shapes == [{(3, 32, 32)}, {(3, 48, 48)}, {(3, 64, 64)}]
    val = Loader(sample_lmdb, "val", batch_size=12, num_workers=0, image_size=32,
                 resize_size=40)
    val.set_image_size(64)
    (images, _), = list(val)
    assert images.shape[1:] == (3, 64, 64)


@pytest.mark.parametrize("bad", [15, 0, -32, 16.0, "160", True, None])
def test_bad_image_size_names_it(sample_lmdb, bad):
    train = Loader(sample_lmdb, "train", batch_size=16, num_workers=0)
    with pytest.raises((ValueError, TypeError), match="16"):
        train.set_image_size(bad)


def test_progressive_schedule():
    sizes = [ex.progressive_size(e, 16, 160, 192) for e in range(16)]
    assert sizes[0] == 160 and sizes[-1] == 192 and sizes == sorted(sizes)
    assert set(sizes) == {160, 192} and all(s % 32 == 0 for s in sizes)
    assert [ex.progressive_size(e, 5, 128, 256) for e in range(5)] == [128, 160, 192, 224, 256]
    assert ex.progressive_size(0, 1, 128, 224) == 128  # one epoch: the start size
    assert [ex.progressive_size(e, 3, 224, 160) for e in range(3)] == [224, 192, 160]  # shrinking
    assert ex.parse_progressive("160:192") == (160, 192)
    for bad in ("160", "160:", "a:b", "8:192", "160:192:224"):
        with pytest.raises(ValueError, match="--progressive"):
            ex.parse_progressive(bad)


def test_example_progressive_end_to_end(sample_lmdb, tmp_path, capsys):
    args = ["-a", "tiny", "-b", "8", "-j", "0", "--image-size", "32", "--resize-size", "40",
            "-p", "2", "--lr", "0.05", "--device", "cpu", "--epochs", "3",
            "--progressive", "32:96", "--output-dir", str(tmp_path)]
    summary = ex.run([sample_lmdb] + args)
    out = capsys.readouterr().out
    assert summary["epochs_run"] == 3
    for e, size in enumerate((32, 64, 96)):
        assert f"=> epoch {e + 1}: train images {size} px (--progressive)" in out
    with pytest.raises(SystemExit) as e:  # argparse: usage + the message, exit 2
        ex.main([sample_lmdb] + args[:-4] + ["--progressive", "8:96"])
    assert e.value.code == 2 and "sizes must be >= 16 px" in capsys.readouterr().err
    assert ex.main([sample_lmdb, "--loader", "folder"] + args) == 2
    assert "--loader seq" in capsys.readouterr().err
