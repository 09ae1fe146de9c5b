"""The converter writes a split as K shards (issue 26, items 1-2): ``--shards K`` /
``--shard-gb N`` / ``--shard-dirs``, crash safety across shard boundaries, ``--overwrite`` of
a sharded output, and what ``imagenet-seq-verify`` / ``imagenet-seq-info`` say about it.

The one invariant: the shards' records one after the other (label + bytes, in order) are the
one-file conversion's records, whatever K, the folders, or a kill -9 and ``--resume`` between.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from imagenet_seq import format as fmt
from imagenet_seq.convert import source_reader
from imagenet_seq.convert.cli import main
from imagenet_seq.convert.sort_runs import HEAD as RUN_HEAD
from imagenet_seq.format import manifest as mf
from imagenet_seq.format import offsets
from imagenet_seq.tools import info
from imagenet_seq.tools.sample import make_sample_imagefolder
from imagenet_seq.tools.verify_cli import main as verify_main
from run_faults import KILL_IN_MERGE, KILL_IN_READ

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # a subprocess conversion takes ~2 s here: reaching it means a hang
SMALL = ("import imagenet_seq.convert.passes as cp\n"
         "cp.COMMIT_RECORDS = 4\ncp.RUN_RECORDS = 7\n")


# ---------------------------------------------------------------- helpers, fixtures

@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes x 10 train (+ one empty .JPEG: a skip inside the plan, + a .txt) and 3 x 3
    val, with 4 empty .JPEGs at the end of val's class 1: val's sorted plan positions 6..9
    are skips, so K = 7 gives val two shards with no record at all."""
    root = str(tmp_path_factory.mktemp("shards") / "in")
    classes = make_sample_imagefolder(root, train_per_class=10, val_per_class=3,
                                      num_classes=3, size=(96, 72))
    open(os.path.join(root, "train", classes[1], "empty.JPEG"), "wb").close()
    with open(os.path.join(root, "train", classes[2], "notes.txt"), "w") as f:
        f.write("not an image\n")
    for k in range(4):
        open(os.path.join(root, "val", classes[1], f"zz_{k}.JPEG"), "wb").close()
    return root


def convert(tree, out, *extra):
    return main([tree, out, "--workers", "0", "--no-progress", *extra])


def shard_records(path):
    """(label, JPEG bytes) of one shard file, in order; its __meta__ JSON; its skip records."""
    env = fmt.open_env(path)
    try:
        with env.begin() as txn:
            meta = json.loads(bytes(txn.get(fmt.META_KEY)))
            recs = []
            for i in range(meta["num_records"]):
                jpeg, label = fmt.decode_record(txn.get(fmt.record_key(i)))
                recs.append((label, bytes(jpeg)))
            cur, skips = txn.cursor(), []
            if cur.set_range(fmt.SKIP_PREFIX):
                for k, v in cur:
                    if not bytes(k).startswith(fmt.SKIP_PREFIX):
                        break
                    skips.append((bytes(k), json.loads(bytes(v))))
    finally:
        env.close()
    return recs, meta, skips


def split_records(root, split, shard_dirs=()):
    """The split's records (its shards one after the other), sorted skip records, and the
    shards' metadata."""
    sp = mf.open_split(root, split, shard_dirs)
    recs, metas, skips = [], [], []
    for s in sp.shards:
        r, meta, sk = shard_records(s.path)
        assert len(r) == s.records == meta["num_records"]
        recs += r
        metas.append(meta)
        skips += sk
    return recs, sorted(skips, key=lambda kv: kv[0]), metas, sp


@pytest.fixture(scope="module")
def one(tree, tmp_path_factory):
    """The one-file conversion of train and val: the reference."""
    out = str(tmp_path_factory.mktemp("one") / "out")
    assert convert(tree, out) == 0
    return out, {s: split_records(out, s) for s in fmt.SPLITS}


def assert_same_split(out, ref, split, shard_dirs=()):
    recs, skips, metas, sp = split_records(out, split, shard_dirs)
    r_recs, r_skips, (r_meta,), _ = ref[1][split]
    assert recs == r_recs  # record by record, order included
    assert [d for _, d in skips] == [d for _, d in r_skips]
    assert sp.num_records == r_meta["num_records"]
    if sp.manifest is not None:
        for k in ("num_records", "total_bytes", "classes", "class_counts", "order",
                  "options", "skipped"):
            assert sp.totals[k] == r_meta[k], k
    return sp, metas


def kill_run(tree, out, prelude, *extra):
    """A conversion in a subprocess that kills itself (SIGKILL) where ``prelude`` says."""
    code = ("import sys\n" + SMALL + prelude
            + "from imagenet_seq.convert.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", code, tree, out, "--workers", "0",
                        "--no-progress", *extra], cwd=REPO, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-3000:])


# ---------------------------------------------------------------- round trip

@pytest.mark.timeout(300)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_shards_concatenate_to_the_one_file_conversion(k, tree, one, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert convert(tree, out, "--shards", str(k), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    for split in fmt.SPLITS:
        sp, metas = assert_same_split(out, one, split)
        assert len(sp.shards) == k
        assert [r["path"] for r in summary[split]["shards"]] == sp.paths
        assert [r["records"] for r in summary[split]["shards"]] == [s.records for s in sp.shards]
        if k == 1:  # today's one file, exactly: no manifest, no "shard" key
            assert sp.manifest is None and summary[split]["manifest"] is None
            assert sp.paths == [os.path.join(out, fmt.split_filename(split))]
            assert "shard" not in metas[0]
            assert metas[0] == one[1][split][2][0]
            continue
        assert summary[split]["manifest"] == sp.manifest == os.path.join(
            out, mf.manifest_filename(split))
        assert sorted(os.listdir(out)) == sorted(
            [mf.shard_filename(s, j, k) for s in fmt.SPLITS for j in range(k)]
            + [mf.manifest_filename(s) for s in fmt.SPLITS] + ["ILSVRC-train.report.tsv",
                                                                "ILSVRC-val.report.tsv"])
        doc = mf.read_manifest(sp.manifest)
        first = 0
        for j, (s, meta, row) in enumerate(zip(sp.shards, metas, doc["shards"])):
            assert meta["shard"] == {"index": j, "count": k, "first": first,
                                     "split_id": doc["split_id"]}
            assert s.first == first and row["folder"] == "."
            assert s.bytes == meta["total_bytes"] and s.file_bytes == os.path.getsize(s.path)
            assert sum(meta["class_counts"]) == meta["num_records"]
            env = fmt.open_env(s.path)
            with env.begin() as txn:
                assert s.checksum == mf.shard_checksum(txn)
                assert txn.get(fmt.OFFSETS_KEY) is not None and txn.get(fmt.CRC_KEY)
            env.close()
            first += s.records
        assert sum(m["skipped"] for m in metas) == doc["skipped"] > 0
    if k == 7:  # the ranges are over val's 9 records (skips have no place): none empty
        assert [s.records for s in mf.open_split(out, "val").shards] == [2, 2, 1, 1, 1, 1, 1]
    assert verify_main([out, "--no-progress"]) == 0


def _estimate(tree, split="train"):
    """The split's estimated bytes as the converter states them: sources + headers."""
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(tree, split))
             for f in fs if f.endswith(".JPEG")]
    return sum(sizes) + len(sizes) * (RUN_HEAD.size + fmt.RECORD_HEADER.size)


@pytest.mark.timeout(300)
def test_shard_gb_gives_the_computed_count(tree, one, tmp_path, capsys):
    est = _estimate(tree)
    gb = est / 3.5 / 1e9  # ~3.5 shards' worth: 4
    want = mf.shard_count(est, gb)
    assert want == 4
    out = str(tmp_path / "out")
    assert convert(tree, out, "--splits", "train", "--shard-gb", f"{gb:.12f}") == 0
    sp, _ = assert_same_split(out, one, "train")
    assert len(sp.shards) == want
    table = capsys.readouterr().out
    assert f"train: {want} shards, manifest {sp.manifest}" in table
    for s in sp.shards:
        assert s.path in table
    # a size above the split: one file, as without the option
    out2 = str(tmp_path / "out2")
    assert convert(tree, out2, "--splits", "train", "--shard-gb", "1000") == 0
    assert os.listdir(out2) == ["ILSVRC-train.lmdb", "ILSVRC-train.report.tsv"]


@pytest.mark.timeout(300)
def test_shard_dirs_round_robin(tree, one, tmp_path, capsys):
    out, d2, d3 = (str(tmp_path / n) for n in ("out", "disk2", "disk3"))
    os.makedirs(d2)
    os.makedirs(d3)
    assert convert(tree, out, "--splits", "train", "--shards", "5", "--shard-dirs",
                   f"{d2},{d3}") == 0
    err = capsys.readouterr().err
    folders = [out, d2, d3]
    for j in range(5):  # shard j in folder j mod 3, nowhere else
        name = mf.shard_filename("train", j, 5)
        assert [f for f in folders if os.path.exists(os.path.join(f, name))] == [folders[j % 3]]
    doc = mf.read_manifest(os.path.join(out, mf.manifest_filename("train")))
    assert [r["folder"] for r in doc["shards"]] == [
        ".", os.path.realpath(d2), os.path.realpath(d3), ".", os.path.realpath(d2)]
    assert os.listdir(d2) and not any(n.endswith((".partial", ".lock", ".runs"))
                                      for f in folders for n in os.listdir(f))
    assert_same_split(out, one, "train")
    # each folder's share stated before the run
    assert f"in {d2} (shards 1, 4 of 5)" in err and f"in {d3} (shards 2 of 5)" not in err
    assert f"in {d3} (shard 2 of 5)" in err, err
    rep = info.splits_report(out)["train"]
    assert rep["shards"] == 5
    assert [os.path.realpath(f) for f in rep["folders"]] == [os.path.realpath(f) for f in folders]
    assert rep["records"] == 30
    # the output folder moved: shards of disk2 / disk3 found through shard_dirs
    moved = str(tmp_path / "moved")
    shutil.move(d2, moved)
    with pytest.raises(FileNotFoundError, match="shard 1 of 5"):
        mf.open_split(out, "train")
    assert_same_split(out, one, "train", shard_dirs=[moved])
    assert verify_main([out, "--no-progress", "--shard-dirs", moved]) == 0


@pytest.mark.parametrize("extra, msg", [
    (["--shards", "3", "--shard-dirs", "{missing}"], "{missing} does not exist"),
    (["--shards", "3", "--shard-dirs", "{file}"], "{file} is a file, not a folder"),
    (["--shards", "3", "--shard-dirs", "{d2},{d2}"], "name each folder once"),
    (["--shard-dirs", "{d2}"], "--shard-dirs needs --shards K or --shard-gb N"),
    (["--shards", "0"], "--shards 0; expected 1 or more"),
    (["--shards", "2", "--shard-dirs", "{inside}"], "--shard-dirs: the output folder {inside} is "
                                                    "inside"),
    (["--shard-gb", "0"], "--shard-gb 0.0; expected a size in GB above 0"),
])
def test_bad_shard_options_are_refused_before_anything(extra, msg, tree, tmp_path, capsys):
    cls = sorted(os.listdir(os.path.join(tree, "train")))[0]
    paths = {"missing": str(tmp_path / "nodisk"), "file": str(tmp_path / "afile"),
             "out": str(tmp_path / "out"), "d2": str(tmp_path / "d2"),
             "inside": os.path.join(tree, "train", cls)}
    open(paths["file"], "w").close()
    os.makedirs(paths["d2"])
    args = [a.format(**paths) for a in extra]
    assert convert(tree, paths["out"], "--splits", "train", *args) == 2
    assert msg.format(**paths) in capsys.readouterr().err
    assert not os.path.exists(paths["out"]) and not os.path.exists(paths["missing"])


def test_shards_and_shard_gb_exclude_each_other(tree, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert(tree, str(tmp_path / "out"), "--shards", "2", "--shard-gb", "1")
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_more_shards_than_images_is_refused_before_any_split(tree, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert convert(tree, out, "--shards", "14") == 2  # train has 31, val 13
    assert "--shards 14 for the 13 images of val" in capsys.readouterr().err
    assert not os.path.exists(out) or not any(n.endswith(".lmdb") for n in os.listdir(out))


def test_a_shard_folder_without_space_is_named_before_reading(tree, tmp_path, monkeypatch,
                                                              capsys):
    out, d2 = str(tmp_path / "out"), str(tmp_path / "disk2")
    os.makedirs(d2)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000) if
                        os.path.realpath(p) == os.path.realpath(d2) else real(p))
    read = []
    monkeypatch.setattr(source_reader, "read_source", lambda p: read.append(p))
    assert convert(tree, out, "--splits", "train", "--shards", "3", "--shard-dirs", d2) == 1
    err = capsys.readouterr().err
    assert "too little space for the output of train" in err, err
    assert f"on the disk of {d2} (shard 1 of 3" in err and "0.00 GB free there" in err, err
    assert read == [] and os.listdir(d2) == []


# ---------------------------------------------------------------- kill -9, resume

KILL_AT_RENAME = """
import os, signal
_replace, _n = os.replace, [0]
def _r(a, b):
    _n[0] += 1
    if _n[0] == {at} and {before}:
        os.kill(os.getpid(), signal.SIGKILL)
    _replace(a, b)
    if _n[0] == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = _r
"""
KILL_AFTER_HAND_OVER = """
import os, signal, imagenet_seq.convert.shard_sink as sh
_hand = sh.ShardSink.hand_over
def _h(self, txn):
    _hand(self, txn)
    if self.index == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
sh.ShardSink.hand_over = _h
"""


def _partial_records(path):
    """Committed records of a .partial (read without writing to it)."""
    import lmdb

    env = lmdb.open(path, subdir=False, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return sum(1 for k, _ in txn.cursor() if not bytes(k).startswith(b"__"))
    finally:
        env.close()


@pytest.fixture(scope="module")
def clean3(tree, tmp_path_factory):
    """An uninterrupted 3-shard conversion (small runs and commits) over two folders."""
    base = tmp_path_factory.mktemp("clean3")
    out, d2 = str(base / "out"), str(base / "d2")
    os.makedirs(d2)
    code = "import sys\n" + SMALL + ("from imagenet_seq.convert.cli import main\n"
                                     "sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", code, tree, out, "--splits", "train", "--workers",
                        "0", "--no-progress", "--shards", "3", "--shard-dirs", d2], cwd=REPO,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, mf.read_manifest(os.path.join(out, mf.manifest_filename("train")))


def _same_as_clean(out, clean3, one):
    assert_same_split(out, one, "train")
    doc = mf.read_manifest(os.path.join(out, mf.manifest_filename("train")))
    for row, ref in zip(doc["shards"], clean3[1]["shards"]):  # file sizes may differ
        assert {k: row[k] for k in ("name", "first", "records", "bytes", "checksum")} == \
            {k: ref[k] for k in ("name", "first", "records", "bytes", "checksum")}
    assert verify_main([out, "--no-progress"]) == 0


KILLS = {
    "mid-merge, shard 0 renamed, shard 1 holds records": KILL_IN_MERGE.format(at=17),
    "first merged record": KILL_IN_MERGE.format(at=0),
    "last merged record": KILL_IN_MERGE.format(at=29),
    "after the hand-over to shard 1, before shard 0's end": KILL_AFTER_HAND_OVER.format(at=0),
    "before shard 0's rename": KILL_AT_RENAME.format(at=1, before=True),
    "after the last shard's rename, before the manifest": KILL_AT_RENAME.format(at=3,
                                                                                before=False),
    "in pass 1 (sorted runs)": KILL_IN_READ,
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case, prelude", list(KILLS.items()), ids=list(KILLS))
def test_kill9_then_resume_gives_the_clean_shards(case, prelude, tree, one, clean3, tmp_path):
    out, d2 = str(tmp_path / "out"), str(tmp_path / "d2")
    os.makedirs(d2)
    args = ["--splits", "train", "--shards", "3", "--shard-dirs", d2]
    kill_run(tree, out, prelude, *args)
    s0 = os.path.join(out, mf.shard_filename("train", 0, 3))
    p1 = os.path.join(d2, mf.shard_filename("train", 1, 3) + ".partial")
    if case.startswith("mid-merge"):  # the state the issue names
        assert os.path.exists(s0) and not os.path.exists(s0 + ".partial")
        assert _partial_records(p1) >= 4  # one commit of shard 1 (COMMIT_RECORDS = 4)
    assert not os.path.exists(os.path.join(out, mf.manifest_filename("train")))
    # the same command with --resume ends as the uninterrupted run
    assert convert(tree, out, *args, "--resume") == 0
    _same_as_clean(out, clean3, one)
    leftovers = [n for f in (out, d2) for n in os.listdir(f)
                 if n.endswith((".partial", ".runs", "-lock", ".tmp"))]
    assert leftovers == []


from test_faults_convert import shim  # noqa: E402,F401 - its LD_PRELOAD write-fault shim


@pytest.mark.timeout(300)
def test_a_full_shard_disk_is_named_then_resume(tree, one, clean3, shim, tmp_path):
    """ENOSPC in the writes of shard 1 (in a --shard-dirs folder): the error names that
    folder as full (not the output folder) and --resume; the resume ends as a clean run."""
    out, d2 = str(tmp_path / "out"), str(tmp_path / "d2")
    os.makedirs(d2)
    args = ["--splits", "train", "--shards", "3", "--shard-dirs", d2]
    code = ("import sys\n" + SMALL + "from imagenet_seq.convert.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, LD_PRELOAD=shim, FAULT_ERRNO=str(errno.ENOSPC),
               FAULT_PATH=os.path.join(d2, mf.shard_filename("train", 1, 3)),
               FAULT_AFTER_BYTES="40000")
    p = subprocess.run([sys.executable, "-c", code, tree, out, "--workers", "0",
                        "--no-progress", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=TIMEOUT, env=env)
    assert p.returncode == 1, p.stderr[-3000:]
    assert f"the disk holding {d2} is full" in p.stderr and "--resume" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert os.path.exists(os.path.join(out, mf.shard_filename("train", 0, 3)))
    assert convert(tree, out, *args, "--resume") == 0
    _same_as_clean(out, clean3, one)


@pytest.mark.timeout(300)
def test_resume_with_another_layout_is_refused_naming_it(tree, tmp_path, capsys):
    out, d2 = str(tmp_path / "out"), str(tmp_path / "d2")
    os.makedirs(d2)
    kill_run(tree, out, KILL_IN_MERGE.format(at=17), "--splits", "train", "--shards", "3",
             "--shard-dirs", d2)
    assert convert(tree, out, "--splits", "train", "--shards", "2", "--resume") == 1
    err = capsys.readouterr().err
    assert "ILSVRC-train-00000-of-00003.lmdb" in err and "--shards 3" in err, err
    assert "--overwrite" in err
    # the same --shards, another --shard-dirs: named too
    d3 = str(tmp_path / "d3")
    os.makedirs(d3)
    assert convert(tree, out, "--splits", "train", "--shards", "3", "--shard-dirs", d3,
                   "--resume") == 1
    err = capsys.readouterr().err
    assert "shard 1 of 3" in err and d3 in err and "--shard-dirs it was started with" in err, err
    assert convert(tree, out, "--splits", "train", "--shards", "3", "--shard-dirs", d2,
                   "--resume") == 0


# ---------------------------------------------------------------- overwrite, side by side

@pytest.mark.timeout(300)
def test_overwrite_replaces_a_sharded_output_and_side_by_side_is_refused(tree, one, tmp_path,
                                                                         capsys):
    out, d2 = str(tmp_path / "out"), str(tmp_path / "d2")
    os.makedirs(d2)
    sharded = ["--splits", "train", "--shards", "3", "--shard-dirs", d2]
    assert convert(tree, out, *sharded) == 0
    capsys.readouterr()
    # the same again: complete, so refused; --resume keeps it and lists its shards
    assert convert(tree, out, *sharded) == 1
    assert "ILSVRC-train.manifest.json already exists; pass --overwrite" in \
        capsys.readouterr().err
    assert convert(tree, out, *sharded, "--resume", "--json") == 0
    got = json.loads(capsys.readouterr().out)["train"]
    assert got["already_complete"] and len(got["shards"]) == 3 and got["skipped"] == 2
    # one file beside the sharded split: refused, naming both and the ways out
    assert convert(tree, out, "--splits", "train") == 1
    err = capsys.readouterr().err
    assert "a sharded train split of 3 shards" in err and "one file ILSVRC-train.lmdb" in err
    assert "--overwrite" in err and "--shards 3" in err
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.lmdb"))
    # --overwrite as one file: every shard (both folders) and the manifest removed
    assert convert(tree, out, "--splits", "train", "--overwrite") == 0
    assert sorted(os.listdir(out)) == ["ILSVRC-train.lmdb", "ILSVRC-train.report.tsv"]
    assert os.listdir(d2) == []
    assert_same_split(out, one, "train")
    # and back: a sharded conversion beside the one file is refused, --overwrite replaces it
    assert convert(tree, out, *sharded) == 1
    err = capsys.readouterr().err
    assert "a one-file train split (ILSVRC-train.lmdb)" in err and "without --shards" in err
    assert convert(tree, out, *sharded, "--overwrite") == 0
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.lmdb"))
    assert_same_split(out, one, "train")
    # another shard count over it: --overwrite removes the 3 old shards everywhere
    assert convert(tree, out, "--splits", "train", "--shards", "2", "--overwrite") == 0
    assert os.listdir(d2) == []
    assert sorted(n for n in os.listdir(out) if n.endswith(".lmdb")) == [
        mf.shard_filename("train", j, 2) for j in range(2)]
    assert_same_split(out, one, "train")


# ---------------------------------------------------------------- verify, info

@pytest.mark.timeout(300)
def test_verify_names_a_missing_and_a_damaged_shard(tree, tmp_path, capsys):
    out, d2 = str(tmp_path / "out"), str(tmp_path / "d2")
    os.makedirs(d2)
    assert convert(tree, out, "--splits", "train", "--shards", "3", "--shard-dirs", d2) == 0
    capsys.readouterr()
    s1 = os.path.join(d2, mf.shard_filename("train", 1, 3))
    s2 = os.path.join(out, mf.shard_filename("train", 2, 3))
    # a shard alone verifies as a file and says which shard it is
    assert verify_main([s1, "--no-progress"]) == 0
    assert "OK (shard 1 of 3 of train, from record" in capsys.readouterr().out
    # missing
    shutil.move(s1, str(tmp_path / "aside.lmdb"))
    assert verify_main([out, "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert f"{mf.shard_filename('train', 1, 3)} (shard 1 of 3" in text and "is missing" in text
    assert f"not in {os.path.realpath(d2)}" in text and "--shard-dirs" in text, text
    assert info.main([out, "--shard-dirs", str(tmp_path / "nowhere")]) == 1
    assert "shard 1 of 3 of train" in capsys.readouterr().out
    shutil.move(str(tmp_path / "aside.lmdb"), s1)
    # a manifest that does not describe its shards: another split id, other byte counts
    man = os.path.join(out, mf.manifest_filename("train"))
    good = open(man).read()
    for change, said in (({"split_id": "another"}, "is not shard 0 of this split"),
                         ({"bytes": 1}, "bytes of images, the manifest recorded 1")):
        doc = json.loads(good)
        doc.update({k: v for k, v in change.items() if k == "split_id"})
        doc["shards"][0].update({k: v for k, v in change.items() if k == "bytes"})
        open(man, "w").write(json.dumps(doc))
        assert verify_main([out, "--no-progress"]) == 1
        assert said in capsys.readouterr().out
    open(man, "w").write(good)
    assert verify_main([out, "--no-progress"]) == 0
    capsys.readouterr()
    # a one-file split beside the manifest: two train splits, named
    one_file = os.path.join(out, "ILSVRC-train.lmdb")
    shutil.copy(s1, one_file)
    assert verify_main([out, "--no-progress"]) == 1
    assert f"{one_file} lies beside {man}: two train splits" in capsys.readouterr().out
    os.remove(one_file)
    # damaged: one byte of a record's JPEG flipped
    env = fmt.open_env(s2)
    offs, lens = offsets.read(env, 10, s2)
    env.close()
    assert offs[1] > 0 and lens[1] > 300  # record 1's value, where it lies in the file
    data = bytearray(open(s2, "rb").read())
    data[int(offs[1]) + 200] ^= 0xFF
    open(s2, "wb").write(data)
    assert verify_main([out, "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert f"shard 2  {s2}: 1 damaged record(s)" in text and "checksum mismatch" in text, text
    assert "--overwrite --shards 3" in text
    # cut short (an interrupted copy): its size against the manifest's
    os.truncate(s2, len(data) - 4096)
    assert verify_main([out, "--no-progress", "--json"]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert reports[0]["path"].endswith(mf.manifest_filename("train"))
    assert any("file size" in p["reason"] and p["key"] == "shard 2"
               for p in reports[0]["problems"])


def test_info_lists_one_file_and_shards(tree, one, tmp_path, capsys):
    assert info.main([one[0]]) == 0
    text = capsys.readouterr().out
    assert f"train: one file {os.path.join(one[0], 'ILSVRC-train.lmdb')}, 30 records" in text
    out = str(tmp_path / "out")
    assert convert(tree, out, "--splits", "val", "--shards", "2") == 0
    capsys.readouterr()
    assert info.main([out, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["splits"]
    assert list(rep) == ["val"] and rep["val"]["shards"] == 2 and rep["val"]["records"] == 9
    assert [r["records"] for r in rep["val"]["rows"]] == [5, 4]
