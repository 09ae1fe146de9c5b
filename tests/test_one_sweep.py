"""One sequential sweep over an archive (issue 26, item 4): ImageNet's train tar of per-class
tars, its flat val tar and WebDataset shards are each opened once and read front to back, with
no listing pass; the records equal those of the extracted tree whatever the form and the
shard count; kill -9 during the sweep and --resume ends with a clean run's files; the last
member of a name wins while streaming, also when the earlier copy is already in a run."""
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading

import pytest

import fake_archives as fa
from run_faults import KILL_IN_MERGE, KILL_IN_READ
from imagenet_seq.convert.cli import main
from imagenet_seq.convert.report import read_report
from imagenet_seq.read.reader import SplitReader
from imagenet_seq.tools.sample import make_sample_imagefolder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # a subprocess conversion takes ~2 s here: reaching it means a hang
SMALL = ("import imagenet_seq.convert.passes as cp\n"
         "cp.COMMIT_RECORDS = 4\ncp.RUN_RECORDS = 5\n")


def records(out, split):
    """(records in file order as (JPEG bytes, label), classes)."""
    r = SplitReader(out, split)
    try:
        return [(bytes(j), int(lab)) for _, j, lab in r.read_all()], list(r.meta.classes)
    finally:
        r.close()


def report(out, split="train"):
    path = os.path.join(out, f"ILSVRC-{split}.report.tsv")
    return dict(read_report(path)) if os.path.exists(path) else {}


def run(argv, prelude="", timeout=TIMEOUT):
    code = "import sys\n" + prelude + ("from imagenet_seq.convert.cli import main\n"
                                       "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code, *argv, "--workers", "0",
                           "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tree (3 classes x 7 train, 2 val), ImageNet's three archives of it, WebDataset
    shards of it, and the tree's conversion with a flat val/ (ImageNet's names) as reference."""
    d = tmp_path_factory.mktemp("onesweep")
    root = str(d / "in")
    classes = make_sample_imagefolder(root, train_per_class=7, val_per_class=2, num_classes=3,
                                      size=(40, 32))
    a = fa.ilsvrc(root, classes, d)
    ref = str(d / "ref")
    assert main([a["folder"], ref, "--val-labels", a["labels_file"], "--workers", "0",
                 "--no-progress"]) == 0
    wds = d / "wds"
    fa.wds_shards(root, "train", classes, str(wds))
    fa.wds_shards(root, "val", classes, str(wds), shards=2,
                  name="imagenet-validation-{i:02d}.tar")
    tree_ref = str(d / "tree_ref")
    assert main([root, tree_ref, "--workers", "0", "--no-progress"]) == 0
    return {"root": root, "classes": classes, "train": a["train"], "val": a["val"],
            "devkit": a["devkit"], "ref": ref, "wds": str(wds), "tree_ref": tree_ref, "dir": d}


def spy_reads(monkeypatch, names, probe=False):
    """Opens and preads of the files whose base name is in ``names``: {name: [...]}, where
    the opens are counted and each pread is (offset, size)."""
    from imagenet_seq.convert import tar_source, tar_sweep

    opens = {n: 0 for n in names}
    reads = {n: [] for n in names}
    lock = threading.Lock()
    real_open, real_pread = os.open, os.pread

    def o(path, *a, **k):
        fd = real_open(path, *a, **k)
        if os.path.basename(path) in names:
            with lock:
                opens[os.path.basename(path)] += 1
        return fd

    def p(fd, n, off):
        base = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if base in names:
            with lock:
                reads[base].append((off, n))
        return real_pread(fd, n, off)
    monkeypatch.setattr(tar_sweep.os, "open", o)
    monkeypatch.setattr(tar_sweep.os, "pread", p)
    monkeypatch.setattr(tar_sweep, "PIECE", 4096)  # many reads: their order is checked
    monkeypatch.setattr(tar_source, "list_tar", lambda *a, **k: pytest.fail("listed"))
    if not probe:  # a single tar: its first headers are looked at (WebDataset or a tree?)
        monkeypatch.setattr(tarfile, "open", _no_path_open(tarfile.open, names))
    return opens, reads


def _no_path_open(real, names):
    """tarfile.open by path (a second way in, outside the sweep) fails the test."""
    def opener(name=None, *a, **k):
        if name is not None and os.path.basename(str(name)) in names:
            pytest.fail(f"{name} opened by tarfile outside the sweep")
        return real(name, *a, **k)
    return opener


def assert_one_sweep(opens, reads, size_of):
    for name, n in opens.items():
        assert n == 1, (name, opens)
        got = reads[name]
        assert got, name
        # front to back: each pread at or after the previous one's end, no byte twice
        assert all(b[0] >= a[0] + a[1] for a, b in zip(got, got[1:])), (name, got)
        assert sum(n for _, n in got) <= size_of(name)


# ---------------------------------------------------------------- read once

def test_imagenet_archives_are_opened_once_and_read_front_to_back(data, tmp_path,
                                                                  monkeypatch):
    names = ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
    opens, reads = spy_reads(monkeypatch, names)
    out = str(tmp_path / "out")
    assert main([data["train"], data["val"], "--devkit", data["devkit"], out, "--workers",
                 "2", "--no-progress"]) == 0
    assert_one_sweep(opens, reads, lambda n: os.path.getsize(os.path.join(data["dir"], n)))
    for split in ("train", "val"):
        assert records(out, split) == records(data["ref"], split)


def test_webdataset_shards_are_each_opened_once_and_read_front_to_back(data, tmp_path,
                                                                       monkeypatch):
    names = sorted(os.listdir(data["wds"]))
    opens, reads = spy_reads(monkeypatch, names)
    out = str(tmp_path / "out")
    assert main([data["wds"], out, "--workers", "2", "--no-progress"]) == 0
    assert_one_sweep(opens, reads, lambda n: os.path.getsize(os.path.join(data["wds"], n)))
    for split in ("train", "val"):  # the keys are other names: the same records, in a set
        assert sorted(records(out, split)[0]) == sorted(records(data["tree_ref"], split)[0])


# ---------------------------------------------------------------- same output

@pytest.mark.parametrize("k", [1, 3, 5])
def test_archives_give_the_trees_records_whatever_the_shard_count(k, data, tmp_path):
    """Runs of a few records (many runs, merged by key), K shards over the records counted
    after the sweep: the shards one after the other hold the tree's conversion."""
    from imagenet_seq.format import manifest as mf

    out = str(tmp_path / "out")
    p = run([data["train"], data["val"], "--devkit", data["devkit"], out, "--shards", str(k)],
            SMALL)
    assert p.returncode == 0, p.stderr
    for split in ("train", "val"):
        want = records(data["ref"], split)
        shards = mf.open_split(out, split).shards
        assert len(shards) == k
        got = []
        for s in shards:
            got += records(s.path, split)[0]
        assert got == want[0]
        assert max(s.records for s in shards) - min(s.records for s in shards) <= 1


# ---------------------------------------------------------------- kill -9, resume

def test_kill_during_the_sweep_then_resume_equals_a_clean_run(data, tmp_path):
    out = str(tmp_path / "out")
    args = [data["train"], data["val"], "--devkit", data["devkit"], out]
    p = run(args, SMALL + KILL_IN_READ)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert os.path.exists(os.path.join(out, "ILSVRC-train.lmdb.partial"))
    p = run(args + ["--resume"], SMALL)
    assert p.returncode == 0, p.stderr
    for split in ("train", "val"):
        assert records(out, split) == records(data["ref"], split)
    assert not [f for f in os.listdir(out) if "partial" in f]


def test_kill_during_the_shards_sweep_then_resume_equals_a_clean_run(data, tmp_path):
    out = str(tmp_path / "out")
    clean = str(tmp_path / "clean")
    assert run([data["wds"], clean], SMALL).returncode == 0
    p = run([data["wds"], out], SMALL + KILL_IN_READ)
    assert p.returncode == -signal.SIGKILL, p.stderr
    p = run([data["wds"], out, "--resume"], SMALL)
    assert p.returncode == 0, p.stderr
    for split in ("train", "val"):
        assert records(out, split) == records(clean, split)


# ---------------------------------------------------------------- last member wins

def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _inner(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files:
            _add(tf, name, data)
    return buf.getvalue()


def test_the_last_member_of_a_name_wins_while_streaming(data, tmp_path, capsys):
    """ImageNet's train layout with a name twice inside a class tar (good then broken: nothing
    stored, the earlier reported replaced; broken then good: the later stored) and a whole
    class tar replaced by a later one; runs of 5 records, so earlier copies are in earlier
    runs when the later ones arrive. The records equal the extracted archive's."""
    root, classes = data["root"], data["classes"]
    c0, c1, c2 = classes

    def files(c):
        d = os.path.join(root, "train", c)
        return [(f, open(os.path.join(d, f), "rb").read()) for f in sorted(os.listdir(d))]
    f0, f1 = files(c0), files(c1)
    tar = str(tmp_path / "ILSVRC2012_img_train.tar")
    with tarfile.open(tar, "w") as outer:
        _add(outer, f"{c2}.tar", _inner(files(c2)[:3] + [("stale.JPEG", f0[0][1])]))
        _add(outer, f"{c0}.tar", _inner(
            [("gone.JPEG", f0[1][1])] + f0 + [("gone.JPEG", b"not a jpeg"),
                                               (f0[2][0], b"broken copy first")]
            + [(f0[2][0], f0[2][1])]))
        _add(outer, f"{c1}.tar", _inner(f1))
        _add(outer, f"{c2}.tar", _inner(files(c2)))  # replaces the first c2 tar as a whole
    # the same archive extracted as a safe extractor does it: the reference
    tree = tmp_path / "tree"
    for c, fs in ((c0, f0), (c1, f1), (c2, files(c2))):
        (tree / "train" / c).mkdir(parents=True)
        for name, b in fs:
            (tree / "train" / c / name).write_bytes(b)
    (tree / "train" / c0 / "gone.JPEG").write_bytes(b"not a jpeg")
    ref = str(tmp_path / "ref")
    assert main([str(tree), ref, "--splits", "train", "--workers", "0", "--no-progress"]) == 0
    out = str(tmp_path / "out")
    p = run([tar, out, "--splits", "train"], SMALL)
    assert p.returncode == 0, p.stderr
    assert records(out, "train") == records(ref, "train")
    listed = read_report(os.path.join(out, "ILSVRC-train.report.tsv"))
    gone = [why for path, why in listed if path == f"{c0}/gone.JPEG"]
    assert len(gone) == 2 and "duplicate member name" in gone[0], listed  # met first
    assert "duplicate" not in gone[1] and gone[1] == report(ref)[f"{c0}/gone.JPEG"], listed
    rows = report(out)
    assert "earlier copy of the nested tar" in rows[f"{c2}/stale.JPEG"], rows
    assert f"{c0}/{f0[2][0]}" in rows and "duplicate member name" in rows[f"{c0}/{f0[2][0]}"]
    assert set(rows) <= {f"{c0}/gone.JPEG", f"{c2}/stale.JPEG", f"{c0}/{f0[2][0]}"} | {
        f"{c2}/{n}" for n, _ in files(c2)}, rows


def test_a_tar_of_a_tree_is_read_once_for_both_splits(data, tmp_path, monkeypatch):
    """train/ and val/ of one tar: ONE sweep (one open by it, one forward pass), both
    splits' records (the tree's), no listing; with runs of a few records the two splits'
    runs interleave. (Before it, the first 16 headers are looked at to tell a WebDataset
    shard from a tar of a tree: a few KB at the file's start.)"""
    from imagenet_seq.convert import passes

    tar = fa.tar_tree(data["root"], str(tmp_path / "tree.tar"), prefix="data")
    opens, reads = spy_reads(monkeypatch, ["tree.tar"], probe=True)
    monkeypatch.setattr(passes, "RUN_RECORDS", 4)
    out = str(tmp_path / "out")
    assert main([tar, out, "--workers", "2", "--no-progress"]) == 0
    assert_one_sweep(opens, reads, lambda n: os.path.getsize(tar))
    for split in ("train", "val"):
        assert records(out, split) == records(data["tree_ref"], split)


def test_kill_during_a_tree_tar_sweep_then_resume_equals_a_clean_run(data, tmp_path):
    tar = fa.tar_tree(data["root"], str(tmp_path / "tree.tar"))
    out = str(tmp_path / "out")
    p = run([tar, out], SMALL + KILL_IN_READ)
    assert p.returncode == -signal.SIGKILL, p.stderr
    p = run([tar, out, "--resume"], SMALL)
    assert p.returncode == 0, p.stderr
    for split in ("train", "val"):
        assert records(out, split) == records(data["tree_ref"], split)


def test_a_changed_archive_is_not_resumed(data, tmp_path):
    """The .partial's fingerprint is of the archives' identity (path, size, modification
    time) and the options: an archive touched after the kill is refused, not mixed in."""
    tar = str(tmp_path / "ILSVRC2012_img_train.tar")
    import shutil
    shutil.copyfile(data["train"], tar)
    out = str(tmp_path / "out")
    p = run([tar, "--splits", "train", out], SMALL + KILL_IN_READ)
    assert p.returncode == -signal.SIGKILL, p.stderr
    st = os.stat(tar)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    p = run([tar, "--splits", "train", out, "--resume"], SMALL)
    assert p.returncode == 1 and "other inputs or options" in p.stderr, p.stderr
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    p = run([tar, "--splits", "train", out, "--resume"], SMALL)
    assert p.returncode == 0, p.stderr
    assert records(out, "train") == records(data["ref"], "train")




@pytest.mark.parametrize("form", ["imagenet", "wds"])
def test_kill_during_the_merge_then_resume_equals_a_clean_run(form, data, tmp_path):
    """Labels settled at the merge, copies dropped there, shards cut over the records counted
    after the sweep: a merge killed mid-shard and resumed writes a clean run's files."""
    src = [data["train"], data["val"], "--devkit", data["devkit"]] if form == "imagenet" \
        else [data["wds"]]
    clean, out = str(tmp_path / "clean"), str(tmp_path / "out")
    assert run(src + [clean, "--shards", "3"], SMALL).returncode == 0
    p = run(src + [out, "--shards", "3"], SMALL + KILL_IN_MERGE.format(at=9))
    assert p.returncode == -signal.SIGKILL, p.stderr
    p = run(src + [out, "--shards", "3", "--resume"], SMALL)
    assert p.returncode == 0, p.stderr
    from imagenet_seq.format import manifest as mf
    for split in ("train", "val"):
        got = [records(s.path, split) for s in mf.open_split(out, split).shards]
        want = [records(s.path, split) for s in mf.open_split(clean, split).shards]
        assert got == want
