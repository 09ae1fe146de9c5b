"""Tar input: a tar of an ImageFolder tree and ImageNet's archives (train tar of per-class tars,
flat val tar + devkit or Kaggle labels), read in place; the LMDBs equal the extracted tree's."""
import os
import tarfile

import pytest

from imagenet_seq.convert import passes as convert_passes
from imagenet_seq.convert.cli import main
from imagenet_seq.read.reader import SplitReader
from imagenet_seq.tools.sample import make_sample_imagefolder

import fake_archives as fa
from run_faults import fail_nth_run_write

pytest.importorskip("scipy")


def records(out, split):
    r = SplitReader(out, split)
    try:
        return [(bytes(j), int(lab)) for _, j, lab in r.read_all()], r.meta.classes
    finally:
        r.close()


def convert(argv, capsys=None, rc=0, progress=False):
    got = main([*argv, "--workers", "0"] + ([] if progress else ["--no-progress"]))
    err = capsys.readouterr().err if capsys else ""
    assert got == rc, err
    return err


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tree") / "in")
    classes = make_sample_imagefolder(root, train_per_class=6, val_per_class=2, num_classes=3,
                                      size=(64, 48))
    ref = str(tmp_path_factory.mktemp("ref") / "out")
    assert main([root, ref, "--workers", "0", "--no-progress"]) == 0
    return root, classes, ref


@pytest.fixture(scope="module")
def ilsvrc(tree, tmp_path_factory):
    """ImageNet's three archives, and the reference: the same images as a folder tree with a
    flat val/ and a labels file, converted from folders."""
    root, classes, _ = tree
    d = tmp_path_factory.mktemp("ilsvrc")
    a = fa.ilsvrc(root, classes, d)
    ref = str(d / "ref")
    assert main([a["folder"], ref, "--val-labels", a["labels_file"], "--workers", "0",
                 "--no-progress"]) == 0
    return {"dir": str(d), "train": a["train"], "val": a["val"], "devkit": a["devkit"],
            "labels": a["labels"], "ref": ref, "classes": classes}


def test_tar_of_a_tree_equals_the_tree(tree, tmp_path, capsys):
    root, classes, ref = tree
    tar = fa.tar_tree(root, str(tmp_path / "imagenet.tar"),
                      extra=[("train/README.txt", b"hello"),
                             (os.path.join("train", classes[0], "notes.txt"), b"x")])
    out = str(tmp_path / "out")
    err = convert([tar, out, "--json"], capsys)
    for split in ("train", "val"):
        assert records(out, split) == records(ref, split)
    report = open(os.path.join(out, "ILSVRC-train.report.tsv")).read()
    assert "README.txt\tfile outside any class folder" in report
    assert os.path.join(classes[0], "notes.txt") + "\tnot an image file" in report
    assert "2 files skipped" in err


def test_imagenet_archives_with_devkit(ilsvrc, tmp_path, capsys):
    out = str(tmp_path / "out")
    err = convert([ilsvrc["train"], ilsvrc["val"], "--devkit", ilsvrc["devkit"], out], capsys,
                  progress=True)
    assert "listing" not in err and "train read" in err, err  # one sweep: no listing pass
    assert "train merge" in err, err
    for split in ("train", "val"):
        assert records(out, split) == records(ilsvrc["ref"], split)
    # class index = position of the WNID among the sorted WNIDs, not the ILSVRC2012_ID
    recs, classes = records(out, "val")
    want = [classes.index(c) for _, c in sorted(ilsvrc["labels"].items())]
    assert [lab for _, lab in recs] == want and classes == sorted(ilsvrc["classes"])


def test_folder_of_archives_and_kaggle_labels(ilsvrc, tmp_path, capsys):
    d = tmp_path / "downloads"
    d.mkdir()
    for k in ("train", "val", "devkit"):
        os.symlink(ilsvrc[k], d / os.path.basename(ilsvrc[k]))
    out = str(tmp_path / "out")
    convert([str(d), out], capsys)  # the devkit beside the archives is found
    assert records(out, "val") == records(ilsvrc["ref"], "val")
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{n[:-5]},{c} 1 2 3 4\n" for n, c in ilsvrc["labels"].items()))
    out2 = str(tmp_path / "out2")
    convert([ilsvrc["train"], ilsvrc["val"], "--val-labels", str(csv), out2], capsys)
    assert records(out2, "val") == records(ilsvrc["ref"], "val")


def test_interrupted_tar_conversion_resumes_exactly(ilsvrc, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(convert_passes, "RUN_RECORDS", 4)
    fail_nth_run_write(monkeypatch, 3, OSError(5, "Input/output error"))
    out = str(tmp_path / "out")
    args = [ilsvrc["train"], ilsvrc["val"], "--devkit", ilsvrc["devkit"], out]
    convert(args, capsys, rc=1)
    convert(args + ["--resume"], capsys)
    for split in ("train", "val"):
        assert records(out, split) == records(ilsvrc["ref"], split)


def test_resume_continues_the_sweep_without_listing(ilsvrc, tmp_path, monkeypatch, capsys):
    """No archive is listed (one sweep each); an interrupted conversion resumes from the
    sweep's committed cursor (the byte offset of a header), not from the archive's start."""
    from imagenet_seq.convert import tar_source, tar_sweep

    monkeypatch.setattr(convert_passes, "RUN_RECORDS", 4)
    fail_nth_run_write(monkeypatch, 2, OSError(5, "Input/output error"))
    listed, starts = [], []
    monkeypatch.setattr(tar_source, "list_tar", lambda p, *a, **k: listed.append(p))
    real_open = tar_sweep._open

    def spy(fileobj, path, what, at):
        if what == "the file":
            starts.append((os.path.basename(path), at))
        return real_open(fileobj, path, what, at)
    monkeypatch.setattr(tar_sweep, "_open", spy)
    out = str(tmp_path / "out")
    args = [ilsvrc["train"], ilsvrc["val"], "--devkit", ilsvrc["devkit"], out]
    convert(args, capsys, rc=1)
    assert starts == [("ILSVRC2012_img_train.tar", None)]
    starts.clear()
    convert(args + ["--resume"], capsys)
    assert starts[0][0] == "ILSVRC2012_img_train.tar" and starts[0][1] is not None, starts
    assert starts[1:] == [("ILSVRC2012_img_val.tar", None)]
    assert listed == []
    for split in ("train", "val"):
        assert records(out, split) == records(ilsvrc["ref"], split)


# ---------------------------------------------------------------- bad input

def test_truncated_archive_is_named(ilsvrc, tmp_path, capsys):
    cut = tmp_path / "ILSVRC2012_img_train.tar"
    data = open(ilsvrc["train"], "rb").read()
    cut.write_bytes(data[:len(data) // 2])
    err = convert([str(cut), "--splits", "train", str(tmp_path / "o")], capsys, rc=2)
    assert str(cut) in err and "download it again" in err, err
    assert not os.path.exists(tmp_path / "o" / "ILSVRC-train.lmdb")


def test_corrupt_nested_tar_is_named(ilsvrc, tmp_path, capsys):
    bad = tmp_path / "ILSVRC2012_img_train.tar"
    data = bytearray(open(ilsvrc["train"], "rb").read())
    with tarfile.open(ilsvrc["train"]) as tf:
        second = tf.getmembers()[1]
    data[second.offset_data:second.offset_data + 512] = b"\x07" * 512  # its first header
    bad.write_bytes(bytes(data))
    err = convert([str(bad), "--splits", "train", str(tmp_path / "o")], capsys, rc=2)
    assert f"nested tar {second.name}" in err and "download it again" in err, err


def test_compressed_archive_is_refused(tree, tmp_path, capsys):
    root, _, _ = tree
    gz = tmp_path / "imagenet.tar"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(os.path.join(root, "train"), arcname="train")
    err = convert([str(gz), str(tmp_path / "o")], capsys, rc=2)
    assert "compressed" in err and "decompress" in err, err


@pytest.mark.parametrize("case, expect", [
    ("no meta.mat", "has no data/meta.mat"),
    ("another year", "another year"),
    ("labels missing", "have no label"),
    ("no labels at all", "--devkit ILSVRC2012_devkit_t12.tar.gz"),
])
def test_bad_devkit_or_missing_labels(case, expect, ilsvrc, tmp_path, capsys):
    classes, labels = ilsvrc["classes"], ilsvrc["labels"]
    kit = str(tmp_path / "ILSVRC2012_devkit_t12.tar.gz")
    extra = ["--devkit", kit]
    if case == "no meta.mat":
        fa.devkit(classes, labels, kit, with_meta=False)
    elif case == "another year":
        fa.devkit(classes, labels, kit, year="2010")
    elif case == "labels missing":
        fa.devkit(classes, labels, kit, drop_last=1)
    else:
        extra = []
    err = convert([ilsvrc["train"], ilsvrc["val"], *extra, str(tmp_path / "o")], capsys, rc=2)
    assert expect in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("piece", [4096, 1 << 20])
def test_archive_is_read_front_to_back(piece, ilsvrc, tmp_path, monkeypatch):
    """One forward sweep: the archive is opened once and its preads follow each other, each
    starting at or after the previous one's end, never reading a byte twice."""
    import threading

    from imagenet_seq.convert import tar_sweep

    offsets, opened = [], []
    real, real_open = os.pread, os.open
    lock = threading.Lock()

    def spy(fd, n, off):
        with lock:
            offsets.append((off, n))
        return real(fd, n, off)

    def open_spy(path, *a, **k):
        opened.append(path)
        return real_open(path, *a, **k)
    monkeypatch.setattr(tar_sweep.os, "pread", spy)
    monkeypatch.setattr(tar_sweep.os, "open", open_spy)
    monkeypatch.setattr(tar_sweep, "PIECE", piece)
    assert main([ilsvrc["train"], "--splits", "train", str(tmp_path / "o"), "--workers", "2",
                 "--no-progress"]) == 0
    assert [p for p in opened if "ILSVRC2012" in p] == [ilsvrc["train"]]
    assert len(offsets) > (10 if piece < 1 << 20 else 0)
    assert all(b[0] >= a[0] + a[1] for a, b in zip(offsets, offsets[1:])), offsets


def test_val_only_does_not_read_the_train_archive(ilsvrc, tmp_path, monkeypatch, capsys):
    """With the devkit, the classes come from meta.mat: the train archive (a full read on a
    disk) is not opened for --splits val, and the val archive is not listed either."""
    import imagenet_seq.convert.tar_source as ts
    from imagenet_seq.convert import tar_sweep

    listed, swept = [], []
    monkeypatch.setattr(ts, "list_tar", lambda p, *a: listed.append(p))
    real = tar_sweep.SeqFile.__init__
    monkeypatch.setattr(tar_sweep.SeqFile, "__init__",
                        lambda self, p: swept.append(p) or real(self, p))
    out = str(tmp_path / "out")
    convert([ilsvrc["train"], ilsvrc["val"], "--devkit", ilsvrc["devkit"], "--splits", "val",
             out], capsys)
    assert listed == [] and swept == [ilsvrc["val"]]
    assert records(out, "val") == records(ilsvrc["ref"], "val")


def test_tar_of_a_tree_with_flat_val_and_labels(ilsvrc, tmp_path, capsys):
    tar = fa.tar_tree(os.path.join(ilsvrc["dir"], "folder"), str(tmp_path / "flat.tar"),
                      prefix="data")
    labels = os.path.join(ilsvrc["dir"], "labels.txt")
    out = str(tmp_path / "out")
    err = convert([tar, out], capsys, rc=2)
    assert "flat layout" in err and "--val-labels" in err, err
    convert([tar, out, "--val-labels", labels], capsys)
    for split in ("train", "val"):
        assert records(out, split) == records(ilsvrc["ref"], split)
