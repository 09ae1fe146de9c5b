"""The converter as a torchrun job (issue 27): real torchrun, real processes, gloo on localhost.

The output of 1, 2 and 3 processes is the one-process conversion's (records, order, labels,
shard contents and metadata, report rows), from a folder tree and from WebDataset shards; a
rank killed with SIGKILL in either pass fails the job, naming it, and ``--resume`` with the
same command ends with the clean output; an error on one rank stops every rank with that
rank's message; a rank that stops answering is found by the others without torchrun's help;
what cannot be divided is refused before anything is written."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pytest

from imagenet_seq.convert.cli import main
from imagenet_seq.tools.sample import make_sample_imagefolder

import fake_archives as fa
from dist_helpers import contents
from run_faults import KILL_IN_MERGE, KILL_IN_READ

pytestmark = pytest.mark.timeout(300)

RUNNER = """
import os, sys
if os.environ.get("TEST_KILL_RANK") == os.environ.get("RANK") \\
        and not os.path.exists(os.environ["TEST_KILLED"]):
    open(os.environ["TEST_KILLED"], "w").close()
    exec(os.environ["TEST_PRELUDE"])
if os.environ.get("TEST_RUN_RECORDS"):
    import imagenet_seq.convert.passes as cp
    cp.RUN_RECORDS = int(os.environ["TEST_RUN_RECORDS"])
from imagenet_seq.convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = tmp_path_factory.mktemp("runner") / "convert_job.py"
    path.write_text(RUNNER)
    return str(path)


def torchrun(runner, n, args, prelude=None, rank=1, run_records=4, timeout=240):
    """``torchrun --standalone --nproc_per_node n runner args``; ``prelude`` runs first on
    ``rank`` (once: a resumed job runs clean). Returns the CompletedProcess."""
    env = dict(os.environ, TEST_RUN_RECORDS=str(run_records), OMP_NUM_THREADS="1")
    if prelude is not None:
        env.update(TEST_KILL_RANK=str(rank), TEST_PRELUDE=prelude,
                   TEST_KILLED=os.path.join(os.path.dirname(runner),
                                            f"killed-{time.monotonic_ns()}"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={n}", "--monitor-interval=0.2", runner, *args,
           "--workers", "0", "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """6 class folders of different sizes, a broken JPEG and a file that is not an image
    (report rows), and the one-process conversion into 3 shards (the reference)."""
    root = str(tmp_path_factory.mktemp("dist") / "src")
    classes = make_sample_imagefolder(root, train_per_class=10, val_per_class=3,
                                      num_classes=6, size=(40, 30), seed=3)
    extra = os.path.join(root, "train", classes[1])
    for k in range(7):  # class 1 larger than the others
        shutil.copy(os.path.join(extra, sorted(os.listdir(extra))[0]),
                    os.path.join(extra, f"extra_{k}.JPEG"))
    with open(os.path.join(root, "train", classes[4], "broken.JPEG"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    with open(os.path.join(root, "train", classes[2], "notes.txt"), "w") as f:
        f.write("not an image")
    ref = str(tmp_path_factory.mktemp("dist") / "ref")
    assert main([root, ref, "--shards", "3", "--workers", "0", "--no-progress"]) == 0
    return root, ref


def same(out, ref, splits=("train", "val")):
    for split in splits:
        got, want = contents(out, split), contents(ref, split)
        assert len(got["records"]) == len(want["records"]) and got["records"] == \
            want["records"], split
        assert got["shards"] == want["shards"], split
        assert got["report"] == want["report"], split


@pytest.mark.parametrize("n", [1, 2, 3])
def test_output_is_the_one_process_conversion(tree, runner, tmp_path, n):
    root, ref = tree
    out = str(tmp_path / "out")
    got = torchrun(runner, n, [root, out, "--shards", "3", "--json"])
    assert got.returncode == 0, got.stderr[-3000:]
    same(out, ref)
    assert not [p for p in os.listdir(out) if p.endswith(".dist")]  # temporary folder gone
    summary = json.loads(got.stdout.strip().splitlines()[-1])
    assert summary["train"]["images"] == len(contents(ref, "train")["records"])
    if n > 1:  # per-rank figures: every rank's merge, on rank 0
        assert len(summary["train"]["ranks"]) == n
        assert sum(r["merge"]["images"] for r in summary["train"]["ranks"]) >= \
            summary["train"]["images"]
        assert "processes, each reading one part" in got.stderr


def test_webdataset_shards_two_processes(tree, runner, tmp_path):
    """A name repeated in a shard of the second part and in one of the first: the first met
    is stored, as the one-process sweep stores it; an odd member kind counted over parts."""
    root, _ = tree
    classes = sorted(os.listdir(os.path.join(root, "val")))
    shards = fa.wds_shards(root, "train", classes, str(tmp_path / "wds"), shards=6,
                           extra=[(0, "dup_a.txt", b"x"), (4, "dup_a.txt", b"y")])
    src = fa.wds_shards(root, "train", classes, str(tmp_path / "wds2"), shards=1)[0]
    with tarfile.open(src) as tf:  # the first group of shard 0's again, in shard 5
        first = [m for m in tf.getmembers()][:2]
        blobs = [(m.name, tf.extractfile(m).read()) for m in first]
    with tarfile.open(shards[5], "a") as tf:
        for name, data in blobs:
            fa._add_bytes(tf, name, data)
    ref = str(tmp_path / "ref")
    assert main([*shards, ref, "--splits", "train", "--shards", "2", "--workers", "0",
                 "--no-progress"]) == 0
    out = str(tmp_path / "out")
    got = torchrun(runner, 2, [*shards, out, "--splits", "train", "--shards", "2"])
    assert got.returncode == 0, got.stderr[-3000:]
    same(out, ref, ("train",))
    report = "\n".join(contents(out, "train")["report"])
    assert "repeats the name" in report and "member kind .txt" in report


def test_kill9_in_pass1_then_resume(tree, runner, tmp_path):
    """Rank 1 killed as it writes its third run: the job fails naming rank 1; a resume with
    another process count is refused naming both; the same command with --resume ends with
    the clean output."""
    root, ref = tree
    out = str(tmp_path / "out")
    args = [root, out, "--shards", "3"]
    got = torchrun(runner, 2, args, prelude=KILL_IN_READ, rank=1)
    assert got.returncode != 0
    assert "rank      : 1" in got.stderr or "rank 1" in got.stderr, got.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "ILSVRC-train.manifest.json"))
    other = torchrun(runner, 3, args + ["--resume"])
    assert other.returncode != 0
    assert "started with 2 processes; this run has 3" in other.stderr, other.stderr[-3000:]
    again = torchrun(runner, 2, args + ["--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    same(out, ref)


def test_kill9_in_merge_then_resume(tree, runner, tmp_path):
    root, ref = tree
    out = str(tmp_path / "out")
    args = [root, out, "--shards", "3"]
    got = torchrun(runner, 2, args, prelude=KILL_IN_MERGE.format(at=5), rank=1)
    assert got.returncode != 0
    assert "-9" in got.stderr or "Signal 9" in got.stderr or "SIGKILL" in got.stderr, \
        got.stderr[-3000:]
    again = torchrun(runner, 2, args + ["--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    same(out, ref)


def test_error_on_one_rank_stops_every_rank(tree, runner, tmp_path):
    """A shard cut short in rank 1's part: rank 1 says so, rank 0 stops naming rank 1."""
    root, _ = tree
    classes = sorted(os.listdir(os.path.join(root, "val")))
    shards = fa.wds_shards(root, "train", classes, str(tmp_path / "wds"), shards=4)
    with open(shards[3], "r+b") as f:
        f.truncate(os.path.getsize(shards[3]) // 2 + 100)
    out = str(tmp_path / "out")
    got = torchrun(runner, 2, [*shards, out, "--splits", "train", "--shards", "2"])
    assert got.returncode != 0
    assert "cut short" in got.stderr or "ends inside" in got.stderr, got.stderr[-3000:]
    assert "stopped because rank 1" in got.stderr, got.stderr[-3000:]


def test_one_archive_is_refused(tree, runner, tmp_path):
    root, _ = tree
    tar = fa.tar_tree(root, str(tmp_path / "tree.tar"))
    out = str(tmp_path / "out")
    got = torchrun(runner, 2, [tar, out, "--splits", "train"])
    assert got.returncode != 0
    assert "cannot be divided between 2 processes" in got.stderr, got.stderr[-3000:]
    assert not [p for p in os.listdir(out) if p.endswith(".lmdb")] if os.path.isdir(out) \
        else True


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_that_stops_answering_stops_the_others(tree, runner, tmp_path):
    """Launched without torchrun (its variables set by hand, as a scheduler may): rank 1
    killed; rank 0, left alone, stops within seconds naming rank 1, and exits 1."""
    root, _ = tree
    out = str(tmp_path / "out")
    port = _free_port()
    procs = []
    for r in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   LOCAL_RANK=str(r), WORLD_SIZE="2", IMAGENET_SEQ_DIST_GRACE_S="3",
                   TEST_RUN_RECORDS="4", OMP_NUM_THREADS="1")
        if r == 1:
            env.update(TEST_KILL_RANK="1", TEST_PRELUDE=KILL_IN_READ,
                       TEST_KILLED=str(tmp_path / "killed"))
        procs.append(subprocess.Popen(
            [sys.executable, runner, root, out, "--shards", "3", "--workers", "0",
             "--no-progress"], env=env, stderr=subprocess.PIPE, text=True))
    try:
        assert procs[1].wait(timeout=120) == -signal.SIGKILL
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=60)
        waited = time.monotonic() - t0
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert rc == 1, err[-3000:]
    assert "rank 1 stopped answering" in err, err[-3000:]
    assert waited < 60


def test_ranks_that_see_other_sources_are_refused(tree, runner, tmp_path):
    """Rank 1 given a copy of the tree with one file less (a node mounting other data):
    refused before anything is converted, naming the rank."""
    root, _ = tree
    other = str(tmp_path / "other")
    shutil.copytree(root, other)
    cls = sorted(os.listdir(os.path.join(other, "train")))[0]
    os.remove(os.path.join(other, "train", cls, sorted(os.listdir(
        os.path.join(other, "train", cls)))[0]))
    out = str(tmp_path / "out")
    port = _free_port()
    procs = []
    for r, src in enumerate((root, other)):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   LOCAL_RANK=str(r), WORLD_SIZE="2", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            [sys.executable, runner, src, out, "--splits", "train", "--workers", "0",
             "--no-progress"], env=env, stderr=subprocess.PIPE, text=True))
    try:
        rcs = [p.wait(timeout=120) for p in procs]
        errs = [p.stderr.read() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(rc != 0 for rc in rcs), errs
    assert "rank 1 sees other sources" in errs[1], errs[1][-3000:]
    assert "stopped because rank 1" in errs[0], errs[0][-3000:]
    assert not [n for n in os.listdir(out) if n.endswith(".lmdb")]
