"""WebDataset shards as input (issue 26 item 5): ``<key>.jpg`` + ``<key>.cls`` / ``<key>.json``
groups in ``.tar`` shards, given as a folder, a brace pattern, a list or split folders, read in
place; the records equal those of the same images as an ImageFolder tree (the order may differ:
the names differ), bad groups and odd members reported, the output verified and loaded."""
import io
import os
import tarfile
import threading

import pytest

from imagenet_seq.convert import passes as convert_passes
from imagenet_seq.convert.cli import main
from imagenet_seq.convert.wds_names import expand_braces, split_of
from imagenet_seq.read.reader import SplitReader
from imagenet_seq.tools.sample import make_sample_imagefolder

import fake_archives as fa
from run_faults import fail_nth_run_write


def records(out, split, ordered=False):
    """(records, classes): records as (JPEG bytes, label), sorted unless ``ordered``."""
    r = SplitReader(out, split)
    try:
        got = [(bytes(j), int(lab)) for _, j, lab in r.read_all()]
        return (got if ordered else sorted(got)), list(r.meta.classes)
    finally:
        r.close()


def convert(argv, capsys=None, rc=0):
    got = main([*argv, "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err if capsys else ""
    assert got == rc, err
    return err


def report(out, split="train"):
    from imagenet_seq.convert.report import read_report

    path = os.path.join(out, f"ILSVRC-{split}.report.tsv")
    return read_report(path) if os.path.exists(path) else []


def _add(tf, name, data=b"", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes x 6 train, 2 val; its conversion from folders (the reference)."""
    root = str(tmp_path_factory.mktemp("wds") / "in")
    classes = make_sample_imagefolder(root, train_per_class=6, val_per_class=2, num_classes=3,
                                      size=(48, 32))
    ref = str(tmp_path_factory.mktemp("wdsref") / "out")
    assert main([root, ref, "--workers", "0", "--no-progress"]) == 0
    return root, classes, ref


def shard_set(tree, d, labels=("cls",), train_extra=()):
    """Train (3 shards) and validation (2 shards) of the tree in folder ``d``."""
    root, classes, _ = tree
    train = fa.wds_shards(root, "train", classes, str(d), labels=labels, extra=train_extra)
    val = fa.wds_shards(root, "val", classes, str(d), shards=2, labels=labels,
                        name="imagenet-validation-{i:02d}.tar")
    return train, val


@pytest.mark.parametrize("labels", [("cls",), ("json",), ("cls", "json")])
def test_shards_hold_the_records_of_the_tree(labels, tree, tmp_path, capsys):
    """Labels from .cls, from .json's "label", or both; without --classes the classes are the
    labels seen, named by number; with --classes they are the file's lines."""
    root, classes, ref = tree
    shard_set(tree, tmp_path / "wds", labels)
    out = str(tmp_path / "out")
    convert([str(tmp_path / "wds"), out], capsys)
    for split in ("train", "val"):
        got, names = records(out, split)
        want, ref_classes = records(ref, split)
        assert got == want and names == ["0", "1", "2"]
        assert report(out, split) == []
    listed = tmp_path / "classes.txt"
    listed.write_text("".join(f"{c}\n" for c in classes))
    out2 = str(tmp_path / "out2")
    convert([str(tmp_path / "wds"), out2, "--classes", str(listed)], capsys)
    for split in ("train", "val"):
        assert records(out2, split) == records(ref, split)
    assert not [f for f in os.listdir(out2) if f.startswith(".listing-")]


def test_folder_pattern_list_and_split_folders_are_one_input(tree, tmp_path, capsys):
    """The same shards as a folder, a quoted brace pattern, a list, and train/ + val/ folders
    of shards with names that say no split: the same records in the same order."""
    train, val = shard_set(tree, tmp_path / "wds")
    outs = {}
    d = str(tmp_path / "wds")
    forms = {
        "folder": [d],
        "pattern": [os.path.join(d, "imagenet-train-{0000..0002}.tar"),
                    os.path.join(d, "imagenet-validation-{00,01}.tar")],
        "list": train + val,
    }
    split_dirs = tmp_path / "bysplit"
    for split, paths in (("train", train), ("val", val)):
        (split_dirs / split).mkdir(parents=True)
        for i, p in enumerate(paths):
            os.symlink(p, split_dirs / split / f"part-{i:03d}.tar")
    forms["split folders"] = [str(split_dirs)]
    for form, srcs in forms.items():
        outs[form] = str(tmp_path / form.replace(" ", "_"))
        convert([*srcs, outs[form]], capsys)
    for split in ("train", "val"):
        want = records(outs["folder"], split, ordered=True)
        assert want[0] and all(records(o, split, ordered=True) == want for o in outs.values())
    missing = os.path.join(d, "imagenet-train-{0000..0005}.tar")
    err = convert([missing, str(tmp_path / "o")], capsys, rc=2)
    assert "names 6 files, 3 of which do not exist" in err, err


def test_bad_groups_and_odd_members_are_reported(tree, tmp_path, capsys):
    """Every kind of bad group is skipped and reported with its shard; odd member kinds get one
    row each with their count; the records stored are exactly the good groups'. --strict stops
    at the broken image, naming the shard and member."""
    root, classes, ref = tree
    photo = open(os.path.join(root, "val", classes[0],
                              sorted(os.listdir(os.path.join(root, "val", classes[0])))[0]),
                 "rb").read()
    other = open(os.path.join(root, "val", classes[1],
                              sorted(os.listdir(os.path.join(root, "val", classes[1])))[0]),
                 "rb").read()
    with tarfile.open(fa.wds_shards(root, "train", classes, str(tmp_path / "probe"))[0]) as tf:
        k0, k1 = sorted({m.name.split(".")[0] for m in tf.getmembers()})[:2]  # keys of shard 0
    extra = [
        (0, "nolabel.jpg", photo),
        (0, "noimage.cls", b"1"),
        (0, "two.cls", b"1"), (0, "two.jpg", photo), (0, "two.png", photo),
        (0, "word.cls", b"seven"), (0, "word.jpg", photo),
        (0, "nofield.jpg", photo), (0, "nofield.json", b'{"width": 3}'),
        (0, "minus.cls", b"-1"), (0, "minus.jpg", photo),
        (0, "broken.cls", b"0"), (0, "broken.jpg", b"not a jpeg at all"),
        (0, f"{k0}.json", b'{"label": 0}'),  # its key again, after other groups
        (1, f"{k1}.cls", b"2"), (1, f"{k1}.jpg", other),  # a record name of shard 0
        (2, "cap1.txt", b"a caption"), (2, "cap2.txt", b"another"), (2, "._meta", b"x"),
        (2, "big.cls", b"9"), (2, "big.jpg", photo),
        (2, "dup.cls", b"0"), (2, "dup.jpg", photo), (2, "dup.jpg", photo),
        (2, "../up.cls", b"0"), (2, "../up.jpg", photo), (2, "/abs.jpg", photo),
    ]
    train, val = shard_set(tree, tmp_path / "wds", train_extra=extra)
    with tarfile.open(train[2], "a") as tf:
        _add(tf, "linked.cls", b"0")
        _add(tf, "linked.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
    listed = tmp_path / "classes.txt"
    listed.write_text("".join(f"{c}\n" for c in classes))
    out = str(tmp_path / "out")
    err = convert([str(tmp_path / "wds"), out, "--classes", str(listed)], capsys)
    assert records(out, "train") == records(ref, "train")
    rows = dict(report(out))
    s0, s1, s2 = (os.path.basename(p) for p in train)
    expect = {
        "nolabel.jpg": "has no label",
        "noimage.cls": "has no image",
        "two.{cls,jpg,png}": "has 2 images",
        "word.jpg": "label file word.cls holds 'seven', not an integer",
        "nofield.jpg": "label file nofield.json has no 'label' or 'cls' field",
        "minus.jpg": "label -1 in minus.cls",
        "broken.jpg": "",  # found by the workers: not an image
        f"{k0}.json": "its key repeats an earlier group of this shard",
        f"{k1}.jpg": f"repeats the name of a record stored from {s0} (in {s1})",
        "cap1.txt": "member kind .txt is not used: 2 such members",
        "._meta": "member kind (hidden file) is not used: 1 such member",
        "big.jpg": "label 9 is outside the class list (0..2 from --classes",
        "linked.jpg": "symbolic link",
        "dup.{cls,jpg,jpg}": "the group holds .jpg more than once",
        "../up.jpg": "unsafe member name '../up.jpg'",
        "/abs.jpg": "an absolute path",
    }
    for path, reason in expect.items():
        assert path in rows and reason in rows[path], (path, rows)
    for path in ("nolabel.jpg", "noimage.cls", "word.jpg", "minus.jpg"):
        assert f"(in {s0})" in rows[path]
    assert "(in " + s2 in rows["linked.jpg"] and "never read" in rows["linked.jpg"]
    assert f"{len(rows)} files skipped" in err
    # --strict: the broken image stops the conversion, named with its shard
    err = convert([str(tmp_path / "wds"), str(tmp_path / "strict"), "--classes", str(listed),
                   "--strict"], capsys, rc=1)
    assert f"{train[0]}:broken.jpg" in err and "--strict" in err, err


def test_webp_and_png_images_are_stored_as_jpeg(tmp_path, capsys):
    """Image kinds other than JPEG (any case) are records, re-encoded as RGB JPEG."""
    import json

    import cv2
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    shard = tmp_path / "imagenet-train-0.tar"
    with tarfile.open(shard, "w") as tf:
        for key, kind, label in (("a", "webp", 0), ("b", "PNG", 1)):
            _add(tf, f"{key}.cls", str(label).encode())
            _add(tf, f"{key}.{kind}", cv2.imencode("." + kind.lower(), pixels)[1].tobytes())
    out = str(tmp_path / "out")
    main([str(shard), out, "--splits", "train", "--workers", "0", "--no-progress", "--json"])
    got = json.loads(capsys.readouterr().out)["train"]
    assert got["images"] == 2 and got["converted"] == 2 and got["skipped"] == 0
    recs, classes = records(out, "train")
    assert sorted(lab for _, lab in recs) == [0, 1] and classes == ["0", "1"]
    assert all(j[:2] == b"\xff\xd8" for j, _ in recs)


def test_a_tar_that_is_no_input_kind_is_named(tree, tmp_path, capsys):
    root, classes, _ = tree
    odd = tmp_path / "stuff.tar"
    with tarfile.open(odd, "w") as tf:
        _add(tf, "docs/readme.txt", b"hello")
        _add(tf, "data.bin", b"\0" * 10)
    err = convert([str(odd), str(tmp_path / "o")], capsys, rc=2)
    assert "none of the tars the converter reads" in err and "WebDataset shard" in err, err
    assert "docs/readme.txt" in err
    # among shards: that one is named
    train, _ = shard_set(tree, tmp_path / "wds")
    bad = tmp_path / "wds" / "imagenet-train-0003.tar"
    os.rename(odd, bad)
    err = convert([str(tmp_path / "wds"), str(tmp_path / "o"), "--splits", "train"], capsys,
                  rc=2)
    assert f"{bad} is not a WebDataset shard" in err and "docs/readme.txt" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("case, expect", [
    ("unnamed", "name no split"),
    ("no val", "no val shards"),
    ("devkit", "WebDataset shards carry their labels"),
    ("classes for a tree", "--classes names the labels of WebDataset shards"),
    ("empty line", "an empty line"),
    ("twice", "on lines 1 and 3"),
    ("other names", "the .json of imagenet-train-0000.tar names it"),
])
def test_inputs_refused_with_the_way_out(case, expect, tree, tmp_path, capsys):
    root, classes, _ = tree
    train, val = shard_set(tree, tmp_path / "wds", labels=("cls", "json"))
    src, extra = [str(tmp_path / "wds")], []
    listed = tmp_path / "classes.txt"
    if case == "unnamed":
        for p in train:
            os.rename(p, p.replace("imagenet-train-", "part-"))
    elif case == "no val":
        for p in val:
            os.remove(p)
    elif case == "devkit":
        extra = ["--val-labels", str(listed)]
    elif case == "classes for a tree":
        src, extra = [root], ["--classes", str(listed)]
        listed.write_text("a\n")
    else:
        names = {"empty line": [classes[0], "", *classes[1:]],
                 "twice": [classes[0], classes[1], classes[0]],
                 "other names": list(reversed(classes))}[case]
        listed.write_text("".join(f"{c}\n" for c in names))
        extra = ["--classes", str(listed)]
    err = convert([*src, str(tmp_path / "o"), *extra], capsys, rc=2)
    assert expect in err, err
    if case == "unnamed":  # shards that name no split are one split's, given alone
        out = str(tmp_path / "o2")
        convert([*(p.replace("imagenet-train-", "part-") for p in train), out,
                 "--splits", "train"], capsys)
        assert records(out, "train")[0] == records(tree[2], "train")[0]


def test_output_verifies_and_loads(tree, tmp_path, capsys):
    from imagenet_seq.data import Loader
    from imagenet_seq.tools.verify_cli import main as verify

    shard_set(tree, tmp_path / "wds", labels=("json",))
    out = str(tmp_path / "out")
    convert([str(tmp_path / "wds"), out], capsys)
    assert verify([out, "--no-progress"]) == 0
    want = sorted(lab for _, lab in records(out, "train")[0])
    loader = Loader(out, "train", batch_size=4, num_workers=1, image_size=32, resize_size=36)
    try:
        got = sorted(int(t) for _, targets in loader for t in targets)
    finally:
        loader.close()
    assert got == want and len(got) == 18


def test_shards_are_read_front_to_back_each_in_turn(tree, tmp_path, monkeypatch):
    """One sweep: the shards in the order given, each read front to back (every pread at
    or after the previous one's end), none listed first; no shard file left open."""
    import imagenet_seq.convert.tar_sweep as ts

    train, _ = shard_set(tree, tmp_path / "wds")
    train = [os.path.realpath(p) for p in train]
    reads = []
    real = os.pread
    lock = threading.Lock()

    def spy(fd, n, off):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path in train:  # not the converter's own reads of its output
            with lock:
                reads.append((path, off, n))
        return real(fd, n, off)
    monkeypatch.setattr(ts.os, "pread", spy)
    monkeypatch.setattr(ts, "PIECE", 4096)
    assert main([str(tmp_path / "wds"), str(tmp_path / "o"), "--splits", "train", "--workers",
                 "2", "--no-progress", "--read-order", "name"]) == 0
    assert len(reads) == len(set(reads)) > len(train)
    order = [(train.index(p), off, n) for p, off, n in reads]
    assert [o[0] for o in order] == sorted(o[0] for o in order)  # each shard in turn
    assert all(b[1] >= a[1] + a[2] for a, b in zip(order, order[1:]) if a[0] == b[0])
    open_now = [fd for fd in range(3, 1024)
                if os.path.exists(f"/proc/self/fd/{fd}") and
                os.readlink(f"/proc/self/fd/{fd}") in train]
    assert open_now == []  # all closed at the end


def test_resume_continues_the_shards_sweep(tree, tmp_path, monkeypatch, capsys):
    """No shard is listed (one sweep each); an interrupted conversion resumes from the
    committed cursor and ends with the records of a clean run."""
    from imagenet_seq.convert import tar_source

    monkeypatch.setattr(convert_passes, "RUN_RECORDS", 4)
    fail_nth_run_write(monkeypatch, 2, OSError(5, "Input/output error"))
    listed = []
    monkeypatch.setattr(tar_source, "list_tar", lambda p, *a: listed.append(p))
    shard_set(tree, tmp_path / "wds")
    out = str(tmp_path / "out")
    convert([str(tmp_path / "wds"), out], capsys, rc=1)
    convert([str(tmp_path / "wds"), out, "--resume"], capsys)
    assert listed == []
    for split in ("train", "val"):
        assert records(out, split)[0] == records(tree[2], split)[0]

def test_brace_patterns_and_split_names():
    assert expand_braces("s-{0000..0002}.tar") == ["s-0000.tar", "s-0001.tar", "s-0002.tar"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("a{x,y{1..2}}b") == ["axb", "ay1b", "ay2b"]
    assert expand_braces("{a}{1,2}") == ["{a}1", "{a}2"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert split_of("/d/imagenet22k-train-0000.tar") == "train"
    assert split_of("/d/imagenet1k-validation-00.tar") == "val"
    assert split_of("/d/val/part-1.tar") == "val"
    assert split_of("/d/interval-1.tar") is None
