"""Hostile inputs to the converter (issue 22, items 1, 2, 7), through the real CLI.

* Tar member names that leave the tree (absolute, ``..``), ``..`` inside the tree, duplicate
  names, symbolic and hard links in the tar, in a tar of a tree and in ImageNet's nested
  per-class tars.
* Folder and file links (and hard links) that would store one file twice in a split.
* Report rows for names holding tabs, newlines and control characters: read back with the
  csv module, the exact names.

Every case asserts the exit code, the report rows, and that the records stored equal those of
a clean conversion of the same images (same records in the same order, same labels, classes).
"""
import csv
import io
import os
import re
import shutil
import tarfile

import pytest

from imagenet_seq.convert.cli import main
from imagenet_seq.convert.report import read_report
from imagenet_seq.read.reader import SplitReader
from imagenet_seq.tools.sample import make_sample_imagefolder


def convert(srcs, out, *extra, rc=0, capsys=None):
    got = main([*srcs, out, "--workers", "0", "--no-progress", *extra])
    err = capsys.readouterr().err if capsys else ""
    assert got == rc, err
    return err


def contents(out, split):
    r = SplitReader(out, split)
    try:
        return {"records": [(bytes(j), int(lab)) for _, j, lab in r.read_all()],
                "classes": list(r.meta.classes), "counts": list(r.meta.class_counts),
                "n": r.meta.num_records}
    finally:
        r.close()


_UNESCAPE = {"\\\\": "\\", "\\t": "\t", "\\n": "\n", "\\r": "\r"}


def unescape(field):
    """The escaping documented in imagenet_seq/convert/report.py, written out independently."""
    return re.sub(r"\\(?:[\\tnr]|x[0-9a-f]{2}|u[0-9a-f]{4})",
                  lambda m: _UNESCAPE.get(m.group()) or chr(int(m.group()[2:], 16)), field)


def report(out, split="train"):
    """[(path, reason)] read with the csv module; every row one line of two fields."""
    path = os.path.join(out, f"ILSVRC-{split}.report.tsv")
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0] == ["path", "reason"]
    assert all(len(r) == 2 for r in rows), rows
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == len(rows)  # cut -f1, wc -l: a row a line
    got = [(unescape(p), unescape(r)) for p, r in rows[1:]]
    assert got == read_report(path)
    return got


def reasons(rows):
    out = {}
    for p, r in rows:
        out.setdefault(p, []).append(r)
    return {p: " | ".join(r) for p, r in out.items()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes x 4 train (+ C1/moved.JPEG, C0/dup.JPEG), 2 val each; and its clean
    conversion (both splits)."""
    d = tmp_path_factory.mktemp("hostile")
    root = str(d / "in")
    classes = make_sample_imagefolder(root, train_per_class=4, val_per_class=2, num_classes=3,
                                      size=(48, 32))
    val0 = sorted(os.listdir(os.path.join(root, "val", classes[2])))
    shutil.copy(os.path.join(root, "val", classes[2], val0[0]),
                os.path.join(root, "train", classes[1], "moved.JPEG"))
    shutil.copy(os.path.join(root, "val", classes[2], val0[1]),
                os.path.join(root, "train", classes[0], "dup.JPEG"))
    ref = str(d / "ref")
    assert main([root, ref, "--workers", "0", "--no-progress"]) == 0
    assert not os.path.exists(os.path.join(ref, "ILSVRC-train.report.tsv"))
    return {"root": root, "classes": classes, "ref": ref, "d": d,
            "train": contents(ref, "train"), "val": contents(ref, "val")}


def files(root, split, cls):
    return sorted(os.listdir(os.path.join(root, split, cls)))


def _add(tf, name, data=b"", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _bytes(root, rel):
    with open(os.path.join(root, rel), "rb") as f:
        return f.read()


# ---------------------------------------------------------------- 1. tar member names

def test_tar_member_names_are_taken_as_a_safe_extractor_takes_them(tree, tmp_path, capsys):
    """A tar of the tree in which one image is named through ``..`` inside the tree, one is
    there twice (an older copy first), val's members start with ``./``, and hostile members
    are added: names that leave the archive or the split, absolute names, links, a name with a
    newline. The records equal the extracted tree's; every hostile member has its row."""
    root, (c0, c1, c2) = tree["root"], tree["classes"]
    jpeg = _bytes(root, os.path.join("train", c0, files(root, "train", c0)[0]))
    f1 = files(root, "train", c1)[0]
    tar = str(tmp_path / "tree.tar")
    with tarfile.open(tar, "w") as tf:
        _add(tf, f"train/{c0}/dup.JPEG", jpeg)  # an older copy: the later one is stored
        for split in ("train", "val"):
            for c in tree["classes"]:
                for f in files(root, split, c):
                    data = _bytes(root, os.path.join(split, c, f))
                    if (split, c, f) == ("train", c1, "moved.JPEG"):
                        _add(tf, f"train/{c0}/../{c1}/moved.JPEG", data)  # is C1's
                    else:
                        _add(tf, f"./{split}/{c}/{f}" if split == "val" else
                             f"{split}/{c}/{f}", data)
        hostile = {
            "train/../../escape.JPEG": "outside the archive",
            "/abs/x.JPEG": "an absolute path",
            f"/train/{c2}/abs.JPEG": "an absolute path",
            f"train/../val/{c0}/hop.JPEG": "outside train/",
        }
        for name in hostile:
            _add(tf, name, jpeg)
        _add(tf, f"train/{c2}/sym.JPEG", kind=tarfile.SYMTYPE, link=f"../{c1}/{f1}")
        _add(tf, f"train/{c2}/hard.JPEG", kind=tarfile.LNKTYPE, link=f"train/{c1}/{f1}")
        _add(tf, f"train/{c2}/new\nline.txt", b"text")
        _add(tf, f"val/{c0}/../../../up.JPEG", jpeg)
    out = str(tmp_path / "out")
    err = convert([tar], out, capsys=capsys)
    assert "files skipped" in err
    assert contents(out, "train") == tree["train"]  # no class '..', moved.JPEG is C1's
    assert contents(out, "val") == tree["val"]  # hop.JPEG is not stored in val either
    rows = reasons(report(out, "train"))
    for name, why in hostile.items():
        assert "unsafe member name" in rows[name] and why in rows[name], (name, rows)
    assert "symbolic link" in rows[f"{c2}/sym.JPEG"]
    assert "hard link" in rows[f"{c2}/hard.JPEG"]
    assert "duplicate member name" in rows[f"{c0}/dup.JPEG"]
    assert "not an image file" in rows[f"{c2}/new\nline.txt"]
    assert len(report(out, "train")) == len(hostile) + 4
    val_rows = reasons(report(out, "val"))
    assert list(val_rows) == [f"val/{c0}/../../../up.JPEG"]
    assert "outside the archive" in val_rows[f"val/{c0}/../../../up.JPEG"]
    # --strict: the same skips end in a non-zero exit (nothing hostile passes silently)
    convert([tar], str(tmp_path / "strict"), "--strict", rc=1, capsys=capsys)


def test_nested_per_class_tars_are_held_to_their_folder(tree, tmp_path, capsys):
    """ImageNet's train archive layout (one ``<wnid>.tar`` per class): inner names that leave
    ``<wnid>/`` or are absolute, an inner link, an inner duplicate, an outer name that leaves
    the archive, and an older copy of a whole per-class tar replaced by a later one."""
    root, (c0, c1, c2) = tree["root"], tree["classes"]
    jpeg = _bytes(root, os.path.join("train", c2, files(root, "train", c2)[0]))

    def inner(c, extra_first=(), extra_last=(), rename=None):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for args in extra_first:
                _add(tf, *args)
            for f in files(root, "train", c):
                _add(tf, (rename or {}).get(f, f), _bytes(root, os.path.join("train", c, f)))
            for args in extra_last:
                _add(tf, *args)
        return buf.getvalue()

    first0 = files(root, "train", c0)[0]
    tar = str(tmp_path / "ILSVRC2012_img_train.tar")
    with tarfile.open(tar, "w") as outer:
        _add(outer, f"{c1}.tar", inner(c1, extra_last=[("stale.JPEG", jpeg)]))  # replaced
        _add(outer, "../evil.tar", inner(c2))
        _add(outer, f"{c0}.tar", inner(
            c0, extra_first=[("dup.JPEG", jpeg)],  # the archive's own dup.JPEG comes later
            extra_last=[(f"../{c2}/x.JPEG", jpeg), ("/abs.JPEG", jpeg),
                        ("s.JPEG", b"", tarfile.SYMTYPE, first0)],
            rename={first0: f"./sub/../{first0}"}))
        _add(outer, f"{c1}.tar", inner(c1))
        _add(outer, f"{c2}.tar", inner(c2))
    out = str(tmp_path / "out")
    convert([tar], out, "--splits", "train", capsys=capsys)
    assert contents(out, "train") == tree["train"]
    rows = reasons(report(out, "train"))
    assert "outside the folder " + c0 + "/" in rows[f"{c0}.tar:../{c2}/x.JPEG"]
    assert "an absolute path" in rows[f"{c0}.tar:/abs.JPEG"]
    assert "outside the archive" in rows["../evil.tar"]
    assert "symbolic link" in rows[f"{c0}/s.JPEG"]
    assert "duplicate member name" in rows[f"{c0}/dup.JPEG"]
    assert "earlier copy of the nested tar" in rows[f"{c1}/stale.JPEG"]
    for f in files(root, "train", c1):  # the older copy's members: reported, not stored
        assert "earlier copy" in rows[f"{c1}/{f}"] or "duplicate" in rows[f"{c1}/{f}"]


# ---------------------------------------------------------------- 2. links in a folder tree

def test_links_never_store_a_file_twice(tree, tmp_path, capsys):
    """``ln -s .. train/CLS/loop_dir`` (the issue's case, in the FIRST class, whose linked
    paths sort before the other classes' real ones), a link to a sibling class folder, a file
    link and a hard link to another class's image: each file stored once, under the path
    reached without a link (for two real paths, the first in sorted order)."""
    root = str(tmp_path / "in")
    shutil.copytree(tree["root"], root, symlinks=True)
    c0, c1, c2 = tree["classes"]
    f1 = files(root, "train", c1)[0]
    d0 = os.path.join(root, "train", c0)
    os.symlink("..", os.path.join(d0, "loop_dir"))
    os.symlink(os.path.join("..", c2), os.path.join(d0, "alias"))
    os.symlink(os.path.join("..", c1, f1), os.path.join(d0, "aaa_link.JPEG"))
    os.link(os.path.join(root, "train", c1, f1), os.path.join(root, "train", c2, "hard.JPEG"))
    out = str(tmp_path / "out")
    convert([root], out, capsys=capsys)
    assert contents(out, "train") == tree["train"]
    assert contents(out, "val") == tree["val"]
    rows = reasons(report(out))
    assert set(rows) == {f"{c0}/loop_dir", f"{c0}/alias", f"{c0}/aaa_link.JPEG",
                         f"{c2}/hard.JPEG"}
    assert "symbolic link loop" in rows[f"{c0}/loop_dir"]
    assert f"link to a folder already in this split ({c2})" in rows[f"{c0}/alias"]
    assert rows[f"{c0}/aaa_link.JPEG"].startswith(f"repeats {c1}/{f1} ")
    assert rows[f"{c2}/hard.JPEG"].startswith(f"repeats {c1}/{f1} ")


def test_links_to_new_files_are_followed_and_class_aliases_refused(tree, tmp_path, capsys):
    """Links are followed as ImageFolder follows them when they bring files not yet in the
    split; a class folder that is the same folder as another class is refused, naming both."""
    root = str(tmp_path / "in")
    shutil.copytree(tree["root"], root, symlinks=True)
    c0, c1, _ = tree["classes"]
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    shutil.copy(os.path.join(root, "val", c1, files(root, "val", c1)[0]), extra / "new.JPEG")
    os.symlink(str(extra), os.path.join(root, "train", c0, "ext"))
    out = str(tmp_path / "out")
    convert([root], out, "--splits", "train", capsys=capsys)
    got = contents(out, "train")
    assert got["n"] == tree["train"]["n"] + 1
    assert got["counts"][0] == tree["train"]["counts"][0] + 1
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.report.tsv"))
    os.symlink(c1, os.path.join(root, "train", "zz_alias"))
    err = convert([root], str(tmp_path / "o2"), "--splits", "train", rc=2, capsys=capsys)
    assert "zz_alias is the same folder as" in err and c1 in err, err
    assert not os.path.exists(os.path.join(str(tmp_path / "o2"), "ILSVRC-train.lmdb"))


# ---------------------------------------------------------------- 7. report rows that split

def test_report_rows_never_split(tree, tmp_path, capsys):
    """Skipped files whose names hold a tab, a newline, a carriage return, a backslash, an
    escape sequence, a line separator, or bytes that are not UTF-8: one row each, and the csv
    module (plus the documented unescaping) gives back the exact names."""
    root = str(tmp_path / "in")
    shutil.copytree(tree["root"], root, symlinks=True)
    c0 = tree["classes"][0]
    names = ["tab\there.txt", "new\nline.txt", "cr\rname.txt", "back\\slash.txt",
             "not\\tescaped.txt", "esc\x1b[31m.txt", "sep\u2028x.txt",
             os.fsdecode(b"x\xff\ty.txt")]
    for n in names:
        with open(os.path.join(root, "train", c0, n), "w") as f:
            f.write("not an image")
    open(os.path.join(root, "train", c0, "broken\tname.JPEG"), "wb").close()  # skipped later
    out = str(tmp_path / "out")
    convert([root], out, "--splits", "train", capsys=capsys)
    got, ref = contents(out, "train"), tree["train"]
    # the empty .JPEG is in the write plan (skipped when read), so the order differs
    assert sorted(got.pop("records")) == sorted(ref["records"])
    assert got == {k: v for k, v in ref.items() if k != "records"}
    rows = reasons(report(out))
    assert set(rows) == {f"{c0}/{n}" for n in names + ["broken\tname.JPEG"]}
    assert all("not an image file" in rows[f"{c0}/{n}"] for n in names)
    assert "empty" in rows[f"{c0}/broken\tname.JPEG"]
    raw = open(os.path.join(out, "ILSVRC-train.report.tsv"), "rb").read()
    assert f"{c0}/x\xff\\ty.txt".encode("latin-1") in raw  # the name's own bytes, tab escaped
    assert b"\x1b" not in raw  # printing the report sends no control sequence
