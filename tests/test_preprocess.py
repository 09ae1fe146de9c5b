import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from imagenet_seq import format as fmt
from imagenet_seq.convert.cli import main
from imagenet_seq.read.reader import SplitReader
from imagenet_seq.tools.sample import make_sample_imagefolder

from conftest import add_odd_files, copy_with_format_version, cv2_rgb, pil_rgb


def read_split(out, split):
    r = SplitReader(out, split)
    recs = list(r.read_all())
    r.close()
    return r, recs


def expected_entries(root, split, classes):
    out = []
    for ci, c in enumerate(classes):
        d = os.path.join(root, split, c)
        for f in sorted(os.listdir(d)):
            out.append((os.path.join(c, f), ci))
    return out


def match_records_to_files(root, split, recs, entries):
    """Map each record to its source file by bytes; every file exactly once, labels right."""
    by_bytes = {}
    for rel, label in entries:
        with open(os.path.join(root, split, rel), "rb") as f:
            by_bytes.setdefault(f.read(), []).append((rel, label))
    seen = []
    for _, jpeg, label in recs:
        cands = by_bytes[jpeg]
        rel, lab = cands.pop(0)
        assert lab == label, rel
        seen.append(rel)
    return seen


def test_round_trip_train_and_val(sample_tree, sample_lmdb):
    root, classes = sample_tree
    for split in ("train", "val"):
        r, recs = read_split(sample_lmdb, split)
        entries = expected_entries(root, split, classes)
        assert r.meta.num_records == len(entries) == len(recs)
        assert r.meta.classes == classes
        assert r.meta.class_counts == [sum(1 for _, l in entries if l == i)
                                       for i in range(len(classes))]
        assert r.meta.total_bytes == sum(len(j) for _, j, _ in recs)
        seen = match_records_to_files(root, split, recs, entries)
        assert sorted(seen) == sorted(e[0] for e in entries)
        assert list(r.labels) == [l for _, _, l in recs]
        if split == "val":
            assert seen == [e[0] for e in entries]  # sorted file order
        else:
            assert seen != sorted(seen)  # shuffled
        assert [i for i, _, _ in recs] == list(range(len(recs)))


def test_train_order_depends_on_seed(sample_tree, tmp_path):
    root, classes = sample_tree
    orders = {}
    for seed in (0, 0, 5):
        out = str(tmp_path / f"s{seed}_{len(orders)}")
        assert main([root, out, "--splits", "train", "--seed", str(seed), "--workers", "0",
                     "--no-progress"]) == 0
        _, recs = read_split(out, "train")
        orders.setdefault(seed, []).append(
            match_records_to_files(root, "train", recs, expected_entries(root, "train", classes)))
    assert orders[0][0] == orders[0][1]
    assert orders[0][0] != orders[5][0]
    assert sorted(orders[0][0]) == sorted(orders[5][0])


def test_odd_and_broken_files(tmp_path, capsys):
    root = str(tmp_path / "in")
    classes = make_sample_imagefolder(root, train_per_class=3, val_per_class=1, num_classes=2)
    odd = add_odd_files(root, classes[0])
    out = str(tmp_path / "out")
    assert main([root, out, "--workers", "2", "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "warning" in captured.err
    n_skip = sum(1 for v in odd.values() if v == "skip")
    assert summary["train"]["skipped"] == n_skip
    report = open(summary["train"]["report"]).read().splitlines()[1:]
    reported = {line.split("\t")[0]: line.split("\t")[1] for line in report}
    assert set(reported) == {k for k, v in odd.items() if v == "skip"}
    assert "truncated" in reported[os.path.join(classes[0], "truncated.JPEG")]
    assert "empty" in reported[os.path.join(classes[0], "empty.JPEG")]

    r, recs = read_split(out, "train")
    stored_odd = {k for k, v in odd.items() if v is None}
    assert r.meta.num_records == 3 * 2 + len(stored_odd)
    # every stored record decodes to 3-channel pixels; odd files match PIL's reference
    refs = {k: pil_rgb(os.path.join(root, "train", k)) for k in stored_odd}
    matched = set()
    for _, jpeg, label in recs:
        img = cv2_rgb(jpeg)
        assert img is not None and img.ndim == 3 and img.shape[2] == 3
        for k, ref in refs.items():
            if ref.shape == img.shape and label == 0:
                diff = np.abs(ref.astype(int) - img.astype(int))
                if diff.mean() < 3.0:
                    matched.add(k)
    assert matched == stored_odd


def test_exif_stripped_losslessly(tmp_path):
    from PIL import Image
    from imagenet_seq.convert.images import inspect_jpeg, normalise

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8))
    ex = Image.Exif()
    ex[0x0112] = 6
    import io
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=ex.tobytes())
    data = buf.getvalue()
    out, note = normalise(data)
    assert note == "EXIF removed"
    assert inspect_jpeg(out)[1] is False
    assert np.array_equal(cv2_rgb(out), pil_rgb(data))  # same entropy data, same pixels


def test_flat_val_with_both_label_formats(tmp_path):
    root = str(tmp_path / "in")
    classes = make_sample_imagefolder(root, train_per_class=2, val_per_class=3, num_classes=3)
    flat = os.path.join(root, "val")
    truth = {}
    for ci, c in enumerate(classes):
        for f in os.listdir(os.path.join(flat, c)):
            name = f"ILSVRC2012_val_{len(truth):08d}.JPEG"
            shutil.move(os.path.join(flat, c, f), os.path.join(flat, name))
            truth[name] = ci
        os.rmdir(os.path.join(flat, c))
    txt = tmp_path / "val.txt"
    txt.write_text("".join(f"{n} {classes[l]}\n" for n, l in truth.items()))
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{n[:-5]},{classes[l]} 1 2 3 4 {classes[l]} 5 6 7 8\n" for n, l in truth.items()))
    for labels in (txt, csv):
        out = str(tmp_path / f"out_{labels.name}")
        assert main([root, out, "--val-labels", str(labels), "--workers", "0",
                     "--no-progress"]) == 0
        _, recs = read_split(out, "val")
        files = sorted(truth)
        assert [l for _, _, l in recs] == [truth[n] for n in files]
        for (_, jpeg, _), n in zip(recs, files):
            assert jpeg == open(os.path.join(flat, n), "rb").read()


def _err(argv, capsys, code=2):
    assert main(argv + ["--no-progress"]) == code
    return capsys.readouterr().err


def test_bad_inputs(tmp_path, capsys):
    root = str(tmp_path / "in")
    assert "does not exist" in _err([str(tmp_path / "nope"), str(tmp_path / "o")], capsys)
    os.makedirs(os.path.join(root, "train"))
    assert "no class folders" in _err([root, str(tmp_path / "o")], capsys)
    os.makedirs(os.path.join(root, "train", "a"))
    assert "holds no images" in _err([root, str(tmp_path / "o"), "--splits", "train"], capsys)
    shutil.rmtree(root)
    classes = make_sample_imagefolder(root, train_per_class=2, val_per_class=2, num_classes=2)
    assert "--splits" in _err([root, str(tmp_path / "o"), "--splits", "test"], capsys)
    # flat val without labels / labels naming unknown files and classes
    for c in classes:
        for f in os.listdir(os.path.join(root, "val", c)):
            shutil.move(os.path.join(root, "val", c, f), os.path.join(root, "val", f))
        os.rmdir(os.path.join(root, "val", c))
    assert "--val-labels" in _err([root, str(tmp_path / "o")], capsys)
    names = sorted(os.listdir(os.path.join(root, "val")))
    bad = tmp_path / "bad.txt"
    bad.write_text("".join(f"{n} {classes[0]}\n" for n in names) + "ghost.JPEG n0\n")
    assert "ghost" in _err([root, str(tmp_path / "o"), "--val-labels", str(bad)], capsys)
    bad.write_text("".join(f"{n} nXXX\n" for n in names))
    assert "nXXX" in _err([root, str(tmp_path / "o"), "--val-labels", str(bad)], capsys)
    bad.write_text(f"{names[0]} {classes[0]}\n")
    assert "no label" in _err([root, str(tmp_path / "o"), "--val-labels", str(bad)], capsys)
    # a dangling link has no content: skipped and reported like any file that is not an image
    os.symlink(str(tmp_path / "missing.JPEG"), os.path.join(root, "train", classes[0], "x.JPEG"))
    assert main([root, str(tmp_path / "o"), "--splits", "train", "--workers", "0",
                 "--no-progress"]) == 0
    report = open(tmp_path / "o" / "ILSVRC-train.report.tsv").read()
    assert os.path.join(classes[0], "x.JPEG") + "\tdangling symbolic link" in report
    os.remove(os.path.join(root, "train", classes[0], "x.JPEG"))


def test_unreadable_file_stops_with_its_path(tmp_path, capsys, monkeypatch):
    """A regular file that cannot be read (permissions, EIO: chmod does not stop root, so the
    read is patched) stops the run naming it; fixing it and --resume finishes the file."""
    import errno
    import imagenet_seq.convert.source_reader as cw

    root = str(tmp_path / "in")
    classes = make_sample_imagefolder(root, train_per_class=3, val_per_class=1, num_classes=2)
    real = cw.read_source
    bad = os.path.join(classes[1], os.listdir(os.path.join(root, "train", classes[1]))[0])

    def failing(path):
        if path.endswith(bad):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real(path)
    monkeypatch.setattr(cw, "read_source", failing)
    out = str(tmp_path / "o")
    err = _err([root, out, "--splits", "train", "--workers", "0"], capsys, 1)
    assert bad in err and "cannot read" in err and "--resume" in err
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.lmdb"))
    monkeypatch.setattr(cw, "read_source", real)
    assert main([root, out, "--splits", "train", "--workers", "0", "--resume",
                 "--no-progress"]) == 0
    r, recs = read_split(out, "train")
    assert len(recs) == r.meta.num_records == 6


def test_refuse_overwrite_and_strict(sample_tree, tmp_path, capsys):
    root, _ = sample_tree
    out = str(tmp_path / "o")
    assert main([root, out, "--splits", "val", "--workers", "0", "--no-progress"]) == 0
    err = _err([root, out, "--splits", "val", "--workers", "0"], capsys, 1)
    assert "--overwrite" in err
    assert main([root, out, "--splits", "val", "--overwrite", "--workers", "0",
                 "--no-progress"]) == 0
    r, _ = read_split(out, "val")
    assert r.meta.num_records == 12


def test_strict_stops_at_broken(tmp_path, capsys):
    root = str(tmp_path / "in")
    classes = make_sample_imagefolder(root, train_per_class=3, val_per_class=1, num_classes=2)
    open(os.path.join(root, "train", classes[1], "empty.JPEG"), "wb").close()
    err = _err([root, str(tmp_path / "o"), "--strict", "--workers", "0"], capsys, 1)
    assert "empty.JPEG" in err and "empty file" in err
    assert not os.path.exists(tmp_path / "o" / "ILSVRC-train.lmdb")


def test_metadata_version_checked(sample_lmdb, tmp_path):
    path = str(tmp_path / "copy.lmdb")
    copy_with_format_version(os.path.join(sample_lmdb, "ILSVRC-val.lmdb"), path, 99)
    with pytest.raises(ValueError, match="version 99.*version 1"):
        SplitReader(path, "val")


def test_missing_lmdb_lists_folder(tmp_path):
    (tmp_path / "other.lmdb").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="other.lmdb.*preprocess_sequential"):
        SplitReader(str(tmp_path), "train")
    with pytest.raises(ValueError, match="'test'"):
        SplitReader(str(tmp_path), "test")


def test_script_and_console_entry(sample_tree, tmp_path):
    root, _ = sample_tree
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(here, "preprocess_sequential.py"), "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--val-labels" in r.stdout
    exe = shutil.which("imagenet-seq-preprocess")
    if exe:
        r = subprocess.run([exe, root, str(tmp_path / "o"), "--splits", "val", "--no-progress"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_disk_full_then_resume(tmp_path, monkeypatch, capsys):
    """A full disk (LMDB map full) stops with a clear error; --resume finishes the same file."""
    root = str(tmp_path / "in")
    make_sample_imagefolder(root, train_per_class=30, val_per_class=1, num_classes=2,
                            size=(200, 150))
    clean = str(tmp_path / "clean")
    assert main([root, clean, "--splits", "train", "--workers", "0", "--no-progress"]) == 0
    import imagenet_seq.convert.passes as w
    monkeypatch.setattr(w, "COMMIT_RECORDS", 10)
    monkeypatch.setattr(fmt, "MAP_SIZE", 400_000)  # room for a few commits only
    out = str(tmp_path / "o")
    assert main([root, out, "--splits", "train", "--workers", "0", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--resume" in err and "map size" in err  # the map, not the disk, is full
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.lmdb"))
    monkeypatch.setattr(fmt, "MAP_SIZE", 1 << 30)
    assert main([root, out, "--splits", "train", "--workers", "0", "--resume",
                 "--no-progress"]) == 0
    _, a = read_split(clean, "train")
    _, b = read_split(out, "train")
    assert [(j, l) for _, j, l in a] == [(j, l) for _, j, l in b]


def test_reader_queues_its_span_ahead(sample_lmdb, monkeypatch):
    """read_range keeps the span's bytes queued with WILLNEED ahead of the cursor, in order
    (as for a cold cache: bytes already in the page cache are not queued again)."""
    import imagenet_seq.read.readahead as reader_mod

    monkeypatch.setattr(reader_mod, "_resident", lambda addr, length: False)
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(reader_mod.os, "posix_fadvise",
                        lambda fd, off, n, advice: (calls.append((off, n, advice)),
                                                    real(fd, off, n, advice))[1])
    r = SplitReader(sample_lmdb, "train")
    got = list(r.read_range(3, 20))
    r.close()
    assert [i for i, _, _ in got] == list(range(3, 23))
    assert calls and all(a == os.POSIX_FADV_WILLNEED for _, _, a in calls)
    offs = [o for o, _, _ in calls]
    assert offs == sorted(offs)  # one forward run
    assert all(b[0] == a[0] + a[1] for a, b in zip(calls, calls[1:]))  # contiguous
    size = os.path.getsize(os.path.join(sample_lmdb, "ILSVRC-train.lmdb"))
    queued = sum(n for _, n, _ in calls)
    assert sum(len(j) for _, j, _ in got) <= queued and offs[-1] < size
